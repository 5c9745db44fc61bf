//! Error type of the crate.

/// Errors reported by [`DirtyBitmap`](crate::DirtyBitmap) operations.
///
/// Every variant carries the numbers a user needs to understand what was
/// wrong with the request.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The granularity is not a power of two in
    /// [`MIN_GRANULARITY`](crate::MIN_GRANULARITY)..=[`MAX_GRANULARITY`](crate::MAX_GRANULARITY).
    #[error(
        "invalid bitmap granularity {granularity} bytes: must be a power of two \
         between {min} and {max} bytes",
        min = crate::MIN_GRANULARITY,
        max = crate::MAX_GRANULARITY
    )]
    InvalidGranularity {
        /// The rejected granularity in bytes.
        granularity: u64,
    },

    /// The bitmap for this disk size and granularity would exceed
    /// [`MAX_SERIALIZED_BYTES`](crate::MAX_SERIALIZED_BYTES).
    #[error(
        "a bitmap for a {size}-byte disk at {granularity}-byte granularity needs \
         {needed} bytes, more than the limit of {limit} bytes; use a larger granularity"
    )]
    TooLarge {
        /// Virtual disk size in bytes.
        size: u64,
        /// Requested granularity in bytes.
        granularity: u64,
        /// Serialized bitmap bytes this combination needs.
        needed: u64,
        /// The limit that was exceeded.
        limit: u64,
    },

    /// Allocating the bitmap words failed.
    #[error("cannot allocate {bytes} bytes for a dirty bitmap")]
    AllocationFailed {
        /// Number of bytes that could not be allocated.
        bytes: u64,
    },

    /// Two bitmaps that must describe the same disk have different sizes.
    #[error(
        "bitmap size mismatch: this bitmap covers {ours} bytes, the other covers {theirs} bytes"
    )]
    SizeMismatch {
        /// Size covered by the bitmap being modified.
        ours: u64,
        /// Size covered by the other bitmap.
        theirs: u64,
    },

    /// A serialized byte range starts past the end of the serialized bitmap.
    #[error(
        "serialized bitmap range at byte {byte_offset} (length {len}) starts past the end \
         of the {serialized_len}-byte serialized bitmap"
    )]
    OutOfRange {
        /// Requested starting byte in the serialized bitmap.
        byte_offset: u64,
        /// Requested length in bytes.
        len: u64,
        /// Length of the serialized bitmap in bytes.
        serialized_len: u64,
    },
}
