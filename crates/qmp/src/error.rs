//! Error types: the QMP error a command returns, and the errors of the server
//! and client plumbing.

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde_json::{json, Value};

/// The `class` member of a QMP error (QEMU's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Any error without a more specific class (nearly all of them).
    GenericError,
    /// The command does not exist (or is not available yet).
    CommandNotFound,
    /// A device exists but has no active backend.
    DeviceNotActive,
    /// A device was not found.
    DeviceNotFound,
    /// The KVM capability needed is missing.
    KVMMissingCap,
}

impl ErrorClass {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }

    /// Parses a wire name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
///
/// The constructors for argument problems produce QEMU 10.0.2's exact texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    /// A `KVMMissingCap` error.
    pub fn kvm_missing_cap(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::KVMMissingCap, desc)
    }

    /// `Parameter 'NAME' is missing`.
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// `Invalid parameter type for 'NAME', expected: TYPE` (TYPE is one of
    /// QEMU's `string`, `boolean`, `number`, `object`, `array`, ...).
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// `Parameter 'NAME' expects WHAT` (e.g. `uint64`, `uint32_t`, `integer`).
    pub fn invalid_parameter_value(name: &str, expected: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expected}"))
    }

    /// `Parameter 'NAME' is unexpected`.
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// `Parameter 'NAME' does not accept value 'VALUE'` (a bad enum value).
    pub fn invalid_enum_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }

    /// The `{"class": ..., "desc": ...}` object.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }

    /// Reads a `{"class": ..., "desc": ...}` object (an unknown class becomes
    /// `GenericError`).
    pub fn from_json(v: &Value) -> Option<Self> {
        let desc = v.get("desc")?.as_str()?;
        let class = v
            .get("class")
            .and_then(Value::as_str)
            .and_then(ErrorClass::from_name)
            .unwrap_or(ErrorClass::GenericError);
        Some(Self::new(class, desc))
    }
}

/// Why a [`Server`](crate::Server) could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The path exists and is not a unix socket; it is left alone.
    #[error("{0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// A server is accepting connections on the socket already.
    #[error("{0}: another server is listening on this socket")]
    InUse(PathBuf),
    /// The path has no file name.
    #[error("{0}: not a valid socket path")]
    BadPath(PathBuf),
    /// A system call failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

/// Why a [`Client`](crate::Client) call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{}: {}", .0.class, .0.desc)]
    Qmp(#[from] QmpError),
    /// Reading or writing the socket failed.
    #[error("QMP connection: {0}")]
    Io(#[from] io::Error),
    /// The server sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// The server closed the connection.
    #[error("QMP connection closed by the server")]
    Closed,
}
