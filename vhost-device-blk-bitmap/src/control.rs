//! Run-time control: the QMP commands of the served disk (one node), with QEMU 10.0's
//! argument and result shapes and error texts. The wire protocol is the `qmp` crate's;
//! this module only knows what the commands do.
//!
//! Bitmap commands go through [`PersistentBitmaps::transaction`], so every one of them
//! (and every `transaction`) is all or nothing and atomic with respect to guest writes.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use qcow2_bitmaps::{Action, AddOptions, Bitmaps, MergeSource};
use qmp::{Args, CommandHandler, QmpError, Version};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::bitmaps::PersistentBitmaps;
use crate::device::BlkDevice;
use crate::disk::ImageFormat;
use crate::exports::{ExportError, ExportSpec, Exports, NbdAddr};
use crate::stats::{Counter, QueueStats};

/// Result of a command.
pub type CommandResult = Result<Value, QmpError>;

/// The version reported to QMP clients: the QEMU release whose QMP shapes we follow.
pub const QEMU_VERSION: (u64, u64, u64) = (10, 0, 0);

/// Every command [`Control::execute`] knows (besides the protocol's own).
pub const COMMANDS: &[&str] = &[
    "query-version",
    "query-status",
    "query-named-block-nodes",
    "query-block",
    "query-blockstats",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "transaction",
    "x-debug-block-dirty-bitmap-sha256",
    "x-bitmap-dump",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "quit",
];

/// The actions `transaction` accepts.
const TRANSACTION_ACTIONS: &[&str] = &[
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
];

/// What the control socket serves.
#[derive(Debug)]
pub struct Control {
    /// The node name of the served disk.
    pub node: String,
    /// Image path (as given).
    pub image: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Cluster size of a qcow2 image.
    pub cluster_size: Option<u64>,
    /// Request queues.
    pub num_queues: usize,
    /// The device (statistics, write cache, size).
    pub device: Arc<BlkDevice>,
    /// The persistent bitmaps (qcow2 images).
    pub bitmaps: Option<Arc<PersistentBitmaps>>,
    /// The NBD server and exports.
    pub exports: Arc<Exports>,
}

/// A parsed bitmap action (owned, before it becomes a [`qcow2_bitmaps::Action`]).
#[derive(Debug)]
enum Parsed {
    Add {
        name: String,
        opts: AddOptions,
    },
    Remove(String),
    Clear(String),
    Enable(String),
    Disable(String),
    Merge {
        target: String,
        sources: Vec<String>,
    },
}

impl Control {
    /// Runs one command (the protocol's own, `qmp_capabilities`, `query-commands` and
    /// `query-version`, are answered by the wire layer).
    pub fn execute(&self, name: &str, args: &Map<String, Value>) -> CommandResult {
        let a = Args::new(args);
        match name {
            "query-version" => {
                a.reject_unexpected(&[])?;
                Ok(self.version().to_json())
            }
            "query-status" => {
                a.reject_unexpected(&[])?;
                Ok(json!({"status": "running", "running": true}))
            }
            "query-named-block-nodes" => {
                a.opt_bool("flat")?;
                a.reject_unexpected(&["flat"])?;
                Ok(json!([self.node_info()]))
            }
            "query-block" => {
                a.reject_unexpected(&[])?;
                Ok(json!([{
                    "device": "",
                    "qdev": "vhost-user-blk",
                    "locked": false,
                    "removable": false,
                    "type": "unknown",
                    "inserted": self.node_info(),
                }]))
            }
            "query-blockstats" => {
                a.opt_bool("query-nodes")?;
                a.reject_unexpected(&["query-nodes"])?;
                Ok(json!([self.blockstats()]))
            }
            "block-dirty-bitmap-add"
            | "block-dirty-bitmap-remove"
            | "block-dirty-bitmap-clear"
            | "block-dirty-bitmap-enable"
            | "block-dirty-bitmap-disable"
            | "block-dirty-bitmap-merge" => {
                let action = self.parse_action(name, &a)?;
                self.run(vec![action])?;
                Ok(json!({}))
            }
            "transaction" => {
                let actions = a.req_array("actions")?;
                a.opt_object("properties")?;
                a.reject_unexpected(&["actions", "properties"])?;
                let mut parsed = Vec::with_capacity(actions.len());
                let mut export = None;
                for item in actions.iter() {
                    let act = item.as_object()?;
                    // QEMU names the union's discriminator plainly, without its path.
                    let ty = act.req_str("type")?;
                    let data = act.req_object("data")?;
                    if ty == "block-export-add" && export.is_none() {
                        // Our extension: an export (a point-in-time view) that starts at
                        // the same instant as the bitmap actions.
                        act.reject_unexpected(&["type", "data"])?;
                        export = Some(self.parse_export(&data)?);
                        continue;
                    }
                    if !TRANSACTION_ACTIONS.contains(&ty) {
                        return Err(QmpError::invalid_enum_value("type", ty));
                    }
                    act.reject_unexpected(&["type", "data"])?;
                    parsed.push(self.parse_action(ty, &data)?);
                }
                match export {
                    Some(spec) => {
                        let actions = self.actions(&parsed);
                        self.exports.add(&spec, &actions).map_err(export_error)?
                    }
                    None => self.run(parsed)?,
                }
                Ok(json!({}))
            }
            "x-debug-block-dirty-bitmap-sha256" => {
                let (set, name) = self.bitmap_args(&a)?;
                let bm = set.bitmap(name).map_err(bitmap_error)?;
                // QEMU hashes the bitmap's words: ceil(bits / 64) little-endian u64s.
                let words = bm.bit_count().div_ceil(64).max(1);
                let mut bytes = vec![0u8; (words * 8) as usize];
                bm.serialize_into(0, &mut bytes);
                let hash = Sha256::digest(&bytes);
                let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
                Ok(json!({ "sha256": hex }))
            }
            "x-bitmap-dump" => {
                let (set, name) = self.bitmap_args(&a)?;
                let extents = set.dump(name).map_err(bitmap_error)?;
                Ok(Value::Array(
                    extents
                        .iter()
                        .map(|e| json!({"start": e.start, "length": e.length, "dirty": e.dirty}))
                        .collect(),
                ))
            }
            "nbd-server-start" => {
                let addr = a.req_object("addr")?;
                let max = a.opt_u32("max-connections")?;
                if a.get("tls-creds").is_some() || a.get("tls-authz").is_some() {
                    return Err(QmpError::generic("TLS is not supported by this NBD server"));
                }
                a.reject_unexpected(&["addr", "max-connections"])?;
                let addr = parse_addr(&addr)?;
                // QEMU: 0 = unlimited.
                let max = match max {
                    None | Some(0) => 100,
                    Some(n) => n as usize,
                };
                self.exports
                    .start_server(&addr, max)
                    .map_err(export_error)?;
                Ok(json!({}))
            }
            "nbd-server-stop" => {
                a.reject_unexpected(&[])?;
                self.exports.stop_server().map_err(export_error)?;
                Ok(json!({}))
            }
            "block-export-add" => {
                let spec = self.parse_export(&a)?;
                self.exports.add(&spec, &[]).map_err(export_error)?;
                Ok(json!({}))
            }
            "block-export-del" => {
                let id = a.req_str("id")?;
                let mode = a.opt_enum("mode", &["safe", "hard"])?;
                a.reject_unexpected(&["id", "mode"])?;
                let mode = if mode == Some("hard") {
                    nbd::RemoveMode::Hard
                } else {
                    nbd::RemoveMode::Safe
                };
                self.exports.remove(id, mode).map_err(export_error)?;
                Ok(json!({}))
            }
            "query-block-exports" => {
                a.reject_unexpected(&[])?;
                Ok(self.exports.query())
            }
            "quit" => {
                a.reject_unexpected(&[])?;
                Ok(json!({}))
            }
            other => Err(QmpError::command_not_found(format!(
                "The command {other} has not been found"
            ))),
        }
    }

    /// The version announced in the greeting and by `query-version`.
    pub fn version(&self) -> Version {
        let (major, minor, micro) = QEMU_VERSION;
        Version::new(
            major,
            minor,
            micro,
            format!("vhost-device-blk-bitmap {}", env!("CARGO_PKG_VERSION")),
        )
    }

    /// The node's persistent bitmaps, or QEMU's error for an unknown node.
    fn set_for(&self, node: &str) -> Result<&Arc<PersistentBitmaps>, QmpError> {
        if node != self.node {
            return Err(QmpError::generic(format!(
                "Cannot find device='{node}' nor node-name='{node}'"
            )));
        }
        self.bitmaps.as_ref().ok_or_else(|| {
            QmpError::generic(format!(
                "Dirty bitmaps are only supported on qcow2 images; node '{node}' is {}",
                self.format
            ))
        })
    }

    /// `node` and `name` of a bitmap query, nothing else.
    fn bitmap_args<'a>(&self, a: &Args<'a>) -> Result<(&Bitmaps, &'a str), QmpError> {
        let node = a.req_str("node")?;
        let name = a.req_str("name")?;
        a.reject_unexpected(&["node", "name"])?;
        Ok((self.set_for(node)?.bitmaps(), name))
    }

    /// One bitmap command's arguments, in QAPI member order, as QEMU checks them.
    fn parse_action(&self, command: &str, a: &Args<'_>) -> Result<Parsed, QmpError> {
        let node = a.req_str("node")?;
        let parsed = match command {
            "block-dirty-bitmap-add" => {
                let name = a.req_str("name")?.to_string();
                let granularity = a.opt_u32("granularity")?.map(u64::from);
                let persistent = a.opt_bool("persistent")?.unwrap_or(false);
                let disabled = a.opt_bool("disabled")?.unwrap_or(false);
                a.reject_unexpected(&["node", "name", "granularity", "persistent", "disabled"])?;
                Parsed::Add {
                    name,
                    opts: AddOptions {
                        granularity,
                        persistent,
                        disabled,
                    },
                }
            }
            "block-dirty-bitmap-merge" => {
                let target = a.req_str("target")?.to_string();
                let list = a.req_array("bitmaps")?;
                a.reject_unexpected(&["node", "target", "bitmaps"])?;
                let mut sources = Vec::with_capacity(list.len());
                for item in list.iter() {
                    match item.value() {
                        Value::String(s) => sources.push(s.clone()),
                        Value::Object(_) => {
                            let o = item.as_object()?;
                            let n = o.req_str("node")?;
                            let s = o.req_str("name")?;
                            o.reject_unexpected(&["node", "name"])?;
                            if n != self.node {
                                return Err(QmpError::generic(format!("Node '{n}' not found")));
                            }
                            sources.push(s.to_string());
                        }
                        _ => {
                            return Err(QmpError::invalid_parameter_type(
                                item.path(),
                                "BlockDirtyBitmapOrStr",
                            ))
                        }
                    }
                }
                Parsed::Merge { target, sources }
            }
            other => {
                let name = a.req_str("name")?.to_string();
                a.reject_unexpected(&["node", "name"])?;
                match other {
                    "block-dirty-bitmap-remove" => Parsed::Remove(name),
                    "block-dirty-bitmap-clear" => Parsed::Clear(name),
                    "block-dirty-bitmap-enable" => Parsed::Enable(name),
                    _ => Parsed::Disable(name),
                }
            }
        };
        self.set_for(node)?;
        Ok(parsed)
    }

    /// `block-export-add`'s arguments (type nbd), in QAPI member order.
    fn parse_export(&self, a: &Args<'_>) -> Result<ExportSpec, QmpError> {
        a.req_enum("type", &["nbd"])?;
        let id = a.req_str("id")?.to_string();
        let node = a.req_str("node-name")?;
        let writable = a.opt_bool("writable")?.unwrap_or(false);
        a.opt_bool("writethrough")?;
        a.opt_str("iothread")?;
        a.opt_bool("fixed-iothread")?;
        a.opt_bool("allow-inactive")?;
        let name = a.opt_str("name")?.unwrap_or(node).to_string();
        let description = a.opt_str("description")?.map(str::to_string);
        let mut bitmaps = Vec::new();
        if let Some(list) = a.opt_array("bitmaps")? {
            for item in list.iter() {
                match item.value() {
                    Value::String(s) => bitmaps.push(s.clone()),
                    Value::Object(_) => {
                        let o = item.as_object()?;
                        let n = o.req_str("node")?;
                        let b = o.req_str("name")?;
                        o.reject_unexpected(&["node", "name"])?;
                        if n != self.node {
                            return Err(QmpError::generic(format!(
                                "Cannot find device='{n}' nor node-name='{n}'"
                            )));
                        }
                        bitmaps.push(b.to_string());
                    }
                    _ => {
                        return Err(QmpError::invalid_parameter_type(
                            item.path(),
                            "BlockDirtyBitmapOrStr",
                        ))
                    }
                }
            }
        }
        let allocation_depth = a.opt_bool("allocation-depth")?.unwrap_or(false);
        let snapshot = a.opt_bool("x-snapshot")?.unwrap_or(false);
        a.reject_unexpected(&[
            "type",
            "id",
            "node-name",
            "writable",
            "writethrough",
            "iothread",
            "fixed-iothread",
            "allow-inactive",
            "name",
            "description",
            "bitmaps",
            "allocation-depth",
            "x-snapshot",
        ])?;
        if node != self.node {
            return Err(QmpError::generic(format!(
                "Cannot find device='{node}' nor node-name='{node}'"
            )));
        }
        if name.len() > 4096 {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        Ok(ExportSpec {
            id,
            name,
            description,
            writable,
            bitmaps,
            allocation_depth,
            snapshot,
        })
    }

    /// Applies parsed actions as one transaction.
    fn run(&self, parsed: Vec<Parsed>) -> Result<(), QmpError> {
        if parsed.is_empty() {
            return Ok(());
        }
        let set = self.set_for(&self.node)?;
        let actions = self.actions(&parsed);
        set.transaction(&actions)
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    /// The bitmap actions of parsed commands.
    fn actions<'p>(&self, parsed: &'p [Parsed]) -> Vec<Action<'p>> {
        parsed
            .iter()
            .map(|p| match p {
                Parsed::Add { name, opts } => Action::Add { name, opts: *opts },
                Parsed::Remove(name) => Action::Remove { name },
                Parsed::Clear(name) => Action::Clear { name },
                Parsed::Enable(name) => Action::Enable { name },
                Parsed::Disable(name) => Action::Disable { name },
                Parsed::Merge { target, sources } => Action::Merge {
                    target,
                    sources: sources.iter().map(|s| MergeSource::Local(s)).collect(),
                },
            })
            .collect()
    }

    fn node_info(&self) -> Value {
        let dev = &self.device;
        let size = dev.image().size();
        let fmt = self.format.to_string();
        let path = self.image.display().to_string();
        let mut image = json!({
            "filename": path,
            "format": fmt,
            "virtual-size": size,
        });
        if let Some(cs) = self.cluster_size {
            image["cluster-size"] = json!(cs);
        }
        let mut v = json!({
            "file": path,
            "node-name": self.node,
            "ro": dev.image().is_read_only(),
            "drv": fmt,
            "encrypted": false,
            "detect_zeroes": "off",
            "bps": 0, "bps_rd": 0, "bps_wr": 0,
            "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "write_threshold": 0,
            "backing_file_depth": 0,
            "active": true,
            "cache": {"writeback": dev.wce() != 0, "direct": self.direct, "no-flush": false},
            "image": image,
        });
        if let Some(b) = &self.bitmaps {
            let list: Vec<Value> = b
                .bitmaps()
                .list()
                .iter()
                .map(|i| {
                    let mut e = json!({
                        "name": i.name,
                        "recording": i.enabled,
                        "persistent": i.persistent,
                        "busy": i.busy,
                        "granularity": i.granularity,
                        "count": i.dirty_bytes,
                    });
                    if i.inconsistent {
                        e["inconsistent"] = json!(true);
                    }
                    e
                })
                .collect();
            v["dirty-bitmaps"] = Value::Array(list);
        }
        v
    }

    fn blockstats(&self) -> Value {
        let queues: Vec<Arc<QueueStats>> = (0..self.num_queues)
            .map(|q| self.device.stats().queue(q))
            .collect();
        let t = |pick: fn(&QueueStats) -> &Counter| Totals::of(&queues, pick);
        let (rd, wr, wz, fl, dc) = (
            t(|q| &q.read),
            t(|q| &q.write),
            t(|q| &q.write_zeroes),
            t(|q| &q.flush),
            t(|q| &q.discard),
        );
        // QEMU accounts write-zeroes as writes.
        let stats = json!({
            "rd_bytes": rd.bytes,
            "wr_bytes": wr.bytes + wz.bytes,
            "unmap_bytes": dc.bytes,
            "zone_append_bytes": 0,
            "rd_operations": rd.ops,
            "wr_operations": wr.ops + wz.ops,
            "flush_operations": fl.ops,
            "unmap_operations": dc.ops,
            "zone_append_operations": 0,
            "rd_total_time_ns": rd.ns,
            "wr_total_time_ns": wr.ns + wz.ns,
            "flush_total_time_ns": fl.ns,
            "unmap_total_time_ns": dc.ns,
            "zone_append_total_time_ns": 0,
            "wr_highest_offset": queues
                .iter()
                .map(|q| q.wr_highest_offset.load(Relaxed))
                .max()
                .unwrap_or(0),
            "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0, "zone_append_merged": 0,
            "failed_rd_operations": rd.failed,
            "failed_wr_operations": wr.failed + wz.failed,
            "failed_flush_operations": fl.failed,
            "failed_unmap_operations": dc.failed,
            "failed_zone_append_operations": 0,
            "invalid_rd_operations": 0, "invalid_wr_operations": 0,
            "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
            "invalid_zone_append_operations": 0,
            "account_invalid": false,
            "account_failed": true,
            "timed_stats": [],
        });
        let per_queue: Vec<Value> = queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let c = |c: &Counter| {
                    let t = Totals::of(std::slice::from_ref(q), |_| c);
                    json!({"operations": t.ops, "bytes": t.bytes, "total_time_ns": t.ns, "failed": t.failed})
                };
                json!({
                    "queue": i,
                    "read": c(&q.read),
                    "write": c(&q.write),
                    "flush": c(&q.flush),
                    "discard": c(&q.discard),
                    "write-zeroes": c(&q.write_zeroes),
                })
            })
            .collect();
        json!({
            "device": "",
            "qdev": "vhost-user-blk",
            "node-name": self.node,
            "stats": stats,
            "x-queues": per_queue,
        })
    }
}

/// One kind's counters summed over queues.
struct Totals {
    ops: u64,
    bytes: u64,
    ns: u64,
    failed: u64,
}

impl Totals {
    fn of<'q>(queues: &'q [Arc<QueueStats>], pick: impl Fn(&'q QueueStats) -> &'q Counter) -> Self {
        let mut t = Totals {
            ops: 0,
            bytes: 0,
            ns: 0,
            failed: 0,
        };
        for q in queues {
            let c = pick(q);
            t.ops += c.ops.load(Relaxed);
            t.bytes += c.bytes.load(Relaxed);
            t.ns += c.total_ns.load(Relaxed);
            t.failed += c.failed.load(Relaxed);
        }
        t
    }
}

/// `nbd-server-start`'s `addr` (QEMU's SocketAddressLegacy: unix or inet).
fn parse_addr(addr: &Args<'_>) -> Result<NbdAddr, QmpError> {
    let ty = addr.req_enum("type", &["unix", "inet", "vsock", "fd"])?;
    let data = addr.req_object("data")?;
    addr.reject_unexpected(&["type", "data"])?;
    match ty {
        "unix" => {
            let path = data.req_str("path")?;
            data.reject_unexpected(&["path"])?;
            Ok(NbdAddr::Unix(PathBuf::from(path)))
        }
        "inet" => {
            let host = data.req_str("host")?.to_string();
            let port = data.req_str("port")?.to_string();
            data.opt_bool("numeric")?;
            data.opt_bool("ipv4")?;
            data.opt_bool("ipv6")?;
            data.reject_unexpected(&["host", "port", "numeric", "ipv4", "ipv6"])?;
            Ok(NbdAddr::Inet { host, port })
        }
        other => Err(QmpError::generic(format!(
            "NBD server addresses of type '{other}' are not supported"
        ))),
    }
}

/// QMP carries the error text alone (QEMU prints hints only on its command line).
fn export_error(e: ExportError) -> QmpError {
    QmpError::generic(e.to_string())
}

fn bitmap_error(e: qcow2_bitmaps::Error) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The QMP handler of the daemon: [`Control`] behind the `qmp` crate's trait.
#[derive(Debug, Clone)]
pub struct ControlHandler(pub Arc<Control>);

impl CommandHandler for ControlHandler {
    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        self.0.execute(name, &args)
    }

    fn commands(&self) -> Vec<String> {
        COMMANDS.iter().map(|c| c.to_string()).collect()
    }

    fn version(&self) -> Version {
        self.0.version()
    }

    fn stop_after(&self, name: &str) -> bool {
        name == "quit"
    }
}
