//! Iteration over maximal runs of equal bits.

use std::iter::FusedIterator;

use crate::words;
use crate::DirtyBitmap;

/// A run of granules with the same state, in guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First guest byte of the run (granule aligned).
    pub start: u64,
    /// Length in bytes; the last run of the disk is clipped to the disk size.
    pub length: u64,
    /// Whether the granules of this run are dirty.
    pub dirty: bool,
}

/// Iterator over the [`Extent`]s of a bitmap, in order, covering
/// `0..size` with maximal runs (consecutive extents alternate in state).
///
/// Created by [`DirtyBitmap::extents`]. Words are read as the iterator
/// advances; with concurrent marking the runs still cover the disk in order
/// and alternate, but reflect the bits at the time each was read.
#[derive(Debug, Clone)]
pub struct Extents<'a> {
    bitmap: &'a DirtyBitmap,
    next_bit: u64,
    /// State of the next run; `None` before the first one is read.
    next_dirty: Option<bool>,
}

impl<'a> Extents<'a> {
    pub(crate) fn new(bitmap: &'a DirtyBitmap, first_bit: u64) -> Self {
        Self {
            bitmap,
            next_bit: first_bit,
            next_dirty: None,
        }
    }
}

impl Iterator for Extents<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        let bm = self.bitmap;
        let bits = bm.bit_count();
        if self.next_bit >= bits {
            return None;
        }
        let dirty = match self.next_dirty {
            Some(d) => d,
            None => bm.get_bit(self.next_bit),
        };
        // The state of `next_bit` itself is already known (read above, or
        // observed by the previous search), so the run holds at least that
        // bit even if it changed since: search from the bit after it.
        let end_bit = words::find_next(&bm.words, self.next_bit + 1, bits, !dirty);
        let gb = bm.granularity_bits();
        // end_bit <= bit_count <= 2^32 and gb <= 31, so the shifts fit.
        let start = self.next_bit << gb;
        let end = (end_bit << gb).min(bm.size());
        self.next_bit = end_bit;
        self.next_dirty = Some(!dirty);
        Some(Extent {
            start,
            length: end - start,
            dirty,
        })
    }
}

impl FusedIterator for Extents<'_> {}

impl DirtyBitmap {
    /// Iterates over maximal clean and dirty runs covering the whole disk.
    pub fn extents(&self) -> Extents<'_> {
        Extents::new(self, 0)
    }

    /// Iterates over maximal runs from the granule holding `offset` to the end of the
    /// disk (the first run starts at that granule's first byte, at or before `offset`).
    pub fn extents_from(&self, offset: u64) -> Extents<'_> {
        Extents::new(self, offset >> self.granularity_bits())
    }

    /// Iterates over `(start, length)` in bytes of the dirty runs.
    pub fn dirty_extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.extents()
            .filter(|e| e.dirty)
            .map(|e| (e.start, e.length))
    }
}

#[cfg(test)]
mod tests {
    use crate::DirtyBitmap;

    #[test]
    fn extents_from_start_at_the_granule_of_the_offset() {
        let bm = DirtyBitmap::new(1 << 20, 65536).unwrap();
        bm.set_range(65536 * 3, 65536 * 2);
        let from: Vec<_> = bm
            .extents_from(65536 * 2 + 100)
            .map(|e| (e.start, e.length, e.dirty))
            .collect();
        assert_eq!(
            from,
            vec![
                (131072, 65536, false),
                (196608, 131072, true),
                (327680, (1 << 20) - 327680, false)
            ]
        );
        assert_eq!(bm.extents_from(1 << 20).count(), 0, "nothing past the end");
        let all: Vec<_> = bm.extents().collect();
        assert_eq!(bm.extents_from(0).collect::<Vec<_>>(), all);
    }
}
