//! The vhost-user transport: a `VhostUserBackend` with one worker thread per virtqueue
//! and per-queue state, so queues run in parallel. Each queue runs either the io_uring
//! data path ([`crate::uring`]: many requests in flight, completions reaped from an
//! eventfd on the same worker thread) or the synchronous one (one request at a time).

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::Aio;
use crate::device::{BlkDevice, CHUNK_SIZE};
use crate::inflight::{InflightLog, QueueLog};
use crate::replay;
use crate::transport::{process_chain, GuestMem};
use crate::uring::{InflightCount, UringQueue};
use crate::virtio_blk::{self, ConfigInputs, CONFIG_WCE_OFFSET};
use qcow2::{AlignedBuf, DirectIo};

/// Guest memory shared with the vhost-user handler.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// Our vring type.
pub type BlkVring = VringRwLock<GuestMemAtomic>;

/// Virtio features offered: device features plus the vhost-user transport bits.
pub fn offered_features(read_only: bool) -> u64 {
    virtio_blk::device_features(read_only)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// Protocol features offered (REPLY_ACK is also added by the vhost crate itself).
/// INFLIGHT_SHMFD is answered by the relay (`relay.rs`), in front of the crate.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// State owned by one queue's worker thread.
#[derive(Debug)]
enum QueueWorker {
    /// One synchronous request at a time through a bounce buffer.
    Sync {
        buf: AlignedBuf,
        stats: Arc<crate::stats::QueueStats>,
    },
    /// io_uring: many requests in flight.
    Uring(Box<UringQueue>),
}

/// One queue's worker state: its I/O engine and its view of the inflight region.
#[derive(Debug)]
struct Worker {
    io: QueueWorker,
    /// Set when the ring started with an inflight region (INFLIGHT_SHMFD).
    log: Option<QueueLog>,
}

/// Exit event of one worker thread.
#[derive(Debug)]
struct ExitEvent {
    consumer: EventConsumer,
    notifier: EventNotifier,
    /// Consumer clones handed to the vhost-user-backend event loop (it keeps them as raw
    /// fds and never closes them); closed by [`BlkBackend::close_handed_out_fds`].
    handed_out: Mutex<Vec<RawFd>>,
}

/// Most requests a queue worker starts per wake-up before it lets the event loop (and
/// whoever waits for the vring lock: GET_VRING_BASE, other frontend messages) run.
const MAX_BATCH: usize = 64;

/// The vhost-user-blk backend for one frontend connection.
#[derive(Debug)]
pub struct BlkBackend {
    device: Arc<BlkDevice>,
    num_queues: usize,
    queue_size: usize,
    mem: GuestMemAtomic,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    logged_connection: AtomicBool,
    workers: Vec<Mutex<Worker>>,
    /// Inflight tracking of this connection (region and ring starts, from the relay).
    inflight_log: Arc<InflightLog>,
    inflight: Vec<Arc<InflightCount>>,
    exit_events: Vec<ExitEvent>,
    /// Per queue: written when a wake-up stopped with requests left in the ring, so the
    /// worker comes back to them after the event loop had its turn (fairness).
    rewake: Vec<vmm_sys_util::eventfd::EventFd>,
    /// The connection is gone: start no more requests (those in flight complete).
    quiesced: AtomicBool,
}

impl BlkBackend {
    /// A backend for `device`; `mem` must be the same atomic memory given to the daemon.
    /// With `Aio::IoUring`, queues fall back to the synchronous path (one log line says
    /// why) when the image has no file descriptor or the kernel refuses io_uring.
    pub fn new(
        device: Arc<BlkDevice>,
        num_queues: usize,
        queue_size: usize,
        aio: Aio,
        mem: GuestMemAtomic,
    ) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(num_queues);
        let mut inflight = Vec::with_capacity(num_queues);
        let mut exit_events = Vec::with_capacity(num_queues);
        let mut rewake = Vec::with_capacity(num_queues);
        let mut use_uring = aio == Aio::IoUring;
        let files = device.image().direct().and_then(|d| d.data_files());
        if use_uring && files.is_none() {
            info!("image has no file descriptor for io_uring: using synchronous I/O threads");
            use_uring = false;
        }
        for _ in 0..num_queues {
            let count = Arc::new(InflightCount::default());
            let mut worker = None;
            if let (true, Some(files)) = (use_uring, files) {
                match UringQueue::new(
                    queue_size,
                    files,
                    count.clone(),
                    device.stats().queue(workers.len()),
                    device.clone(),
                ) {
                    Ok(q) => worker = Some(QueueWorker::Uring(Box::new(q))),
                    Err(e) => {
                        warn!("io_uring unavailable ({e}): using synchronous I/O threads");
                        use_uring = false;
                    }
                }
            }
            let q = workers.len();
            workers.push(Mutex::new(Worker {
                io: worker.unwrap_or_else(|| QueueWorker::Sync {
                    buf: AlignedBuf::new(CHUNK_SIZE),
                    stats: device.stats().queue(q),
                }),
                log: None,
            }));
            inflight.push(count);
            rewake.push(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
            let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
            exit_events.push(ExitEvent {
                consumer,
                notifier,
                handed_out: Mutex::new(Vec::new()),
            });
        }
        Ok(BlkBackend {
            device,
            num_queues,
            queue_size,
            mem,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            logged_connection: AtomicBool::new(false),
            workers,
            inflight_log: Arc::new(InflightLog::new(num_queues)),
            inflight,
            exit_events,
            rewake,
            quiesced: AtomicBool::new(false),
        })
    }

    /// The `handle_event` id of the io_uring completion events (past the ids the event
    /// loop reserves for the queues and its exit event).
    fn completion_event(&self) -> u16 {
        self.num_queues as u16 + 1
    }

    /// The `handle_event` id of the rewake events (see [`BlkBackend::process_queue`]).
    fn rewake_event(&self) -> u16 {
        self.num_queues as u16 + 2
    }

    fn lock_worker(&self, q: usize) -> std::sync::MutexGuard<'_, Worker> {
        self.workers[q].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers each queue's rewake eventfd and, for io_uring queues, its completion
    /// eventfd with its worker thread's epoll loop (one handler per queue, in queue order).
    pub fn register_worker_events<
        H: std::ops::Deref<Target = vhost_user_backend::VringEpollHandler<Arc<Self>>>,
    >(
        &self,
        handlers: &[H],
    ) -> io::Result<()> {
        for (q, h) in handlers.iter().enumerate().take(self.num_queues) {
            h.register_listener(
                self.rewake[q].as_raw_fd(),
                EventSet::IN,
                u64::from(self.rewake_event()),
            )?;
            if let QueueWorker::Uring(u) = &self.lock_worker(q).io {
                h.register_listener(
                    u.event_fd(),
                    EventSet::IN,
                    u64::from(self.completion_event()),
                )?;
            }
        }
        Ok(())
    }

    /// Starts no more requests: the frontend went away (what it left in the rings stays
    /// there, unstarted).
    pub fn quiesce(&self) {
        self.quiesced.store(true, Ordering::SeqCst);
    }

    /// Waits until every request taken from any ring has completed.
    pub fn drain(&self) {
        for c in &self.inflight {
            c.wait_idle("disconnect");
        }
    }

    /// The device.
    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.device
    }

    /// Features the frontend acknowledged (0 before SET_FEATURES).
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    /// Tells every worker thread to exit.
    pub fn signal_exit(&self) {
        for e in &self.exit_events {
            if let Err(err) = e.notifier.notify() {
                warn!("failed to signal a vring worker to exit: {err}");
            }
        }
    }

    /// Closes the exit-event fds the event loop kept. Call only after the daemon that
    /// used this backend was dropped (its worker threads joined).
    pub fn close_handed_out_fds(&self) {
        for e in &self.exit_events {
            for fd in e
                .handed_out
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                // SAFETY: `fd` is a dup we created in `exit_event` and passed to the event
                // loop, which converted it to a raw fd and never closes it; its epoll and
                // threads are gone, so nothing else uses or owns this descriptor.
                unsafe { libc::close(fd) };
            }
        }
    }

    fn process_queue(&self, queue_index: usize, vring: &BlkVring) -> io::Result<()> {
        let mut guard = self.lock_worker(queue_index);
        let worker = &mut *guard;
        // Holding the vring lock for the whole batch makes GET_VRING_BASE (which takes
        // it to stop the ring) wait until the synchronous requests we started have
        // completed; io_uring requests are waited for in `stop_vring`.
        let mut state = vring.get_mut();
        // Rings are processed only while started (ready) and enabled, and while the
        // frontend is there.
        if !state.get_queue().ready() || !state.is_enabled() || self.quiesced.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mem = self.mem.memory().into_inner();
        let io = self.device.image().direct();
        let mut published = false;
        // A ring that (re)started looks at the inflight region first: requests a crashed
        // or stopped instance left in flight run again before anything new.
        if let Some(log) = self.inflight_log.take_start(queue_index) {
            worker.log = log;
            published |= self.resubmit(queue_index, worker, &mut state, &mem, io)?;
        }
        // At most MAX_BATCH requests per wake-up: a guest that refills the ring
        // as fast as it is drained must not keep the vring lock (GET_VRING_BASE, other
        // frontend messages) and the event loop (exit) waiting for ever.
        let mut budget = usize::from(state.get_queue().size()).clamp(1, MAX_BATCH);
        let mut more = false;
        loop {
            if event_idx {
                state.disable_notification().map_err(io::Error::other)?;
            }
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.deref()) {
                budget -= 1;
                if let Some(log) = &mut worker.log {
                    log.started(chain.head_index());
                }
                published |= self.start_request(queue_index, worker, &mut state, &mem, io, chain);
                if budget == 0 {
                    more = true;
                    break;
                }
            }
            if let QueueWorker::Uring(u) = &mut worker.io {
                u.submit();
                published |= publish(queue_index, &mut state, u, worker.log.as_mut());
            }
            if more || !event_idx || !state.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        if more {
            // Come back to the rest after the event loop's other events.
            self.rewake[queue_index].write(1)?;
        }
        if published && state.needs_notification().map_err(io::Error::other)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Starts one request (already flagged in the inflight region, if any); true if it
    /// completed and was published at once (synchronous path).
    fn start_request<M>(
        &self,
        queue_index: usize,
        worker: &mut Worker,
        state: &mut BlkVringState,
        mem: &Arc<GuestMem>,
        io: Option<&dyn DirectIo>,
        chain: virtio_queue::DescriptorChain<M>,
    ) -> bool
    where
        M: Deref<Target = GuestMem> + Clone,
    {
        match (&mut worker.io, io) {
            // A queue runs io_uring only on an image with a direct data path.
            (QueueWorker::Uring(u), Some(io)) => {
                u.start(&self.device, io, mem, chain);
                false
            }
            (QueueWorker::Uring(_), None) => unreachable!("io_uring queue without a data path"),
            (QueueWorker::Sync { buf, stats }, _) => {
                let head = chain.head_index();
                let used = process_chain(&self.device, buf, mem, chain, stats);
                complete(queue_index, state, worker.log.as_mut(), head, used);
                true
            }
        }
    }

    /// The ring started with an inflight region: repairs it, moves the ring to where the
    /// region says it stopped, and starts the requests it still has in flight, oldest
    /// first. True if any was published at once.
    fn resubmit(
        &self,
        queue_index: usize,
        worker: &mut Worker,
        state: &mut BlkVringState,
        mem: &Arc<GuestMem>,
        io: Option<&dyn DirectIo>,
    ) -> io::Result<bool> {
        let Some(log) = worker.log.as_mut() else {
            return Ok(false);
        };
        let used = state
            .get_queue()
            .used_idx(mem.deref(), Ordering::Acquire)
            .map_err(io::Error::other)?
            .0;
        let recovery = log.recover(used);
        if let Some(next) = recovery.next_avail {
            // Whatever the ring base said: every entry before `next` completed or is
            // resubmitted below (libvhost-user does the same).
            let queue = state.get_queue_mut();
            queue.set_next_avail(next);
            queue.set_next_used(used);
        }
        if recovery.resubmit.is_empty() {
            return Ok(false);
        }
        info!(
            "queue {queue_index}: resubmitting {} request(s) that were in flight",
            recovery.resubmit.len()
        );
        let queue = state.get_queue();
        let replay = match replay::chains(mem, queue.desc_table(), queue.size(), &recovery.resubmit)
        {
            Ok(r) => r,
            Err(e) => {
                error!("queue {queue_index}: {e}; those requests never complete");
                return Ok(false);
            }
        };
        let mut published = false;
        for chain in replay.chains {
            published |= self.start_request(queue_index, worker, state, &replay.mem, io, chain);
        }
        Ok(published)
    }

    /// Reaps io_uring completions of queue `queue_index` and publishes them.
    fn complete_queue(&self, queue_index: usize, vring: &BlkVring) -> io::Result<()> {
        let mut guard = self.lock_worker(queue_index);
        let worker = &mut *guard;
        let (QueueWorker::Uring(u), Some(io)) = (&mut worker.io, self.device.image().direct())
        else {
            return Ok(());
        };
        u.reap(io);
        let mut state = vring.get_mut();
        if publish(queue_index, &mut state, u, worker.log.as_mut())
            && state.needs_notification().map_err(io::Error::other)?
        {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// The inflight tracking of this connection, for the relay that installs its region.
    pub(crate) fn inflight_log(&self) -> &Arc<InflightLog> {
        &self.inflight_log
    }
}

/// A locked vring's state.
type BlkVringState = vhost_user_backend::VringState<GuestMemAtomic>;

/// Publishes one completed request in the used ring, in the inflight region's order
/// (batch head recorded, used ring and index written, then the flag cleared).
fn complete(
    queue_index: usize,
    state: &mut BlkVringState,
    mut log: Option<&mut QueueLog>,
    head: u16,
    len: u32,
) {
    if let Some(log) = log.as_deref_mut() {
        log.publishing(head);
    }
    if let Err(e) = state.add_used(head, len) {
        warn!("queue {queue_index}: add_used failed: {e}");
    }
    if let Some(log) = log {
        log.published(head, state.get_queue().next_used());
    }
}

/// Puts the completed requests of an io_uring queue into the used ring; true if any.
fn publish(
    queue_index: usize,
    state: &mut BlkVringState,
    u: &mut UringQueue,
    mut log: Option<&mut QueueLog>,
) -> bool {
    let done = u.take_done();
    for &(head, len) in &done {
        complete(queue_index, state, log.as_deref_mut(), head, len);
    }
    u.published(done.len());
    !done.is_empty()
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = BlkVring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        offered_features(self.device.image().is_read_only())
    }

    fn acked_features(&self, features: u64) {
        let before = self.acked_features.swap(features, Ordering::Relaxed);
        self.device.set_acked_features(features);
        let first = !self.logged_connection.swap(true, Ordering::Relaxed);
        if features == 0 {
            // Accepted (some frontends reset this way), but worth a line.
            warn!("frontend set the features to 0");
        } else if first || features != before {
            // Every change is logged: LOG_ALL on and off is how migration shows up.
            info!(
                "frontend {} features {features:#x} (event_idx={}, flush={}, log_all={}), {} queue(s) of up to {} entries",
                if first { "negotiated" } else { "changed the" },
                virtio_blk::has_event_idx(features),
                virtio_blk::has_flush(features),
                features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0,
                self.num_queues,
                self.queue_size
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        offered_protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = virtio_blk::config_space(&ConfigInputs {
            size: self.device.image().size(),
            logical_block_size: self.device.logical_block_size(),
            num_queues: self.num_queues as u16,
            wce: self.device.wce(),
        });
        let (offset, size) = (offset as usize, size as usize);
        // Fields past our structure read as zero (the vhost crate bounds size to 4 KiB).
        let mut out = vec![0u8; size];
        if offset < cfg.len() {
            let n = size.min(cfg.len() - offset);
            out[..n].copy_from_slice(&cfg[offset..offset + n]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable. Any error here would make the vhost crate
        // drop the whole connection, so writes to other fields are ignored (with a warning).
        let start = offset as usize;
        let end = start.saturating_add(buf.len());
        if start != CONFIG_WCE_OFFSET || buf.len() != 1 {
            warn!("ignoring write to read-only config space bytes {start}..{end}");
        }
        if !(start..end).contains(&CONFIG_WCE_OFFSET) {
            return Ok(());
        }
        let wce = buf[CONFIG_WCE_OFFSET - start];
        self.device.set_wce(wce);
        info!(
            "guest set write cache to {}",
            if wce != 0 {
                "writeback"
            } else {
                "writethrough"
            }
        );
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemAtomic) -> io::Result<()> {
        // `self.mem` is a clone of the same atomic handle: it already sees the new map.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let e = self.exit_events.get(thread_index)?;
        let consumer = e.consumer.try_clone().ok()?;
        let notifier = e.notifier.try_clone().ok()?;
        e.handed_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[BlkVring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("ignoring unexpected event set {evset:?}");
            return Ok(());
        }
        // One queue per thread: the thread index is the queue index, and the thread's
        // only vring is at index 0 (completion events carry their own id).
        let idx = if device_event == self.completion_event() || device_event == self.rewake_event()
        {
            0
        } else {
            device_event as usize
        };
        let Some(vring) = vrings.get(idx) else {
            warn!("ignoring event for unknown vring {device_event}");
            return Ok(());
        };
        if thread_id >= self.num_queues {
            warn!("ignoring event on unknown worker thread {thread_id}");
            return Ok(());
        }
        let result = if device_event == self.completion_event() {
            self.complete_queue(thread_id, vring)
        } else if device_event == self.rewake_event() {
            // Consume the wake-up (level-triggered), then go on with the ring.
            let _ = self.rewake[thread_id].read();
            self.process_queue(thread_id, vring)
        } else {
            self.process_queue(thread_id, vring)
        };
        if let Err(e) = result {
            // Returning an error would end the worker thread for good; log instead.
            warn!("queue {thread_id}: {e}");
        }
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the ring was marked stopped; answer only once every request
        // taken from it has completed (the worker thread keeps reaping meanwhile).
        if let Some(c) = self.inflight.get(queue_index as usize) {
            c.wait_idle("GET_VRING_BASE");
        }
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> io::Result<Option<File>> {
        // A block device has no state besides the rings: the blob is empty. Dropping the
        // file closes our end, which the frontend reads as end of stream (SAVE), and a
        // LOAD of an empty blob needs nothing.
        log::debug!("device state transfer {direction:?}: empty");
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        Ok(())
    }
}
