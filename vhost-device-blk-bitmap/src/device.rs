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

/// A block device: an image, its write tracker and the guest-visible parameters.
#[derive(Debug)]
pub struct BlkDevice {
    image: Arc<dyn BlockImage>,
    tracker: Arc<dyn WriteTracker>,
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
            tracker,
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
        while done < len {
            let n = (len - done).min(buf.len());
            let chunk = &mut buf.as_mut_slice()[..n];
            if input.read_exact(chunk).is_err() {
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
        self.tracker.mark(offset, len as u64);
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
        let result = if is_discard {
            self.image.discard(offset, len)
        } else {
            self.image.write_zeroes(offset, len, unmap)
        };
        self.tracker.mark(offset, len);
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
