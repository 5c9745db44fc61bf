//! Disk write tracking: the hook through which persistent dirty bitmaps learn which
//! byte ranges of the virtual disk the guest changed.

use std::fmt;

/// Error reported by a [`WriteTracker`] lifecycle call: the tracker's own error, kept
/// whole (its `source()` chain included).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct TrackerError(pub Box<dyn std::error::Error + Send + Sync>);

/// Receives every guest write (OUT, WRITE_ZEROES, DISCARD) and the daemon's lifecycle events.
///
/// `mark` is called on the request path from several worker threads at once and must not
/// block; the lifecycle calls happen on the daemon's main thread while no request runs.
pub trait WriteTracker: Send + Sync + fmt::Debug {
    /// Records that `[offset, offset + len)` of the virtual disk (bytes) may change.
    /// Called before the write can reach the disk, whatever its result will be; returns
    /// the tracker's [generation](WriteTracker::generation) it was recorded in.
    fn mark(&self, offset: u64, len: u64) -> u64;
    /// Changes whenever the set of recording bitmaps changes; a write marked in an older
    /// generation is marked again when it completes (so a bitmap created while it was in
    /// flight has it too).
    fn generation(&self) -> u64 {
        0
    }
    /// The crash-consistency shadow writes must wait for (see
    /// [`qcow2_bitmaps::Shadow::check`]) before they may reach the disk, if any.
    fn shadow(&self) -> Option<std::sync::Arc<qcow2_bitmaps::Shadow>> {
        None
    }
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
    fn mark(&self, _offset: u64, _len: u64) -> u64 {
        0
    }
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
