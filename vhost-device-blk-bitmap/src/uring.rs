//! The io_uring data path of one virtqueue: many requests in flight, guest memory handed
//! to the kernel, completions in any order.
//!
//! The queue's worker thread pops chains, asks the image engine for a plan (a short
//! metadata decision, see [`qcow2::direct`]), and submits the plan's transfers with
//! iovecs that point straight into guest memory. The ring's completion eventfd is
//! registered with the same worker's epoll loop, so completions are reaped on the thread
//! that owns the queue: no lock is shared with other queues on the request path except
//! the engine's brief metadata lock. Used-ring updates and the guest notification are
//! batched per wake-up (and respect EVENT_IDX).
//!
//! A write whose clusters another request is allocating gets `Busy` from the engine; it
//! waits in `deferred` and is retried when the engine calls our waker (which writes the
//! same eventfd).
//!
//! Transfers through the page cache (images opened without `--direct`) are tried inline
//! first: io_uring hands buffered I/O that cannot complete without blocking — and all of
//! it on file systems without `RWF_NOWAIT` support, such as tmpfs, or for buffered
//! writes on ext4 — to kernel worker threads, a thread hop per request that costs more
//! than the copy. So a buffered transfer is done with `preadv2`/`pwritev2(RWF_NOWAIT)`
//! on the worker thread, and only what would block goes to the ring; where the file
//! system refuses `RWF_NOWAIT` altogether, it is done with a plain (page-cache) call.
//! O_DIRECT transfers always go to the ring.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use log::{debug, warn};
use qcow2::{AlignedBuf, Attempt, DataFiles, DirectIo, ReadPiece, WritePiece, WritePlan};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{BlkDevice, RequestHeader, WriteReady, WriteToken};
use crate::stats::{IoKind, QueueStats};
use crate::transport::{ChainError, GuestMem, MAX_DESCRIPTORS};
use crate::virtio_blk::*;

/// Device-writable or -readable guest bytes of a request, in order.
type Segments = Vec<(GuestAddress, usize)>;

/// Alignment of buffers, offsets and lengths for the O_DIRECT descriptor.
const DIRECT_ALIGN: usize = qcow2::DIRECT_ALIGN;

/// Counts the requests a queue has taken from its ring and not yet completed, so that
/// GET_VRING_BASE and a disconnect can wait for them.
#[derive(Debug, Default)]
pub struct InflightCount {
    count: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl InflightCount {
    fn inc(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn sub(&self, n: usize) {
        if n > 0 && self.count.fetch_sub(n, Ordering::SeqCst) == n {
            // Taking the lock orders this with a waiter between its check and its wait.
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_all();
        }
    }

    /// Requests in flight now.
    pub fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Blocks until no request is in flight (logging every few seconds while waiting).
    pub fn wait_idle(&self, what: &str) {
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.get() != 0 {
            let (ng, timeout) = self
                .cv
                .wait_timeout(g, Duration::from_secs(5))
                .unwrap_or_else(|p| p.into_inner());
            g = ng;
            if timeout.timed_out() && self.get() != 0 {
                warn!(
                    "{what}: still waiting for {} request(s) in flight",
                    self.get()
                );
            }
        }
    }
}

/// A parsed chain: where its header said to go and where its data lives.
#[derive(Debug)]
struct Chain {
    head: u16,
    header: Option<RequestHeader>,
    /// Device-readable bytes after the header.
    out: Segments,
    /// Device-writable bytes before the status byte.
    inp: Segments,
    status: GuestAddress,
}

/// What a request in flight is doing.
#[derive(Debug)]
enum Op {
    /// Waiting for its transfers; then completed with `status`.
    Read { _plan: qcow2::ReadPlan },
    /// A write not yet planned (deferred while Busy) or planned and in flight.
    Write {
        offset: u64,
        plan: Option<WritePlan>,
    },
    /// Discard or write-zeroes, deferred while Busy or punching.
    Zero {
        discard: bool,
        offset: u64,
        len: u64,
        unmap: bool,
        started: bool,
    },
    /// FLUSH (or the writethrough flush after a write).
    Flush,
    /// Nothing left to do.
    Done,
}

/// What became of a transfer tried on the worker thread.
#[derive(Debug)]
enum Inline {
    /// Completed.
    Done,
    /// Failed.
    Failed(io::Error),
    /// (The rest of) it goes to the ring.
    Ring,
}

/// One submitted transfer, kept until it completes (the kernel reads `iov` meanwhile).
#[derive(Debug)]
struct Sqe {
    write: bool,
    fd: RawFd,
    offset: u64,
    iov: Vec<libc::iovec>,
    /// For unaligned guest buffers with O_DIRECT: the aligned copy the kernel uses
    /// (`iov` then points into it).
    bounce: Option<AlignedBuf>,
    /// The guest iovecs a bounced read is copied back into.
    guest: Vec<libc::iovec>,
    /// Bytes the transfer must move.
    len: usize,
    /// A fallocate (punch) rather than a transfer.
    punch: bool,
}

// SAFETY: the raw pointers in an `Sqe` point into guest memory kept mapped by the
// request's `Arc<GuestMem>` or into buffers the request owns; the request (and so the
// `Sqe`) is only used by the worker thread that owns its queue, and moving it to another
// thread moves nothing the pointers refer to.
unsafe impl Send for Sqe {}

/// A request between pop and completion.
#[derive(Debug)]
struct Request {
    chain: Chain,
    /// Keeps the guest memory the iovecs point into mapped until we are done.
    mem: Arc<GuestMem>,
    op: Op,
    sqes: Vec<Option<Sqe>>,
    pending: usize,
    status: u8,
    written: u32,
    /// A writethrough flush still has to follow.
    flush_after: bool,
    /// What to account at completion: kind, guest offset, bytes.
    account: Option<(IoKind, u64, u64)>,
    /// A write's bookkeeping to finish at completion.
    token: Option<WriteToken>,
    started: std::time::Instant,
}

/// The io_uring side of one queue.
pub struct UringQueue {
    ring: IoUring,
    event: Arc<EventFd>,
    waker: qcow2::Waker,
    files: DataFiles,
    slots: Vec<Option<Request>>,
    free: Vec<usize>,
    deferred: VecDeque<usize>,
    inflight: Arc<InflightCount>,
    stats: Arc<QueueStats>,
    device: Arc<BlkDevice>,
    /// Completions to publish to the used ring (head, len) at the end of this wake-up.
    done: Vec<(u16, u32)>,
    /// Whether the file system accepts `RWF_NOWAIT` for buffered reads / writes (`None`:
    /// not tried yet).
    nowait: [Option<bool>; 2],
}

impl std::fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringQueue")
            .field("in_flight", &(self.slots.len() - self.free.len()))
            .field("deferred", &self.deferred.len())
            .finish_non_exhaustive()
    }
}

/// Bits of `user_data` that hold the transfer's index inside its request.
const SQE_BITS: u32 = 16;

impl UringQueue {
    /// A ring for a queue of up to `queue_size` entries on an image whose data lives in
    /// `files`.
    pub fn new(
        queue_size: usize,
        files: DataFiles,
        inflight: Arc<InflightCount>,
        stats: Arc<QueueStats>,
        device: Arc<BlkDevice>,
    ) -> io::Result<Self> {
        let entries = (queue_size as u32).clamp(64, 4096).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 8)
            .build(entries)?;
        let event = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let e = event.clone();
        let waker: qcow2::Waker = Arc::new(move || {
            let _ = e.write(1);
        });
        Ok(UringQueue {
            ring,
            event,
            waker,
            files,
            slots: Vec::new(),
            free: Vec::new(),
            deferred: VecDeque::new(),
            inflight,
            stats,
            device,
            done: Vec::new(),
            nowait: [None; 2],
        })
    }

    /// The eventfd that fires on completions and engine wake-ups.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Takes one chain from the ring and starts it.
    pub fn start<M>(
        &mut self,
        device: &BlkDevice,
        io: &dyn DirectIo,
        mem: &Arc<GuestMem>,
        chain: virtio_queue::DescriptorChain<M>,
    ) where
        M: std::ops::Deref<Target = GuestMem> + Clone,
    {
        let head = chain.head_index();
        // Counted until its used-ring entry is published (see `published`).
        self.inflight.inc();
        let parsed = match parse_chain(mem, chain) {
            Ok(c) => c,
            Err(e) => {
                warn!("rejecting request (descriptor {head}): {e}");
                self.done.push((head, 0));
                return;
            }
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(Request {
            chain: parsed,
            mem: mem.clone(),
            op: Op::Done,
            sqes: Vec::new(),
            pending: 0,
            status: S_OK,
            written: 0,
            flush_after: false,
            account: None,
            token: None,
            started: std::time::Instant::now(),
        });
        self.begin(slot, device, io);
    }

    /// Decides what a fresh request does and submits its first transfers.
    fn begin(&mut self, slot: usize, device: &BlkDevice, io: &dyn DirectIo) {
        let req = self.slots[slot].as_mut().expect("live request");
        let Some(hdr) = req.chain.header else {
            warn!("request header shorter than {REQUEST_HEADER_SIZE} bytes");
            req.status = S_IOERR;
            return self.complete(slot);
        };
        match hdr.request_type {
            T_IN => self.begin_read(slot, device, io, hdr.sector),
            T_OUT => {
                let len = seg_len(&req.chain.out);
                if device.image().is_read_only() {
                    req.status = S_IOERR;
                    return self.complete(slot);
                }
                let Some(offset) = device.check_range(hdr.sector, len as u64) else {
                    debug!("OUT: bad range sector {} len {len}", hdr.sector);
                    req.status = S_IOERR;
                    return self.complete(slot);
                };
                if offset == 0 {
                    let mut head = [0u8; 512];
                    let n = len.min(head.len());
                    if read_guest(&req.mem, &req.chain.out, 0, &mut head[..n]).is_err()
                        || device.refuses_format_change(0, &head[..n])
                    {
                        req.status = S_IOERR;
                        return self.complete(slot);
                    }
                }
                req.account = Some((IoKind::Write, offset, len as u64));
                // Marked (and preserved for point-in-time views) before the data can
                // reach the disk, whatever the outcome.
                req.token = Some(device.mark_write(offset, len as u64));
                req.flush_after = device.writethrough();
                req.op = Op::Write { offset, plan: None };
                self.try_write(slot, io);
            }
            T_FLUSH => {
                req.account = Some((IoKind::Flush, 0, 0));
                req.op = Op::Flush;
                self.submit_flush(slot, io);
            }
            T_GET_ID => {
                let n = seg_len(&req.chain.inp).min(ID_BYTES);
                let id = device.serial();
                req.status = match write_guest(&req.mem, &req.chain.inp, 0, &id[..n]) {
                    Ok(()) => {
                        req.written = n as u32;
                        S_OK
                    }
                    Err(_) => S_IOERR,
                };
                self.complete(slot);
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let discard = hdr.request_type == T_DISCARD;
                if device.image().is_read_only() {
                    req.status = S_IOERR;
                    return self.complete(slot);
                }
                let mut seg = [0u8; DWZ_SEGMENT_SIZE];
                let input_len = seg_len(&req.chain.out);
                if input_len > DWZ_SEGMENT_SIZE {
                    req.status = S_UNSUPP;
                    return self.complete(slot);
                }
                if input_len < DWZ_SEGMENT_SIZE
                    || read_guest(&req.mem, &req.chain.out, 0, &mut seg).is_err()
                {
                    req.status = S_IOERR;
                    return self.complete(slot);
                }
                match device.check_dwz_segment(hdr.request_type, &seg) {
                    Err(status) => {
                        req.status = status;
                        self.complete(slot)
                    }
                    Ok(None) => self.complete(slot),
                    Ok(Some((offset, len, unmap))) => {
                        let kind = if discard {
                            IoKind::Discard
                        } else {
                            IoKind::WriteZeroes
                        };
                        req.account = Some((kind, offset, len));
                        req.token = Some(device.mark_write(offset, len));
                        req.flush_after = device.writethrough();
                        req.op = Op::Zero {
                            discard,
                            offset,
                            len,
                            unmap,
                            started: false,
                        };
                        self.try_zero(slot, io);
                    }
                }
            }
            other => {
                debug!("unsupported request type {other}");
                req.status = S_UNSUPP;
                self.complete(slot);
            }
        }
    }

    fn begin_read(&mut self, slot: usize, device: &BlkDevice, io: &dyn DirectIo, sector: u64) {
        let req = self.slots[slot].as_mut().expect("live request");
        let len = seg_len(&req.chain.inp);
        let Some(offset) = device.check_range(sector, len as u64) else {
            debug!("IN: bad range sector {sector} len {len}");
            req.status = S_IOERR;
            return self.complete(slot);
        };
        req.account = Some((IoKind::Read, offset, len as u64));
        let plan = match io.plan_read(offset, len) {
            Ok(p) => p,
            Err(e) => {
                warn!("read at {offset:#x} failed: {e}");
                req.status = S_IOERR;
                return self.complete(slot);
            }
        };
        let mut at = 0;
        let mut sqes = Vec::new();
        let mut failed = false;
        for piece in &plan.pieces {
            let n = piece.len();
            match piece {
                ReadPiece::Host { offset, .. } => {
                    match host_sqe(&req.mem, &req.chain.inp, at, n, *offset, false, &self.files) {
                        Ok(s) => sqes.push(s),
                        Err(_) => failed = true,
                    }
                }
                ReadPiece::Zero { .. } => {
                    failed |= fill_guest_zero(&req.mem, &req.chain.inp, at, n).is_err();
                }
                ReadPiece::Bytes(b) => {
                    failed |= write_guest(&req.mem, &req.chain.inp, at, b).is_err();
                }
            }
            at += n;
        }
        req.written = len as u32;
        req.op = Op::Read { _plan: plan };
        if failed {
            req.status = S_IOERR;
            req.written = 0;
        }
        self.submit_sqes(slot, sqes, io);
    }

    /// Plans a write (again, after a Busy) and submits its transfers.
    fn try_write(&mut self, slot: usize, io: &dyn DirectIo) {
        let req = self.slots[slot].as_mut().expect("live request");
        let Op::Write { offset, plan } = &mut req.op else {
            unreachable!("try_write on a non-write")
        };
        let len = seg_len(&req.chain.out);
        // Point-in-time views first: the old contents are copied (by other threads)
        // before this write may land; meanwhile it waits here, not the queue.
        match self
            .device
            .try_before_write(*offset, len as u64, &self.waker)
        {
            WriteReady::Go => {}
            WriteReady::Wait => {
                self.deferred.push_back(slot);
                return;
            }
            WriteReady::Fail(why) => {
                warn!("write at {offset:#x} refused: {why}");
                req.status = S_IOERR;
                req.flush_after = false;
                return self.complete(slot);
            }
        }
        let mut p = match io.begin_write(*offset, len, &self.waker) {
            Ok(Attempt::Ready(p)) => p,
            Ok(Attempt::Busy) => {
                self.deferred.push_back(slot);
                return;
            }
            Err(e) => {
                warn!("write at {offset:#x} failed: {e}");
                req.status = S_IOERR;
                req.flush_after = false;
                return self.complete(slot);
            }
        };
        let mut sqes = Vec::with_capacity(p.pieces.len());
        let mut failed = false;
        for piece in &mut p.pieces {
            match piece {
                WritePiece::Data { at, offset, len } => {
                    match host_sqe(
                        &req.mem,
                        &req.chain.out,
                        *at,
                        *len,
                        *offset,
                        true,
                        &self.files,
                    ) {
                        Ok(s) => sqes.push(s),
                        Err(_) => failed = true,
                    }
                }
                WritePiece::Merge {
                    offset,
                    buf,
                    skip,
                    at,
                    len,
                } => {
                    let dst = &mut buf.as_mut_slice()[*skip..*skip + *len];
                    if read_guest(&req.mem, &req.chain.out, *at, dst).is_err() {
                        failed = true;
                        continue;
                    }
                    sqes.push(buffer_sqe(buf, *offset, &self.files));
                }
            }
        }
        *plan = Some(p);
        if failed {
            req.status = S_IOERR;
            req.flush_after = false;
        }
        self.submit_sqes(slot, sqes, io);
    }

    /// Runs a write-zeroes or discard (again, after a Busy) and submits its punches.
    fn try_zero(&mut self, slot: usize, io: &dyn DirectIo) {
        let req = self.slots[slot].as_mut().expect("live request");
        let Op::Zero {
            discard,
            offset,
            len,
            unmap,
            started,
        } = &mut req.op
        else {
            unreachable!("try_zero on a non-zero request")
        };
        if !*started {
            match self.device.try_before_write(*offset, *len, &self.waker) {
                WriteReady::Go => {}
                WriteReady::Wait => {
                    self.deferred.push_back(slot);
                    return;
                }
                WriteReady::Fail(why) => {
                    warn!("write-zeroes/discard at {offset:#x} refused: {why}");
                    req.status = S_IOERR;
                    req.flush_after = false;
                    return self.complete(slot);
                }
            }
        }
        let r = if *discard {
            io.try_discard(*offset, *len, &self.waker)
        } else {
            io.try_write_zeroes(*offset, *len, *unmap, &self.waker)
        };
        let plan = match r {
            Ok(Attempt::Ready(p)) => p,
            Ok(Attempt::Busy) => {
                self.deferred.push_back(slot);
                return;
            }
            Err(e) => {
                warn!(
                    "{} at {offset:#x}+{len} failed: {e}",
                    if *discard { "discard" } else { "write-zeroes" }
                );
                req.status = S_IOERR;
                req.flush_after = false;
                return self.complete(slot);
            }
        };
        *started = true;
        let sqes = plan
            .punch
            .into_iter()
            .map(|(offset, len)| Sqe {
                write: true,
                fd: self.files.buffered,
                offset,
                iov: Vec::new(),
                bounce: None,
                guest: Vec::new(),
                len: len as usize,
                punch: true,
            })
            .collect();
        self.submit_sqes(slot, sqes, io);
    }

    /// Writes back the engine's metadata and submits a data sync of the file.
    fn submit_flush(&mut self, slot: usize, io: &dyn DirectIo) {
        let req = self.slots[slot].as_mut().expect("live request");
        if let Err(e) = io.prepare_flush() {
            warn!("flush failed: {e}");
            req.status = S_IOERR;
            return self.complete(slot);
        }
        let fd = self.files.buffered;
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.push_entries(slot, vec![(entry, None)], io);
    }

    /// Queues a request's transfers; completes it at once when there are none.
    fn submit_sqes(&mut self, slot: usize, sqes: Vec<Sqe>, io: &dyn DirectIo) {
        let mut ring = Vec::with_capacity(sqes.len());
        for mut sqe in sqes {
            match self.inline(&mut sqe) {
                Inline::Done => {}
                Inline::Failed(e) => {
                    warn!(
                        "{} at {:#x} (+{}) failed: {e}",
                        if sqe.write { "write" } else { "read" },
                        sqe.offset,
                        sqe.len
                    );
                    let req = self.slots[slot].as_mut().expect("live request");
                    req.status = S_IOERR;
                    req.flush_after = false;
                    if !sqe.write {
                        req.written = 0;
                    }
                }
                Inline::Ring => ring.push(sqe),
            }
        }
        if ring.is_empty() {
            return self.transfers_done(slot, io);
        }
        let entries = ring.into_iter().map(|s| (s.entry(), Some(s))).collect();
        self.push_entries(slot, entries, io);
    }

    /// Tries a buffered transfer on this thread (see the module docs); what remains for
    /// the ring is left in `sqe`.
    fn inline(&mut self, sqe: &mut Sqe) -> Inline {
        if sqe.punch || sqe.fd != self.files.buffered || sqe.iov.is_empty() {
            return Inline::Ring;
        }
        let which = usize::from(sqe.write);
        let nowait = self.nowait[which] != Some(false);
        let mut done = 0usize;
        while done < sqe.len {
            let iov = advance(&sqe.iov, done);
            let off = (sqe.offset + done as u64) as libc::off_t;
            let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
            // SAFETY: the iovecs point into guest memory that the request keeps mapped,
            // or into its own buffers; nothing else uses them until it completes.
            let n = unsafe {
                if sqe.write {
                    libc::pwritev2(sqe.fd, iov.as_ptr(), iov.len() as i32, off, flags)
                } else {
                    libc::preadv2(sqe.fd, iov.as_ptr(), iov.len() as i32, off, flags)
                }
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            if n == 0 {
                if sqe.write {
                    return Inline::Failed(io::Error::from(io::ErrorKind::WriteZero));
                }
                // Past the end of the file: the rest reads as zeros.
                for v in &iov {
                    // SAFETY: as above; these bytes are the request's to fill.
                    unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                }
                return Inline::Done;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EOPNOTSUPP) if nowait => {
                    // This file system has no non-blocking buffered path: plain calls
                    // from now on (they only wait for the page cache).
                    self.nowait[which] = Some(false);
                    return self.inline(sqe);
                }
                Some(libc::EAGAIN) if nowait => {
                    self.nowait[which] = Some(true);
                    // Would block (not cached): the ring does the rest.
                    sqe.iov = iov;
                    sqe.offset += done as u64;
                    sqe.len -= done;
                    return Inline::Ring;
                }
                _ => return Inline::Failed(e),
            }
        }
        if nowait {
            self.nowait[which] = Some(true);
        }
        Inline::Done
    }

    fn push_entries(
        &mut self,
        slot: usize,
        entries: Vec<(io_uring::squeue::Entry, Option<Sqe>)>,
        io: &dyn DirectIo,
    ) {
        let req = self.slots[slot].as_mut().expect("live request");
        // Count every entry before the first is pushed: completions reaped while we
        // push (a full ring) must not see the request finished half-way.
        req.pending += entries.len();
        let mut tagged = Vec::with_capacity(entries.len());
        for (entry, sqe) in entries {
            let idx = req.sqes.len();
            req.sqes.push(sqe);
            tagged.push(entry.user_data(((slot as u64) << SQE_BITS) | idx as u64));
        }
        for entry in tagged {
            loop {
                // SAFETY: every buffer the entry points at (iovec arrays, the guest memory
                // they describe, bounce buffers) lives in `self.slots[slot]` — kept alive
                // by the request's `Arc<GuestMem>` and owned vectors whose heap storage does
                // not move — until this entry's completion has been reaped.
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_ok() {
                    break;
                }
                // A full submission queue: hand what we have to the kernel and retry;
                // if the kernel wants completions reaped first, reap them.
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap_cqes(io),
                    Err(e) => {
                        warn!("io_uring submit failed: {e}");
                        std::thread::yield_now();
                    }
                }
            }
        }
    }

    /// Hands every queued entry to the kernel.
    pub fn submit(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(e) = self.ring.submit() {
            // EBUSY: completions must be reaped first; the eventfd brings us back.
            if e.raw_os_error() != Some(libc::EBUSY) {
                warn!("io_uring submit failed: {e}");
            }
        }
    }

    /// Reaps completions, retries deferred requests, and returns the requests to
    /// publish. Call on the eventfd.
    pub fn reap(&mut self, io: &dyn DirectIo) {
        // Clear the eventfd before looking, so no wake-up in between is lost.
        let _ = self.event.read();
        self.reap_cqes(io);
        for _ in 0..self.deferred.len() {
            let Some(slot) = self.deferred.pop_front() else {
                break;
            };
            match self.slots[slot].as_ref().map(|r| &r.op) {
                Some(Op::Write { .. }) => self.try_write(slot, io),
                Some(Op::Zero { .. }) => self.try_zero(slot, io),
                _ => {}
            }
        }
        self.submit();
    }

    /// Handles every completion the ring holds.
    fn reap_cqes(&mut self, io: &dyn DirectIo) {
        loop {
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            if cqes.is_empty() {
                return;
            }
            for (ud, res) in cqes {
                self.on_cqe(ud, res, io);
            }
        }
    }

    fn on_cqe(&mut self, ud: u64, res: i32, io: &dyn DirectIo) {
        let slot = (ud >> SQE_BITS) as usize;
        let idx = (ud & ((1 << SQE_BITS) - 1)) as usize;
        let files = self.files;
        let Some(req) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            warn!("completion for unknown request {ud:#x}");
            return;
        };
        let sqe = req.sqes.get_mut(idx).and_then(Option::take);
        let ok = match sqe {
            // The flush.
            None => {
                res >= 0 || {
                    warn!("flush failed: {}", io::Error::from_raw_os_error(-res));
                    false
                }
            }
            Some(mut s) => match s.finish(res, &files) {
                Ok(()) => true,
                Err(e) => {
                    warn!(
                        "{} at {:#x} (+{}) failed: {e}",
                        if s.punch {
                            "deallocation"
                        } else if s.write {
                            "write"
                        } else {
                            "read"
                        },
                        s.offset,
                        s.len
                    );
                    false
                }
            },
        };
        if !ok {
            req.status = S_IOERR;
            req.flush_after = false;
            if matches!(req.op, Op::Read { .. }) {
                req.written = 0;
            }
        }
        req.pending -= 1;
        if req.pending == 0 {
            self.transfers_done(slot, io);
        }
    }

    /// Every transfer of the current phase is done: publish a write, go on to the
    /// writethrough flush, or complete.
    fn transfers_done(&mut self, slot: usize, io: &dyn DirectIo) {
        let req = self.slots[slot].as_mut().expect("live request");
        if let Op::Write { offset, plan } = &mut req.op {
            if let Some(p) = plan.take() {
                let ok = req.status == S_OK;
                if let Err(e) = io.finish_write(p, ok) {
                    warn!("write at {offset:#x} failed: {e}");
                    req.status = S_IOERR;
                    req.flush_after = false;
                }
            }
        }
        if req.flush_after {
            req.flush_after = false;
            return self.submit_flush(slot, io);
        }
        self.complete(slot);
    }

    /// Finishes a request: dirty-log the guest pages the kernel wrote, write the status
    /// byte and queue the used-ring entry.
    fn complete(&mut self, slot: usize) {
        let req = self.slots[slot].take().expect("live request");
        if let Some(token) = req.token {
            self.device.end_write(token);
        }
        if let Some((kind, offset, bytes)) = req.account {
            self.stats
                .record(kind, offset, bytes, req.started, req.status == S_OK);
        }
        if matches!(req.op, Op::Read { .. }) && req.written > 0 {
            // The kernel wrote these pages behind vm-memory's back.
            mark_dirty(&req.mem, &req.chain.inp);
        }
        let used = match req.mem.write_obj(req.status, req.chain.status) {
            Ok(()) => req.written.saturating_add(1),
            Err(e) => {
                warn!("cannot write the status of request {}: {e}", req.chain.head);
                0
            }
        };
        self.done.push((req.chain.head, used));
        self.free.push(slot);
    }

    /// Completed requests waiting for the used ring; call [`UringQueue::published`]
    /// once they are in it.
    pub fn take_done(&mut self) -> Vec<(u16, u32)> {
        std::mem::take(&mut self.done)
    }

    /// `n` completed requests are in the used ring: they no longer hold up
    /// GET_VRING_BASE or a disconnect.
    pub fn published(&self, n: usize) {
        self.inflight.sub(n);
    }
}

impl Sqe {
    fn entry(&self) -> io_uring::squeue::Entry {
        let fd = types::Fd(self.fd);
        if self.punch {
            return opcode::Fallocate::new(fd, self.len as u64)
                .offset(self.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build();
        }
        if self.write {
            opcode::Writev::new(fd, self.iov.as_ptr(), self.iov.len() as u32)
                .offset(self.offset)
                .build()
        } else {
            opcode::Readv::new(fd, self.iov.as_ptr(), self.iov.len() as u32)
                .offset(self.offset)
                .build()
        }
    }

    /// Handles the kernel's answer: finishes short transfers, refused direct I/O and
    /// unsupported punches synchronously; copies a bounce buffer back for reads.
    fn finish(&mut self, res: i32, files: &DataFiles) -> io::Result<()> {
        if self.punch {
            return match res {
                0.. => Ok(()),
                e if -e == libc::EOPNOTSUPP => zero_sync(files.buffered, self.offset, self.len),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
        }
        let done = match res {
            0.. => res as usize,
            // A device whose logical blocks are larger than our alignment refuses
            // 512-byte direct I/O: redo it buffered.
            e if -e == libc::EINVAL && self.fd != files.buffered => {
                self.fd = files.buffered;
                0
            }
            e => return Err(io::Error::from_raw_os_error(-e)),
        };
        if done < self.len {
            self.rest_sync(done)?;
        }
        if let (false, Some(b)) = (self.write, &self.bounce) {
            copy_to_iovecs(b.as_slice(), &self.guest);
        }
        Ok(())
    }

    /// Moves bytes `[done, len)` with plain syscalls; a read past the end of the file
    /// gives zeros.
    fn rest_sync(&mut self, mut done: usize) -> io::Result<()> {
        while done < self.len {
            let iov = advance(&self.iov, done);
            let off = (self.offset + done as u64) as libc::off_t;
            // SAFETY: the iovecs point into guest memory or a bounce buffer that stay
            // alive and untouched by anyone else until this request completes.
            let n = unsafe {
                if self.write {
                    libc::pwritev(self.fd, iov.as_ptr(), iov.len() as i32, off)
                } else {
                    libc::preadv(self.fd, iov.as_ptr(), iov.len() as i32, off)
                }
            };
            match n {
                0 if !self.write => {
                    for v in &iov {
                        // SAFETY: as above; the bytes are ours to write until completion.
                        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                    }
                    return Ok(());
                }
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The iovecs of `iov` after skipping `n` bytes.
fn advance(iov: &[libc::iovec], mut n: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iov.len());
    for v in iov {
        if n >= v.iov_len {
            n -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // SAFETY: `n < iov_len`, so the result stays inside the same buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(n) }.cast(),
            iov_len: v.iov_len - n,
        });
        n = 0;
    }
    out
}

fn copy_to_iovecs(src: &[u8], iov: &[libc::iovec]) {
    let mut at = 0;
    for v in iov {
        let n = v.iov_len.min(src.len() - at);
        // SAFETY: each iovec describes guest memory of this request, alive until it
        // completes; `src` is our own buffer, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), v.iov_base.cast(), n) };
        at += n;
    }
}

fn copy_from_iovecs(dst: &mut [u8], iov: &[libc::iovec]) {
    let mut at = 0;
    for v in iov {
        let n = v.iov_len.min(dst.len() - at);
        // SAFETY: as in `copy_to_iovecs`, in the other direction.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), dst[at..].as_mut_ptr(), n)
        };
        at += n;
    }
}

/// Zeroes a file range the slow way (file systems without PUNCH_HOLE).
fn zero_sync(fd: RawFd, offset: u64, len: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    // SAFETY: `fd` is the image's buffered descriptor, open for the life of the image;
    // ManuallyDrop keeps the borrowed descriptor from being closed here.
    let file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    let zeros = vec![0u8; len.min(1 << 20)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len());
        file.write_all_at(&zeros[..n], offset + done as u64)?;
        done += n;
    }
    Ok(())
}

/// Whether an address, offset or length suits the O_DIRECT descriptor.
fn aligned(x: usize) -> bool {
    x % DIRECT_ALIGN == 0
}

/// Total bytes of some segments.
fn seg_len(segs: &Segments) -> usize {
    segs.iter().map(|s| s.1).sum()
}

/// Calls `f` for each guest piece of bytes `[at, at + len)` of `segs`.
fn for_range(
    segs: &Segments,
    mut at: usize,
    mut len: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut done = 0;
    for &(addr, n) in segs {
        if len == 0 {
            break;
        }
        if at >= n {
            at -= n;
            continue;
        }
        let k = (n - at).min(len);
        f(addr.unchecked_add(at as u64), k, done)?;
        done += k;
        len -= k;
        at = 0;
    }
    if len == 0 {
        Ok(())
    } else {
        Err(())
    }
}

fn write_guest(mem: &GuestMem, segs: &Segments, at: usize, data: &[u8]) -> Result<(), ()> {
    for_range(segs, at, data.len(), |addr, k, done| {
        mem.write_slice(&data[done..done + k], addr).map_err(|_| ())
    })
}

fn read_guest(mem: &GuestMem, segs: &Segments, at: usize, out: &mut [u8]) -> Result<(), ()> {
    let len = out.len();
    for_range(segs, at, len, |addr, k, done| {
        mem.read_slice(&mut out[done..done + k], addr)
            .map_err(|_| ())
    })
}

fn fill_guest_zero(mem: &GuestMem, segs: &Segments, at: usize, len: usize) -> Result<(), ()> {
    static ZEROS: [u8; 65536] = [0; 65536];
    for_range(segs, at, len, |addr, k, _| {
        let mut off = 0;
        while off < k {
            let n = (k - off).min(ZEROS.len());
            mem.write_slice(&ZEROS[..n], addr.unchecked_add(off as u64))
                .map_err(|_| ())?;
            off += n;
        }
        Ok(())
    })
}

/// Marks the guest pages of `segs` in the migration dirty log.
fn mark_dirty(mem: &GuestMem, segs: &Segments) {
    for &(addr, len) in segs {
        for s in GuestMemoryBackend::get_slices(mem, addr, len).flatten() {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

/// Host iovecs for bytes `[at, at + len)` of `segs`.
fn iovecs(mem: &GuestMem, segs: &Segments, at: usize, len: usize) -> Result<Vec<libc::iovec>, ()> {
    let mut out = Vec::new();
    for_range(segs, at, len, |addr, k, _| {
        for s in GuestMemoryBackend::get_slices(mem, addr, k) {
            let s = s.map_err(|_| ())?;
            out.push(libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            });
        }
        Ok(())
    })?;
    Ok(out)
}

/// A transfer between guest bytes `[at, at + len)` of `segs` and host `offset`: straight
/// into guest memory, through the O_DIRECT descriptor when the guest buffers allow it,
/// else through an aligned bounce buffer (O_DIRECT) or the buffered descriptor.
fn host_sqe(
    mem: &GuestMem,
    segs: &Segments,
    at: usize,
    len: usize,
    offset: u64,
    write: bool,
    files: &DataFiles,
) -> Result<Sqe, ()> {
    let iov = iovecs(mem, segs, at, len)?;
    let mut sqe = Sqe {
        write,
        fd: files.buffered,
        offset,
        iov,
        bounce: None,
        guest: Vec::new(),
        len,
        punch: false,
    };
    let Some(direct) = files.direct else {
        return Ok(sqe);
    };
    if !aligned(offset as usize | len) {
        return Ok(sqe);
    }
    sqe.fd = direct;
    let aligned = sqe
        .iov
        .iter()
        .all(|v| aligned(v.iov_base as usize | v.iov_len));
    if !aligned {
        // O_DIRECT needs aligned memory: go through an aligned copy.
        let mut b = AlignedBuf::new(len);
        if write {
            copy_from_iovecs(b.as_mut_slice(), &sqe.iov);
        }
        let bounce_iov = vec![libc::iovec {
            iov_base: b.as_mut_slice().as_mut_ptr().cast(),
            iov_len: len,
        }];
        sqe.guest = std::mem::replace(&mut sqe.iov, bounce_iov);
        sqe.bounce = Some(b);
    }
    Ok(sqe)
}

/// A write of a whole engine buffer (copy-on-write merge) at host `offset`.
fn buffer_sqe(buf: &mut AlignedBuf, offset: u64, files: &DataFiles) -> Sqe {
    let len = buf.len();
    let fd = match files.direct {
        Some(d) if aligned(offset as usize | len) => d,
        _ => files.buffered,
    };
    Sqe {
        write: true,
        fd,
        offset,
        iov: vec![libc::iovec {
            iov_base: buf.as_mut_slice().as_mut_ptr().cast(),
            iov_len: len,
        }],
        bounce: None,
        guest: Vec::new(),
        len,
        punch: false,
    }
}

/// Splits a descriptor chain into header, data and status, checking that every buffer
/// lies in guest memory and that the chain is well formed.
fn parse_chain<M>(
    mem: &GuestMem,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<Chain, ChainError>
where
    M: std::ops::Deref<Target = GuestMem> + Clone,
{
    let head = chain.head_index();
    let mut readable: Segments = Vec::new();
    let mut writable: Segments = Vec::new();
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let len = desc.len() as usize;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(ChainError::OutsideMemory);
        }
        if len == 0 {
            continue;
        }
        if desc.is_write_only() {
            writable.push((desc.addr(), len));
        } else if !writable.is_empty() {
            return Err(ChainError::WrongOrder);
        } else {
            readable.push((desc.addr(), len));
        }
    }
    let Some(last) = writable.last_mut() else {
        return Err(ChainError::NoStatus);
    };
    last.1 -= 1;
    let status = last.0.unchecked_add(last.1 as u64);
    if last.1 == 0 {
        writable.pop();
    }
    let mut raw = [0u8; REQUEST_HEADER_SIZE];
    let header = if seg_len(&readable) >= REQUEST_HEADER_SIZE
        && read_guest(mem, &readable, 0, &mut raw).is_ok()
    {
        Some(RequestHeader::parse(&raw))
    } else {
        None
    };
    // The data after the header.
    let mut out = Vec::new();
    let mut skip = REQUEST_HEADER_SIZE;
    for (addr, n) in readable {
        if skip >= n {
            skip -= n;
            continue;
        }
        out.push((addr.unchecked_add(skip as u64), n - skip));
        skip = 0;
    }
    Ok(Chain {
        head,
        header,
        out,
        inp: writable,
        status,
    })
}
