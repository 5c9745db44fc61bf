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
                for item in actions.iter() {
                    let act = item.as_object()?;
                    // QEMU names the union's discriminator plainly, without its path.
                    let ty = act.req_str("type")?;
                    if !TRANSACTION_ACTIONS.contains(&ty) {
                        return Err(QmpError::invalid_enum_value("type", ty));
                    }
                    let data = act.req_object("data")?;
                    act.reject_unexpected(&["type", "data"])?;
                    parsed.push(self.parse_action(ty, &data)?);
                }
                self.run(parsed)?;
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

    /// Applies parsed actions as one transaction.
    fn run(&self, parsed: Vec<Parsed>) -> Result<(), QmpError> {
        if parsed.is_empty() {
            return Ok(());
        }
        let set = self.set_for(&self.node)?;
        let actions: Vec<Action<'_>> = parsed
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
            .collect();
        set.transaction(&actions)
            .map_err(|e| QmpError::generic(e.to_string()))
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
                        "busy": false,
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
