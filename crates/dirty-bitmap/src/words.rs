//! Bit-range primitives over a slice of atomic 64-bit words.
//!
//! Bit `k` lives in bit `k % 64` of word `k / 64`. All functions take bit
//! indices that the caller has already clamped to the slice
//! (`bit < words.len() * 64`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Number of bits in one storage word.
pub(crate) const WORD_BITS: u64 = u64::BITS as u64;

/// Mask with bits `lo..=hi` set (`lo <= hi < 64`).
#[inline]
pub(crate) fn mask(lo: u32, hi: u32) -> u64 {
    debug_assert!(lo <= hi && hi < 64);
    (u64::MAX << lo) & (u64::MAX >> (63 - hi))
}

/// Splits a bit index into (word index, bit within word).
#[inline]
fn split(bit: u64) -> (usize, u32) {
    // The word count fits in usize (it was allocated), so every valid word
    // index does too.
    ((bit / WORD_BITS) as usize, (bit % WORD_BITS) as u32)
}

/// ORs `m` into `w`, skipping the read-modify-write when all bits are set.
#[inline]
pub(crate) fn or_word(w: &AtomicU64, m: u64) {
    if w.load(Ordering::Relaxed) & m != m {
        w.fetch_or(m, Ordering::Release);
    }
}

/// Clears the bits of `m` in `w`, skipping the write when none is set.
#[inline]
fn and_not_word(w: &AtomicU64, m: u64) {
    if w.load(Ordering::Relaxed) & m != 0 {
        w.fetch_and(!m, Ordering::Release);
    }
}

/// Applies `op(word, mask)` to every word touched by bits `first..=last`.
#[inline]
fn for_range(words: &[AtomicU64], first: u64, last: u64, op: impl Fn(&AtomicU64, u64)) {
    debug_assert!(first <= last);
    let (fw, fb) = split(first);
    let (lw, lb) = split(last);
    if fw == lw {
        op(&words[fw], mask(fb, lb));
        return;
    }
    op(&words[fw], mask(fb, 63));
    for w in &words[fw + 1..lw] {
        op(w, u64::MAX);
    }
    op(&words[lw], mask(0, lb));
}

/// Sets bits `first..=last`.
#[inline]
pub(crate) fn set_bits(words: &[AtomicU64], first: u64, last: u64) {
    for_range(words, first, last, or_word);
}

/// Clears bits `first..=last`.
pub(crate) fn clear_bits(words: &[AtomicU64], first: u64, last: u64) {
    for_range(words, first, last, and_not_word);
}

/// Value of bit `bit`.
#[inline]
pub(crate) fn test(words: &[AtomicU64], bit: u64) -> bool {
    let (w, b) = split(bit);
    (words[w].load(Ordering::Acquire) >> b) & 1 == 1
}

/// First bit in `from..end` whose value equals `value`, or `end` if none.
///
/// `end` must not exceed `words.len() * 64`.
pub(crate) fn find_next(words: &[AtomicU64], from: u64, end: u64, value: bool) -> u64 {
    if from >= end {
        return end;
    }
    let load = |i: usize| {
        let w = words[i].load(Ordering::Acquire);
        if value {
            w
        } else {
            !w
        }
    };
    let (mut wi, b) = split(from);
    let mut w = load(wi) & (u64::MAX << b);
    loop {
        if w != 0 {
            let bit = wi as u64 * WORD_BITS + u64::from(w.trailing_zeros());
            return bit.min(end);
        }
        wi += 1;
        if wi as u64 * WORD_BITS >= end {
            return end;
        }
        w = load(wi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    fn raw(w: &[AtomicU64]) -> Vec<u64> {
        w.iter().map(|x| x.load(Ordering::Relaxed)).collect()
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0, 63), u64::MAX);
        assert_eq!(mask(0, 0), 1);
        assert_eq!(mask(63, 63), 1 << 63);
        assert_eq!(mask(4, 7), 0xf0);
    }

    #[test]
    fn set_and_clear_across_words() {
        let w = words(3);
        set_bits(&w, 60, 130);
        assert_eq!(raw(&w), vec![0xf << 60, u64::MAX, 0b111]);
        clear_bits(&w, 62, 128);
        assert_eq!(raw(&w), vec![0x3 << 60, 0, 0b110]);
    }

    #[test]
    fn find_next_both_values() {
        let w = words(3);
        set_bits(&w, 70, 140);
        assert_eq!(find_next(&w, 0, 192, true), 70);
        assert_eq!(find_next(&w, 70, 192, false), 141);
        assert_eq!(find_next(&w, 141, 192, true), 192);
        assert_eq!(find_next(&w, 141, 150, false), 141);
        assert_eq!(find_next(&w, 0, 50, true), 50);
        assert_eq!(find_next(&w, 100, 100, true), 100);
        assert!(test(&w, 70) && test(&w, 140) && !test(&w, 141) && !test(&w, 69));
    }
}
