//! Storing: every persistent, consistent bitmap is written to new clusters, then a new
//! directory, then the header is switched (flush, header, sync), and only then are the
//! old clusters freed. On failure only clusters this store allocated and never made
//! reachable are freed.

use qcow2::{HeaderUpdate, HostOffset, ImageMetadata, AUTOCLEAR_BITMAPS, EXT_BITMAPS};

use crate::error::{Error, Result};
use crate::format::{directory_size, serialize_directory, BitmapsExt, DirEntry, FLAG_AUTO};
use crate::limits::{MAX_BITMAPS, MAX_DIRECTORY_SIZE};
use crate::reserve::{allocate, Reserve};
use crate::set::{Bitmaps, State};
use crate::shadow::{self, Shadow};
use crate::table::{clusters_for, free_bitmap_clusters, write_bitmap};

/// Frees clusters this operation allocated (they are referenced by nothing on disk).
pub(crate) fn free_allocated(img: &dyn ImageMetadata, allocated: &[(u64, u64)]) {
    for &(off, n) in allocated {
        if let Err(e) = img.free_clusters(HostOffset(off), n) {
            log::warn!("could not free {n} clusters at {off:#x}: {e}; they are leaked");
        }
    }
}

/// Writes `entries` as a directory into new clusters (from `reserve` first; recorded in
/// `allocated`). Returns the extension describing it, or `None` for an empty directory.
pub(crate) fn write_directory(
    img: &dyn ImageMetadata,
    entries: &[DirEntry],
    allocated: &mut Vec<(u64, u64)>,
    reserve: &mut Reserve,
) -> Result<Option<BitmapsExt>> {
    if entries.is_empty() {
        return Ok(None);
    }
    if entries.len() as u64 > MAX_BITMAPS as u64 {
        return Err(Error::TooManyBitmaps);
    }
    let size = directory_size(entries);
    if size > MAX_DIRECTORY_SIZE {
        return Err(Error::DirectoryTooLarge);
    }
    let bytes = serialize_directory(entries);
    let n = clusters_for(size, img.cluster_size());
    let off = allocate(img, reserve, n).map_err(Error::UpdateExtension)?;
    allocated.push((off, n));
    img.write_metadata(HostOffset(off), &bytes)
        .map_err(Error::UpdateExtension)?;
    Ok(Some(BitmapsExt {
        nb_bitmaps: entries.len() as u32,
        directory_size: size,
        directory_offset: off,
    }))
}

/// Points the header at `ext` (autoclear bit 0 set), or removes the extension and clears
/// the bit when `ext` is `None`. `update_header` flushes first and syncs after; callers
/// also flush before (so a failed flush is known to leave the header untouched).
pub(crate) fn switch_header(img: &dyn ImageMetadata, ext: Option<BitmapsExt>) -> Result<()> {
    let ac = img.autoclear_features();
    let update = match ext {
        Some(x) => HeaderUpdate {
            autoclear: Some(ac | AUTOCLEAR_BITMAPS),
            extensions: vec![(EXT_BITMAPS, Some(x.to_bytes()))],
        },
        None => HeaderUpdate {
            autoclear: Some(ac & !AUTOCLEAR_BITMAPS),
            extensions: vec![(EXT_BITMAPS, None)],
        },
    };
    img.update_header(update).map_err(Error::UpdateExtension)
}

impl Bitmaps {
    /// Switches the header to the directory `dir` (extension `ext`), keeping the
    /// crash-consistency shadow for the entries that stay covered (`consistent[i]`: entry
    /// `i` of `dir` is tracked in memory), else removing it afterwards and freeing its
    /// clusters.
    ///
    /// The removal is a second header write on purpose: a header longer than a sector
    /// (QEMU writes a feature table into it) can tear at a power loss, and one write that
    /// both clears autoclear bit 63 (first sector) and switches the directory (later
    /// sectors) could come back as "bit clear, old directory with the bitmaps in use",
    /// losing bitmaps the shadow could have recovered. Switched first, the old directory
    /// still comes with a trusted shadow; removed second, the new directory has nothing in
    /// use.
    pub(crate) fn switch(
        &self,
        img: &dyn ImageMetadata,
        ext: Option<BitmapsExt>,
        dir: &[DirEntry],
        consistent: &[bool],
    ) -> Result<()> {
        let keep = match &self.shadow {
            Some(s) => s.prepare_switch(img, ext, &shadow::coverage(dir, consistent))?,
            None => false,
        };
        switch_header(img, ext)?;
        if !keep {
            let removed = match &self.shadow {
                Some(s) => s.remove_from_header(img),
                None => Shadow::remove_stale(img),
            };
            if let Err(e) = removed {
                // The bitmaps are switched (the store succeeded); the shadow's coverage
                // names the old directory, so it can never be trusted for the new one.
                log::warn!(
                    "could not remove the crash-consistency shadow from the header: {e}; its \
                     clusters stay allocated"
                );
            }
        }
        Ok(())
    }
}

/// Frees what the old on-disk state referenced and the new one does not: the old
/// directory and the tables and data of `dropped` entries. Failures only leak clusters.
pub(crate) fn free_old(img: &dyn ImageMetadata, old_ext: Option<BitmapsExt>, dropped: &[DirEntry]) {
    let cs = img.cluster_size();
    if let Some(x) = old_ext {
        let n = clusters_for(x.directory_size, cs);
        if let Err(e) = img.free_clusters(HostOffset(x.directory_offset), n) {
            log::warn!("could not free the old bitmap directory: {e}; its clusters are leaked");
        }
    }
    for d in dropped {
        if let Err(e) = free_bitmap_clusters(img, d) {
            log::warn!(
                "could not free the old clusters of bitmap '{}': {e}; they are leaked",
                d.name_lossy()
            );
        }
    }
}

impl Bitmaps {
    /// Stores every persistent, consistent bitmap in the image (enabled ⇒ AUTO flag,
    /// IN_USE cleared); inconsistent entries stay as they are on disk. The caller should
    /// quiesce writes first: marks racing with the store may or may not be saved.
    ///
    /// The bitmaps stay in memory and usable; call [`Bitmaps::mark_in_use_again`] before
    /// serving writes again. On error the image keeps its previous bitmaps (or, if the
    /// header switch itself failed, possibly the new ones, plus leaked clusters) and
    /// the error names the bitmaps whose current contents are not saved.
    pub fn store(&self, img: &dyn ImageMetadata) -> Result<()> {
        if self.read_only {
            // Nothing can have changed: bitmaps of a read-only set are never modified.
            return Ok(());
        }
        let mut st = self.lock();
        let to_store: Vec<usize> = st
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.persistent && e.bitmap.is_some())
            .map(|(i, _)| i)
            .collect();
        if to_store.is_empty() {
            self.release_reserve(img);
            return Ok(());
        }
        let lost = |reason: Error, st: &State| Error::Lost {
            node: self.node.clone(),
            lost: to_store
                .iter()
                .map(|&i| st.entries[i].name.clone())
                .collect(),
            reason: Box::new(reason),
        };
        let mut allocated = Vec::new();
        let mut reserve = self.lock_reserve();
        let written = self
            .write_all(img, &st, &mut allocated, &mut reserve)
            .and_then(|v| {
                img.flush_metadata()
                    .map(|_| v)
                    .map_err(Error::UpdateExtension)
            });
        drop(reserve);
        let (new_dir, ext) = match written {
            Ok(v) => v,
            Err(e) => {
                free_allocated(img, &allocated);
                // The bitmaps stay in use: top the reserve up for the next try (the
                // clusters just freed can serve it even on a full file system).
                self.refill(img, &st);
                return Err(lost(e, &st));
            }
        };
        // Nothing stays covered after a store (its entries lose IN_USE): the same header
        // write removes the shadow.
        if let Err(e) = self.switch(img, ext, &[], &[]) {
            // The header may already point at the new clusters: leak rather than free.
            log::warn!(
                "bitmap store failed while switching the header; new clusters are left allocated"
            );
            self.refill(img, &st);
            return Err(lost(e, &st));
        }
        let old_ext = st.ext;
        let mut dropped = Vec::new();
        let mut it = new_dir.into_iter();
        for (i, e) in st.entries.iter_mut().enumerate() {
            let stored = to_store.contains(&i);
            if stored {
                if let Some(old) = e.disk.take() {
                    dropped.push(old);
                }
            }
            if stored || e.disk.is_some() {
                e.disk = it.next();
            }
        }
        st.ext = ext;
        // Nothing is in use on disk any more: no reserve until bitmaps are flagged in use
        // again (a cleanly stored image has no cluster that nothing references).
        self.release_reserve(img);
        drop(st);
        free_old(img, old_ext, &dropped);
        Ok(())
    }

    /// Writes data, tables and the new directory; returns the directory and extension.
    fn write_all(
        &self,
        img: &dyn ImageMetadata,
        st: &State,
        allocated: &mut Vec<(u64, u64)>,
        reserve: &mut Reserve,
    ) -> Result<(Vec<DirEntry>, Option<BitmapsExt>)> {
        let mut new_dir = Vec::new();
        for e in &st.entries {
            let Some(bm) = e.bitmap.as_ref().filter(|_| e.persistent) else {
                if let Some(d) = &e.disk {
                    new_dir.push(d.clone());
                }
                continue;
            };
            let (table_offset, table_size) = write_bitmap(img, &e.name, bm, allocated, reserve)?;
            new_dir.push(DirEntry {
                table_offset,
                table_size,
                flags: if bm.is_enabled() { FLAG_AUTO } else { 0 },
                granularity_bits: e.granularity_bits as u8,
                name: e.disk_name(),
            });
        }
        let ext = write_directory(img, &new_dir, allocated, reserve)?;
        Ok((new_dir, ext))
    }
}
