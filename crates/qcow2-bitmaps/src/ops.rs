//! Operations on the set: add, remove, clear, enable, disable, merge, dump, and the
//! resize guard. Names, limits and messages follow QEMU's QMP commands.

use std::sync::Arc;

use dirty_bitmap::{DirtyBitmap, Extent};
use qcow2::ImageMetadata;

use crate::error::{Error, Result};
use crate::limits::{check_granularity_arg, default_granularity, MAX_NAME_SIZE};
use crate::set::{Bitmaps, Entry, State};
use crate::store::{free_allocated, free_old, write_directory};

/// Options of [`Bitmaps::add`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddOptions {
    /// Bytes per bit; `None` = QEMU's default (cluster size clamped to 4 KiB..64 KiB).
    pub granularity: Option<u64>,
    /// Store the bitmap in the image (default true, as `qemu-img bitmap --add`).
    pub persistent: bool,
    /// Create it disabled (not recording).
    pub disabled: bool,
}

impl Default for AddOptions {
    fn default() -> Self {
        AddOptions {
            granularity: None,
            persistent: true,
            disabled: false,
        }
    }
}

/// A source bitmap for [`Bitmaps::merge`].
#[derive(Clone, Copy, Debug)]
pub enum MergeSource<'a> {
    /// A bitmap of the same set.
    Local(&'a str),
    /// A bitmap of another image's set.
    Other(&'a Bitmaps, &'a str),
}

impl Bitmaps {
    /// Adds a new bitmap (in memory; a persistent one is written by [`Bitmaps::store`]).
    pub fn add(&self, img: &dyn ImageMetadata, name: &str, opts: AddOptions) -> Result<()> {
        if name.is_empty() {
            return Err(Error::EmptyName);
        }
        let gbits = match opts.granularity {
            Some(g) => check_granularity_arg(g)?,
            None => default_granularity(self.cluster_size).trailing_zeros(),
        };
        let mut st = self.lock();
        // QEMU 10's order: an existing name (also an inconsistent bitmap) first.
        if st.find(name).is_some() {
            return Err(Error::Exists(name.to_string()));
        }
        if opts.persistent {
            let entries = st
                .entries
                .iter()
                .map(|e| (e.persistent, &e.disk, e.name.as_str()));
            self.check_can_store(img, entries, name, gbits)
                .map_err(|reason| Error::CannotPersist {
                    name: name.to_string(),
                    node: self.node.clone(),
                    reason: Box::new(reason),
                })?;
        }
        if name.len() > MAX_NAME_SIZE {
            return Err(Error::NameTooLongTransient(name.to_string()));
        }
        let bm = DirtyBitmap::new(self.disk_size, 1u64 << gbits)
            .map_err(|e| Error::Bitmap(e.to_string()))?;
        bm.set_enabled(!opts.disabled);
        st.entries.push(Entry {
            name: name.to_string(),
            granularity_bits: gbits,
            persistent: opts.persistent,
            bitmap: Some(Arc::new(bm)),
            disk: None,
        });
        self.publish(&st);
        self.refill(img, &st);
        Ok(())
    }

    /// Removes a bitmap, also an inconsistent one. If it is in the image, a new directory
    /// without it is written and the header switched before its clusters are freed.
    pub fn remove(&self, img: &dyn ImageMetadata, name: &str) -> Result<()> {
        let mut st = self.lock();
        let idx = st
            .find(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        if self.read_only {
            return Err(Error::ReadOnly(name.to_string()));
        }
        if let Some(old) = st.entries[idx].disk.clone() {
            let remaining: Vec<_> = st
                .entries
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != idx)
                .filter_map(|(_, e)| e.disk.clone())
                .collect();
            let mut allocated = Vec::new();
            let written =
                write_directory(img, &remaining, &mut allocated, &mut self.lock_reserve())
                    .and_then(|x| {
                        img.flush_metadata().map_err(Error::UpdateExtension)?;
                        Ok(x)
                    });
            let ext = match written {
                Ok(x) => x,
                Err(e) => {
                    free_allocated(img, &allocated);
                    return Err(e);
                }
            };
            let consistent: Vec<bool> = st
                .entries
                .iter()
                .enumerate()
                .filter(|(i, e)| *i != idx && e.disk.is_some())
                .map(|(_, e)| e.bitmap.is_some() && e.persistent)
                .collect();
            self.switch(img, ext, &remaining, &consistent)?;
            let old_ext = st.ext;
            st.ext = ext;
            st.entries.remove(idx);
            self.publish(&st);
            self.refill(img, &st);
            drop(st);
            free_old(img, old_ext, &[old]);
        } else {
            st.entries.remove(idx);
            self.publish(&st);
            self.refill(img, &st);
        }
        Ok(())
    }

    /// A consistent bitmap that may be changed.
    fn writable(&self, st: &State, name: &str) -> Result<Arc<DirtyBitmap>> {
        let e = st
            .find(name)
            .map(|i| &st.entries[i])
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let bm = e
            .bitmap
            .clone()
            .ok_or_else(|| Error::Inconsistent(name.to_string()))?;
        if self.read_only && e.persistent {
            return Err(Error::ReadOnly(name.to_string()));
        }
        Ok(bm)
    }

    /// Clears every bit of a bitmap.
    pub fn clear(&self, name: &str) -> Result<()> {
        let st = self.lock();
        self.writable(&st, name)?.clear();
        Ok(())
    }

    /// Starts recording writes in a bitmap.
    pub fn enable(&self, name: &str) -> Result<()> {
        let st = self.lock();
        self.writable(&st, name)?.set_enabled(true);
        self.publish(&st);
        Ok(())
    }

    /// Stops recording writes in a bitmap.
    pub fn disable(&self, name: &str) -> Result<()> {
        let st = self.lock();
        self.writable(&st, name)?.set_enabled(false);
        self.publish(&st);
        Ok(())
    }

    /// ORs every source into `target`. Sources may come from other sets (other images)
    /// and may be read-only; all must be consistent and cover the same disk size. The
    /// target is only changed when every source was found and is compatible.
    pub fn merge(&self, target: &str, sources: &[MergeSource<'_>]) -> Result<()> {
        let mut srcs = Vec::with_capacity(sources.len());
        for s in sources {
            let bm = match *s {
                MergeSource::Local(n) => self.bitmap(n)?,
                MergeSource::Other(b, n) => b.bitmap(n)?,
            };
            srcs.push(bm);
        }
        let st = self.lock();
        let dst = self.writable(&st, target)?;
        if srcs.iter().any(|s| s.size() != dst.size()) {
            return Err(Error::Incompatible);
        }
        for s in &srcs {
            if !Arc::ptr_eq(s, &dst) {
                dst.merge_from(s).map_err(|_| Error::Incompatible)?;
            }
        }
        drop(st);
        self.shadow_cover(&srcs)
    }

    /// Every extent (dirty or clean, in guest bytes) of a consistent bitmap.
    pub fn dump(&self, name: &str) -> Result<Vec<Extent>> {
        let bm = self.bitmap(name)?;
        let v = bm.extents().collect();
        Ok(v)
    }

    /// Refuses a resize of the image while persistent bitmaps exist (their table sizes
    /// depend on the disk size).
    pub fn check_resize(&self) -> Result<()> {
        let st = self.lock();
        let names: Vec<&str> = st
            .entries
            .iter()
            .filter(|e| e.persistent || e.disk.is_some())
            .map(|e| e.name.as_str())
            .collect();
        if names.is_empty() {
            Ok(())
        } else {
            Err(Error::ResizeWithBitmaps(names.join(", ")))
        }
    }
}

impl Bitmaps {
    /// Makes the set bits of `bitmaps` durable in the crash-consistency shadow (after they
    /// were merged into a covered bitmap: a crash must not lose them). Blocks for the
    /// shadow's syncer; does nothing when the shadow is not armed.
    pub(crate) fn shadow_cover(&self, bitmaps: &[Arc<DirtyBitmap>]) -> Result<()> {
        let Some(shadow) = self.shadow.as_ref().filter(|s| s.is_armed()) else {
            return Ok(());
        };
        let ranges: Vec<(u64, u64)> = bitmaps.iter().flat_map(|b| b.dirty_extents()).collect();
        shadow.cover_ranges(&ranges).map_err(Error::Shadow)
    }
}
