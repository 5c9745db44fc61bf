//! virtio-blk request emulation, independent of the vhost-user transport: a parsed
//! header plus a readable stream (data after the header) and a writable stream (data
//! before the status byte) go in, a status byte and a byte count come out.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use qcow2::BlockImage;

use crate::stats::{DeviceStats, IoKind, QueueStats};
use crate::tracker::WriteTracker;
use crate::virtio_blk::*;
use qcow2::AlignedBuf;

/// Bytes moved per image call for IN/OUT (the bounce buffer size).
pub const CHUNK_SIZE: usize = 1 << 20;

/// The 16-byte virtio-blk request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// VIRTIO_BLK_T_*.
    pub request_type: u32,
    /// Start sector in 512-byte units.
    pub sector: u64,
}

impl RequestHeader {
    /// Decodes the little-endian header.
    pub fn parse(raw: &[u8; REQUEST_HEADER_SIZE]) -> Self {
        RequestHeader {
            request_type: u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes")),
            sector: u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// Outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// VIRTIO_BLK_S_*.
    pub status: u8,
    /// Bytes written into the device-writable data area (not counting the status byte).
    pub written: u32,
}

impl Completion {
    fn status(status: u8) -> Self {
        Completion { status, written: 0 }
    }
}

/// What [`BlkDevice::begin_write`] hands to [`BlkDevice::end_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteToken {
    offset: u64,
    len: u64,
    generation: u64,
}

/// Whether a marked write may be submitted (see [`BlkDevice::try_before_write`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteReady {
    /// Submit it.
    Go,
    /// Not yet: the waker is called when it may be asked again.
    Wait,
    /// Fail it with an I/O error (the reason, for the log).
    Fail(String),
}

/// A block device: an image, its write tracker and the guest-visible parameters.
#[derive(Debug)]
pub struct BlkDevice {
    image: Arc<dyn BlockImage>,
    tracker: Arc<dyn WriteTracker>,
    /// The tracker's crash-consistency shadow: a write waits until its granules are
    /// durable in it.
    shadow: Option<Arc<qcow2_bitmaps::Shadow>>,
    views: crate::snapshot::Views,
    /// The format was probed as raw: writes of another format's magic to sector 0 are
    /// refused (see [`crate::disk::format_magic`]).
    guard_sector0: AtomicBool,
    /// Such a write was refused and logged already.
    sector0_warned: AtomicBool,
    logical_block_size: u32,
    serial: [u8; ID_BYTES],
    wce: AtomicU8,
    flush_negotiated: AtomicBool,
    stats: DeviceStats,
}

impl BlkDevice {
    /// Serves `image` with the given logical block size (512 or 4096) and GET_ID serial
    /// (at most 20 bytes); `writeback` is the initial wce byte.
    pub fn new(
        image: Arc<dyn BlockImage>,
        tracker: Arc<dyn WriteTracker>,
        logical_block_size: u32,
        serial: &[u8],
        writeback: bool,
    ) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        BlkDevice {
            image,
            shadow: tracker.shadow(),
            tracker,
            views: Default::default(),
            guard_sector0: AtomicBool::new(false),
            sector0_warned: AtomicBool::new(false),
            logical_block_size,
            serial: id,
            wce: AtomicU8::new(u8::from(writeback)),
            flush_negotiated: AtomicBool::new(true),
            stats: DeviceStats::new(crate::config::MAX_QUEUES as usize),
        }
    }

    /// The image.
    pub fn image(&self) -> &Arc<dyn BlockImage> {
        &self.image
    }

    /// I/O statistics per queue.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// The write tracker.
    pub fn tracker(&self) -> &Arc<dyn WriteTracker> {
        &self.tracker
    }

    /// Refuses guest writes that would put an image-format magic into sector 0 (for a
    /// raw image whose format was probed, as QEMU does).
    pub fn guard_probed_raw(&self) {
        self.guard_sector0.store(true, Ordering::Relaxed);
    }

    /// Whether a write of `head` (its first bytes) at `offset` must be refused because it
    /// would make a probed raw image look like another format; logs the first refusal.
    pub fn refuses_format_change(&self, offset: u64, head: &[u8]) -> bool {
        if offset != 0 || !self.guard_sector0.load(Ordering::Relaxed) {
            return false;
        }
        let Some(format) = crate::disk::format_magic(head) else {
            return false;
        };
        if !self.sector0_warned.swap(true, Ordering::Relaxed) {
            warn!(
                "refused a guest write of a {format} header to sector 0 of a raw image whose \
                 format was probed (it would be opened as {format} next time); pass --format \
                 raw to allow it"
            );
        }
        true
    }

    /// The point-in-time views every write preserves.
    pub fn views(&self) -> &crate::snapshot::Views {
        &self.views
    }

    /// Call before a write, write-zeroes or discard of `[offset, offset + len)` can reach
    /// the disk (from any path: a guest queue, an NBD client): records it in the bitmaps,
    /// waits until the crash-consistency shadow has its granules durably, then preserves
    /// the old contents for every point-in-time view (this may wait for copies of the
    /// same range). The order matters: a view started together with a bitmap transaction
    /// is seen by every write recorded after that transaction. An error (the shadow can
    /// be neither written nor turned off) means the write must fail.
    #[inline]
    pub fn begin_write(&self, offset: u64, len: u64) -> std::io::Result<WriteToken> {
        let token = self.mark_write(offset, len);
        if let Some(shadow) = &self.shadow {
            shadow.cover(offset, len).map_err(std::io::Error::other)?;
        }
        self.views.before_write(offset, len);
        Ok(token)
    }

    /// The first half of [`BlkDevice::begin_write`] for callers that do not block: marks
    /// the bitmaps; the caller then waits for [`BlkDevice::try_before_write`] before the
    /// data may reach the disk.
    #[inline]
    pub fn mark_write(&self, offset: u64, len: u64) -> WriteToken {
        let generation = self.tracker.mark(offset, len);
        WriteToken {
            offset,
            len,
            generation,
        }
    }

    /// The second half of [`BlkDevice::begin_write`] for callers that do not block:
    /// whether a marked write may be submitted now. When it must wait (its shadow
    /// granules are being synced, old contents are being copied for a view), `waker` is
    /// called once there is progress and the caller asks again.
    #[inline]
    pub fn try_before_write(&self, offset: u64, len: u64, waker: &qcow2::Waker) -> WriteReady {
        if let Some(shadow) = &self.shadow {
            match shadow.check(offset, len, Some(waker)) {
                qcow2_bitmaps::Cover::Ready => {}
                qcow2_bitmaps::Cover::Pending => return WriteReady::Wait,
                qcow2_bitmaps::Cover::Failed(why) => return WriteReady::Fail(why),
            }
        }
        if self.views.try_before_write(offset, len, waker) {
            WriteReady::Go
        } else {
            WriteReady::Wait
        }
    }

    /// Call when that write completed (whatever its result): a bitmap transaction that
    /// happened meanwhile may have started bitmaps the write must be in too.
    #[inline]
    pub fn end_write(&self, token: WriteToken) {
        if self.tracker.generation() != token.generation {
            self.tracker.mark(token.offset, token.len);
        }
    }

    /// Logical block size in bytes.
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Current wce (writeback) config byte.
    pub fn wce(&self) -> u8 {
        self.wce.load(Ordering::Relaxed)
    }

    /// Sets the wce byte (guest SET_CONFIG).
    pub fn set_wce(&self, wce: u8) {
        self.wce.store(u8::from(wce != 0), Ordering::Relaxed);
    }

    /// Records the negotiated features: without FLUSH the device is writethrough.
    pub fn set_acked_features(&self, features: u64) {
        self.flush_negotiated
            .store(has_flush(features), Ordering::Relaxed);
    }

    /// Whether every write must be made durable before it completes.
    pub fn writethrough(&self) -> bool {
        self.wce() == 0 || !self.flush_negotiated.load(Ordering::Relaxed)
    }

    /// The GET_ID answer.
    pub fn serial(&self) -> [u8; ID_BYTES] {
        self.serial
    }

    /// Checks a guest range given in 512-byte sectors and bytes: inside the disk and
    /// aligned to the logical block size. Returns the byte offset.
    pub fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let lbs = u64::from(self.logical_block_size);
        if offset % lbs != 0 || len % lbs != 0 {
            return None;
        }
        let end = offset.checked_add(len)?;
        (end <= self.image.size()).then_some(offset)
    }

    /// Makes a completed write durable when the device is writethrough.
    fn finish_write(&self, ok: bool) -> u8 {
        if !ok {
            return S_IOERR;
        }
        if self.writethrough() {
            if let Err(e) = self.image.flush() {
                warn!("writethrough flush failed: {e}");
                return S_IOERR;
            }
        }
        S_OK
    }

    /// Executes one request. `input` yields the `input_len` device-readable bytes after the
    /// header; `output` takes up to `output_len` device-writable bytes before the status.
    #[allow(clippy::too_many_arguments)]
    pub fn execute<R: Read + ?Sized, W: Write + ?Sized>(
        &self,
        hdr: &RequestHeader,
        input: &mut R,
        input_len: usize,
        output: &mut W,
        output_len: usize,
        buf: &mut AlignedBuf,
        stats: &QueueStats,
    ) -> Completion {
        let start = std::time::Instant::now();
        let offset = hdr.sector.saturating_mul(SECTOR_SIZE);
        let account = |kind, bytes: u64, c: Completion| {
            stats.record(kind, offset, bytes, start, c.status == S_OK);
            c
        };
        match hdr.request_type {
            T_IN => account(
                IoKind::Read,
                output_len as u64,
                self.do_in(hdr.sector, output, output_len, buf),
            ),
            T_OUT => account(
                IoKind::Write,
                input_len as u64,
                self.do_out(hdr.sector, input, input_len, buf),
            ),
            T_FLUSH => account(
                IoKind::Flush,
                0,
                Completion::status(match self.image.flush() {
                    Ok(()) => S_OK,
                    Err(e) => {
                        warn!("flush failed: {e}");
                        S_IOERR
                    }
                }),
            ),
            T_GET_ID => {
                let n = output_len.min(ID_BYTES);
                match output.write_all(&self.serial[..n]) {
                    Ok(()) => Completion {
                        status: S_OK,
                        written: n as u32,
                    },
                    Err(_) => Completion::status(S_IOERR),
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let (c, range) = self.do_discard_write_zeroes(hdr.request_type, input, input_len);
                let kind = if hdr.request_type == T_DISCARD {
                    IoKind::Discard
                } else {
                    IoKind::WriteZeroes
                };
                let (off, len) = range.unwrap_or((offset, 0));
                stats.record(kind, off, len, start, c.status == S_OK);
                c
            }
            other => {
                debug!("unsupported request type {other}");
                Completion::status(S_UNSUPP)
            }
        }
    }

    fn do_in<W: Write + ?Sized>(
        &self,
        sector: u64,
        output: &mut W,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Completion {
        let Some(offset) = self.check_range(sector, len as u64) else {
            debug!("IN: bad range sector {sector} len {len}");
            return Completion::status(S_IOERR);
        };
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(buf.len());
            let chunk = &mut buf.as_mut_slice()[..n];
            if let Err(e) = self.image.read_at(chunk, offset + done as u64) {
                warn!("read at {:#x} failed: {e}", offset + done as u64);
                return Completion {
                    status: S_IOERR,
                    written: done as u32,
                };
            }
            if output.write_all(chunk).is_err() {
                return Completion {
                    status: S_IOERR,
                    written: done as u32,
                };
            }
            done += n;
        }
        Completion {
            status: S_OK,
            written: len as u32,
        }
    }

    fn do_out<R: Read + ?Sized>(
        &self,
        sector: u64,
        input: &mut R,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Completion {
        if self.image.is_read_only() {
            return Completion::status(S_IOERR);
        }
        let Some(offset) = self.check_range(sector, len as u64) else {
            debug!("OUT: bad range sector {sector} len {len}");
            return Completion::status(S_IOERR);
        };
        let mut done = 0usize;
        let mut ok = true;
        let token = match self.begin_write(offset, len as u64) {
            Ok(t) => t,
            Err(e) => {
                warn!("write at {offset:#x} refused: {e}");
                return Completion::status(S_IOERR);
            }
        };
        while done < len {
            let n = (len - done).min(buf.len());
            let chunk = &mut buf.as_mut_slice()[..n];
            if input.read_exact(chunk).is_err() {
                ok = false;
                break;
            }
            if done == 0 && self.refuses_format_change(offset, chunk) {
                ok = false;
                break;
            }
            if let Err(e) = self.image.write_at(chunk, offset + done as u64) {
                warn!("write at {:#x} failed: {e}", offset + done as u64);
                ok = false;
                break;
            }
            done += n;
        }
        self.end_write(token);
        Completion::status(self.finish_write(ok))
    }

    /// Validates the one segment of a DISCARD or WRITE_ZEROES: `Ok(None)` for an empty
    /// range (nothing to do), the byte range and the UNMAP flag, or the status to answer.
    pub fn check_dwz_segment(
        &self,
        request_type: u32,
        seg: &[u8; DWZ_SEGMENT_SIZE],
    ) -> Result<Option<(u64, u64, bool)>, u8> {
        let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
        let num_sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
        let is_discard = request_type == T_DISCARD;
        let max = if is_discard {
            MAX_DISCARD_SECTORS
        } else {
            MAX_WRITE_ZEROES_SECTORS
        };
        if num_sectors > max {
            return Err(S_IOERR);
        }
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let Some(offset) = self.check_range(sector, len) else {
            return Err(S_IOERR);
        };
        let unmap = flags & WRITE_ZEROES_FLAG_UNMAP != 0;
        if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 || (is_discard && unmap) {
            return Err(S_UNSUPP);
        }
        if len == 0 {
            return Ok(None);
        }
        Ok(Some((offset, len, unmap)))
    }

    fn do_discard_write_zeroes<R: Read + ?Sized>(
        &self,
        request_type: u32,
        input: &mut R,
        input_len: usize,
    ) -> (Completion, Option<(u64, u64)>) {
        if self.image.is_read_only() {
            return (Completion::status(S_IOERR), None);
        }
        // Only one segment is supported (max_*_seg = 1).
        if input_len > DWZ_SEGMENT_SIZE {
            return (Completion::status(S_UNSUPP), None);
        }
        let mut seg = [0u8; DWZ_SEGMENT_SIZE];
        if input_len < DWZ_SEGMENT_SIZE || input.read_exact(&mut seg).is_err() {
            return (Completion::status(S_IOERR), None);
        }
        let (offset, len, unmap) = match self.check_dwz_segment(request_type, &seg) {
            Ok(Some(r)) => r,
            Ok(None) => return (Completion::status(S_OK), None),
            Err(status) => return (Completion::status(status), None),
        };
        let is_discard = request_type == T_DISCARD;
        let token = match self.begin_write(offset, len) {
            Ok(t) => t,
            Err(e) => {
                warn!("write-zeroes/discard at {offset:#x} refused: {e}");
                return (Completion::status(S_IOERR), None);
            }
        };
        let result = if is_discard {
            self.image.discard(offset, len)
        } else {
            self.image.write_zeroes(offset, len, unmap)
        };
        self.end_write(token);
        if let Err(e) = &result {
            warn!(
                "{} at {offset:#x}+{len} failed: {e}",
                if is_discard {
                    "discard"
                } else {
                    "write-zeroes"
                }
            );
        }
        (
            Completion::status(self.finish_write(result.is_ok())),
            Some((offset, len)),
        )
    }
}
