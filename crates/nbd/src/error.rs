//! Errors of the server API.

use std::io;

/// What can go wrong when managing exports or serving a client.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// [`crate::Server::add_export`] with a name already taken.
    #[error("NBD export '{0}' already exists")]
    ExportExists(String),
    /// No export of that name.
    #[error("Export '{0}' is not found")]
    NoSuchExport(String),
    /// [`crate::RemoveMode::Safe`] removal while clients use the export.
    #[error("export '{0}' still in use")]
    InUse(String),
    /// The export name is longer than the protocol's 4096 bytes or contains a NUL.
    #[error("invalid NBD export name '{0}': at most 4096 bytes and no NUL")]
    InvalidName(String),
    /// The server was shut down.
    #[error("the NBD server is shut down")]
    ShutDown,
    /// The client broke the protocol; the connection was closed.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// I/O error on the connection or the listener.
    #[error(transparent)]
    Io(#[from] io::Error),
}
