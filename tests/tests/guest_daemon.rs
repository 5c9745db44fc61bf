//! Real-guest end-to-end tests of our daemon (`vhost-device-blk-bitmap`): a Linux guest
//! writes, reads back, discards and zeroes blocks on /dev/vda; QEMU's own tools then check
//! the qcow2's contents and that its persistent bitmaps mark exactly the touched granules.
//! Also the bitmap lifecycle: in-use while a VM is attached, clean after it disconnects
//! (the daemon still running) and after SIGTERM; with `--no-crash-consistent-bitmaps`
//! (QEMU's behaviour) in-use after SIGKILL and refused as inconsistent by the next start
//! until removed. (With crash-consistent bitmaps, the default, the next start recovers
//! the bitmap instead: `tests/guest_backup.rs` checks that with a live VM and backups.)
//!
//! The daemon binary comes from [`e2e::daemon_binary`] (built on demand).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::tools::{
    qemu_img_bitmap_add, qemu_img_compare, qemu_img_create_qcow2, qemu_io, require_tools,
};
use e2e::{
    bitmap_dirty_extents, daemon_binary, daemon_command, qemu_img_check, qemu_img_info_json,
    Backend, Guest, GuestScript, Scenario,
};
use serde_json::Value;

const TOOLS: &[&str] = &["qemu-img", "qemu-io", "qemu-nbd"];
const K64: u64 = 65536;
const SIZE: u64 = 64 << 20;
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

fn bin() -> Option<PathBuf> {
    require_tools(TOOLS)?;
    Some(daemon_binary().unwrap_or_else(|e| panic!("{e}")))
}

/// Starts the daemon; a socket left by a killed daemon is removed first so that the
/// wait sees the new one.
fn start(bin: &Path, image: &Path, socket: &Path, queues: u32, extra: &[&str]) -> Backend {
    let _ = std::fs::remove_file(socket);
    Backend::spawn(
        daemon_command(bin, image, socket, queues, extra),
        socket,
        STOP_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("daemon start: {e}"))
}

/// Flags of bitmap `name` as `qemu-img info -U` shows them.
fn flags(image: &Path, name: &str) -> Vec<String> {
    let info = qemu_img_info_json(image, true).unwrap_or_else(|e| panic!("{e}"));
    info.pointer("/format-specific/data/bitmaps")
        .and_then(Value::as_array)
        .and_then(|l| l.iter().find(|b| b["name"] == name))
        .and_then(|b| b["flags"].as_array())
        .unwrap_or_else(|| panic!("no bitmap {name}: {info}"))
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

fn in_use(image: &Path, name: &str) -> bool {
    flags(image, name).iter().any(|f| f == "in-use")
}

/// `(name, granularity, flags)` of every bitmap (`qemu-img info -U`), sorted.
fn bitmaps(image: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info = qemu_img_info_json(image, true).unwrap_or_else(|e| panic!("{e}"));
    let mut v: Vec<_> = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let flags = b["flags"].as_array().cloned().unwrap_or_default();
            (
                b["name"].as_str().unwrap_or_default().to_owned(),
                b["granularity"].as_u64().unwrap_or_default(),
                flags
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
            )
        })
        .collect();
    v.sort();
    v
}

fn auto() -> Vec<String> {
    vec!["auto".to_owned()]
}

fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `qemu-img check -U`: the image is held by the running daemon.
fn check_shared(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(image)
        .output()
        .expect("qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors were found") && !text.contains("leak"),
        "qemu-img check -U: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Watches `qemu-img info -U` in a thread and records whether `name` was ever in-use.
struct InUseWatcher {
    seen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InUseWatcher {
    fn start(image: &Path, name: &str) -> Self {
        let (seen, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (s, t, image, name) = (
            seen.clone(),
            stop.clone(),
            image.to_owned(),
            name.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            while !t.load(Ordering::SeqCst) {
                // `qemu-img info -U` reads the header while the daemon may be rewriting
                // it (a store switches the bitmap directory): a reading without the
                // bitmap is a torn read, not an answer; look again.
                let seen_now = qemu_img_info_json(&image, true).ok().and_then(|info| {
                    info.pointer("/format-specific/data/bitmaps")?
                        .as_array()?
                        .iter()
                        .find(|b| b["name"] == name.as_str())
                        .map(|b| {
                            b["flags"]
                                .as_array()
                                .is_some_and(|f| f.iter().any(|x| x == "in-use"))
                        })
                });
                if seen_now == Some(true) {
                    s.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        InUseWatcher {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("watcher thread");
        }
        self.seen.load(Ordering::SeqCst)
    }
}

fn run_guest(socket: &Path, queues: u32, script: &GuestScript, backend: &Backend) {
    let text = script.render().expect("valid script");
    let outcome = Guest::run(socket, queues, &text, GUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest could not run: {e}"));
    if let Err(e) = outcome.check_success() {
        panic!("{e}\n--- daemon log ---\n{}", backend.log());
    }
}

/// The standard scenario (writes, read-backs, discard, write-zeroes, flush with the
/// write cache on; two queues) with a 64 KiB bitmap the daemon records into, and every
/// check after a SIGTERM: `qemu-img check`, flags exactly `auto`, contents equal to the
/// model, dirty granules exactly the touched ones.
fn standard_scenario_two_queues(aio: &str) {
    let Some(bin) = bin() else { return };
    let dir = tempfile::tempdir().expect("temporary directory");
    let scenario = Scenario::default();
    let report = scenario
        .run(dir.path(), 2, |image, socket| {
            Backend::spawn(
                daemon_command(&bin, image, socket, 2, &["--bitmap", "b0", "--aio", aio]),
                socket,
                STOP_TIMEOUT,
            )
        })
        .unwrap_or_else(|e| panic!("scenario: {e}"));
    eprintln!(
        "guest finished in {:.1?} (--aio {aio})",
        report.guest_elapsed
    );
    let total: u64 = report.dirty.iter().map(|e| e.1).sum();
    assert!(total > 0 && total < SIZE / 4, "dirty bytes {total}");
}

#[test]
fn daemon_guest_standard_scenario_two_queues() {
    standard_scenario_two_queues("io_uring");
}

/// The same with the synchronous engine (`--aio threads`).
#[test]
fn daemon_guest_standard_scenario_two_queues_threads() {
    standard_scenario_two_queues("threads");
}

/// Two VMs one after the other (a reboot) on one daemon with two bitmaps (64 KiB, and a
/// 4 KiB one the daemon creates): in-use while each VM is attached, clean (check -U, no
/// in-use) after each disconnect with the daemon still running, the second VM reads the
/// first one's data, and after SIGTERM both bitmaps mark exactly the touched granules.
#[test]
fn daemon_guest_reboot_keeps_bitmaps_exact_and_clean_between_vms() {
    reboot_scenario("io_uring");
}

/// The same with the synchronous engine.
#[test]
fn daemon_guest_reboot_keeps_bitmaps_exact_and_clean_between_vms_threads() {
    reboot_scenario("threads");
}

fn reboot_scenario(aio: &str) {
    let Some(bin) = bin() else { return };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    qemu_img_create_qcow2(&image, SIZE).expect("qemu-img create");
    qemu_img_bitmap_add(&image, "b0", K64).expect("qemu-img bitmap --add");
    let g = K64;
    let first = GuestScript::new("/dev/vda")
        .write(g + 4096, 4096, 0xa1)
        .write(2 * g - 4096, 8192, 0xa2)
        .on_cpu(Some(1))
        .write(10 * g, g, 0xa3)
        .discard(10 * g, 2 * g)
        .verify(10 * g, 2 * g, 0)
        .write_zeroes(20 * g + 512, 1024)
        .write(30 * g + 8192, 4096, 0xa4)
        .on_cpu(None)
        .verify(g + 4096, 4096, 0xa1)
        .verify(2 * g - 4096, 8192, 0xa2)
        .verify(30 * g + 8192, 4096, 0xa4);
    let second = GuestScript::new("/dev/vda")
        .verify(g + 4096, 4096, 0xa1)
        .verify(30 * g + 8192, 4096, 0xa4)
        .write(40 * g + 512, 512, 0xb1)
        .write_zeroes(50 * g, g)
        .verify(40 * g + 512, 512, 0xb1)
        .verify(50 * g, g, 0);

    let backend = start(
        &bin,
        &image,
        &socket,
        2,
        &[
            "--bitmap",
            "b0",
            "--bitmap",
            "f4,granularity=4K",
            "--aio",
            aio,
        ],
    );
    assert_eq!(
        bitmaps(&image),
        vec![("b0".into(), K64, auto()), ("f4".into(), 4096, auto())],
        "clean while no VM is attached"
    );
    for (i, script) in [&first, &second].into_iter().enumerate() {
        let watcher = InUseWatcher::start(&image, "f4");
        run_guest(&socket, 2, script, &backend);
        assert!(watcher.finish(), "VM {i}: bitmap never seen in-use");
        wait_until("the store after the VM left", 20, || {
            !in_use(&image, "b0") && !in_use(&image, "f4")
        });
        check_shared(&image);
    }
    let log = backend.log();
    backend
        .stop(STOP_TIMEOUT)
        .expect("daemon exits 0 on SIGTERM");
    assert!(log.contains("stored persistent bitmaps of"), "{log}");

    qemu_img_check(&image).expect("qemu-img check");
    assert_eq!(
        bitmaps(&image),
        vec![("b0".into(), K64, auto()), ("f4".into(), 4096, auto())]
    );
    let both = first.then(&second);
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, both.expected_contents(SIZE).expect("model")).expect("write");
    let (same, diff) = qemu_img_compare(&expected, "raw", &image, "qcow2").expect("compare");
    assert!(same, "contents differ from the model: {diff}");
    qemu_io(
        &image,
        "qcow2",
        true,
        &[
            "read -P 0xa1 69632 4096",
            "read -P 0xa4 1974272 4096",
            "read -P 0xb1 2621952 512",
        ],
    )
    .expect("patterns");
    for (name, gran) in [("b0", K64), ("f4", 4096)] {
        let dirty = bitmap_dirty_extents(&image, name).expect("dirty extents");
        assert_eq!(
            dirty,
            both.expected_dirty_extents(gran, SIZE),
            "bitmap {name}"
        );
    }
}

/// With `--no-crash-consistent-bitmaps` the daemon behaves like QEMU after a crash:
/// SIGKILL while a VM is attached leaves the bitmap in-use (flushed data intact, no
/// corruption; only the store reserve leaked, which the next open frees); the next start
/// with `--bitmap` refuses the inconsistent bitmap and says how to remove it; after
/// `bitmap remove` the daemon creates it afresh, and the image checks clean. (By default the daemon keeps a crash-consistency shadow and the
/// next start recovers the bitmap: see `tests/guest_backup.rs`.)
#[test]
fn daemon_guest_sigkill_leaves_in_use_and_restart_reports_inconsistent() {
    sigkill_scenario("io_uring");
}

/// The same with the synchronous engine.
#[test]
fn daemon_guest_sigkill_leaves_in_use_and_restart_reports_inconsistent_threads() {
    sigkill_scenario("threads");
}

/// The daemon's options in [`sigkill_scenario`]: crash-consistent bitmaps off.
fn no_shadow_args(aio: &str) -> [&str; 5] {
    [
        "--bitmap",
        "b0",
        "--aio",
        aio,
        "--no-crash-consistent-bitmaps",
    ]
}

fn sigkill_scenario(aio: &str) {
    let Some(bin) = bin() else { return };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    qemu_img_create_qcow2(&image, SIZE).expect("qemu-img create");
    qemu_img_bitmap_add(&image, "b0", K64).expect("qemu-img bitmap --add");
    let backend = start(&bin, &image, &socket, 1, &no_shadow_args(aio));
    // Write and flush, then keep the VM attached for a while without disk I/O.
    let text = GuestScript::new("/dev/vda")
        .write_cache(true)
        .write(0, 4096, 0x71)
        .flush()
        .render()
        .expect("valid script")
        .replace("echo \"E2E-DONE\"", "sleep 8\necho \"E2E-DONE\"");
    let guest = {
        let socket = socket.clone();
        std::thread::spawn(move || Guest::run(&socket, 1, &text, GUEST_TIMEOUT))
    };
    // The data is in the image (it was flushed) once qemu-io -U reads it back.
    let flushed = || {
        Command::new("qemu-io")
            .args(["-U", "-r", "-f", "qcow2", "-c", "read -P 0x71 0 4k"])
            .arg(&image)
            .output()
            .is_ok_and(|o| {
                o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail")
            })
    };
    wait_until("the guest's flushed write", 180, flushed);
    assert!(in_use(&image, "b0"), "in-use while the VM is attached");
    assert!(backend.kill().is_some(), "daemon reaped");
    let outcome = guest.join().expect("guest thread");
    eprintln!("guest after the daemon died: {outcome:?}");
    assert_eq!(flags(&image, "b0"), vec!["in-use", "auto"]);
    // No corruption; the store reserve the killed daemon held is leaked until the next
    // open of the daemon frees it (checked clean at the end).
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&image)
        .output()
        .expect("qemu-img check");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 3)) && !report.contains("ERROR"),
        "qemu-img check after SIGKILL: {:?}\n{report}",
        out.status
    );
    qemu_io(&image, "qcow2", true, &["read -P 0x71 0 4k"]).expect("flushed data");

    let _ = std::fs::remove_file(&socket);
    let err = Backend::spawn(
        daemon_command(&bin, &image, &socket, 1, &no_shadow_args(aio)),
        &socket,
        STOP_TIMEOUT,
    )
    .expect_err("a start with an inconsistent --bitmap must fail");
    let text = err.to_string();
    assert!(
        text.contains("exited first")
            && text.contains("bitmap 'b0'")
            && text.contains("is inconsistent")
            && text.contains("bitmap remove"),
        "{text}"
    );
    assert_eq!(flags(&image, "b0"), vec!["in-use", "auto"]);

    let out = Command::new(&bin)
        .args(["bitmap", "remove"])
        .arg(&image)
        .arg("b0")
        .output()
        .expect("bitmap remove");
    assert!(
        out.status.success(),
        "bitmap remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bitmaps(&image), vec![]);
    let backend = start(&bin, &image, &socket, 1, &no_shadow_args(aio));
    assert_eq!(bitmaps(&image), vec![("b0".into(), K64, auto())]);
    backend
        .stop(STOP_TIMEOUT)
        .expect("daemon exits 0 on SIGTERM");
    qemu_img_check(&image).expect("qemu-img check");
    assert_eq!(bitmap_dirty_extents(&image, "b0").expect("extents"), vec![]);
}

/// Bitmaps managed over the QMP socket with `ctl` while the daemon serves: `c0` added
/// before the VM connects records exactly the guest's writes; a checkpoint transaction
/// run as soon as the VM is attached (add `c1`, disable `c0`) splits the writes between
/// the two without losing any; both are stored on SIGTERM and read back by QEMU.
#[test]
fn daemon_guest_bitmaps_managed_over_qmp_with_ctl() {
    let Some(bin) = bin() else { return };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    let qmp = dir.path().join("qmp.sock");
    qemu_img_create_qcow2(&image, SIZE).expect("qemu-img create");
    let backend = start(
        &bin,
        &image,
        &socket,
        1,
        &["--qmp-socket", qmp.to_str().expect("utf-8 path")],
    );
    let ctl = |args: &[&str]| {
        let out = Command::new(&bin)
            .arg("ctl")
            .arg("--qmp-socket")
            .arg(&qmp)
            .args(args)
            .output()
            .expect("ctl");
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    ctl(&["bitmap", "add", "disk0", "c0", "-g", "64K"]);
    assert_eq!(
        bitmaps(&image),
        vec![("c0".into(), K64, auto())],
        "stored at once while no VM is attached"
    );
    let g = K64;
    let script = GuestScript::new("/dev/vda")
        .write(g + 4096, 4096, 0xc1)
        .write(7 * g, 3 * g, 0xc2)
        .write_zeroes(20 * g + 512, 1024)
        .write(30 * g, 4096, 0xc3)
        .verify(7 * g, 3 * g, 0xc2);
    // The checkpoint runs as soon as the VM has flagged the bitmaps in-use.
    let (img2, ctl_bin, qmp2) = (image.clone(), bin.clone(), qmp.clone());
    let checkpoint = std::thread::spawn(move || {
        wait_until("the VM to attach", 120, || in_use(&img2, "c0"));
        let out = Command::new(&ctl_bin)
            .arg("ctl")
            .arg("--qmp-socket")
            .arg(&qmp2)
            .arg("raw")
            .arg(
                r#"{"execute": "transaction", "arguments": {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "c1", "granularity": 65536, "persistent": true}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "c0"}}]}}"#,
            )
            .output()
            .expect("ctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    run_guest(&socket, 1, &script, &backend);
    checkpoint.join().expect("checkpoint thread");
    let query = ctl(&["query"]);
    assert!(query.contains("c0") && query.contains("c1"), "{query}");
    backend
        .stop(STOP_TIMEOUT)
        .expect("daemon exits 0 on SIGTERM");
    qemu_img_check(&image).expect("qemu-img check");
    let expected = script.expected_dirty_extents(K64, SIZE);
    let c0 = bitmap_dirty_extents(&image, "c0").expect("c0 extents");
    let c1 = bitmap_dirty_extents(&image, "c1").expect("c1 extents");
    // Every write is in c0 (before the checkpoint) or c1 (after), none elsewhere.
    let granules = |ext: &[(u64, u64)]| -> std::collections::BTreeSet<u64> {
        ext.iter()
            .flat_map(|&(s, l)| s / K64..(s + l).div_ceil(K64))
            .collect()
    };
    let (want, a, b) = (granules(&expected), granules(&c0), granules(&c1));
    let union: std::collections::BTreeSet<u64> = a.union(&b).copied().collect();
    assert_eq!(union, want, "c0 ∪ c1 = the guest's writes");
    assert!(a.iter().chain(&b).all(|k| want.contains(k)));
}
