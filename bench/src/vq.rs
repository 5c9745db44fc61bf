//! The driver side of one split virtqueue carrying virtio-blk requests.
//!
//! Guest memory layout (guest address = offset in [`GuestMem`]):
//! descriptor table at 0, avail ring at 0x1000, used ring at 0x2000, request headers at
//! 0x4000 (16 bytes per slot), status bytes at 0x5000, data buffers from 1 MiB on
//! (1 MiB per slot). Request slot `i` always uses descriptors `3i` (header),
//! `3i+1` (data) and `3i+2` (status), so the used id tells the slot.

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{os, BenchError, Result};
use crate::guest::GuestMem;

/// Ring size.
pub const QSIZE: u16 = 256;
/// Largest number of requests in flight.
pub const MAX_SLOTS: usize = 64;
/// Largest data buffer of one request.
pub const MAX_BLOCK: usize = 1 << 20;
/// Guest memory needed for the layout.
pub const MEM_SIZE: usize = DATA as usize + MAX_SLOTS * MAX_BLOCK;

/// Descriptor table address.
pub const DESC: u64 = 0;
/// Avail ring address.
pub const AVAIL: u64 = 0x1000;
/// Used ring address.
pub const USED: u64 = 0x2000;
const HEADERS: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const DATA: u64 = 0x10_0000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;

/// virtio-blk request type IN (read).
pub const T_IN: u32 = 0;
/// virtio-blk request type OUT (write).
pub const T_OUT: u32 = 1;

/// Whether an event index `event` asks for a notification when the index moves from
/// `old` to `new` (the virtio spec's `vring_need_event`).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Guest address of slot `slot`'s data buffer.
pub fn data_addr(slot: usize) -> u64 {
    DATA + (slot * MAX_BLOCK) as u64
}

/// One driven queue.
#[derive(Debug)]
pub struct SplitQueue<'m> {
    mem: &'m GuestMem,
    event_idx: bool,
    next_avail: u16,
    published: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
    /// Kicks actually sent (notifications to the server).
    pub kicks: u64,
    /// Times the driver slept on the call eventfd.
    pub sleeps: u64,
}

impl<'m> SplitQueue<'m> {
    /// Lays out the descriptor chains of every slot; `kick`/`call` are the eventfds
    /// already given to the server.
    pub fn new(mem: &'m GuestMem, event_idx: bool, kick: EventFd, call: EventFd) -> Self {
        for slot in 0..MAX_SLOTS {
            let d = (3 * slot) as u16;
            let q = SplitQueue::desc_ptr(mem, d);
            // SAFETY: the descriptor table lies inside the mapping (`desc_ptr` checks).
            unsafe {
                write_desc(q, HEADERS + 16 * slot as u64, 16, F_NEXT, d + 1);
                write_desc(
                    SplitQueue::desc_ptr(mem, d + 2),
                    STATUS + slot as u64,
                    1,
                    F_WRITE,
                    0,
                );
            }
        }
        SplitQueue {
            mem,
            event_idx,
            next_avail: 0,
            published: 0,
            last_used: 0,
            kick,
            call,
            kicks: 0,
            sleeps: 0,
        }
    }

    fn desc_ptr(mem: &GuestMem, d: u16) -> *mut u8 {
        mem.ptr(DESC + 16 * u64::from(d), 16)
    }

    fn u16_at(&self, addr: u64) -> &AtomicU16 {
        let p = self.mem.ptr(addr, 2);
        // SAFETY: `p` is 2-byte aligned (all ring fields are) and inside the shared
        // mapping, which outlives `self`; the server accesses it atomically too.
        unsafe { &*(p as *const AtomicU16) }
    }

    /// Queues (without publishing) request `slot`: `kind` is [`T_IN`] or [`T_OUT`],
    /// `len` bytes at 512-byte sector `sector`.
    pub fn add(&mut self, slot: usize, kind: u32, sector: u64, len: u32) {
        assert!(slot < MAX_SLOTS && len as usize <= MAX_BLOCK);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        let hp = self.mem.ptr(HEADERS + 16 * slot as u64, 16);
        let flags = if kind == T_IN {
            F_NEXT | F_WRITE
        } else {
            F_NEXT
        };
        let d = (3 * slot) as u16;
        // SAFETY: header, status byte, descriptor and avail slot are inside the mapping
        // (checked by `ptr`); the server does not read them before the avail index is
        // published.
        unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), hp, 16);
            self.mem.ptr(STATUS + slot as u64, 1).write_volatile(0xff);
            write_desc(
                Self::desc_ptr(self.mem, d + 1),
                data_addr(slot),
                len,
                flags,
                d + 2,
            );
            let a = AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE);
            (self.mem.ptr(a, 2) as *mut u16).write_volatile(d.to_le());
        }
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes the queued requests and notifies the server when it asked for it.
    pub fn publish(&mut self) -> Result<()> {
        if self.next_avail == self.published {
            return Ok(());
        }
        let old = self.published;
        fence(Ordering::Release);
        self.u16_at(AVAIL + 2)
            .store(self.next_avail.to_le(), Ordering::Release);
        self.published = self.next_avail;
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let avail_event = u16::from_le(
                self.u16_at(USED + 4 + 8 * u64::from(QSIZE))
                    .load(Ordering::Acquire),
            );
            need_event(avail_event, self.next_avail, old)
        } else {
            u16::from_le(self.u16_at(USED).load(Ordering::Acquire)) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.kicks += 1;
            self.kick.write(1).map_err(|e| BenchError::Os {
                what: "kick eventfd".into(),
                source: e,
            })?;
        }
        Ok(())
    }

    /// Takes every completed request off the used ring, calling `f(slot, status)`.
    pub fn harvest(&mut self, mut f: impl FnMut(usize, u8)) -> usize {
        let used_idx = u16::from_le(self.u16_at(USED + 2).load(Ordering::Acquire));
        let mut n = 0;
        while self.last_used != used_idx {
            let e = USED + 4 + 8 * u64::from(self.last_used % QSIZE);
            // SAFETY: the used element is inside the mapping; the acquire load of the
            // used index orders this read after the server's write.
            let id = u32::from_le(unsafe { (self.mem.ptr(e, 4) as *const u32).read_volatile() });
            let slot = id as usize / 3;
            // SAFETY: the status byte is inside the mapping and written before the used
            // index was published.
            let status = unsafe { self.mem.ptr(STATUS + slot as u64, 1).read_volatile() };
            f(slot, status);
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Waits for at least one completion (sleeping on the call eventfd as a guest waits
    /// for an interrupt) and harvests; fails after `timeout`.
    pub fn wait(&mut self, timeout: Duration, mut f: impl FnMut(usize, u8)) -> Result<usize> {
        loop {
            if self.event_idx {
                self.u16_at(AVAIL + 4 + 2 * u64::from(QSIZE))
                    .store(self.last_used.to_le(), Ordering::Release);
                fence(Ordering::SeqCst);
            }
            let n = self.harvest(&mut f);
            if n > 0 {
                return Ok(n);
            }
            self.sleeps += 1;
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.call),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd on a descriptor we own.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(os("poll on call eventfd"));
                }
            } else if r == 0 {
                return Err(BenchError::Timeout(timeout.as_secs()));
            } else {
                let _ = self.call.read();
            }
        }
    }
}

/// Writes one descriptor.
///
/// # Safety
/// `p` must point to 16 writable bytes.
unsafe fn write_desc(p: *mut u8, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: the caller guarantees 16 writable bytes; unaligned writes are used so no
    // alignment assumption is needed.
    unsafe {
        (p as *mut u64).write_unaligned(addr.to_le());
        (p.add(8) as *mut u32).write_unaligned(len.to_le());
        (p.add(12) as *mut u16).write_unaligned(flags.to_le());
        (p.add(14) as *mut u16).write_unaligned(next.to_le());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec() {
        // Server asked to be told when index 5 is passed.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(5, 5, 4));
        assert!(!need_event(9, 8, 3));
        // Wrap-around.
        assert!(need_event(u16::MAX, 1, u16::MAX - 1));
        assert!(!need_event(2, 1, u16::MAX));
    }

    #[test]
    fn layout_fits_the_memory() {
        assert!(USED + 6 + 8 * u64::from(QSIZE) <= HEADERS);
        assert!(HEADERS + 16 * MAX_SLOTS as u64 <= STATUS);
        assert!(STATUS + MAX_SLOTS as u64 <= DATA);
        assert!(3 * MAX_SLOTS <= usize::from(QSIZE));
        assert!(AVAIL + 6 + 2 * u64::from(QSIZE) <= USED);
    }
}
