//! An in-memory [`ImageMetadata`] for tests: a byte vector as the file, a first-fit
//! cluster allocator with a refcount map that tests can inspect, a log of every
//! mutating call, and fault injection (fail the Nth mutating call or allocation).
//!
//! It is stricter than a real image: reading or writing a cluster whose refcount is 0,
//! writing cluster 0, writing the live bitmap directory while autoclear bit 0 is set,
//! and freeing a free cluster are all errors. That turns "a freed cluster is still
//! referenced" into a failing read when the state is loaded again.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use qcow2::{
    Error, HeaderUpdate, HostOffset, ImageMetadata, Result, AUTOCLEAR_BITMAPS, EXT_BITMAPS,
};

/// One mutating call, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `write_metadata(offset, len)`.
    Write {
        /// Host offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `flush_metadata()`.
    Flush,
    /// `update_header`: the autoclear bits and bitmaps extension after it.
    Header {
        /// Autoclear bits written.
        autoclear: u64,
        /// Bitmaps extension written.
        bitmaps_ext: Option<Vec<u8>>,
    },
    /// `allocate_clusters`.
    Alloc {
        /// First cluster.
        offset: u64,
        /// Cluster count.
        count: u64,
    },
    /// `free_clusters`.
    Free {
        /// First cluster.
        offset: u64,
        /// Cluster count.
        count: u64,
    },
}

/// The durable state and knobs of a [`MemImage`].
#[derive(Clone, Debug)]
pub struct MemState {
    /// File contents.
    pub file: Vec<u8>,
    /// Cluster size.
    pub cluster_size: u64,
    /// qcow2 version.
    pub version: u32,
    /// Virtual disk size.
    pub virtual_size: u64,
    /// Opened read-only.
    pub read_only: bool,
    /// Autoclear bits.
    pub autoclear: u64,
    /// Header extensions by magic.
    pub extensions: BTreeMap<u32, Vec<u8>>,
    /// Refcount per cluster index (absent = 0).
    pub refcounts: BTreeMap<u64, u32>,
    /// Mutating calls so far.
    pub log: Vec<Op>,
    /// Fail the mutating call (write, flush, header) with this 0-based index.
    pub fail_op: Option<usize>,
    /// When the failing call is a header update, apply it before failing (write done,
    /// sync failed).
    pub fail_header_after_write: bool,
    /// Fail the allocation with this 0-based index.
    pub fail_alloc: Option<usize>,
    /// Mutating calls counted for `fail_op`.
    pub ops: usize,
    /// Allocations counted for `fail_alloc`.
    pub allocs: usize,
    /// A full file system: writes reaching past this file length fail with ENOSPC
    /// (allocations still succeed, as the engine's only change refcounts).
    pub file_limit: Option<u64>,
}

/// An in-memory image implementing [`ImageMetadata`].
#[derive(Debug)]
pub struct MemImage {
    inner: Mutex<MemState>,
}

fn injected(what: &str) -> Error {
    Error::io(
        format!("injected fault in {what}"),
        io::Error::from_raw_os_error(5), // EIO
    )
}

impl MemImage {
    /// A v3 image with `cluster_size` clusters and `virtual_size` bytes; cluster 0 (the
    /// header) is allocated.
    pub fn new(cluster_size: u64, virtual_size: u64) -> Self {
        let mut refcounts = BTreeMap::new();
        refcounts.insert(0, 1);
        MemImage {
            inner: Mutex::new(MemState {
                file: vec![0; cluster_size as usize],
                cluster_size,
                version: 3,
                virtual_size,
                read_only: false,
                autoclear: 0,
                extensions: BTreeMap::new(),
                refcounts,
                log: Vec::new(),
                fail_op: None,
                fail_header_after_write: false,
                fail_alloc: None,
                ops: 0,
                allocs: 0,
                file_limit: None,
            }),
        }
    }

    /// An image with the given state (e.g. a copy of another one's, to "reopen" it).
    pub fn from_state(state: MemState) -> Self {
        MemImage {
            inner: Mutex::new(state),
        }
    }

    /// Locks and returns the state for inspection or changes.
    pub fn state(&self) -> MutexGuard<'_, MemState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the durable state with a clean log and no faults armed.
    pub fn reopen_state(&self, read_only: bool) -> MemState {
        let mut s = self.state().clone();
        s.log.clear();
        s.fail_op = None;
        s.fail_alloc = None;
        s.fail_header_after_write = false;
        s.ops = 0;
        s.allocs = 0;
        s.read_only = read_only;
        s
    }

    /// Number of allocated clusters (refcount > 0), header included.
    pub fn allocated_clusters(&self) -> usize {
        self.state().refcounts.values().filter(|&&r| r > 0).count()
    }
}

impl MemState {
    fn check_allocated(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size;
        for c in offset / cs..=(offset + len - 1) / cs {
            if self.refcounts.get(&c).copied().unwrap_or(0) == 0 {
                return Err(Error::InvalidImage(format!(
                    "{what} at {offset:#x} (+{len}) touches free cluster {c}"
                )));
            }
        }
        Ok(())
    }

    fn mutating(&mut self, what: &str) -> Result<bool> {
        let n = self.ops;
        self.ops += 1;
        if self.fail_op == Some(n) {
            return Err(injected(what));
        }
        Ok(true)
    }

    fn bitmap_dir_range(&self) -> Option<(u64, u64)> {
        if self.autoclear & AUTOCLEAR_BITMAPS == 0 {
            return None;
        }
        let x = self.extensions.get(&EXT_BITMAPS)?;
        if x.len() != 24 {
            return None;
        }
        let size = u64::from_be_bytes(x[8..16].try_into().ok()?);
        let off = u64::from_be_bytes(x[16..24].try_into().ok()?);
        Some((off, size))
    }
}

impl ImageMetadata for MemImage {
    fn cluster_size(&self) -> u64 {
        self.state().cluster_size
    }
    fn version(&self) -> u32 {
        self.state().version
    }
    fn virtual_size(&self) -> u64 {
        self.state().virtual_size
    }
    fn is_read_only(&self) -> bool {
        self.state().read_only
    }
    fn autoclear_features(&self) -> u64 {
        self.state().autoclear
    }
    fn header_extension(&self, magic: u32) -> Option<Vec<u8>> {
        self.state().extensions.get(&magic).cloned()
    }

    fn update_header(&self, update: HeaderUpdate) -> Result<()> {
        let mut s = self.state();
        if s.read_only {
            return Err(Error::ReadOnly);
        }
        let failing = s.fail_op == Some(s.ops);
        let apply = |s: &mut MemState| {
            if let Some(a) = update.autoclear {
                s.autoclear = a;
            }
            for (magic, data) in &update.extensions {
                match data {
                    Some(d) => {
                        s.extensions.insert(*magic, d.clone());
                    }
                    None => {
                        s.extensions.remove(magic);
                    }
                }
            }
            let op = Op::Header {
                autoclear: s.autoclear,
                bitmaps_ext: s.extensions.get(&EXT_BITMAPS).cloned(),
            };
            s.log.push(op);
        };
        if failing && s.fail_header_after_write {
            apply(&mut s);
        }
        s.mutating("update_header")?;
        apply(&mut s);
        Ok(())
    }

    fn allocate_clusters(&self, count: u64) -> Result<HostOffset> {
        let mut s = self.state();
        if s.read_only {
            return Err(Error::ReadOnly);
        }
        let n = s.allocs;
        s.allocs += 1;
        if s.fail_alloc == Some(n) {
            return Err(Error::NoSpace("injected allocation failure".into()));
        }
        if count == 0 {
            return Err(Error::InvalidImage("allocation of 0 clusters".into()));
        }
        let mut start = 1u64;
        while let Some(used) =
            (start..start + count).find(|c| s.refcounts.get(c).copied().unwrap_or(0) > 0)
        {
            start = used + 1;
        }
        for c in start..start + count {
            s.refcounts.insert(c, 1);
        }
        let cs = s.cluster_size;
        let end = ((start + count) * cs) as usize;
        if s.file.len() < end {
            s.file.resize(end, 0);
        }
        // Contents of new clusters are undefined: make stale data visible to tests.
        s.file[(start * cs) as usize..end].fill(0xa5);
        s.log.push(Op::Alloc {
            offset: start * cs,
            count,
        });
        Ok(HostOffset(start * cs))
    }

    fn free_clusters(&self, offset: HostOffset, count: u64) -> Result<()> {
        let mut s = self.state();
        let cs = s.cluster_size;
        let first = offset.get() / cs;
        for c in first..first + count {
            match s.refcounts.get(&c).copied().unwrap_or(0) {
                0 => {
                    return Err(Error::InvalidImage(format!("double free of cluster {c}")));
                }
                1 => {
                    s.refcounts.remove(&c);
                }
                r => {
                    s.refcounts.insert(c, r - 1);
                }
            }
        }
        s.log.push(Op::Free {
            offset: offset.get(),
            count,
        });
        Ok(())
    }

    fn read_metadata(&self, offset: HostOffset, buf: &mut [u8]) -> Result<()> {
        let s = self.state();
        s.check_allocated(offset.get(), buf.len() as u64, "read")?;
        let start = offset.get() as usize;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = s.file.get(start + i).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn write_metadata(&self, offset: HostOffset, buf: &[u8]) -> Result<()> {
        let mut s = self.state();
        if s.read_only {
            return Err(Error::ReadOnly);
        }
        let (off, len) = (offset.get(), buf.len() as u64);
        if off < s.cluster_size {
            return Err(Error::Overlap {
                offset: off,
                len,
                what: "the header",
            });
        }
        if let Some((doff, dsize)) = s.bitmap_dir_range() {
            if off < doff + dsize && doff < off + len {
                return Err(Error::Overlap {
                    offset: off,
                    len,
                    what: "the bitmap directory",
                });
            }
        }
        s.check_allocated(off, len, "write")?;
        if s.file_limit.is_some_and(|limit| off + len > limit) {
            return Err(Error::io(
                format!("writing {len} bytes at {off:#x}"),
                io::Error::from_raw_os_error(28), // ENOSPC
            ));
        }
        s.mutating("write_metadata")?;
        let end = (off + len) as usize;
        if s.file.len() < end {
            s.file.resize(end, 0);
        }
        s.file[off as usize..end].copy_from_slice(buf);
        s.log.push(Op::Write { offset: off, len });
        Ok(())
    }

    fn flush_metadata(&self) -> Result<()> {
        let mut s = self.state();
        s.mutating("flush_metadata")?;
        s.log.push(Op::Flush);
        Ok(())
    }
}
