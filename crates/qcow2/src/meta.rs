//! The mutable metadata of an open image: header, L1 table, L2 and refcount-block caches,
//! the pending-free list, and the write-back order that keeps the image consistent on
//! disk at every moment.
//!
//! Crash-safety rules enforced here (a kill at any point may leak clusters, never
//! corrupt):
//! 1. A refcount increment reaches the disk (and is synced) before any L1/L2/header
//!    entry that references the cluster: [`Meta::writeback`] writes refcount blocks,
//!    syncs, and only then writes L2 tables and the L1 table.
//! 2. An L2 table's contents reach the disk before the L1 entry that points at it
//!    (L2 tables are written, synced, then L1).
//! 3. A refcount decrement is applied only after every table that dropped the
//!    reference has been written and synced: frees are queued in `pending_frees` and
//!    applied by [`Meta::apply_pending_frees`] after a write-back.
//! 4. A freed cluster is handed out again only once no data request that could still
//!    use it is in flight: every queued free carries the [`IoGate`] epoch it was queued
//!    in and waits in `pending_frees` until that epoch is safe.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use crate::cache::TableCache;
use crate::direct::{Waiters, Waker};
use crate::error::{Error, IoContext, Result};
use crate::gate::IoGate;
use crate::header::Header;
use crate::{HostOffset, Storage};

/// L1/L2 entry: host offset bits.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry reserved bits.
pub(crate) const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry reserved bits (standard cluster).
pub(crate) const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Refcount is exactly one: may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
/// Compressed cluster descriptor.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Reads as zeros (v3).
pub(crate) const ZERO: u64 = 1;
/// Refcount table entry offset bits.
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Host byte offset and length in bytes of a compressed cluster descriptor.
pub(crate) fn compressed_extent(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let off = entry & ((1u64 << x) - 1);
    let sectors = ((entry >> x) & ((1u64 << (62 - x)) - 1)) + 1;
    (off, sectors * 512 - (off & 511))
}

/// What an L2 entry says about one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `Some(offset)` when a host cluster stays preallocated.
    Zero(Option<HostOffset>, bool),
    /// Data at a host cluster; `copied` = refcount is one.
    Normal(HostOffset, bool),
    /// Compressed data: host byte offset and length in bytes.
    Compressed(HostOffset, u64),
}

/// Everything guarded by the image's metadata lock.
#[derive(Debug)]
pub(crate) struct Meta {
    pub storage: Arc<dyn Storage>,
    pub header: Header,
    pub cluster_bits: u32,
    pub l1: Vec<u64>,
    pub l1_dirty: BTreeSet<usize>,
    pub l2_cache: TableCache,
    pub reftable: Vec<u64>,
    /// Refcount table entries changed in memory, not yet written.
    pub reftable_dirty: BTreeSet<usize>,
    pub rb_cache: TableCache,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// One past the highest cluster index ever allocated or present in the file.
    pub alloc_end: u64,
    /// Clusters whose refcount drops by one once the tables are durable and no request
    /// can still use them: `(first cluster, count, gate epoch when queued)`.
    pub pending_frees: Vec<(u64, u64, u64)>,
    /// The data requests in flight (see [`IoGate`]).
    pub gate: Arc<IoGate>,
    /// Guest clusters whose allocating write is in flight: another write, write-zeroes
    /// or discard touching them waits (gets Busy) until it is published.
    pub inflight: HashSet<u64>,
    /// Requests that got Busy, woken when an allocation finishes.
    pub waiters: Waiters,
    /// Refcount structures were written since the last sync.
    pub refcounts_unsynced: bool,
    /// Set once metadata was found inconsistent: writes are refused.
    pub corrupt: Option<String>,
}

impl Meta {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    fn refcount_bits(&self) -> u32 {
        self.header.refcount_bits()
    }

    /// Refcount entries per refcount block.
    pub fn rb_entries(&self) -> u64 {
        self.cluster_size() * 8 / u64::from(self.refcount_bits())
    }

    pub fn corrupt(&mut self, msg: String) -> Error {
        log::error!("qcow2: marking image as corrupt: {msg}");
        self.corrupt = Some(msg.clone());
        Error::Corrupt(msg)
    }

    fn check_host_cluster(&mut self, what: &str, off: u64) -> Result<HostOffset> {
        if off & (self.cluster_size() - 1) != 0 {
            return Err(self.corrupt(format!("{what} offset {off:#x} unaligned")));
        }
        Ok(HostOffset(off))
    }

    // ---- header -------------------------------------------------------------------

    /// Writes the header area (cluster 0 up to the end of the backing file name).
    pub fn write_header(&mut self) -> Result<()> {
        let buf = self.header.serialize()?;
        self.storage
            .write_at(&buf, 0)
            .ctx(|| "writing the qcow2 header".into())
    }

    pub fn sync(&mut self) -> Result<()> {
        self.storage.sync().ctx(|| "syncing the image".into())?;
        self.refcounts_unsynced = false;
        Ok(())
    }

    // ---- refcounts ----------------------------------------------------------------

    fn refblock_of(&self, cluster: u64) -> Option<HostOffset> {
        let t = cluster / self.rb_entries();
        let e = *self.reftable.get(t as usize)?;
        let off = e & REFT_OFFSET_MASK;
        (off != 0).then_some(HostOffset(off))
    }

    fn load_refblock(&mut self, off: HostOffset) -> Result<()> {
        if self.rb_cache.contains(off) {
            return Ok(());
        }
        if self.rb_cache.needs_writeback() {
            self.write_refblocks()?;
        }
        let mut buf = vec![0u8; self.cluster_size() as usize].into_boxed_slice();
        self.storage
            .read_at(&mut buf, off.0)
            .ctx(|| format!("reading refcount block at {off}"))?;
        self.rb_cache.insert(off, buf, false);
        Ok(())
    }

    fn rb_get(bits: u32, block: &[u8], idx: u64) -> u64 {
        if bits < 8 {
            let bit = idx * u64::from(bits);
            let byte = block[(bit / 8) as usize];
            (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
        } else {
            let w = (bits / 8) as usize;
            let at = idx as usize * w;
            block[at..at + w]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
    }

    fn rb_set(bits: u32, block: &mut [u8], idx: u64, val: u64) {
        if bits < 8 {
            let bit = idx * u64::from(bits);
            let mask = ((1u16 << bits) - 1) as u8;
            let b = &mut block[(bit / 8) as usize];
            let sh = bit % 8;
            *b = (*b & !(mask << sh)) | (((val as u8) & mask) << sh);
        } else {
            let w = (bits / 8) as usize;
            let at = idx as usize * w;
            let bytes = val.to_be_bytes();
            block[at..at + w].copy_from_slice(&bytes[8 - w..]);
        }
    }

    /// The refcount of a host cluster (0 when no refcount block covers it).
    pub fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let Some(rb) = self.refblock_of(cluster) else {
            return Ok(0);
        };
        self.load_refblock(rb)?;
        let bits = self.refcount_bits();
        let idx = cluster % self.rb_entries();
        Ok(Self::rb_get(bits, self.rb_cache.get(rb).unwrap(), idx))
    }

    fn set_refcount(&mut self, cluster: u64, val: u64) -> Result<()> {
        let bits = self.refcount_bits();
        if bits < 64 && val >> bits != 0 {
            return Err(Error::Unsupported(format!(
                "refcount of cluster {cluster} would exceed {bits} bits"
            )));
        }
        let Some(rb) = self.refblock_of(cluster) else {
            return Err(self.corrupt(format!("no refcount block covers cluster {cluster}")));
        };
        self.load_refblock(rb)?;
        let idx = cluster % self.rb_entries();
        Self::rb_set(bits, self.rb_cache.get_mut(rb).unwrap(), idx, val);
        Ok(())
    }

    /// Sets the refcount of `cluster` to `val` in one store (repairs).
    pub fn set_refcount_to(&mut self, cluster: u64, val: u64) -> Result<()> {
        self.set_refcount(cluster, val)?;
        if val == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Adds `delta` (+1 or -1) to the refcount of `count` clusters from `cluster`.
    pub fn update_refcounts(&mut self, cluster: u64, count: u64, delta: i64) -> Result<()> {
        for c in cluster..cluster + count {
            let r = self.refcount(c)?;
            let n = match r.checked_add_signed(delta) {
                Some(n) => n,
                None => {
                    return Err(
                        self.corrupt(format!("refcount of cluster {c} would drop below zero"))
                    )
                }
            };
            self.set_refcount(c, n)?;
            if n == 0 && c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(())
    }

    /// Writes every dirty refcount block, then (after a sync, so the blocks they point
    /// at are durable) the refcount table entries of new blocks.
    pub fn write_refblocks(&mut self) -> Result<()> {
        for off in self.rb_cache.dirty_offsets() {
            let data = self.rb_cache.peek(off).unwrap();
            self.storage
                .write_at(data, off.0)
                .ctx(|| format!("writing refcount block at {off}"))?;
            self.rb_cache.mark_clean(off);
            self.refcounts_unsynced = true;
        }
        if !self.reftable_dirty.is_empty() {
            self.sync()?;
            // An entry stays pending until its write succeeded: after an error the
            // next write-back retries it (and nothing that depends on it is written).
            while let Some(&t) = self.reftable_dirty.first() {
                let entry = self.reftable[t].to_be_bytes();
                self.storage
                    .write_at(&entry, self.header.refcount_table_offset + t as u64 * 8)
                    .ctx(|| "writing a refcount table entry".into())?;
                self.reftable_dirty.remove(&t);
            }
            self.refcounts_unsynced = true;
        }
        Ok(())
    }

    /// Finds `n` consecutive clusters with refcount 0 at or after the free hint.
    fn find_free_run(&mut self, n: u64) -> Result<u64> {
        let e = self.rb_entries();
        let mut start = self.free_hint.max(1);
        let mut c = start;
        let mut first_free = None;
        loop {
            if c - start == n {
                // Everything before the first free cluster seen is in use.
                self.free_hint = first_free.unwrap_or(start);
                return Ok(start);
            }
            if self.refblock_of(c).is_none() {
                // A whole uncovered block is free.
                first_free.get_or_insert(c);
                let block_end = (c / e + 1) * e;
                c = block_end.min(start + n);
                continue;
            }
            if self.refcount(c)? == 0 {
                first_free.get_or_insert(c);
                c += 1;
            } else {
                c += 1;
                start = c;
            }
        }
    }

    /// The refcount block indices that no table entry has yet, for the area
    /// `[start, start + k + len)` where `k` new blocks are placed at `start` followed by
    /// `len` clusters (a fixed point: the new blocks must be counted too).
    fn missing_refblocks(&self, start: u64, len: u64) -> Vec<u64> {
        let e = self.rb_entries();
        let mut k = 0usize;
        loop {
            let end = start + k as u64 + len;
            let missing: Vec<u64> = (start / e..=(end - 1) / e)
                .filter(|&b| {
                    self.reftable
                        .get(b as usize)
                        .is_none_or(|x| x & REFT_OFFSET_MASK == 0)
                })
                .collect();
            if missing.len() == k {
                return missing;
            }
            k = missing.len();
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the first index.
    ///
    /// Clusters no refcount block covers count as free. When the run needs new refcount
    /// blocks, they are placed right before it (so they never split it) and count
    /// themselves; their table entries are written by the next write-back.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Error::InvalidImage("zero-cluster allocation".into()));
        }
        let mut extra = 0u64;
        loop {
            let start = self.find_free_run(n + extra)?;
            // New blocks go first, so they must count themselves too.
            let missing = self.missing_refblocks(start, n);
            let m = missing.len() as u64;
            if m > extra {
                // The free run is too short to hold the new blocks too: look again.
                extra = m;
                continue;
            }
            if let Some(&max) = missing.last() {
                if max as usize >= self.reftable.len() {
                    self.grow_reftable(max)?;
                    // Growing allocated clusters and maybe blocks: start over.
                    continue;
                }
            }
            self.place_refblocks(start, &missing)?;
            let first = start + m;
            for c in first..first + n {
                self.set_refcount(c, 1)?;
            }
            if (start..first + n).contains(&self.free_hint) {
                self.free_hint = first + n;
            }
            self.alloc_end = self.alloc_end.max(first + n);
            return Ok(first);
        }
    }

    /// Writes new refcount blocks for block indices `blocks` at clusters `at..`, each
    /// counting whichever of the new blocks it covers.
    fn place_refblocks(&mut self, at: u64, blocks: &[u64]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let e = self.rb_entries();
        let bits = self.refcount_bits();
        let m = blocks.len() as u64;
        // Clusters no refcount block covers count as free: a crafted image may keep
        // metadata there, which the new blocks must not overwrite.
        self.check_fresh(at * cs, m * cs)?;
        for (i, &b) in blocks.iter().enumerate() {
            let mut block = vec![0u8; cs as usize].into_boxed_slice();
            for y in at..at + m {
                if y / e == b {
                    Self::rb_set(bits, &mut block, y % e, 1);
                }
            }
            let x = at + i as u64;
            self.storage
                .write_at(&block, x * cs)
                .ctx(|| "writing a new refcount block".into())?;
            self.refcounts_unsynced = true;
            if self.rb_cache.needs_writeback() {
                self.write_refblocks()?;
            }
            self.rb_cache.insert(HostOffset(x * cs), block, false);
            // The table entry is written by the next write-back, after a sync has made
            // the block durable.
            self.reftable[b as usize] = x * cs;
            self.reftable_dirty.insert(b as usize);
        }
        // New blocks that an existing block covers are counted there.
        for y in at..at + m {
            if !blocks.contains(&(y / e)) {
                self.set_refcount(y, 1)?;
            }
        }
        self.alloc_end = self.alloc_end.max(at + m);
        Ok(())
    }

    /// Replaces the refcount table with a larger one that has an entry for block index
    /// `needed`. The new table and the refcount blocks that count it are placed past
    /// everything allocated, written, synced, and only then is the header switched.
    fn grow_reftable(&mut self, needed: u64) -> Result<()> {
        let cs = self.cluster_size();
        let e = self.rb_entries();
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let want_entries = (needed + 1).max(self.reftable.len() as u64 * 2);
        let mut t_clusters = (want_entries * 8).div_ceil(cs).max(old_clusters + 1);
        if t_clusters * cs > crate::header::MAX_REFTABLE_BYTES {
            t_clusters = crate::header::MAX_REFTABLE_BYTES / cs;
            if t_clusters <= old_clusters || t_clusters * cs / 8 <= needed {
                return Err(Error::NoSpace(
                    "refcount table cannot grow any further".into(),
                ));
            }
        }
        let file_clusters = self
            .storage
            .len()
            .ctx(|| "reading image size".into())?
            .div_ceil(cs);
        let p = self.alloc_end.max(file_clusters);
        // The new blocks must cover the table and themselves.
        let new_blocks = self.missing_refblocks(p, t_clusters);
        let total_entries = t_clusters * cs / 8;
        if let Some(max) = new_blocks.iter().max() {
            if *max >= total_entries {
                return Err(Error::NoSpace(
                    "refcount table cannot grow any further".into(),
                ));
            }
        }
        let end = p + t_clusters + new_blocks.len() as u64;
        // Existing blocks that cover part of the new area get their counts via the cache.
        let mut new_table = self.reftable.clone();
        new_table.resize(total_entries as usize, 0);
        let bits = self.refcount_bits();
        for (i, b) in new_blocks.iter().enumerate() {
            let at = p + t_clusters + i as u64;
            new_table[*b as usize] = at * cs;
            let mut block = vec![0u8; cs as usize];
            for c in (b * e).max(p)..((b + 1) * e).min(end) {
                Self::rb_set(bits, &mut block, c % e, 1);
            }
            self.storage
                .write_at(&block, at * cs)
                .ctx(|| "writing a new refcount block".into())?;
        }
        let old_table = std::mem::replace(&mut self.reftable, new_table);
        for c in p..end {
            let b = c / e;
            if !new_blocks.contains(&b) {
                if let Err(err) = self.set_refcount(c, 1) {
                    self.reftable = old_table;
                    return Err(err);
                }
            }
        }
        self.write_refblocks()?;
        // The new table is written whole: no entry is pending any more.
        self.reftable_dirty.clear();
        let mut buf = Vec::with_capacity((t_clusters * cs) as usize);
        for x in &self.reftable {
            buf.extend_from_slice(&x.to_be_bytes());
        }
        self.storage
            .write_at(&buf, p * cs)
            .ctx(|| "writing the new refcount table".into())?;
        self.sync()?;
        let old_offset = self.header.refcount_table_offset;
        self.header.refcount_table_offset = p * cs;
        self.header.refcount_table_clusters = t_clusters as u32;
        self.write_header()?;
        self.sync()?;
        self.alloc_end = self.alloc_end.max(end);
        // The header no longer references the old table: free it now.
        self.update_refcounts(old_offset / cs, old_clusters, -1)?;
        Ok(())
    }

    /// Applies the queued refcount decrements that no request in flight can still
    /// depend on. Callers must have written back and synced the tables that dropped the
    /// references.
    pub fn apply_pending_frees(&mut self) -> Result<()> {
        let now = self.gate.advance();
        let frees = std::mem::take(&mut self.pending_frees);
        for (i, &(c, n, tag)) in frees.iter().enumerate() {
            if !IoGate::is_safe(tag, now) {
                self.pending_frees.push((c, n, tag));
                continue;
            }
            if let Err(e) = self.update_refcounts(c, n, -1) {
                self.pending_frees.extend_from_slice(&frees[i + 1..]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Queues the release of `count` clusters from `first` (see `apply_pending_frees`).
    pub fn queue_free(&mut self, first: u64, count: u64) {
        let tag = self.gate.epoch();
        self.pending_frees.push((first, count, tag));
    }

    // ---- L1 / L2 -----------------------------------------------------------------

    fn load_l2(&mut self, off: HostOffset) -> Result<()> {
        if self.l2_cache.contains(off) {
            return Ok(());
        }
        if self.l2_cache.needs_writeback() {
            self.writeback()?;
        }
        let mut buf = vec![0u8; self.cluster_size() as usize].into_boxed_slice();
        self.storage
            .read_at(&mut buf, off.0)
            .ctx(|| format!("reading L2 table at {off}"))?;
        self.l2_cache.insert(off, buf, false);
        Ok(())
    }

    /// The L2 table offset for L1 index `i` and whether it may be written in place.
    fn l2_table(&mut self, l1_index: u64) -> Result<Option<(HostOffset, bool)>> {
        let Some(&e) = self.l1.get(l1_index as usize) else {
            return Ok(None);
        };
        if e & L1E_RESERVED != 0 {
            return Err(self.corrupt(format!("L1 entry {l1_index} has reserved bits set")));
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let off = self.check_host_cluster("L2 table", off)?;
        if off.0 == 0 || off.0 < self.cluster_size() {
            return Err(self.corrupt(format!("L2 table at {off} overlaps the header")));
        }
        Ok(Some((off, e & COPIED != 0)))
    }

    /// The raw L2 entry for a guest cluster.
    pub fn l2_entry(&mut self, guest_cluster: u64) -> Result<u64> {
        let n = self.l2_entries();
        let Some((off, _)) = self.l2_table(guest_cluster / n)? else {
            return Ok(0);
        };
        self.load_l2(off)?;
        let idx = (guest_cluster % n) as usize * 8;
        let t = self.l2_cache.get(off).unwrap();
        Ok(u64::from_be_bytes(t[idx..idx + 8].try_into().unwrap()))
    }

    /// Decodes an L2 entry.
    pub fn decode(&mut self, entry: u64) -> Result<Mapping> {
        if entry & COMPRESSED != 0 {
            let (off, len) = compressed_extent(entry, self.cluster_bits);
            return Ok(Mapping::Compressed(HostOffset(off), len));
        }
        if entry & L2E_RESERVED != 0 {
            return Err(self.corrupt(format!("L2 entry {entry:#x} has reserved bits set")));
        }
        let off = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        if entry & ZERO != 0 && self.header.version >= 3 {
            let host = if off == 0 {
                None
            } else {
                Some(self.check_host_cluster("data cluster", off)?)
            };
            return Ok(Mapping::Zero(host, copied));
        }
        if off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let host = self.check_host_cluster("data cluster", off)?;
        if host.0 < self.cluster_size() {
            return Err(self.corrupt(format!("data cluster at {host} overlaps the header")));
        }
        Ok(Mapping::Normal(host, copied))
    }

    /// The mapping of a guest cluster from the caches alone, for lookups under a shared
    /// lock: `None` when its L2 table is not cached or anything about the entries needs
    /// the checks (and the corruption handling) of [`Meta::mapping`].
    pub fn peek_mapping(&self, guest_cluster: u64) -> Option<Mapping> {
        let cs = self.cluster_size();
        let n = self.l2_entries();
        let Some(&e) = self.l1.get((guest_cluster / n) as usize) else {
            return Some(Mapping::Unallocated);
        };
        let off = e & OFFSET_MASK;
        if e & L1E_RESERVED != 0 || off & (cs - 1) != 0 || (off != 0 && off < cs) {
            return None;
        }
        if off == 0 {
            return Some(Mapping::Unallocated);
        }
        let t = self.l2_cache.get(HostOffset(off))?;
        let idx = (guest_cluster % n) as usize * 8;
        let entry = u64::from_be_bytes(t.get(idx..idx + 8)?.try_into().ok()?);
        if entry & COMPRESSED != 0 {
            let (off, len) = compressed_extent(entry, self.cluster_bits);
            return Some(Mapping::Compressed(HostOffset(off), len));
        }
        let off = entry & OFFSET_MASK;
        if entry & L2E_RESERVED != 0 || off & (cs - 1) != 0 || (off != 0 && off < cs) {
            return None;
        }
        let host = (off != 0).then_some(HostOffset(off));
        let copied = entry & COPIED != 0;
        Some(match host {
            _ if entry & ZERO != 0 && self.header.version >= 3 => Mapping::Zero(host, copied),
            None => Mapping::Unallocated,
            Some(h) => Mapping::Normal(h, copied),
        })
    }

    /// The first guest cluster after `guest_cluster` whose L2 table could exist, when the
    /// L1 entry of `guest_cluster` has no table (every cluster up to it is unallocated).
    pub fn unmapped_until(&self, guest_cluster: u64) -> Option<u64> {
        let n = self.l2_entries();
        match self.l1.get((guest_cluster / n) as usize) {
            Some(&e) if e & OFFSET_MASK != 0 => None,
            Some(_) => Some((guest_cluster / n + 1) * n),
            None => Some(u64::MAX),
        }
    }

    pub fn mapping(&mut self, guest_cluster: u64) -> Result<Mapping> {
        let e = self.l2_entry(guest_cluster)?;
        self.decode(e)
    }

    /// Sets the L2 entry of a guest cluster, creating or copying its L2 table first.
    pub fn set_l2_entry(&mut self, guest_cluster: u64, entry: u64) -> Result<()> {
        let n = self.l2_entries();
        let l1_index = guest_cluster / n;
        if l1_index as usize >= self.l1.len() {
            return Err(Error::InvalidImage(
                "guest offset beyond the L1 table".into(),
            ));
        }
        let off = match self.l2_table(l1_index)? {
            Some((off, true)) => off,
            Some((old, false)) => {
                // Shared with a snapshot: copy the table.
                self.load_l2(old)?;
                let data: Box<[u8]> = self.l2_cache.get(old).unwrap().into();
                let new = self.alloc_table_cluster()?;
                self.insert_l2(new, data)?;
                self.queue_free(old.0 / self.cluster_size(), 1);
                self.set_l1(l1_index, new.0 | COPIED);
                new
            }
            None => {
                let new = self.alloc_table_cluster()?;
                let data = vec![0u8; self.cluster_size() as usize].into_boxed_slice();
                self.insert_l2(new, data)?;
                self.set_l1(l1_index, new.0 | COPIED);
                new
            }
        };
        self.load_l2(off)?;
        let idx = (guest_cluster % n) as usize * 8;
        let t = self.l2_cache.get_mut(off).unwrap();
        t[idx..idx + 8].copy_from_slice(&entry.to_be_bytes());
        Ok(())
    }

    /// Allocates a cluster for a new L2 table and gives it storage blocks at once, so that
    /// writing the table back later (at a flush, or when a bitmap store flushes) cannot
    /// fail for lack of space: a file system that filled up after the guest write that
    /// needed the table would otherwise lose its mapping. Out of space, the write that
    /// needs the table fails instead, and the cluster is given back.
    fn alloc_table_cluster(&mut self) -> Result<HostOffset> {
        let cs = self.cluster_size();
        let c = self.alloc_clusters(1)?;
        self.check_fresh(c * cs, cs)?;
        if let Err(e) = self
            .storage
            .zero_range(c * cs, cs)
            .ctx(|| format!("allocating an L2 table at {:#x}", c * cs))
        {
            self.update_refcounts(c, 1, -1)?;
            return Err(e);
        }
        Ok(HostOffset(c * cs))
    }

    fn insert_l2(&mut self, off: HostOffset, data: Box<[u8]>) -> Result<()> {
        if self.l2_cache.needs_writeback() {
            self.writeback()?;
        }
        self.l2_cache.insert(off, data, true);
        Ok(())
    }

    fn set_l1(&mut self, i: u64, e: u64) {
        self.l1[i as usize] = e;
        self.l1_dirty.insert(i as usize);
    }

    /// Queues the release of whatever host clusters an L2 entry referenced.
    pub fn release(&mut self, old: Mapping) {
        let cs = self.cluster_size();
        match old {
            Mapping::Normal(h, _) | Mapping::Zero(Some(h), _) => {
                self.queue_free(h.0 / cs, 1);
            }
            Mapping::Compressed(h, len) => {
                let first = h.0 / cs;
                let last = (h.0 + len - 1) / cs;
                self.queue_free(first, last - first + 1);
            }
            _ => {}
        }
    }

    // ---- write-back ----------------------------------------------------------------

    /// Writes every dirty table in the crash-safe order (refcounts, sync, L2 tables,
    /// sync, L1). Does not sync at the end.
    pub fn writeback(&mut self) -> Result<()> {
        self.write_refblocks()?;
        let l2_dirty = self.l2_cache.dirty_offsets();
        if (!l2_dirty.is_empty() || !self.l1_dirty.is_empty()) && self.refcounts_unsynced {
            self.sync()?;
        }
        for off in &l2_dirty {
            let data = self.l2_cache.peek(*off).unwrap();
            self.storage
                .write_at(data, off.0)
                .ctx(|| format!("writing L2 table at {off}"))?;
            self.l2_cache.mark_clean(*off);
        }
        if !self.l1_dirty.is_empty() {
            if !l2_dirty.is_empty() {
                self.sync()?;
            }
            self.write_l1()?;
        }
        Ok(())
    }

    fn write_l1(&mut self) -> Result<()> {
        // Write the 512-byte sectors that hold dirty entries.
        let sectors: BTreeSet<usize> = self.l1_dirty.iter().map(|i| i / 64).collect();
        for s in sectors {
            let first = s * 64;
            let last = (first + 64).min(self.l1.len());
            let mut buf = Vec::with_capacity(512);
            for e in &self.l1[first..last] {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            self.storage
                .write_at(&buf, self.header.l1_table_offset + first as u64 * 8)
                .ctx(|| "writing the L1 table".into())?;
        }
        self.l1_dirty.clear();
        Ok(())
    }

    /// Write-back, then the queued frees that are safe, then their refcount blocks.
    /// A data sync after this makes everything done so far durable.
    pub fn prepare_flush(&mut self) -> Result<()> {
        self.writeback()?;
        if !self.pending_frees.is_empty() {
            self.sync()?;
            self.apply_pending_frees()?;
            self.write_refblocks()?;
        }
        Ok(())
    }

    /// [`Meta::prepare_flush`] and a sync: everything done so far is durable.
    pub fn flush_all(&mut self) -> Result<()> {
        self.prepare_flush()?;
        self.sync()
    }

    /// Whether any guest cluster of `[first, first + count)` has an allocation in
    /// flight; if so, `waker` is queued to learn when one finishes.
    pub fn conflicts(&mut self, first: u64, count: u64, waker: &Waker) -> bool {
        if self.inflight.is_empty() || !(first..first + count).any(|c| self.inflight.contains(&c)) {
            return false;
        }
        self.waiters.0.push(waker.clone());
        true
    }

    // ---- overlap checks ----------------------------------------------------------

    /// Constant-time check (as QEMU's cached overlap checks) that a guest write about to
    /// go to host cluster `h` does not hit the header, the active L1 table or the
    /// refcount table; a hostile image whose L2 entries point there is marked corrupt.
    pub fn check_data_cluster(&mut self, h: HostOffset) -> Result<()> {
        if !self.data_cluster_ok(h) {
            return Err(self.corrupt(format!(
                "data cluster at {h} overlaps the header, L1 table or refcount table"
            )));
        }
        Ok(())
    }

    /// Checks clusters just allocated (for guest data or a new L2 table) against every
    /// metadata structure, as QEMU's overlap check does before a write: a crafted image
    /// whose refcounts call its own metadata free would otherwise get it overwritten.
    /// On a hit the image is marked corrupt.
    pub fn check_fresh(&mut self, off: u64, len: u64) -> Result<()> {
        if let Err(Error::Overlap { what, .. }) = self.overlap_check(off, len) {
            return Err(self.corrupt(format!(
                "Preventing invalid allocation of {len} bytes at {off:#x}: it overlaps {what} \
                 (its refcount says free)"
            )));
        }
        Ok(())
    }

    /// The test of [`Meta::check_data_cluster`], without marking anything.
    pub fn data_cluster_ok(&self, h: HostOffset) -> bool {
        let cs = self.cluster_size();
        let l1 = (
            self.header.l1_table_offset,
            u64::from(self.header.l1_size) * 8,
        );
        let rt = (
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
        );
        let hits = |(s, l): (u64, u64)| l != 0 && h.0 < s + l && s < h.0 + cs;
        !(h.0 < cs || hits(l1) || hits(rt))
    }

    /// Fails if `[off, off+len)` overlaps metadata the engine owns.
    pub fn overlap_check(&mut self, off: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let end = off.saturating_add(len);
        let hit = |s: u64, l: u64| l != 0 && off < s.saturating_add(l) && s < end;
        let fail = |what: &'static str| {
            Err(Error::Overlap {
                offset: off,
                len,
                what,
            })
        };
        if hit(0, cs) {
            return fail("the image header");
        }
        if hit(
            self.header.l1_table_offset,
            u64::from(self.header.l1_size) * 8,
        ) {
            return fail("the active L1 table");
        }
        if hit(
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
        ) {
            return fail("the refcount table");
        }
        if self
            .reftable
            .iter()
            .any(|e| e & REFT_OFFSET_MASK != 0 && hit(e & REFT_OFFSET_MASK, cs))
        {
            return fail("a refcount block");
        }
        if self
            .l1
            .iter()
            .any(|e| e & OFFSET_MASK != 0 && hit(e & OFFSET_MASK, cs))
        {
            return fail("an active L2 table");
        }
        if self.header.nb_snapshots > 0 && hit(self.header.snapshots_offset, cs) {
            return fail("the snapshot table");
        }
        // Like QEMU, the bitmap directory is guarded only while the extension is marked
        // consistent: the in-place in-use update rewrites it with autoclear bit 0 clear.
        let bitmaps_valid = self.header.autoclear_features & crate::AUTOCLEAR_BITMAPS != 0;
        if let Some(ext) = self
            .header
            .extension(crate::EXT_BITMAPS)
            .filter(|_| bitmaps_valid)
        {
            if ext.len() == 24 {
                let size = u64::from_be_bytes(ext[8..16].try_into().unwrap());
                let dir = u64::from_be_bytes(ext[16..24].try_into().unwrap());
                if hit(dir, size) {
                    return fail("the bitmap directory");
                }
            }
        }
        Ok(())
    }
}

/// Reads a whole file region (tables not in the caches).
pub(crate) fn read_exact_at(storage: &dyn Storage, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    storage
        .read_at(&mut v, off)
        .ctx(|| format!("reading metadata at {off:#x}"))?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width_roundtrip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / bits as u64;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for i in 0..entries {
                Meta::rb_set(bits, &mut block, i, (i * 7919) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    Meta::rb_get(bits, &block, i),
                    (i * 7919) & max,
                    "bits {bits}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_refcounts_are_lsb_first() {
        let mut block = vec![0u8; 2];
        Meta::rb_set(1, &mut block, 0, 1);
        Meta::rb_set(1, &mut block, 9, 1);
        assert_eq!(block, [0x01, 0x02]);
        let mut block = vec![0u8; 1];
        Meta::rb_set(4, &mut block, 1, 0xa);
        assert_eq!(block, [0xa0]);
    }
}
