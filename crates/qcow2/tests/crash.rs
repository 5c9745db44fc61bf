//! Crash consistency of the engine.
//!
//! * `kill_*`: a child process (this test binary re-executed, see [`crash_worker`]) runs
//!   the seeded workload on an image file and is killed with SIGKILL at random points.
//!   After each kill `qemu-img check` must find no corruption (leaks are allowed), our
//!   own check must agree, every write acknowledged by a completed flush must read back
//!   (through our engine and through QEMU), the image must reopen read-write, and after
//!   repairing the leaks `qemu-img check` must be fully clean.
//! * `power_loss_*`: the workload runs on a storage that remembers which writes were not
//!   yet synced; at random points a "crash image" keeps an arbitrary subset of them (whole
//!   writes or single 512-byte sectors). This proves the write order (refcounts before
//!   L2, L2 before L1, frees after), which a kill alone cannot, since the page cache
//!   keeps every completed write.
//! * `eio_*`: a storage that fails the Nth write or sync: the engine returns an error,
//!   never panics, and the bytes left behind are not corrupt.
//! * `*_concurrent`: the same workloads with many requests in flight: consecutive ops
//!   whose byte ranges do not overlap run at once on their own threads (so allocations,
//!   copy-on-write, discards and in-place rewrites of one cluster interleave), a flush
//!   runs alone after everything before it completed.

mod common;

use common::workload::*;
use qcow2::{BlockImage, CreateOptions, MemStorage, OpenOptions, Qcow2Image, Repair, Storage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set in the environment of the re-executed test binary:
/// `path;journal;seed;ops;size;cluster;concurrent(0|1)`.
const WORKER_ENV: &str = "QCOW2_CRASH_WORKER";

/// One image layout the crash tests run on.
#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    cluster: u64,
    refbits: u32,
    v3: bool,
    backing: bool,
    size: u64,
    ops: usize,
}

const C64K: Config = Config {
    name: "64k",
    cluster: 65536,
    refbits: 16,
    v3: true,
    backing: false,
    size: 8 << 20,
    ops: 160,
};
const C512: Config = Config {
    name: "512b-1bit",
    cluster: 512,
    refbits: 1,
    v3: true,
    backing: false,
    size: 4 << 20,
    ops: 160,
};
const CBACKING: Config = Config {
    name: "backing-4k",
    cluster: 4096,
    refbits: 16,
    v3: true,
    backing: true,
    size: 8 << 20,
    ops: 160,
};
const CV2: Config = Config {
    name: "v2-64k-backing",
    cluster: 65536,
    refbits: 16,
    v3: false,
    backing: true,
    size: 8 << 20,
    ops: 160,
};

/// Added to every seed: `QCOW2_CRASH_SEED=n` explores other runs (the default, 0, is
/// what CI runs).
fn seed_base() -> u64 {
    std::env::var("QCOW2_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn copy_model(m: &Model) -> Model {
    Model {
        data: m.data.clone(),
        backing: m.backing.clone(),
        cluster: m.cluster,
        v3: m.v3,
    }
}

/// Creates the image (and its raw backing file, named by absolute path so that images
/// opened from memory or from copies find it) and the model of its contents.
fn make_image(dir: &Path, cfg: &Config) -> (PathBuf, Model) {
    let p = dir.join("img.qcow2");
    let mut opts = CreateOptions {
        size: cfg.size,
        cluster_size: cfg.cluster,
        refcount_bits: cfg.refbits,
        version: if cfg.v3 { 3 } else { 2 },
        ..Default::default()
    };
    let mut base = None;
    if cfg.backing {
        let b = dir.join("base.raw");
        let data = pattern(0, cfg.size, 0x5a);
        std::fs::write(&b, &data).unwrap();
        base = Some(data);
        opts.backing = Some((b.to_str().unwrap().to_string(), Some("raw".into())));
    }
    qcow2::create(&p, &opts).unwrap();
    (p, Model::new(cfg.size, cfg.cluster, cfg.v3, base))
}

/// What must read back after a crash: the model after `ops[..=last_flush]`, except the
/// ranges of the ops that were started after that flush.
struct Expect {
    data: Vec<u8>,
    known: Vec<bool>,
}

fn expect(
    start: &Model,
    ops: &[Op],
    last_flush: Option<usize>,
    last_start: Option<usize>,
) -> Expect {
    let mut m = copy_model(start);
    let upto = last_flush.map_or(0, |f| f + 1);
    for op in &ops[..upto] {
        m.apply(op);
    }
    let mut known = vec![true; m.data.len()];
    if let Some(s) = last_start {
        for op in ops.iter().take(s + 1).skip(upto) {
            if let Some((o, l)) = op.range() {
                known[o as usize..(o + l) as usize].fill(false);
            }
        }
    }
    Expect {
        data: m.data,
        known,
    }
}

fn verify(what: &str, got: &[u8], e: &Expect) {
    assert_eq!(got.len(), e.data.len(), "{what}: disk size");
    if let Some(i) = (0..got.len()).find(|&i| e.known[i] && got[i] != e.data[i]) {
        panic!(
            "{what}: acknowledged data lost at guest byte {i:#x}: read {:#04x}, expected {:#04x}",
            got[i], e.data[i]
        );
    }
}

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

/// The checks every crashed image must pass. Returns the leaks QEMU saw.
fn check_crashed(what: &str, path: &Path, e: &Expect, qemu_read: bool) -> u64 {
    let (c, l, err, s) = common::qemu_check(path);
    assert_eq!((c, err), (0, 0), "{what}: qemu-img check: {s}");
    let ours = qcow2::check(path, Repair::None)
        .unwrap_or_else(|err| panic!("{what}: our check cannot open the image: {err}"));
    let inside = ours.leaks_in_file;
    assert!(
        ours.corruptions == 0 && inside == l && ours.leaks >= l,
        "{what}: our check disagrees with qemu-img ({s}): {} corruptions, {} leaks ({inside} \
         inside the file); first messages: {:?}",
        ours.corruptions,
        ours.leaks,
        &ours.messages[..ours.messages.len().min(5)]
    );
    {
        let img = Qcow2Image::open(path, &read_only())
            .unwrap_or_else(|err| panic!("{what}: read-only open failed: {err}"));
        verify(&format!("{what} (our engine)"), &read_all(&img), e);
    }
    if qemu_read {
        verify(&format!("{what} (qemu-img)"), &common::qemu_raw(path), e);
    }
    {
        let img = Qcow2Image::open(path, &OpenOptions::default())
            .unwrap_or_else(|err| panic!("{what}: read-write reopen failed: {err}"));
        img.flush().unwrap();
    }
    let rep = qcow2::check(path, Repair::Leaks).unwrap();
    assert_eq!(
        rep.corruptions, 0,
        "{what}: repair found corruption: {rep:?}"
    );
    let (c2, l2, e2, s2) = common::qemu_check(path);
    assert_eq!(
        (c2, l2, e2),
        (0, 0, 0),
        "{what}: not clean after repair: {s2}"
    );
    l
}

// ---- kill -9 -------------------------------------------------------------------------

/// Runs the workload named by [`WORKER_ENV`] and waits to be killed. Does nothing when
/// the variable is not set (a normal test run).
#[test]
fn crash_worker() {
    let Ok(cfg) = std::env::var(WORKER_ENV) else {
        return;
    };
    let f: Vec<&str> = cfg.split(';').collect();
    let (path, journal) = (Path::new(f[0]), Path::new(f[1]));
    let num = |i: usize| -> u64 { f[i].parse().unwrap() };
    let ops = generate(num(2), num(3) as usize, num(4), num(5));
    let concurrent = num(6) == 1;
    let img = Qcow2Image::open(path, &OpenOptions::default()).unwrap();
    let mut j = std::fs::OpenOptions::new()
        .append(true)
        .open(journal)
        .unwrap();
    for w in windows(&ops, if concurrent { WINDOW } else { 1 }) {
        for i in w.clone() {
            j.write_all(format!("S {i}\n").as_bytes()).unwrap();
        }
        run_window(&ops[w.clone()], |op| execute(&img, op));
        if matches!(ops[w.start], Op::Flush) {
            j.write_all(format!("F {}\n", w.start).as_bytes()).unwrap();
        }
    }
    j.write_all(b"DONE\n").unwrap();
    // Never close the image: the parent kills us.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// (last started op, last completed flush op, all done).
fn parse_journal(j: &str) -> (Option<usize>, Option<usize>, bool) {
    let (mut s, mut f, mut done) = (None, None, false);
    for line in j.lines() {
        match line.split_once(' ') {
            Some(("S", i)) => s = Some(i.parse().unwrap()),
            Some(("F", i)) => f = Some(i.parse().unwrap()),
            _ if line == "DONE" => done = true,
            _ => {}
        }
    }
    (s, f, done)
}

/// Most ops in flight at once in the concurrent variants.
const WINDOW: usize = 8;

/// Splits `ops` into runs of at most `max` consecutive ops whose byte ranges do not
/// overlap (so their outcome does not depend on their order); a flush stands alone.
fn windows(ops: &[Op], max: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let clash = match op.range() {
            None => true,
            Some((o, l)) => ranges.iter().any(|&(ro, rl)| o < ro + rl && ro < o + l),
        };
        if i > start && (clash || i - start == max || matches!(ops[start], Op::Flush)) {
            out.push(start..i);
            start = i;
            ranges.clear();
        }
        if let Some(r) = op.range() {
            ranges.push(r);
        }
    }
    if start < ops.len() {
        out.push(start..ops.len());
    }
    out
}

/// Runs the ops of one window: one alone on this thread, several on threads of their
/// own at the same time.
fn run_window(ops: &[Op], f: impl Fn(&Op) + Sync) {
    if ops.len() == 1 {
        return f(&ops[0]);
    }
    std::thread::scope(|s| {
        for op in ops {
            let f = &f;
            s.spawn(move || f(op));
        }
    });
}

#[test]
fn windows_hold_only_disjoint_ops_and_flushes_alone() {
    let ops = generate(7, 400, 8 << 20, 65536);
    let ws = windows(&ops, WINDOW);
    assert_eq!(ws.iter().map(|w| w.len()).sum::<usize>(), ops.len());
    assert!(ws.iter().any(|w| w.len() > 1), "some ops run concurrently");
    for w in ws {
        let win = &ops[w];
        assert!(win.len() <= WINDOW);
        if win.iter().any(|o| matches!(o, Op::Flush)) {
            assert_eq!(win.len(), 1);
        }
        for (a, x) in win.iter().enumerate() {
            for y in &win[a + 1..] {
                let ((xo, xl), (yo, yl)) = (x.range().unwrap(), y.range().unwrap());
                assert!(
                    xo + xl <= yo || yo + yl <= xo,
                    "overlapping ops in a window"
                );
            }
        }
    }
}

fn kill_run(cfg: &Config, kills: usize, seed0: u64) {
    kill_run_with(cfg, kills, seed0, false)
}

fn kill_run_with(cfg: &Config, kills: usize, seed0: u64, concurrent: bool) {
    if !common::require_tool("qemu-img") {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (path, mut model) = make_image(dir.path(), cfg);
    let journal = dir.path().join("journal");
    let stderr = dir.path().join("worker.stderr");
    let exe = std::env::current_exe().unwrap();
    let seed0 = seed0 + seed_base() * 7919;
    let mut rng = StdRng::seed_from_u64(seed0);
    let mut leaky = 0;
    for k in 0..kills {
        let seed = seed0 * 1000 + k as u64;
        let ops = generate(seed, cfg.ops, cfg.size, cfg.cluster);
        std::fs::write(&journal, b"").unwrap();
        // Kill once op `target` has started, plus a random delay.
        let target = rng.gen_range(0..cfg.ops);
        let delay = Duration::from_micros(rng.gen_range(0..4000));
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_worker", "--nocapture", "--test-threads=1"])
            .env(
                WORKER_ENV,
                format!(
                    "{};{};{seed};{};{};{};{}",
                    path.display(),
                    journal.display(),
                    cfg.ops,
                    cfg.size,
                    cfg.cluster,
                    u8::from(concurrent)
                ),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "{} kill {k}: worker exited by itself ({st}): {}",
                    cfg.name,
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            let (s, _, done) = parse_journal(&std::fs::read_to_string(&journal).unwrap());
            if done || s.is_some_and(|s| s >= target) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} kill {k}: worker made no progress", cfg.name);
            }
            std::thread::sleep(Duration::from_micros(300));
        }
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        let (s, f, _) = parse_journal(&std::fs::read_to_string(&journal).unwrap());
        let what = format!(
            "{} kill {k} (seed {seed}, last started op {s:?}, last flush {f:?})",
            cfg.name
        );
        let e = expect(&model, &ops, f, s);
        if check_crashed(&what, &path, &e, true) > 0 {
            leaky += 1;
        }
        // The next round starts from what the disk holds now.
        let img = Qcow2Image::open(&path, &read_only()).unwrap();
        model.data = read_all(&img);
    }
    eprintln!(
        "{}: {kills} kills, {leaky} left leaks, {:.1} s",
        cfg.name,
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn kill_64k_clusters_concurrent() {
    kill_run_with(&C64K, 14, 11, true);
}

#[test]
fn kill_512b_clusters_1bit_refcounts_concurrent() {
    kill_run_with(&C512, 10, 12, true);
}

#[test]
fn kill_64k_clusters() {
    kill_run(&C64K, 14, 1);
}

#[test]
fn kill_512b_clusters_1bit_refcounts() {
    kill_run(&C512, 16, 2);
}

#[test]
fn kill_over_backing_file() {
    kill_run(&CBACKING, 12, 3);
}

#[test]
fn kill_v2() {
    kill_run(&CV2, 12, 4);
}

// ---- power loss ----------------------------------------------------------------------

#[derive(Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

fn apply_pending(buf: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(off, data) => {
            let end = *off as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*off as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(l) => buf.resize(*l as usize, 0),
    }
}

/// Storage state: what a power loss cannot take away (`durable`), what the engine sees
/// (`current`), and the writes in between.
#[derive(Debug)]
struct PlState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
    calls: u64,
    crash_at: BTreeSet<u64>,
    rng: StdRng,
}

type Probe = Box<dyn Fn(Vec<u8>, u64) + Send + Sync>;

/// A storage that can produce the image a power loss would leave behind.
struct PowerLossStorage {
    state: Mutex<PlState>,
    probe: Probe,
}

impl std::fmt::Debug for PowerLossStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PowerLossStorage")
    }
}

impl PowerLossStorage {
    fn new(bytes: Vec<u8>, crash_at: BTreeSet<u64>, seed: u64, probe: Probe) -> Self {
        PowerLossStorage {
            state: Mutex::new(PlState {
                durable: bytes.clone(),
                current: bytes,
                pending: Vec::new(),
                calls: 0,
                crash_at,
                rng: StdRng::seed_from_u64(seed),
            }),
            probe,
        }
    }

    /// Counts a storage call; at a chosen call, builds a crash image and probes it.
    fn tick(&self, st: &mut PlState) {
        st.calls += 1;
        if !st.crash_at.contains(&st.calls) {
            return;
        }
        let mut img = st.durable.clone();
        let mode = st.rng.gen_range(0..4);
        for p in &st.pending {
            match (mode, p) {
                (0, _) => {}                          // nothing unsynced survived
                (1, _) => apply_pending(&mut img, p), // everything survived
                (2, _) | (_, Pending::SetLen(_)) => {
                    if st.rng.gen_bool(0.5) {
                        apply_pending(&mut img, p);
                    }
                }
                (_, Pending::Write(off, data)) => {
                    // Torn writes: each 512-byte sector independently.
                    let mut pos = *off;
                    let end = off + data.len() as u64;
                    while pos < end {
                        let next = ((pos / 512 + 1) * 512).min(end);
                        if st.rng.gen_bool(0.5) {
                            let piece = data[(pos - off) as usize..(next - off) as usize].to_vec();
                            apply_pending(&mut img, &Pending::Write(pos, piece));
                        }
                        pos = next;
                    }
                }
            }
        }
        (self.probe)(img, st.calls);
    }
}

impl Storage for PowerLossStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.state.lock().unwrap();
        let start = (offset as usize).min(st.current.len());
        let end = (offset as usize + buf.len()).min(st.current.len());
        buf[..end - start].copy_from_slice(&st.current[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.tick(&mut st);
        let p = Pending::Write(offset, buf.to_vec());
        apply_pending(&mut st.current, &p);
        st.pending.push(p);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.tick(&mut st);
        let p = Pending::SetLen(len);
        apply_pending(&mut st.current, &p);
        st.pending.push(p);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.tick(&mut st);
        let pending = std::mem::take(&mut st.pending);
        for p in &pending {
            apply_pending(&mut st.durable, p);
        }
        Ok(())
    }
}

/// Which op the workload is in and which flush completed last (-1: none).
#[derive(Debug)]
struct Progress {
    started: AtomicI64,
    flushed: AtomicI64,
}

fn opt(v: &AtomicI64) -> Option<usize> {
    usize::try_from(v.load(Ordering::SeqCst)).ok()
}

/// Runs `ops` on `storage` (windows of up to `window` at once), telling `progress`
/// where it is; returns the first error.
fn drive(
    storage: Arc<dyn Storage>,
    ops: &[Op],
    progress: &Progress,
    window: usize,
) -> qcow2::Result<()> {
    let img = Qcow2Image::open_storage(storage, &OpenOptions::default())?;
    for w in windows(ops, window) {
        progress.started.store(w.end as i64 - 1, Ordering::SeqCst);
        let first_err = Mutex::new(None);
        run_window(&ops[w.clone()], |op| {
            if let Err(e) = try_execute(&img, op) {
                first_err.lock().unwrap().get_or_insert(e);
            }
        });
        if let Some(e) = first_err.into_inner().unwrap() {
            return Err(e);
        }
        if matches!(ops[w.start], Op::Flush) {
            progress.flushed.store(w.start as i64, Ordering::SeqCst);
        }
    }
    img.flush()
}

fn try_execute(img: &dyn BlockImage, op: &Op) -> qcow2::Result<()> {
    match *op {
        Op::Write { off, len, fill } => img.write_at(&pattern(off, len, fill), off),
        Op::Zero { off, len, unmap } => img.write_zeroes(off, len, unmap),
        Op::Discard { off, len } => img.discard(off, len),
        Op::Flush => img.flush(),
    }
}

fn initial_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn power_loss_run(cfg: &Config, seed: u64, points: usize) {
    power_loss_run_with(cfg, seed, points, 1)
}

fn power_loss_run_with(cfg: &Config, seed: u64, points: usize, window: usize) {
    if !common::require_tool("qemu-img") {
        return;
    }
    let t0 = Instant::now();
    let seed = seed + seed_base() * 7919;
    let dir = tempfile::tempdir().unwrap();
    let (path, model) = make_image(dir.path(), cfg);
    let bytes = initial_bytes(&path);
    let ops = Arc::new(generate(seed, cfg.ops, cfg.size, cfg.cluster));

    // Pass 1: count the storage calls of the run.
    let counter = Arc::new(PowerLossStorage::new(
        bytes.clone(),
        BTreeSet::new(),
        seed,
        Box::new(|_, _| {}),
    ));
    let p0 = Progress {
        started: AtomicI64::new(-1),
        flushed: AtomicI64::new(-1),
    };
    drive(counter.clone(), &ops, &p0, window).unwrap();
    let calls = counter.state.lock().unwrap().calls;
    // With ops in flight at once the number of storage calls varies a little from run
    // to run: crash points stay in the part every run reaches.
    let calls = if window > 1 { calls * 9 / 10 } else { calls };

    // Pass 2: crash at `points` random calls.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let crash_at: BTreeSet<u64> = (0..points).map(|_| rng.gen_range(1..=calls)).collect();
    let progress = Arc::new(Progress {
        started: AtomicI64::new(-1),
        flushed: AtomicI64::new(-1),
    });
    let probed = Arc::new(AtomicU64::new(0));
    let crash_path = dir.path().join("crash.qcow2");
    let probe: Probe = {
        let (progress, ops, probed, name) =
            (progress.clone(), ops.clone(), probed.clone(), cfg.name);
        Box::new(move |img: Vec<u8>, call: u64| {
            let (s, f) = (opt(&progress.started), opt(&progress.flushed));
            let what = format!(
                "{name} power loss at storage call {call} (seed {seed}, op {s:?}, last flush {f:?})"
            );
            std::fs::write(&crash_path, &img).unwrap();
            let e = expect(&model, &ops, f, s);
            let n = probed.fetch_add(1, Ordering::SeqCst);
            check_crashed(&what, &crash_path, &e, n % 4 == 0);
        })
    };
    let storage = Arc::new(PowerLossStorage::new(bytes, crash_at.clone(), seed, probe));
    drive(storage, &ops, &progress, window).unwrap();
    assert_eq!(probed.load(Ordering::SeqCst), crash_at.len() as u64);
    eprintln!(
        "{}: {} power-loss images out of {calls} storage calls, {:.1} s",
        cfg.name,
        crash_at.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn power_loss_64k_clusters_concurrent() {
    power_loss_run_with(&C64K, 111, 50, WINDOW);
}

#[test]
fn power_loss_512b_clusters_1bit_refcounts_concurrent() {
    power_loss_run_with(&C512, 112, 60, WINDOW);
}

#[test]
fn power_loss_over_backing_file_concurrent() {
    power_loss_run_with(&CBACKING, 113, 40, WINDOW);
}

#[test]
fn power_loss_64k_clusters() {
    power_loss_run(&C64K, 101, 50);
}

#[test]
fn power_loss_512b_clusters_1bit_refcounts() {
    power_loss_run(&C512, 102, 80);
}

#[test]
fn power_loss_over_backing_file() {
    power_loss_run(&CBACKING, 103, 40);
}

#[test]
fn power_loss_v2() {
    power_loss_run(&CV2, 104, 40);
}

// ---- I/O errors ----------------------------------------------------------------------

/// Fails the Nth write/sync/set_len with EIO — only that one (`sticky` false: a
/// transient error) or every one from then on (a dead disk). With `only_len`, only
/// writes of exactly that many bytes count (8: refcount table entries).
#[derive(Debug)]
struct FailStorage {
    inner: MemStorage,
    calls: AtomicU64,
    fail_at: u64,
    sticky: bool,
    only_len: Option<usize>,
    failed: AtomicBool,
}

impl FailStorage {
    fn new(bytes: &[u8], fail_at: u64, sticky: bool, only_len: Option<usize>) -> Self {
        let inner = MemStorage::new();
        inner.write_at(bytes, 0).unwrap();
        FailStorage {
            inner,
            calls: AtomicU64::new(0),
            fail_at,
            sticky,
            only_len,
            failed: AtomicBool::new(false),
        }
    }

    fn tick(&self, len: Option<usize>) -> io::Result<()> {
        if self.only_len.is_some() && self.only_len != len {
            return Ok(());
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at || (self.sticky && n > self.fail_at) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Storage for FailStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.tick(Some(buf.len()))?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.tick(None)?;
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.tick(None)
    }
}

/// Runs the workload over a storage failing at call `fail_at`; returns the bytes left.
fn eio_case(
    cfg: &Config,
    path: &Path,
    model: &Model,
    ops: &[Op],
    (fail_at, sticky, only_len): (u64, bool, Option<usize>),
) {
    let what = format!(
        "{} EIO at call {fail_at} ({})",
        cfg.name,
        if sticky { "sticky" } else { "transient" }
    );
    let bytes = initial_bytes(path);
    let storage = Arc::new(FailStorage::new(&bytes, fail_at, sticky, only_len));
    // Per op: did it succeed.
    let mut results = Vec::new();
    let mut last_flush = None;
    let mut final_flush_ok = false;
    {
        let img = Qcow2Image::open_storage(storage.clone(), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
        for (i, op) in ops.iter().enumerate() {
            let r = try_execute(&img, op);
            if let Err(e) = &r {
                assert!(
                    storage.failed.load(Ordering::SeqCst),
                    "{what}: op {i} failed without an I/O error: {e}"
                );
            }
            results.push(r.is_ok());
            if r.is_ok() && matches!(op, Op::Flush) {
                last_flush = Some(i);
            }
            if r.is_err() && sticky {
                break;
            }
        }
        if !sticky || results.iter().all(|ok| *ok) {
            final_flush_ok = img.flush().is_ok();
            if final_flush_ok {
                last_flush = Some(ops.len() - 1);
            }
        }
        // Dropping the image flushes again (a failure is only logged).
    }
    let left = storage.inner.snapshot();
    let crash = path.with_file_name("eio.qcow2");
    std::fs::write(&crash, &left).unwrap();
    let e = if sticky {
        // The disk stopped at the failure: like a crash there.
        let first_err = results.iter().position(|ok| !ok);
        let last_flush = if final_flush_ok {
            Some(ops.len() - 1)
        } else {
            last_flush.filter(|f| first_err.is_none_or(|e| *f < e))
        };
        expect(model, ops, last_flush, first_err.or(Some(ops.len() - 1)))
    } else {
        // Every op that succeeded up to the last successful flush is durable; failed
        // ops and those after that flush may or may not be.
        let mut m = copy_model(model);
        let mut known = vec![true; m.data.len()];
        for (i, (op, ok)) in ops.iter().zip(&results).enumerate() {
            m.apply(op);
            let durable = *ok && last_flush.is_some_and(|f| i <= f);
            match (durable, op) {
                (true, Op::Write { off, len, .. } | Op::Zero { off, len, .. }) => {
                    known[*off as usize..(off + len) as usize].fill(true)
                }
                (true, _) => {}
                (false, _) => {
                    if let Some((o, l)) = op.range() {
                        known[o as usize..(o + l) as usize].fill(false);
                    }
                }
            }
        }
        Expect {
            data: m.data,
            known,
        }
    };
    check_crashed(&what, &crash, &e, false);
}

fn eio_run(cfg: &Config, seed: u64, points: usize, only_len: Option<usize>) {
    if !common::require_tool("qemu-img") {
        return;
    }
    let t0 = Instant::now();
    let seed = seed + seed_base() * 7919;
    let dir = tempfile::tempdir().unwrap();
    let (path, model) = make_image(dir.path(), cfg);
    let ops = generate(seed, cfg.ops, cfg.size, cfg.cluster);
    let counter = Arc::new(FailStorage::new(&initial_bytes(&path), 0, false, only_len));
    {
        let img = Qcow2Image::open_storage(counter.clone(), &OpenOptions::default()).unwrap();
        for op in &ops {
            try_execute(&img, op).unwrap();
        }
    }
    let calls = counter.calls.load(Ordering::SeqCst);
    let mut rng = StdRng::seed_from_u64(seed);
    for k in 0..points {
        let fail_at = if only_len.is_some() {
            // Every counted write in turn, each both transient and sticky.
            (k / 2) as u64 % calls + 1
        } else {
            rng.gen_range(1..=calls)
        };
        eio_case(cfg, &path, &model, &ops, (fail_at, k % 2 == 0, only_len));
    }
    eprintln!(
        "{}: {points} EIO cases out of {calls} storage calls, {:.1} s",
        cfg.name,
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn eio_64k_clusters() {
    eio_run(&Config { ops: 80, ..C64K }, 201, 40, None);
}

#[test]
fn eio_512b_clusters_1bit_refcounts() {
    eio_run(&Config { ops: 80, ..C512 }, 202, 40, None);
}

/// `check` walks the clusters of the file and the refcount blocks that exist, not every
/// cluster the refcount table could describe (2^28 for one 64 KiB table cluster: it
/// used to take seconds on an empty image, which made every crash check slow).
#[test]
fn check_cost_follows_the_file_not_the_refcount_table() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_image(dir.path(), &C64K);
    let t = Instant::now();
    for _ in 0..3 {
        let r = qcow2::check(&path, Repair::None).unwrap();
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.allocated_clusters, 4, "{r:?}");
    }
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1500), "3 checks took {took:?}");
}

/// The 8-byte writes are refcount table entries (new refcount blocks being hooked in):
/// an error there must leave the entry pending, not forgotten, or the L2 tables written
/// later reference clusters whose refcounts live in a block the file's table does not
/// know (thousands of corruptions).
#[test]
fn eio_on_refcount_table_entry_writes() {
    // 64-bit refcounts: a refcount block covers only 64 clusters, so new blocks (and
    // table entries) are needed all the time.
    let cfg = Config {
        name: "512b-64bit",
        refbits: 64,
        ops: 80,
        ..C512
    };
    eio_run(&cfg, 203, 24, Some(8));
}
