//! Direct data I/O: the engine decides where the bytes of a request live (under its
//! metadata lock, briefly), the caller moves them (with io_uring, preadv, or the
//! synchronous helpers here), and an allocating write is published afterwards.
//!
//! No data transfer ever happens under the metadata lock. A write that needs a guest
//! cluster some other request is allocating gets [`Attempt::Busy`]: the engine calls the
//! caller's [`Waker`] once that allocation finished, and the caller tries again. Nothing
//! here blocks on another request, so one thread can keep many requests in flight.

use std::fmt;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::buffer::AlignedBuf;
use crate::error::{IoContext, Result};
use crate::gate::IoTicket;
use crate::Storage;

/// Called by the engine when a request that got [`Attempt::Busy`] may go on.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Requests waiting for an allocation in flight to finish.
#[derive(Default)]
pub(crate) struct Waiters(pub Vec<Waker>);

impl fmt::Debug for Waiters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Waiters({})", self.0.len())
    }
}

/// The outcome of an operation that may have to wait for another request.
#[derive(Debug)]
pub enum Attempt<T> {
    /// Done (or planned).
    Ready(T),
    /// Another request holds part of the range; the waker will be called.
    Busy,
}

/// The descriptors of the file that [`ReadPiece::Host`] and [`WritePiece`] offsets
/// point into.
#[derive(Debug, Clone, Copy)]
pub struct DataFiles {
    /// The buffered descriptor (always usable).
    pub buffered: RawFd,
    /// An O_DIRECT descriptor for requests aligned to [`crate::DIRECT_ALIGN`], if the
    /// image was opened with `direct`.
    pub direct: Option<RawFd>,
}

/// Where consecutive bytes of a read come from.
#[derive(Debug)]
pub enum ReadPiece {
    /// `len` bytes at a host offset of the image file.
    Host {
        /// Host byte offset.
        offset: u64,
        /// Length in bytes.
        len: usize,
    },
    /// `len` bytes that read as zeros.
    Zero {
        /// Length in bytes.
        len: usize,
    },
    /// Bytes the engine already produced (backing file, compressed cluster).
    Bytes(Vec<u8>),
}

impl ReadPiece {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            ReadPiece::Host { len, .. } | ReadPiece::Zero { len } => *len,
            ReadPiece::Bytes(b) => b.len(),
        }
    }

    /// Whether the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A planned read: pieces in guest order. Keep it alive until the data I/O completed
/// (it holds the engine's free gate).
#[derive(Debug)]
pub struct ReadPlan {
    /// The pieces, covering the request in order.
    pub pieces: Vec<ReadPiece>,
    pub(crate) _ticket: Option<IoTicket>,
}

/// One host write of a planned write.
#[derive(Debug)]
pub enum WritePiece {
    /// Request bytes `[at, at + len)` go to host `offset`.
    Data {
        /// Offset inside the request.
        at: usize,
        /// Host byte offset.
        offset: u64,
        /// Length in bytes.
        len: usize,
    },
    /// A whole cluster written from `buf` (the old contents, for copy-on-write), after
    /// request bytes `[at, at + len)` were copied into it at `skip`.
    Merge {
        /// Host byte offset of the cluster.
        offset: u64,
        /// The cluster's old contents.
        buf: AlignedBuf,
        /// Where the request bytes go inside `buf`.
        skip: usize,
        /// Offset inside the request.
        at: usize,
        /// Length in bytes.
        len: usize,
    },
}

/// A guest cluster whose new host cluster is linked when the write finishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allocation {
    pub guest_cluster: u64,
    pub host: u64,
    /// Allocated for this write (false: a preallocated zero cluster reused in place).
    pub fresh: bool,
}

/// A planned write. Do every piece, then hand it back to `finish_write` with the
/// outcome (also on failure: it releases what the plan reserved).
#[derive(Debug)]
pub struct WritePlan {
    /// The host writes, in any order.
    pub pieces: Vec<WritePiece>,
    pub(crate) allocations: Vec<Allocation>,
    pub(crate) _ticket: Option<IoTicket>,
}

impl WritePlan {
    /// Whether finishing the plan changes metadata (an allocating write).
    pub fn allocates(&self) -> bool {
        !self.allocations.is_empty()
    }
}

/// Host ranges a write-zeroes or discard left for the caller to deallocate (raw images:
/// `fallocate(PUNCH_HOLE)`); empty when the engine did everything.
#[derive(Debug, Default)]
pub struct ZeroPlan {
    /// `(host offset, length)` ranges to punch.
    pub punch: Vec<(u64, u64)>,
}

/// The direct data path of an image. Every method may be called from many threads.
pub trait DirectIo: Send + Sync + fmt::Debug {
    /// The storage that host offsets refer to (for synchronous execution).
    fn data_storage(&self) -> &Arc<dyn Storage>;
    /// Its file descriptors, when it is a file (io_uring needs them).
    fn data_files(&self) -> Option<DataFiles>;
    /// Plans a read of `len` bytes at guest `offset`.
    fn plan_read(&self, offset: u64, len: usize) -> Result<ReadPlan>;
    /// Plans a write of `len` bytes at guest `offset`: reserves what must be allocated
    /// (with its copy-on-write already done) or answers Busy.
    fn begin_write(&self, offset: u64, len: usize, waker: &Waker) -> Result<Attempt<WritePlan>>;
    /// Publishes (or, when `ok` is false, rolls back) a planned write.
    fn finish_write(&self, plan: WritePlan, ok: bool) -> Result<()>;
    /// Makes `[offset, offset + len)` read as zeros (`unmap`: deallocation allowed).
    fn try_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        waker: &Waker,
    ) -> Result<Attempt<ZeroPlan>>;
    /// Discards `[offset, offset + len)`.
    fn try_discard(&self, offset: u64, len: u64, waker: &Waker) -> Result<Attempt<ZeroPlan>>;
    /// Writes back every metadata change of completed requests; a data sync of the file
    /// afterwards makes every completed write durable.
    fn prepare_flush(&self) -> Result<()>;
}

/// Waits (blocking the thread) for an operation that may answer Busy.
pub(crate) fn blocking<T>(mut op: impl FnMut(&Waker) -> Result<Attempt<T>>) -> Result<T> {
    /// A flag with a condition variable, and the waker that sets it.
    type Signal = (Arc<(Mutex<bool>, Condvar)>, Waker);
    thread_local! {
        // One per thread, made once: the synchronous path allocates nothing per request
        // for it. A wake-up left over from an earlier request only costs a retry.
        static SIGNAL: Signal = {
            let pair = Arc::new((Mutex::new(false), Condvar::new()));
            let p = pair.clone();
            let waker: Waker = Arc::new(move || {
                *p.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
                p.1.notify_all();
            });
            (pair, waker)
        };
    }
    let (pair, waker) = SIGNAL.with(|(p, w)| (p.clone(), w.clone()));
    loop {
        match op(&waker)? {
            Attempt::Ready(t) => return Ok(t),
            Attempt::Busy => {
                let (lock, cv) = &*pair;
                let mut woken = lock.lock().unwrap_or_else(|e| e.into_inner());
                if !*woken {
                    // The waker always comes; the timeout only bounds a missed one.
                    woken = cv
                        .wait_timeout(woken, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                *woken = false;
            }
        }
    }
}

/// Reads a planned range synchronously into `buf`.
pub(crate) fn execute_read(storage: &dyn Storage, plan: ReadPlan, buf: &mut [u8]) -> Result<()> {
    let mut at = 0;
    for piece in plan.pieces {
        let n = piece.len();
        let dst = &mut buf[at..at + n];
        match piece {
            ReadPiece::Host { offset, .. } => storage
                .read_at(dst, offset)
                .ctx(|| format!("reading data at {offset:#x}"))?,
            ReadPiece::Zero { .. } => dst.fill(0),
            ReadPiece::Bytes(b) => dst.copy_from_slice(&b),
        }
        at += n;
    }
    Ok(())
}

/// Does the host writes of a plan synchronously from `data`.
pub(crate) fn execute_write(
    storage: &dyn Storage,
    plan: &mut WritePlan,
    data: &[u8],
) -> Result<()> {
    for piece in &mut plan.pieces {
        match piece {
            WritePiece::Data { at, offset, len } => storage
                .write_at(&data[*at..*at + *len], *offset)
                .ctx(|| format!("writing data at {offset:#x}"))?,
            WritePiece::Merge {
                offset,
                buf,
                skip,
                at,
                len,
            } => {
                buf.as_mut_slice()[*skip..*skip + *len].copy_from_slice(&data[*at..*at + *len]);
                storage
                    .write_at(buf.as_slice(), *offset)
                    .ctx(|| format!("writing data at {offset:#x}"))?
            }
        }
    }
    Ok(())
}

/// A synchronous write through the direct path: plan (waiting while Busy), write,
/// publish.
pub(crate) fn write_blocking(io: &dyn DirectIo, data: &[u8], offset: u64) -> Result<()> {
    let mut plan = blocking(|w| io.begin_write(offset, data.len(), w))?;
    let r = execute_write(&**io.data_storage(), &mut plan, data);
    let ok = r.is_ok();
    let fin = io.finish_write(plan, ok);
    r.and(fin)
}

/// Punches the ranges of a zero plan synchronously.
pub(crate) fn execute_zero(storage: &dyn Storage, plan: ZeroPlan) -> Result<()> {
    for (offset, len) in plan.punch {
        storage
            .punch_hole(offset, len)
            .ctx(|| format!("zeroing at {offset:#x}"))?;
    }
    Ok(())
}
