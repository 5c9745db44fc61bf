//! QEMU-compatible serialization of the bits.
//!
//! The serialized form has `ceil(bit_count / 8)` bytes; bit `k` is bit
//! `k % 8` (least significant first) of byte `k / 8`. Since bit `k` is bit
//! `k % 64` of word `k / 64`, byte `b` is byte `b % 8` of word `b / 8` in
//! little-endian order.

use std::sync::atomic::Ordering;

use crate::words;
use crate::{DirtyBitmap, Error};

/// Mask of `n` bytes starting at byte `first` of a word (`first + n <= 8`).
fn byte_mask(first: usize, n: usize) -> u64 {
    debug_assert!(n >= 1 && first + n <= 8);
    let ones = if n == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    };
    ones << (8 * first)
}

impl DirtyBitmap {
    /// Length of the serialized bitmap in bytes: `ceil(bit_count / 8)`.
    pub fn serialized_len(&self) -> u64 {
        self.bit_count().div_ceil(8)
    }

    /// Bits `byte_offset * 8 .. (byte_offset + len) * 8` clamped to the
    /// bitmap, as a half-open range; empty if nothing remains.
    fn serialized_bits(&self, byte_offset: u64, len: u64) -> (u64, u64) {
        let first = u128::from(byte_offset) * 8;
        let end = (u128::from(byte_offset) + u128::from(len)) * 8;
        let bits = u128::from(self.bit_count());
        // Both values are <= bit_count after clamping, so they fit in u64.
        (first.min(bits) as u64, end.min(bits) as u64)
    }

    /// Writes serialized bytes `byte_offset .. byte_offset + out.len()` into
    /// `out`. Bytes at or past [`serialized_len`](Self::serialized_len) are
    /// written as 0, so a whole cluster can be filled at once; unused tail
    /// bits of the last byte are 0.
    pub fn serialize_into(&self, byte_offset: u64, out: &mut [u8]) {
        // Bytes held by the words; those past serialized_len are zero by the
        // tail-bits invariant.
        let stored = self.words.len() as u64 * 8;
        let mut pos = 0usize;
        let mut b = byte_offset;
        while pos < out.len() {
            if b >= stored {
                out[pos..].fill(0);
                return;
            }
            let wi = (b / 8) as usize;
            let shift = (b % 8) as usize;
            let remaining = out.len() - pos;
            if shift == 0 && remaining >= 8 {
                let n = (remaining / 8).min(self.words.len() - wi);
                for (chunk, w) in out[pos..pos + n * 8]
                    .chunks_exact_mut(8)
                    .zip(&self.words[wi..wi + n])
                {
                    chunk.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
                }
                pos += n * 8;
                b += n as u64 * 8;
            } else {
                out[pos] = (self.words[wi].load(Ordering::Acquire) >> (8 * shift)) as u8;
                pos += 1;
                b += 1;
            }
        }
    }

    /// Overwrites the bits of serialized bytes `byte_offset ..
    /// byte_offset + data.len()` with `data`.
    ///
    /// Bytes past [`serialized_len`](Self::serialized_len) and tail bits
    /// beyond [`bit_count`](Self::bit_count) are ignored, so a whole last
    /// cluster can be passed. Fails with [`Error::OutOfRange`] if
    /// `byte_offset` is past `serialized_len`. Ignores the enabled flag.
    pub fn deserialize_from(&self, byte_offset: u64, data: &[u8]) -> Result<(), Error> {
        let slen = self.serialized_len();
        if byte_offset > slen {
            return Err(Error::OutOfRange {
                byte_offset,
                len: data.len() as u64,
                serialized_len: slen,
            });
        }
        let usable = (slen - byte_offset).min(data.len() as u64) as usize;
        let data = &data[..usable];
        let mut pos = 0usize;
        let mut b = byte_offset;
        while pos < data.len() {
            let wi = (b / 8) as usize;
            let first = (b % 8) as usize;
            if first == 0 && data.len() - pos >= 8 {
                // Fast path: whole words.
                let n = (data.len() - pos) / 8;
                for (i, chunk) in data[pos..pos + n * 8].chunks_exact(8).enumerate() {
                    let mut buf = [0u8; 8];
                    buf.copy_from_slice(chunk);
                    let val = u64::from_le_bytes(buf) & self.valid_mask(wi + i);
                    self.words[wi + i].store(val, Ordering::Release);
                }
                pos += n * 8;
                b += n as u64 * 8;
                continue;
            }
            let n = (8 - first).min(data.len() - pos);
            let mut buf = [0u8; 8];
            buf[first..first + n].copy_from_slice(&data[pos..pos + n]);
            let m = byte_mask(first, n) & self.valid_mask(wi);
            let val = u64::from_le_bytes(buf) & m;
            let w = &self.words[wi];
            if m == u64::MAX {
                w.store(val, Ordering::Release);
            } else {
                let mut old = w.load(Ordering::Relaxed);
                loop {
                    let new = (old & !m) | val;
                    match w.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Relaxed) {
                        Ok(_) => break,
                        Err(cur) => old = cur,
                    }
                }
            }
            pos += n;
            b += n as u64;
        }
        Ok(())
    }

    /// Sets every bit of serialized bytes `byte_offset .. byte_offset + len`
    /// (a qcow2 "all ones" bitmap cluster). The range is clamped to the
    /// bitmap; tail bits beyond [`bit_count`](Self::bit_count) stay 0.
    pub fn deserialize_ones(&self, byte_offset: u64, len: u64) {
        let (first, end) = self.serialized_bits(byte_offset, len);
        if first < end {
            words::set_bits(&self.words, first, end - 1);
        }
    }

    /// Whether serialized bytes `byte_offset .. byte_offset + len` contain no
    /// set bit (bytes past the end count as zero). Scans whole words, so a
    /// writer can cheaply skip clusters that need not be stored.
    pub fn is_serialized_range_zero(&self, byte_offset: u64, len: u64) -> bool {
        let (first, end) = self.serialized_bits(byte_offset, len);
        words::find_next(&self.words, first, end, true) >= end
    }
}

#[cfg(test)]
mod tests {
    use super::byte_mask;

    #[test]
    fn byte_masks() {
        assert_eq!(byte_mask(0, 8), u64::MAX);
        assert_eq!(byte_mask(0, 1), 0xff);
        assert_eq!(byte_mask(7, 1), 0xff << 56);
        assert_eq!(byte_mask(2, 3), 0xff_ffff << 16);
    }
}
