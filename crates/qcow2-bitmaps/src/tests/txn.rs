//! Transactions: all or nothing, one directory write, and atomic with respect to writes
//! that mark concurrently.

use std::sync::{Arc, Barrier};

use super::{bits, disk_dir};
use crate::error::Error;
use crate::format::{FLAG_AUTO, FLAG_IN_USE};
use crate::testing::MemImage;
use crate::{Action, AddOptions, Bitmaps, MergeSource, TxnOptions};

const CS: u64 = 65536;
const DISK: u64 = 64 << 20;
const G: u64 = 65536;

fn set_with_b0(img: &MemImage) -> Bitmaps {
    let set = Bitmaps::open(img, "disk0").unwrap();
    set.add(
        img,
        "b0",
        AddOptions {
            granularity: Some(G),
            ..AddOptions::default()
        },
    )
    .unwrap();
    set
}

fn in_use() -> TxnOptions {
    TxnOptions {
        persist_new_in_use: true,
    }
}

#[test]
fn a_failing_action_leaves_everything_as_it_was() {
    let img = MemImage::new(CS, DISK);
    let set = set_with_b0(&img);
    set.mark(0, 4096);
    let before = bits(&set.bitmap("b0").unwrap());
    let e = set
        .transaction(
            &img,
            &[
                Action::Add {
                    name: "x",
                    opts: AddOptions::default(),
                },
                Action::Clear { name: "b0" },
                Action::Disable { name: "b0" },
                Action::Remove { name: "nope" },
            ],
            in_use(),
        )
        .unwrap_err();
    assert_eq!(e.index, 3);
    assert_eq!(e.error.to_string(), "Dirty bitmap 'nope' not found");
    let names: Vec<String> = set.list().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["b0"]);
    assert_eq!(bits(&set.bitmap("b0").unwrap()), before);
    assert!(set.list()[0].enabled);
    assert!(disk_dir(&img).is_empty(), "nothing was written");
    // Names resolve in order: adding twice fails at the second add.
    let e = set
        .transaction(
            &img,
            &[
                Action::Add {
                    name: "y",
                    opts: AddOptions::default(),
                },
                Action::Add {
                    name: "y",
                    opts: AddOptions::default(),
                },
            ],
            in_use(),
        )
        .unwrap_err();
    assert_eq!(
        (e.index, e.error.to_string()),
        (1, "Bitmap already exists: y".into())
    );
    assert!(matches!(
        set.transaction(&img, &[Action::Clear { name: "zz" }], in_use())
            .unwrap_err()
            .error,
        Error::NotFound(_)
    ));
}

#[test]
fn checkpoint_adds_on_disk_in_use_and_merges_in_order() {
    let img = MemImage::new(CS, DISK);
    let set = set_with_b0(&img);
    set.mark(3 * G, 1);
    set.transaction(
        &img,
        &[
            Action::Add {
                name: "inc1",
                opts: AddOptions::default(),
            },
            Action::Disable { name: "b0" },
            Action::Add {
                name: "copy",
                opts: AddOptions {
                    granularity: Some(G),
                    persistent: false,
                    disabled: true,
                },
            },
            Action::Merge {
                target: "copy",
                sources: vec![MergeSource::Local("b0")],
            },
        ],
        in_use(),
    )
    .unwrap();
    // The persistent new bitmap is on disk at once, flagged in use (b0 is not on disk
    // yet: it was added in memory and is stored by the next store).
    let dir = disk_dir(&img);
    assert_eq!(dir.len(), 1);
    assert_eq!(dir[0].name, b"inc1");
    assert_eq!(dir[0].flags, FLAG_IN_USE | FLAG_AUTO);
    set.mark(5 * G, 1);
    assert!(set.bitmap("b0").unwrap().get(3 * G));
    assert!(!set.bitmap("b0").unwrap().get(5 * G), "b0 disabled");
    assert!(set.bitmap("inc1").unwrap().get(5 * G));
    assert!(!set.bitmap("inc1").unwrap().get(3 * G));
    let copy = set.bitmap("copy").unwrap();
    assert!(
        copy.get(3 * G) && !copy.get(5 * G),
        "merged at the commit, disabled after"
    );
    // Remove and clear in one step: one directory without inc1.
    set.transaction(
        &img,
        &[
            Action::Remove { name: "inc1" },
            Action::Clear { name: "b0" },
        ],
        in_use(),
    )
    .unwrap();
    assert!(disk_dir(&img).is_empty());
    assert!(set.bitmap("b0").unwrap().is_clean());
    assert_eq!(set.list().len(), 2);
}

/// Writers mark unique granules while transactions swap the recording bitmap: every
/// write is wholly in exactly one bitmap, and each thread's writes move from the old
/// bitmap to the new one once (never back, never split).
#[test]
fn concurrent_writes_land_wholly_before_or_after() {
    let img = MemImage::new(CS, DISK);
    let set = Arc::new(set_with_b0(&img));
    let g = 512u64;
    set.transaction(
        &img,
        &[
            Action::Remove { name: "b0" },
            Action::Add {
                name: "t0",
                opts: AddOptions {
                    granularity: Some(g),
                    persistent: false,
                    disabled: false,
                },
            },
        ],
        TxnOptions::default(),
    )
    .unwrap();
    const THREADS: u64 = 2;
    const WRITES: u64 = 16_000;
    let start = Arc::new(Barrier::new(THREADS as usize + 1));
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (set, start) = (set.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..WRITES {
                    // Each write covers 3 granules of its own (one in each of three
                    // words far apart would be better still; 3 adjacent are enough to
                    // catch a split).
                    let first = (i * THREADS + t) * 4;
                    set.mark(first * g, 3 * g);
                    for _ in 0..200 {
                        std::hint::spin_loop();
                    }
                }
            })
        })
        .collect();
    start.wait();
    let mut n = 0;
    while !writers.iter().all(|w| w.is_finished()) && n < 400 {
        let (old, new) = (format!("t{n}"), format!("t{}", n + 1));
        set.transaction(
            &img,
            &[
                Action::Add {
                    name: &new,
                    opts: AddOptions {
                        granularity: Some(g),
                        persistent: false,
                        disabled: false,
                    },
                },
                Action::Disable { name: &old },
            ],
            TxnOptions::default(),
        )
        .unwrap();
        n += 1;
    }
    for w in writers {
        w.join().unwrap();
    }
    assert!(n > 1, "transactions ran while the writers wrote");
    let maps: Vec<_> = (0..=n)
        .map(|k| set.bitmap(&format!("t{k}")).unwrap())
        .collect();
    for t in 0..THREADS {
        let mut last = 0;
        for i in 0..WRITES {
            let first = (i * THREADS + t) * 4;
            let holders: Vec<usize> = (0..maps.len())
                .filter(|&k| (0..3).any(|j| maps[k].get((first + j) * g)))
                .collect();
            assert_eq!(
                holders.len(),
                1,
                "thread {t} write {i} in bitmaps {holders:?}"
            );
            let k = holders[0];
            assert!(
                (0..3).all(|j| maps[k].get((first + j) * g)),
                "thread {t} write {i} split in t{k}"
            );
            assert!(
                k >= last,
                "thread {t} write {i} went back from t{last} to t{k}"
            );
            last = k;
        }
    }
    let total: u64 = maps.iter().map(|m| m.count()).sum();
    assert_eq!(total, THREADS * WRITES * 3, "no extra bits");
}

#[test]
fn a_busy_bitmap_refuses_every_action_that_names_it() {
    let img = MemImage::new(CS, DISK);
    let set = set_with_b0(&img);
    set.add(&img, "b1", AddOptions::default()).unwrap();
    set.set_busy("b0", true).unwrap();
    assert_eq!(
        set.set_busy("b0", true).unwrap_err().to_string(),
        "Bitmap 'b0' is currently in use by another operation and cannot be used"
    );
    assert!(set.list().iter().any(|b| b.name == "b0" && b.busy));
    let busy = |a: Action<'_>| set.transaction(&img, &[a], in_use()).unwrap_err().error;
    for a in [
        Action::Remove { name: "b0" },
        Action::Clear { name: "b0" },
        Action::Enable { name: "b0" },
        Action::Disable { name: "b0" },
        Action::Merge {
            target: "b0",
            sources: vec![MergeSource::Local("b1")],
        },
        Action::Merge {
            target: "b1",
            sources: vec![MergeSource::Local("b0")],
        },
    ] {
        assert!(matches!(busy(a), Error::Busy(n) if n == "b0"));
    }
    // Other bitmaps are not affected; the mark is released.
    set.transaction(&img, &[Action::Clear { name: "b1" }], in_use())
        .unwrap();
    set.set_busy("b0", false).unwrap();
    set.transaction(&img, &[Action::Remove { name: "b0" }], in_use())
        .unwrap();
}

#[test]
fn commit_hook_runs_once_in_the_new_generation_and_only_on_success() {
    let img = MemImage::new(CS, DISK);
    let set = set_with_b0(&img);
    let g0 = set.mark(0, 512);
    let mut runs = 0;
    let mut seen = 0;
    set.transaction_with(
        &img,
        &[Action::Remove { name: "nope" }],
        in_use(),
        &mut || runs += 1,
    )
    .unwrap_err();
    assert_eq!(
        (runs, set.generation()),
        (0, g0),
        "a failed transaction commits nothing"
    );
    set.transaction_with(
        &img,
        &[Action::Add {
            name: "b1",
            opts: AddOptions::default(),
        }],
        in_use(),
        &mut || {
            runs += 1;
            seen = set.generation();
        },
    )
    .unwrap();
    assert_eq!(runs, 1);
    assert_eq!(seen, g0 + 1, "the hook sees the new generation");
    assert_eq!(set.mark(0, 512), g0 + 1);
}

#[test]
fn busy_action_takes_effect_with_the_commit_after_the_other_actions() {
    let img = MemImage::new(CS, DISK);
    let set = set_with_b0(&img);
    // Disable, then export: the disable is allowed because the mark comes after it.
    set.transaction(
        &img,
        &[Action::Disable { name: "b0" }, Action::Busy { name: "b0" }],
        in_use(),
    )
    .unwrap();
    let info = set.list();
    assert!(info[0].busy && !info[0].enabled, "{info:?}");
    let e = set
        .transaction(&img, &[Action::Busy { name: "b0" }], in_use())
        .unwrap_err();
    assert!(matches!(e.error, Error::Busy(_)));
    // A failed transaction leaves no mark behind.
    set.set_busy("b0", false).unwrap();
    set.transaction(
        &img,
        &[Action::Busy { name: "b0" }, Action::Remove { name: "nope" }],
        in_use(),
    )
    .unwrap_err();
    assert!(!set.list()[0].busy);
}
