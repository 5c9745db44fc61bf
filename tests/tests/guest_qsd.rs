//! Proves the real-guest harness with `qemu-storage-daemon` as the vhost-user-blk server:
//! a Linux guest writes, reads back and discards blocks on /dev/vda; afterwards QEMU's own
//! tools must find exactly that data in the qcow2 and exactly the touched granules dirty
//! in its persistent bitmap. The same script and assertions apply to our daemon.

use std::path::Path;
use std::time::Duration;

use e2e::tools::{
    qemu_img_bitmap_add, qemu_img_bitmaps, qemu_img_compare, qemu_img_create_qcow2, qemu_io,
};
use e2e::{
    bitmap_dirty_extents, qemu_img_check, qsd_vhost_user_blk, require_tools, Backend, Guest,
    GuestScript,
};

const SIZE: u64 = 64 << 20;
const GRAN: u64 = 64 << 10;
const BITMAP: &str = "b0";

/// A script touching a few granules: single 4 KiB blocks, a write spanning two granules,
/// one on the last block, a discard over one written and two untouched clusters, and
/// write-zeroes over written data and over an untouched granule.
/// With `cpus > 1` the second half runs on CPU 1 so a second queue carries requests.
fn script(cpus: u32) -> GuestScript {
    let second = (cpus > 1).then_some(1);
    GuestScript::new("/dev/vda")
        .write(GRAN, 4096, 0xab)
        .write(5 * GRAN + 3 * 4096, 4096, 0x5a)
        .write(32 * GRAN - 4096, 8192, 0x11)
        .verify(GRAN, 4096, 0xab)
        .verify(5 * GRAN + 3 * 4096, 4096, 0x5a)
        .verify(32 * GRAN - 4096, 8192, 0x11)
        .on_cpu(second)
        .write(SIZE - 4096, 4096, 0xee)
        .write(100 * GRAN, GRAN, 0xcc)
        .verify(100 * GRAN, GRAN, 0xcc)
        .discard(100 * GRAN, 3 * GRAN)
        .verify(100 * GRAN, 3 * GRAN, 0)
        .verify(SIZE - 4096, 4096, 0xee)
        .write(200 * GRAN, 8192, 0x33)
        .write_zeroes(200 * GRAN + 4096, 4096)
        .write_zeroes(300 * GRAN + 512, 1024)
        .verify(200 * GRAN, 4096, 0x33)
        .verify(200 * GRAN + 4096, 4096, 0)
        .flush()
}

fn run_case(num_queues: u32) {
    let Some(tools) = require_tools(&["qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-nbd"])
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    qemu_img_create_qcow2(&image, SIZE).expect("qemu-img create");
    qemu_img_bitmap_add(&image, BITMAP, GRAN).expect("qemu-img bitmap --add");

    let script = script(num_queues);
    let text = script.render().expect("valid script");
    let backend = Backend::spawn(
        qsd_vhost_user_blk(&tools[0], &image, &socket, num_queues),
        &socket,
        Duration::from_secs(20),
    )
    .expect("qemu-storage-daemon starts");
    let outcome = Guest::run(&socket, num_queues, &text, Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("guest could not run: {e}"));
    // Shown by cargo test only on failure or with --nocapture.
    eprintln!(
        "guest ({num_queues} queue(s)) finished in {:.1?}\n{}",
        outcome.elapsed, outcome.serial_log
    );
    if let Err(e) = outcome.check_success() {
        panic!("{e}\n--- server log ---\n{}", backend.log());
    }
    let device_line = format!(
        "E2E-DEVICE /dev/vda sectors={} queues={num_queues}",
        SIZE / 512
    );
    assert!(
        outcome.serial_log.contains(&device_line),
        "expected `{device_line}` in the serial log:\n{}",
        outcome.serial_log
    );
    for step in 1..=script.ops().count() {
        assert!(
            outcome.serial_log.contains(&format!("E2E-STEP {step} ")),
            "step {step} missing from the serial log:\n{}",
            outcome.serial_log
        );
    }
    backend
        .stop(Duration::from_secs(20))
        .expect("qemu-storage-daemon exits cleanly on SIGTERM");

    check_image(&image, &script, dir.path());
}

fn check_image(image: &Path, script: &GuestScript, dir: &Path) {
    qemu_img_check(image).expect("qemu-img check finds no errors");
    let bitmaps = qemu_img_bitmaps(image).expect("qemu-img info");
    assert_eq!(bitmaps.len(), 1, "bitmaps: {bitmaps:?}");
    let (name, gran, flags) = &bitmaps[0];
    assert_eq!((name.as_str(), *gran), (BITMAP, GRAN));
    assert_eq!(flags, &["auto".to_owned()], "bitmap stored cleanly");

    let expected = dir.join("expected.raw");
    std::fs::write(&expected, script.expected_contents(SIZE).expect("model"))
        .expect("write expected image");
    let (same, diff) = qemu_img_compare(&expected, "raw", image, "qcow2").expect("compare");
    assert!(same, "guest-visible contents differ from the model: {diff}");
    qemu_io(
        image,
        "qcow2",
        true,
        &[
            &format!("read -P 0xab {GRAN} 4k"),
            &format!("read -P 0x11 {} 8k", 32 * GRAN - 4096),
            &format!("read -P 0 {} 192k", 100 * GRAN),
            &format!("read -P 0x33 {} 4k", 200 * GRAN),
            &format!("read -P 0 {} 4k", 200 * GRAN + 4096),
        ],
    )
    .expect("qemu-io pattern reads");

    let dirty = bitmap_dirty_extents(image, BITMAP).expect("read bitmap via qemu-nbd");
    assert_eq!(dirty, script.expected_dirty_extents(GRAN, SIZE));
    // And not trivially: the expectation is non-empty and far from the whole disk.
    let total: u64 = dirty.iter().map(|e| e.1).sum();
    assert!(total > 0 && total < SIZE / 4, "dirty bytes {total}");
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
    let Some(tools) = require_tools(&["qemu-storage-daemon", "qemu-img"]) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    qemu_img_create_qcow2(&image, SIZE).expect("qemu-img create");
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
