//! Crash consistency of the bitmaps' shadow (`qcow2_bitmaps::shadow`) on real qcow2
//! images, through the engine (`Qcow2Image`).
//!
//! The workload is what the daemon does for every guest write: `mark` → `cover` (the
//! granules are durable in the shadow) → the data write; now and then a flush, a store
//! followed by `mark_in_use_again` (a frontend reconnecting), and sometimes a clean
//! store at the end. Several threads write at once into disjoint byte ranges that share
//! shadow granules, L2 tables and refcount blocks. Every step is recorded in a history
//! (events in the order they happened) *before* it is taken: a write is "submitted"
//! once its `cover` returned and before its data write is issued.
//!
//! After every crash the image must pass [`check_image`]:
//! * `qemu-img check` finds no corruption (leaks are allowed: a shadow region the crash
//!   left allocated, clusters of an unfinished store);
//! * our engine reopens it read-write and `Bitmaps::open_with(.., crash_consistent)`
//!   loads b0 consistent (recovered from the shadow, or clean) — never inconsistent, and
//!   lost (the bitmaps autoclear bit clear) only while an in-place IN_USE update was in
//!   progress (the documented QEMU order of `open_with` / `mark_in_use_again`);
//! * b0 ⊇ the bits it had when stored ∪ every granule of every submitted write;
//! * b0 ⊆ those bits ∪ the shadow granules (1 MiB) of every write that was marked (the
//!   recovery adds nothing else);
//! * every byte acknowledged by a completed flush (and not overwritten by a later
//!   submitted write) reads back.
//!
//! Tests:
//! * `power_loss_recovers_a_superset`: the storage keeps unsynced writes pending; at
//!   random storage calls (every write, set_len and sync is a candidate) a crash image
//!   keeps a subset of them ([`MODES`]: nothing, everything, whole writes at random,
//!   512-byte sectors at random, everything but the shadow region, everything but the
//!   header beyond its first sector). 4 seeds, 200+ crash images.
//! * `kill9_recovers_a_superset`: the workload runs in a child process (this binary
//!   re-executed, see [`shadow_crash_worker`]) on a real file; its journal goes through a
//!   pipe, each entry written before the step it names; 32 SIGKILLs (the first right
//!   after the open, the others at random points); each child goes on with the image
//!   the previous kill (and check) left.
//! * `harness_catches_a_write_without_cover`, `harness_catches_a_shadow_that_is_not_synced`:
//!   the power-loss run with a broken workload (some writes skip `cover()`) or a broken
//!   storage (the syncer's fdatasyncs make nothing durable) must report missing granules.
//! * `a_crash_before_the_file_grows_past_the_shadow_region_recovers`,
//!   `a_shadow_rejected_on_open_does_not_come_back_stale`,
//!   `a_torn_header_write_in_a_store_keeps_b0_recoverable`: reproductions of the bugs the
//!   harness found (see their docs).
//!
//! `SHADOW_CRASH_SEED=n` explores other seeds (0, the default, is what CI runs).

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qcow2::{BlockImage, CreateOptions, OpenOptions as ImageOptions, Qcow2Image, Storage};
use qcow2_bitmaps::shadow::{DEFAULT_GRANULARITY, EXT_SHADOW};
use qcow2_bitmaps::{AddOptions, Bitmaps, OpenOptions, KNOWN_AUTOCLEAR};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * KIB;
const DISK: u64 = 64 * MIB;
/// Granularity of b0.
const GRAN: u64 = 64 * KIB;
const NBITS: usize = (DISK / GRAN) as usize;
/// Granularity of the shadow for this disk (1 MiB).
const SHADOW_GRAN: u64 = DEFAULT_GRANULARITY;
/// Threads own stripes round robin: their writes never overlap, but they share shadow
/// granules (1 MiB), L2 tables and refcount blocks. 192 KiB stripes: some straddle a
/// shadow granule boundary.
const STRIPE: u64 = 192 * KIB;
const BITMAP: &str = "b0";
/// Bits b0 has when the test stores it first (byte ranges).
const INITIAL_BITS: [(u64, u64); 3] = [(0, 4096), (5 * MIB + 3, 200 * KIB), (63 * MIB, MIB)];

/// Name of the syncer thread (the storage of the broken variant recognizes it).
const SYNCER: &str = "shadow-syncer";

/// Environment of the re-executed worker: `path;seed;threads;round`.
const WORKER_ENV: &str = "QCOW2_BITMAPS_SHADOW_CRASH_WORKER";

fn seed_base() -> u64 {
    std::env::var("SHADOW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---- tools ---------------------------------------------------------------------------

/// Whether qemu-img is installed; fails under CI=true if not, else skips with a note.
fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("required tool qemu-img is missing (apt-get install qemu-utils)");
        }
        eprintln!("note: qemu-img not found; skipping the shadow crash test");
    }
    ok
}

/// `qemu-img check --output=json`: (corruptions, leaks, check-errors, the output).
fn qemu_check(path: &Path) -> (u64, u64, u64, String) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_else(|_| {
        panic!(
            "qemu-img check gave no JSON: {s} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let g = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (g("corruptions"), g("leaks"), g("check-errors"), s)
}

fn image_options() -> ImageOptions {
    ImageOptions {
        known_autoclear: KNOWN_AUTOCLEAR,
        ..ImageOptions::default()
    }
}

fn crash_consistent() -> OpenOptions {
    OpenOptions {
        crash_consistent: true,
        ..OpenOptions::default()
    }
}

// ---- the image -----------------------------------------------------------------------

/// How the image is created: by QEMU (a header with a feature name table, over 512
/// bytes once the bitmap and shadow extensions are added) or by our engine.
#[derive(Clone, Copy, Debug)]
enum Creator {
    QemuImg,
    Engine,
}

/// Creates the image with b0 stored (64 KiB granularity, [`INITIAL_BITS`] set);
/// returns its path and b0's bits.
fn make_image(dir: &Path, creator: Creator) -> (PathBuf, Vec<bool>) {
    let p = dir.join("img.qcow2");
    match creator {
        Creator::QemuImg => {
            let o = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o"])
                .arg(format!("cluster_size={CLUSTER}"))
                .arg(&p)
                .arg(DISK.to_string())
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        Creator::Engine => qcow2::create(
            &p,
            &CreateOptions {
                size: DISK,
                cluster_size: CLUSTER,
                ..CreateOptions::default()
            },
        )
        .unwrap(),
    }
    let mut bits = vec![false; NBITS];
    {
        let img = Qcow2Image::open(&p, &image_options()).unwrap();
        let set = Bitmaps::open(&img, "disk0").unwrap();
        set.add(
            &img,
            BITMAP,
            AddOptions {
                granularity: Some(GRAN),
                ..AddOptions::default()
            },
        )
        .unwrap();
        for (o, l) in INITIAL_BITS {
            set.mark(o, l);
            for g in granules(o, l, GRAN) {
                bits[g as usize] = true;
            }
        }
        set.store(&img).unwrap();
    }
    (p, bits)
}

/// Granule indexes of a byte range.
fn granules(off: u64, len: u64, gran: u64) -> std::ops::RangeInclusive<u64> {
    off / gran..=(off + len - 1) / gran
}

/// The byte write `id` puts at guest offset `off`.
fn pattern_byte(id: u32, off: u64) -> u8 {
    let mut z = (u64::from(id) << 40) ^ (off / 8);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> ((off % 8) * 8)) as u8
}

fn pattern(id: u32, off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(|o| pattern_byte(id, o)).collect()
}

// ---- the workload --------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct W {
    id: u32,
    off: u64,
    len: u64,
    /// The broken workload: submit the data write without waiting for the shadow.
    skip_cover: bool,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(W),
    Flush,
}

#[derive(Debug)]
struct Round {
    /// One op list per thread.
    ops: Vec<Vec<Op>>,
    /// After the round (writes quiesced): store, then `mark_in_use_again`.
    store_after: bool,
}

#[derive(Debug)]
struct Plan {
    threads: usize,
    rounds: Vec<Round>,
    /// Store cleanly at the end (else the run ends with b0 in use).
    final_store: bool,
}

impl Plan {
    fn writes(&self) -> impl Iterator<Item = &W> {
        self.rounds
            .iter()
            .flat_map(|r| r.ops.iter().flatten())
            .filter_map(|op| match op {
                Op::Write(w) => Some(w),
                Op::Flush => None,
            })
    }

    fn write(&self, id: u32) -> W {
        *self.writes().find(|w| w.id == id).unwrap()
    }
}

/// A seeded plan: `rounds` rounds of `per_thread` ops on each of `threads` threads.
fn plan(seed: u64, threads: usize, rounds: usize, per_thread: usize, broken: bool) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let stripes = DISK.div_ceil(STRIPE);
    let mut id = 0u32;
    let mut out = Vec::new();
    for _ in 0..rounds {
        let mut ops = vec![Vec::new(); threads];
        for (t, list) in ops.iter_mut().enumerate() {
            for _ in 0..per_thread {
                if rng.gen_bool(0.12) {
                    list.push(Op::Flush);
                    continue;
                }
                // A stripe of this thread; a quarter of the writes go to the first
                // 8 MiB, so granules are rewritten as well as touched first.
                let span = if rng.gen_bool(0.25) {
                    8 * MIB / STRIPE
                } else {
                    stripes
                };
                let (t, n) = (t as u64, threads as u64);
                let k = rng.gen_range(0..(span.min(stripes) - t).div_ceil(n));
                let s = t + k * n;
                let start = s * STRIPE;
                let end = (start + STRIPE).min(DISK);
                let off = start + 512 * rng.gen_range(0..(end - start) / 512);
                let len = (512 * rng.gen_range(1..=256u64)).min(end - off);
                list.push(Op::Write(W {
                    id,
                    off,
                    len,
                    skip_cover: broken && rng.gen_bool(0.5),
                }));
                id += 1;
            }
        }
        out.push(Round {
            ops,
            store_after: rng.gen_bool(0.4),
        });
    }
    Plan {
        threads,
        rounds: out,
        final_store: rng.gen_bool(0.5),
    }
}

/// One step of the workload, recorded before it is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    /// `mark` is about to be called for write `id`.
    Mark(u32),
    /// `cover` returned: the data write of `id` is about to be issued.
    Submit(u32),
    /// The data write of `id` returned.
    Done(u32),
    /// Thread `t` is about to flush / its flush returned.
    FlushStart(u32),
    FlushDone(u32),
    /// An in-place IN_USE update (`open_with`, `mark_in_use_again`) is about to start
    /// (`true`) / returned (`false`).
    InPlace(bool),
    /// `open_with` returned.
    Opened,
    /// The workload is over.
    AllDone,
}

impl Ev {
    fn to_line(self) -> String {
        match self {
            Ev::Mark(i) => format!("M {i}"),
            Ev::Submit(i) => format!("S {i}"),
            Ev::Done(i) => format!("D {i}"),
            Ev::FlushStart(t) => format!("FS {t}"),
            Ev::FlushDone(t) => format!("FD {t}"),
            Ev::InPlace(b) => format!("IP {}", u8::from(b)),
            Ev::Opened => "OPENED 0".into(),
            Ev::AllDone => "ALLDONE 0".into(),
        }
    }

    fn parse(line: &str) -> Option<Ev> {
        let (k, v) = line.split_once(' ')?;
        let n: u32 = v.trim().parse().ok()?;
        Some(match k {
            "M" => Ev::Mark(n),
            "S" => Ev::Submit(n),
            "D" => Ev::Done(n),
            "FS" => Ev::FlushStart(n),
            "FD" => Ev::FlushDone(n),
            "IP" => Ev::InPlace(n == 1),
            "OPENED" => Ev::Opened,
            "ALLDONE" => Ev::AllDone,
            _ => return None,
        })
    }
}

type Recorder<'a> = &'a (dyn Fn(Ev) + Sync);

/// Runs `plan` on `img` as the daemon would, recording every step with `rec` first.
fn run_plan(img: &Arc<Qcow2Image>, plan: &Plan, rec: Recorder) {
    rec(Ev::InPlace(true));
    let set = Arc::new(Bitmaps::open_with(&**img, "disk0", crash_consistent()).unwrap());
    rec(Ev::InPlace(false));
    rec(Ev::Opened);
    // Not asserted armed: whatever the open did, the checks of the crashed image judge.
    let shadow = set.shadow().expect("a writable set has a shadow").clone();
    let syncer = {
        let (shadow, img) = (shadow.clone(), img.clone());
        std::thread::Builder::new()
            .name(SYNCER.into())
            .spawn(move || shadow.run_syncer(&*img))
            .unwrap()
    };
    for round in &plan.rounds {
        std::thread::scope(|s| {
            for (t, ops) in round.ops.iter().enumerate() {
                let (set, shadow) = (&set, &shadow);
                s.spawn(move || {
                    for op in ops {
                        match *op {
                            Op::Write(w) => {
                                rec(Ev::Mark(w.id));
                                set.mark(w.off, w.len);
                                if !w.skip_cover {
                                    shadow.cover(w.off, w.len).unwrap();
                                }
                                rec(Ev::Submit(w.id));
                                img.write_at(&pattern(w.id, w.off, w.len), w.off).unwrap();
                                rec(Ev::Done(w.id));
                            }
                            Op::Flush => {
                                rec(Ev::FlushStart(t as u32));
                                BlockImage::flush(&**img).unwrap();
                                rec(Ev::FlushDone(t as u32));
                            }
                        }
                    }
                });
            }
        });
        if round.store_after {
            set.store(&**img).unwrap();
            rec(Ev::InPlace(true));
            set.mark_in_use_again(&**img).unwrap();
            rec(Ev::InPlace(false));
        }
    }
    if plan.final_store {
        set.store(&**img).unwrap();
    }
    shadow.shutdown();
    syncer.join().unwrap();
    rec(Ev::AllDone);
}

// ---- what a crash must leave ---------------------------------------------------------

/// What the image must hold after a crash that happened after `history`.
#[derive(Debug)]
struct Expect {
    /// b0 granules that must be set.
    must: Vec<bool>,
    /// Why each granule must be set beyond the baseline (a write id), for reports.
    why: Vec<Option<u32>>,
    /// b0 granules that may be set.
    may: Vec<bool>,
    /// Losing b0 is allowed (an in-place IN_USE update was in progress).
    lost_ok: bool,
    /// (write id, offset, length) that must read back: acknowledged by a completed
    /// flush and not overwritten by a write submitted later.
    acked: Vec<(u32, u64, u64)>,
    submitted: usize,
}

fn expect(history: &[Ev], plan: &Plan, baseline: &[bool]) -> Expect {
    let mut must = baseline.to_vec();
    let mut may = baseline.to_vec();
    let mut why = vec![None; NBITS];
    let mut lost_ok = false;
    let mut submit_pos = std::collections::BTreeMap::new();
    let mut done_pos = std::collections::BTreeMap::new();
    let mut flush_start = std::collections::BTreeMap::new();
    // Writes acknowledged: done before the start of a flush that completed.
    let mut acked_ids = BTreeSet::new();
    for (pos, ev) in history.iter().enumerate() {
        match *ev {
            Ev::Mark(id) => {
                let w = plan.write(id);
                for sg in granules(w.off, w.len, SHADOW_GRAN) {
                    let per = (SHADOW_GRAN / GRAN) as usize;
                    let first = sg as usize * per;
                    may[first..(first + per).min(NBITS)].fill(true);
                }
            }
            Ev::Submit(id) => {
                let w = plan.write(id);
                for g in granules(w.off, w.len, GRAN) {
                    if !must[g as usize] {
                        must[g as usize] = true;
                        why[g as usize] = Some(id);
                    }
                }
                submit_pos.insert(id, pos);
            }
            Ev::Done(id) => {
                done_pos.insert(id, pos);
            }
            Ev::FlushStart(t) => {
                flush_start.insert(t, pos);
            }
            Ev::FlushDone(t) => {
                let start = flush_start[&t];
                acked_ids.extend(done_pos.iter().filter(|(_, &p)| p < start).map(|(&i, _)| i));
            }
            Ev::InPlace(b) => lost_ok = b,
            Ev::Opened | Ev::AllDone => {}
        }
    }
    // Each acknowledged write, minus what later submitted writes may have overwritten.
    let mut acked = Vec::new();
    for &id in &acked_ids {
        let w = plan.write(id);
        let mut pieces = vec![(w.off, w.off + w.len)];
        for (&other, &p) in &submit_pos {
            if p <= submit_pos[&id] {
                continue;
            }
            let o = plan.write(other);
            let (os, oe) = (o.off, o.off + o.len);
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if oe <= s || e <= os {
                        vec![(s, e)]
                    } else {
                        [(s, os.max(s)), (oe.min(e), e)]
                            .into_iter()
                            .filter(|(a, b)| a < b)
                            .collect()
                    }
                })
                .collect();
        }
        acked.extend(pieces.into_iter().map(|(s, e)| (id, s, e - s)));
    }
    Expect {
        must,
        why,
        may,
        lost_ok,
        acked,
        submitted: submit_pos.len(),
    }
}

/// How b0 came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Left in use and recovered from the shadow.
    Recovered,
    /// Not in use on disk: the stored bits.
    Clean,
    /// Lost in an in-place IN_USE update (allowed there).
    Lost,
}

/// A violated property.
#[derive(Debug)]
enum Failure {
    Corrupt(String),
    Open(String),
    Lost,
    /// With what the file says about the shadow.
    Inconsistent(String),
    /// Granules of submitted writes (or of the baseline) missing from b0.
    Missing(Vec<(u64, Option<u32>)>),
    /// Bits set that nothing explains.
    Spurious(Vec<u64>),
    /// Acknowledged data that did not read back.
    Data(String),
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Failure::Corrupt(_) => "corrupt",
            Failure::Open(_) => "open failed",
            Failure::Lost => "b0 lost",
            Failure::Inconsistent(_) => "b0 inconsistent",
            Failure::Missing(_) => "granule missing",
            Failure::Spurious(_) => "spurious bits",
            Failure::Data(_) => "data lost",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Corrupt(s) | Failure::Open(s) | Failure::Data(s) => {
                write!(f, "{}: {s}", self.kind())
            }
            Failure::Lost => {
                f.write_str("b0 is gone (bitmaps autoclear bit clear) outside an IN_USE update")
            }
            Failure::Inconsistent(s) => {
                write!(f, "b0 is inconsistent: left in use and not recovered ({s})")
            }
            Failure::Missing(v) => write!(
                f,
                "b0 lacks {} granule(s) (64 KiB) that must be set: (granule, write id or \
                 None = stored bit) {:?}",
                v.len(),
                &v[..v.len().min(8)]
            ),
            Failure::Spurious(v) => write!(
                f,
                "b0 has {} bit(s) no marked write explains: {:?}",
                v.len(),
                &v[..v.len().min(8)]
            ),
        }
    }
}

#[derive(Debug)]
struct Checked {
    outcome: Outcome,
    leaks: u64,
    /// b0's bits after the reopen (the baseline of the next run on this image).
    bits: Vec<bool>,
}

/// How [`check_image`] leaves the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// Store b0 and check with qemu-img again.
    Store,
    /// Drop the set without storing (b0 stays in use, the shadow armed).
    Leave,
}

/// The checks every crashed image must pass (see the module docs).
fn check_image(path: &Path, e: &Expect, close: Close) -> Result<Checked, Failure> {
    let (c, leaks, errs, s) = qemu_check(path);
    if c != 0 || errs != 0 {
        return Err(Failure::Corrupt(format!("qemu-img check: {s}")));
    }
    let img = Qcow2Image::open(path, &image_options())
        .map_err(|err| Failure::Open(format!("engine: {err}")))?;
    let set = Bitmaps::open_with(&img, "disk0", crash_consistent())
        .map_err(|err| Failure::Open(format!("bitmaps: {err}")))?;
    let list = set.list();
    let outcome =
        match list.iter().find(|b| b.name == BITMAP) {
            None if e.lost_ok => Outcome::Lost,
            None => return Err(Failure::Lost),
            Some(b) if b.inconsistent => {
                let file = std::fs::read(path).unwrap_or_default();
                let len = file.len() as u64;
                let ac = file
                    .get(88..96)
                    .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                return Err(Failure::Inconsistent(match shadow_region(&file) {
                    Some((off, l)) => {
                        format!(
                    "autoclear {ac:#x}, shadow region {off:#x}+{l:#x}, file length {len:#x}{}",
                    if off + l > len { ": THE REGION ENDS PAST THE END OF THE FILE" } else { "" }
                )
                    }
                    None => format!("autoclear {ac:#x}, no shadow extension"),
                }));
            }
            Some(_) if set.recovered().iter().any(|(n, _)| n == BITMAP) => Outcome::Recovered,
            Some(_) => Outcome::Clean,
        };
    let mut bits = vec![false; NBITS];
    if outcome != Outcome::Lost {
        let bm = set.bitmap(BITMAP).unwrap();
        assert_eq!(bm.granularity(), GRAN);
        for (g, b) in bits.iter_mut().enumerate() {
            *b = bm.get(g as u64 * GRAN);
        }
        let missing: Vec<(u64, Option<u32>)> = (0..NBITS)
            .filter(|&g| e.must[g] && !bits[g])
            .map(|g| (g as u64, e.why[g]))
            .collect();
        if !missing.is_empty() {
            return Err(Failure::Missing(missing));
        }
        let spurious: Vec<u64> = (0..NBITS)
            .filter(|&g| bits[g] && !e.may[g])
            .map(|g| g as u64)
            .collect();
        if !spurious.is_empty() {
            return Err(Failure::Spurious(spurious));
        }
    }
    for &(id, off, len) in &e.acked {
        let mut got = vec![0u8; len as usize];
        BlockImage::read_at(&img, &mut got, off)
            .map_err(|err| Failure::Data(format!("reading {off:#x}+{len:#x}: {err}")))?;
        if let Some(i) = (0..len).find(|&i| got[i as usize] != pattern_byte(id, off + i)) {
            return Err(Failure::Data(format!(
                "write {id}: acknowledged byte at {:#x} reads {:#04x}, expected {:#04x}",
                off + i,
                got[i as usize],
                pattern_byte(id, off + i)
            )));
        }
    }
    if close == Close::Store {
        set.store(&img)
            .map_err(|err| Failure::Open(format!("storing after the reopen: {err}")))?;
        drop(set);
        drop(img);
        let (c, _, errs, s) = qemu_check(path);
        if c != 0 || errs != 0 {
            return Err(Failure::Corrupt(format!(
                "qemu-img check after our reopen and store: {s}"
            )));
        }
    }
    Ok(Checked {
        outcome,
        leaks,
        bits,
    })
}

// ---- power loss ----------------------------------------------------------------------

#[derive(Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

fn apply(buf: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(off, data) => {
            let (off, end) = (*off as usize, *off as usize + data.len());
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[off..end].copy_from_slice(data);
        }
        Pending::SetLen(l) => buf.resize(*l as usize, 0),
    }
}

/// The shadow region a header names, if any: (offset, length).
fn shadow_region(file: &[u8]) -> Option<(u64, u64)> {
    let be32 = |o: usize| -> Option<u64> {
        Some(u32::from_be_bytes(file.get(o..o + 4)?.try_into().ok()?).into())
    };
    let be64 = |o: usize| Some(u64::from_be_bytes(file.get(o..o + 8)?.try_into().ok()?));
    let mut at: u64 = be32(100)?;
    while at + 8 <= CLUSTER {
        let (magic, len) = (be32(at as usize)?, be32(at as usize + 4)?);
        if magic == 0 {
            return None;
        }
        if magic == u64::from(EXT_SHADOW) {
            return Some((be64(at as usize + 8)?, be64(at as usize + 16)?));
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    None
}

/// What a power loss cannot take away (`durable`), what the engine sees (`current`),
/// and the writes in between.
struct PlState {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
    calls: u64,
    crash_at: BTreeSet<u64>,
    rng: StdRng,
}

type Probe = Box<dyn Fn(Vec<u8>, u64, u32) + Send + Sync>;

/// Crash images: 0 nothing unsynced survives, 1 everything, 2 whole writes at random,
/// 3 512-byte sectors at random, 4 everything but the writes to the shadow region,
/// 5 everything but the header, of which only the first sector (the autoclear bits)
/// survives.
const MODES: u32 = 6;

/// How a power-loss run deviates from the plain one.
#[derive(Clone, Copy, Debug, Default)]
struct Variant {
    /// A broken variant: the syncer's syncs make nothing durable (as if the shadow
    /// pages were written but never fdatasync'ed).
    lose_syncer_syncs: bool,
    /// Every crash image of this mode (else one at random).
    force_mode: Option<u32>,
}

/// A storage that can build the image a power loss would leave behind, at any of its
/// write, set_len or sync calls.
struct PowerLossStorage {
    state: Mutex<PlState>,
    probe: Probe,
    variant: Variant,
}

impl std::fmt::Debug for PowerLossStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PowerLossStorage")
    }
}

impl PowerLossStorage {
    fn new(
        bytes: Vec<u8>,
        crash_at: BTreeSet<u64>,
        seed: u64,
        probe: Probe,
        variant: Variant,
    ) -> Self {
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
            variant,
        }
    }

    fn calls(&self) -> u64 {
        self.state.lock().unwrap().calls
    }

    /// Counts a call; at a crash point builds the crash image and probes it (with the
    /// storage lock held: nothing moves meanwhile).
    fn tick(&self, st: &mut PlState) {
        st.calls += 1;
        if !st.crash_at.contains(&st.calls) {
            return;
        }
        let mut img = st.durable.clone();
        let mode = match self.variant.force_mode {
            Some(m) => m,
            None => st.rng.gen_range(0..MODES),
        };
        // Mode 4: every unsynced write survives except those to the shadow region (as
        // named by the durable or the newest header): the shadow pages not yet synced
        // are lost while the data writes issued after `cover` land.
        let regions: Vec<(u64, u64)> = [shadow_region(&st.durable), shadow_region(&st.current)]
            .into_iter()
            .flatten()
            .collect();
        let PlState { pending, rng, .. } = &mut *st;
        for p in pending.iter() {
            match (mode, p) {
                (0, _) => {}
                (1, _) => apply(&mut img, p),
                (5, Pending::Write(0, data)) => apply(
                    &mut img,
                    &Pending::Write(0, data[..data.len().min(512)].to_vec()),
                ),
                (5, _) => apply(&mut img, p),
                (4, Pending::Write(off, data)) => {
                    let end = off + data.len() as u64;
                    if !regions.iter().any(|&(r, l)| *off < r + l && r < end) {
                        apply(&mut img, p);
                    }
                }
                (2 | 4, _) | (_, Pending::SetLen(_)) => {
                    if rng.gen_bool(0.5) {
                        apply(&mut img, p);
                    }
                }
                (_, Pending::Write(off, data)) => {
                    // Torn: each 512-byte sector on its own.
                    let mut pos = *off;
                    let end = off + data.len() as u64;
                    while pos < end {
                        let next = ((pos / 512 + 1) * 512).min(end);
                        if rng.gen_bool(0.5) {
                            let piece = data[(pos - off) as usize..(next - off) as usize].to_vec();
                            apply(&mut img, &Pending::Write(pos, piece));
                        }
                        pos = next;
                    }
                }
            }
        }
        (self.probe)(img, st.calls, mode);
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
        apply(&mut st.current, &p);
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
        apply(&mut st.current, &p);
        st.pending.push(p);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.tick(&mut st);
        if self.variant.lose_syncer_syncs && std::thread::current().name() == Some(SYNCER) {
            return Ok(());
        }
        let pending = std::mem::take(&mut st.pending);
        for p in &pending {
            apply(&mut st.durable, p);
        }
        Ok(())
    }
}

/// What a power-loss run found.
#[derive(Debug, Default)]
struct PlReport {
    calls: u64,
    probed: u64,
    recovered: u64,
    clean: u64,
    lost: u64,
    leaky: u64,
    failures: Vec<(String, Failure)>,
}

/// Which storage calls are crash points.
#[derive(Clone, Copy, Debug)]
enum Points {
    /// This many at random.
    Random(usize),
    /// Each of the last this many calls of the run.
    Last(u64),
}

/// One power-loss run: the plan once to count the storage calls, then again with
/// crash points among them.
fn power_loss_run(
    seed: u64,
    creator: Creator,
    plan: &Arc<Plan>,
    points: Points,
    variant: Variant,
) -> PlReport {
    let dir = tempfile::tempdir().unwrap();
    let (path, baseline) = make_image(dir.path(), creator);
    let bytes = std::fs::read(&path).unwrap();
    let open = |storage: Arc<PowerLossStorage>| {
        Arc::new(Qcow2Image::open_storage(storage, &image_options()).unwrap())
    };

    // Pass 1: count the storage calls.
    let counter = Arc::new(PowerLossStorage::new(
        bytes.clone(),
        BTreeSet::new(),
        seed,
        Box::new(|_, _, _| {}),
        variant,
    ));
    {
        let img = open(counter.clone());
        run_plan(&img, plan, &|_| {});
    }
    let calls = counter.calls();
    // With several threads the number of calls varies a little from run to run.
    let calls = if plan.threads > 1 {
        calls * 9 / 10
    } else {
        calls
    };

    // Pass 2: crash at `points` random calls.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let crash_at: BTreeSet<u64> = match points {
        Points::Random(n) => (0..n).map(|_| rng.gen_range(1..=calls)).collect(),
        Points::Last(n) => (calls.saturating_sub(n).max(1)..=calls).collect(),
    };
    let history: Arc<Mutex<Vec<Ev>>> = Arc::default();
    let report = Arc::new(Mutex::new(PlReport {
        calls,
        ..PlReport::default()
    }));
    let probe: Probe = {
        let (history, report, plan) = (history.clone(), report.clone(), plan.clone());
        let crash_path = dir.path().join("crash.qcow2");
        let n = AtomicU64::new(0);
        Box::new(move |img: Vec<u8>, call: u64, mode: u32| {
            let h = history.lock().unwrap().clone();
            let e = expect(&h, &plan, &baseline);
            std::fs::write(&crash_path, &img).unwrap();
            // Every fourth image is also stored and checked again by QEMU.
            let close = if n.fetch_add(1, Ordering::SeqCst).is_multiple_of(4) {
                Close::Store
            } else {
                Close::Leave
            };
            let r = check_image(&crash_path, &e, close);
            let mut rep = report.lock().unwrap();
            rep.probed += 1;
            match r {
                Ok(c) => {
                    match c.outcome {
                        Outcome::Recovered => rep.recovered += 1,
                        Outcome::Clean => rep.clean += 1,
                        Outcome::Lost => rep.lost += 1,
                    }
                    if c.leaks > 0 {
                        rep.leaky += 1;
                    }
                }
                Err(f) => {
                    let last: Vec<_> = h.iter().rev().take(6).rev().collect();
                    let what = format!(
                        "seed {seed} ({creator:?}, {} threads): power loss at storage call \
                         {call} (crash image mode {mode}), {} writes submitted, {} events, \
                         last {last:?}",
                        plan.threads,
                        e.submitted,
                        h.len()
                    );
                    let keep = keep_image(&img, seed, call);
                    rep.failures
                        .push((format!("{what}; image kept at {keep}"), f));
                }
            }
        })
    };
    let storage = Arc::new(PowerLossStorage::new(
        bytes,
        crash_at.clone(),
        seed,
        probe,
        variant,
    ));
    {
        let img = open(storage.clone());
        let rec = |ev: Ev| history.lock().unwrap().push(ev);
        run_plan(&img, plan, &rec);
    }
    let rep = std::mem::take(&mut *report.lock().unwrap());
    assert_eq!(
        rep.probed,
        crash_at.len() as u64,
        "every crash point was reached"
    );
    rep
}

/// Keeps a failing crash image (as the crash left it, before the checks reopened it)
/// in the system temp dir; returns where.
fn keep_image(bytes: &[u8], seed: u64, point: u64) -> String {
    let to = std::env::temp_dir().join(format!("shadow-crash-seed{seed}-{point}.qcow2"));
    match std::fs::write(&to, bytes) {
        Ok(()) => to.display().to_string(),
        Err(e) => format!("(not kept: {e})"),
    }
}

/// The failures by kind, then the first few in full.
fn describe(failures: &[(String, Failure)]) -> String {
    let mut kinds = std::collections::BTreeMap::new();
    for (_, f) in failures {
        *kinds.entry(f.kind()).or_insert(0) += 1;
    }
    let first: String = failures
        .iter()
        .take(5)
        .map(|(w, f)| format!("\n  {w}:\n    {f}"))
        .collect();
    format!("{kinds:?}{first}")
}

#[test]
fn power_loss_recovers_a_superset() {
    if !have_qemu_img() {
        return;
    }
    let t0 = Instant::now();
    let base = seed_base() * 7919;
    // (seed, creator, threads, crash points)
    let runs = [
        (1, Creator::QemuImg, 3, 60),
        (2, Creator::Engine, 3, 55),
        (3, Creator::QemuImg, 1, 55),
        (4, Creator::Engine, 2, 55),
    ];
    let mut total = PlReport::default();
    for (seed, creator, threads, points) in runs {
        let seed = seed + base;
        let plan = Arc::new(plan(seed, threads, 5, 9, false));
        let r = power_loss_run(
            seed,
            creator,
            &plan,
            Points::Random(points),
            Variant::default(),
        );
        eprintln!(
            "seed {seed} ({creator:?}, {threads} threads): {} crash images out of {} storage \
             calls: {} recovered, {} clean, {} lost in an IN_USE update, {} with leaks, {} \
             failed",
            r.probed,
            r.calls,
            r.recovered,
            r.clean,
            r.lost,
            r.leaky,
            r.failures.len()
        );
        total.probed += r.probed;
        total.recovered += r.recovered;
        total.failures.extend(r.failures);
    }
    eprintln!(
        "power loss: {} crash images, {:.1} s",
        total.probed,
        t0.elapsed().as_secs_f64()
    );
    assert!(total.probed >= 200, "only {} crash points", total.probed);
    assert!(total.recovered > 0, "no crash image needed the shadow");
    assert!(
        total.failures.is_empty(),
        "{} of {} crash images failed; first ones:{}",
        total.failures.len(),
        total.probed,
        describe(&total.failures)
    );
}

/// Runs a broken variant and asserts that the checker reports missing granules.
fn assert_caught(what: &str, seed: u64, skip_cover: bool, lose_syncer_syncs: bool) {
    let seed = seed + seed_base() * 7919;
    let plan = Arc::new(plan(seed, 1, 3, 12, skip_cover));
    let variant = Variant {
        lose_syncer_syncs,
        ..Variant::default()
    };
    let r = power_loss_run(seed, Creator::Engine, &plan, Points::Random(40), variant);
    let missing: Vec<_> = r
        .failures
        .iter()
        .filter(|(_, f)| matches!(f, Failure::Missing(_)))
        .collect();
    eprintln!(
        "{what}: {} of {} crash images lack a granule of a submitted write; first:{}",
        missing.len(),
        r.probed,
        missing
            .first()
            .map(|(w, f)| format!("\n  {w}:\n    {f}"))
            .unwrap_or_default()
    );
    assert!(
        !missing.is_empty(),
        "{what}: the checker found no missing granule; {}",
        describe(&r.failures)
    );
}

/// The harness can fail: half of the writes skip `cover()` (their data write is
/// submitted before the shadow holds their granules).
#[test]
fn harness_catches_a_write_without_cover() {
    if !have_qemu_img() {
        return;
    }
    assert_caught("writes without cover()", 31, true, false);
}

/// The harness can fail on durability alone: the syncer writes the shadow pages but its
/// syncs make nothing durable, so `cover()` returns while the page is still in the
/// cache; only the crash images that drop that page (modes 0, 2, 3, 4) show it.
#[test]
fn harness_catches_a_shadow_that_is_not_synced() {
    if !have_qemu_img() {
        return;
    }
    assert_caught("shadow pages never synced", 32, false, true);
}

/// Found by the power-loss harness run with a crash at every storage call and torn
/// writes only (crash image mode 3 forced; `power_loss_recovers_a_superset`'s seed 3,
/// QemuImg, 1 thread: storage call 133; seed 1: call 229): the store switches the
/// directory, removes the shadow extension and clears autoclear bit 63 in ONE header
/// write, which is not atomic when the header is over 512 bytes — a qemu-img-created
/// image has a 384-byte feature name table, so the bitmaps extension data sits in the
/// second sector and the autoclear field in the first. A power loss that keeps the new
/// first sector (bit 63 clear) and the old second one (old directory, b0 IN_USE, shadow
/// extension) leaves b0 inconsistent although its shadow is intact. Mode 5 builds
/// exactly that crash image; each of the last 20 calls of a short run that ends with a
/// store is a crash point.
#[test]
fn a_torn_header_write_in_a_store_keeps_b0_recoverable() {
    if !have_qemu_img() {
        return;
    }
    let seed = 41 + seed_base() * 7919;
    let mut p = plan(seed, 1, 1, 8, false);
    p.final_store = true;
    let variant = Variant {
        force_mode: Some(5),
        ..Variant::default()
    };
    // The final store, the syncer's shutdown and the close (which flushes).
    let r = power_loss_run(
        seed,
        Creator::QemuImg,
        &Arc::new(p),
        Points::Last(20),
        variant,
    );
    eprintln!(
        "torn header: {} crash images: {} recovered, {} clean, {} lost in an IN_USE update",
        r.probed, r.recovered, r.clean, r.lost
    );
    assert!(
        r.failures.is_empty(),
        "{} of {} crash images failed:{}",
        r.failures.len(),
        r.probed,
        describe(&r.failures)
    );
}

/// Found by `power_loss_recovers_a_superset` (seed 3, storage call 16): the shadow
/// region is allocated at the end of the file and only its first 20 KiB (mask area and
/// one page of bits) are written, so the file ends inside the region until something
/// else grows it. A crash then (here: the set dropped without a store, which leaves the
/// disk as a kill -9 would) leaves b0 IN_USE with a shadow that `ShadowExt::parse`
/// rejects ("region past the end of the file"): b0 comes back inconsistent instead of
/// recovered. Any image whose guest writes all land in allocated clusters never grows.
#[test]
fn a_crash_before_the_file_grows_past_the_shadow_region_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (path, baseline) = make_image(dir.path(), Creator::Engine);
    {
        let img = Qcow2Image::open(&path, &image_options()).unwrap();
        let set = Bitmaps::open_with(&img, "disk0", crash_consistent()).unwrap();
        assert!(set.shadow().unwrap().is_armed());
        // No guest write (or only ones into allocated clusters): the file does not grow.
    }
    let len = std::fs::metadata(&path).unwrap().len();
    let region = shadow_region(&std::fs::read(&path).unwrap());
    let img = Qcow2Image::open(&path, &image_options()).unwrap();
    let set = Bitmaps::open_with(&img, "disk0", crash_consistent()).unwrap();
    let b0 = set.list().into_iter().find(|b| b.name == BITMAP).unwrap();
    assert!(
        !b0.inconsistent,
        "b0 was left in use with an armed shadow and must be recovered, but it is \
         inconsistent (file length {len:#x}, shadow region (offset, length) {region:x?})"
    );
    let bm = set.bitmap(BITMAP).unwrap();
    assert!((0..NBITS).all(|g| !baseline[g] || bm.get(g as u64 * GRAN)));
}

/// The consequence of the bug above, found by `kill9_recovers_a_superset` once the
/// harness padded files past the region (to look for other bugs): the open that rejects
/// the shadow leaves it in the header with its autoclear bit set, and b0 untracked
/// (inconsistent). Guest writes that grow the file then make the stale shadow valid
/// again: the next open "recovers" b0 as consistent without those writes — silently.
#[test]
fn a_shadow_rejected_on_open_does_not_come_back_stale() {
    const OFF: u64 = 40 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_image(dir.path(), Creator::Engine);
    // Session 1: armed, then a crash before the file grew past the region.
    {
        let img = Qcow2Image::open(&path, &image_options()).unwrap();
        Bitmaps::open_with(&img, "disk0", crash_consistent()).unwrap();
    }
    // Session 2: a guest write into a new cluster (the file grows), the daemon's way;
    // then a crash again.
    let session2 = {
        let img = Arc::new(Qcow2Image::open(&path, &image_options()).unwrap());
        let set = Bitmaps::open_with(&*img, "disk0", crash_consistent()).unwrap();
        let shadow = set.shadow().unwrap().clone();
        let syncer = {
            let (shadow, img) = (shadow.clone(), img.clone());
            std::thread::spawn(move || shadow.run_syncer(&*img))
        };
        set.mark(OFF, 4096);
        shadow.cover(OFF, 4096).unwrap();
        img.write_at(&pattern(1, OFF, 4096), OFF).unwrap();
        BlockImage::flush(&*img).unwrap();
        shadow.shutdown();
        syncer.join().unwrap();
        set.list()
    };
    // Session 3: b0 may be inconsistent, but never consistent without that write.
    let img = Qcow2Image::open(&path, &image_options()).unwrap();
    let set = Bitmaps::open_with(&img, "disk0", crash_consistent()).unwrap();
    if let Ok(bm) = set.bitmap(BITMAP) {
        assert!(
            bm.get(OFF),
            "b0 comes back consistent (recovered: {:?}) but lacks the write of the previous \
             session, in which it was {session2:?}",
            set.recovered()
        );
    }
}

// ---- kill -9 -------------------------------------------------------------------------

/// The plan of kill round `round` on `threads` threads.
fn kill_plan(seed: u64, threads: usize) -> Plan {
    plan(seed, threads, 4, 8, false)
}

/// Runs the workload named by [`WORKER_ENV`], writing its journal to stderr (a pipe to
/// the parent) before each step, and waits to be killed. Does nothing in a normal run.
#[test]
fn shadow_crash_worker() {
    let Ok(cfg) = std::env::var(WORKER_ENV) else {
        return;
    };
    let f: Vec<&str> = cfg.split(';').collect();
    let path = Path::new(f[0]);
    let (seed, threads): (u64, usize) = (f[1].parse().unwrap(), f[2].parse().unwrap());
    let plan = kill_plan(seed, threads);
    let img = Arc::new(Qcow2Image::open(path, &image_options()).unwrap());
    let journal = Mutex::new(io::stderr());
    let rec = |ev: Ev| {
        let mut j = journal.lock().unwrap();
        // One write(2) per entry: in the pipe before the step it names is taken.
        j.write_all(format!("J {}\n", ev.to_line()).as_bytes())
            .unwrap();
    };
    run_plan(&img, &plan, &rec);
    // Never close the image: the parent kills us.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn kill9_recovers_a_superset() {
    if !have_qemu_img() {
        return;
    }
    const KILLS: usize = 32;
    let t0 = Instant::now();
    let seed0 = 500 + seed_base() * 7919;
    let dir = tempfile::tempdir().unwrap();
    let (path, mut baseline) = make_image(dir.path(), Creator::QemuImg);
    let exe = std::env::current_exe().unwrap();
    let mut rng = StdRng::seed_from_u64(seed0);
    let (mut recovered, mut clean, mut lost, mut leaky) = (0, 0, 0, 0);
    for k in 0..KILLS {
        let seed = seed0 * 1000 + k as u64;
        let threads = 1 + k % 3;
        let plan = kill_plan(seed, threads);
        // About 4 events per write: kill once `target` events were journaled, plus a
        // random delay.
        let events = 4 * plan.writes().count() + 8;
        let (target, delay) = if k == 0 {
            // A crash right after the start: the open armed the shadow, nothing else
            // happened yet.
            (3, Duration::ZERO)
        } else {
            (
                rng.gen_range(0..events),
                Duration::from_micros(rng.gen_range(0..3000)),
            )
        };
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "shadow_crash_worker",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_ENV, format!("{};{seed};{threads}", path.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The journal: every line the child wrote, read until the pipe closes.
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let reader = {
            let (lines, err) = (lines.clone(), child.stderr.take().unwrap());
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines() {
                    let Ok(l) = l else { break };
                    lines.lock().unwrap().push(l);
                }
            })
        };
        let journaled = |lines: &[String]| {
            lines
                .iter()
                .filter_map(|l| l.strip_prefix("J ").and_then(Ev::parse))
                .collect::<Vec<Ev>>()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                reader.join().unwrap();
                panic!(
                    "kill {k}: the worker exited by itself ({st}): {}",
                    lines.lock().unwrap().join("\n")
                );
            }
            let h = journaled(&lines.lock().unwrap());
            if h.len() >= target || h.contains(&Ev::AllDone) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kill {k}: the worker made no progress");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let h = journaled(&lines.lock().unwrap());
        let e = expect(&h, &plan, &baseline);
        let what = format!(
            "kill {k} (seed {seed}, {threads} threads, {} events journaled, {} writes \
             submitted, last {:?})",
            h.len(),
            e.submitted,
            h.last()
        );
        // Alternate: store after the check (the next child starts clean), or leave b0
        // in use with its shadow (the next child recovers and reuses the region).
        let close = if k % 2 == 0 {
            Close::Leave
        } else {
            Close::Store
        };
        let crashed = std::fs::read(&path).unwrap();
        let c = check_image(&path, &e, close).unwrap_or_else(|f| {
            let keep = keep_image(&crashed, seed, k as u64);
            panic!("{what}: {f} (image as the kill left it kept at {keep})")
        });
        match c.outcome {
            Outcome::Recovered => recovered += 1,
            Outcome::Clean => clean += 1,
            Outcome::Lost => {
                lost += 1;
                // Add b0 again with what it had to have, so the next rounds go on.
                let img = Qcow2Image::open(&path, &image_options()).unwrap();
                let set = Bitmaps::open_with(&img, "disk0", OpenOptions::default()).unwrap();
                if set.list().iter().any(|b| b.name == BITMAP) {
                    set.remove(&img, BITMAP).unwrap();
                }
                set.add(
                    &img,
                    BITMAP,
                    AddOptions {
                        granularity: Some(GRAN),
                        ..AddOptions::default()
                    },
                )
                .unwrap();
                let bm = set.bitmap(BITMAP).unwrap();
                for g in (0..NBITS).filter(|&g| e.must[g]) {
                    bm.set_range(g as u64 * GRAN, GRAN);
                }
                set.store(&img).unwrap();
            }
        }
        if c.leaks > 0 {
            leaky += 1;
        }
        baseline = if c.outcome == Outcome::Lost {
            e.must.clone()
        } else {
            c.bits
        };
    }
    eprintln!(
        "kill -9: {KILLS} kills: {recovered} recovered, {clean} clean, {lost} lost in an \
         IN_USE update, {leaky} with leaks, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(recovered > 0, "no kill needed the shadow");
}
