#!/usr/bin/env bash
# NBD export and copy-before-write benchmarks (docs/benchmarks.md, section 7).
#
#   bench/nbd.sh OUT
#
# On a fully allocated qcow2 of SIZE (default 4G, 64 KiB clusters) in DIR (default
# /var/tmp/vhost-blk-nbd-bench, the root disk), O_DIRECT everywhere:
#  1. export throughput, no other load: `nbdcopy URI null:` of the whole export from our
#     daemon (--direct) and from qemu-nbd (--cache=none --aio=io_uring -r), RUNS times each;
#  2. the same copy from our point-in-time export while vhost-blk-bench writes 4 KiB
#     randomly at QD32 through the daemon (the guest);
#  3. guest IOPS (randwrite-4k-qd32, RUNTIME s): without a view; during the first
#     FIRST s of a new view (first overwrites: most writes copy a 64 KiB chunk first);
#     with a view that has already preserved every chunk (after a sequential 1 MiB pass
#     over the whole disk).
# One key=value line per measurement goes to OUT; logs to OUT.log.
set -euo pipefail

OUT=${1:?usage: bench/nbd.sh OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH:-$ROOT/target/release/vhost-blk-bench}
OURS=${OURS:-$ROOT/target/release/vhost-device-blk-bitmap}
DIR=${DIR:-/var/tmp/vhost-blk-nbd-bench}
SIZE=${SIZE:-4G}
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-10}
FIRST=${FIRST:-3}
LOG=$OUT.log
IMG=$DIR/disk.qcow2
SOCK=$DIR/vhost.sock
QMP=$DIR/qmp.sock
NBD=$DIR/nbd.sock
CTL=("$OURS" ctl --qmp-socket "$QMP")

for t in "$BENCH" "$OURS"; do [ -x "$t" ] || { echo "build first: $t" >&2; exit 1; }; done
for t in qemu-img qemu-io qemu-nbd nbdcopy; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
mkdir -p "$DIR"
: >"$LOG"

note() { echo "$*" | tee -a "$OUT"; }

# A fully allocated image with non-zero data (written once, reused by every step).
if [ ! -f "$IMG" ]; then
    qemu-img create -q -f qcow2 -o cluster_size=64k "$IMG" "$SIZE"
    gib=$(( $(numfmt --from=iec "$SIZE") >> 30 ))
    cmds=()
    for i in $(seq 0 $((gib - 1))); do cmds+=(-c "write -P 0x5a ${i}G 1G"); done
    qemu-io -f qcow2 "${cmds[@]}" "$IMG" >>"$LOG"
fi
BYTES=$(qemu-img info --output=json "$IMG" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')

DAEMON_PID=
start_ours() {
    rm -f "$SOCK" "$QMP" "$NBD"
    "$OURS" -s "$SOCK" --image "$IMG" --format qcow2 --direct --qmp-socket "$QMP" \
        --nbd-socket "$NBD" --fleece-dir "$DIR" >>"$LOG" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 100); do [ -S "$SOCK" ] && [ -S "$QMP" ] && break; sleep 0.1; done
}
stop_ours() {
    [ -n "$DAEMON_PID" ] || return 0
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
}
trap 'stop_ours; [ -n "${QNBD_PID:-}" ] && kill $QNBD_PID 2>/dev/null; true' EXIT

# Seconds (float) `nbdcopy URI null:` takes, from a cold page cache.
copy_secs() {
    local t0 t1
    sync
    echo 3 >/proc/sys/vm/drop_caches
    t0=$(date +%s.%N)
    nbdcopy "$1" null: 2>>"$LOG"
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.3f}')"
}
mibs() { python3 -c "print(f'{$BYTES / 1048576 / $1:.0f}')"; }

# IOPS of one vhost-blk-bench job line (field iops=...).
bench_iops() {
    "$BENCH" --socket "$SOCK" --pid "$DAEMON_PID" --runtime "$2" --ramp 0 --jobs "$1" \
        --label ours 2>>"$LOG" | tee -a "$LOG" | sed -n 's/.*iops=\([0-9.]*\).*/\1/p' | head -1
}

snapshot_add() {
    "${CTL[@]}" block-export-add \
        '{"type": "nbd", "id": "snap", "node-name": "disk0", "name": "snap", "x-snapshot": true}' >>"$LOG"
}
snapshot_del() { "${CTL[@]}" block-export-del '{"id": "snap", "mode": "hard"}' >>"$LOG"; }
fleece_bytes() {
    "${CTL[@]}" query-block-exports | python3 -c \
        'import json,sys; print(sum(e.get("x-fleece-bytes", 0) for e in json.load(sys.stdin)))'
}

for run in $(seq "$RUNS"); do
    # 1. Export throughput alone.
    start_ours
    s=$(copy_secs "nbd+unix:///?socket=$NBD")
    note "step=copy server=ours run=$run secs=$s mibs=$(mibs "$s")"
    stop_ours
    rm -f "$DIR/qnbd.sock"
    qemu-nbd -r -f qcow2 --cache=none --aio=io_uring -t -k "$DIR/qnbd.sock" "$IMG" >>"$LOG" 2>&1 &
    QNBD_PID=$!
    for _ in $(seq 100); do [ -S "$DIR/qnbd.sock" ] && break; sleep 0.1; done
    s=$(copy_secs "nbd+unix:///?socket=$DIR/qnbd.sock")
    note "step=copy server=qemu-nbd run=$run secs=$s mibs=$(mibs "$s")"
    kill $QNBD_PID; wait $QNBD_PID 2>/dev/null || true; QNBD_PID=

    # 3a. Guest IOPS without a view.
    start_ours
    iops=$(bench_iops randwrite-4k-qd32 "$RUNTIME")
    note "step=guest view=none run=$run iops=$iops"
    # 3b. First overwrites: a new view, the first FIRST seconds.
    snapshot_add
    iops=$(bench_iops randwrite-4k-qd32 "$FIRST")
    note "step=guest view=first-overwrites run=$run secs=$FIRST iops=$iops fleece_bytes=$(fleece_bytes)"
    # 2. Copy the point-in-time export while the guest writes.
    "$BENCH" --socket "$SOCK" --pid "$DAEMON_PID" --runtime 600 --ramp 0 \
        --jobs randwrite-4k-qd32 --label ours-bg >>"$LOG" 2>&1 &
    BG=$!
    sleep 1
    s=$(copy_secs "nbd+unix:///snap?socket=$NBD")
    kill $BG 2>/dev/null || true
    wait $BG 2>/dev/null || true
    note "step=copy server=ours-snapshot-under-load run=$run secs=$s mibs=$(mibs "$s") fleece_bytes=$(fleece_bytes)"
    # The guest connection was dropped by the kill; reconnecting is the daemon's normal case.
    # 3c. Every chunk preserved: one sequential pass, then random writes.
    for _ in $(seq 20); do
        [ "$(fleece_bytes)" -ge "$BYTES" ] && break
        bench_iops write-1m-qd8 10 >/dev/null
    done
    iops=$(bench_iops randwrite-4k-qd32 "$RUNTIME")
    note "step=guest view=all-copied run=$run iops=$iops fleece_bytes=$(fleece_bytes)"
    snapshot_del
    iops=$(bench_iops randwrite-4k-qd32 "$RUNTIME")
    note "step=guest view=none-after run=$run iops=$iops"
    stop_ours
done
