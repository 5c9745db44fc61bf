//! Data-path benchmark of the qcow2 engine against plain `pread`/`pwrite` on a raw file
//! of the same size (plain `harness = false`, std::time).
//!
//! Run with `cargo bench -p qcow2 --bench engine`. The files live in a temporary
//! folder under `$BENCH_DIR` (default: the system temp folder; use `/dev/shm` for the
//! pure software path). `BENCH_REPS` (default 5) sets how many times each case runs;
//! engine and raw runs alternate and the median of each is printed with the ratio.
//!
//! Cases on a 1 GiB disk with 64 KiB clusters, one thread, buffered I/O, every write
//! case ends with a flush (qcow2 flush / fdatasync) inside the timed region:
//! * 4 KiB random reads of allocated clusters,
//! * 4 KiB random rewrites of allocated clusters,
//! * 4 KiB allocating writes on a fresh image (one per cluster, clusters in random order),
//! * 1 MiB sequential writes over the whole fresh disk.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use qcow2::{BlockImage, CreateOptions, OpenOptions, Qcow2Image};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const SIZE: u64 = GIB;
const CLUSTER: u64 = 64 * KIB;
const SMALL: usize = 4 * KIB as usize;
const BIG: usize = MIB as usize;
/// Random 4 KiB operations per read/rewrite run.
const RANDOM_OPS: usize = 200_000;

/// Deterministic pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One side of the comparison.
trait Target {
    fn read(&self, buf: &mut [u8], off: u64);
    fn write(&self, buf: &[u8], off: u64);
    fn flush(&self);
}

struct Engine(Qcow2Image);

impl Target for Engine {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read_at(buf, off).expect("engine read");
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write_at(buf, off).expect("engine write");
    }
    fn flush(&self) {
        self.0.flush().expect("engine flush");
    }
}

struct Raw(File);

impl Target for Raw {
    fn read(&self, buf: &mut [u8], off: u64) {
        self.0.read_exact_at(buf, off).expect("pread");
    }
    fn write(&self, buf: &[u8], off: u64) {
        self.0.write_all_at(buf, off).expect("pwrite");
    }
    fn flush(&self) {
        self.0.sync_data().expect("fdatasync");
    }
}

fn fresh_engine(path: &Path) -> Engine {
    let _ = std::fs::remove_file(path);
    qcow2::create(
        path,
        &CreateOptions {
            size: SIZE,
            cluster_size: CLUSTER,
            ..CreateOptions::default()
        },
    )
    .expect("create qcow2");
    Engine(Qcow2Image::open(path, &OpenOptions::default()).expect("open qcow2"))
}

fn fresh_raw(path: &Path) -> Raw {
    let _ = std::fs::remove_file(path);
    let f = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .expect("create raw");
    f.set_len(SIZE).expect("truncate raw");
    Raw(f)
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// 4 KiB-aligned random offsets over the whole disk.
fn random_offsets(n: usize, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    let blocks = SIZE / SMALL as u64;
    (0..n).map(|_| rng.next() % blocks * SMALL as u64).collect()
}

/// One 4 KiB offset in every cluster, clusters in random order (Fisher-Yates).
fn allocating_offsets(seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    let clusters = (SIZE / CLUSTER) as usize;
    let mut order: Vec<u64> = (0..clusters as u64).collect();
    for i in (1..clusters).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
        .into_iter()
        .map(|c| c * CLUSTER + rng.next() % (CLUSTER / SMALL as u64) * SMALL as u64)
        .collect()
}

fn seq_fill(t: &dyn Target, buf: &[u8]) {
    let mut off = 0;
    while off < SIZE {
        t.write(buf, off);
        off += buf.len() as u64;
    }
    t.flush();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Per-case results: seconds of every engine and raw run.
#[derive(Default)]
struct Case {
    engine: Vec<f64>,
    raw: Vec<f64>,
}

impl Case {
    fn report(&mut self, name: &str, ops: usize, bytes_per_op: usize) {
        let e = median(&mut self.engine);
        let r = median(&mut self.raw);
        let iops = |s: f64| ops as f64 / s;
        let mbs = |s: f64| (ops * bytes_per_op) as f64 / s / 1e6;
        println!(
            "{name:<34} engine {:>9.0} IOPS {:>7.0} MB/s | raw {:>9.0} IOPS {:>7.0} MB/s | engine/raw {:.3}",
            iops(e),
            mbs(e),
            iops(r),
            mbs(r),
            r / e
        );
    }
}

fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --benches` run nothing long.
    if !std::env::args().any(|a| a == "--bench") {
        println!("engine benchmark: run with `cargo bench -p qcow2 --bench engine`");
        return;
    }
    let base = std::env::var_os("BENCH_DIR").map(PathBuf::from);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    println!(
        "qcow2 engine vs raw pread/pwrite: 1 GiB disk, 64 KiB clusters, folder {}, {reps} runs per case (median)",
        dir.path().display()
    );
    let qpath = dir.path().join("bench.qcow2");
    let rpath = dir.path().join("bench.raw");
    let big = data(BIG, 7);
    let small = data(SMALL, 11);
    let reads = random_offsets(RANDOM_OPS, 3);
    let rewrites = random_offsets(RANDOM_OPS, 5);
    let alloc = allocating_offsets(9);

    let mut seq = Case::default();
    let mut rread = Case::default();
    let mut rwrite = Case::default();
    let mut awrite = Case::default();
    let mut buf = vec![0u8; SMALL];
    for _ in 0..reps {
        // Sequential 1 MiB writes over a fresh disk; leaves both fully allocated.
        let eng = fresh_engine(&qpath);
        seq.engine.push(timed(|| seq_fill(&eng, &big)));
        let raw = fresh_raw(&rpath);
        seq.raw.push(timed(|| seq_fill(&raw, &big)));

        let sides: [(&dyn Target, bool); 2] = [(&eng, true), (&raw, false)];
        for (t, is_engine) in sides {
            let s = timed(|| {
                for &o in &reads {
                    t.read(&mut buf, o);
                }
            });
            if is_engine {
                rread.engine.push(s)
            } else {
                rread.raw.push(s)
            }
            let s = timed(|| {
                for &o in &rewrites {
                    t.write(&small, o);
                }
                t.flush();
            });
            if is_engine {
                rwrite.engine.push(s)
            } else {
                rwrite.raw.push(s)
            }
        }
        drop(eng);
        drop(raw);

        // Allocating 4 KiB writes on fresh images.
        let eng = fresh_engine(&qpath);
        awrite.engine.push(timed(|| {
            for &o in &alloc {
                eng.write(&small, o);
            }
            eng.flush();
        }));
        let raw = fresh_raw(&rpath);
        awrite.raw.push(timed(|| {
            for &o in &alloc {
                raw.write(&small, o);
            }
            raw.flush();
        }));
    }
    rread.report("4 KiB random read (allocated)", RANDOM_OPS, SMALL);
    rwrite.report("4 KiB random rewrite (allocated)", RANDOM_OPS, SMALL);
    awrite.report("4 KiB allocating write (fresh)", alloc.len(), SMALL);
    seq.report("1 MiB sequential write (fresh)", (SIZE / MIB) as usize, BIG);
}
