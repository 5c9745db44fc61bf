//! The persistent-bitmap write tracker: keeps QEMU's persistent dirty bitmaps of a qcow2
//! image up to date while the image is served.
//!
//! Lifecycle (QEMU's order, plus a store whenever no frontend is attached):
//! * [`PersistentBitmaps::open`] loads every bitmap and flags the loaded ones IN_USE on
//!   disk; bitmaps already IN_USE load as inconsistent (listed, never tracked).
//! * [`PersistentBitmaps::apply`] creates or checks the `--bitmap` bitmaps.
//! * [`PersistentBitmaps::store_idle`] / `on_frontend_disconnected`: store, so the image
//!   on disk is clean while no VM is attached.
//! * `on_frontend_connected`: flag IN_USE again before any request is served, and
//!   reserve (allocate and preallocate) the clusters a store of the bitmaps needs with
//!   every bit set, which the store writes into: a store on a file system that filled up
//!   meanwhile succeeds. The store frees what it did not use; a failure to reserve is a
//!   warning naming the image (the crash-consistency shadow stays the fallback).
//! * `on_shutdown`: store (if needed) and flush.
//!
//! Dropping a tracker whose bitmaps still need storing stores them (or logs why it could
//! not), so every exit path that unwinds normally leaves a clean image.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, info, warn};
use qcow2::{BlockImage, Qcow2Image};
use qcow2_bitmaps::{Action, AddOptions, BitmapInfo, Bitmaps, OpenOptions, TxnOptions};

use crate::config::BitmapSpec;
use crate::tracker::{TrackerError, WriteTracker};

/// Errors of the persistent-bitmap tracker; each names the image and tells what to do.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The bitmap directory could not be loaded (or flagged in-use).
    #[error("cannot load the persistent bitmaps of '{image}': {source}")]
    Load {
        /// Image name.
        image: String,
        /// The persistence layer's error.
        #[source]
        source: qcow2_bitmaps::Error,
    },
    /// `--bitmap` names a bitmap found in-use (not saved properly).
    #[error(
        "--bitmap {name}: bitmap '{name}' in '{image}' is inconsistent (it was not saved \
         properly, e.g. after a crash) and cannot record writes; remove it with \
         `vhost-device-blk-bitmap bitmap remove {image} {name}` (or `qemu-img bitmap \
         --remove {image} {name}`), then take a full backup"
    )]
    Inconsistent {
        /// Image name.
        image: String,
        /// Bitmap name.
        name: String,
    },
    /// `--bitmap NAME,granularity=G` with an existing bitmap of another granularity.
    #[error(
        "--bitmap {name}: bitmap '{name}' in '{image}' exists with granularity {existing}, \
         not {requested}; drop granularity= to use it as it is, or remove it first"
    )]
    Granularity {
        /// Image name.
        image: String,
        /// Bitmap name.
        name: String,
        /// Its granularity.
        existing: u64,
        /// The requested one.
        requested: u64,
    },
    /// `--bitmap` names a disabled bitmap.
    #[error(
        "--bitmap {name}: bitmap '{name}' in '{image}' is disabled and would record no \
         writes; enable it first with `qemu-img bitmap --enable {image} {name}`"
    )]
    Disabled {
        /// Image name.
        image: String,
        /// Bitmap name.
        name: String,
    },
    /// A new bitmap could not be created.
    #[error("--bitmap {name}: cannot create bitmap '{name}' in '{image}': {source}")]
    Add {
        /// Image name.
        image: String,
        /// Bitmap name.
        name: String,
        /// The persistence layer's error.
        #[source]
        source: qcow2_bitmaps::Error,
    },
    /// `--bitmap` on an image that cannot hold bitmaps, or opened read-only.
    #[error("--bitmap needs a writable qcow2 image, '{image}' is {what}")]
    Unsupported {
        /// Image name.
        image: String,
        /// What it is instead.
        what: String,
    },
    /// Storing failed: the named bitmaps are not saved and stay in-use on disk.
    #[error(
        "could not store the persistent bitmaps of '{image}': {source}; they stay marked \
         in-use in the image and {fate}"
    )]
    Store {
        /// Image name.
        image: String,
        /// The persistence layer's error (names the bitmaps not stored).
        #[source]
        source: qcow2_bitmaps::Error,
        /// What the next open makes of them.
        fate: &'static str,
    },
    /// A run-time bitmap command failed (QEMU's text, unchanged).
    #[error("{0}")]
    Action(#[source] qcow2_bitmaps::Error),
    /// Flagging the bitmaps in-use again failed (the frontend is refused).
    #[error("could not mark the persistent bitmaps of '{image}' in-use: {source}")]
    InUse {
        /// Image name.
        image: String,
        /// The persistence layer's error.
        #[source]
        source: qcow2_bitmaps::Error,
    },
    /// The final flush failed.
    #[error("flushing '{image}' failed: {source}")]
    Flush {
        /// Image name.
        image: String,
        /// The engine's error.
        #[source]
        source: qcow2::Error,
    },
}

impl From<BitmapError> for TrackerError {
    fn from(e: BitmapError) -> Self {
        TrackerError(Box::new(e))
    }
}

/// Writes go into every enabled bitmap of a qcow2 image; the bitmaps are stored whenever
/// no frontend is attached.
pub struct PersistentBitmaps {
    image: Arc<Qcow2Image>,
    name: String,
    bitmaps: Bitmaps,
    /// The on-disk bitmaps may be in-use or stale: a store is owed.
    needs_store: Mutex<bool>,
    /// Writers attached (the vhost-user frontend, writable NBD exports): the bitmaps are
    /// in use on disk while there is one and stored when the last one goes.
    writers: Mutex<usize>,
    /// The thread that makes the crash-consistency shadow durable (group commits).
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for PersistentBitmaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentBitmaps")
            .field("image", &self.name)
            .field("bitmaps", &self.bitmaps)
            .finish_non_exhaustive()
    }
}

/// "b0 (3 dirty granules of 65536, 196608 bytes)".
fn describe(b: &BitmapInfo) -> String {
    format!(
        "{} ({} dirty granule(s) of {} bytes, {} bytes{})",
        b.name,
        b.count,
        b.granularity,
        b.dirty_bytes,
        if b.enabled { "" } else { ", disabled" }
    )
}

impl PersistentBitmaps {
    /// Loads the bitmaps of `image` (`name` is used in messages). A writable image gets
    /// every loaded bitmap flagged IN_USE on disk (a store is owed from now on); bitmaps
    /// found IN_USE are reported as inconsistent and not tracked. A read-only image is
    /// never written.
    pub fn open(image: Arc<Qcow2Image>, name: &str) -> Result<Self, BitmapError> {
        Self::open_node(image, name, name, qcow2_bitmaps::DEFAULT_MAX_MEMORY)
    }

    /// Like [`PersistentBitmaps::open_node`] with every option: `crash_consistent` keeps
    /// the persistent shadow that lets bitmaps left in use by a crash be recovered (and
    /// runs its syncer thread); `reserve` keeps the clusters a store needs allocated
    /// while the bitmaps are in use (a failure to reserve them is a warning); bitmaps
    /// recovered from a shadow are logged.
    pub fn open_with(
        image: Arc<Qcow2Image>,
        name: &str,
        node: &str,
        opts: OpenOptions,
    ) -> Result<Self, BitmapError> {
        let bitmaps =
            Bitmaps::open_with(&*image, node, opts).map_err(|source| BitmapError::Load {
                image: name.to_owned(),
                source,
            })?;
        Self::from_bitmaps(image, name, bitmaps)
    }

    /// Like [`PersistentBitmaps::open`], with the QMP node name that QEMU's messages
    /// about the bitmaps use (`Can't make bitmap 'b1' persistent in 'disk0': …`).
    /// `max_memory` caps what the loaded bitmaps may take in total. Crash-consistent
    /// bitmaps are on.
    pub fn open_node(
        image: Arc<Qcow2Image>,
        name: &str,
        node: &str,
        max_memory: u64,
    ) -> Result<Self, BitmapError> {
        let opts = OpenOptions {
            max_memory,
            crash_consistent: true,
            reserve: true,
        };
        Self::open_with(image, name, node, opts)
    }

    fn from_bitmaps(
        image: Arc<Qcow2Image>,
        name: &str,
        bitmaps: Bitmaps,
    ) -> Result<Self, BitmapError> {
        let writable = !bitmaps.is_read_only();
        let syncer = match bitmaps.shadow().filter(|s| s.is_enabled()) {
            Some(shadow) => {
                let shadow = shadow.clone();
                let img = image.clone();
                let t = std::thread::Builder::new()
                    .name("bitmap-shadow".into())
                    .spawn(move || shadow.run_syncer(&*img))
                    .map_err(|e| BitmapError::Load {
                        image: name.to_owned(),
                        source: qcow2_bitmaps::Error::Shadow(format!(
                            "cannot start its thread: {e}"
                        )),
                    })?;
                Some(t)
            }
            None => None,
        };
        let me = PersistentBitmaps {
            image,
            name: name.to_owned(),
            bitmaps,
            needs_store: Mutex::new(writable),
            writers: Mutex::new(0),
            syncer: Mutex::new(syncer),
        };
        me.warn_reserve();
        for b in me.bitmaps.list().iter().filter(|b| b.inconsistent) {
            warn!(
                "bitmap '{}' in '{name}' is inconsistent and will not be tracked; remove it \
                 with `vhost-device-blk-bitmap bitmap remove {name} {}`",
                b.name, b.name
            );
        }
        Ok(me)
    }

    /// Makes sure every `--bitmap` exists, is consistent, enabled and of the requested
    /// granularity; missing ones are created (persistent, enabled; QEMU's default
    /// granularity unless given). New bitmaps reach the image with the next store.
    pub fn apply(&self, specs: &[BitmapSpec]) -> Result<(), BitmapError> {
        if specs.is_empty() {
            return Ok(());
        }
        if self.bitmaps.is_read_only() {
            return Err(BitmapError::Unsupported {
                image: self.name.clone(),
                what: "opened read-only".into(),
            });
        }
        let existing = self.bitmaps.list();
        for spec in specs {
            let image = self.name.clone();
            let name = spec.name.clone();
            match existing.iter().find(|b| b.name == spec.name) {
                Some(b) if b.inconsistent => {
                    return Err(BitmapError::Inconsistent { image, name });
                }
                Some(b) if spec.granularity.is_some_and(|g| g != b.granularity) => {
                    return Err(BitmapError::Granularity {
                        image,
                        name,
                        existing: b.granularity,
                        requested: spec.granularity.unwrap_or_default(),
                    });
                }
                Some(b) if !b.enabled => return Err(BitmapError::Disabled { image, name }),
                Some(b) => info!("recording writes into existing bitmap {}", describe(b)),
                None => {
                    let opts = AddOptions {
                        granularity: spec.granularity,
                        ..AddOptions::default()
                    };
                    self.bitmaps
                        .add(&*self.image, &spec.name, opts)
                        .map_err(|source| BitmapError::Add {
                            image,
                            name,
                            source,
                        })?;
                    let g = self
                        .bitmaps
                        .list()
                        .iter()
                        .find(|b| b.name == spec.name)
                        .map_or(0, |b| b.granularity);
                    info!(
                        "created persistent bitmap '{}' (granularity {g}) in '{}'",
                        spec.name, self.name
                    );
                }
            }
        }
        Ok(())
    }

    /// Warns (naming the image) when the space a store of the bitmaps needs could not be
    /// reserved by the last attempt: a store on a full file system may then fail.
    fn warn_reserve(&self) {
        if let Some(e) = self.bitmaps.reserve_error() {
            warn!(
                "could not reserve the space a store of the persistent bitmaps of '{}' \
                 needs ({e}, {} bytes reserved): if the file system fills up, storing them \
                 may fail; {}",
                self.name,
                self.bitmaps.reserved_bytes(),
                if self.recoverable() {
                    "their crash-consistency shadow keeps them recoverable"
                } else {
                    "they would then be reported inconsistent on the next open"
                }
            );
        }
    }

    /// The in-memory bitmaps (for inspection).
    pub fn bitmaps(&self) -> &Bitmaps {
        &self.bitmaps
    }

    fn lock(&self) -> MutexGuard<'_, bool> {
        self.needs_store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores the bitmaps if a store is owed (no writes may be in flight): afterwards the
    /// image on disk is clean. Logs one line naming the stored bitmaps.
    pub fn store_idle(&self) -> Result<(), BitmapError> {
        let mut owed = self.lock();
        if !*owed {
            return Ok(());
        }
        *owed = false;
        let stored = self.store_locked();
        if stored.is_err() {
            // Still owed: the next stop (or the daemon's exit) tries again, and an exit
            // that could not store them fails and names them.
            *owed = true;
        }
        stored
    }

    /// Whether bitmaps left in use now would be recovered by the next open (the
    /// crash-consistency shadow is armed).
    pub fn recoverable(&self) -> bool {
        self.bitmaps.shadow().is_some_and(|s| s.is_armed())
    }

    fn store_locked(&self) -> Result<(), BitmapError> {
        self.bitmaps
            .store(&*self.image)
            .map_err(|source| BitmapError::Store {
                image: self.name.clone(),
                source,
                fate: if self.recoverable() {
                    "their crash-consistency shadow keeps them recoverable: the next open \
                     recovers them"
                } else {
                    "will be reported inconsistent on the next open"
                },
            })?;
        // The store frees the old clusters in the refcount cache: write it out, so the
        // image on disk checks clean while no frontend is attached.
        self.image.flush().map_err(|source| BitmapError::Flush {
            image: self.name.clone(),
            source,
        })?;
        let stored: Vec<String> = self
            .bitmaps
            .list()
            .iter()
            .filter(|b| b.persistent && !b.inconsistent)
            .map(describe)
            .collect();
        if !stored.is_empty() {
            info!(
                "stored persistent bitmaps of '{}': {}",
                self.name,
                stored.join(", ")
            );
        }
        if let Some(st) = self.bitmaps.shadow().map(|s| s.stats()) {
            if st.syncs > 0 {
                info!(
                    "crash-consistency shadow of '{}': {} region(s) of {} bytes recorded \
                     in {} sync(s) so far",
                    self.name, st.granules, st.granularity, st.syncs
                );
            }
        }
        Ok(())
    }

    /// Applies bitmap actions at run time, all or nothing and atomically with respect to
    /// guest writes (see [`Bitmaps::transaction`]). While a frontend is attached (the
    /// bitmaps are in use on disk) a new persistent bitmap is written at once, flagged
    /// in use, and everything is stored when the frontend goes; while idle, the bitmaps
    /// are stored at once, as the offline tool does, so the image stays clean.
    pub fn transaction(&self, actions: &[Action<'_>]) -> Result<(), BitmapError> {
        self.transaction_with(actions, &mut || {})
    }

    /// [`PersistentBitmaps::transaction`] with `at_commit` run at the instant the new
    /// bitmap state takes effect (see [`Bitmaps::transaction_with`]).
    pub fn transaction_with(
        &self,
        actions: &[Action<'_>],
        at_commit: &mut dyn FnMut(),
    ) -> Result<(), BitmapError> {
        let mut owed = self.lock();
        let opts = TxnOptions {
            persist_new_in_use: *owed,
        };
        self.bitmaps
            .transaction_with(&*self.image, actions, opts, at_commit)
            .map_err(|e| BitmapError::Action(e.error))?;
        if *owed {
            self.warn_reserve();
        } else {
            // A failed store leaves the bitmaps owed: the next stop retries.
            *owed = true;
            self.store_locked()?;
            *owed = false;
        }
        Ok(())
    }

    /// Flags the stored bitmaps IN_USE again, before a frontend may write.
    pub fn mark_in_use(&self) -> Result<(), BitmapError> {
        if self.bitmaps.is_read_only() {
            return Ok(());
        }
        let mut owed = self.lock();
        // Even a failed update may have changed the header: store on the way out.
        *owed = true;
        self.bitmaps
            .mark_in_use_again(&*self.image)
            .map_err(|source| BitmapError::InUse {
                image: self.name.clone(),
                source,
            })?;
        self.warn_reserve();
        Ok(())
    }

    /// A writer attaches (the frontend, a writable export): the first one flags the
    /// bitmaps IN_USE on disk before it may write.
    pub fn writer_attached(&self) -> Result<(), BitmapError> {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if *w == 0 {
            self.mark_in_use()?;
        }
        *w += 1;
        Ok(())
    }

    /// A writer detached after its last write completed: when it was the last one, the
    /// bitmaps are stored and the image is clean on disk.
    pub fn writer_detached(&self) -> Result<(), BitmapError> {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        *w = w.saturating_sub(1);
        if *w == 0 {
            self.store_idle()
        } else {
            Ok(())
        }
    }

    /// Stores if owed, then flushes the image.
    pub fn close(&self) -> Result<(), BitmapError> {
        let stored = self.store_idle();
        if !self.bitmaps.is_read_only() {
            self.image.flush().map_err(|source| BitmapError::Flush {
                image: self.name.clone(),
                source,
            })?;
        }
        stored
    }
}

impl WriteTracker for PersistentBitmaps {
    fn mark(&self, offset: u64, len: u64) -> u64 {
        self.bitmaps.mark(offset, len)
    }

    fn shadow(&self) -> Option<Arc<qcow2_bitmaps::Shadow>> {
        self.bitmaps.shadow().filter(|s| s.is_enabled()).cloned()
    }

    fn generation(&self) -> u64 {
        self.bitmaps.generation()
    }

    fn on_frontend_connected(&self) -> Result<(), TrackerError> {
        Ok(self.writer_attached()?)
    }

    fn on_frontend_disconnected(&self) -> Result<(), TrackerError> {
        Ok(self.writer_detached()?)
    }

    fn on_shutdown(&self) -> Result<(), TrackerError> {
        Ok(self.close()?)
    }
}

impl Drop for PersistentBitmaps {
    fn drop(&mut self) {
        let owed = *self.lock();
        if owed {
            if let Err(e) = self.store_idle() {
                error!("{e}");
            }
        }
        // Closed for good: a store reserve left by a failed store is freed (a successful
        // store already freed it), so it does not stay as leaked clusters.
        if !self.bitmaps.is_read_only() {
            self.bitmaps.release_reserve(&*self.image);
        }
        if let Some(shadow) = self.bitmaps.shadow() {
            shadow.shutdown();
        }
        let syncer = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = syncer {
            let _ = t.join();
        }
    }
}

/// The write tracker of a disk and, for qcow2 images, the same object as the bitmaps
/// the control socket manages.
pub type Trackers = (Arc<dyn WriteTracker>, Option<Arc<PersistentBitmaps>>);

/// Builds the write tracker for an opened disk: [`PersistentBitmaps`] for qcow2 images
/// (with the `--bitmap` requests applied and everything stored, so the image is clean
/// until a frontend connects), [`NoopTracker`](crate::tracker::NoopTracker) for raw ones.
/// On error the bitmaps already loaded are stored again (or the log says why not).
pub fn tracker_for(
    config: &crate::config::Config,
    disk: &crate::disk::OpenedDisk,
) -> Result<Trackers, BitmapError> {
    let name = config.image.display().to_string();
    let Some(image) = disk.qcow2.clone() else {
        if !config.bitmaps.is_empty() {
            return Err(BitmapError::Unsupported {
                image: name,
                what: format!("a {} image", disk.format),
            });
        }
        return Ok((Arc::new(crate::tracker::NoopTracker), None));
    };
    let opts = OpenOptions {
        max_memory: config.max_bitmap_memory,
        crash_consistent: config.crash_consistent_bitmaps,
        reserve: true,
    };
    let tracker = PersistentBitmaps::open_with(image, &name, &config.node_name, opts)?;
    tracker.apply(&config.bitmaps)?;
    if let Err(e) = tracker.store_idle() {
        if !tracker.recoverable() {
            return Err(e);
        }
        // A full file system, typically: serving stays safe, since the shadow keeps
        // every bitmap in use recoverable; the store stays owed (retried at every
        // disconnect and at the stop, whose exit says if it still failed).
        warn!("{e}; serving anyway");
    }
    let tracker = Arc::new(tracker);
    Ok((tracker.clone(), Some(tracker)))
}
