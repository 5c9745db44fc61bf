//! The daemon as a library: [`serve`] runs what the binary runs (disk, bitmaps, device,
//! exports, QMP, the vhost-user listen loop) until stopped; [`start_daemon`] runs it on a
//! thread and returns a [`DaemonHandle`] — for tests, benchmarks and embedders.

use std::sync::Arc;
use std::thread::JoinHandle;

use log::error;

use crate::bitmaps::{PersistentBitmaps, Trackers};
use crate::config::{Config, VhostSocket};
use crate::control::{Control, ControlHandler};
use crate::device::BlkDevice;
use crate::disk::{open_disk, DiskOptions, ImageFormat, OpenedDisk};
use crate::exports::Exports;
use crate::server::{Server, ServerConfig, ServerEvent, StopHandle};
use crate::systemd;

/// Why the daemon could not start or stopped with an error (the whole chain is kept).
pub type DaemonError = Box<dyn std::error::Error + Send + Sync>;

/// A daemon running on its own thread (see [`start_daemon`]).
#[derive(Debug)]
pub struct DaemonHandle {
    stop: StopHandle,
    socket: VhostSocket,
    thread: Option<JoinHandle<Result<(), DaemonError>>>,
}

impl DaemonHandle {
    /// The vhost-user socket it serves.
    pub fn socket(&self) -> &VhostSocket {
        &self.socket
    }

    /// A handle that stops it (as SIGTERM does in the binary).
    pub fn stop_handle(&self) -> &StopHandle {
        &self.stop
    }

    /// Stops it and waits until it has stored everything; returns how it ended.
    pub fn stop(mut self) -> Result<(), DaemonError> {
        self.stop.stop();
        self.join()
    }

    /// Waits until it ends by itself (QMP `quit`, or an error).
    pub fn wait(mut self) -> Result<(), DaemonError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), DaemonError> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err("the daemon thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.stop();
            if let Err(e) = self.join() {
                error!("{e}");
            }
        }
    }
}

/// Starts serving `config` on a new thread (no signal handling, no service-manager
/// notification); the handle stops it.
pub fn start_daemon(config: Config) -> Result<DaemonHandle, DaemonError> {
    let stop = StopHandle::new()?;
    let socket = config.socket.clone();
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name("vhost-blk-daemon".into())
        .spawn(move || serve(config, s, None))?;
    Ok(DaemonHandle {
        stop,
        socket,
        thread: Some(thread),
    })
}

/// Serves `config` until `stop` is stopped (SIGTERM and QMP `quit` in the binary); on
/// return every request has completed, exports are closed and the bitmaps were stored
/// (or the error says why not). `notifier` receives READY/STATUS when the daemon is up.
/// Signal handling is the caller's (it is process-wide).
pub fn serve(
    config: Config,
    stop: StopHandle,
    notifier: Option<Arc<systemd::Notifier>>,
) -> Result<(), DaemonError> {
    // Taken before anything else can open a descriptor: the listener owns it from here.
    let inherited = match &config.socket {
        VhostSocket::Path(_) => None,
        // SAFETY: the descriptor was passed to this process (--socket-fd or socket
        // activation), checked by `Config` to be a listening unix socket, and nothing else
        // in the process refers to it; `serve` runs once, so it is taken only here.
        VhostSocket::Inherited(i) => Some(unsafe { systemd::take_listener(i.fd) }?),
    };
    let disk = open_disk(&DiskOptions {
        path: config.image.clone(),
        format: config.format,
        read_only: config.read_only,
        direct: config.direct,
        create_size: config.create_size,
        // The tracker keeps the persistent bitmaps valid, so the engine keeps their bit.
        known_autoclear: qcow2_bitmaps::KNOWN_AUTOCLEAR,
        backing: config.backing,
    })?;
    if let VhostSocket::Path(socket_path) = &config.socket {
        for b in &disk.backing_locks {
            if crate::config::same_file(socket_path, b.path()) {
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
        crate::snapshot::MIN_CHUNK,
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
fn make_tracker(config: &Config, disk: &OpenedDisk) -> Result<Trackers, DaemonError> {
    Ok(crate::bitmaps::tracker_for(config, disk)?)
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
) -> Result<(Arc<qmp::ServerHandle>, Arc<std::sync::atomic::AtomicBool>), DaemonError> {
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
        use crate::stats::IoKind;
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
