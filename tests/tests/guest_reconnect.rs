//! The daemon dies (SIGKILL) under a busy guest and comes back, three times. A real Linux
//! guest (TCG unless KVM) on two queues runs, per queue, a few jobs side by side: two
//! writers that rewrite their own regions round after round (O_DIRECT blocks of 4 KiB to
//! 8 MiB, then an fsync) and read every round back, a flusher, a reader of blocks that
//! read as zeroes, and a streamer of big reads. The host kills the daemon with SIGKILL
//! while everything runs and starts it again with the same command line on the same
//! image and sockets; QEMU (chardev `reconnect=1`) reconnects and hands the daemon the
//! inflight region (VHOST_USER_GET/SET_INFLIGHT_FD) back, from which it resubmits what
//! was in flight. The guest must see no I/O error and no hang.
//!
//! Without inflight tracking QEMU can only rewind each ring to its used index. That
//! replays correctly what was in flight as long as the requests completed in the order
//! they were taken from the ring; a request in flight behind one that completed is lost,
//! and the completed one runs and completes again (the guest's driver finds a used id
//! that "is not a head", the queue breaks, I/O errors and hangs follow). So each kill
//! must find requests in flight behind completed ones. A TCG guest keeps the daemon busy
//! only a small part of the time, and most requests complete at once, so a kill at a
//! random instant rarely does: the host freezes the daemon (SIGSTOP) for a moment so
//! that requests of every job pile up in the rings, thaws it (SIGCONT), and kills it a
//! few milliseconds after it woke up, when it has taken them all and completed the quick
//! ones (reads of zeroes, and more of them that the jobs sent meanwhile) but not yet the
//! big transfers. The daemon runs with `--direct`, so that data transfers complete
//! through io_uring, taking milliseconds (through the page cache they complete at once,
//! in order), and writes are among what is in flight. Measured under TCG against the
//! daemon without inflight tracking, about two kills in three find such a state, so the
//! test fails (at the first or second kill, mostly) in nearly every run.
//!
//! The guest and the host talk through the disk, which the host reads and writes through
//! the daemon's own NBD export: each job writes its round number into its marker block
//! after each round; the host waits for every job to progress before each kill and
//! after each restart (and checks that the restarted daemon logged the frontend's
//! connection), and finally writes a stop signal. Then the guest reads every region
//! back once more and checks that its kernel logged no I/O error; the host stops the
//! daemon (SIGTERM), and the image must equal the model (each region holds the pattern
//! of its writer's last round, each marker that round) and pass `qemu-img check` apart
//! from leaked clusters.
//!
//! The device's write cache is on (the guest needs it to send flushes), and the daemon
//! keeps qcow2 metadata in a write-back cache, so a SIGKILL may lose a cluster allocation
//! that was not flushed yet. The guest therefore makes every round durable (`conv=fsync`)
//! before it reads it back and marks it, and the first kill comes only after every job
//! completed a round: all clusters the test writes are then allocated and flushed,
//! and a write the daemon completed is in the image file even if the daemon dies before
//! the flush that follows it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::process::run_cmd;
use e2e::tools::{qemu_img_create_qcow2, require_tools};
use e2e::{daemon_binary, Backend, GuestConfig, GuestEnv, GuestScript, Restartable};
use serde_json::Value;

const SIZE: u64 = 64 << 20;
const K: u64 = 1024;
const M: u64 = 1 << 20;
const QUEUES: u32 = 2;
/// Unit of the markers, the signal and the readers. busybox `dd` falls back to buffered
/// I/O when `iflag=direct` fails on a buffer it did not align, as it does for 512-byte
/// blocks: with 4 KiB blocks every read reaches the device.
const BLOCK: u64 = 4096;

/// One job of the guest, pinned to guest CPU `cpu`, so to queue `cpu`.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// Writes `count` blocks of `bs` bytes at `offset` with one `dd` (a big block is one
    /// system call, split by the guest's kernel into requests of at most 1280 KiB that
    /// are all in flight together) and an fsync, then reads them back and compares.
    Writer {
        cpu: u32,
        bs: u64,
        count: u64,
        offset: u64,
    },
    /// Sends `n` flushes per round (`sync -d` of the device `n` times, one process).
    Flusher { cpu: u32, n: u32 },
    /// Reads `n` blocks of 4 KiB one by one at `offset`, a region nothing writes, and
    /// checks that they are zeroes; the daemon completes these at once.
    Reader { cpu: u32, n: u64, offset: u64 },
    /// Reads `count` blocks of `bs` bytes at `offset` into nothing, `passes` times per
    /// round: big reads in flight, without the cost of comparing them.
    Streamer {
        cpu: u32,
        bs: u64,
        count: u64,
        offset: u64,
        passes: u32,
    },
}

/// The guest's jobs; the writers' regions are disjoint, the streamers read theirs.
const JOBS: [Job; 10] = [
    Job::Writer {
        cpu: 0,
        bs: 8 * M,
        count: 1,
        offset: 0,
    },
    Job::Writer {
        cpu: 0,
        bs: 4 * K,
        count: 256,
        offset: 8 * M,
    },
    Job::Writer {
        cpu: 1,
        bs: 4 * M,
        count: 2,
        offset: 16 * M,
    },
    Job::Writer {
        cpu: 1,
        bs: 64 * K,
        count: 32,
        offset: 24 * M,
    },
    Job::Flusher { cpu: 0, n: 16 },
    Job::Flusher { cpu: 1, n: 16 },
    Job::Reader {
        cpu: 0,
        n: 64,
        offset: 32 * M,
    },
    Job::Reader {
        cpu: 1,
        n: 64,
        offset: 33 * M,
    },
    Job::Streamer {
        cpu: 0,
        bs: 4 * M,
        count: 4,
        offset: 0,
        passes: 2,
    },
    Job::Streamer {
        cpu: 1,
        bs: 4 * M,
        count: 4,
        offset: 16 * M,
        passes: 2,
    },
];
/// Job `j` writes its last completed round number (decimal text) into the block at
/// `MARKERS + j * BLOCK`.
const MARKERS: u64 = 48 * M;
/// The host writes a block of `STOP` here when the jobs are to stop.
const SIGNAL: u64 = 56 * M;
const STOP: u8 = 0x5a;
const KILLS: usize = 3;
/// Rounds every job completes before the first kill and after each restart, counted from
/// the markers in the image at the kill (the round that was running at the kill counts:
/// it proves that the job's requests in flight completed, and a writer's round ends with
/// reading its data back).
const ROUNDS_BETWEEN: u64 = 1;
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Limit for every job to do its rounds after a restart (a request lost at the kill
/// hangs its job: this is how long the test waits for it).
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Before each kill the daemon is frozen this long (SIGSTOP), so that requests pile up,
/// then thawed (SIGCONT); it is killed `THAW` after its threads ran `THAW_CPU` (see
/// [`thaw`]).
const PILE_UP: Duration = Duration::from_millis(100);
const THAW_CPU: Duration = Duration::from_micros(100);
const THAW_MAX: Duration = Duration::from_millis(5);
const THAW: Duration = Duration::from_millis(4);
const CONNECTED: &str = "frontend connected";
const RESUBMIT: &str = "that were in flight";

/// Pattern byte of writer `w`'s round `r`: two per writer, alternating, so that every
/// round replaces the one before, and distinct between writers.
fn pattern(w: usize, r: u64) -> u8 {
    0x11 * (w as u8 + 1) + 0x80 * (r % 2) as u8
}

/// What a marker block holds after round `r`: the number, space-padded, newline.
fn marker_text(r: u64) -> Vec<u8> {
    format!("{r:<4095}\n").into_bytes()
}

/// Offset of job `j`'s marker block.
fn marker(j: usize) -> u64 {
    MARKERS + j as u64 * BLOCK
}

/// The guest's side of a job: `sh /tmp/job.sh J MBLK KIND ARGS...` (see [`Job`]; block
/// numbers in units of the job's block size). A writer makes its two pattern files once
/// (in a TCG guest the patterns cost more than the I/O) and writes the one of the
/// round's parity. After each round the job writes the round number into its marker
/// block `MBLK` (and fsyncs); it stops at the first round that finds the stop signal,
/// and on a failure creates `/tmp/failed.J`, marks `FAIL <round>` and exits 1.
const JOB_SH: &str = r#"dev=/dev/vda; j=$1; mblk=$2; kind=$3; r=0
mark() {
    printf '%-4095s\n' "$1" > /tmp/mark.$j
    dd if=/tmp/mark.$j of=$dev bs=4096 count=1 seek=$mblk oflag=direct conv=fsync 2>/tmp/merr.$j
}
die() { echo "E2E-FAIL job $j round $r: $*"; : > /tmp/failed.$j; mark "FAIL $r"; exit 1; }
case $kind in
writer)
    head -c $(($4 * $5)) /dev/zero | tr '\000' "\\$7" > /tmp/pat.$j.0 || die pattern
    head -c $(($4 * $5)) /dev/zero | tr '\000' "\\$8" > /tmp/pat.$j.1 || die pattern
    ;;
flusher)
    devs=; i=0; while [ $i -lt $4 ]; do devs="$devs $dev"; i=$((i + 1)); done
    ;;
reader)
    head -c $(($4 * 4096)) /dev/zero > /tmp/zero.$j
    ;;
esac
while :; do
    dd if=$dev of=/tmp/sig.$j bs=4096 count=1 skip=@SIGNAL@ iflag=direct 2>/tmp/err.$j \
        || die "signal read: $(cat /tmp/err.$j)"
    cmp -s /tmp/sig.$j /tmp/stop && break
    r=$((r + 1))
    case $kind in
    writer)
        pat=/tmp/pat.$j.$((r % 2))
        dd if=$pat of=$dev bs=$4 count=$5 seek=$6 oflag=direct conv=fsync 2>/tmp/err.$j \
            || die "write: $(cat /tmp/err.$j)"
        dd if=$dev of=/tmp/got.$j bs=$4 count=$5 skip=$6 iflag=direct 2>/tmp/err.$j \
            || die "read: $(cat /tmp/err.$j)"
        cmp -s /tmp/got.$j $pat || die 'read back differs'
        rm -f /tmp/got.$j
        ;;
    flusher)
        sync -d $devs 2>/tmp/err.$j || die "flush: $(cat /tmp/err.$j)"
        ;;
    reader)
        dd if=$dev of=/tmp/got.$j bs=4096 count=$4 skip=$5 iflag=direct 2>/tmp/err.$j \
            || die "read: $(cat /tmp/err.$j)"
        cmp -s /tmp/got.$j /tmp/zero.$j || die 'read other than zeroes'
        ;;
    streamer)
        i=0
        while [ $i -lt $7 ]; do
            dd if=$dev of=/dev/null bs=$4 count=$5 skip=$6 iflag=direct 2>/tmp/err.$j \
                || die "read: $(cat /tmp/err.$j)"
            i=$((i + 1))
        done
        ;;
    esac
    mark $r || die "marker: $(cat /tmp/merr.$j)"
done
echo "E2E-JOB $j rounds $r"
"#;

/// What the guest's kernel must not log (`grep -iE`): I/O errors, a broken virtqueue
/// (a used id that "is not a head"), hung tasks.
const KERNEL_ERRORS: &str = "I/O error|not a head|broken|blocked for more than|hung_task";

/// The writers as `(job index, bs, count, offset)`.
fn writers() -> impl Iterator<Item = (usize, u64, u64, u64)> {
    JOBS.iter().enumerate().filter_map(|(j, job)| match *job {
        Job::Writer {
            bs, count, offset, ..
        } => Some((j, bs, count, offset)),
        _ => None,
    })
}

/// The guest's script: the jobs in the background until the host's stop signal (the
/// first failure ends the guest at once: a job on a broken queue cannot even mark it),
/// then the final read-back of every region and the kernel log check. Every job prints
/// `E2E-JOB j rounds r` when it stops.
fn guest_script() -> String {
    let mut s = format!(
        r#"# generated by guest_reconnect.rs
dev=/dev/vda
i=0; while [ ! -b $dev ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b $dev ] || {{ echo "E2E-FAIL $dev did not appear"; exit 2; }}
echo "E2E-DEVICE $dev sectors=$(cat /sys/class/block/vda/size) queues=$(ls /sys/class/block/vda/mq | wc -l)"
[ "$(cat /sys/block/vda/cache_type)" = 'write back' ] || {{ echo "E2E-FAIL cache_type $(cat /sys/block/vda/cache_type)"; exit 3; }}
head -c 4096 /dev/zero | tr '\000' '\{STOP:03o}' > /tmp/stop
cat > /tmp/job.sh <<'E2E_JOB_EOF'
{job}E2E_JOB_EOF
"#,
        job = JOB_SH.replace("@SIGNAL@", &(SIGNAL / BLOCK).to_string())
    );
    let mut pids = Vec::new();
    for (j, job) in JOBS.iter().enumerate() {
        let (cpu, args) = match *job {
            Job::Writer {
                cpu,
                bs,
                count,
                offset,
            } => (
                cpu,
                format!(
                    "writer {bs} {count} {} {:03o} {:03o}",
                    offset / bs,
                    pattern(j, 0),
                    pattern(j, 1)
                ),
            ),
            Job::Flusher { cpu, n } => (cpu, format!("flusher {n}")),
            Job::Reader { cpu, n, offset } => (cpu, format!("reader {n} {}", offset / BLOCK)),
            Job::Streamer {
                cpu,
                bs,
                count,
                offset,
                passes,
            } => (
                cpu,
                format!("streamer {bs} {count} {} {passes}", offset / bs),
            ),
        };
        s.push_str(&format!(
            "taskset -c {cpu} sh /tmp/job.sh {j} {} {args} &\np{j}=$!\n",
            marker(j) / BLOCK
        ));
        pids.push(format!("$p{j}"));
    }
    s.push_str(&format!(
        "pids=\"{}\"\n\
         while :; do\n\
         if ls /tmp/failed.* >/dev/null 2>&1; then echo \"E2E-FAIL job(s) failed: $(ls /tmp/failed.*)\"; exit 4; fi\n\
         if dmesg | grep -iE '{KERNEL_ERRORS}'; then echo 'E2E-FAIL the kernel logged the above'; exit 6; fi\n\
         alive=0; for p in $pids; do kill -0 $p 2>/dev/null && alive=1; done\n\
         [ $alive = 1 ] || break\n\
         sleep 0.5\n\
         done\n\
         failed=0\nfor p in $pids; do wait $p || failed=$((failed + 1)); done\n\
         [ $failed -eq 0 ] || {{ echo \"E2E-FAIL $failed job(s) failed\"; exit 4; }}\n",
        pids.join(" ")
    ));
    // Every region once more, now that nothing writes: it holds its writer's last round.
    for (w, bs, count, offset) in writers() {
        s.push_str(&format!(
            "dd if=$dev of=/tmp/m bs=4096 count=1 skip={mblk} iflag=direct 2>/dev/null \
             || {{ echo 'E2E-FAIL final marker read {w}'; exit 5; }}\n\
             r=$(tr -d ' \\n' < /tmp/m)\n\
             dd if=$dev of=/tmp/got bs={bs} count={count} skip={at} iflag=direct 2>/tmp/err \
             || {{ cat /tmp/err; echo 'E2E-FAIL final read {w}'; exit 5; }}\n\
             cmp -s /tmp/got /tmp/pat.{w}.$((r % 2)) \
             || {{ echo \"E2E-FAIL region {w} does not hold round $r\"; exit 5; }}\n\
             echo \"E2E-VERIFIED {w} round $r\"\n",
            mblk = marker(w) / BLOCK,
            at = offset / bs,
        ));
    }
    s.push_str(&format!(
        "if dmesg | grep -iE '{KERNEL_ERRORS}'; then\n\
         echo 'E2E-FAIL the kernel logged the above'; exit 6; fi\n\
         echo E2E-DONE\nexit 0\n"
    ));
    s
}

/// `qemu-io -c CMD` on the daemon's NBD export `rw` (`image` = `None`) or, read-only and
/// sharing it, on the qcow2 `image` itself; `None` when it fails (e.g. the daemon is
/// being restarted).
fn qemu_io(nbd: &Path, image: Option<&Path>, read_only: bool, cmd: &str) -> Option<String> {
    let mut c = Command::new("qemu-io");
    match image {
        Some(image) => c.args(["-f", "qcow2", "-r", "-U", "-c", cmd]).arg(image),
        None => {
            c.args(["-f", "raw"]);
            if read_only {
                c.arg("-r");
            }
            c.args(["-c", cmd])
                .arg(format!("nbd+unix:///rw?socket={}", nbd.display()))
        }
    };
    let out = run_cmd(&mut c, Duration::from_secs(30)).ok()?;
    (out.status.success() && !out.stdout.contains("failed")).then_some(out.stdout)
}

/// Bytes `offset..offset + len` of the disk from `qemu-io`'s `read -v` hex dump (see
/// [`qemu_io`] for `nbd` and `image`).
fn read_bytes(nbd: &Path, image: Option<&Path>, offset: u64, len: u64) -> Option<Vec<u8>> {
    let dump = qemu_io(nbd, image, true, &format!("read -v {offset} {len}"))?;
    let mut buf = vec![0u8; len as usize];
    let mut seen = 0;
    for line in dump.lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        let at = addr.checked_sub(offset)? as usize;
        for (i, b) in rest.split_whitespace().take(16).enumerate() {
            *buf.get_mut(at + i)? = u8::from_str_radix(b, 16).ok()?;
            seen += 1;
        }
    }
    (seen == buf.len()).then_some(buf)
}

/// What a marker block says: `Ok(round)` (0 before the first round), `Err(text)` for a
/// job that failed.
fn parse_marker(block: &[u8]) -> Result<u64, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let text = String::from_utf8_lossy(block);
    text.trim().parse().map_err(|_| text.trim().to_owned())
}

/// Every job's last completed round, as far as the disk shows it now (see [`qemu_io`]
/// for `nbd` and `image`).
fn read_markers(nbd: &Path, image: Option<&Path>) -> Option<Vec<Result<u64, String>>> {
    let bytes = read_bytes(nbd, image, MARKERS, JOBS.len() as u64 * BLOCK)?;
    Some(bytes.chunks(BLOCK as usize).map(parse_marker).collect())
}

/// Waits until every job's round is at least `want[j]`; returns the rounds seen.
/// Panics when a job reports a failure, when `timeout` passes, and stops early
/// (`None`) when the guest has ended.
fn wait_rounds(
    nbd: &Path,
    want: &[u64],
    timeout: Duration,
    what: &str,
    guest_done: &AtomicBool,
) -> Option<Vec<u64>> {
    let start = Instant::now();
    let mut last = None;
    loop {
        if guest_done.load(Ordering::SeqCst) {
            return None;
        }
        if let Some(m) = read_markers(nbd, None) {
            if let Some((w, e)) = m
                .iter()
                .enumerate()
                .find_map(|(w, r)| r.as_ref().err().map(|e| (w, e)))
            {
                panic!("job {w} failed ({e:?}; see the serial log) {what}");
            }
            let rounds: Vec<u64> = m.into_iter().map(|r| r.unwrap_or(0)).collect();
            if rounds.iter().zip(want).all(|(r, w)| r >= w) {
                return Some(rounds);
            }
            last = Some(rounds);
        }
        assert!(
            start.elapsed() < timeout,
            "the jobs did not reach rounds {want:?} within {timeout:?} {what} \
             (rounds seen last: {last:?}): a job hangs on a request the daemon lost?"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `sig` to process `pid` (our own child, not yet reaped).
fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: kill(2) only sends a signal; `pid` is the daemon we started and still own
    // (its Backend reaps it only when killed), so the id cannot name another process.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// CPU time that the threads of process `pid` have run so far (`/proc/PID/task/*/schedstat`),
/// `None` where /proc does not say.
fn cpu_time(pid: u32) -> Option<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        // A thread may end meanwhile; it ran no more.
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

/// Waits after SIGCONT until process `pid` ran `THAW_CPU` more than `before` (it woke
/// up and took what piled up; when /proc does not tell, at most `THAW_MAX`), then
/// `THAW` more: the quick requests that piled up are done and the jobs that sent them
/// send more, which complete at once, while the big transfers are still in flight.
fn thaw(pid: u32, before: Option<Duration>) {
    let start = Instant::now();
    while start.elapsed() < THAW_MAX {
        std::thread::sleep(Duration::from_micros(50));
        if let (Some(before), Some(now)) = (before, cpu_time(pid)) {
            if now >= before + THAW_CPU {
                break;
            }
        }
    }
    std::thread::sleep(THAW);
}

/// Sets its flag when dropped during a panic: the host side of a test tells the guest's
/// runner to stop waiting for it.
struct CancelOnPanic(Arc<AtomicBool>);

impl Drop for CancelOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// `qemu-img check --output=json`: no corruption and no check error; leaked clusters
/// (exit status 3) are allowed. Returns the number of leaks.
fn check_allowing_leaks(image: &Path) -> u64 {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["check", "--output=json"]).arg(image);
    let out = run_cmd(&mut cmd, Duration::from_secs(60)).expect("qemu-img check");
    let code = out.status.code();
    let json: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check ({:?}): not JSON ({e}): {}{}",
            code, out.stdout, out.stderr
        )
    });
    let field = |k: &str| json.get(k).and_then(Value::as_u64).unwrap_or(0);
    assert!(
        matches!(code, Some(0 | 3))
            && field("corruptions") == 0
            && field("check-errors") == 0
            && (code == Some(0) || field("leaks") > 0),
        "qemu-img check (exit {code:?}) finds more than leaks: {}{}",
        out.stdout,
        out.stderr
    );
    field("leaks")
}

/// A temporary directory for the image on a file system that supports O_DIRECT: under
/// the target directory (`/tmp` may be a tmpfs).
fn direct_io_dir() -> tempfile::TempDir {
    use std::os::unix::fs::OpenOptionsExt;
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).expect("CARGO_TARGET_TMPDIR");
    let dir = tempfile::tempdir_in(&base).expect("temporary directory");
    let probe = dir.path().join("probe");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .unwrap_or_else(|e| panic!("O_DIRECT on {}: {e}", base.display()));
    let _ = std::fs::remove_file(&probe);
    dir
}

/// A real guest writes and verifies while the daemon is killed (SIGKILL) and restarted
/// three times; see the module docs.
#[test]
fn daemon_guest_survives_three_sigkills_with_io_in_flight() {
    if require_tools(&["qemu-img", "qemu-io"]).is_none() {
        return;
    }
    let bin = daemon_binary().unwrap_or_else(|e| panic!("{e}"));
    let env = GuestEnv::ensure().unwrap_or_else(|e| panic!("{e}"));
    // The sockets in a short path, the image where O_DIRECT works (often not on /tmp).
    let dir = tempfile::tempdir().expect("temporary directory");
    let image_dir = direct_io_dir();
    let image = image_dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    let nbd = dir.path().join("nbd.sock");
    qemu_img_create_qcow2(&image, SIZE).expect("qemu-img create");
    let restartable = Restartable {
        bin: bin.clone(),
        image: image.clone(),
        socket: socket.clone(),
        num_queues: QUEUES,
        extra: [
            "--direct",
            "--nbd-socket",
            nbd.to_str().expect("utf-8"),
            "--export-name",
            "rw",
            "--export-writable",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        stale: vec![nbd.clone()],
    };
    // Every start has the same command line; a killed daemon leaves its sockets behind.
    let start = {
        let r = restartable.clone();
        move || {
            r.start(STOP_TIMEOUT)
                .unwrap_or_else(|e| panic!("daemon start: {e}"))
        }
    };
    let daemon = Arc::new(Mutex::new(Some(start())));
    // The logs of the killed daemons, in order.
    let logs: Arc<Mutex<Vec<String>>> = Arc::default();
    let cancel = Arc::new(AtomicBool::new(false));
    let guest_done = Arc::new(AtomicBool::new(false));

    let host = {
        let (nbd, image, daemon, logs, guest_done) = (
            nbd.clone(),
            image.clone(),
            daemon.clone(),
            logs.clone(),
            guest_done.clone(),
        );
        let cancel = CancelOnPanic(cancel.clone());
        std::thread::spawn(move || -> Option<Vec<u64>> {
            let _cancel = cancel;
            let more = |r: &[u64]| r.iter().map(|r| r + ROUNDS_BETWEEN).collect::<Vec<_>>();
            let mut rounds = wait_rounds(
                &nbd,
                &more(&[0; JOBS.len()]),
                GUEST_TIMEOUT,
                "before the first kill",
                &guest_done,
            )?;
            for k in 1..=KILLS {
                let old = daemon.lock().expect("daemon").take().expect("daemon");
                let pid = old.pid().expect("daemon pid");
                // Requests of every job pile up while the daemon is frozen; thawed, it
                // takes them all at once, completes the quick ones and starts the big
                // transfers; then it dies.
                signal(pid, libc::SIGSTOP);
                std::thread::sleep(PILE_UP);
                let ran = cpu_time(pid);
                signal(pid, libc::SIGCONT);
                thaw(pid, ran);
                let t = Instant::now();
                // SIGKILL: the log is complete before the kill.
                let log = old.log();
                let status = old.kill();
                logs.lock().expect("logs").push(log);
                // Where each job was at the kill: the image holds every marker written
                // (the daemon writes with O_DIRECT; no marker allocates any more).
                rounds = read_markers(&nbd, Some(&image))
                    .expect("markers in the image after the kill")
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|e| panic!("a job failed before kill {k}: {e}")))
                    .collect();
                eprintln!(
                    "kill {k}: daemon killed ({status:?}) with the jobs at rounds {rounds:?}"
                );
                let new = start();
                eprintln!("kill {k}: daemon restarted in {:.1?}", t.elapsed());
                *daemon.lock().expect("daemon") = Some(new);
                rounds = wait_rounds(
                    &nbd,
                    &more(&rounds),
                    PROGRESS_TIMEOUT,
                    &format!("after restart {k}"),
                    &guest_done,
                )?;
                eprintln!(
                    "kill {k}: the jobs reached rounds {rounds:?} {:.1?} after the kill",
                    t.elapsed()
                );
                let log = daemon
                    .lock()
                    .expect("daemon")
                    .as_ref()
                    .map(Backend::log)
                    .unwrap_or_default();
                assert!(
                    log.contains(CONNECTED),
                    "restart {k}: the daemon did not log {CONNECTED:?} although the guest \
                     made progress:\n{log}"
                );
            }
            assert!(
                qemu_io(
                    &nbd,
                    None,
                    false,
                    &format!("write -P {STOP} {SIGNAL} {BLOCK}")
                )
                .is_some(),
                "writing the stop signal failed"
            );
            Some(rounds)
        })
    };

    let cfg = GuestConfig::new(&socket, QUEUES, GUEST_TIMEOUT)
        .with_reconnect(Duration::from_secs(1))
        .with_cancel(cancel);
    let outcome = env
        .run(&cfg, &guest_script())
        .unwrap_or_else(|e| panic!("guest could not run: {e}"));
    guest_done.store(true, Ordering::SeqCst);
    let all_logs = || {
        let mut v = logs.lock().map(|l| l.clone()).unwrap_or_default();
        if let Ok(d) = daemon.lock() {
            v.extend(d.as_ref().map(Backend::log));
        }
        v.iter()
            .enumerate()
            .map(|(i, l)| format!("--- daemon log {i} ---\n{l}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if outcome.cancelled {
        // The host side failed (its panic message is above): show what the guest did.
        eprintln!(
            "--- serial log ---\n{}\n--- qemu stderr ---\n{}\n{}",
            outcome.serial_log,
            outcome.qemu_stderr,
            all_logs()
        );
        if let Err(p) = host.join() {
            std::panic::resume_unwind(p);
        }
        unreachable!("cancelled without a failure of the host side");
    }
    if let Err(e) = outcome.check_success() {
        let logs = all_logs();
        drop(daemon.lock().map(|mut d| d.take()));
        panic!("{e}\n--- qemu stderr ---\n{}\n{logs}", outcome.qemu_stderr);
    }
    let host_rounds = match host.join() {
        Ok(r) => r.expect("the guest ended before the host stopped it"),
        Err(p) => std::panic::resume_unwind(p),
    };
    eprintln!(
        "guest finished in {:.1?}; qemu stderr: {}",
        outcome.elapsed, outcome.qemu_stderr
    );
    let backend = daemon.lock().expect("daemon").take().expect("daemon");
    let last_log = backend.log();
    backend
        .stop(STOP_TIMEOUT)
        .unwrap_or_else(|e| panic!("daemon exits 0 on SIGTERM: {e}"));
    let mut logs = logs.lock().expect("logs").clone();
    logs.push(last_log);

    // Information only: a kill need not find a request in flight.
    let resubmitted: Vec<(usize, Vec<&str>)> = logs
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, l)| (k, l.lines().filter(|l| l.contains(RESUBMIT)).collect()))
        .collect();
    eprintln!(
        "restarts that resubmitted requests: {} of {KILLS}",
        resubmitted.iter().filter(|(_, v)| !v.is_empty()).count()
    );
    for (k, lines) in &resubmitted {
        for l in lines {
            eprintln!("  restart {k}: {l}");
        }
    }

    // The rounds each job reported, which the host saw at least.
    let reported: Vec<u64> = (0..JOBS.len())
        .map(|w| {
            let prefix = format!("E2E-JOB {w} rounds ");
            outcome
                .serial_log
                .lines()
                .find_map(|l| l.trim().strip_prefix(&prefix)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("job {w} reported no rounds"))
        })
        .collect();
    eprintln!("rounds per job: {reported:?}");
    for (w, (r, h)) in reported.iter().zip(&host_rounds).enumerate() {
        assert!(r >= h, "job {w} reports {r} rounds, the host saw {h}");
    }

    let leaks = check_allowing_leaks(&image);
    eprintln!("qemu-img check: clean apart from {leaks} leaked cluster(s)");

    // The model: each region holds its writer's last round, the markers that round, the
    // signal the stop.
    let mut model = GuestScript::new("/dev/vda").write(SIGNAL, BLOCK, STOP);
    for (w, bs, count, offset) in writers() {
        model = model.write(offset, bs * count, pattern(w, reported[w]));
    }
    let mut want = model.expected_contents(SIZE).expect("model");
    for (w, &r) in reported.iter().enumerate() {
        let at = marker(w) as usize;
        want[at..at + BLOCK as usize].copy_from_slice(&marker_text(r));
    }
    let raw = dir.path().join("final.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .status()
        .expect("qemu-img convert");
    assert!(st.success(), "qemu-img convert: {st}");
    let got = std::fs::read(&raw).expect("final disk");
    assert_eq!(got.len(), want.len(), "disk size");
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "the final disk differs from the model at byte {i:#x}: {:#x} instead of {:#x}",
            got[i], want[i]
        );
    }
}

#[test]
fn marker_text_parses_back() {
    assert_eq!(parse_marker(&marker_text(0)), Ok(0));
    assert_eq!(parse_marker(&marker_text(1234)), Ok(1234));
    assert_eq!(parse_marker(&[0; BLOCK as usize]), Ok(0));
    assert!(parse_marker(&format!("{:<4095}\n", "FAIL 3").into_bytes()).is_err());
    let all: std::collections::BTreeSet<u8> = writers()
        .flat_map(|(w, ..)| [pattern(w, 0), pattern(w, 1)])
        .collect();
    assert_eq!(all.len(), 2 * writers().count());
    assert!(!all.contains(&0) && !all.contains(&STOP));
    let cpu = |job: &Job| match *job {
        Job::Writer { cpu, .. }
        | Job::Flusher { cpu, .. }
        | Job::Reader { cpu, .. }
        | Job::Streamer { cpu, .. } => cpu,
    };
    assert!(JOBS.iter().all(|j| cpu(j) < QUEUES));
    assert!(marker(JOBS.len()) <= SIGNAL && SIGNAL + BLOCK <= SIZE);
}
