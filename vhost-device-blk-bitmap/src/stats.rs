//! I/O statistics per queue, shaped after QEMU's `BlockDeviceStats` (what
//! `query-blockstats` reports). Counting costs a few relaxed atomic additions per request
//! on counters that only the queue's own worker thread writes.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Told about failed guest requests (the control socket turns them into
/// `BLOCK_IO_ERROR` events).
pub type ErrorSink = Box<dyn Fn(IoKind) + Send + Sync>;

/// The sink shared by every queue, with a rate limit.
#[derive(Default)]
struct Errors {
    sink: OnceLock<ErrorSink>,
    /// Nanoseconds since `epoch` of the last report.
    last: AtomicU64,
    epoch: OnceLock<Instant>,
}

impl std::fmt::Debug for Errors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Errors")
            .field("sink", &self.sink.get().is_some())
            .finish()
    }
}

/// At most this many error reports per second (a guest retrying a failing request
/// must not flood the control clients).
const ERROR_REPORTS_PER_SECOND: u64 = 10;

impl Errors {
    fn report(&self, kind: IoKind) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        let now = self.epoch.get_or_init(Instant::now).elapsed().as_nanos() as u64;
        let last = self.last.load(Relaxed);
        let gap = 1_000_000_000 / ERROR_REPORTS_PER_SECOND;
        if last != 0 && now.saturating_sub(last) < gap {
            return;
        }
        if self
            .last
            .compare_exchange(last, now.max(1), Relaxed, Relaxed)
            .is_ok()
        {
            sink(kind);
        }
    }
}

/// What a request was, for accounting (QEMU counts write-zeroes as writes and discards
/// as unmaps; we count write-zeroes separately too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// IN.
    Read,
    /// OUT.
    Write,
    /// FLUSH.
    Flush,
    /// DISCARD.
    Discard,
    /// WRITE_ZEROES.
    WriteZeroes,
}

/// One kind's counters.
#[derive(Debug, Default)]
pub struct Counter {
    /// Requests completed.
    pub ops: AtomicU64,
    /// Bytes of the disk they covered.
    pub bytes: AtomicU64,
    /// Total time from start to completion, in nanoseconds.
    pub total_ns: AtomicU64,
    /// Requests that completed with an error.
    pub failed: AtomicU64,
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Reads.
    pub read: Counter,
    /// Writes.
    pub write: Counter,
    /// Flushes.
    pub flush: Counter,
    /// Discards.
    pub discard: Counter,
    /// Write-zeroes.
    pub write_zeroes: Counter,
    /// Highest byte written + 1.
    pub wr_highest_offset: AtomicU64,
    errors: Arc<Errors>,
}

impl QueueStats {
    fn counter(&self, kind: IoKind) -> &Counter {
        match kind {
            IoKind::Read => &self.read,
            IoKind::Write => &self.write,
            IoKind::Flush => &self.flush,
            IoKind::Discard => &self.discard,
            IoKind::WriteZeroes => &self.write_zeroes,
        }
    }

    /// Accounts a completed request of `bytes` at guest `offset` started at `start`.
    pub fn record(&self, kind: IoKind, offset: u64, bytes: u64, start: Instant, ok: bool) {
        let c = self.counter(kind);
        c.ops.fetch_add(1, Relaxed);
        c.bytes.fetch_add(bytes, Relaxed);
        c.total_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
        if !ok {
            c.failed.fetch_add(1, Relaxed);
            self.errors.report(kind);
        }
        if ok && matches!(kind, IoKind::Write | IoKind::WriteZeroes) {
            self.wr_highest_offset
                .fetch_max(offset.saturating_add(bytes), Relaxed);
        }
    }
}

/// The counters of every queue of a device (they outlive connections).
#[derive(Debug)]
pub struct DeviceStats {
    queues: Vec<std::sync::Arc<QueueStats>>,
    errors: Arc<Errors>,
}

impl DeviceStats {
    /// Counters for `num_queues` queues.
    pub fn new(num_queues: usize) -> Self {
        let errors = Arc::new(Errors::default());
        DeviceStats {
            queues: (0..num_queues)
                .map(|_| {
                    Arc::new(QueueStats {
                        errors: errors.clone(),
                        ..Default::default()
                    })
                })
                .collect(),
            errors,
        }
    }

    /// Sets where failed requests are reported (once; later calls are ignored).
    pub fn on_error(&self, sink: ErrorSink) {
        let _ = self.errors.sink.set(sink);
    }

    /// Queue `q`'s counters (the last queue's for an index past the end).
    pub fn queue(&self, q: usize) -> std::sync::Arc<QueueStats> {
        self.queues[q.min(self.queues.len() - 1)].clone()
    }

    /// Every queue's counters.
    pub fn queues(&self) -> &[std::sync::Arc<QueueStats>] {
        &self.queues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_per_kind() {
        let s = QueueStats::default();
        let t = Instant::now();
        s.record(IoKind::Write, 4096, 512, t, true);
        s.record(IoKind::Write, 0, 512, t, false);
        s.record(IoKind::Read, 0, 8192, t, true);
        assert_eq!(s.write.ops.load(Relaxed), 2);
        assert_eq!(s.write.failed.load(Relaxed), 1);
        assert_eq!(s.write.bytes.load(Relaxed), 1024);
        assert_eq!(s.read.bytes.load(Relaxed), 8192);
        assert_eq!(s.wr_highest_offset.load(Relaxed), 4608);
        let d = DeviceStats::new(2);
        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        d.on_error(Box::new(move |k| {
            assert_eq!(k, IoKind::Read);
            s2.fetch_add(1, Relaxed);
        }));
        for _ in 0..100 {
            d.queue(1).record(IoKind::Read, 0, 512, t, false);
        }
        assert_eq!(seen.load(Relaxed), 1, "rate-limited");
        assert!(!std::sync::Arc::ptr_eq(&d.queue(0), &d.queue(1)));
        assert!(std::sync::Arc::ptr_eq(&d.queue(1), &d.queue(7)));
    }
}
