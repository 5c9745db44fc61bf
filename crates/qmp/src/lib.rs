//! A QMP (QEMU Machine Protocol) server and client, wire-compatible with
//! QEMU 10.0.2.
//!
//! The crate knows nothing of block devices: the application implements
//! [`CommandHandler`] and the [`Server`] does the rest — the unix socket, the
//! greeting, capabilities negotiation, QEMU's JSON dialect and error texts,
//! `query-commands`/`query-version`, ids, events and backpressure. [`Client`]
//! is a small synchronous client for command-line tools.
//!
//! ```
//! use qmp::{ArgsExt, Client, CommandHandler, QmpError, Server, Version};
//! use serde_json::{json, Map, Value};
//!
//! struct Hello;
//!
//! impl CommandHandler for Hello {
//!     fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
//!         match name {
//!             "hello" => {
//!                 let who = args.req_str("who")?;
//!                 args.reject_unexpected(&["who"])?;
//!                 Ok(json!({"greeting": format!("hello, {who}")}))
//!             }
//!             _ => unreachable!("only the commands listed are dispatched"),
//!         }
//!     }
//!     fn commands(&self) -> Vec<String> {
//!         vec!["hello".into()]
//!     }
//!     fn version(&self) -> Version {
//!         Version::new(10, 0, 2, "example")
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("qmp.sock");
//! let server = Server::new(Hello).bind(&path)?;
//! let mut client = Client::connect(&path)?;
//! assert_eq!(client.execute("hello", json!({"who": "you"}))?, json!({"greeting": "hello, you"}));
//! let err = client.execute("hello", json!({})).unwrap_err();
//! assert_eq!(err.to_string(), "GenericError: Parameter 'who' is missing");
//! server.emit("SOMETHING_HAPPENED", json!({"n": 1}));
//! assert_eq!(client.next_event()?["event"], "SOMETHING_HAPPENED");
//! server.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Wire details that differ from QEMU are listed in the docs of [`mod@json`] and
//! [`Server`].

#![deny(missing_docs)]

mod args;
mod client;
mod dispatch;
mod error;
pub mod json;
mod outbox;
mod server;
mod socket;

use serde_json::{json, Map, Value};

pub use args::{ArgItem, ArgList, Args, ArgsExt};
pub use client::Client;
pub use error::{ClientError, ErrorClass, QmpError, ServerError};
pub use server::{Emitter, Server, ServerConfig, ServerHandle};
pub use socket::{bind as bind_private_socket, remove_if_ours as remove_socket_if_ours, FileId};

/// The version a server announces in its greeting and in `query-version`
/// (QEMU's `VersionInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// `qemu.major`.
    pub major: u64,
    /// `qemu.minor`.
    pub minor: u64,
    /// `qemu.micro`.
    pub micro: u64,
    /// `package`: free text naming the build.
    pub package: String,
}

impl Version {
    /// A version.
    pub fn new(major: u64, minor: u64, micro: u64, package: impl Into<String>) -> Self {
        Version {
            major,
            minor,
            micro,
            package: package.into(),
        }
    }

    /// `{"qemu": {"micro": .., "minor": .., "major": ..}, "package": ..}`.
    pub fn to_json(&self) -> Value {
        json!({
            "qemu": {"micro": self.micro, "minor": self.minor, "major": self.major},
            "package": self.package,
        })
    }

    /// Reads a `VersionInfo` object.
    pub fn from_json(v: &Value) -> Option<Self> {
        let q = v.get("qemu")?;
        Some(Version {
            major: q.get("major")?.as_u64()?,
            minor: q.get("minor")?.as_u64()?,
            micro: q.get("micro")?.as_u64()?,
            package: v.get("package")?.as_str()?.to_string(),
        })
    }
}

/// The application side of a QMP server.
///
/// The server calls [`execute`](Self::execute) only for names returned by
/// [`commands`](Self::commands) (read once, when the server starts) and only
/// after the client negotiated capabilities. Calls come from one thread per
/// client connection, so commands of different clients may run concurrently;
/// each client's commands run one at a time, in order.
///
/// The server implements `qmp_capabilities`, `query-commands` and
/// `query-version` itself; a handler listing one of those names is not asked.
pub trait CommandHandler: Send + Sync + 'static {
    /// Runs command `name` with its `arguments` (an empty map when the request
    /// had none). The result goes to the client as `{"return": ...}` (`null`
    /// as `{}`, QEMU's reply for commands without a result); an error as
    /// `{"error": ...}`. Argument checking is the handler's: see [`ArgsExt`].
    /// A panic is caught and reported as a `GenericError`.
    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError>;

    /// The names of the commands this handler implements.
    fn commands(&self) -> Vec<String>;

    /// The version to announce.
    fn version(&self) -> Version;

    /// Whether the server should stop after a successful `name` has been
    /// answered (e.g. `quit`): the reply is sent, then the server stops as by
    /// [`ServerHandle::stop`] and [`ServerHandle::wait`] returns.
    fn stop_after(&self, name: &str) -> bool {
        let _ = name;
        false
    }
}
