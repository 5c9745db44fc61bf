//! Errors of the offline tool, worded like `qemu-img`'s.

use std::io;
use std::path::PathBuf;

use crate::lock::LockError;

/// Everything an offline subcommand can fail with (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The image file could not be opened (missing, permissions, …).
    #[error("Could not open '{}': {}", .path.display(), os_text(.source))]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// QEMU-compatible locks could not be taken (another process uses the image).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The file is not a qcow2 image, so it has no persistent bitmaps.
    #[error("'{}' is not a qcow2 image; persistent bitmaps need qcow2", .0.display())]
    NotQcow2(PathBuf),
    /// The qcow2 engine refused the image.
    #[error("Could not open '{}': {source}", .path.display())]
    Engine {
        /// The image path.
        path: PathBuf,
        /// The engine error.
        source: qcow2::Error,
    },
    /// `check`: the image cannot be opened the way QEMU would (its bitmap directory
    /// breaks a constraint); `qemu-img check` fails the same way.
    #[error("Could not open '{}': {source}", .path.display())]
    CheckOpen {
        /// The image path.
        path: PathBuf,
        /// Why QEMU would refuse the image.
        source: qcow2_bitmaps::Error,
    },
    /// The bitmaps of the image could not be loaded.
    #[error("Could not load the bitmaps of '{}': {source}", .path.display())]
    Load {
        /// The image path.
        path: PathBuf,
        /// The persistence error.
        source: qcow2_bitmaps::Error,
    },
    /// A bitmap operation failed (QEMU: "Operation clear on bitmap b0 failed: …").
    #[error("Operation {op} on bitmap {name} failed: {source}")]
    Op {
        /// Operation name as qemu-img words it (add, remove, clear, enable, disable, merge).
        op: &'static str,
        /// Target bitmap.
        name: String,
        /// Why.
        source: qcow2_bitmaps::Error,
    },
    /// A read-only bitmap query failed.
    #[error("{0}")]
    Query(qcow2_bitmaps::Error),
    /// Storing the bitmaps on close failed.
    #[error("{0}")]
    Store(qcow2_bitmaps::Error),
    /// Flushing the image on close failed.
    #[error("Failed to flush '{}': {source}", .path.display())]
    Flush {
        /// The image path.
        path: PathBuf,
        /// The engine error.
        source: qcow2::Error,
    },
    /// A command-line value is invalid.
    #[error("Invalid {what} '{value}': {reason}")]
    BadArg {
        /// Which option.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// Creating an image failed.
    #[error("{}: {source}", .path.display())]
    Create {
        /// The image path.
        path: PathBuf,
        /// The engine error.
        source: qcow2::Error,
    },
    /// Checking an image failed (exit code 1, as `qemu-img check`).
    #[error("Check of '{}' failed: {source}", .path.display())]
    Check {
        /// The image path.
        path: PathBuf,
        /// The engine error.
        source: qcow2::Error,
    },
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
    /// The control socket could not be reached or answered with an error.
    #[error("{0}")]
    Qmp(#[from] qmp::ClientError),
}

impl ToolError {
    /// QEMU's second line for this error, if it gives one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ToolError::Op { source, .. }
            | ToolError::Query(source)
            | ToolError::Store(source)
            | ToolError::Load { source, .. }
            | ToolError::CheckOpen { source, .. } => source.hint(),
            _ => None,
        }
    }
}

/// An OS error's text without Rust's " (os error N)" suffix, as C programs print it.
pub fn os_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
