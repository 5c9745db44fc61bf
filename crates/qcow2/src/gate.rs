//! The free gate: a host cluster that the metadata no longer references is handed out
//! again only after every data request that might still be using it has finished.
//!
//! A request enters the gate *before* it looks its mapping up and leaves it when its
//! data I/O completed. Requests are counted per epoch (two counters, used alternately).
//! A cluster freed while the epoch is `f` can only be in use by requests that entered in
//! epoch `f` or earlier; the epoch moves on only once the counter of the epoch before the
//! current one is empty, so once the epoch reaches `f + 2` every such request is gone.
//! Nothing ever waits here: frees that are not yet safe simply stay queued.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

/// Counts data requests in flight per epoch.
#[derive(Debug, Default)]
pub(crate) struct IoGate {
    epoch: AtomicU64,
    active: [AtomicU64; 2],
}

/// Held by one data request from before its mapping lookup until its I/O completed.
#[derive(Debug)]
pub struct IoTicket {
    gate: Arc<IoGate>,
    slot: usize,
}

impl IoGate {
    /// Enters the gate in the current epoch.
    pub fn enter(self: &Arc<Self>) -> IoTicket {
        loop {
            let e = self.epoch.load(SeqCst);
            let slot = (e & 1) as usize;
            self.active[slot].fetch_add(1, SeqCst);
            // The epoch moved between the load and the count: count in the new one.
            if self.epoch.load(SeqCst) == e {
                return IoTicket {
                    gate: self.clone(),
                    slot,
                };
            }
            self.active[slot].fetch_sub(1, SeqCst);
        }
    }

    /// The current epoch (tag for a free queued now).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Moves the epoch on as far as the requests in flight allow (at most two steps) and
    /// returns it. Callers serialize (they hold the metadata lock).
    pub fn advance(&self) -> u64 {
        for _ in 0..2 {
            let e = self.epoch.load(SeqCst);
            // The slot the next epoch uses is the one of the epoch before this one.
            if self.active[((e + 1) & 1) as usize].load(SeqCst) != 0 {
                break;
            }
            self.epoch.store(e + 1, SeqCst);
        }
        self.epoch.load(SeqCst)
    }

    /// Whether a free tagged `tag` is safe at epoch `now`.
    pub fn is_safe(tag: u64, now: u64) -> bool {
        tag + 2 <= now
    }
}

impl Drop for IoTicket {
    fn drop(&mut self) {
        self.gate.active[self.slot].fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frees_wait_for_requests_that_entered_before() {
        let g = Arc::new(IoGate::default());
        let old = g.enter();
        let tag = g.epoch();
        // The request that might use the freed cluster is still in flight.
        let now = g.advance();
        assert!(!IoGate::is_safe(tag, now), "epoch {now}");
        // A request entering after the free cannot use the cluster: it does not hold
        // the free back.
        let young = g.enter();
        drop(old);
        let now = g.advance();
        assert!(IoGate::is_safe(tag, now), "epoch {now}");
        // A free queued while `young` is in flight waits for it.
        let tag2 = g.epoch();
        assert!(!IoGate::is_safe(tag2, g.advance()));
        drop(young);
        assert!(IoGate::is_safe(tag2, g.advance()));
    }

    #[test]
    fn idle_gate_advances_two_steps() {
        let g = Arc::new(IoGate::default());
        let tag = g.epoch();
        assert!(IoGate::is_safe(tag, g.advance()));
    }

    #[test]
    fn concurrent_enter_and_advance_keep_counts_balanced() {
        let g = Arc::new(IoGate::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        drop(g.enter());
                    }
                })
            })
            .collect();
        for _ in 0..20_000 {
            g.advance();
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(g.active[0].load(SeqCst) + g.active[1].load(SeqCst), 0);
    }
}
