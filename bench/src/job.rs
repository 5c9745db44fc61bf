//! Workloads: what to send, and the closed loop that keeps `qd` requests in flight.

use std::time::{Duration, Instant};

use crate::cpu::process_cpu_seconds;
use crate::error::{BenchError, Result};
use crate::guest::GuestMem;
use crate::vq::{data_addr, SplitQueue, MAX_BLOCK, MAX_SLOTS, T_IN, T_OUT};

/// Direction and pattern of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads.
    SeqRead,
    /// Sequential writes.
    SeqWrite,
    /// Random writes, each into a 1 MiB region no earlier request of the run touched
    /// (until every region was touched once): the worst case for the crash-consistency
    /// shadow, whose granules are 1 MiB.
    TouchWrite,
}

/// Regions of [`Pattern::TouchWrite`].
const TOUCH_REGION: u64 = 1 << 20;
/// An odd stride: visits every region of a power-of-two count once per cycle.
const TOUCH_STRIDE: u64 = 0x9e37_79b1;

/// One workload, written `PATTERN-BS-qdN` (e.g. `randread-4k-qd32`, `write-1m-qd8`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    /// The text it was parsed from.
    pub name: String,
    /// What to do.
    pub pattern: Pattern,
    /// Request size in bytes.
    pub block: usize,
    /// Requests in flight.
    pub qd: usize,
}

impl JobSpec {
    /// Parses `PATTERN-BS-qdN`; PATTERN is randread, randwrite, read, write or
    /// touchwrite, BS a size with optional k/m suffix (multiple of 512, at most 1m), N
    /// 1..=64.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| BenchError::Invalid(format!("job '{s}': {why}"));
        let parts: Vec<&str> = s.split('-').collect();
        let [p, bs, qd] = parts[..] else {
            return Err(bad("expected PATTERN-BS-qdN"));
        };
        let pattern = match p {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::SeqRead,
            "write" => Pattern::SeqWrite,
            "touchwrite" => Pattern::TouchWrite,
            _ => {
                return Err(bad(
                    "pattern must be randread, randwrite, read, write or touchwrite",
                ))
            }
        };
        let lower = bs.to_ascii_lowercase();
        let (num, mult) = match lower.strip_suffix('k') {
            Some(n) => (n, 1024),
            None => match lower.strip_suffix('m') {
                Some(n) => (n, 1 << 20),
                None => (lower.as_str(), 1),
            },
        };
        let block = num
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .filter(|b| *b > 0 && b % 512 == 0 && *b <= MAX_BLOCK)
            .ok_or_else(|| bad("block size must be a multiple of 512 up to 1m"))?;
        let qd = qd
            .strip_prefix("qd")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=MAX_SLOTS).contains(n))
            .ok_or_else(|| bad("queue depth must be qd1 to qd64"))?;
        Ok(JobSpec {
            name: s.to_string(),
            pattern,
            block,
            qd,
        })
    }

    fn is_write(&self) -> bool {
        matches!(
            self.pattern,
            Pattern::RandWrite | Pattern::SeqWrite | Pattern::TouchWrite
        )
    }
}

/// What one job measured in its timed window.
#[derive(Clone, Debug)]
pub struct JobResult {
    /// Completed requests in the window.
    pub ios: u64,
    /// Window length in seconds.
    pub seconds: f64,
    /// Mean latency in microseconds.
    pub mean_us: f64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// Server CPU seconds per request in microseconds (None without a pid).
    pub cpu_us_per_io: Option<f64>,
    /// Requests that completed with a non-OK status.
    pub errors: u64,
    /// Kicks sent per request.
    pub kicks_per_io: f64,
}

impl JobResult {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.seconds
    }
}

/// The `p`-quantile (0..=1) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Deterministic pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Timing of a run.
#[derive(Clone, Copy, Debug)]
pub struct RunTimes {
    /// Unmeasured warm-up.
    pub ramp: Duration,
    /// Measured window.
    pub runtime: Duration,
    /// Longest wait for a completion before giving up.
    pub timeout: Duration,
}

/// Runs `spec` on `q` against a disk of `capacity` bytes; `pid` is the server process
/// whose CPU time is sampled at the start and end of the measured window.
pub fn run_job(
    q: &mut SplitQueue<'_>,
    mem: &GuestMem,
    spec: &JobSpec,
    capacity: u64,
    times: RunTimes,
    pid: Option<u32>,
    seed: u64,
) -> Result<JobResult> {
    let blocks = capacity / spec.block as u64;
    if blocks == 0 {
        return Err(BenchError::Invalid(format!(
            "disk of {capacity} bytes is smaller than one {} byte request",
            spec.block
        )));
    }
    if spec.is_write() {
        for slot in 0..spec.qd {
            mem.fill_random(data_addr(slot), spec.block, seed ^ slot as u64);
        }
    }
    let kind = if spec.is_write() { T_OUT } else { T_IN };
    let mut rng = Rng(seed | 1);
    let mut seq_block = 0u64;
    let mut submitted = vec![Instant::now(); MAX_SLOTS];
    let mut free: Vec<usize> = (0..spec.qd).rev().collect();
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 20);
    let mut errors = 0u64;
    let mut ios = 0u64;

    let start = Instant::now();
    let window_start = start + times.ramp;
    let end = window_start + times.runtime;
    let mut measuring = false;
    let mut cpu0 = 0.0;
    let mut kicks0 = 0;
    let (cpu1, kicks1, window_end) = loop {
        let now = Instant::now();
        if !measuring && now >= window_start {
            measuring = true;
            cpu0 = pid.map(process_cpu_seconds).transpose()?.unwrap_or(0.0);
            kicks0 = q.kicks;
        }
        if now >= end {
            let cpu1 = pid.map(process_cpu_seconds).transpose()?.unwrap_or(0.0);
            break (cpu1, q.kicks, now);
        }
        while let Some(slot) = free.pop() {
            let block = match spec.pattern {
                Pattern::RandRead | Pattern::RandWrite => rng.next() % blocks,
                Pattern::SeqRead | Pattern::SeqWrite => {
                    let b = seq_block;
                    seq_block = (seq_block + 1) % blocks;
                    b
                }
                Pattern::TouchWrite => {
                    let regions = (capacity / TOUCH_REGION).max(1);
                    let per = (TOUCH_REGION / spec.block as u64).max(1);
                    let region = seq_block.wrapping_mul(TOUCH_STRIDE) % regions;
                    seq_block += 1;
                    (region * per + rng.next() % per).min(blocks - 1)
                }
            };
            let sector = block * spec.block as u64 / 512;
            q.add(slot, kind, sector, spec.block as u32);
            submitted[slot] = now;
        }
        q.publish()?;
        let mut done = |slot: usize, status: u8| {
            free.push(slot);
            if status != 0 {
                errors += 1;
            }
        };
        q.wait(times.timeout, &mut done)?;
        let t = Instant::now();
        // Latencies of the requests just completed: those now back in `free`.
        if measuring && t < end {
            for &slot in &free {
                if submitted[slot] >= window_start {
                    lat.push(t.duration_since(submitted[slot]).as_nanos() as u64);
                }
                ios += 1;
            }
        }
    };
    // Drain what is still in flight so the next job starts from an idle queue.
    let mut inflight = spec.qd - free.len();
    while inflight > 0 {
        inflight -= q.wait(times.timeout, |_, status| {
            if status != 0 {
                errors += 1;
            }
        })?;
    }
    lat.sort_unstable();
    let seconds = window_end.duration_since(window_start).as_secs_f64();
    Ok(JobResult {
        ios,
        seconds,
        mean_us: lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64 / 1e3,
        p50_us: percentile(&lat, 0.50) as f64 / 1e3,
        p99_us: percentile(&lat, 0.99) as f64 / 1e3,
        cpu_us_per_io: pid.map(|_| (cpu1 - cpu0) * 1e6 / ios.max(1) as f64),
        errors,
        kicks_per_io: (kicks1 - kicks0) as f64 / ios.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_job_names() {
        let j = JobSpec::parse("randread-4k-qd32").unwrap();
        assert_eq!((j.pattern, j.block, j.qd), (Pattern::RandRead, 4096, 32));
        let j = JobSpec::parse("write-1m-qd8").unwrap();
        assert_eq!((j.pattern, j.block, j.qd), (Pattern::SeqWrite, 1 << 20, 8));
        assert_eq!(JobSpec::parse("randwrite-512-qd1").unwrap().block, 512);
        let t = JobSpec::parse("touchwrite-4k-qd32").unwrap();
        assert!(t.pattern == Pattern::TouchWrite && t.is_write());
        for bad in [
            "randread-4k",
            "trim-4k-qd1",
            "randread-4k-qd0",
            "randread-4k-qd65",
            "randread-2m-qd1",
            "randread-100-qd1",
            "randread-xk-qd1",
        ] {
            assert!(JobSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
