//! Raw-socket tests of the QMP server.

mod common;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use common::{err, err_id, start, start_with, Raw};
use qmp::{Client, ClientError, ErrorClass, Server, ServerConfig, ServerError};
use serde_json::{json, Value};

/// Runs `f` on another thread; panics if it takes longer than `limit` (so a
/// deadlock fails the test instead of hanging it).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

const NEGOTIATE_FIRST: &str = "Expecting capabilities negotiation with 'qmp_capabilities'";

#[test]
fn greeting() {
    let s = start();
    let (_r, g) = Raw::open(&s.path);
    assert_eq!(
        g,
        r#"{"QMP": {"version": {"package": "qmp-crate-test", "qemu": {"major": 10, "micro": 2, "minor": 0}}, "capabilities": []}}"#
    );
}

#[test]
fn negotiation() {
    let s = start();
    let (mut r, _) = Raw::open(&s.path);
    assert_eq!(
        r.ask(r#"{"execute":"echo"}"#),
        err("CommandNotFound", NEGOTIATE_FIRST)
    );
    assert_eq!(
        r.ask(r#"{"execute":"query-commands","id":"q"}"#),
        err_id("CommandNotFound", NEGOTIATE_FIRST, "\"q\"")
    );
    assert_eq!(
        r.ask(r#"{"execute":"nonesuch","id":1}"#),
        err_id("CommandNotFound", NEGOTIATE_FIRST, "1")
    );
    // Protocol errors keep their own texts before negotiation.
    assert_eq!(
        r.ask(r#"{"execute":"echo","arguments":[]}"#),
        err(
            "GenericError",
            "QMP input member 'arguments' must be an object"
        )
    );
    assert_eq!(
        r.ask(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#),
        err("GenericError", "Capability oob not available")
    );
    assert_eq!(
        r.ask(r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#),
        err(
            "GenericError",
            "Parameter 'null' does not accept value 'foo'"
        )
    );
    assert_eq!(
        r.ask(r#"{"execute":"qmp_capabilities","arguments":{"x":1}}"#),
        err("GenericError", "Parameter 'x' is unexpected")
    );
    assert_eq!(
        r.ask(r#"{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":"n"}"#),
        r#"{"return": {}, "id": "n"}"#
    );
    assert_eq!(
        r.ask(r#"{"execute":"qmp_capabilities","id":2}"#),
        err_id(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
            "2"
        )
    );
    assert_eq!(
        r.ask(r#"{"execute":"query-version"}"#),
        r#"{"return": {"package": "qmp-crate-test", "qemu": {"major": 10, "micro": 2, "minor": 0}}}"#
    );
}

#[test]
fn query_commands() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    r.send(br#"{"execute":"query-commands"}"#);
    let v = r.json();
    let names: Vec<&str> = v["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "qmp_capabilities",
        "query-commands",
        "query-version",
        "echo",
        "quit",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    assert_eq!(
        r.ask(r#"{"execute":"query-commands","arguments":{"a":1}}"#),
        err("GenericError", "Parameter 'a' is unexpected")
    );
}

#[test]
fn id_echo() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    for (id, shown) in [
        (r#""a""#, r#""a""#),
        ("7", "7"),
        ("-3", "-3"),
        ("12345678901234567890", "12345678901234567890"),
        ("1.5", "1.5"),
        ("null", "null"),
        ("true", "true"),
        ("[]", "[]"),
        (
            r#"{"b":[1,{"c":"d"}],"a":{}}"#,
            r#"{"a": {}, "b": [1, {"c": "d"}]}"#,
        ),
        (r#""\u00e9\ud83d\ude00""#, r#""\u00E9\uD83D\uDE00""#),
        ("'single'", r#""single""#),
    ] {
        assert_eq!(
            r.ask(&format!(
                r#"{{"execute":"query-named-block-nodes","id":{id}}}"#
            )),
            format!(r#"{{"return": [], "id": {shown}}}"#),
            "id {id}"
        );
        // Errors echo the id too, also for protocol-level errors.
        assert_eq!(
            r.ask(&format!(r#"{{"execute":"nonesuch","id":{id}}}"#)),
            err_id(
                "CommandNotFound",
                "The command nonesuch has not been found",
                shown
            )
        );
        assert_eq!(
            r.ask(&format!(r#"{{"id":{id}}}"#)),
            err_id("GenericError", "QMP input lacks member 'execute'", shown)
        );
    }
    // A deeply nested id (QEMU allows 1024 levels in all).
    let id = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
    let reply = r.ask(&format!(r#"{{"execute":"nonesuch","id":{id}}}"#));
    assert!(reply.ends_with(&format!(", \"id\": {id}}}")));
}

#[test]
fn stream_without_newlines() {
    let s = start();
    let (mut r, _) = Raw::open(&s.path);
    // No newline anywhere: every message must be answered on its own.
    r.send(br#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(
        r.line_within(Duration::from_secs(5)),
        Some(Some(r#"{"return": {}}"#.into()))
    );
    r.send(br#"{"execute":"echo","arguments":{"a":1},"id":1}"#);
    assert_eq!(
        r.line_within(Duration::from_secs(5)),
        Some(Some(r#"{"return": {"a": 1}, "id": 1}"#.into()))
    );
}

#[test]
fn many_requests_in_one_write_and_one_split_across_writes() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    let mut batch = String::new();
    for i in 0..50 {
        batch.push_str(&format!(
            r#"{{"execute":"echo","arguments":{{"i":{i}}},"id":{i}}}"#
        ));
        if i % 3 == 0 {
            batch.push_str(" \n\t");
        }
    }
    r.send(batch.as_bytes());
    for i in 0..50 {
        assert_eq!(
            r.line().unwrap(),
            format!(r#"{{"return": {{"i": {i}}}, "id": {i}}}"#)
        );
    }
    let req = br#"{"execute":"echo","arguments":{"s":"split \u00e9 here","n":[1.25,-7]},"id":"x"}"#;
    for b in req.iter() {
        r.send(&[*b]);
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(
        r.line().unwrap(),
        r#"{"return": {"n": [1.25, -7], "s": "split \u00E9 here"}, "id": "x"}"#
    );
    // A multi-byte UTF-8 character split between writes.
    r.send(b"{\"execute\":\"echo\",\"arguments\":{\"s\":\"\xc3");
    std::thread::sleep(Duration::from_millis(50));
    r.send(b"\xa9\"}}");
    assert_eq!(r.line().unwrap(), r#"{"return": {"s": "\u00E9"}}"#);
}

#[test]
fn bad_json_then_good_command() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    let good = r#"{"execute":"echo","arguments":{"ok":true},"id":"good"}"#;
    let ok = r#"{"return": {"ok": true}, "id": "good"}"#;
    let cases: &[(&[u8], &[&str])] = &[
        (b"{bad}", &["JSON parse error, invalid keyword 'bad'"]),
        (
            b"{\"execute\": \"echo\" ] ",
            &["JSON parse error, expected separator in dict"],
        ),
        (b"\xff", &["JSON parse error, stray '\u{fffd}'"]),
        (
            b"{\"execute\":\"echo\",\"id\":\"a\x01b\"}",
            &[
                "JSON parse error, stray '\"a\u{1}'",
                "JSON parse error, expecting value",
            ],
        ),
        (b"}", &["JSON parse error, expecting value"]),
        (b"{\"a\":tru}", &["JSON parse error, invalid keyword 'tru'"]),
        (b"{\"id\":1,\"id\":2}", &["JSON parse error, duplicate key"]),
        (b"[1,2,]", &["JSON parse error, expecting value"]),
        (
            b"{\"s\":\"\\ud800\"}",
            &["JSON parse error, \\ud800 is not a valid Unicode character"],
        ),
        (
            b"{\"s\":\"\xc3\"}",
            &["JSON parse error, invalid UTF-8 sequence in string"],
        ),
    ];
    for (bad, errors) in cases {
        r.send(bad);
        r.send(good.as_bytes());
        for e in *errors {
            assert_eq!(
                r.line().unwrap(),
                err("GenericError", e),
                "after {:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            r.line().unwrap(),
            ok,
            "after {:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn request_shape_errors() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    for (req, want) in [
        (
            "[1,2]",
            err("GenericError", "QMP input must be a JSON object"),
        ),
        (
            "\"str\"",
            err("GenericError", "QMP input must be a JSON object"),
        ),
        (
            "42 ",
            err("GenericError", "QMP input must be a JSON object"),
        ),
        (
            "{}",
            err("GenericError", "QMP input lacks member 'execute'"),
        ),
        (
            r#"{"execute":1}"#,
            err(
                "GenericError",
                "QMP input member 'execute' must be a string",
            ),
        ),
        (
            r#"{"execute":"echo","arguments":[1]}"#,
            err(
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
        ),
        (
            r#"{"execute":"echo","foo":1}"#,
            err("GenericError", "QMP input member 'foo' is unexpected"),
        ),
        (
            r#"{"exec-oob":"echo","id":10}"#,
            err_id(
                "GenericError",
                "QMP input member 'exec-oob' is unexpected",
                "10",
            ),
        ),
        (
            r#"{"execute":"no-such-cmd"}"#,
            err(
                "CommandNotFound",
                "The command no-such-cmd has not been found",
            ),
        ),
        (
            r#"{"execute":"not-found"}"#,
            err("DeviceNotFound", "Device 'x' not found"),
        ),
    ] {
        assert_eq!(r.ask(req), want, "{req}");
    }
}

#[test]
fn argument_errors() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    let add = |args: &str| format!(r#"{{"execute":"block-dirty-bitmap-add","arguments":{args}}}"#);
    for (args, want) in [
        (r#"{"node":"disk0"}"#, "Parameter 'name' is missing"),
        (
            r#"{"node":1,"name":"x"}"#,
            "Invalid parameter type for 'node', expected: string",
        ),
        (
            r#"{"node":"disk0","name":"x","granularity":"a"}"#,
            "Parameter 'granularity' expects uint64",
        ),
        (
            r#"{"node":"disk0","name":"x","granularity":-1}"#,
            "Parameter 'granularity' expects uint32_t",
        ),
        (
            r#"{"node":"disk0","name":"x","granularity":1.5}"#,
            "Parameter 'granularity' expects uint64",
        ),
        (
            r#"{"node":"disk0","name":"x","persistent":1}"#,
            "Invalid parameter type for 'persistent', expected: boolean",
        ),
        (
            r#"{"node":"disk0","name":"x","persistent":null}"#,
            "Invalid parameter type for 'persistent', expected: boolean",
        ),
        (
            r#"{"node":"disk0","name":"x","zz":1}"#,
            "Parameter 'zz' is unexpected",
        ),
        (
            r#"{"node":"nonode","name":"x"}"#,
            "Cannot find device='nonode' nor node-name='nonode'",
        ),
    ] {
        assert_eq!(r.ask(&add(args)), err("GenericError", want), "{args}");
    }
    assert_eq!(
        r.ask(&add(r#"{"node":"disk0","name":"b2"}"#)),
        r#"{"return": {}}"#
    );
    assert_eq!(
        r.ask(&add(r#"{"node":"disk0","name":"b2"}"#)),
        err("GenericError", "Bitmap already exists: b2")
    );
}

#[test]
fn oversized_message_gets_an_error_and_is_disconnected() {
    let s = start();
    let mut other = Raw::negotiated(&s.path);
    let mut r = Raw::negotiated(&s.path);
    let mut msg = br#"{"execute":"echo","arguments":{"data":""#.to_vec();
    msg.extend(std::iter::repeat_n(b'x', 65 << 20));
    msg.extend_from_slice(br#""}}{"execute":"echo","id":"after"}"#);
    let mut w = r.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // The server closes the connection part-way: errors are expected.
        let _ = w.write_all(&msg);
    });
    assert_eq!(
        r.line().unwrap(),
        err("GenericError", "JSON token size limit exceeded")
    );
    assert!(r.closed_within(Duration::from_secs(20)));
    writer.join().unwrap();
    // The server and its other clients are unaffected.
    assert_eq!(
        other.ask(r#"{"execute":"echo","arguments":{"a":1}}"#),
        r#"{"return": {"a": 1}}"#
    );
}

#[test]
fn too_many_tokens_gets_an_error_and_is_disconnected() {
    let s = start();
    let mut other = Raw::negotiated(&s.path);
    let mut r = Raw::negotiated(&s.path);
    let mut msg = b"[".to_vec();
    msg.extend(b"1,".repeat(2 << 20));
    msg.extend_from_slice(b"1]");
    let mut w = r.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&msg);
    });
    assert_eq!(
        r.line().unwrap(),
        err("GenericError", "JSON token count limit exceeded")
    );
    assert!(r.closed_within(Duration::from_secs(20)));
    writer.join().unwrap();
    assert_eq!(other.ask(r#"{"execute":"echo"}"#), r#"{"return": {}}"#);
}

#[test]
fn message_just_under_the_limit_is_accepted() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    let mut msg = br#"{"execute":"query-named-block-nodes","arguments":{"big":""#.to_vec();
    msg.extend(std::iter::repeat_n(b'x', (64 << 20) - 200));
    msg.extend_from_slice(br#""}}"#);
    let mut w = r.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&msg).unwrap());
    assert_eq!(
        r.line().unwrap(),
        err("GenericError", "Parameter 'big' is unexpected")
    );
    writer.join().unwrap();
}

#[test]
fn deep_nesting_is_answered_like_qemu() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    for (open, close, want) in [
        ("[", "]", (97usize, 1usize, 99425usize)),
        (r#"{"a":"#, "}", (97, 97, 99523)),
    ] {
        let mut msg = open.repeat(100_000);
        msg.push_str(&close.repeat(100_000));
        msg.push_str(r#"{"execute":"echo","id":"after"}"#);
        let mut w = r.stream.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(msg.as_bytes()).unwrap());
        let (mut depth, mut not_object, mut expecting) = (0, 0, 0);
        loop {
            let l = r.line().unwrap();
            if l == err("GenericError", "JSON nesting depth limit exceeded") {
                depth += 1;
            } else if l == err("GenericError", "QMP input must be a JSON object") {
                not_object += 1;
            } else if l == err("GenericError", "JSON parse error, expecting value") {
                expecting += 1;
            } else {
                assert_eq!(l, r#"{"return": {}, "id": "after"}"#);
                break;
            }
        }
        writer.join().unwrap();
        // The counts qemu-storage-daemon 10.0.2 produces for this input.
        assert_eq!((depth, not_object, expecting), want, "{open}");
    }
}

#[test]
fn idle_connections_do_not_block_a_working_one() {
    let s = start_with(ServerConfig {
        max_clients: 128,
        ..Default::default()
    });
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut c = UnixStream::connect(&s.path).unwrap();
        if i % 2 == 0 {
            // Half of them stall in the middle of a request.
            c.write_all(br#"{"execute":"echo","argu"#).unwrap();
        }
        idle.push(c);
    }
    let t = Instant::now();
    let mut r = Raw::negotiated(&s.path);
    for i in 0..20 {
        assert_eq!(
            r.ask(&format!(r#"{{"execute":"echo","id":{i}}}"#)),
            format!(r#"{{"return": {{}}, "id": {i}}}"#)
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(s.handle.client_count(), 101);
    drop(idle);
    let t = Instant::now();
    while s.handle.client_count() > 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "idle clients not reaped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn client_limit() {
    let s = start_with(ServerConfig {
        max_clients: 2,
        ..Default::default()
    });
    let _a = Raw::negotiated(&s.path);
    let _b = Raw::negotiated(&s.path);
    let mut c = Raw::connect(&s.path);
    assert_eq!(
        c.line().unwrap(),
        err("GenericError", "Too many QMP connections (limit 2)")
    );
    assert!(c.closed_within(Duration::from_secs(5)));
    drop(_a);
    let t = Instant::now();
    while s.handle.client_count() > 1 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    let _d = Raw::negotiated(&s.path);
}

#[test]
fn commands_of_different_clients_run_concurrently() {
    let s = start();
    let mut slow = Raw::negotiated(&s.path);
    let mut fast = Raw::negotiated(&s.path);
    slow.send(br#"{"execute":"sleep","arguments":{"ms":1500}}"#);
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    assert_eq!(fast.ask(r#"{"execute":"echo"}"#), r#"{"return": {}}"#);
    assert!(t.elapsed() < Duration::from_millis(1000));
    assert_eq!(slow.line().unwrap(), r#"{"return": {}}"#);
}

#[test]
fn a_client_that_never_reads_does_not_block_others() {
    let s = start_with(ServerConfig {
        max_queued_output: 1 << 20,
        ..Default::default()
    });
    let mut deaf = Raw::negotiated(&s.path);
    let mut listener = Raw::negotiated(&s.path);
    // 64 replies of 256 KiB: far more than the socket buffer plus the queue.
    let mut w = deaf.stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        for _ in 0..64 {
            if w.write_all(br#"{"execute":"big","arguments":{"size":262144}}"#)
                .is_err()
            {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut r = Raw::negotiated(&s.path);
    let t = Instant::now();
    for i in 0..50 {
        assert_eq!(
            r.ask(&format!(r#"{{"execute":"echo","id":{i}}}"#)),
            format!(r#"{{"return": {{}}, "id": {i}}}"#)
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    // Events never wait for the deaf client: it is disconnected instead.
    let t = Instant::now();
    let reader = std::thread::spawn(move || {
        for i in 0..200 {
            let e = listener.json();
            assert_eq!(e["event"], "TICK");
            assert_eq!(e["data"]["i"], i);
        }
    });
    let pad = "p".repeat(8192);
    for i in 0..200 {
        s.handle.emit("TICK", json!({"i": i, "pad": pad}));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(t.elapsed() < Duration::from_secs(2), "emit blocked");
    reader.join().unwrap();
    let t = Instant::now();
    while s.handle.client_count() > 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "deaf client still connected"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(deaf.closed_within(Duration::from_secs(20)));
    flood.join().unwrap();
}

#[test]
fn events() {
    let s = start();
    let (mut fresh, _) = Raw::open(&s.path);
    let mut a = Raw::negotiated(&s.path);
    let mut b = Raw::negotiated(&s.path);
    s.handle
        .emit("BLOCK_JOB_READY", json!({"device": "d", "len": 5}));
    s.handle.emit("STOP", Value::Null);
    for c in [&mut a, &mut b] {
        let line = c.line().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        assert!(
            line.ends_with(r#", "event": "BLOCK_JOB_READY", "data": {"device": "d", "len": 5}}"#),
            "{line}"
        );
        assert!(line.starts_with(r#"{"timestamp": {"seconds": "#));
        let stop = c.json();
        assert_eq!(stop["event"], "STOP");
        assert!(stop.get("data").is_none());
    }
    // Emitted by a handler through its Emitter: comes before the reply.
    a.send(br#"{"execute":"emit","arguments":{"event":"FROM_HANDLER"},"id":1}"#);
    let e = a.json();
    assert_eq!(e["event"], "FROM_HANDLER");
    assert_eq!(e["data"], json!({"from": "handler"}));
    assert_eq!(a.line().unwrap(), r#"{"return": {}, "id": 1}"#);
    assert_eq!(b.json()["event"], "FROM_HANDLER");
    // Not negotiated: no events.
    assert_eq!(fresh.line_within(Duration::from_millis(300)), None);
}

#[test]
fn stop_closes_everything() {
    let s = start();
    let mut a = Raw::negotiated(&s.path);
    let (mut b, _) = Raw::open(&s.path);
    let mut half = UnixStream::connect(&s.path).unwrap();
    half.write_all(br#"{"execute":"#).unwrap();
    let mut busy = Raw::negotiated(&s.path);
    busy.send(br#"{"execute":"sleep","arguments":{"ms":300}}"#);
    std::thread::sleep(Duration::from_millis(50));
    let h = s.handle.clone();
    within(Duration::from_secs(3), move || h.stop());
    assert!(s.handle.is_stopped());
    assert!(!s.path.exists(), "socket file removed");
    assert!(a.closed_within(Duration::from_secs(1)));
    assert!(b.closed_within(Duration::from_secs(1)));
    // The running command finished and its reply was flushed before closing.
    assert_eq!(busy.line().as_deref(), Some(r#"{"return": {}}"#));
    assert!(busy.closed_within(Duration::from_secs(1)));
    assert_eq!(s.handle.client_count(), 0);
    s.handle.emit("AFTER", json!({}));
    s.handle.stop();
    s.handle.wait();
    assert!(UnixStream::connect(&s.path).is_err());
}

#[test]
fn stop_does_not_hang_on_a_client_that_never_reads() {
    let s = start_with(ServerConfig {
        max_queued_output: 1 << 20,
        drain_timeout: Duration::from_millis(500),
        ..Default::default()
    });
    let deaf = Raw::negotiated(&s.path);
    let mut w = deaf.stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        for _ in 0..64 {
            if w.write_all(br#"{"execute":"big","arguments":{"size":262144}}"#)
                .is_err()
            {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let h = s.handle.clone();
    within(Duration::from_secs(3), move || h.stop());
    flood.join().unwrap();
}

#[test]
fn quit_replies_then_stops_the_server() {
    let s = start();
    let mut other = Raw::negotiated(&s.path);
    let mut r = Raw::negotiated(&s.path);
    assert_eq!(
        r.ask(r#"{"execute":"quit","id":"q"}"#),
        r#"{"return": {}, "id": "q"}"#
    );
    assert!(r.closed_within(Duration::from_secs(5)));
    assert!(other.closed_within(Duration::from_secs(5)));
    let h = s.handle.clone();
    within(Duration::from_secs(5), move || h.wait());
    assert!(s.handle.is_stopped());
    assert!(!s.path.exists());
}

#[test]
fn requests_before_the_client_shuts_down_its_side_are_answered() {
    let s = start();
    let mut r = Raw::negotiated(&s.path);
    r.send(br#"{"execute":"echo","id":1}{"execute":"echo","id":2}"#);
    r.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(r.line().unwrap(), r#"{"return": {}, "id": 1}"#);
    assert_eq!(r.line().unwrap(), r#"{"return": {}, "id": 2}"#);
    assert!(r.closed_within(Duration::from_secs(5)));
}

#[test]
fn socket_file_handling() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().unwrap();
    // Mode 0600, whatever the umask.
    let path = dir.path().join("a.sock");
    let h = Server::new(common::Fake::default()).bind(&path).unwrap();
    let md = std::fs::symlink_metadata(&path).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    // No private directory left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("a.sock")]);
    // A live socket is not taken over.
    match Server::new(common::Fake::default()).bind(&path) {
        Err(ServerError::InUse(_)) => {}
        other => panic!("{other:?}"),
    }
    drop(h);
    assert!(!path.exists());

    // A regular file is refused and left alone.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    match Server::new(common::Fake::default()).bind(&file) {
        Err(ServerError::NotASocket(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // So is a symlink, even to a socket.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(matches!(
        Server::new(common::Fake::default()).bind(&link),
        Err(ServerError::NotASocket(_))
    ));

    // A stale socket (nobody listening) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let h = Server::new(common::Fake::default()).bind(&stale).unwrap();
    let mut c = Client::connect(&stale).unwrap();
    assert_eq!(c.execute("echo", json!({"a": 1})).unwrap(), json!({"a": 1}));
    drop(h);

    // A long directory name: the private directory's socket path would not
    // fit into sun_path.
    let long = dir
        .path()
        .join("d".repeat(100 - dir.path().as_os_str().len()));
    std::fs::create_dir(&long).unwrap();
    let p = long.join("s");
    assert!(p.as_os_str().len() <= 107);
    let h = Server::new(common::Fake::default()).bind(&p).unwrap();
    assert_eq!(
        std::fs::symlink_metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    Client::connect(&p).unwrap();
    drop(h);
}

#[test]
fn client_helper() {
    let s = start();
    let mut c = Client::connect(&s.path).unwrap();
    assert_eq!(c.version().unwrap().major, 10);
    assert_eq!(c.greeting()["QMP"]["capabilities"], json!([]));
    assert_eq!(
        c.execute("echo", json!({"x": [1, 2]})).unwrap(),
        json!({"x": [1, 2]})
    );
    match c.execute("not-found", Value::Null) {
        Err(ClientError::Qmp(e)) => {
            assert_eq!(e.class, ErrorClass::DeviceNotFound);
            assert_eq!(e.desc, "Device 'x' not found");
        }
        other => panic!("{other:?}"),
    }
    s.handle.emit("E1", json!({}));
    // Events arriving while waiting for a reply are kept.
    assert_eq!(
        c.execute("query-named-block-nodes", Value::Null).unwrap(),
        json!([])
    );
    assert_eq!(c.next_event().unwrap()["event"], "E1");
    s.handle.emit("E2", json!({}));
    assert_eq!(c.next_event().unwrap()["event"], "E2");
    assert!(c.take_events().is_empty());
    assert!(matches!(
        c.execute("echo", json!(1)),
        Err(ClientError::Protocol(_))
    ));
    // Deeper than serde_json's default recursion limit (128): the client
    // parses replies with the crate's own parser.
    let mut deep = json!(1);
    for _ in 0..1000 {
        deep = json!([deep]);
    }
    let args = json!({ "d": deep });
    assert_eq!(c.execute("echo", args.clone()).unwrap(), args);
    // A handler result of null is sent as {}.
    assert_eq!(c.execute("null", Value::Null).unwrap(), json!({}));
    s.handle.stop();
    assert!(matches!(
        c.execute("echo", Value::Null),
        Err(ClientError::Closed | ClientError::Io(_))
    ));
}
