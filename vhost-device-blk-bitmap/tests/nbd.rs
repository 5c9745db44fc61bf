//! The embedded NBD server end to end, with real clients (qemu-img, qemu-io, qemu-nbd,
//! nbdinfo, nbdcopy, python3-libnbd) against the daemon binary while the in-process
//! vhost-user frontend writes: dirty-bitmap and allocation contexts, whole-disk copies
//! over unix and TCP, an imageio-like negotiation, point-in-time (`x-snapshot`) views
//! under both I/O engines, a full fleecing store, export deletion and the server's
//! errors, `resources/backup.py` full/incremental/restore, and writable exports.
//!
//! A test whose tool is missing fails under `CI=true` (naming the Debian package) and
//! is skipped otherwise.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_for_socket, Daemon, Driver, QueueDriver, BIN, DISK_SIZE};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};

/// The Python that has libnbd's binding (Debian's; a pyenv `python3` on PATH has not).
const PY: &str = "/usr/bin/python3";
/// QEMU's text for an action on an exported bitmap.
const BUSY: &str = "is currently in use by another operation and cannot be used";
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const G64K: u64 = 64 * KIB;

// ---------------------------------------------------------------------------------
// Tools

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The Debian package of a tool.
fn package(tool: &str) -> &'static str {
    match tool {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        "python3-libnbd" => "python3-libnbd",
        _ => "?",
    }
}

/// Whether every tool is installed ("python3-libnbd": `/usr/bin/python3 -c 'import
/// nbd'`). A missing one fails the test under `CI=true`, else it is skipped.
fn need(tools: &[&str]) -> bool {
    for &tool in tools {
        let mut cmd = if tool == "python3-libnbd" {
            let mut c = Command::new(PY);
            c.args(["-c", "import nbd"]);
            c
        } else {
            let mut c = Command::new(tool);
            c.arg("--version");
            c
        };
        let ok = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                !ci(),
                "{tool} is required when CI=true: install the Debian package {}",
                package(tool)
            );
            eprintln!(
                "SKIP: {tool} is not installed (Debian package {})",
                package(tool)
            );
            return false;
        }
    }
    true
}

/// Runs a command; returns its output (whatever its status).
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img create -f qcow2 PATH SIZE` (64 KiB clusters).
fn qcow2_image(path: &Path, size: u64) {
    run(&mut cmd(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(path), &size.to_string()],
    ));
}

/// `qemu-io -f FMT -c CMD… IMAGE` (must succeed).
fn qemu_io(fmt: &str, image: &str, cmds: &[String]) -> String {
    qemu_io_opts(&["-f", fmt], image, cmds)
}

/// `qemu-io OPTS… -c CMD… IMAGE` (must succeed).
fn qemu_io_opts(opts: &[&str], image: &str, cmds: &[String]) -> String {
    let mut c = cmd("qemu-io", opts);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(image);
    run(&mut c)
}

/// Compares two files of the same size, 8 MiB at a time (the first difference in the
/// message).
fn assert_files_equal(got: &Path, want: &Path, what: &str) {
    let (mut g, mut w) = (File::open(got).unwrap(), File::open(want).unwrap());
    let (lg, lw) = (g.metadata().unwrap().len(), w.metadata().unwrap().len());
    assert_eq!(lg, lw, "{what}: size");
    let (mut bg, mut bw) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut pos = 0u64;
    while pos < lg {
        let n = (lg - pos).min(8 << 20) as usize;
        g.read_exact(&mut bg[..n]).unwrap();
        w.read_exact(&mut bw[..n]).unwrap();
        if let Some(i) = first_difference(&bg[..n], &bw[..n]) {
            panic!(
                "{what}: first difference at {:#x}: {:#x} vs {:#x}",
                pos + i as u64,
                bg[i],
                bw[i]
            );
        }
        pos += n as u64;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first offset where `got` differs from `want`, for messages.
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    if got == want {
        return None;
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: {} bytes (want {}), first difference at {i:#x}: {:?} vs {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

/// Byte `off` of pattern `seed` (1..=3): never zero, and patterns differ at every byte.
fn pat(seed: u8, off: u64) -> u8 {
    let h = (off.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as u8 ^ (off >> 9) as u8;
    (seed << 6) | (h & 0x3f)
}

fn fill(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(|o| pat(seed, o)).collect()
}

// ---------------------------------------------------------------------------------
// The daemon

/// The daemon binary with a QMP socket, its log in the test folder (printed if the
/// test fails).
struct Fixture {
    daemon: Daemon,
    qmp: qmp::Client,
    log: PathBuf,
    vhost: PathBuf,
    qmp_sock: PathBuf,
}

impl Fixture {
    /// Serves `image`; sockets and log in `dir`.
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> Fixture {
        let vhost = dir.join("vhost.sock");
        let qmp_sock = dir.join("qmp.sock");
        let log = dir.join("daemon.log");
        let mut daemon = Daemon(
            Command::new(BIN)
                .arg("--socket-path")
                .arg(&vhost)
                .arg("--image")
                .arg(image)
                .arg("--qmp-socket")
                .arg(&qmp_sock)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        wait_for_socket(&mut daemon, &vhost);
        let qmp = qmp::Client::connect(&qmp_sock).unwrap();
        qmp.set_timeout(Some(Duration::from_secs(20))).unwrap();
        Fixture {
            daemon,
            qmp,
            log,
            vhost,
            qmp_sock,
        }
    }

    fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// The frontend, one queue.
    fn driver(&self) -> Driver {
        Driver::connect(&self.vhost, 1)
    }

    fn exec(&mut self, command: &str, args: Value) -> Value {
        self.qmp
            .execute(command, args.clone())
            .unwrap_or_else(|e| panic!("{command} {args}: {e}"))
    }

    /// A command that must fail: returns (class, desc).
    fn fail(&mut self, command: &str, args: Value) -> (String, String) {
        match self.qmp.execute(command, args.clone()) {
            Ok(v) => panic!("{command} {args} succeeded: {v}"),
            Err(qmp::ClientError::Qmp(e)) => (e.class.as_str().to_string(), e.desc),
            Err(e) => panic!("{command} {args}: {e}"),
        }
    }

    fn start_nbd(&mut self, sock: &Path) {
        self.exec(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": p(sock)}}}),
        );
    }

    /// `block-export-del` (mode safe) of an export whose clients have all exited: the
    /// server may not have seen them go yet, and says "still in use" meanwhile.
    fn del_export(&mut self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.qmp.execute("block-export-del", json!({ "id": id })) {
                Ok(_) => return,
                Err(qmp::ClientError::Qmp(e))
                    if e.desc == format!("export '{id}' still in use")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("block-export-del {id}: {e}"),
            }
        }
    }

    /// The ids `query-block-exports` lists.
    fn export_ids(&mut self) -> Vec<String> {
        self.exec("query-block-exports", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// The next event named `name` (others before it are returned too, for messages).
    fn wait_event(&mut self, name: &str) -> Value {
        let mut others = Vec::new();
        loop {
            let ev = self
                .qmp
                .next_event()
                .unwrap_or_else(|e| panic!("waiting for {name} (got {others:?}): {e}"));
            if ev["event"] == name {
                return ev;
            }
            others.push(ev);
        }
    }

    /// `x-bitmap-dump` as (start, length, dirty).
    fn dump(&mut self, bitmap: &str) -> Vec<(u64, u64, bool)> {
        self.exec("x-bitmap-dump", json!({"node": "disk0", "name": bitmap}))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["dirty"].as_bool().unwrap(),
                )
            })
            .collect()
    }

    /// The node's bitmaps (query-named-block-nodes).
    fn bitmaps(&mut self) -> Vec<Value> {
        let nodes = self.exec("query-named-block-nodes", json!({}));
        nodes[0]["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `quit`; the daemon must exit 0.
    fn quit(mut self) {
        self.exec("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.daemon.try_wait().unwrap() {
                assert!(st.success(), "daemon exit status {st}");
                return;
            }
            assert!(Instant::now() < deadline, "daemon did not exit after quit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- daemon log ({}) ----\n{log}", self.log.display());
        }
    }
}

/// `nbd+unix:///NAME?socket=SOCK`.
fn unix_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Descriptors of the daemon pointing at deleted files in `dir` (fleecing stores).
fn fleece_fds(pid: u32, dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap();
    let prefix = format!("{}/", dir.display());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with(&prefix) && l.ends_with(" (deleted)"))
        .collect()
}

/// Waits (2 s at most) until the daemon holds no fleecing store in `dir` any more: the
/// last reference may go with an NBD session thread just after the export's deletion.
fn assert_fleece_freed(pid: u32, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let fds = fleece_fds(pid, dir);
        if fds.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fleecing store is still open after the export's deletion: {fds:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------
// The frontend

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const WZ_UNMAP: u32 = 1;
/// Guest addresses of the batch requests' headers, segments and status bytes (32 bytes
/// apart) and of their data (up to 8 MiB per batch).
const HDRS: u64 = 0x40_0000;
const SEGS: u64 = 0x40_1000;
const STATUSES: u64 = 0x40_2000;
const DATA: u64 = 0x80_0000;
const DATA_LEN: u64 = 8 << 20;
/// Requests in flight per batch.
const BATCH: usize = 32;

/// A guest request.
#[derive(Debug, Clone)]
enum Io {
    Write(u64, Vec<u8>),
    Read(u64, u32),
    Discard(u64, u64),
    /// Write-zeroes with or without UNMAP.
    Zeroes(u64, u64, bool),
}

impl Io {
    fn range(&self) -> (u64, u64) {
        match self {
            Io::Write(o, d) => (*o, d.len() as u64),
            Io::Read(o, l) => (*o, u64::from(*l)),
            Io::Discard(o, l) | Io::Zeroes(o, l, _) => (*o, *l),
        }
    }

    /// Applies a write, write-zeroes or discard to a model of the disk.
    fn apply(&self, model: &mut [u8]) {
        match self {
            Io::Write(o, d) => model[*o as usize..*o as usize + d.len()].copy_from_slice(d),
            Io::Discard(o, l) | Io::Zeroes(o, l, _) => {
                model[*o as usize..(*o + *l) as usize].fill(0)
            }
            Io::Read(..) => {}
        }
    }
}

/// Runs `ios` on the queue, up to 32 in flight at a time; every request must complete
/// once with status OK. Returns what each read read, in order.
fn guest_io(qd: &mut QueueDriver, ios: &[Io]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ios.len() {
        let mut chains = Vec::new();
        let mut reads = Vec::new();
        let mut data_off = 0u64;
        let first = i;
        while i < ios.len() && chains.len() < BATCH {
            let n = chains.len() as u64;
            let (hdr, seg, st) = (HDRS + 32 * n, SEGS + 32 * n, STATUSES + 32 * n);
            let need = match &ios[i] {
                Io::Write(_, d) => d.len() as u64,
                Io::Read(_, l) => u64::from(*l),
                _ => 0,
            };
            assert!(need <= DATA_LEN, "request too large for the data area");
            if data_off + need > DATA_LEN {
                break;
            }
            let buf = DATA + data_off;
            data_off += need;
            let mem = qd.mem();
            let (ty, sector, mid) = match &ios[i] {
                Io::Write(off, d) => {
                    mem.write_slice(d, GuestAddress(buf)).unwrap();
                    (T_OUT, off / 512, (buf, d.len() as u32, false))
                }
                Io::Read(off, len) => {
                    mem.write_slice(&vec![0xee; *len as usize], GuestAddress(buf))
                        .unwrap();
                    reads.push((n as usize, buf, *len));
                    (T_IN, off / 512, (buf, *len, true))
                }
                Io::Discard(off, len) | Io::Zeroes(off, len, _) => {
                    let (ty, flags) = match &ios[i] {
                        Io::Zeroes(_, _, true) => (T_WRITE_ZEROES, WZ_UNMAP),
                        Io::Zeroes(..) => (T_WRITE_ZEROES, 0),
                        _ => (T_DISCARD, 0),
                    };
                    let mut s = [0u8; 16];
                    s[0..8].copy_from_slice(&(off / 512).to_le_bytes());
                    s[8..12].copy_from_slice(&((len / 512) as u32).to_le_bytes());
                    s[12..16].copy_from_slice(&flags.to_le_bytes());
                    mem.write_slice(&s, GuestAddress(seg)).unwrap();
                    (ty, 0, (seg, 16, false))
                }
            };
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
            chains.push(vec![(hdr, 16, false), mid, (st, 1, true)]);
            i += 1;
        }
        let heads = qd.submit_batch(&chains, 3);
        let used = qd.wait_used(chains.len());
        let mut seen: Vec<u16> = used.iter().map(|u| u.0).collect();
        seen.sort_unstable();
        assert_eq!(seen, heads, "every request completed exactly once");
        for (k, _) in chains.iter().enumerate() {
            let status: u8 = qd
                .mem()
                .read_obj(GuestAddress(STATUSES + 32 * k as u64))
                .unwrap();
            assert_eq!(status, 0, "status of guest request {:?}", ios[first + k]);
        }
        for (k, buf, len) in reads {
            let (_, ulen) = used.iter().find(|u| u.0 == heads[k]).unwrap();
            assert_eq!(*ulen, len + 1, "used length of a read");
            let mut v = vec![0u8; len as usize];
            qd.mem().read_slice(&mut v, GuestAddress(buf)).unwrap();
            out.push(v);
        }
    }
    out
}

/// The whole disk as the guest reads it (1 MiB requests).
fn read_disk(qd: &mut QueueDriver, size: u64) -> Vec<u8> {
    let ios: Vec<Io> = (0..size.div_ceil(MIB))
        .map(|k| Io::Read(k * MIB, (MIB.min(size - k * MIB)) as u32))
        .collect();
    guest_io(qd, &ios).concat()
}

/// Writes pattern `seed` over `[start, end)` in 1 MiB requests.
fn write_pattern(qd: &mut QueueDriver, seed: u8, start: u64, end: u64) {
    let ios: Vec<Io> = (start..end)
        .step_by(MIB as usize)
        .map(|o| Io::Write(o, fill(seed, o, MIB.min(end - o))))
        .collect();
    guest_io(qd, &ios);
}

/// Writes, write-zeroes (with and without UNMAP) and discards of assorted sizes that
/// cover `[start, end)` (64 KiB aligned) exactly once; discards are whole 64 KiB
/// clusters (a qcow2 image ignores partial-cluster discards, as QEMU does).
fn assorted_ops(seed: u8, start: u64, end: u64) -> Vec<Io> {
    const PLAN: [(char, u64); 15] = [
        ('w', 4096),
        ('w', 512),
        ('w', 65536),
        ('w', 12288),
        ('d', 131072),
        ('w', 1536),
        ('w', 262144),
        ('z', 65536),
        ('w', 32768),
        ('w', 3072),
        ('u', 196608),
        ('w', 524288),
        ('w', 7168),
        ('d', 65536),
        ('w', 100352),
    ];
    let mut ops = Vec::new();
    let mut off = start;
    let mut k = 0;
    while off < end {
        let (kind, len) = PLAN[k % PLAN.len()];
        k += 1;
        let len = len.min(end - off);
        match kind {
            'd' => {
                let aligned = off.next_multiple_of(G64K).min(end);
                if aligned > off {
                    ops.push(Io::Write(off, fill(seed, off, aligned - off)));
                    off = aligned;
                }
                let len = (len.min(end - off) / G64K) * G64K;
                if len > 0 {
                    ops.push(Io::Discard(off, len));
                    off += len;
                }
            }
            'z' => {
                ops.push(Io::Zeroes(off, len, false));
                off += len;
            }
            'u' => {
                ops.push(Io::Zeroes(off, len, true));
                off += len;
            }
            _ => {
                ops.push(Io::Write(off, fill(seed, off, len)));
                off += len;
            }
        }
    }
    assert!(ops.iter().any(|o| matches!(o, Io::Discard(..))));
    ops
}

// ---------------------------------------------------------------------------------
// Extents

/// Merges adjacent extents with equal flags: (start, length, flags).
fn merge(v: &[(u64, u64, u32)]) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for &(s, l, f) in v {
        if let Some(last) = out.last_mut() {
            assert_eq!(last.0 + last.1, s, "extents are contiguous: {v:?}");
            if last.2 == f {
                last.1 += l;
                continue;
            }
        }
        out.push((s, l, f));
    }
    out
}

/// `nbdinfo --map[=CONTEXT] URI` as merged extents.
fn nbdinfo_map(context: Option<&str>, uri: &str) -> Vec<(u64, u64, u32)> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = run(&mut cmd("nbdinfo", &[&map, uri]));
    let v: Vec<(u64, u64, u32)> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    merge(&v)
}

/// `qemu-img map --output=json` entries.
fn qemu_img_map(args: &[&str]) -> Vec<Value> {
    let mut c = cmd("qemu-img", &["map", "--output=json"]);
    c.args(args);
    serde_json::from_str::<Value>(&run(&mut c))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The ranges of extents with flags `flag`.
fn with_flag(v: &[(u64, u64, u32)], flag: u32) -> Vec<(u64, u64)> {
    v.iter()
        .filter(|e| e.2 == flag)
        .map(|e| (e.0, e.1))
        .collect()
}

/// The granules of `granularity` bytes that `ranges` touch, as merged (start, length).
fn granules(ranges: &[(u64, u64)], granularity: u64) -> Vec<(u64, u64)> {
    let mut set = std::collections::BTreeSet::new();
    for &(o, l) in ranges {
        for g in o / granularity..(o + l).div_ceil(granularity) {
            set.insert(g);
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for g in set {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == g * granularity => last.1 += granularity,
            _ => out.push((g * granularity, granularity)),
        }
    }
    out
}

/// Dirty/clean extents covering `size` from merged dirty ranges, as `x-bitmap-dump`.
fn dump_of(dirty: &[(u64, u64)], size: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(s, l) in dirty {
        if s > pos {
            out.push((pos, s - pos, false));
        }
        out.push((s, l, true));
        pos = s + l;
    }
    if pos < size {
        out.push((pos, size - pos, false));
    }
    out
}

// ---------------------------------------------------------------------------------
// 1. Dirty bitmaps

/// 4 KiB guest writes: two in granule 0, one across granules 5-6, one in granule 7,
/// one across 16-17, one inside 161, the last 4 KiB of the disk.
const WRITES_4K: [u64; 7] = [
    0,
    8 * KIB,
    6 * G64K - 2 * KIB,
    7 * G64K,
    17 * G64K - 2 * KIB,
    10 * MIB + 100 * KIB,
    64 * MIB - 4 * KIB,
];

/// The dirty granules of [`WRITES_4K`] (64 KiB), merged.
fn dirty_of_writes_4k() -> Vec<(u64, u64)> {
    vec![
        (0, G64K),
        (5 * G64K, 3 * G64K),
        (16 * G64K, 2 * G64K),
        (161 * G64K, G64K),
        (1023 * G64K, G64K),
    ]
}

/// A 64 MiB qcow2 with an empty bitmap b0 (64 KiB), served with QMP; the frontend
/// wrote [`WRITES_4K`]; the NBD server is started on `dir/nbd.sock`.
fn served_with_b0_written(dir: &Path) -> (Fixture, PathBuf, PathBuf) {
    let img = dir.join("disk.qcow2");
    qcow2_image(&img, 64 * MIB);
    run(&mut cmd(
        BIN,
        &["bitmap", "add", p(&img), "b0", "-g", "64K"],
    ));
    let mut fx = Fixture::start(dir, &img, &[]);
    let mut d = fx.driver();
    let ios: Vec<Io> = WRITES_4K
        .iter()
        .map(|&o| Io::Write(o, fill(1, o, 4096)))
        .collect();
    guest_io(&mut d.queues[0], &ios);
    drop(d);
    assert_eq!(
        granules(
            &WRITES_4K.iter().map(|&o| (o, 4096)).collect::<Vec<_>>(),
            G64K
        ),
        dirty_of_writes_4k()
    );
    let sock = dir.join("nbd.sock");
    fx.start_nbd(&sock);
    (fx, img, sock)
}

/// nbdinfo and qemu-img see exactly the 64 KiB granules the frontend wrote in the
/// exported bitmap (qemu-img inverted, as `x-dirty-bitmap` maps dirty to "data":
/// false); the exported bitmap is busy until the export goes.
#[test]
fn exported_dirty_bitmap_is_exactly_what_the_frontend_wrote() {
    if !need(&["qemu-img", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut fx, img, sock) = served_with_b0_written(dir.path());
    fx.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk0", "name": "vm",
               "bitmaps": ["b0"], "allocation-depth": true}),
    );
    let uri = unix_uri(&sock, "vm");
    let want = dirty_of_writes_4k();
    let size = 64 * MIB;

    let map = nbdinfo_map(Some("qemu:dirty-bitmap:b0"), &uri);
    assert_eq!(with_flag(&map, 1), want, "nbdinfo dirty extents: {map:?}");
    assert_eq!(map.last().map(|e| e.0 + e.1), Some(size), "covers the disk");
    assert!(map.iter().all(|e| e.2 <= 1), "{map:?}");
    // The raw lines say "dirty"/"clean".
    let text = run(&mut cmd(
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:b0", uri.as_str()],
    ));
    // Neighbouring dirty granules come as one extent, not one line per granule.
    let dirty_lines: Vec<(u64, u64)> = text
        .lines()
        .filter(|l| l.ends_with("1  dirty"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap())
        })
        .collect();
    assert_eq!(dirty_lines, want, "{text}");

    // The fresh image: the written clusters are the allocated ones.
    let depth = nbdinfo_map(Some("qemu:allocation-depth"), &uri);
    assert_eq!(with_flag(&depth, 1), want, "allocation depth {depth:?}");
    let alloc = nbdinfo_map(None, &uri);
    assert_eq!(with_flag(&alloc, 0), want, "base:allocation {alloc:?}");

    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vm,x-dirty-bitmap=qemu:dirty-bitmap:b0",
        sock.display()
    );
    let qmap = qemu_img_map(&["--image-opts", &opts]);
    let inverted: Vec<(u64, u64, u32)> = qmap
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                u32::from(e["data"] == false),
            )
        })
        .collect();
    let inverted = merge(&inverted);
    assert_eq!(with_flag(&inverted, 1), want, "qemu-img map {qmap:?}");
    assert_eq!(inverted.last().map(|e| e.0 + e.1), Some(size));

    let b0 = fx.bitmaps();
    assert_eq!(b0.len(), 1);
    assert_eq!(b0[0]["name"], "b0");
    assert_eq!(b0[0]["busy"], true, "{b0:?}");
    assert_eq!(b0[0]["count"], want.iter().map(|r| r.1).sum::<u64>());
    let node = json!({"node": "disk0", "name": "b0"});
    for c in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-disable",
    ] {
        assert_eq!(
            fx.fail(c, node.clone()),
            ("GenericError".to_string(), format!("Bitmap 'b0' {BUSY}")),
            "{c}"
        );
    }
    // In a transaction too, and it changes nothing.
    let (_, desc) = fx.fail(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b1"}},
            {"type": "block-dirty-bitmap-clear", "data": node.clone()}]}),
    );
    assert_eq!(desc, format!("Bitmap 'b0' {BUSY}"));
    assert_eq!(fx.bitmaps().len(), 1, "b1 not added");

    fx.del_export("e0");
    assert_eq!(fx.bitmaps()[0]["busy"], false);
    fx.exec("block-dirty-bitmap-disable", node.clone());
    assert_eq!(
        fx.dump("b0"),
        dump_of(&want, size),
        "unchanged while exported"
    );
    fx.exec("block-dirty-bitmap-clear", node.clone());
    assert_eq!(fx.dump("b0"), vec![(0, size, false)]);
    fx.exec("block-dirty-bitmap-remove", node);
    assert!(fx.bitmaps().is_empty());
    fx.quit();
    let info = run(&mut cmd("qemu-img", &["info", p(&img)]));
    assert!(!info.contains("b0"), "{info}");
}

// ---------------------------------------------------------------------------------
// 2. base:allocation

/// Serves `image` (format `fmt`) with the command-line export `img` and checks its
/// `base:allocation` (and `qemu:allocation-depth`) against `qemu-img map` of the image,
/// and its contents with `qemu-img compare`.
fn check_allocation(dir: &Path, image: &Path, fmt: &str) {
    let sock = dir.join("nbd.sock");
    let fx = Fixture::start(
        dir,
        image,
        &[
            "--format",
            fmt,
            "--nbd-socket",
            p(&sock),
            "--export-name",
            "img",
        ],
    );
    let uri = unix_uri(&sock, "img");
    let qmap = qemu_img_map(&["-U", "-f", fmt, p(image)]);
    let flags = |e: &Value| -> u32 {
        u32::from(e["data"] == false) | if e["zero"] == true { 2 } else { 0 }
    };
    let depth = |e: &Value| -> u32 {
        if e["present"] == true {
            e["depth"].as_u64().unwrap() as u32 + 1
        } else {
            0
        }
    };
    let extents = |f: &dyn Fn(&Value) -> u32| -> Vec<(u64, u64, u32)> {
        merge(
            &qmap
                .iter()
                .map(|e| {
                    (
                        e["start"].as_u64().unwrap(),
                        e["length"].as_u64().unwrap(),
                        f(e),
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    let want = extents(&flags);
    assert!(
        want.len() >= 4,
        "the image has several kinds of extents: {want:?}"
    );
    assert_eq!(
        nbdinfo_map(None, &uri),
        want,
        "base:allocation vs qemu-img map {qmap:?}"
    );
    assert_eq!(
        nbdinfo_map(Some("qemu:allocation-depth"), &uri),
        extents(&depth),
        "qemu:allocation-depth vs qemu-img map {qmap:?}"
    );
    let out = run(&mut cmd(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", fmt, &uri, p(image)],
    ));
    assert_eq!(out.trim(), "Images are identical.");
    // The contents really are compared: a different image is not identical.
    let other = dir.join("other.raw");
    run(&mut cmd(
        "qemu-img",
        &["convert", "-U", "-f", fmt, "-O", "raw", p(image), p(&other)],
    ));
    qemu_io("raw", p(&other), &["write -P 0x77 4M 512".to_string()]);
    let o = output(&mut cmd(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", "raw", &uri, p(&other)],
    ));
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    fx.quit();
}

/// A qcow2 image with data, zero clusters (allocated and not), discarded clusters,
/// partial clusters and never-written space.
#[test]
fn base_allocation_matches_qemu_img_map_qcow2() {
    if !need(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    qcow2_image(&img, 64 * MIB);
    let c = |s: &str| s.to_string();
    qemu_io(
        "qcow2",
        p(&img),
        &[
            c("write -P 0x11 0 1M"),
            c("write -P 0x12 4M 4k"),
            c("write -P 0x13 8M 256k"),
            c("write -z 8M 64k"),
            c("write -z -u 8256k 64k"),
            c("discard 8320k 64k"),
            c("write -z 20M 128k"),
            c("write -P 0x14 30M 192k"),
            c("discard 30M 64k"),
            c("write -P 0x15 63M 1M"),
        ],
    );
    check_allocation(dir.path(), &img, "qcow2");
}

/// An overlay over a backing file: unallocated clusters take the backing file's status,
/// zero clusters and discards hide it.
#[test]
fn base_allocation_matches_qemu_img_map_with_backing_file() {
    if !need(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qcow2_image(&base, 64 * MIB);
    let c = |s: &str| s.to_string();
    qemu_io(
        "qcow2",
        p(&base),
        &[
            c("write -P 0x11 0 1M"),
            c("write -P 0x12 8M 256k"),
            c("write -P 0x13 20M 64k"),
            c("write -z 30M 128k"),
            c("write -P 0x14 40M 1M"),
        ],
    );
    run(&mut cmd(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top),
            "64M",
        ],
    ));
    qemu_io(
        "qcow2",
        p(&top),
        &[
            c("write -P 0x21 512k 1M"),
            c("write -z 8M 64k"),
            c("discard 20M 64k"),
            c("write -P 0x22 40M 192k"),
            c("discard 40M 64k"),
            c("write -P 0x23 50M 4k"),
            c("write -z 60M 64k"),
        ],
    );
    check_allocation(dir.path(), &top, "qcow2");
}

/// A sparse raw file: holes (SEEK_HOLE) read as zeroes.
#[test]
fn base_allocation_matches_qemu_img_map_raw() {
    if !need(&["qemu-img", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = File::create(&img).unwrap();
        f.set_len(64 * MIB).unwrap();
        for (off, len) in [(0, MIB), (8 * MIB, 256 * KIB), (63 * MIB, MIB)] {
            f.write_all_at(&fill(1, off, len), off).unwrap();
        }
        f.sync_all().unwrap();
    }
    check_allocation(dir.path(), &img, "raw");
}

// ---------------------------------------------------------------------------------
// 3. Whole-disk copies

/// A free TCP port on 127.0.0.1 (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nbdcopy of a sparse 1 GiB export (over a unix socket, then over TCP) is exactly
/// `qemu-img convert -U` of the image (made while it is served).
#[test]
fn nbdcopy_of_a_1_gib_export_equals_qemu_img_convert() {
    if !need(&["qemu-img", "qemu-io", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 1u64 << 30;
    qcow2_image(&img, size);
    // 24 extents of 64-320 KiB scattered over the disk, the last one at its end.
    let mut cmds: Vec<String> = (0..23u64)
        .map(|i| {
            let off = ((i * 43 * MIB + i * i * 68 * KIB) % (size - MIB)) / 4096 * 4096;
            format!("write -P {} {off} {}", i + 1, G64K * (1 + i % 5))
        })
        .collect();
    cmds.push(format!("write -P 0xee {} 64k", size - G64K));
    qemu_io("qcow2", p(&img), &cmds);
    // Unix socket, the default (empty) export name.
    let sock = dir.path().join("nbd.sock");
    let fx = Fixture::start(dir.path(), &img, &["--nbd-socket", p(&sock)]);
    let reference = dir.path().join("ref.raw");
    run(&mut cmd(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "raw",
            p(&img),
            p(&reference),
        ],
    ));
    {
        use std::os::unix::fs::FileExt;
        let f = File::open(&reference).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, size - 1).unwrap();
        assert_eq!(b[0], 0xee, "the reference has the data");
    }
    let out = dir.path().join("out.raw");
    let t = Instant::now();
    run(&mut cmd("nbdcopy", &[&unix_uri(&sock, ""), p(&out)]));
    eprintln!("nbdcopy over unix: {:.1?}", t.elapsed());
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert_files_equal(&out, &reference, "nbdcopy over unix");
    fx.quit();

    // TCP, export "vm".
    let sub = tempfile::tempdir_in(dir.path()).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let fx = Fixture::start(
        sub.path(),
        &img,
        &["--nbd-listen", &listen, "--export-name", "vm"],
    );
    let uri = format!("nbd://{listen}/vm");
    assert_eq!(
        run(&mut cmd("nbdinfo", &["--size", &uri])).trim(),
        size.to_string()
    );
    let out2 = dir.path().join("out2.raw");
    run(&mut cmd("nbdcopy", &[&uri, p(&out2)]));
    assert_files_equal(&out2, &reference, "nbdcopy over TCP");
    // Another name is not exported.
    let o = output(&mut cmd(
        "nbdinfo",
        &["--size", &format!("nbd://{listen}/other")],
    ));
    assert!(!o.status.success());
    fx.quit();
}

// ---------------------------------------------------------------------------------
// 4. An imageio-like client

/// Runs a Python script (with libnbd) with `args`; returns its JSON output.
fn python_json(script: &str, args: &[&str]) -> Value {
    let mut c = cmd(PY, &["-c", script]);
    c.args(args);
    let out = run(&mut c);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// What ovirt-imageio does: negotiate in option mode, list the dirty-bitmap contexts,
/// select three contexts, one BLOCK_STATUS over the disk.
const IMAGEIO_SCRIPT: &str = r#"
import json, sys
import nbd

def listing(h):
    names = []
    def cb(name):
        names.append(name)
        return 0
    n = h.opt_list_meta_context(cb)
    return [n, names]

out = {}
h = nbd.NBD()
h.set_request_structured_replies(True)
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
out["all"] = listing(h)
h.add_meta_context("qemu:dirty-bitmap:")
out["bitmaps"] = listing(h)
h.clear_meta_contexts()
wanted = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
for c in wanted:
    h.add_meta_context(c)
h.opt_go()
out["can"] = {c: h.can_meta_context(c) for c in wanted + ["qemu:dirty-bitmap:nope"]}
size = h.get_size()
out["size"] = size
seen = {}
calls = []
def extents(metacontext, offset, entries, err):
    calls.append(metacontext)
    ext = seen.setdefault(metacontext, [])
    pos = offset
    for i in range(0, len(entries), 2):
        ext.append([pos, entries[i], entries[i + 1]])
        pos += entries[i]
    return 0
h.block_status(size, 0, extents)
out["calls"] = calls
out["extents"] = seen
h.shutdown()
print(json.dumps(out))
"#;

#[test]
fn imageio_like_negotiation_sees_exactly_the_written_extents() {
    if !need(&["qemu-img", "python3-libnbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut fx, _img, sock) = served_with_b0_written(dir.path());
    fx.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk0", "name": "vm",
               "bitmaps": ["b0"], "allocation-depth": true}),
    );
    let r = python_json(IMAGEIO_SCRIPT, &[&unix_uri(&sock, "vm")]);
    let size = 64 * MIB;
    assert_eq!(
        r["all"],
        json!([
            3,
            [
                "base:allocation",
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:b0"
            ]
        ]),
        "{r}"
    );
    assert_eq!(r["bitmaps"], json!([1, ["qemu:dirty-bitmap:b0"]]));
    assert_eq!(
        r["can"],
        json!({"base:allocation": true, "qemu:allocation-depth": true,
               "qemu:dirty-bitmap:b0": true, "qemu:dirty-bitmap:nope": false})
    );
    assert_eq!(r["size"], size);
    let mut calls: Vec<&str> = r["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    calls.sort_unstable();
    assert_eq!(
        calls,
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:b0"
        ],
        "one callback per selected context"
    );
    let ext = |ctx: &str| -> Vec<(u64, u64, u32)> {
        merge(
            &r["extents"][ctx]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e[0].as_u64().unwrap(),
                        e[1].as_u64().unwrap(),
                        e[2].as_u64().unwrap() as u32,
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    let want = dirty_of_writes_4k();
    let dirty = ext("qemu:dirty-bitmap:b0");
    assert_eq!(
        dirty,
        dump_of(&want, size)
            .iter()
            .map(|e| (e.0, e.1, u32::from(e.2)))
            .collect::<Vec<_>>()
    );
    // A fresh image: what was written is allocated (data, depth 1), the rest reads as
    // zero holes (depth 0).
    let alloc = ext("base:allocation");
    assert_eq!(with_flag(&alloc, 0), want, "{alloc:?}");
    assert!(alloc.iter().all(|e| e.2 == 0 || e.2 == 3), "{alloc:?}");
    let depth = ext("qemu:allocation-depth");
    assert_eq!(with_flag(&depth, 1), want, "{depth:?}");
    assert!(depth.iter().all(|e| e.2 <= 1), "{depth:?}");
    fx.del_export("e0");
    fx.quit();
}

// ---------------------------------------------------------------------------------
// 5. Point-in-time views

/// The 64 KiB chunk left unwritten (reads as zeroes) before the view starts.
const ZERO_CHUNK: u64 = 3;

/// A raw or qcow2 disk of [`DISK_SIZE`] written with pattern 1 (but [`ZERO_CHUNK`]);
/// a transaction starts a snapshot export (and, on qcow2, bitmap b1); the frontend
/// then overwrites the first half with writes of assorted sizes, write-zeroes and
/// discards. The export still reads the old contents, the frontend the new ones; the
/// export's fleecing store goes with it.
fn point_in_time_view(qcow2: bool, aio: &str) {
    if !need(&["nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = DISK_SIZE;
    let (img, fmt) = if qcow2 {
        let img = dir.path().join("disk.qcow2");
        qcow2::create(
            &img,
            &qcow2::CreateOptions {
                size,
                cluster_size: 65536,
                ..Default::default()
            },
        )
        .unwrap();
        (img, "qcow2")
    } else {
        let img = dir.path().join("disk.raw");
        File::create(&img).unwrap().set_len(size).unwrap();
        (img, "raw")
    };
    let fleece = dir.path().join("fleece");
    std::fs::create_dir(&fleece).unwrap();
    let mut fx = Fixture::start(
        dir.path(),
        &img,
        &["--format", fmt, "--aio", aio, "--fleece-dir", p(&fleece)],
    );
    let mut d = fx.driver();
    let qd = &mut d.queues[0];
    write_pattern(qd, 1, 0, ZERO_CHUNK * G64K);
    write_pattern(qd, 1, (ZERO_CHUNK + 1) * G64K, size);
    let mut before = fill(1, 0, size);
    before[(ZERO_CHUNK * G64K) as usize..((ZERO_CHUNK + 1) * G64K) as usize].fill(0);
    assert_same(&read_disk(qd, size), &before, "the disk before the view");

    let sock = dir.path().join("nbd.sock");
    fx.start_nbd(&sock);
    assert!(fleece_fds(fx.pid(), &fleece).is_empty());
    let export = json!({"type": "block-export-add", "data": {"type": "nbd", "id": "snap",
        "node-name": "disk0", "name": "snap", "x-snapshot": true}});
    let actions = if qcow2 {
        json!([{"type": "block-dirty-bitmap-add",
                "data": {"node": "disk0", "name": "b1", "persistent": true}}, export])
    } else {
        json!([export])
    };
    fx.exec("transaction", json!({ "actions": actions }));
    assert_eq!(fx.export_ids(), ["snap"]);
    assert_eq!(
        fleece_fds(fx.pid(), &fleece).len(),
        1,
        "the view's fleecing store is open"
    );

    let ops = assorted_ops(2, 0, size / 2);
    let mut after = before.clone();
    for op in &ops {
        op.apply(&mut after);
    }
    guest_io(qd, &ops);
    assert_same(
        &read_disk(qd, size),
        &after,
        "the frontend reads the new data",
    );

    if qcow2 {
        assert_eq!(
            fx.dump("b1"),
            vec![(0, size / 2, true), (size / 2, size / 2, false)],
            "b1 records exactly what was written after the transaction"
        );
    }
    let out = dir.path().join("snap.raw");
    run(&mut cmd("nbdcopy", &[&unix_uri(&sock, "snap"), p(&out)]));
    assert_same(
        &std::fs::read(&out).unwrap(),
        &before,
        "the export reads the disk as of the transaction",
    );
    // And again after more writes: over preserved chunks (they stay as they were) and
    // over chunks of the second half the view has not preserved yet.
    let more: Vec<Io> = (0..size)
        .step_by(MIB as usize)
        .map(|o| Io::Write(o + 4096, fill(3, o + 4096, 8192)))
        .collect();
    guest_io(qd, &more);
    run(&mut cmd("nbdcopy", &[&unix_uri(&sock, "snap"), p(&out)]));
    assert_same(&std::fs::read(&out).unwrap(), &before, "second copy");

    fx.del_export("snap");
    let ev = fx.wait_event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "snap"}));
    assert_fleece_freed(fx.pid(), &fleece);
    assert!(fx.export_ids().is_empty());
    // Writes go on without a view.
    guest_io(qd, &[Io::Write(0, fill(3, 0, G64K))]);
    drop(d);
    fx.quit();
}

#[test]
fn point_in_time_export_raw_io_uring() {
    point_in_time_view(false, "io_uring");
}

#[test]
fn point_in_time_export_raw_threads() {
    point_in_time_view(false, "threads");
}

#[test]
fn point_in_time_export_qcow2_io_uring() {
    point_in_time_view(true, "io_uring");
}

#[test]
fn point_in_time_export_qcow2_threads() {
    point_in_time_view(true, "threads");
}

// ---------------------------------------------------------------------------------
// 6. A full fleecing store

/// A mounted tmpfs, unmounted when dropped (after the daemon using it is gone).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`; `None` (skip) when that is not possible
    /// outside CI.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mounted = root
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !mounted {
            assert!(
                !ci(),
                "mounting a {size} tmpfs failed under CI=true (root: {root})"
            );
            eprintln!("SKIP: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Reads the export at each offset with libnbd; prints the errno of each failure.
const PREAD_SCRIPT: &str = r#"
import json, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
res = []
for off in sys.argv[2:]:
    try:
        h.pread(65536, int(off))
        res.append(0)
    except nbd.Error as e:
        res.append(e.errno)
h.shutdown()
print(json.dumps(res))
"#;

/// The fleecing store on a 1 MiB file system fills up: the guest's writes all succeed,
/// the view breaks (event, EIO for its readers), a plain export goes on.
#[test]
fn full_fleecing_store_breaks_the_view_not_the_guest() {
    if !need(&["qemu-io", "nbdcopy", "python3-libnbd"]) {
        return;
    }
    let mnt_dir = tempfile::tempdir().unwrap();
    let Some(_tmpfs) = Tmpfs::mount(mnt_dir.path(), "1M") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let size = DISK_SIZE;
    File::create(&img).unwrap().set_len(size).unwrap();
    let mut fx = Fixture::start(
        dir.path(),
        &img,
        &["--format", "raw", "--fleece-dir", p(mnt_dir.path())],
    );
    let mut d = fx.driver();
    let qd = &mut d.queues[0];
    write_pattern(qd, 1, 0, size);
    let sock = dir.path().join("nbd.sock");
    fx.start_nbd(&sock);
    fx.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "snap", "node-name": "disk0", "name": "snap",
               "x-snapshot": true}),
    );
    fx.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "live", "node-name": "disk0", "name": "live"}),
    );
    let snap = unix_uri(&sock, "snap");
    // The view reads before it breaks.
    assert_eq!(
        python_json(PREAD_SCRIPT, &[&snap, "0", &(4 * MIB).to_string()]),
        json!([0, 0])
    );

    // 3 MiB of new data: 3 MiB to preserve into 1 MiB.
    let ios: Vec<Io> = (0..3 * MIB)
        .step_by(G64K as usize)
        .map(|o| Io::Write(o, fill(2, o, G64K)))
        .collect();
    guest_io(qd, &ios);
    let mut want = fill(1, 0, size);
    want[..(3 * MIB) as usize].copy_from_slice(&fill(2, 0, 3 * MIB));
    assert_same(&read_disk(qd, size), &want, "every guest write landed");

    let ev = fx.wait_event("BLOCK_EXPORT_SNAPSHOT_BROKEN");
    assert_eq!(ev["data"]["id"], "snap", "{ev}");
    assert_eq!(ev["data"]["node-name"], "disk0", "{ev}");
    let reason = ev["data"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("fleecing store") && reason.contains("No space left on device"),
        "{reason}"
    );

    // Every read of the view fails with EIO, also where nothing was written.
    assert_eq!(
        python_json(PREAD_SCRIPT, &[&snap, "0", &(4 * MIB).to_string()]),
        json!(["EIO", "EIO"])
    );
    let o = output(&mut cmd(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read 4M 64k", &snap],
    ));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() && text.contains("Input/output error"),
        "qemu-io read of the broken view: {text}"
    );
    // The plain export is unaffected.
    let out = dir.path().join("live.raw");
    run(&mut cmd("nbdcopy", &[&unix_uri(&sock, "live"), p(&out)]));
    assert_same(&std::fs::read(&out).unwrap(), &want, "the live export");
    // The guest goes on writing; the view is not reported broken twice.
    guest_io(qd, &[Io::Write(5 * MIB, fill(3, 5 * MIB, MIB))]);
    assert_eq!(fx.export_ids(), ["live", "snap"]);
    let again: Vec<Value> = fx
        .qmp
        .take_events()
        .into_iter()
        .filter(|e| e["event"] == "BLOCK_EXPORT_SNAPSHOT_BROKEN")
        .collect();
    assert!(again.is_empty(), "{again:?}");

    assert_eq!(fleece_fds(fx.pid(), mnt_dir.path()).len(), 1);
    fx.del_export("snap");
    assert_fleece_freed(fx.pid(), mnt_dir.path());
    drop(d);
    fx.quit();
}

// ---------------------------------------------------------------------------------
// 7. Export deletion and the server's errors

/// A minimal NBD client: fixed newstyle handshake with NBD_OPT_GO, then simple replies.
struct RawClient(UnixStream);

impl RawClient {
    fn read_u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        self.0.read_exact(&mut b).unwrap();
        u16::from_be_bytes(b)
    }
    fn read_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b)
    }
    fn read_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    }

    /// Connects to export `name` and completes the handshake; returns the client and
    /// the export size.
    fn connect(sock: &Path, name: &str) -> (RawClient, u64) {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = RawClient(s);
        assert_eq!(c.read_u64(), 0x4e42_444d_4147_4943, "NBDMAGIC");
        assert_eq!(c.read_u64(), 0x4948_4156_454f_5054, "IHAVEOPT");
        let flags = c.read_u16();
        assert_ne!(flags & 1, 0, "fixed newstyle");
        let mut msg = Vec::new();
        msg.extend_from_slice(&(1u32 | u32::from(flags & 2)).to_be_bytes());
        msg.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        msg.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        msg.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
        msg.extend_from_slice(name.as_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        c.0.write_all(&msg).unwrap();
        let mut size = None;
        loop {
            assert_eq!(c.read_u64(), 0x0003_e889_0455_65a9, "option reply magic");
            assert_eq!(c.read_u32(), 7);
            let ty = c.read_u32();
            let len = c.read_u32();
            let mut data = vec![0u8; len as usize];
            c.0.read_exact(&mut data).unwrap();
            match ty {
                1 => break, // ACK
                3 if data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                3 => {}
                _ => panic!("NBD_OPT_GO answered {ty:#x}: {data:?}"),
            }
        }
        (c, size.expect("NBD_INFO_EXPORT"))
    }

    /// NBD_CMD_WRITE; returns the reply's error (0: success).
    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes()); // WRITE
        req.extend_from_slice(&43u64.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&(data.len() as u32).to_be_bytes());
        req.extend_from_slice(data);
        self.0.write_all(&req).unwrap();
        let mut hdr = [0u8; 16];
        self.0.read_exact(&mut hdr).unwrap();
        assert_eq!(&hdr[0..4], &0x6744_6698u32.to_be_bytes(), "simple reply");
        assert_eq!(u64::from_be_bytes(hdr[8..16].try_into().unwrap()), 43);
        u32::from_be_bytes(hdr[4..8].try_into().unwrap())
    }

    /// NBD_CMD_READ; an error when the server hung up.
    fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes()); // READ
        req.extend_from_slice(&42u64.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&req)?;
        let mut hdr = [0u8; 16];
        self.0.read_exact(&mut hdr)?;
        assert_eq!(&hdr[0..4], &0x6744_6698u32.to_be_bytes(), "simple reply");
        assert_eq!(&hdr[4..8], &[0, 0, 0, 0], "no error");
        assert_eq!(u64::from_be_bytes(hdr[8..16].try_into().unwrap()), 42);
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data)?;
        Ok(data)
    }
}

/// `block-export-del` safe and hard with a client connected, the server's errors,
/// `nbd-server-stop`; the image is clean afterwards.
#[test]
fn export_deletion_and_server_errors() {
    if !need(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    qcow2_image(&img, 16 * MIB);
    run(&mut cmd(
        "qemu-img",
        &["bitmap", "--add", "-g", "64K", p(&img), "b0"],
    ));
    let mut fx = Fixture::start(dir.path(), &img, &[]);
    let mut d = fx.driver();
    guest_io(&mut d.queues[0], &[Io::Write(MIB, fill(1, MIB, G64K))]);
    let sock = dir.path().join("nbd.sock");
    let generic = |s: &str| ("GenericError".to_string(), s.to_string());
    let add =
        |id: &str, name: &str| json!({"type": "nbd", "id": id, "node-name": "disk0", "name": name});

    assert_eq!(
        fx.fail("block-export-add", add("x", "x")),
        generic("NBD server not running")
    );
    assert_eq!(
        fx.fail("nbd-server-stop", json!({})),
        generic("NBD server not running")
    );
    fx.start_nbd(&sock);
    assert_eq!(
        fx.fail(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": p(&dir.path().join("n2.sock"))}}})
        ),
        generic("NBD server already running")
    );
    fx.exec("block-export-add", add("x", "x"));
    assert_eq!(
        fx.fail("block-export-add", add("x", "other")),
        generic("Block export id 'x' is already in use")
    );
    assert_eq!(
        fx.fail("block-export-add", add("y", "x")),
        generic("NBD server already has export named 'x'")
    );
    let mut bad = add("y", "y");
    bad["bitmaps"] = json!(["nope"]);
    assert_eq!(
        fx.fail("block-export-add", bad),
        generic("Bitmap 'nope' is not found")
    );
    let mut bad = add("y", "y");
    bad["writable"] = json!(true);
    bad["x-snapshot"] = json!(true);
    assert_eq!(
        fx.fail("block-export-add", bad),
        generic("A point-in-time (x-snapshot) export cannot be writable")
    );
    assert_eq!(
        fx.fail("block-export-del", json!({"id": "nope"})),
        generic("Export 'nope' is not found")
    );
    assert_eq!(
        fx.exec("query-block-exports", json!({})),
        json!([{"type": "nbd", "id": "x", "node-name": "disk0", "shutting-down": false}])
    );
    // The failed adds left nothing behind: b0 is not busy, y can be added.
    assert_eq!(fx.bitmaps()[0]["busy"], false);

    let (mut client, size) = RawClient::connect(&sock, "x");
    assert_eq!(size, 16 * MIB);
    assert_eq!(client.read(MIB, 4096).unwrap(), fill(1, MIB, 4096));
    assert_eq!(
        fx.fail("block-export-del", json!({"id": "x"})),
        generic("export 'x' still in use")
    );
    assert_eq!(
        fx.fail("block-export-del", json!({"id": "x", "mode": "safe"})),
        generic("export 'x' still in use")
    );
    assert_eq!(client.read(0, 512).unwrap(), vec![0; 512], "still served");
    assert!(fx.qmp.take_events().is_empty());
    fx.exec("block-export-del", json!({"id": "x", "mode": "hard"}));
    let ev = fx.wait_event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "x"}));
    assert!(client.read(0, 512).is_err(), "the client was disconnected");
    assert!(fx.export_ids().is_empty());

    // Without clients, safe deletion works; the id and name are free again.
    fx.exec("block-export-add", add("x", "x"));
    fx.exec("block-export-del", json!({"id": "x"}));
    assert_eq!(
        fx.wait_event("BLOCK_EXPORT_DELETED")["data"],
        json!({"id": "x"})
    );

    // nbd-server-stop removes every export (and disconnects), and the socket.
    let mut with_b0 = add("b", "b");
    with_b0["bitmaps"] = json!(["b0"]);
    fx.exec("block-export-add", with_b0);
    fx.exec("block-export-add", add("c", "c"));
    assert_eq!(fx.bitmaps()[0]["busy"], true);
    let (mut client, _) = RawClient::connect(&sock, "c");
    assert_eq!(fx.export_ids(), ["b", "c"]);
    fx.exec("nbd-server-stop", json!({}));
    let mut deleted = vec![
        fx.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"].clone(),
        fx.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"].clone(),
    ];
    deleted.sort_by_key(|v| v.to_string());
    assert_eq!(deleted, [json!("b"), json!("c")]);
    assert!(fx.export_ids().is_empty());
    assert!(!sock.exists(), "the NBD socket was removed");
    assert!(client.read(0, 512).is_err(), "the client was disconnected");
    assert_eq!(fx.bitmaps()[0]["busy"], false);
    assert_eq!(
        fx.fail("block-export-add", add("x", "x")),
        generic("NBD server not running")
    );
    // And it starts again.
    fx.start_nbd(&sock);
    fx.exec("block-export-add", add("x", "x"));
    let (mut client, _) = RawClient::connect(&sock, "x");
    assert_eq!(client.read(MIB, 512).unwrap(), fill(1, MIB, 512));
    drop(client);
    drop(d);
    fx.quit();

    let check = output(&mut cmd("qemu-img", &["check", p(&img)]));
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let info: Value = serde_json::from_str(&run(&mut cmd(
        "qemu-img",
        &["info", "--output=json", p(&img)],
    )))
    .unwrap();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"],
        json!([{"flags": ["auto"], "name": "b0", "granularity": 65536}]),
        "{info}"
    );
}

// ---------------------------------------------------------------------------------
// 8. resources/backup.py

const BACKUP_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../resources/backup.py");

/// `backup.py ARGS…` with `path` prepended to PATH when given; returns its stdout.
fn backup_py(args: &[&str], path: Option<&Path>) -> String {
    let mut c = cmd(PY, &[BACKUP_PY]);
    c.args(args);
    if let Some(dir) = path {
        let old = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{old}", dir.display()));
    }
    run(&mut c)
}

/// The files of backup.py's chain, oldest first.
fn chain_files(dir: &Path) -> Vec<String> {
    let chain: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("chain.json")).unwrap()).unwrap();
    chain
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["file"].as_str().unwrap().to_string())
        .collect()
}

/// `qemu-img convert -O raw` of a backup file, read back.
fn restore_file(src: &Path, out: &Path) -> Vec<u8> {
    run(&mut cmd(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", p(src), p(out)],
    ));
    std::fs::read(out).unwrap()
}

/// The number in backup.py's "incremental, N bytes copied".
fn copied_bytes(out: &str) -> u64 {
    let i = out.find("incremental, ").unwrap_or_else(|| panic!("{out}")) + 13;
    out[i..].split_whitespace().next().unwrap().parse().unwrap()
}

/// A full backup and two incrementals while the frontend is attached (idle during
/// each backup); each chain element restores the disk as of its backup, the incremental
/// ones hold just the extents written since the previous backup.
#[test]
fn backup_py_full_and_incrementals_restore_each_instant() {
    if !need(&["qemu-img", "qemu-nbd", "python3-libnbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 32 * MIB;
    qcow2_image(&img, size);
    let mut fx = Fixture::start(dir.path(), &img, &[]);
    let qsock = fx.qmp_sock.clone();
    let backups = dir.path().join("backups");
    let b = p(&backups);
    let q = p(&qsock);
    let mut d = fx.driver();
    let qd = &mut d.queues[0];

    write_pattern(qd, 1, 0, size);
    let disk0 = read_disk(qd, size);
    let out = backup_py(&["--qmp", q, "--dir", b, "full"], None);
    assert!(out.contains("full.qcow2 (full)"), "{out}");
    let granularity = {
        let bms = fx.bitmaps();
        assert_eq!(bms.len(), 1, "{bms:?}");
        assert_eq!(bms[0]["recording"], true);
        assert_eq!(bms[0]["persistent"], true);
        assert_eq!(bms[0]["count"], 0);
        bms[0]["granularity"].as_u64().unwrap()
    };

    let phase2 = vec![
        Io::Write(0, fill(2, 0, 4096)),
        Io::Write(3 * MIB + 512, fill(2, 3 * MIB + 512, 1024)),
        Io::Write(5 * MIB - 8 * KIB, fill(2, 5 * MIB - 8 * KIB, 200 * KIB)),
        Io::Zeroes(9 * MIB, 128 * KIB, false),
        Io::Discard(12 * MIB, 256 * KIB),
        Io::Zeroes(20 * MIB, 64 * KIB, true),
        Io::Write(size - 4096, fill(2, size - 4096, 4096)),
    ];
    guest_io(qd, &phase2);
    let disk1 = read_disk(qd, size);
    let mut model = disk0.clone();
    for op in &phase2 {
        op.apply(&mut model);
    }
    assert_same(&disk1, &model, "the disk after phase 2");
    let out = backup_py(&["--qmp", q, "--dir", b, "inc"], None);
    let ranges: Vec<(u64, u64)> = phase2.iter().map(Io::range).collect();
    let dirty: u64 = granules(&ranges, granularity).iter().map(|r| r.1).sum();
    assert_eq!(copied_bytes(&out), dirty, "{out}");
    let mut copied = vec![dirty];

    let phase3 = vec![
        Io::Write(12 * MIB + 64 * KIB, fill(3, 12 * MIB + 64 * KIB, 64 * KIB)),
        Io::Write(9 * MIB + 4 * KIB, fill(3, 9 * MIB + 4 * KIB, 4 * KIB)),
        Io::Zeroes(16 * MIB, 512 * KIB, true),
        Io::Write(30 * MIB, fill(3, 30 * MIB, MIB)),
        Io::Discard(0, 64 * KIB),
    ];
    guest_io(qd, &phase3);
    let disk2 = read_disk(qd, size);
    for op in &phase3 {
        op.apply(&mut model);
    }
    assert_same(&disk2, &model, "the disk after phase 3");
    let out = backup_py(&["--qmp", q, "--dir", b, "inc"], None);
    let ranges: Vec<(u64, u64)> = phase3.iter().map(Io::range).collect();
    let dirty: u64 = granules(&ranges, granularity).iter().map(|r| r.1).sum();
    assert_eq!(copied_bytes(&out), dirty, "{out}");
    copied.push(dirty);

    let files = chain_files(&backups);
    assert_eq!(files, ["full.qcow2", "inc-1.qcow2", "inc-2.qcow2"]);
    let restored = dir.path().join("restored.raw");
    backup_py(&["--dir", b, "restore", p(&restored)], None);
    assert_same(
        &std::fs::read(&restored).unwrap(),
        &disk2,
        "restore = the last backup",
    );
    for (file, want) in files.iter().zip([&disk0, &disk1, &disk2]) {
        let got = restore_file(&backups.join(file), &dir.path().join("r.raw"));
        assert_same(&got, want, file);
    }
    for (inc, copied) in files[1..].iter().zip(copied) {
        // The copied extents plus qcow2 metadata (header, tables, refcounts).
        let len = std::fs::metadata(backups.join(inc)).unwrap().len();
        assert!(
            len < copied + 512 * KIB && len < size / 8,
            "{inc} holds only the increment ({copied} bytes): {len} bytes"
        );
    }
    // One bitmap remains: the one recording since the last backup; nothing exported.
    let bms = fx.bitmaps();
    assert_eq!(bms.len(), 1, "{bms:?}");
    assert_eq!(bms[0]["count"], 0);
    assert_eq!(bms[0]["busy"], false);
    assert!(fx.export_ids().is_empty());
    drop(d);
    fx.quit();
}

/// A full backup while the frontend writes all the time (from the instant the export
/// exists, and before the copy starts): the backup is the disk as of the transaction.
#[test]
fn backup_py_full_while_the_frontend_writes() {
    if !need(&["qemu-img", "qemu-nbd", "python3-libnbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 32 * MIB;
    qcow2_image(&img, size);
    let fx = Fixture::start(dir.path(), &img, &[]);
    let qsock = fx.qmp_sock.clone();
    let mut d = fx.driver();
    let mut qd = d.queues.pop().unwrap();
    write_pattern(&mut qd, 1, 0, size);
    let before = read_disk(&mut qd, size);

    // qemu-img convert (the copy) waits until the writer has written once.
    let flag = dir.path().join("written");
    let shim = dir.path().join("shim");
    std::fs::create_dir(&shim).unwrap();
    let real = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("qemu-img"))
        .find(|p| p.is_file())
        .unwrap();
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = convert ]; then\n  i=0\n  while [ ! -e '{}' ] && [ $i -lt 2000 ]; do sleep 0.01; i=$((i+1)); done\nfi\nexec '{}' \"$@\"\n",
        flag.display(),
        real.display()
    );
    std::fs::write(shim.join("qemu-img"), script).unwrap();
    run(&mut cmd("chmod", &["+x", p(&shim.join("qemu-img"))]));

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, flag, qsock) = (stop.clone(), flag.clone(), qsock.clone());
        std::thread::spawn(move || {
            let mut c = qmp::Client::connect(&qsock).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let list = c.execute("query-block-exports", json!({})).unwrap();
                if list.as_array().unwrap().iter().any(|e| e["id"] == "backup") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the backup export never appeared"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // 16 writes of 64 KiB spread over the disk, a different place each round.
                let ios: Vec<Io> = (0..16u64)
                    .map(|i| {
                        let off = ((rounds * 16 + i) * 37 * G64K) % size;
                        Io::Write(off, fill(2 + (rounds % 2) as u8, off, G64K))
                    })
                    .collect();
                guest_io(&mut qd, &ios);
                rounds += 1;
                if rounds == 1 {
                    File::create(&flag).unwrap();
                }
            }
            (qd, rounds)
        })
    };
    let backups = dir.path().join("backups");
    let out = backup_py(
        &["--qmp", p(&qsock), "--dir", p(&backups), "full"],
        Some(&shim),
    );
    stop.store(true, Ordering::SeqCst);
    let (mut qd, rounds) = writer.join().unwrap();
    assert!(out.contains("full.qcow2 (full)"), "{out}");
    assert!(
        rounds >= 1 && flag.exists(),
        "the frontend wrote during the backup"
    );
    let now = read_disk(&mut qd, size);
    assert!(
        first_difference(&now, &before).is_some(),
        "the writes changed the disk"
    );
    let restored = dir.path().join("restored.raw");
    backup_py(&["--dir", p(&backups), "restore", p(&restored)], None);
    assert_same(
        &std::fs::read(&restored).unwrap(),
        &before,
        "the full backup is the disk before the writer started",
    );
    drop(d);
    fx.quit();
}

// ---------------------------------------------------------------------------------
// 9. Writable exports

/// QEMU's `x-debug-block-dirty-bitmap-sha256` of a bitmap of `bits` granules with the
/// granules `dirty` set: sha256 of its little-endian u64 words.
fn bitmap_sha256(bits: u64, dirty: &[u64]) -> String {
    let mut words = vec![0u64; bits.div_ceil(64) as usize];
    for &g in dirty {
        words[(g / 64) as usize] |= 1 << (g % 64);
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    hex(&Sha256::digest(&bytes))
}

/// qemu-io writes, write-zeroes and discards over a writable export: they land in the
/// image, are marked in the enabled bitmap, and a concurrent point-in-time export
/// keeps the old data; the read-only exports refuse writes.
#[test]
fn writable_export_writes_land_are_marked_and_preserved() {
    if !need(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 8 * MIB;
    qcow2_image(&img, size);
    qemu_io("qcow2", p(&img), &["write -P 0x11 0 8M".to_string()]);
    run(&mut cmd(
        "qemu-img",
        &["bitmap", "--add", "-g", "64K", p(&img), "b0"],
    ));
    let mut fx = Fixture::start(dir.path(), &img, &[]);
    let sock = dir.path().join("nbd.sock");
    fx.start_nbd(&sock);
    fx.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "snap", "node-name": "disk0", "name": "snap",
               "x-snapshot": true}),
    );
    fx.exec(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "node-name": "disk0", "name": "w",
               "writable": true}),
    );
    assert_eq!(fx.dump("b0"), vec![(0, size, false)]);
    let (w, snap) = (unix_uri(&sock, "w"), unix_uri(&sock, "snap"));
    let s = |x: &str| x.to_string();
    qemu_io(
        "raw",
        &w,
        &[
            s("write -P 0x5a 1M 64k"),
            s("write -P 0x5b 1600k 8k"),
            s("write -z 2M 128k"),
            s("discard 3M 64k"),
            s("flush"),
        ],
    );
    // 1M, 1600k (granule 25), 2M-2M+128k, 3M: granules 16, 25, 32, 33, 48.
    let dirty = [16u64, 25, 32, 33, 48];
    assert_eq!(
        fx.dump("b0"),
        dump_of(
            &[
                (MIB, G64K),
                (25 * G64K, G64K),
                (2 * MIB, 2 * G64K),
                (3 * MIB, G64K)
            ],
            size
        )
    );
    assert_eq!(
        fx.exec(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "disk0", "name": "b0"})
        ),
        json!({ "sha256": bitmap_sha256(size / G64K, &dirty) })
    );
    // The writable export and the frontend read the new data.
    qemu_io(
        "raw",
        &w,
        &[
            s("read -P 0x11 0 1M"),
            s("read -P 0x5a 1M 64k"),
            s("read -P 0x11 1088k 512k"),
            s("read -P 0x5b 1600k 8k"),
            s("read -P 0 2M 128k"),
            s("read -P 0 3M 64k"),
            s("read -P 0x11 3136k 5056k"),
        ],
    );
    let mut d = fx.driver();
    let mut want = vec![0x11u8; size as usize];
    want[MIB as usize..(MIB + G64K) as usize].fill(0x5a);
    want[(1600 * KIB) as usize..(1608 * KIB) as usize].fill(0x5b);
    want[(2 * MIB) as usize..(2 * MIB + 128 * KIB) as usize].fill(0);
    want[(3 * MIB) as usize..(3 * MIB + G64K) as usize].fill(0);
    assert_same(
        &read_disk(&mut d.queues[0], size),
        &want,
        "the frontend reads what NBD wrote",
    );
    // The point-in-time export still reads the old data everywhere.
    qemu_io_opts(&["-r", "-f", "raw"], &snap, &[s("read -P 0x11 0 8M")]);
    // The read-only export refuses writes (QEMU's client does not even try).
    let o = output(&mut cmd(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &snap],
    ));
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "write to the snapshot export: {o:?}"
    );
    let (mut raw, _) = RawClient::connect(&sock, "snap");
    assert_eq!(raw.write(0, &[0x99; 4096]), libc::EPERM as u32);
    assert_eq!(raw.read(0, 4096).unwrap(), vec![0x11; 4096]);
    drop(raw);
    fx.del_export("w");
    fx.del_export("snap");
    drop(d);
    fx.quit();
    qemu_io(
        "qcow2",
        p(&img),
        &[
            s("read -P 0x5a 1M 64k"),
            s("read -P 0 2M 128k"),
            s("read -P 0x11 4M 4M"),
        ],
    );
    let check = output(&mut cmd("qemu-img", &["check", p(&img)]));
    assert!(check.status.success(), "qemu-img check: {check:?}");
}

/// The command-line export: `--nbd-socket`, `--export-name`, `--export-bitmap` (busy,
/// still recording) and `--export-writable` (NBD writes marked in every enabled bitmap).
#[test]
fn command_line_export_with_bitmap_and_writable() {
    if !need(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let size = 8 * MIB;
    qcow2_image(&img, size);
    for b in ["b0", "b1"] {
        run(&mut cmd(
            "qemu-img",
            &["bitmap", "--add", "-g", "64K", p(&img), b],
        ));
    }
    let sock = dir.path().join("nbd.sock");
    let mut fx = Fixture::start(
        dir.path(),
        &img,
        &[
            "--nbd-socket",
            p(&sock),
            "--export-name",
            "vm",
            "--export-bitmap",
            "b0",
            "--export-writable",
        ],
    );
    assert_eq!(
        fx.exec("query-block-exports", json!({})),
        json!([{"type": "nbd", "id": "cli0", "node-name": "disk0", "shutting-down": false}])
    );
    let busy: Vec<(Value, Value)> = fx
        .bitmaps()
        .iter()
        .map(|b| (b["name"].clone(), b["busy"].clone()))
        .collect();
    assert_eq!(
        busy,
        [(json!("b0"), json!(true)), (json!("b1"), json!(false))]
    );
    let uri = unix_uri(&sock, "vm");
    qemu_io(
        "raw",
        &uri,
        &[
            "write -P 0x42 1M 64k".to_string(),
            "write -P 0x43 5000k 8k".to_string(),
        ],
    );
    let want = [(MIB, G64K), (78 * G64K, G64K)];
    assert_eq!(fx.dump("b1"), dump_of(&want, size));
    let map = nbdinfo_map(Some("qemu:dirty-bitmap:b0"), &uri);
    assert_eq!(with_flag(&map, 1), want, "{map:?}");
    let mut d = fx.driver();
    let got = guest_io(&mut d.queues[0], &[Io::Read(MIB, 4096)]);
    assert_eq!(got[0], vec![0x42; 4096]);
    drop(d);
    fx.quit();
    let check = output(&mut cmd("qemu-img", &["check", p(&img)]));
    assert!(check.status.success(), "qemu-img check: {check:?}");
    let info: Value = serde_json::from_str(&run(&mut cmd(
        "qemu-img",
        &["info", "--output=json", p(&img)],
    )))
    .unwrap();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"],
        json!([{"flags": ["auto"], "name": "b0", "granularity": 65536},
               {"flags": ["auto"], "name": "b1", "granularity": 65536}]),
        "{info}"
    );
    qemu_io(
        "qcow2",
        p(&img),
        &[
            "read -P 0x42 1M 64k".to_string(),
            "read -P 0x43 5000k 8k".to_string(),
        ],
    );
}
