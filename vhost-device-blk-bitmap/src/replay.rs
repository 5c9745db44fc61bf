//! Descriptor chains for requests to resubmit after a restart.
//!
//! virtio-queue hands out chains only through a ring's avail entries, and the guest's
//! avail slots of requests that were in flight may have been reused (completions are
//! out of order). So the heads to resubmit are placed in a private avail ring of a
//! private queue that shares the guest's descriptor table; its rings live in one
//! anonymous region mapped past the end of guest memory, in a copy of the memory map
//! that only these chains use. The chains read their descriptors and buffers from guest
//! memory exactly as chains popped from the guest's own ring do (same bounds checks, same
//! dirty logging), and are completed in the guest's used ring.

use std::io;
use std::sync::Arc;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use crate::transport::GuestMem;

/// Guest memory extended with the private rings, and the chains of the heads to
/// resubmit, in the order given.
pub struct Replay {
    /// The memory the chains were built with (keeps the private region mapped).
    pub mem: Arc<GuestMem>,
    /// The heads' chains.
    pub chains: Vec<DescriptorChain<Arc<GuestMem>>>,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let heads: Vec<u16> = self.chains.iter().map(|c| c.head_index()).collect();
        f.debug_struct("Replay").field("heads", &heads).finish()
    }
}

/// Builds the chains of `heads` over the descriptor table at `desc_table` of a queue of
/// `queue_size` descriptors in `mem`.
pub fn chains(
    mem: &Arc<GuestMem>,
    desc_table: u64,
    queue_size: u16,
    heads: &[u16],
) -> io::Result<Replay> {
    let err = |what: &str| io::Error::other(format!("resubmitting in-flight requests: {what}"));
    if heads.len() > usize::from(queue_size) || queue_size == 0 {
        return Err(err("more requests than the queue has descriptors"));
    }
    if let Some(h) = heads.iter().find(|&&h| h >= queue_size) {
        return Err(err(&format!(
            "descriptor {h} is past the queue's {queue_size}"
        )));
    }
    let n = usize::from(queue_size);
    let avail_len = (4 + 2 * n + 2) as u64;
    let used_len = (4 + 8 * n + 2) as u64;
    let avail_at = 0u64;
    let used_at = avail_len.next_multiple_of(4096);
    let len = (used_at + used_len).next_multiple_of(4096);
    let end = mem.last_addr().raw_value();
    let base = end
        .checked_add(1)
        .and_then(|e| e.checked_next_multiple_of(4096))
        .filter(|b| b.checked_add(len).is_some())
        .ok_or_else(|| err("no guest address left for the private rings"))?;
    let region =
        GuestRegionMmap::<BitmapMmapRegion>::from_range(GuestAddress(base), len as usize, None)
            .map_err(|e| err(&format!("mapping the private rings: {e}")))?;
    let extended = Arc::new(
        mem.insert_region(Arc::new(region))
            .map_err(|e| err(&format!("extending the memory map: {e}")))?,
    );
    let avail = base + avail_at;
    for (i, &head) in heads.iter().enumerate() {
        extended
            .write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * i as u64))
            .map_err(|e| err(&e.to_string()))?;
    }
    extended
        .write_obj((heads.len() as u16).to_le(), GuestAddress(avail + 2))
        .map_err(|e| err(&e.to_string()))?;
    let mut queue = Queue::new(queue_size).map_err(|e| err(&e.to_string()))?;
    queue.set_size(queue_size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(desc_table);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(base + used_at);
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(true);
    if !queue.is_valid(&*extended) {
        return Err(err("the descriptor table is not in guest memory"));
    }
    let mut chains = Vec::with_capacity(heads.len());
    while let Some(chain) = queue.pop_descriptor_chain(extended.clone()) {
        chains.push(chain);
    }
    if chains.len() != heads.len() {
        return Err(err("the private ring did not give every head back"));
    }
    Ok(Replay {
        mem: extended,
        chains,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(len: usize) -> Arc<GuestMem> {
        Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), len)]).unwrap())
    }

    /// Writes descriptor `i` of the table at 0: (addr, len, flags, next).
    fn desc(mem: &GuestMem, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let d = 16 * i;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    #[test]
    fn chains_follow_the_guest_table_for_the_given_heads() {
        let mem = guest(1 << 20);
        desc(&mem, 2, 0x8000, 16, 1, 3);
        desc(&mem, 3, 0x9000, 1, 2, 0);
        desc(&mem, 5, 0xa000, 512, 0, 0);
        let r = chains(&mem, 0, 8, &[5, 2]).unwrap();
        assert_eq!(r.chains.len(), 2);
        assert_eq!(r.chains[0].head_index(), 5);
        assert_eq!(r.chains[1].head_index(), 2);
        let descs: Vec<_> = r.chains[1].clone().map(|d| (d.addr().0, d.len())).collect();
        assert_eq!(descs, vec![(0x8000, 16), (0x9000, 1)]);
        // The guest's memory is not touched and its map is unchanged.
        assert_eq!(mem.num_regions(), 1);
        assert!(r.mem.num_regions() == 2);
        let none = chains(&mem, 0, 8, &[]).unwrap();
        assert!(none.chains.is_empty());
    }

    #[test]
    fn bad_heads_and_tables_are_errors() {
        let mem = guest(1 << 16);
        assert!(chains(&mem, 0, 8, &[8]).is_err());
        assert!(chains(&mem, 0, 2, &[0, 1, 1]).is_err());
        assert!(chains(&mem, 1 << 20, 8, &[0]).is_err());
    }
}
