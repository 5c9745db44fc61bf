//! Persistent-bitmap lifecycle on real qcow2 images, checked with QEMU's tools: the
//! tracker API (open → in-use, store on disconnect → clean, in-use again on connect, marks
//! in the stored bitmap) and the binary (error exits, SIGTERM, SIGKILL + restart).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Driver;
use e2e::tools::{bitmap_dirty_extents, qemu_img_info_json};
use serde_json::Value;
use vhost_device_blk_bitmap::bitmaps::{BitmapError, PersistentBitmaps};
use vhost_device_blk_bitmap::config::BitmapSpec;
use vhost_device_blk_bitmap::disk::{open_disk, DiskOptions, OpenedDisk};
use vhost_device_blk_bitmap::tracker::WriteTracker;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-blk-bitmap");
const K64: u64 = 65536;
const T_OUT: u32 = 1;

fn have_tools() -> bool {
    e2e::require_tools(&["qemu-img", "qemu-io", "qemu-nbd"]).is_some()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn qemu_img(args: &[&str], img: &Path) -> String {
    run(Command::new("qemu-img").args(args).arg(img))
}

/// A 64 MiB qcow2 (64 KiB clusters).
fn create(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    img
}

fn add_bitmap(img: &Path, name: &str, granularity: u64, extra: &[&str]) {
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "-g", &granularity.to_string()])
        .args(extra)
        .arg(img)
        .arg(name));
}

/// `(name, granularity, flags)` from `qemu-img info -U`, sorted by name.
fn bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info = qemu_img_info_json(img, true).unwrap();
    let mut v: Vec<_> = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    v.sort();
    v
}

fn flags(img: &Path, name: &str) -> Vec<String> {
    bitmaps(img)
        .into_iter()
        .find(|b| b.0 == name)
        .unwrap_or_else(|| panic!("no bitmap {name} in {:?}", bitmaps(img)))
        .2
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `qemu-img check -U` (the image may be held by us): no errors, no leaks.
fn check_clean(img: &Path) {
    let out = qemu_img(&["check", "-U"], img);
    assert!(out.contains("No errors were found"), "{out}");
    assert!(!out.contains("leaked"), "{out}");
}

fn open(img: &Path) -> OpenedDisk {
    open_disk(&DiskOptions {
        path: img.to_owned(),
        format: None,
        read_only: false,
        direct: false,
        create_size: None,
        known_autoclear: qcow2::AUTOCLEAR_BITMAPS,
        backing: Default::default(),
    })
    .unwrap()
}

fn spec(name: &str, granularity: Option<u64>) -> BitmapSpec {
    BitmapSpec {
        name: name.into(),
        granularity,
    }
}

#[test]
fn tracker_lifecycle_on_a_real_image() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path());
    add_bitmap(&img, "old", K64, &[]);
    let disk = open(&img);
    let t = PersistentBitmaps::open(disk.qcow2.clone().unwrap(), "disk").unwrap();
    // QEMU's open: loaded bitmaps are flagged in-use on disk at once.
    assert_eq!(flags(&img, "old"), strs(&["in-use", "auto"]));
    t.apply(&[spec("old", None), spec("fine", Some(4096))])
        .unwrap();
    // Applying the same requests again is fine (existing, matching).
    t.apply(&[spec("old", Some(K64)), spec("fine", Some(4096))])
        .unwrap();
    // Idle (no frontend): stored, clean on disk, the new bitmap is there.
    t.on_frontend_disconnected().unwrap();
    assert_eq!(
        bitmaps(&img),
        vec![
            ("fine".into(), 4096, strs(&["auto"])),
            ("old".into(), K64, strs(&["auto"]))
        ]
    );
    check_clean(&img);

    // A frontend connects: in-use again before any write.
    t.on_frontend_connected().unwrap();
    assert_eq!(flags(&img, "old"), strs(&["in-use", "auto"]));
    assert_eq!(flags(&img, "fine"), strs(&["in-use", "auto"]));
    disk.image.write_at(&[0xab; 4096], 1 << 20).unwrap();
    t.mark(1 << 20, 4096);
    t.mark((3 << 20) + 512, 1024);
    disk.image.flush().unwrap();
    t.on_frontend_disconnected().unwrap();
    assert_eq!(flags(&img, "old"), strs(&["auto"]));
    assert_eq!(flags(&img, "fine"), strs(&["auto"]));
    check_clean(&img);
    // A second disconnect without a connect stores nothing new and stays clean.
    t.on_frontend_disconnected().unwrap();

    t.on_frontend_connected().unwrap();
    assert_eq!(flags(&img, "fine"), strs(&["in-use", "auto"]));
    t.mark(10 << 20, 70000);
    t.on_shutdown().unwrap();
    assert_eq!(flags(&img, "fine"), strs(&["auto"]));
    drop(t);
    drop(disk);

    e2e::qemu_img_check(&img).unwrap();
    e2e::tools::qemu_io(&img, "qcow2", true, &["read -P 0xab 1M 4k"]).unwrap();
    assert_eq!(
        bitmap_dirty_extents(&img, "old").unwrap(),
        vec![(1 << 20, K64), (3 << 20, K64), (10 << 20, 2 * K64)]
    );
    assert_eq!(
        bitmap_dirty_extents(&img, "fine").unwrap(),
        vec![(1 << 20, 4096), (3 << 20, 4096), (10 << 20, 18 * 4096)]
    );
}

#[test]
fn bad_bitmap_requests_fail_clearly_and_leave_a_clean_image() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path());
    // "bad" is left in-use by a crashed QEMU (qemu-io's abort), then two more are added.
    add_bitmap(&img, "bad", K64, &[]);
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 4k", "-c", "abort"])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success(), "qemu-io abort should die");
    assert_eq!(flags(&img, "bad"), strs(&["in-use", "auto"]));
    add_bitmap(&img, "b0", K64, &[]);
    add_bitmap(&img, "off", K64, &["--disable"]);

    let disk = open(&img);
    let t = PersistentBitmaps::open(disk.qcow2.clone().unwrap(), "disk.qcow2").unwrap();
    let list = t.bitmaps().list();
    assert!(list.iter().any(|b| b.name == "bad" && b.inconsistent));
    let e = t.apply(&[spec("bad", None)]).unwrap_err();
    assert!(matches!(e, BitmapError::Inconsistent { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("'bad'")
            && text.contains("inconsistent")
            && text.contains("vhost-device-blk-bitmap bitmap remove disk.qcow2 bad"),
        "{text}"
    );
    let e = t.apply(&[spec("b0", Some(4096))]).unwrap_err().to_string();
    assert!(
        e.contains("granularity 65536, not 4096"),
        "granularity mismatch: {e}"
    );
    let e = t.apply(&[spec("off", None)]).unwrap_err().to_string();
    assert!(e.contains("is disabled"), "{e}");
    // The failed requests were an error exit after the open: dropping stores.
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    drop(t);
    drop(disk);
    assert_eq!(
        bitmaps(&img),
        vec![
            ("b0".into(), K64, strs(&["auto"])),
            ("bad".into(), K64, strs(&["in-use", "auto"])),
            ("off".into(), K64, vec![]),
        ]
    );
    e2e::qemu_img_check(&img).unwrap();

    // After removing it, `--bitmap bad` creates it afresh with QEMU's default granularity.
    run(Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&img)
        .arg("bad"));
    let disk = open(&img);
    let t = Arc::new(PersistentBitmaps::open(disk.qcow2.clone().unwrap(), "disk.qcow2").unwrap());
    t.apply(&[spec("bad", None)]).unwrap();
    t.on_shutdown().unwrap();
    drop(t);
    drop(disk);
    assert_eq!(flags(&img, "bad"), strs(&["auto"]));
    e2e::qemu_img_check(&img).unwrap();
}

/// The daemon process; killed if a test fails before it exits.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Daemon {
    fn spawn(socket: &Path, image: &Path, extra: &[&str]) -> Daemon {
        // A SIGKILLed daemon leaves its socket behind; `listening` must see a new one.
        let _ = std::fs::remove_file(socket);
        Daemon(
            Command::new(BIN)
                .arg("--socket-path")
                .arg(socket)
                .arg("--image")
                .arg(image)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// Waits for the socket; panics with the log if the daemon exits first.
    fn listening(mut self, socket: &Path) -> Daemon {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if self.0.try_wait().unwrap().is_some() {
                panic!("daemon exited early: {}", self.finish(1).1);
            }
            assert!(Instant::now() < deadline, "socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill only sends a signal to the child we spawned and have not reaped.
        let r = unsafe { libc::kill(self.0.id() as libc::pid_t, sig) };
        assert_eq!(r, 0);
    }

    /// Waits up to `secs` for the exit; returns the status and everything on stderr.
    fn finish(&mut self, secs: u64) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                panic!("daemon did not exit within {secs}s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut s = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            e.read_to_string(&mut s).unwrap();
        }
        (status, s)
    }
}

/// Polls `cond` for up to 10 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes 4 KiB of `byte` at `offset` through the frontend; the request must succeed.
fn guest_write(d: &mut Driver, offset: u64, byte: u8) {
    d.write_data(0, &[byte; 4096]);
    assert_eq!(d.request(0, T_OUT, offset / 512, Some((4096, false))).0, 0);
}

#[test]
fn binary_stores_on_disconnect_sigterm_and_errors_and_survives_sigkill() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path());
    let socket = dir.path().join("vhost.sock");
    add_bitmap(&img, "b0", K64, &[]);

    // An error exit after the open (the socket cannot be bound): the new bitmap exists,
    // and nothing is left in-use.
    let mut bad = Daemon::spawn(
        &dir.path().join("no-such-dir/x.sock"),
        &img,
        &["--bitmap", "fine,granularity=4k"],
    );
    let (st, log) = bad.finish(20);
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(log.contains("cannot listen on"), "{log}");
    assert_eq!(
        bitmaps(&img),
        vec![
            ("b0".into(), K64, strs(&["auto"])),
            ("fine".into(), 4096, strs(&["auto"]))
        ]
    );
    e2e::qemu_img_check(&img).unwrap();

    let mut daemon =
        Daemon::spawn(&socket, &img, &["--bitmap", "b0", "--bitmap", "fine"]).listening(&socket);
    // Listening, no frontend: clean.
    assert_eq!(flags(&img, "b0"), strs(&["auto"]));
    let mut d = Driver::connect(&socket, 1);
    // In-use before the first request can be sent.
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    assert_eq!(flags(&img, "fine"), strs(&["in-use", "auto"]));
    guest_write(&mut d, 1 << 20, 0x5a);
    drop(d);
    wait_until("the store after the disconnect", || {
        flags(&img, "b0") == strs(&["auto"])
    });
    assert_eq!(flags(&img, "fine"), strs(&["auto"]));
    check_clean(&img);
    // Reconnect: in-use again; SIGTERM while connected stores and exits 0.
    let mut d = Driver::connect(&socket, 1);
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    guest_write(&mut d, 5 << 20, 0x6b);
    daemon.signal(libc::SIGTERM);
    let (st, log) = daemon.finish(20);
    drop(d);
    assert!(st.success(), "{log}");
    assert!(
        log.contains("stored persistent bitmaps of") && log.contains("b0 (2 dirty granule(s)"),
        "{log}"
    );
    e2e::qemu_img_check(&img).unwrap();
    e2e::tools::qemu_io(
        &img,
        "qcow2",
        true,
        &["read -P 0x5a 1M 4k", "read -P 0x6b 5M 4k"],
    )
    .unwrap();
    assert_eq!(
        bitmap_dirty_extents(&img, "b0").unwrap(),
        vec![(1 << 20, K64), (5 << 20, K64)]
    );
    assert_eq!(
        bitmap_dirty_extents(&img, "fine").unwrap(),
        vec![(1 << 20, 4096), (5 << 20, 4096)]
    );

    // SIGKILL while a frontend is attached leaves both bitmaps in-use — without the
    // crash-consistency shadow, as with QEMU (with it they are recovered: crash_bitmaps.rs).
    let daemon = Daemon::spawn(
        &socket,
        &img,
        &["--bitmap", "b0", "--no-crash-consistent-bitmaps"],
    )
    .listening(&socket);
    let mut d = Driver::connect(&socket, 1);
    guest_write(&mut d, 9 << 20, 0x7c);
    drop(daemon);
    drop(d);
    assert_eq!(flags(&img, "b0"), strs(&["in-use", "auto"]));
    assert_eq!(flags(&img, "fine"), strs(&["in-use", "auto"]));
    e2e::qemu_img_check(&img).unwrap();

    // The next start refuses to record into an inconsistent bitmap ...
    let mut refused = Daemon::spawn(&socket, &img, &["--bitmap", "b0"]);
    let (st, log) = refused.finish(20);
    assert_eq!(st.code(), Some(1), "{log}");
    let img_name = img.display().to_string();
    assert!(
        log.contains("bitmap 'b0'")
            && log.contains("is inconsistent")
            && log.contains(&format!(
                "vhost-device-blk-bitmap bitmap remove {img_name} b0"
            )),
        "{log}"
    );
    // ... but serves without it, warning about both.
    let mut daemon = Daemon::spawn(&socket, &img, &[]).listening(&socket);
    daemon.signal(libc::SIGTERM);
    let (st, log) = daemon.finish(20);
    assert!(st.success(), "{log}");
    for name in ["b0", "fine"] {
        assert!(
            log.contains(&format!(
                "bitmap '{name}' in '{img_name}' is inconsistent and will not be tracked"
            )),
            "{log}"
        );
    }
    e2e::qemu_img_check(&img).unwrap();
    // Removal then a fresh bitmap.
    run(Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&img)
        .arg("b0"));
    let mut daemon = Daemon::spawn(&socket, &img, &["--bitmap", "b0"]).listening(&socket);
    daemon.signal(libc::SIGTERM);
    let (st, log) = daemon.finish(20);
    assert!(st.success(), "{log}");
    assert_eq!(
        bitmaps(&img),
        vec![
            ("b0".into(), K64, strs(&["auto"])),
            ("fine".into(), 4096, strs(&["in-use", "auto"]))
        ]
    );
    assert_eq!(bitmap_dirty_extents(&img, "b0").unwrap(), vec![]);
    e2e::qemu_img_check(&img).unwrap();
}

/// A tracker whose `on_frontend_connected` is slow; a mark before it finished is a
/// violation of the ordering the bitmaps need (in-use on disk before any write).
#[derive(Debug, Default)]
struct SlowConnect {
    ready: std::sync::atomic::AtomicBool,
    early_marks: std::sync::atomic::AtomicU32,
    marks: std::sync::atomic::AtomicU32,
}

impl WriteTracker for SlowConnect {
    fn mark(&self, _offset: u64, _len: u64) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        self.marks.fetch_add(1, SeqCst);
        if !self.ready.load(SeqCst) {
            self.early_marks.fetch_add(1, SeqCst);
        }
        0
    }
    fn on_frontend_connected(&self) -> Result<(), vhost_device_blk_bitmap::tracker::TrackerError> {
        std::thread::sleep(Duration::from_millis(300));
        self.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn on_frontend_disconnected(
        &self,
    ) -> Result<(), vhost_device_blk_bitmap::tracker::TrackerError> {
        self.ready.store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn on_shutdown(&self) -> Result<(), vhost_device_blk_bitmap::tracker::TrackerError> {
        Ok(())
    }
}

#[test]
fn no_request_is_served_before_the_tracker_is_ready() {
    use std::sync::atomic::Ordering::SeqCst;
    let tracker = Arc::new(SlowConnect::default());
    let daemon = common::TestDaemon::start_full(1, |i| i, tracker.clone());
    for round in 0..2 {
        let mut d = Driver::connect(&daemon.socket, 1);
        guest_write(&mut d, 4096 * (round + 1), 0x11);
        drop(d);
        wait_until("the disconnect", || !tracker.ready.load(SeqCst));
    }
    daemon.stop().unwrap();
    assert_eq!(tracker.marks.load(SeqCst), 2);
    assert_eq!(tracker.early_marks.load(SeqCst), 0);
}

#[test]
fn read_only_and_raw_images() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path());
    let socket = dir.path().join("vhost.sock");
    add_bitmap(&img, "b0", K64, &[]);
    // Read-only: the bitmaps are loaded but never touched, not even flagged in-use.
    let mut daemon = Daemon::spawn(&socket, &img, &["--readonly"]).listening(&socket);
    let d = Driver::connect(&socket, 1);
    assert_eq!(flags(&img, "b0"), strs(&["auto"]));
    drop(d);
    daemon.signal(libc::SIGTERM);
    let (st, log) = daemon.finish(20);
    assert!(st.success(), "{log}");
    assert_eq!(flags(&img, "b0"), strs(&["auto"]));
    e2e::qemu_img_check(&img).unwrap();
    // Raw images cannot hold bitmaps.
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let mut daemon = Daemon::spawn(&socket, &raw, &["--bitmap", "b0"]);
    let (st, log) = daemon.finish(20);
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(
        log.contains("--bitmap needs a writable qcow2 image") && log.contains("is a raw image"),
        "{log}"
    );
}

/// The file system under a served image fills up while a VM is attached. The store
/// needs no new space: the clusters it writes (b0's data and table and the directory,
/// 3 clusters of 64 KiB here) were reserved and preallocated when the VM connected. So
/// the store succeeds — at the disconnect, or at a SIGTERM with the VM still attached —
/// the stop exits 0, b0 covers every acknowledged write, and `qemu-img check` is clean
/// (the store freed what it did not use: no leak).
#[test]
fn a_store_on_a_file_system_that_filled_up_succeeds_from_the_reserve() {
    use std::process::Command;
    if !have_tools() {
        return;
    }
    for sigterm_attached in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = common::SmallFs::mount(dir.path(), "4m") else {
            return;
        };
        let img = fs.0.join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("64M"));
        run(Command::new(common::BIN)
            .args(["bitmap", "add"])
            .arg(&img)
            .args(["b0", "-g", "64K"]));
        let socket = dir.path().join("vhost.sock");
        let mut child = common::spawn(&socket, &img, &["--format", "qcow2"]);
        common::wait_for_socket(&mut child, &socket);
        let mut d = common::Driver::connect(&socket, 1);
        d.write_data(0, &[0x42; 65536]);
        for i in 0..8u64 {
            assert_eq!(d.request(0, T_OUT, i * 2048, Some((65536, false))).0, 0);
        }
        // Fill what is left of the file system.
        let filler = fs.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xffu8; 4096];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
        drop(f);
        assert!(
            std::fs::write(fs.0.join("more"), [0u8; 4096]).is_err(),
            "the file system is full"
        );
        if !sigterm_attached {
            drop(d);
            wait_until("the store at the disconnect", || {
                flags(&img, "b0") == strs(&["auto"])
            });
            check_clean(&img);
        }
        // SAFETY: kill only sends a signal to the child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let st = common::wait_exit(&mut child, 20);
        let mut log = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
        assert!(
            st.success(),
            "exit status {st} (VM attached at the stop: {sigterm_attached}):\n{log}"
        );
        assert!(
            log.contains("reserved 3 cluster(s) (196608 bytes) in 'disk0'"),
            "{log}"
        );
        assert!(
            !log.contains("could not store") && !log.contains("could not reserve"),
            "{log}"
        );
        assert!(
            log.contains("stored persistent bitmaps of")
                && log.contains("b0 (8 dirty granule(s) of 65536 bytes"),
            "{log}"
        );
        assert!(std::fs::metadata(&filler).is_ok(), "still full");
        check_clean(&img);
        e2e::qemu_img_check(&img).unwrap();
        assert_eq!(flags(&img, "b0"), strs(&["auto"]));
        assert_eq!(
            bitmap_dirty_extents(&img, "b0").unwrap(),
            (0..8u64).map(|i| (i << 20, K64)).collect::<Vec<_>>()
        );
    }
}

/// The fallback when the reservation cannot be made: b0 at 512-byte granularity on a
/// 64 GiB disk needs 16 MiB for its data alone in the worst case, more than the whole
/// 4 MiB file system, so it is never reserved (a warning says so). The file system then
/// fills up while a VM is attached, having written into 8 of b0's data clusters (one
/// per 256 MiB): the store at the disconnect fails. If space comes back before the stop,
/// the stop stores the bitmaps (exit 0, clean bitmap); if not, SIGTERM exits non-zero
/// naming the image and the bitmap — which its crash-consistency shadow keeps
/// recoverable: the next start, on the still full file system, recovers it and serves;
/// once space is back its stop stores it with every write of both runs. No corruption at
/// any point.
#[test]
fn a_failed_store_is_retried_at_the_stop_and_a_lost_bitmap_fails_the_exit() {
    use std::process::Command;
    // One 64 KiB write per 256 MiB: each lands in its own data cluster of b0.
    let sectors: Vec<u64> = (0..8u64).map(|i| i * (256 << 20) / 512).collect();
    for space_back in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = common::SmallFs::mount(dir.path(), "4m") else {
            return;
        };
        let mnt = fs.0.clone();
        let img = mnt.join("disk.qcow2");
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("64G"));
        ok(Command::new(common::BIN)
            .args(["bitmap", "add"])
            .arg(&img)
            .args(["b0", "-g", "512"]));
        let socket = dir.path().join("vhost.sock");
        let mut child = common::spawn(&socket, &img, &["--format", "qcow2"]);
        common::wait_for_socket(&mut child, &socket);
        let mut d = common::Driver::connect(&socket, 1);
        d.write_data(0, &[0x42; 65536]);
        for &s in &sectors {
            assert_eq!(d.request(0, 1, s, Some((65536, false))).0, 0);
        }
        // Fill what is left of the file system; the store at the disconnect fails.
        let filler = mnt.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xffu8; 4096];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
        drop(f);
        drop(d);
        std::thread::sleep(std::time::Duration::from_millis(500));
        if space_back {
            std::fs::remove_file(&filler).unwrap();
        }
        // SAFETY: kill only sends a signal to the child we spawned.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let st = child.wait().unwrap();
        let mut log = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
        let image = img.display().to_string();
        assert!(
            log.contains(&format!(
                "could not reserve the space a store of the persistent bitmaps of '{image}' \
                 needs"
            )) && log.contains("their crash-consistency shadow keeps them recoverable"),
            "the reservation failed, and the log says so: {log}"
        );
        assert!(
            log.contains("could not store the persistent bitmaps") && log.contains("b0"),
            "the failed store at the disconnect is reported: {log}"
        );
        if !space_back {
            assert!(
                !st.success(),
                "exit status {st} after failing to store the bitmaps:\n{log}"
            );
            assert!(
                log.contains("the next open recovers them"),
                "the shadow keeps b0 recoverable: {log}"
            );
            // Still full: the next start recovers b0 from its shadow and serves (the
            // store it owes keeps failing), a VM writes, leaves; space comes back and
            // the stop stores everything.
            let mut child = common::spawn(&socket, &img, &["--format", "qcow2", "--bitmap", "b0"]);
            common::wait_for_socket(&mut child, &socket);
            let mut d = common::Driver::connect(&socket, 1);
            // An overwrite (a new cluster would need space the file system lacks).
            d.write_data(0, &[0x43; 65536]);
            assert_eq!(d.request(0, 1, sectors[3], Some((65536, false))).0, 0);
            drop(d);
            std::thread::sleep(std::time::Duration::from_millis(500));
            std::fs::remove_file(&filler).unwrap();
            // SAFETY: kill only sends a signal to the child we spawned.
            assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
            let st2 = child.wait().unwrap();
            let mut log2 = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log2).unwrap();
            assert!(st2.success(), "exit status {st2}:\n{log2}");
            assert!(
                log2.contains("bitmap 'b0' was in use") && log2.contains("recovered"),
                "{log2}"
            );
            assert!(log2.contains("serving anyway"), "{log2}");
            let dirty = e2e::tools::bitmap_dirty_extents(&img, "b0").unwrap();
            for block in sectors.iter().map(|s| s * 512) {
                assert!(
                    dirty.iter().any(|&(o, l)| o <= block && block < o + l),
                    "write at {block:#x} missing from the recovered and stored b0: {dirty:?}"
                );
            }
        }
        let out = Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&img)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&info.stdout);
        if space_back {
            assert!(
                st.success(),
                "exit status {st} although the retry could store:\n{log}"
            );
        }
        assert!(!text.contains("in-use"), "stored at the stop: {text}");
        assert!(text.contains("\"b0\""), "{text}");
    }
}
