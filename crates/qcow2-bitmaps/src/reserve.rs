//! The store reserve: clusters allocated (refcount 1) and preallocated in the file system
//! while bitmaps are in use, referenced by nothing on disk, that a store writes its
//! tables, data and directory into. A store on a full file system then needs no new
//! space: it only overwrites blocks the file already has, and frees clusters.
//!
//! The reserve is shaped like the worst case of a store of the current set: one run per
//! bitmap for its data (every bit set: one cluster per table entry), one for its table,
//! and one for the directory. A store asks for runs no longer than these (a bitmap writes
//! at most its table size in data clusters, as one run), so taking the smallest run that
//! fits (and splitting it) always succeeds: each demand can be given the run of its own
//! worst case, and best fit never takes a run a later demand needs more (exchange
//! argument: a demand `x` served by run `r` instead of its own run `s ≥ r` leaves `s` to
//! whichever demand `r` was for). A demand the reserve cannot meet (e.g. a bitmap added
//! since the last fill) falls back to [`ImageMetadata::allocate_clusters`].
//!
//! Crash: the reserve is leaked clusters (`qemu-img check` reports leaks, never
//! corruption; `-r leaks` frees them, and so does the engine's refcount repair when it
//! opens an image left dirty).

use qcow2::ImageMetadata;

use crate::error::{Error, Result};
use crate::limits::{dir_entry_size, table_size};
use std::sync::MutexGuard;

use crate::set::{Bitmaps, State};
use crate::table::clusters_for;

/// Clusters reserved for stores: runs `(host offset, clusters)`.
#[derive(Debug, Default)]
pub(crate) struct Reserve {
    runs: Vec<(u64, u64)>,
    /// The set keeps a reserve now (between marking bitmaps in use and the store that
    /// ends it).
    pub active: bool,
    /// Why the last fill failed (`None`: it succeeded, or none was made).
    pub error: Option<String>,
}

/// The runs a store of `st` takes in the worst case (every bit of every bitmap set), in
/// clusters of `cs` bytes: data and table per persistent consistent bitmap, then the
/// directory. Empty when a store would write nothing.
pub(crate) fn worst_case(st: &State, disk_size: u64, cs: u64) -> Result<Vec<u64>> {
    let too_big = || Error::Bitmap("the worst-case store does not fit in 64 bits".into());
    let mut runs = Vec::new();
    let mut dir_bytes = 0u64;
    let mut total = 0u64;
    let mut any = false;
    for e in &st.entries {
        let stored = e.persistent && e.bitmap.is_some();
        if stored {
            any = true;
            // At most MAX_TABLE_SIZE entries of at most MAX_PHYS_SIZE bytes in all
            // (checked when the bitmap was loaded or added).
            let data = table_size(disk_size, e.granularity_bits, cs);
            let table = clusters_for(data.checked_mul(8).ok_or_else(too_big)?, cs);
            for n in [data, table] {
                if n > 0 {
                    total = total.checked_add(n).ok_or_else(too_big)?;
                    runs.push(n);
                }
            }
        }
        if stored || e.disk.is_some() {
            let name_len = e.disk.as_ref().map_or(e.name.len(), |d| d.name.len());
            dir_bytes = dir_bytes
                .checked_add(dir_entry_size(name_len))
                .ok_or_else(too_big)?;
        }
    }
    if !any {
        return Ok(Vec::new());
    }
    let dir = clusters_for(dir_bytes, cs);
    total.checked_add(dir).ok_or_else(too_big)?;
    total.checked_mul(cs).ok_or_else(too_big)?;
    runs.push(dir);
    Ok(runs)
}

impl Reserve {
    /// Clusters held.
    pub fn clusters(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// Reshapes the reserve to `needs` (cluster counts, one run each): runs held are
    /// reused (smallest that fits, split), runs no need uses are freed, and the missing
    /// runs are allocated and preallocated, largest first, each on its own (so freed
    /// clusters inside the file serve them before the file grows). A run that cannot be
    /// had does not stop the smaller ones (a store that dirtied little may still fit);
    /// the first failure is returned.
    pub fn fill(&mut self, img: &dyn ImageMetadata, needs: &[u64]) -> Result<()> {
        let cs = img.cluster_size();
        let mut needs: Vec<u64> = needs.iter().copied().filter(|&n| n > 0).collect();
        needs.sort_unstable_by(|a, b| b.cmp(a));
        let mut held = std::mem::take(&mut self.runs);
        let mut missing = Vec::new();
        for &n in &needs {
            match best_fit(&held, n) {
                Some(i) => self.runs.push(split(&mut held, i, n, cs)),
                None => missing.push(n),
            }
        }
        crate::store::free_allocated(img, &held);
        let mut first_err = None;
        for n in missing {
            let got = img.allocate_clusters(n).and_then(|off| {
                img.preallocate_owned(off, n * cs)
                    .map(|()| off)
                    .inspect_err(|_| crate::store::free_allocated(img, &[(off.get(), n)]))
            });
            match got {
                Ok(off) => self.runs.push((off.get(), n)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e.into()),
        }
    }

    /// Hands out `n` contiguous clusters (from the smallest run that has them), or
    /// `None`.
    pub fn take(&mut self, n: u64, cs: u64) -> Option<u64> {
        if n == 0 {
            return None;
        }
        let i = best_fit(&self.runs, n)?;
        Some(split(&mut self.runs, i, n, cs).0)
    }

    /// Frees every cluster held.
    pub fn release(&mut self, img: &dyn ImageMetadata) {
        crate::store::free_allocated(img, &std::mem::take(&mut self.runs));
    }
}

/// Index of the smallest run of at least `n` clusters.
fn best_fit(runs: &[(u64, u64)], n: u64) -> Option<usize> {
    runs.iter()
        .enumerate()
        .filter(|(_, r)| r.1 >= n)
        .min_by_key(|(_, r)| r.1)
        .map(|(i, _)| i)
}

/// Takes the first `n` clusters of run `i` (which has at least `n`), leaving the rest.
fn split(runs: &mut Vec<(u64, u64)>, i: usize, n: u64, cs: u64) -> (u64, u64) {
    let (off, len) = runs[i];
    if len == n {
        runs.swap_remove(i);
    } else {
        runs[i] = (off + n * cs, len - n);
    }
    (off, n)
}

/// Allocates `n` clusters for a store: from the reserve when it has them, else from the
/// image.
pub(crate) fn allocate(
    img: &dyn ImageMetadata,
    reserve: &mut Reserve,
    n: u64,
) -> qcow2::Result<u64> {
    match reserve.take(n, img.cluster_size()) {
        Some(off) => Ok(off),
        None => Ok(img.allocate_clusters(n)?.get()),
    }
}

impl Bitmaps {
    /// Locks the reserve (after the state lock, if that is taken too).
    pub(crate) fn lock_reserve(&self) -> MutexGuard<'_, Reserve> {
        self.reserve.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bitmaps are in use on disk from now on: keep a reserve for their store, and fill
    /// it (when the set was opened with [`crate::OpenOptions::reserve`]).
    pub(crate) fn start_reserve(&self, img: &dyn ImageMetadata, st: &State) {
        if !self.reserve_enabled || self.read_only {
            return;
        }
        self.lock_reserve().active = true;
        self.refill(img, st);
    }

    /// Tops the reserve up to the worst case of a store of `st` (while one is kept). A
    /// failure is recorded ([`Bitmaps::reserve_error`]), never returned: the next store
    /// may then need new space.
    pub(crate) fn refill(&self, img: &dyn ImageMetadata, st: &State) {
        let mut rs = self.lock_reserve();
        if !rs.active {
            return;
        }
        let before = rs.clusters();
        let filled = worst_case(st, self.disk_size, self.cluster_size)
            .and_then(|needs| rs.fill(img, &needs));
        let cs = self.cluster_size;
        match filled {
            Ok(()) => {
                rs.error = None;
                let now = rs.clusters();
                if now != before && now > 0 {
                    log::info!(
                        "reserved {now} cluster(s) ({} bytes) in '{}' for storing its \
                         persistent bitmaps (every bit set), so that a full file system \
                         cannot fail their store",
                        now * cs,
                        self.node
                    );
                }
            }
            Err(e) => {
                log::debug!(
                    "could not reserve the space a store of the bitmaps of '{}' needs: {e} \
                     ({} cluster(s) held)",
                    self.node,
                    rs.clusters()
                );
                rs.error = Some(e.to_string());
            }
        }
    }

    /// Bytes reserved for storing the bitmaps (see [`crate::OpenOptions::reserve`]).
    pub fn reserved_bytes(&self) -> u64 {
        self.lock_reserve().clusters() * self.cluster_size
    }

    /// Why the last attempt to fill the store reserve failed (`None` after a successful
    /// one): a store on a full file system may then fail.
    pub fn reserve_error(&self) -> Option<String> {
        self.lock_reserve().error.clone()
    }

    /// Frees the store reserve and keeps none until bitmaps are flagged in use again
    /// ([`Bitmaps::mark_in_use_again`]). [`Bitmaps::store`] does this itself when it
    /// succeeds; call it when closing the set after a failed store.
    pub fn release_reserve(&self, img: &dyn ImageMetadata) {
        let mut rs = self.lock_reserve();
        rs.active = false;
        rs.release(img);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_splits_the_smallest_run_that_fits() {
        let cs = 512;
        let mut r = Reserve {
            runs: vec![(10 * cs, 4), (20 * cs, 1), (30 * cs, 2)],
            ..Reserve::default()
        };
        assert_eq!(r.take(1, cs), Some(20 * cs));
        assert_eq!(
            r.take(1, cs),
            Some(30 * cs),
            "the run of 2, not the run of 4"
        );
        assert_eq!(r.take(3, cs), Some(10 * cs));
        assert_eq!(
            r.take(2, cs),
            None,
            "two single clusters are not contiguous"
        );
        assert_eq!(r.take(1, cs), Some(13 * cs));
        assert_eq!(r.take(1, cs), Some(31 * cs));
        assert_eq!(r.take(1, cs), None);
        assert_eq!(r.take(0, cs), None);
        assert_eq!(r.clusters(), 0);
    }

    #[test]
    fn best_fit_serves_every_store_within_the_worst_case() {
        // Every order of demands, each at most its own run, is served from runs shaped
        // like the worst case.
        let shape = [5u64, 1, 3, 1, 2, 1, 1];
        let cs = 512;
        for mask in 0..(1u32 << shape.len()) {
            // Each demand either its full run or one cluster, in both orders.
            let demands: Vec<u64> = shape
                .iter()
                .enumerate()
                .map(|(i, &n)| if mask & (1 << i) != 0 { n } else { 1 })
                .collect();
            for rev in [false, true] {
                let mut r = Reserve {
                    runs: shape
                        .iter()
                        .enumerate()
                        .map(|(i, &n)| ((100 * i as u64) * cs, n))
                        .collect(),
                    ..Reserve::default()
                };
                let mut d = demands.clone();
                if rev {
                    d.reverse();
                }
                for n in d {
                    assert!(r.take(n, cs).is_some(), "{demands:?} rev={rev}");
                }
            }
        }
    }
}
