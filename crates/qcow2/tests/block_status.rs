//! `BlockImage::block_status` agrees with `qemu-img map` on images QEMU wrote: data,
//! zero clusters, holes, compressed clusters, backing chains and raw files with holes.

mod common;
use common::{qemu_io, require_tool, run};
use qcow2::*;
use std::path::Path;

const SIZE: u64 = 16 << 20;

/// (length, data, zero, depth) runs, merged: ours.
fn ours(img: &dyn BlockImage) -> Vec<(u64, bool, bool, u32)> {
    let mut out: Vec<(u64, bool, bool, u32)> = Vec::new();
    let mut pos = 0;
    while pos < img.size() {
        let runs = img.block_status(pos, img.size() - pos).unwrap();
        assert!(!runs.is_empty(), "no runs at {pos}");
        for r in runs {
            assert!(r.length > 0);
            pos += r.length;
            match out.last_mut() {
                Some(l) if (l.1, l.2, l.3) == (r.data, r.zero, r.depth) => l.0 += r.length,
                _ => out.push((r.length, r.data, r.zero, r.depth)),
            }
        }
    }
    assert_eq!(pos, img.size(), "runs past the end");
    out
}

/// The same from `qemu-img map --output=json` (depth 0-based there; absent = 0 here).
fn qemu(path: &Path, fmt: &str) -> Vec<(u64, bool, bool, u32)> {
    let s = run(
        "qemu-img",
        &["map", "--output=json", "-f", fmt, path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    let mut out: Vec<(u64, bool, bool, u32)> = Vec::new();
    for e in v.as_array().unwrap() {
        let len = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        let depth = if e["present"].as_bool().unwrap() {
            e["depth"].as_u64().unwrap() as u32 + 1
        } else {
            0
        };
        match out.last_mut() {
            Some(l) if (l.1, l.2, l.3) == (data, zero, depth) => l.0 += len,
            _ => out.push((len, data, zero, depth)),
        }
    }
    out
}

fn open(path: &Path) -> Qcow2Image {
    Qcow2Image::open(
        path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn qcow2_status_matches_qemu_img_map() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let ps = p.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", ps, &SIZE.to_string()],
    );
    qemu_io(
        &p,
        "qcow2",
        &[
            "write -P 1 0 64k".into(),
            "write -P 2 1M 192k".into(),
            "write -z 2M 256k".into(),
            "write -P 3 4M 64k".into(),
            "discard 4M 64k".into(),
            "write -c -P 4 6M 64k".into(),
            "write -P 5 15M 1M".into(),
        ],
    );
    let theirs = qemu(&p, "qcow2");
    assert!(theirs.len() >= 6, "the image has too few runs: {theirs:?}");
    assert_eq!(ours(&open(&p)), theirs);
}

#[test]
fn backing_chain_status_matches_qemu_img_map() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    // A backing file shorter than the overlay: past its end the overlay reads zeroes.
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"],
    );
    qemu_io(
        &base,
        "qcow2",
        &["write -P 1 0 1M".into(), "write -z 3M 1M".into()],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 2 512k 64k".into(),
            "write -z 3M 64k".into(),
            "write -P 3 10M 64k".into(),
        ],
    );
    let theirs = qemu(&top, "qcow2");
    assert!(
        theirs.iter().any(|r| r.3 == 2),
        "no run from the backing file: {theirs:?}"
    );
    assert_eq!(ours(&open(&top)), theirs);
}

#[test]
fn raw_holes_match_qemu_img_map() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.raw");
    std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
    qemu_io(
        &p,
        "raw",
        &["write -P 1 1M 64k".into(), "write -P 2 8M 2M".into()],
    );
    let storage = std::sync::Arc::new(FileStorage::open(&p, false, false).unwrap());
    let img = RawImage::new(storage, true).unwrap();
    let theirs = qemu(&p, "raw");
    assert!(
        theirs.iter().any(|r| !r.1),
        "the file has no hole: {theirs:?}"
    );
    assert_eq!(ours(&img), theirs);
}

#[test]
fn status_of_a_sub_range_starts_and_ends_inside_it() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            p.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    qemu_io(&p, "qcow2", &["write -P 1 64k 64k".into()]);
    let img = open(&p);
    let runs = img.block_status(100_000, 50_000).unwrap();
    let total: u64 = runs.iter().map(|r| r.length).sum();
    assert_eq!(total, 50_000);
    assert!(runs[0].data && !runs[1].data, "{runs:?}");
    assert_eq!(runs[0].length, 131_072 - 100_000);
    assert!(
        img.block_status(SIZE - 1, 2).is_err(),
        "a range past the end is refused"
    );
}
