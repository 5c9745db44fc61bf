//! Load generator for vhost-user-blk servers.
//!
//! It plays the VMM and the guest driver at once: it negotiates a vhost-user session,
//! shares a memfd as guest RAM, and drives one split virtqueue with virtio-blk requests
//! in a closed loop (`qd` requests in flight), sleeping on the call eventfd like a
//! guest waiting for an interrupt. It measures IOPS, latency percentiles and the
//! server process's CPU time per request.

pub mod conn;
pub mod cpu;
pub mod error;
pub mod guest;
pub mod job;
pub mod vq;
