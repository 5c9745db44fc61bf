//! Crash-consistent bitmaps at the daemon level: the real binary is SIGKILLed while a
//! frontend writes, then restarted on the same image with `--bitmap b0`. With the
//! crash-consistency shadow the bitmap is recovered (a superset of every write that may
//! have reached the disk); a read-write open by QEMU in between, or
//! `--no-crash-consistent-bitmaps`, leaves it inconsistent as before; a clean stop
//! leaves an image QEMU checks clean, without the shadow.
//!
//! Knobs: `VBLK_CRASH_ROUNDS` (kill rounds of the load test, default 100) and
//! `VBLK_CRASH_SEED` (its random seed, printed at the start).

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{read, Driver, QueueDriver, Served};
use e2e::tools::{
    bitmap_dirty_extents, qemu_img_bitmap_add, qemu_img_check, qemu_img_create_qcow2, qemu_io,
};
use qcow2::BlockImage;
use rand::{Rng, SeedableRng};
use vm_memory::{Bytes, GuestAddress};

const K64: u64 = 64 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Bytes per shadow bit the daemon picks for the 16 GiB disk of the load test, whose
/// bitmap has 64 KiB granules (`qcow2_bitmaps::shadow::DEFAULT_GRANULARITY`): a
/// recovered bitmap is dirty at most in the shadow granules of the writes.
const SHADOW_GRANULE: u64 = MIB;
/// The load writes into a window of this size (64 blocks of 4 KiB) ...
const WINDOW: u64 = 256 << 10;
/// ... and moves each queue's window to a random place after this many writes, so new
/// shadow granules are touched all along (their first writes wait for a shadow sync),
/// not only at the start of a round.
const WINDOW_WRITES: usize = 4000;
/// Magic of the shadow's header extension and its autoclear bit (private to the daemon;
/// see `qcow2_bitmaps::shadow`).
const EXT_SHADOW: u32 = 0x7662_7368;
const AUTOCLEAR_SHADOW: u64 = 1 << 63;
/// The log line of a recovered bitmap (after `bitmap 'NAME' `).
const RECOVERED: &str =
    "was in use (not stored after a crash) and is recovered from its crash-consistency shadow";

fn have_tools() -> bool {
    e2e::require_tools(&["qemu-img", "qemu-io", "qemu-nbd"]).is_some()
}

fn recovered_line(name: &str) -> String {
    format!("bitmap '{name}' {RECOVERED}")
}

/// The start-up error of `--bitmap NAME` on an in-use bitmap (`BitmapError::Inconsistent`).
fn inconsistent_text(image: &Path, name: &str) -> String {
    format!(
        "--bitmap {name}: bitmap '{name}' in '{}' is inconsistent (it was not saved properly, \
         e.g. after a crash) and cannot record writes",
        image.display()
    )
}

/// A qcow2 of `size` (64 KiB clusters) with the enabled persistent bitmap `b0`
/// (64 KiB granularity); `preallocate`: every cluster allocated (metadata
/// preallocation), so guest writes never change the qcow2 metadata.
fn image_with_b0(dir: &Path, size: u64, preallocate: bool) -> PathBuf {
    let img = dir.join("disk.qcow2");
    if preallocate {
        let out = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
            ])
            .arg(&img)
            .arg(size.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    } else {
        qemu_img_create_qcow2(&img, size).unwrap();
    }
    qemu_img_bitmap_add(&img, "b0", K64).unwrap();
    img
}

/// The flags of bitmap `name` as `qemu-img info -U` shows them.
fn flags(img: &Path, name: &str) -> Vec<String> {
    let info = e2e::qemu_img_info_json(img, true).unwrap();
    let list = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    let b = list
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name} in {info}"));
    b["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The autoclear feature bits and the header extension magics of a qcow2 (v3) file.
fn header_state(img: &Path) -> (u64, Vec<u32>) {
    let mut h = vec![0u8; 65536];
    let f = std::fs::File::open(img).unwrap();
    let n = f.read_at(&mut h, 0).unwrap();
    h.truncate(n);
    let be32 = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().unwrap());
    assert_eq!(&h[0..4], b"QFI\xfb");
    assert_eq!(be32(4), 3, "qcow2 version");
    let autoclear = be64(88);
    let mut off = be32(100) as usize;
    let mut exts = Vec::new();
    while off + 8 <= h.len() {
        let magic = be32(off);
        if magic == 0 {
            break;
        }
        exts.push(magic);
        off += 8 + (be32(off + 4) as usize).div_ceil(8) * 8;
    }
    (autoclear, exts)
}

/// Whether the shadow is on disk: (autoclear bit set, extension present).
fn shadow_on_disk(img: &Path) -> (bool, bool) {
    let (autoclear, exts) = header_state(img);
    (
        autoclear & AUTOCLEAR_SHADOW != 0,
        exts.contains(&EXT_SHADOW),
    )
}

/// `qemu-img check` exits 0 (no corruption, no leak) and says so.
fn check_clean(img: &Path) {
    let out = qemu_img_check(img).unwrap_or_else(|e| panic!("qemu-img check: {e}"));
    assert!(
        out.stdout.contains("No errors were found"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("leaked"), "{}", out.stdout);
}

/// Starts the daemon expecting it to refuse to serve; returns its exit status and log.
/// Fails at once if it listens instead.
fn start_refused(socket: &Path, image: &Path, extra: &[&str], log: &Path) -> (ExitStatus, String) {
    let mut child = common::spawn_logged(socket, image, extra, log);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, read(log));
        }
        assert!(
            !socket.exists(),
            "the daemon serves instead of refusing:\n{}",
            read(log)
        );
        assert!(Instant::now() < deadline, "still running after 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes 4 KiB of `byte` at `offset` on queue 0; the request must succeed.
fn guest_write(d: &mut Driver, offset: u64, byte: u8) {
    d.write_data(0, &[byte; 4096]);
    assert_eq!(d.request(0, T_OUT, offset / 512, Some((4096, false))).0, 0);
}

/// FLUSH on queue 0: the writes completed before it survive a crash (an allocating
/// write's new mapping is otherwise only in the daemon's metadata cache).
fn guest_flush(d: &mut Driver) {
    assert_eq!(d.request(0, T_FLUSH, 0, None).0, 0);
}

// ---------------------------------------------------------------------------------------
// The load: random 4 KiB writes at a fixed queue depth per queue.

/// Requests in flight per queue (two queues: QD32 in all).
const QD: usize = 16;
/// Descriptors per chain (header, data, status).
const STRIDE: u16 = 3;

/// Guest memory of queue `q`'s requests (above the helpers' single-request areas).
fn area(q: usize) -> u64 {
    0x80_0000 + q as u64 * 0x20_0000
}
fn hdr_addr(q: usize, slot: usize) -> u64 {
    area(q) + slot as u64 * 16
}
fn status_addr(q: usize, slot: usize) -> u64 {
    area(q) + 0x1000 + slot as u64
}
fn buf_addr(q: usize, slot: usize) -> u64 {
    area(q) + 0x1_0000 + slot as u64 * BLOCK
}

/// The 4 KiB a write with id `id` (never 0) writes: every 8-byte word names the id, so
/// the write found on the disk is known and a torn one is seen.
fn block_data(id: u64) -> Vec<u8> {
    (0..BLOCK / 8)
        .flat_map(|k| (id ^ (k << 48)).to_le_bytes())
        .collect()
}

/// Which write a 4 KiB block on the disk holds: `Some(0)` never written (zeros),
/// `Some(id)`, or `None` (neither: torn or corrupt).
fn block_id(b: &[u8]) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(b[..8].try_into().unwrap());
    (id != 0 && b == block_data(id).as_slice()).then_some(id)
}

/// One write the frontend put in the avail ring.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// Unique over the whole test, increasing in submission order.
    id: u64,
    offset: u64,
    /// Completed with status OK (the used entry was published).
    acked: bool,
}

/// What the queue threads did so far, updated live.
#[derive(Default)]
struct Progress {
    /// Writes acknowledged.
    acked: AtomicU64,
    /// Window moves: the first write after one goes to shadow granules not touched yet
    /// in this round (most likely).
    moves: AtomicU64,
}

/// What a queue thread does until `stop`, or until `count` writes are submitted and
/// completed.
struct Load {
    /// Disk size: the windows are anywhere on it.
    size: u64,
    stop: Arc<AtomicBool>,
    ids: Arc<AtomicU64>,
    /// Progress so far (all queues).
    progress: Arc<Progress>,
    seed: u64,
    count: Option<usize>,
}

/// Drives random 4 KiB writes at depth [`QD`] on one queue, in a moving window. Queue `q` writes only the
/// blocks whose index has parity `q`, and never two in flight to the same block, so the
/// writes to a block are ordered by id. Returns every submitted write.
fn drive(mut qd: QueueDriver, load: Load) -> (QueueDriver, Vec<Sent>) {
    let q = qd.q;
    let mut rng = rand::rngs::StdRng::seed_from_u64(load.seed);
    let mut sent: Vec<Sent> = Vec::new();
    let mut slots: Vec<Option<usize>> = vec![None; QD];
    let mut busy: HashSet<u64> = HashSet::new();
    let mut window = 0;
    loop {
        // A bounded load ignores `stop`: it ends once its writes completed.
        let stopping = load.count.is_none() && load.stop.load(Ordering::SeqCst);
        let mut chains = Vec::new();
        for (slot, cur) in slots.iter_mut().enumerate() {
            if cur.is_some() || stopping || load.count.is_some_and(|n| sent.len() >= n) {
                continue;
            }
            if sent.len() % WINDOW_WRITES == 0 {
                window = rng.gen_range(0..(load.size - WINDOW) / K64) * K64;
                load.progress.moves.fetch_add(1, Ordering::SeqCst);
            }
            let offset = loop {
                let block = rng.gen_range(0..WINDOW / BLOCK / 2) * 2 + q as u64;
                let o = window + block * BLOCK;
                if !busy.contains(&o) {
                    break o;
                }
            };
            let id = load.ids.fetch_add(1, Ordering::SeqCst);
            let mem = qd.mem();
            mem.write_slice(&block_data(id), GuestAddress(buf_addr(q, slot)))
                .unwrap();
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
            h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr_addr(q, slot)))
                .unwrap();
            mem.write_obj(0xffu8, GuestAddress(status_addr(q, slot)))
                .unwrap();
            chains.push((
                slot as u16 * STRIDE,
                vec![
                    (hdr_addr(q, slot), 16, false),
                    (buf_addr(q, slot), BLOCK as u32, false),
                    (status_addr(q, slot), 1, true),
                ],
            ));
            busy.insert(offset);
            *cur = Some(sent.len());
            sent.push(Sent {
                id,
                offset,
                acked: false,
            });
        }
        qd.submit_at(&chains);
        let used = qd.poll_used();
        for &(head, len) in &used {
            let slot = usize::from(head / STRIDE);
            let i = slots[slot]
                .take()
                .unwrap_or_else(|| panic!("queue {q}: completion of idle head {head}"));
            let st: u8 = qd
                .mem()
                .read_obj(GuestAddress(status_addr(q, slot)))
                .unwrap();
            assert_eq!(
                (st, len),
                (0, 1),
                "queue {q}: write at {:#x} failed",
                sent[i].offset
            );
            sent[i].acked = true;
            load.progress.acked.fetch_add(1, Ordering::SeqCst);
            busy.remove(&sent[i].offset);
        }
        let idle = slots.iter().all(Option::is_none);
        // Stopped: the daemon is dead and reaped, the poll above saw its last completions.
        if stopping || (idle && load.count.is_some_and(|n| sent.len() >= n)) {
            return (qd, sent);
        }
        if used.is_empty() {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Runs the load on every queue of `d` in threads; `until` (given their live progress)
/// returns once it is time to stop, e.g. after killing the daemon; then the writes of
/// all queues are returned.
fn run_load(
    d: &mut Driver,
    size: u64,
    ids: &Arc<AtomicU64>,
    seed: u64,
    count: Option<usize>,
    until: impl FnOnce(&Progress),
) -> Vec<Sent> {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let threads: Vec<_> = std::mem::take(&mut d.queues)
        .into_iter()
        .map(|qd| {
            let load = Load {
                size,
                stop: stop.clone(),
                ids: ids.clone(),
                progress: progress.clone(),
                seed: seed ^ (qd.q as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                count,
            };
            std::thread::spawn(move || drive(qd, load))
        })
        .collect();
    until(&progress);
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for t in threads {
        let (qd, sent) = t.join().unwrap();
        d.queues.push(qd);
        all.extend(sent);
    }
    all
}

/// Sorted, merged extents: does one of them contain `offset`?
fn covered(extents: &[(u64, u64)], offset: u64) -> bool {
    let i = extents.partition_point(|&(s, _)| s <= offset);
    i > 0 && offset < extents[i - 1].0 + extents[i - 1].1
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// Round after round: the daemon (2 queues, `--bitmap b0`) serves random 4 KiB writes
/// at QD 2x16 and is SIGKILLed at a random moment; the next start must recover b0 from
/// the shadow. After a last start, a clean stop: the image checks clean, b0 is stored
/// and covers every write that may have reached the disk (and nothing outside the shadow
/// granules of the writes), and every block holds what its writes allow.
#[test]
fn kill9_under_load_recovers_every_time() {
    if !have_tools() {
        return;
    }
    let rounds: usize = env_or("VBLK_CRASH_ROUNDS", 100);
    let seed: u64 = env_or("VBLK_CRASH_SEED", 0xc4a5_4b17);
    eprintln!("crash rounds: {rounds}, seed: {seed} (VBLK_CRASH_ROUNDS, VBLK_CRASH_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t0 = Instant::now();

    // Big enough that the small windows of every round leave the bitmap far from full:
    // the superset check at the end sees a round's bits missing, and the shadow's
    // coarser granules show as the margin.
    let size: u64 = 16 << 30;
    let dir = tempfile::tempdir().unwrap();
    // Preallocated: a write never changes the qcow2 metadata, so an acknowledged write is
    // in the file (page cache) even without a flush, and a kill leaks no data cluster:
    // any leak or corruption found at the end comes from the bitmaps and their shadow.
    let img = image_with_b0(dir.path(), size, true);
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("daemon.log");
    let args = ["--bitmap", "b0", "--num-queues", "2"];
    let ids = Arc::new(AtomicU64::new(1));
    let mut all: Vec<Sent> = Vec::new();
    let mut load_time = Duration::ZERO;

    for round in 0..=rounds {
        let served = Served::start(&socket, &img, &args, &log);
        let text = served.log();
        if round > 0 {
            assert!(
                text.contains(&recovered_line("b0")),
                "round {round}: no recovery of b0 after the kill:\n{text}"
            );
        }
        let mut d = Driver::connect(&socket, 2);
        let started = Instant::now();
        let sent = if round < rounds {
            let delay = Duration::from_millis(rng.gen_range(50..=400));
            // Every other round the kill aims at a window move: within a millisecond of
            // the first write to new shadow granules, i.e. while the shadow is updated.
            let aim = rng
                .gen_bool(0.5)
                .then(|| Duration::from_micros(rng.gen_range(0..1000)));
            run_load(&mut d, size, &ids, rng.gen(), None, |progress| {
                std::thread::sleep(delay);
                // At least one write completed (the first ones wait for a shadow sync,
                // which a busy disk may make slow).
                let deadline = Instant::now() + Duration::from_secs(20);
                while progress.acked.load(Ordering::SeqCst) == 0 {
                    assert!(
                        Instant::now() < deadline,
                        "round {round}: no write completed:\n{}",
                        served.log()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                if let Some(after) = aim {
                    let moves = progress.moves.load(Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while progress.moves.load(Ordering::SeqCst) == moves
                        && Instant::now() < deadline
                    {
                        std::hint::spin_loop();
                    }
                    std::thread::sleep(after);
                }
                served.kill9();
            })
        } else {
            // The last start: a bounded load that completes, then a clean stop while the
            // frontend is still attached.
            let sent = run_load(&mut d, size, &ids, rng.gen(), Some(2000), |_| {});
            assert!(sent.iter().all(|s| s.acked));
            let text = served.term();
            assert!(text.contains("stored persistent bitmaps of"), "{text}");
            sent
        };
        load_time += started.elapsed();
        drop(d);
        all.extend(sent);
    }
    let runtime = t0.elapsed();

    // The image after the clean stop: consistent, no leak, the shadow gone, b0 stored.
    check_clean(&img);
    assert_eq!(flags(&img, "b0"), strs(&["auto"]));
    assert_eq!(
        shadow_on_disk(&img),
        (false, false),
        "shadow bit / extension left after a clean stop"
    );

    // Per block, in submission order (= id order): what it may hold now, i.e. the last
    // acknowledged write (0: never written) or any later one still in flight at a kill.
    all.sort_unstable_by_key(|s| s.id);
    let mut allowed: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut unacked: HashSet<u64> = HashSet::new();
    // Granules b0 must have (acknowledged writes; found unacknowledged ones are added
    // below) and shadow granules it may have.
    let mut need: BTreeSet<u64> = BTreeSet::new();
    let mut may: BTreeSet<u64> = BTreeSet::new();
    for s in &all {
        let a = allowed.entry(s.offset).or_insert_with(|| vec![0]);
        if s.acked {
            a.clear();
            need.insert(s.offset / K64);
        } else {
            unacked.insert(s.id);
        }
        a.push(s.id);
        may.insert(s.offset / SHADOW_GRANULE);
    }
    let image = qcow2::Qcow2Image::open(
        &img,
        &qcow2::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let granules: BTreeSet<u64> = allowed.keys().map(|o| o / K64 * K64).collect();
    let mut landed_unacked = 0usize;
    let mut torn = 0usize;
    let mut buf = vec![0u8; K64 as usize];
    for &r in &granules {
        image.read_at(&mut buf, r).unwrap();
        for (k, b) in buf.chunks(BLOCK as usize).enumerate() {
            let offset = r + k as u64 * BLOCK;
            let found = block_id(b);
            let Some(allowed) = allowed.get(&offset) else {
                assert_eq!(found, Some(0), "block {offset:#x} was never written");
                continue;
            };
            match found {
                Some(id) if allowed.contains(&id) => {
                    if unacked.contains(&id) {
                        // It reached the disk: b0 must have it too.
                        landed_unacked += 1;
                        need.insert(offset / K64);
                    }
                }
                // An unacknowledged write may be torn.
                None if allowed.len() > 1 => torn += 1,
                _ => panic!("block {offset:#x} holds {found:?}, expected one of {allowed:?}"),
            }
        }
    }
    drop(image);

    // b0 covers every write that may have reached the disk ...
    let dirty = bitmap_dirty_extents(&img, "b0").unwrap();
    let dirty_bytes: u64 = dirty.iter().map(|e| e.1).sum();
    let missing: Vec<u64> = need
        .iter()
        .map(|g| g * K64)
        .filter(|&o| !covered(&dirty, o))
        .collect();
    assert!(
        missing.is_empty(),
        "b0 misses {} written granule(s), first at {:#x?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    assert!(
        dirty_bytes < size / 2,
        "b0 has {dirty_bytes} dirty bytes of {size}: too full for the superset check to mean \
         anything (fewer rounds?)"
    );
    // ... and nothing beyond what a recovery may add: the shadow granules of the writes.
    for &(start, len) in &dirty {
        for g in (start / K64)..(start + len).div_ceil(K64) {
            assert!(
                may.contains(&(g * K64 / SHADOW_GRANULE)),
                "b0 is dirty at {:#x}, in no shadow granule of a write",
                g * K64
            );
        }
    }
    let need_bytes = need.len() as u64 * K64;
    let acked = all.len() - unacked.len();
    eprintln!(
        "{rounds} kill rounds + 1 clean stop in {runtime:?} (under load {load_time:?}), checks \
         {:?}: {} writes submitted, {acked} acknowledged, {landed_unacked} unacknowledged \
         found on disk, {torn} torn; b0 dirty {dirty_bytes} bytes in {} extents, written \
         granules {need_bytes} bytes: the bitmap holds {} bytes ({:.1}%) more than the writes",
        t0.elapsed() - runtime,
        all.len(),
        dirty.len(),
        dirty_bytes - need_bytes,
        (dirty_bytes - need_bytes) as f64 * 100.0 / need_bytes as f64
    );
}

#[test]
fn qemu_in_between_distrusts_the_shadow() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_b0(dir.path(), 64 * MIB, false);
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("daemon.log");
    let served = Served::start(&socket, &img, &["--bitmap", "b0"], &log);
    let mut d = Driver::connect(&socket, 1);
    guest_write(&mut d, MIB, 0x11);
    guest_write(&mut d, 9 * MIB + 3 * BLOCK, 0x22);
    guest_flush(&mut d);
    assert_eq!(
        shadow_on_disk(&img),
        (true, true),
        "the shadow is armed while a frontend writes"
    );
    served.kill9();
    drop(d);
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));

    // Control: the same image without QEMU in between is recovered.
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let control = Served::start(
        &dir.path().join("copy.sock"),
        &copy,
        &["--bitmap", "b0"],
        &dir.path().join("copy.log"),
    );
    let text = control.term();
    assert!(text.contains(&recovered_line("b0")), "{text}");
    let dirty = bitmap_dirty_extents(&copy, "b0").unwrap();
    for o in [MIB, 9 * MIB + 3 * BLOCK] {
        assert!(covered(&dirty, o), "{o:#x} not in {dirty:?}");
    }

    // QEMU opens the image read-write: it clears the autoclear bit it does not know.
    qemu_io(&img, "qcow2", false, &["write -P 0x55 0 4k"]).unwrap();
    assert_eq!(
        shadow_on_disk(&img),
        (false, true),
        "QEMU's read-write open cleared the shadow's autoclear bit (and kept the extension)"
    );
    let (st, text) = start_refused(&socket, &img, &["--bitmap", "b0"], &log);
    assert_eq!(st.code(), Some(1), "{text}");
    assert!(text.contains(&inconsistent_text(&img, "b0")), "{text}");
    assert!(!text.contains(RECOVERED), "{text}");
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    // Nothing is corrupt (the old shadow region may count as leaked for QEMU) and every
    // write is there.
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(&img)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
    qemu_io(
        &img,
        "qcow2",
        true,
        &[
            "read -P 0x55 0 4k",
            "read -P 0x11 1M 4k",
            "read -P 0x22 9449472 4k",
        ],
    )
    .unwrap();
}

#[test]
fn without_crash_consistency_kill9_leaves_inconsistent() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_b0(dir.path(), 64 * MIB, false);
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("daemon.log");
    let off = ["--bitmap", "b0", "--no-crash-consistent-bitmaps"];
    let served = Served::start(&socket, &img, &off, &log);
    let mut d = Driver::connect(&socket, 1);
    guest_write(&mut d, MIB, 0x11);
    guest_write(&mut d, 5 * MIB, 0x22);
    guest_flush(&mut d);
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    assert_eq!(
        shadow_on_disk(&img),
        (false, false),
        "no shadow when the feature is off"
    );
    served.kill9();
    drop(d);
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    // Refused, with the option and without it (there is no shadow to recover from).
    for extra in [&off[..], &["--bitmap", "b0"][..]] {
        let (st, text) = start_refused(&socket, &img, extra, &log);
        assert_eq!(st.code(), Some(1), "{extra:?}: {text}");
        assert!(
            text.contains(&inconsistent_text(&img, "b0")),
            "{extra:?}: {text}"
        );
        assert!(!text.contains(RECOVERED), "{extra:?}: {text}");
    }
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    qemu_io(
        &img,
        "qcow2",
        true,
        &["read -P 0x11 1M 4k", "read -P 0x22 5M 4k"],
    )
    .unwrap();
}

#[test]
fn clean_stop_leaves_a_qemu_image() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_b0(dir.path(), 64 * MIB, false);
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("daemon.log");
    let args = ["--bitmap", "b0"];

    // Writes, then SIGTERM with the frontend attached.
    let served = Served::start(&socket, &img, &args, &log);
    let mut d = Driver::connect(&socket, 1);
    for (o, b) in [(MIB, 0x11), (5 * MIB + 3 * BLOCK, 0x22), (20 * MIB, 0x33)] {
        guest_write(&mut d, o, b);
    }
    assert_eq!(shadow_on_disk(&img), (true, true), "armed while writing");
    let text = served.term();
    drop(d);
    assert!(text.contains("stored persistent bitmaps of"), "{text}");
    check_clean(&img);
    assert_eq!(flags(&img, "b0"), strs(&["auto"]));
    assert_eq!(shadow_on_disk(&img), (false, false), "shadow left behind");
    let want = vec![(MIB, K64), (5 * MIB, K64), (20 * MIB, K64)];
    assert_eq!(bitmap_dirty_extents(&img, "b0").unwrap(), want);

    // Attached (b0 in use, shadow armed) but no write at all, then SIGKILL.
    let served = Served::start(&socket, &img, &args, &log);
    let d = Driver::connect(&socket, 1);
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    assert_eq!(shadow_on_disk(&img), (true, true), "armed while attached");
    served.kill9();
    drop(d);
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));

    // Recovered with nothing added: exactly the bits it had.
    let served = Served::start(&socket, &img, &args, &log);
    let text = served.term();
    assert!(
        text.contains(&format!(
            "{}: the stored bits plus 0 byte(s)",
            recovered_line("b0")
        )),
        "{text}"
    );
    check_clean(&img);
    assert_eq!(flags(&img, "b0"), strs(&["auto"]));
    assert_eq!(shadow_on_disk(&img), (false, false), "shadow left behind");
    assert_eq!(bitmap_dirty_extents(&img, "b0").unwrap(), want);
    qemu_io(
        &img,
        "qcow2",
        true,
        &[
            "read -P 0x11 1M 4k",
            "read -P 0x22 5255168 4k",
            "read -P 0x33 20M 4k",
        ],
    )
    .unwrap();
}
