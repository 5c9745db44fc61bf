#!/usr/bin/env bash
# Run every test of the workspace, including the real-guest end-to-end tests.
#
# Usage: resources/run-tests.sh [extra cargo test args...]
#   e.g. resources/run-tests.sh -- --nocapture
#
# On a fresh Debian 12 (bookworm) machine run it as root: missing prerequisites are
# installed with apt-get (qemu-utils, a C toolchain, python3). qemu-system-x86 is never installed (it would replace the qemu-utils backport);
# resources/build-guest.sh unpacks its own copy into target/guest instead.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

log() { printf 'run-tests: %s\n' "$*" >&2; }
die() { printf 'run-tests: error: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_install() {
    [[ $(id -u) -eq 0 ]] || die "need root to install: $*"
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        apt-get -qq update >/dev/null
        APT_UPDATED=1
    fi
    log "installing $*"
    apt-get -qq install -y --no-install-recommends "$@" >/dev/null
}

# --- system packages (only what is missing) -----------------------------------------
need=()
command -v python3 >/dev/null || need+=(python3)
# The QMP interop tests put the qemu.qmp library (PyPI) into a venv.
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v cc >/dev/null || need+=(build-essential)
command -v flock >/dev/null || need+=(util-linux)
# The man page tests render with groff and man.
command -v groff >/dev/null || need+=(groff-base)
command -v man >/dev/null || need+=(man-db)
# The NBD interop tests use libnbd's tools (nbdinfo, nbdcopy) and its python binding.
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
# Line coverage (resources/coverage.sh) needs llvm-profdata/llvm-cov of LLVM 19 or later.
have_llvm=0
for v in 19 20 21 22; do [[ -x /usr/lib/llvm-$v/bin/llvm-cov ]] && have_llvm=1; done
((have_llvm)) || need+=(llvm-19)
command -v apt-get >/dev/null || die "this script expects a Debian 12 host"
((${#need[@]} == 0)) || apt_install "${need[@]}"

# QEMU tools: qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon (all in qemu-utils 10.x).
if ! command -v qemu-img >/dev/null || ! command -v qemu-storage-daemon >/dev/null \
   || ! command -v qemu-io >/dev/null || ! command -v qemu-nbd >/dev/null; then
    apt_install qemu-utils
    for t in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
        command -v "$t" >/dev/null || die "$t still missing after installing qemu-utils"
    done
fi

# Rust toolchain (the workspace needs a newer one than Debian's rustc).
if ! command -v cargo >/dev/null; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        die "cargo not found: install a Rust toolchain (rustup) first"
    fi
fi

# --- guest pieces for the real-guest tests (cached in target/guest) ----------------
gstart=$(date +%s)
resources/build-guest.sh
log "guest environment ready ($(($(date +%s) - gstart)) s)"

# --- style and lints (as rust-vmm CI gates every change) ------------------------------
log "cargo fmt --check; clippy -D warnings; doc -D warnings"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# --- tests ---------------------------------------------------------------------------
log "cargo test --workspace --release $*"
cargo test --workspace --release "$@"

# --- line coverage of the libraries, against coverage_config_x86_64.json --------------
# (a run narrowed by arguments is not the whole suite: no coverage figure then)
if (($# == 0)); then
    resources/coverage.sh
fi
