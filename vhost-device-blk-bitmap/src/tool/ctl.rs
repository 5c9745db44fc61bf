//! `ctl`: sends QMP commands to a running daemon's control socket and prints the answers
//! (JSON, or tables for `query`).

use std::io::Write;

use serde_json::{json, Map, Value};

use super::args::{CtlArgs, CtlBitmap, CtlCommand};
use super::error::ToolError;

fn bad(what: &'static str, value: &str, reason: impl Into<String>) -> ToolError {
    ToolError::BadArg {
        what,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Runs one `ctl` invocation; returns the exit code.
pub fn run(a: &CtlArgs, out: &mut dyn Write) -> Result<u8, ToolError> {
    let mut client = qmp::Client::connect(&a.qmp_socket)?;
    let (name, args) = match &a.command {
        CtlCommand::Query => return query(&mut client, out),
        CtlCommand::Raw { request } => {
            let v: Value = serde_json::from_str(request)
                .map_err(|e| bad("request", request, e.to_string()))?;
            let name = v
                .get("execute")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("request", request, "no \"execute\" member"))?
                .to_string();
            (name, v.get("arguments").cloned().unwrap_or(json!({})))
        }
        CtlCommand::Exec(words) => {
            let name = words.first().cloned().unwrap_or_default();
            let args = match words.get(1) {
                None => json!({}),
                Some(j) => {
                    serde_json::from_str(j).map_err(|e| bad("arguments", j, e.to_string()))?
                }
            };
            if words.len() > 2 {
                return Err(bad(
                    "arguments",
                    &words[2..].join(" "),
                    "give them as one JSON object",
                ));
            }
            (name, args)
        }
        CtlCommand::Bitmap(b) => bitmap_request(b)?,
    };
    let result = client.execute(&name, args)?;
    if matches!(&a.command, CtlCommand::Bitmap(CtlBitmap::Dump { .. })) {
        // One extent per line, as `bitmap dump` prints them.
        let extents: Vec<qcow2_bitmaps::Extent> = result
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                Some(qcow2_bitmaps::Extent {
                    start: e.get("start")?.as_u64()?,
                    length: e.get("length")?.as_u64()?,
                    dirty: e.get("dirty")?.as_bool()?,
                })
            })
            .collect();
        super::output::dump(out, &extents)?;
    } else {
        writeln!(out, "{result}")?;
    }
    Ok(0)
}

fn bitmap_request(b: &CtlBitmap) -> Result<(String, Value), ToolError> {
    let nn = |node: &str, name: &str| json!({"node": node, "name": name});
    Ok(match b {
        CtlBitmap::Add {
            node,
            name,
            granularity,
            transient,
            disabled,
        } => {
            let mut m = Map::new();
            m.insert("node".into(), json!(node));
            m.insert("name".into(), json!(name));
            if let Some(g) = granularity {
                let v = crate::config::parse_size(g)
                    .map_err(|e| bad("granularity", g, e.to_string()))?;
                m.insert("granularity".into(), json!(v));
            }
            m.insert("persistent".into(), json!(!transient));
            if *disabled {
                m.insert("disabled".into(), json!(true));
            }
            ("block-dirty-bitmap-add".into(), Value::Object(m))
        }
        CtlBitmap::Remove { node, name } => ("block-dirty-bitmap-remove".into(), nn(node, name)),
        CtlBitmap::Clear { node, name } => ("block-dirty-bitmap-clear".into(), nn(node, name)),
        CtlBitmap::Enable { node, name } => ("block-dirty-bitmap-enable".into(), nn(node, name)),
        CtlBitmap::Disable { node, name } => ("block-dirty-bitmap-disable".into(), nn(node, name)),
        CtlBitmap::Merge {
            node,
            target,
            sources,
        } => (
            "block-dirty-bitmap-merge".into(),
            json!({"node": node, "target": target, "bitmaps": sources}),
        ),
        CtlBitmap::Dump { node, name } => ("x-bitmap-dump".into(), nn(node, name)),
    })
}

/// The node's bitmaps and counters as two tables.
fn query(client: &mut qmp::Client, out: &mut dyn Write) -> Result<u8, ToolError> {
    let nodes = client.execute("query-named-block-nodes", json!({}))?;
    let stats = client.execute("query-blockstats", json!({}))?;
    for node in nodes.as_array().into_iter().flatten() {
        let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
        writeln!(
            out,
            "node {} ({} {}, {} bytes{})",
            s(&node["node-name"]),
            s(&node["drv"]),
            s(&node["file"]),
            s(&node["image"]["virtual-size"]),
            if node["ro"] == json!(true) {
                ", read-only"
            } else {
                ""
            }
        )?;
        let bitmaps = node["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !bitmaps.is_empty() {
            let width = bitmaps
                .iter()
                .filter_map(|b| b["name"].as_str())
                .map(str::len)
                .max()
                .unwrap_or(4)
                .max(4);
            writeln!(
                out,
                "  {:<width$}  {:>11}  {:<9}  {:<10}  {:>14}",
                "NAME", "GRANULARITY", "RECORDING", "PERSISTENT", "DIRTY BYTES"
            )?;
            for b in &bitmaps {
                let flag = |k: &str| if b[k] == json!(true) { "yes" } else { "no" };
                let mut rec = flag("recording").to_string();
                if b["inconsistent"] == json!(true) {
                    rec = "inconsistent".into();
                }
                writeln!(
                    out,
                    "  {:<width$}  {:>11}  {:<9}  {:<10}  {:>14}",
                    s(&b["name"]),
                    s(&b["granularity"]),
                    rec,
                    flag("persistent"),
                    s(&b["count"])
                )?;
            }
        }
    }
    for dev in stats.as_array().into_iter().flatten() {
        let st = &dev["stats"];
        writeln!(
            out,
            "  {:<6}  {:>12}  {:>16}  {:>8}",
            "I/O", "OPERATIONS", "BYTES", "FAILED"
        )?;
        for (label, ops, bytes, failed) in [
            ("read", "rd_operations", "rd_bytes", "failed_rd_operations"),
            ("write", "wr_operations", "wr_bytes", "failed_wr_operations"),
            ("flush", "flush_operations", "", "failed_flush_operations"),
            (
                "unmap",
                "unmap_operations",
                "unmap_bytes",
                "failed_unmap_operations",
            ),
        ] {
            let b = if bytes.is_empty() {
                json!("-")
            } else {
                st[bytes].clone()
            };
            writeln!(
                out,
                "  {:<6}  {:>12}  {:>16}  {:>8}",
                label,
                st[ops],
                b.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| b.to_string()),
                st[failed]
            )?;
        }
    }
    Ok(0)
}
