//! NBD exports of the served disk: the embedded NBD server (`nbd-server-start`/`-stop`),
//! its exports (`block-export-add`/`-del`, `query-block-exports`) and the point-in-time
//! views behind snapshot exports. QEMU's error texts where QEMU has the same error.
//!
//! An export that names bitmaps marks them busy for its lifetime (as QEMU does), so they
//! cannot change under a backup tool. A snapshot export starts its view at the commit of
//! a bitmap transaction, so "add a new bitmap, stop the old one, start the view" is one
//! instant for every guest write (see [`crate::device::BlkDevice::begin_write`]).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};
use qcow2_bitmaps::Action;
use serde_json::{json, Value};

use crate::bitmaps::{BitmapError, PersistentBitmaps};
use crate::device::BlkDevice;
use crate::nbd_export::DiskExport;
use crate::snapshot::{PitView, ViewError};

/// How long a safe `block-export-del` waits for clients that are disconnecting.
const SAFE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A unix socket (created 0600; never replaces a file that is not a dead socket).
    Unix(PathBuf),
    /// A TCP address; the host must be given (there is no default on all interfaces).
    Inet {
        /// Host name or address.
        host: String,
        /// Port (a number, or 0 for any).
        port: String,
    },
}

/// What `block-export-add` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSpec {
    /// The export's id (for `block-export-del`).
    pub id: String,
    /// The NBD export name.
    pub name: String,
    /// Free text shown to clients.
    pub description: Option<String>,
    /// Clients may write.
    pub writable: bool,
    /// Bitmaps exported as `qemu:dirty-bitmap:NAME` contexts.
    pub bitmaps: Vec<String>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Export the disk as it is at the moment the export is added (copy-before-write).
    pub snapshot: bool,
}

/// Why an export operation failed (QEMU's texts where it has one).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// `nbd-server-start` twice.
    #[error("NBD server already running")]
    ServerRunning,
    /// An export without a server.
    #[error("NBD server not running")]
    ServerNotRunning,
    /// The listening socket could not be set up.
    #[error("Failed to listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// `block-export-add` with an id in use.
    #[error("Block export id '{0}' is already in use")]
    IdInUse(String),
    /// `block-export-add` with an export name in use.
    #[error("NBD server already has export named '{0}'")]
    NameInUse(String),
    /// `block-export-del` of an unknown id.
    #[error("Export '{0}' is not found")]
    NotFound(String),
    /// `block-export-del` (mode safe) while clients are connected.
    #[error("export '{0}' still in use")]
    InUse(String),
    /// An exported bitmap that does not exist.
    #[error("Bitmap '{0}' is not found")]
    NoBitmap(String),
    /// Bitmaps asked of an image that has none.
    #[error("Dirty bitmaps are only supported on qcow2 images")]
    NoBitmaps,
    /// A writable export of a read-only node.
    #[error("Cannot export read-only node as writable")]
    ReadOnlyNode,
    /// Our extension's limit: a point-in-time view is read-only.
    #[error("A point-in-time (x-snapshot) export cannot be writable")]
    WritableSnapshot,
    /// The bitmap transaction failed.
    #[error("{0}")]
    Bitmaps(#[from] BitmapError),
    /// The view's fleecing store could not be created.
    #[error("{0}")]
    View(#[from] ViewError),
    /// The NBD layer refused.
    #[error("{0}")]
    Nbd(#[from] nbd::NbdError),
}

/// A running NBD server.
#[derive(Debug)]
struct Running {
    server: nbd::Server,
    /// The unix socket we created, removed at stop if it is still ours.
    socket: Option<(PathBuf, qmp::FileId)>,
    addr: String,
}

/// One export.
#[derive(Debug)]
struct Record {
    name: String,
    bitmaps: Vec<String>,
    view: Option<Arc<PitView>>,
    writable: bool,
}

#[derive(Debug, Default)]
struct State {
    server: Option<Running>,
    exports: BTreeMap<String, Record>,
}

/// Sends an event to QMP clients (set once the control socket is up).
pub type EventSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// The exports of the served disk.
pub struct Exports {
    node: String,
    device: Arc<BlkDevice>,
    bitmaps: Option<Arc<PersistentBitmaps>>,
    fleece_dir: PathBuf,
    chunk: u64,
    state: Mutex<State>,
    events: Arc<Mutex<Option<EventSink>>>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("node", &self.node)
            .field("fleece_dir", &self.fleece_dir)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Exports {
    /// Exports of `device` (node `node`); snapshot views keep their stores in
    /// `fleece_dir` and preserve `chunk`-byte units (the image's cluster size).
    pub fn new(
        node: &str,
        device: Arc<BlkDevice>,
        bitmaps: Option<Arc<PersistentBitmaps>>,
        fleece_dir: PathBuf,
        chunk: u64,
    ) -> Self {
        Exports {
            node: node.to_string(),
            device,
            bitmaps,
            fleece_dir,
            chunk,
            state: Mutex::new(State::default()),
            events: Arc::new(Mutex::new(None)),
        }
    }

    /// Where events go (`BLOCK_EXPORT_DELETED`, `BLOCK_EXPORT_SNAPSHOT_BROKEN`).
    pub fn set_event_sink(&self, sink: EventSink) {
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    fn emit(&self, event: &str, data: Value) {
        emit(&self.events, event, data);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node the exports serve.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Starts the NBD server on `addr`.
    pub fn start_server(&self, addr: &NbdAddr, max_clients: usize) -> Result<(), ExportError> {
        let mut st = self.lock();
        if st.server.is_some() {
            return Err(ExportError::ServerRunning);
        }
        let server = nbd::Server::new(nbd::ServerOptions {
            max_clients,
            ..Default::default()
        });
        let (socket, shown) = match addr {
            NbdAddr::Unix(path) => {
                let (listener, id) =
                    qmp::bind_private_socket(path).map_err(|e| ExportError::Listen {
                        addr: path.display().to_string(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                server
                    .serve_unix(listener)
                    .map_err(|source| ExportError::Listen {
                        addr: path.display().to_string(),
                        source,
                    })?;
                (Some((path.clone(), id)), format!("unix:{}", path.display()))
            }
            NbdAddr::Inet { host, port } => {
                let shown = format!("{host}:{port}");
                let listen = |source| ExportError::Listen {
                    addr: shown.clone(),
                    source,
                };
                let port: u16 = port.parse().map_err(|_| {
                    listen(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "the port must be a number",
                    ))
                })?;
                let listener = TcpListener::bind((host.as_str(), port)).map_err(listen)?;
                let local = listener.local_addr().map_err(listen)?;
                server.serve_tcp(listener).map_err(listen)?;
                (None, format!("tcp:{local}"))
            }
        };
        info!("NBD server listening on {shown}");
        st.server = Some(Running {
            server,
            socket,
            addr: shown,
        });
        Ok(())
    }

    /// Stops the NBD server: every export goes (its clients are disconnected).
    pub fn stop_server(&self) -> Result<(), ExportError> {
        let ids: Vec<String> = {
            let st = self.lock();
            if st.server.is_none() {
                return Err(ExportError::ServerNotRunning);
            }
            st.exports.keys().cloned().collect()
        };
        for id in ids {
            if let Err(e) = self.remove(&id, nbd::RemoveMode::Hard) {
                warn!("removing export '{id}': {e}");
            }
        }
        let running = self.lock().server.take();
        if let Some(r) = running {
            r.server.shutdown();
            if let Some((path, id)) = r.socket {
                qmp::remove_socket_if_ours(&path, id);
            }
            info!("NBD server on {} stopped", r.addr);
        }
        Ok(())
    }

    /// Stops everything (daemon exit); idempotent.
    pub fn shutdown(&self) {
        if self.lock().server.is_some() {
            let _ = self.stop_server();
        }
    }

    /// Adds an export; `actions` (bitmap actions of the same transaction) take effect at
    /// the same instant as a snapshot export's view and the busy marks of its bitmaps.
    pub fn add(&self, spec: &ExportSpec, actions: &[Action<'_>]) -> Result<(), ExportError> {
        let mut st = self.lock();
        let Some(running) = &st.server else {
            return Err(ExportError::ServerNotRunning);
        };
        if st.exports.contains_key(&spec.id) {
            return Err(ExportError::IdInUse(spec.id.clone()));
        }
        if st.exports.values().any(|r| r.name == spec.name) {
            return Err(ExportError::NameInUse(spec.name.clone()));
        }
        if spec.writable && spec.snapshot {
            return Err(ExportError::WritableSnapshot);
        }
        if spec.writable && self.device.image().is_read_only() {
            return Err(ExportError::ReadOnlyNode);
        }
        if self.bitmaps.is_none() && (!spec.bitmaps.is_empty() || !actions.is_empty()) {
            return Err(ExportError::NoBitmaps);
        }
        let view = if spec.snapshot {
            let events = self.events.clone();
            let (id, node) = (spec.id.clone(), self.node.clone());
            let on_break = Box::new(move |why: &str| {
                emit(
                    &events,
                    "BLOCK_EXPORT_SNAPSHOT_BROKEN",
                    json!({"id": id, "node-name": node, "reason": why}),
                )
            });
            Some(Arc::new(PitView::new(
                self.device.image().clone(),
                self.chunk,
                &self.fleece_dir,
                on_break,
            )?))
        } else {
            None
        };
        let mut exported = Vec::new();
        if let Some(set) = &self.bitmaps {
            // Bitmaps named by the export must exist once the actions ran (QEMU's text).
            let mut all: Vec<Action<'_>> = actions.to_vec();
            for b in &spec.bitmaps {
                all.push(Action::Busy { name: b });
            }
            let views = self.device.views();
            let mut start_view = || {
                if let Some(v) = &view {
                    views.add(v.clone());
                }
            };
            set.transaction_with(&all, &mut start_view)
                .map_err(|e| match e {
                    BitmapError::Action(qcow2_bitmaps::Error::NotFound(n))
                        if spec.bitmaps.contains(&n) && !names_in(actions, &n) =>
                    {
                        ExportError::NoBitmap(n)
                    }
                    other => ExportError::Bitmaps(other),
                })?;
            for b in &spec.bitmaps {
                match set.bitmaps().bitmap(b) {
                    Ok(bm) => exported.push((b.clone(), bm)),
                    Err(e) => {
                        self.undo(&spec.bitmaps, &view, false);
                        return Err(ExportError::Bitmaps(BitmapError::Action(e)));
                    }
                }
            }
        } else if let Some(v) = &view {
            self.device.views().add(v.clone());
        }
        let writer = spec.writable && self.bitmaps.is_some();
        if writer {
            if let Err(e) = self
                .bitmaps
                .as_ref()
                .map_or(Ok(()), |b| b.writer_attached())
            {
                self.undo(&spec.bitmaps, &view, false);
                return Err(e.into());
            }
        }
        let export = DiskExport::new(
            self.device.clone(),
            view.clone(),
            exported,
            spec.allocation_depth,
            spec.writable,
            spec.description.clone(),
        );
        if let Err(e) = running.server.add_export(&spec.name, Arc::new(export)) {
            self.undo(&spec.bitmaps, &view, writer);
            return Err(e.into());
        }
        info!(
            "NBD export '{}' (id '{}'{}{}{}) added",
            spec.name,
            spec.id,
            if spec.writable { ", writable" } else { "" },
            if spec.snapshot { ", point in time" } else { "" },
            if spec.bitmaps.is_empty() {
                String::new()
            } else {
                format!(", bitmaps {}", spec.bitmaps.join(","))
            }
        );
        st.exports.insert(
            spec.id.clone(),
            Record {
                name: spec.name.clone(),
                bitmaps: spec.bitmaps.clone(),
                view,
                writable: writer,
            },
        );
        Ok(())
    }

    /// Releases what an export held: busy marks, its view, its writer reference.
    fn undo(&self, bitmaps: &[String], view: &Option<Arc<PitView>>, writer: bool) {
        if let Some(v) = view {
            self.device.views().remove(v);
        }
        if let Some(set) = &self.bitmaps {
            for b in bitmaps {
                let _ = set.bitmaps().set_busy(b, false);
            }
            if writer {
                if let Err(e) = set.writer_detached() {
                    warn!("{e}");
                }
            }
        }
    }

    /// Removes an export: `Safe` refuses while clients are connected, `Hard` disconnects
    /// them and returns once none of their requests runs any more. Its view's store is
    /// freed and its bitmaps are no longer busy.
    pub fn remove(&self, id: &str, mode: nbd::RemoveMode) -> Result<(), ExportError> {
        let mut st = self.lock();
        let Some(rec) = st.exports.get(id) else {
            return Err(ExportError::NotFound(id.to_string()));
        };
        if let Some(r) = &st.server {
            // A client that just went away may not have been seen leaving yet: in safe
            // mode, give such clients a moment (a backup tool deletes its export right
            // after its copy exits) before saying the export is in use.
            let deadline = std::time::Instant::now() + SAFE_GRACE;
            loop {
                match r.server.remove_export(&rec.name, mode) {
                    Ok(()) | Err(nbd::NbdError::NoSuchExport(_)) => break,
                    Err(nbd::NbdError::InUse(_)) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(nbd::NbdError::InUse(_)) => return Err(ExportError::InUse(id.to_string())),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let rec = st.exports.remove(id).expect("present");
        drop(st);
        self.undo(&rec.bitmaps, &rec.view, rec.writable);
        info!("NBD export '{}' (id '{id}') removed", rec.name);
        self.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
        Ok(())
    }

    /// `query-block-exports` (plus `x-fleece-bytes` and `x-snapshot-broken` for
    /// point-in-time exports).
    pub fn query(&self) -> Value {
        let st = self.lock();
        Value::Array(
            st.exports
                .iter()
                .map(|(id, rec)| {
                    let mut v = json!({
                        "type": "nbd",
                        "id": id,
                        "node-name": self.node,
                        "shutting-down": false,
                    });
                    // Our extension: how much the point-in-time view has copied, and
                    // whether it broke.
                    if let Some(view) = &rec.view {
                        v["x-fleece-bytes"] = json!(view.stored_bytes());
                        if let Some(why) = view.broken() {
                            v["x-snapshot-broken"] = json!(why);
                        }
                    }
                    v
                })
                .collect(),
        )
    }

    /// The point-in-time view of an export, if it has one (for tests and statistics).
    pub fn view(&self, id: &str) -> Option<Arc<PitView>> {
        self.lock().exports.get(id).and_then(|r| r.view.clone())
    }
}

/// Whether `actions` name bitmap `n` (an error about it then belongs to the action).
fn names_in(actions: &[Action<'_>], n: &str) -> bool {
    actions.iter().any(|a| match a {
        Action::Add { name, .. }
        | Action::Remove { name }
        | Action::Clear { name }
        | Action::Enable { name }
        | Action::Disable { name }
        | Action::Busy { name } => *name == n,
        Action::Merge { target, .. } => *target == n,
    })
}

fn emit(events: &Mutex<Option<EventSink>>, event: &str, data: Value) {
    let sink = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(s) = sink {
        s(event, data);
    }
}
