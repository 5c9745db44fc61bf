//! Transactions: several bitmap operations applied all or nothing, and atomically with
//! respect to the request path — a guest write is recorded either as if it came before
//! every action or after all of them (QMP's `transaction`, which backup tools use to
//! start a new increment: add the next bitmap and disable the current one in one step).
//!
//! How: the actions are first played on a *staged* copy of the entry list (names
//! resolved in order, as QEMU does), so any error leaves everything untouched. Changes of
//! the persistent set (added, removed bitmaps) then go to disk as one new directory and
//! one header switch (the same crash-safe order as a store). Only then is the staged list
//! committed, with marking paused ([`crate::set::MarkGate`]): merges are ORed in,
//! cleared bitmaps are replaced by fresh ones (allocated beforehand), enabling and
//! disabling change which bitmaps the request path marks, and one new list is published.
//! A guest write waits at most for that commit: a pointer swap, plus the ORs when the
//! transaction merges (about a millisecond per few MiB of bitmap).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dirty_bitmap::DirtyBitmap;
use qcow2::ImageMetadata;

use crate::error::{Error, Result};
use crate::format::{DirEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::limits::{check_granularity_arg, default_granularity, MAX_NAME_SIZE};
use crate::ops::{AddOptions, MergeSource};
use crate::set::{Bitmaps, Entry};
use crate::store::{free_allocated, free_old, write_directory};
use crate::table::write_bitmap;

/// One action of [`Bitmaps::transaction`].
#[derive(Clone, Debug)]
pub enum Action<'a> {
    /// Add a bitmap.
    Add {
        /// Its name.
        name: &'a str,
        /// Granularity, persistence, disabled.
        opts: AddOptions,
    },
    /// Remove a bitmap (also an inconsistent one).
    Remove {
        /// Its name.
        name: &'a str,
    },
    /// Clear every bit.
    Clear {
        /// Its name.
        name: &'a str,
    },
    /// Start recording.
    Enable {
        /// Its name.
        name: &'a str,
    },
    /// Stop recording.
    Disable {
        /// Its name.
        name: &'a str,
    },
    /// Mark a bitmap busy (in use by an export) from the commit on; release it with
    /// [`Bitmaps::set_busy`]. Refused for a missing, inconsistent or already busy bitmap.
    Busy {
        /// Its name.
        name: &'a str,
    },
    /// OR the sources into the target.
    Merge {
        /// The target's name.
        target: &'a str,
        /// The sources.
        sources: Vec<MergeSource<'a>>,
    },
}

/// How a transaction treats the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxnOptions {
    /// A new persistent bitmap is written to the image at once, flagged IN_USE (the
    /// daemon's case: it is in use from now on and stored when the daemon stops). When
    /// false, it reaches the image with the next [`Bitmaps::store`].
    pub persist_new_in_use: bool,
}

/// Why a transaction failed: the action (index) and its error.
#[derive(Debug)]
pub struct TxnError {
    /// Index of the failing action.
    pub index: usize,
    /// Its error (QEMU's text where QEMU has one).
    pub error: Error,
}

/// A staged entry: what the entry list will be after commit.
struct Staged {
    name: String,
    granularity_bits: u32,
    persistent: bool,
    bitmap: Option<Arc<DirtyBitmap>>,
    enabled: bool,
    disk: Option<DirEntry>,
    /// Not in the current list (added by this transaction).
    new: bool,
    /// In use by another operation: no action may name it.
    busy: bool,
}

impl Bitmaps {
    /// Applies `actions` all or nothing, atomically with respect to [`Bitmaps::mark`].
    pub fn transaction(
        &self,
        img: &dyn ImageMetadata,
        actions: &[Action<'_>],
        opts: TxnOptions,
    ) -> std::result::Result<(), TxnError> {
        self.transaction_with(img, actions, opts, &mut || {})
    }

    /// [`Bitmaps::transaction`], running `at_commit` at the instant the new bitmap state
    /// takes effect, with marking paused: a write is recorded either before both or after
    /// both (e.g. a point-in-time view starts at the same instant as a new bitmap).
    /// `at_commit` runs only when every action succeeded, with the set locked: it must not
    /// mark nor call into this set (but [`Bitmaps::generation`]).
    pub fn transaction_with(
        &self,
        img: &dyn ImageMetadata,
        actions: &[Action<'_>],
        opts: TxnOptions,
        at_commit: &mut dyn FnMut(),
    ) -> std::result::Result<(), TxnError> {
        let mut st = self.lock();
        let mut staged: Vec<Staged> = st
            .entries
            .iter()
            .map(|e| Staged {
                name: e.name.clone(),
                granularity_bits: e.granularity_bits,
                persistent: e.persistent,
                bitmap: e.bitmap.clone(),
                enabled: e.bitmap.as_ref().is_some_and(|b| b.is_enabled()),
                disk: e.disk.clone(),
                new: false,
                busy: st.busy.contains(&e.name),
            })
            .collect();
        let mut removed_disk: Vec<DirEntry> = Vec::new();
        // (target bitmap, sources) ORed in at commit.
        let mut merges: Vec<(Arc<DirtyBitmap>, Vec<Arc<DirtyBitmap>>)> = Vec::new();
        let mut dir_changed = false;
        for (index, action) in actions.iter().enumerate() {
            let fail = |error| TxnError { index, error };
            self.stage(
                img,
                action,
                &mut staged,
                &mut removed_disk,
                &mut merges,
                &mut dir_changed,
                opts,
            )
            .map_err(fail)?;
        }
        if self.read_only && (dir_changed || !actions.is_empty()) {
            // Reached only for read-only sets whose actions all passed validation
            // (nothing can be changed on a read-only set).
            return Err(TxnError {
                index: 0,
                error: Error::NoWriteAccess,
            });
        }
        // Disk: one new directory for the added and removed persistent bitmaps.
        let mut new_disk: Vec<(usize, DirEntry)> = Vec::new();
        let old_ext = st.ext;
        if dir_changed {
            let mut allocated = Vec::new();
            let mut dir = Vec::new();
            let mut consistent = Vec::new();
            let mut reserve = self.lock_reserve();
            let written = (|| -> Result<()> {
                for (i, s) in staged.iter().enumerate() {
                    if let Some(d) = &s.disk {
                        dir.push(d.clone());
                        consistent.push(s.bitmap.is_some() && s.persistent);
                    } else if s.new && s.persistent && opts.persist_new_in_use {
                        let bm = s.bitmap.as_ref().ok_or(Error::BrokenDirectory)?;
                        let (table_offset, table_size) =
                            write_bitmap(img, &s.name, bm, &mut allocated, &mut reserve)?;
                        let d = DirEntry {
                            table_offset,
                            table_size,
                            flags: FLAG_IN_USE | if s.enabled { FLAG_AUTO } else { 0 },
                            granularity_bits: s.granularity_bits as u8,
                            name: s.name.as_bytes().to_vec(),
                        };
                        new_disk.push((i, d.clone()));
                        dir.push(d);
                        consistent.push(true);
                    }
                }
                let ext = write_directory(img, &dir, &mut allocated, &mut reserve)?;
                img.flush_metadata().map_err(Error::UpdateExtension)?;
                self.switch(img, ext, &dir, &consistent)?;
                st.ext = ext;
                Ok(())
            })();
            drop(reserve);
            if let Err(error) = written {
                if st.ext == old_ext {
                    free_allocated(img, &allocated);
                }
                self.refill(img, &st);
                return Err(TxnError {
                    index: actions.len().saturating_sub(1),
                    error,
                });
            }
            for (i, d) in new_disk {
                staged[i].disk = Some(d);
            }
        }
        // Commit in memory, with marking paused: no write is half before, half after.
        let busy: Vec<String> = staged
            .iter()
            .filter(|s| s.busy)
            .map(|s| s.name.clone())
            .collect();
        let mut entries = Vec::with_capacity(staged.len());
        for s in staged {
            entries.push((
                Entry {
                    name: s.name,
                    granularity_bits: s.granularity_bits,
                    persistent: s.persistent,
                    bitmap: s.bitmap,
                    disk: s.disk,
                },
                s.enabled,
            ));
        }
        self.gate.pause();
        st.busy = busy.into_iter().collect();
        for (dst, srcs) in &merges {
            for s in srcs {
                if !Arc::ptr_eq(s, dst) {
                    // Sizes were checked when staging.
                    let _ = dst.merge_from(s);
                }
            }
        }
        st.entries = entries
            .into_iter()
            .map(|(e, enabled)| {
                if let Some(b) = &e.bitmap {
                    b.set_enabled(enabled);
                }
                e
            })
            .collect();
        self.publish(&st);
        self.generation.fetch_add(1, Ordering::AcqRel);
        at_commit();
        self.gate.resume();
        let new_ext = st.ext;
        // A bitmap added (or removed) changes what a store may need.
        self.refill(img, &st);
        drop(st);
        if dir_changed && old_ext != new_ext {
            free_old(img, old_ext, &removed_disk);
        }
        // Merged bits must survive a crash like written ones.
        let sources: Vec<Arc<DirtyBitmap>> =
            merges.into_iter().flat_map(|(_, srcs)| srcs).collect();
        self.shadow_cover(&sources).map_err(|error| TxnError {
            index: actions.len().saturating_sub(1),
            error,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        img: &dyn ImageMetadata,
        action: &Action<'_>,
        staged: &mut Vec<Staged>,
        removed_disk: &mut Vec<DirEntry>,
        merges: &mut Vec<(Arc<DirtyBitmap>, Vec<Arc<DirtyBitmap>>)>,
        dir_changed: &mut bool,
        opts: TxnOptions,
    ) -> Result<()> {
        let find = |staged: &Vec<Staged>, name: &str| staged.iter().position(|s| s.name == name);
        let usable = |staged: &Vec<Staged>, name: &str| -> Result<usize> {
            let i = find(staged, name).ok_or_else(|| Error::NotFound(name.to_string()))?;
            if staged[i].busy {
                return Err(Error::Busy(name.to_string()));
            }
            if staged[i].bitmap.is_none() {
                return Err(Error::Inconsistent(name.to_string()));
            }
            if self.read_only && staged[i].persistent {
                return Err(Error::ReadOnly(name.to_string()));
            }
            Ok(i)
        };
        match action {
            Action::Add { name, opts: a } => {
                if name.is_empty() {
                    return Err(Error::EmptyName);
                }
                let gbits = match a.granularity {
                    Some(g) => check_granularity_arg(g)?,
                    None => default_granularity(self.cluster_size).trailing_zeros(),
                };
                if find(staged, name).is_some() {
                    return Err(Error::Exists(name.to_string()));
                }
                if a.persistent {
                    self.check_can_store(
                        img,
                        staged
                            .iter()
                            .map(|s| (s.persistent, &s.disk, s.name.as_str())),
                        name,
                        gbits,
                    )
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
                if a.persistent && opts.persist_new_in_use {
                    *dir_changed = true;
                }
                staged.push(Staged {
                    name: name.to_string(),
                    granularity_bits: gbits,
                    persistent: a.persistent,
                    bitmap: Some(Arc::new(bm)),
                    enabled: !a.disabled,
                    disk: None,
                    new: true,
                    busy: false,
                });
            }
            Action::Remove { name } => {
                let i = find(staged, name).ok_or_else(|| Error::NotFound(name.to_string()))?;
                if staged[i].busy {
                    return Err(Error::Busy(name.to_string()));
                }
                if self.read_only {
                    return Err(Error::ReadOnly(name.to_string()));
                }
                let s = staged.remove(i);
                if let Some(d) = s.disk {
                    removed_disk.push(d);
                    *dir_changed = true;
                }
                // A merge staged into it earlier in this transaction goes with it.
                if let Some(b) = &s.bitmap {
                    merges.retain(|(t, _)| !Arc::ptr_eq(t, b));
                }
            }
            Action::Clear { name } => {
                let i = usable(staged, name)?;
                let s = &mut staged[i];
                let fresh = DirtyBitmap::new(self.disk_size, 1u64 << s.granularity_bits)
                    .map_err(|e| Error::Bitmap(e.to_string()))?;
                let fresh = Arc::new(fresh);
                // Merges staged into the old bits are dropped with them.
                if let Some(old) = &s.bitmap {
                    merges.retain(|(t, _)| !Arc::ptr_eq(t, old));
                }
                s.bitmap = Some(fresh);
            }
            Action::Enable { name } => {
                let i = usable(staged, name)?;
                staged[i].enabled = true;
            }
            Action::Disable { name } => {
                let i = usable(staged, name)?;
                staged[i].enabled = false;
            }
            Action::Busy { name } => {
                let i = find(staged, name).ok_or_else(|| Error::NotFound(name.to_string()))?;
                if staged[i].busy {
                    return Err(Error::Busy(name.to_string()));
                }
                if staged[i].bitmap.is_none() {
                    return Err(Error::Inconsistent(name.to_string()));
                }
                staged[i].busy = true;
            }
            Action::Merge { target, sources } => {
                let mut srcs = Vec::with_capacity(sources.len());
                for src in sources {
                    let bm = match *src {
                        MergeSource::Local(n) => {
                            let i =
                                find(staged, n).ok_or_else(|| Error::NotFound(n.to_string()))?;
                            if staged[i].busy {
                                return Err(Error::Busy(n.to_string()));
                            }
                            staged[i]
                                .bitmap
                                .clone()
                                .ok_or_else(|| Error::Inconsistent(n.to_string()))?
                        }
                        MergeSource::Other(b, n) => b.bitmap(n)?,
                    };
                    srcs.push(bm);
                }
                let i = usable(staged, target)?;
                let dst = staged[i].bitmap.clone().ok_or(Error::BrokenDirectory)?;
                if srcs.iter().any(|s| s.size() != dst.size()) {
                    return Err(Error::Incompatible);
                }
                // ORed in at the commit, in action order.
                merges.push((dst, srcs));
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_co_can_store_new_dirty_bitmap` over a list of (persistent, disk
    /// entry, name), counting bitmaps not stored yet too.
    pub(crate) fn check_can_store<'s>(
        &self,
        img: &dyn ImageMetadata,
        entries: impl Iterator<Item = (bool, &'s Option<DirEntry>, &'s str)>,
        name: &str,
        gbits: u32,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::NoWriteAccess);
        }
        if img.version() < 3 {
            return Err(Error::V2Image);
        }
        crate::limits::check_constraints(name, gbits, self.disk_size, self.cluster_size)?;
        let mut count = 0u64;
        let mut dir = 0u64;
        // QEMU's "already stored" case cannot happen: every bitmap of the image is
        // loaded (also an inconsistent one), so a duplicate name is refused as
        // existing before this check.
        for (persistent, disk, n) in entries {
            if persistent || disk.is_some() {
                count += 1;
                let len = disk.as_ref().map_or(n.len(), |d| d.name.len());
                dir += crate::limits::dir_entry_size(len);
            }
        }
        if count >= crate::limits::MAX_BITMAPS as u64 {
            return Err(Error::MaxBitmaps);
        }
        if dir + crate::limits::dir_entry_size(name.len()) > crate::limits::MAX_DIRECTORY_SIZE {
            return Err(Error::DirectoryFull);
        }
        Ok(())
    }
}
