//! Tests of the real binary: start-up, locking, argument errors, clean exit on signals.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    pattern, raw_image, signal, spawn, stderr_of, wait_exit, wait_for_socket, Driver, BIN,
};

#[test]
fn sigterm_while_listening_exits_zero_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let socket = dir.path().join("s.sock");
    let mut child = spawn(&socket, &image, &[]);
    wait_for_socket(&mut child, &socket);
    signal(&child, libc::SIGTERM);
    let st = wait_exit(&mut child, 10);
    assert_eq!(st.code(), Some(0), "{}", stderr_of(&mut child));
    assert!(!socket.exists());
}

#[test]
fn sigint_while_connected_exits_zero_after_serving() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let socket = dir.path().join("s.sock");
    let mut child = spawn(
        &socket,
        &image,
        &["--num-queues", "2", "--serial", "bin-test"],
    );
    wait_for_socket(&mut child, &socket);
    let mut d = Driver::connect(&socket, 2);
    d.write_data(1, &[0x5a; 4096]);
    assert_eq!(d.request(1, 1, 16, Some((4096, false))), (0, 1));
    assert_eq!(d.request(0, 8, 0, Some((20, true))), (0, 21));
    assert_eq!(&d.read_data(0, 9), b"bin-test\0");
    signal(&child, libc::SIGINT);
    let st = wait_exit(&mut child, 10);
    let err = stderr_of(&mut child);
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains("frontend negotiated features"), "{err}");
    assert!(err.contains("received SIGINT"), "{err}");
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(&disk[16 * 512..16 * 512 + 4096], &[0x5a; 4096][..]);
    assert!(!socket.exists());
}

#[test]
fn second_daemon_on_the_same_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let socket = dir.path().join("a.sock");
    let mut first = spawn(&socket, &image, &[]);
    wait_for_socket(&mut first, &socket);
    // A read-only second daemon refuses to share write, which the first one holds.
    let mut second = spawn(&dir.path().join("b.sock"), &image, &["--readonly"]);
    let st = wait_exit(&mut second, 10);
    let err = stderr_of(&mut second);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    assert!(
        err.contains(&format!(
            "Is another process using the image [{}]?",
            image.display()
        )),
        "{err}"
    );
    signal(&first, libc::SIGTERM);
    assert_eq!(wait_exit(&mut first, 10).code(), Some(0));
}

#[test]
fn bad_arguments_fail_with_one_line() {
    let out = Command::new(BIN)
        .args([
            "-s",
            "/tmp/x.sock",
            "--image",
            "/tmp/x",
            "--logical-block-size",
            "1000",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("--logical-block-size 1000 must be 512 or 4096"),
        "{err}"
    );
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--socket-path",
        "--image",
        "--format",
        "--readonly",
        "--num-queues",
        "--queue-size",
        "--logical-block-size",
        "--serial",
        "--direct",
        "--bitmap",
        "--create-size",
        "--writethrough",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
}

#[test]
fn create_size_makes_a_raw_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("new.raw");
    let socket = dir.path().join("s.sock");
    let mut child = spawn(&socket, &image, &["--format", "raw", "--create-size", "3M"]);
    wait_for_socket(&mut child, &socket);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 3 << 20);
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child, 10).code(), Some(0));
}

fn have_qemu_tools() -> bool {
    let ok = ["qemu-img", "qemu-io"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-img and qemu-io are required when CI=true"
        );
        eprintln!("note: qemu-img/qemu-io not installed, skipping");
    }
    ok
}

#[test]
fn serves_a_qcow2_image_that_qemu_reads_back() {
    if !have_qemu_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("8M")
        .status()
        .unwrap();
    assert!(st.success());
    let socket = dir.path().join("s.sock");
    let mut child = spawn(&socket, &image, &[]);
    wait_for_socket(&mut child, &socket);
    // While we serve, QEMU's tools are locked out.
    let out = Command::new("qemu-img")
        .arg("info")
        .arg(&image)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let mut d = Driver::connect(&socket, 1);
    d.write_data(0, &[0x5a; 65536]);
    assert_eq!(d.request(0, 1, 2048, Some((65536, false))), (0, 1));
    assert_eq!(d.request(0, 4, 0, None), (0, 1));
    d.write_data(0, &[0; 4096]);
    assert_eq!(d.request(0, 0, 2048 + 8, Some((4096, true))), (0, 4097));
    assert_eq!(d.read_data(0, 4096), vec![0x5a; 4096]);
    drop(d);
    signal(&child, libc::SIGTERM);
    let st = wait_exit(&mut child, 10);
    assert_eq!(st.code(), Some(0), "{}", stderr_of(&mut child));
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("qemu-io")
        .args(["-r", "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 0 1M"])
        .arg(&image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}"
    );
}

fn count_entries(dir: String) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn reconnects_leak_neither_fds_nor_threads() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let socket = dir.path().join("s.sock");
    let mut child = spawn(&socket, &image, &["--num-queues", "2"]);
    wait_for_socket(&mut child, &socket);
    let pid = child.id();
    let mut counts = Vec::new();
    for round in 0..8u8 {
        let mut d = Driver::connect(&socket, 2);
        d.write_data(1, &[round; 512]);
        assert_eq!(d.request(1, 1, 0, Some((512, false))), (0, 1));
        drop(d);
        // Wait until the daemon has torn the connection down (back to listening): the
        // counts stop moving (a loaded machine may take longer than a fixed pause).
        let read = || {
            (
                count_entries(format!("/proc/{pid}/fd")),
                count_entries(format!("/proc/{pid}/task")),
            )
        };
        std::thread::sleep(Duration::from_millis(150));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = read();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = read();
            if (now == last && Some(&now) == counts.last()) || std::time::Instant::now() > deadline
            {
                break;
            }
            if now == last && counts.len() < 2 {
                break;
            }
            last = now;
        }
        counts.push(read());
    }
    assert!(
        counts[2..].iter().all(|c| *c == counts[1]),
        "fd/thread counts drift across reconnects: {counts:?}"
    );
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child, 10).code(), Some(0));
    assert_eq!(std::fs::read(&image).unwrap()[..512], [7u8; 512]);
}

#[test]
fn direct_io_on_a_raw_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    {
        use std::os::unix::fs::OpenOptionsExt;
        let probe = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&image);
        if probe.is_err() {
            eprintln!("note: the temp file system has no O_DIRECT, skipping");
            return;
        }
    }
    let socket = dir.path().join("s.sock");
    let mut child = spawn(&socket, &image, &["--direct"]);
    wait_for_socket(&mut child, &socket);
    let mut d = Driver::connect(&socket, 1);
    d.write_data(0, &[0x3c; 1536]);
    assert_eq!(d.request(0, 1, 3, Some((1536, false))), (0, 1));
    assert_eq!(d.request(0, 0, 2, Some((2048, true))), (0, 2049));
    let got = d.read_data(0, 2048);
    assert_eq!(
        &got[..512],
        &(1024..1536).map(pattern).collect::<Vec<u8>>()[..]
    );
    assert_eq!(&got[512..], &[0x3c; 1536][..]);
    drop(d);
    signal(&child, libc::SIGTERM);
    let st = wait_exit(&mut child, 10);
    assert_eq!(st.code(), Some(0), "{}", stderr_of(&mut child));
}

/// The vhost-user socket is created with mode 0600; a regular file at its path is left
/// alone (the daemon refuses to start); a socket path naming the image is refused.
#[test]
fn socket_is_private_and_never_replaces_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let socket = dir.path().join("vhost.sock");
    let mut d = spawn(&socket, &image, &[]);
    wait_for_socket(&mut d, &socket);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // SAFETY: kill(2) with our child's pid and a valid signal.
    assert_eq!(unsafe { libc::kill(d.id() as i32, libc::SIGTERM) }, 0);
    assert!(d.wait().unwrap().success());
    assert!(!socket.exists(), "removed at exit");

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let out = Command::new(BIN)
        .args(["--socket-path"])
        .arg(&file)
        .arg("--image")
        .arg(&image)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let out = Command::new(BIN)
        .args(["--socket-path"])
        .arg(&image)
        .arg("--image")
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the image"), "{err}");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), common::DISK_SIZE);
}

/// A guest of a probed raw image cannot turn it into a qcow2 naming a host file as its
/// backing file: the header write to sector 0 fails (both I/O engines), the file keeps its
/// bytes and the log says why; with `--format raw` the same write is the guest's business.
#[test]
fn probed_raw_image_refuses_a_qcow2_header_in_sector_0() {
    for (aio, format) in [
        ("io_uring", None),
        ("threads", None),
        ("io_uring", Some("raw")),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let image = raw_image(dir.path());
        let socket = dir.path().join("s.sock");
        let mut args = vec!["--aio", aio];
        if let Some(f) = format {
            args.extend(["--format", f]);
        }
        let mut child = spawn(&socket, &image, &args);
        wait_for_socket(&mut child, &socket);
        let mut d = Driver::connect(&socket, 1);
        let mut header = vec![0u8; 4096];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[8..24].copy_from_slice(b"\0\0\0\0\0\0\0\x68\0\0\0\x0b/etc");
        d.write_data(0, &header);
        let (status, _) = d.request(0, 1, 0, Some((4096, false)));
        drop(d);
        signal(&child, libc::SIGTERM);
        let st = wait_exit(&mut child, 10);
        let log = stderr_of(&mut child);
        assert_eq!(st.code(), Some(0), "{log}");
        let first = std::fs::read(&image).unwrap()[..4].to_vec();
        if format.is_none() {
            assert_eq!(status, 1, "IOERR ({aio})");
            assert_eq!(first, (0..4).map(pattern).collect::<Vec<u8>>());
            assert!(
                log.contains("refused a guest write of a qcow/qcow2 header"),
                "{log}"
            );
        } else {
            assert_eq!(status, 0);
            assert_eq!(first, b"QFI\xfb");
        }
    }
}

/// An image whose backing file lies outside its directory is refused by default
/// (`--backing within-dir`) with a message naming the policy, served with `--backing
/// allow`; a served backing file is locked against writers, as QEMU does.
#[test]
fn backing_files_follow_the_policy_and_are_locked() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = raw_image(outside.path());
    let image = dir.path().join("top.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());
    let socket = dir.path().join("s.sock");
    let mut child = spawn(&socket, &image, &["--format", "qcow2"]);
    let st = wait_exit(&mut child, 10);
    let log = stderr_of(&mut child);
    assert_ne!(st.code(), Some(0));
    assert!(
        log.contains("outside") && log.contains("within-dir"),
        "{log}"
    );
    let mut child = spawn(
        &socket,
        &image,
        &["--format", "qcow2", "--backing", "allow"],
    );
    wait_for_socket(&mut child, &socket);
    let mut d = Driver::connect(&socket, 1);
    assert_eq!(d.request(0, 0, 3, Some((512, true))), (0, 513));
    assert_eq!(
        d.read_data(0, 512),
        (3 * 512..4 * 512).map(pattern).collect::<Vec<u8>>(),
        "reads come from the backing file"
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(&base)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("lock"),
        "a writer of the backing file must be locked out: {text}"
    );
    drop(d);
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child, 10).code(), Some(0));
}

/// The socket is 0600 unless asked otherwise; --socket-mode and --socket-group open it to
/// a group (e.g. the VMM's).
#[test]
fn socket_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let socket = dir.path().join("s.sock");
    for (args, mode, gid) in [
        (&[][..], 0o600, None),
        (
            &["--socket-mode", "0660", "--socket-group", "4242"][..],
            0o660,
            Some(4242),
        ),
    ] {
        let mut child = spawn(&socket, &image, args);
        wait_for_socket(&mut child, &socket);
        let m = std::fs::metadata(&socket).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, mode, "{args:?}");
        if let Some(g) = gid {
            assert_eq!(m.gid(), g);
        }
        signal(&child, libc::SIGTERM);
        assert_eq!(wait_exit(&mut child, 10).code(), Some(0));
    }
}
