//! Opening: reading and validating the bitmaps extension and directory, loading every
//! consistent bitmap, and flagging loaded bitmaps IN_USE on disk with QEMU's crash-safe
//! in-place order.

use std::sync::Arc;

use qcow2::{HeaderUpdate, HostOffset, ImageMetadata, AUTOCLEAR_BITMAPS, EXT_BITMAPS};

use crate::error::{Error, Result};
use crate::format::{
    check_directory_size, parse_directory, serialize_directory, BitmapsExt, DirEntry, FLAG_IN_USE,
};
use crate::set::{Bitmaps, Entry, State};
use crate::table::load_bitmap;

/// QEMU's warning when the extension is present but autoclear bit 0 is clear (v3).
pub const WARN_LOST_V3: &str =
    "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent";
/// QEMU's warning for the same case on a v2 image.
pub const WARN_LOST_V2: &str = "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent";
/// QEMU's follow-up line to either warning.
pub const WARN_LEAKS: &str =
    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.";

/// Result of reading the on-disk bitmaps.
struct Loaded {
    state: State,
    /// The extension was present but must be ignored (autoclear bit clear).
    drop_ext: bool,
}

/// The default cap on the memory all loaded bitmaps of one image may take (1 GiB).
pub const DEFAULT_MAX_MEMORY: u64 = 1 << 30;

/// Bytes the in-memory bitmap of a directory entry takes.
fn bitmap_memory(disk_size: u64, granularity_bits: u8) -> u64 {
    let bits = disk_size.div_ceil(1u64 << granularity_bits.min(63));
    bits.div_ceil(64) * 8
}

fn read_bitmaps(img: &dyn ImageMetadata, max_memory: u64) -> Result<Loaded> {
    let Some(data) = img.header_extension(EXT_BITMAPS) else {
        return Ok(Loaded {
            state: State::default(),
            drop_ext: false,
        });
    };
    if data.len() != BitmapsExt::LEN {
        return Err(Error::ExtLength);
    }
    if img.autoclear_features() & AUTOCLEAR_BITMAPS == 0 {
        log::warn!(
            "{}",
            if img.version() < 3 {
                WARN_LOST_V2
            } else {
                WARN_LOST_V3
            }
        );
        log::warn!("{WARN_LEAKS}");
        return Ok(Loaded {
            state: State::default(),
            drop_ext: true,
        });
    }
    let cs = img.cluster_size();
    let disk_size = img.virtual_size();
    let ext = BitmapsExt::parse(&data, cs)?;
    check_directory_size(ext.directory_size)?;
    let mut dir = vec![0u8; ext.directory_size as usize];
    img.read_metadata(HostOffset(ext.directory_offset), &mut dir)?;
    let dir_entries = parse_directory(&dir, ext.nb_bitmaps, cs, disk_size)?;
    // Bounded memory whatever the directory says (its entries may even share tables):
    // the bitmaps that would be loaded must fit the cap, checked before any is read.
    let needed: u64 = dir_entries
        .iter()
        .filter(|d| !d.in_use())
        .map(|d| bitmap_memory(disk_size, d.granularity_bits))
        .sum();
    if needed > max_memory {
        return Err(Error::MemoryCap {
            needed,
            cap: max_memory,
        });
    }
    let mut entries = Vec::with_capacity(dir_entries.len());
    for d in dir_entries {
        let bitmap = if d.in_use() {
            None
        } else {
            Some(Arc::new(load_bitmap(img, &d, disk_size)?))
        };
        entries.push(Entry {
            name: d.name_lossy(),
            granularity_bits: d.granularity_bits as u32,
            persistent: true,
            bitmap,
            disk: Some(d),
        });
    }
    Ok(Loaded {
        state: State {
            entries,
            ext: Some(ext),
            busy: Default::default(),
        },
        drop_ext: false,
    })
}

impl Bitmaps {
    /// Opens the bitmaps of `img`: read-write if the image is writable (see
    /// [`Bitmaps::load_and_mark_in_use`]), else read-only.
    pub fn open(img: &dyn ImageMetadata, node: &str) -> Result<Bitmaps> {
        Self::open_capped(img, node, DEFAULT_MAX_MEMORY)
    }

    /// [`Bitmaps::open`] with a cap on the memory the loaded bitmaps may take in total
    /// (over it: [`Error::MemoryCap`], before anything is read or written).
    pub fn open_capped(img: &dyn ImageMetadata, node: &str, max_memory: u64) -> Result<Bitmaps> {
        if img.is_read_only() {
            Self::read_only_capped(img, node, max_memory)
        } else {
            Self::mark_in_use_capped(img, node, max_memory)
        }
    }

    /// Loads every bitmap without touching the file. Nothing can be changed or stored;
    /// [`Bitmaps::mark`] does nothing.
    pub fn load_read_only(img: &dyn ImageMetadata, node: &str) -> Result<Bitmaps> {
        Self::read_only_capped(img, node, DEFAULT_MAX_MEMORY)
    }

    fn read_only_capped(img: &dyn ImageMetadata, node: &str, max_memory: u64) -> Result<Bitmaps> {
        let loaded = read_bitmaps(img, max_memory)?;
        Ok(Bitmaps::from_state(
            node,
            true,
            img.virtual_size(),
            img.cluster_size(),
            loaded.state,
        ))
    }

    /// Loads every bitmap of a writable image and flags each loaded one IN_USE on disk
    /// (in place, QEMU's order), so a crash leaves them inconsistent rather than stale.
    /// An extension that lost its autoclear bit is removed from the header.
    pub fn load_and_mark_in_use(img: &dyn ImageMetadata, node: &str) -> Result<Bitmaps> {
        Self::mark_in_use_capped(img, node, DEFAULT_MAX_MEMORY)
    }

    fn mark_in_use_capped(img: &dyn ImageMetadata, node: &str, max_memory: u64) -> Result<Bitmaps> {
        if img.is_read_only() {
            return Err(Error::NoWriteAccess);
        }
        let loaded = read_bitmaps(img, max_memory)?;
        if loaded.drop_ext {
            img.update_header(HeaderUpdate {
                autoclear: None,
                extensions: vec![(EXT_BITMAPS, None)],
            })?;
        }
        let b = Bitmaps::from_state(
            node,
            false,
            img.virtual_size(),
            img.cluster_size(),
            loaded.state,
        );
        b.mark_in_use_again(img)?;
        Ok(b)
    }

    /// Sets IN_USE on disk for every loaded (consistent, persistent) bitmap whose entry
    /// lacks it, e.g. after [`Bitmaps::store`] when the daemon goes on serving writes.
    pub fn mark_in_use_again(&self, img: &dyn ImageMetadata) -> Result<()> {
        if self.read_only {
            return Err(Error::NoWriteAccess);
        }
        let mut st = self.lock();
        let mut changed = false;
        let mut new_dir: Vec<DirEntry> = Vec::new();
        for e in &st.entries {
            if let Some(d) = &e.disk {
                let mut d = d.clone();
                if e.bitmap.is_some() && e.persistent && d.flags & FLAG_IN_USE == 0 {
                    d.flags |= FLAG_IN_USE;
                    changed = true;
                }
                new_dir.push(d);
            }
        }
        if !changed {
            return Ok(());
        }
        update_in_place(img, &st, &new_dir).map_err(|e| Error::InUseUpdate(Box::new(e)))?;
        let mut it = new_dir.into_iter();
        for e in st.entries.iter_mut().filter(|e| e.disk.is_some()) {
            e.disk = it.next();
        }
        Ok(())
    }
}

/// Rewrites the directory in place with only flags changed: clear autoclear bit 0 (header
/// and sync), write the directory, rewrite the header (+ sync), set the bit again (+ sync).
/// A crash in between leaves the bit clear, so every bitmap counts as lost, never stale.
fn update_in_place(img: &dyn ImageMetadata, st: &State, new_dir: &[DirEntry]) -> Result<()> {
    let ext = st.ext.ok_or(Error::BrokenDirectory)?;
    let bytes = serialize_directory(new_dir);
    if bytes.len() as u64 != ext.directory_size || new_dir.len() as u32 != ext.nb_bitmaps {
        return Err(Error::BrokenDirectory);
    }
    let autoclear = img.autoclear_features();
    img.update_header(HeaderUpdate {
        autoclear: Some(autoclear & !AUTOCLEAR_BITMAPS),
        extensions: Vec::new(),
    })?;
    img.write_metadata(HostOffset(ext.directory_offset), &bytes)?;
    img.update_header(HeaderUpdate::default())?;
    img.update_header(HeaderUpdate {
        autoclear: Some(autoclear | AUTOCLEAR_BITMAPS),
        extensions: Vec::new(),
    })?;
    Ok(())
}
