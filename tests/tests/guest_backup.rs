//! Live backup of a real guest's disk: a Linux guest writes in phases while the host takes
//! a full backup and two incrementals with `resources/backup.py` (bitmaps + point-in-time
//! NBD exports over the daemon's QMP socket). The guest and the host hand over through
//! the disk itself: the guest writes a marker sector when a phase is done and waits for a
//! signal sector; the host takes the backup, and signals (through a writable NBD export
//! of the same disk) as soon as the point-in-time view exists, so the guest's next phase
//! runs while the backup is being copied. Each restored backup must equal the disk as it
//! was at its instant, which the host knows from the guest's script.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::tools::{qemu_img_create_qcow2, require_tools};
use e2e::{daemon_binary, daemon_command, qemu_img_check, Backend, Guest, GuestScript};

const SIZE: u64 = 64 << 20;
const K64: u64 = 65536;
/// The guest writes its phase number here when a phase is done.
const MARKER: u64 = SIZE - 4096;
/// The host writes its signal here.
const SIGNAL: u64 = SIZE - 2048;
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have_libnbd() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if e2e::tools::in_ci() {
            panic!("python3-libnbd (import nbd in /usr/bin/python3) is required (apt-get install python3-libnbd)");
        }
        eprintln!("SKIP: python3-libnbd not installed");
    }
    ok
}

fn ctl(bin: &Path, qmp: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("ctl")
        .arg("--qmp-socket")
        .arg(qmp)
        .args(args)
        .output()
        .expect("ctl");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// One sector of the disk, read through the NBD export `rw`.
fn read_sector(nbd: &Path, offset: u64) -> Vec<u8> {
    let script = format!(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri('nbd+unix:///rw?socket={}')\n\
         sys.stdout.buffer.write(h.pread(512, {offset}))\nh.shutdown()\n",
        nbd.display()
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn write_signal(nbd: &Path, pattern: u8) {
    let uri = format!("nbd+unix:///rw?socket={}", nbd.display());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} {SIGNAL} 512"),
            &uri,
        ])
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_marker(nbd: &Path, phase: u8) {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while read_sector(nbd, MARKER) != vec![phase; 512] {
        assert!(
            Instant::now() < deadline,
            "the guest never finished phase {phase}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Phase `k` of the guest's writes (the marker comes after).
fn phase(k: u8) -> GuestScript {
    let g = K64;
    let base = u64::from(k) * 40 * g;
    let s = GuestScript::new("/dev/vda")
        .write(base + 4096, 8192, 0x10 + k)
        .write(base + 3 * g, 5 * g, 0x20 + k)
        .write(u64::from(k) * 7 * g + 512, 1024, 0x30 + k);
    match k {
        2 => s.discard(base / 2, 4 * g).write_zeroes(40 * g + 4096, 4096),
        3 => s.write(0, 2 * g, 0x43).write_zeroes(3 * g, g),
        _ => s,
    }
}

#[test]
fn daemon_guest_full_and_incremental_backups_restore_each_instant() {
    if require_tools(&["qemu-img", "qemu-io", "qemu-nbd"]).is_none() || !have_libnbd() {
        return;
    }
    let bin = daemon_binary().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    let qmp = dir.path().join("qmp.sock");
    let nbd = dir.path().join("nbd.sock");
    let backups = dir.path().join("backups");
    qemu_img_create_qcow2(&image, SIZE).expect("qemu-img create");
    let backend = Backend::spawn(
        daemon_command(
            &bin,
            &image,
            &socket,
            1,
            &["--qmp-socket", qmp.to_str().expect("utf-8")],
        ),
        &socket,
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("daemon start: {e}"));
    ctl(
        &bin,
        &qmp,
        &[
            "nbd-server-start",
            &format!(
                r#"{{"addr": {{"type": "unix", "data": {{"path": "{}"}}}}}}"#,
                nbd.display()
            ),
        ],
    );
    ctl(
        &bin,
        &qmp,
        &[
            "block-export-add",
            r#"{"type": "nbd", "id": "rw", "node-name": "disk0", "name": "rw", "writable": true}"#,
        ],
    );
    // The guest: phase 1, marker 1, wait for signal 1 (the full backup's view exists),
    // phase 2 (while the full backup is copied), marker 2, wait for signal 2, phase 3,
    // marker 3, wait for signal 3, phase 4.
    let mut script = GuestScript::new("/dev/vda");
    for k in 1..=3u8 {
        script = script
            .then(&phase(k))
            .write(MARKER, 512, k)
            .wait_for(SIGNAL, 0xb0 + k);
    }
    script = script.then(&phase(4));
    // What the disk holds at each backup's instant: the guest's writes up to marker k,
    // plus the host's signals so far.
    let mut instants = Vec::new();
    let mut model = GuestScript::new("/dev/vda");
    for k in 1..=3u8 {
        model = model.then(&phase(k)).write(MARKER, 512, k);
        let mut disk = model.expected_contents(SIZE).expect("model");
        if k > 1 {
            disk[SIGNAL as usize..SIGNAL as usize + 512].fill(0xb0 + k - 1);
        }
        instants.push(disk);
    }
    let host = {
        let (bin, qmp, nbd, backups) = (bin.clone(), qmp.clone(), nbd.clone(), backups.clone());
        std::thread::spawn(move || {
            for k in 1..=3u8 {
                wait_marker(&nbd, k);
                let what = if k == 1 { "full" } else { "inc" };
                let mut backup = Command::new("/usr/bin/python3")
                    .arg(repo().join("resources/backup.py"))
                    .arg("--qmp")
                    .arg(&qmp)
                    .arg("--dir")
                    .arg(&backups)
                    .arg("--nbd-socket")
                    .arg(&nbd)
                    .arg(what)
                    .spawn()
                    .expect("backup.py");
                // Signal as soon as the point-in-time view exists.
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let q = ctl(&bin, &qmp, &["query-block-exports"]);
                    if q.contains("\"backup\"") {
                        break;
                    }
                    if let Some(st) = backup.try_wait().expect("wait") {
                        panic!("backup.py {what} ended before its export appeared: {st}");
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the backup export never appeared"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                write_signal(&nbd, 0xb0 + k);
                let st = backup.wait().expect("backup.py");
                assert!(st.success(), "backup.py {what} failed: {st}");
            }
        })
    };
    let text = script.render().expect("valid script");
    let outcome = Guest::run(&socket, 1, &text, GUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest could not run: {e}"));
    if let Err(e) = outcome.check_success() {
        panic!("{e}\n--- daemon log ---\n{}", backend.log());
    }
    host.join().expect("host thread");
    let files = ["full.qcow2", "inc-1.qcow2", "inc-2.qcow2"];
    for (k, (file, want)) in files.iter().zip(&instants).enumerate() {
        let out = dir.path().join(format!("restored-{k}.raw"));
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(backups.join(file))
            .arg(&out)
            .status()
            .expect("qemu-img convert");
        assert!(st.success());
        let got = std::fs::read(&out).expect("restored image");
        if let Some(i) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
            panic!(
                "{file} differs from the disk at its instant at byte {i}: {:#x} instead of {:#x}",
                got[i], want[i]
            );
        }
        assert_eq!(got.len(), want.len());
    }
    // The incrementals hold only what changed.
    for file in &files[1..] {
        let len = std::fs::metadata(backups.join(file)).expect("inc").len();
        assert!(
            len < 8 << 20,
            "{file} is {len} bytes: more than the changes"
        );
    }
    backend
        .stop(Duration::from_secs(20))
        .expect("daemon exits 0 on SIGTERM");
    qemu_img_check(&image).expect("qemu-img check");
}
