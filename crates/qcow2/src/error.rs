//! Errors of the image engine.

use std::io;

/// Everything that can go wrong opening, reading, writing or checking an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the storage, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a qcow2 image or a header field is invalid.
    #[error("Image is not in qcow2 format")]
    NotQcow2,
    /// A header field or table violates the format or QEMU's limits.
    #[error("{0}")]
    InvalidImage(String),
    /// The image uses a feature we do not implement.
    #[error("{0}")]
    Unsupported(String),
    /// Metadata found to be inconsistent while serving I/O; the image is marked corrupt.
    #[error("qcow2: Marking image as corrupt: {0}; further corruption events will be suppressed")]
    Corrupt(String),
    /// A guest request outside the virtual disk.
    #[error("request [{offset}, +{len}) is outside the disk of {size} bytes")]
    OutOfRange {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("the image is opened read-only")]
    ReadOnly,
    /// A metadata write would overwrite other metadata.
    #[error("metadata write at {offset:#x} (+{len}) would overlap {what}")]
    Overlap {
        /// Host offset of the write.
        offset: u64,
        /// Its length.
        len: u64,
        /// The structure it would hit.
        what: &'static str,
    },
    /// The image cannot grow any further.
    #[error("no space: {0}")]
    NoSpace(String),
}

impl Error {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The closest errno, for callers that must answer in errno terms.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::ReadOnly => libc::EROFS,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Unsupported(_) => libc::ENOTSUP,
            _ => libc::EIO,
        }
    }
}

/// Result with the engine's error.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
