//! The offline tool (`bitmap …`, `create`, `check` subcommands), run as the real binary,
//! checked against QEMU's own tools: images we create pass `qemu-img check`, bitmaps we
//! write are read by `qemu-img info` / `qemu-nbd -B`, bitmaps QEMU writes read back with
//! exactly QEMU's bits, and the flows of QEMU's iotest `tests/qemu-img-bitmaps` give the
//! same results with our subcommands as with `qemu-img bitmap`.
//!
//! QEMU tools missing: the test fails under CI=true (naming the tool), else it is skipped
//! with a note.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-blk-bitmap");
const PREFIX: &str = "vhost-device-blk-bitmap: ";
const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// One extent: start, length, dirty.
type Ext = (u64, u64, bool);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Whether every tool is installed; under CI=true a missing one fails the test.
fn have(tools: &[&str]) -> bool {
    for t in tools {
        let found = Command::new(t)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{t} is required when CI=true but is not installed"
            );
            eprintln!("note: {t} is not installed; skipping this test");
            return false;
        }
    }
    true
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn output(o: Output) -> Run {
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs our binary.
fn ours(args: &[&str]) -> Run {
    output(
        Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run binary"),
    )
}

/// Runs our binary and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let r = ours(args);
    assert_eq!(
        r.code, 0,
        "{args:?} failed: stdout={} stderr={}",
        r.stdout, r.stderr
    );
    r.stdout
}

/// Runs our binary and expects exit code 1; returns stderr without our prefix.
fn fails(args: &[&str]) -> String {
    let r = ours(args);
    assert_eq!(
        r.code, 1,
        "{args:?} should fail: stdout={} stderr={}",
        r.stdout, r.stderr
    );
    assert!(r.stderr.starts_with(PREFIX), "{}", r.stderr);
    r.stderr[PREFIX.len()..].to_string()
}

/// Runs a QEMU tool.
fn qemu(tool: &str, args: &[&str]) -> Run {
    output(
        Command::new(tool)
            .args(args)
            .output()
            .expect("run qemu tool"),
    )
}

/// Runs a QEMU tool and expects success; returns stdout.
fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let r = qemu(tool, args);
    assert_eq!(
        r.code, 0,
        "{tool} {args:?} failed: {}{}",
        r.stdout, r.stderr
    );
    r.stdout
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    qemu_ok("qemu-io", &args);
}

fn qemu_img_create(img: &Path, size: &str) {
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(img), size]);
}

fn info(img: &Path) -> Value {
    serde_json::from_str(&qemu_ok(
        "qemu-img",
        &["info", "--output=json", "-f", "qcow2", s(img)],
    ))
    .expect("qemu-img info json")
}

/// `qemu-img info`'s bitmaps: (name, granularity, flags).
fn qemu_bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let v = info(img);
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

fn bm(name: &str, g: u64, flags: &[&str]) -> (String, u64, Vec<String>) {
    (
        name.to_string(),
        g,
        flags.iter().map(|f| f.to_string()).collect(),
    )
}

fn assert_no_in_use(img: &Path) {
    for (name, _, flags) in qemu_bitmaps(img) {
        assert!(
            !flags.iter().any(|f| f == "in-use"),
            "bitmap {name} left in-use: {flags:?}"
        );
    }
}

fn qemu_check_clean(img: &Path) {
    let r = qemu("qemu-img", &["check", s(img)]);
    assert_eq!(r.code, 0, "qemu-img check: {}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("No errors were found on the image."));
}

/// Our `bitmap list --json`.
fn list(img: &Path) -> Vec<Value> {
    let out = ok(&["bitmap", "list", s(img), "--json"]);
    serde_json::from_str::<Value>(&out)
        .expect("list json")
        .as_array()
        .expect("array")
        .clone()
}

fn names(img: &Path) -> Vec<String> {
    list(img)
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

fn entry(img: &Path, name: &str) -> Value {
    list(img)
        .into_iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("bitmap {name} not listed"))
}

/// Our `bitmap dump`, checked to cover the disk in order with alternating runs.
fn dump(img: &Path, name: &str) -> Vec<Ext> {
    let out = ok(&["bitmap", "dump", s(img), name]);
    let v: Value = serde_json::from_str(&out).expect("dump json");
    let exts: Vec<Ext> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["dirty"].as_bool().unwrap(),
            )
        })
        .collect();
    let mut pos = 0;
    for w in exts.windows(2) {
        assert_ne!(w[0].2, w[1].2, "runs not maximal: {exts:?}");
    }
    for e in &exts {
        assert_eq!(e.0, pos, "gap or overlap: {exts:?}");
        assert!(e.1 > 0);
        pos += e.1;
    }
    pos_check(img, pos);
    exts
}

fn pos_check(img: &Path, end: u64) {
    let size = info(img)["virtual-size"].as_u64().unwrap();
    assert_eq!(end, size, "extents do not cover the disk");
}

/// Merges adjacent extents of the same state.
fn merged(exts: Vec<Ext>) -> Vec<Ext> {
    let mut out: Vec<Ext> = Vec::new();
    for e in exts {
        match out.last_mut() {
            Some(l) if l.2 == e.2 && l.0 + l.1 == e.0 => l.1 += e.1,
            _ => out.push(e),
        }
    }
    out
}

/// Builds the expected extent list of a disk of `size` bytes from dirty ranges.
fn expect(size: u64, dirty: &[(u64, u64)]) -> Vec<Ext> {
    let mut v = Vec::new();
    let mut pos = 0;
    for &(start, len) in dirty {
        if start > pos {
            v.push((pos, start - pos, false));
        }
        v.push((start, len, true));
        pos = start + len;
    }
    if pos < size {
        v.push((pos, size - pos, false));
    }
    merged(v)
}

/// A read-only `qemu-nbd` exporting one bitmap; killed on drop.
struct Nbd {
    pid: i32,
    sock: PathBuf,
}

impl Nbd {
    fn start(img: &Path, bitmap: &str) -> Nbd {
        let dir = img.parent().unwrap();
        let sock = dir.join(format!("nbd-{bitmap}.sock"));
        let pidf = dir.join(format!("nbd-{bitmap}.pid"));
        let _ = fs::remove_file(&pidf);
        qemu_ok(
            "qemu-nbd",
            &[
                "-r",
                "-t",
                "-f",
                "qcow2",
                "-B",
                bitmap,
                "-k",
                s(&sock),
                "--fork",
                "--pid-file",
                s(&pidf),
                s(img),
            ],
        );
        let pid: i32 = fs::read_to_string(&pidf)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        Nbd { pid, sock }
    }

    /// Starts a writable server without a bitmap (holds the write lock).
    fn start_writable(img: &Path) -> Nbd {
        let dir = img.parent().unwrap();
        let sock = dir.join("nbd-rw.sock");
        let pidf = dir.join("nbd-rw.pid");
        let _ = fs::remove_file(&pidf);
        qemu_ok(
            "qemu-nbd",
            &[
                "-t",
                "-f",
                "qcow2",
                "-k",
                s(&sock),
                "--fork",
                "--pid-file",
                s(&pidf),
                s(img),
            ],
        );
        let pid: i32 = fs::read_to_string(&pidf).unwrap().trim().parse().unwrap();
        Nbd { pid, sock }
    }

    /// The bitmap's extents as QEMU reads them (dirty = "data": false).
    fn extents(&self, bitmap: &str) -> Vec<Ext> {
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
            s(&self.sock)
        );
        let out = qemu_ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
        let v: Value = serde_json::from_str(&out).expect("map json");
        merged(
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["start"].as_u64().unwrap(),
                        e["length"].as_u64().unwrap(),
                        !e["data"].as_bool().unwrap(),
                    )
                })
                .collect(),
        )
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid read from qemu-nbd's pid file; no memory involved.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
            // Gone, or a zombie waiting for its reaper: the image is closed either way.
            if stat.is_empty() || stat.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// QEMU's view of a bitmap's contents.
fn nbd_dump(img: &Path, bitmap: &str) -> Vec<Ext> {
    Nbd::start(img, bitmap).extents(bitmap)
}

/// Clears autoclear bit 0 (bitmaps consistent) in the header, as an old program would.
fn clear_autoclear_bitmaps(img: &Path) {
    let mut b = fs::read(img).unwrap();
    b[95] &= !1;
    fs::write(img, b).unwrap();
}

// ---------------------------------------------------------------------------------------
// create / check
// ---------------------------------------------------------------------------------------

#[test]
fn create_makes_images_qemu_accepts() {
    if !have(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let a = d.join("a.qcow2");
    let out = ok(&["create", s(&a), "64M"]);
    assert!(out.starts_with("Formatting '"), "{out}");
    qemu_check_clean(&a);
    let i = info(&a);
    assert_eq!(i["format"], "qcow2");
    assert_eq!(i["virtual-size"], 64 * M);
    assert_eq!(i["cluster-size"], 65536);
    assert_eq!(i["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(i["format-specific"]["data"]["refcount-bits"], 16);

    let b = d.join("b.qcow2");
    ok(&[
        "create",
        s(&b),
        "10M",
        "--cluster-size",
        "4K",
        "--refcount-bits",
        "8",
    ]);
    let i = info(&b);
    assert_eq!(i["cluster-size"], 4096);
    assert_eq!(i["virtual-size"], 10 * M);
    assert_eq!(i["format-specific"]["data"]["refcount-bits"], 8);
    qemu_io(&b, &["write -P 0x5a 1M 300k"]);
    qemu_check_clean(&b);

    let v2 = d.join("v2.qcow2");
    ok(&["create", s(&v2), "1M", "--compat", "0.10"]);
    assert_eq!(info(&v2)["format-specific"]["data"]["compat"], "0.10");
    qemu_check_clean(&v2);

    // Backing file without SIZE: the backing file's size; relative names are relative
    // to the new image; the probed format is recorded.
    qemu_io(&a, &["write -P 0x11 0 64k"]);
    let ov = d.join("ov.qcow2");
    ok(&["create", s(&ov), "--backing", "a.qcow2"]);
    let i = info(&ov);
    assert_eq!(i["virtual-size"], 64 * M);
    assert_eq!(i["backing-filename"], "a.qcow2");
    assert_eq!(i["backing-filename-format"], "qcow2");
    qemu_check_clean(&ov);
    qemu_io(&ov, &["read -P 0x11 0 64k"]);

    let raw = d.join("r.raw");
    fs::write(&raw, vec![0x22u8; M as usize]).unwrap();
    let ov2 = d.join("ov2.qcow2");
    ok(&[
        "create",
        s(&ov2),
        "2M",
        "-b",
        s(&raw),
        "--backing-format",
        "raw",
    ]);
    let i = info(&ov2);
    assert_eq!(i["virtual-size"], 2 * M);
    assert_eq!(i["backing-filename-format"], "raw");
    qemu_io(&ov2, &["read -P 0x22 0 1M", "read -P 0 1M 1M"]);

    // Errors: exit 1, one line, no file left behind.
    let e = fails(&["create", s(&a), "1M"]);
    assert!(e.contains("Could not create"), "{e}");
    assert_eq!(info(&a)["virtual-size"], 64 * M, "existing image untouched");
    for (args, text) in [
        (vec!["create", "x1.qcow2"], "needs a size"),
        (vec!["create", "x2.qcow2", "12Q"], "Invalid size '12Q'"),
        (
            vec!["create", "x3.qcow2", "1M", "--cluster-size", "3000"],
            "",
        ),
        (vec!["create", "x4.qcow2", "1M", "--refcount-bits", "3"], ""),
        (
            vec!["create", "x5.qcow2", "--backing", "missing.raw"],
            "Could not open",
        ),
    ] {
        let full: Vec<String> = args
            .iter()
            .map(|a| {
                if a.starts_with('x') {
                    s(&d.join(a)).to_string()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let e = fails(&refs);
        assert!(e.contains(text), "{args:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(!d.join(args[1]).exists(), "{args:?} left a file");
    }
}

#[test]
fn check_reports_and_repairs_like_qemu_img() {
    if !have(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Clean.
    let img = d.join("c.qcow2");
    ok(&["create", s(&img), "16M"]);
    qemu_io(&img, &["write 0 256k"]);
    let r = ours(&["check", s(&img)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("No errors were found on the image."));
    let j: Value = serde_json::from_str(&ok(&["check", "--json", s(&img)])).unwrap();
    assert_eq!(j["check-errors"], 0);
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["total-clusters"], 256);
    assert!(j.get("leaks").is_none() && j.get("corruptions").is_none());

    // Leaks only (exit 3): bitmap clusters after an old program cleared autoclear bit 0.
    let l = d.join("l.qcow2");
    ok(&["create", s(&l), "16M"]);
    ok(&["bitmap", "add", s(&l), "b0"]);
    clear_autoclear_bitmaps(&l);
    let q = qemu("qemu-img", &["check", s(&l)]);
    let r = ours(&["check", s(&l)]);
    assert_eq!(q.code, 3);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(r
        .stdout
        .contains("leaked clusters were found on the image."));
    let j: Value = serde_json::from_str(&ours(&["check", "--json", s(&l)]).stdout).unwrap();
    assert!(j["leaks"].as_u64().unwrap() > 0, "{j}");
    let r = ours(&["check", "--repair", "leaks", s(&l)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("repaired"), "{}", r.stdout);
    qemu_check_clean(&l);

    // Corruption (exit 2): L1[0] points past the end of the file.
    let c = d.join("bad.qcow2");
    ok(&["create", s(&c), "16M"]);
    qemu_io(&c, &["write 0 64k"]);
    let mut bytes = fs::read(&c).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let e = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap());
    bytes[l1..l1 + 8].copy_from_slice(&((e & (1 << 63)) | (1 << 30)).to_be_bytes());
    fs::write(&c, bytes).unwrap();
    assert_eq!(qemu("qemu-img", &["check", s(&c)]).code, 2);
    let r = ours(&["check", s(&c)]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("errors were found on the image."));
    let j: Value = serde_json::from_str(&ours(&["check", "--json", s(&c)]).stdout).unwrap();
    assert!(j["corruptions"].as_u64().unwrap() > 0, "{j}");

    // Check errors (exit 1).
    let e = fails(&["check", s(&d.join("missing.qcow2"))]);
    assert!(e.contains("No such file or directory"), "{e}");
    let raw = d.join("r.raw");
    fs::write(&raw, [0u8; 4096]).unwrap();
    assert!(fails(&["check", s(&raw)]).contains("not a qcow2 image"));
}

// ---------------------------------------------------------------------------------------
// bitmap subcommands
// ---------------------------------------------------------------------------------------

#[test]
fn bitmap_subcommands_round_trip() {
    if !have(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let size = 64 * M;
    ok(&["create", s(&img), "64M"]);
    assert_eq!(ok(&["bitmap", "list", s(&img), "--json"]).trim(), "[]");
    assert_eq!(ok(&["bitmap", "list", s(&img)]), "");

    ok(&["bitmap", "add", s(&img), "b0", "-g", "64K"]);
    ok(&[
        "bitmap",
        "add",
        s(&img),
        "b1",
        "--disabled",
        "--granularity",
        "1M",
    ]);
    ok(&["bitmap", "add", s(&img), "b2"]);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            bm("b0", 65536, &["auto"]),
            bm("b1", M, &[]),
            bm("b2", 65536, &["auto"]),
        ]
    );
    let l = list(&img);
    assert_eq!(l.len(), 3);
    for (b, (name, g, flags, rec)) in l.iter().zip([
        ("b0", 65536u64, vec!["auto"], true),
        ("b1", M, vec![], false),
        ("b2", 65536, vec!["auto"], true),
    ]) {
        assert_eq!(b["name"], name);
        assert_eq!(b["granularity"], g);
        assert_eq!(b["flags"], serde_json::json!(flags));
        assert_eq!(b["recording"], rec);
        assert_eq!(b["inconsistent"], false);
        assert_eq!(b["dirty-bytes"], 0);
    }

    qemu_io(&img, &["write -P 0xab 64k 4k", "write 1M 128k"]);
    let want = expect(size, &[(64 * K, 64 * K), (M, 128 * K)]);
    assert_eq!(dump(&img, "b0"), want);
    assert_eq!(dump(&img, "b2"), want);
    assert_eq!(dump(&img, "b1"), expect(size, &[]));
    assert_eq!(entry(&img, "b0")["dirty-bytes"], 196608);
    let text = ok(&["bitmap", "list", s(&img)]);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("b0 ") && l.contains("auto") && l.ends_with("196608")),
        "{text}"
    );

    // disable: writes no longer recorded; enable: recorded again.
    ok(&["bitmap", "disable", s(&img), "b0"]);
    assert_no_in_use(&img);
    assert_eq!(qemu_bitmaps(&img)[0], bm("b0", 65536, &[]));
    qemu_io(&img, &["write 8M 4k"]);
    assert_eq!(dump(&img, "b0"), want);
    assert_eq!(
        dump(&img, "b2"),
        expect(size, &[(64 * K, 64 * K), (M, 128 * K), (8 * M, 64 * K)])
    );
    ok(&["bitmap", "enable", s(&img), "b0"]);
    assert_eq!(qemu_bitmaps(&img)[0], bm("b0", 65536, &["auto"]));
    qemu_io(&img, &["write 10M 512"]);
    assert_eq!(
        dump(&img, "b0"),
        expect(size, &[(64 * K, 64 * K), (M, 128 * K), (10 * M, 64 * K)])
    );

    // merge: union of several sources, at the target's granularity.
    ok(&[
        "bitmap",
        "merge",
        s(&img),
        "b1",
        "--source",
        "b0",
        "--source",
        "b2",
    ]);
    assert_no_in_use(&img);
    assert_eq!(
        dump(&img, "b1"),
        expect(size, &[(0, 2 * M), (8 * M, M), (10 * M, M)])
    );
    assert_eq!(nbd_dump(&img, "b1"), dump(&img, "b1"));

    // clear, remove.
    ok(&["bitmap", "clear", s(&img), "b0"]);
    assert_eq!(dump(&img, "b0"), vec![(0, size, false)]);
    assert_eq!(entry(&img, "b0")["dirty-bytes"], 0);
    ok(&["bitmap", "remove", s(&img), "b2"]);
    assert_eq!(names(&img), ["b0", "b1"]);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![bm("b0", 65536, &["auto"]), bm("b1", M, &[])]
    );
    ok(&["bitmap", "remove", s(&img), "b0"]);
    ok(&["bitmap", "remove", s(&img), "b1"]);
    assert!(qemu_bitmaps(&img).is_empty());
    assert_eq!(info(&img)["format-specific"]["data"].get("bitmaps"), None);
    qemu_check_clean(&img);
}

#[test]
fn bitmap_errors_match_qemu() {
    if !have(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("img.qcow2");
    let q = d.join("q.qcow2");
    ok(&["create", s(&img), "64M"]);
    qemu_img_create(&q, "64M");
    ok(&["bitmap", "add", s(&img), "b0"]);
    qemu_ok("qemu-img", &["bitmap", "--add", s(&q), "b0"]);

    // The same failure gives QEMU's text, after the program name.
    let same = |ours_args: &[&str], qemu_args: &[&str]| {
        let e = fails(ours_args);
        let r = qemu("qemu-img", qemu_args);
        assert_eq!(r.code, 1, "{qemu_args:?}");
        let qe = r.stderr.strip_prefix("qemu-img: ").unwrap_or(&r.stderr);
        assert_eq!(e, qe, "ours {ours_args:?} vs qemu {qemu_args:?}");
    };
    same(
        &["bitmap", "add", s(&img), "b0"],
        &["bitmap", "--add", s(&q), "b0"],
    );
    same(
        &["bitmap", "remove", s(&img), "nope"],
        &["bitmap", "--remove", s(&q), "nope"],
    );
    same(
        &["bitmap", "clear", s(&img), "nope"],
        &["bitmap", "--clear", s(&q), "nope"],
    );
    same(
        &["bitmap", "merge", s(&img), "b0", "--source", "nope"],
        &["bitmap", "--merge", "nope", s(&q), "b0"],
    );
    for op in ["enable", "disable", "dump"] {
        let e = fails(&["bitmap", op, s(&img), "nope"]);
        assert!(e.contains("Dirty bitmap 'nope' not found"), "{op}: {e}");
    }

    // Missing image: one line, for every subcommand.
    let missing = d.join("missing.qcow2");
    for args in [
        vec!["bitmap", "add", s(&missing), "b0"],
        vec!["bitmap", "remove", s(&missing), "b0"],
        vec!["bitmap", "clear", s(&missing), "b0"],
        vec!["bitmap", "enable", s(&missing), "b0"],
        vec!["bitmap", "disable", s(&missing), "b0"],
        vec!["bitmap", "merge", s(&missing), "b0", "--source", "b1"],
        vec![
            "bitmap",
            "merge",
            s(&img),
            "b0",
            "--source",
            "b1",
            "--source-image",
            s(&missing),
        ],
        vec!["bitmap", "list", s(&missing)],
        vec!["bitmap", "dump", s(&missing), "b0"],
    ] {
        let e = fails(&args);
        assert_eq!(
            e,
            format!(
                "Could not open '{}': No such file or directory\n",
                s(&missing)
            ),
            "{args:?}"
        );
    }
    assert!(!missing.exists());

    // v2 image.
    let v2 = d.join("v2.qcow2");
    ok(&["create", s(&v2), "1M", "--compat", "0.10"]);
    let e = fails(&["bitmap", "add", s(&v2), "b0"]);
    assert!(
        e.starts_with("Operation add on bitmap b0 failed: Can't make bitmap 'b0' persistent in")
            && e.trim_end()
                .ends_with("Cannot store dirty bitmaps in qcow2 v2 files"),
        "{e}"
    );

    // Granularity.
    for g in ["1000", "256", "0"] {
        let e = fails(&["bitmap", "add", s(&img), "g", "-g", g]);
        assert!(
            e.starts_with("Operation add on bitmap g failed: Granularity must be power of 2"),
            "{g}: {e}"
        );
    }
    let e = fails(&["bitmap", "add", s(&img), "g", "-g", "4G"]);
    assert!(
        e.contains("Granularity exceeds maximum (2147483648 bytes)"),
        "{e}"
    );
    let e = fails(&["bitmap", "add", s(&img), "g", "-g", "abc"]);
    assert!(e.starts_with("Invalid granularity 'abc'"), "{e}");

    // Name length.
    let long = "x".repeat(1024);
    let e = fails(&["bitmap", "add", s(&img), &long]);
    assert!(
        e.contains("Name length exceeds maximum (1023 characters)"),
        "{e}"
    );
    let r = qemu("qemu-img", &["bitmap", "--add", s(&q), &long]);
    assert!(r
        .stderr
        .contains("Name length exceeds maximum (1023 characters)"));
    ok(&["bitmap", "add", s(&img), &long[..1023]]);
    assert!(names(&img).contains(&long[..1023].to_string()));
    ok(&["bitmap", "remove", s(&img), &long[..1023]]);

    // Not qcow2.
    let raw = d.join("r.raw");
    fs::write(&raw, [0u8; 4096]).unwrap();
    assert!(fails(&["bitmap", "add", s(&raw), "b0"]).contains("not a qcow2 image"));

    // Inconsistent bitmaps (in-use after a crash): only remove works, with QEMU's
    // message and hint; a failed operation still stores the others cleanly.
    ok(&["bitmap", "add", s(&img), "b1", "--disabled"]);
    qemu_ok("qemu-img", &["bitmap", "--add", s(&q), "b1", "--disable"]);
    for p in [&img, &q] {
        let r = qemu("qemu-io", &["-f", "qcow2", "-c", "abort", s(p)]);
        assert_ne!(r.code, 0);
    }
    ok(&["bitmap", "add", s(&img), "b2"]);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            bm("b0", 65536, &["in-use", "auto"]),
            bm("b1", 65536, &["in-use"]),
            bm("b2", 65536, &["auto"]),
        ]
    );
    let e = entry(&img, "b0");
    assert_eq!(
        e["flags"],
        serde_json::json!(["in-use", "auto", "inconsistent"])
    );
    assert_eq!(e["inconsistent"], true);
    same(
        &["bitmap", "clear", s(&img), "b0"],
        &["bitmap", "--clear", s(&q), "b0"],
    );
    same(
        &["bitmap", "enable", s(&img), "b1"],
        &["bitmap", "--enable", s(&q), "b1"],
    );
    same(
        &["bitmap", "disable", s(&img), "b0"],
        &["bitmap", "--disable", s(&q), "b0"],
    );
    let e = fails(&["bitmap", "merge", s(&img), "b2", "--source", "b0"]);
    assert_eq!(
        e,
        "Operation merge on bitmap b2 failed: Bitmap 'b0' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk\n"
    );
    let e = fails(&["bitmap", "dump", s(&img), "b1"]);
    assert!(
        e.starts_with("Bitmap 'b1' is inconsistent and cannot be used\n"),
        "{e}"
    );
    assert_eq!(
        qemu_bitmaps(&img)[2],
        bm("b2", 65536, &["auto"]),
        "b2 stored cleanly"
    );
    ok(&["bitmap", "remove", s(&img), "b0"]);
    ok(&["bitmap", "remove", s(&img), "b1"]);
    assert_eq!(qemu_bitmaps(&img), vec![bm("b2", 65536, &["auto"])]);
    qemu_check_clean(&img);
}

#[test]
fn read_only_ops_never_write_and_locks_are_qemus() {
    if !have(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    ok(&["create", s(&img), "8M"]);
    ok(&["bitmap", "add", s(&img), "b0"]);
    ok(&["bitmap", "add", s(&img), "b1"]);
    // b1 inconsistent (a crash while open), b0 re-created and dirty: read-only opens
    // must leave both exactly as they are.
    let _ = qemu("qemu-io", &["-f", "qcow2", "-c", "abort", s(&img)]);
    ok(&["bitmap", "remove", s(&img), "b0"]);
    ok(&["bitmap", "add", s(&img), "b0"]);
    qemu_io(&img, &["write 1M 1M"]);
    let before = fs::read(&img).unwrap();
    let r = ours(&["bitmap", "list", s(&img)]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("inconsistent"), "{}", r.stdout);
    ok(&["bitmap", "list", "--json", s(&img)]);
    assert_eq!(dump(&img, "b0"), expect(8 * M, &[(M, M)]));
    assert_eq!(
        fs::read(&img).unwrap(),
        before,
        "read-only ops changed the file"
    );

    {
        // A read-only QEMU user shares reading: list and dump work meanwhile; a change
        // is refused with QEMU's lock message.
        let nbd = Nbd::start(&img, "b0");
        assert_eq!(nbd.extents("b0"), expect(8 * M, &[(M, M)]));
        assert_eq!(dump(&img, "b0"), expect(8 * M, &[(M, M)]));
        let e = fails(&["bitmap", "clear", s(&img), "b0"]);
        assert!(e.starts_with("Failed to get \"write\" lock"), "{e}");
        assert!(e.contains("Is another process using the image"), "{e}");
    }
    {
        // A writer excludes us, reading included (like qemu-img without -U).
        let _nbd = Nbd::start_writable(&img);
        let e = fails(&["bitmap", "list", s(&img)]);
        assert!(e.starts_with("Failed to get shared \"write\" lock"), "{e}");
        let e = fails(&["bitmap", "add", s(&img), "b9"]);
        assert!(e.contains("lock"), "{e}");
    }
    // And while we hold the image, QEMU is refused: covered by lock.rs unit tests.
    assert_eq!(dump(&img, "b0"), expect(8 * M, &[(M, M)]));
}

// ---------------------------------------------------------------------------------------
// Interop: bits and bitmaps QEMU writes and reads
// ---------------------------------------------------------------------------------------

#[test]
fn bits_match_qemu_and_qemu_tools_use_our_bitmaps() {
    if !have(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A size that is no multiple of the granularity: the last granule is partial.
    let img = d.join("img.qcow2");
    qemu_img_create(&img, "5000K");
    ok(&["bitmap", "add", s(&img), "fine", "-g", "512"]);
    ok(&["bitmap", "add", s(&img), "b64", "-g", "64K"]);
    ok(&["bitmap", "add", s(&img), "coarse", "-g", "1M"]);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            bm("fine", 512, &["auto"]),
            bm("b64", 65536, &["auto"]),
            bm("coarse", M, &["auto"]),
        ]
    );
    qemu_io(
        &img,
        &[
            "write 1000 10",
            "write -P 7 100k 4k",
            "write 1M 1M",
            "write 3333k 1k",
            "write -z 4M 8k",
            "discard 2M 64k",
            "write 4999k 1k",
        ],
    );
    let size = 5000 * K;
    for name in ["fine", "b64", "coarse"] {
        let q = nbd_dump(&img, name);
        let o = dump(&img, name);
        assert_eq!(o, q, "bitmap {name}: ours vs qemu-nbd");
        let dirty: u64 = o.iter().filter(|e| e.2).map(|e| e.1).sum();
        assert_eq!(entry(&img, name)["dirty-bytes"], dirty, "{name}");
        assert_eq!(o.last().unwrap().0 + o.last().unwrap().1, size);
    }
    assert_eq!(
        dump(&img, "b64"),
        expect(
            size,
            &[
                (0, 64 * K),
                (64 * K, 64 * K),
                (M, M + 64 * K),
                (3328 * K, 64 * K),
                (4 * M, 64 * K),
                (4992 * K, 8 * K)
            ]
        )
    );

    // qemu-img bitmap works on bitmaps we wrote; we read what it did.
    qemu_ok(
        "qemu-img",
        &["bitmap", "--merge", "fine", s(&img), "coarse"],
    );
    assert_eq!(dump(&img, "coarse"), nbd_dump(&img, "coarse"));
    qemu_ok("qemu-img", &["bitmap", "--disable", s(&img), "fine"]);
    assert_eq!(entry(&img, "fine")["recording"], false);
    qemu_ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "128k", "--disable", s(&img), "q1"],
    );
    let q1 = entry(&img, "q1");
    assert_eq!(q1["granularity"], 131072);
    assert_eq!(q1["flags"], serde_json::json!([]));

    // convert --bitmaps copies our bitmaps with their contents.
    let copy = d.join("copy.qcow2");
    qemu_ok(
        "qemu-img",
        &["convert", "--bitmaps", "-O", "qcow2", s(&img), s(&copy)],
    );
    assert_eq!(names(&copy), names(&img));
    for name in ["fine", "b64", "coarse", "q1"] {
        assert_eq!(dump(&copy, name), dump(&img, name), "{name} after convert");
    }

    // qemu-img bitmap --remove on our image.
    qemu_ok("qemu-img", &["bitmap", "--remove", s(&img), "b64"]);
    assert_eq!(names(&img), ["fine", "coarse", "q1"]);
    qemu_check_clean(&img);
    qemu_check_clean(&copy);
}

// ---------------------------------------------------------------------------------------
// Replay of QEMU's iotest tests/qemu-img-bitmaps
// ---------------------------------------------------------------------------------------

/// One step done by `qemu-img` (QEMU flow) or by our binary (our flow).
fn step(use_ours: bool, qemu_args: &[&str], our_args: &[&str]) {
    if use_ours {
        ok(our_args);
    } else {
        qemu_ok("qemu-img", qemu_args);
    }
}

/// The iotest's flow up to the converted image; returns (converted image, base image).
fn iotest_flow(dir: &Path, use_ours: bool) -> (PathBuf, PathBuf) {
    let base = dir.join("t.qcow2.base");
    let orig = dir.join("t.qcow2.orig");
    let img = dir.join("t.qcow2");
    let (b, o, i) = (s(&base), s(&orig), s(&img));

    // Initial image setup: backing image with one bitmap.
    step(
        use_ours,
        &["create", "-q", "-f", "qcow2", b, "10M"],
        &["create", b, "10M"],
    );
    step(
        use_ours,
        &["bitmap", "--add", "-f", "qcow2", b, "b0"],
        &["bitmap", "add", b, "b0"],
    );
    qemu_io(&base, &["w 3M 1M"]);
    // Initial image with two bitmaps: one active, one inactive.
    step(
        use_ours,
        &[
            "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", o, "10M",
        ],
        &["create", o, "10M", "-b", b, "-F", "qcow2"],
    );
    qemu_io(&orig, &["w 0 1M"]);
    step(
        use_ours,
        &["bitmap", "--add", "-g", "512k", "-f", "qcow2", o, "b1"],
        &["bitmap", "add", "-g", "512k", o, "b1"],
    );
    step(
        use_ours,
        &["bitmap", "--add", "--disable", "-f", "qcow2", o, "b2"],
        &["bitmap", "add", "--disabled", o, "b2"],
    );
    qemu_io(&orig, &["w 3M 1M"]);
    step(
        use_ours,
        &["bitmap", "--clear", "-f", "qcow2", o, "b1"],
        &["bitmap", "clear", o, "b1"],
    );
    qemu_io(&orig, &["w 1M 1M"]);
    step(
        use_ours,
        &["bitmap", "--disable", "-f", "qcow2", o, "b1"],
        &["bitmap", "disable", o, "b1"],
    );
    step(
        use_ours,
        &["bitmap", "--enable", "-f", "qcow2", o, "b2"],
        &["bitmap", "enable", o, "b2"],
    );
    qemu_io(&orig, &["w 2M 1M"]);

    // Bitmap preservation not possible to non-qcow2.
    let raw = dir.join("t.raw");
    let r = qemu(
        "qemu-img",
        &["convert", "--bitmaps", "-O", "raw", o, s(&raw)],
    );
    assert_ne!(r.code, 0);
    assert!(r
        .stderr
        .contains("Format driver 'raw' does not support bitmaps"));

    // Convert with bitmap preservation: only the active layer's bitmaps are copied.
    qemu_ok("qemu-img", &["convert", "--bitmaps", "-O", "qcow2", o, i]);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![bm("b1", 512 * K, &[]), bm("b2", 64 * K, &["auto"])]
    );
    // Merge in a bitmap from the backing file through a temporary bitmap.
    step(
        use_ours,
        &["bitmap", "--add", "--disable", "-f", "qcow2", i, "b0"],
        &["bitmap", "add", "--disabled", i, "b0"],
    );
    if use_ours {
        ok(&["bitmap", "add", i, "tmp"]);
        ok(&[
            "bitmap",
            "merge",
            i,
            "tmp",
            "--source",
            "b0",
            "--source-image",
            b,
        ]);
    } else {
        qemu_ok(
            "qemu-img",
            &[
                "bitmap", "--add", "--merge", "b0", "-b", b, "-F", "qcow2", "-f", "qcow2", i, "tmp",
            ],
        );
    }
    step(
        use_ours,
        &["bitmap", "--merge", "tmp", "-f", "qcow2", i, "b0"],
        &["bitmap", "merge", i, "b0", "--source", "tmp"],
    );
    step(
        use_ours,
        &["bitmap", "--remove", "-f", "qcow2", i, "tmp"],
        &["bitmap", "remove", i, "tmp"],
    );
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            bm("b1", 512 * K, &[]),
            bm("b2", 64 * K, &["auto"]),
            bm("b0", 64 * K, &[]),
        ]
    );
    (img, base)
}

/// The iotest's inconsistent-bitmap part on `img`; returns the bitmaps of the copy made
/// with --skip-broken-bitmaps.
fn iotest_inconsistent(img: &Path, use_ours: bool) -> Vec<(String, u64, Vec<String>)> {
    let i = s(img);
    let r = qemu("qemu-io", &["-f", "qcow2", "-c", "abort", i]);
    assert_ne!(r.code, 0);
    step(
        use_ours,
        &["bitmap", "--add", i, "b4"],
        &["bitmap", "add", i, "b4"],
    );
    step(
        use_ours,
        &["bitmap", "--remove", i, "b1"],
        &["bitmap", "remove", i, "b1"],
    );
    assert_eq!(
        qemu_bitmaps(img),
        vec![
            bm("b2", 64 * K, &["in-use", "auto"]),
            bm("b0", 64 * K, &["in-use"]),
            bm("b4", 64 * K, &["auto"]),
        ]
    );
    let copy = img.with_extension("copy");
    let r = qemu(
        "qemu-img",
        &["convert", "--bitmaps", "-O", "qcow2", i, s(&copy)],
    );
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("Cannot copy inconsistent bitmap '")
            && r.stderr.contains("Try --skip-broken-bitmaps"),
        "{}",
        r.stderr
    );
    let _ = fs::remove_file(&copy);
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            i,
            s(&copy),
        ],
    );
    qemu_bitmaps(&copy)
}

#[test]
fn replay_of_qemu_iotest_qemu_img_bitmaps() {
    if !have(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dq = tempfile::tempdir().unwrap();
    let dour = tempfile::tempdir().unwrap();
    let (qimg, qbase) = iotest_flow(dq.path(), false);
    let (oimg, obase) = iotest_flow(dour.path(), true);

    // Check bitmap contents: the iotest's expected maps, for both flows, read by QEMU
    // (qemu-nbd -B + qemu-img map) and by us.
    let size = 10 * M;
    let want = [
        ("b0", expect(size, &[(3 * M, M)])),
        ("b1", expect(size, &[(M, M)])),
        ("b2", expect(size, &[(2 * M, M)])),
    ];
    for (name, exts) in &want {
        for img in [&qimg, &oimg] {
            assert_eq!(&nbd_dump(img, name), exts, "{name} in {img:?} via qemu-nbd");
            assert_eq!(&dump(img, name), exts, "{name} in {img:?} via dump");
        }
    }
    for base in [&qbase, &obase] {
        assert_eq!(dump(base, "b0"), expect(size, &[(3 * M, M)]));
        qemu_check_clean(base);
    }

    // Check handling of inconsistent bitmap.
    let qcopy = iotest_inconsistent(&qimg, false);
    let ocopy = iotest_inconsistent(&oimg, true);
    assert_eq!(qcopy, vec![bm("b4", 64 * K, &["auto"])]);
    assert_eq!(ocopy, qcopy);
    assert_eq!(list(&qimg), list(&oimg));
    for img in [&qimg, &oimg] {
        assert_eq!(dump(img, "b4"), vec![(0, size, false)]);
        qemu_check_clean(img);
    }
}

/// `check` fails like `qemu-img check` (exit 1, QEMU's text) on images QEMU refuses to open
/// because of their bitmap directory, instead of checking refcounts and passing.
#[test]
fn check_refuses_bitmap_directories_qemu_refuses() {
    if !have(&["qemu-img"]) {
        return;
    }
    use qcow2::ImageMetadata;
    let dir = tempfile::tempdir().unwrap();
    type Patch = fn(&mut [u8], usize);
    let cases: [(&str, Patch); 4] = [
        ("flag bit 2", |f, d| f[d + 15] |= 4),
        ("granularity bits 32", |f, d| f[d + 17] = 32),
        ("extra data", |f, d| f[d + 23] = 8),
        ("misaligned table", |f, d| f[d + 6] |= 2),
    ];
    for (i, (what, patch)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("c{i}.qcow2"));
        qemu_img_create(&img, "64M");
        qemu_ok("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
        let doff = {
            let q = qcow2::Qcow2Image::open(
                &img,
                &qcow2::OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let x = q.header_extension(qcow2::EXT_BITMAPS).unwrap();
            u64::from_be_bytes(x[16..24].try_into().unwrap()) as usize
        };
        let mut f = fs::read(&img).unwrap();
        patch(&mut f, doff);
        fs::write(&img, &f).unwrap();
        let theirs = qemu("qemu-img", &["check", s(&img)]);
        assert_eq!(theirs.code, 1, "{what}: qemu-img check: {}", theirs.stderr);
        let err = fails(&["check", s(&img)]);
        let first = err.lines().next().unwrap_or_default();
        assert!(
            theirs.stderr.contains(first),
            "{what}: qemu-img says {:?}, we say {first:?}",
            theirs.stderr
        );
        assert!(
            first.starts_with(&format!("Could not open '{}': ", s(&img))),
            "{first}"
        );
        assert_eq!(fs::read(&img).unwrap(), f, "{what}: check wrote the image");
    }
}
