//! The server: export registry, listener threads and client connections.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, BufReader};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::export::Export;
use crate::handshake::{self, Outcome};
use crate::proto::MAX_STRING;
use crate::session::{self, ReplyWriter, Session, SocketIo};
use crate::socket::{self, Listener, Stream, Wakeup};
use crate::NbdError;

/// How long a client may take over the handshake (QEMU's default `handshake-max-seconds`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Connections served at once (handshaking ones included); more are closed at once.
    pub max_clients: usize,
    /// Requests of one client executed concurrently (worker threads per client, started
    /// on demand). Also bounds a client's memory: each request holds at most 32 MiB.
    pub workers_per_client: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_clients: 100,
            workers_per_client: 8,
        }
    }
}

/// How [`Server::remove_export`] treats clients still using the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Fail with [`NbdError::InUse`] while a client has the export selected.
    Safe,
    /// Disconnect the export's clients and wait until none of their requests is still
    /// running in an [`Export`] method.
    Hard,
}

/// An NBD server: a registry of named exports served on any number of unix and TCP
/// listeners. Cloning gives another handle to the same server; dropping the last handle
/// shuts it down.
#[derive(Clone)]
pub struct Server {
    handle: Arc<Handle>,
}

/// Shuts the server down when the last [`Server`] handle goes (threads hold [`Shared`]
/// only, so they do not keep it alive).
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.handle.shared.lock();
        let exports: BTreeMap<&str, usize> = st
            .exports
            .iter()
            .map(|(n, e)| (n.as_str(), e.clients.load(Ordering::Relaxed)))
            .collect();
        f.debug_struct("Server")
            .field("options", &self.handle.shared.options)
            .field("exports", &exports)
            .field("connections", &st.conns.len())
            .field("shutting_down", &st.shutting_down)
            .finish()
    }
}

impl Server {
    /// A server with no export and no listener.
    pub fn new(options: ServerOptions) -> Server {
        let options = ServerOptions {
            max_clients: options.max_clients,
            workers_per_client: options.workers_per_client.max(1),
        };
        Server {
            handle: Arc::new(Handle {
                shared: Arc::new(Shared {
                    state: Mutex::new(State::default()),
                    changed: Condvar::new(),
                    options,
                    wakeup: OnceLock::new(),
                    listeners: Mutex::new(Vec::new()),
                }),
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Makes `export` available as `name` (at most 4096 bytes, no NUL). Clients that ask
    /// for the empty name get the export named "" or, if there is none, the only export.
    pub fn add_export(&self, name: &str, export: Arc<dyn Export>) -> Result<(), NbdError> {
        if name.len() > MAX_STRING || name.contains('\0') {
            return Err(NbdError::InvalidName(name.to_string()));
        }
        let shared = &self.handle.shared;
        let mut st = shared.lock();
        if st.exports.contains_key(name) {
            return Err(NbdError::ExportExists(name.to_string()));
        }
        st.next_id += 1;
        let entry = Arc::new(ExportEntry {
            id: st.next_id,
            name: name.to_string(),
            export,
            leases: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
        });
        st.exports.insert(name.to_string(), entry);
        log::info!("nbd: export '{name}' added");
        Ok(())
    }

    /// Removes an export. New clients cannot select it from the moment the call starts.
    /// [`RemoveMode::Safe`] fails with [`NbdError::InUse`] if a client has it selected;
    /// [`RemoveMode::Hard`] shuts the sockets of those clients down. Either way the call
    /// returns only when no thread of the server is still inside a method of the export
    /// (so the caller may free what it uses). Clients of [`crate::serve_stream`] cannot be
    /// disconnected: a hard removal waits for their session to end.
    pub fn remove_export(&self, name: &str, mode: RemoveMode) -> Result<(), NbdError> {
        let shared = &self.handle.shared;
        let mut st = shared.lock();
        let entry = match st.exports.get(name) {
            Some(e) => e.clone(),
            None => return Err(NbdError::NoSuchExport(name.to_string())),
        };
        if mode == RemoveMode::Safe && entry.clients.load(Ordering::SeqCst) > 0 {
            return Err(NbdError::InUse(name.to_string()));
        }
        st.exports.remove(name);
        if mode == RemoveMode::Hard {
            let mut n = 0;
            for conn in st.conns.values() {
                if conn.export == Some(entry.id) {
                    conn.kill();
                    n += 1;
                }
            }
            if n > 0 {
                log::info!("nbd: export '{name}': disconnecting {n} client(s)");
            }
        }
        while entry.leases.load(Ordering::SeqCst) > 0 {
            st = shared.wait(st);
        }
        log::info!("nbd: export '{name}' removed");
        Ok(())
    }

    /// The names of the exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.handle.shared.lock().exports.keys().cloned().collect()
    }

    /// How many clients have selected export `name` (with `NBD_OPT_GO` or
    /// `NBD_OPT_EXPORT_NAME`) and are still connected; 0 for an unknown name.
    pub fn client_count(&self, name: &str) -> usize {
        self.handle
            .shared
            .lock()
            .exports
            .get(name)
            .map_or(0, |e| e.clients.load(Ordering::SeqCst))
    }

    /// Serves clients connecting to `listener` from a new thread, until [`Server::shutdown`].
    pub fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        self.handle.shared.serve(Listener::Unix(listener))
    }

    /// Serves clients connecting to `listener` (with `TCP_NODELAY`) from a new thread,
    /// until [`Server::shutdown`].
    pub fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        self.handle.shared.serve(Listener::Tcp(listener))
    }

    /// Stops accepting, disconnects every client and joins all threads; idempotent.
    /// Waits for requests still running in [`Export`] methods, so it must not be called
    /// from inside one. Also done when the last handle is dropped.
    pub fn shutdown(&self) {
        self.handle.shared.shutdown();
    }
}

/// One registered export.
pub(crate) struct ExportEntry {
    /// Unique for the life of the server (a re-added name gets a new id).
    id: u64,
    name: String,
    export: Arc<dyn Export>,
    /// Live [`Lease`]s; changed under the state lock.
    leases: AtomicUsize,
    /// Live client leases (sessions that selected the export); changed under the lock.
    clients: AtomicUsize,
}

/// One accepted connection.
struct Conn {
    /// A handle of the socket, to shut it down.
    stream: Stream,
    /// Set when the server disconnects it: queued requests are dropped, not run.
    killed: Arc<AtomicBool>,
    /// The export it selected, by [`ExportEntry::id`].
    export: Option<u64>,
}

impl Conn {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.stream.shutdown();
    }
}

#[derive(Default)]
struct State {
    exports: BTreeMap<String, Arc<ExportEntry>>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    shutting_down: bool,
}

/// What every thread of a server shares.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled whenever a lease or a connection ends.
    changed: Condvar,
    options: ServerOptions,
    wakeup: OnceLock<Wakeup>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// Export names, sorted.
    pub(crate) fn export_names(&self) -> Vec<String> {
        self.lock().exports.keys().cloned().collect()
    }

    /// Holds export `name` (the empty name: the export "" or the only one) so that a
    /// removal waits until the lease is dropped. With `conn`, the lease is a client's:
    /// counted by [`Server::client_count`], and a hard removal disconnects `conn`
    /// (`Some(None)` is a client without a socket, from [`crate::serve_stream`]).
    pub(crate) fn lease(
        self: &Arc<Self>,
        name: &[u8],
        client: Option<Option<u64>>,
    ) -> Option<Lease> {
        let name = std::str::from_utf8(name).ok()?;
        let mut st = self.lock();
        let entry = match st.exports.get(name) {
            Some(e) => e.clone(),
            None if name.is_empty() && st.exports.len() == 1 => {
                st.exports.values().next().cloned()?
            }
            None => return None,
        };
        entry.leases.fetch_add(1, Ordering::SeqCst);
        let mut conn = None;
        if let Some(c) = client {
            entry.clients.fetch_add(1, Ordering::SeqCst);
            if let Some(id) = c {
                if let Some(cn) = st.conns.get_mut(&id) {
                    cn.export = Some(entry.id);
                }
                conn = Some(id);
            }
        }
        Some(Lease {
            shared: self.clone(),
            entry,
            client: client.is_some(),
            conn,
        })
    }

    fn serve(self: &Arc<Self>, listener: Listener) -> io::Result<()> {
        if self.is_shutting_down() {
            return Err(io::Error::other(NbdError::ShutDown));
        }
        let wake_fd = match self.wakeup.get() {
            Some(w) => w.raw_fd(),
            None => {
                let w = Wakeup::new()?;
                // Another thread may have won the race; either eventfd works.
                let _ = self.wakeup.set(w);
                self.wakeup
                    .get()
                    .map(Wakeup::raw_fd)
                    .expect("wakeup was just set")
            }
        };
        listener.set_nonblocking()?;
        let shared = self.clone();
        let handle = thread::Builder::new()
            .name("nbd-listen".into())
            .spawn(move || shared.accept_loop(listener, wake_fd))?;
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.push(handle);
        // A shutdown that ran while we were spawning has already joined the others; the
        // new thread sees the wakeup and ends, and is joined by the next shutdown or here.
        if self.is_shutting_down() {
            for h in listeners.drain(..) {
                let _ = h.join();
            }
        }
        Ok(())
    }

    fn accept_loop(self: Arc<Self>, listener: Listener, wake_fd: i32) {
        log::debug!("nbd: listener started");
        loop {
            if self.is_shutting_down() {
                break;
            }
            match socket::poll_two(listener.raw_fd(), wake_fd) {
                Ok((_, true)) => break,
                Ok((false, false)) => continue,
                Ok((true, false)) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("nbd: poll on listener failed: {e}");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            loop {
                match listener.accept() {
                    Ok(stream) => self.new_connection(stream),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        log::warn!("nbd: accept failed: {e}");
                        thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
        log::debug!("nbd: listener stopped");
    }

    fn new_connection(self: &Arc<Self>, stream: Stream) {
        let peer = stream.peer();
        let closer = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("nbd: dropping connection from {peer}: {e}");
                return;
            }
        };
        let killed = Arc::new(AtomicBool::new(false));
        let id = {
            let mut st = self.lock();
            if st.shutting_down {
                return;
            }
            if st.conns.len() >= self.options.max_clients {
                log::warn!(
                    "nbd: refusing connection from {peer}: {} clients already",
                    st.conns.len()
                );
                return;
            }
            st.next_id += 1;
            let id = st.next_id;
            st.conns.insert(
                id,
                Conn {
                    stream: closer,
                    killed: killed.clone(),
                    export: None,
                },
            );
            id
        };
        log::debug!("nbd: client {id} connected from {peer}");
        let shared = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("nbd-client-{id}"))
            .spawn(move || {
                // Unregisters the connection even if serving it panics, so that
                // shutdown() does not wait for it forever.
                let guard = ConnGuard { shared, id };
                guard.shared.run_connection(id, stream, killed);
            });
        if let Err(e) = spawned {
            log::error!("nbd: cannot start a thread for client {id}: {e}");
            self.remove_conn(id);
        }
    }

    fn remove_conn(&self, id: u64) {
        let mut st = self.lock();
        if let Some(c) = st.conns.remove(&id) {
            c.stream.shutdown();
        }
        self.changed.notify_all();
    }

    fn run_connection(self: &Arc<Self>, id: u64, stream: Stream, killed: Arc<AtomicBool>) {
        match self.serve_connection(id, stream, killed) {
            Ok(()) => log::debug!("nbd: client {id} finished"),
            Err(NbdError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                log::debug!("nbd: client {id} went away: {e}")
            }
            Err(e) => log::info!("nbd: client {id} disconnected: {e}"),
        }
    }

    fn serve_connection(
        self: &Arc<Self>,
        id: u64,
        stream: Stream,
        killed: Arc<AtomicBool>,
    ) -> Result<(), NbdError> {
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let closer = stream.try_clone()?;
        let writer = stream.writer()?;
        let mut io = SocketIo {
            reader: BufReader::new(stream),
            writer,
        };
        let negotiated = match handshake::negotiate(&mut io, self, Some(id))? {
            Outcome::Aborted => return Ok(()),
            Outcome::Transmission(n) => n,
        };
        closer.set_read_timeout(None)?;
        log::debug!(
            "nbd: client {id} uses export '{}' (structured replies: {}, contexts: {:?})",
            negotiated.lease.name(),
            negotiated.structured,
            negotiated
                .contexts
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
        );
        let session = Arc::new(Session::new(negotiated));
        let SocketIo { mut reader, writer } = io;
        let writer = Arc::new(ReplyWriter::new(Box::new(writer), Some(closer), killed));
        session::run_threaded(
            &mut reader,
            writer,
            session,
            self.options.workers_per_client,
        )
    }

    fn shutdown(&self) {
        {
            let mut st = self.lock();
            if !st.shutting_down {
                log::info!("nbd: shutting down");
            }
            st.shutting_down = true;
        }
        if let Some(w) = self.wakeup.get() {
            w.signal();
        }
        let handles: Vec<_> = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for h in handles {
            let _ = h.join();
        }
        let mut st = self.lock();
        for c in st.conns.values() {
            c.kill();
        }
        while !st.conns.is_empty() {
            st = self.wait(st);
        }
    }
}

/// Removes a connection from the registry when its thread ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.remove_conn(self.id);
    }
}

/// Keeps an export from being removed while handshake or transmission code may call it.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    entry: Arc<ExportEntry>,
    client: bool,
    conn: Option<u64>,
}

impl Lease {
    /// The export (valid as long as the lease).
    pub(crate) fn export(&self) -> &dyn Export {
        &*self.entry.export
    }

    /// Its canonical name.
    pub(crate) fn name(&self) -> &str {
        &self.entry.name
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if self.client {
            self.entry.clients.fetch_sub(1, Ordering::SeqCst);
            if let Some(id) = self.conn {
                if let Some(c) = st.conns.get_mut(&id) {
                    c.export = None;
                }
            }
        }
        self.entry.leases.fetch_sub(1, Ordering::SeqCst);
        drop(st);
        self.shared.changed.notify_all();
    }
}
