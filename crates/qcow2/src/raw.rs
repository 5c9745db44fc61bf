//! Raw images: the file is the disk.

use std::sync::Arc;

use crate::direct::{Attempt, DataFiles, DirectIo, ReadPiece, ReadPlan, Waker, WritePiece};
use crate::direct::{WritePlan, ZeroPlan};
use crate::error::{Error, IoContext, Result};
use crate::status::{push_status, BlockStatus, MAX_STATUS_RUNS};
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

    fn direct(&self) -> Option<&dyn DirectIo> {
        Some(self)
    }

    /// Holes of the file (SEEK_HOLE) read as zeroes; QEMU counts them as allocated
    /// (depth 1), as file-posix does.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < MAX_STATUS_RUNS {
            let (data, next) = self
                .storage
                .data_extent(pos, end)
                .ctx(|| format!("looking for data in the raw image at {pos:#x}"))?;
            let next = next.clamp(pos + 1, end);
            push_status(
                &mut runs,
                BlockStatus {
                    length: next - pos,
                    data,
                    zero: !data,
                    depth: 1,
                },
            );
            pos = next;
        }
        Ok(runs)
    }
}

/// The file is the disk: every plan is one piece at the same offset, and zeroing is
/// left to the caller (`fallocate(PUNCH_HOLE)`).
impl DirectIo for RawImage {
    fn data_storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn data_files(&self) -> Option<DataFiles> {
        self.storage.data_files()
    }

    fn plan_read(&self, offset: u64, len: usize) -> Result<ReadPlan> {
        check_range(offset, len as u64, self.size)?;
        Ok(ReadPlan {
            pieces: vec![ReadPiece::Host { offset, len }],
            _ticket: None,
        })
    }

    fn begin_write(&self, offset: u64, len: usize, _waker: &Waker) -> Result<Attempt<WritePlan>> {
        self.writable()?;
        check_range(offset, len as u64, self.size)?;
        Ok(Attempt::Ready(WritePlan {
            pieces: vec![WritePiece::Data { at: 0, offset, len }],
            allocations: Vec::new(),
            _ticket: None,
        }))
    }

    fn finish_write(&self, _plan: WritePlan, _ok: bool) -> Result<()> {
        Ok(())
    }

    fn try_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _unmap: bool,
        _waker: &Waker,
    ) -> Result<Attempt<ZeroPlan>> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        Ok(Attempt::Ready(ZeroPlan {
            punch: vec![(offset, len)],
        }))
    }

    fn try_discard(&self, offset: u64, len: u64, waker: &Waker) -> Result<Attempt<ZeroPlan>> {
        self.try_write_zeroes(offset, len, true, waker)
    }

    fn prepare_flush(&self) -> Result<()> {
        Ok(())
    }
}
