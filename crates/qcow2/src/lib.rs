//! A synchronous, thread-safe qcow2 (v2 and v3) and raw image engine that reads and
//! writes images exactly as QEMU does.
//!
//! * [`BlockImage`] is the data path a device model uses (one call per request, from
//!   any thread); [`DirectIo`] splits each request into a short metadata decision and
//!   data transfers the caller makes itself (io_uring), with no lock held meanwhile.
//! * [`Qcow2Image`] adds the metadata API the bitmap persistence crate builds on:
//!   cluster allocation and freeing, overlap-checked metadata writes, header
//!   extensions and autoclear bits — all under the same locks as the data path.
//! * [`create()`] makes new images and [`check()`] verifies (and repairs leaks in) them.

pub mod buffer;
pub mod check;
pub mod create;
pub mod direct;
pub mod error;
pub mod header;
pub mod offsets;
pub mod status;
pub mod storage;

mod cache;
mod compress;
mod gate;
mod image;
mod meta;
pub mod meta_api;
mod raw;

pub use buffer::AlignedBuf;
pub use check::{CheckReport, Repair};
pub use create::{create, create_on, CreateOptions};
pub use direct::{
    Attempt, DataFiles, DirectIo, ReadPiece, ReadPlan, Waker, WritePiece, WritePlan, ZeroPlan,
};
pub use error::{Error, Result};
pub use gate::IoTicket;
pub use header::CompressionType;
pub use image::{check, check_image, is_qcow2, BackingPolicy, OpenOptions, Qcow2Image};
pub use meta_api::{HeaderUpdate, ImageMetadata, AUTOCLEAR_BITMAPS, EXT_BITMAPS};
pub use offsets::{GuestOffset, HostOffset};
pub use raw::RawImage;
pub use status::BlockStatus;
pub use storage::{FileStorage, MemStorage, Storage, DIRECT_ALIGN};

/// The data path of a virtual disk. All methods take `&self` and may be called from
/// many threads at once; offsets and lengths are in bytes of the virtual disk.
pub trait BlockImage: Send + Sync + std::fmt::Debug {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// Fills `buf` from the disk at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` to the disk at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes `[offset, offset+len)` read as zeros; `may_unmap` allows deallocation.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Hints that `[offset, offset+len)` is no longer needed. Contents of the range
    /// become unspecified: whole clusters read as zeros (or the backing file in v2),
    /// partial clusters keep their data.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// The direct data path (plans whose bytes the caller moves itself, e.g. with
    /// io_uring), when the image has one.
    fn direct(&self) -> Option<&dyn DirectIo> {
        None
    }
    /// The allocation status of `[offset, offset+len)` as consecutive runs from `offset`
    /// with equal neighbours merged: at least one run when `len > 0`, at most
    /// [`status::MAX_STATUS_RUNS`]; they may end early (ask again from there) but never
    /// run past the range. The default reports everything as data of this layer.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>> {
        check_range(offset, len, self.size())?;
        let mut runs = Vec::new();
        status::push_status(
            &mut runs,
            BlockStatus {
                length: len,
                data: true,
                zero: false,
                depth: 1,
            },
        );
        Ok(runs)
    }
}

/// Checks that `[offset, offset+len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}
