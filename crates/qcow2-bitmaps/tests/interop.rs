//! Interoperability with QEMU 10.0.2's tools on real qcow2 files:
//! QEMU → us (bitmaps made and written by qemu-img/qemu-io load with exactly those bits),
//! us → QEMU (bitmaps we store read back through qemu-nbd + qemu-img map, info, check),
//! and the IN_USE / inconsistent / lost-autoclear lifecycle.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dirty_bitmap::DirtyBitmap;
use qcow2::{ImageMetadata, OpenOptions, Qcow2Image, AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use qcow2_bitmaps::{AddOptions, Bitmaps};
use serde_json::Value;

/// Whether the QEMU tools are there; fails under CI=true if not, else skips with a note.
fn have_tools() -> bool {
    for t in ["qemu-img", "qemu-io", "qemu-nbd"] {
        let ok = Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("required tool {t} is missing");
            }
            eprintln!("note: {t} not found; skipping QEMU interop test");
            return false;
        }
    }
    true
}

fn run(cmd: &str, args: &[&str]) -> Output {
    let o = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn create(dir: &Path, name: &str, cluster: u64, size: &str) -> PathBuf {
    let p = dir.join(name);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            p.to_str().unwrap(),
            size,
        ],
    );
    p
}

fn open(p: &Path, read_only: bool) -> Qcow2Image {
    Qcow2Image::open(
        p,
        &OpenOptions {
            read_only,
            known_autoclear: AUTOCLEAR_BITMAPS,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// `qemu-img info` bitmaps as (name, granularity, flags).
fn info_bitmaps(p: &Path, force: bool) -> Vec<(String, u64, Vec<String>)> {
    let mut args = vec!["info", "--output=json"];
    if force {
        args.push("-U");
    }
    args.push(p.to_str().unwrap());
    let o = run("qemu-img", &args);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn check_clean(p: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("No errors were found"),
        "check: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Dirty extents of bitmap `name` as QEMU exports them over NBD.
fn qemu_dirty_extents(dir: &Path, img: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = dir.join(format!("nbd-{name}.sock"));
    let pid = dir.join(format!("nbd-{name}.pid"));
    run(
        "qemu-nbd",
        &[
            "-r",
            "-t",
            "-f",
            "qcow2",
            "-B",
            name,
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "img",
            "--fork",
            "--pid-file",
            pid.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=img,x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let o = Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts", &opts])
        .output()
        .unwrap();
    let pidn: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = Command::new("kill").arg(pidn.to_string()).status();
    // wait until it is gone (it holds the image lock until then)
    for _ in 0..500 {
        // a zombie (not reaped in some containers) no longer holds the lock
        let alive = std::fs::read_to_string(format!("/proc/{pidn}/stat")).is_ok_and(|st| {
            st.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        });
        if !alive {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        o.status.success(),
        "map: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if !e["data"].as_bool().unwrap() {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => out.push((s, l)),
            }
        }
    }
    out
}

fn expected(size: u64, gran: u64, writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let b = DirtyBitmap::new(size, gran).unwrap();
    for &(o, l) in writes {
        b.set_range(o, l);
    }
    b.dirty_extents().collect()
}

#[test]
fn qemu_written_bitmaps_load_exactly() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 20;
    let writes = [
        (65536u64, 4096u64),
        (1 << 20, 128 << 10),
        (63 << 20, 1 << 20),
        (5 << 20, 512),
    ];
    for (cluster, gran) in [
        (65536u64, 65536u64),
        (65536, 4096),
        (4096, 512),
        (512, 65536),
        (2 << 20, 1 << 20),
    ] {
        let p = create(
            dir.path(),
            &format!("q{cluster}-{gran}.qcow2"),
            cluster,
            "64M",
        );
        let ps = p.to_str().unwrap();
        run(
            "qemu-img",
            &["bitmap", "--add", "-g", &gran.to_string(), ps, "b0"],
        );
        run(
            "qemu-img",
            &[
                "bitmap",
                "--add",
                "--disable",
                "-g",
                &gran.to_string(),
                ps,
                "off",
            ],
        );
        let mut args = vec!["-f".to_string(), "qcow2".into()];
        for (o, l) in writes {
            args.push("-c".into());
            args.push(format!("write {o} {l}"));
        }
        args.push(ps.into());
        run(
            "qemu-io",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );

        let img = open(&p, true);
        let set = Bitmaps::open(&img, "disk0").unwrap();
        let l = set.list();
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].name.as_str(), l[0].granularity, l[0].enabled),
            ("b0", gran, true)
        );
        assert_eq!((l[1].name.as_str(), l[1].enabled), ("off", false));
        let got: Vec<(u64, u64)> = set.bitmap("b0").unwrap().dirty_extents().collect();
        assert_eq!(
            got,
            expected(size, gran, &writes),
            "cluster {cluster} granularity {gran}"
        );
        assert_eq!(set.bitmap("off").unwrap().count(), 0);
        drop(set);
        drop(img);

        // read-write open flags them in-use; store clears it again
        let img = open(&p, false);
        let set = Bitmaps::open(&img, "disk0").unwrap();
        let flags = info_bitmaps(&p, true);
        assert_eq!(flags[0].2, vec!["in-use", "auto"]);
        assert_eq!(flags[1].2, vec!["in-use"]);
        set.mark(32 << 20, 1);
        set.store(&img).unwrap();
        drop(img);
        let flags = info_bitmaps(&p, false);
        assert_eq!(
            flags,
            vec![
                ("b0".into(), gran, vec!["auto".to_string()]),
                ("off".into(), gran, vec![])
            ]
        );
        check_clean(&p);
        let mut w = writes.to_vec();
        w.push((32 << 20, 1));
        assert_eq!(
            qemu_dirty_extents(dir.path(), &p, "b0"),
            expected(size, gran, &w)
        );
    }
}

#[test]
fn our_bitmaps_read_back_by_qemu() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    for cluster in [65536u64, 512, 2 << 20] {
        let p = create(dir.path(), &format!("u{cluster}.qcow2"), cluster, "256M");
        let img = open(&p, false);
        let set = Bitmaps::open(&img, "disk0").unwrap();
        set.add(
            &img,
            "b0",
            AddOptions {
                granularity: Some(65536),
                ..AddOptions::default()
            },
        )
        .unwrap();
        set.add(
            &img,
            "fine",
            AddOptions {
                granularity: Some(512),
                ..AddOptions::default()
            },
        )
        .unwrap();
        set.add(
            &img,
            "off",
            AddOptions {
                granularity: None,
                persistent: true,
                disabled: true,
            },
        )
        .unwrap();
        set.add(&img, "gone", AddOptions::default()).unwrap();
        let writes = [
            (0u64, 4096u64),
            (100 << 20, 3 << 20),
            (size - 512, 512),
            (77777, 1),
        ];
        for (o, l) in writes {
            set.mark(o, l);
        }
        set.store(&img).unwrap();
        set.mark_in_use_again(&img).unwrap();
        set.remove(&img, "gone").unwrap();
        set.store(&img).unwrap();
        drop(set);
        drop(img);
        let def = cluster.clamp(4096, 65536);
        assert_eq!(
            info_bitmaps(&p, false),
            vec![
                ("b0".into(), 65536, vec!["auto".to_string()]),
                ("fine".into(), 512, vec!["auto".to_string()]),
                ("off".into(), def, vec![]),
            ]
        );
        check_clean(&p);
        assert_eq!(
            qemu_dirty_extents(dir.path(), &p, "b0"),
            expected(size, 65536, &writes)
        );
        assert_eq!(
            qemu_dirty_extents(dir.path(), &p, "fine"),
            expected(size, 512, &writes)
        );
        assert_eq!(qemu_dirty_extents(dir.path(), &p, "off"), vec![]);
        // QEMU keeps recording into our stored bitmap and we load its result
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write 200M 64k", p.to_str().unwrap()],
        );
        let img = open(&p, true);
        let set = Bitmaps::open(&img, "disk0").unwrap();
        let mut w = writes.to_vec();
        w.push((200 << 20, 65536));
        let got: Vec<(u64, u64)> = set.bitmap("b0").unwrap().dirty_extents().collect();
        assert_eq!(got, expected(size, 65536, &w));
    }
}

#[test]
fn in_use_inconsistent_and_removal_interop() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "c.qcow2", 65536, "64M");
    let ps = p.to_str().unwrap();
    run("qemu-img", &["bitmap", "--add", ps, "b0"]);
    run("qemu-img", &["bitmap", "--add", ps, "b1"]);
    // we open read-write and "crash" (never store)
    let img = open(&p, false);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    set.mark(0, 1);
    drop(set);
    drop(img);
    assert!(info_bitmaps(&p, false)
        .iter()
        .all(|b| b.2.contains(&"in-use".to_string())));
    let o = Command::new("qemu-img")
        .args(["bitmap", "--clear", ps, "b0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("Bitmap 'b0' is inconsistent and cannot be used"));
    // we see them as inconsistent, refuse to use them, and can remove them
    let img = open(&p, false);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    assert!(set.list().iter().all(|i| i.inconsistent));
    assert_eq!(
        set.clear("b0").unwrap_err().to_string(),
        "Bitmap 'b0' is inconsistent and cannot be used"
    );
    set.remove(&img, "b0").unwrap();
    set.add(&img, "b2", AddOptions::default()).unwrap();
    set.store(&img).unwrap();
    drop(set);
    drop(img);
    assert_eq!(
        info_bitmaps(&p, false),
        vec![
            (
                "b1".into(),
                65536,
                vec!["in-use".to_string(), "auto".into()]
            ),
            ("b2".into(), 65536, vec!["auto".to_string()])
        ]
    );
    check_clean(&p);
    // QEMU removes the inconsistent one; we load the rest
    run("qemu-img", &["bitmap", "--remove", ps, "b1"]);
    let img = open(&p, true);
    let set = Bitmaps::open(&img, "disk0").unwrap();
    assert_eq!(set.list().len(), 1);
}

#[test]
fn lost_autoclear_bit_drops_bitmaps_like_qemu() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "l.qcow2", 65536, "64M");
    let ps = p.to_str().unwrap();
    run("qemu-img", &["bitmap", "--add", ps, "b0"]);
    // a program without bitmap support clears autoclear bit 0 (byte 95 of the header)
    let mut f = std::fs::read(&p).unwrap();
    f[95] &= !1;
    std::fs::write(&p, &f).unwrap();
    let img = open(&p, false);
    assert!(img.header_extension(EXT_BITMAPS).is_some());
    let set = Bitmaps::open(&img, "disk0").unwrap();
    assert!(set.list().is_empty());
    assert!(img.header_extension(EXT_BITMAPS).is_none());
    drop(set);
    drop(img);
    assert!(info_bitmaps(&p, false).is_empty());
    let o = Command::new("qemu-img")
        .args(["check", ps])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "bitmap clusters are leaks now");
    run("qemu-img", &["check", "-q", "-r", "leaks", ps]);
    check_clean(&p);
}

/// Corrupts one directory field of a QEMU-made image; QEMU and we refuse the image with
/// the same message (iotest 242 crafts the flag-bit-2 case).
#[test]
fn crafted_directories_are_refused_like_qemu() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    type Patch = fn(&mut [u8], usize);
    let cases: [(&str, Patch); 7] = [
        ("flag bit 2", |f, d| f[d + 15] |= 4),
        ("granularity bits 8", |f, d| f[d + 17] = 8),
        ("granularity bits 32", |f, d| f[d + 17] = 32),
        ("type 2", |f, d| f[d + 16] = 2),
        ("extra data", |f, d| f[d + 23] = 8),
        ("zero table size", |f, d| f[d + 8..d + 12].fill(0)),
        ("misaligned table", |f, d| f[d + 6] |= 2),
    ];
    for (i, (what, patch)) in cases.iter().enumerate() {
        let p = create(dir.path(), &format!("x{i}.qcow2"), 65536, "64M");
        let ps = p.to_str().unwrap();
        run("qemu-img", &["bitmap", "--add", ps, "bitmap-0"]);
        let doff = {
            let img = open(&p, true);
            let x = img.header_extension(EXT_BITMAPS).unwrap();
            u64::from_be_bytes(x[16..24].try_into().unwrap()) as usize
        };
        let mut f = std::fs::read(&p).unwrap();
        patch(&mut f, doff);
        std::fs::write(&p, &f).unwrap();
        let ours = {
            let img = open(&p, true);
            Bitmaps::open(&img, "disk0").unwrap_err().to_string()
        };
        let q = Command::new("qemu-img")
            .args(["info", ps])
            .output()
            .unwrap();
        assert!(!q.status.success(), "{what}: QEMU accepted it");
        let qerr = String::from_utf8_lossy(&q.stderr);
        assert!(
            qerr.contains(&ours),
            "{what}: QEMU says {qerr:?}, we say {ours:?}"
        );
        // read-write too, and nothing is written
        let img = open(&p, false);
        assert_eq!(Bitmaps::open(&img, "disk0").unwrap_err().to_string(), ours);
        drop(img);
        assert_eq!(
            std::fs::read(&p).unwrap()[doff..doff + 32],
            f[doff..doff + 32]
        );
    }
}

/// A bitmap of one image merged into a bitmap of another, stored, read by QEMU.
#[test]
fn merge_across_images() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = create(dir.path(), "a.qcow2", 65536, "64M");
    let b = create(dir.path(), "b.qcow2", 65536, "64M");
    run("qemu-img", &["bitmap", "--add", b.to_str().unwrap(), "src"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write 3M 64k", b.to_str().unwrap()],
    );
    let src_img = open(&b, true);
    let src = Bitmaps::open(&src_img, "b").unwrap();
    let img = open(&a, false);
    let set = Bitmaps::open(&img, "a").unwrap();
    set.add(&img, "dst", AddOptions::default()).unwrap();
    set.mark(0, 1);
    set.merge("dst", &[qcow2_bitmaps::MergeSource::Other(&src, "src")])
        .unwrap();
    set.store(&img).unwrap();
    drop(set);
    drop(img);
    check_clean(&a);
    assert_eq!(
        qemu_dirty_extents(dir.path(), &a, "dst"),
        vec![(0, 65536), (3 << 20, 65536)]
    );
}

/// A bitmap table whose entries point past the end of the file, into the engine's
/// metadata, or twice at one cluster is refused when loading (both modes) and the image
/// is not written: no store can later free what such an entry names.
#[test]
fn hostile_bitmap_tables_are_refused() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    type Patch = fn(&mut [u8], usize, u64);
    // (what, patch of table entry 0 given the file, the table offset and the L1 offset)
    let cases: [(&str, Patch); 4] = [
        ("past the end", |f, t, _| {
            f[t..t + 8].copy_from_slice(&(1u64 << 40).to_be_bytes())
        }),
        ("the refcount table", |f, t, _| {
            let rt: [u8; 8] = f[48..56].try_into().unwrap();
            f[t..t + 8].copy_from_slice(&rt);
        }),
        ("the L1 table", |f, t, l1| {
            f[t..t + 8].copy_from_slice(&l1.to_be_bytes())
        }),
        ("twice", |f, t, _| {
            let first: [u8; 8] = f[t..t + 8].try_into().unwrap();
            f[t + 8..t + 16].copy_from_slice(&first);
        }),
    ];
    for (i, (what, patch)) in cases.iter().enumerate() {
        let p = create(dir.path(), &format!("t{i}.qcow2"), 65536, "64G");
        let ps = p.to_str().unwrap();
        run("qemu-img", &["bitmap", "--add", "-g", "512", ps, "b0"]);
        // Dirty bits in the first two table entries' ranges, stored by QEMU.
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write 0 512",
                "-c",
                "write 256M 512",
                ps,
            ],
        );
        let (toff, l1) = {
            let img = open(&p, true);
            let x = img.header_extension(EXT_BITMAPS).unwrap();
            let doff = u64::from_be_bytes(x[16..24].try_into().unwrap()) as usize;
            let f = std::fs::read(&p).unwrap();
            let toff = u64::from_be_bytes(f[doff..doff + 8].try_into().unwrap()) as usize;
            let l1 = u64::from_be_bytes(f[40..48].try_into().unwrap());
            (toff, l1)
        };
        let mut f = std::fs::read(&p).unwrap();
        let entry0 = u64::from_be_bytes(f[toff..toff + 8].try_into().unwrap());
        assert_ne!(
            entry0, 0,
            "{what}: the first table entry names a data cluster"
        );
        patch(&mut f, toff, l1);
        std::fs::write(&p, &f).unwrap();
        for ro in [true, false] {
            let img = open(&p, ro);
            let e = Bitmaps::open(&img, "disk0").unwrap_err().to_string();
            assert!(
                e.starts_with("Could not read bitmap_table table from image for bitmap 'b0'"),
                "{what}: {e}"
            );
        }
        assert_eq!(
            std::fs::read(&p).unwrap(),
            f,
            "{what}: the image was written"
        );
    }
}

/// Loading is refused, before anything is read or written, when the bitmaps would take
/// more memory than the cap.
#[test]
fn bitmaps_over_the_memory_cap_are_refused() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "big.qcow2", 65536, "64G");
    let ps = p.to_str().unwrap();
    // 64 GiB at 512-byte granularity: 128 Mi bits, 16 MiB in memory; twice.
    run("qemu-img", &["bitmap", "--add", "-g", "512", ps, "b0"]);
    run("qemu-img", &["bitmap", "--add", "-g", "512", ps, "b1"]);
    let before = std::fs::read(&p).unwrap();
    for ro in [true, false] {
        let img = open(&p, ro);
        let e = Bitmaps::open_capped(&img, "disk0", 24 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs 33554432 bytes") && e.contains("cap of 25165824"),
            "{e}"
        );
        drop(img);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "a refused open writes nothing"
        );
    }
    let img = open(&p, true);
    let set = Bitmaps::open_capped(&img, "disk0", 32 << 20).unwrap();
    assert_eq!(set.list().len(), 2, "exactly at the cap is fine");
}
