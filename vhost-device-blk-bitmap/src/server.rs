//! The daemon's life: listen, serve one frontend at a time, listen again after every
//! disconnect, and stop cleanly on request (SIGTERM/SIGINT or [`StopHandle::stop`]).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use log::{error, info, warn};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::BlkBackend;
use crate::device::BlkDevice;
use crate::relay::{Relay, RelayConfig};
use crate::tracker::TrackerError;

/// Errors that end the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created.
    #[error("cannot listen on '{path}': {err}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        err: qmp::ServerError,
    },
    /// The vhost-user daemon could not be set up or accept. (vhost-user-backend's error
    /// implements neither `std::error::Error` nor `Sync`, so its text is kept.)
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// An OS error.
    #[error("{what}: {err}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The error.
        err: io::Error,
    },
    /// The write tracker refused a connection.
    #[error("write tracker: {0}")]
    Tracker(#[from] TrackerError),
}

/// Called once when the stop is first requested.
type StopHook = Box<dyn FnOnce() + Send>;

struct StopState {
    stopping: AtomicBool,
    event: EventFd,
    conn: Mutex<Option<ShutdownHandle>>,
    hooks: Mutex<Vec<StopHook>>,
}

impl std::fmt::Debug for StopState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopState")
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

/// Asks a running [`Server`] to stop: it stops accepting, ends the current connection
/// (requests already started complete), and returns from [`Server::run`].
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<StopState>);

impl StopHandle {
    /// A new, not yet triggered handle.
    pub fn new() -> io::Result<Self> {
        Ok(StopHandle(Arc::new(StopState {
            stopping: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK)?,
            conn: Mutex::new(None),
            hooks: Mutex::new(Vec::new()),
        })))
    }

    /// Runs `hook` when the stop is first requested (at once if it already was), in the
    /// thread that requests it: e.g. telling the service manager that we are stopping.
    pub fn on_stop(&self, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = self.0.hooks.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_stopping() {
            drop(hooks);
            hook();
        } else {
            hooks.push(Box::new(hook));
        }
    }

    /// Requests the stop (idempotent; callable from any thread).
    pub fn stop(&self) {
        let hooks = {
            let mut hooks = self.0.hooks.lock().unwrap_or_else(|p| p.into_inner());
            // Under the hooks' lock, so that a hook is either run here or by `on_stop`.
            let first = !self.0.stopping.swap(true, Ordering::SeqCst);
            if first {
                std::mem::take(&mut *hooks)
            } else {
                Vec::new()
            }
        };
        for hook in hooks {
            hook();
        }
        if let Err(e) = self.0.event.write(1) {
            warn!("cannot wake the listener: {e}");
        }
        if let Some(h) = self.lock_conn().as_ref() {
            h.shutdown();
        }
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }

    fn lock_conn(&self) -> std::sync::MutexGuard<'_, Option<ShutdownHandle>> {
        self.0.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the current connection; shuts it down at once if a stop already came.
    fn set_conn(&self, handle: Option<ShutdownHandle>) {
        let mut c = self.lock_conn();
        *c = handle;
        if self.is_stopping() {
            if let Some(h) = c.as_ref() {
                h.shutdown();
            }
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and every thread it creates later) and
/// starts a thread that turns them into [`StopHandle::stop`]. Call before creating threads.
pub fn handle_termination_signals(stop: StopHandle) -> io::Result<thread::JoinHandle<()>> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out pointer.
            let r = unsafe { libc::sigwait(&set, &mut sig) };
            if r != 0 {
                error!("sigwait failed: {}", io::Error::from_raw_os_error(r));
                return;
            }
            let name = if sig == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            if stop.is_stopping() {
                info!("received {name} again; still stopping");
            } else {
                info!("received {name}: stopping");
                stop.stop();
            }
        })
}

/// Waits until `fd` is readable or the stop event fires. Returns false on stop.
fn wait_for_client(fd: RawFd, stop: &StopHandle) -> io::Result<bool> {
    loop {
        if stop.is_stopping() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.0.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 || stop.is_stopping() {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// Serving parameters.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket path.
    pub socket_path: PathBuf,
    /// Request queues.
    pub num_queues: usize,
    /// Maximum queue size.
    pub queue_size: usize,
    /// I/O engine of the queue workers.
    pub aio: crate::config::Aio,
    /// Who may connect to the socket.
    pub access: SocketAccess,
}

/// Permissions of the vhost-user socket: whoever can connect gets the whole disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// File mode (default 0600: only our user).
    pub mode: u32,
    /// Group owner, if not ours.
    pub gid: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            gid: None,
        }
    }
}

/// What a [`Server`] reports to its [`Server::on_event`] hook (e.g. for `sd_notify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// The socket listens: frontends can connect (sent once, before the first accept).
    Listening,
    /// A frontend connected.
    FrontendConnected,
    /// The frontend went away and the server waits for the next one (not sent while
    /// stopping).
    WaitingForFrontend,
}

/// The hook of [`Server::on_event`].
type EventHook = Box<dyn Fn(ServerEvent) + Send + Sync>;

/// Serves one device on a vhost-user socket, one frontend at a time.
pub struct Server {
    config: ServerConfig,
    device: Arc<BlkDevice>,
    stop: StopHandle,
    /// An inherited listening socket, served instead of binding `config.socket_path`
    /// (taken by the first [`Server::run`]).
    inherited: Mutex<Option<UnixListener>>,
    /// Whether [`Server::with_listener`] gave one.
    has_inherited: bool,
    events: Option<EventHook>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("stop", &self.stop)
            .field("inherited", &self.inherited)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `device`, stopped through `stop`.
    pub fn new(config: ServerConfig, device: Arc<BlkDevice>, stop: StopHandle) -> Self {
        Server {
            config,
            device,
            stop,
            inherited: Mutex::new(None),
            has_inherited: false,
            events: None,
        }
    }

    /// Serves on `listener`, an already listening unix stream socket we were given
    /// (`--socket-fd`, socket activation), instead of creating `socket_path`: its mode,
    /// group and file are left alone, and it is closed, never unlinked, at the end of
    /// [`Server::run`]. `socket_path` then only names it in the log.
    pub fn with_listener(mut self, listener: UnixListener) -> Self {
        *self.inherited.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(listener);
        self.has_inherited = true;
        self
    }

    /// Calls `hook` on every [`ServerEvent`], in the thread of [`Server::run`].
    pub fn on_event(mut self, hook: impl Fn(ServerEvent) + Send + Sync + 'static) -> Self {
        self.events = Some(Box::new(hook));
        self
    }

    fn event(&self, event: ServerEvent) {
        if let Some(hook) = &self.events {
            hook(event);
        }
    }

    /// Listens and serves until stopped. On return the socket is removed, every request
    /// has completed and the image was flushed; the tracker's `on_shutdown` is left to
    /// the caller.
    pub fn run(&self) -> Result<(), ServerError> {
        let inherited = self
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (socket, id) = match inherited {
            Some(listener) => (listener, None),
            None if self.has_inherited => {
                return Err(ServerError::Io {
                    what: "serving the inherited socket",
                    err: io::Error::other("it was closed by an earlier run"),
                })
            }
            None => {
                let (socket, id) = self.bind()?;
                (socket, Some(id))
            }
        };
        let path = &self.config.socket_path;
        if id.is_none() {
            // Whoever created it chose its blocking mode: ours accepts blocking, after
            // poll() said a frontend waits.
            socket
                .set_nonblocking(false)
                .map_err(|err| ServerError::Io {
                    what: "making the inherited socket blocking",
                    err,
                })?;
        }
        let listener = socket;
        info!(
            "listening on {}{} ({} queue(s), image of {} bytes{})",
            path.display(),
            if id.is_none() {
                format!(" (inherited fd {})", listener.as_raw_fd())
            } else {
                String::new()
            },
            self.config.num_queues,
            self.device.image().size(),
            if self.device.image().is_read_only() {
                ", read-only"
            } else {
                ""
            }
        );
        self.event(ServerEvent::Listening);
        while wait_for_client(listener.as_raw_fd(), &self.stop).map_err(|err| ServerError::Io {
            what: "waiting for a frontend",
            err,
        })? {
            self.serve_one(&listener)?;
        }
        drop(listener);
        if let Some(id) = id {
            qmp::remove_socket_if_ours(path, id);
        }
        if let Err(e) = self.device.image().flush() {
            error!("final flush failed: {e}");
        }
        info!("stopped");
        Ok(())
    }

    /// Creates the socket at `socket_path` (blocking, mode and group as configured).
    fn bind(&self) -> Result<(UnixListener, qmp::FileId), ServerError> {
        let path = &self.config.socket_path;
        // Mode 0600 from the start, never replacing anything but a stale socket (a file
        // or a live socket at the path is an error), removed at exit only if still ours.
        let listen_err = |err| ServerError::Listen {
            path: path.clone(),
            err,
        };
        let (socket, id) = qmp::bind_private_socket(path).map_err(listen_err)?;
        socket.set_nonblocking(false).map_err(|e| {
            listen_err(qmp::ServerError::Io {
                what: "set_nonblocking",
                path: path.clone(),
                source: e,
            })
        })?;
        // The socket exists with mode 0600; open it up only as far as asked.
        let access = self.config.access;
        if access != SocketAccess::default() {
            use std::os::unix::fs::PermissionsExt;
            let io = |what, err| ServerError::Io { what, err };
            std::os::unix::fs::chown(path, None, access.gid)
                .map_err(|e| io("setting the socket's group", e))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
                .map_err(|e| io("setting the socket's mode", e))?;
            info!(
                "socket mode {:04o}{}",
                access.mode,
                access
                    .gid
                    .map(|g| format!(", group {g}"))
                    .unwrap_or_default()
            );
        }
        Ok((socket, id))
    }

    fn serve_one(&self, listener: &UnixListener) -> Result<(), ServerError> {
        // A frontend is waiting (poll said so); it may have gone again.
        let frontend = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if self.stop.is_stopping() => {
                info!("accept while stopping: {e}");
                return Ok(());
            }
            Err(e) => {
                warn!("accepting a frontend failed: {e}");
                return Ok(());
            }
        };
        match peer_credentials(&frontend) {
            Ok(c) => info!(
                "frontend pid {} uid {} gid {} is connecting",
                c.pid, c.uid, c.gid
            ),
            Err(e) => warn!("frontend credentials unknown: {e}"),
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(
            BlkBackend::new(
                self.device.clone(),
                self.config.num_queues,
                self.config.queue_size,
                self.config.aio,
                mem.clone(),
            )
            .map_err(|err| ServerError::Io {
                what: "creating the backend",
                err,
            })?,
        );
        let mut daemon =
            VhostUserDaemon::new("vhost-device-blk-bitmap".to_string(), backend.clone(), mem)
                .map_err(|e| ServerError::Daemon(e.to_string()))?;
        backend
            .register_worker_events(&daemon.get_epoll_handlers())
            .map_err(|err| ServerError::Io {
                what: "registering the io_uring completion events",
                err,
            })?;
        // The tracker (e.g. flagging the bitmaps in-use on disk) must be ready before
        // the connection's thread can start any queue, so it runs before the first
        // message is read.
        if let Err(e) = self.device.tracker().on_frontend_connected() {
            error!("write tracker refused the connection: {e}");
            return Err(e.into());
        }
        let relay = connect_handler(&mut daemon).and_then(|handler| {
            Relay::start(
                frontend,
                handler,
                backend.inflight_log().clone(),
                RelayConfig {
                    num_queues: self.config.num_queues as u16,
                },
            )
        });
        let relay = match relay {
            Ok(r) => r,
            Err(e) => {
                daemon.request_shutdown();
                let _ = daemon.wait();
                backend.signal_exit();
                drop(daemon);
                backend.close_handed_out_fds();
                // Nothing was served: give the tracker its idle state back.
                if let Err(e) = self.device.tracker().on_frontend_disconnected() {
                    error!("write tracker failed after a failed accept: {e}");
                }
                warn!("starting the vhost-user handler failed: {e}");
                return Ok(());
            }
        };
        info!("frontend connected");
        self.event(ServerEvent::FrontendConnected);
        self.stop.set_conn(daemon.shutdown_handle());
        let result = daemon.wait();
        self.stop.set_conn(None);
        relay.join();
        // No new request starts; every request taken from a ring completes (the workers
        // still run) before the queue threads stop and before the tracker stores the
        // bitmaps.
        backend.quiesce();
        backend.drain();
        backend.signal_exit();
        drop(daemon);
        backend.close_handed_out_fds();
        if let Err(e) = self.device.image().flush() {
            error!("flush after disconnect failed: {e}");
        }
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => warn!("connection ended: {e}"),
        }
        if let Err(e) = self.device.tracker().on_frontend_disconnected() {
            error!("write tracker failed after disconnect: {e}");
        }
        if !self.stop.is_stopping() {
            self.event(ServerEvent::WaitingForFrontend);
        }
        Ok(())
    }
}

/// The peer of a unix stream socket (SO_PEERCRED).
pub fn peer_credentials(stream: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which lives for the call.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Connects vhost-user-backend's request handler (which only accepts or connects by
/// path) to a socket in a new private directory, and returns our end of it, for the
/// [`Relay`]. The directory (mode 0700) is removed before this returns, and the accepted
/// connection must come from this process.
fn connect_handler(daemon: &mut VhostUserDaemon<Arc<BlkBackend>>) -> io::Result<UnixStream> {
    let dir = tempfile::Builder::new()
        .prefix("vhost-device-blk-")
        .tempdir()?;
    let path = dir.path().join("handler.sock");
    let listener = UnixListener::bind(&path)?;
    let path = path
        .to_str()
        .ok_or_else(|| io::Error::other("temporary directory is not UTF-8"))?;
    // Connects (queued in the backlog) and starts the crate's message thread.
    daemon
        .start_client(path)
        .map_err(|e| io::Error::other(format!("vhost-user daemon: {e}")))?;
    let (stream, _) = listener.accept()?;
    let me = std::process::id();
    let peer = peer_credentials(&stream)?;
    if u32::try_from(peer.pid).ok() != Some(me) {
        return Err(io::Error::other(format!(
            "the handler socket was connected by process {}, not by us",
            peer.pid
        )));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::NoopTracker;
    use qcow2::{MemStorage, RawImage};

    fn device() -> Arc<BlkDevice> {
        let storage = Arc::new(MemStorage::new());
        qcow2::Storage::set_len(&*storage, 1 << 20).unwrap();
        let image = Arc::new(RawImage::new(storage, false).unwrap());
        Arc::new(BlkDevice::new(image, Arc::new(NoopTracker), 512, b"", true))
    }

    #[test]
    fn listen_failure_names_the_socket() {
        let stop = StopHandle::new().unwrap();
        let server = Server::new(
            ServerConfig {
                socket_path: "/nonexistent-dir/x.sock".into(),
                num_queues: 1,
                queue_size: 256,
                aio: Default::default(),
                access: Default::default(),
            },
            device(),
            stop,
        );
        let e = server.run().unwrap_err().to_string();
        assert!(
            e.starts_with("cannot listen on '/nonexistent-dir/x.sock'"),
            "{e}"
        );
    }

    #[test]
    fn stop_before_run_returns_at_once_and_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let stop = StopHandle::new().unwrap();
        stop.stop();
        stop.stop();
        assert!(stop.is_stopping());
        let server = Server::new(
            ServerConfig {
                socket_path: path.clone(),
                num_queues: 1,
                queue_size: 256,
                aio: Default::default(),
                access: Default::default(),
            },
            device(),
            stop,
        );
        server.run().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn an_inherited_listener_is_served_and_never_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inherited.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = StopHandle::new().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let server = Server::new(
            ServerConfig {
                // Only names the socket in the log: nothing is created there.
                socket_path: dir.path().join("unused.sock"),
                num_queues: 1,
                queue_size: 256,
                aio: Default::default(),
                access: Default::default(),
            },
            device(),
            stop.clone(),
        )
        .with_listener(listener)
        .on_event(move |e| seen.lock().unwrap().push(e));
        stop.stop();
        server.run().unwrap();
        assert!(path.exists(), "an inherited socket is not unlinked");
        assert!(!dir.path().join("unused.sock").exists());
        assert_eq!(*events.lock().unwrap(), [ServerEvent::Listening]);
        // The listener was closed by the first run; nothing is bound instead.
        let e = server.run().unwrap_err().to_string();
        assert!(e.contains("closed by an earlier run"), "{e}");
        assert!(!dir.path().join("unused.sock").exists());
    }

    #[test]
    fn stop_hooks_run_once() {
        let stop = StopHandle::new().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = count.clone();
        stop.on_stop(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(count.load(Ordering::SeqCst), 0);
        stop.stop();
        stop.stop();
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let c = count.clone();
        stop.on_stop(move || {
            c.fetch_add(10, Ordering::SeqCst);
        });
        assert_eq!(
            count.load(Ordering::SeqCst),
            11,
            "at once when already stopping"
        );
    }
}
