//! Backing-file policy: what an image may name as its backing file, and that opening one
//! never hangs (a FIFO) or follows a path out of the allowed tree.

mod common;
use common::{require_tool, run};
use qcow2::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn overlay(path: &Path, backing: &str, fmt: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            fmt,
            path.to_str().unwrap(),
            "1M",
        ],
    );
}

fn open(path: &Path, backing: BackingPolicy) -> Result<Qcow2Image> {
    Qcow2Image::open(
        path,
        &OpenOptions {
            read_only: true,
            backing,
            ..Default::default()
        },
    )
}

#[test]
fn backing_policies() {
    if !require_tool("qemu-img") {
        return;
    }
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5e; 1 << 20]).unwrap();
    let sibling = dir.path().join("base.raw");
    std::fs::write(&sibling, vec![0x11; 1 << 20]).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();

    // A sibling in the tree: allowed by within-dir and allow, refused by deny.
    let ok = dir.path().join("ok.qcow2");
    overlay(&ok, "base.raw", "raw");
    let img = open(&ok, BackingPolicy::WithinDir).unwrap();
    assert_eq!(img.backing_chain(), [dir.path().join("base.raw")]);
    let mut b = [0u8; 4];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x11; 4]);
    let e = open(&ok, BackingPolicy::Deny).unwrap_err().to_string();
    assert!(e.contains("backing policy deny"), "{e}");

    // An absolute path, `..` and a symlink out of the tree: refused by within-dir only.
    let abs = dir.path().join("abs.qcow2");
    overlay(&abs, secret.to_str().unwrap(), "raw");
    let dotdot = dir.path().join("sub/dotdot.qcow2");
    let rel = format!(
        "../../{}/secret.raw",
        outside.path().file_name().unwrap().to_str().unwrap()
    );
    overlay(&dotdot, &rel, "raw");
    std::os::unix::fs::symlink(&secret, dir.path().join("link.raw")).unwrap();
    let link = dir.path().join("link.qcow2");
    overlay(&link, "link.raw", "raw");
    for p in [&abs, &dotdot, &link] {
        let e = open(p, BackingPolicy::WithinDir).unwrap_err().to_string();
        assert!(
            e.contains("outside") && e.contains("within-dir"),
            "{}: {e}",
            p.display()
        );
        let img = open(p, BackingPolicy::Allow).unwrap();
        let mut b = [0u8; 4];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0x5e; 4], "allow follows QEMU: {}", p.display());
    }

    // A chain: every link must stay inside.
    let mid = dir.path().join("mid.qcow2");
    overlay(&mid, secret.to_str().unwrap(), "raw");
    let top = dir.path().join("top.qcow2");
    overlay(&top, "mid.qcow2", "qcow2");
    let e = open(&top, BackingPolicy::WithinDir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside"), "{e}");
    let img = open(&top, BackingPolicy::Allow).unwrap();
    assert_eq!(img.backing_chain(), [mid.clone(), secret.clone()]);
}

#[test]
fn a_fifo_or_a_directory_as_backing_file_is_refused_without_hanging() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (name, target) in [("f.qcow2", "fifo"), ("d.qcow2", ".")] {
        let img = dir.path().join(name);
        overlay(&img, target, "raw");
        for policy in [BackingPolicy::Allow, BackingPolicy::WithinDir] {
            let t = Instant::now();
            let e = open(&img, policy).unwrap_err().to_string();
            assert!(t.elapsed() < Duration::from_secs(2), "the open blocked");
            assert!(e.contains("not a regular file"), "{name} {policy:?}: {e}");
        }
    }
}
