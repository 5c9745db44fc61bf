//! Opening an image for the offline tool: QEMU-compatible locks first, then the qcow2
//! engine (which keeps the bitmaps autoclear bit), then optionally its bitmaps.

use std::path::Path;

use qcow2::{OpenOptions, Qcow2Image};
use qcow2_bitmaps::Bitmaps;

use super::error::ToolError;
use crate::disk::{probe_format, ImageFormat};
use crate::lock::{ImageLock, LockSpec};

/// An open qcow2 image and the locks that must outlive it.
pub struct Opened {
    /// The engine (declared before the lock: dropped, and so flushed, first).
    pub image: Qcow2Image,
    /// QEMU-compatible locks, released on drop.
    pub _lock: ImageLock,
}

/// Opens the qcow2 image at `path`: read-write with the locks of a writer (nobody else
/// may write or resize) or read-only with a shared lock (nobody may write meanwhile).
pub fn open(path: &Path, writable: bool) -> Result<Opened, ToolError> {
    let format = probe_format(path).map_err(|source| ToolError::Open {
        path: path.to_owned(),
        source,
    })?;
    if format != ImageFormat::Qcow2 {
        return Err(ToolError::NotQcow2(path.to_owned()));
    }
    let lock = ImageLock::acquire(path, &LockSpec::for_image(true, writable))?;
    let image = Qcow2Image::open(
        path,
        &OpenOptions {
            read_only: !writable,
            known_autoclear: qcow2_bitmaps::KNOWN_AUTOCLEAR,
            ..Default::default()
        },
    )
    .map_err(|source| ToolError::Engine {
        path: path.to_owned(),
        source,
    })?;
    Ok(Opened { image, _lock: lock })
}

/// Loads the bitmaps of an opened image (a writable image gets them flagged in-use).
pub fn load_bitmaps(path: &Path, img: &Qcow2Image) -> Result<Bitmaps, ToolError> {
    Bitmaps::open(img, &path.display().to_string()).map_err(|source| ToolError::Load {
        path: path.to_owned(),
        source,
    })
}
