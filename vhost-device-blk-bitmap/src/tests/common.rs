//! Shared fixtures: guest memory, images with fault injection, a recording tracker.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use qcow2::{MemStorage, RawImage, Storage};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::{BlkDevice, CHUNK_SIZE};
use crate::tracker::{TrackerError, WriteTracker};
use crate::transport::{process_chain, GuestMem};
use crate::virtio_blk::SECTOR_SIZE;
use qcow2::AlignedBuf;

/// Guest RAM size in tests.
pub const MEM_SIZE: usize = 0x80_0000;
/// Where request headers go.
pub const HDR: u64 = 0x10_0000;
/// Where data buffers go.
pub const DATA: u64 = 0x20_0000;
/// Where the status byte goes.
pub const STATUS: u64 = 0x1f_0000;
/// Disk size.
pub const DISK: u64 = 4 << 20;

/// A tracker that records every mark.
#[derive(Debug, Default)]
pub struct RecordingTracker {
    pub marks: Mutex<Vec<(u64, u64)>>,
}

impl RecordingTracker {
    pub fn take(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.marks.lock().unwrap())
    }
}

impl WriteTracker for RecordingTracker {
    fn mark(&self, offset: u64, len: u64) -> u64 {
        self.marks.lock().unwrap().push((offset, len));
        0
    }
    fn on_frontend_connected(&self) -> Result<(), TrackerError> {
        Ok(())
    }
    fn on_frontend_disconnected(&self) -> Result<(), TrackerError> {
        Ok(())
    }
    fn on_shutdown(&self) -> Result<(), TrackerError> {
        Ok(())
    }
}

/// Memory storage that counts syncs and can fail writes.
#[derive(Debug, Default)]
pub struct TestStorage {
    pub inner: MemStorage,
    pub syncs: AtomicUsize,
    pub fail_writes: AtomicBool,
}

impl Storage for TestStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A device over a patterned in-memory raw disk.
pub struct Fixture {
    pub mem: GuestMem,
    pub storage: Arc<TestStorage>,
    pub tracker: Arc<RecordingTracker>,
    pub device: BlkDevice,
    pub buf: AlignedBuf,
}

/// Byte `i` of the initial disk.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7) ^ (i >> 9)) as u8
}

impl Fixture {
    pub fn new(read_only: bool, lbs: u32) -> Self {
        let storage = Arc::new(TestStorage::default());
        let data: Vec<u8> = (0..DISK).map(pattern).collect();
        storage.inner.write_at(&data, 0).unwrap();
        let image = Arc::new(RawImage::new(storage.clone(), read_only).unwrap());
        let tracker = Arc::new(RecordingTracker::default());
        let device = BlkDevice::new(image, tracker.clone(), lbs, b"serial-42", true);
        Fixture {
            mem: guest_memory(),
            storage,
            tracker,
            device,
            buf: AlignedBuf::new(CHUNK_SIZE),
        }
    }

    /// Runs one chain; returns the used length.
    pub fn run(&mut self, descs: &[RawDescriptor]) -> u32 {
        let vq = MockSplitQueue::new(&self.mem, 256);
        let chain = vq.build_desc_chain(descs).unwrap();
        process_chain(
            &self.device,
            &mut self.buf,
            &self.mem,
            chain,
            &self.device.stats().queue(0),
        )
    }

    pub fn disk(&self) -> Vec<u8> {
        self.storage.inner.snapshot()
    }

    pub fn status(&self) -> u8 {
        self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
    }

    /// Writes the request header at HDR and sets the status byte to 0xff.
    pub fn header(&self, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    pub fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

pub fn guest_memory() -> GuestMem {
    GuestMemoryMmap::<BitmapMmapRegion>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A device-readable descriptor.
pub fn rd(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

/// A device-writable descriptor.
pub fn wr(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

/// An indirect descriptor pointing at a table of `n` descriptors at `addr`.
pub fn indirect(addr: u64, n: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        n * 16,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))
}

/// Standard chains.
pub fn hdr() -> RawDescriptor {
    rd(HDR, 16)
}
pub fn status() -> RawDescriptor {
    wr(STATUS, 1)
}

/// Bytes for `sectors` sectors.
pub fn sectors(n: u64) -> u32 {
    (n * SECTOR_SIZE) as u32
}
