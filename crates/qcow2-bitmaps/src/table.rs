//! Bitmap tables and data clusters: loading a bitmap's bits from the image, writing them
//! to freshly allocated clusters, and freeing a stored bitmap's clusters.

use dirty_bitmap::DirtyBitmap;
use qcow2::{HostOffset, ImageMetadata};

use crate::error::{Error, Result};
use crate::format::{decode_table_entry, DirEntry, TableEntry, FLAG_AUTO};
use crate::limits::{table_size, MAX_PHYS_SIZE, MAX_TABLE_SIZE};

/// Largest single data write while storing (several contiguous clusters at once).
const WRITE_BATCH: u64 = 4 << 20;

/// Clusters needed for `bytes` bytes.
pub(crate) fn clusters_for(bytes: u64, cluster_size: u64) -> u64 {
    bytes.div_ceil(cluster_size)
}

/// Reads and checks the table of `e` (QEMU's `bitmap_table_load`). `e` has passed the
/// directory checks, so its size is bounded by 512 MiB / cluster size entries.
pub(crate) fn read_table(img: &dyn ImageMetadata, e: &DirEntry) -> Result<Vec<TableEntry>> {
    let cs = img.cluster_size();
    let bad = |reason: String| Error::BadTable {
        name: e.name_lossy(),
        reason,
    };
    if e.table_size as u64 > MAX_TABLE_SIZE || e.table_size as u64 * cs > MAX_PHYS_SIZE {
        return Err(bad(format!(
            "table of {} entries is too large",
            e.table_size
        )));
    }
    let table_bytes = e.table_size as u64 * 8;
    check_clusters(
        img,
        e.table_offset,
        clusters_for(table_bytes, cs) * cs,
        "the table",
    )
    .map_err(bad)?;
    let mut raw = vec![0u8; table_bytes as usize];
    img.read_metadata(HostOffset(e.table_offset), &mut raw)
        .map_err(|err| bad(err.to_string()))?;
    let table = raw
        .chunks_exact(8)
        .map(|c| {
            let v = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
            decode_table_entry(v, cs).map_err(&bad)
        })
        .collect::<Result<Vec<_>>>()?;
    // Every data cluster inside the file, clear of the engine's metadata and named once:
    // a store frees them, and must never free anything else.
    let mut seen = std::collections::HashSet::new();
    for te in &table {
        if let TableEntry::Data(off) = *te {
            check_clusters(img, off, cs, "a data cluster").map_err(&bad)?;
            if !seen.insert(off) {
                return Err(bad(format!("data cluster {off:#x} is named twice")));
            }
        }
    }
    Ok(table)
}

/// Checks that `[offset, offset+len)` lies inside the image file and overlaps none of
/// the engine's metadata.
fn check_clusters(
    img: &dyn ImageMetadata,
    offset: u64,
    len: u64,
    what: &str,
) -> std::result::Result<(), String> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| format!("{what} at {offset:#x} lies past any file"))?;
    if let Some(file_len) = img.file_len() {
        if end > file_len {
            return Err(format!(
                "{what} at {offset:#x} lies past the end of the file ({file_len} bytes)"
            ));
        }
    }
    img.check_no_overlap(HostOffset(offset), len)
        .map_err(|e| format!("{what} at {offset:#x}: {e}"))
}

/// Loads a consistent bitmap (QEMU's `load_bitmap`): table, then every data cluster.
/// The result is enabled iff the entry has the AUTO flag.
pub(crate) fn load_bitmap(
    img: &dyn ImageMetadata,
    e: &DirEntry,
    disk_size: u64,
) -> Result<DirtyBitmap> {
    let cs = img.cluster_size();
    let table = read_table(img, e)?;
    let bad = |reason: String| Error::BadData {
        name: e.name_lossy(),
        reason,
    };
    let gbits = e.granularity_bits as u32;
    let expected = table_size(disk_size, gbits, cs);
    if expected != e.table_size as u64 {
        return Err(bad(format!(
            "Invalid argument (bitmap table has {} entries, a {disk_size}-byte disk needs {expected})",
            e.table_size
        )));
    }
    let bm = DirtyBitmap::new(disk_size, 1u64 << gbits).map_err(|err| bad(err.to_string()))?;
    let mut buf = vec![0u8; cs as usize];
    for (i, te) in table.iter().enumerate() {
        let byte_off = i as u64 * cs;
        match *te {
            TableEntry::Zeros => {}
            TableEntry::Ones => bm.deserialize_ones(byte_off, cs),
            TableEntry::Data(off) => {
                img.read_metadata(HostOffset(off), &mut buf)
                    .map_err(|err| bad(err.to_string()))?;
                bm.deserialize_from(byte_off, &buf)
                    .map_err(|err| bad(err.to_string()))?;
            }
        }
    }
    bm.set_enabled(e.flags & FLAG_AUTO != 0);
    Ok(bm)
}

/// Writes `bm` to new clusters: only data clusters holding a set bit, then the table.
/// Returns `(table_offset, table_size)`. Every allocation is appended to `allocated`
/// (offset, clusters) before it is used, so the caller can free them on failure.
pub(crate) fn write_bitmap(
    img: &dyn ImageMetadata,
    name: &str,
    bm: &DirtyBitmap,
    allocated: &mut Vec<(u64, u64)>,
) -> Result<(u64, u32)> {
    let cs = img.cluster_size();
    let tb_size = table_size(bm.size(), bm.granularity_bits(), cs);
    if tb_size > MAX_TABLE_SIZE || tb_size * cs > MAX_PHYS_SIZE || tb_size == 0 {
        return Err(Error::TooBig);
    }
    let wr = |source: qcow2::Error| Error::WriteBitmap {
        name: name.to_string(),
        source,
    };
    let dirty: Vec<u64> = (0..tb_size)
        .filter(|&i| !bm.is_serialized_range_zero(i * cs, cs))
        .collect();
    let mut table = vec![0u64; tb_size as usize];
    if !dirty.is_empty() {
        let base = img.allocate_clusters(dirty.len() as u64).map_err(wr)?.get();
        allocated.push((base, dirty.len() as u64));
        let per_batch = (WRITE_BATCH / cs).max(1) as usize;
        let mut buf = Vec::new();
        for (chunk_no, chunk) in dirty.chunks(per_batch).enumerate() {
            buf.clear();
            buf.resize(chunk.len() * cs as usize, 0);
            for (j, &idx) in chunk.iter().enumerate() {
                let slot = &mut buf[j * cs as usize..(j + 1) * cs as usize];
                bm.serialize_into(idx * cs, slot);
                table[idx as usize] = base + (chunk_no * per_batch + j) as u64 * cs;
            }
            let off = base + (chunk_no * per_batch) as u64 * cs;
            img.write_metadata(HostOffset(off), &buf).map_err(wr)?;
        }
    }
    let tbytes: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
    let tclusters = clusters_for(tbytes.len() as u64, cs);
    let toff = img.allocate_clusters(tclusters).map_err(wr)?.get();
    allocated.push((toff, tclusters));
    img.write_metadata(HostOffset(toff), &tbytes).map_err(wr)?;
    Ok((toff, tb_size as u32))
}

/// Frees the table and data clusters of a directory entry that is no longer referenced
/// by the on-disk directory (QEMU's `free_bitmap_clusters`). A table that cannot be read
/// is left alone (its clusters leak, which `qemu-img check -r leaks` repairs).
pub(crate) fn free_bitmap_clusters(img: &dyn ImageMetadata, e: &DirEntry) -> Result<()> {
    let cs = img.cluster_size();
    let table = read_table(img, e)?;
    for te in table {
        if let TableEntry::Data(off) = te {
            img.free_clusters(HostOffset(off), 1)?;
        }
    }
    img.free_clusters(
        HostOffset(e.table_offset),
        clusters_for(e.table_size as u64 * 8, cs),
    )?;
    Ok(())
}
