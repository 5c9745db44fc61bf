//! Bitmap tables and data clusters: loading a bitmap's bits from the image, writing them
//! to freshly allocated clusters, and freeing a stored bitmap's clusters.

use dirty_bitmap::DirtyBitmap;
use qcow2::{HostOffset, ImageMetadata};

use crate::error::{Error, Result};
use crate::format::{decode_table_entry, DirEntry, TableEntry, FLAG_AUTO};
use crate::limits::{table_size, MAX_PHYS_SIZE, MAX_TABLE_SIZE};
use crate::reserve::{allocate, Reserve};

/// Largest single data write while storing (several contiguous clusters at once).
const WRITE_BATCH: u64 = 4 << 20;
/// Largest single data read while loading: a run of data clusters that are contiguous
/// both in the table and in the file is read at once, up to this many bytes (or one
/// cluster, if clusters are larger).
const READ_BATCH: u64 = 1 << 20;
/// Granularity at which loaded data is checked for zeros (see [`load_bitmap`]).
const ZERO_CHUNK: usize = 4096;

std::thread_local! {
    /// The read buffer of [`load_bitmap`], kept for the thread's next load: a fresh
    /// buffer per bitmap costs a page fault per 4 KiB, more than the read itself. At
    /// most max(READ_BATCH, one cluster) = 2 MiB per thread that loaded bitmaps.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

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
    // a store frees them, and must never free anything else. A run of entries naming
    // consecutive clusters is checked as one range (it overlaps something iff one of its
    // clusters does); only if that fails is it checked cluster by cluster, so the error
    // is the one of the first bad entry, as before.
    let mut seen = std::collections::HashSet::new();
    let mut i = 0;
    while i < table.len() {
        let TableEntry::Data(first) = table[i] else {
            i += 1;
            continue;
        };
        let n = data_run(&table[i..], first, cs, usize::MAX);
        let run = &table[i..i + n];
        if let Err(run_err) = check_clusters(img, first, n as u64 * cs, "a data cluster") {
            for te in run {
                if let TableEntry::Data(off) = *te {
                    check_clusters(img, off, cs, "a data cluster").map_err(&bad)?;
                    if !seen.insert(off) {
                        return Err(bad(format!("data cluster {off:#x} is named twice")));
                    }
                }
            }
            // Some cluster of the run must have failed above; never accept the run.
            return Err(bad(run_err));
        }
        for te in run {
            if let TableEntry::Data(off) = *te {
                if !seen.insert(off) {
                    return Err(bad(format!("data cluster {off:#x} is named twice")));
                }
            }
        }
        i += n;
    }
    Ok(table)
}

/// Length of the run at the start of `entries` (whose first entry is `Data(first)`):
/// consecutive data entries naming consecutive clusters, at most `max` of them (≥ 1).
fn data_run(entries: &[TableEntry], first: u64, cs: u64, max: usize) -> usize {
    let mut n = 1;
    while n < entries.len() && n < max {
        match entries[n] {
            TableEntry::Data(off) if Some(off) == first.checked_add(n as u64 * cs) => n += 1,
            _ => break,
        }
    }
    n
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
    // Data clusters that follow each other both in the table and in the file (what a
    // store writes) are read with one read of at most READ_BATCH bytes: the buffer never
    // exceeds max(READ_BATCH, one cluster), whatever the (already validated) table says.
    let per_read = (READ_BATCH / cs).max(1) as usize;
    let mut buf = READ_BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
    let mut i = 0;
    while i < table.len() {
        let byte_off = i as u64 * cs;
        match table[i] {
            TableEntry::Zeros => i += 1,
            TableEntry::Ones => {
                bm.deserialize_ones(byte_off, cs);
                i += 1;
            }
            TableEntry::Data(off) => {
                let n = data_run(&table[i..], off, cs, per_read);
                buf.resize(n * cs as usize, 0);
                img.read_metadata(HostOffset(off), &mut buf)
                    .map_err(|err| bad(err.to_string()))?;
                deserialize_nonzero(&bm, byte_off, &buf).map_err(|err| bad(err.to_string()))?;
                i += n;
            }
        }
    }
    READ_BUF.with(|b| *b.borrow_mut() = buf);
    bm.set_enabled(e.flags & FLAG_AUTO != 0);
    Ok(bm)
}

/// Deserializes `data` (the serialized bytes from `byte_off` on, e.g. a run of data
/// clusters) into the fresh, all-zero `bm`, skipping chunks that are all zero: they
/// would only write zeros over zeros, since table entries cover disjoint ranges.
/// Bytes past the bitmap's serialized length are ignored, as by `deserialize_from`.
fn deserialize_nonzero(
    bm: &DirtyBitmap,
    byte_off: u64,
    data: &[u8],
) -> std::result::Result<(), dirty_bitmap::Error> {
    let slen = bm.serialized_len();
    if byte_off > slen {
        // Past the bitmap: the error deserialize_from reports.
        return bm.deserialize_from(byte_off, data);
    }
    let data = &data[..(slen - byte_off).min(data.len() as u64) as usize];
    for (k, chunk) in data.chunks(ZERO_CHUNK).enumerate() {
        // An OR over the whole chunk (no early exit) vectorizes.
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            bm.deserialize_from(byte_off + (k * ZERO_CHUNK) as u64, chunk)?;
        }
    }
    Ok(())
}

/// Writes `bm` to new clusters (from `reserve` first): only data clusters holding a set
/// bit, then the table. Returns `(table_offset, table_size)`. Every allocation is
/// appended to `allocated` (offset, clusters) before it is used, so the caller can free
/// them on failure.
pub(crate) fn write_bitmap(
    img: &dyn ImageMetadata,
    name: &str,
    bm: &DirtyBitmap,
    allocated: &mut Vec<(u64, u64)>,
    reserve: &mut Reserve,
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
        let base = allocate(img, reserve, dirty.len() as u64).map_err(wr)?;
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
    let toff = allocate(img, reserve, tclusters).map_err(wr)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemImage;

    /// 512-byte clusters and granules: one table entry covers 4096 granules (2 MiB).
    const CS: u64 = 512;
    const GBITS: u8 = 9;

    enum Slot {
        Zeros,
        Ones,
        /// Data at host cluster `base + index`, with these contents.
        Data(u64, Vec<u8>),
    }

    /// A cluster of deterministic noise with up to `2 * nonzero` non-zero bytes (0 gives
    /// an all-zero cluster).
    fn cluster(seed: u64, nonzero: usize) -> Vec<u8> {
        let mut v = vec![0u8; CS as usize];
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for _ in 0..nonzero * 2 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v[(x % CS) as usize] |= (x >> 32) as u8 | 1;
        }
        v
    }

    /// Writes the data clusters and the table of `slots` into `img` (data clusters are
    /// allocated as one block of `host_clusters` starting at `base`).
    fn build(img: &MemImage, slots: &[Slot], host_clusters: u64) -> DirEntry {
        let base = img.allocate_clusters(host_clusters).unwrap().get();
        let mut table = Vec::new();
        for s in slots {
            let v = match s {
                Slot::Zeros => 0,
                Slot::Ones => 1,
                Slot::Data(h, data) => {
                    let off = base + h * CS;
                    img.write_metadata(HostOffset(off), data).unwrap();
                    off
                }
            };
            table.extend_from_slice(&u64::to_be_bytes(v));
        }
        let tclusters = clusters_for(table.len() as u64, CS);
        let toff = img.allocate_clusters(tclusters).unwrap().get();
        img.write_metadata(HostOffset(toff), &table).unwrap();
        DirEntry {
            table_offset: toff,
            table_size: slots.len() as u32,
            flags: FLAG_AUTO,
            granularity_bits: GBITS,
            name: b"t".to_vec(),
        }
    }

    /// The load as it was before reads were coalesced: one read per data cluster.
    fn load_per_cluster(img: &dyn ImageMetadata, e: &DirEntry, disk_size: u64) -> DirtyBitmap {
        let bm = DirtyBitmap::new(disk_size, 1 << GBITS).unwrap();
        let mut buf = vec![0u8; CS as usize];
        for (i, te) in read_table(img, e).unwrap().into_iter().enumerate() {
            let byte_off = i as u64 * CS;
            match te {
                TableEntry::Zeros => {}
                TableEntry::Ones => bm.deserialize_ones(byte_off, CS),
                TableEntry::Data(off) => {
                    img.read_metadata(HostOffset(off), &mut buf).unwrap();
                    bm.deserialize_from(byte_off, &buf).unwrap();
                }
            }
        }
        bm
    }

    /// The serialized bits `slots` hold: data as written, all ones, all zeros; cut to
    /// the bitmap's length, tail bits past its last bit clear.
    fn written(slots: &[Slot], bm: &DirtyBitmap) -> Vec<u8> {
        let mut v: Vec<u8> = slots
            .iter()
            .flat_map(|s| match s {
                Slot::Zeros => vec![0; CS as usize],
                Slot::Ones => vec![0xff; CS as usize],
                Slot::Data(_, d) => d.clone(),
            })
            .collect();
        v.truncate(bm.serialized_len() as usize);
        let tail = bm.bit_count() % 8;
        if let (Some(last), true) = (v.last_mut(), tail != 0) {
            *last &= (1u8 << tail) - 1;
        }
        v
    }

    fn serialized(bm: &DirtyBitmap) -> Vec<u8> {
        let mut v = vec![0u8; bm.serialized_len() as usize];
        bm.serialize_into(0, &mut v);
        v
    }

    /// Disk size whose table has `entries` entries, the last one only partly used (and
    /// its last byte only partly: 1003 granules).
    fn disk_for(entries: u64) -> u64 {
        (entries - 1) * (CS * 8) * CS + 1003 * CS
    }

    #[test]
    fn coalesced_reads_load_contiguous_and_scattered_clusters() {
        // Runs broken by Zeros/Ones entries, by a gap in the file and by a cluster
        // before its predecessor; all-zero and sparse data clusters; a partial last one.
        let slots = vec![
            Slot::Data(0, cluster(1, 40)),
            Slot::Data(1, cluster(2, 0)),
            Slot::Data(2, {
                let mut c = vec![0u8; CS as usize];
                c[CS as usize - 1] = 0x80;
                c
            }),
            Slot::Zeros,
            Slot::Ones,
            Slot::Data(5, cluster(3, 200)),
            Slot::Data(3, cluster(4, 3)),
            Slot::Data(4, cluster(5, 1)),
            Slot::Ones,
            Slot::Data(7, cluster(6, 0)),
            Slot::Data(8, cluster(7, 256)),
            Slot::Data(9, cluster(8, 17)),
        ];
        let disk = disk_for(slots.len() as u64);
        assert_eq!(table_size(disk, GBITS.into(), CS), slots.len() as u64);
        let img = MemImage::new(CS, disk);
        let e = build(&img, &slots, 10);
        let got = load_bitmap(&img, &e, disk).unwrap();
        assert_eq!(serialized(&got), written(&slots, &got));
        assert_eq!(
            serialized(&got),
            serialized(&load_per_cluster(&img, &e, disk))
        );
        assert!(got.count() > 2 * 4096, "the Ones entries are loaded");
        assert!(got.is_enabled());
        // The bits written are the bits read: the data cluster of entry 2 has only its
        // very last bit set (granule 3 * 4096 - 1).
        assert!(got.get_bit(3 * 4096 - 1));
        assert!(!got.get_bit(3 * 4096 - 2));
        assert!(!got.get_bit(4096), "entry 1 is an all-zero data cluster");
    }

    #[test]
    fn coalesced_reads_split_long_runs_at_the_batch_size() {
        // One contiguous run longer than one read (READ_BATCH / CS clusters), most 4 KiB
        // chunks all zero, a bit in the last used byte of the partial last cluster.
        let per_read = READ_BATCH / CS;
        let n = per_read + 3;
        let disk = disk_for(n);
        let slen = disk.div_ceil(1 << GBITS).div_ceil(8);
        let mut slots: Vec<Slot> = (0..n)
            .map(|c| Slot::Data(c, cluster(c + 100, usize::from(c % 19 == 0))))
            .collect();
        if let Some(Slot::Data(_, d)) = slots.last_mut() {
            d[((slen - 1) % CS) as usize] |= 1;
        }
        if let Some(Slot::Data(_, d)) = slots.get_mut(per_read as usize) {
            d[0] = 0xff; // first cluster of the second read
        }
        let img = MemImage::new(CS, disk);
        let e = build(&img, &slots, n);
        let got = load_bitmap(&img, &e, disk).unwrap();
        assert_eq!(serialized(&got), written(&slots, &got));
        assert_eq!(
            serialized(&got),
            serialized(&load_per_cluster(&img, &e, disk))
        );
        assert!(got.get_bit((slen - 1) * 8));
        assert!((0..8).all(|b| got.get_bit(per_read * CS * 8 + b)));
    }
}
