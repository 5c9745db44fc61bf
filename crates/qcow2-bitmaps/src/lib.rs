//! QEMU-compatible persistent dirty bitmaps in qcow2 images.
//!
//! [`Bitmaps`] holds every bitmap of one image in memory and is shared (`Arc`) by the
//! daemon's threads. Every call that touches the file takes the image as
//! `&dyn qcow2::ImageMetadata` (for `Qcow2Image`, open it with
//! `known_autoclear: qcow2::AUTOCLEAR_BITMAPS`, or the engine clears the bitmaps bit).
//!
//! * Open: [`Bitmaps::open`] (read-write ⇒ [`Bitmaps::load_and_mark_in_use`]: loads and
//!   flags every loaded bitmap IN_USE in place, QEMU's order; read-only ⇒
//!   [`Bitmaps::load_read_only`], never writes). Bitmaps found IN_USE load as
//!   *inconsistent*: listed, never tracked or stored, only removable.
//! * Request path: [`Bitmaps::mark`]`(offset, len)` — lock-free.
//! * Close / frontend gone: [`Bitmaps::store`] (quiesce writes first). To serve writes
//!   again afterwards call [`Bitmaps::mark_in_use_again`]. An exit path that does not
//!   store leaves the bitmaps IN_USE (inconsistent on the next open), as QEMU does.
//! * Operations: [`Bitmaps::add`] ([`AddOptions`]), [`Bitmaps::remove`],
//!   [`Bitmaps::clear`], [`Bitmaps::enable`], [`Bitmaps::disable`], [`Bitmaps::merge`]
//!   ([`MergeSource`], also from another image's set), [`Bitmaps::list`]
//!   ([`BitmapInfo`]), [`Bitmaps::dump`] (extents), [`Bitmaps::bitmap`] (the bits, for
//!   exports), [`Bitmaps::check_resize`].
//! * [`Bitmaps::transaction`]: several [`Action`]s all or nothing, atomically with
//!   respect to guest writes (QMP's `transaction`).
//! * Crash consistency: [`Bitmaps::open_with`] with `crash_consistent` keeps a
//!   persistent [`Shadow`] while bitmaps are in use, and recovers bitmaps a crash left
//!   in use (module [`shadow`]; open the image with [`KNOWN_AUTOCLEAR`]).
//! * Store reserve: with [`OpenOptions::reserve`], while bitmaps are in use the clusters
//!   a store needs in the worst case are allocated and preallocated, so a store on a full
//!   file system succeeds ([`Bitmaps::reserved_bytes`], [`Bitmaps::reserve_error`]).
//! * Errors: [`Error`], whose texts are QEMU's where QEMU has one.
//!
//! With the `testing` feature (for dev-dependencies only), `testing::MemImage` is an
//! in-memory `ImageMetadata` with fault injection.

pub mod error;
pub mod format;
pub mod limits;
mod load;
mod ops;
mod reserve;
mod set;
pub mod shadow;
mod store;
mod table;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod txn;

pub use dirty_bitmap::{DirtyBitmap, Extent};
pub use error::{Error, Result};
pub use load::{OpenOptions, DEFAULT_MAX_MEMORY, WARN_LEAKS, WARN_LOST_V2, WARN_LOST_V3};
pub use ops::{AddOptions, MergeSource};
pub use set::{BitmapInfo, Bitmaps};
pub use shadow::{Cover, Shadow, ShadowStats, KNOWN_AUTOCLEAR};
pub use txn::{Action, TxnError, TxnOptions};

#[cfg(test)]
mod tests;
