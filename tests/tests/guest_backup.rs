//! Live backup of a real guest's disk: a Linux guest writes in phases while the host takes
//! a full backup and two incrementals with `resources/backup.py` (bitmaps + point-in-time
//! NBD exports over the daemon's QMP socket). The guest and the host hand over through
//! the disk itself: the guest writes a marker sector when a phase is done and waits for a
//! signal sector; the host takes the backup, and signals (through a writable NBD export
//! of the same disk) as soon as the point-in-time view exists, so the guest's next phase
//! runs while the backup is being copied. Each restored backup must equal the disk as it
//! was at its instant, which the host knows from the guest's script.
//!
//! A second test kills the daemon (SIGKILL) between a full and an incremental backup
//! while the VM keeps running: the restarted daemon recovers bitmap `b0` from its
//! crash-consistency shadow, QEMU reconnects to it, the guest goes on writing, and the
//! full backup plus an incremental of `b0`'s dirty extents restores the final disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::tools::{merge_extents, qemu_img_compare, qemu_img_create_qcow2, qemu_io, require_tools};
use e2e::{
    bitmap_dirty_extents, daemon_binary, daemon_command, qemu_img_check, qemu_img_info_json,
    Backend, Guest, GuestConfig, GuestEnv, GuestScript, Restartable,
};
use serde_json::Value;

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
                // Signal as soon as the point-in-time view exists, so that the guest
                // writes while the backup is copied. A backup of a mostly empty disk
                // may be done before a poll sees its export: the guest is still parked
                // at marker k, so the instant is the same; it only writes afterwards.
                let deadline = Instant::now() + Duration::from_secs(60);
                let done = loop {
                    let q = ctl(&bin, &qmp, &["query-block-exports"]);
                    if q.contains("\"backup\"") {
                        break None;
                    }
                    if let Some(st) = backup.try_wait().expect("wait") {
                        break Some(st);
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the backup export never appeared"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                };
                write_signal(&nbd, 0xb0 + k);
                let st = match done {
                    Some(st) => st,
                    None => backup.wait().expect("backup.py"),
                };
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

const M: u64 = 1 << 20;
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The daemon's log line for a bitmap recovered from the shadow after a crash.
const RECOVERED: &str = "bitmap 'b0' was in use (not stored after a crash) and is recovered \
                         from its crash-consistency shadow";

/// Phase `k` of the crash test's guest writes: 1 before the full backup, 2 between the
/// full backup and the SIGKILL, 3 after QEMU reconnected to the restarted daemon (first
/// reading back what phases 1 and 2 left). Phases 2 and 3 discard and zero data of the
/// earlier phases, so the incremental backup must carry zeroes too.
fn crash_phase(k: u8) -> GuestScript {
    let g = K64;
    let s = GuestScript::new("/dev/vda");
    match k {
        1 => s
            .write(M + 4096, 8192, 0x11)
            .write(2 * M, 4 * g, 0x21)
            .write(3 * M, 2 * g, 0x31)
            .write(20 * M + 512, 1024, 0x41),
        2 => s
            .write(M + 4096, 4096, 0x12)
            .discard(2 * M + g, 2 * g)
            .write_zeroes(3 * M + 4096, 8192)
            .write(5 * M + 3 * g, 5 * g, 0x22)
            .write(40 * M, 512, 0x32),
        _ => s
            .verify(M + 4096, 4096, 0x12)
            .verify(M + 8192, 4096, 0x11)
            .verify(2 * M, g, 0x21)
            .verify(2 * M + g, 2 * g, 0)
            .verify(2 * M + 3 * g, g, 0x21)
            .verify(3 * M, 4096, 0x31)
            .verify(3 * M + 4096, 8192, 0)
            .verify(5 * M + 3 * g, 5 * g, 0x22)
            .verify(40 * M, 512, 0x32)
            .write(M + 8192, 4096, 0x13)
            .write(30 * M, 3 * g, 0x23)
            .write_zeroes(5 * M + 4 * g, g)
            .discard(2 * M, g)
            .write(50 * M + 4096, 4096, 0x33),
    }
}

/// Sets its flag when dropped during a panic: the host side of a test tells the guest's
/// runner to stop waiting for it.
struct CancelOnPanic(Arc<AtomicBool>);

impl Drop for CancelOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Flags of bitmap `name` as `qemu-img info -U` shows them.
fn bitmap_flags(image: &Path, name: &str) -> Vec<String> {
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

/// Indexes of the `granularity`-sized granules that `(offset, len)` extents touch.
fn granules(extents: &[(u64, u64)], granularity: u64) -> std::collections::BTreeSet<u64> {
    extents
        .iter()
        .flat_map(|&(s, l)| s / granularity..(s + l).div_ceil(granularity))
        .collect()
}

fn qemu_img(args: &[&str], paths: &[&Path]) {
    let out = Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} {paths:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The raw file `path` holds exactly `want` (else: the first byte that differs).
fn assert_raw_equals(path: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(path).expect("raw image");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what} differs from the model at byte {i}: {:#x} instead of {:#x}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: size");
}

/// SIGKILL of the daemon while the VM runs, between a full and an incremental backup.
/// The guest writes phase 1; the host takes a full backup (a point-in-time export made in
/// one transaction with clearing `b0`); the guest writes phase 2 (writes, a discard, a
/// write-zeroes over phase 1's data), flushes and hands over; with the guest idle the host
/// kills the daemon and starts it again on the same sockets with `--bitmap b0`: it must
/// start, log that `b0` was recovered from its shadow, and QEMU (chardev `reconnect=1`)
/// must reconnect. The guest reads phases 1–2 back and writes phase 3. After the VM
/// powers off and the daemon stops cleanly: `b0` is not in use, `qemu-img check` is
/// clean, `b0` marks at least every granule written since the full backup (the shadow
/// may add granules of its 1 MiB resolution, nothing outside those), the image equals
/// the model, and the full backup plus an incremental of `b0`'s dirty extents equals the
/// final disk.
#[test]
fn daemon_guest_sigkill_recovers_bitmap_and_incremental_restores_final_disk() {
    if require_tools(&["qemu-img", "qemu-io", "qemu-nbd"]).is_none() || !have_libnbd() {
        return;
    }
    let bin = daemon_binary().unwrap_or_else(|e| panic!("{e}"));
    let env = GuestEnv::ensure().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("disk.qcow2");
    let socket = dir.path().join("vhost.sock");
    let qmp = dir.path().join("qmp.sock");
    let nbd = dir.path().join("nbd.sock");
    let full = dir.path().join("full.qcow2");
    qemu_img_create_qcow2(&image, SIZE).expect("qemu-img create");
    let restartable = Restartable {
        bin: bin.clone(),
        image: image.clone(),
        socket: socket.clone(),
        num_queues: 1,
        extra: [
            "--bitmap",
            "b0",
            "--qmp-socket",
            qmp.to_str().expect("utf-8"),
            "--nbd-socket",
            nbd.to_str().expect("utf-8"),
            "--export-name",
            "rw",
            "--export-writable",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        stale: vec![nbd.clone()],
    };
    // Both starts use the same sockets; a killed daemon leaves its socket files behind.
    let start = {
        let r = restartable.clone();
        move || {
            r.start(STOP_TIMEOUT)
                .unwrap_or_else(|e| panic!("daemon start: {e}"))
        }
    };
    let daemon = Arc::new(Mutex::new(Some(start())));
    assert_eq!(bitmap_flags(&image, "b0"), vec!["in-use", "auto"]);

    // The guest: phase k, flush, marker k, flush, and (k < 3) wait for signal k.
    let mut script = GuestScript::new("/dev/vda").write_cache(true);
    for k in 1..=3u8 {
        script = script
            .then(&crash_phase(k))
            .flush()
            .write(MARKER, 512, k)
            .flush();
        if k < 3 {
            script = script.wait_for(SIGNAL, 0xb0 + k);
        }
    }
    // The disk at the full backup's instant, what changed after it, the final disk.
    let at_full = crash_phase(1).write(MARKER, 512, 1);
    let since_full = GuestScript::new("/dev/vda")
        .write(SIGNAL, 512, 0xb1)
        .then(&crash_phase(2))
        .write(MARKER, 512, 2)
        .write(SIGNAL, 512, 0xb2)
        .then(&crash_phase(3))
        .write(MARKER, 512, 3);
    let all = at_full.clone().then(&since_full);

    let cancel = Arc::new(AtomicBool::new(false));
    let host = {
        let (bin, qmp, nbd, image, full) = (
            bin.clone(),
            qmp.clone(),
            nbd.clone(),
            image.clone(),
            full.clone(),
        );
        let daemon = daemon.clone();
        let cancel = CancelOnPanic(cancel.clone());
        std::thread::spawn(move || {
            let _cancel = cancel;
            wait_marker(&nbd, 1);
            // The full backup: a point-in-time view and an empty b0 at the same instant.
            ctl(
                &bin,
                &qmp,
                &[
                    "transaction",
                    r#"{"actions": [
                    {"type": "block-dirty-bitmap-clear", "data": {"node": "disk0", "name": "b0"}},
                    {"type": "block-export-add", "data": {"type": "nbd", "id": "backup",
                     "node-name": "disk0", "name": "backup", "x-snapshot": true}}]}"#,
                ],
            );
            // Phase 2 runs while the view is copied.
            write_signal(&nbd, 0xb1);
            qemu_img(
                &["convert", "-f", "raw", "-O", "qcow2"],
                &[
                    Path::new(&format!("nbd+unix:///backup?socket={}", nbd.display())),
                    &full,
                ],
            );
            ctl(
                &bin,
                &qmp,
                &["block-export-del", r#"{"id": "backup", "mode": "hard"}"#],
            );
            wait_marker(&nbd, 2);
            // The guest flushes after the marker, then only polls the signal sector.
            std::thread::sleep(Duration::from_secs(1));
            let old = daemon.lock().expect("daemon").take().expect("daemon");
            let old_log = old.log();
            let t = Instant::now();
            let status = old.kill();
            eprintln!("daemon killed ({status:?}); its log:\n{old_log}");
            assert_eq!(
                bitmap_flags(&image, "b0"),
                vec!["in-use", "auto"],
                "b0 after the SIGKILL"
            );
            // Read-only: a read-write open by QEMU would (rightly) untrust the shadow.
            let check = Command::new("qemu-img")
                .args(["check", "-U"])
                .arg(&image)
                .output()
                .expect("qemu-img check");
            eprintln!(
                "qemu-img check -U after the SIGKILL ({}):\n{}{}",
                check.status,
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            let new = start();
            let log = new.log();
            eprintln!("restarted in {:.1?}; its log:\n{log}", t.elapsed());
            assert!(log.contains(RECOVERED), "no recovery of b0 logged:\n{log}");
            *daemon.lock().expect("daemon") = Some(new);
            // QEMU reconnects within a second; the guest sees the signal once it has.
            write_signal(&nbd, 0xb2);
            eprintln!("signalled the restart after {:.1?}", t.elapsed());
            wait_marker(&nbd, 3);
            eprintln!(
                "the guest finished phase 3 {:.1?} after the kill",
                t.elapsed()
            );
        })
    };

    let text = script.render().expect("valid script");
    let cfg = GuestConfig::new(&socket, 1, GUEST_TIMEOUT)
        .with_reconnect(Duration::from_secs(1))
        .with_cancel(cancel);
    let outcome = env
        .run(&cfg, &text)
        .unwrap_or_else(|e| panic!("guest could not run: {e}"));
    if outcome.cancelled {
        // The host side failed (its panic message is above): report that.
        if let Err(p) = host.join() {
            std::panic::resume_unwind(p);
        }
        unreachable!("cancelled without a failure of the host side");
    }
    let daemon_log = || {
        daemon
            .lock()
            .map(|d| d.as_ref().map(Backend::log).unwrap_or_default())
            .unwrap_or_default()
    };
    if let Err(e) = outcome.check_success() {
        let log = daemon_log();
        // Kill the daemon so that the host thread's waits fail fast.
        drop(daemon.lock().map(|mut d| d.take()));
        panic!(
            "{e}\n--- qemu stderr ---\n{}\n--- daemon log ---\n{log}",
            outcome.qemu_stderr
        );
    }
    eprintln!(
        "guest finished in {:.1?}; qemu stderr: {}",
        outcome.elapsed, outcome.qemu_stderr
    );
    host.join().expect("host thread");
    let backend = daemon.lock().expect("daemon").take().expect("daemon");
    backend
        .stop(STOP_TIMEOUT)
        .expect("daemon exits 0 on SIGTERM");

    // The recovered bitmap was stored cleanly; QEMU finds the image consistent.
    assert_eq!(bitmap_flags(&image, "b0"), vec!["auto"], "b0 after SIGTERM");
    qemu_img_check(&image).unwrap_or_else(|e| panic!("qemu-img check: {e}"));

    // b0 holds every granule changed since the full backup; whatever more the shadow
    // added lies in the 1 MiB regions written since the daemon first started.
    let dirty = bitmap_dirty_extents(&image, "b0").expect("b0's dirty extents");
    let want = granules(&since_full.expected_dirty_extents(K64, SIZE), K64);
    let got = granules(&dirty, K64);
    let missing: Vec<u64> = want.difference(&got).map(|g| g * K64).collect();
    assert!(
        missing.is_empty(),
        "b0 lacks granules at {missing:x?} (dirty: {dirty:x?})"
    );
    let coarse = granules(&all.expected_dirty_extents(M, SIZE), M);
    let extra: Vec<u64> = got.difference(&want).map(|g| g * K64).collect();
    assert!(
        extra.iter().all(|o| coarse.contains(&(o / M))),
        "b0 marks granules nothing wrote near: {extra:x?}"
    );
    eprintln!(
        "b0: {} granules dirty, {} of them beyond the changes since the full backup: {:x?}",
        got.len(),
        extra.len(),
        merge_extents(extra.iter().map(|&o| (o, K64)).collect())
    );

    // The final disk equals the model; the full backup equals the disk at its instant.
    let final_raw = dir.path().join("final.raw");
    qemu_img(
        &["convert", "-f", "qcow2", "-O", "raw"],
        &[&image, &final_raw],
    );
    assert_raw_equals(
        &final_raw,
        &all.expected_contents(SIZE).expect("model"),
        "the final disk",
    );
    let full_raw = dir.path().join("full.raw");
    qemu_img(
        &["convert", "-f", "qcow2", "-O", "raw"],
        &[&full, &full_raw],
    );
    assert_raw_equals(
        &full_raw,
        &at_full.expected_contents(SIZE).expect("model"),
        "the full backup",
    );

    // The incremental: b0's dirty extents of the final disk over the full backup.
    let inc = dir.path().join("inc.qcow2");
    qemu_img(
        &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"],
        &[&full, &inc, Path::new(&SIZE.to_string())],
    );
    let disk = std::fs::read(&final_raw).expect("final disk");
    let mut cmds = Vec::new();
    for (i, &(off, len)) in dirty.iter().enumerate() {
        let chunk = dir.path().join(format!("chunk-{i}"));
        std::fs::write(&chunk, &disk[off as usize..(off + len) as usize]).expect("chunk");
        cmds.push(format!("write -q -s {} {off} {len}", chunk.display()));
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&inc, "qcow2", false, &cmds).unwrap_or_else(|e| panic!("incremental: {e}"));
    let copied: u64 = dirty.iter().map(|e| e.1).sum();
    assert!(copied < 8 << 20, "the incremental copies {copied} bytes");
    let (same, diff) = qemu_img_compare(&inc, "qcow2", &final_raw, "raw").expect("compare");
    assert!(
        same,
        "full + incremental differs from the final disk: {diff}"
    );
    // And without the incremental it would not be the final disk.
    let (same, _) = qemu_img_compare(&full, "qcow2", &final_raw, "raw").expect("compare");
    assert!(!same, "the full backup alone equals the final disk");
}
