//! The crash-consistency shadow against the in-memory image: arming, recovery after a
//! "crash" (a copy of the durable state taken at any moment), removal on a clean store,
//! trust rules, coverage across directory rewrites and merges, failures.

use std::sync::Arc;

use crate::format::FLAG_IN_USE;
use crate::shadow::{Cover, AUTOCLEAR_SHADOW, EXT_SHADOW};
use crate::testing::MemImage;
use crate::{AddOptions, Bitmaps, DirtyBitmap, MergeSource, OpenOptions};
use qcow2::{HeaderUpdate, ImageMetadata, AUTOCLEAR_BITMAPS};

use super::disk_dir;

const CS: u64 = 65536;
const DISK: u64 = 256 << 20;
const MIB: u64 = 1 << 20;

fn on() -> OpenOptions {
    OpenOptions {
        crash_consistent: true,
        ..OpenOptions::default()
    }
}

fn crash(img: &MemImage) -> MemImage {
    MemImage::from_state(img.reopen_state(false))
}

/// An image with stored, enabled bitmaps b0 (64 KiB) and b1 (1 MiB) holding a few bits.
fn stored() -> MemImage {
    let img = MemImage::new(CS, DISK);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    for (n, g) in [("b0", 65536), ("b1", MIB)] {
        set.add(
            &img,
            n,
            AddOptions {
                granularity: Some(g),
                ..AddOptions::default()
            },
        )
        .unwrap();
    }
    set.mark(0, 4096);
    set.store(&img).unwrap();
    img
}

/// Opens with the shadow and runs its syncer on a thread until the set is dropped.
struct Served {
    set: Arc<Bitmaps>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn open(img: &Arc<MemImage>) -> Self {
        let set = Arc::new(Bitmaps::open_with(&**img, "disk0", on()).unwrap());
        let shadow = set.shadow().unwrap().clone();
        let img2 = img.clone();
        let syncer = std::thread::spawn(move || shadow.run_syncer(&*img2));
        Served {
            set,
            syncer: Some(syncer),
        }
    }

    /// A guest write as the daemon does it: mark, then wait for the shadow.
    fn write(&self, offset: u64, len: u64) {
        self.set.mark(offset, len);
        self.set.shadow().unwrap().cover(offset, len).unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.set.shadow().unwrap().shutdown();
        if let Some(t) = self.syncer.take() {
            t.join().unwrap();
        }
    }
}

fn set_ranges(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
    bm.dirty_extents().collect()
}

fn covers(bm: &DirtyBitmap, offset: u64, len: u64) -> bool {
    let g = bm.granularity();
    (offset / g..=(offset + len - 1) / g).all(|i| bm.get(i * g))
}

#[test]
fn open_arms_the_shadow_and_a_crash_recovers_every_write() {
    let img = Arc::new(stored());
    let writes = [
        (5 * MIB, 4096),
        (100 * MIB + 12345, 70000),
        (DISK - 512, 512),
    ];
    let crashed = {
        let s = Served::open(&img);
        assert!(s.set.shadow().unwrap().is_armed());
        assert_ne!(img.autoclear_features() & AUTOCLEAR_SHADOW, 0);
        assert!(img.header_extension(EXT_SHADOW).is_some());
        assert!(disk_dir(&img).iter().all(|d| d.flags & FLAG_IN_USE != 0));
        for (o, l) in writes {
            s.write(o, l);
        }
        crash(&img)
    };
    let set = Bitmaps::open_with(&crashed, "disk0", OpenOptions::default()).unwrap();
    assert_eq!(set.recovered().len(), 2, "{:?}", set.recovered());
    for name in ["b0", "b1"] {
        let bm = set.bitmap(name).unwrap();
        assert!(covers(&bm, 0, 4096), "{name}: the stored bit");
        for (o, l) in writes {
            assert!(covers(&bm, o, l), "{name} lacks {o}+{l}");
        }
        // The shadow is 1 MiB per bit: b0 (64 KiB) gets whole MiBs, nothing more.
        let dirty: u64 = set_ranges(&bm).iter().map(|r| r.1).sum();
        assert!(dirty <= 5 * MIB, "{name}: {dirty} bytes dirty");
    }
    assert!(set.list().iter().all(|b| !b.inconsistent));
    // Opened without the shadow: the shadow is gone from the header.
    assert!(crashed.header_extension(EXT_SHADOW).is_none());
    assert_eq!(crashed.autoclear_features() & AUTOCLEAR_SHADOW, 0);
}

#[test]
fn a_clean_store_removes_the_shadow_and_frees_its_clusters() {
    let img = Arc::new(stored());
    let clusters = img.allocated_clusters();
    let s = Served::open(&img);
    s.write(3 * MIB, 4096);
    s.set.store(&*img).unwrap();
    assert!(!s.set.shadow().unwrap().is_armed());
    assert!(img.header_extension(EXT_SHADOW).is_none());
    assert_eq!(img.autoclear_features() & AUTOCLEAR_SHADOW, 0);
    assert_ne!(img.autoclear_features() & AUTOCLEAR_BITMAPS, 0);
    assert_eq!(img.allocated_clusters(), clusters, "no cluster leaked");
    // Served again (a frontend reconnects): armed again, then a crash recovers.
    s.set.mark_in_use_again(&*img).unwrap();
    assert!(s.set.shadow().unwrap().is_armed());
    s.write(200 * MIB, 1);
    let crashed = crash(&img);
    drop(s);
    let set = Bitmaps::open_with(&crashed, "disk0", on()).unwrap();
    let bm = set.bitmap("b0").unwrap();
    assert!(covers(&bm, 3 * MIB, 4096) && covers(&bm, 200 * MIB, 1));
}

#[test]
fn a_shadow_touched_by_another_program_is_not_trusted() {
    let img = Arc::new(stored());
    let crashed = {
        let s = Served::open(&img);
        s.write(7 * MIB, 4096);
        crash(&img)
    };
    // QEMU opening the image read-write clears the unknown autoclear bit.
    crashed
        .update_header(HeaderUpdate {
            autoclear: Some(crashed.autoclear_features() & !AUTOCLEAR_SHADOW),
            extensions: Vec::new(),
        })
        .unwrap();
    let before = crashed.allocated_clusters();
    let set = Bitmaps::open_with(&crashed, "disk0", on()).unwrap();
    assert!(set.recovered().is_empty());
    assert!(set.list().iter().all(|b| b.inconsistent));
    assert!(set.bitmap("b0").is_err());
    // Its clusters are not ours any more: neither freed nor reused.
    assert_eq!(crashed.allocated_clusters(), before);
}

#[test]
fn a_resized_disk_or_a_damaged_mask_is_not_trusted() {
    let img = Arc::new(stored());
    let crashed = {
        let s = Served::open(&img);
        s.write(7 * MIB, 4096);
        crash(&img)
    };
    let ext =
        crate::shadow::ShadowExt::parse(&crashed.header_extension(EXT_SHADOW).unwrap(), &crashed)
            .unwrap();
    {
        let mut st = crashed.state();
        st.file[ext.region_offset as usize + 9] ^= 1;
    }
    let set = Bitmaps::open_with(&crashed, "disk0", on()).unwrap();
    assert!(set.list().iter().all(|b| b.inconsistent));
}

#[test]
fn removing_a_bitmap_while_served_keeps_the_others_covered() {
    let img = Arc::new(stored());
    let crashed = {
        let s = Served::open(&img);
        s.write(9 * MIB, 4096);
        s.set.remove(&*img, "b0").unwrap();
        assert!(s.set.shadow().unwrap().is_armed());
        s.write(90 * MIB, 4096);
        crash(&img)
    };
    let set = Bitmaps::open_with(&crashed, "disk0", on()).unwrap();
    assert_eq!(set.list().len(), 1);
    let bm = set.bitmap("b1").unwrap();
    assert!(covers(&bm, 9 * MIB, 4096) && covers(&bm, 90 * MIB, 4096));
}

#[test]
fn merged_bits_survive_a_crash() {
    let img = Arc::new(stored());
    let crashed = {
        let s = Served::open(&img);
        s.set.disable("b1").unwrap();
        s.set
            .add(
                &*img,
                "tmp",
                AddOptions {
                    granularity: Some(65536),
                    persistent: false,
                    ..AddOptions::default()
                },
            )
            .unwrap();
        s.set.bitmap("tmp").unwrap().set_range(150 * MIB, 3 * MIB);
        s.set.merge("b1", &[MergeSource::Local("tmp")]).unwrap();
        crash(&img)
    };
    let set = Bitmaps::open_with(&crashed, "disk0", on()).unwrap();
    assert!(covers(&set.bitmap("b1").unwrap(), 150 * MIB, 3 * MIB));
}

#[test]
fn writes_wait_for_the_syncer_and_share_its_syncs() {
    let img = Arc::new(stored());
    let set = Bitmaps::open_with(&*img, "disk0", on()).unwrap();
    let shadow = set.shadow().unwrap().clone();
    let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w2 = woken.clone();
    let waker: qcow2::Waker = Arc::new(move || {
        w2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    // No syncer yet: first touches wait.
    for i in 0..10 {
        assert_eq!(shadow.check(i * MIB, 4096, Some(&waker)), Cover::Pending);
    }
    let s2 = shadow.clone();
    let img2 = img.clone();
    let t = std::thread::spawn(move || s2.run_syncer(&*img2));
    shadow.cover(0, 4096).unwrap();
    for i in 0..10 {
        assert_eq!(shadow.check(i * MIB, 4096, Some(&waker)), Cover::Ready);
    }
    // The syncer publishes the bits before it updates its counters and calls the
    // wakers: look at those once it has stopped.
    shadow.shutdown();
    t.join().unwrap();
    assert!(woken.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let st = shadow.stats();
    assert_eq!(st.granules, 10);
    assert!(st.syncs <= 2, "{st:?}: ten first touches share their syncs");
}

#[test]
fn a_failing_shadow_turns_itself_off_and_writes_go_on() {
    let img = Arc::new(stored());
    let s = Served::open(&img);
    let ops = img.state().ops;
    img.state().fail_op = Some(ops); // the next mutating call: the shadow write
    s.write(11 * MIB, 4096);
    assert!(!s.set.shadow().unwrap().is_armed());
    assert_eq!(img.autoclear_features() & AUTOCLEAR_SHADOW, 0);
    let crashed = crash(&img);
    drop(s);
    let set = Bitmaps::open_with(&crashed, "disk0", on()).unwrap();
    assert!(
        set.list().iter().all(|b| b.inconsistent),
        "not trusted after the failure"
    );
}

#[test]
fn without_the_option_nothing_is_armed_and_the_image_stays_qemus() {
    let img = stored();
    let set = Bitmaps::open(&img, "disk0").unwrap();
    assert!(!set.shadow().unwrap().is_armed());
    assert!(img.header_extension(EXT_SHADOW).is_none());
    assert_eq!(img.autoclear_features() & AUTOCLEAR_SHADOW, 0);
}
