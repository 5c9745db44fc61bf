//! The on-disk format: the 24-byte bitmaps header extension, bitmap directory entries
//! and bitmap table entries, parsed and written byte for byte as QEMU does, with every
//! check QEMU makes on open.

use crate::error::{Error, Result};
use crate::limits::{
    dir_entry_size, MAX_BITMAPS, MAX_DIRECTORY_SIZE, MAX_GRANULARITY_BITS, MAX_NAME_SIZE,
    MAX_PHYS_SIZE, MAX_TABLE_SIZE, MIN_GRANULARITY_BITS,
};

/// Directory entry flag: the bitmap was not saved correctly (contents may be stale).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap is enabled (records every write).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags QEMU rejects on open (bit 2, `extra_data_compatible`, included).
pub const RESERVED_FLAGS: u32 = 0xffff_fffc;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Host offset bits of a bitmap table entry.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry.
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// "All ones" flag of a table entry without an offset.
pub const TABLE_ALL_ONES: u64 = 1;

/// Size of the fixed part of a directory entry.
const ENTRY_HEADER: usize = 24;

/// The bitmaps header extension (magic `0x23852875`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of directory entries.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Host offset of the directory (cluster aligned).
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Length of the extension data.
    pub const LEN: usize = 24;

    /// Parses and validates the extension data in QEMU's order of checks.
    pub fn parse(data: &[u8], cluster_size: u64) -> Result<Self> {
        if data.len() != Self::LEN {
            return Err(Error::ExtLength);
        }
        let nb_bitmaps = be32(&data[0..4]);
        let reserved = be32(&data[4..8]);
        let directory_size = be64(&data[8..16]);
        let directory_offset = be64(&data[16..24]);
        if reserved != 0 {
            return Err(Error::ExtReserved);
        }
        if nb_bitmaps > MAX_BITMAPS {
            return Err(Error::ExtTooManyBitmaps(nb_bitmaps));
        }
        if nb_bitmaps == 0 {
            return Err(Error::ExtZeroBitmaps);
        }
        if directory_offset & (cluster_size - 1) != 0 {
            return Err(Error::ExtDirectoryOffset);
        }
        if directory_size > MAX_DIRECTORY_SIZE {
            return Err(Error::ExtDirectorySize(directory_size));
        }
        Ok(BitmapsExt {
            nb_bitmaps,
            directory_size,
            directory_offset,
        })
    }

    /// The 24 bytes of the extension.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&self.directory_size.to_be_bytes());
        v.extend_from_slice(&self.directory_offset.to_be_bytes());
        v
    }
}

/// One bitmap directory entry (without extra data, which QEMU refuses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Number of table entries.
    pub table_size: u32,
    /// `FLAG_IN_USE`, `FLAG_AUTO`.
    pub flags: u32,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// The name as stored (QEMU does not require UTF-8).
    pub name: Vec<u8>,
}

impl DirEntry {
    /// The name for display (invalid UTF-8 replaced).
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// Whether the IN_USE flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Size of this entry in the directory.
    pub fn size(&self) -> u64 {
        dir_entry_size(self.name.len())
    }

    /// QEMU's `check_dir_entry`: true when the entry satisfies every constraint for an
    /// image with these cluster and disk sizes.
    pub fn satisfies_constraints(&self, cluster_size: u64, disk_size: u64) -> bool {
        let bad = self.table_size == 0
            || self.table_offset == 0
            || self.table_offset & (cluster_size - 1) != 0
            || self.table_size as u64 > MAX_TABLE_SIZE
            || (self.granularity_bits as u32) > MAX_GRANULARITY_BITS
            || (self.granularity_bits as u32) < MIN_GRANULARITY_BITS
            || self.flags & RESERVED_FLAGS != 0
            || self.name.len() > MAX_NAME_SIZE;
        if bad {
            return false;
        }
        let phys = self.table_size as u128 * cluster_size as u128;
        if phys > MAX_PHYS_SIZE as u128 {
            return false;
        }
        // An IN_USE bitmap may have a stale size (e.g. not saved after a resize).
        self.in_use() || disk_size as u128 <= (phys * 8) << self.granularity_bits
    }

    /// Appends the entry's on-disk bytes (padded to 8) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&self.name);
        out.resize(start + self.size() as usize, 0);
    }
}

/// Checks a directory size from the extension before anything is allocated for it.
pub fn check_directory_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::DirectorySizeZero);
    }
    if size > MAX_DIRECTORY_SIZE {
        return Err(Error::DirectorySizeTooBig);
    }
    Ok(())
}

/// Parses a directory of `nb_bitmaps` entries with QEMU's checks (`bitmap_list_load`),
/// plus a duplicate-name check (QEMU fails the open on duplicates when it creates the
/// in-memory bitmaps).
pub fn parse_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<DirEntry>> {
    check_directory_size(dir.len() as u64)?;
    let mut entries: Vec<DirEntry> = Vec::new();
    let mut pos = 0usize;
    let mut count = 0u32;
    while pos < dir.len() {
        if pos + ENTRY_HEADER > dir.len() {
            return Err(Error::BrokenDirectory);
        }
        count += 1;
        if count > nb_bitmaps {
            return Err(Error::MoreBitmaps);
        }
        let e = &dir[pos..];
        let table_offset = be64(&e[0..8]);
        let table_size = be32(&e[8..12]);
        let flags = be32(&e[12..16]);
        let bitmap_type = e[16];
        let granularity_bits = e[17];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as u64;
        let extra_size = be32(&e[20..24]) as u64;
        let entry_size = (ENTRY_HEADER as u64 + extra_size + name_size).div_ceil(8) * 8;
        if pos as u64 + entry_size > dir.len() as u64 {
            return Err(Error::BrokenDirectory);
        }
        if extra_size != 0 {
            return Err(Error::ExtraData);
        }
        let name_start = pos + ENTRY_HEADER;
        let entry = DirEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name: dir[name_start..name_start + name_size as usize].to_vec(),
        };
        if bitmap_type != TYPE_DIRTY_TRACKING
            || !entry.satisfies_constraints(cluster_size, disk_size)
        {
            return Err(Error::EntryConstraints(entry.name_lossy()));
        }
        if entries.iter().any(|o| o.name == entry.name) {
            return Err(Error::Exists(entry.name_lossy()));
        }
        entries.push(entry);
        pos += entry_size as usize;
    }
    if count != nb_bitmaps {
        return Err(Error::LessBitmaps);
    }
    Ok(entries)
}

/// The directory bytes for `entries`.
pub fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(directory_size(entries) as usize);
    for e in entries {
        e.write_to(&mut out);
    }
    out
}

/// Directory size for `entries`.
pub fn directory_size(entries: &[DirEntry]) -> u64 {
    entries.iter().map(DirEntry::size).sum()
}

/// A decoded bitmap table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    /// No cluster: the covered bits are all zero.
    Zeros,
    /// No cluster: the covered bits are all one.
    Ones,
    /// Data cluster at this host offset.
    Data(u64),
}

/// Decodes and checks one table entry (QEMU's `check_table_entry`).
pub fn decode_table_entry(
    entry: u64,
    cluster_size: u64,
) -> std::result::Result<TableEntry, String> {
    if entry & TABLE_RESERVED_MASK != 0 {
        return Err(format!("table entry {entry:#x} has reserved bits set"));
    }
    let offset = entry & TABLE_OFFSET_MASK;
    if offset == 0 {
        return Ok(if entry & TABLE_ALL_ONES != 0 {
            TableEntry::Ones
        } else {
            TableEntry::Zeros
        });
    }
    if entry & TABLE_ALL_ONES != 0 {
        return Err(format!(
            "table entry {entry:#x} has an offset and the all-ones flag"
        ));
    }
    if offset & (cluster_size - 1) != 0 {
        return Err(format!("table entry {entry:#x} is not cluster aligned"));
    }
    Ok(TableEntry::Data(offset))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
