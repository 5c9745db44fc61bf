#!/usr/bin/env bash
# Serve a disk over vhost-user: builds the daemon, makes a demo image when none is given,
# and runs it in the foreground (Ctrl-C stores the bitmaps and exits).
#
# Usage: resources/serve.sh [IMAGE [extra daemon options...]]
#   SOCKET=/path/to.sock resources/serve.sh      (default /tmp/vhost-blk-bitmap.sock)
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
SOCKET=${SOCKET:-/tmp/vhost-blk-bitmap.sock}

command -v cargo >/dev/null || [[ -x "$HOME/.cargo/bin/cargo" ]] \
    || { echo "serve: cargo not found: install a Rust toolchain first" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet --bin vhost-device-blk-bitmap
BIN=target/release/vhost-device-blk-bitmap

if [[ $# -ge 1 ]]; then
    IMAGE=$1
    shift
    exec "$BIN" --socket-path "$SOCKET" --image "$IMAGE" "$@"
fi

# No image: a 1 GiB demo qcow2 (sparse) with an enabled persistent bitmap "demo".
IMAGE=target/demo/demo.qcow2
mkdir -p target/demo
echo "serve: demo image $IMAGE (1 GiB qcow2, bitmap 'demo'), socket $SOCKET" >&2
exec "$BIN" --socket-path "$SOCKET" --image "$IMAGE" --create-size 1G \
    --bitmap demo,granularity=64K --num-queues 2
