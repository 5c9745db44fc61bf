//! The concurrent data path against an in-process vhost-user frontend: 32 requests in
//! flight on each of two queues with data verification (both I/O engines), completions
//! out of order, GET_VRING_BASE and disconnect with requests in flight, unaligned guest
//! buffers with O_DIRECT.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{DaemonOpts, Driver, QueueDriver, TestDaemon, DISK_SIZE};
use qcow2::BlockImage;
use rand::{Rng, SeedableRng};
use vhost::VhostBackend;
use vhost_device_blk_bitmap::config::Aio;
use vhost_device_blk_bitmap::tracker::NoopTracker;
use vm_memory::{Bytes, GuestAddress};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Descriptors per chain (header, data, status).
const STRIDE: u16 = 3;
/// Requests in flight per batch.
const QD: usize = 32;

/// Guest area of queue `q`'s batch requests (above the single-request areas).
fn area(q: usize) -> u64 {
    0x80_0000 + q as u64 * 0x40_0000
}
fn hdr_addr(q: usize, i: usize) -> u64 {
    area(q) + i as u64 * 32
}
fn status_addr(q: usize, i: usize) -> u64 {
    area(q) + 0x2000 + i as u64 * 32
}
/// 64 KiB data buffer of request `i`.
fn buf_addr(q: usize, i: usize) -> u64 {
    area(q) + 0x1_0000 + i as u64 * 0x1_0000
}

/// Writes request `i`'s header and returns its chain; `data` is (guest address, length,
/// device-writable).
fn chain(
    qd: &QueueDriver,
    i: usize,
    ty: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
) -> Vec<(u64, u32, bool)> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    qd.mem()
        .write_slice(&h, GuestAddress(hdr_addr(qd.q, i)))
        .unwrap();
    qd.mem()
        .write_obj(0xffu8, GuestAddress(status_addr(qd.q, i)))
        .unwrap();
    let mut c = vec![(hdr_addr(qd.q, i), 16, false)];
    c.extend(data);
    c.push((status_addr(qd.q, i), 1, true));
    c
}

fn status(qd: &QueueDriver, i: usize) -> u8 {
    qd.mem()
        .read_obj(GuestAddress(status_addr(qd.q, i)))
        .unwrap()
}

/// Submits the chains, waits for all, checks every status is OK and returns the used
/// entries in completion order.
fn run_batch(qd: &mut QueueDriver, chains: &[Vec<(u64, u32, bool)>]) -> Vec<(u16, u32)> {
    let heads = qd.submit_batch(chains, STRIDE);
    let used = qd.wait_used(chains.len());
    let mut seen: Vec<u16> = used.iter().map(|u| u.0).collect();
    seen.sort_unstable();
    assert_eq!(seen, heads, "every request completed exactly once");
    for i in 0..chains.len() {
        assert_eq!(status(qd, i), 0, "queue {} request {i} status", qd.q);
    }
    used
}

/// Rounds of 32 random writes then 32 reads of the same ranges on queue `qd.q`, inside
/// its own half of the disk, checked against a model; returns the model.
fn exercise_queue(mut qd: QueueDriver, seed: u64) -> (QueueDriver, Vec<u8>) {
    let half = DISK_SIZE / 2;
    let base = qd.q as u64 * half;
    let mut model = vec![0u8; half as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let slots = (half / 0x1_0000) as usize;
    for round in 0..12 {
        let mut picked: Vec<usize> = (0..slots).collect();
        for k in 0..QD {
            let j = rng.gen_range(k..slots);
            picked.swap(k, j);
        }
        let mut ranges = Vec::new();
        let mut writes = Vec::new();
        for (i, &slot) in picked[..QD].iter().enumerate() {
            let len = rng.gen_range(1..=128u64) * 512;
            let off = slot as u64 * 0x1_0000 + rng.gen_range(0..=(0x1_0000 - len) / 512) * 512;
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            qd.mem()
                .write_slice(&data, GuestAddress(buf_addr(qd.q, i)))
                .unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            writes.push(chain(
                &qd,
                i,
                T_OUT,
                (base + off) / 512,
                Some((buf_addr(qd.q, i), len as u32, false)),
            ));
            ranges.push((off, len));
        }
        for u in run_batch(&mut qd, &writes) {
            assert_eq!(u.1, 1, "a write's used length is the status byte");
        }
        if round % 4 == 3 {
            let f = chain(&qd, 0, T_FLUSH, 0, None);
            run_batch(&mut qd, &[f]);
        }
        // Scribble over the buffers, then read the same ranges back.
        let reads: Vec<_> = ranges
            .iter()
            .enumerate()
            .map(|(i, &(off, len))| {
                qd.mem()
                    .write_slice(&vec![0xee; len as usize], GuestAddress(buf_addr(qd.q, i)))
                    .unwrap();
                chain(
                    &qd,
                    i,
                    T_IN,
                    (base + off) / 512,
                    Some((buf_addr(qd.q, i), len as u32, true)),
                )
            })
            .collect();
        let heads: Vec<u16> = (0..QD as u16).map(|i| i * STRIDE).collect();
        for (head, used) in run_batch(&mut qd, &reads) {
            let i = heads.iter().position(|&h| h == head).unwrap();
            assert_eq!(used, ranges[i].1 as u32 + 1);
        }
        for (i, &(off, len)) in ranges.iter().enumerate() {
            let mut got = vec![0u8; len as usize];
            qd.mem()
                .read_slice(&mut got, GuestAddress(buf_addr(qd.q, i)))
                .unwrap();
            assert!(
                got == model[off as usize..(off + len) as usize],
                "queue {} round {round}: read of {len} bytes at {off:#x} differs",
                qd.q
            );
        }
    }
    // The whole half, 64 KiB per request.
    for chunk in 0..(half / 0x1_0000 / QD as u64) {
        let reads: Vec<_> = (0..QD)
            .map(|i| {
                let off = (chunk * QD as u64 + i as u64) * 0x1_0000;
                chain(
                    &qd,
                    i,
                    T_IN,
                    (base + off) / 512,
                    Some((buf_addr(qd.q, i), 0x1_0000, true)),
                )
            })
            .collect();
        run_batch(&mut qd, &reads);
        for i in 0..QD {
            let off = ((chunk * QD as u64 + i as u64) * 0x1_0000) as usize;
            let mut got = vec![0u8; 0x1_0000];
            qd.mem()
                .read_slice(&mut got, GuestAddress(buf_addr(qd.q, i)))
                .unwrap();
            assert!(
                got == model[off..off + 0x1_0000],
                "queue {} final read at {off:#x}",
                qd.q
            );
        }
    }
    (qd, model)
}

/// `qemu-img check` of a stopped daemon's image (required under CI=true).
fn qemu_img_check(path: &std::path::Path) {
    match Command::new("qemu-img").arg("check").arg(path).output() {
        Ok(out) => assert!(
            out.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "qemu-img is required when CI=true: {e}"
            );
            eprintln!("note: qemu-img not installed, check skipped");
        }
    }
}

fn qd32_on_two_queues(aio: Aio, direct: bool) {
    let daemon = TestDaemon::start_opts(
        &DaemonOpts {
            num_queues: 2,
            qcow2: true,
            direct,
            aio: Some(aio),
            ..Default::default()
        },
        |i| i,
        Arc::new(NoopTracker),
    );
    let mut d = Driver::connect(&daemon.socket, 2);
    let queues = std::mem::take(&mut d.queues);
    let threads: Vec<_> = queues
        .into_iter()
        .map(|qd| {
            std::thread::spawn(move || {
                let seed = 0x5eed + qd.q as u64;
                exercise_queue(qd, seed)
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap().1).collect();
    drop(d);
    let image = daemon.image.clone();
    let (r, _dir) = daemon.stop_keep_dir();
    r.unwrap();
    qemu_img_check(&image);
    let img = qcow2::Qcow2Image::open(
        &image,
        &qcow2::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut all = vec![0u8; DISK_SIZE as usize];
    img.read_at(&mut all, 0).unwrap();
    assert!(
        all == models.concat(),
        "the image holds exactly what the queues wrote"
    );
}

/// O_DIRECT: every transfer goes through the ring.
#[test]
fn qd32_on_two_queues_io_uring_direct() {
    qd32_on_two_queues(Aio::IoUring, true);
}

/// Buffered: transfers are done inline where they do not block.
#[test]
fn qd32_on_two_queues_io_uring_buffered() {
    qd32_on_two_queues(Aio::IoUring, false);
}

#[test]
fn qd32_on_two_queues_threads() {
    qd32_on_two_queues(Aio::Threads, false);
}

fn qcow2_daemon(aio: Aio) -> TestDaemon {
    TestDaemon::start_opts(
        &DaemonOpts {
            num_queues: 1,
            qcow2: true,
            // O_DIRECT where the engine is io_uring: the transfers are in flight on the
            // ring (buffered ones would be done inline).
            direct: aio == Aio::IoUring,
            aio: Some(aio),
            ..Default::default()
        },
        |i| i,
        Arc::new(NoopTracker),
    )
}

/// Two writes into one unallocated cluster and a read elsewhere, in one batch: the
/// second write waits for the first one's allocation, the read does not wait for
/// either, so the used ring shows them out of submission order.
#[test]
fn completions_out_of_order_io_uring() {
    // O_DIRECT: the data write goes to the ring (buffered ones are done inline).
    let daemon = TestDaemon::start_opts(
        &DaemonOpts {
            num_queues: 1,
            qcow2: true,
            direct: true,
            aio: Some(Aio::IoUring),
            ..Default::default()
        },
        |i| i,
        Arc::new(NoopTracker),
    );
    let mut d = Driver::connect(&daemon.socket, 1);
    let qd = &mut d.queues[0];
    qd.mem()
        .write_slice(&[0x11; 4096], GuestAddress(buf_addr(0, 0)))
        .unwrap();
    qd.mem()
        .write_slice(&[0x22; 4096], GuestAddress(buf_addr(0, 1)))
        .unwrap();
    let chains = vec![
        chain(qd, 0, T_OUT, 0, Some((buf_addr(0, 0), 4096, false))),
        chain(qd, 1, T_OUT, 16, Some((buf_addr(0, 1), 4096, false))),
        chain(qd, 2, T_IN, 2048, Some((buf_addr(0, 2), 4096, true))),
    ];
    let used = run_batch(qd, &chains);
    let order: Vec<u16> = used.iter().map(|u| u.0).collect();
    assert_eq!(
        order,
        vec![6, 0, 3],
        "read first, then the writes in allocation order"
    );
    // Both writes landed in the one cluster.
    let r = chain(qd, 0, T_IN, 0, Some((buf_addr(0, 0), 12288, true)));
    run_batch(qd, &[r]);
    let mut got = vec![0u8; 12288];
    qd.mem()
        .read_slice(&mut got, GuestAddress(buf_addr(0, 0)))
        .unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0x11));
    assert!(got[4096..8192].iter().all(|&b| b == 0));
    assert!(got[8192..].iter().all(|&b| b == 0x22));
    drop(d);
    let image = daemon.image.clone();
    let (r, _dir) = daemon.stop_keep_dir();
    r.unwrap();
    qemu_img_check(&image);
}

/// GET_VRING_BASE answers only after every request taken from the ring completed, and
/// its base counts them all.
fn vring_base_after_requests_in_flight(aio: Aio) {
    let daemon = qcow2_daemon(aio);
    let mut d = Driver::connect(&daemon.socket, 1);
    let chains: Vec<_> = (0..QD)
        .map(|i| {
            d.queues[0]
                .mem()
                .write_slice(&[i as u8 + 1; 0x1_0000], GuestAddress(buf_addr(0, i)))
                .unwrap();
            chain(
                &d.queues[0],
                i,
                T_OUT,
                i as u64 * 128,
                Some((buf_addr(0, i), 0x1_0000, false)),
            )
        })
        .collect();
    d.queues[0].submit_batch(&chains, STRIDE);
    // Once the first completion shows, the worker has taken the whole batch (it drains
    // the avail ring before it submits): the rest is in flight now.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while d.queues[0].used_idx() == 0 {
        assert!(std::time::Instant::now() < deadline, "no request completed");
        std::hint::spin_loop();
    }
    let base = d.fe.get_vring_base(0).unwrap();
    let used_idx = d.queues[0].used_idx();
    assert_eq!(base, QD as u32, "every request was taken from the ring");
    assert_eq!(
        u32::from(used_idx),
        base,
        "GET_VRING_BASE answered with requests still in flight"
    );
    drop(d);
    daemon.stop().unwrap();
}

#[test]
fn vring_base_after_requests_in_flight_io_uring() {
    vring_base_after_requests_in_flight(Aio::IoUring);
}

#[test]
fn vring_base_after_requests_in_flight_threads() {
    vring_base_after_requests_in_flight(Aio::Threads);
}

/// A frontend that vanishes with 32 writes in flight: every request taken is completed
/// into the (still mapped) ring, and its data is on the disk for the next frontend.
#[test]
fn disconnect_with_requests_in_flight_io_uring() {
    let daemon = qcow2_daemon(Aio::IoUring);
    let mut d = Driver::connect(&daemon.socket, 1);
    let chains: Vec<_> = (0..QD)
        .map(|i| {
            d.queues[0]
                .mem()
                .write_slice(&[i as u8 + 1; 0x1_0000], GuestAddress(buf_addr(0, i)))
                .unwrap();
            chain(
                &d.queues[0],
                i,
                T_OUT,
                i as u64 * 128,
                Some((buf_addr(0, i), 0x1_0000, false)),
            )
        })
        .collect();
    let mut qd = d.queues.remove(0);
    qd.submit_batch(&chains, STRIDE);
    std::thread::sleep(std::time::Duration::from_millis(2));
    let taken_before = qd.used_idx();
    drop(d);
    // Completions keep arriving after the disconnect until the taken ones are done.
    let used = qd.wait_used(QD);
    assert_eq!(used.len(), QD, "taken before the drop: {taken_before}");
    let mut d = Driver::connect(&daemon.socket, 1);
    for i in 0..QD {
        let r = chain(
            &d.queues[0],
            i,
            T_IN,
            i as u64 * 128,
            Some((buf_addr(0, i), 0x1_0000, true)),
        );
        d.queues[0]
            .mem()
            .write_slice(&[0; 0x1_0000], GuestAddress(buf_addr(0, i)))
            .unwrap();
        run_batch(&mut d.queues[0], &[r]);
        let mut got = vec![0u8; 0x1_0000];
        d.queues[0]
            .mem()
            .read_slice(&mut got, GuestAddress(buf_addr(0, i)))
            .unwrap();
        assert!(
            got.iter().all(|&b| b == i as u8 + 1),
            "write {i} reached the disk"
        );
    }
    drop(d);
    let image = daemon.image.clone();
    let (r, _dir) = daemon.stop_keep_dir();
    r.unwrap();
    qemu_img_check(&image);
}

/// With O_DIRECT, guest buffers at odd addresses go through an aligned bounce buffer;
/// aligned ones go straight to the kernel. Both read and write the right bytes.
fn unaligned_buffers_with_direct(aio: Aio) {
    let daemon = TestDaemon::start_opts(
        &DaemonOpts {
            num_queues: 1,
            direct: true,
            aio: Some(aio),
            ..Default::default()
        },
        |i| i,
        Arc::new(NoopTracker),
    );
    let mut d = Driver::connect(&daemon.socket, 1);
    let qd = &mut d.queues[0];
    // Read 8 KiB of the initial pattern into an unaligned and an aligned buffer.
    let odd = buf_addr(0, 0) + 3;
    let reads = vec![
        chain(qd, 0, T_IN, 64, Some((odd, 8192, true))),
        chain(qd, 1, T_IN, 64, Some((buf_addr(0, 1), 8192, true))),
    ];
    run_batch(qd, &reads);
    let want: Vec<u8> = (64 * 512..64 * 512 + 8192).map(common::pattern).collect();
    let mut got = vec![0u8; 8192];
    qd.mem().read_slice(&mut got, GuestAddress(odd)).unwrap();
    assert!(got == want, "unaligned read");
    qd.mem()
        .read_slice(&mut got, GuestAddress(buf_addr(0, 1)))
        .unwrap();
    assert!(got == want, "aligned read");
    // Write from an unaligned buffer, read back.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 1) as u8).collect();
    let odd = buf_addr(0, 2) + 5;
    qd.mem().write_slice(&data, GuestAddress(odd)).unwrap();
    let w = chain(qd, 0, T_OUT, 1000, Some((odd, 8192, false)));
    run_batch(qd, &[w]);
    drop(d);
    assert_eq!(
        daemon.image_bytes(1000 * 512, 8192),
        data,
        "unaligned write"
    );
    daemon.stop().unwrap();
}

#[test]
fn unaligned_buffers_with_direct_io_uring() {
    unaligned_buffers_with_direct(Aio::IoUring);
}

#[test]
fn unaligned_buffers_with_direct_threads() {
    unaligned_buffers_with_direct(Aio::Threads);
}

/// 512-byte clusters allocated in reverse order: every 64 KiB request is 128 separate
/// host pieces, so a batch of 32 needs far more entries than the ring has (a full
/// submission queue must not fail requests).
#[test]
fn fragmented_image_overflows_the_ring_io_uring() {
    let daemon = TestDaemon::start_opts(
        &DaemonOpts {
            num_queues: 1,
            qcow2: true,
            cluster_size: 512,
            aio: Some(Aio::IoUring),
            ..Default::default()
        },
        |i| i,
        Arc::new(NoopTracker),
    );
    let mut d = Driver::connect(&daemon.socket, 1);
    let qd = &mut d.queues[0];
    let total = QD as u64 * 0x1_0000;
    // Allocate sector by sector from the end, 32 sectors per batch.
    let mut sectors: Vec<u64> = (0..total / 512).rev().collect();
    while !sectors.is_empty() {
        let batch: Vec<u64> = sectors.drain(..QD.min(sectors.len())).collect();
        let chains: Vec<_> = batch
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                qd.mem()
                    .write_slice(&[(s % 251) as u8; 512], GuestAddress(buf_addr(0, i)))
                    .unwrap();
                chain(qd, i, T_OUT, s, Some((buf_addr(0, i), 512, false)))
            })
            .collect();
        run_batch(qd, &chains);
    }
    let reads: Vec<_> = (0..QD)
        .map(|i| {
            chain(
                qd,
                i,
                T_IN,
                i as u64 * 128,
                Some((buf_addr(0, i), 0x1_0000, true)),
            )
        })
        .collect();
    run_batch(qd, &reads);
    for i in 0..QD {
        let mut got = vec![0u8; 0x1_0000];
        qd.mem()
            .read_slice(&mut got, GuestAddress(buf_addr(0, i)))
            .unwrap();
        for (k, b) in got.chunks(512).enumerate() {
            let s = i as u64 * 128 + k as u64;
            assert!(b.iter().all(|&x| x == (s % 251) as u8), "sector {s}");
        }
    }
    drop(d);
    let image = daemon.image.clone();
    let (r, _dir) = daemon.stop_keep_dir();
    r.unwrap();
    qemu_img_check(&image);
}

/// Every write takes a millisecond: a flood keeps the ring busy for a long time.
#[derive(Debug)]
struct SlowWrites(Arc<dyn BlockImage>);

impl BlockImage for SlowWrites {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> qcow2::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(1));
        self.0.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> qcow2::Result<()> {
        self.0.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> qcow2::Result<()> {
        self.0.discard(offset, len)
    }
    fn flush(&self) -> qcow2::Result<()> {
        self.0.flush()
    }
}

/// Refills the avail ring with the same 512-byte write (descriptors reused only after the
/// synchronous worker finished them) until `stop` (at most 5 s, so that a worker that
/// never lets go makes the caller's timing assertion fail instead of hanging), so the
/// worker never finds it empty.
fn flood(mut qd: QueueDriver, stop: Arc<std::sync::atomic::AtomicBool>) -> QueueDriver {
    use std::sync::atomic::Ordering::Relaxed;
    qd.mem()
        .write_slice(&[0x77; 512], GuestAddress(buf_addr(0, 0)))
        .unwrap();
    let c = chain(&qd, 0, T_OUT, 8, Some((buf_addr(0, 0), 512, false)));
    let mut submitted: u16 = 0;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !stop.load(Relaxed) && std::time::Instant::now() < end {
        if submitted.wrapping_sub(qd.used_idx()) < 64 {
            qd.submit_batch(&vec![c.clone(); 64], STRIDE);
            submitted = submitted.wrapping_add(64);
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    qd
}

/// A guest that refills its ring as fast as it is drained does not hold the worker:
/// GET_VRING_BASE is answered within a second, and so is a stop of the daemon.
#[test]
fn a_flooding_guest_lets_get_vring_base_and_stop_through() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::time::{Duration, Instant};
    let daemon = TestDaemon::start_opts(
        &DaemonOpts {
            aio: Some(Aio::Threads),
            ..Default::default()
        },
        |img| Arc::new(SlowWrites(img)),
        Arc::new(NoopTracker),
    );
    let mut d = Driver::connect(&daemon.socket, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let qd = d.queues.remove(0);
    let s = stop.clone();
    let flooder = std::thread::spawn(move || flood(qd, s));
    // Let the flood build up: the worker is busy for good now.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let base = d.fe.get_vring_base(0).unwrap();
    let took = t.elapsed();
    stop.store(true, Relaxed);
    let qd = flooder.join().unwrap();
    assert!(
        base > 256,
        "the flood went through the ring several times ({base})"
    );
    assert!(
        took < Duration::from_secs(1),
        "GET_VRING_BASE took {took:?} under a flood"
    );
    assert_eq!(
        u32::from(qd.used_idx()),
        base,
        "answered after its requests"
    );
    drop(qd);
    drop(d);
    // A stop under a flood, on a new connection.
    let mut d = Driver::connect(&daemon.socket, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let qd = d.queues.remove(0);
    let s = stop.clone();
    let flooder = std::thread::spawn(move || flood(qd, s));
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    daemon.stop.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    // The daemon closes the connection once it stopped: the flooder's kicks then fail
    // or go nowhere; the server thread ends.
    let stopped = daemon.stop();
    let took = t.elapsed();
    stop.store(true, Relaxed);
    let _ = flooder.join();
    assert!(Instant::now() < deadline);
    stopped.unwrap();
    assert!(
        took < Duration::from_secs(1),
        "stop took {took:?} under a flood"
    );
    drop(d);
}
