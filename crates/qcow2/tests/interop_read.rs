//! Images written by QEMU in every variant the engine supports read byte-identical to
//! `qemu-img convert -O raw`.

mod common;
use common::{qemu_io, qemu_raw, run};
use qcow2::*;
use std::path::Path;

const SIZE: u64 = 16 << 20;

/// Writes a mix of patterns, zero writes and discards with QEMU.
fn fill(path: &Path, fmt: &str, salt: u8) {
    let cmds = vec![
        format!("write -P {} 0 64k", 0x11 ^ salt),
        format!("write -P {} 70000 5000", 0x22 ^ salt),
        format!("write -P {} 1M 1M", 0x33 ^ salt),
        format!("write -P {} 3M 4k", 0x44 ^ salt),
        "write -z 1536k 256k".to_string(),
        "discard 1792k 128k".to_string(),
        format!("write -P {} 8M 512", 0x55 ^ salt),
        format!("write -P {} 12582400 1000000", 0x66 ^ salt),
    ];
    qemu_io(path, fmt, &cmds);
}

fn ours(path: &Path) -> Vec<u8> {
    let img = Qcow2Image::open(
        path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut v = vec![0u8; img.size() as usize];
    // Odd-sized reads cross cluster boundaries in every way.
    let mut off = 0usize;
    let mut step = 4093usize;
    while off < v.len() {
        let n = step.min(v.len() - off);
        img.read_at(&mut v[off..off + n], off as u64).unwrap();
        off += n;
        step = step * 7 % 300_007 + 1;
    }
    v
}

fn assert_same(path: &Path, what: &str) {
    let q = qemu_raw(path);
    let o = ours(path);
    assert_eq!(q.len(), o.len(), "{what}: size");
    if let Some(i) = common::workload::first_diff(&q, &o) {
        panic!("{what}: first difference at byte {i:#x}");
    }
}

fn variant(opts: &str, what: &str) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("v.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            p.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    fill(&p, "qcow2", 0);
    assert_same(&p, what);
}

#[test]
fn every_cluster_size_and_version() {
    if !common::require_tool("qemu-img") {
        return;
    }
    variant("compat=0.10,cluster_size=65536", "v2 64k");
    variant("compat=0.10,cluster_size=4096", "v2 4k");
    for cs in [512, 1024, 4096, 65536, 1 << 20, 2 << 20] {
        variant(
            &format!("compat=1.1,cluster_size={cs}"),
            &format!("v3 cluster {cs}"),
        );
    }
}

#[test]
fn every_refcount_width() {
    if !common::require_tool("qemu-img") {
        return;
    }
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        variant(
            &format!("refcount_bits={bits},cluster_size=4096"),
            &format!("refcount_bits {bits}"),
        );
    }
}

#[test]
fn compressed_clusters_deflate_and_zstd() {
    if !common::require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            src.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    fill(&src, "raw", 0);
    for (opts, what) in [
        ("cluster_size=65536", "deflate 64k"),
        ("cluster_size=4096", "deflate 4k"),
        ("cluster_size=2097152", "deflate 2M"),
        ("compression_type=zstd,cluster_size=65536", "zstd 64k"),
        ("compression_type=zstd,cluster_size=1024", "zstd 1k"),
        ("compat=0.10", "deflate v2"),
    ] {
        let dst = d.path().join(format!("{}.qcow2", what.replace(' ', "_")));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                opts,
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
            ],
        );
        assert_same(&dst, what);
        // Rewriting parts of compressed clusters copies them out (read-modify-write)
        // and frees the compressed ones.
        {
            let img = Qcow2Image::open(&dst, &OpenOptions::default()).unwrap();
            img.write_at(&[0xee; 3000], 65536 * 3 + 100).unwrap();
            img.write_at(&[0xef; 70000], 1 << 20).unwrap();
            img.write_zeroes(0, 4096, false).unwrap();
            img.flush().unwrap();
        }
        common::assert_clean(&dst);
        assert_same(&dst, &format!("{what} after rewrites"));
    }
}

#[test]
fn backing_chain_three_deep() {
    if !common::require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            base.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    fill(&base, "raw", 1);
    let mut below = ("base.raw".to_string(), "raw");
    for (i, cs) in [65536u64, 4096, 512].iter().enumerate() {
        let name = format!("l{i}.qcow2");
        let p = d.path().join(&name);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                "-b",
                &below.0,
                "-F",
                below.1,
                p.to_str().unwrap(),
            ],
        );
        qemu_io(
            &p,
            "qcow2",
            &[
                format!("write -P {} {} 3000", 0x70 + i, 65536 * (i + 1) + 512),
                format!("write -z {} 8192", (2 << 20) + i * 4096),
                format!("write -P {} {} 100000", 0x80 + i, (5 << 20) + i * 333),
            ],
        );
        below = (name, "qcow2");
    }
    let top = d.path().join(&below.0);
    assert_same(&top, "3-deep chain");
    // Writing over the chain copies from the backing files into the top layer.
    {
        let img = Qcow2Image::open(&top, &OpenOptions::default()).unwrap();
        img.write_at(&[0x99; 1000], 65536 * 2 + 7).unwrap();
        img.discard(0, 1 << 20).unwrap();
        img.flush().unwrap();
    }
    common::assert_clean(&top);
    assert_same(&top, "3-deep chain after writes");
}

#[test]
fn lazy_refcounts_dirty_image_is_repaired_on_open() {
    if !common::require_tool("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("lazy.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            p.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    // Abort without closing: the dirty bit stays set and refcounts are stale.
    let _ = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 0 1M",
            "-c",
            "write -P 0x43 4M 64k",
            "-c",
            "abort",
        ])
        .arg(&p)
        .output()
        .unwrap();
    let before = qemu_raw(&p);
    assert_eq!(before[0], 0x42);
    {
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!(
            img.header().incompatible_features & 1,
            0,
            "dirty bit cleared after repair"
        );
        img.write_at(&[0x44; 4096], 8 << 20).unwrap();
    }
    common::assert_clean(&p);
    let after = qemu_raw(&p);
    assert_eq!(&after[..1 << 20], &before[..1 << 20]);
    assert_eq!(after[8 << 20], 0x44);
}

#[test]
fn internal_snapshot_clusters_are_copied_not_overwritten() {
    if !common::require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("snap.qcow2");
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
    fill(&p, "qcow2", 2);
    run("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]);
    let snap = qemu_raw(&p);
    {
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        img.write_at(&[0x5e; 5000], 1000).unwrap();
        img.write_zeroes(1 << 20, 1 << 20, true).unwrap();
        img.flush().unwrap();
    }
    common::assert_clean(&p);
    assert_same(&p, "after writing over a snapshot");
    // The snapshot still holds the old data.
    run("qemu-img", &["snapshot", "-a", "s1", p.to_str().unwrap()]);
    assert_eq!(qemu_raw(&p), snap);
}

#[test]
fn unknown_extensions_survive_header_rewrites() {
    if !common::require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("ext.qcow2");
    create(
        &p,
        &CreateOptions {
            size: SIZE,
            ..Default::default()
        },
    )
    .unwrap();
    // Add an unknown extension and an unknown autoclear bit by hand.
    let mut buf = std::fs::read(&p).unwrap();
    let mut h = qcow2::header::Header::parse(&buf, buf.len() as u64).unwrap();
    h.set_extension(0x1234_abcd, Some(b"keep me".to_vec()));
    h.autoclear_features |= 1 << 5;
    let hb = h.serialize().unwrap();
    buf[..hb.len()].copy_from_slice(&hb);
    std::fs::write(&p, &buf).unwrap();
    {
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        let hh = img.header();
        assert_eq!(
            hh.autoclear_features, 0,
            "unknown autoclear bits are cleared on a rw open"
        );
        img.update_header(HeaderUpdate {
            autoclear: None,
            extensions: vec![(0x0bad_f00d, Some(vec![1; 5]))],
        })
        .unwrap();
        img.write_at(&[1; 512], 0).unwrap();
    }
    let buf = std::fs::read(&p).unwrap();
    let h = qcow2::header::Header::parse(&buf, buf.len() as u64).unwrap();
    assert_eq!(h.extension(0x1234_abcd), Some(&b"keep me"[..]));
    assert_eq!(h.extension(0x0bad_f00d), Some(&[1u8; 5][..]));
    common::assert_clean(&p);
    let info = run("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
}
