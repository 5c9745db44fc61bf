//! Unit tests against the in-memory image.

mod faults;
mod format;
mod lifecycle;
mod props;
mod reserve;
mod shadow;
mod txn;

use crate::format::{BitmapsExt, DirEntry};
use crate::testing::MemImage;
use dirty_bitmap::DirtyBitmap;
use qcow2::{ImageMetadata, AUTOCLEAR_BITMAPS, EXT_BITMAPS};

/// Raw directory entry bytes with every field under the test's control.
#[allow(clippy::too_many_arguments)]
pub(crate) fn raw_entry(
    table_offset: u64,
    table_size: u32,
    flags: u32,
    btype: u8,
    gbits: u8,
    name: &[u8],
    extra: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&table_offset.to_be_bytes());
    v.extend_from_slice(&table_size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.push(btype);
    v.push(gbits);
    v.extend_from_slice(&(name.len() as u16).to_be_bytes());
    v.extend_from_slice(&(extra.len() as u32).to_be_bytes());
    v.extend_from_slice(extra);
    v.extend_from_slice(name);
    while v.len() % 8 != 0 {
        v.push(0);
    }
    v
}

/// Puts `dir` into new clusters of `img` and points a bitmaps extension at it.
pub(crate) fn install_directory(img: &MemImage, dir: &[u8], nb_bitmaps: u32) -> BitmapsExt {
    let cs = img.cluster_size();
    let n = (dir.len() as u64).div_ceil(cs).max(1);
    let off = img.allocate_clusters(n).unwrap().get();
    {
        let mut s = img.state();
        s.file[off as usize..off as usize + dir.len()].copy_from_slice(dir);
    }
    let ext = BitmapsExt {
        nb_bitmaps,
        directory_size: dir.len() as u64,
        directory_offset: off,
    };
    let mut s = img.state();
    s.extensions.insert(EXT_BITMAPS, ext.to_bytes());
    s.autoclear |= AUTOCLEAR_BITMAPS;
    ext
}

/// Allocates a table cluster full of zero entries (a valid, all-clean table).
pub(crate) fn zero_table(img: &MemImage, entries: u64) -> u64 {
    let cs = img.cluster_size();
    let n = (entries * 8).div_ceil(cs).max(1);
    let off = img.allocate_clusters(n).unwrap().get();
    let mut s = img.state();
    s.file[off as usize..(off + n * cs) as usize].fill(0);
    off
}

/// The serialized bits of a bitmap.
pub(crate) fn bits(bm: &DirtyBitmap) -> Vec<u8> {
    let mut v = vec![0u8; bm.serialized_len() as usize];
    bm.serialize_into(0, &mut v);
    v
}

/// The on-disk directory of `img` as parsed entries.
pub(crate) fn disk_dir(img: &MemImage) -> Vec<DirEntry> {
    let Some(x) = img.header_extension(EXT_BITMAPS) else {
        return Vec::new();
    };
    let ext = BitmapsExt::parse(&x, img.cluster_size()).unwrap();
    let mut d = vec![0u8; ext.directory_size as usize];
    img.read_metadata(qcow2::HostOffset(ext.directory_offset), &mut d)
        .unwrap();
    crate::format::parse_directory(&d, ext.nb_bitmaps, img.cluster_size(), img.virtual_size())
        .unwrap()
}

/// Log lines captured by the test logger.
static LOGS: std::sync::Mutex<Vec<(log::Level, String)>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        LOGS.lock().unwrap().push((r.level(), r.args().to_string()));
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (once) and returns a copy of what was logged so far.
pub(crate) fn logs() -> Vec<(log::Level, String)> {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Trace);
    });
    LOGS.lock().unwrap().clone()
}
