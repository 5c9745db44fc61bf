//! Error type of the end-to-end harness.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while preparing or driving an end-to-end test.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    /// A child process could not be started.
    #[error("cannot start `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A child process did not finish in time and was killed.
    #[error("`{cmd}` did not finish within {timeout:?} (killed); stderr: {stderr}")]
    Timeout {
        /// The command line.
        cmd: String,
        /// The limit that was exceeded.
        timeout: Duration,
        /// What the process wrote to stderr before it was killed.
        stderr: String,
    },
    /// A command exited unsuccessfully.
    #[error("`{cmd}` failed ({status})\nstdout: {stdout}\nstderr: {stderr}")]
    CommandFailed {
        /// The command line.
        cmd: String,
        /// Exit status as text.
        status: String,
        /// Captured stdout.
        stdout: String,
        /// Captured stderr.
        stderr: String,
    },
    /// A file system operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A required program is not installed.
    #[error("required tool `{0}` was not found in PATH")]
    ToolMissing(String),
    /// The guest kernel / initramfs / QEMU cache could not be built or read.
    #[error("guest environment unavailable: {0}")]
    GuestEnv(String),
    /// A server process did not create its socket in time.
    #[error("socket {path} did not appear within {timeout:?}: {detail}")]
    SocketTimeout {
        /// The expected socket path.
        path: PathBuf,
        /// The limit that was exceeded.
        timeout: Duration,
        /// Why (e.g. the server exited, with its log).
        detail: String,
    },
    /// Our daemon's binary could not be located or built.
    #[error("vhost-device-blk-bitmap binary unavailable: {0}")]
    Daemon(String),
    /// A tool printed something the harness cannot interpret.
    #[error("unexpected output of `{cmd}`: {detail}")]
    BadOutput {
        /// The command line.
        cmd: String,
        /// What was wrong.
        detail: String,
    },
    /// A guest test script or request is invalid.
    #[error("invalid test request: {0}")]
    InvalidRequest(String),
    /// An end-to-end check found a difference from the expected result.
    #[error("check failed: {0}")]
    Check(String),
    /// The guest did not report success.
    #[error("guest test failed: {reason}\n--- serial log ---\n{serial_log}")]
    GuestFailed {
        /// Exit status, timeout or missing marker.
        reason: String,
        /// Everything the guest printed on its serial console.
        serial_log: String,
    },
}

/// Shorthand result type of the harness.
pub type Result<T> = std::result::Result<T, E2eError>;
