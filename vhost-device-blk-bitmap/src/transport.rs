//! Turns one virtqueue descriptor chain into a virtio-blk request for [`BlkDevice`] and
//! writes the status back. Malformed chains never panic and never touch memory outside
//! the chain: every buffer is resolved through vm-memory, which bounds-checks it and
//! marks written guest pages in the migration dirty log.

use std::io::Write;
use std::ops::Deref;

use log::warn;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use crate::device::{BlkDevice, RequestHeader};
use crate::stats::QueueStats;
use crate::virtio_blk::{REQUEST_HEADER_SIZE, SEG_MAX, S_IOERR};
use qcow2::AlignedBuf;

/// Guest memory with the vhost-user migration dirty log.
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;

/// Most descriptors a request may use: header, `SEG_MAX` data segments, status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// Why a chain was rejected before it reached the device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// More than [`MAX_DESCRIPTORS`] descriptors.
    #[error("descriptor chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    WrongOrder,
    /// A descriptor points outside guest memory.
    #[error("descriptor buffer outside guest memory")]
    OutsideMemory,
    /// No device-writable byte for the status.
    #[error("no device-writable status byte")]
    NoStatus,
}

/// Processes one chain; returns the used length (bytes written to the guest,
/// including the status byte; 0 when the chain was rejected outright).
/// `mem` must be the guest memory the chain was popped with.
pub fn process_chain<M>(
    device: &BlkDevice,
    buf: &mut AlignedBuf,
    mem: &GuestMem,
    chain: DescriptorChain<M>,
    stats: &QueueStats,
) -> u32
where
    M: Deref<Target = GuestMem> + Clone,
{
    let head = chain.head_index();
    match run_chain(device, buf, mem, chain, stats) {
        Ok(used) => used,
        Err(e) => {
            warn!("rejecting request (descriptor {head}): {e}");
            0
        }
    }
}

fn run_chain<M>(
    device: &BlkDevice,
    buf: &mut AlignedBuf,
    mem: &GuestMem,
    chain: DescriptorChain<M>,
    stats: &QueueStats,
) -> Result<u32, ChainError>
where
    M: Deref<Target = GuestMem> + Clone,
{
    let mut count = 0usize;
    let mut seen_writable = false;
    for desc in chain.clone() {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err(ChainError::WrongOrder);
        }
    }
    let mut reader: Reader<'_, BitmapMmapRegion> =
        Reader::new(mem, chain.clone()).map_err(|_| ChainError::OutsideMemory)?;
    let mut writer: Writer<'_, BitmapMmapRegion> =
        Writer::new(mem, chain).map_err(|_| ChainError::OutsideMemory)?;
    let writable = writer.available_bytes();
    if writable == 0 {
        return Err(ChainError::NoStatus);
    }
    let mut status = writer
        .split_at(writable - 1)
        .map_err(|_| ChainError::NoStatus)?;
    let mut raw = [0u8; REQUEST_HEADER_SIZE];
    let completion = if reader.available_bytes() < REQUEST_HEADER_SIZE
        || std::io::Read::read_exact(&mut reader, &mut raw).is_err()
    {
        warn!("request header shorter than {REQUEST_HEADER_SIZE} bytes");
        crate::device::Completion {
            status: S_IOERR,
            written: 0,
        }
    } else {
        let hdr = RequestHeader::parse(&raw);
        let input_len = reader.available_bytes();
        let output_len = writer.available_bytes();
        device.execute(
            &hdr,
            &mut reader,
            input_len,
            &mut writer,
            output_len,
            buf,
            stats,
        )
    };
    status
        .write_all(&[completion.status])
        .map_err(|_| ChainError::NoStatus)?;
    Ok(completion.written.saturating_add(1))
}
