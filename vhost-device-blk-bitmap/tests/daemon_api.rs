//! The daemon as a library: `start_daemon` serves what the binary serves, on a thread,
//! and its handle stops it the way SIGTERM stops the binary (bitmaps stored).

mod common;

use clap::Parser;
use common::{pattern, raw_image, Driver};
use vhost_device_blk_bitmap::args::Cli;
use vhost_device_blk_bitmap::config::Config;
use vhost_device_blk_bitmap::daemon::start_daemon;

fn config(args: &[&str]) -> Config {
    let mut argv = vec!["vhost-device-blk-bitmap"];
    argv.extend_from_slice(args);
    Config::from_args(Cli::try_parse_from(argv).unwrap().serve, None).unwrap()
}

fn wait_for(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn start_daemon_serves_and_stops_like_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let socket = dir.path().join("v.sock");
    let d = start_daemon(config(&[
        "-s",
        socket.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--format",
        "raw",
    ]))
    .unwrap();
    wait_for(&socket);
    assert_eq!(d.socket().to_string(), socket.display().to_string());
    let mut drv = Driver::connect(&socket, 1);
    drv.write_data(0, &[0x5a; 4096]);
    assert_eq!(drv.request(0, 1, 8, Some((4096, false))).0, 0);
    assert_eq!(drv.request(0, 0, 0, Some((512, true))), (0, 513));
    assert_eq!(
        drv.read_data(0, 512),
        (0..512).map(pattern).collect::<Vec<u8>>()
    );
    drop(drv);
    d.stop().unwrap();
    assert!(!socket.exists(), "the socket is removed at the stop");
    let data = std::fs::read(&image).unwrap();
    assert_eq!(&data[4096..8192], &[0x5a; 4096]);
}

#[test]
fn a_stopped_library_daemon_stores_its_bitmaps() {
    if !common::have_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("8M")
        .status()
        .unwrap();
    assert!(st.success());
    let socket = dir.path().join("v.sock");
    let d = start_daemon(config(&[
        "-s",
        socket.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--format",
        "qcow2",
        "--bitmap",
        "b0",
    ]))
    .unwrap();
    wait_for(&socket);
    let mut drv = Driver::connect(&socket, 1);
    drv.write_data(0, &[1; 4096]);
    assert_eq!(drv.request(0, 1, 0, Some((4096, false))).0, 0);
    drop(drv);
    d.stop().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"b0\"") && !text.contains("in-use"),
        "{text}"
    );
}
