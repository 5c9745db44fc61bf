//! An open qcow2 image: the data path (reads, writes with copy-on-write, write-zeroes,
//! discard, flush) and the metadata API for the bitmap persistence crate.
//!
//! Locking: `meta` (a mutex) guards all metadata and is held only for metadata
//! decisions, never for guest data I/O (see [`crate::direct`]):
//! * a read or an in-place rewrite of allocated clusters looks its mapping up under
//!   `meta` and does its I/O after releasing it;
//! * an allocating write reserves its new clusters (refcount 1) and its guest clusters
//!   (`Meta::inflight`) under `meta`, does its copy-on-write and data I/O unlocked, and
//!   takes `meta` again to link the L2 entries. Another write, write-zeroes or discard
//!   touching a reserved guest cluster is answered Busy and retried when it is linked;
//! * a cluster that loses its last reference is freed only once no request that may
//!   still use it is in flight (the [`IoGate`] epochs), so it is never handed out while
//!   a read or write still targets it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::buffer::AlignedBuf;
use crate::cache::TableCache;
use crate::compress::decompress;
use crate::direct::{
    self, Allocation, Attempt, DataFiles, DirectIo, ReadPiece, ReadPlan, Waker, WritePiece,
    WritePlan, ZeroPlan,
};
use crate::error::{Error, IoContext, Result};
use crate::gate::IoGate;
use crate::header::{
    CompressionType, Header, AUTOCLEAR_DATA_FILE_RAW, EXT_BACKING_FORMAT, INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
use crate::meta::{Mapping, Meta, COPIED, REFT_OFFSET_MASK, ZERO};
use crate::status::{self, push_status, BlockStatus};
use crate::{check_range, BlockImage, FileStorage, HeaderUpdate, HostOffset, ImageMetadata};
use crate::{RawImage, Storage};

/// Longest backing chain we follow.
const MAX_BACKING_DEPTH: u32 = 16;
/// Memory for L2 tables per image.
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Memory for refcount blocks per image.
const RB_CACHE_BYTES: u64 = 4 << 20;

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Refuse writes and never modify the file.
    pub read_only: bool,
    /// Open the file with O_DIRECT.
    pub direct: bool,
    /// Autoclear bits the caller maintains; all others are cleared on a read-write open
    /// (bit 0, bitmaps, is cleared too unless named here: a writer that does not update
    /// the bitmaps must say so).
    pub known_autoclear: u64,
    /// Which backing files the image (and its chain) may name.
    pub backing: BackingPolicy,
}

/// Which backing files an image may name (QEMU opens any; a guest-writable raw image or
/// an image from an untrusted source can name any host file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Any file (QEMU's behaviour).
    #[default]
    Allow,
    /// None: an image with a backing file is refused.
    Deny,
    /// Only regular files inside the top image's directory tree, after resolving
    /// symlinks and `..`.
    WithinDir,
}

/// What a backing file open needs to know of the chain above it.
#[derive(Clone, Copy, Debug)]
struct ChainCtx<'a> {
    depth: u32,
    policy: BackingPolicy,
    /// The directory the chain must stay in (canonical), for `WithinDir`.
    root: Option<&'a Path>,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Image {
    storage: Arc<dyn Storage>,
    read_only: bool,
    size: u64,
    cluster_bits: u32,
    version: u32,
    compression: CompressionType,
    backing: Option<Arc<dyn BlockImage>>,
    /// The backing chain's files, nearest first.
    chain: Vec<PathBuf>,
    meta: RwLock<Meta>,
    gate: Arc<IoGate>,
}

/// What one guest cluster holds in this layer (for block status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Data,
    Zero,
    Unallocated,
}

/// Where the bytes of one piece of a guest range come from.
#[derive(Debug)]
enum Source {
    Host(u64),
    Zero,
    Backing(u64),
    Compressed { host: u64, clen: u64, skip: usize },
}

/// Probes whether the storage holds a qcow2 image.
pub fn is_qcow2(storage: &dyn Storage) -> Result<bool> {
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .ctx(|| "reading the image magic".into())?;
    Ok(u32::from_be_bytes(magic) == crate::header::MAGIC)
}

/// Checks a backing file name against the policy and opens the file read-only: never
/// blocking (a FIFO), and only a regular file or a block device.
fn open_backing_file(path: &Path, ctx: ChainCtx<'_>) -> Result<FileStorage> {
    let refuse =
        |why: String| Error::Unsupported(format!("backing file '{}' {why}", path.display()));
    match ctx.policy {
        BackingPolicy::Allow => {}
        BackingPolicy::Deny => {
            return Err(refuse(
                "refused: backing files are not allowed (backing policy deny)".into(),
            ))
        }
        BackingPolicy::WithinDir => {
            let real = path
                .canonicalize()
                .ctx(|| format!("Could not open backing file '{}'", path.display()))?;
            let root = ctx.root.unwrap_or(Path::new("/nonexistent"));
            if !real.starts_with(root) {
                return Err(refuse(format!(
                    "refused: it resolves to '{}', outside '{}' (backing policy within-dir)",
                    real.display(),
                    root.display()
                )));
            }
            if !std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
                return Err(refuse(
                    "refused: not a regular file (backing policy within-dir)".into(),
                ));
            }
        }
    }
    let storage = FileStorage::open_backing(path)
        .ctx(|| format!("Could not open backing file '{}'", path.display()))?;
    Ok(storage)
}

/// Opens an image file of either format read-only for use as a backing file; returns it
/// and the paths of its own chain (itself first).
fn open_backing(
    path: &Path,
    format: Option<&str>,
    ctx: ChainCtx<'_>,
) -> Result<(Arc<dyn BlockImage>, Vec<PathBuf>)> {
    if ctx.depth > MAX_BACKING_DEPTH {
        return Err(Error::InvalidImage(format!(
            "backing chain longer than {MAX_BACKING_DEPTH} images"
        )));
    }
    let storage: Arc<dyn Storage> = Arc::new(open_backing_file(path, ctx)?);
    let qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(f) => {
            return Err(Error::Unsupported(format!(
                "backing file format '{f}' is not supported"
            )))
        }
        None => is_qcow2(&*storage)?,
    };
    if qcow2 {
        let opts = OpenOptions {
            read_only: true,
            backing: ctx.policy,
            ..Default::default()
        };
        let img = Qcow2Image::open_with(storage, &opts, Some(path), ctx)?;
        let mut chain = vec![path.to_path_buf()];
        chain.extend(img.chain.iter().cloned());
        Ok((Arc::new(img), chain))
    } else {
        Ok((
            Arc::new(RawImage::new(storage, true)?),
            vec![path.to_path_buf()],
        ))
    }
}

impl Qcow2Image {
    /// Opens the qcow2 image at `path` (and its backing chain, read-only).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        let storage = FileStorage::open(path, !opts.read_only, opts.direct)
            .ctx(|| format!("Could not open '{}'", path.display()))?;
        let root = match opts.backing {
            BackingPolicy::WithinDir => Some(
                path.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .canonicalize()
                    .ctx(|| format!("resolving the folder of '{}'", path.display()))?,
            ),
            _ => None,
        };
        let ctx = ChainCtx {
            depth: 0,
            policy: opts.backing,
            root: root.as_deref(),
        };
        Self::open_with(Arc::new(storage), opts, Some(path), ctx)
    }

    /// Opens a qcow2 image on any storage. A backing file, if the image names one, is
    /// resolved relative to `path`'s folder (or the current folder).
    pub fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        let ctx = ChainCtx {
            depth: 0,
            policy: opts.backing,
            root: None,
        };
        Self::open_with(storage, opts, None, ctx)
    }

    fn open_with(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        path: Option<&Path>,
        ctx: ChainCtx<'_>,
    ) -> Result<Self> {
        let file_len = storage.len().ctx(|| "reading the image size".into())?;
        let mut first =
            vec![0u8; (1usize << crate::header::MAX_CLUSTER_BITS).min(file_len as usize)];
        storage
            .read_at(&mut first, 0)
            .ctx(|| "reading the qcow2 header".into())?;
        let header = Header::parse(&first, file_len)?;
        let cs = header.cluster_size();
        if header.crypt_method != 0 {
            return Err(Error::Unsupported(
                "encrypted qcow2 images are not supported".into(),
            ));
        }
        if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported(
                "qcow2 images with an external data file are not supported".into(),
            ));
        }
        if header.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(Error::Unsupported(
                "qcow2 images with extended L2 entries (subclusters) are not supported, \
                 neither read-only nor read-write"
                    .into(),
            ));
        }
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 && !opts.read_only {
            return Err(Error::InvalidImage(
                "qcow2: Image is corrupt; cannot be opened read/write".into(),
            ));
        }
        if header.nb_snapshots > 0 && opts.read_only {
            log::debug!("image has {} internal snapshots", header.nb_snapshots);
        }
        let (backing, chain) = match &header.backing_file {
            None => (None, Vec::new()),
            Some(name) => {
                let base = path.and_then(Path::parent).unwrap_or(Path::new("."));
                let p = if Path::new(name).is_absolute() {
                    PathBuf::from(name)
                } else {
                    base.join(name)
                };
                let fmt = header
                    .extension(EXT_BACKING_FORMAT)
                    .map(|f| String::from_utf8_lossy(f).into_owned());
                let below = ChainCtx {
                    depth: ctx.depth + 1,
                    ..ctx
                };
                let (img, chain) = open_backing(&p, fmt.as_deref(), below)?;
                (Some(img), chain)
            }
        };

        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        storage
            .read_at(&mut l1_bytes, header.l1_table_offset)
            .ctx(|| "reading the L1 table".into())?;
        let l1: Vec<u64> = l1_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let mut rt_bytes = vec![0u8; header.refcount_table_clusters as usize * cs as usize];
        storage
            .read_at(&mut rt_bytes, header.refcount_table_offset)
            .ctx(|| "reading the refcount table".into())?;
        let reftable: Vec<u64> = rt_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        for (i, e) in reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            if off != 0 && (off & (cs - 1) != 0 || off + cs > file_len) {
                return Err(Error::InvalidImage(format!(
                    "Refcount block {i} at {off:#x} is invalid or past the end of the file"
                )));
            }
            if off != 0 && off < cs {
                return Err(Error::InvalidImage(format!(
                    "Refcount block {i} overlaps the image header"
                )));
            }
        }
        let l2_tables = header.size.div_ceil(cs * (cs / 8)).max(1);
        let l2_cap = (L2_CACHE_BYTES / cs).min(l2_tables) as usize;
        let rb_cap = (RB_CACHE_BYTES / cs).max(4) as usize;
        let cluster_bits = header.cluster_bits;
        let gate = Arc::new(IoGate::default());
        let meta = Meta {
            storage: storage.clone(),
            cluster_bits,
            l1,
            l1_dirty: Default::default(),
            l2_cache: TableCache::new(l2_cap),
            reftable,
            reftable_dirty: Default::default(),
            rb_cache: TableCache::new(rb_cap),
            free_hint: 1,
            alloc_end: file_len.div_ceil(cs),
            pending_frees: Vec::new(),
            gate: gate.clone(),
            inflight: Default::default(),
            waiters: Default::default(),
            refcounts_unsynced: false,
            corrupt: None,
            header,
        };
        let img = Qcow2Image {
            storage,
            read_only: opts.read_only,
            size: meta.header.size,
            cluster_bits,
            version: meta.header.version,
            compression: meta.header.compression_type,
            backing,
            chain,
            meta: RwLock::new(meta),
            gate,
        };
        if !opts.read_only {
            img.prepare_read_write(opts)?;
        }
        Ok(img)
    }

    /// Read-write open: rebuild refcounts of a dirty image, drop autoclear bits the
    /// caller does not maintain.
    fn prepare_read_write(&self, opts: &OpenOptions) -> Result<()> {
        let dirty = self.lock().header.incompatible_features & INCOMPAT_DIRTY != 0;
        if dirty {
            log::info!("qcow2 image was not closed cleanly: rebuilding refcounts");
            let report = self.check(crate::check::Repair::All)?;
            if report.corruptions > report.corruptions_fixed {
                return Err(Error::InvalidImage(format!(
                    "could not repair the refcounts of an image left dirty: {report}"
                )));
            }
            let mut m = self.lock();
            m.header.incompatible_features &= !INCOMPAT_DIRTY;
            m.write_header()?;
            m.sync()?;
        }
        let mut m = self.lock();
        let keep = opts.known_autoclear & !AUTOCLEAR_DATA_FILE_RAW;
        if m.header.version >= 3 && m.header.autoclear_features & !keep != 0 {
            m.header.autoclear_features &= keep;
            m.write_header()?;
            m.sync()?;
        }
        Ok(())
    }

    /// Checks the image's metadata (as `qemu-img check`); with `repair` fixes what it
    /// may (the image must be writable). Runs with the data path quiesced: it fails
    /// while an allocating write is in flight.
    pub fn check(&self, repair: crate::check::Repair) -> Result<crate::check::CheckReport> {
        self.check_keeping(repair, &[])
    }

    /// [`Qcow2Image::check`], counting each `(offset, length)` of `keep` as referenced
    /// (clusters of structures the engine does not know).
    pub fn check_keeping(
        &self,
        repair: crate::check::Repair,
        keep: &[(u64, u64)],
    ) -> Result<crate::check::CheckReport> {
        if repair != crate::check::Repair::None && self.read_only {
            return Err(Error::ReadOnly);
        }
        self.flush_all()?;
        let mut m = self.lock();
        if !m.inflight.is_empty() {
            return Err(Error::Unsupported(
                "cannot check an image while writes are in flight".into(),
            ));
        }
        crate::check::check_metadata_keeping(&mut m, repair, keep)
    }

    /// The metadata, exclusively (every change, cache misses).
    pub(crate) fn lock(&self) -> RwLockWriteGuard<'_, Meta> {
        // A panic while holding the lock cannot leave the metadata half-updated in a way
        // the on-disk order does not tolerate, so a poisoned lock is still usable.
        self.meta.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The metadata, shared: lookups that the caches answer (reads and rewrites of
    /// allocated clusters on several queues do not wait for each other).
    fn read_meta(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }

    /// The storage under the image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Arc<dyn BlockImage>> {
        self.backing.as_ref()
    }

    /// The files of the backing chain, nearest first (empty without a backing file).
    pub fn backing_chain(&self) -> &[PathBuf] {
        &self.chain
    }

    fn writable(&self, m: &Meta) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if let Some(why) = &m.corrupt {
            return Err(Error::Corrupt(why.clone()));
        }
        Ok(())
    }

    // ---- reads -------------------------------------------------------------------

    /// Splits a guest range into sources, cluster by cluster, merging contiguous host
    /// pieces: under the shared lock when the caches know every cluster, else under the
    /// exclusive one.
    fn map_range(&self, offset: u64, len: u64) -> Result<Vec<(Source, usize)>> {
        {
            let m = self.read_meta();
            if let Some(plan) = self.sources(offset, len, |gc| Ok(m.peek_mapping(gc)))? {
                return Ok(plan);
            }
        }
        let mut m = self.lock();
        self.sources(offset, len, |gc| m.mapping(gc).map(Some))?
            .ok_or_else(|| Error::InvalidImage("guest range could not be mapped".into()))
    }

    /// The sources of `[offset, offset+len)` given a mapping function; `None` as soon as
    /// it does not know a cluster.
    fn sources(
        &self,
        offset: u64,
        len: u64,
        mut mapping: impl FnMut(u64) -> Result<Option<Mapping>>,
    ) -> Result<Option<Vec<(Source, usize)>>> {
        let cs = self.cluster_size();
        let mut plan: Vec<(Source, usize)> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            let Some(map) = mapping(gc)? else {
                return Ok(None);
            };
            let src = match map {
                Mapping::Normal(h, _) => Source::Host(h.0 + in_off),
                Mapping::Zero(..) => Source::Zero,
                Mapping::Unallocated if self.backing.is_some() => Source::Backing(pos),
                Mapping::Unallocated => Source::Zero,
                Mapping::Compressed(h, clen) => Source::Compressed {
                    host: h.0,
                    clen,
                    skip: in_off as usize,
                },
            };
            match (plan.last_mut(), &src) {
                (Some((Source::Host(h), l)), Source::Host(nh)) if *h + *l as u64 == *nh => {
                    *l += n as usize
                }
                (Some((Source::Zero, l)), Source::Zero) => *l += n as usize,
                (Some((Source::Backing(g), l)), Source::Backing(ng)) if *g + *l as u64 == *ng => {
                    *l += n as usize
                }
                _ => plan.push((src, n as usize)),
            }
            pos += n;
        }
        Ok(Some(plan))
    }

    /// What each guest cluster of `[offset, end)` holds, as spans of one kind (merged),
    /// stopping early after a bounded number of L2 lookups. Lookups the caches answer run
    /// under the shared lock; a table that must be read takes the exclusive one for that
    /// cluster only.
    fn layer_spans(&self, offset: u64, end: u64) -> Result<Vec<(Layer, u64)>> {
        const MAX_LOOKUPS: usize = 1 << 18;
        let cs = self.cluster_size();
        let mut spans: Vec<(Layer, u64)> = Vec::new();
        let mut pos = offset;
        let mut lookups = 0;
        let push = |spans: &mut Vec<(Layer, u64)>, layer: Layer, len: u64| match spans.last_mut() {
            Some((l, n)) if *l == layer => *n += len,
            _ => spans.push((layer, len)),
        };
        while pos < end && lookups < MAX_LOOKUPS && spans.len() < status::MAX_STATUS_RUNS {
            let gc = pos / cs;
            let m = self.read_meta();
            if let Some(next) = m.unmapped_until(gc) {
                let stop = next.saturating_mul(cs).min(end);
                push(&mut spans, Layer::Unallocated, stop - pos);
                pos = stop;
                continue;
            }
            let mapping = match m.peek_mapping(gc) {
                Some(map) => map,
                None => {
                    drop(m);
                    self.lock().mapping(gc)?
                }
            };
            lookups += 1;
            let layer = match mapping {
                Mapping::Normal(..) | Mapping::Compressed(..) => Layer::Data,
                Mapping::Zero(..) => Layer::Zero,
                Mapping::Unallocated => Layer::Unallocated,
            };
            let stop = ((gc + 1) * cs).min(end);
            push(&mut spans, layer, stop - pos);
            pos = stop;
        }
        Ok(spans)
    }

    /// The allocation status through the backing chain (see [`BlockImage::block_status`]).
    fn status_runs(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>> {
        check_range(offset, len, self.size)?;
        let mut runs = Vec::new();
        let mut pos = offset;
        for (layer, n) in self.layer_spans(offset, offset + len)? {
            let run = |length, data, zero, depth| BlockStatus {
                length,
                data,
                zero,
                depth,
            };
            match (layer, &self.backing) {
                (Layer::Data, _) => push_status(&mut runs, run(n, true, false, 1)),
                (Layer::Zero, _) => push_status(&mut runs, run(n, false, true, 1)),
                (Layer::Unallocated, None) => push_status(&mut runs, run(n, false, true, 0)),
                (Layer::Unallocated, Some(backing)) => {
                    // The backing file answers for what it covers; past its end: zeroes.
                    let covered = backing.size().saturating_sub(pos).min(n);
                    let mut done = 0;
                    while done < covered && runs.len() < status::MAX_STATUS_RUNS {
                        let below = backing.block_status(pos + done, covered - done)?;
                        done += below.iter().map(|r| r.length).sum::<u64>();
                        for r in status::deeper(below) {
                            push_status(&mut runs, r);
                        }
                    }
                    if done < covered {
                        return Ok(runs);
                    }
                    push_status(&mut runs, run(n - covered, false, true, 0));
                }
            }
            pos += n;
            if runs.len() >= status::MAX_STATUS_RUNS {
                break;
            }
        }
        Ok(runs)
    }

    /// Plans a read: the mapping is looked up under the lock; backing-file and compressed
    /// pieces are then read (unlocked) into buffers.
    fn plan_read_inner(&self, offset: u64, len: usize) -> Result<ReadPlan> {
        check_range(offset, len as u64, self.size)?;
        // Entered before the lookup: no cluster we map can be reused until we are done.
        let ticket = self.gate.enter();
        let sources = self.map_range(offset, len as u64)?;
        let mut pieces = Vec::with_capacity(sources.len());
        for (src, n) in sources {
            pieces.push(match src {
                Source::Host(h) => ReadPiece::Host { offset: h, len: n },
                Source::Zero => ReadPiece::Zero { len: n },
                Source::Backing(g) => {
                    let mut b = vec![0u8; n];
                    self.read_backing(&mut b, g)?;
                    ReadPiece::Bytes(b)
                }
                Source::Compressed { host, clen, skip } => {
                    let mut c = vec![0u8; self.cluster_size() as usize];
                    self.read_compressed(host, clen, &mut c)?;
                    c.truncate(skip + n);
                    c.drain(..skip);
                    ReadPiece::Bytes(c)
                }
            });
        }
        Ok(ReadPlan {
            pieces,
            _ticket: Some(ticket),
        })
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        if offset >= bsize {
            buf.fill(0);
            return Ok(());
        }
        let n = ((bsize - offset) as usize).min(buf.len());
        b.read_at(&mut buf[..n], offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    fn read_compressed(&self, host: u64, clen: u64, out: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        if clen > 2 * cs + 512 {
            return Err(Error::Corrupt(format!(
                "compressed cluster at {host:#x} claims {clen} bytes"
            )));
        }
        let mut input = vec![0u8; clen as usize];
        self.storage
            .read_at(&mut input, host)
            .ctx(|| format!("reading compressed cluster at {host:#x}"))?;
        decompress(self.compression, &input, out)
    }

    /// The whole current contents of guest cluster `gc` as mapped by `old`.
    fn cluster_contents(&self, gc: u64, old: Mapping, out: &mut [u8]) -> Result<()> {
        match old {
            Mapping::Normal(h, _) => self
                .storage
                .read_at(out, h.0)
                .ctx(|| format!("reading cluster at {h}")),
            Mapping::Zero(..) => {
                out.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_backing(out, gc * self.cluster_size()),
            Mapping::Compressed(h, clen) => self.read_compressed(h.0, clen, out),
        }
    }

    // ---- writes ------------------------------------------------------------------

    /// Plans a write: in place where the cluster is ours alone; elsewhere new clusters
    /// are reserved under the lock and prepared (zeroed, or filled with the old contents
    /// for copy-on-write) after it is released.
    fn begin_write_inner(
        &self,
        offset: u64,
        len: usize,
        waker: &Waker,
    ) -> Result<Attempt<WritePlan>> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len as u64, self.size)?;
        let mut plan = WritePlan {
            pieces: Vec::new(),
            allocations: Vec::new(),
            _ticket: None,
        };
        if len == 0 {
            return Ok(Attempt::Ready(plan));
        }
        plan._ticket = Some(self.gate.enter());
        let cs = self.cluster_size();
        let end = offset + len as u64;
        let first_gc = offset / cs;
        // Fast path: every cluster is ours to rewrite in place and none is being
        // allocated; the shared lock is enough.
        {
            let m = self.read_meta();
            self.writable(&m)?;
            if let Some(pieces) = self.in_place(&m, offset, end) {
                plan.pieces = pieces;
                return Ok(Attempt::Ready(plan));
            }
        }
        // Copy-on-write to do once the lock is released.
        let mut cow: Vec<Cow> = Vec::new();
        {
            let mut m = self.lock();
            self.writable(&m)?;
            if m.conflicts(first_gc, (end - 1) / cs - first_gc + 1, waker) {
                return Ok(Attempt::Busy);
            }
            if let Err(e) = self.reserve(&mut m, offset, end, &mut plan, &mut cow) {
                for a in plan.allocations.drain(..) {
                    m.inflight.remove(&a.guest_cluster);
                    if a.fresh {
                        let _ = m.update_refcounts(a.host / cs, 1, -1);
                    }
                }
                return Err(e);
            }
        }
        if let Err(e) = self.prepare_cow(&mut plan, cow) {
            let _ = self.finish_write_inner(plan, false);
            return Err(e);
        }
        Ok(Attempt::Ready(plan))
    }

    /// The pieces of a write that only rewrites clusters in place, if it is one.
    fn in_place(&self, m: &Meta, offset: u64, end: u64) -> Option<Vec<WritePiece>> {
        let cs = self.cluster_size();
        let mut pieces = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            if m.inflight.contains(&gc) {
                return None;
            }
            match m.peek_mapping(gc)? {
                Mapping::Normal(h, true) if m.data_cluster_ok(h) => push_data(
                    &mut pieces,
                    (pos - offset) as usize,
                    h.0 + in_off,
                    n as usize,
                ),
                _ => return None,
            }
            pos += n;
        }
        Some(pieces)
    }

    /// The locked part of `begin_write_inner`: maps or allocates every cluster of
    /// `[offset, end)` and records the pieces.
    fn reserve(
        &self,
        m: &mut Meta,
        offset: u64,
        end: u64,
        plan: &mut WritePlan,
        cow: &mut Vec<Cow>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            let at = (pos - offset) as usize;
            match m.mapping(gc)? {
                Mapping::Normal(h, true) => {
                    m.check_data_cluster(h)?;
                    push_data(&mut plan.pieces, at, h.0 + in_off, n as usize);
                    pos += n;
                }
                old if in_off == 0 && n == cs && !matches!(old, Mapping::Zero(Some(_), true)) => {
                    // A run of whole clusters that need fresh clusters: allocate them
                    // contiguously and write them in one go.
                    let mut run = 1u64;
                    while pos + (run + 1) * cs <= end {
                        let next = m.mapping(gc + run)?;
                        if matches!(
                            next,
                            Mapping::Normal(_, true) | Mapping::Zero(Some(_), true)
                        ) {
                            break;
                        }
                        run += 1;
                    }
                    let host = m.alloc_clusters(run)? * cs;
                    m.check_fresh(host, run * cs)?;
                    for i in 0..run {
                        m.inflight.insert(gc + i);
                        plan.allocations.push(Allocation {
                            guest_cluster: gc + i,
                            host: host + i * cs,
                            fresh: true,
                        });
                    }
                    push_data(&mut plan.pieces, at, host, (run * cs) as usize);
                    pos += run * cs;
                }
                old => {
                    // Part of a cluster, or a preallocated zero cluster we may reuse.
                    let (host, fresh) = match old {
                        Mapping::Zero(Some(h), true) => {
                            m.check_data_cluster(h)?;
                            (h.0, false)
                        }
                        _ => {
                            let host = m.alloc_clusters(1)? * cs;
                            m.check_fresh(host, cs)?;
                            (host, true)
                        }
                    };
                    m.inflight.insert(gc);
                    plan.allocations.push(Allocation {
                        guest_cluster: gc,
                        host,
                        fresh,
                    });
                    let reads_zero = match old {
                        Mapping::Zero(..) => true,
                        Mapping::Unallocated => self.backing.is_none(),
                        _ => false,
                    };
                    if n == cs {
                        push_data(&mut plan.pieces, at, host, n as usize);
                    } else if reads_zero {
                        // The rest of the cluster must read as zeros: zero it without
                        // transferring data, then write just the request's bytes.
                        cow.push(Cow::Zero { host });
                        push_data(&mut plan.pieces, at, host + in_off, n as usize);
                    } else {
                        cow.push(Cow::Copy {
                            piece: plan.pieces.len(),
                            guest_cluster: gc,
                            old,
                        });
                        plan.pieces.push(WritePiece::Merge {
                            offset: host,
                            buf: AlignedBuf::new(0),
                            skip: in_off as usize,
                            at,
                            len: n as usize,
                        });
                    }
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// Zeroes new clusters and reads old contents for copy-on-write (unlocked: the
    /// guest clusters are reserved, the old host clusters cannot be freed meanwhile).
    fn prepare_cow(&self, plan: &mut WritePlan, cow: Vec<Cow>) -> Result<()> {
        let cs = self.cluster_size();
        for c in cow {
            match c {
                Cow::Zero { host } => self
                    .storage
                    .zero_range(host, cs)
                    .ctx(|| format!("zeroing new cluster at {host:#x}"))?,
                Cow::Copy {
                    piece,
                    guest_cluster,
                    old,
                } => {
                    let mut b = AlignedBuf::new(cs as usize);
                    self.cluster_contents(guest_cluster, old, b.as_mut_slice())?;
                    if let WritePiece::Merge { buf, .. } = &mut plan.pieces[piece] {
                        *buf = b;
                    }
                }
            }
        }
        Ok(())
    }

    /// Links the new clusters of a completed write (or releases them after a failure)
    /// and wakes the requests that waited for them.
    fn finish_write_inner(&self, plan: WritePlan, ok: bool) -> Result<()> {
        if plan.allocations.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let (result, waiters) = {
            let mut m = self.lock();
            let mut linked = 0;
            let mut result = Ok(());
            if ok {
                for a in &plan.allocations {
                    let step = m.mapping(a.guest_cluster).and_then(|cur| {
                        m.set_l2_entry(a.guest_cluster, a.host | COPIED)?;
                        if a.fresh {
                            m.release(cur);
                        }
                        Ok(())
                    });
                    if let Err(e) = step {
                        result = Err(e);
                        break;
                    }
                    linked += 1;
                }
            }
            for (i, a) in plan.allocations.iter().enumerate() {
                m.inflight.remove(&a.guest_cluster);
                // Never referenced: give the cluster back at once.
                if i >= linked && a.fresh {
                    if let Err(e) = m.update_refcounts(a.host / cs, 1, -1) {
                        log::warn!("releasing cluster {:#x} after a failed write: {e}", a.host);
                    }
                }
            }
            (result, std::mem::take(&mut m.waiters.0))
        };
        for w in waiters {
            w();
        }
        result
    }

    /// Writes zeros through the write path (partial clusters of a write-zeroes).
    fn write_zeros_now(&self, offset: u64, len: u64, waker: &Waker) -> Result<Attempt<()>> {
        let zeros = vec![0u8; len as usize];
        let mut plan = match self.begin_write_inner(offset, len as usize, waker)? {
            Attempt::Busy => return Ok(Attempt::Busy),
            Attempt::Ready(p) => p,
        };
        let r = direct::execute_write(&*self.storage, &mut plan, &zeros);
        let fin = self.finish_write_inner(plan, r.is_ok());
        r.and(fin).map(Attempt::Ready)
    }

    /// Zeroes or deallocates whole clusters `[first, first+count)`. `discard` selects
    /// discard semantics (nothing is written where no metadata change can do it).
    fn zero_clusters(
        &self,
        m: &mut Meta,
        first: u64,
        count: u64,
        unmap: bool,
        discard: bool,
    ) -> Result<()> {
        let v3 = self.version >= 3;
        let has_backing = self.backing.is_some();
        let cs = self.cluster_size();
        for gc in first..first + count {
            let old = m.mapping(gc)?;
            let new = if v3 {
                if discard || unmap {
                    if has_backing {
                        ZERO
                    } else {
                        0
                    }
                } else {
                    match old {
                        Mapping::Normal(h, true) | Mapping::Zero(Some(h), true) => {
                            h.0 | COPIED | ZERO
                        }
                        _ if !has_backing => 0,
                        _ => ZERO,
                    }
                }
            } else if has_backing && !discard {
                // v2 cannot say "zero": write zeros into the cluster (under the lock;
                // only v2 images with a backing file take this path).
                let zeros = vec![0u8; cs as usize];
                write_cluster_locked(self, m, &zeros, gc * cs)?;
                continue;
            } else {
                0
            };
            if m.l2_entry(gc)? == new {
                continue;
            }
            m.set_l2_entry(gc, new)?;
            let keeps = new & crate::meta::OFFSET_MASK != 0;
            if !keeps {
                m.release(old);
            }
        }
        Ok(())
    }

    fn try_zero_or_discard(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        discard: bool,
        waker: &Waker,
    ) -> Result<Attempt<ZeroPlan>> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(Attempt::Ready(ZeroPlan::default()));
        }
        let cs = self.cluster_size();
        let end = offset + len;
        let first_full = offset.div_ceil(cs);
        // The last cluster of the disk counts as whole when the range reaches the end.
        let last_full = if end == self.size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if !discard {
            // Partial head and tail clusters are written with zeros (again, if a Busy
            // made us start over: harmless).
            let head_end = (first_full * cs).min(end);
            if offset < head_end && (first_full > last_full || !offset.is_multiple_of(cs)) {
                let n = if first_full > last_full {
                    len
                } else {
                    head_end - offset
                };
                if !self.reads_zero(offset / cs) {
                    if let Attempt::Busy = self.write_zeros_now(offset, n, waker)? {
                        return Ok(Attempt::Busy);
                    }
                }
            }
            if last_full >= first_full && end > last_full * cs && end != self.size {
                let n = end - last_full * cs;
                if !self.reads_zero(last_full) {
                    if let Attempt::Busy = self.write_zeros_now(last_full * cs, n, waker)? {
                        return Ok(Attempt::Busy);
                    }
                }
            }
        }
        if last_full <= first_full {
            return Ok(Attempt::Ready(ZeroPlan::default()));
        }
        let mut m = self.lock();
        self.writable(&m)?;
        if m.conflicts(first_full, last_full - first_full, waker) {
            return Ok(Attempt::Busy);
        }
        self.zero_clusters(&mut m, first_full, last_full - first_full, unmap, discard)?;
        if m.pending_frees.len() >= FREE_BATCH {
            // The tables that dropped the references must be durable before the
            // refcounts go down.
            m.writeback()?;
            m.sync()?;
            m.apply_pending_frees()?;
        }
        Ok(Attempt::Ready(ZeroPlan::default()))
    }

    /// Whether guest cluster `gc` reads as zeros already (a partial write-zeroes need
    /// not allocate it, as QEMU's).
    fn reads_zero(&self, gc: u64) -> bool {
        match self.read_meta().peek_mapping(gc) {
            Some(Mapping::Zero(..)) => true,
            Some(Mapping::Unallocated) => self.backing.is_none(),
            _ => false,
        }
    }

    fn prepare_flush_inner(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.lock().prepare_flush()
    }

    /// Writes every cached table and syncs the file (the image on disk is then
    /// complete and consistent).
    pub fn flush_all(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.lock().flush_all()
    }
}

/// Frees queued by discards are applied at the next flush, or at once when this many
/// have piled up.
const FREE_BATCH: usize = 1024;

/// Copy-on-write work of a planned write.
#[derive(Debug)]
enum Cow {
    /// A new cluster must read as zeros before the request's bytes go in.
    Zero { host: u64 },
    /// The old contents of a guest cluster go into a `Merge` piece.
    Copy {
        piece: usize,
        guest_cluster: u64,
        old: Mapping,
    },
}

/// Appends a data piece, merging it with the previous one when both the request and
/// the host ranges are contiguous.
fn push_data(pieces: &mut Vec<WritePiece>, at: usize, host: u64, len: usize) {
    if let Some(WritePiece::Data {
        at: pa,
        offset: po,
        len: pl,
    }) = pieces.last_mut()
    {
        if *pa + *pl == at && *po + *pl as u64 == host {
            *pl += len;
            return;
        }
    }
    pieces.push(WritePiece::Data {
        at,
        offset: host,
        len,
    });
}

/// Writes through the data path while the caller holds the metadata lock (v2 zeroing).
fn write_cluster_locked(img: &Qcow2Image, m: &mut Meta, data: &[u8], offset: u64) -> Result<()> {
    let cs = img.cluster_size();
    let gc = offset / cs;
    let old = m.mapping(gc)?;
    match old {
        Mapping::Normal(h, true) => img
            .storage
            .write_at(data, h.0)
            .ctx(|| format!("writing data at {h}")),
        old => {
            let host = m.alloc_clusters(1)? * cs;
            img.storage
                .write_at(data, host)
                .ctx(|| format!("writing data at {host:#x}"))?;
            m.set_l2_entry(gc, host | COPIED)?;
            m.release(old);
            Ok(())
        }
    }
}

impl BlockImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let plan = self.plan_read_inner(offset, buf.len())?;
        direct::execute_read(&*self.storage, plan, buf)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        direct::write_blocking(self, buf, offset)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>> {
        self.status_runs(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let plan =
            direct::blocking(|w| self.try_zero_or_discard(offset, len, may_unmap, false, w))?;
        direct::execute_zero(&*self.storage, plan)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let plan = direct::blocking(|w| self.try_zero_or_discard(offset, len, true, true, w))?;
        direct::execute_zero(&*self.storage, plan)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.prepare_flush_inner()?;
        self.storage.sync().ctx(|| "syncing the image".into())
    }

    fn direct(&self) -> Option<&dyn DirectIo> {
        Some(self)
    }
}

impl DirectIo for Qcow2Image {
    fn data_storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn data_files(&self) -> Option<DataFiles> {
        self.storage.data_files()
    }

    fn plan_read(&self, offset: u64, len: usize) -> Result<ReadPlan> {
        self.plan_read_inner(offset, len)
    }

    fn begin_write(&self, offset: u64, len: usize, waker: &Waker) -> Result<Attempt<WritePlan>> {
        self.begin_write_inner(offset, len, waker)
    }

    fn finish_write(&self, plan: WritePlan, ok: bool) -> Result<()> {
        self.finish_write_inner(plan, ok)
    }

    fn try_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        waker: &Waker,
    ) -> Result<Attempt<ZeroPlan>> {
        self.try_zero_or_discard(offset, len, unmap, false, waker)
    }

    fn try_discard(&self, offset: u64, len: u64, waker: &Waker) -> Result<Attempt<ZeroPlan>> {
        self.try_zero_or_discard(offset, len, true, true, waker)
    }

    fn prepare_flush(&self) -> Result<()> {
        self.prepare_flush_inner()
    }
}

impl ImageMetadata for Qcow2Image {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn autoclear_features(&self) -> u64 {
        self.lock().header.autoclear_features
    }

    fn header_extension(&self, magic: u32) -> Option<Vec<u8>> {
        self.lock().header.extension(magic).map(<[u8]>::to_vec)
    }

    fn update_header(&self, update: HeaderUpdate) -> Result<()> {
        let mut m = self.lock();
        self.writable(&m)?;
        m.writeback()?;
        // Sync before the header write so that whatever the new header points at (a new
        // bitmap directory, the clusters allocated for it) is durable first. An update
        // that changes nothing, only clears autoclear bits and/or drops extensions makes
        // the header point at nothing new: no earlier write has to reach the disk before
        // it (the sync after the write still makes everything durable before this
        // returns), so that sync is skipped. The rest of m.header was made durable before
        // it got there: an update that points at something new reaches m.header only
        // after this sync succeeded, a new refcount table is synced before it is named.
        let publishes = update
            .autoclear
            .is_some_and(|a| a & !m.header.autoclear_features != 0)
            || update.extensions.iter().any(|(_, data)| data.is_some());
        if publishes {
            m.sync()?;
        }
        let saved = m.header.clone();
        if let Some(a) = update.autoclear {
            if m.header.version < 3 {
                return Err(Error::Unsupported(
                    "qcow2 v2 images have no autoclear features".into(),
                ));
            }
            m.header.autoclear_features = a;
        }
        for (magic, data) in update.extensions {
            m.header.set_extension(magic, data);
        }
        if let Err(e) = m.header.serialize() {
            m.header = saved;
            return Err(e);
        }
        m.write_header()?;
        m.sync()
    }

    fn allocate_clusters(&self, count: u64) -> Result<HostOffset> {
        let mut m = self.lock();
        self.writable(&m)?;
        Ok(HostOffset(m.alloc_clusters(count)? * self.cluster_size()))
    }

    fn free_clusters(&self, offset: HostOffset, count: u64) -> Result<()> {
        let mut m = self.lock();
        self.writable(&m)?;
        if !offset.is_aligned(self.cluster_size()) || offset.0 == 0 {
            return Err(Error::InvalidImage(format!(
                "cannot free clusters at unaligned offset {offset}"
            )));
        }
        m.update_refcounts(offset.0 / self.cluster_size(), count, -1)
    }

    fn read_metadata(&self, offset: HostOffset, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_at(buf, offset.0)
            .ctx(|| format!("reading metadata at {offset}"))
    }

    fn file_len(&self) -> Option<u64> {
        self.storage.len().ok()
    }

    fn check_no_overlap(&self, offset: HostOffset, len: u64) -> Result<()> {
        self.lock().overlap_check(offset.0, len)
    }

    fn write_metadata(&self, offset: HostOffset, buf: &[u8]) -> Result<()> {
        let mut m = self.lock();
        self.writable(&m)?;
        m.overlap_check(offset.0, buf.len() as u64)?;
        self.storage
            .write_at(buf, offset.0)
            .ctx(|| format!("writing metadata at {offset}"))
    }

    fn flush_metadata(&self) -> Result<()> {
        self.flush_all()
    }

    fn write_owned(&self, offset: HostOffset, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.storage
            .write_at(buf, offset.0)
            .ctx(|| format!("writing {} bytes at {offset}", buf.len()))
    }

    fn write_owned_durable(&self, offset: HostOffset, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.storage
            .write_durable(buf, offset.0)
            .ctx(|| format!("writing {} bytes durably at {offset}", buf.len()))
    }

    fn repair_leaks(&self, keep: &[(u64, u64)]) -> Result<u64> {
        self.check_keeping(crate::check::Repair::Leaks, keep)
            .map(|r| r.leaks_fixed)
    }

    fn preallocate_owned(&self, offset: HostOffset, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.storage
            .zero_range(offset.0, len)
            .ctx(|| format!("preallocating {len} bytes at {offset}"))
    }

    fn sync_owned(&self) -> Result<()> {
        self.storage
            .sync()
            .ctx(|| "syncing the image file".to_string())
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Err(e) = self.flush_all() {
            log::error!("flushing the image on close failed: {e}");
        }
    }
}

/// Checks an open image (see [`Qcow2Image::check`]).
pub fn check_image(
    img: &Qcow2Image,
    repair: crate::check::Repair,
) -> Result<crate::check::CheckReport> {
    img.check(repair)
}

/// Opens the image at `path` (read-write when repairing) and checks it.
pub fn check(path: &Path, repair: crate::check::Repair) -> Result<crate::check::CheckReport> {
    let opts = OpenOptions {
        read_only: repair == crate::check::Repair::None,
        known_autoclear: crate::AUTOCLEAR_BITMAPS,
        ..Default::default()
    };
    Qcow2Image::open(path, &opts)?.check(repair)
}
