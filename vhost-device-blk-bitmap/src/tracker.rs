//! Disk write tracking: the hook through which persistent dirty bitmaps learn which
//! byte ranges of the virtual disk the guest changed.

use std::fmt;

/// Error reported by a [`WriteTracker`] lifecycle call.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TrackerError(pub String);

/// Receives every guest write (OUT, WRITE_ZEROES, DISCARD) and the daemon's lifecycle events.
///
/// `mark` is called on the request path from several worker threads at once and must not
/// block; the lifecycle calls happen on the daemon's main thread while no request runs.
pub trait WriteTracker: Send + Sync + fmt::Debug {
    /// Records that `[offset, offset + len)` of the virtual disk (bytes) may have changed.
    /// Called after the write was attempted and before the guest sees its completion,
    /// whatever the I/O result.
    fn mark(&self, offset: u64, len: u64);
    /// A frontend connected (e.g. set the bitmaps in-use). An error refuses the connection.
    fn on_frontend_connected(&self) -> Result<(), TrackerError>;
    /// The frontend disconnected and every request it sent has completed (e.g. store bitmaps).
    fn on_frontend_disconnected(&self) -> Result<(), TrackerError>;
    /// The daemon is exiting after a clean stop; the image was flushed.
    fn on_shutdown(&self) -> Result<(), TrackerError>;
}

/// A tracker that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopTracker;

impl WriteTracker for NoopTracker {
    fn mark(&self, _offset: u64, _len: u64) {}
    fn on_frontend_connected(&self) -> Result<(), TrackerError> {
        Ok(())
    }
    fn on_frontend_disconnected(&self) -> Result<(), TrackerError> {
        Ok(())
    }
    fn on_shutdown(&self) -> Result<(), TrackerError> {
        Ok(())
    }
}
