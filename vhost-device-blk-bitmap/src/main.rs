//! vhost-device-blk-bitmap: a vhost-user-blk backend for qcow2 and raw images.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::error;
use vhost_device_blk_bitmap::args::{Cli, Command};
use vhost_device_blk_bitmap::bitmaps::{PersistentBitmaps, Trackers};
use vhost_device_blk_bitmap::config::{Config, VhostSocket};
use vhost_device_blk_bitmap::control::{Control, ControlHandler};
use vhost_device_blk_bitmap::device::BlkDevice;
use vhost_device_blk_bitmap::disk::{open_disk, DiskOptions, ImageFormat, OpenedDisk};
use vhost_device_blk_bitmap::exports::Exports;
use vhost_device_blk_bitmap::server::{
    handle_termination_signals, Server, ServerConfig, ServerEvent, StopHandle,
};
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

fn serve(
    config: Config,
    notifier: Option<Arc<systemd::Notifier>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let stop = StopHandle::new()?;
    if let Some(n) = &notifier {
        let n = n.clone();
        stop.on_stop(move || n.notify_or_warn("STOPPING=1\nSTATUS=stopping"));
    }
    // Taken before anything else can open a descriptor: the listener owns it from here.
    let inherited = match &config.socket {
        VhostSocket::Path(_) => None,
        // SAFETY: the descriptor was passed to this process (--socket-fd or socket
        // activation), checked by `Config` to be a listening unix socket, and nothing else
        // in the process refers to it; `serve` runs once, so it is taken only here.
        VhostSocket::Inherited(i) => Some(unsafe { systemd::take_listener(i.fd) }?),
    };
    handle_termination_signals(stop.clone())?;
    let disk = open_disk(&DiskOptions {
        path: config.image.clone(),
        format: config.format,
        read_only: config.read_only,
        direct: config.direct,
        create_size: config.create_size,
        // The tracker keeps the persistent bitmaps valid, so the engine keeps their bit.
        known_autoclear: qcow2::AUTOCLEAR_BITMAPS,
        backing: config.backing,
    })?;
    if let VhostSocket::Path(socket_path) = &config.socket {
        for b in &disk.backing_locks {
            if vhost_device_blk_bitmap::config::same_file(socket_path, b.path()) {
                return Err(format!(
                    "--socket-path '{}' is a backing file of the image: the socket would \
                     replace it",
                    socket_path.display()
                )
                .into());
            }
        }
    }
    let (tracker, bitmaps) = make_tracker(&config, &disk)?;
    log::info!("serving {} image '{}'", disk.format, config.image.display());
    let device = Arc::new(BlkDevice::new(
        disk.image.clone(),
        tracker.clone(),
        config.logical_block_size,
        &config.serial,
        config.writeback,
    ));
    let exports = Arc::new(Exports::new(
        &config.node_name,
        device.clone(),
        bitmaps.clone(),
        config.fleece_dir.clone(),
        vhost_device_blk_bitmap::snapshot::MIN_CHUNK,
    ));
    if let Some(addr) = &config.nbd {
        exports.start_server(addr, 100)?;
        exports.add(&config.export, &[])?;
    }
    if config.format.is_none() && disk.format == ImageFormat::Raw && !config.read_only {
        device.guard_probed_raw();
        log::warn!(
            "the format of '{}' was probed as raw: pass --format raw (guest writes of an \
             image header to sector 0 are refused meanwhile)",
            config.image.display()
        );
    }
    let qmp = match &config.qmp_socket {
        Some(path) => Some(start_qmp(
            path, &config, &disk, &device, bitmaps, &exports, &stop,
        )?),
        None => None,
    };
    let mut server = Server::new(
        ServerConfig {
            socket_path: match &config.socket {
                VhostSocket::Path(p) => p.clone(),
                inherited => inherited.to_string().into(),
            },
            num_queues: usize::from(config.num_queues),
            queue_size: usize::from(config.queue_size),
            aio: config.aio,
            access: config.socket_access,
        },
        device,
        stop,
    );
    if let Some(listener) = inherited {
        server = server.with_listener(listener);
    }
    if let Some(n) = notifier {
        // READY once the vhost-user socket listens: the QMP and NBD sockets already do.
        let ready = format!(
            "READY=1\nSTATUS=serving {} on {}\nMAINPID={}",
            config.image.display(),
            config.socket,
            std::process::id()
        );
        server = server.on_event(move |event| match event {
            ServerEvent::Listening => n.notify_or_warn(&ready),
            ServerEvent::FrontendConnected => n.notify_or_warn("STATUS=frontend connected"),
            ServerEvent::WaitingForFrontend => n.notify_or_warn("STATUS=waiting for a frontend"),
        });
    }
    // Whatever ended the server, store the bitmaps (or say why not) before exiting.
    let served = server.run();
    if let Some((q, quit)) = &qmp {
        // QEMU's reasons: a `quit` command, or a signal.
        let reason = if quit.load(std::sync::atomic::Ordering::SeqCst) {
            "host-qmp-quit"
        } else {
            "host-signal"
        };
        q.emit(
            "SHUTDOWN",
            serde_json::json!({"guest": false, "reason": reason}),
        );
        q.stop();
    }
    // NBD clients go before the bitmaps are stored (a writable export is a writer).
    exports.shutdown();
    drop(exports);
    let closed = tracker.on_shutdown();
    drop(server);
    drop(tracker);
    drop(disk);
    match (served, closed) {
        (Ok(()), closed) => Ok(closed?),
        (Err(e), closed) => {
            if let Err(c) = closed {
                error!("{c}");
            }
            Err(e.into())
        }
    }
}

/// Builds the write tracker for the opened disk (persistent bitmaps for qcow2 images);
/// on error the bitmaps were stored again or the log says why not.
fn make_tracker(
    config: &Config,
    disk: &OpenedDisk,
) -> Result<Trackers, Box<dyn std::error::Error>> {
    Ok(vhost_device_blk_bitmap::bitmaps::tracker_for(config, disk)?)
}

/// Starts the QMP control socket; `quit` stops the daemon (after its reply).
fn start_qmp(
    path: &std::path::Path,
    config: &Config,
    disk: &OpenedDisk,
    device: &Arc<BlkDevice>,
    bitmaps: Option<Arc<PersistentBitmaps>>,
    exports: &Arc<Exports>,
    stop: &StopHandle,
) -> Result<(Arc<qmp::ServerHandle>, Arc<std::sync::atomic::AtomicBool>), Box<dyn std::error::Error>>
{
    let control = Control {
        node: config.node_name.clone(),
        image: config.image.clone(),
        format: disk.format,
        direct: config.direct,
        cluster_size: disk.qcow2.as_ref().map(|q| q.cluster_size()),
        num_queues: usize::from(config.num_queues),
        device: device.clone(),
        bitmaps,
        exports: exports.clone(),
    };
    let handle = Arc::new(qmp::Server::new(ControlHandler(Arc::new(control))).bind(path)?);
    log::info!("QMP control socket on {}", path.display());
    let events = handle.emitter();
    exports.set_event_sink(Arc::new(move |event, data| events.emit(event, data)));
    // Failed guest requests become BLOCK_IO_ERROR events (rate-limited).
    let (emitter, node) = (handle.emitter(), config.node_name.clone());
    device.stats().on_error(Box::new(move |kind| {
        use vhost_device_blk_bitmap::stats::IoKind;
        let operation = if kind == IoKind::Read {
            "read"
        } else {
            "write"
        };
        emitter.emit(
            "BLOCK_IO_ERROR",
            serde_json::json!({
                "device": "",
                "node-name": node,
                "operation": operation,
                "action": "report",
                "nospace": false,
                "reason": "Input/output error",
            }),
        );
    }));
    let quit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (waiter, stop, q) = (handle.clone(), stop.clone(), quit.clone());
    std::thread::Builder::new()
        .name("qmp-quit".into())
        .spawn(move || {
            waiter.wait();
            if !stop.is_stopping() {
                log::info!("QMP quit: stopping");
                q.store(true, std::sync::atomic::Ordering::SeqCst);
                stop.stop();
            }
        })?;
    Ok((handle, quit))
}
