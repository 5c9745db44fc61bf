//! Shared by the integration tests: a fake command handler and a raw socket
//! client that sees exactly what goes over the wire.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use qmp::{
    ArgsExt, CommandHandler, Emitter, QmpError, Server, ServerConfig, ServerHandle, Version,
};
use serde_json::{json, Map, Value};

/// A handler with a few commands, some shaped like QEMU's so that their
/// argument errors can be compared with qemu-storage-daemon's.
#[derive(Default)]
pub struct Fake {
    pub emitter: OnceLock<Emitter>,
    pub bitmaps: Mutex<Vec<String>>,
}

impl CommandHandler for Fake {
    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            // Same schema as QEMU's, to compare argument errors.
            "block-dirty-bitmap-add" => {
                let node = args.req_str("node")?;
                let bname = args.req_str("name")?;
                let _granularity = args.opt_u32("granularity")?;
                let _persistent = args.opt_bool("persistent")?;
                let _disabled = args.opt_bool("disabled")?;
                args.reject_unexpected(&["node", "name", "granularity", "persistent", "disabled"])?;
                if node != "disk0" {
                    return Err(QmpError::generic(format!(
                        "Cannot find device='{node}' nor node-name='{node}'"
                    )));
                }
                let mut bitmaps = self.bitmaps.lock().unwrap();
                if bitmaps.iter().any(|b| b == bname) {
                    return Err(QmpError::generic(format!("Bitmap already exists: {bname}")));
                }
                bitmaps.push(bname.to_string());
                Ok(json!({}))
            }
            "query-named-block-nodes" => {
                let _flat = args.opt_bool("flat")?;
                args.reject_unexpected(&["flat"])?;
                Ok(json!([]))
            }
            "echo" => Ok(Value::Object(args)),
            "big" => {
                let size = args.req_u64("size")?;
                args.reject_unexpected(&["size"])?;
                Ok(json!("x".repeat(size as usize)))
            }
            "sleep" => {
                let ms = args.req_u64("ms")?;
                std::thread::sleep(Duration::from_millis(ms));
                Ok(json!({}))
            }
            "emit" => {
                let event = args.req_str("event")?;
                if let Some(e) = self.emitter.get() {
                    e.emit(event, json!({"from": "handler"}));
                }
                Ok(json!({}))
            }
            "not-found" => Err(QmpError::device_not_found("Device 'x' not found")),
            "quit" => Ok(json!({})),
            "null" => Ok(Value::Null),
            other => Err(QmpError::generic(format!("fake handler got {other}"))),
        }
    }

    fn commands(&self) -> Vec<String> {
        [
            "block-dirty-bitmap-add",
            "query-named-block-nodes",
            "echo",
            "big",
            "sleep",
            "emit",
            "not-found",
            "quit",
            "null",
        ]
        .map(String::from)
        .to_vec()
    }

    fn version(&self) -> Version {
        Version::new(10, 0, 2, "qmp-crate-test")
    }

    fn stop_after(&self, name: &str) -> bool {
        name == "quit"
    }
}

/// A running fake server in a private directory.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub handle: Arc<ServerHandle>,
    pub fake: Arc<Fake>,
}

pub fn start() -> TestServer {
    start_with(ServerConfig::default())
}

pub fn start_with(config: ServerConfig) -> TestServer {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let fake = Arc::new(Fake::default());
    let handle = Server::from_arc(fake.clone())
        .config(config)
        .bind(&path)
        .unwrap();
    let _ = fake.emitter.set(handle.emitter());
    let handle = Arc::new(handle);
    TestServer {
        dir,
        path,
        handle,
        fake,
    }
}

/// A raw connection: send bytes, read `\n`-terminated lines.
pub struct Raw {
    pub stream: UnixStream,
    buf: Vec<u8>,
    pub eof: bool,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Connects and reads the greeting.
    pub fn open(path: &Path) -> (Raw, String) {
        let mut r = Raw::connect(path);
        let g = r.line().expect("greeting");
        (r, g)
    }

    /// Connects, reads the greeting and negotiates.
    pub fn negotiated(path: &Path) -> Raw {
        let (mut r, _) = Raw::open(path);
        r.send(br#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(r.line().as_deref(), Some(r#"{"return": {}}"#));
        r
    }

    pub fn send(&mut self, data: &[u8]) {
        self.stream.write_all(data).unwrap();
    }

    /// The next line without its `\r\n`, or `None` on EOF; panics after 20 s.
    pub fn line(&mut self) -> Option<String> {
        self.line_within(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no reply within 20 s"))
    }

    /// `Some(None)` on EOF, `None` on timeout.
    pub fn line_within(&mut self, timeout: Duration) -> Option<Option<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                assert_eq!(line.pop(), Some(b'\r'), "QEMU ends lines with \\r\\n");
                return Some(Some(String::from_utf8(line).unwrap()));
            }
            if self.eof {
                return Some(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => self.eof = true,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The next line parsed as JSON.
    pub fn json(&mut self) -> Value {
        let l = self.line().expect("a reply, not EOF");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}"))
    }

    /// Sends and returns the next reply line.
    pub fn ask(&mut self, data: &str) -> String {
        self.send(data.as_bytes());
        self.line().expect("reply")
    }

    /// True if the server closed the connection within `timeout` (lines still
    /// pending are skipped).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.line_within(deadline.saturating_duration_since(Instant::now())) {
                Some(None) => return true,
                Some(Some(_)) => continue,
                None => return false,
            }
        }
    }
}

pub fn err(class: &str, desc: &str) -> String {
    format!(
        "{{\"error\": {{\"class\": \"{class}\", \"desc\": {}}}}}",
        qmp::json::to_json(&Value::String(desc.into()))
    )
}

pub fn err_id(class: &str, desc: &str, id: &str) -> String {
    format!(
        "{{\"error\": {{\"class\": \"{class}\", \"desc\": {}}}, \"id\": {id}}}",
        qmp::json::to_json(&Value::String(desc.into()))
    )
}

/// Whether tests that need external tools must fail (rather than skip) when
/// a tool is missing.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips (returns false) or, under CI=true, fails.
pub fn require(ok: bool, what: &str) -> bool {
    if !ok {
        if ci() {
            panic!("CI=true and {what} is missing");
        }
        eprintln!("SKIPPED: {what} is missing (set CI=true to make this an error)");
    }
    ok
}
