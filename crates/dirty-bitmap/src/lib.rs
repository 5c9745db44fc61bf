//! In-memory dirty bitmap for vhost-device-blk-bitmap.
//!
//! A [`DirtyBitmap`] records which granules of a virtual disk were written.
//! Marking is lock-free (atomic 64-bit words) and cheap when the bits are
//! already set, so it can sit on the I/O path of every queue thread.
//!
//! The serialized form ([`DirtyBitmap::serialize_into`],
//! [`DirtyBitmap::deserialize_from`]) is the one QEMU stores in qcow2
//! bitmap data clusters: bit `k` is bit `k % 8` (least significant first)
//! of byte `k / 8`.
//!
//! ```
//! use dirty_bitmap::DirtyBitmap;
//!
//! let bm = DirtyBitmap::new(1 << 30, 64 * 1024)?;
//! bm.mark(65_536, 4096); // granule #1
//! bm.mark(16 * 65_536, 65_537); // granules #16 and #17
//! let mut out = [0u8; 4];
//! bm.serialize_into(0, &mut out);
//! assert_eq!(out, [0x02, 0x00, 0x03, 0x00]);
//! # Ok::<(), dirty_bitmap::Error>(())
//! ```

mod bitmap;
mod error;
mod extents;
mod merge;
mod serialize;
mod words;

#[cfg(test)]
mod tests;

pub use bitmap::{DirtyBitmap, MAX_GRANULARITY, MAX_SERIALIZED_BYTES, MIN_GRANULARITY};
pub use error::Error;
pub use extents::{Extent, Extents};
