//! vhost-device-blk-bitmap: a vhost-user-blk backend for qcow2 and raw images.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::error;
use vhost_device_blk_bitmap::args::Cli;
use vhost_device_blk_bitmap::config::Config;
use vhost_device_blk_bitmap::device::BlkDevice;
use vhost_device_blk_bitmap::disk::{open_disk, DiskOptions, ImageFormat, OpenedDisk};
use vhost_device_blk_bitmap::server::{
    handle_termination_signals, Server, ServerConfig, StopHandle,
};
use vhost_device_blk_bitmap::tracker::{NoopTracker, WriteTracker};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        // No subcommands exist yet; the enum is empty.
        match command {}
    }
    let config = match Config::try_from(cli.serve) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let stop = StopHandle::new()?;
    handle_termination_signals(stop.clone())?;
    let disk = open_disk(&DiskOptions {
        path: config.image.clone(),
        format: config.format,
        read_only: config.read_only,
        direct: config.direct,
        create_size: config.create_size,
        // Integration point: `qcow2::AUTOCLEAR_BITMAPS` once a tracker keeps the
        // persistent bitmaps up to date; until then a writable open invalidates them.
        known_autoclear: 0,
    })?;
    let tracker = make_tracker(&config, &disk)?;
    log::info!("serving {} image '{}'", disk.format, config.image.display());
    let device = Arc::new(BlkDevice::new(
        disk.image.clone(),
        tracker.clone(),
        config.logical_block_size,
        &config.serial,
        config.writeback,
    ));
    let server = Server::new(
        ServerConfig {
            socket_path: config.socket_path.clone(),
            num_queues: usize::from(config.num_queues),
            queue_size: usize::from(config.queue_size),
        },
        device,
        stop,
    );
    server.run()?;
    tracker.on_shutdown()?;
    drop(disk);
    Ok(())
}

/// Builds the write tracker for the opened disk.
///
/// Integration point: build the persistent-bitmap tracker here from `disk.qcow2` (the
/// concrete `qcow2::Qcow2Image`, an `ImageMetadata`) and `config.bitmaps`, and open qcow2
/// images with `known_autoclear: qcow2::AUTOCLEAR_BITMAPS` above.
fn make_tracker(
    config: &Config,
    disk: &OpenedDisk,
) -> Result<Arc<dyn WriteTracker>, Box<dyn std::error::Error>> {
    if !config.bitmaps.is_empty() {
        if disk.format != ImageFormat::Qcow2 {
            return Err(format!(
                "--bitmap needs a qcow2 image, '{}' is {}",
                config.image.display(),
                disk.format
            )
            .into());
        }
        log::warn!("--bitmap is accepted but not wired to persistent bitmaps yet");
    }
    Ok(Arc::new(NoopTracker))
}
