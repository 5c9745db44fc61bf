//! Inflight I/O tracking for split virtqueues (vhost-user `INFLIGHT_SHMFD`).
//!
//! The frontend keeps a shared memory region for us across our restarts. For every
//! request taken from a ring we flag its head descriptor there (with a counter that
//! preserves the fetch order) and clear the flag once its used-ring entry is published.
//! A daemon restarted after a crash or an upgrade gets the same region back
//! (`SET_INFLIGHT_FD`) and, when each ring starts, resubmits the requests still flagged,
//! oldest first, before it takes new ones.
//!
//! Layout, per queue (the vhost-user specification's `QueueRegionSplit`, in host byte
//! order): `features: u64`, `version: u16`, `desc_num: u16`, `last_batch_head: u16`,
//! `used_idx: u16`, then `desc_num` entries of `inflight: u8`, 5 padding bytes,
//! `next: u16`, `counter: u64`. Queues follow each other at a 64-byte aligned stride
//! (the same stride libvhost-user uses, for queue sizes that are multiples of 4).
//!
//! Every field is accessed through atomics: the region is shared with the frontend and
//! with the next instance of this daemon, and the order of our stores is what makes a
//! crash at any instruction recoverable.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use log::warn;

/// Bytes of a queue region's header.
const QUEUE_HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC_STATE: usize = 16;
/// Queue regions start at multiples of this.
const QUEUE_ALIGN: usize = 64;
/// The region version we write; 0 means never initialised.
pub const VERSION: u16 = 1;
/// Largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes one queue of `queue_size` descriptors takes.
pub fn queue_stride(queue_size: u16) -> usize {
    (QUEUE_HEADER + DESC_STATE * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Why an inflight region was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Queue count or size out of range.
    #[error(
        "{num_queues} queue(s) of {queue_size} descriptors: expected 1 to {max_queues} \
         queue(s) of 1 to {MAX_QUEUE_SIZE} descriptors"
    )]
    Layout {
        /// Queues asked for.
        num_queues: u16,
        /// Descriptors per queue asked for.
        queue_size: u16,
        /// Queues this device has.
        max_queues: u16,
    },
    /// The region handed to us is smaller than its layout.
    #[error("an inflight region of {size} bytes cannot hold the {need} bytes its layout needs")]
    TooSmall {
        /// mmap size given.
        size: u64,
        /// Bytes needed.
        need: u64,
    },
    /// The region does not start at a 64-byte boundary of the file.
    #[error("inflight region offset {0} is not a multiple of 64")]
    Misaligned(u64),
    /// The file could be truncated under our mapping.
    #[error("the inflight file is not sealed against shrinking")]
    NotSealed,
    /// The file ends before the region does.
    #[error("the inflight file holds {len} bytes, less than the region's end at {end}")]
    ShortFile {
        /// File size.
        len: u64,
        /// Offset + size of the region.
        end: u64,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> InflightError {
    move |source| InflightError::Io { what, source }
}

/// Checks a queue layout against a device with `max_queues` queues.
fn check_layout(num_queues: u16, queue_size: u16, max_queues: u16) -> Result<u64, InflightError> {
    if num_queues == 0 || num_queues > max_queues || queue_size == 0 || queue_size > MAX_QUEUE_SIZE
    {
        return Err(InflightError::Layout {
            num_queues,
            queue_size,
            max_queues,
        });
    }
    Ok(queue_stride(queue_size) as u64 * u64::from(num_queues))
}

/// A new zeroed, sealed memfd for `num_queues` queues of `queue_size` descriptors
/// (`GET_INFLIGHT_FD`); returns it with its size.
pub fn create(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
) -> Result<(File, u64), InflightError> {
    let size = check_layout(num_queues, queue_size, max_queues)?;
    // SAFETY: the name is a valid NUL-terminated string; the returned descriptor is new
    // and owned by the File below.
    let fd = unsafe {
        libc::memfd_create(
            c"vhost-blk-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io_err("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(io_err("sizing the inflight memfd"))?;
    // Sealed against shrinking (a mapping past the end would fault) and growing.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io_err("sealing the inflight memfd")(
            io::Error::last_os_error(),
        ));
    }
    Ok((file, size))
}

/// The inflight region of one connection, mapped shared.
#[derive(Debug)]
pub struct InflightRegion {
    /// Start of the mapping (page aligned).
    map: NonNull<u8>,
    map_len: usize,
    /// Start of queue 0 (inside the mapping, 64-byte aligned).
    base: NonNull<u8>,
    num_queues: u16,
    queue_size: u16,
    stride: usize,
}

// SAFETY: the mapping is only accessed through atomic operations (see the accessors),
// so sharing and sending the pointer between threads is sound.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// Maps the region the frontend handed back (`SET_INFLIGHT_FD`), after checking that
    /// its layout fits our `max_queues` queues, the given size and the file, and that the
    /// file cannot shrink under the mapping.
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<Self, InflightError> {
        let need = check_layout(num_queues, queue_size, max_queues)?;
        if mmap_size < need {
            return Err(InflightError::TooSmall {
                size: mmap_size,
                need,
            });
        }
        if mmap_offset % QUEUE_ALIGN as u64 != 0 {
            return Err(InflightError::Misaligned(mmap_offset));
        }
        // SAFETY: fcntl on a descriptor we borrow; no pointer arguments.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let len = file
            .metadata()
            .map_err(io_err("reading the inflight file's size"))?
            .len();
        let end = mmap_offset.saturating_add(need);
        if len < end {
            return Err(InflightError::ShortFile { len, end });
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let map_off = mmap_offset - mmap_offset % page;
        let lead = (mmap_offset - map_off) as usize;
        let map_len = lead + need as usize;
        let off =
            libc::off_t::try_from(map_off).map_err(|_| InflightError::ShortFile { len, end })?;
        // SAFETY: a new shared mapping of a file we checked is long enough (and sealed
        // against shrinking); we own the mapping until Drop unmaps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_err("mapping the inflight region")(
                io::Error::last_os_error(),
            ));
        }
        let map = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null on success");
        // SAFETY: lead < map_len, so base is inside the mapping.
        let base = unsafe { map.add(lead) };
        Ok(InflightRegion {
            map,
            map_len,
            base,
            num_queues,
            queue_size,
            stride: queue_stride(queue_size),
        })
    }

    /// The byte at `offset` of queue `q`'s region as an atomic of type `T`.
    ///
    /// # Safety
    /// `offset + size_of::<T>()` must lie within the queue's stride, be aligned for `T`,
    /// and `q < num_queues`.
    unsafe fn field<T>(&self, q: usize, offset: usize) -> &T {
        debug_assert!(q < usize::from(self.num_queues));
        debug_assert!(offset + std::mem::size_of::<T>() <= self.stride);
        debug_assert_eq!(offset % std::mem::align_of::<T>(), 0);
        // SAFETY: the caller keeps the field inside the mapping, which lives as long as
        // self, and aligned (base and stride are multiples of 64).
        unsafe { &*self.base.as_ptr().add(q * self.stride + offset).cast::<T>() }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `map` with this address and length, and no
        // reference into it outlives self.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// What a ring must do when it starts with a region that was used before.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Head descriptors to run again, oldest first.
    pub resubmit: Vec<u16>,
    /// Where the ring resumes: everything before was completed or is resubmitted.
    /// `None` for a region seen for the first time (the ring base stands).
    pub next_avail: Option<u16>,
}

/// One queue's view of the region, owned by the queue's worker.
#[derive(Debug)]
pub struct QueueLog {
    region: Arc<InflightRegion>,
    q: usize,
    counter: u64,
    warned: bool,
}

// Field offsets inside a queue region.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;

impl QueueLog {
    /// Queue `q` of `region`; `None` if the region has no such queue.
    pub fn new(region: Arc<InflightRegion>, q: usize) -> Option<Self> {
        (q < usize::from(region.num_queues)).then_some(QueueLog {
            region,
            q,
            counter: 0,
            warned: false,
        })
    }

    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: header fields are inside the stride and 2-byte aligned; q was checked.
        unsafe { self.region.field(self.q, offset) }
    }

    fn desc_offset(&mut self, head: u16) -> Option<usize> {
        if head < self.region.queue_size {
            return Some(QUEUE_HEADER + DESC_STATE * usize::from(head));
        }
        if !self.warned {
            self.warned = true;
            warn!(
                "queue {}: descriptor {head} is past the {} the inflight region tracks; \
                 such requests are not tracked",
                self.q, self.region.queue_size
            );
        }
        None
    }

    fn inflight(&self, desc: usize) -> &AtomicU8 {
        // SAFETY: desc comes from desc_offset, inside the stride.
        unsafe { self.region.field(self.q, desc) }
    }

    fn next(&self, desc: usize) -> &AtomicU16 {
        // SAFETY: as above; offset 6 of a 16-byte aligned entry is 2-byte aligned.
        unsafe { self.region.field(self.q, desc + 6) }
    }

    fn counter(&self, desc: usize) -> &AtomicU64 {
        // SAFETY: as above; offset 8 of a 16-byte aligned entry is 8-byte aligned.
        unsafe { self.region.field(self.q, desc + 8) }
    }

    /// Request `head` was taken from the avail ring: record its fetch order, then flag it.
    pub fn started(&mut self, head: u16) {
        let Some(d) = self.desc_offset(head) else {
            return;
        };
        self.counter(d).store(self.counter, Ordering::Relaxed);
        self.counter += 1;
        self.inflight(d).store(1, Ordering::Release);
    }

    /// Request `head` is about to be published in the used ring (a batch of one): a crash
    /// between the used index update and [`QueueLog::published`] is undone from here.
    pub fn publishing(&mut self, head: u16) {
        let Some(d) = self.desc_offset(head) else {
            return;
        };
        let last = self.u16_at(LAST_BATCH_HEAD_AT);
        self.next(d)
            .store(last.load(Ordering::Relaxed), Ordering::Relaxed);
        last.store(head, Ordering::Release);
    }

    /// Request `head`'s used-ring entry was published and the used index is now
    /// `used_idx`: unflag it, then record the index.
    pub fn published(&mut self, head: u16, used_idx: u16) {
        if let Some(d) = self.desc_offset(head) {
            self.inflight(d).store(0, Ordering::Release);
        }
        self.u16_at(USED_IDX_AT).store(used_idx, Ordering::Release);
    }

    /// The ring starts and its used index in guest memory is `ring_used_idx`: initialises
    /// a new region, or repairs a region left by a crash and returns what to resubmit.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovery {
        let size = self.region.queue_size;
        let version = self.u16_at(VERSION_AT).load(Ordering::Acquire);
        if version != VERSION {
            if version != 0 {
                warn!(
                    "queue {}: inflight region version {version} is unknown; starting it afresh",
                    self.q
                );
            }
            for head in 0..size {
                let d = QUEUE_HEADER + DESC_STATE * usize::from(head);
                self.inflight(d).store(0, Ordering::Relaxed);
            }
            self.u16_at(DESC_NUM_AT).store(size, Ordering::Relaxed);
            self.u16_at(LAST_BATCH_HEAD_AT).store(0, Ordering::Relaxed);
            self.u16_at(USED_IDX_AT)
                .store(ring_used_idx, Ordering::Relaxed);
            self.u16_at(VERSION_AT).store(VERSION, Ordering::Release);
            self.counter = 0;
            return Recovery::default();
        }
        // Entries past our queue size (a region written for a larger queue) cannot be
        // valid heads of this ring.
        let desc_num = self.u16_at(DESC_NUM_AT).load(Ordering::Relaxed).min(size);
        let logged_used = self.u16_at(USED_IDX_AT).load(Ordering::Acquire);
        if logged_used != ring_used_idx {
            // The last batch reached the used ring but its flags were not cleared yet.
            let batch = ring_used_idx.wrapping_sub(logged_used);
            let mut head = self.u16_at(LAST_BATCH_HEAD_AT).load(Ordering::Relaxed);
            for _ in 0..batch {
                if head >= desc_num {
                    break;
                }
                let d = QUEUE_HEADER + DESC_STATE * usize::from(head);
                self.inflight(d).store(0, Ordering::Release);
                head = self.next(d).load(Ordering::Relaxed);
            }
            self.u16_at(USED_IDX_AT)
                .store(ring_used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..desc_num)
            .filter_map(|head| {
                let d = QUEUE_HEADER + DESC_STATE * usize::from(head);
                (self.inflight(d).load(Ordering::Acquire) != 0)
                    .then(|| (self.counter(d).load(Ordering::Relaxed), head))
            })
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Recovery {
            next_avail: Some(ring_used_idx.wrapping_add(pending.len() as u16)),
            resubmit: pending.into_iter().map(|(_, h)| h).collect(),
        }
    }
}

/// The inflight state of one connection, shared by the message relay (which installs
/// the region and sees rings start) and the queue workers.
#[derive(Debug)]
pub struct InflightLog {
    region: Mutex<Option<Arc<InflightRegion>>>,
    /// Per queue: the ring was (re)started since its worker last looked.
    started: Vec<AtomicBool>,
}

impl InflightLog {
    /// State for `num_queues` queues, without a region.
    pub fn new(num_queues: usize) -> Self {
        InflightLog {
            region: Mutex::new(None),
            started: (0..num_queues).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Installs (or, with `None`, drops) the connection's region.
    pub fn set_region(&self, region: Option<InflightRegion>) {
        *self.region.lock().unwrap_or_else(|p| p.into_inner()) = region.map(Arc::new);
    }

    /// Whether a region is installed.
    pub fn has_region(&self) -> bool {
        self.region
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Ring `q` got its kick descriptor (it starts): its worker checks the region before
    /// it takes anything from the ring.
    pub fn ring_started(&self, q: usize) {
        if let Some(s) = self.started.get(q) {
            s.store(true, Ordering::Release);
        }
    }

    /// For the worker of queue `q`: `Some(log)` once after the ring started (the log is
    /// `None` without a region), `None` otherwise.
    pub fn take_start(&self, q: usize) -> Option<Option<QueueLog>> {
        if !self.started.get(q)?.swap(false, Ordering::AcqRel) {
            return None;
        }
        let region = self
            .region
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some(region.and_then(|r| QueueLog::new(r, q)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (File, Arc<InflightRegion>) {
        let (file, len) = create(queues, size, 8).unwrap();
        assert_eq!(len, queue_stride(size) as u64 * u64::from(queues));
        let r = InflightRegion::map(&file, len, 0, queues, size, 8).unwrap();
        (file, Arc::new(r))
    }

    fn raw(file: &File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn stride_matches_libvhost_user_for_usual_sizes() {
        // libvhost-user: ALIGN_UP(16 * size + 2, 64).
        for size in [4u16, 128, 256, 1024, 32768] {
            let theirs = (16 * usize::from(size) + 2).next_multiple_of(64);
            assert_eq!(queue_stride(size), theirs, "size {size}");
        }
    }

    #[test]
    fn layout_is_the_specifications() {
        let (file, r) = region(2, 8);
        let mut log = QueueLog::new(r.clone(), 1).unwrap();
        assert_eq!(log.recover(7), Recovery::default());
        log.started(3);
        log.started(5);
        log.publishing(5);
        log.published(5, 8);
        let b = raw(&file);
        let q = &b[queue_stride(8)..];
        assert_eq!(u16::from_ne_bytes([q[8], q[9]]), VERSION);
        assert_eq!(u16::from_ne_bytes([q[10], q[11]]), 8, "desc_num");
        assert_eq!(u16::from_ne_bytes([q[12], q[13]]), 5, "last_batch_head");
        assert_eq!(u16::from_ne_bytes([q[14], q[15]]), 8, "used_idx");
        let d3 = &q[16 + 3 * 16..16 + 4 * 16];
        assert_eq!(d3[0], 1, "descriptor 3 in flight");
        assert_eq!(u64::from_ne_bytes(d3[8..16].try_into().unwrap()), 0);
        let d5 = &q[16 + 5 * 16..16 + 6 * 16];
        assert_eq!(d5[0], 0, "descriptor 5 completed");
        assert_eq!(u64::from_ne_bytes(d5[8..16].try_into().unwrap()), 1);
        assert!(
            b[..queue_stride(8)].iter().all(|&x| x == 0),
            "queue 0 untouched"
        );
        assert!(QueueLog::new(r, 2).is_none());
    }

    #[test]
    fn recovery_resubmits_in_fetch_order_and_resumes_after_them() {
        let (_file, r) = region(1, 16);
        let mut log = QueueLog::new(r.clone(), 0).unwrap();
        log.recover(100);
        for head in [9u16, 2, 14, 4] {
            log.started(head);
        }
        log.publishing(2);
        log.published(2, 101);
        // A new instance after a crash.
        let mut after = QueueLog::new(r, 0).unwrap();
        let rec = after.recover(101);
        assert_eq!(rec.resubmit, vec![9, 14, 4]);
        assert_eq!(rec.next_avail, Some(104));
        // The counter goes on after the replayed ones.
        after.started(7);
        let again = after.recover(101);
        assert_eq!(again.resubmit, vec![9, 14, 4, 7]);
    }

    #[test]
    fn recovery_undoes_a_crash_between_the_used_index_and_the_flag() {
        let (_file, r) = region(1, 16);
        let mut log = QueueLog::new(r.clone(), 0).unwrap();
        log.recover(0);
        log.started(3);
        log.started(6);
        log.publishing(6);
        // The used ring got entry 6 and its index went to 1; then the daemon died.
        let mut after = QueueLog::new(r, 0).unwrap();
        let rec = after.recover(1);
        assert_eq!(rec.resubmit, vec![3]);
        assert_eq!(rec.next_avail, Some(2));
        // A crash before the used index moved resubmits both.
        let (_file, r) = region(1, 16);
        let mut log = QueueLog::new(r.clone(), 0).unwrap();
        log.recover(0);
        log.started(3);
        log.started(6);
        log.publishing(6);
        let rec = QueueLog::new(r, 0).unwrap().recover(0);
        assert_eq!(rec.resubmit, vec![3, 6]);
        assert_eq!(rec.next_avail, Some(2));
    }

    #[test]
    fn hostile_regions_are_bounded() {
        let (file, r) = region(1, 8);
        let mut log = QueueLog::new(r.clone(), 0).unwrap();
        log.recover(0);
        // Scribble: every flag set, a huge desc_num, a last batch pointing out of range
        // and a used index far from the ring's.
        use std::os::unix::fs::FileExt;
        let mut b = raw(&file);
        b[10..12].copy_from_slice(&u16::MAX.to_ne_bytes());
        b[12..14].copy_from_slice(&500u16.to_ne_bytes());
        b[14..16].copy_from_slice(&40000u16.to_ne_bytes());
        for i in 0..8 {
            b[16 + 16 * i] = 0xff;
            b[16 + 16 * i + 8..16 + 16 * i + 16].copy_from_slice(&(8 - i as u64).to_ne_bytes());
        }
        file.write_all_at(&b, 0).unwrap();
        let rec = QueueLog::new(r.clone(), 0).unwrap().recover(3);
        assert_eq!(rec.resubmit, vec![7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(rec.next_avail, Some(11));
        // Descriptors past the region are not tracked, and do not panic.
        let mut log = QueueLog::new(r, 0).unwrap();
        log.started(8);
        log.publishing(300);
        log.published(300, 4);
    }

    #[test]
    fn mapping_checks_layout_size_offset_and_seals() {
        let (file, len) = create(2, 64, 2).unwrap();
        let m = |size, off, nq, qs| InflightRegion::map(&file, size, off, nq, qs, 2);
        assert!(matches!(
            m(len, 0, 3, 64),
            Err(InflightError::Layout { .. })
        ));
        assert!(matches!(m(len, 0, 1, 0), Err(InflightError::Layout { .. })));
        assert!(matches!(
            m(len, 0, 1, 40000),
            Err(InflightError::Layout { .. })
        ));
        assert!(matches!(
            m(len - 1, 0, 2, 64),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            m(len, 8, 2, 64),
            Err(InflightError::Misaligned(8))
        ));
        assert!(matches!(
            m(len, 64, 2, 64),
            Err(InflightError::ShortFile { .. })
        ));
        assert!(m(len - 64, 64, 1, 64).is_ok());
        // An unsealed file could shrink under the mapping.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(len).unwrap();
        assert!(matches!(
            InflightRegion::map(&plain, len, 0, 2, 64, 2),
            Err(InflightError::NotSealed)
        ));
        assert!(matches!(
            create(0, 64, 2),
            Err(InflightError::Layout { .. })
        ));
    }

    #[test]
    fn the_log_hands_each_start_to_the_worker_once() {
        let log = InflightLog::new(2);
        assert!(log.take_start(0).is_none());
        log.ring_started(0);
        log.ring_started(5);
        assert!(matches!(log.take_start(0), Some(None)));
        assert!(log.take_start(0).is_none());
        let (file, len) = create(2, 8, 2).unwrap();
        log.set_region(Some(InflightRegion::map(&file, len, 0, 2, 8, 2).unwrap()));
        assert!(log.has_region());
        log.ring_started(1);
        assert!(matches!(log.take_start(1), Some(Some(_))));
    }
}
