//! Errors of the load generator.

use std::path::PathBuf;

/// Everything that can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The vhost-user connection or a message on it failed.
    #[error("vhost-user {step} on '{socket}': {source}")]
    VhostUser {
        /// The message or step that failed.
        step: &'static str,
        /// The server's socket.
        socket: PathBuf,
        /// The error from the vhost crate.
        source: vhost::Error,
    },
    /// The server lacks a feature the client needs.
    #[error("the server does not offer {0}")]
    MissingFeature(&'static str),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A job description or option is invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A request did not complete in time.
    #[error("no completion within {0} s (server stuck or gone)")]
    Timeout(u64),
}

/// Shorthand result type.
pub type Result<T> = std::result::Result<T, BenchError>;

/// Wraps the last OS error with a description.
pub fn os(what: impl Into<String>) -> BenchError {
    BenchError::Os {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}
