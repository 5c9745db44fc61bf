//! `check`: the engine's refcount check (optionally repairing), printed like
//! `qemu-img check`, with its exit codes.

use std::io::Write;

use qcow2::{check_image, Repair};

use super::args::{CheckArgs, RepairArg};
use super::error::ToolError;
use super::image::open;
use super::output;

/// Checks the image; returns 0 (clean), 2 (corruptions left) or 3 (only leaks left).
pub fn run(a: &CheckArgs, out: &mut dyn Write) -> Result<u8, ToolError> {
    let repair = match a.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let opened = open(&a.image, repair != Repair::None)?;
    // QEMU refuses to open an image whose bitmap directory breaks a constraint, and so
    // does its check: validate the bitmaps (reading only) first.
    qcow2_bitmaps::Bitmaps::load_read_only(&opened.image, &a.image.display().to_string()).map_err(
        |source| ToolError::CheckOpen {
            path: a.image.clone(),
            source,
        },
    )?;
    let report = check_image(&opened.image, repair).map_err(|source| ToolError::Check {
        path: a.image.clone(),
        source,
    })?;
    let size = qcow2::BlockImage::size(&opened.image);
    let total = size.div_ceil(opened.image.cluster_size());
    drop(opened);
    for msg in &report.messages {
        eprintln!("{msg}");
    }
    output::check(out, &a.image, &report, total, a.json)?;
    Ok(if report.corruptions > report.corruptions_fixed {
        2
    } else if report.leaks > report.leaks_fixed {
        3
    } else {
        0
    })
}
