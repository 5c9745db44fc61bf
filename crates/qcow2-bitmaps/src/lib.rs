//! QEMU-compatible persistent dirty bitmaps in qcow2 images.
//!
//! [`Bitmaps`] holds every bitmap of one image in memory. It is loaded with
//! [`Bitmaps::open`] (read-write: loaded bitmaps are flagged IN_USE on disk, QEMU's
//! in-place order), marked from the request path with the lock-free [`Bitmaps::mark`],
//! changed with [`Bitmaps::add`], [`Bitmaps::remove`], [`Bitmaps::clear`],
//! [`Bitmaps::enable`], [`Bitmaps::disable`], [`Bitmaps::merge`], and written back with
//! [`Bitmaps::store`] (new clusters, header switch, then old clusters freed).
//!
//! The crate works on any [`qcow2::ImageMetadata`]; [`testing::MemImage`] is an
//! in-memory one with fault injection.

pub mod error;
pub mod format;
pub mod limits;
mod load;
mod ops;
mod set;
mod store;
mod table;
pub mod testing;

pub use dirty_bitmap::{DirtyBitmap, Extent};
pub use error::{Error, Result};
pub use load::{WARN_LEAKS, WARN_LOST_V2, WARN_LOST_V3};
pub use ops::{AddOptions, MergeSource};
pub use set::{BitmapInfo, Bitmaps};

#[cfg(test)]
mod tests;
