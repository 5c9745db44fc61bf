//! Concurrency tests: many threads marking one bitmap at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;

use dirty_bitmap::DirtyBitmap;

const THREADS: u64 = 8;
const G: u64 = 4096;
const SIZE: u64 = (1 << 30) + 1234; // partial last granule

/// Small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The writes thread `t` performs: granules `i` with `i % THREADS == t`
/// (disjoint bits sharing words with other threads) plus random,
/// overlapping, unaligned ranges.
fn writes(t: u64) -> Vec<(u64, u64)> {
    let bits = SIZE.div_ceil(G);
    let mut v: Vec<(u64, u64)> = (0..bits)
        .filter(|i| i % THREADS == t)
        .map(|i| (i * G + 7, 100))
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
    for _ in 0..20_000 {
        let off = rng.next() % (SIZE + G);
        let len = rng.next() % (64 * G);
        v.push((off, len));
    }
    v
}

fn model(all: &[(u64, u64)]) -> Vec<bool> {
    let mut m = vec![false; SIZE.div_ceil(G) as usize];
    for &(off, len) in all {
        if len == 0 || off >= SIZE {
            continue;
        }
        let end = (off + len).min(SIZE);
        for b in off / G..=(end - 1) / G {
            m[b as usize] = true;
        }
    }
    m
}

fn bits(bm: &DirtyBitmap) -> Vec<bool> {
    (0..bm.bit_count()).map(|b| bm.get_bit(b)).collect()
}

#[test]
fn concurrent_marks_equal_model() {
    let bm = DirtyBitmap::new(SIZE, G).unwrap();
    let per_thread: Vec<Vec<(u64, u64)>> = (0..THREADS).map(writes).collect();
    thread::scope(|s| {
        for w in &per_thread {
            let bm = &bm;
            s.spawn(move || {
                for &(off, len) in w {
                    bm.mark(off, len);
                }
            });
        }
    });
    let all: Vec<(u64, u64)> = per_thread.concat();
    let expect = model(&all);
    assert_eq!(bits(&bm), expect);
    assert_eq!(bm.count(), expect.iter().filter(|&&b| b).count() as u64);
}

/// All threads start together and mark interleaved single granules, so they
/// hit the same words at the same time; any lost update shows as a clean bit.
#[test]
fn interleaved_bits_in_shared_words_are_never_lost() {
    let bm = DirtyBitmap::new(SIZE, G).unwrap();
    let bits_total = bm.bit_count();
    for round in 0..10 {
        bm.clear();
        let barrier = Barrier::new(THREADS as usize);
        thread::scope(|s| {
            for t in 0..THREADS {
                let (bm, barrier) = (&bm, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in (t..bits_total).step_by(THREADS as usize) {
                        bm.mark(i * G, 1);
                    }
                });
            }
        });
        assert_eq!(bm.count(), bits_total, "round {round}");
    }
}

/// Marks racing with `snapshot_and_clear` end up in a snapshot or in the
/// bitmap, never nowhere.
#[test]
fn snapshot_and_clear_loses_no_mark() {
    let bm = DirtyBitmap::new(SIZE, G).unwrap();
    let acc = DirtyBitmap::new(SIZE, G).unwrap();
    let done = AtomicBool::new(false);
    // Interleaved single granules (every mark sets a new bit in a word that
    // other threads and the collector touch too), then random ranges.
    let bits_total = SIZE.div_ceil(G);
    let per_thread: Vec<Vec<(u64, u64)>> = (0..THREADS)
        .map(|t| {
            let mut w: Vec<(u64, u64)> = (t..bits_total)
                .step_by(THREADS as usize)
                .map(|i| (i * G, 1))
                .collect();
            w.extend(writes(t));
            w
        })
        .collect();
    let barrier = Barrier::new(THREADS as usize + 1);
    thread::scope(|s| {
        let markers: Vec<_> = per_thread
            .iter()
            .map(|w| {
                let (bm, barrier) = (&bm, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for &(off, len) in w {
                        bm.mark(off, len);
                    }
                })
            })
            .collect();
        let collector = s.spawn(|| {
            barrier.wait();
            while !done.load(Ordering::Acquire) {
                acc.merge_from(&bm.snapshot_and_clear()).unwrap();
            }
        });
        for m in markers {
            m.join().unwrap();
        }
        done.store(true, Ordering::Release);
        collector.join().unwrap();
    });
    acc.merge_from(&bm).unwrap();
    let expect = model(&per_thread.concat());
    assert_eq!(bits(&acc), expect);
}

#[test]
fn readers_see_well_formed_extents_while_marking() {
    let bm = DirtyBitmap::new(SIZE, G).unwrap();
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let markers: Vec<_> = (0..THREADS - 1)
            .map(|t| {
                let bm = &bm;
                s.spawn(move || {
                    for &(off, len) in &writes(t) {
                        bm.mark(off, len);
                    }
                })
            })
            .collect();
        let reader = s.spawn(|| {
            let mut checks = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                let mut next = 0u64;
                let mut prev: Option<bool> = None;
                for e in bm.extents() {
                    assert_eq!(e.start, next, "extents must be contiguous");
                    assert!(e.length > 0);
                    assert_ne!(Some(e.dirty), prev, "runs must be maximal");
                    prev = Some(e.dirty);
                    next = e.start + e.length;
                }
                assert_eq!(next, SIZE, "extents must cover the disk");
                checks += 1;
                if finished {
                    return checks;
                }
            }
        });
        for m in markers {
            m.join().unwrap();
        }
        done.store(true, Ordering::Release);
        assert!(reader.join().unwrap() > 0);
    });
    // Nothing marked twice or lost: equals the model of the same writes.
    let all: Vec<(u64, u64)> = (0..THREADS - 1).flat_map(writes).collect();
    assert_eq!(bits(&bm), model(&all));
}

/// A small, hot bitmap: the collector sweeps it continuously while markers
/// set new bits in the same words, many rounds over.
#[test]
fn snapshot_and_clear_on_hot_words() {
    const SMALL: u64 = 64 * 64 * 512; // 64 words at 512 B granularity
    let bm = DirtyBitmap::new(SMALL, 512).unwrap();
    for round in 0..300 {
        let acc = DirtyBitmap::new(SMALL, 512).unwrap();
        let done = AtomicBool::new(false);
        let barrier = Barrier::new(3);
        thread::scope(|s| {
            let markers: Vec<_> = (0..2u64)
                .map(|t| {
                    let (bm, barrier) = (&bm, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        for i in (t..bm.bit_count()).step_by(2) {
                            bm.mark(i * 512, 1);
                        }
                    })
                })
                .collect();
            let collector = s.spawn(|| {
                barrier.wait();
                while !done.load(Ordering::Acquire) {
                    acc.merge_from(&bm.snapshot_and_clear()).unwrap();
                }
            });
            for m in markers {
                m.join().unwrap();
            }
            done.store(true, Ordering::Release);
            collector.join().unwrap();
        });
        acc.merge_from(&bm).unwrap();
        assert_eq!(acc.count(), acc.bit_count(), "round {round}");
        bm.clear();
    }
}
