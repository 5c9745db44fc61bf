//! The [`DirtyBitmap`] type: geometry, marking, clearing and queries.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::words::{self, WORD_BITS};
use crate::Error;

/// Smallest granularity accepted, in bytes (QEMU's minimum).
pub const MIN_GRANULARITY: u64 = 512;

/// Largest granularity accepted, in bytes (2 GiB, QEMU's maximum).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// Largest serialized bitmap accepted, in bytes (512 MiB, QEMU's limit for a
/// persistent bitmap). This also bounds the memory of one bitmap: its words
/// take at most this many bytes plus 7.
pub const MAX_SERIALIZED_BYTES: u64 = 1 << 29;

/// A dirty bitmap over a virtual disk of `size` bytes with one bit per
/// `granularity` bytes.
///
/// Bit `k` covers guest bytes `k * granularity .. (k + 1) * granularity`;
/// the last granule may extend past `size` and still gets a bit. All methods
/// take `&self`: bits live in atomic words, so any number of threads can mark
/// concurrently without locks. Multi-word operations (such as
/// [`count`](Self::count) or [`snapshot`](Self::snapshot)) are atomic per
/// word, not as a whole.
///
/// Invariant: bits at index `bit_count()` and above in the last word are
/// always zero.
pub struct DirtyBitmap {
    pub(crate) words: Box<[AtomicU64]>,
    size: u64,
    granularity_bits: u32,
    bit_count: u64,
    enabled: AtomicBool,
}

/// Number of bits needed for `size` bytes at `granularity`, and the
/// serialized byte count, checked against [`MAX_SERIALIZED_BYTES`].
fn geometry(size: u64, granularity: u64) -> Result<(u64, u64), Error> {
    if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
    {
        return Err(Error::InvalidGranularity { granularity });
    }
    // div_ceil cannot overflow, unlike the `(size + g - 1) / g` idiom.
    let bits = size.div_ceil(granularity);
    let bytes = bits.div_ceil(8);
    if bytes > MAX_SERIALIZED_BYTES {
        return Err(Error::TooLarge {
            size,
            granularity,
            needed: bytes,
            limit: MAX_SERIALIZED_BYTES,
        });
    }
    Ok((bits, bytes))
}

/// Allocates `n` zeroed words without aborting on allocation failure.
fn alloc_words(n: usize) -> Result<Box<[AtomicU64]>, Error> {
    let failed = || Error::AllocationFailed {
        bytes: (n as u64).saturating_mul(8),
    };
    if n == 0 {
        return Ok(Box::new([]));
    }
    // Zeroed memory straight from the allocator: large bitmaps get fresh pages from the
    // kernel that are never touched (nor faulted in) until a bit in them is set, so
    // loading a mostly clean bitmap of a big disk costs no page faults for its clean
    // parts.
    let layout = std::alloc::Layout::array::<AtomicU64>(n).map_err(|_| failed())?;
    // SAFETY: `layout` has a non-zero size (n > 0 words of 8 bytes).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<AtomicU64>();
    if ptr.is_null() {
        return Err(failed());
    }
    // SAFETY: `ptr` was just allocated by the global allocator with the layout of
    // `[AtomicU64; n]`, which is what `Box<[AtomicU64]>` frees with; all-zero bytes are a
    // valid `AtomicU64` (0), so all n elements are initialized; nothing else owns it.
    Ok(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) })
}

impl DirtyBitmap {
    /// Creates an empty (all clean), enabled bitmap for a disk of `size`
    /// bytes.
    ///
    /// `granularity` must be a power of two between [`MIN_GRANULARITY`] and
    /// [`MAX_GRANULARITY`]; the serialized bitmap must not exceed
    /// [`MAX_SERIALIZED_BYTES`]. A size of 0 gives a bitmap without bits.
    pub fn new(size: u64, granularity: u64) -> Result<Self, Error> {
        let (bit_count, _) = geometry(size, granularity)?;
        // bit_count <= 2^32, so the word count fits in usize on 64-bit hosts;
        // on 32-bit hosts try_from rejects what cannot be addressed.
        let nwords = usize::try_from(bit_count.div_ceil(WORD_BITS)).map_err(|_| {
            Error::AllocationFailed {
                bytes: bit_count.div_ceil(8),
            }
        })?;
        Ok(Self {
            words: alloc_words(nwords)?,
            size,
            granularity_bits: granularity.trailing_zeros(),
            bit_count,
            enabled: AtomicBool::new(true),
        })
    }

    /// Virtual disk size in bytes covered by this bitmap.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes covered by one bit.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// log2 of [`granularity`](Self::granularity), as stored in a qcow2
    /// bitmap directory entry.
    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    /// Number of bits: `ceil(size / granularity)`.
    pub fn bit_count(&self) -> u64 {
        self.bit_count
    }

    /// Whether [`mark`](Self::mark) records writes. New bitmaps are enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Enables or disables recording by [`mark`](Self::mark). Other
    /// mutators ignore this flag.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// Inclusive bit range of every granule touching `offset..offset + len`,
    /// clamped to the disk; `None` if nothing remains.
    #[inline]
    fn bit_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((
            offset >> self.granularity_bits,
            (end - 1) >> self.granularity_bits,
        ))
    }

    /// Records a guest write of `len` bytes at `offset` if the bitmap is
    /// enabled.
    ///
    /// Sets every granule touching `offset..offset + len`; the range is
    /// clamped to the disk size and `len == 0` does nothing. Lock-free; when
    /// the bits are already set it only loads the words.
    ///
    /// Call it once the written data is visible to readers of the disk (for
    /// example right after the write completes, before acknowledging it to
    /// the guest): whoever later sees the bit, or takes it with
    /// [`snapshot_and_clear`](Self::snapshot_and_clear), then also sees the
    /// data.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) {
        if self.enabled.load(Ordering::Relaxed) {
            self.set_range(offset, len);
        }
    }

    /// Like [`mark`](Self::mark) but regardless of the enabled flag.
    #[inline]
    pub fn set_range(&self, offset: u64, len: u64) {
        if let Some((first, last)) = self.bit_range(offset, len) {
            words::set_bits(&self.words, first, last);
        }
    }

    /// Clears every granule touching `offset..offset + len` (clamped to the
    /// disk size; `len == 0` does nothing).
    ///
    /// Note that a granule only partly covered by the range is cleared too,
    /// including the bytes of it outside the range. Use granule-aligned
    /// ranges to clear exactly what you mean.
    pub fn clear_range(&self, offset: u64, len: u64) {
        if let Some((first, last)) = self.bit_range(offset, len) {
            words::clear_bits(&self.words, first, last);
        }
    }

    /// Clears all bits.
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Whether the granule holding byte `offset` is dirty; `false` for
    /// offsets at or past the disk size.
    pub fn get(&self, offset: u64) -> bool {
        offset < self.size && self.get_bit(offset >> self.granularity_bits)
    }

    /// Value of bit `bit`; `false` for bits at or past
    /// [`bit_count`](Self::bit_count).
    pub fn get_bit(&self, bit: u64) -> bool {
        bit < self.bit_count && words::test(&self.words, bit)
    }

    /// Number of dirty granules.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Whether no granule is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }

    /// Bytes covered by dirty granules, with the last granule clipped to the
    /// disk size.
    pub fn dirty_bytes(&self) -> u64 {
        let Some(last_bit) = self.bit_count.checked_sub(1) else {
            return 0;
        };
        let last_word = (last_bit / WORD_BITS) as usize;
        let mut count = 0u64;
        let mut last_dirty = false;
        for (i, w) in self.words.iter().enumerate() {
            let v = w.load(Ordering::Acquire);
            count += u64::from(v.count_ones());
            if i == last_word {
                last_dirty = (v >> (last_bit % WORD_BITS)) & 1 == 1;
            }
        }
        // bit_count <= 2^32 and granularity <= 2^31: products fit in u64,
        // but use u128 so this stays right if the limits ever change.
        let g = u128::from(self.granularity());
        let mut bytes = u128::from(count) * g;
        if last_dirty {
            bytes -= u128::from(self.bit_count) * g - u128::from(self.size);
        }
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }

    /// Copies the bitmap (bits, size, granularity and enabled flag).
    ///
    /// Each word is read atomically; marks that race with the copy may or
    /// may not be included. Use it to export while marking continues.
    pub fn snapshot(&self) -> DirtyBitmap {
        self.copy_words(|w| w.load(Ordering::Acquire))
    }

    /// Copies the bitmap and clears it, word by word with atomic swaps.
    ///
    /// A concurrent mark ends up either in the returned copy or in `self`,
    /// never lost: the building block for incremental backups.
    pub fn snapshot_and_clear(&self) -> DirtyBitmap {
        self.copy_words(|w| w.swap(0, Ordering::AcqRel))
    }

    fn copy_words(&self, read: impl Fn(&AtomicU64) -> u64) -> DirtyBitmap {
        DirtyBitmap {
            words: self.words.iter().map(|w| AtomicU64::new(read(w))).collect(),
            size: self.size,
            granularity_bits: self.granularity_bits,
            bit_count: self.bit_count,
            enabled: AtomicBool::new(self.is_enabled()),
        }
    }

    /// Mask of the valid bits of word `index` (all but the tail of the last
    /// word).
    pub(crate) fn valid_mask(&self, index: usize) -> u64 {
        let tail = self.bit_count % WORD_BITS;
        if tail != 0 && index as u64 == self.bit_count / WORD_BITS {
            (1u64 << tail) - 1
        } else {
            u64::MAX
        }
    }
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .field("bit_count", &self.bit_count)
            .field("enabled", &self.is_enabled())
            .field("dirty", &self.count())
            .finish()
    }
}

impl Clone for DirtyBitmap {
    /// Same as [`DirtyBitmap::snapshot`].
    fn clone(&self) -> Self {
        self.snapshot()
    }
}
