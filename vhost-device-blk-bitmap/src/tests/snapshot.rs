//! Point-in-time views: what a view reads while writers change the disk under it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use qcow2::{BlockImage, MemStorage, RawImage};

use crate::snapshot::{PitView, Views};

const SIZE: u64 = 4 << 20;
const CHUNK: u64 = 64 * 1024;

fn disk_with(fill: u8) -> Arc<dyn BlockImage> {
    let storage = Arc::new(MemStorage::new());
    storage_fill(&*storage, fill);
    Arc::new(RawImage::new(storage, false).unwrap())
}

fn storage_fill(s: &dyn qcow2::Storage, fill: u8) {
    s.write_at(&vec![fill; SIZE as usize], 0).unwrap();
}

fn view_of(disk: &Arc<dyn BlockImage>, dir: &std::path::Path) -> (Arc<PitView>, Arc<AtomicUsize>) {
    let breaks = Arc::new(AtomicUsize::new(0));
    let b = breaks.clone();
    let v = PitView::new(
        disk.clone(),
        CHUNK,
        dir,
        Box::new(move |_| {
            b.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    (Arc::new(v), breaks)
}

/// A guest write as the device does it: preserve, then write.
fn guest_write(views: &Views, disk: &dyn BlockImage, off: u64, data: &[u8]) {
    views.before_write(off, data.len() as u64);
    disk.write_at(data, off).unwrap();
}

fn read_view(v: &PitView, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    v.read(off, &mut buf).unwrap();
    buf
}

#[test]
fn the_view_keeps_the_old_contents_and_stores_only_what_was_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_with(0xaa);
    let views = Views::default();
    let (v, breaks) = view_of(&disk, dir.path());
    views.add(v.clone());
    // Unaligned writes spanning chunk boundaries, and a rewrite of a preserved chunk.
    guest_write(&views, &*disk, 1000, &vec![0xbb; 200_000]);
    guest_write(&views, &*disk, 3 * CHUNK + 5, &[0xcc; 10]);
    guest_write(&views, &*disk, 1000, &[0xdd; 100]);
    assert_eq!(read_view(&v, 0, SIZE as usize), vec![0xaa; SIZE as usize]);
    // Chunks 0..=3 were preserved (200_000 + 1000 bytes end in chunk 3).
    assert_eq!(v.stored_bytes(), 4 * CHUNK);
    let mut now = vec![0; 16];
    disk.read_at(&mut now, 1000).unwrap();
    assert_eq!(now, vec![0xdd; 16], "the disk has the new data");
    assert_eq!(breaks.load(Ordering::SeqCst), 0);
    views.remove(&v);
    guest_write(&views, &*disk, 2 << 20, &[1; 4096]);
    assert_eq!(v.stored_bytes(), 4 * CHUNK, "a removed view copies nothing");
}

#[test]
fn zero_chunks_are_remembered_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_with(0);
    let views = Views::default();
    let (v, _) = view_of(&disk, dir.path());
    views.add(v.clone());
    guest_write(&views, &*disk, 0, &vec![7; 3 * CHUNK as usize]);
    disk.discard(CHUNK * 10, CHUNK * 2).unwrap();
    assert_eq!(v.stored_bytes(), 0);
    assert_eq!(
        read_view(&v, 0, 4 * CHUNK as usize),
        vec![0; 4 * CHUNK as usize]
    );
    let st = v.block_status(0, SIZE).unwrap();
    assert!(
        !st[0].data && st[0].zero,
        "preserved zeroes read as a zero hole: {st:?}"
    );
}

#[test]
fn concurrent_writers_and_readers_never_see_new_data() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_with(0x11);
    let views = Arc::new(Views::default());
    let (v, _) = view_of(&disk, dir.path());
    views.add(v.clone());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (views, disk) = (views.clone(), disk.clone());
            s.spawn(move || {
                let mut x = t * 7919 + 1;
                for _ in 0..300 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 20) % (SIZE - 70_000);
                    let len = 1 + (x >> 8) as usize % 70_000;
                    guest_write(&views, &*disk, off, &vec![0x22 + t as u8; len]);
                }
            });
        }
        for r in 0..2u64 {
            let v = v.clone();
            s.spawn(move || {
                let mut x = r + 99;
                for _ in 0..300 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 20) % (SIZE - 300_000);
                    let len = 1 + (x >> 8) as usize % 300_000;
                    let got = read_view(&v, off, len);
                    assert!(got.iter().all(|&b| b == 0x11), "new data at {off}+{len}");
                }
            });
        }
    });
    assert_eq!(read_view(&v, 0, SIZE as usize), vec![0x11; SIZE as usize]);
}

#[test]
fn ranges_past_the_end_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_with(1);
    let (v, _) = view_of(&disk, dir.path());
    let mut buf = [0u8; 2];
    assert!(v.read(SIZE - 1, &mut buf).is_err());
    assert!(v.block_status(SIZE, 1).is_err());
    assert!(v.block_status(0, 0).is_err());
    // A write reaching past the end preserves what exists and nothing else.
    v.preserve(SIZE - 10, 100);
    assert_eq!(v.stored_bytes(), CHUNK);
}

#[test]
fn a_full_store_breaks_the_view_not_the_write() {
    let disk = disk_with(0x33);
    let breaks = Arc::new(AtomicUsize::new(0));
    let b = breaks.clone();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open("/dev/full")
        .unwrap();
    let v = Arc::new(PitView::with_store(
        disk.clone(),
        CHUNK,
        full,
        std::path::Path::new("/dev"),
        Box::new(move |why| {
            assert!(why.contains("fleecing store"), "{why}");
            b.fetch_add(1, Ordering::SeqCst);
        }),
    ));
    let views = Views::default();
    views.add(v.clone());
    // Reads work until a copy fails.
    assert_eq!(read_view(&v, 0, 10), vec![0x33; 10]);
    guest_write(&views, &*disk, 0, &[0x44; 4096]);
    guest_write(&views, &*disk, CHUNK * 5, &[0x44; 4096]);
    let mut now = [0u8; 4];
    disk.read_at(&mut now, CHUNK * 5).unwrap();
    assert_eq!(now, [0x44; 4], "the guest's writes landed");
    assert_eq!(breaks.load(Ordering::SeqCst), 1, "told once");
    assert!(v.broken().is_some());
    let mut buf = [0u8; 10];
    assert!(
        v.read(CHUNK * 20, &mut buf).is_err(),
        "a broken view reads nothing"
    );
}

#[test]
fn writers_that_do_not_wait_are_woken_when_their_copies_are_done() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_with(0x21);
    let views = Views::default();
    let (v, _) = view_of(&disk, dir.path());
    views.add(v.clone());
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx = std::sync::Mutex::new(tx);
    let waker: qcow2::Waker = Arc::new(move || {
        let _ = tx.lock().unwrap().send(());
    });
    // 40 writers' worth of ranges at once; each asks again when woken.
    let ranges: Vec<(u64, u64)> = (0..40u64).map(|i| (i * 100_000, 4096)).collect();
    let mut pending: Vec<(u64, u64)> = ranges
        .iter()
        .copied()
        .filter(|&(o, l)| !views.try_before_write(o, l, &waker))
        .collect();
    assert!(
        !pending.is_empty(),
        "first overwrites must wait for their copies"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !pending.is_empty() {
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("a waiting writer was never woken");
        pending.retain(|&(o, l)| !views.try_before_write(o, l, &waker));
        assert!(std::time::Instant::now() < deadline);
    }
    for (o, l) in ranges {
        disk.write_at(&vec![0x99; l as usize], o).unwrap();
    }
    assert_eq!(read_view(&v, 0, SIZE as usize), vec![0x21; SIZE as usize]);
    // Preserved ranges are ready at once.
    assert!(views.try_before_write(0, 4096, &waker));
}
