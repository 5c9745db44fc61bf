//! Fault injection: a failure at every write, flush, header update or allocation of a
//! store (and of the in-use update on open) leaves the image loadable with either the
//! old or the new bitmaps, never a freed cluster referenced, and names the lost bitmaps.

use super::bits;
use crate::error::Error;
use crate::testing::{MemImage, MemState, Op};
use crate::{AddOptions, Bitmaps};
use qcow2::{ImageMetadata, EXT_BITMAPS};

const CS: u64 = 4096;
const DISK: u64 = 256 << 20;

type Contents = Vec<(String, Option<Vec<u8>>)>;

/// Bitmaps as loaded read-only from a copy of `img`'s state (fails if the state
/// references a freed cluster: the fake refuses to read those).
fn load(img: &MemImage) -> crate::Result<Contents> {
    let copy = MemImage::from_state(img.reopen_state(true));
    let set = Bitmaps::open(&copy, "copy")?;
    Ok(set
        .list()
        .into_iter()
        .map(|i| {
            let b = set.bitmap(&i.name).ok().map(|b| bits(&b));
            (i.name, b)
        })
        .collect())
}

/// A state with b0, b1 stored cleanly (not in use), and an open set on it in which b0
/// changed and c was added: (image, set, old contents, new contents).
fn scenario() -> (MemImage, Bitmaps, Contents, Contents) {
    let img = MemImage::new(CS, DISK);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    set.add(
        &img,
        "b0",
        AddOptions {
            granularity: Some(512),
            ..AddOptions::default()
        },
    )
    .unwrap();
    set.add(&img, "b1", AddOptions::default()).unwrap();
    set.mark(0, 1 << 20);
    set.mark(200 << 20, 4096);
    set.store(&img).unwrap();
    let img = MemImage::from_state(img.reopen_state(false));
    let set = Bitmaps::open(&img, "disk0").unwrap();
    set.store(&img).unwrap(); // in-use cleared: the old state is consistent
    let old = load(&img).unwrap();
    set.add(&img, "c", AddOptions::default()).unwrap();
    set.mark(100 << 20, 3 << 20);
    set.bitmap("b1").unwrap().clear_range(0, 4096);
    let new: Contents = set
        .list()
        .into_iter()
        .map(|i| (i.name.clone(), Some(bits(&set.bitmap(&i.name).unwrap()))))
        .collect();
    img.state().log.clear();
    (img, set, old, new)
}

fn mutating(log: &[Op]) -> Vec<Op> {
    log.iter()
        .filter(|o| matches!(o, Op::Write { .. } | Op::Flush | Op::Header { .. }))
        .cloned()
        .collect()
}

fn check_after_failure(
    img: &MemImage,
    r: crate::Result<()>,
    old: &Contents,
    new: &Contents,
    clusters_before: usize,
    may_leak: bool,
) {
    let e = r.expect_err("the fault must surface");
    match &e {
        Error::Lost { node, lost, .. } => {
            assert_eq!(node, "disk0");
            assert_eq!(lost, &vec!["b0".to_string(), "b1".into(), "c".into()]);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(e
        .to_string()
        .starts_with("Lost persistent bitmaps during inactivation of node 'disk0': "));
    let now = load(img).expect("the image stays loadable; no freed cluster is referenced");
    assert!(now == *old || now == *new, "neither old nor new: {now:?}");
    if now == *old && !may_leak {
        assert_eq!(
            img.allocated_clusters(),
            clusters_before,
            "everything allocated was freed"
        );
    }
    assert!(img.allocated_clusters() >= clusters_before || now == *new);
}

#[test]
fn store_fault_at_every_mutating_call() {
    let (img, set, _, new) = scenario();
    set.store(&img).unwrap();
    let clean = mutating(&img.state().log);
    assert_eq!(load(&img).unwrap(), new);
    assert!(clean.len() >= 6, "{clean:?}");
    for after_write in [false, true] {
        for (k, op) in clean.iter().enumerate() {
            let (img, set, old, new) = scenario();
            let before = img.allocated_clusters();
            {
                let mut s = img.state();
                s.fail_op = Some(s.ops + k);
                s.fail_header_after_write = after_write;
            }
            let r = set.store(&img);
            let header = matches!(op, Op::Header { .. });
            check_after_failure(&img, r, &old, &new, before, header);
            if !header {
                assert_eq!(
                    load(&img).unwrap(),
                    old,
                    "fault {k} before the header switch"
                );
            }
            // The set still works: a later store succeeds and saves the new contents.
            img.state().fail_op = None;
            set.store(&img).unwrap();
            assert_eq!(load(&img).unwrap(), new);
        }
    }
}

#[test]
fn store_fault_at_every_allocation() {
    let (img, set, _, _) = scenario();
    set.store(&img).unwrap();
    let allocs = img
        .state()
        .log
        .iter()
        .filter(|o| matches!(o, Op::Alloc { .. }))
        .count();
    assert!(allocs >= 5);
    for k in 0..allocs {
        let (img, set, old, new) = scenario();
        let before = img.allocated_clusters();
        {
            let mut s = img.state();
            s.fail_alloc = Some(s.allocs + k);
        }
        let r = set.store(&img);
        check_after_failure(&img, r, &old, &new, before, false);
        assert_eq!(load(&img).unwrap(), old);
        assert_eq!(img.allocated_clusters(), before);
    }
}

#[test]
fn remove_fault_keeps_old_or_new_directory() {
    let (img, set, _, _) = scenario();
    set.store(&img).unwrap();
    let base: MemState = img.reopen_state(false);
    let n_ops = {
        let i = MemImage::from_state(base.clone());
        let s = Bitmaps::open(&i, "disk0").unwrap();
        i.state().log.clear();
        s.remove(&i, "b1").unwrap();
        let n = mutating(&i.state().log).len();
        n
    };
    for k in 0..n_ops {
        let i = MemImage::from_state(base.clone());
        let s = Bitmaps::open(&i, "disk0").unwrap();
        {
            let mut st = i.state();
            st.fail_op = Some(st.ops + k);
        }
        assert!(s.remove(&i, "b1").is_err());
        let names: Vec<String> = load(&i).unwrap().into_iter().map(|(n, _)| n).collect();
        assert!(
            names == ["b0", "b1", "c"] || names == ["b0", "c"],
            "{names:?}"
        );
        assert_eq!(s.list().len(), 3, "still listed after a failed remove");
    }
}

#[test]
fn in_use_update_fault_never_leaves_stale_consistent_bitmaps() {
    in_use_update_faults();
}

fn in_use_update_faults() {
    let (img, set, _, new) = scenario();
    set.store(&img).unwrap();
    let base = img.reopen_state(false);
    let n_ops = {
        let i = MemImage::from_state(base.clone());
        Bitmaps::open(&i, "disk0").unwrap();
        let n = mutating(&i.state().log).len();
        n
    };
    assert_eq!(n_ops, 4);
    for after_write in [false, true] {
        for k in 0..n_ops {
            let i = MemImage::from_state(base.clone());
            {
                let mut st = i.state();
                st.fail_op = Some(k);
                st.fail_header_after_write = after_write;
            }
            let e = Bitmaps::open(&i, "disk0").unwrap_err();
            assert!(
                e.to_string().starts_with("Can't update bitmap directory: "),
                "{e}"
            );
            let now = load(&i).unwrap();
            let ac = i.autoclear_features() & 1;
            if now.is_empty() {
                assert_eq!(ac, 0, "lost only through the autoclear bit");
                assert!(i.header_extension(EXT_BITMAPS).is_some());
            } else {
                for ((n, b), (nn, nb)) in now.iter().zip(&new) {
                    assert_eq!(n, nn);
                    assert!(
                        b.is_none() || b == nb,
                        "a loaded bitmap is either in use or exact"
                    );
                }
            }
        }
    }
}
