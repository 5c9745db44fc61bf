//! Opening (and creating) the disk image: format probing, QEMU-compatible locks, engine.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};
use qcow2::{BlockImage, FileStorage, RawImage};

use crate::lock::{ImageLock, LockError, LockSpec};

/// qcow2 magic: "QFI\xfb".
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Image formats we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// QEMU qcow2.
    Qcow2,
    /// Raw.
    Raw,
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        })
    }
}

/// How to open the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    /// Image path.
    pub path: PathBuf,
    /// Format; `None` = probe by magic.
    pub format: Option<ImageFormat>,
    /// Open read-only.
    pub read_only: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Create with this size when missing (format: `format` or qcow2).
    pub create_size: Option<u64>,
    /// qcow2 autoclear bits the caller keeps valid (e.g. `qcow2::AUTOCLEAR_BITMAPS` when
    /// a tracker updates the persistent bitmaps); the engine clears all others on a
    /// writable open.
    pub known_autoclear: u64,
    /// Which backing files a qcow2 image may name.
    pub backing: qcow2::BackingPolicy,
}

/// Errors opening the disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An OS error with what we were doing.
    #[error("{what} '{path}': {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image engine refused the image.
    #[error("could not open '{path}': {source}")]
    Engine {
        /// The image path.
        path: PathBuf,
        /// The engine's error.
        #[source]
        source: qcow2::Error,
    },
    /// Locking failed (another process uses the image).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// `--create-size` disagrees with an existing image.
    #[error("'{path}' exists with a virtual size of {actual} bytes, but --create-size asks for {wanted}")]
    SizeMismatch {
        /// Image path.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// Requested size.
        wanted: u64,
    },
}

/// An open disk: the engine plus the locks that must live as long as it is served.
#[derive(Debug)]
pub struct OpenedDisk {
    /// The data path.
    pub image: Arc<dyn BlockImage>,
    /// The same image as its concrete qcow2 type (for the bitmap metadata API), when the
    /// format is qcow2.
    pub qcow2: Option<Arc<qcow2::Qcow2Image>>,
    /// The format actually opened.
    pub format: ImageFormat,
    /// QEMU-compatible locks (dropped = released).
    pub lock: ImageLock,
    /// Shared read locks on the backing chain's files (nobody may write them meanwhile).
    pub backing_locks: Vec<ImageLock>,
}

/// Reads the first bytes and tells qcow2 from raw.
pub fn probe_format(path: &Path) -> io::Result<ImageFormat> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path)?;
    let mut n = 0;
    while n < magic.len() {
        match f.read(&mut magic[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(if n == 4 && magic == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// The image format whose magic a first sector carries, if any (the formats QEMU probes
/// before raw): a guest of a probed raw image that wrote one could turn its disk into
/// that format at the next open (a qcow2 header may name any host file as backing file).
pub fn format_magic(sector: &[u8]) -> Option<&'static str> {
    const AT_START: &[(&[u8], &str)] = &[
        (b"QFI\xfb", "qcow/qcow2"),
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"Bochs Virtual HD Image", "bochs"),
        (b"LUKS\xba\xbe", "luks"),
        (b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
    ];
    for (magic, name) in AT_START {
        if sector.starts_with(magic) {
            return Some(name);
        }
    }
    // VDI: its signature at byte 64.
    if sector.get(64..68) == Some(&0xbeda_107f_u32.to_le_bytes()[..]) {
        return Some("vdi");
    }
    None
}

/// Creates a missing image of `size` bytes.
fn create_image(path: &Path, format: ImageFormat, size: u64) -> Result<(), DiskError> {
    match format {
        ImageFormat::Raw => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|source| DiskError::Io {
                    what: "creating",
                    path: path.to_owned(),
                    source,
                })?;
            f.set_len(size).map_err(|source| DiskError::Io {
                what: "sizing",
                path: path.to_owned(),
                source,
            })?;
        }
        ImageFormat::Qcow2 => qcow2::create(
            path,
            &qcow2::CreateOptions {
                size,
                ..Default::default()
            },
        )
        .map_err(|source| DiskError::Engine {
            path: path.to_owned(),
            source,
        })?,
    }
    info!(
        "created {format} image '{}' of {size} bytes",
        path.display()
    );
    Ok(())
}

/// Opens the engine for an already locked image.
type Engine = (Arc<dyn BlockImage>, Option<Arc<qcow2::Qcow2Image>>);

fn open_engine(opts: &DiskOptions, format: ImageFormat) -> Result<Engine, DiskError> {
    let (path, read_only, direct) = (opts.path.as_path(), opts.read_only, opts.direct);
    match format {
        ImageFormat::Raw => {
            let storage =
                FileStorage::open(path, !read_only, direct).map_err(|source| DiskError::Io {
                    what: "opening",
                    path: path.to_owned(),
                    source,
                })?;
            let image = RawImage::new(Arc::new(storage), read_only).map_err(|source| {
                DiskError::Engine {
                    path: path.to_owned(),
                    source,
                }
            })?;
            Ok((Arc::new(image), None))
        }
        // The engine takes no OFD locks of its own: `ImageLock` already holds QEMU's.
        ImageFormat::Qcow2 => {
            let image = qcow2::Qcow2Image::open(
                path,
                &qcow2::OpenOptions {
                    read_only,
                    direct,
                    known_autoclear: opts.known_autoclear,
                    backing: opts.backing,
                },
            )
            .map_err(|source| DiskError::Engine {
                path: path.to_owned(),
                source,
            })?;
            let image = Arc::new(image);
            Ok((image.clone(), Some(image)))
        }
    }
}

/// Creates the image if asked and missing, probes its format, takes QEMU's locks and
/// opens it.
pub fn open_disk(opts: &DiskOptions) -> Result<OpenedDisk, DiskError> {
    let path = &opts.path;
    if let Some(size) = opts.create_size {
        if !path.exists() {
            create_image(path, opts.format.unwrap_or(ImageFormat::Qcow2), size)?;
        }
    }
    let probed = probe_format(path).map_err(|source| DiskError::Io {
        what: "opening",
        path: path.clone(),
        source,
    })?;
    let format = match opts.format {
        Some(f) => {
            if f == ImageFormat::Raw && probed == ImageFormat::Qcow2 {
                warn!(
                    "'{}' looks like a qcow2 image but is served as raw (--format raw)",
                    path.display()
                );
            }
            f
        }
        None => probed,
    };
    let lock = ImageLock::acquire(
        path,
        &LockSpec::for_image(format == ImageFormat::Qcow2, !opts.read_only),
    )?;
    let (image, qcow2) = open_engine(opts, format)?;
    // Like QEMU, hold consistent read on every backing file and share no writer.
    let mut backing_locks = Vec::new();
    for p in qcow2.iter().flat_map(|q| q.backing_chain()) {
        backing_locks.push(ImageLock::acquire(p, &LockSpec::for_image(false, false))?);
    }
    if let Some(wanted) = opts.create_size {
        if image.size() != wanted {
            return Err(DiskError::SizeMismatch {
                path: path.clone(),
                actual: image.size(),
                wanted,
            });
        }
    }
    Ok(OpenedDisk {
        image,
        qcow2,
        format,
        lock,
        backing_locks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(path: &Path) -> DiskOptions {
        DiskOptions {
            path: path.to_owned(),
            format: None,
            read_only: false,
            direct: false,
            create_size: None,
            known_autoclear: 0,
            backing: Default::default(),
        }
    }

    #[test]
    fn probe() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
        assert_eq!(probe_format(&q).unwrap(), ImageFormat::Qcow2);
        let r = dir.path().join("r");
        std::fs::write(&r, b"QF").unwrap();
        assert_eq!(probe_format(&r).unwrap(), ImageFormat::Raw);
    }

    #[test]
    fn create_open_raw_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let mut o = opts(&p);
        o.format = Some(ImageFormat::Raw);
        o.create_size = Some(1 << 20);
        let d = open_disk(&o).unwrap();
        assert_eq!(d.format, ImageFormat::Raw);
        assert!(d.qcow2.is_none());
        assert_eq!(d.image.size(), 1 << 20);
        assert!(!d.image.is_read_only());
        // A read-only opener refuses to share write: refused while we serve.
        let mut ro = opts(&p);
        ro.read_only = true;
        let e = open_disk(&ro).unwrap_err().to_string();
        assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
        drop(d);
        let d = open_disk(&ro).unwrap();
        assert!(d.image.is_read_only());
        drop(d);
        o.create_size = Some(2 << 20);
        let e = open_disk(&o).unwrap_err().to_string();
        assert!(e.contains("--create-size asks for 2097152"), "{e}");
    }

    fn qemu_img() -> bool {
        let ok = std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok();
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "qemu-img is required when CI=true"
            );
            eprintln!("note: qemu-img not installed, skipping");
        }
        ok
    }

    #[test]
    fn qcow2_is_probed_created_and_locked_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.qcow2");
        let mut o = opts(&p);
        o.create_size = Some(8 << 20);
        // Missing image + --create-size without --format: qcow2.
        let d = open_disk(&o).unwrap();
        assert_eq!(d.format, ImageFormat::Qcow2);
        assert!(d.qcow2.is_some());
        assert_eq!(d.image.size(), 8 << 20);
        d.image.write_at(&[0xab; 4096], 1 << 20).unwrap();
        d.image.flush().unwrap();
        if qemu_img() {
            let out = std::process::Command::new("qemu-img")
                .arg("info")
                .arg(&p)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
        }
        drop(d);
        if qemu_img() {
            let out = std::process::Command::new("qemu-img")
                .arg("check")
                .arg(&p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        // Probed on reopen, data intact.
        let d = open_disk(&opts(&p)).unwrap();
        assert_eq!(d.format, ImageFormat::Qcow2);
        let mut buf = [0u8; 4096];
        d.image.read_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0xab; 4096]);
    }

    #[test]
    fn missing_image() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_disk(&opts(&dir.path().join("nope"))).unwrap_err();
        assert!(e.to_string().contains("opening"), "{e}");
    }
}
