//! Load, in-use, store, operations and the read-only path against the in-memory image.

use std::sync::Arc;

use super::{bits, disk_dir, install_directory, raw_entry, zero_table};
use crate::error::Error;
use crate::format::{FLAG_AUTO, FLAG_IN_USE};
use crate::testing::{MemImage, Op};
use crate::{AddOptions, Bitmaps, MergeSource};
use qcow2::{ImageMetadata, AUTOCLEAR_BITMAPS, EXT_BITMAPS};

const CS: u64 = 65536;
const DISK: u64 = 64 << 20;

fn reopen(img: &MemImage, ro: bool) -> MemImage {
    MemImage::from_state(img.reopen_state(ro))
}

fn opts(g: u64) -> AddOptions {
    AddOptions {
        granularity: Some(g),
        ..AddOptions::default()
    }
}

/// An image with stored bitmaps b0 (enabled, 64 KiB) and b1 (disabled, 4 KiB).
fn stored_image() -> (MemImage, Vec<u8>, Vec<u8>) {
    let img = MemImage::new(CS, DISK);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    set.add(&img, "b0", opts(65536)).unwrap();
    set.add(
        &img,
        "b1",
        AddOptions {
            granularity: Some(4096),
            persistent: true,
            disabled: true,
        },
    )
    .unwrap();
    set.mark(65536, 4096);
    set.mark(16 * 65536, 65537);
    set.bitmap("b1").unwrap().set_range(40 << 20, 1 << 20);
    set.store(&img).unwrap();
    let b0 = bits(&set.bitmap("b0").unwrap());
    let b1 = bits(&set.bitmap("b1").unwrap());
    (img, b0, b1)
}

#[test]
fn add_mark_store_load_round_trip() {
    let (img, b0, b1) = stored_image();
    assert_eq!(&b0[..3], &[0x02, 0x00, 0x03], "QEMU's bit order");
    let dir = disk_dir(&img);
    assert_eq!(dir.len(), 2);
    assert_eq!(dir[0].flags, FLAG_AUTO);
    assert_eq!(dir[1].flags, 0);
    assert_eq!(dir[0].granularity_bits, 16);
    assert_eq!(dir[1].granularity_bits, 12);
    assert_eq!(img.autoclear_features() & AUTOCLEAR_BITMAPS, 1);

    let ro = reopen(&img, true);
    let set = Bitmaps::open(&ro, "disk0").unwrap();
    assert_eq!(bits(&set.bitmap("b0").unwrap()), b0);
    assert_eq!(bits(&set.bitmap("b1").unwrap()), b1);
    let l = set.list();
    assert_eq!(l[0].name, "b0");
    assert!(l[0].enabled && !l[1].enabled);
    assert_eq!(l[0].disk_flags(), vec!["auto"]);
    assert!(l[1].disk_flags().is_empty());
    assert_eq!(l[0].dirty_bytes, 3 * 65536);
    assert_eq!(l[1].dirty_bytes, 1 << 20);
    assert!(ro.state().log.is_empty(), "read-only open writes nothing");
    // read-only: marks are ignored, changes refused, store is a no-op
    set.mark(0, 1 << 20);
    assert_eq!(bits(&set.bitmap("b0").unwrap()), b0);
    assert!(matches!(set.clear("b0"), Err(Error::ReadOnly(_))));
    assert!(matches!(set.remove(&ro, "b0"), Err(Error::ReadOnly(_))));
    set.store(&ro).unwrap();
    assert!(ro.state().log.is_empty());
}

#[test]
fn store_writes_only_dirty_clusters_then_table_then_directory_then_header() {
    // 512-byte clusters so a bitmap spans several data clusters.
    let img = MemImage::new(512, 64 << 20);
    let set = Bitmaps::open(&img, "n").unwrap();
    // 64 MiB at 4 KiB = 16384 bits = 2048 bytes = 4 clusters; dirty only cluster 2.
    set.add(&img, "b", opts(4096)).unwrap();
    set.mark(2 * 512 * 8 * 4096 + 4096, 1);
    img.state().log.clear();
    set.store(&img).unwrap();
    let log = img.state().log.clone();
    let kinds: Vec<&str> = log
        .iter()
        .map(|o| match o {
            Op::Alloc { .. } => "alloc",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Header { .. } => "header",
            Op::Free { .. } => "free",
        })
        .collect();
    assert_eq!(
        kinds,
        ["alloc", "write", "alloc", "write", "alloc", "write", "flush", "header"]
    );
    let Op::Alloc {
        offset: data,
        count: 1,
    } = log[0]
    else {
        panic!("{log:?}")
    };
    assert_eq!(
        log[1],
        Op::Write {
            offset: data,
            len: 512
        }
    );
    let Op::Write {
        offset: toff,
        len: 32,
    } = log[3]
    else {
        panic!("{log:?}")
    };
    let mut t = [0u8; 32];
    img.read_metadata(qcow2::HostOffset(toff), &mut t).unwrap();
    let entries: Vec<u64> = t
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(entries, vec![0, 0, data, 0]);
    let Op::Header {
        autoclear,
        bitmaps_ext: Some(x),
    } = &log[7]
    else {
        panic!()
    };
    assert_eq!(autoclear & 1, 1);
    assert_eq!(x.len(), 24);
    // data cluster content: byte 1 bit 0 of the third cluster is bit 2*4096+1 → byte 1 = 0x02
    let mut c = [0u8; 512];
    img.read_metadata(qcow2::HostOffset(data), &mut c).unwrap();
    assert_eq!(c[0], 0x02);
    assert!(c[1..].iter().all(|&b| b == 0), "tail zero-filled");
}

#[test]
fn open_rw_sets_in_use_in_qemu_order() {
    let (img, b0, _) = stored_image();
    let img = reopen(&img, false);
    let ext_before = img.header_extension(EXT_BITMAPS).unwrap();
    let set = Bitmaps::open(&img, "disk0").unwrap();
    let log = img.state().log.clone();
    let dir_off = u64::from_be_bytes(ext_before[16..24].try_into().unwrap());
    let dir_size = u64::from_be_bytes(ext_before[8..16].try_into().unwrap());
    assert_eq!(
        log,
        vec![
            Op::Header {
                autoclear: 0,
                bitmaps_ext: Some(ext_before.clone())
            },
            Op::Write {
                offset: dir_off,
                len: dir_size
            },
            Op::Header {
                autoclear: 0,
                bitmaps_ext: Some(ext_before.clone())
            },
            Op::Header {
                autoclear: 1,
                bitmaps_ext: Some(ext_before.clone())
            },
        ]
    );
    let dir = disk_dir(&img);
    assert_eq!(dir[0].flags, FLAG_AUTO | FLAG_IN_USE);
    assert_eq!(dir[1].flags, FLAG_IN_USE);
    assert_eq!(bits(&set.bitmap("b0").unwrap()), b0);
    assert_eq!(set.list()[0].disk_flags(), vec!["in-use", "auto"]);
    // A crash now: the next open sees both bitmaps inconsistent.
    let crashed = reopen(&img, true);
    let c = Bitmaps::open(&crashed, "disk0").unwrap();
    let l = c.list();
    assert!(l
        .iter()
        .all(|i| i.inconsistent && !i.enabled && i.count == 0));
    assert_eq!(
        c.clear("b0").unwrap_err().to_string(),
        "Bitmap 'b0' is inconsistent and cannot be used"
    );
    assert_eq!(
        c.clear("b0").unwrap_err().hint(),
        Some("Try block-dirty-bitmap-remove to delete this bitmap from disk")
    );
}

#[test]
fn store_after_rw_open_clears_in_use_frees_old_and_in_use_again() {
    let (img, _, _) = stored_image();
    let clusters = img.allocated_clusters();
    let img = reopen(&img, false);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    set.mark(32 << 20, 1);
    let b0 = bits(&set.bitmap("b0").unwrap());
    set.store(&img).unwrap();
    assert_eq!(
        img.allocated_clusters(),
        clusters,
        "old tables, data and directory freed"
    );
    let dir = disk_dir(&img);
    assert_eq!(dir[0].flags, FLAG_AUTO);
    assert_eq!(dir[1].flags, 0);
    // the daemon goes on: flag in-use again, in place
    img.state().log.clear();
    set.mark_in_use_again(&img).unwrap();
    assert_eq!(img.state().log.len(), 4);
    assert!(disk_dir(&img).iter().all(|d| d.flags & FLAG_IN_USE != 0));
    // a second call changes nothing
    img.state().log.clear();
    set.mark_in_use_again(&img).unwrap();
    assert!(img.state().log.is_empty());
    set.store(&img).unwrap();
    let ro = reopen(&img, true);
    let again = Bitmaps::open(&ro, "disk0").unwrap();
    assert_eq!(bits(&again.bitmap("b0").unwrap()), b0);
    assert_eq!(img.allocated_clusters(), clusters);
}

#[test]
fn inconsistent_bitmaps_are_kept_listed_and_only_removable() {
    let img = MemImage::new(CS, DISK);
    let t0 = zero_table(&img, 1);
    let t1 = zero_table(&img, 1);
    let mut dir = raw_entry(t0, 1, FLAG_AUTO, 1, 16, b"good", &[]);
    let bad_entry = raw_entry(t1, 1, FLAG_IN_USE | FLAG_AUTO, 1, 16, b"stale", &[]);
    dir.extend(&bad_entry);
    install_directory(&img, &dir, 2);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    let l = set.list();
    assert_eq!(l.len(), 2);
    assert!(!l[0].inconsistent && l[1].inconsistent);
    for r in [
        set.clear("stale"),
        set.enable("stale"),
        set.disable("stale"),
        set.merge("stale", &[MergeSource::Local("good")]),
        set.merge("good", &[MergeSource::Local("stale")]),
        set.dump("stale").map(|_| ()),
    ] {
        assert_eq!(
            r.unwrap_err().to_string(),
            "Bitmap 'stale' is inconsistent and cannot be used"
        );
    }
    set.mark(0, 1);
    set.store(&img).unwrap();
    let d = disk_dir(&img);
    assert_eq!(d[0].name, b"good");
    assert_eq!(d[0].flags, FLAG_AUTO);
    assert_eq!(d[1].name, b"stale");
    assert_eq!(
        (d[1].table_offset, d[1].flags),
        (t1, FLAG_IN_USE | FLAG_AUTO),
        "kept as it was"
    );
    // The same name cannot be added again while it exists (QEMU 10's text, also for
    // an inconsistent bitmap).
    let e = set.add(&img, "stale", AddOptions::default()).unwrap_err();
    assert_eq!(e.to_string(), "Bitmap already exists: stale");
    let before = img.allocated_clusters();
    set.remove(&img, "stale").unwrap();
    assert_eq!(
        img.allocated_clusters(),
        before - 1,
        "its table cluster freed"
    );
    let d = disk_dir(&img);
    assert_eq!(d.len(), 1);
    set.add(&img, "stale", AddOptions::default()).unwrap();
}

#[test]
fn remove_last_bitmap_drops_extension_and_frees_everything() {
    let (img, _, _) = stored_image();
    let img = reopen(&img, false);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    set.remove(&img, "b0").unwrap();
    assert_eq!(disk_dir(&img).len(), 1);
    set.remove(&img, "b1").unwrap();
    assert!(img.header_extension(EXT_BITMAPS).is_none());
    assert_eq!(img.autoclear_features() & AUTOCLEAR_BITMAPS, 0);
    assert_eq!(img.allocated_clusters(), 1, "only the header is left");
    assert!(set.list().is_empty());
    assert!(matches!(set.remove(&img, "b0"), Err(Error::NotFound(_))));
    set.store(&img).unwrap();
    assert!(img.header_extension(EXT_BITMAPS).is_none());
}

#[test]
fn lost_autoclear_drops_the_extension_on_rw_open_only() {
    let (img, _, _) = stored_image();
    img.state().autoclear = 0;
    let ro = reopen(&img, true);
    let set = Bitmaps::open(&ro, "disk0").unwrap();
    assert!(set.list().is_empty());
    assert!(ro.header_extension(EXT_BITMAPS).is_some());
    assert!(ro.state().log.is_empty());
    let rw = reopen(&img, false);
    let set = Bitmaps::open(&rw, "disk0").unwrap();
    assert!(set.list().is_empty());
    assert!(rw.header_extension(EXT_BITMAPS).is_none());
    assert_eq!(rw.state().log.len(), 1);
    // names are free again
    set.add(&rw, "b0", AddOptions::default()).unwrap();
    set.store(&rw).unwrap();
    assert_eq!(disk_dir(&rw).len(), 1);
    // the bad extension length is checked before the autoclear bit
    let img = MemImage::new(CS, DISK);
    img.state().extensions.insert(EXT_BITMAPS, vec![0; 16]);
    assert_eq!(
        Bitmaps::open(&img, "d").unwrap_err().to_string(),
        "bitmaps_ext: Invalid extension length"
    );
}

#[test]
fn add_checks_follow_qemu() {
    let img = MemImage::new(CS, DISK);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    assert_eq!(
        set.add(&img, "", AddOptions::default())
            .unwrap_err()
            .to_string(),
        "Bitmap name cannot be empty"
    );
    for g in [0, 256, 3000, 65535] {
        assert_eq!(
            set.add(&img, "x", opts(g)).unwrap_err().to_string(),
            "Granularity must be power of 2 and at least 512"
        );
    }
    set.add(&img, "a", AddOptions::default()).unwrap();
    assert_eq!(
        set.add(&img, "a", AddOptions::default())
            .unwrap_err()
            .to_string(),
        "Bitmap already exists: a"
    );
    let long = "n".repeat(1024);
    assert_eq!(
        set.add(&img, &long, AddOptions::default()).unwrap_err().to_string(),
        format!("Can't make bitmap '{long}' persistent in 'disk0': Name length exceeds maximum (1023 characters)")
    );
    assert_eq!(
        set.add(&img, "g", opts(1 << 32)).unwrap_err().to_string(),
        "Can't make bitmap 'g' persistent in 'disk0': Granularity exceeds maximum (2147483648 bytes)"
    );
    // default granularity: cluster size clamped to 4 KiB..64 KiB
    for (cs, g) in [
        (512u64, 4096u64),
        (65536, 65536),
        (2 << 20, 65536),
        (16384, 16384),
    ] {
        let i = MemImage::new(cs, DISK);
        let s = Bitmaps::open(&i, "d").unwrap();
        s.add(&i, "d", AddOptions::default()).unwrap();
        assert_eq!(s.list()[0].granularity, g);
    }
    // too big: 1 TiB at 512 B
    let big = MemImage::new(CS, 1 << 40);
    let s = Bitmaps::open(&big, "big").unwrap();
    assert_eq!(
        s.add(&big, "b", opts(512)).unwrap_err().to_string(),
        "Can't make bitmap 'b' persistent in 'big': Too much space will be occupied by the bitmap. Use larger granularity"
    );
    // v2 images
    let v2 = MemImage::new(CS, DISK);
    v2.state().version = 2;
    let s = Bitmaps::open(&v2, "v2").unwrap();
    assert_eq!(
        s.add(&v2, "b", AddOptions::default())
            .unwrap_err()
            .to_string(),
        "Can't make bitmap 'b' persistent in 'v2': Cannot store dirty bitmaps in qcow2 v2 files"
    );
    s.add(
        &v2,
        "t",
        AddOptions {
            persistent: false,
            ..AddOptions::default()
        },
    )
    .unwrap();
    s.store(&v2).unwrap();
    assert!(
        v2.header_extension(EXT_BITMAPS).is_none(),
        "transient bitmaps are not stored"
    );
}

#[test]
fn enable_disable_clear_merge_dump() {
    let img = MemImage::new(CS, DISK);
    let set = Bitmaps::open(&img, "d").unwrap();
    set.add(&img, "a", opts(65536)).unwrap();
    set.add(
        &img,
        "b",
        AddOptions {
            granularity: Some(4096),
            disabled: true,
            ..AddOptions::default()
        },
    )
    .unwrap();
    set.mark(0, 4096);
    assert_eq!(set.list()[1].count, 0, "disabled bitmaps do not record");
    set.enable("b").unwrap();
    set.mark(1 << 20, 1);
    set.disable("a").unwrap();
    set.mark(2 << 20, 1);
    let l = set.list();
    assert_eq!((l[0].count, l[1].count), (2, 2));
    // merge b into a (different granularity): a gets 1 MiB and 2 MiB granules
    set.merge("a", &[MergeSource::Local("b")]).unwrap();
    let ext: Vec<(u64, u64)> = set.bitmap("a").unwrap().dirty_extents().collect();
    assert_eq!(ext, vec![(0, 65536), (1 << 20, 65536), (2 << 20, 65536)]);
    let d = set.dump("a").unwrap();
    assert_eq!(d.first().map(|e| (e.start, e.dirty)), Some((0, true)));
    assert_eq!(d.iter().map(|e| e.length).sum::<u64>(), DISK);
    // merge from another image's set
    let other_img = MemImage::new(CS, DISK);
    let other = Bitmaps::open(&other_img, "o").unwrap();
    other.add(&other_img, "x", opts(65536)).unwrap();
    other.mark(10 << 20, 1);
    set.merge("b", &[MergeSource::Other(&other, "x")]).unwrap();
    assert!(set.bitmap("b").unwrap().get(10 << 20));
    // incompatible sizes, missing names
    let small_img = MemImage::new(CS, DISK / 2);
    let small = Bitmaps::open(&small_img, "s").unwrap();
    small.add(&small_img, "y", AddOptions::default()).unwrap();
    let before = bits(&set.bitmap("a").unwrap());
    assert_eq!(
        set.merge(
            "a",
            &[MergeSource::Local("b"), MergeSource::Other(&small, "y")]
        )
        .unwrap_err()
        .to_string(),
        "Bitmaps are incompatible and can't be merged"
    );
    assert_eq!(
        bits(&set.bitmap("a").unwrap()),
        before,
        "target unchanged on error"
    );
    assert_eq!(
        set.merge("a", &[MergeSource::Local("zz")])
            .unwrap_err()
            .to_string(),
        "Dirty bitmap 'zz' not found"
    );
    set.clear("a").unwrap();
    assert_eq!(set.list()[0].count, 0);
    // flags follow enabled state on store
    set.store(&img).unwrap();
    let dir = disk_dir(&img);
    assert_eq!((dir[0].flags, dir[1].flags), (0, FLAG_AUTO));
}

#[test]
fn resize_is_refused_with_persistent_bitmaps() {
    let img = MemImage::new(CS, DISK);
    let set = Bitmaps::open(&img, "d").unwrap();
    set.check_resize().unwrap();
    set.add(
        &img,
        "t",
        AddOptions {
            persistent: false,
            ..AddOptions::default()
        },
    )
    .unwrap();
    set.check_resize().unwrap();
    set.add(&img, "p", AddOptions::default()).unwrap();
    let e = set.check_resize().unwrap_err();
    assert!(
        e.to_string().contains("persistent dirty bitmaps (p)"),
        "{e}"
    );
}

#[test]
fn marking_is_concurrent_with_add_and_remove() {
    let img = Arc::new(MemImage::new(CS, DISK));
    let set = Arc::new(Bitmaps::open(&*img, "d").unwrap());
    set.add(&*img, "keep", opts(65536)).unwrap();
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let set = set.clone();
            std::thread::spawn(move || {
                for i in 0..20_000u64 {
                    set.mark(((i * 2 + t) % 1024) * 65536, 512);
                }
            })
        })
        .collect();
    for i in 0..50 {
        let n = format!("tmp{i}");
        set.add(
            &*img,
            &n,
            AddOptions {
                persistent: false,
                ..AddOptions::default()
            },
        )
        .unwrap();
        set.remove(&*img, &n).unwrap();
    }
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(set.bitmap("keep").unwrap().count(), 1024);
}

#[test]
fn v2_image_bitmaps_are_dropped_without_touching_autoclear() {
    let (img, _, _) = stored_image();
    let mut st = img.reopen_state(false);
    st.version = 2;
    st.autoclear = 0; // v2 has no autoclear field
    let v2 = MemImage::from_state(st);
    let set = Bitmaps::open(&v2, "old").unwrap();
    assert!(set.list().is_empty());
    assert!(v2.header_extension(EXT_BITMAPS).is_none());
    assert_eq!(
        v2.state().log,
        vec![Op::Header {
            autoclear: 0,
            bitmaps_ext: None
        }],
        "one header rewrite that only drops the extension"
    );
    assert!(crate::WARN_LOST_V2.starts_with("This qcow2 v2 image contains bitmaps"));
}

#[test]
fn lost_autoclear_warns_with_qemu_text() {
    super::logs();
    let (img, _, _) = stored_image();
    img.state().autoclear = 0;
    let ro = reopen(&img, true);
    Bitmaps::open(&ro, "disk0").unwrap();
    let l = super::logs();
    let warned = |t: &str| l.iter().any(|(lvl, m)| *lvl == log::Level::Warn && m == t);
    assert!(warned(
        "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
    ));
    assert!(warned(
        "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
    ));
}

#[test]
fn store_while_marking_then_final_store_saves_everything() {
    let img = Arc::new(MemImage::new(4096, DISK));
    let set = Arc::new(Bitmaps::open(&*img, "d").unwrap());
    set.add(&*img, "a", opts(4096)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (set, stop) = (set.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while i < 100_000 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                set.mark((i * 7919 * 4096) % DISK, 4096);
                i += 1;
            }
        })
    };
    for _ in 0..10 {
        set.store(&*img).unwrap();
        set.mark_in_use_again(&*img).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    worker.join().unwrap();
    set.store(&*img).unwrap();
    let want = bits(&set.bitmap("a").unwrap());
    assert!(want.iter().any(|&b| b != 0));
    let ro = reopen(&img, true);
    let got = Bitmaps::open(&ro, "d").unwrap();
    assert_eq!(bits(&got.bitmap("a").unwrap()), want);
    // header + table + dirty data clusters + directory: nothing leaked over 11 stores
    let data = want
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count();
    assert_eq!(img.allocated_clusters(), 1 + 1 + data + 1);
}
