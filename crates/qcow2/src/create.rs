//! Creating new qcow2 images with QEMU's layout: header, refcount table, refcount
//! blocks, L1 table.

use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::header::{
    CompressionType, Extension, Header, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT,
    INCOMPAT_COMPRESSION, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::{FileStorage, Storage};

/// Parameters of a new image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes: a power of two, 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64 bits.
    pub refcount_bits: u32,
    /// qcow2 version (2 = compat 0.10, 3 = compat 1.1).
    pub version: u32,
    /// Backing file name as stored in the image, and its format.
    pub backing: Option<(String, Option<String>)>,
    /// Set the lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// Compression type recorded for compressed clusters.
    pub compression: CompressionType,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            backing: None,
            lazy_refcounts: false,
            compression: CompressionType::Deflate,
        }
    }
}

/// Creates a new image file at `path` (which must not exist).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("Could not create '{}'", path.display()))?;
    let storage = FileStorage::from_file(file);
    let r = create_on(&storage, opts);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Writes a new, empty image onto `storage`.
pub fn create_on(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::InvalidImage(format!(
            "Cluster size must be a power of two between 512 and 2048k (got {cs})"
        )));
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(Error::InvalidImage(
            "Refcount width must be a power of two and may not exceed 64 bits".into(),
        ));
    }
    if opts.version != 2 && opts.version != 3 {
        return Err(Error::InvalidImage(format!(
            "Invalid compatibility level: version {}",
            opts.version
        )));
    }
    if opts.version == 2
        && (opts.refcount_bits != 16
            || opts.lazy_refcounts
            || opts.compression != CompressionType::Deflate)
    {
        return Err(Error::InvalidImage(
            "refcount_bits other than 16, lazy refcounts and zstd need compat=1.1".into(),
        ));
    }
    let size = opts.size.next_multiple_of(512);
    if size > (1u64 << 62) {
        return Err(Error::InvalidImage("Image size too large".into()));
    }
    let l2_cover = cs * (cs / 8);
    let l1_size = size.div_ceil(l2_cover);
    if l1_size * 8 > crate::header::MAX_L1_BYTES {
        return Err(Error::InvalidImage(
            "L1 table too large for this size and cluster size".into(),
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let rb_entries = cs * 8 / u64::from(opts.refcount_bits);
    // Fixed point: header + reftable + refblocks + L1 all counted by the refblocks.
    let mut rt_clusters = 1u64;
    let mut rb_count;
    loop {
        let mut total = 1 + rt_clusters + l1_clusters;
        rb_count = 0;
        while rb_count * rb_entries < total {
            rb_count += 1;
            total = 1 + rt_clusters + rb_count + l1_clusters;
        }
        if rt_clusters * cs / 8 >= rb_count {
            break;
        }
        rt_clusters += 1;
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rb_count * cs;
    let total = 1 + rt_clusters + rb_count + l1_clusters;

    let mut header = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cs.trailing_zeros(),
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if opts.compression == CompressionType::Zstd {
            INCOMPAT_COMPRESSION
        } else {
            0
        },
        compatible_features: if opts.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: if opts.version == 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: opts.compression,
        unknown_fields: Vec::new(),
        extensions: Vec::new(),
        backing_file: None,
    };
    if let Some((name, fmt)) = &opts.backing {
        if name.len() > crate::header::MAX_BACKING_NAME as usize {
            return Err(Error::InvalidImage("Backing file name too long".into()));
        }
        header.backing_file = Some(name.clone());
        if let Some(f) = fmt {
            header.extensions.push(Extension {
                magic: EXT_BACKING_FORMAT,
                data: f.as_bytes().to_vec(),
            });
        }
    }
    let hbuf = header.serialize()?;

    let ctx = || "writing the new image".to_string();
    storage.set_len(0).ctx(ctx)?;
    // Reserve the whole metadata area (zeros), then fill in the tables.
    storage.set_len(total * cs).ctx(ctx)?;
    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..rb_count {
        let e = (rb_off + i * cs).to_be_bytes();
        rt[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&e);
    }
    storage.write_at(&rt, rt_off).ctx(ctx)?;
    let bits = opts.refcount_bits as u64;
    let mut rbs = vec![0u8; (rb_count * cs) as usize];
    for c in 0..total {
        // Every cluster of the metadata area has refcount 1.
        let bit = c * bits;
        if bits < 8 {
            rbs[(bit / 8) as usize] |= 1 << (bit % 8);
        } else {
            let last = (bit / 8 + bits / 8 - 1) as usize;
            rbs[last] = 1;
        }
    }
    storage.write_at(&rbs, rb_off).ctx(ctx)?;
    storage.write_at(&hbuf, 0).ctx(ctx)?;
    storage.sync().ctx(ctx)?;
    Ok(())
}
