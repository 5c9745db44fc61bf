//! The metadata interface a qcow2 image offers to code that keeps its own structures in
//! the image (the persistent dirty bitmaps). [`crate::Qcow2Image`] implements it; tests
//! may implement it in memory.
//!
//! Every call takes the image's metadata lock, so it is safe against concurrent guest I/O.

use crate::{HostOffset, Result};

/// Magic of the bitmaps header extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear bit 0: the bitmaps extension is consistent with the data.
pub const AUTOCLEAR_BITMAPS: u64 = 1;

/// A change to the image header, applied by [`ImageMetadata::update_header`].
#[derive(Debug, Default, Clone)]
pub struct HeaderUpdate {
    /// New autoclear feature bits, when they change.
    pub autoclear: Option<u64>,
    /// Header extensions to set (`Some(data)`) or remove (`None`), by magic.
    pub extensions: Vec<(u32, Option<Vec<u8>>)>,
}

/// Cluster allocation, metadata I/O and header access for one qcow2 image.
pub trait ImageMetadata: Send + Sync {
    /// Cluster size in bytes (a power of two).
    fn cluster_size(&self) -> u64;
    /// qcow2 version: 2 or 3.
    fn version(&self) -> u32;
    /// Virtual disk size in bytes.
    fn virtual_size(&self) -> u64;
    /// Whether the image was opened read-only.
    fn is_read_only(&self) -> bool;
    /// The autoclear feature bits as in the header now.
    fn autoclear_features(&self) -> u64;
    /// The data of the header extension `magic`, if present.
    fn header_extension(&self, magic: u32) -> Option<Vec<u8>>;
    /// Flushes all cached metadata (so every allocation done so far is durable), then
    /// rewrites the header with `update` applied and syncs the file. Extensions not named
    /// in `update` are kept byte for byte.
    fn update_header(&self, update: HeaderUpdate) -> Result<()>;
    /// Allocates `count` contiguous clusters with refcount 1. Their contents are undefined.
    fn allocate_clusters(&self, count: u64) -> Result<HostOffset>;
    /// Drops one reference from each of `count` clusters starting at `offset`. The caller
    /// must already have removed (durably) every on-disk reference to them.
    fn free_clusters(&self, offset: HostOffset, count: u64) -> Result<()>;
    /// Reads metadata bytes at a host offset (bytes past the end read as zeros).
    fn read_metadata(&self, offset: HostOffset, buf: &mut [u8]) -> Result<()>;
    /// Writes metadata bytes at a host offset, refusing writes that overlap the header,
    /// L1/L2 tables, refcount structures, snapshot table or bitmap directory.
    fn write_metadata(&self, offset: HostOffset, buf: &[u8]) -> Result<()>;
    /// Writes every cached metadata table and syncs the file.
    fn flush_metadata(&self) -> Result<()>;
    /// Writes bytes into clusters the caller allocated and owns (not engine metadata)
    /// without taking the metadata lock, so guest I/O is not held up.
    fn write_owned(&self, offset: HostOffset, buf: &[u8]) -> Result<()> {
        self.write_metadata(offset, buf)
    }
    /// Makes every completed write to the file durable (fdatasync), without writing back
    /// cached metadata or taking the metadata lock.
    fn sync_owned(&self) -> Result<()> {
        self.flush_metadata()
    }
    /// Like [`ImageMetadata::write_owned`], returning once these bytes are durable (where
    /// the storage can, without making anything else durable: see
    /// `Storage::write_durable`).
    fn write_owned_durable(&self, offset: HostOffset, buf: &[u8]) -> Result<()> {
        self.write_owned(offset, buf)?;
        self.sync_owned()
    }
    /// Makes `[offset, offset+len)` of clusters the caller allocated and owns read as
    /// zeros with storage blocks allocated for it, so later writes there cannot fail for
    /// lack of space (where the storage can promise that: a file system that allocates on
    /// `fallocate`, not a copy-on-write one). The default writes zeros.
    fn preallocate_owned(&self, offset: HostOffset, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_owned(HostOffset(offset.0 + done), &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
    /// Lowers the refcount of every cluster nothing references (leaked by a crash), as
    /// `qemu-img check -r leaks` does, counting each `(offset, length)` of `keep` as
    /// referenced (structures the engine does not know); returns how many clusters were
    /// fixed. Only while the caller holds no allocation that nothing references yet.
    /// The default does nothing.
    fn repair_leaks(&self, keep: &[(u64, u64)]) -> Result<u64> {
        let _ = keep;
        Ok(0)
    }
    /// Size of the image file in bytes, when known: clusters named by other structures
    /// must lie inside it.
    fn file_len(&self) -> Option<u64> {
        None
    }
    /// Fails if `[offset, offset+len)` overlaps the engine's own metadata (header, L1 and
    /// L2 tables, refcount table and blocks, snapshot table, bitmap directory).
    fn check_no_overlap(&self, offset: HostOffset, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}
