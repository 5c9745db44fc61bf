//! Merging (bitwise OR) of one bitmap into another.

use std::sync::atomic::Ordering;

use crate::words;
use crate::{DirtyBitmap, Error};

impl DirtyBitmap {
    /// ORs `other` into `self`, regardless of the enabled flag.
    ///
    /// Both bitmaps must cover the same disk size; granularities may differ.
    /// A dirty granule of `other` marks every granule of `self` it touches,
    /// so no dirty byte is ever lost (a coarser target may over-report).
    pub fn merge_from(&self, other: &DirtyBitmap) -> Result<(), Error> {
        if self.size() != other.size() {
            return Err(Error::SizeMismatch {
                ours: self.size(),
                theirs: other.size(),
            });
        }
        if self.granularity_bits() == other.granularity_bits() {
            for (dst, src) in self.words.iter().zip(other.words.iter()) {
                let v = src.load(Ordering::Acquire);
                if v != 0 {
                    words::or_word(dst, v);
                }
            }
        } else {
            for (start, len) in other.dirty_extents() {
                self.set_range(start, len);
            }
        }
        Ok(())
    }
}
