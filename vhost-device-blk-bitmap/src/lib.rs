//! vhost-user-blk backend serving qcow2 and raw images, with hooks for QEMU-compatible
//! persistent dirty bitmaps.
//!
//! Layers: [`args`] (command line) → [`config`] (validated settings) → [`disk`] (image
//! opening with QEMU-compatible [`lock`]s) → [`device`] (virtio-blk emulation) ←
//! [`transport`] (descriptor chains) ← [`backend`] (vhost-user) ← [`server`] (listen loop,
//! signals, and a relay in front of vhost-user-backend for the inflight messages it does
//! not support).

pub mod args;
pub mod backend;
pub mod bitmaps;

pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod disk;
pub mod exports;
mod inflight;
pub mod lock;
pub mod nbd_export;
mod relay;
mod replay;
pub mod server;
pub mod snapshot;
pub mod stats;
pub mod systemd;
pub mod tool;
pub mod tracker;
pub mod transport;
pub mod uring;
pub mod virtio_blk;

#[cfg(test)]
mod tests;
