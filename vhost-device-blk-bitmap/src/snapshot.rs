//! Point-in-time views of the served disk (copy-before-write), for live backup.
//!
//! A [`PitView`] shows the disk as it was when the view was created while the guest goes
//! on writing. Before a guest write (or write-zeroes, or discard) lands on a chunk the
//! view has not preserved yet, the chunk's old contents are copied to the view's
//! *fleecing store*: an unlinked, sparse temporary file in which chunk `c` lives at the
//! same offset as on the disk. Chunks that read as zeroes are only remembered, never
//! stored, so the store holds at most what was overwritten. Reads of the view come from
//! the store where it has the chunk and from the disk elsewhere.
//!
//! Only the writer of a chunk waits for its copy (writers of other chunks never do). If
//! the store fails (a full file system), the *view* breaks — its reads fail with EIO from
//! then on and its owner is told once — and the guest's write goes ahead: a backup may
//! fail, a guest write never does because of one.
//!
//! Orders that make the view exact:
//! * a writer marks a chunk preserved only after its old contents are in the store (or
//!   known to be zeroes), and its own data reaches the disk only after that;
//! * a reader that found a chunk not preserved reads the disk, then looks again: if the
//!   chunk was preserved (or the view broke) meanwhile, the disk may already hold newer
//!   data and the chunk is read again from the store (or the read fails).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use log::{error, info};
use qcow2::{BlockImage, BlockStatus};

/// The smallest unit a view preserves (QEMU's copy-before-write default cluster).
pub const MIN_CHUNK: u64 = 4096;
/// At most this many chunks per view: larger disks get larger chunks (bounded memory:
/// three bits per chunk).
const MAX_CHUNKS: u64 = 1 << 26;
/// Bytes copied per disk read while preserving.
const COPY_BUFFER: usize = 1 << 20;

/// Called once when a view breaks, with the reason.
pub type BreakHandler = Box<dyn Fn(&str) + Send + Sync>;

/// Errors creating a view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The fleecing store could not be created.
    #[error("cannot create the fleecing store in '{dir}': {source}")]
    Store {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// A fixed-size bit set.
#[derive(Debug)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64) -> Self {
        Bits(vec![0; n.div_ceil(64) as usize])
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u64, on: bool) {
        let w = &mut self.0[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

/// What the view knows of its chunks.
struct State {
    /// The old contents are in the store (or known to be zeroes).
    preserved: Bits,
    /// Preserved as zeroes: nothing in the store.
    zero: Bits,
    /// Being copied by some writer.
    copying: Bits,
    /// Why the view broke.
    broken: Option<String>,
    /// Writers waiting (without blocking) for copies to finish.
    wakers: Vec<qcow2::Waker>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("broken", &self.broken)
            .field("waiting", &self.wakers.len())
            .finish_non_exhaustive()
    }
}

/// The state of one chunk for a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Disk,
    Store,
    Zero,
}

/// A point-in-time view of a disk (see the module documentation).
pub struct PitView {
    disk: Arc<dyn BlockImage>,
    size: u64,
    chunk: u64,
    store: File,
    dir: PathBuf,
    state: Mutex<State>,
    copied: Condvar,
    stored_bytes: AtomicU64,
    on_break: BreakHandler,
}

impl std::fmt::Debug for PitView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PitView")
            .field("size", &self.size)
            .field("chunk", &self.chunk)
            .field("dir", &self.dir)
            .field("stored_bytes", &self.stored_bytes())
            .finish_non_exhaustive()
    }
}

impl PitView {
    /// A view of `disk` (as it is from the moment the view is [registered](Views::add)),
    /// preserving chunks of at least `min_chunk` bytes into a new store in `dir`.
    pub fn new(
        disk: Arc<dyn BlockImage>,
        min_chunk: u64,
        dir: &Path,
        on_break: BreakHandler,
    ) -> Result<Self, ViewError> {
        let store = tempfile::tempfile_in(dir).map_err(|source| ViewError::Store {
            dir: dir.to_path_buf(),
            source,
        })?;
        Ok(Self::with_store(disk, min_chunk, store, dir, on_break))
    }

    /// A view whose fleecing store is `store` (`dir` names it in messages).
    pub fn with_store(
        disk: Arc<dyn BlockImage>,
        min_chunk: u64,
        store: File,
        dir: &Path,
        on_break: BreakHandler,
    ) -> Self {
        let size = disk.size();
        let mut chunk = min_chunk.max(MIN_CHUNK).next_power_of_two();
        while size.div_ceil(chunk) > MAX_CHUNKS {
            chunk *= 2;
        }
        let n = size.div_ceil(chunk);
        PitView {
            disk,
            size,
            chunk,
            store,
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                preserved: Bits::new(n),
                zero: Bits::new(n),
                copying: Bits::new(n),
                broken: None,
                wakers: Vec::new(),
            }),
            copied: Condvar::new(),
            stored_bytes: AtomicU64::new(0),
            on_break,
        }
    }

    /// Size of the view (the disk's) in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The preservation unit in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Bytes written to the fleecing store so far.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// Why the view broke, if it did.
    pub fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Chunks overlapping `[offset, offset + len)` (clipped to the disk).
    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        offset / self.chunk..end.div_ceil(self.chunk)
    }

    /// Claims the chunks of `range` that nobody preserves or copies yet and returns them
    /// as runs of consecutive chunks (first, count).
    fn claim(&self, st: &mut State, range: std::ops::Range<u64>) -> Vec<(u64, u64)> {
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        for c in range {
            if st.preserved.get(c) || st.copying.get(c) {
                continue;
            }
            st.copying.set(c, true);
            match claimed.last_mut() {
                Some((s, n)) if *s + *n == c => *n += 1,
                _ => claimed.push((c, 1)),
            }
        }
        claimed
    }

    /// Copies a claimed run and publishes the outcome: the chunks are preserved, or the
    /// view breaks (and its owner is told, once). Wakes every waiting writer.
    fn copy_and_publish(&self, first: u64, n: u64) {
        let copied = self.copy_run(first, n);
        let mut st = self.lock();
        for c in first..first + n {
            st.copying.set(c, false);
        }
        let mut broke = None;
        match copied {
            Ok(zero_chunks) => {
                for c in first..first + n {
                    st.preserved.set(c, true);
                }
                for c in zero_chunks {
                    st.zero.set(c, true);
                }
            }
            Err(e) => {
                let why = format!(
                    "copy-before-write to the fleecing store in '{}' failed: {e}",
                    self.dir.display()
                );
                if st.broken.is_none() {
                    broke = Some(why.clone());
                }
                st.broken.get_or_insert(why);
            }
        }
        let wakers = std::mem::take(&mut st.wakers);
        drop(st);
        self.copied.notify_all();
        for w in wakers {
            w();
        }
        if let Some(why) = broke {
            error!("point-in-time view broken: {why}");
            (self.on_break)(&why);
        }
    }

    /// Preserves the old contents of `[offset, offset + len)` before a write may change
    /// them: copies the chunks nobody copies yet, then waits for the ones other writers
    /// are copying. Returns at once when the view is broken.
    pub fn preserve(&self, offset: u64, len: u64) {
        let range = self.chunks(offset, len);
        if range.is_empty() {
            return;
        }
        let claimed = {
            let mut st = self.lock();
            if st.broken.is_some() {
                return;
            }
            self.claim(&mut st, range.clone())
        };
        for (first, n) in claimed {
            self.copy_and_publish(first, n);
        }
        // Wait for chunks other writers are copying.
        let mut st = self.lock();
        while st.broken.is_none() && range.clone().any(|c| !st.preserved.get(c)) {
            st = self.copied.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The non-blocking [`PitView::preserve`]: `true` when `[offset, offset + len)` is
    /// preserved (or the view broken) and the write may go ahead; else the missing
    /// chunks are being copied (by `copier`, for those this call claimed) and `waker`
    /// is called once a copy finished — ask again then.
    pub fn try_preserve(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        waker: &qcow2::Waker,
        copier: &Copier,
    ) -> bool {
        let range = self.chunks(offset, len);
        if range.is_empty() {
            return true;
        }
        let claimed = {
            let mut st = self.lock();
            if st.broken.is_some() || range.clone().all(|c| st.preserved.get(c)) {
                return true;
            }
            // One registration per waiting queue (its waker is one Arc): a copy wakes
            // each queue once, whatever the number of its requests that wait.
            if !st.wakers.iter().any(|w| Arc::ptr_eq(w, waker)) {
                st.wakers.push(waker.clone());
            }
            self.claim(&mut st, range)
        };
        for (first, n) in claimed {
            copier.submit(self.clone(), first, n);
        }
        false
    }

    /// Copies chunks `first..first + n` from the disk into the store; returns the chunks
    /// that read as zeroes (not stored).
    fn copy_run(&self, first: u64, n: u64) -> io::Result<Vec<u64>> {
        let mut zero = Vec::new();
        let per_buf = (COPY_BUFFER as u64 / self.chunk).max(1).min(n);
        // Aligned, so that an O_DIRECT disk is read without the page cache.
        let mut buf = qcow2::AlignedBuf::new((per_buf * self.chunk) as usize);
        let buf = buf.as_mut_slice();
        let mut c = first;
        while c < first + n {
            let k = per_buf.min(first + n - c);
            let start = c * self.chunk;
            let end = ((c + k) * self.chunk).min(self.size);
            let data = &mut buf[..(end - start) as usize];
            self.disk
                .read_at(data, start)
                .map_err(|e| io::Error::other(format!("reading the disk at {start:#x}: {e}")))?;
            for (i, piece) in data.chunks(self.chunk as usize).enumerate() {
                let off = start + i as u64 * self.chunk;
                if piece.iter().all(|&b| b == 0) {
                    zero.push(c + i as u64);
                    continue;
                }
                self.store.write_all_at(piece, off)?;
                self.stored_bytes
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            c += k;
        }
        Ok(zero)
    }

    fn chunk_state(st: &State, c: u64) -> Chunk {
        match (st.preserved.get(c), st.zero.get(c)) {
            (false, _) => Chunk::Disk,
            (true, false) => Chunk::Store,
            (true, true) => Chunk::Zero,
        }
    }

    /// Reads the view: the disk as it was when the view started.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            // One run of chunks in the same state.
            let (state, run_end) = {
                let st = self.lock();
                if let Some(why) = &st.broken {
                    return Err(broken_error(why));
                }
                let c0 = at / self.chunk;
                let state = Self::chunk_state(&st, c0);
                let mut c = c0 + 1;
                let last = (offset + buf.len() as u64 - 1) / self.chunk;
                while c <= last && Self::chunk_state(&st, c) == state {
                    c += 1;
                }
                (state, (c * self.chunk).min(offset + buf.len() as u64))
            };
            let piece = &mut buf[pos..(run_end - offset) as usize];
            match state {
                Chunk::Zero => piece.fill(0),
                Chunk::Store => self.store.read_exact_at(piece, at)?,
                Chunk::Disk => {
                    self.disk
                        .read_at(piece, at)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    // Look again: a chunk preserved meanwhile may have new data on disk.
                    let st = self.lock();
                    if let Some(why) = &st.broken {
                        return Err(broken_error(why));
                    }
                    let changed = (at / self.chunk..run_end.div_ceil(self.chunk))
                        .find(|&c| Self::chunk_state(&st, c) != Chunk::Disk);
                    if let Some(c) = changed {
                        // Keep what was read before that chunk; redo from it.
                        pos = ((c * self.chunk).max(at) - offset) as usize;
                        continue;
                    }
                }
            }
            pos = (run_end - offset) as usize;
        }
        Ok(())
    }

    /// The allocation status of the view: preserved chunks are data of this layer (or
    /// zeroes); the rest is the disk's status.
    pub fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<BlockStatus>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size && len > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let (state, run_end) = {
            let st = self.lock();
            let c0 = offset / self.chunk;
            let state = Self::chunk_state(&st, c0);
            let mut c = c0 + 1;
            while c * self.chunk < end && Self::chunk_state(&st, c) == state {
                c += 1;
            }
            (state, (c * self.chunk).min(end))
        };
        let run = |data, zero| BlockStatus {
            length: run_end - offset,
            data,
            zero,
            depth: 1,
        };
        Ok(match state {
            Chunk::Store => vec![run(true, false)],
            Chunk::Zero => vec![run(false, true)],
            Chunk::Disk => self
                .disk
                .block_status(offset, run_end - offset)
                .map_err(|e| io::Error::other(e.to_string()))?,
        })
    }
}

fn broken_error(why: &str) -> io::Error {
    io::Error::other(BrokenView(format!(
        "the point-in-time view is broken: {why}"
    )))
}

/// The error of a read from a broken view (maps to EIO).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokenView(String);

/// Copies chunks for writers that do not wait (the io_uring queues): a few threads
/// started with the first view, so that many first overwrites are copied at once.
#[derive(Debug)]
pub struct Copier {
    jobs: Mutex<Option<std::sync::mpsc::Sender<CopyJob>>>,
}

/// A run of chunks to copy: the view, the first chunk, the count.
type CopyJob = (Arc<PitView>, u64, u64);

/// Copy threads of a [`Copier`].
const COPY_THREADS: usize = 8;

impl Copier {
    fn new() -> Self {
        Copier {
            jobs: Mutex::new(None),
        }
    }

    /// Queues the copy of chunks `first..first + n` of `view`.
    fn submit(&self, view: Arc<PitView>, first: u64, n: u64) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let tx = jobs.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<CopyJob>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..COPY_THREADS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("cbw-copy-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok((view, first, n)) => view.copy_and_publish(first, n),
                            Err(_) => return,
                        }
                    });
                if let Err(e) = spawned {
                    error!("cannot start a copy-before-write thread: {e}");
                }
            }
            tx
        });
        if let Err(std::sync::mpsc::SendError((view, first, n))) = tx.send((view, first, n)) {
            // No thread left: copy here rather than never.
            view.copy_and_publish(first, n);
        }
    }
}

/// The views a disk's writes must preserve. Writers load the list without a lock.
#[derive(Debug)]
pub struct Views {
    list: ArcSwap<Vec<Arc<PitView>>>,
    copier: Copier,
}

impl Default for Views {
    fn default() -> Self {
        Views {
            list: ArcSwap::from_pointee(Vec::new()),
            copier: Copier::new(),
        }
    }
}

impl Views {
    /// Starts preserving for `view`: writes that look at the list from now on copy first.
    pub fn add(&self, view: Arc<PitView>) {
        self.list.rcu(|l| {
            let mut v = (**l).clone();
            v.push(view.clone());
            v
        });
        info!(
            "point-in-time view started ({} MiB disk, {} KiB chunks)",
            view.size() >> 20,
            view.chunk_size() >> 10
        );
    }

    /// Stops preserving for `view` (its store goes when the last reference does).
    pub fn remove(&self, view: &Arc<PitView>) {
        self.list.rcu(|l| {
            l.iter()
                .filter(|v| !Arc::ptr_eq(v, view))
                .cloned()
                .collect::<Vec<_>>()
        });
        info!(
            "point-in-time view ended ({} KiB were copied to its store)",
            view.stored_bytes() >> 10
        );
    }

    /// Preserves `[offset, offset + len)` in every view, before a write changes it.
    #[inline]
    pub fn before_write(&self, offset: u64, len: u64) {
        let list = self.list.load();
        for v in list.iter() {
            v.preserve(offset, len);
        }
    }

    /// The non-blocking [`Views::before_write`]: `true` when every view preserved the
    /// range; else copies are under way and `waker` is called when one finishes.
    #[inline]
    pub fn try_before_write(&self, offset: u64, len: u64, waker: &qcow2::Waker) -> bool {
        let list = self.list.load();
        let mut ready = true;
        for v in list.iter() {
            ready &= v.try_preserve(offset, len, waker, &self.copier);
        }
        ready
    }

    /// Whether any view is active.
    pub fn is_empty(&self) -> bool {
        self.list.load().is_empty()
    }
}
