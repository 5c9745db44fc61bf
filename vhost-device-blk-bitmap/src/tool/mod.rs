//! The offline tool: subcommands that do what `qemu-img bitmap`, `qemu-img create` and
//! `qemu-img check` do, on an image no daemon is serving.
//!
//! * [`args`]: the subcommands' arguments.
//! * `image`: opening with QEMU-compatible locks (read-write or shared read-only).
//! * `bitmap`: the bitmap operations (mutating ones always store before closing).
//! * `create`, `check`: the engine's image creation and consistency check.
//! * `output`: text and JSON printing.
//! * [`man`]: manual pages generated from the clap definitions (the hidden `man`
//!   subcommand).
//!
//! Exit codes: 0 success, 1 error (reason on stderr); `check` also uses 2 (corruptions)
//! and 3 (leaks only), as `qemu-img check`.

pub mod args;
mod bitmap;
mod check;
mod create;
mod ctl;
mod error;
mod image;
pub mod man;
mod output;

pub use error::ToolError;

use std::io::Write;

use args::BitmapCommand;

/// Program name used as the prefix of error lines.
const PROG: &str = "vhost-device-blk-bitmap";

/// Runs one `bitmap` subcommand; returns the process exit code.
pub fn run_bitmap(cmd: &BitmapCommand) -> u8 {
    finish(bitmap::run(cmd, &mut std::io::stdout().lock()).map(|()| 0))
}

/// Runs `create`; returns the process exit code.
pub fn run_create(a: &args::CreateArgs) -> u8 {
    finish(create::run(a, &mut std::io::stdout().lock()).map(|()| 0))
}

/// Runs `check`; returns the process exit code (0 clean, 1 check failed, 2 corruptions,
/// 3 leaks only).
pub fn run_check(a: &args::CheckArgs) -> u8 {
    finish(check::run(a, &mut std::io::stdout().lock()))
}

/// Prints an error (and QEMU's hint line) and maps the result to an exit code.
fn finish(r: Result<u8, ToolError>) -> u8 {
    match r {
        Ok(code) => code,
        Err(e) => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{PROG}: {e}");
            if let Some(h) = e.hint() {
                let _ = writeln!(err, "{h}");
            }
            1
        }
    }
}

/// Runs `ctl`; returns the process exit code (1 when the daemon answered an error).
pub fn run_ctl(a: &args::CtlArgs) -> u8 {
    finish(ctl::run(a, &mut std::io::stdout().lock()))
}
