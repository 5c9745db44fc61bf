//! The QMP control socket of the real binary: the same scripted session against
//! qemu-storage-daemon (the oracle) and against us, bitmap transactions while a frontend
//! writes at QD32 on two queues (checked against a model), the sha256 of QEMU's
//! `x-debug-block-dirty-bitmap-sha256`, and the `ctl` client.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{spawn, wait_for_socket, Daemon, Driver, QueueDriver, BIN};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

/// Whether a QEMU tool is installed; under `CI=true` a missing one fails the test.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required when CI=true"
        );
        eprintln!("note: {tool} not installed, test skipped");
    }
    ok
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Our daemon serving `image` with a QMP socket; returns it and a connected client.
fn ours(dir: &Path, image: &Path, extra: &[&str]) -> (Daemon, qmp::Client) {
    let sock = dir.join("vhost.sock");
    let qsock = dir.join("qmp.sock");
    let mut args = vec!["--qmp-socket", qsock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut d = spawn(&sock, image, &args);
    wait_for_socket(&mut d, &sock);
    let c = qmp::Client::connect(&qsock).unwrap();
    (d, c)
}

/// qemu-storage-daemon with `image` as node `disk0` and a QMP monitor.
fn qsd(dir: &Path, image: &Path) -> (Daemon, qmp::Client) {
    let qsock = dir.join("qsd-qmp.sock");
    let mut d = Daemon(
        Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m0",
                qsock.display()
            ))
            .args(["--monitor", "chardev=m0"])
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                image.display()
            ))
            .args(["--blockdev", "driver=qcow2,file=file0,node-name=disk0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&mut d, &qsock);
    let c = qmp::Client::connect(&qsock).unwrap();
    (d, c)
}

/// A reply as comparable JSON: `{"return": …}` or `{"error": {class, desc}}`.
fn reply(c: &mut qmp::Client, cmd: &str, args: Value) -> Value {
    match c.execute(cmd, args) {
        Ok(v) => json!({ "return": v }),
        Err(qmp::ClientError::Qmp(e)) => {
            json!({"error": {"class": e.class.as_str(), "desc": e.desc}})
        }
        Err(e) => panic!("{cmd}: {e}"),
    }
}

/// The node's bitmaps as QEMU reports them, sorted by name (qemu-storage-daemon lists
/// the newest first, we list them in directory order).
fn bitmaps(c: &mut qmp::Client) -> Value {
    let nodes = c.execute("query-named-block-nodes", json!({})).unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap()
        .clone();
    let mut list = node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Value::Array(list)
}

#[test]
fn session_matches_qemu_storage_daemon() {
    if !have("qemu-storage-daemon") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    for img in [&a, &b] {
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
        qemu_img(&[
            "bitmap",
            "--add",
            "-g",
            "64K",
            img.to_str().unwrap(),
            "stored",
        ]);
    }
    let (_qd, mut q) = qsd(dir.path(), &a);
    let sub = tempfile::tempdir_in(dir.path()).unwrap();
    let (_od, mut o) = ours(sub.path(), &b, &[]);
    let n = |name: &str| json!({"node": "disk0", "name": name});
    let script: Vec<(&str, Value)> = vec![
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "nonode", "name": "b1"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b2", "granularity": 1000}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "p1", "granularity": 65536, "persistent": true, "disabled": true}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "p1", "persistent": true}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "stored", "persistent": true}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": ""}),
        ),
        ("block-dirty-bitmap-add", json!({"node": "disk0"})),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": 5}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "x", "bogus": 1}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "y", "granularity": "big"}),
        ),
        ("block-dirty-bitmap-remove", n("nope")),
        ("block-dirty-bitmap-clear", n("nope")),
        ("block-dirty-bitmap-enable", n("p1")),
        ("block-dirty-bitmap-disable", n("p1")),
        ("block-dirty-bitmap-clear", n("stored")),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b0", "bitmaps": ["p1", {"node": "disk0", "name": "stored"}]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b0", "bitmaps": ["nope"]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "nope", "bitmaps": ["b0"]}),
        ),
        (
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b0", "bitmaps": [{"node": "zz", "name": "p1"}]}),
        ),
        ("x-debug-block-dirty-bitmap-sha256", n("b0")),
        ("x-debug-block-dirty-bitmap-sha256", n("nope")),
        (
            "transaction",
            json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "t1"}},
            {"type": "block-dirty-bitmap-disable", "data": n("b0")}]}),
        ),
        // Fails half-way: nothing of it may remain (t2 not added, t1 still enabled).
        (
            "transaction",
            json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "t2"}},
            {"type": "block-dirty-bitmap-disable", "data": n("t1")},
            {"type": "block-dirty-bitmap-remove", "data": n("nope")}]}),
        ),
        (
            "transaction",
            json!({"actions": [{"type": "bogus-type", "data": {}}]}),
        ),
        (
            "transaction",
            json!({"actions": [{"type": "block-dirty-bitmap-clear", "data": n("t2")}]}),
        ),
        ("block-dirty-bitmap-remove", n("p1")),
        ("block-dirty-bitmap-remove", n("stored")),
        ("no-such-command", json!({})),
    ];
    for (cmd, args) in script {
        let (want, got) = (
            reply(&mut q, cmd, args.clone()),
            reply(&mut o, cmd, args.clone()),
        );
        assert_eq!(got, want, "{cmd} {args}");
    }
    assert_eq!(
        bitmaps(&mut o),
        bitmaps(&mut q),
        "the bitmaps each server reports"
    );
}

#[test]
fn sha256_of_bits_qemu_wrote_matches_qemu() {
    if !have("qemu-storage-daemon") || !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let p = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "100M"]);
    qemu_img(&["bitmap", "--add", "-g", "4K", p, "fine"]);
    qemu_img(&["bitmap", "--add", "-g", "1M", p, "coarse"]);
    // qemu-io records its writes in the enabled bitmaps and stores them on close.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args([
            "-c",
            "write 0 4k",
            "-c",
            "write 5M 70k",
            "-c",
            "write 99M 1M",
        ])
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hashes = |c: &mut qmp::Client| -> Vec<Value> {
        ["fine", "coarse"]
            .iter()
            .map(|b| {
                c.execute(
                    "x-debug-block-dirty-bitmap-sha256",
                    json!({"node": "disk0", "name": b}),
                )
                .unwrap()
            })
            .collect()
    };
    let want = {
        let (_d, mut q) = qsd(dir.path(), &img);
        let h = hashes(&mut q);
        q.execute("quit", json!({})).unwrap();
        h
    };
    std::thread::sleep(Duration::from_millis(300));
    let sub = tempfile::tempdir_in(dir.path()).unwrap();
    let (_d, mut o) = ours(sub.path(), &img, &[]);
    assert_eq!(hashes(&mut o), want);
    assert_ne!(want[0], want[1]);
}

/// Guest area of queue `q`'s requests.
fn area(q: usize) -> u64 {
    0x80_0000 + q as u64 * 0x40_0000
}

/// Writes 4 KiB at each granule index of `granules` (one request each, 32 at a time).
fn write_batch(qd: &mut QueueDriver, granules: &[u64], g: u64) {
    let q = qd.q;
    let chains: Vec<Vec<(u64, u32, bool)>> = granules
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let hdr = area(q) + i as u64 * 32;
            let st = area(q) + 0x2000 + i as u64 * 32;
            let buf = area(q) + 0x1_0000 + i as u64 * 0x1000;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&1u32.to_le_bytes());
            h[8..16].copy_from_slice(&(k * g / 512).to_le_bytes());
            qd.mem().write_slice(&h, GuestAddress(hdr)).unwrap();
            vec![(hdr, 16, false), (buf, 4096, false), (st, 1, true)]
        })
        .collect();
    qd.submit_batch(&chains, 3);
    let used = qd.wait_used(chains.len());
    assert_eq!(used.len(), chains.len());
}

/// Checkpoint transactions (add the next bitmap, disable the current one) and merges
/// of old increments into an accumulator, while two queues write at QD32: every write
/// is recorded wholly in the increment enabled when it was submitted and, if a
/// transaction committed while it was in flight, also in the one enabled when it
/// completed (never split, never lost); each queue's writes move forward through the
/// increments, and nothing else is set.
#[test]
fn transactions_while_two_queues_write_are_atomic() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let size: u64 = 512 << 20;
    let g: u64 = 4096;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
    let (_d, mut c) = ours(dir.path(), &img, &["--num-queues", "2"]);
    let node = |name: &str| json!({"node": "disk0", "name": name});
    c.execute(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "t0", "granularity": g, "persistent": true}),
    )
    .unwrap();
    c.execute(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "acc", "granularity": g, "disabled": true}),
    )
    .unwrap();
    // Cleared again and again: what it holds at the end is, per queue, the writes after
    // some point plus, at most, writes of the batch in flight across the last clear
    // (marked again when they completed).
    c.execute(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "scratch", "granularity": g}),
    )
    .unwrap();
    let mut d = Driver::connect(&dir.path().join("vhost.sock"), 2);
    let stop = Arc::new(AtomicBool::new(false));
    let granules = size / g;
    let writers: Vec<_> = std::mem::take(&mut d.queues)
        .into_iter()
        .map(|mut qd| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Queue q writes granules q, q+2, q+4, … in order: one write per granule.
                let mut next = qd.q as u64;
                let mut order = Vec::new();
                while !stop.load(Ordering::SeqCst) && next < granules {
                    let batch: Vec<u64> = (0..32)
                        .map(|i| next + 2 * i)
                        .take_while(|&k| k < granules)
                        .collect();
                    next += 2 * batch.len() as u64;
                    write_batch(&mut qd, &batch, g);
                    order.extend(batch);
                }
                (qd, order)
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(30) && writers.iter().any(|w| !w.is_finished()) {
        if let Err(e) = c.execute("block-dirty-bitmap-clear", node("scratch")) {
            panic!(
                "clear after {n} transactions: {e}; bitmaps now {}",
                bitmaps(&mut c)
            );
        }
        let (cur, next) = (format!("t{n}"), format!("t{}", n + 1));
        c.execute(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": next, "granularity": g, "persistent": n % 2 == 0}},
                {"type": "block-dirty-bitmap-disable", "data": node(&cur)}]}),
        )
        .unwrap();
        n += 1;
        if n >= 2 {
            // Fold the increment before last into the accumulator, then drop it.
            let old = format!("t{}", n - 2);
            c.execute(
                "block-dirty-bitmap-merge",
                json!({"node": "disk0", "target": "acc", "bitmaps": [old]}),
            )
            .unwrap();
            c.execute("block-dirty-bitmap-remove", node(&old)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let orders: Vec<Vec<u64>> = writers.into_iter().map(|w| w.join().unwrap().1).collect();
    assert!(n >= 5, "only {n} transactions ran");
    // Where each granule was recorded: bitmap index (acc = -1) per dirty granule.
    let mut holder: std::collections::HashMap<u64, Vec<i64>> = Default::default();
    let mut names: Vec<(String, i64)> = vec![("acc".into(), -1)];
    names.extend((n.saturating_sub(1)..=n).map(|k| (format!("t{k}"), k as i64)));
    for (name, idx) in &names {
        let dump = c.execute("x-bitmap-dump", node(name)).unwrap();
        for e in dump
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["dirty"] == true)
        {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            for k in s / g..(s + l).div_ceil(g) {
                holder.entry(k).or_default().push(*idx);
            }
        }
    }
    let written: usize = orders.iter().map(Vec::len).sum();
    assert_eq!(holder.len(), written, "dirty granules = written granules");
    let scratch: std::collections::HashSet<u64> = c
        .execute("x-bitmap-dump", node("scratch"))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["dirty"] == true)
        .flat_map(|e| {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            s / g..(s + l).div_ceil(g)
        })
        .collect();
    for order in &orders {
        // Everything after the last write it misses is in scratch; what it holds before
        // that belongs to the same batch of 32 (in flight across the clear).
        if let Some(last_missing) = order.iter().rposition(|k| !scratch.contains(k)) {
            let early = order[..last_missing]
                .iter()
                .position(|k| scratch.contains(k));
            if let Some(e) = early {
                assert!(
                    last_missing - e < 32,
                    "scratch holds write {e} but misses write {last_missing}: not a cut at a clear"
                );
            }
        }
    }
    eprintln!(
        "{n} checkpoint transactions and clears in {:.1?} while the queues wrote {written} granules",
        t0.elapsed()
    );
    let mut twice = 0;
    for order in &orders {
        let mut last = -1;
        for k in order {
            let h = holder
                .get(k)
                .unwrap_or_else(|| panic!("granule {k} recorded nowhere"));
            assert!(h.len() <= 2, "granule {k} recorded in {h:?}");
            twice += usize::from(h.len() == 2);
            // Recorded first where it was submitted: submissions move forward.
            let first = *h.iter().min().unwrap();
            assert!(
                first >= last,
                "granule {k} went back from {last} to {first}"
            );
            last = first;
        }
    }
    eprintln!("{twice} granules were in flight across a transaction (recorded twice)");
    assert!(
        twice < written / 4,
        "{twice} of {written} granules recorded twice"
    );
    drop(d);
    c.execute("quit", json!({})).unwrap();
}

#[test]
fn ctl_manages_bitmaps_and_prints_errors() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let (mut d, _c) = ours(dir.path(), &img, &["--node-name", "drive0"]);
    let q = dir.path().join("qmp.sock");
    let ctl = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--qmp-socket")
            .arg(&q)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(
        ctl(&["bitmap", "add", "drive0", "b1", "-g", "64K"]).0,
        Some(0)
    );
    let (code, _, err) = ctl(&["bitmap", "add", "drive0", "b1"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("GenericError: Bitmap already exists: b1"),
        "{err}"
    );
    let (code, _, err) = ctl(&["bitmap", "add", "drive0", "b2", "-g", "1000"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("Granularity must be power of 2 and at least 512"),
        "{err}"
    );
    let (code, _, err) = ctl(&["bitmap", "clear", "disk0", "b1"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("Cannot find device='disk0' nor node-name='disk0'"),
        "{err}"
    );
    let (code, out, _) = ctl(&["query"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("node drive0 (qcow2") && out.contains("b1") && out.contains("65536"),
        "{out}"
    );
    let (code, out, _) = ctl(&["bitmap", "dump", "drive0", "b1"]);
    assert_eq!(
        (code, out.trim()),
        (
            Some(0),
            "[\n{\"start\": 0, \"length\": 67108864, \"dirty\": false}\n]"
        )
    );
    let (code, out, _) = ctl(&["query-status"]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), r#"{"running":true,"status":"running"}"#)
    );
    let (code, out, _) = ctl(&[
        "raw",
        r#"{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "drive0", "name": "b1"}}"#,
    ]);
    assert_eq!((code, out.trim()), (Some(0), "{}"));
    assert_eq!(ctl(&["quit"]).0, Some(0));
    let st = d.wait().unwrap();
    assert!(st.success(), "daemon exit {st}");
    let out = Command::new("qemu-img")
        .arg("info")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("b1"),
        "b1 removed on disk"
    );
}

/// Idle, garbage-sending and never-reading clients do not stop the guest's I/O or the
/// other clients.
#[test]
fn hostile_clients_do_not_stall_the_guest_or_other_clients() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let (_d, mut c) = ours(dir.path(), &img, &[]);
    let q = dir.path().join("qmp.sock");
    let idle: Vec<UnixStream> = (0..40).map(|_| UnixStream::connect(&q).unwrap()).collect();
    // Garbage, deep nesting, an unterminated huge message.
    let mut bad = UnixStream::connect(&q).unwrap();
    let _ = bad.write_all(b"{\"execute\": \"qmp_capabilities\"}\x00\xff}}}{{[[");
    let mut deep = UnixStream::connect(&q).unwrap();
    let _ = deep.write_all(&vec![b'['; 200_000]);
    let mut big = UnixStream::connect(&q).unwrap();
    let chunk = vec![b' '; 1 << 20];
    let _ = big.set_write_timeout(Some(Duration::from_millis(200)));
    for _ in 0..80 {
        if big.write_all(&chunk).is_err() {
            break;
        }
    }
    // A client that asks and never reads.
    let mut deaf = UnixStream::connect(&q).unwrap();
    let _ = deaf.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = deaf.write_all(b"{\"execute\": \"qmp_capabilities\"}");
    for _ in 0..20_000 {
        if deaf
            .write_all(b"{\"execute\": \"query-named-block-nodes\"}")
            .is_err()
        {
            break;
        }
    }
    // The guest's I/O and a well-behaved client go on.
    let mut d = Driver::connect(&dir.path().join("vhost.sock"), 1);
    let t = Instant::now();
    write_batch(&mut d.queues[0], &(0..32).collect::<Vec<u64>>(), 65536);
    assert!(t.elapsed() < Duration::from_secs(5));
    let r = c.execute("query-status", json!({})).unwrap();
    assert_eq!(r["running"], true);
    let mut fresh = qmp::Client::connect(&q).unwrap();
    fresh.execute("query-blockstats", json!({})).unwrap();
    drop((idle, bad, deep, big, deaf));
    drop(d);
    c.execute("quit", json!({})).unwrap();
}

/// SIGTERM stops the daemon as `quit` does; connected clients get `SHUTDOWN` first.
#[test]
fn sigterm_sends_shutdown_to_clients() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let (mut d, mut c) = ours(dir.path(), &img, &[]);
    c.set_timeout(Some(Duration::from_secs(20))).unwrap();
    // SAFETY: kill(2) with the pid of our own child and a valid signal number.
    assert_eq!(unsafe { libc::kill(d.id() as i32, libc::SIGTERM) }, 0);
    let ev = c.next_event().unwrap();
    assert_eq!(ev["event"], "SHUTDOWN", "{ev}");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 0);
    assert!(d.wait().unwrap().success());
}

/// A guest write that fails (the file system under the image is full) is reported to
/// QMP clients as `BLOCK_IO_ERROR`.
#[test]
fn failed_guest_writes_are_reported_as_block_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = common::SmallFs::mount(dir.path(), "1m") else {
        return;
    };
    let mnt = fs.0.clone();
    let img = mnt.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let (mut d, mut c) = ours(dir.path(), &img, &["--format", "raw"]);
    c.set_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut drv = Driver::connect(&dir.path().join("vhost.sock"), 1);
    // 2 MiB of 4 KiB writes into a 1 MiB file system: the later ones fail.
    for batch in 0..16u64 {
        let granules: Vec<u64> = (0..32).map(|i| batch * 32 + i).collect();
        write_batch(&mut drv.queues[0], &granules, 4096);
    }
    let ev = c.next_event().unwrap();
    assert_eq!(ev["event"], "BLOCK_IO_ERROR", "{ev}");
    assert_eq!(ev["data"]["operation"], "write");
    assert_eq!(ev["data"]["node-name"], "disk0");
    let stats = c.execute("query-blockstats", json!({})).unwrap();
    assert!(
        stats[0]["stats"]["failed_wr_operations"].as_u64().unwrap() > 0,
        "{stats}"
    );
    drop(drv);
    c.execute("quit", json!({})).unwrap();
    assert!(d.wait().unwrap().success());
}
