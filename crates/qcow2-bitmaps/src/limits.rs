//! QEMU's limits for persistent bitmaps and the size arithmetic built on them. All maths
//! is done in u128 with explicit ceilings, so no input can overflow it.

use crate::error::{Error, Result};

/// Most bitmaps one image may hold (`QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory in bytes (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * 65535;
/// Most entries in one bitmap table.
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Most bytes of bitmap data (table entries × cluster size).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Smallest granularity, as a power of two.
pub const MIN_GRANULARITY_BITS: u32 = 9;
/// Largest granularity, as a power of two.
pub const MAX_GRANULARITY_BITS: u32 = 31;
/// Longest bitmap name in bytes.
pub const MAX_NAME_SIZE: usize = 1023;

/// Size in bytes of a directory entry for a name of `name_len` bytes (no extra data).
pub fn dir_entry_size(name_len: usize) -> u64 {
    round_up(24 + name_len as u64, 8)
}

/// Rounds `v` up to a multiple of `to` (a power of two).
pub fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Bytes of serialized bitmap data for a disk of `disk_size` bytes at `granularity_bits`.
pub fn data_bytes(disk_size: u64, granularity_bits: u32) -> u64 {
    let g = 1u128 << granularity_bits;
    let bits = (disk_size as u128).div_ceil(g);
    bits.div_ceil(8) as u64
}

/// Number of bitmap table entries (data clusters) QEMU requires for such a bitmap.
pub fn table_size(disk_size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    data_bytes(disk_size, granularity_bits).div_ceil(cluster_size)
}

/// QEMU's default granularity: the cluster size clamped to 4 KiB ..= 64 KiB.
pub fn default_granularity(cluster_size: u64) -> u32 {
    cluster_size.clamp(4096, 65536) as u32
}

/// Checks that `granularity` is a power of two of at least 512 (QMP's rule for
/// `block-dirty-bitmap-add`). Returns its log2.
pub fn check_granularity_arg(granularity: u64) -> Result<u32> {
    if granularity < 512 || !granularity.is_power_of_two() {
        return Err(Error::BadGranularity);
    }
    Ok(granularity.trailing_zeros())
}

/// QEMU's `check_constraints_on_bitmap`: may a bitmap with this name and granularity be
/// stored in an image of `disk_size` bytes with `cluster_size` clusters?
pub fn check_constraints(
    name: &str,
    granularity_bits: u32,
    disk_size: u64,
    cluster_size: u64,
) -> Result<()> {
    if granularity_bits > MAX_GRANULARITY_BITS {
        return Err(Error::GranularityTooLarge);
    }
    if granularity_bits < MIN_GRANULARITY_BITS {
        return Err(Error::GranularityTooSmall);
    }
    let len = disk_size as u128;
    if len > (MAX_PHYS_SIZE as u128) << granularity_bits
        || len > ((MAX_TABLE_SIZE as u128) * cluster_size as u128) << granularity_bits
    {
        return Err(Error::TooBig);
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(Error::NameTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_size_matches_qemu_examples() {
        // 64 MiB disk, 64 KiB granularity: 1024 bits = 128 bytes = 1 cluster.
        assert_eq!(data_bytes(64 << 20, 16), 128);
        assert_eq!(table_size(64 << 20, 16, 65536), 1);
        // partial granule gets a bit
        assert_eq!(data_bytes(65537, 16), 1);
        assert_eq!(data_bytes(0, 16), 0);
        // 16 TiB at 64 KiB: 2^28 bits = 32 MiB = 512 clusters of 64 KiB
        assert_eq!(table_size(16 << 40, 16, 65536), 512);
        // huge values don't overflow
        assert_eq!(
            data_bytes(u64::MAX, 9),
            (u64::MAX as u128).div_ceil(512).div_ceil(8) as u64
        );
    }

    #[test]
    fn default_granularity_clamps() {
        assert_eq!(default_granularity(512), 4096);
        assert_eq!(default_granularity(65536), 65536);
        assert_eq!(default_granularity(2 << 20), 65536);
        assert_eq!(default_granularity(16384), 16384);
    }

    #[test]
    fn constraints() {
        assert!(matches!(
            check_constraints("a", 8, 1 << 20, 65536),
            Err(Error::GranularityTooSmall)
        ));
        assert!(matches!(
            check_constraints("a", 32, 1 << 20, 65536),
            Err(Error::GranularityTooLarge)
        ));
        assert!(matches!(
            check_constraints(&"x".repeat(1024), 16, 1 << 20, 65536),
            Err(Error::NameTooLong)
        ));
        check_constraints(&"x".repeat(1023), 16, 1 << 20, 65536).unwrap();
        // QEMU compares the disk size with 512 MiB << granularity_bits (256 GiB at 512 B).
        check_constraints("a", 9, 256 << 30, 65536).unwrap();
        assert!(matches!(
            check_constraints("a", 9, (256 << 30) + 1, 65536),
            Err(Error::TooBig)
        ));
        // table limit: 0x8000000 clusters of 512 B << 9 = 32 TiB; phys limit is lower here
        check_constraints("a", 16, 32 << 40, 512).unwrap();
        assert!(matches!(
            check_constraints("a", 16, (32 << 40) + 1, 512),
            Err(Error::TooBig)
        ));
        // 2 MiB clusters with large granularity must not overflow (QEMU bug 4.1.1)
        check_constraints("a", 31, 1 << 60, 2 << 20).unwrap();
        assert!(matches!(
            check_constraints("a", 31, u64::MAX, 2 << 20),
            Err(Error::TooBig)
        ));
        assert_eq!(check_granularity_arg(512).unwrap(), 9);
        assert!(check_granularity_arg(256).is_err());
        assert!(check_granularity_arg(3000).is_err());
    }
}
