//! Printing: bitmap lists (table or JSON), bitmap extents (JSON, one extent per line as
//! `qemu-img map --output=json`), and check reports (qemu-img check's text or JSON).

use std::io::{self, Write};
use std::path::Path;

use qcow2::CheckReport;
use qcow2_bitmaps::{BitmapInfo, Extent};
use serde_json::{json, Value};

/// The flags shown for a bitmap: the on-disk `in-use` and `auto` flags (as `qemu-img
/// info` names them) and `inconsistent` when its contents could not be trusted on open.
pub fn flags(info: &BitmapInfo) -> Vec<&'static str> {
    let mut f = info.disk_flags();
    if info.inconsistent {
        f.push("inconsistent");
    }
    f
}

/// One bitmap as a JSON object with stable keys.
fn info_json(info: &BitmapInfo) -> Value {
    json!({
        "name": info.name,
        "granularity": info.granularity,
        "flags": flags(info),
        "recording": info.enabled,
        "inconsistent": info.inconsistent,
        "dirty-bytes": info.dirty_bytes,
    })
}

/// Prints the bitmaps: a JSON array, or a table with a header line (nothing for none).
pub fn list(out: &mut dyn Write, infos: &[BitmapInfo], as_json: bool) -> io::Result<()> {
    if as_json {
        let v: Vec<Value> = infos.iter().map(info_json).collect();
        return writeln!(out, "{}", Value::Array(v));
    }
    if infos.is_empty() {
        return Ok(());
    }
    let width = infos.iter().map(|i| i.name.len()).max().unwrap_or(0).max(4);
    writeln!(
        out,
        "{:<width$}  {:>11}  {:<24}  {:>14}",
        "NAME", "GRANULARITY", "FLAGS", "DIRTY BYTES"
    )?;
    for i in infos {
        let f = flags(i);
        let f = if f.is_empty() {
            "-".to_string()
        } else {
            f.join(",")
        };
        writeln!(
            out,
            "{:<width$}  {:>11}  {:<24}  {:>14}",
            i.name, i.granularity, f, i.dirty_bytes
        )?;
    }
    Ok(())
}

/// Prints extents as a JSON array, one object per line.
pub fn dump(out: &mut dyn Write, extents: &[Extent]) -> io::Result<()> {
    writeln!(out, "[")?;
    for (i, e) in extents.iter().enumerate() {
        let sep = if i + 1 < extents.len() { "," } else { "" };
        writeln!(
            out,
            "{{\"start\": {}, \"length\": {}, \"dirty\": {}}}{sep}",
            e.start, e.length, e.dirty
        )?;
    }
    writeln!(out, "]")
}

/// Prints a check report's summary like `qemu-img check` (text or JSON); the per-problem
/// messages go to stderr separately, as QEMU prints them.
pub fn check(
    out: &mut dyn Write,
    path: &Path,
    report: &CheckReport,
    total_clusters: u64,
    as_json: bool,
) -> io::Result<()> {
    let corruptions = report.corruptions - report.corruptions_fixed;
    let leaks = report.leaks - report.leaks_fixed;
    if as_json {
        let mut v = json!({
            "image-end-offset": report.image_end_offset,
            "total-clusters": total_clusters,
            "check-errors": 0,
            "filename": path.display().to_string(),
            "format": "qcow2",
        });
        let m = v.as_object_mut().expect("json! object");
        for (k, n) in [
            ("corruptions", corruptions),
            ("leaks", leaks),
            ("corruptions-fixed", report.corruptions_fixed),
            ("leaks-fixed", report.leaks_fixed),
        ] {
            if n > 0 {
                m.insert(k.to_string(), json!(n));
            }
        }
        return writeln!(out, "{}", serde_json::to_string_pretty(&v)?);
    }
    if report.leaks_fixed > 0 || report.corruptions_fixed > 0 {
        writeln!(
            out,
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            report.leaks_fixed, report.corruptions_fixed
        )?;
    }
    if corruptions == 0 && leaks == 0 {
        writeln!(out, "No errors were found on the image.")?;
    } else {
        if corruptions > 0 {
            writeln!(
                out,
                "\n{corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it."
            )?;
        }
        if leaks > 0 {
            writeln!(
                out,
                "\n{leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."
            )?;
        }
    }
    writeln!(out, "Image end offset: {}", report.image_end_offset)
}
