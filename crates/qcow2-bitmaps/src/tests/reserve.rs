//! The store reserve: sized for every bit set, used by the store (which then succeeds on
//! a full file system), kept up to date by add / remove / transactions, released by a
//! successful store, reported (never an error) when it cannot be made.

use std::collections::BTreeSet;

use super::{bits, disk_dir, logs};
use crate::error::Error;
use crate::testing::{MemImage, Op};
use crate::{Action, AddOptions, Bitmaps, OpenOptions, TxnOptions};
use qcow2::ImageMetadata;

/// Small clusters, so that one bitmap's worst case spans many of them.
const CS: u64 = 512;
const DISK: u64 = 256 << 20;

fn reserving() -> OpenOptions {
    OpenOptions {
        reserve: true,
        ..OpenOptions::default()
    }
}

fn gran(g: u64) -> AddOptions {
    AddOptions {
        granularity: Some(g),
        ..AddOptions::default()
    }
}

fn reopen(img: &MemImage, ro: bool) -> MemImage {
    MemImage::from_state(img.reopen_state(ro))
}

/// An image with stored bitmaps b0 (512 B granularity) and b1 (64 KiB), a few bits set.
fn stored() -> MemImage {
    let img = MemImage::new(CS, DISK);
    let set = Bitmaps::open(&img, "d").unwrap();
    set.add(&img, "b0", gran(512)).unwrap();
    set.add(&img, "b1", gran(65536)).unwrap();
    set.mark(1 << 20, 4096);
    set.store(&img).unwrap();
    img
}

/// Worst case of b0 + b1 on a 256 MiB disk with 512 B clusters: b0 has 2^19 bits =
/// 64 KiB of data = 128 clusters and a table of 128 entries (1 KiB = 2 clusters); b1
/// has 4096 bits = 512 bytes = 1 cluster and a 1-cluster table; the directory (two
/// 32-byte entries) 1 cluster.
const WORST: u64 = 128 + 2 + 1 + 1 + 1;

/// Every cluster the on-disk state references: header, directory, tables, data.
fn referenced(img: &MemImage) -> BTreeSet<u64> {
    let cs = img.cluster_size();
    let mut r = BTreeSet::from([0]);
    if let Some(x) = img.header_extension(qcow2::EXT_BITMAPS) {
        let ext = crate::format::BitmapsExt::parse(&x, cs).unwrap();
        for c in 0..ext.directory_size.div_ceil(cs) {
            r.insert(ext.directory_offset / cs + c);
        }
    }
    for e in disk_dir(img) {
        for c in 0..(e.table_size as u64 * 8).div_ceil(cs) {
            r.insert(e.table_offset / cs + c);
        }
        for te in crate::table::read_table(img, &e).unwrap() {
            if let crate::format::TableEntry::Data(off) = te {
                r.insert(off / cs);
            }
        }
    }
    r
}

fn allocated(img: &MemImage) -> BTreeSet<u64> {
    img.state()
        .refcounts
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(&c, _)| c)
        .collect()
}

#[test]
fn the_reserve_is_the_worst_case_of_a_store() {
    let img = stored();
    let before = allocated(&img).len() as u64;
    img.state().log.clear();
    let set = Bitmaps::open_with(&img, "d", reserving()).unwrap();
    assert_eq!(set.reserved_bytes(), WORST * CS);
    assert_eq!(set.reserve_error(), None);
    assert_eq!(allocated(&img).len() as u64, before + WORST);
    // Preallocated: zeros written over every reserved cluster (the in-memory image has
    // no fallocate), the runs allocated largest first, each on its own.
    let allocs: Vec<u64> = img
        .state()
        .log
        .iter()
        .filter_map(|op| match op {
            Op::Alloc { count, .. } => Some(*count),
            _ => None,
        })
        .collect();
    assert_eq!(allocs, vec![128, 2, 1, 1, 1]);
    let l = logs();
    assert!(
        l.iter().any(|(lvl, m)| *lvl == log::Level::Info
            && m.contains(&format!(
                "reserved {WORST} cluster(s) ({} bytes) in 'd'",
                WORST * CS
            ))),
        "{l:?}"
    );
    // A non-persistent bitmap needs nothing; a persistent one its data, table and a
    // directory entry (still one cluster here).
    set.add(
        &img,
        "t",
        AddOptions {
            persistent: false,
            ..gran(512)
        },
    )
    .unwrap();
    assert_eq!(set.reserved_bytes(), WORST * CS);
    set.add(&img, "b2", gran(1 << 20)).unwrap();
    assert_eq!(set.reserved_bytes(), (WORST + 2) * CS);
    // Removing frees what the smaller set no longer needs.
    set.remove(&img, "b0").unwrap();
    assert_eq!(set.reserved_bytes(), 5 * CS);
    set.remove(&img, "b1").unwrap();
    set.remove(&img, "b2").unwrap();
    assert_eq!(set.reserved_bytes(), 0);
    assert_eq!(allocated(&img), referenced(&img));
}

#[test]
fn nothing_is_reserved_without_the_option_read_only_or_without_persistent_bitmaps() {
    let img = stored();
    let n = allocated(&img).len();
    let set = Bitmaps::open_with(&img, "d", OpenOptions::default()).unwrap();
    assert_eq!(set.reserved_bytes(), 0);
    assert_eq!(allocated(&img).len(), n);
    drop(set);
    let ro = reopen(&img, true);
    let set = Bitmaps::open_with(&ro, "d", reserving()).unwrap();
    assert_eq!(set.reserved_bytes(), 0);
    assert_eq!(allocated(&ro).len(), n);
    // No persistent bitmap: nothing; a transient one: nothing; a persistent one: its
    // worst case.
    let empty = MemImage::new(CS, DISK);
    let set = Bitmaps::open_with(&empty, "e", reserving()).unwrap();
    assert_eq!(set.reserved_bytes(), 0);
    set.add(
        &empty,
        "t",
        AddOptions {
            persistent: false,
            ..gran(512)
        },
    )
    .unwrap();
    assert_eq!(set.reserved_bytes(), 0);
    set.add(&empty, "p", gran(65536)).unwrap();
    assert_eq!(set.reserved_bytes(), 3 * CS);
}

/// Every bit of both bitmaps set, then the file system fills up: with the reserve the
/// store succeeds without a single allocation, frees everything it no longer needs and
/// leaks nothing; without it, the store fails and names both bitmaps.
#[test]
fn a_store_on_a_full_file_system_succeeds_from_the_reserve() {
    for reserve in [true, false] {
        let img = stored();
        let opts = OpenOptions {
            reserve,
            ..OpenOptions::default()
        };
        let set = Bitmaps::open_with(&img, "d", opts).unwrap();
        set.mark(0, DISK);
        {
            let mut s = img.state();
            s.file_limit = Some(s.file.len() as u64);
            s.log.clear();
        }
        let r = set.store(&img);
        if !reserve {
            match r {
                Err(Error::Lost { lost, .. }) => assert_eq!(lost, vec!["b0", "b1"]),
                other => panic!("{other:?}"),
            }
            continue;
        }
        r.unwrap();
        let log = img.state().log.clone();
        assert!(
            !log.iter().any(|op| matches!(op, Op::Alloc { .. })),
            "every cluster of the store came from the reserve: {log:?}"
        );
        assert_eq!(set.reserved_bytes(), 0, "released by the store");
        assert_eq!(allocated(&img), referenced(&img), "nothing leaked");
        let ro = reopen(&img, true);
        let got = Bitmaps::open(&ro, "d").unwrap();
        for name in ["b0", "b1"] {
            let b = got.bitmap(name).unwrap();
            assert_eq!(b.count(), b.bit_count(), "{name} stored with every bit set");
            assert_eq!(bits(&b), bits(&set.bitmap(name).unwrap()));
        }
        // Flagged in use again, still full: b0's 128 data clusters cannot be had, but
        // the 6 clusters the store freed (the old tables, data and directory, clusters
        // 1-6) serve the 2-cluster table run and the three 1-cluster runs.
        set.mark_in_use_again(&img).unwrap();
        let err = set
            .reserve_error()
            .expect("the reserve cannot be made on a full disk");
        assert!(err.contains("writing"), "{err}");
        assert_eq!(set.reserved_bytes(), 5 * CS);
        // Room again: the next fill (here: after an add) completes it.
        img.state().file_limit = None;
        set.add(&img, "b2", gran(1 << 20)).unwrap();
        assert_eq!(set.reserve_error(), None);
        assert_eq!(set.reserved_bytes(), (WORST + 2) * CS);
    }
}

/// A store that fails gives back what it took, and the set refills; a release frees
/// everything, so that a set closed after a failed store leaks nothing but what its
/// shadow and directory reference.
#[test]
fn a_failed_store_refills_and_release_frees_everything() {
    let img = stored();
    let set = Bitmaps::open_with(&img, "d", reserving()).unwrap();
    set.mark(0, 4 << 20);
    let ops = img.state().ops;
    img.state().fail_op = Some(ops + 2);
    assert!(matches!(set.store(&img), Err(Error::Lost { .. })));
    assert_eq!(
        set.reserved_bytes(),
        WORST * CS,
        "refilled after the failure"
    );
    let in_use = referenced(&img);
    assert_eq!(allocated(&img).len(), in_use.len() + WORST as usize);
    set.release_reserve(&img);
    assert_eq!(set.reserved_bytes(), 0);
    assert_eq!(allocated(&img), in_use);
    // Released for good: later operations do not fill it again until the bitmaps are
    // flagged in use again.
    set.add(&img, "b2", gran(1 << 20)).unwrap();
    assert_eq!(set.reserved_bytes(), 0);
    set.store(&img).unwrap();
    assert_eq!(allocated(&img), referenced(&img));
}

/// A transaction that persists a new bitmap while the others are in use takes what it
/// writes from the reserve and refills it for the larger set.
#[test]
fn transactions_take_from_and_grow_the_reserve() {
    let img = stored();
    let set = Bitmaps::open_with(&img, "d", reserving()).unwrap();
    img.state().log.clear();
    set.transaction(
        &img,
        &[Action::Add {
            name: "b2",
            opts: gran(1 << 20),
        }],
        TxnOptions {
            persist_new_in_use: true,
        },
    )
    .unwrap();
    assert_eq!(set.reserved_bytes(), (WORST + 2) * CS);
    // Its table (1 cluster) and the new directory (1 cluster) came from the reserve;
    // refilling for the larger set allocated the rest.
    let allocs: Vec<u64> = img
        .state()
        .log
        .iter()
        .filter_map(|op| match op {
            Op::Alloc { count, .. } => Some(*count),
            _ => None,
        })
        .collect();
    assert_eq!(allocs.iter().sum::<u64>(), 4, "{allocs:?}");
    assert_eq!(disk_dir(&img).len(), 3);
    set.store(&img).unwrap();
    assert_eq!(allocated(&img), referenced(&img));
}
