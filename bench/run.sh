#!/usr/bin/env bash
# Runs the daemon benchmarks of docs/benchmarks.md and appends one key=value line per
# job and run to OUT.
#
#   bench/run.sh tmpfs|disk OUT
#
# tmpfs: images in /dev/shm (software path; no O_DIRECT there, so our daemon runs
#        without --direct and qemu-storage-daemon with cache.direct=off).
# disk:  images in /var/tmp (on the root disk); our daemon with --direct,
#        qemu-storage-daemon with cache.direct=on, fio with direct=1 on a raw file.
#
# Environment: SERVERS (default "ours qsd"; see start_server for all, and fio), RUNS (3),
# RUNTIME (10 s measured per job), RAMP (1 s), JOBS (vhost-blk-bench --jobs list),
# DIR (image folder), OURS / BENCH (binaries; default target/release).
# A job allocwrite-BS-qdN is randwrite-BS-qdN (alloctouch-BS-qdN: touchwrite-BS-qdN,
# every request in a 1 MiB region not written before) into a FRESH empty qcow2 of ALLOC_SIZE
# (default 16G; `qemu-img create`, 64 KiB clusters) made before every run of it, with
# its own server start, ALLOC_RUNTIME (default RUNTIME) measured seconds, and a
# `qemu-img check` of the image afterwards (allocated clusters and errors logged); fio
# runs it on a fresh sparse raw file of ALLOC_SIZE. ALLOC_CREATE_OPTS adds qemu-img create
# options for that image (e.g. "-o preallocation=metadata": writes then allocate no
# qcow2 clusters). Server logs go to OUT.log.
# Every run starts from a fresh copy of a fully allocated 1 GiB qcow2 image
# (64 KiB clusters; made with qemu-img + qemu-io) or, for ours-raw, of a 1 GiB raw file
# of random bytes, so servers and runs see the same on-disk state. fio runs on its own
# 1 GiB raw file of random bytes in the same folder.
set -euo pipefail

MODE=${1:?usage: bench/run.sh tmpfs|disk OUT}
OUT=${2:?usage: bench/run.sh tmpfs|disk OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH:-$ROOT/target/release/vhost-blk-bench}
OURS=${OURS:-$ROOT/target/release/vhost-device-blk-bitmap}
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
JOBS=${JOBS:-randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,randwrite-4k-qd32,write-1m-qd8}
SERVERS=${SERVERS:-ours qsd}
SIZE=1G
ALLOC_SIZE=${ALLOC_SIZE:-16G}
ALLOC_RUNTIME=${ALLOC_RUNTIME:-$RUNTIME}
LOG=$OUT.log

case $MODE in
tmpfs)
    DIR=${DIR:-/dev/shm/vhost-blk-bench}
    OURS_DIRECT=()
    QSD_DIRECT=off
    QSD_AIO= # qsd default aio=threads
    FIO_DIRECT=0
    ;;
disk)
    DIR=${DIR:-/var/tmp/vhost-blk-bench}
    OURS_DIRECT=(--direct)
    QSD_DIRECT=on
    QSD_AIO=,aio=io_uring
    FIO_DIRECT=1
    ;;
*)
    echo "mode must be tmpfs or disk" >&2
    exit 2
    ;;
esac
mkdir -p "$DIR"
SOCK=$DIR/vhost.sock

for tool in qemu-img qemu-io; do
    command -v $tool >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[ -x "$BENCH" ] || { echo "build first: cargo build --release -p vhost-blk-bench" >&2; exit 1; }

if [ ! -f "$DIR/base.qcow2" ]; then
    qemu-img create -q -f qcow2 "$DIR/base.tmp" $SIZE
    qemu-io -f qcow2 -c "write -P 0x5a 0 $SIZE" "$DIR/base.tmp" >/dev/null
    mv "$DIR/base.tmp" "$DIR/base.qcow2"
fi
if [ ! -f "$DIR/base.raw" ]; then
    dd if=/dev/urandom of="$DIR/base.tmp" bs=1M count=1024 status=none
    mv "$DIR/base.tmp" "$DIR/base.raw"
fi
[ -f "$DIR/fio.raw" ] || cp "$DIR/base.raw" "$DIR/fio.raw"
sync

PID=
cleanup() {
    if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

wait_socket() {
    for _ in $(seq 200); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$PID" 2>/dev/null || { echo "server exited" >&2; cat "$DIR/server.log" >&2; exit 1; }
        sleep 0.05
    done
    echo "socket $SOCK never appeared" >&2
    exit 1
}

qsd_start() { # $1: cache.direct value
    qemu-storage-daemon \
        --blockdev driver=file,node-name=file0,filename="$IMG",cache.direct=$1$QSD_AIO \
        --blockdev driver=qcow2,node-name=disk0,file=file0 \
        --export type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path="$SOCK",writable=on,num-queues=1 \
        >"$DIR/server.log" 2>&1 &
}

# Server names: ours, ours-bitmap (qcow2 + --bitmap b0, crash-consistency shadow on),
# ours-bitmap-noshadow (the same with --no-crash-consistent-bitmaps), ours-buffered (never --direct),
# ours-raw (raw image), ours-threads (--aio threads), qsd, qsd-bitmap, qsd-buffered
# (cache.direct=off). $2 = fresh: a new empty qcow2 of ALLOC_SIZE instead of the base copy.
start_server() {
    rm -f "$SOCK"
    IMG=$DIR/img.qcow2
    rm -f "$IMG" "$DIR/img.raw"
    if [ "${2:-}" = fresh ]; then
        # shellcheck disable=SC2086 # ALLOC_CREATE_OPTS is a list of qemu-img options
        qemu-img create -q -f qcow2 ${ALLOC_CREATE_OPTS:-} "$IMG" "$ALLOC_SIZE"
    else
    case $1 in
    ours-raw)
        IMG=$DIR/img.raw
        cp "$DIR/base.raw" "$IMG"
        ;;
    *)
        cp "$DIR/base.qcow2" "$IMG"
        ;;
    esac
    fi
    case $1 in
    *-bitmap*) qemu-img bitmap --add "$IMG" b0 ;;
    esac
    sync
    case $1 in
    ours | ours-raw) "$OURS" --socket-path "$SOCK" --image "$IMG" "${OURS_DIRECT[@]}" >"$DIR/server.log" 2>&1 & ;;
    ours-buffered) "$OURS" --socket-path "$SOCK" --image "$IMG" >"$DIR/server.log" 2>&1 & ;;
    ours-threads) "$OURS" --socket-path "$SOCK" --image "$IMG" "${OURS_DIRECT[@]}" --aio threads >"$DIR/server.log" 2>&1 & ;;
    ours-bitmap) "$OURS" --socket-path "$SOCK" --image "$IMG" "${OURS_DIRECT[@]}" --bitmap b0 >"$DIR/server.log" 2>&1 & ;;
    ours-bitmap-noshadow) "$OURS" --socket-path "$SOCK" --image "$IMG" "${OURS_DIRECT[@]}" --bitmap b0 --no-crash-consistent-bitmaps >"$DIR/server.log" 2>&1 & ;;
    qsd | qsd-bitmap) qsd_start $QSD_DIRECT ;;
    qsd-buffered) qsd_start off ;;
    *)
        echo "unknown server $1" >&2
        exit 2
        ;;
    esac
    PID=$!
    wait_socket
}

stop_server() { # $1: server name
    local rc=0
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" || rc=$?
    PID=
    { echo "# server.log of $1 ($MODE), exit status $rc:"; cat "$DIR/server.log"; } >>"$LOG"
    [ $rc = 0 ] || { echo "server exit status $rc" >&2; cat "$DIR/server.log" >&2; }
}

# Runs vhost-blk-bench; on failure logs it (and the server log) and goes on.
run_bench() { # $1: server, $2: jobs, $3: runtime, $4: sed expression for the output
    "$BENCH" --socket "$SOCK" --pid "$PID" --runtime "$3" --ramp "$RAMP" \
        --jobs "$2" --label "$1-$MODE" 2>>"$LOG" | sed -e "$4" | tee -a "$OUT" ||
        echo "# FAILED: vhost-blk-bench against $1 jobs $2 (see $LOG)" | tee -a "$OUT" "$LOG"
}

run_fio() {
    local label=$1 job rw bs qd file size runtime
    command -v fio >/dev/null || { echo "missing fio (apt-get install -y fio)" >&2; exit 1; }
    IFS=, read -r -a list <<<"$JOBS"
    for job in "${list[@]}"; do
        IFS=- read -r rw bs qd <<<"$job"
        file=$DIR/fio.raw size=$SIZE runtime=$RUNTIME
        if [ "$rw" = allocwrite ]; then
            file=$DIR/fio-alloc.raw size=$ALLOC_SIZE runtime=$ALLOC_RUNTIME rw=randwrite
            rm -f "$file"
            truncate -s "$ALLOC_SIZE" "$file"
        fi
        fio --name="$job" --filename="$file" --size=$size --direct=$FIO_DIRECT \
            --ioengine=libaio --rw="$rw" --bs="$bs" --iodepth="${qd#qd}" \
            --runtime="$runtime" --ramp_time="$RAMP" --time_based --lat_percentiles=1 \
            --randrepeat=0 --output-format=json >"$DIR/fio.json"
        python3 "$ROOT/bench/fio_line.py" "$label" "$job" "$DIR/fio.json" | tee -a "$OUT"
        rm -f "$DIR/fio-alloc.raw"
    done
}

IFS=, read -r -a ALL_JOBS <<<"$JOBS"
PLAIN_JOBS=() ALLOC_JOBS=()
for j in "${ALL_JOBS[@]}"; do
    case $j in
    allocwrite-* | alloctouch-*) ALLOC_JOBS+=("$j") ;;
    *) PLAIN_JOBS+=("$j") ;;
    esac
done
PLAIN_JOBS_CSV=$(IFS=,; echo "${PLAIN_JOBS[*]}")

for run in $(seq "$RUNS"); do
    for s in $SERVERS; do
        echo "# run $run/$RUNS: $s ($MODE), $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT"
        if [ "$s" = fio ]; then
            run_fio "fio-$MODE"
            continue
        fi
        if [ -n "$PLAIN_JOBS_CSV" ]; then
            start_server "$s"
            run_bench "$s" "$PLAIN_JOBS_CSV" "$RUNTIME" ""
            stop_server "$s"
        fi
        for j in "${ALLOC_JOBS[@]}"; do
            echo "# $j: fresh $ALLOC_SIZE qcow2, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT"
            start_server "$s" fresh
            bj=${j/allocwrite/randwrite}
            bj=${bj/alloctouch/touchwrite}
            run_bench "$s" "$bj" "$ALLOC_RUNTIME" "s/ job=${bj%%-*}-/ job=${j%%-*}-/"
            stop_server "$s"
            echo "# qemu-img check after $s $j: $(qemu-img check "$IMG" 2>&1 | tr '\n' ' ')" | tee -a "$OUT"
            rm -f "$IMG"
        done
    done
done
