//! `create`: a new qcow2 image through the engine (QEMU's layout).

use std::io::Write;
use std::path::{Path, PathBuf};

use qcow2::{CreateOptions, OpenOptions, Qcow2Image};

use super::args::{BackingFormat, Compat, CreateArgs};
use super::error::ToolError;
use crate::config::parse_size;
use crate::disk::{probe_format, ImageFormat};

fn size_arg(what: &'static str, s: &str) -> Result<u64, ToolError> {
    parse_size(s).map_err(|e| ToolError::BadArg {
        what,
        value: s.to_string(),
        reason: e.to_string(),
    })
}

/// Where the backing file is, seen from the current directory: relative names are
/// relative to the new image's directory (as QEMU resolves them).
fn backing_path(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_owned();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_owned(),
    }
}

/// Size and probed format of a backing file.
fn probe_backing(path: &Path) -> Result<(u64, BackingFormat), ToolError> {
    let open_err = |source| ToolError::Open {
        path: path.to_owned(),
        source,
    };
    match probe_format(path).map_err(open_err)? {
        ImageFormat::Raw => {
            let len = std::fs::metadata(path).map_err(open_err)?.len();
            Ok((len, BackingFormat::Raw))
        }
        ImageFormat::Qcow2 => {
            let img = Qcow2Image::open(
                path,
                &OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .map_err(|source| ToolError::Engine {
                path: path.to_owned(),
                source,
            })?;
            Ok((qcow2::BlockImage::size(&img), BackingFormat::Qcow2))
        }
    }
}

/// Creates the image described by `a` and reports it on `out` like `qemu-img create`.
pub fn run(a: &CreateArgs, out: &mut dyn Write) -> Result<(), ToolError> {
    let mut opts = CreateOptions::default();
    if let Some(cs) = &a.cluster_size {
        opts.cluster_size = size_arg("cluster size", cs)?;
    }
    if let Some(bits) = a.refcount_bits {
        opts.refcount_bits = bits;
    }
    if let Some(c) = a.compat {
        opts.version = match c {
            Compat::V010 => 2,
            Compat::V11 => 3,
        };
    }
    let given = a.size.as_deref().map(|s| size_arg("size", s)).transpose()?;
    match &a.backing {
        Some(b) => {
            let (bsize, probed) = probe_backing(&backing_path(&a.image, b))?;
            let fmt = a.backing_format.unwrap_or(probed);
            opts.size = given.unwrap_or(bsize);
            opts.backing = Some((b.clone(), Some(fmt.name().to_string())));
        }
        None => {
            opts.size = given.ok_or_else(|| ToolError::BadArg {
                what: "size",
                value: String::new(),
                reason: "Image creation needs a size parameter".into(),
            })?;
        }
    }
    qcow2::create(&a.image, &opts).map_err(|source| ToolError::Create {
        path: a.image.clone(),
        source,
    })?;
    let mut line = format!(
        "Formatting '{}', fmt=qcow2 cluster_size={} compat={} size={} refcount_bits={}",
        a.image.display(),
        opts.cluster_size,
        if opts.version == 2 { "0.10" } else { "1.1" },
        opts.size,
        opts.refcount_bits
    );
    if let Some((b, f)) = &opts.backing {
        line.push_str(&format!(" backing_file={b}"));
        if let Some(f) = f {
            line.push_str(&format!(" backing_fmt={f}"));
        }
    }
    writeln!(out, "{line}")?;
    Ok(())
}
