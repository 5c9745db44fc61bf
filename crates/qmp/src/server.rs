//! The unix-socket server: accept loop, one reader and one writer thread per
//! client, events, and stopping.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::ops::ControlFlow;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;

use crate::dispatch::{self, Dispatcher, Session};
use crate::json::{JsonStreamer, Message, MAX_MESSAGE_SIZE};
use crate::outbox::{Line, Outbox, PushError};
use crate::socket::{self, Waker};
use crate::{CommandHandler, ServerError};

thread_local! {
    /// Set on the server's own threads, where stopping must not join.
    static SERVER_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Tunables of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most clients connected at once (default 64). A connection over the
    /// limit gets one `GenericError` line and is closed.
    pub max_clients: usize,
    /// Largest request (default 64 MiB, as QEMU). Over it the client gets
    /// `JSON token size limit exceeded` and is disconnected.
    pub max_message_size: usize,
    /// Most bytes queued for one client (default 4 MiB). Replies wait for
    /// room; an event that does not fit disconnects the client.
    pub max_queued_output: usize,
    /// How long a closing connection may take to flush its queued output
    /// (default 2 s).
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_clients: 64,
            max_message_size: MAX_MESSAGE_SIZE,
            max_queued_output: 4 << 20,
            drain_timeout: Duration::from_secs(2),
        }
    }
}

/// A QMP server, before it is bound to a socket.
///
/// Wire behaviour is QEMU 10.0.2's (texts checked against
/// `qemu-storage-daemon`), except:
/// * no out-of-band capability is offered (`"capabilities": []`);
/// * a message over 64 MiB gets QEMU's error text and the connection is then
///   closed (QEMU itself crashes on such input);
/// * complete requests received before the client closes its sending side
///   are still answered (QEMU drops them);
/// * reply members come in a fixed order (`return`/`error` then `id`) where
///   QEMU's follow its hash table; when a request has several problems QEMU
///   may name a different one first (hash order);
/// * doubles are echoed in shortest round-trip form (`0.1`, `1.0`) where
///   QEMU prints `%.17g`, and numbers overflowing a double are read as `null`.
///
/// Output lines end with `\r\n`, as QEMU's do.
///
/// Threads: one accept thread, and per client a reader thread (which parses
/// and runs its commands) and a writer thread draining the client's bounded
/// output queue. Backpressure (see [`ServerConfig::max_queued_output`]): a
/// client that does not read its replies stops being read from (its reader
/// waits for room, as QEMU suspends such a monitor), which affects no other
/// client; an event that does not fit into a client's queue disconnects that
/// client, so emitting never blocks.
pub struct Server {
    handler: Arc<dyn CommandHandler>,
    config: ServerConfig,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `handler`, with the default configuration.
    pub fn new(handler: impl CommandHandler) -> Self {
        Self::from_arc(Arc::new(handler))
    }

    /// A server for a shared handler.
    pub fn from_arc(handler: Arc<dyn CommandHandler>) -> Self {
        Server {
            handler,
            config: ServerConfig::default(),
        }
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets [`ServerConfig::max_clients`].
    pub fn max_clients(mut self, n: usize) -> Self {
        self.config.max_clients = n;
        self
    }

    /// Binds the socket at `path` (mode 0600; a stale socket there is
    /// replaced, anything else is refused) and starts serving.
    pub fn bind(self, path: impl AsRef<Path>) -> Result<ServerHandle, ServerError> {
        let path = path.as_ref().to_path_buf();
        // The wake-up pipe first: nothing to clean up if it fails.
        let waker = Waker::new().map_err(|source| ServerError::Io {
            what: "pipe",
            path: path.clone(),
            source,
        })?;
        let (listener, file_id) = socket::bind(&path)?;
        let shared = Arc::new(Shared {
            dispatcher: Dispatcher::new(self.handler),
            config: self.config,
            path: path.clone(),
            clients: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            waker,
            finished: Mutex::new(false),
            finished_cv: Condvar::new(),
        });
        let s = shared.clone();
        let accept = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                SERVER_THREAD.with(|t| t.set(true));
                let threads = accept_loop(&s, listener);
                socket::remove_if_ours(&s.path, file_id);
                s.teardown(threads);
            })
            .map_err(|source| {
                socket::remove_if_ours(&path, file_id);
                ServerError::Io {
                    what: "spawning thread",
                    path,
                    source,
                }
            })?;
        log::info!("QMP server listening on {}", shared.path.display());
        Ok(ServerHandle {
            shared,
            accept: Mutex::new(Some(accept)),
        })
    }
}

/// A running server. Dropping it stops the server.
pub struct ServerHandle {
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// A cheap, clonable way to emit events, e.g. for a handler to keep; it does
/// not keep the server alive.
#[derive(Debug, Clone)]
pub struct Emitter(Weak<Shared>);

impl Emitter {
    /// See [`ServerHandle::emit`]; does nothing once the server is gone.
    pub fn emit(&self, event: &str, data: Value) {
        if let Some(shared) = self.0.upgrade() {
            shared.emit(event, &data);
        }
    }
}

impl ServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Sends `{"timestamp": ..., "event": EVENT, "data": DATA}` to every client
    /// that has negotiated capabilities (`data: null` leaves `data` out). Never
    /// blocks on a client: one whose output queue is full is disconnected.
    pub fn emit(&self, event: &str, data: Value) {
        self.shared.emit(event, &data);
    }

    /// An [`Emitter`] for this server.
    pub fn emitter(&self) -> Emitter {
        Emitter(Arc::downgrade(&self.shared))
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        self.shared.clients().len()
    }

    /// Whether the server has stopped, or is stopping.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Stops the server: closes the listener and removes the socket file,
    /// lets each client's queued output drain (up to
    /// [`ServerConfig::drain_timeout`]), closes the clients and joins all
    /// threads. Called from a thread of a QMP server (e.g. in a command
    /// handler), it only starts stopping: that thread cannot be joined from
    /// inside.
    pub fn stop(&self) {
        self.shared.request_stop();
        if SERVER_THREAD.with(|t| t.get()) {
            return;
        }
        self.wait();
    }

    /// Blocks until the server has stopped (by [`stop`](Self::stop) or a
    /// command for which [`CommandHandler::stop_after`] is true).
    pub fn wait(&self) {
        if SERVER_THREAD.with(|t| t.get()) {
            return;
        }
        let handle = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take();
        match handle {
            Some(h) => {
                if h.join().is_err() {
                    log::error!("QMP accept thread panicked");
                    self.shared.set_finished();
                }
            }
            None => {
                let mut done = self
                    .shared
                    .finished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                while !*done {
                    done = self
                        .shared
                        .finished_cv
                        .wait(done)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Shared {
    dispatcher: Dispatcher,
    config: ServerConfig,
    path: PathBuf,
    clients: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    waker: Waker,
    finished: Mutex<bool>,
    finished_cv: Condvar,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One client connection as seen from outside its threads.
struct Conn {
    id: u64,
    stream: UnixStream,
    outbox: Outbox,
    negotiated: AtomicBool,
}

impl Conn {
    /// Disconnects at once, dropping queued output.
    fn kill(&self) {
        self.outbox.abort();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Shared {
    fn clients(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request_stop(&self) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            log::info!("QMP server on {} stopping", self.path.display());
        }
        self.waker.wake();
    }

    fn set_finished(&self) {
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.finished_cv.notify_all();
    }

    fn emit(&self, event: &str, data: &Value) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let line: Line = dispatch::event_line(event, data).into_bytes().into();
        let conns: Vec<Arc<Conn>> = self.clients().values().cloned().collect();
        for conn in conns {
            if !conn.negotiated.load(Ordering::SeqCst) {
                continue;
            }
            if let Err(PushError::Full) = conn.outbox.push_event(line.clone()) {
                log::warn!(
                    "QMP client {} does not read its output; disconnecting it",
                    conn.id
                );
                conn.kill();
            }
        }
    }

    /// After the accept loop: end every connection and join its threads.
    fn teardown(&self, threads: Vec<JoinHandle<()>>) {
        let conns: Vec<Arc<Conn>> = self.clients().values().cloned().collect();
        for conn in &conns {
            // Readers see end-of-file (or stop waiting for room in their
            // output queue); their exit path drains the output.
            conn.outbox.finish();
            let _ = conn.stream.shutdown(std::net::Shutdown::Read);
        }
        drop(conns);
        for t in threads {
            if t.join().is_err() {
                log::error!("QMP client thread panicked");
            }
        }
        log::info!("QMP server on {} stopped", self.path.display());
        self.set_finished();
    }

    /// Takes a new connection, or turns it away when there are too many.
    fn admit(self: &Arc<Self>, stream: UnixStream, threads: &mut Vec<JoinHandle<()>>) {
        let _ = stream.set_nonblocking(false);
        let mut clients = self.clients();
        if clients.len() >= self.config.max_clients {
            drop(clients);
            log::warn!(
                "QMP server on {}: too many clients (limit {}), refusing one",
                self.path.display(),
                self.config.max_clients
            );
            let line = dispatch::error_reply(
                &crate::QmpError::generic(format!(
                    "Too many QMP connections (limit {})",
                    self.config.max_clients
                )),
                None,
            );
            let _ = stream.set_nonblocking(true);
            let _ = send_all(&stream, line.as_bytes());
            return;
        }
        let read_half = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("QMP: cannot duplicate client socket: {e}");
                return;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            stream,
            outbox: Outbox::new(self.config.max_queued_output),
            negotiated: AtomicBool::new(false),
        });
        clients.insert(id, conn.clone());
        drop(clients);
        let shared = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("qmp-client-{id}"))
            .spawn(move || client_main(&shared, &conn, read_half));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                log::warn!("QMP: cannot spawn client thread: {e}");
                if let Some(conn) = self.clients().remove(&id) {
                    conn.kill();
                }
            }
        }
    }
}

/// Accepts connections until the server stops; returns the client threads.
fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) -> Vec<JoinHandle<()>> {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopping.load(Ordering::SeqCst) {
        if let Err(e) = shared.waker.wait(&listener) {
            log::error!("QMP: poll: {e}");
            thread::sleep(Duration::from_millis(100));
        }
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => shared.admit(stream, &mut threads),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    log::warn!("QMP: accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
        let (done, live): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| t.is_finished());
        threads = live;
        for t in done {
            if t.join().is_err() {
                log::error!("QMP client thread panicked");
            }
        }
    }
    threads
}

/// A client's reader thread: greeting, then parse and dispatch until the
/// client goes away or the server stops; then drain and close.
fn client_main(shared: &Shared, conn: &Arc<Conn>, mut stream: UnixStream) {
    SERVER_THREAD.with(|t| t.set(true));
    let writer = match stream.try_clone().and_then(|w| {
        let c = conn.clone();
        thread::Builder::new()
            .name(format!("qmp-writer-{}", conn.id))
            .spawn(move || writer_main(&c, w))
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("QMP: cannot start writer for client {}: {e}", conn.id);
            conn.kill();
            None
        }
    };
    log::debug!("QMP client {} connected", conn.id);
    let greeting: Line = shared.dispatcher.greeting().into_bytes().into();
    let _ = conn.outbox.push_reply(greeting);
    let mut session = Session::default();
    let mut streamer = JsonStreamer::with_max_size(shared.config.max_message_size);
    let mut buf = vec![0u8; 64 * 1024];
    while writer.is_some() && !shared.stopping.load(Ordering::SeqCst) {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("QMP client {}: read: {e}", conn.id);
                break;
            }
        };
        let flow = streamer.feed(&buf[..n], &mut |msg| {
            if shared.stopping.load(Ordering::SeqCst) {
                return ControlFlow::Break(());
            }
            let fatal = matches!(msg, Message::Fatal(_));
            let out = shared.dispatcher.handle(&mut session, msg);
            if conn
                .outbox
                .push_reply(out.reply.into_bytes().into())
                .is_err()
            {
                return ControlFlow::Break(());
            }
            if session.negotiated {
                // Only after the reply, so no event precedes it.
                conn.negotiated.store(true, Ordering::SeqCst);
            }
            if out.stop {
                shared.request_stop();
                return ControlFlow::Break(());
            }
            if fatal {
                log::warn!("QMP client {}: request too large; disconnecting", conn.id);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        if flow.is_break() {
            break;
        }
    }
    conn.outbox.close();
    if !conn.outbox.wait_writer_done(shared.config.drain_timeout) {
        log::debug!("QMP client {}: output not drained in time", conn.id);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Some(w) = writer {
        let _ = w.join();
    }
    shared.clients().remove(&conn.id);
    log::debug!("QMP client {} disconnected", conn.id);
}

/// A client's writer thread.
fn writer_main(conn: &Conn, stream: UnixStream) {
    SERVER_THREAD.with(|t| t.set(true));
    while let Some(line) = conn.outbox.pop() {
        if let Err(e) = send_all(&stream, &line) {
            log::debug!("QMP client {}: write: {e}", conn.id);
            let _ = stream.shutdown(std::net::Shutdown::Both);
            break;
        }
    }
    conn.outbox.writer_done();
}

/// Writes all of `buf` without raising SIGPIPE when the peer is gone.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        // SAFETY: sends from a valid buffer of `buf.len()` bytes on an open
        // socket descriptor owned by `stream`.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}
