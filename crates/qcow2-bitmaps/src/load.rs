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
use crate::shadow::{self, Found, Shadow};
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
    /// The crash-consistency shadow found in the header (read-write opens only).
    found: Found,
    /// Bitmaps recovered from the shadow: name and bytes the shadow added.
    recovered: Vec<(String, u64)>,
}

/// How [`Bitmaps::open_with`] opens a set.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Cap on the memory the loaded bitmaps may take in total.
    pub max_memory: u64,
    /// Keep a persistent shadow while bitmaps are in use, so a crash leaves them
    /// recoverable (see the `shadow` module). A shadow found on open is used for recovery
    /// whatever this says; with `false` it is then removed.
    pub crash_consistent: bool,
    /// Keep a *store reserve* while bitmaps are in use (from [`Bitmaps::open_with`] or
    /// [`Bitmaps::mark_in_use_again`] to the next successful [`Bitmaps::store`]): the
    /// clusters a store of every persistent bitmap with every bit set needs (data,
    /// tables, directory), allocated and preallocated in the file system and referenced
    /// by nothing on disk, which the store then writes into — so a store on a file system
    /// that filled up meanwhile succeeds. The set keeps it up to date as bitmaps are added
    /// and removed; a failure to reserve is reported by [`Bitmaps::reserve_error`], never
    /// as an error. After a crash the reserve shows as leaked clusters.
    pub reserve: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            max_memory: DEFAULT_MAX_MEMORY,
            crash_consistent: false,
            reserve: false,
        }
    }
}

/// The default cap on the memory all loaded bitmaps of one image may take (1 GiB).
pub const DEFAULT_MAX_MEMORY: u64 = 1 << 30;

/// Bytes the in-memory bitmap of a directory entry takes.
fn bitmap_memory(disk_size: u64, granularity_bits: u8) -> u64 {
    let bits = disk_size.div_ceil(1u64 << granularity_bits.min(63));
    bits.div_ceil(64) * 8
}

fn read_bitmaps(img: &dyn ImageMetadata, max_memory: u64, recover: bool) -> Result<Loaded> {
    let Some(data) = img.header_extension(EXT_BITMAPS) else {
        return Ok(Loaded {
            state: State::default(),
            drop_ext: false,
            found: if recover {
                shadow::read_found(img, None)
            } else {
                Found::default()
            },
            recovered: Vec::new(),
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
            found: if recover {
                shadow::read_found(img, None)
            } else {
                Found::default()
            },
            recovered: Vec::new(),
        });
    }
    let cs = img.cluster_size();
    let disk_size = img.virtual_size();
    let ext = BitmapsExt::parse(&data, cs)?;
    check_directory_size(ext.directory_size)?;
    let mut dir = vec![0u8; ext.directory_size as usize];
    img.read_metadata(HostOffset(ext.directory_offset), &mut dir)?;
    let dir_entries = parse_directory(&dir, ext.nb_bitmaps, cs, disk_size)?;
    let found = if recover {
        shadow::read_found(img, Some(ext))
    } else {
        Found::default()
    };
    let covered = |i: usize| {
        found
            .trusted
            .as_ref()
            .is_some_and(|(mask, _)| mask.get(i).copied().unwrap_or(false))
    };
    // Bounded memory whatever the directory says (its entries may even share tables):
    // the bitmaps that would be loaded must fit the cap, checked before any is read.
    let needed: u64 = dir_entries
        .iter()
        .enumerate()
        .filter(|(i, d)| !d.in_use() || covered(*i))
        .map(|(_, d)| bitmap_memory(disk_size, d.granularity_bits))
        .sum();
    if needed > max_memory {
        return Err(Error::MemoryCap {
            needed,
            cap: max_memory,
        });
    }
    let mut entries = Vec::with_capacity(dir_entries.len());
    let mut recovered = Vec::new();
    for (i, d) in dir_entries.into_iter().enumerate() {
        let bitmap = if !d.in_use() {
            Some(Arc::new(load_bitmap(img, &d, disk_size)?))
        } else if covered(i) {
            // Stored bits OR everything that may have changed since they were stored.
            match load_bitmap(img, &d, disk_size) {
                Ok(bm) => {
                    let before = bm.dirty_bytes();
                    if let Some((_, words)) = &found.trusted {
                        let g = found.ext.map_or(0, |x| x.granularity_bits);
                        apply_shadow(&bm, words, g);
                    }
                    recovered.push((d.name_lossy(), bm.dirty_bytes() - before));
                    Some(Arc::new(bm))
                }
                Err(e) => {
                    log::warn!(
                        "bitmap '{}' cannot be recovered from the shadow: {e}; it stays \
                         inconsistent",
                        d.name_lossy()
                    );
                    None
                }
            }
        } else {
            None
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
        found,
        recovered,
    })
}

/// Sets every granule the shadow words name in `bm`.
fn apply_shadow(bm: &dirty_bitmap::DirtyBitmap, words: &[u64], granularity_bits: u32) {
    let g = 1u64 << granularity_bits;
    for (wi, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let b = w.trailing_zeros() as u64;
            w &= w - 1;
            bm.set_range((wi as u64 * 64 + b) * g, g);
        }
    }
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
        let loaded = read_bitmaps(img, max_memory, false)?;
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
        Self::open_with(
            img,
            node,
            OpenOptions {
                max_memory,
                ..OpenOptions::default()
            },
        )
    }

    /// Opens the bitmaps of `img` with `opts`: read-only images as
    /// [`Bitmaps::load_read_only`]; writable ones load, recover bitmaps left in use by a
    /// crash when a trusted shadow covers them, arm the shadow (when
    /// `opts.crash_consistent`) and flag the loaded bitmaps IN_USE.
    pub fn open_with(img: &dyn ImageMetadata, node: &str, opts: OpenOptions) -> Result<Bitmaps> {
        if img.is_read_only() {
            return Self::read_only_capped(img, node, opts.max_memory);
        }
        let loaded = read_bitmaps(img, opts.max_memory, true)?;
        if loaded.drop_ext {
            img.update_header(HeaderUpdate {
                autoclear: None,
                extensions: vec![(EXT_BITMAPS, None)],
            })?;
        }
        // A set that keeps a store reserve (the daemon) leaks it at a crash, with
        // whatever else the crash left allocated: when the image was not closed cleanly
        // (bitmaps in use on disk, or a shadow left in the header), lower the refcounts
        // nothing references before anything new is allocated. The shadow's region,
        // still ours, is kept.
        let unclean = loaded.found.ext.is_some()
            || loaded.state.entries.iter().any(|e| {
                e.disk
                    .as_ref()
                    .is_some_and(|d| d.flags & crate::format::FLAG_IN_USE != 0)
            });
        if opts.reserve && unclean {
            let keep: Vec<(u64, u64)> = loaded
                .found
                .ext
                .iter()
                .filter(|_| loaded.found.ours)
                .map(|x| (x.region_offset, x.region_len))
                .collect();
            match img.repair_leaks(&keep) {
                Ok(0) => {}
                Ok(n) => log::info!(
                    "freed {n} cluster(s) of '{node}' that an unclean close left allocated                      and unreferenced (e.g. a store reserve)"
                ),
                Err(e) => log::warn!(
                    "could not free the clusters an unclean close of '{node}' may have leaked: {e}"
                ),
            }
        }
        for (name, added) in &loaded.recovered {
            log::info!(
                "bitmap '{name}' was in use (not stored after a crash) and is recovered from \
                 its crash-consistency shadow: the stored bits plus {added} byte(s) that may \
                 have changed"
            );
        }
        let min_granularity = loaded
            .state
            .entries
            .iter()
            .map(|e| 1u64 << e.granularity_bits)
            .min();
        let vs = img.virtual_size();
        // A shadow of ours found on disk keeps its granularity: recovered bitmaps stay
        // covered by its bits, which carry over into this run.
        let granularity_bits = match loaded.found.ext {
            Some(x) if loaded.found.ours => x.granularity_bits,
            _ => shadow::granularity_bits_for(vs, min_granularity),
        };
        let shadow = Shadow::new(vs, granularity_bits, opts.crash_consistent);
        shadow.adopt(&loaded.found);
        let mut b = Bitmaps::from_state(node, false, vs, img.cluster_size(), loaded.state);
        b.shadow = Some(Arc::new(shadow));
        b.recovered = loaded.recovered;
        b.reserve_enabled = opts.reserve;
        b.mark_in_use_again(img)?;
        if let Some(s) = b.shadow.as_ref().filter(|s| !s.is_armed()) {
            // Not armed now, so no shadow may stay in the header: one left there unused
            // (untrusted, or trusted but covering nothing we track) could match the
            // directory again later and "recover" a bitmap without the writes made
            // meanwhile.
            s.remove_from_header(img)?;
        }
        Ok(b)
    }

    /// The crash-consistency shadow of a writable set (run its syncer with
    /// [`Shadow::run_syncer`]; writes ask it with [`Shadow::check`] / [`Shadow::cover`]).
    pub fn shadow(&self) -> Option<&Arc<Shadow>> {
        self.shadow.as_ref()
    }

    /// The bitmaps recovered from the shadow on open: name and the bytes the shadow
    /// added to the stored bits.
    pub fn recovered(&self) -> &[(String, u64)] {
        &self.recovered
    }

    /// Sets IN_USE on disk for every loaded (consistent, persistent) bitmap whose entry
    /// lacks it, e.g. after [`Bitmaps::store`] when the daemon goes on serving writes;
    /// then fills the store reserve, if the set keeps one ([`OpenOptions::reserve`]).
    pub fn mark_in_use_again(&self, img: &dyn ImageMetadata) -> Result<()> {
        if self.read_only {
            return Err(Error::NoWriteAccess);
        }
        let mut st = self.lock();
        self.mark_in_use_locked(img, &mut st)?;
        self.start_reserve(img, &st);
        Ok(())
    }

    fn mark_in_use_locked(&self, img: &dyn ImageMetadata, st: &mut State) -> Result<()> {
        let mut changed = false;
        let mut new_dir: Vec<DirEntry> = Vec::new();
        let mut consistent = Vec::new();
        for e in &st.entries {
            if let Some(d) = &e.disk {
                let mut d = d.clone();
                if e.bitmap.is_some() && e.persistent && d.flags & FLAG_IN_USE == 0 {
                    d.flags |= FLAG_IN_USE;
                    changed = true;
                }
                new_dir.push(d);
                consistent.push(e.bitmap.is_some() && e.persistent);
            }
        }
        // The shadow first: every covered bitmap must be durable in it before the first
        // IN_USE flag that makes its stored bits stale can reach the disk.
        if let Some(s) = &self.shadow {
            let covered = shadow::coverage(&new_dir, &consistent);
            if covered.iter().any(|&c| c) && !s.is_armed() {
                if let Err(e) = s.arm(img, st.ext, &covered) {
                    log::error!(
                        "could not set up the crash-consistency shadow of the bitmaps: {e}; a \
                         crash will leave them in use (inconsistent)"
                    );
                    s.disable(img, e.to_string())
                        .map_err(|e| Error::InUseUpdate(Box::new(e)))?;
                }
            }
        }
        if !changed {
            return Ok(());
        }
        update_in_place(img, st, &new_dir).map_err(|e| Error::InUseUpdate(Box::new(e)))?;
        let mut it = new_dir.into_iter();
        for e in st.entries.iter_mut().filter(|e| e.disk.is_some()) {
            e.disk = it.next();
        }
        Ok(())
    }
}

/// Rewrites the directory in place with only flags changed, in QEMU's order: clear
/// autoclear bit 0 (header, sync), write the directory, rewrite the header (sync), set
/// the bit again (header, sync). A crash in between leaves the bit clear, so every
/// bitmap counts as lost, never stale. Four syncs in all, each explained below
/// (`Qcow2Image::update_header` syncs before its header write only when the new header
/// points at something new).
fn update_in_place(img: &dyn ImageMetadata, st: &State, new_dir: &[DirEntry]) -> Result<()> {
    let ext = st.ext.ok_or(Error::BrokenDirectory)?;
    let bytes = serialize_directory(new_dir);
    if bytes.len() as u64 != ext.directory_size || new_dir.len() as u32 != ext.nb_bitmaps {
        return Err(Error::BrokenDirectory);
    }
    let autoclear = img.autoclear_features();
    // Sync 1, after the header write: the cleared bit is durable before the directory
    // is overwritten, so no crash pairs a set bit with a torn or half-flagged directory.
    // None before it: a header that only clears a bit points at nothing new.
    img.update_header(HeaderUpdate {
        autoclear: Some(autoclear & !AUTOCLEAR_BITMAPS),
        extensions: Vec::new(),
    })?;
    img.write_metadata(HostOffset(ext.directory_offset), &bytes)?;
    // QEMU's header rewrite after the directory (the same header: offset and size are
    // unchanged). Sync 2, after it: the new directory is durable before the bit can be.
    // None before it: an unchanged header points at nothing new.
    img.update_header(HeaderUpdate::default())?;
    // Sync 3, before the header write (setting a bit publishes): nothing was written
    // since sync 2, but update_header cannot know that, as it does not see the writes
    // made through write_metadata. Sync 4, after it: the set bit is durable on return.
    img.update_header(HeaderUpdate {
        autoclear: Some(autoclear | AUTOCLEAR_BITMAPS),
        extensions: Vec::new(),
    })?;
    Ok(())
}
