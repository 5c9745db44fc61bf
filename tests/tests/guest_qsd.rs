//! Proves the real-guest harness with `qemu-storage-daemon` as the vhost-user-blk server:
//! a Linux guest writes, reads back, discards and zeroes blocks on /dev/vda; afterwards
//! QEMU's own tools must find exactly that data in the qcow2 and exactly the touched
//! granules dirty in its persistent bitmap. Our daemon runs the same [`Scenario`].

use std::time::Duration;

use e2e::tools::qemu_img_create_qcow2;
use e2e::{
    qemu_img_check, qsd_vhost_user_blk, require_tools, Backend, Guest, GuestScript, Scenario,
};

const TOOLS: &[&str] = &["qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-nbd"];

fn run_case(num_queues: u32) {
    let Some(tools) = require_tools(TOOLS) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let scenario = Scenario::default();
    let report = scenario
        .run(dir.path(), num_queues, |image, socket| {
            Backend::spawn(
                qsd_vhost_user_blk(&tools[0], image, socket, num_queues),
                socket,
                Duration::from_secs(20),
            )
        })
        .unwrap_or_else(|e| panic!("scenario with {num_queues} queue(s): {e}"));
    // Shown by cargo test only on failure or with --nocapture.
    eprintln!(
        "guest ({num_queues} queue(s)) finished in {:.1?}\n{}",
        report.guest_elapsed, report.serial_log
    );
    // Not trivially equal: some granules are dirty, and far from all of them.
    let total: u64 = report.dirty.iter().map(|e| e.1).sum();
    assert!(
        total > 0 && total < scenario.size / 4,
        "dirty bytes {total}"
    );
}

#[test]
fn qsd_guest_one_queue() {
    run_case(1);
}

#[test]
fn qsd_guest_two_queues() {
    run_case(2);
}

/// The harness must report a failing guest script: a pattern check that cannot match
/// fails at its step, and the exit status says which one.
#[test]
fn qsd_guest_reports_failed_check() {
    let Some(tools) = require_tools(TOOLS) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    qemu_img_create_qcow2(&image, 64 << 20).expect("qemu-img create");
    let script = GuestScript::new("/dev/vda")
        .write(0, 4096, 0x42)
        .verify(0, 4096, 0x43)
        .render()
        .expect("valid script");
    let backend = Backend::spawn(
        qsd_vhost_user_blk(&tools[0], &image, &socket, 1),
        &socket,
        Duration::from_secs(20),
    )
    .expect("qemu-storage-daemon starts");
    let outcome = Guest::run(&socket, 1, &script, Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("guest could not run: {e}"));
    backend
        .stop(Duration::from_secs(20))
        .expect("qemu-storage-daemon exits cleanly on SIGTERM");
    assert_eq!(outcome.exit_status, Some(12), "{}", outcome.serial_log);
    assert!(outcome.serial_log.contains("E2E-FAIL step 2: mismatch"));
    assert!(outcome.check_success().is_err());
}

/// The image checks must catch a wrong result: an unknown write of zeroes shows only in
/// the bitmap, an unknown write of data also in the contents.
#[test]
fn image_checks_detect_unexpected_write() {
    let Some(_tools) = require_tools(&["qemu-img", "qemu-io", "qemu-nbd"]) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let scenario = Scenario::default();
    scenario.prepare_image(&image).expect("prepare image");
    let script = GuestScript::new("/dev/vda").write(0, 4096, 0x42);
    e2e::tools::qemu_io(&image, "qcow2", false, &["write -P 0x42 0 4k"]).expect("qemu-io write");
    scenario
        .verify_image(&image, &script, dir.path())
        .expect("matching write verifies");
    // Zeroes leave the contents equal to the model; only the bitmap shows the write.
    e2e::tools::qemu_io(&image, "qcow2", false, &["write -P 0 2M 4k"]).expect("qemu-io write");
    let err = scenario
        .verify_image(&image, &script, dir.path())
        .expect_err("extra dirty granule must be detected");
    assert!(err.to_string().contains("dirty extents"), "{err}");
    e2e::tools::qemu_io(&image, "qcow2", false, &["write -P 0x42 1M 4k"]).expect("qemu-io write");
    let err = scenario
        .verify_image(&image, &script, dir.path())
        .expect_err("extra data must be detected");
    assert!(err.to_string().contains("differ"), "{err}");
}

/// Two guests one after the other on the same server: the server accepts the second
/// connection, the second guest reads the first one's data, and the image afterwards
/// reflects both runs.
#[test]
fn qsd_guest_reconnect_keeps_data() {
    let Some(tools) = require_tools(TOOLS) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    let scenario = Scenario::default();
    let g = scenario.granularity;
    scenario.prepare_image(&image).expect("prepare image");
    let first = GuestScript::new("/dev/vda")
        .write(g, 4096, 0x61)
        .write(50 * g - 4096, 8192, 0x62);
    let second = GuestScript::new("/dev/vda")
        .verify(g, 4096, 0x61)
        .verify(50 * g - 4096, 8192, 0x62)
        .write(60 * g, 4096, 0x63)
        .verify(60 * g, 4096, 0x63);
    let backend = Backend::spawn(
        qsd_vhost_user_blk(&tools[0], &image, &socket, 1),
        &socket,
        Duration::from_secs(20),
    )
    .expect("qemu-storage-daemon starts");
    for script in [&first, &second] {
        let text = script.render().expect("valid script");
        let outcome = Guest::run(&socket, 1, &text, scenario.guest_timeout)
            .unwrap_or_else(|e| panic!("guest could not run: {e}"));
        if let Err(e) = outcome.check_success() {
            panic!("{e}\n--- server log ---\n{}", backend.log());
        }
    }
    backend
        .stop(scenario.stop_timeout)
        .expect("qemu-storage-daemon exits cleanly on SIGTERM");
    let both = first.then(&second);
    let dirty = scenario
        .verify_image(&image, &both, dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dirty, vec![(g, g), (49 * g, 2 * g), (60 * g, g)]);
}

/// Reference behaviour after a crash: a SIGKILLed server leaves the bitmap marked
/// in-use (inconsistent), while the image itself still checks clean, and data the guest
/// flushed (with the write cache on, so that it sends flushes at all) survives.
#[test]
fn qsd_sigkill_leaves_bitmap_in_use() {
    let Some(tools) = require_tools(TOOLS) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    let scenario = Scenario::default();
    scenario.prepare_image(&image).expect("prepare image");
    let backend = Backend::spawn(
        qsd_vhost_user_blk(&tools[0], &image, &socket, 1),
        &socket,
        Duration::from_secs(20),
    )
    .expect("qemu-storage-daemon starts");
    let text = GuestScript::new("/dev/vda")
        .write_cache(true)
        .write(0, 4096, 0x71)
        .flush()
        .render()
        .expect("valid script");
    let outcome = Guest::run(&socket, 1, &text, scenario.guest_timeout)
        .unwrap_or_else(|e| panic!("guest could not run: {e}"));
    outcome.check_success().unwrap_or_else(|e| panic!("{e}"));
    assert!(backend.kill().is_some(), "server reaped");
    let bitmaps = e2e::tools::qemu_img_bitmaps(&image).expect("qemu-img info");
    assert_eq!(bitmaps.len(), 1);
    assert!(
        bitmaps[0].2.iter().any(|f| f == "in-use"),
        "flags after SIGKILL: {:?}",
        bitmaps[0].2
    );
    qemu_img_check(&image).expect("qemu-img check is still clean");
    e2e::tools::qemu_io(&image, "qcow2", true, &["read -P 0x71 0 4k"]).expect("data flushed");
}
