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

mod disk;

pub use disk::{granularity_bits_for, ShadowExt};
use disk::{mask_area, MASK_AREA, PAGE};
pub(crate) use disk::{read_found, Found};

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

struct Inner {
    mode: Mode,
    /// The region this process writes (the header points at it).
    region: Option<ShadowExt>,
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
            return Cover::Ready;
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
                Some(ext) if armed => self.persist(img, &ext, &wanted),
                _ => Ok(0),
            };
            log::debug!(
                "shadow batch: {} request(s), {:?} new region(s), {} waker(s)",
                wanted.len(),
                result,
                wakers.len()
            );
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
        // Each run is written durably on its own (an aligned buffer: with O_DIRECT a
        // page over allocated blocks is one FUA write, not a journal commit of
        // everything the file system holds for the image).
        for (start, end) in runs {
            let mut buf = qcow2::AlignedBuf::new(((end - start) * PAGE) as usize);
            let bytes = buf.as_mut_slice();
            for w in start * words_per_page..(end * words_per_page).min(nwords) {
                let v = self.durable[w as usize].load(Ordering::Acquire)
                    | add.get(&w).copied().unwrap_or(0);
                let at = ((w - start * words_per_page) * 8) as usize;
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            img.write_owned_durable(
                HostOffset(ext.region_offset + MASK_AREA + start * PAGE),
                buf.as_slice(),
            )
            .map_err(|e| format!("writing the bitmap shadow failed: {e}"))?;
        }
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
        if !reusable {
            inner.stale = Some(ext);
            return;
        }
        // Ours and intact: reused, with the bits of a trusted shadow (else from empty).
        if let Some((_, words)) = &found.trusted {
            for (d, &w) in self.durable.iter().zip(words) {
                d.store(w, Ordering::Release);
            }
        }
        inner.region = Some(ext);
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
        // The durable bits are those of a region adopted on open (a crash's shadow, kept
        // for the bitmaps it recovered) or none: `after_removal` clears them whenever
        // the shadow goes away, and arming happens only while it is not armed.
        let cs = img.cluster_size();
        let (ext, fresh) = match inner.region {
            Some(ext) => (ext, false),
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
        inner.region = Some(ext);
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
        let Some(ext) = inner.region else {
            return Ok(false);
        };
        drop(inner);
        let area = mask_area(dir, covered);
        img.write_owned(HostOffset(ext.region_offset), &area)
            .map_err(Error::UpdateExtension)?;
        img.sync_owned().map_err(Error::UpdateExtension)?;
        Ok(true)
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
        if let Some(ext) = inner.region.take() {
            free.push((ext.region_offset, ext.region_len / cs));
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
    /// then disarms and frees what is ours.
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
        let extensions = match img.header_extension(EXT_SHADOW) {
            Some(_) => vec![(EXT_SHADOW, None)],
            None => Vec::new(),
        };
        img.update_header(qcow2::HeaderUpdate {
            autoclear: Some(img.autoclear_features() & !AUTOCLEAR_SHADOW),
            extensions,
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
