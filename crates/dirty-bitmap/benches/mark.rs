//! Micro-benchmarks of the dirty bitmap (plain `harness = false`, std::time).
//!
//! Run with `cargo bench -p dirty-bitmap --bench mark`. Each figure is the
//! best and the median of several repetitions.

use std::hint::black_box;
use std::thread;
use std::time::Instant;

use dirty_bitmap::DirtyBitmap;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const TIB: u64 = 1024 * 1024 * MIB;
const REPS: usize = 7;

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

/// Runs `f` (which performs `ops` operations) REPS times after `setup`,
/// timing only `f`, and prints ns per operation.
fn bench(name: &str, ops: u64, mut setup: impl FnMut(), mut f: impl FnMut()) {
    let mut ns: Vec<f64> = (0..REPS)
        .map(|_| {
            setup();
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64 / ops as f64
        })
        .collect();
    ns.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name:<58} best {:>9.2} ns/op   median {:>9.2} ns/op",
        ns[0],
        ns[REPS / 2]
    );
}

/// Like [`bench`] but prints throughput for `bytes` bytes processed.
fn bench_bytes(name: &str, bytes: u64, mut setup: impl FnMut(), mut f: impl FnMut()) {
    let mut secs: Vec<f64> = (0..REPS)
        .map(|_| {
            setup();
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    secs.sort_by(|a, b| a.total_cmp(b));
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    println!(
        "{name:<58} best {:>8.3} ms ({:>6.2} GB/s)   median {:>8.3} ms",
        secs[0] * 1e3,
        gbs(secs[0]),
        secs[REPS / 2] * 1e3
    );
}

fn random_offsets(n: usize, size: u64, align: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| rng.next() % (size / align) * align)
        .collect()
}

fn mark_benches() {
    println!("== mark (1 TiB disk) ==");
    let n = 1 << 20;
    let bm = DirtyBitmap::new(TIB, 64 * KIB).unwrap();
    let offs = random_offsets(n, TIB, 4 * KIB, 1);

    bm.set_range(0, TIB);
    bench(
        "mark 4 KiB, 64 KiB gran, bits already set, random",
        n as u64,
        || {},
        || {
            for &o in &offs {
                bm.mark(black_box(o), 4 * KIB);
            }
        },
    );
    bench(
        "mark 4 KiB, 64 KiB gran, bits already set, same offset",
        n as u64,
        || {},
        || {
            for _ in 0..n {
                bm.mark(black_box(8 * MIB), 4 * KIB);
            }
        },
    );
    bm.set_enabled(false);
    bench(
        "mark 4 KiB, disabled bitmap",
        n as u64,
        || {},
        || {
            for &o in &offs {
                bm.mark(black_box(o), 4 * KIB);
            }
        },
    );
    bm.set_enabled(true);

    // Newly set: sequential granules, each mark sets a new bit.
    let granules = TIB / (64 * KIB);
    bench(
        "mark 4 KiB, 64 KiB gran, new bit, sequential",
        granules,
        || bm.clear(),
        || {
            for i in 0..granules {
                bm.mark(black_box(i * 64 * KIB), 4 * KIB);
            }
        },
    );
    // Newly set: random 4 KiB writes at 4 KiB granularity (32 MiB bitmap);
    // 1 Mi random writes over 256 Mi granules are almost all new bits.
    let fine = DirtyBitmap::new(TIB, 4 * KIB).unwrap();
    bench(
        "mark 4 KiB, 4 KiB gran, new bit, random",
        n as u64,
        || fine.clear(),
        || {
            for &o in &offs {
                fine.mark(black_box(o), 4 * KIB);
            }
        },
    );
    println!("  (new bits in last run: {} of {n})", fine.count());
    drop(fine);

    let mibs = TIB / MIB;
    for g in [64 * KIB, 512] {
        let bm = DirtyBitmap::new(TIB, g).unwrap();
        bench(
            &format!("mark 1 MiB, {g} B gran, new bits, sequential"),
            mibs,
            || bm.clear(),
            || {
                for i in 0..mibs {
                    bm.mark(black_box(i * MIB), MIB);
                }
            },
        );
        bench(
            &format!("mark 1 MiB, {g} B gran, bits already set"),
            mibs,
            || bm.set_range(0, TIB),
            || {
                for i in 0..mibs {
                    bm.mark(black_box(i * MIB), MIB);
                }
            },
        );
    }
}

fn thread_benches() {
    println!("== mark, 2 threads on one bitmap (1 TiB, 64 KiB gran) ==");
    let bm = DirtyBitmap::new(TIB, 64 * KIB).unwrap();
    let granules = TIB / (64 * KIB);
    let run = |bm: &DirtyBitmap| {
        thread::scope(|s| {
            for t in 0..2u64 {
                s.spawn(move || {
                    // Interleaved granules: both threads write the same words.
                    for i in (t..granules).step_by(2) {
                        bm.mark(black_box(i * 64 * KIB), 4 * KIB);
                    }
                });
            }
        })
    };
    bench(
        "2 threads, interleaved granules, new bits (per mark)",
        granules,
        || bm.clear(),
        || run(&bm),
    );
    bench(
        "2 threads, interleaved granules, bits already set (per mark)",
        granules,
        || {},
        || run(&bm),
    );
}

fn serialize_benches() {
    // 2^28 bits = 32 MiB serialized: 16 TiB disk at 64 KiB granularity.
    println!("== serialization, 32 MiB of bits (16 TiB disk, 64 KiB gran) ==");
    let size = 16 * TIB;
    let bm = DirtyBitmap::new(size, 64 * KIB).unwrap();
    assert_eq!(bm.serialized_len(), 32 * MIB);
    let mut rng = Rng(7);
    for _ in 0..1_000_000 {
        bm.mark(rng.next() % size, 4 * KIB);
    }
    let len = bm.serialized_len();
    let mut out = vec![0u8; len as usize];
    bench_bytes(
        "serialize_into, one 32 MiB call",
        len,
        || {},
        || {
            bm.serialize_into(0, black_box(&mut out));
        },
    );
    let cluster = 64 * KIB;
    bench_bytes(
        "serialize_into, 64 KiB clusters",
        len,
        || {},
        || {
            for (i, c) in out.chunks_mut(cluster as usize).enumerate() {
                bm.serialize_into(i as u64 * cluster, black_box(c));
            }
        },
    );
    bench_bytes(
        "serialize_into, unaligned start (byte 3)",
        len - 3,
        || {},
        || {
            bm.serialize_into(3, black_box(&mut out[..(len - 3) as usize]));
        },
    );
    let copy = DirtyBitmap::new(size, 64 * KIB).unwrap();
    bench_bytes(
        "deserialize_from, 64 KiB clusters",
        len,
        || {},
        || {
            for (i, c) in out.chunks(cluster as usize).enumerate() {
                copy.deserialize_from(i as u64 * cluster, black_box(c))
                    .unwrap();
            }
        },
    );
    assert_eq!(copy.count(), bm.count());
    let empty = DirtyBitmap::new(size, 64 * KIB).unwrap();
    bench_bytes(
        "is_serialized_range_zero, clean bitmap, per cluster",
        len,
        || {},
        || {
            for i in 0..len / cluster {
                black_box(empty.is_serialized_range_zero(i * cluster, cluster));
            }
        },
    );
    bench_bytes(
        "count()",
        len,
        || {},
        || {
            black_box(bm.count());
        },
    );
    bench_bytes(
        "dirty_extents() walk (~6% granules dirty)",
        len,
        || {},
        || {
            black_box(bm.dirty_extents().count());
        },
    );
    bench_bytes(
        "snapshot()",
        len,
        || {},
        || {
            black_box(bm.snapshot());
        },
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it, where the timings would be meaningless and slow.
    if !std::env::args().any(|a| a == "--bench") {
        println!("dirty-bitmap benchmarks: run with `cargo bench -p dirty-bitmap`");
        return;
    }
    mark_benches();
    thread_benches();
    serialize_benches();
}
