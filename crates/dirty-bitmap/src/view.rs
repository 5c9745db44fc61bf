//! Read-only access to a bitmap.

use crate::{DirtyBitmap, Extents};

/// A read-only view of a [`DirtyBitmap`]: queries, extents and
/// serialization, but no way to change bits or the enabled flag.
///
/// Hand it to exporters (NBD block status, qcow2 store) so they cannot
/// modify the live bitmap. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct BitmapView<'a> {
    inner: &'a DirtyBitmap,
}

impl<'a> BitmapView<'a> {
    pub(crate) fn new(inner: &'a DirtyBitmap) -> Self {
        Self { inner }
    }

    /// See [`DirtyBitmap::size`].
    pub fn size(&self) -> u64 {
        self.inner.size()
    }

    /// See [`DirtyBitmap::granularity`].
    pub fn granularity(&self) -> u64 {
        self.inner.granularity()
    }

    /// See [`DirtyBitmap::granularity_bits`].
    pub fn granularity_bits(&self) -> u32 {
        self.inner.granularity_bits()
    }

    /// See [`DirtyBitmap::bit_count`].
    pub fn bit_count(&self) -> u64 {
        self.inner.bit_count()
    }

    /// See [`DirtyBitmap::is_enabled`].
    pub fn is_enabled(&self) -> bool {
        self.inner.is_enabled()
    }

    /// See [`DirtyBitmap::get`].
    pub fn get(&self, offset: u64) -> bool {
        self.inner.get(offset)
    }

    /// See [`DirtyBitmap::get_bit`].
    pub fn get_bit(&self, bit: u64) -> bool {
        self.inner.get_bit(bit)
    }

    /// See [`DirtyBitmap::count`].
    pub fn count(&self) -> u64 {
        self.inner.count()
    }

    /// See [`DirtyBitmap::is_clean`].
    pub fn is_clean(&self) -> bool {
        self.inner.is_clean()
    }

    /// See [`DirtyBitmap::dirty_bytes`].
    pub fn dirty_bytes(&self) -> u64 {
        self.inner.dirty_bytes()
    }

    /// See [`DirtyBitmap::extents`].
    pub fn extents(&self) -> Extents<'a> {
        self.inner.extents()
    }

    /// See [`DirtyBitmap::dirty_extents`].
    pub fn dirty_extents(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        self.inner.dirty_extents()
    }

    /// See [`DirtyBitmap::serialized_len`].
    pub fn serialized_len(&self) -> u64 {
        self.inner.serialized_len()
    }

    /// See [`DirtyBitmap::serialize_into`].
    pub fn serialize_into(&self, byte_offset: u64, out: &mut [u8]) {
        self.inner.serialize_into(byte_offset, out)
    }

    /// See [`DirtyBitmap::is_serialized_range_zero`].
    pub fn is_serialized_range_zero(&self, byte_offset: u64, len: u64) -> bool {
        self.inner.is_serialized_range_zero(byte_offset, len)
    }

    /// An owned copy of the viewed bitmap; see [`DirtyBitmap::snapshot`].
    pub fn snapshot(&self) -> DirtyBitmap {
        self.inner.snapshot()
    }
}

impl<'a> From<&'a DirtyBitmap> for BitmapView<'a> {
    fn from(bitmap: &'a DirtyBitmap) -> Self {
        Self::new(bitmap)
    }
}
