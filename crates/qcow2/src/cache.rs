//! A bounded write-back cache of cluster-sized metadata tables (L2 tables, refcount
//! blocks), keyed by host offset. The caller decides when dirty tables are written, so
//! it can keep QEMU's write orders.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::HostOffset;

#[derive(Debug)]
struct Slot {
    data: Box<[u8]>,
    dirty: bool,
    /// Clock value of the last use (atomic: shared lookups record uses too).
    used: AtomicU64,
}

/// Cached tables with least-recently-used eviction of clean entries.
#[derive(Debug)]
pub(crate) struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    clock: AtomicU64,
}

impl TableCache {
    /// A cache of at most `capacity` tables (at least 4).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(4),
            clock: AtomicU64::new(0),
        }
    }

    /// Whether `offset` is cached.
    pub fn contains(&self, offset: HostOffset) -> bool {
        self.slots.contains_key(&offset.0)
    }

    /// Whether inserting one more table needs a dirty one written back first.
    pub fn needs_writeback(&self) -> bool {
        self.slots.len() >= self.capacity && self.slots.values().all(|s| s.dirty)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Relaxed) + 1
    }

    /// The table at `offset`, marking it used (callable under a shared lock).
    pub fn get(&self, offset: HostOffset) -> Option<&[u8]> {
        self.slots.get(&offset.0).map(|s| {
            s.used.store(self.tick(), Relaxed);
            &*s.data
        })
    }

    /// The table at `offset` for modification; it becomes dirty.
    pub fn get_mut(&mut self, offset: HostOffset) -> Option<&mut [u8]> {
        let clock = self.tick();
        self.slots.get_mut(&offset.0).map(|s| {
            s.used.store(clock, Relaxed);
            s.dirty = true;
            &mut *s.data
        })
    }

    /// Inserts a table. When the cache is full, the least recently used quarter of the
    /// clean tables is evicted at once (so eviction costs O(log n) per insert, amortized).
    /// Callers check [`Self::needs_writeback`] first.
    pub fn insert(&mut self, offset: HostOffset, data: Box<[u8]>, dirty: bool) {
        if self.slots.len() >= self.capacity && !self.slots.contains_key(&offset.0) {
            let mut clean: Vec<(u64, u64)> = self
                .slots
                .iter()
                .filter(|(_, s)| !s.dirty)
                .map(|(k, s)| (s.used.load(Relaxed), *k))
                .collect();
            let n = (self.capacity / 4).clamp(1, clean.len().max(1));
            if !clean.is_empty() {
                if n < clean.len() {
                    clean.select_nth_unstable(n);
                }
                for (_, k) in clean.iter().take(n) {
                    self.slots.remove(k);
                }
            }
        }
        let used = AtomicU64::new(self.tick());
        self.slots.insert(offset.0, Slot { data, dirty, used });
    }

    /// Offsets of dirty tables, in ascending order.
    pub fn dirty_offsets(&self) -> Vec<HostOffset> {
        let mut v: Vec<_> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| HostOffset(*k))
            .collect();
        v.sort_unstable();
        v
    }

    /// The bytes of a dirty table to write, without changing its state.
    pub fn peek(&self, offset: HostOffset) -> Option<&[u8]> {
        self.slots.get(&offset.0).map(|s| &*s.data)
    }

    /// Marks a table clean after it was written.
    pub fn mark_clean(&mut self, offset: HostOffset) {
        if let Some(s) = self.slots.get_mut(&offset.0) {
            s.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_clean_table() {
        let mut c = TableCache::new(4);
        for i in 0..4 {
            c.insert(HostOffset(i), vec![i as u8].into(), false);
        }
        c.get(HostOffset(0));
        c.insert(HostOffset(9), vec![9].into(), false);
        assert!(c.contains(HostOffset(0)));
        assert!(!c.contains(HostOffset(1)));
    }

    #[test]
    fn never_evicts_dirty_tables() {
        let mut c = TableCache::new(4);
        for i in 0..4 {
            c.insert(HostOffset(i), vec![0].into(), true);
        }
        assert!(c.needs_writeback());
        assert_eq!(c.dirty_offsets().len(), 4);
        c.mark_clean(HostOffset(2));
        assert!(!c.needs_writeback());
        c.insert(HostOffset(7), vec![0].into(), false);
        assert!(!c.contains(HostOffset(2)));
    }
}
