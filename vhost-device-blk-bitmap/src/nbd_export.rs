//! The served disk as an NBD export: the `nbd` crate's [`Export`] over the engine, the
//! persistent bitmaps and, for a point-in-time export, a [`PitView`].
//!
//! Writes through a writable export take the same path as guest writes
//! ([`BlkDevice::begin_write`]): they are marked in the bitmaps and preserved for views.

use std::io;
use std::sync::Arc;

use dirty_bitmap::DirtyBitmap;
use nbd::{
    Export, Extent, ALLOCATION_DEPTH, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, STATE_DIRTY,
    STATE_HOLE, STATE_ZERO,
};
use qcow2::BlockStatus;

use crate::device::BlkDevice;
use crate::snapshot::{BrokenView, PitView};

thread_local! {
    /// A read buffer per NBD worker thread (grows to the largest request, 32 MiB).
    static ALIGNED: std::cell::RefCell<qcow2::AlignedBuf> =
        std::cell::RefCell::new(qcow2::AlignedBuf::new(4096));
}

/// One export of the served disk.
#[derive(Debug)]
pub struct DiskExport {
    device: Arc<BlkDevice>,
    view: Option<Arc<PitView>>,
    bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
    allocation_depth: bool,
    writable: bool,
    description: Option<String>,
}

impl DiskExport {
    /// Exports `device` — through `view` when given (then read-only) — with the dirty
    /// bitmaps `bitmaps` as `qemu:dirty-bitmap:NAME` contexts.
    pub fn new(
        device: Arc<BlkDevice>,
        view: Option<Arc<PitView>>,
        bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
        allocation_depth: bool,
        writable: bool,
        description: Option<String>,
    ) -> Self {
        let writable = writable && view.is_none() && !device.image().is_read_only();
        DiskExport {
            device,
            view,
            bitmaps,
            allocation_depth,
            writable,
            description,
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
    }

    /// Allocation runs of the exported contents.
    fn status(&self, offset: u64, len: u64) -> io::Result<Vec<BlockStatus>> {
        match &self.view {
            Some(v) => v.block_status(offset, len),
            None => self
                .device
                .image()
                .block_status(offset, len)
                .map_err(engine_error),
        }
    }

    fn bitmap_status(
        &self,
        bitmap: &DirtyBitmap,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Vec<Extent> {
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        for e in bitmap.extents_from(offset) {
            if e.start >= end || out.len() >= max {
                break;
            }
            let start = e.start.max(offset);
            let length = e.start + e.length - start;
            out.push(Extent {
                length,
                flags: if e.dirty { STATE_DIRTY } else { 0 },
            });
        }
        out
    }
}

/// An engine error as the errno an NBD client understands.
fn engine_error(e: qcow2::Error) -> io::Error {
    let errno = match &e {
        qcow2::Error::OutOfRange { .. } => libc::EINVAL,
        qcow2::Error::ReadOnly => libc::EPERM,
        qcow2::Error::NoSpace(_) => libc::ENOSPC,
        qcow2::Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    };
    log::warn!("NBD export: {e}");
    io::Error::from_raw_os_error(errno)
}

/// A view error as an errno (a broken view reads as EIO).
fn view_error(e: io::Error) -> io::Error {
    if e.get_ref().is_some_and(|inner| inner.is::<BrokenView>()) {
        return io::Error::from_raw_os_error(libc::EIO);
    }
    match e.raw_os_error() {
        Some(_) => e,
        None => io::Error::from_raw_os_error(libc::EIO),
    }
}

impl Export for DiskExport {
    fn size(&self) -> u64 {
        self.device.image().size()
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    fn description(&self) -> Option<String> {
        self.description.clone()
    }

    fn preferred_block_size(&self) -> u32 {
        4096
    }

    fn meta_contexts(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.allocation_depth {
            v.push(ALLOCATION_DEPTH.to_string());
        }
        for (name, _) in &self.bitmaps {
            v.push(format!("{DIRTY_BITMAP_PREFIX}{name}"));
        }
        v
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(v) = &self.view {
            return v.read(offset, buf).map_err(view_error);
        }
        let image = self.device.image();
        if (buf.as_ptr() as usize) % qcow2::DIRECT_ALIGN == 0 {
            return image.read_at(buf, offset).map_err(engine_error);
        }
        // The NBD layer's buffer follows its reply header: read through an aligned
        // buffer, so that an image opened with O_DIRECT is read without the page cache.
        ALIGNED.with(|a| {
            let mut a = a.borrow_mut();
            if a.len() < buf.len() {
                *a = qcow2::AlignedBuf::new(buf.len().next_power_of_two());
            }
            let tmp = &mut a.as_mut_slice()[..buf.len()];
            image.read_at(tmp, offset).map_err(engine_error)?;
            buf.copy_from_slice(tmp);
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.writable()?;
        let token = self.device.begin_write(offset, data.len() as u64)?;
        let r = self.device.image().write_at(data, offset);
        self.device.end_write(token);
        r.map_err(engine_error)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.writable()?;
        let token = self.device.begin_write(offset, len)?;
        let r = self.device.image().write_zeroes(offset, len, may_trim);
        self.device.end_write(token);
        r.map_err(engine_error)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let token = self.device.begin_write(offset, len)?;
        let r = self.device.image().discard(offset, len);
        self.device.end_write(token);
        r.map_err(engine_error)
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.device.image().flush().map_err(engine_error)
    }

    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        let max = max_extents.max(1);
        if let Some(name) = context.strip_prefix(DIRTY_BITMAP_PREFIX) {
            let (_, bm) = self
                .bitmaps
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            return Ok(self.bitmap_status(bm, offset, len, max));
        }
        let depth = match context {
            BASE_ALLOCATION => false,
            ALLOCATION_DEPTH if self.allocation_depth => true,
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let mut out: Vec<Extent> = Vec::new();
        for r in self.status(offset, len)? {
            let flags = if depth {
                r.depth
            } else {
                (if r.data { 0 } else { STATE_HOLE }) | (if r.zero { STATE_ZERO } else { 0 })
            };
            if let Some(last) = out.last_mut().filter(|l| l.flags == flags) {
                last.length += r.length;
            } else if out.len() >= max {
                break;
            } else {
                out.push(Extent {
                    length: r.length,
                    flags,
                });
            }
        }
        Ok(out)
    }
}
