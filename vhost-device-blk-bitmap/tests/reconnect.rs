//! Restart under a running frontend (INFLIGHT_SHMFD): the daemon binary is SIGKILLed,
//! started again on the same image and socket, and the frontend reconnects with the same
//! memory, rings and inflight region. Every request it had submitted completes exactly
//! once, with its data on the disk.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{read, Driver, QueueDriver, RingBase, Served};
use rand::{Rng, SeedableRng};
use vm_memory::{Bytes, GuestAddress};

const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Bytes of one load write.
const BLOCK: u64 = 64 << 10;
/// Descriptors per chain (header, data, status).
const STRIDE: u16 = 3;

/// Guest memory of request slot `slot` (above the driver's single-request areas).
fn hdr_addr(slot: usize) -> u64 {
    0x80_0000 + slot as u64 * 16
}
fn status_addr(slot: usize) -> u64 {
    0x80_1000 + slot as u64
}
fn buf_addr(slot: usize) -> u64 {
    0x90_0000 + slot as u64 * BLOCK
}

/// The block a write with id `id` writes: every 8-byte word names it.
fn block_data(id: u64, len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|k| (id ^ (k << 48)).to_le_bytes())
        .collect()
}

/// Puts request `slot` (type, sector, data) into guest memory; returns its chain.
fn prepare(
    qd: &QueueDriver,
    slot: usize,
    kind: u32,
    offset: u64,
    data: Option<&[u8]>,
) -> common::Chain {
    let mem = qd.mem();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr_addr(slot))).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status_addr(slot)))
        .unwrap();
    let mut chain = vec![(hdr_addr(slot), 16, false)];
    if let Some(d) = data {
        mem.write_slice(d, GuestAddress(buf_addr(slot))).unwrap();
        chain.push((buf_addr(slot), d.len() as u32, false));
    }
    chain.push((status_addr(slot), 1, true));
    chain
}

fn status(qd: &QueueDriver, slot: usize) -> u8 {
    qd.mem().read_obj(GuestAddress(status_addr(slot))).unwrap()
}

/// A raw image of `size` bytes of zeros.
fn raw_image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.raw");
    File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// Queue 0's region in the inflight memfd: header field / descriptor state writers, as
/// a daemon that died at a chosen instruction would have left them.
struct Region<'a>(&'a File);

impl Region<'_> {
    fn set_u16(&self, at: u64, v: u16) {
        self.0.write_all_at(&v.to_ne_bytes(), at).unwrap();
    }
    fn take(&self, head: u16, counter: u64) {
        let d = 16 + 16 * u64::from(head);
        self.0.write_all_at(&counter.to_ne_bytes(), d + 8).unwrap();
        self.0.write_all_at(&[1], d).unwrap();
    }
    fn version(&self) -> u16 {
        let mut b = [0u8; 2];
        self.0.read_exact_at(&mut b, 8).unwrap();
        u16::from_ne_bytes(b)
    }
    fn in_flight(&self, queue_size: u16) -> usize {
        (0..u64::from(queue_size))
            .filter(|&h| {
                let mut b = [0u8; 1];
                self.0.read_exact_at(&mut b, 16 + 16 * h).unwrap();
                b[0] != 0
            })
            .count()
    }
}

/// Waits for `n` used entries on `qd`; returns them.
fn wait_used(qd: &mut QueueDriver, n: usize, log: &Path) -> Vec<(u16, u32)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(qd.poll_used());
        assert!(
            Instant::now() < deadline,
            "only {out:?} of {n} requests completed:\n{}",
            read(log)
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    out
}

/// The daemon died after taking four requests from the ring and a fifth was queued
/// while it was down. Of the four, one was published in the used ring but its flag not
/// cleared yet (the crash between the used index and the flag); three were in flight in
/// fetch order B, C, A. The restarted daemon must complete A, B and C (in that order
/// with synchronous queues), then E, and never D again.
fn crafted_crash(aio: &str, base: RingBase) {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path(), 16 << 20);
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("daemon.log");
    let extra = ["--aio", aio, "--format", "raw"];
    let served = Served::start(&socket, &image, &extra, &log);
    let mut d = Driver::connect_inflight(&socket, 1);
    // One request, so the ring started and the region was initialised.
    d.write_data(0, &[7u8; 4096]);
    assert_eq!(d.request(0, T_OUT, 0, Some((4096, false))).0, 0);
    let region = Region(&d.inflight.as_ref().unwrap().1);
    assert_eq!(region.version(), 1, "the daemon initialised the region");
    assert_eq!(region.in_flight(common::QSIZE), 0);
    served.kill9();

    let qd = &mut d.queues[0];
    let used_before = qd.used_idx();
    // D: a flush at descriptors 0..2; A, B, C, E: 64 KiB writes at 1, 2, 3, 4 MiB.
    let mut chains = vec![(0u16, prepare(qd, 0, T_FLUSH, 0, None))];
    let writes = [(1usize, 1u64), (2, 2), (3, 3), (4, 4)];
    for &(slot, mib) in &writes {
        let data = block_data(mib, BLOCK);
        chains.push((
            slot as u16 * STRIDE,
            prepare(qd, slot, T_OUT, mib << 20, Some(&data)),
        ));
    }
    qd.submit_at(&chains);
    let (a, b, c) = (STRIDE, 2 * STRIDE, 3 * STRIDE);
    region.take(0, 9);
    region.take(a, 12);
    region.take(b, 10);
    region.take(c, 11);
    // D reached the used ring (entry, then index), nothing after.
    region.set_u16(12, 0);
    {
        let mem = qd.mem();
        let used = common::ring_base(0) + 0x2000;
        let slot = u64::from(used_before % common::QSIZE);
        mem.write_obj(0u32, GuestAddress(used + 4 + 8 * slot))
            .unwrap();
        mem.write_obj(1u32, GuestAddress(used + 8 + 8 * slot))
            .unwrap();
        mem.write_obj(used_before.wrapping_add(1), GuestAddress(used + 2))
            .unwrap();
        mem.write_obj(0u8, GuestAddress(status_addr(0))).unwrap();
    }
    assert_eq!(qd.poll_used(), vec![(0, 1)], "D completed before the crash");

    let served = Served::start(&socket, &image, &extra, &log);
    d.reconnect(&socket, base);
    let qd = &mut d.queues[0];
    let got = wait_used(qd, 4, &log);
    let heads: Vec<u16> = got.iter().map(|&(h, _)| h).collect();
    if aio == "threads" {
        assert_eq!(
            heads,
            vec![b, c, a, 4 * STRIDE],
            "resubmitted in fetch order, then E"
        );
    } else {
        let set: HashSet<u16> = heads.iter().copied().collect();
        assert_eq!(set, HashSet::from([a, b, c, 4 * STRIDE]));
    }
    for &(slot, _) in &writes {
        assert_eq!(status(qd, slot), 0, "slot {slot}");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(qd.poll_used().is_empty(), "a request completed twice");
    let region = Region(&d.inflight.as_ref().unwrap().1);
    assert_eq!(region.in_flight(common::QSIZE), 0, "flags cleared");
    let log_text = served.term();
    assert!(
        log_text.contains("queue 0: resubmitting 3 request(s) that were in flight"),
        "{log_text}"
    );
    let img = File::open(&image).unwrap();
    for &(_, mib) in &writes {
        let mut got = vec![0u8; BLOCK as usize];
        img.read_exact_at(&mut got, mib << 20).unwrap();
        assert!(
            got == block_data(mib, BLOCK),
            "the write at {mib} MiB is on the disk"
        );
    }
}

#[test]
fn crafted_crash_resubmits_in_fetch_order_with_qemus_ring_base() {
    crafted_crash("threads", RingBase::Used);
}

#[test]
fn crafted_crash_resubmits_with_cloud_hypervisors_ring_base_on_io_uring() {
    crafted_crash("io_uring", RingBase::Avail);
}

/// Queue depth of the load.
const QD: usize = 8;
/// The "block" of a FLUSH in flight.
const FLUSH: u64 = u64::MAX;

/// Reads the final image at an offset.
type ReadAt = dyn Fn(u64, &mut [u8]);

/// The image of the load test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Raw,
    /// qcow2 (allocating writes) with the enabled persistent bitmap `b0` (64 KiB
    /// granules), served with `--bitmap b0`.
    Qcow2Bitmap,
}

/// Writes in flight at QD 8 (64 KiB each, never two to one block, a FLUSH now and then),
/// the daemon SIGKILLed at a random moment and restarted, until five kills caught
/// requests it had taken from the ring, alternating QEMU's and cloud-hypervisor's ring
/// base: every request completes exactly once and the disk holds the last write of
/// every block.
#[test]
fn kill9_under_load_loses_no_request() {
    kill9_load(Kind::Raw);
}

/// The same with a qcow2 and a bitmap: replayed writes allocate again where the first
/// attempt may have, each restart frees what the killed instance leaked (the image
/// checks clean after the last stop), and `b0` (recovered from its crash-consistency
/// shadow after each kill) covers every block written.
#[test]
fn kill9_under_load_keeps_every_write_and_the_bitmap() {
    if e2e::require_tools(&["qemu-img", "qemu-nbd"]).is_none() {
        return;
    }
    kill9_load(Kind::Qcow2Bitmap);
}

fn kill9_load(kind: Kind) {
    let seed: u64 = std::env::var("VBLK_RECONNECT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("VBLK_RECONNECT_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let blocks = 64u64;
    let (image, extra) = match kind {
        Kind::Raw => (raw_image(dir.path(), blocks * BLOCK), ["--format", "raw"]),
        Kind::Qcow2Bitmap => {
            let img = dir.path().join("disk.qcow2");
            // Writes go to the first 4 MiB of 64: b0 must not be dirty past them.
            e2e::tools::qemu_img_create_qcow2(&img, 16 * blocks * BLOCK).unwrap();
            e2e::tools::qemu_img_bitmap_add(&img, "b0", BLOCK).unwrap();
            (img, ["--bitmap", "b0"])
        }
    };
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("daemon.log");
    let mut served = Some(Served::start(&socket, &image, &extra, &log));
    let mut d = Driver::connect_inflight(&socket, 1);
    let mut next_id = 1u64;
    // Per slot: (id, block) in flight; per block: the last id written.
    let mut slots: Vec<Option<(u64, u64)>> = vec![None; QD];
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut completed = 0usize;
    let mut rounds_with_inflight = 0;
    // Kill until five kills caught requests in flight (many land between requests).
    let (wanted, max_rounds) = (5, 200);
    let mut round = 0;
    loop {
        let last_round = rounds_with_inflight >= wanted || round >= max_rounds;
        let run_for = Duration::from_millis(rng.gen_range(20..200));
        let until = Instant::now() + run_for;
        let mut busy: HashSet<u64> = slots.iter().flatten().map(|&(_, b)| b).collect();
        loop {
            let qd = &mut d.queues[0];
            let stopping = Instant::now() >= until;
            for (head, len) in qd.poll_used() {
                let slot = usize::from(head / STRIDE);
                let (id, block) = slots[slot]
                    .take()
                    .unwrap_or_else(|| panic!("completion of idle head {head} (twice?)"));
                assert_eq!((status(qd, slot), len), (0, 1), "request {id} failed");
                if block != FLUSH {
                    busy.remove(&block);
                    last.insert(block, id);
                }
                completed += 1;
            }
            let mut chains = Vec::new();
            for (slot, cur) in slots.iter_mut().enumerate() {
                if cur.is_some() || (stopping && last_round) {
                    continue;
                }
                let id = next_id;
                next_id += 1;
                // Now and then a FLUSH: metadata (the store reserve's refcounts too)
                // reaches the disk, so a kill after it leaves leaked clusters.
                if rng.gen_ratio(1, 16) {
                    chains.push((slot as u16 * STRIDE, prepare(qd, slot, T_FLUSH, 0, None)));
                    *cur = Some((id, FLUSH));
                    continue;
                }
                let block = loop {
                    let b = rng.gen_range(0..blocks);
                    if !busy.contains(&b) {
                        break b;
                    }
                };
                let data = block_data(id, BLOCK);
                chains.push((
                    slot as u16 * STRIDE,
                    prepare(qd, slot, T_OUT, block * BLOCK, Some(&data)),
                ));
                busy.insert(block);
                *cur = Some((id, block));
            }
            qd.submit_at(&chains);
            // Killed a random moment after a kick that refilled the ring: before the
            // daemon took the new requests, or while it runs them.
            if stopping && !last_round {
                let spin = Instant::now() + Duration::from_micros(rng.gen_range(0..300));
                while Instant::now() < spin {
                    std::hint::spin_loop();
                }
                break;
            }
            if stopping && slots.iter().all(Option::is_none) {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        if last_round {
            break;
        }
        served.take().unwrap().kill9();
        // Whatever the dead daemon completed is in the used ring now.
        let qd = &mut d.queues[0];
        for (head, len) in qd.poll_used() {
            let slot = usize::from(head / STRIDE);
            let (id, block) = slots[slot].take().expect("completion of an idle head");
            assert_eq!((status(qd, slot), len), (0, 1), "request {id} failed");
            if block != FLUSH {
                last.insert(block, id);
            }
            completed += 1;
        }
        let region = Region(&d.inflight.as_ref().unwrap().1);
        let flagged = region.in_flight(common::QSIZE);
        let waiting = slots.iter().flatten().count();
        eprintln!(
            "round {round}: killed with {flagged} request(s) in flight, {waiting} not completed"
        );
        assert!(flagged <= waiting, "more flags than requests not completed");
        if flagged > 0 {
            rounds_with_inflight += 1;
        }
        served = Some(Served::start(&socket, &image, &extra, &log));
        let base = if round % 2 == 0 {
            RingBase::Used
        } else {
            RingBase::Avail
        };
        d.reconnect(&socket, base);
        round += 1;
    }
    let log_text = served.take().unwrap().term();
    assert_eq!(completed as u64, next_id - 1, "every write completed once");
    eprintln!(
        "{completed} writes, {rounds_with_inflight} of {round} kills with requests in flight"
    );
    assert!(
        rounds_with_inflight >= wanted,
        "only {rounds_with_inflight} of {round} kills caught requests in flight\n{log_text}"
    );
    if kind == Kind::Qcow2Bitmap {
        // Each kill leaked clusters (the store reserve, allocations in flight); each
        // restart freed what the previous instance leaked, and the last stop was clean.
        let out = std::process::Command::new("qemu-img")
            .arg("check")
            .arg(&image)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("No errors were found"),
            "qemu-img check: {:?}\n{text}",
            out.status
        );
        let dirty = e2e::tools::bitmap_dirty_extents(&image, "b0").unwrap();
        for &block in last.keys() {
            let o = block * BLOCK;
            assert!(
                dirty.iter().any(|&(s, l)| s <= o && o < s + l),
                "b0 misses block {block}: {dirty:?}"
            );
        }
        // Recovered from a shadow of 1 MiB granules: a superset, but only there.
        assert!(
            dirty.iter().all(|&(s, l)| s + l <= blocks * BLOCK),
            "b0 is dirty where nothing was written: {dirty:?}"
        );
    }
    let read_block: Box<ReadAt> = match kind {
        Kind::Raw => {
            let img = File::open(&image).unwrap();
            Box::new(move |o, buf| img.read_exact_at(buf, o).unwrap())
        }
        Kind::Qcow2Bitmap => {
            use qcow2::BlockImage;
            let img = qcow2::Qcow2Image::open(
                &image,
                &qcow2::OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap();
            Box::new(move |o, buf| img.read_at(buf, o).unwrap())
        }
    };
    for block in 0..blocks {
        let mut got = vec![0u8; BLOCK as usize];
        read_block(block * BLOCK, &mut got);
        let want = last
            .get(&block)
            .map_or_else(|| vec![0; BLOCK as usize], |&id| block_data(id, BLOCK));
        assert!(
            got == want,
            "block {block} does not hold write {:?}",
            last.get(&block)
        );
    }
}
