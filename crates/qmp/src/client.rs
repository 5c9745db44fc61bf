//! A small synchronous QMP client, e.g. for a `ctl` subcommand.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::ops::ControlFlow;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::json::{JsonStreamer, Message};
use crate::{ClientError, QmpError, Version};

/// A connected, negotiated QMP client.
///
/// Works with this crate's server and with QEMU. Requests carry numeric ids
/// and replies are matched by id; events arriving meanwhile are kept for
/// [`next_event`](Self::next_event) / [`take_events`](Self::take_events).
/// Replies are read with the crate's QEMU-dialect streaming parser, so they
/// need not be newline-terminated and may nest as deep as QEMU allows (1024).
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    parser: JsonStreamer,
    incoming: VecDeque<Message>,
    greeting: Value,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Client {
    /// Connects to the socket at `path`, reads the greeting and negotiates
    /// capabilities (enabling none).
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        let mut client = Client {
            stream,
            parser: JsonStreamer::new(),
            incoming: VecDeque::new(),
            greeting: Value::Null,
            next_id: 0,
            events: VecDeque::new(),
        };
        let greeting = client.read_message()?;
        if !greeting.get("QMP").is_some_and(Value::is_object) {
            return Err(ClientError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        client.greeting = greeting;
        client.execute("qmp_capabilities", Value::Null)?;
        Ok(client)
    }

    /// Sets a timeout for each read (`None`: wait forever, the default).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)?;
        Ok(())
    }

    /// The server's greeting, `{"QMP": {"version": ..., "capabilities": [...]}}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The version from the greeting.
    pub fn version(&self) -> Option<Version> {
        Version::from_json(&self.greeting["QMP"]["version"])
    }

    /// Runs a command. `args` is an object, or `null` for none. A QMP error
    /// reply is [`ClientError::Qmp`].
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = match args {
            Value::Null => json!({"execute": name, "id": id}),
            Value::Object(_) => json!({"execute": name, "arguments": args, "id": id}),
            other => {
                return Err(ClientError::Protocol(format!(
                    "arguments must be an object, not {other}"
                )))
            }
        };
        let mut line =
            serde_json::to_vec(&req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.stream.write_all(&line)?;
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                self.events.push_back(msg);
                continue;
            }
            if msg.get("id") != Some(&json!(id)) {
                log::warn!("QMP: ignoring a reply that is not ours: {msg}");
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error").and_then(QmpError::from_json) {
                return Err(ClientError::Qmp(err));
            }
            return Err(ClientError::Protocol(format!("unexpected reply {msg}")));
        }
    }

    /// The next event: a queued one, or else waits for one.
    pub fn next_event(&mut self) -> Result<Value, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                return Ok(msg);
            }
            log::warn!("QMP: ignoring an unexpected message: {msg}");
        }
    }

    /// The events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    fn read_message(&mut self) -> Result<Value, ClientError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.incoming.pop_front() {
                Some(Message::Value(v)) => return Ok(v),
                Some(Message::Error(e) | Message::Fatal(e)) => {
                    return Err(ClientError::Protocol(format!("bad JSON from server: {e}")))
                }
                None => {}
            }
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let incoming = &mut self.incoming;
            let _ = self.parser.feed(&buf[..n], &mut |m| {
                incoming.push_back(m);
                ControlFlow::Continue(())
            });
        }
    }
}
