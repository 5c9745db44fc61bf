//! virtio-blk wire facts: feature bits, request types, status codes and the
//! configuration space layout (virtio 1.2 §5.2, all little-endian).

use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Sector unit of every virtio-blk request, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request we accept (plus header and status), as QEMU.
pub const SEG_MAX: u32 = 126;
/// Longest DISCARD a guest may send, in 512-byte sectors (16 MiB), as QEMU.
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// Longest WRITE_ZEROES a guest may send, in 512-byte sectors (16 MiB), as QEMU.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// Size of the request header (type, reserved/ioprio, sector).
pub const REQUEST_HEADER_SIZE: usize = 16;
/// Size of one discard/write-zeroes segment.
pub const DWZ_SEGMENT_SIZE: usize = 16;
/// Bytes answered to GET_ID.
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// Size of the configuration space we expose (up to and including write_zeroes_may_unmap
/// and its padding).
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Offset of the `wce` (writeback) byte, the only field a driver may write.
pub const CONFIG_WCE_OFFSET: usize = 32;

/// Request type read from the header.
pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
/// Write.
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
/// Flush.
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
/// Device id string.
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
/// Discard.
pub const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
/// The UNMAP flag of a write-zeroes segment.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Request succeeded.
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// Request failed.
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// Request type or flags not supported.
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Feature bit helper.
const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// The virtio feature bits of the device (without vhost-user transport bits).
///
/// SIZE_MAX is not offered: we do not limit segment sizes, and its config field stays 0.
/// MQ is always offered (num_queues in the config space is valid), as QEMU does.
pub fn device_features(read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(vb::VIRTIO_BLK_F_SEG_MAX)
        | bit(vb::VIRTIO_BLK_F_BLK_SIZE)
        | bit(vb::VIRTIO_BLK_F_TOPOLOGY)
        | bit(vb::VIRTIO_BLK_F_FLUSH)
        | bit(vb::VIRTIO_BLK_F_CONFIG_WCE)
        | bit(vb::VIRTIO_BLK_F_DISCARD)
        | bit(vb::VIRTIO_BLK_F_WRITE_ZEROES)
        | bit(vb::VIRTIO_BLK_F_MQ);
    if read_only {
        f |= bit(vb::VIRTIO_BLK_F_RO);
    }
    f
}

/// Whether the FLUSH feature is among `features`.
pub fn has_flush(features: u64) -> bool {
    features & bit(vb::VIRTIO_BLK_F_FLUSH) != 0
}

/// Whether CONFIG_WCE is among `features`.
pub fn has_config_wce(features: u64) -> bool {
    features & bit(vb::VIRTIO_BLK_F_CONFIG_WCE) != 0
}

/// Whether EVENT_IDX is among `features`.
pub fn has_event_idx(features: u64) -> bool {
    features & bit(VIRTIO_RING_F_EVENT_IDX) != 0
}

/// Inputs to the configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigInputs {
    /// Disk size in bytes.
    pub size: u64,
    /// Logical block size (512 or 4096).
    pub logical_block_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Current writeback (wce) byte.
    pub wce: u8,
}

/// Serialises `struct virtio_blk_config` (60 bytes) consistently with the limits the
/// request handler enforces.
pub fn config_space(c: &ConfigInputs) -> [u8; CONFIG_SPACE_SIZE] {
    let mut b = [0u8; CONFIG_SPACE_SIZE];
    let put32 = |b: &mut [u8; CONFIG_SPACE_SIZE], off: usize, v: u32| {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes())
    };
    b[0..8].copy_from_slice(&(c.size / SECTOR_SIZE).to_le_bytes()); // capacity
    put32(&mut b, 8, 0); // size_max (feature not offered)
    put32(&mut b, 12, SEG_MAX); // seg_max
                                // 16..20 geometry: not offered, zero.
    put32(&mut b, 20, c.logical_block_size); // blk_size
    b[24] = 0; // physical_block_exp
    b[25] = 0; // alignment_offset
    b[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size (logical blocks)
    put32(&mut b, 28, 1); // opt_io_size (logical blocks)
    b[CONFIG_WCE_OFFSET] = c.wce; // writeback
    b[34..36].copy_from_slice(&c.num_queues.to_le_bytes());
    put32(&mut b, 36, MAX_DISCARD_SECTORS);
    put32(&mut b, 40, 1); // max_discard_seg
    put32(&mut b, 44, c.logical_block_size / SECTOR_SIZE as u32); // discard_sector_alignment
    put32(&mut b, 48, MAX_WRITE_ZEROES_SECTORS);
    put32(&mut b, 52, 1); // max_write_zeroes_seg
    b[56] = 1; // write_zeroes_may_unmap: the UNMAP flag is honoured
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout() {
        let c = config_space(&ConfigInputs {
            size: 1 << 30,
            logical_block_size: 4096,
            num_queues: 3,
            wce: 1,
        });
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2097152);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 32768);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(c[48..52].try_into().unwrap()), 32768);
        assert_eq!(u32::from_le_bytes(c[52..56].try_into().unwrap()), 1);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn features() {
        let rw = device_features(false);
        let ro = device_features(true);
        assert_eq!(ro & !rw, 1 << 5);
        assert!(has_flush(rw) && has_config_wce(rw) && has_event_idx(rw));
        assert_ne!(rw & (1 << 32), 0);
        assert_eq!(rw & (1 << 1), 0, "SIZE_MAX is not offered");
    }
}
