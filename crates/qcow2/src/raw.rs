//! Raw images: the file is the disk.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::{check_range, BlockImage, Storage};

/// A raw image: guest offset = file offset.
#[derive(Debug)]
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: u64,
    read_only: bool,
}

impl RawImage {
    /// Serves `storage` as a disk of its current length.
    pub fn new(storage: Arc<dyn Storage>, read_only: bool) -> Result<Self> {
        let size = storage.len().ctx(|| "reading the raw image size".into())?;
        Ok(RawImage {
            storage,
            size,
            read_only,
        })
    }

    /// The storage under the disk.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl BlockImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.storage
            .read_at(buf, offset)
            .ctx(|| format!("reading raw image at {offset:#x}"))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        self.storage
            .write_at(buf, offset)
            .ctx(|| format!("writing raw image at {offset:#x}"))
    }

    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        let mut pos = offset;
        for b in bufs.iter_mut() {
            self.storage
                .read_at(b, pos)
                .ctx(|| format!("reading raw image at {pos:#x}"))?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.writable()?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.size)?;
        let mut pos = offset;
        for b in bufs {
            self.storage
                .write_at(b, pos)
                .ctx(|| format!("writing raw image at {pos:#x}"))?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        self.storage
            .punch_hole(offset, len)
            .ctx(|| format!("zeroing raw image at {offset:#x}"))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn flush(&self) -> Result<()> {
        self.storage.sync().ctx(|| "flushing raw image".into())
    }
}
