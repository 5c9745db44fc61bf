//! vhost-device-blk-bitmap: a vhost-user-blk backend for qcow2 and raw images.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::error;
use vhost_device_blk_bitmap::args::{Cli, Command};
use vhost_device_blk_bitmap::config::Config;
use vhost_device_blk_bitmap::daemon::{self, DaemonError};
use vhost_device_blk_bitmap::server::{handle_termination_signals, StopHandle};
use vhost_device_blk_bitmap::systemd;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        return ExitCode::from(run_tool(&command));
    }
    // Both read (and remove) environment variables: before any thread starts.
    let activation = match systemd::take_activation() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let notifier = match systemd::Notifier::from_env() {
        Ok(n) => n.map(Arc::new),
        Err(e) => {
            log::warn!("{e}; the service manager will not be notified");
            None
        }
    };
    let config = match Config::from_args(cli.serve, activation.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(a) = &activation {
        let (fd, name) = a.vhost_user_socket();
        log::info!(
            "socket activation: serving fd {fd}{} ({} descriptor(s) passed)",
            name.map(|n| format!(" named '{n}'")).unwrap_or_default(),
            a.fds.len()
        );
    }
    match serve(config, notifier) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an offline subcommand (see `vhost_device_blk_bitmap::tool`); returns the exit code.
fn run_tool(command: &Command) -> u8 {
    use vhost_device_blk_bitmap::tool;
    match command {
        Command::Bitmap(c) => tool::run_bitmap(c),
        Command::Create(a) => tool::run_create(a),
        Command::Check(a) => tool::run_check(a),
        Command::Ctl(a) => tool::run_ctl(a),
        Command::Man(a) => tool::man::run(a),
    }
}

fn serve(config: Config, notifier: Option<Arc<systemd::Notifier>>) -> Result<(), DaemonError> {
    let stop = StopHandle::new()?;
    if let Some(n) = &notifier {
        let n = n.clone();
        stop.on_stop(move || n.notify_or_warn("STOPPING=1\nSTATUS=stopping"));
    }
    handle_termination_signals(stop.clone())?;
    daemon::serve(config, stop, notifier)
}
