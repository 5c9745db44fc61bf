#!/usr/bin/env bash
# Install the manual pages of vhost-device-blk-bitmap, generated from its command-line
# definitions by the binary's hidden `man` subcommand: vhost-device-blk-bitmap.1 and one
# page per subcommand (vhost-device-blk-bitmap-bitmap.1, -create.1, -check.1, -ctl.1 and
# the nested ones such as vhost-device-blk-bitmap-bitmap-add.1).
#
# Usage: resources/install-man.sh
#   PREFIX=/usr/local   pages go to $DESTDIR$PREFIX/share/man/man1 (default /usr/local)
#   DESTDIR=            staging root for packaging (default: none)
#   BIN=path            generate with this binary instead of target/release's, which is
#                       built (cargo build --release) when missing or older than the sources
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
MAN1="${DESTDIR}${PREFIX}/share/man/man1"

if [[ -z ${BIN:-} ]]; then
    BIN="${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/vhost-device-blk-bitmap"
    stale=
    if [[ ! -x $BIN ]]; then
        stale=missing
    elif [[ -n $(find "$REPO_DIR/vhost-device-blk-bitmap/src" \
        "$REPO_DIR/vhost-device-blk-bitmap/Cargo.toml" "$REPO_DIR/Cargo.toml" \
        "$REPO_DIR/Cargo.lock" -newer "$BIN" -print -quit) ]]; then
        stale="older than the sources"
    fi
    if [[ -n $stale ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
        command -v cargo >/dev/null \
            || { echo "install-man: $BIN is $stale and cargo is not installed" >&2; exit 1; }
        echo "install-man: building $BIN ($stale)" >&2
        (cd "$REPO_DIR" && cargo build --release --quiet -p vhost-device-blk-bitmap \
            --bin vhost-device-blk-bitmap)
    fi
fi
[[ -x $BIN ]] || { echo "install-man: $BIN is not an executable" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
"$BIN" man --dir "$tmp" >/dev/null
pages=("$tmp"/*.1)
[[ -e ${pages[0]} ]] || { echo "install-man: $BIN wrote no manual page" >&2; exit 1; }

install -d -m 0755 "$MAN1"
install -m 0644 "${pages[@]}" "$MAN1/"
echo "install-man: ${#pages[@]} page(s) installed in $MAN1" >&2
for p in "${pages[@]}"; do
    echo "$MAN1/${p##*/}"
done
