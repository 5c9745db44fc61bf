//! Consistency check: recount every reference from all metadata (header, L1/L2 tables,
//! refcount structures, snapshots, bitmaps) and compare with the stored refcounts, as
//! `qemu-img check` does; optionally repair leaks (and refcounts that are too low).

use std::fmt;

use crate::error::{Error, Result};
use crate::meta::{
    compressed_extent, read_exact_at, Meta, COMPRESSED, COPIED, L1E_RESERVED, L2E_RESERVED,
    OFFSET_MASK, REFT_OFFSET_MASK,
};
use crate::EXT_BITMAPS;

/// Largest number of host clusters we count (bounded memory: 4 bytes each).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// What to repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Only report.
    None,
    /// Lower refcounts of leaked clusters.
    Leaks,
    /// Leaks and refcounts that are too low.
    All,
}

/// The outcome of a check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors that make the image unsafe to use.
    pub corruptions: u64,
    /// Clusters with a refcount but no reference.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// One line per problem, in QEMU's words where it has them.
    pub messages: Vec<String>,
    /// Host clusters referenced by metadata.
    pub allocated_clusters: u64,
    /// End of the last cluster with a reference or a refcount (as QEMU reports it).
    pub image_end_offset: u64,
    /// Problem lines not kept in `messages` (over the cap).
    pub omitted: u64,
    /// Leaks of clusters inside the file (QEMU's check stops at the end of the file; ours
    /// also counts refcounts of clusters past it, e.g. allocated but never written).
    pub leaks_in_file: u64,
}

/// At most this many problem lines are kept (a hostile image can have a problem per
/// cluster); the rest are counted in one last line.
const MAX_MESSAGES: usize = 1000;

impl CheckReport {
    /// Records a problem line, bounded by [`MAX_MESSAGES`].
    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        } else {
            self.omitted += 1;
        }
    }

    /// No corruption and no leak left.
    pub fn is_clean(&self) -> bool {
        self.corruptions == self.corruptions_fixed && self.leaks == self.leaks_fixed
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.corruptions - self.corruptions_fixed;
        let l = self.leaks - self.leaks_fixed;
        if c == 0 && l == 0 {
            write!(f, "No errors were found on the image.")?;
        } else {
            if c > 0 {
                write!(f, "{c} errors were found on the image.")?;
            }
            if l > 0 {
                if c > 0 {
                    write!(f, " ")?;
                }
                write!(f, "{l} leaked clusters were found on the image.")?;
            }
        }
        if self.leaks_fixed > 0 || self.corruptions_fixed > 0 {
            write!(
                f,
                " (repaired {} leaks, {} errors)",
                self.leaks_fixed, self.corruptions_fixed
            )?;
        }
        Ok(())
    }
}

struct Counter<'a> {
    refs: Vec<u32>,
    cs: u64,
    file_len: u64,
    report: &'a mut CheckReport,
}

impl Counter<'_> {
    fn add(&mut self, what: &str, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = off.saturating_add(len);
        if end > self.file_len.next_multiple_of(self.cs) {
            self.report.corruptions += 1;
            self.report.note(format!(
                "ERROR {what} at {off:#x} (+{len}) is past the end of the image file"
            ));
            return;
        }
        for c in off / self.cs..end.div_ceil(self.cs) {
            self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
        }
    }

    fn aligned(&mut self, what: &str, off: u64) -> bool {
        if !off.is_multiple_of(self.cs) {
            self.report.corruptions += 1;
            self.report.note(format!(
                "ERROR {what} offset={off:#x}: not aligned to a cluster"
            ));
            return false;
        }
        true
    }
}

fn be64s(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
}

/// Counts an L1 table and everything below it.
fn count_l1(m: &Meta, cnt: &mut Counter<'_>, l1: &[u64]) -> Result<()> {
    let cs = cnt.cs;
    for (i, &e) in l1.iter().enumerate() {
        let l2_off = e & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        if e & L1E_RESERVED != 0 {
            cnt.report.corruptions += 1;
            cnt.report
                .note(format!("ERROR L1 entry {i} has reserved bits set: {e:#x}"));
            continue;
        }
        if !cnt.aligned("L2 table", l2_off) || l2_off + cs > cnt.file_len {
            if l2_off + cs > cnt.file_len {
                cnt.report.corruptions += 1;
                cnt.report.note(format!(
                    "ERROR L2 table at {l2_off:#x} is past the end of the file"
                ));
            }
            continue;
        }
        cnt.add("L2 table", l2_off, cs);
        let l2 = read_exact_at(&*m.storage, l2_off, cs as usize)?;
        for (j, e2) in be64s(&l2).enumerate() {
            if e2 & COMPRESSED != 0 {
                let (off, len) = compressed_extent(e2, m.cluster_bits);
                cnt.add("compressed cluster", off, len);
                continue;
            }
            if e2 & L2E_RESERVED != 0 {
                cnt.report.corruptions += 1;
                cnt.report.note(format!(
                    "ERROR L2 entry l1_index={i} l2_index={j} has reserved bits set: {e2:#x}"
                ));
                continue;
            }
            let off = e2 & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !cnt.aligned("data cluster", off) {
                continue;
            }
            cnt.add("data cluster", off, cs);
        }
    }
    Ok(())
}

/// QEMU's OFLAG_COPIED check of the active L1 and L2 tables against the refcounts.
fn check_copied(m: &mut Meta, l1: &[u64], report: &mut CheckReport) -> Result<()> {
    let cs = m.cluster_size();
    let file_len = m
        .storage
        .len()
        .map_err(|e| Error::io("reading the image size", e))?;
    for (i, &e) in l1.iter().enumerate() {
        let l2_off = e & OFFSET_MASK;
        if l2_off == 0
            || e & L1E_RESERVED != 0
            || !l2_off.is_multiple_of(cs)
            || l2_off.saturating_add(cs) > file_len
        {
            continue;
        }
        let rc = m.refcount(l2_off / cs)?;
        if (rc == 1) != (e & COPIED != 0) {
            report.corruptions += 1;
            report.note(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
            ));
        }
        let l2 = read_exact_at(&*m.storage, l2_off, cs as usize)?;
        for e2 in be64s(&l2) {
            let off = e2 & OFFSET_MASK;
            if e2 & COMPRESSED != 0 || e2 & L2E_RESERVED != 0 || off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                continue;
            }
            let rc = m.refcount(off / cs)?;
            if (rc == 1) != (e2 & COPIED != 0) {
                report.corruptions += 1;
                report.note(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={e2:x} refcount={rc}"
                ));
            }
        }
    }
    Ok(())
}

fn count_snapshots(m: &Meta, cnt: &mut Counter<'_>) -> Result<()> {
    let h = &m.header;
    if h.nb_snapshots == 0 {
        return Ok(());
    }
    let mut pos = h.snapshots_offset;
    for n in 0..h.nb_snapshots {
        let fixed = read_exact_at(&*m.storage, pos, 40)?;
        let l1_off = u64::from_be_bytes(fixed[0..8].try_into().unwrap());
        let l1_size = u32::from_be_bytes(fixed[8..12].try_into().unwrap());
        let id_len = u16::from_be_bytes(fixed[12..14].try_into().unwrap());
        let name_len = u16::from_be_bytes(fixed[14..16].try_into().unwrap());
        let extra = u32::from_be_bytes(fixed[36..40].try_into().unwrap());
        if extra > 1024 || u64::from(l1_size) * 8 > crate::header::MAX_L1_BYTES {
            return Err(Error::InvalidImage(format!(
                "snapshot {n} entry is invalid"
            )));
        }
        if cnt.aligned("snapshot L1 table", l1_off) {
            cnt.add("snapshot L1 table", l1_off, u64::from(l1_size) * 8);
            if l1_off.saturating_add(u64::from(l1_size) * 8) <= cnt.file_len {
                let l1: Vec<u64> =
                    be64s(&read_exact_at(&*m.storage, l1_off, l1_size as usize * 8)?).collect();
                count_l1(m, cnt, &l1)?;
            }
        }
        pos +=
            (40 + u64::from(extra) + u64::from(id_len) + u64::from(name_len)).next_multiple_of(8);
    }
    cnt.add(
        "snapshot table",
        h.snapshots_offset,
        pos - h.snapshots_offset,
    );
    Ok(())
}

/// Counts the bitmap directory, the bitmap tables and their data clusters.
fn count_bitmaps(m: &Meta, cnt: &mut Counter<'_>) -> Result<()> {
    let Some(ext) = m.header.extension(EXT_BITMAPS) else {
        return Ok(());
    };
    if m.header.autoclear_features & crate::AUTOCLEAR_BITMAPS == 0 || ext.len() != 24 {
        // An inconsistent extension: its clusters are leaks (as in QEMU).
        return Ok(());
    }
    let nb = u32::from_be_bytes(ext[0..4].try_into().unwrap());
    let dir_size = u64::from_be_bytes(ext[8..16].try_into().unwrap());
    let dir_off = u64::from_be_bytes(ext[16..24].try_into().unwrap());
    if dir_size > 1024 * 65535
        || dir_off.saturating_add(dir_size) > cnt.file_len
        || !cnt.aligned("bitmap directory", dir_off)
    {
        cnt.report.corruptions += 1;
        cnt.report
            .note("ERROR bitmap extension is invalid".to_string());
        return Ok(());
    }
    cnt.add("bitmap directory", dir_off, dir_size);
    let dir = read_exact_at(&*m.storage, dir_off, dir_size as usize)?;
    let mut pos = 0usize;
    for _ in 0..nb {
        if pos + 24 > dir.len() {
            cnt.report.corruptions += 1;
            cnt.report
                .note("ERROR bitmap directory is truncated".into());
            return Ok(());
        }
        let e = &dir[pos..];
        let table_off = u64::from_be_bytes(e[0..8].try_into().unwrap());
        let table_size = u32::from_be_bytes(e[8..12].try_into().unwrap());
        let name_size = u16::from_be_bytes(e[18..20].try_into().unwrap());
        let extra = u32::from_be_bytes(e[20..24].try_into().unwrap());
        pos += (24 + extra as usize + name_size as usize).next_multiple_of(8);
        if table_size > 0x800_0000 || !cnt.aligned("bitmap table", table_off) {
            continue;
        }
        let tbytes = u64::from(table_size) * 8;
        cnt.add("bitmap table", table_off, tbytes);
        if table_off.saturating_add(tbytes) > cnt.file_len {
            continue;
        }
        let table = read_exact_at(&*m.storage, table_off, tbytes as usize)?;
        for t in be64s(&table) {
            let off = t & 0x00ff_ffff_ffff_fe00;
            if t & 0xff00_0000_0000_01fe != 0 || (off != 0 && t & 1 != 0) {
                cnt.report.corruptions += 1;
                cnt.report
                    .note(format!("ERROR bitmap table entry {t:#x} is invalid"));
                continue;
            }
            if off != 0 && cnt.aligned("bitmap data cluster", off) {
                cnt.add("bitmap data cluster", off, cnt.cs);
            }
        }
    }
    Ok(())
}

/// Recounts every reference from the metadata (header, L1/L2 tables, refcount
/// structures, snapshots, bitmaps) and compares it with the refcounts; with `repair`
/// fixes what it may. The caller holds the metadata lock with no data request in
/// flight and has written back the caches.
/// Each `(offset, length)` of `keep` counts as referenced too (structures the engine
/// does not know, e.g. the clusters of a private header extension).
pub(crate) fn check_metadata_keeping(
    m: &mut Meta,
    repair: Repair,
    keep: &[(u64, u64)],
) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let cs = m.cluster_size();
    let file_len = m
        .storage
        .len()
        .map_err(|e| Error::io("reading the image size", e))?;
    let rb_entries = m.rb_entries();
    let nclusters = file_len.div_ceil(cs).max(1);
    if nclusters > MAX_CHECK_CLUSTERS {
        return Err(Error::Unsupported(format!(
            "image of {nclusters} clusters is too large to check"
        )));
    }
    let mut cnt = Counter {
        refs: vec![0; nclusters as usize],
        cs,
        file_len,
        report: &mut report,
    };
    cnt.add("header", 0, cs);
    let h = m.header.clone();
    cnt.add("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8);
    cnt.add(
        "refcount table",
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    for (i, e) in m.reftable.clone().iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off != 0 && cnt.aligned("refcount block", off) {
            if off + cs > file_len {
                cnt.report.corruptions += 1;
                cnt.report
                    .note(format!("ERROR refcount block {i} is outside image"));
            } else {
                cnt.add("refcount block", off, cs);
            }
        }
    }
    let l1 = m.l1.clone();
    count_l1(m, &mut cnt, &l1)?;
    count_snapshots(m, &mut cnt)?;
    count_bitmaps(m, &mut cnt)?;
    for &(off, len) in keep {
        cnt.add("kept range", off, len);
    }
    let refs = std::mem::take(&mut cnt.refs);

    // Compare, repairing as asked.
    let mut allocated = 0u64;
    let mut end = 0u64;
    // Every cluster of the file, then the entries of existing refcount blocks that
    // describe clusters past its end (not every entry the refcount table could cover:
    // that would be billions of clusters for an empty table).
    let mut ranges = vec![(0, nclusters)];
    for (t, e) in m.reftable.iter().enumerate() {
        let (lo, hi) = (t as u64 * rb_entries, (t as u64 + 1) * rb_entries);
        if e & REFT_OFFSET_MASK != 0 && hi > nclusters && lo < MAX_CHECK_CLUSTERS {
            ranges.push((lo.max(nclusters), hi.min(MAX_CHECK_CLUSTERS)));
        }
    }
    for c in ranges.into_iter().flat_map(|(lo, hi)| lo..hi) {
        let want = u64::from(refs.get(c as usize).copied().unwrap_or(0));
        let have = m.refcount(c)?;
        if want > 0 {
            allocated += 1;
        }
        if want > 0 || have > 0 {
            end = (c + 1) * cs;
        }
        if have == want {
            continue;
        }
        if have > want {
            report.leaks += 1;
            if c < nclusters {
                report.leaks_in_file += 1;
            }
            report.note(format!(
                "Leaked cluster {c} refcount={have} reference={want}"
            ));
            if repair != Repair::None {
                // One store, whatever the difference (64-bit refcounts can be huge).
                m.set_refcount_to(c, want)?;
                report.leaks_fixed += 1;
            }
        } else {
            report.corruptions += 1;
            report.note(format!(
                "ERROR cluster {c} refcount={have} reference={want}"
            ));
            if repair == Repair::All {
                match m.set_refcount_to(c, want) {
                    Ok(()) => report.corruptions_fixed += 1,
                    Err(e) => report.note(format!("cannot repair cluster {c}: {e}")),
                }
            }
        }
    }
    // The COPIED flag must be set exactly when the refcount is one (a second pass over
    // the active tables, so that memory does not grow with the number of clusters).
    check_copied(m, &l1, &mut report)?;
    if repair != Repair::None {
        m.write_refblocks()?;
        m.sync()?;
        m.free_hint = 1;
    }
    report.allocated_clusters = allocated;
    report.image_end_offset = end;
    if report.omitted > 0 {
        let n = report.omitted;
        report
            .messages
            .push(format!("... and {n} more problems of the kinds above"));
    }
    Ok(report)
}
