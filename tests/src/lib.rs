//! End-to-end test harness: real clients against a vhost-user-blk server.
//!
//! * [`GuestEnv`] / [`Guest`]: boot a small Linux guest (QEMU TCG, Debian kernel, busybox
//!   initramfs from `resources/build-guest.sh`) whose `/dev/vda` is served by the server
//!   under test, run a shell script in it and read its exit status.
//! * [`GuestScript`]: generic block operations plus the host-side model of their effect
//!   (expected contents and dirty granules), reusable for any server.
//! * [`Scenario`]: the standard guest workload plus every image check after it; run it
//!   against any server by passing a closure that starts it.
//! * [`Backend`]: a server process (our daemon or `qemu-storage-daemon`);
//!   [`daemon_binary`] / [`daemon_command`] locate (or build) and start our daemon.
//! * [`tools`]: qemu-img / qemu-io / qemu-nbd helpers to inspect images and bitmaps.
//!
//! Every wait is bounded and every child process is killed when its guard drops.

pub mod backend;
pub mod daemon;
pub mod error;
pub mod guest;
pub mod process;
pub mod scenario;
pub mod script;
pub mod tools;

pub use backend::{qsd_vhost_user_blk, Backend};
pub use daemon::{daemon_binary, daemon_command, Restartable};
pub use error::{E2eError, Result};
pub use guest::{Accel, Guest, GuestConfig, GuestEnv, GuestOutcome};
pub use scenario::{Scenario, ScenarioReport};
pub use script::{DiskOp, GuestScript};
pub use tools::{
    bitmap_dirty_extents, in_ci, qemu_img_check, qemu_img_info_json, require_tool, require_tools,
};
