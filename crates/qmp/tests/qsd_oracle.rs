//! The same bytes sent to qemu-storage-daemon and to our server (running the
//! fake handler, whose `block-dirty-bitmap-add` and `query-named-block-nodes`
//! have QEMU's argument schema) must produce the same replies.
//!
//! Replies are compared as JSON values (QEMU orders members by hash), and
//! each string we print is also checked to appear byte for byte in QEMU's
//! line, which compares the escaping of non-ASCII text. Skipped when
//! qemu-storage-daemon is not installed, failing instead under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, start, Raw};
use serde_json::Value;

struct Qsd {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qsd() -> Option<Qsd> {
    let found = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !require(found, "qemu-storage-daemon") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=c0",
            path.display()
        ))
        .args(["--monitor", "chardev=c0"])
        .args(["--blockdev", "driver=null-co,node-name=disk0,size=67108864"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "qsd socket missing");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Qsd {
        child,
        path,
        _dir: dir,
    })
}

const SENTINEL_ID: &str = "oracle-sentinel";

/// Sends `input` on a fresh connection (negotiated first if asked), then a
/// sentinel request, and returns the reply lines before the sentinel's.
fn exchange(path: &Path, negotiate: bool, input: &[u8]) -> Vec<String> {
    let mut r = if negotiate {
        Raw::negotiated(path)
    } else {
        Raw::open(path).0
    };
    let mut w = r.stream.try_clone().unwrap();
    let mut data = input.to_vec();
    data.extend_from_slice(
        format!(r#"{{"execute":"qmp_capabilities","id":"{SENTINEL_ID}"}}"#).as_bytes(),
    );
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = w.write_all(&data);
    });
    let mut lines = Vec::new();
    loop {
        let l = r
            .line_within(Duration::from_secs(60))
            .expect("reply within 60 s")
            .expect("connection open");
        if l.contains(SENTINEL_ID) {
            break;
        }
        lines.push(l);
    }
    writer.join().unwrap();
    lines
}

fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(qmp::json::to_json(&Value::String(s.clone()))),
        Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        Value::Object(m) => m.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

fn compare(qsd: &Qsd, ours: &Path, negotiate: bool, input: &[u8]) {
    let want = exchange(&qsd.path, negotiate, input);
    let got = exchange(ours, negotiate, input);
    let what = String::from_utf8_lossy(&input[..input.len().min(120)]).into_owned();
    assert_eq!(
        got.len(),
        want.len(),
        "reply count for {what:?}:\nqsd: {want:?}\nours: {got:?}"
    );
    for (g, w) in got.iter().zip(&want) {
        let mut gv: Value = serde_json::from_str(g).unwrap();
        let mut wv: Value =
            serde_json::from_str(w).unwrap_or_else(|e| panic!("qsd sent bad JSON {w:?}: {e}"));
        // Successful results differ (real block nodes vs. a fake handler):
        // compare that both succeeded, and the ids.
        for v in [&mut gv, &mut wv] {
            if let Some(ret) = v.get_mut("return") {
                *ret = Value::Bool(true);
            }
        }
        assert_eq!(gv, wv, "for {what:?}");
        let mut ss = Vec::new();
        strings(&gv, &mut ss);
        for s in ss {
            assert!(w.contains(&s), "{s} not in qsd's {w}");
        }
    }
}

#[test]
fn protocol_errors_match_qemu_storage_daemon() {
    let Some(qsd) = qsd() else { return };
    let ours = start();
    let before: &[&[u8]] = &[
        br#"{"execute":"query-commands","id":1}"#,
        br#"{"execute":"no-such","arguments":{"x":1}}"#,
        br#"{"exec-oob":"qmp_capabilities","id":1}"#,
        br#"{"execute":"qmp_capabilities","arguments":{"x":1}}"#,
        br#"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"#,
        br#"{"execute":"qmp_capabilities","arguments":{"enable":[1]}}"#,
        br#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#,
        br#"{"execute":"qmp_capabilities","arguments":{"enable":null}}"#,
        br#"{"execute":"qmp_capabilities","arguments":[]}"#,
        b"{bad}",
    ];
    for input in before {
        compare(&qsd, &ours.path, false, input);
    }
    let add =
        |a: &str| format!(r#"{{"execute":"block-dirty-bitmap-add","arguments":{a},"id":"add"}}"#);
    let mut after: Vec<Vec<u8>> = [
        // Request shape.
        r#"{"execute":"qmp_capabilities","id":"x"}"#,
        r#"{"execute":"no-such","id":{"a":[1,2]}}"#,
        r#"{"id":5}"#,
        r#"[1,2]"#,
        r#""str""#,
        r#"42 "#,
        r#"{"execute":1}"#,
        r#"{"execute":"query-named-block-nodes","arguments":[1]}"#,
        r#"{"execute":"query-named-block-nodes","foo":1}"#,
        r#"{"exec-oob":"query-named-block-nodes","id":10}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{},"control":{}}"#,
        // Ids of every type; strings with escapes.
        r#"{"execute":"query-named-block-nodes","id":"s"}"#,
        r#"{"execute":"query-named-block-nodes","id":-7}"#,
        r#"{"execute":"query-named-block-nodes","id":12345678901234567890}"#,
        r#"{"execute":"query-named-block-nodes","id":{"k":[true,false,null,{}]}}"#,
        r#"{"execute":"query-named-block-nodes","id":[]}{"execute":"query-named-block-nodes","id":null}"#,
        r#"{"execute":"query-named-block-nodes","id":"\u00e9\ud83d\ude00\u0001\t\"\\\/"}"#,
        "{'execute':'query-named-block-nodes','id':'single \\' quoted \"'}",
        "{\"execute\":\"no-such\",\"id\":\"\u{e9}\u{1f600}\u{7f}\"}",
        // Arguments (QEMU's schemas).
        &add(r#"{"node":"disk0"}"#),
        &add(r#"{"node":1,"name":"x"}"#),
        &add(r#"{"node":"disk0","name":"x","granularity":"a"}"#),
        &add(r#"{"node":"disk0","name":"x","granularity":-1}"#),
        &add(r#"{"node":"disk0","name":"x","granularity":1.5}"#),
        &add(r#"{"node":"disk0","name":"x","granularity":4294967296}"#),
        &add(r#"{"node":"disk0","name":"x","persistent":1}"#),
        &add(r#"{"node":"disk0","name":"x","disabled":"no"}"#),
        &add(r#"{"node":"disk0","name":"x","persistent":null}"#),
        &add(r#"{"node":"disk0","name":"x","zz":1}"#),
        &add(r#"{"node":"nonode","name":"x"}"#),
        &add(r#"{"name":"x"}"#),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":"x"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":null}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true,"z":1}}"#,
        r#"{"execute":"query-commands","arguments":{"a":1}}"#,
        // Several in one write.
        r#"{"execute":"no-such","id":1}{"execute":"no-such","id":2} {"execute":"no-such","id":3}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // JSON syntax errors and resynchronisation (each followed by a good
    // request, which must be answered by both).
    let good: &[u8] = br#"{"execute":"query-named-block-nodes","id":"good"}"#;
    for bad in [
        &b"{bad}"[..],
        b"{\"execute\": \"x\" ] ",
        b"\xff",
        b"\xfe{\"a\":1}",
        b"{\"execute\":\"x\",\"id\":\"a\x01b\"}",
        b"{\"execute\":\"x\",\"id\":\"a\\\x01\"}",
        b"{\"execute\":\"x\",\"id\":\"a\x01b\",\"x\":1}",
        b"\xff a:b,c ",
        b"{\"a\":\"\x01\" , \"b\" : [1]}",
        b"}",
        b"]]",
        b"{\"a\":tru}",
        b"{\"id\":7,\"id\":8}",
        b"{\"id\":\"\\ud800\"}",
        b"{\"id\":\"\\ud83dx\"}",
        b"{\"id\":\"\\udc00\"}",
        b"{\"id\":\"\\uFFFF\"}",
        b"{\"id\":\"\\uFDD0\"}",
        b"{\"id\":\"\\u00\"}",
        b"{\"id\":\"\\uZZZZ\"}",
        b"{\"id\":\"\\x\"}",
        b"{\"id\":\"\xc3\"}",
        b"{\"id\":\"\xef\xbf\xbf\"}",
        b"{\"id\":\"\xe0\x80\x80\"}",
        b"{\"id\":\"\xed\xa0\x80\"}",
        b"{\"id\":\"\xf4\x90\x80\x80\"}",
        b"{\"id\":\"\xc0\x80\"}",
        b"01 ",
        b"-a ",
        b"%d ",
        b"{\"id\":1.}",
        b"{\"id\":1e}",
        b"{\"a\" \"b\", \"c\": 1}",
        b"{\"a\":}",
        b"{ ]",
        b"[}",
        b"{\"a\":1 ]",
        b"{1:2}",
        b"[1,2,]",
        b"[1 2]",
        b"{{\"a\":1}:2}",
        b"\n\n  \t\r",
    ] {
        let mut input = bad.to_vec();
        input.extend_from_slice(good);
        after.push(input);
    }
    // A long invalid keyword: QEMU truncates the message to its buffer.
    after.push(format!("{} {}", "k".repeat(3000), String::from_utf8_lossy(good)).into_bytes());
    // Deep nesting: QEMU's limit and what follows it.
    for (open, close) in [("[", "]"), (r#"{"a":"#, "}")] {
        let mut input = open.repeat(100_000).into_bytes();
        input.extend(close.repeat(100_000).into_bytes());
        input.extend_from_slice(good);
        after.push(input);
    }
    for input in &after {
        compare(&qsd, &ours.path, true, input);
    }
}

#[test]
fn greeting_matches_qemu_storage_daemon() {
    let Some(qsd) = qsd() else { return };
    let ours = start();
    let parse = |p: &Path| -> Value { serde_json::from_str(&Raw::open(p).1).unwrap() };
    let (q, o) = (parse(&qsd.path), parse(&ours.path));
    for v in [&q, &o] {
        let version = &v["QMP"]["version"];
        for k in ["major", "minor", "micro"] {
            assert!(version["qemu"][k].is_u64(), "{v}");
        }
        assert!(version["package"].is_string(), "{v}");
        assert!(v["QMP"]["capabilities"].is_array(), "{v}");
    }
    assert_eq!(q["QMP"]["version"]["qemu"], o["QMP"]["version"]["qemu"]);
    // The one deliberate difference: no out-of-band execution here.
    assert_eq!(q["QMP"]["capabilities"], serde_json::json!(["oob"]));
    assert_eq!(o["QMP"]["capabilities"], serde_json::json!([]));
}
