//! [`Bitmaps`]: the in-memory state of every bitmap of one image, shared by the daemon's
//! threads. The request path ([`Bitmaps::mark`]) takes no lock: it loads an atomically
//! swapped, immutable list of the tracking bitmaps and marks each one with atomic word
//! operations. Everything else (operations, load, store) serializes on one mutex.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use dirty_bitmap::DirtyBitmap;

use crate::error::{Error, Result};
use crate::format::{BitmapsExt, DirEntry, FLAG_AUTO, FLAG_IN_USE};

/// Lets a transaction pause marking for the instant it commits, so that a guest write
/// is recorded either wholly before or wholly after it. Marking costs two uncontended
/// atomic operations; a writer that meets a pause spins until the commit is over.
#[derive(Debug, Default)]
pub(crate) struct MarkGate {
    /// Bit 63: paused; the rest: marks in progress.
    state: AtomicU64,
}

const PAUSED: u64 = 1 << 63;

impl MarkGate {
    #[inline]
    fn enter(&self) {
        loop {
            if self.state.fetch_add(1, Ordering::Acquire) & PAUSED == 0 {
                return;
            }
            self.state.fetch_sub(1, Ordering::Release);
            while self.state.load(Ordering::Acquire) & PAUSED != 0 {
                std::hint::spin_loop();
                std::thread::yield_now();
            }
        }
    }

    #[inline]
    fn leave(&self) {
        self.state.fetch_sub(1, Ordering::Release);
    }

    /// Stops new marks and waits for the ones in progress.
    pub(crate) fn pause(&self) {
        self.state.fetch_or(PAUSED, Ordering::AcqRel);
        while self.state.load(Ordering::Acquire) & !PAUSED != 0 {
            std::hint::spin_loop();
        }
    }

    /// Lets marks go on.
    pub(crate) fn resume(&self) {
        self.state.fetch_and(!PAUSED, Ordering::Release);
    }
}

/// One bitmap known in memory.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Name (UTF-8; names read from disk are converted lossily).
    pub name: String,
    /// log2 of the granularity.
    pub granularity_bits: u32,
    /// Stored in the image by [`Bitmaps::store`].
    pub persistent: bool,
    /// The bits; `None` for an inconsistent bitmap (IN_USE found on open).
    pub bitmap: Option<Arc<DirtyBitmap>>,
    /// The directory entry currently on disk for this bitmap, if any.
    pub disk: Option<DirEntry>,
}

impl Entry {
    /// The name bytes to write into the directory (the original bytes if read from disk).
    pub fn disk_name(&self) -> Vec<u8> {
        match &self.disk {
            Some(d) => d.name.clone(),
            None => self.name.as_bytes().to_vec(),
        }
    }
}

/// Mutable state behind the operations mutex.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Bitmaps in directory order (bitmaps added later come last).
    pub entries: Vec<Entry>,
    /// The bitmaps extension as it is on disk now (`None`: no extension).
    pub ext: Option<BitmapsExt>,
    /// Bitmaps in use by another operation (an export): every action naming them fails.
    pub busy: std::collections::BTreeSet<String>,
}

impl State {
    /// Index of the bitmap `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }
}

/// What [`Bitmaps::list`] reports for one bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes covered by one bit.
    pub granularity: u64,
    /// Stored in the image on [`Bitmaps::store`].
    pub persistent: bool,
    /// Records writes (QEMU's "recording"); false for inconsistent bitmaps.
    pub enabled: bool,
    /// Found IN_USE on open: contents unknown, can only be removed.
    pub inconsistent: bool,
    /// The on-disk entry has the IN_USE flag (`None`: not on disk yet).
    pub disk_in_use: Option<bool>,
    /// The on-disk entry has the AUTO flag (`None`: not on disk yet).
    pub disk_auto: Option<bool>,
    /// Number of dirty bytes (set bits × granularity, clipped to the disk); 0 if inconsistent.
    pub dirty_bytes: u64,
    /// Number of set bits; 0 if inconsistent.
    pub count: u64,
    /// In use by another operation (exported).
    pub busy: bool,
}

impl BitmapInfo {
    /// The on-disk flags as `qemu-img info` names them ("in-use", "auto").
    pub fn disk_flags(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.disk_in_use == Some(true) {
            v.push("in-use");
        }
        if self.disk_auto == Some(true) {
            v.push("auto");
        }
        v
    }
}

/// All bitmaps of one image: the lock-free marking list and the persistent state.
///
/// Every method that touches the image takes the image as `img`; it must be the image the
/// set was loaded from.
pub struct Bitmaps {
    pub(crate) node: String,
    pub(crate) read_only: bool,
    pub(crate) disk_size: u64,
    pub(crate) cluster_size: u64,
    hot: ArcSwap<Vec<Arc<DirtyBitmap>>>,
    pub(crate) gate: MarkGate,
    /// Bumped by every transaction commit (see [`Bitmaps::generation`]).
    pub(crate) generation: AtomicU64,
    state: Mutex<State>,
    /// The crash-consistency shadow (writable sets opened by `open_with`).
    pub(crate) shadow: Option<Arc<crate::shadow::Shadow>>,
    /// Bitmaps recovered from the shadow on open (name, bytes added).
    pub(crate) recovered: Vec<(String, u64)>,
    /// Keep a store reserve while bitmaps are in use (`OpenOptions::reserve`).
    pub(crate) reserve_enabled: bool,
    /// The store reserve (locked after `state`, never before it).
    pub(crate) reserve: Mutex<crate::reserve::Reserve>,
}

impl std::fmt::Debug for Bitmaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmaps")
            .field("node", &self.node)
            .field("read_only", &self.read_only)
            .field("disk_size", &self.disk_size)
            .field("bitmaps", &self.hot.load().len())
            .finish()
    }
}

impl Bitmaps {
    pub(crate) fn from_state(
        node: &str,
        read_only: bool,
        disk_size: u64,
        cluster_size: u64,
        state: State,
    ) -> Self {
        let b = Bitmaps {
            node: node.to_string(),
            read_only,
            disk_size,
            cluster_size,
            hot: ArcSwap::from_pointee(Vec::new()),
            gate: MarkGate::default(),
            generation: AtomicU64::new(0),
            state: Mutex::new(state),
            shadow: None,
            recovered: Vec::new(),
            reserve_enabled: false,
            reserve: Mutex::new(Default::default()),
        };
        b.publish(&b.lock());
        b
    }

    /// Records a guest write of `len` bytes at `offset` in every enabled bitmap.
    /// Lock-free: the gate's two atomic operations, one atomic pointer load, and atomic
    /// bit operations. Returns the [generation](Bitmaps::generation) the write was
    /// recorded in.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) -> u64 {
        self.gate.enter();
        let generation = self.generation.load(Ordering::Acquire);
        for bm in self.hot.load().iter() {
            bm.set_range(offset, len);
        }
        self.gate.leave();
        generation
    }

    /// The number of transactions committed so far. A write recorded by [`Bitmaps::mark`]
    /// in an older generation than the current one may have landed after a transaction
    /// that created or enabled other bitmaps: mark it again when it completes, so that
    /// every bitmap enabled while it was in flight has it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Marks a bitmap busy (exported: every action naming it fails with QEMU's text) and
    /// returns its bits, or clears the mark.
    pub fn set_busy(&self, name: &str, busy: bool) -> Result<Arc<DirtyBitmap>> {
        let mut st = self.lock();
        let i = st
            .find(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let bm = st.entries[i]
            .bitmap
            .clone()
            .ok_or_else(|| Error::Inconsistent(name.to_string()))?;
        if busy && !st.busy.insert(name.to_string()) {
            return Err(Error::Busy(name.to_string()));
        }
        if !busy {
            st.busy.remove(name);
        }
        Ok(bm)
    }

    /// Whether any bitmap would record a write now (lets callers skip work).
    pub fn any_enabled(&self) -> bool {
        !self.hot.load().is_empty()
    }

    /// Name of the node (image) used in error messages.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Whether the set was loaded read-only (nothing can be changed or stored).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Virtual disk size the bitmaps cover.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Locks the operation state (poisoning is ignored: the state stays valid).
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the list of bitmaps the request path marks (the enabled, consistent
    /// ones). Call with the lock held after every change of the entries or their
    /// enabled flags.
    pub(crate) fn publish(&self, st: &State) {
        let list: Vec<Arc<DirtyBitmap>> = if self.read_only {
            Vec::new()
        } else {
            st.entries
                .iter()
                .filter_map(|e| e.bitmap.clone())
                .filter(|b| b.is_enabled())
                .collect()
        };
        self.hot.store(Arc::new(list));
    }

    /// Information on every bitmap, in directory order.
    pub fn list(&self) -> Vec<BitmapInfo> {
        let st = self.lock();
        st.entries
            .iter()
            .map(|e| BitmapInfo {
                name: e.name.clone(),
                granularity: 1u64 << e.granularity_bits,
                persistent: e.persistent,
                enabled: e.bitmap.as_ref().is_some_and(|b| b.is_enabled()),
                inconsistent: e.bitmap.is_none(),
                disk_in_use: e.disk.as_ref().map(|d| d.flags & FLAG_IN_USE != 0),
                disk_auto: e.disk.as_ref().map(|d| d.flags & FLAG_AUTO != 0),
                dirty_bytes: e.bitmap.as_ref().map_or(0, |b| b.dirty_bytes()),
                count: e.bitmap.as_ref().map_or(0, |b| b.count()),
                busy: st.busy.contains(&e.name),
            })
            .collect()
    }

    /// The bits of a consistent bitmap (for exports and backups).
    pub fn bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>> {
        let st = self.lock();
        let e = st
            .find(name)
            .map(|i| &st.entries[i])
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        e.bitmap
            .clone()
            .ok_or_else(|| Error::Inconsistent(name.to_string()))
    }
}
