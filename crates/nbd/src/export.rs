//! What the server serves: an [`Export`] is a disk the protocol knows nothing else about.

use std::io;

/// The meta context every export offers: allocation (bit 0 = hole, bit 1 = reads as zero).
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the range is a hole (not allocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1;
/// The prefix of QEMU's dirty-bitmap meta contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// QEMU's allocation-depth meta context (value = depth in the backing chain, 0 = unallocated).
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// One block-status extent: `length` bytes (never 0) with the context's `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u64,
    /// Context-specific flags.
    pub flags: u32,
}

/// A disk served over NBD. Called from several threads at once (one client's requests are
/// served concurrently); offsets and lengths are already checked against [`Export::size`].
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether WRITE, WRITE_ZEROES and TRIM are refused (the flags advertise read-only).
    fn read_only(&self) -> bool;
    /// Free-form text for `NBD_INFO_DESCRIPTION` and `nbdinfo --list`.
    fn description(&self) -> Option<String> {
        None
    }
    /// Preferred I/O block size for `NBD_INFO_BLOCK_SIZE` (minimum 1 is always announced).
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    /// The meta contexts besides [`BASE_ALLOCATION`] (which every export has), full names:
    /// `qemu:dirty-bitmap:NAME`, [`ALLOCATION_DEPTH`]. Read once per SET/LIST option.
    fn meta_contexts(&self) -> Vec<String>;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`; with `fua` it is durable on return.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Makes the range read as zeroes; `may_trim` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;
    /// Discards the range (contents become unspecified).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The status of `[offset, offset + len)` in `context` (one of [`BASE_ALLOCATION`] or
    /// a name from [`Export::meta_contexts`]): consecutive extents starting at `offset`,
    /// at least one and at most `max_extents`; they may end before `offset + len` (the
    /// client asks again) and the last may run past it (the server clips where the
    /// protocol requires). Equal neighbours should be merged.
    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>>;
}
