//! systemd integration of the real binary: socket activation through
//! `systemd-socket-activate` (LISTEN_FDS/LISTEN_FDNAMES), readiness notification
//! (NOTIFY_SOCKET, path and abstract namespace) and `--socket-fd`.
//!
//! A missing `systemd-socket-activate` or `qemu-img` fails the test under `CI=true` (naming
//! the Debian package), else the test is skipped.

mod common;

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{raw_image, signal, stderr_of, wait_exit, wait_for_socket, Daemon, Driver, BIN};
use serde_json::Value;

const SOCKET_ACTIVATE: &str = "systemd-socket-activate";

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether `tool --version` runs; a missing tool fails under `CI=true` naming `package`.
fn have(tool: &str, package: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !ci(),
            "{tool} is required when CI=true: install the Debian package {package}"
        );
        eprintln!("note: {tool} is not installed (Debian package {package}), skipping");
    }
    ok
}

/// A datagram socket standing in for systemd's notification socket.
struct NotifySocket {
    rx: UnixDatagram,
    /// The `NOTIFY_SOCKET` value naming it.
    name: String,
}

impl NotifySocket {
    /// Bound at `dir/notify`, or in the abstract namespace as `@…`.
    fn bind(dir: &Path, abstract_name: bool) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let (rx, name) = if abstract_name {
            let name = format!(
                "vblk-systemd-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            );
            let addr = SocketAddr::from_abstract_name(&name).unwrap();
            (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
        } else {
            let path = dir.join("notify");
            (
                UnixDatagram::bind(&path).unwrap(),
                path.to_str().unwrap().to_owned(),
            )
        };
        rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        NotifySocket { rx, name }
    }

    /// The next notification, as text.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .rx
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification on {} within 20 s: {e}", self.name));
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Nothing more arrives within `ms` milliseconds.
    fn assert_quiet(&self, ms: u64) {
        self.rx
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        let mut buf = [0u8; 4096];
        if let Ok(n) = self.rx.recv(&mut buf) {
            panic!(
                "unexpected notification {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        self.rx
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
    }
}

/// One 4 KiB write at sector 16 and its read-back through the in-process frontend.
fn write_and_read(socket: &Path, byte: u8) {
    let mut d = Driver::connect(socket, 1);
    d.write_data(0, &[byte; 4096]);
    assert_eq!(d.request(0, 1, 16, Some((4096, false))), (0, 1), "write");
    d.write_data(0, &[0; 4096]);
    assert_eq!(d.request(0, 0, 16, Some((4096, true))), (0, 4097), "read");
    assert_eq!(d.read_data(0, 4096), vec![byte; 4096]);
}

fn disk_has(image: &Path, byte: u8) {
    let disk = std::fs::read(image).unwrap();
    assert_eq!(&disk[16 * 512..16 * 512 + 4096], &[byte; 4096][..]);
}

/// `systemd-socket-activate -l PATH --fdname=vhost-user -E … BIN args…`: it binds PATH,
/// waits for the first connection and execs the daemon (same pid) with LISTEN_FDS=1.
fn socket_activate(path: &Path, env: &[String], args: &[&OsStr]) -> Daemon {
    let mut cmd = Command::new(SOCKET_ACTIVATE);
    cmd.arg("-l")
        .arg(path)
        .arg("--fdname=vhost-user")
        .args(["-E", "RUST_LOG=info"]);
    for e in env {
        cmd.args(["-E", e]);
    }
    Daemon(
        cmd.arg(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Socket activation of a raw image: the activated socket is served (the first
/// connection is the one that started the daemon), READY=1 names it, SIGTERM exits 0 with
/// the data on disk, and the socket file, which systemd-socket-activate created, is left
/// in place.
#[test]
fn socket_activation_serves_the_passed_socket() {
    if !have(SOCKET_ACTIVATE, "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let path = dir.path().join("vhost.sock");
    let notify = NotifySocket::bind(dir.path(), true);
    let mut child = socket_activate(
        &path,
        &[format!("NOTIFY_SOCKET={}", notify.name)],
        &[
            OsStr::new("--image"),
            image.as_os_str(),
            OsStr::new("--format"),
            OsStr::new("raw"),
        ],
    );
    wait_for_socket(&mut child, &path);
    // Connecting starts the daemon; the frontend's first messages wait in the socket.
    let mut d = Driver::connect(&path, 1);
    let ready = notify.next();
    assert!(ready.contains("READY=1"), "{ready:?}");
    assert!(
        ready.contains(&format!(
            "STATUS=serving {} on {}",
            image.display(),
            path.display()
        )),
        "{ready:?}"
    );
    assert!(
        ready.contains(&format!("MAINPID={}", child.id())),
        "{ready:?}"
    );
    assert_eq!(notify.next(), "STATUS=frontend connected");
    d.write_data(0, &[0x5a; 4096]);
    assert_eq!(d.request(0, 1, 16, Some((4096, false))), (0, 1));
    assert_eq!(d.request(0, 0, 16, Some((4096, true))), (0, 4097));
    assert_eq!(d.read_data(0, 4096), vec![0x5a; 4096]);
    drop(d);
    assert_eq!(notify.next(), "STATUS=waiting for a frontend");
    // A second frontend on the same activated socket.
    write_and_read(&path, 0x6b);
    assert_eq!(notify.next(), "STATUS=frontend connected");
    assert_eq!(notify.next(), "STATUS=waiting for a frontend");
    signal(&child, libc::SIGTERM);
    let st = wait_exit(&mut child, 20);
    let log = stderr_of(&mut child);
    assert_eq!(st.code(), Some(0), "{log}");
    assert_eq!(notify.next(), "STOPPING=1\nSTATUS=stopping");
    assert!(
        log.contains("socket activation: serving fd 3 named 'vhost-user' (1 descriptor(s) passed)"),
        "{log}"
    );
    assert!(
        log.contains(&format!("listening on {} (inherited fd 3)", path.display())),
        "{log}"
    );
    disk_has(&image, 0x6b);
    assert!(
        std::fs::symlink_metadata(&path).is_ok(),
        "the activated socket belongs to its creator and is not unlinked"
    );
}

/// `qemu-img info -U` flags of bitmap `name`.
fn bitmap_flags(image: &Path, name: &str) -> Vec<String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bitmaps = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let b = bitmaps
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name}: {info}"));
    b["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

/// Socket activation of a qcow2 image with `--bitmap b0`: the bitmap is in-use while
/// served and stored (clean, with the write recorded) after SIGTERM.
#[test]
fn socket_activation_stores_the_bitmaps_on_sigterm() {
    if !have(SOCKET_ACTIVATE, "systemd") || !have("qemu-img", "qemu-utils") {
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
    let path = dir.path().join("vhost.sock");
    let mut child = socket_activate(
        &path,
        &[],
        &[
            OsStr::new("--image"),
            image.as_os_str(),
            OsStr::new("--format"),
            OsStr::new("qcow2"),
            OsStr::new("--bitmap"),
            OsStr::new("b0"),
        ],
    );
    wait_for_socket(&mut child, &path);
    let mut d = Driver::connect(&path, 1);
    d.write_data(0, &[0x77; 4096]);
    assert_eq!(d.request(0, 1, 16, Some((4096, false))), (0, 1));
    assert_eq!(
        bitmap_flags(&image, "b0"),
        ["in-use", "auto"],
        "in-use while a frontend is attached"
    );
    drop(d);
    signal(&child, libc::SIGTERM);
    let st = wait_exit(&mut child, 20);
    let log = stderr_of(&mut child);
    assert_eq!(st.code(), Some(0), "{log}");
    assert_eq!(bitmap_flags(&image, "b0"), ["auto"], "stored: {log}");
    let out = Command::new(BIN)
        .args(["bitmap", "list", "--json"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "b0");
    assert_eq!(
        list[0]["dirty-bytes"], 65536,
        "the write was recorded: {list}"
    );
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
}

/// sd_notify to a path and to an abstract socket: READY=1 (with MAINPID and STATUS) once
/// the vhost-user, QMP and NBD sockets exist; STATUS on connect and disconnect; STOPPING=1
/// after SIGTERM, and nothing before it.
#[test]
fn notify_socket_gets_ready_status_and_stopping() {
    for abstract_name in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let image = raw_image(dir.path());
        let socket = dir.path().join("vhost.sock");
        let qmp = dir.path().join("qmp.sock");
        let nbd = dir.path().join("nbd.sock");
        let notify = NotifySocket::bind(dir.path(), abstract_name);
        let mut child = Daemon(
            Command::new(BIN)
                .arg("--socket-path")
                .arg(&socket)
                .arg("--image")
                .arg(&image)
                .args(["--format", "raw", "--qmp-socket"])
                .arg(&qmp)
                .arg("--nbd-socket")
                .arg(&nbd)
                .env("NOTIFY_SOCKET", &notify.name)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let ready = notify.next();
        for p in [&socket, &qmp, &nbd] {
            assert!(p.exists(), "READY=1 before {} exists", p.display());
        }
        assert_eq!(
            ready,
            format!(
                "READY=1\nSTATUS=serving {} on {}\nMAINPID={}",
                image.display(),
                socket.display(),
                child.id()
            )
        );
        write_and_read(&socket, 0x11);
        assert_eq!(notify.next(), "STATUS=frontend connected");
        assert_eq!(notify.next(), "STATUS=waiting for a frontend");
        notify.assert_quiet(300);
        signal(&child, libc::SIGTERM);
        assert_eq!(notify.next(), "STOPPING=1\nSTATUS=stopping");
        let st = wait_exit(&mut child, 20);
        assert_eq!(st.code(), Some(0), "{}", stderr_of(&mut child));
        notify.assert_quiet(100);
        disk_has(&image, 0x11);
        assert!(!socket.exists(), "our own socket is removed");
    }
}

/// Starts the daemon with `fd` as its descriptor 3 (what a supervisor passing a socket
/// does) and `args`.
fn spawn_with_fd3(fd: RawFd, args: &[&OsStr]) -> Daemon {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only calls dup2 and
    // fcntl, which are async-signal-safe, on `fd`, which the parent keeps open until
    // spawn returns. dup2 gives descriptor 3 without FD_CLOEXEC; if `fd` already is 3,
    // its FD_CLOEXEC is cleared instead.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Daemon(cmd.spawn().unwrap())
}

/// `--socket-fd 3`: a listening socket the test made is served (mode and file left as
/// they are), and not unlinked at exit.
#[test]
fn socket_fd_serves_an_inherited_listener() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let path = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut child = spawn_with_fd3(
        listener.as_raw_fd(),
        &[
            OsStr::new("--socket-fd"),
            OsStr::new("3"),
            OsStr::new("--image"),
            image.as_os_str(),
            OsStr::new("--format"),
            OsStr::new("raw"),
        ],
    );
    write_and_read(&path, 0x3c);
    write_and_read(&path, 0x4d);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the inherited socket's mode is left alone");
    signal(&child, libc::SIGTERM);
    let st = wait_exit(&mut child, 20);
    let log = stderr_of(&mut child);
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(
        log.contains(&format!("listening on {} (inherited fd 3)", path.display())),
        "{log}"
    );
    disk_has(&image, 0x4d);
    assert!(
        std::fs::symlink_metadata(&path).is_ok(),
        "an inherited socket is never unlinked"
    );
}

/// Runs the daemon with `fd` (if any) as descriptor 3; it must exit 2 with one line
/// containing `want`.
fn refused(fd: Option<RawFd>, args: &[&str], want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend([OsStr::new("--image"), image.as_os_str()]);
    let mut child = match fd {
        Some(fd) => spawn_with_fd3(fd, &all),
        None => Daemon(
            Command::new(BIN)
                .args(&all)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ),
    };
    let st = wait_exit(&mut child, 20);
    let err = stderr_of(&mut child);
    assert_eq!(st.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(want), "{args:?}: {err}");
}

/// `--socket-fd` of anything but a listening unix stream socket, below 3, not open, or
/// together with `--socket-path`: exit 2 with a message saying what is wrong.
#[test]
fn socket_fd_refuses_what_is_not_a_listening_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("regular")).unwrap();
    refused(
        Some(file.as_raw_fd()),
        &["--socket-fd", "3"],
        "error: --socket-fd 3: fd 3 is not a socket; expected a listening unix stream socket",
    );
    let listener = UnixListener::bind(dir.path().join("l.sock")).unwrap();
    let stream = UnixStream::connect(dir.path().join("l.sock")).unwrap();
    refused(
        Some(stream.as_raw_fd()),
        &["--socket-fd", "3"],
        "fd 3 is a unix stream socket that is not listening",
    );
    let dgram = UnixDatagram::unbound().unwrap();
    refused(
        Some(dgram.as_raw_fd()),
        &["--socket-fd", "3"],
        "fd 3 is a datagram (SOCK_DGRAM) unix socket, not a stream",
    );
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    refused(
        Some(tcp.as_raw_fd()),
        &["--socket-fd", "3"],
        "fd 3 is an AF_INET (IPv4) socket, not a unix",
    );
    refused(None, &["--socket-fd", "1000"], "fd 1000 is not open");
    refused(
        None,
        &["--socket-fd", "1"],
        "--socket-fd 1: must be 3 or more",
    );
    refused(
        Some(listener.as_raw_fd()),
        &["--socket-fd", "3", "--socket-path", "/tmp/x.sock"],
        "--socket-path and --socket-fd cannot be used together",
    );
    refused(
        Some(listener.as_raw_fd()),
        &["--socket-fd", "3", "--socket-mode", "0660"],
        "--socket-mode/--socket-group cannot be used with --socket-fd 3",
    );
    refused(
        None,
        &[],
        "--socket-path is required (or --socket-fd, or systemd socket activation)",
    );
}

/// Socket activation and an explicit `--socket-path` contradict each other: exit 2.
#[test]
fn socket_activation_with_socket_path_is_refused() {
    if !have(SOCKET_ACTIVATE, "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let path = dir.path().join("vhost.sock");
    let other = dir.path().join("other.sock");
    let mut child = socket_activate(
        &path,
        &[],
        &[
            OsStr::new("--socket-path"),
            other.as_os_str(),
            OsStr::new("--image"),
            image.as_os_str(),
        ],
    );
    wait_for_socket(&mut child, &path);
    let _trigger = UnixStream::connect(&path).unwrap();
    let st = wait_exit(&mut child, 20);
    let err = stderr_of(&mut child);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "error: socket activation passed a socket (LISTEN_FDS) and --socket-path was given"
        ),
        "{err}"
    );
    assert!(!other.exists());
}
