//! A seeded random workload and the in-memory model it is checked against.
#![allow(dead_code)]

use qcow2::BlockImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One operation of the workload.
#[derive(Clone, Debug)]
pub enum Op {
    Write { off: u64, len: u64, fill: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

impl Op {
    /// The guest range the op may change.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                Some((off, len))
            }
            Op::Flush => None,
        }
    }
}

/// Data written by a write op: a pattern unique to its fill byte and position.
pub fn pattern(off: u64, len: u64, fill: u8) -> Vec<u8> {
    (off..off + len)
        .map(|i| fill ^ (i as u8).wrapping_mul(31) ^ ((i >> 9) as u8))
        .collect()
}

/// Generates `n` ops for a disk of `size` bytes.
pub fn generate(seed: u64, n: usize, size: u64, cluster: u64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = rng.gen_range(0..100);
        let align = match rng.gen_range(0..4) {
            0 => 1,
            1 => 512,
            2 => 4096,
            _ => cluster,
        };
        let max_len = match rng.gen_range(0..3) {
            0 => 4096,
            1 => cluster * 2,
            _ => (1 << 20).min(size / 2),
        };
        let len = (rng.gen_range(1..=max_len) / align).max(1) * align;
        let len = len.min(size);
        let off = (rng.gen_range(0..=size - len) / align) * align;
        ops.push(match kind {
            0..=64 => Op::Write {
                off,
                len,
                fill: rng.gen(),
            },
            65..=79 => Op::Zero {
                off,
                len,
                unmap: rng.gen(),
            },
            80..=91 => Op::Discard { off, len },
            _ => Op::Flush,
        });
    }
    ops
}

/// What the disk must contain, given the engine's documented semantics.
pub struct Model {
    pub data: Vec<u8>,
    pub backing: Vec<u8>,
    pub cluster: u64,
    pub v3: bool,
}

impl Model {
    pub fn new(size: u64, cluster: u64, v3: bool, backing: Option<Vec<u8>>) -> Self {
        let backing = backing.unwrap_or_else(|| vec![0; size as usize]);
        Model {
            data: backing.clone(),
            backing,
            cluster,
            v3,
        }
    }

    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, fill } => {
                self.data[off as usize..(off + len) as usize]
                    .copy_from_slice(&pattern(off, len, fill));
            }
            Op::Zero { off, len, .. } => self.data[off as usize..(off + len) as usize].fill(0),
            Op::Discard { off, len } => {
                let size = self.data.len() as u64;
                let cs = self.cluster;
                let first = off.div_ceil(cs) * cs;
                let end = off + len;
                let last = if end == size { size } else { end / cs * cs };
                if last > first {
                    let r = first as usize..last as usize;
                    if self.v3 {
                        self.data[r].fill(0);
                    } else {
                        self.data[r.clone()].copy_from_slice(&self.backing[r]);
                    }
                }
            }
            Op::Flush => {}
        }
    }
}

/// Runs one op on the image.
pub fn execute(img: &dyn BlockImage, op: &Op) {
    match *op {
        Op::Write { off, len, fill } => img.write_at(&pattern(off, len, fill), off).unwrap(),
        Op::Zero { off, len, unmap } => img.write_zeroes(off, len, unmap).unwrap(),
        Op::Discard { off, len } => img.discard(off, len).unwrap(),
        Op::Flush => img.flush().unwrap(),
    }
}

/// Reads the whole disk through the engine.
pub fn read_all(img: &dyn BlockImage) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    for (i, chunk) in v.chunks_mut(1 << 20).enumerate() {
        img.read_at(chunk, (i as u64) << 20).unwrap();
    }
    v
}

/// First differing byte, for readable failures.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}
