//! Helpers for tests that use QEMU's tools.
#![allow(dead_code)]

pub mod workload;

use std::path::Path;
use std::process::Command;

/// Whether `tool` is on PATH. Under CI=true a missing tool fails the test.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required for this test but is not installed (apt-get install qemu-utils)");
        }
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

/// Runs a command and returns stdout; panics with stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check --output=json`: (corruptions, leaks, check-errors).
pub fn qemu_check(path: &Path) -> (u64, u64, u64, String) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_else(|_| {
        panic!(
            "qemu-img check gave no JSON: {s} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let g = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (g("corruptions"), g("leaks"), g("check-errors"), s)
}

/// Asserts that `qemu-img check` finds neither corruption nor leak.
pub fn assert_clean(path: &Path) {
    let (c, l, e, s) = qemu_check(path);
    assert_eq!((c, l, e), (0, 0, 0), "qemu-img check: {s}");
}

/// The guest-visible contents as QEMU reads them.
pub fn qemu_raw(path: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// Runs qemu-io commands on an image.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(path.to_str().unwrap().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &a);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io: {out}"
    );
}
