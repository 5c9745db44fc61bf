//! The `bitmap` subcommands. Mutating operations follow `qemu-img bitmap`: open
//! read-write (locked), load the bitmaps (flagging them in-use), run the operation, then
//! store them (clean close) even when the operation failed, so nothing stays in-use.
//! `list` and `dump` open read-only with a shared lock and never write the file.

use std::io::Write;
use std::path::Path;

use qcow2::Qcow2Image;
use qcow2_bitmaps::{AddOptions, Bitmaps, Error as BmError, MergeSource};

use super::args::{AddArgs, BitmapCommand, MergeArgs};
use super::error::ToolError;
use super::image::{load_bitmaps, open};
use super::output;
use crate::config::parse_size;

/// Runs one `bitmap` subcommand, writing any output to `out`.
pub fn run(cmd: &BitmapCommand, out: &mut dyn Write) -> Result<(), ToolError> {
    match cmd {
        BitmapCommand::Add(a) => add(a),
        BitmapCommand::Remove(a) => {
            mutate(&a.image, "remove", &a.name, |b, img| b.remove(img, &a.name))
        }
        BitmapCommand::Clear(a) => mutate(&a.image, "clear", &a.name, |b, _| b.clear(&a.name)),
        BitmapCommand::Enable(a) => mutate(&a.image, "enable", &a.name, |b, _| b.enable(&a.name)),
        BitmapCommand::Disable(a) => {
            mutate(&a.image, "disable", &a.name, |b, _| b.disable(&a.name))
        }
        BitmapCommand::Merge(a) => merge(a),
        BitmapCommand::List(a) => {
            let opened = open(&a.image, false)?;
            let bitmaps = load_bitmaps(&a.image, &opened.image)?;
            Ok(output::list(out, &bitmaps.list(), a.json)?)
        }
        BitmapCommand::Dump(a) => {
            let opened = open(&a.image, false)?;
            let bitmaps = load_bitmaps(&a.image, &opened.image)?;
            let extents = bitmaps.dump(&a.name).map_err(ToolError::Query)?;
            Ok(output::dump(out, &extents)?)
        }
    }
}

/// Parses the `-g` value; refusals use QEMU's text.
fn granularity(s: &str) -> Result<u64, ToolError> {
    parse_size(s).map_err(|e| ToolError::BadArg {
        what: "granularity",
        value: s.to_string(),
        reason: e.to_string(),
    })
}

fn add(a: &AddArgs) -> Result<(), ToolError> {
    let g = a.granularity.as_deref().map(granularity).transpose()?;
    mutate(&a.image, "add", &a.name, |b, img| {
        // QEMU looks for an existing bitmap of that name before anything else.
        if b.list().iter().any(|i| i.name == a.name) {
            return Err(BmError::Exists(a.name.clone()));
        }
        b.add(
            img,
            &a.name,
            AddOptions {
                granularity: g,
                persistent: true,
                disabled: a.disabled,
            },
        )
    })
}

fn merge(a: &MergeArgs) -> Result<(), ToolError> {
    // The other image is opened (read-only, shared lock) before the target is touched.
    let other = match &a.source_image {
        Some(p) => {
            let opened = open(p, false)?;
            let bitmaps = load_bitmaps(p, &opened.image)?;
            Some((opened, bitmaps))
        }
        None => None,
    };
    mutate(&a.image, "merge", &a.target, |b, _| {
        let sources: Vec<MergeSource<'_>> = a
            .sources
            .iter()
            .map(|n| match &other {
                Some((_, ob)) => MergeSource::Other(ob, n),
                None => MergeSource::Local(n),
            })
            .collect();
        b.merge(&a.target, &sources)
    })
}

/// Opens `path` read-write, loads its bitmaps, runs `op`, and always stores afterwards.
/// The operation's error wins over a store error (which is then only logged).
fn mutate(
    path: &Path,
    op_name: &'static str,
    name: &str,
    op: impl FnOnce(&Bitmaps, &Qcow2Image) -> Result<(), BmError>,
) -> Result<(), ToolError> {
    let opened = open(path, true)?;
    let bitmaps = load_bitmaps(path, &opened.image)?;
    let result = op(&bitmaps, &opened.image).map_err(|source| ToolError::Op {
        op: op_name,
        name: name.to_string(),
        source,
    });
    let stored = bitmaps.store(&opened.image).map_err(ToolError::Store);
    let flushed = opened.image.flush_all().map_err(|source| ToolError::Flush {
        path: path.to_owned(),
        source,
    });
    match (result, stored, flushed) {
        (Err(e), s, f) => {
            for extra in [s.err(), f.err()].into_iter().flatten() {
                log::error!("{extra}");
            }
            Err(e)
        }
        (Ok(()), Err(e), _) | (Ok(()), Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(()), Ok(())) => Ok(()),
    }
}
