//! Crash-consistent bitmaps: a persistent **shadow** of every bitmap that is in use on
//! disk, so a bitmap left IN_USE by a crash can be recovered as a correct superset
//! instead of being lost. The on-disk format and the crash-safe orders are documented in
//! `docs/crash-consistent-bitmaps.md`; in short:
//!
//! * a private header extension ([`EXT_SHADOW`]) points at a run of clusters (the
//!   *region*): a 16 KiB *mask area* (which directory entries the shadow covers, for which
//!   directory, with a CRC) and the shadow bits (one bit per `2^granularity_bits` bytes of
//!   the disk, LSB first, like QEMU's bitmap data);
//! * the private autoclear bit [`AUTOCLEAR_SHADOW`] says that no other program opened the
//!   image read-write since we wrote it: QEMU clears unknown autoclear bits when it does;
//! * while a covered bitmap is IN_USE on disk, every granule a guest write may change is
//!   durable in the shadow before the write is submitted ([`Shadow::check`],
//!   [`Shadow::cover`], the syncer [`Shadow::run_syncer`] with group commit);
//! * on open, a covered IN_USE bitmap of a trusted shadow is recovered as its stored bits
//!   OR the shadow bits.
//!
//! The region exists only while bitmaps are in use: a store that leaves no covered bitmap
//! in use removes the extension in the same header write that switches the directory,
//! then frees the region, so a cleanly closed image is exactly what QEMU would write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use qcow2::{HostOffset, ImageMetadata, Waker, AUTOCLEAR_BITMAPS};

use crate::error::{Error, Result};
use crate::format::{BitmapsExt, DirEntry, FLAG_IN_USE};

/// Magic of the shadow header extension ("vbsh"; private to this project, QEMU keeps
/// unknown extensions byte for byte).
pub const EXT_SHADOW: u32 = 0x7662_7368;
/// Private autoclear bit: set ⇔ the shadow may be trusted (no program that does not know
/// it opened the image read-write since).
pub const AUTOCLEAR_SHADOW: u64 = 1 << 63;
/// The autoclear bits to pass to the engine (`known_autoclear`) when opening an image
/// whose bitmaps this crate manages.
pub const KNOWN_AUTOCLEAR: u64 = AUTOCLEAR_BITMAPS | AUTOCLEAR_SHADOW;
/// Format version of the extension and region.
pub const SHADOW_VERSION: u32 = 1;
/// Default bytes per shadow bit (1 MiB): coarser than the usual bitmap granularity, so
/// first touches (each a synced metadata write, shared by every request waiting for it)
/// are few; a crash then costs at most one such granule per changed region.
pub const DEFAULT_GRANULARITY: u64 = 1 << 20;
/// The shadow never has more bits than this (16 MiB on disk); the granularity grows
/// with the disk to stay under it.
pub const MAX_SHADOW_BITS: u64 = 1 << 27;

/// Length of the extension data.
const EXT_LEN: usize = 32;
/// Bytes before the shadow bits in the region: the mask header and the coverage mask.
pub(crate) const MASK_AREA: u64 = 16384;
/// Mask header: magic, directory offset, entry count, CRC, mask length.
const MASK_HEADER: usize = 32;
const MASK_MAGIC: [u8; 8] = *b"VDBBSHDW";
/// Shadow bits are written in pages of this size.
const PAGE: u64 = 4096;
const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 40;

/// Bytes per shadow bit for a disk of `virtual_size` bytes whose finest bitmap has
/// `min_bitmap_granularity` bytes per bit (a power of two).
pub fn granularity_bits_for(virtual_size: u64, min_bitmap_granularity: Option<u64>) -> u32 {
    let want = min_bitmap_granularity
        .unwrap_or(DEFAULT_GRANULARITY)
        .max(DEFAULT_GRANULARITY);
    let mut bits = want
        .trailing_zeros()
        .clamp(MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS);
    while bits < MAX_GRANULARITY_BITS && virtual_size.div_ceil(1u64 << bits) > MAX_SHADOW_BITS {
        bits += 1;
    }
    bits
}

/// Bytes of shadow bits (whole pages) for `nbits` bits.
fn bits_len(nbits: u64) -> u64 {
    nbits.div_ceil(8).div_ceil(PAGE) * PAGE
}

/// The shadow header extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowExt {
    /// Host offset of the region (cluster aligned).
    pub region_offset: u64,
    /// Region length in bytes (whole clusters).
    pub region_len: u64,
    /// Virtual disk size the shadow covers.
    pub virtual_size: u64,
    /// log2 of the bytes per shadow bit.
    pub granularity_bits: u32,
}

impl ShadowExt {
    /// Region length for a disk size and granularity, in whole clusters.
    fn region_len_for(virtual_size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
        let nbits = virtual_size.div_ceil(1u64 << granularity_bits);
        (MASK_AREA + bits_len(nbits)).div_ceil(cluster_size) * cluster_size
    }

    /// Number of shadow bits.
    fn nbits(&self) -> u64 {
        self.virtual_size.div_ceil(1u64 << self.granularity_bits)
    }

    /// The extension bytes (big-endian, like every qcow2 field).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXT_LEN);
        v.extend_from_slice(&self.region_offset.to_be_bytes());
        v.extend_from_slice(&self.region_len.to_be_bytes());
        v.extend_from_slice(&self.virtual_size.to_be_bytes());
        v.extend_from_slice(&self.granularity_bits.to_be_bytes());
        v.extend_from_slice(&SHADOW_VERSION.to_be_bytes());
        v
    }

    /// Parses the extension and checks it against the image: version, granularity, disk
    /// size, region length, alignment, inside the file and clear of the engine's
    /// metadata. `None` (with the reason) if anything is off.
    pub fn parse(data: &[u8], img: &dyn ImageMetadata) -> std::result::Result<Self, String> {
        if data.len() != EXT_LEN {
            return Err(format!(
                "extension length {} (expected {EXT_LEN})",
                data.len()
            ));
        }
        let be64 = |r: std::ops::Range<usize>| u64::from_be_bytes(data[r].try_into().unwrap());
        let be32 = |r: std::ops::Range<usize>| u32::from_be_bytes(data[r].try_into().unwrap());
        let ext = ShadowExt {
            region_offset: be64(0..8),
            region_len: be64(8..16),
            virtual_size: be64(16..24),
            granularity_bits: be32(24..28),
        };
        let version = be32(28..32);
        if version != SHADOW_VERSION {
            return Err(format!("unknown version {version}"));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&ext.granularity_bits) {
            return Err(format!("granularity bits {}", ext.granularity_bits));
        }
        if ext.virtual_size != img.virtual_size() {
            return Err(format!(
                "made for a disk of {} bytes, the disk has {}",
                ext.virtual_size,
                img.virtual_size()
            ));
        }
        if ext.nbits() > MAX_SHADOW_BITS {
            return Err("too many shadow bits".into());
        }
        let cs = img.cluster_size();
        if ext.region_len != Self::region_len_for(ext.virtual_size, ext.granularity_bits, cs) {
            return Err(format!("region length {}", ext.region_len));
        }
        if ext.region_offset == 0 || !ext.region_offset.is_multiple_of(cs) {
            return Err(format!("region offset {:#x}", ext.region_offset));
        }
        let end = ext
            .region_offset
            .checked_add(ext.region_len)
            .ok_or("region past the end of the file")?;
        if img.file_len().is_some_and(|len| end > len) {
            return Err("region past the end of the file".into());
        }
        img.check_no_overlap(HostOffset(ext.region_offset), ext.region_len)
            .map_err(|e| format!("region overlaps image metadata: {e}"))?;
        Ok(ext)
    }
}

/// The mask area: which entries of which directory the shadow covers.
fn mask_area(dir: Option<BitmapsExt>, covered: &[bool]) -> Vec<u8> {
    let mut area = vec![0u8; MASK_AREA as usize];
    let mask_len = covered.len().div_ceil(8);
    area[0..8].copy_from_slice(&MASK_MAGIC);
    area[8..16].copy_from_slice(&dir.map_or(0, |d| d.directory_offset).to_be_bytes());
    area[16..20].copy_from_slice(&(covered.len() as u32).to_be_bytes());
    area[24..28].copy_from_slice(&(mask_len as u32).to_be_bytes());
    for (i, &c) in covered.iter().enumerate() {
        if c {
            area[MASK_HEADER + i / 8] |= 1 << (i % 8);
        }
    }
    let crc = crc32fast::hash(&area[..MASK_HEADER + mask_len]);
    area[20..24].copy_from_slice(&crc.to_be_bytes());
    area
}

/// Reads the coverage mask back; `None` unless it is intact and made for `dir`.
fn parse_mask(area: &[u8], dir: &BitmapsExt) -> Option<Vec<bool>> {
    if area.len() < MASK_HEADER || area[0..8] != MASK_MAGIC {
        return None;
    }
    let dir_offset = u64::from_be_bytes(area[8..16].try_into().ok()?);
    let n = u32::from_be_bytes(area[16..20].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(area[20..24].try_into().ok()?);
    let mask_len = u32::from_be_bytes(area[24..28].try_into().ok()?) as usize;
    if mask_len != n.div_ceil(8) || MASK_HEADER + mask_len > area.len() {
        return None;
    }
    let mut copy = area[..MASK_HEADER + mask_len].to_vec();
    copy[20..24].fill(0);
    if crc32fast::hash(&copy) != crc {
        return None;
    }
    if dir_offset != dir.directory_offset || n != dir.nb_bitmaps as usize {
        return None;
    }
    Some(
        (0..n)
            .map(|i| area[MASK_HEADER + i / 8] & (1 << (i % 8)) != 0)
            .collect(),
    )
}

/// What the open found about the shadow.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// The extension as parsed, when structurally valid.
    pub ext: Option<ShadowExt>,
    /// Its clusters are ours (the autoclear bit is still set): they may be reused or
    /// freed. When false they are left alone (leaked: another program may own them now).
    pub ours: bool,
    /// Trusted coverage of the current directory, with the shadow bits as words.
    pub trusted: Option<(Vec<bool>, Vec<u64>)>,
    /// Why the shadow is not trusted (for the log), when an extension was present.
    pub why_not: Option<String>,
}

/// Reads the shadow of `img` for the directory `dir` (the bitmaps extension on disk).
/// Never fails: anything off makes the shadow untrusted.
pub(crate) fn read_found(img: &dyn ImageMetadata, dir: Option<BitmapsExt>) -> Found {
    let Some(data) = img.header_extension(EXT_SHADOW) else {
        return Found::default();
    };
    let ext = match ShadowExt::parse(&data, img) {
        Ok(x) => x,
        Err(why) => {
            return Found {
                why_not: Some(format!("the shadow extension is invalid: {why}")),
                ..Found::default()
            }
        }
    };
    let ac = img.autoclear_features();
    let ours = ac & AUTOCLEAR_SHADOW != 0;
    let mut found = Found {
        ext: Some(ext),
        ours,
        ..Found::default()
    };
    if !ours {
        found.why_not = Some(
            "another program opened the image read-write since the shadow was written \
             (its autoclear bit is clear)"
                .into(),
        );
        return found;
    }
    if ac & AUTOCLEAR_BITMAPS == 0 {
        found.why_not = Some("the bitmaps autoclear bit is clear".into());
        return found;
    }
    let Some(dir) = dir else {
        return found;
    };
    let mut area = vec![0u8; MASK_AREA as usize];
    if let Err(e) = img.read_metadata(HostOffset(ext.region_offset), &mut area) {
        found.why_not = Some(format!("reading the shadow failed: {e}"));
        return found;
    }
    let Some(mask) = parse_mask(&area, &dir) else {
        found.why_not =
            Some("the shadow's coverage is not for the current bitmap directory".into());
        return found;
    };
    let nbits = ext.nbits();
    let mut bytes = vec![0u8; bits_len(nbits) as usize];
    if let Err(e) = img.read_metadata(HostOffset(ext.region_offset + MASK_AREA), &mut bytes) {
        found.why_not = Some(format!("reading the shadow bits failed: {e}"));
        return found;
    }
    let nwords = nbits.div_ceil(64) as usize;
    let mut words: Vec<u64> = bytes
        .chunks_exact(8)
        .take(nwords)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // Bits past the disk are meaningless: drop them.
    if nbits % 64 != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (nbits % 64)) - 1;
        }
    }
    found.trusted = Some((mask, words));
    found
}

/// A header extension to set (`Some(data)`) or remove (`None`), by magic.
pub(crate) type ExtChange = (u32, Option<Vec<u8>>);

/// Whether a write may be submitted now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cover {
    /// Every granule of the range is durable in the shadow (or no shadow is needed).
    Ready,
    /// The syncer is making them durable; the waker is called when a batch is done.
    Pending,
    /// The shadow can be neither written nor turned off: the write must fail.
    Failed(String),
}

/// Whether the shadow is being kept.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    /// Not armed: no covered bitmap is in use on disk.
    Idle,
    /// Armed: writes wait for their granules.
    Armed,
    /// Turned off after a failure (the autoclear bit was cleared on disk).
    Disabled(String),
    /// A failure that could not even clear the bit: writes fail.
    Failed(String),
}

/// The region this process writes.
#[derive(Clone, Copy, Debug)]
struct Region {
    ext: ShadowExt,
    /// The header points at it now.
    installed: bool,
}

struct Inner {
    mode: Mode,
    region: Option<Region>,
    /// A region found on open that is ours but not (yet) reused: freed once the header no
    /// longer points at it.
    stale: Option<ShadowExt>,
    /// Ranges of granules `(first, last)` waiting for the syncer.
    wanted: Vec<(u64, u64)>,
    wakers: Vec<Waker>,
    shutdown: bool,
    /// The syncer is writing pages of the region (it must not be freed meanwhile).
    persisting: bool,
    /// Counters: syncs done and granules made durable.
    syncs: u64,
    granules: u64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("mode", &self.mode)
            .field("region", &self.region)
            .field("wanted", &self.wanted.len())
            .field("wakers", &self.wakers.len())
            .finish_non_exhaustive()
    }
}

/// Counters of a [`Shadow`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Whether writes currently wait for the shadow.
    pub armed: bool,
    /// Bytes per shadow bit.
    pub granularity: u64,
    /// Syncs (group commits) done.
    pub syncs: u64,
    /// Granules made durable.
    pub granules: u64,
}

/// The in-memory side of the shadow of one image (shared by the request path, the
/// syncer thread and the bitmap operations).
pub struct Shadow {
    enabled: bool,
    granularity_bits: u32,
    nbits: u64,
    /// Fast path: false ⇒ no write needs to wait.
    armed: AtomicBool,
    /// Bits known to be durable in the current region.
    durable: Box<[AtomicU64]>,
    inner: Mutex<Inner>,
    /// Signalled after every batch (blocking waiters).
    done: Condvar,
    /// Signalled when there is work for the syncer.
    work: Condvar,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("enabled", &self.enabled)
            .field("granularity_bits", &self.granularity_bits)
            .field("armed", &self.armed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shadow {
    /// A shadow for a disk of `virtual_size` bytes; `enabled: false` keeps none (but still
    /// removes a shadow found on disk before bitmaps are flagged in use again).
    pub(crate) fn new(virtual_size: u64, granularity_bits: u32, enabled: bool) -> Self {
        let nbits = virtual_size.div_ceil(1u64 << granularity_bits);
        let nwords = if enabled { nbits.div_ceil(64) } else { 0 };
        Shadow {
            enabled,
            granularity_bits,
            nbits,
            armed: AtomicBool::new(false),
            durable: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            inner: Mutex::new(Inner {
                mode: Mode::Idle,
                region: None,
                stale: None,
                wanted: Vec::new(),
                wakers: Vec::new(),
                shutdown: false,
                persisting: false,
                syncs: 0,
                granules: 0,
            }),
            done: Condvar::new(),
            work: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the shadow is kept at all (`--no-crash-consistent-bitmaps` turns it off).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Bytes per shadow bit.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// Counters.
    pub fn stats(&self) -> ShadowStats {
        let inner = self.lock();
        ShadowStats {
            armed: self.armed.load(Ordering::Relaxed),
            granularity: self.granularity(),
            syncs: inner.syncs,
            granules: inner.granules,
        }
    }

    /// Granules `(first, last)` of a byte range, or `None` for an empty range.
    fn granules(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || self.nbits == 0 {
            return None;
        }
        let last_byte = offset.saturating_add(len - 1);
        let first = (offset >> self.granularity_bits).min(self.nbits - 1);
        let last = (last_byte >> self.granularity_bits).min(self.nbits - 1);
        Some((first, last))
    }

    fn is_durable(&self, g: u64) -> bool {
        self.durable[(g / 64) as usize].load(Ordering::Acquire) & (1 << (g % 64)) != 0
    }

    /// The first granule of `first..=last` that is not durable yet.
    fn first_missing(&self, first: u64, last: u64) -> Option<u64> {
        (first..=last).find(|&g| !self.is_durable(g))
    }

    /// Whether a write of `[offset, offset + len)` may be submitted now; if not, asks the
    /// syncer for its granules and calls `waker` (if given) after the batch is durable.
    /// Cheap when the granules are durable already: one atomic load per granule.
    pub fn check(&self, offset: u64, len: u64, waker: Option<&Waker>) -> Cover {
        if !self.armed.load(Ordering::Acquire) {
            return self.idle_answer();
        }
        let Some((first, last)) = self.granules(offset, len) else {
            return Cover::Ready;
        };
        let Some(missing) = self.first_missing(first, last) else {
            return Cover::Ready;
        };
        let mut inner = self.lock();
        match &inner.mode {
            Mode::Armed => {}
            Mode::Failed(why) => return Cover::Failed(why.clone()),
            Mode::Idle | Mode::Disabled(_) => return Cover::Ready,
        }
        if self.first_missing(missing, last).is_none() {
            return Cover::Ready;
        }
        inner.wanted.push((missing, last));
        if let Some(w) = waker {
            if !inner.wakers.iter().any(|x| std::sync::Arc::ptr_eq(x, w)) {
                inner.wakers.push(w.clone());
            }
        }
        self.work.notify_one();
        Cover::Pending
    }

    fn idle_answer(&self) -> Cover {
        // A failure that could not clear the autoclear bit keeps `armed` set, so only
        // the slow path can report it; here everything is fine.
        Cover::Ready
    }

    /// Blocks until every granule of `[offset, offset + len)` is durable (or no shadow is
    /// needed). Errors when the shadow failed and could not be turned off.
    pub fn cover(&self, offset: u64, len: u64) -> std::result::Result<(), String> {
        self.cover_ranges(&[(offset, len)])
    }

    /// [`Shadow::cover`] for many ranges at once (one wait for all of them).
    pub fn cover_ranges(&self, ranges: &[(u64, u64)]) -> std::result::Result<(), String> {
        loop {
            let mut pending = false;
            for &(o, l) in ranges {
                match self.check(o, l, None) {
                    Cover::Ready => {}
                    Cover::Pending => pending = true,
                    Cover::Failed(why) => return Err(why),
                }
            }
            if !pending {
                return Ok(());
            }
            let inner = self.lock();
            // Wait for a batch unless the requests were taken and finished meanwhile.
            let all_done = ranges.iter().all(|&(o, l)| {
                self.granules(o, l)
                    .is_none_or(|(f, t)| self.first_missing(f, t).is_none())
            });
            if !all_done && matches!(inner.mode, Mode::Armed) {
                let _g = self
                    .done
                    .wait_timeout(inner, std::time::Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// The syncer: makes requested granules durable, many requests per sync, until
    /// [`Shadow::shutdown`]. Run it on its own thread with the image the bitmaps belong to.
    pub fn run_syncer(&self, img: &dyn ImageMetadata) {
        loop {
            let mut inner = self.lock();
            while inner.wanted.is_empty() && !inner.shutdown {
                inner = self.work.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
            if inner.wanted.is_empty() && inner.shutdown {
                return;
            }
            let wanted = std::mem::take(&mut inner.wanted);
            let wakers = std::mem::take(&mut inner.wakers);
            let region = inner.region;
            let armed = matches!(inner.mode, Mode::Armed);
            inner.persisting = true;
            drop(inner);
            let result = match region {
                Some(r) if armed => self.persist(img, &r.ext, &wanted),
                _ => Ok(0),
            };
            let mut inner = self.lock();
            inner.persisting = false;
            match result {
                Ok(n) => {
                    if n > 0 {
                        inner.syncs += 1;
                        inner.granules += n;
                    }
                }
                Err(e) => self.fail(img, &mut inner, e),
            }
            drop(inner);
            self.done.notify_all();
            for w in wakers {
                w();
            }
        }
    }

    /// Stops the syncer once the requests it has are done.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.work.notify_all();
    }

    /// Writes the pages holding the wanted granules (durable bits | new bits), syncs, then
    /// publishes the bits. Returns the number of granules newly made durable.
    fn persist(
        &self,
        img: &dyn ImageMetadata,
        ext: &ShadowExt,
        wanted: &[(u64, u64)],
    ) -> std::result::Result<u64, String> {
        // New bits per word, in word order.
        let mut add: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
        for &(first, last) in wanted {
            let (fw, lw) = (first / 64, last / 64);
            for w in fw..=lw {
                let lo = if w == fw { first % 64 } else { 0 };
                let hi = if w == lw { last % 64 } else { 63 };
                let mask = if hi - lo == 63 {
                    u64::MAX
                } else {
                    ((1u64 << (hi - lo + 1)) - 1) << lo
                };
                let missing = mask & !self.durable[w as usize].load(Ordering::Acquire);
                if missing != 0 {
                    *add.entry(w).or_default() |= missing;
                }
            }
        }
        if add.is_empty() {
            return Ok(0);
        }
        let words_per_page = PAGE / 8;
        let nwords = self.durable.len() as u64;
        let pages: std::collections::BTreeSet<u64> =
            add.keys().map(|w| w / words_per_page).collect();
        // Consecutive pages go out in one write.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in pages {
            match runs.last_mut() {
                Some((_, end)) if *end == p => *end = p + 1,
                _ => runs.push((p, p + 1)),
            }
        }
        for (start, end) in runs {
            let mut buf = vec![0u8; ((end - start) * PAGE) as usize];
            for w in start * words_per_page..(end * words_per_page).min(nwords) {
                let v = self.durable[w as usize].load(Ordering::Acquire)
                    | add.get(&w).copied().unwrap_or(0);
                let at = ((w - start * words_per_page) * 8) as usize;
                buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            img.write_owned(
                HostOffset(ext.region_offset + MASK_AREA + start * PAGE),
                &buf,
            )
            .map_err(|e| format!("writing the bitmap shadow failed: {e}"))?;
        }
        img.sync_owned()
            .map_err(|e| format!("syncing the bitmap shadow failed: {e}"))?;
        let mut n = 0;
        for (w, bits) in add {
            self.durable[w as usize].fetch_or(bits, Ordering::AcqRel);
            n += u64::from(bits.count_ones());
        }
        Ok(n)
    }

    /// The shadow could not be written: turn it off on disk (clear its autoclear bit, so
    /// in-use bitmaps stay inconsistent after a crash, as without it) and let writes go
    /// on; if even that fails, writes fail.
    fn fail(&self, img: &dyn ImageMetadata, inner: &mut Inner, why: String) {
        let cleared = img.update_header(qcow2::HeaderUpdate {
            autoclear: Some(img.autoclear_features() & !AUTOCLEAR_SHADOW),
            extensions: Vec::new(),
        });
        match cleared {
            Ok(()) => {
                log::error!(
                    "{why}; crash-consistent bitmaps are off until the next start (a crash \
                     now leaves the bitmaps in use, as without them)"
                );
                inner.mode = Mode::Disabled(why);
                // The region stays ours (we cleared the bit ourselves): the next store
                // removes the extension and frees it.
                self.armed.store(false, Ordering::Release);
            }
            Err(e) => {
                let why = format!("{why}; turning the shadow off failed too: {e}");
                log::error!("{why}; guest writes fail until the daemon restarts");
                inner.mode = Mode::Failed(why);
            }
        }
    }

    /// Takes what the open found: a trusted shadow's bits become the durable bits of the
    /// reused region; a region that is ours but not reusable is freed later.
    pub(crate) fn adopt(&self, found: &Found) {
        let mut inner = self.lock();
        let Some(ext) = found.ext else {
            return;
        };
        if !found.ours {
            if let Some(why) = &found.why_not {
                log::warn!(
                    "the bitmap shadow is not used: {why}; its {} bytes at {:#x} are left \
                     allocated ('qemu-img check -r leaks' reclaims them)",
                    ext.region_len,
                    ext.region_offset
                );
            }
            return;
        }
        // The set keeps the granularity of a region of ours (see `open_with`).
        let reusable = self.enabled && ext.granularity_bits == self.granularity_bits;
        match (&found.trusted, reusable) {
            (Some((_, words)), true) => {
                for (d, &w) in self.durable.iter().zip(words) {
                    d.store(w, Ordering::Release);
                }
                inner.region = Some(Region {
                    ext,
                    installed: true,
                });
            }
            (None, true) => {
                // Ours and intact, but no coverage to recover: reuse it from empty.
                inner.region = Some(Region {
                    ext,
                    installed: true,
                });
            }
            _ => inner.stale = Some(ext),
        }
    }

    /// Arms the shadow before entries are flagged IN_USE in place: writes the region
    /// (coverage of `dir` per `covered`, the durable bits) into a region of its own
    /// (allocating and installing one in the header if needed) and syncs it. After this
    /// returns, every write waits for its granules.
    pub(crate) fn arm(
        &self,
        img: &dyn ImageMetadata,
        dir: Option<BitmapsExt>,
        covered: &[bool],
    ) -> Result<()> {
        let mut inner = self.lock();
        if !self.enabled || matches!(inner.mode, Mode::Disabled(_) | Mode::Failed(_)) {
            drop(inner);
            return self.remove_from_header(img);
        }
        let keep_bits = self.armed.load(Ordering::Acquire);
        if !keep_bits
            && !inner
                .region
                .is_some_and(|r| r.installed && self.any_durable())
        {
            // Nothing covered is in use: the bits start empty.
            for d in self.durable.iter() {
                d.store(0, Ordering::Release);
            }
        }
        let cs = img.cluster_size();
        let (ext, fresh) = match inner.region {
            Some(r) => (r.ext, false),
            None => {
                let region_len =
                    ShadowExt::region_len_for(img.virtual_size(), self.granularity_bits, cs);
                let off = img
                    .allocate_clusters(region_len / cs)
                    .map_err(Error::UpdateExtension)?;
                (
                    ShadowExt {
                        region_offset: off.0,
                        region_len,
                        virtual_size: img.virtual_size(),
                        granularity_bits: self.granularity_bits,
                    },
                    true,
                )
            }
        };
        let written = self.write_region(img, &ext, dir, covered);
        if let Err(e) = written {
            if fresh {
                crate::store::free_allocated(img, &[(ext.region_offset, ext.region_len / cs)]);
            }
            return Err(e);
        }
        if fresh || img.autoclear_features() & AUTOCLEAR_SHADOW == 0 {
            let r = img.update_header(qcow2::HeaderUpdate {
                autoclear: Some(img.autoclear_features() | AUTOCLEAR_SHADOW),
                extensions: vec![(EXT_SHADOW, Some(ext.to_bytes()))],
            });
            if let Err(e) = r {
                // The header may point at the new region: leave it allocated.
                return Err(Error::UpdateExtension(e));
            }
            if let Some(old) = inner.stale.take() {
                crate::store::free_allocated(img, &[(old.region_offset, old.region_len / cs)]);
            }
        }
        inner.region = Some(Region {
            ext,
            installed: true,
        });
        inner.mode = Mode::Armed;
        self.armed.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether writes currently wait for the shadow.
    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Turns the shadow off for the rest of this run after `why`, and removes it from the
    /// header (so its coverage cannot go stale on disk).
    pub(crate) fn disable(&self, img: &dyn ImageMetadata, why: String) -> Result<()> {
        {
            let mut inner = self.lock();
            inner.mode = Mode::Disabled(why);
            self.armed.store(false, Ordering::Release);
        }
        self.remove_from_header(img)
    }

    fn any_durable(&self) -> bool {
        self.durable.iter().any(|w| w.load(Ordering::Relaxed) != 0)
    }

    /// Writes the mask area and every page of bits, then syncs.
    fn write_region(
        &self,
        img: &dyn ImageMetadata,
        ext: &ShadowExt,
        dir: Option<BitmapsExt>,
        covered: &[bool],
    ) -> Result<()> {
        let mut buf = mask_area(dir, covered);
        // The whole region, padding included: the file then covers all of it (a region
        // past the end of the file is refused on open).
        buf.resize(ext.region_len as usize, 0);
        for (i, w) in self.durable.iter().enumerate() {
            let at = MASK_AREA as usize + i * 8;
            buf[at..at + 8].copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        img.write_owned(HostOffset(ext.region_offset), &buf)
            .map_err(Error::UpdateExtension)?;
        img.sync_owned().map_err(Error::UpdateExtension)
    }

    /// Before the header is switched to a new directory `dir` (a bitmap removed or
    /// persisted while others are in use): rewrites the coverage for it, or arms the
    /// shadow if entries become covered now. Returns whether the shadow stays; when it
    /// does not, the caller removes it after the switch ([`Shadow::remove_from_header`]).
    pub(crate) fn prepare_switch(
        &self,
        img: &dyn ImageMetadata,
        dir: Option<BitmapsExt>,
        covered: &[bool],
    ) -> Result<bool> {
        if !covered.iter().any(|&c| c) {
            return Ok(false);
        }
        let inner = self.lock();
        if !self.armed.load(Ordering::Acquire) || !matches!(inner.mode, Mode::Armed) {
            let can_arm = self.enabled && matches!(inner.mode, Mode::Idle);
            drop(inner);
            if !can_arm {
                return Ok(false);
            }
            return match self.arm(img, dir, covered) {
                Ok(()) => Ok(true),
                Err(e) => {
                    log::error!(
                        "could not set up the crash-consistency shadow of the bitmaps: {e}; \
                         a crash will leave them in use (inconsistent)"
                    );
                    Ok(false)
                }
            };
        }
        let Some(r) = inner.region else {
            return Ok(false);
        };
        drop(inner);
        let area = mask_area(dir, covered);
        img.write_owned(HostOffset(r.ext.region_offset), &area)
            .map_err(Error::UpdateExtension)?;
        img.sync_owned().map_err(Error::UpdateExtension)?;
        Ok(true)
    }

    /// The header changes that remove the shadow (extension and autoclear bit), to be
    /// made in the same header write as a directory switch.
    pub(crate) fn header_removal(img: &dyn ImageMetadata) -> (u64, Option<ExtChange>) {
        let ac = img.autoclear_features() & !AUTOCLEAR_SHADOW;
        let ext = img.header_extension(EXT_SHADOW).map(|_| (EXT_SHADOW, None));
        (ac, ext)
    }

    /// After the header no longer names the shadow: disarm and free the region(s).
    pub(crate) fn after_removal(&self, img: &dyn ImageMetadata) {
        let mut inner = self.lock();
        self.armed.store(false, Ordering::Release);
        if matches!(inner.mode, Mode::Armed) {
            inner.mode = Mode::Idle;
        }
        // A batch being written goes to the region: let it finish before freeing it.
        while inner.persisting {
            inner = self.done.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        let cs = img.cluster_size();
        let mut free = Vec::new();
        if let Some(r) = inner.region.take() {
            free.push((r.ext.region_offset, r.ext.region_len / cs));
        }
        if let Some(old) = inner.stale.take() {
            free.push((old.region_offset, old.region_len / cs));
        }
        for d in self.durable.iter() {
            d.store(0, Ordering::Release);
        }
        drop(inner);
        crate::store::free_allocated(img, &free);
        // Writers waiting for a batch that will never come need no shadow any more.
        self.done.notify_all();
        let wakers = std::mem::take(&mut self.lock().wakers);
        for w in wakers {
            w();
        }
    }

    /// Removes a shadow from the header (if there is one) in a header write of its own,
    /// then frees what is ours. Used when the shadow is off.
    pub(crate) fn remove_from_header(&self, img: &dyn ImageMetadata) -> Result<()> {
        Self::remove_stale(img)?;
        self.after_removal(img);
        Ok(())
    }

    /// Removes the shadow extension and clears its autoclear bit, if either is there, in
    /// one header write (nothing is freed).
    pub(crate) fn remove_stale(img: &dyn ImageMetadata) -> Result<()> {
        if img.header_extension(EXT_SHADOW).is_none()
            && img.autoclear_features() & AUTOCLEAR_SHADOW == 0
        {
            return Ok(());
        }
        let (ac, ext) = Self::header_removal(img);
        img.update_header(qcow2::HeaderUpdate {
            autoclear: Some(ac),
            extensions: ext.into_iter().collect(),
        })
        .map_err(Error::UpdateExtension)
    }
}

/// Coverage of a directory: entry `i` is covered when it is IN_USE on disk and its
/// bitmap is consistent in memory (tracked since the shadow was armed).
pub(crate) fn coverage(dir: &[DirEntry], consistent: &[bool]) -> Vec<bool> {
    dir.iter()
        .zip(consistent)
        .map(|(d, &c)| c && d.flags & FLAG_IN_USE != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_grows_with_the_disk() {
        assert_eq!(granularity_bits_for(1 << 40, None), 20);
        assert_eq!(granularity_bits_for(1 << 40, Some(1 << 16)), 20);
        assert_eq!(granularity_bits_for(1 << 40, Some(1 << 22)), 22);
        // 2^27 bits of 1 MiB cover 128 TiB; 1 PiB needs 8 MiB granules.
        assert_eq!(granularity_bits_for(1 << 50, None), 23);
        assert!((1u64 << 50).div_ceil(1 << 23) <= MAX_SHADOW_BITS);
    }

    #[test]
    fn mask_round_trips_and_rejects_other_directories_and_damage() {
        let dir = BitmapsExt {
            nb_bitmaps: 10,
            directory_size: 400,
            directory_offset: 0x30000,
        };
        let covered: Vec<bool> = (0..10).map(|i| i % 3 != 1).collect();
        let area = mask_area(Some(dir), &covered);
        assert_eq!(parse_mask(&area, &dir), Some(covered.clone()));
        let other = BitmapsExt {
            directory_offset: 0x40000,
            ..dir
        };
        assert_eq!(parse_mask(&area, &other), None);
        let fewer = BitmapsExt {
            nb_bitmaps: 9,
            ..dir
        };
        assert_eq!(parse_mask(&area, &fewer), None);
        for byte in [0, 9, 17, 21, 25, MASK_HEADER] {
            let mut bad = area.clone();
            bad[byte] ^= 0x10;
            assert_eq!(parse_mask(&bad, &dir), None, "byte {byte} flipped");
        }
    }
}
