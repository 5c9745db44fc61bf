//! The qcow2 header, its extensions and the backing file name: parsing with every check
//! QEMU makes, and serialization that keeps what we do not understand byte for byte.

use crate::error::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the version 3 header we write (with the compression type byte and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible feature QEMU knows.
pub const INCOMPAT_MASK: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// Autoclear feature: raw external data.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// QEMU's limits (`qcow2.h`).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// 2 MiB clusters at most.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// L1 table size limit in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Refcount table size limit in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Backing file name limit.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Compression algorithm of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU's "zlib").
    Deflate,
    /// Zstandard.
    Zstd,
}

/// One header extension as found in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Its magic.
    pub magic: u32,
    /// Its data, without padding.
    pub data: Vec<u8>,
}

/// The parsed header of a qcow2 image.
#[derive(Clone, Debug)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Host offset of the backing file name (0 = none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Encryption method (0 = none).
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length as written in the file (v3), 72 for v2.
    pub header_length: u32,
    /// Compression type (v3 with header_length > 104).
    pub compression_type: CompressionType,
    /// Header bytes past the fields we know (v3, between 112 and header_length), kept.
    pub unknown_fields: Vec<u8>,
    /// Header extensions in file order (without the end marker).
    pub extensions: Vec<Extension>,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidImage(msg.into())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The data of extension `magic`.
    pub fn extension(&self, magic: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.magic == magic)
            .map(|e| e.data.as_slice())
    }

    /// Sets (`Some`) or removes (`None`) extension `magic`. A new extension goes where
    /// QEMU would write it: after the known ones, before unknown ones.
    pub fn set_extension(&mut self, magic: u32, data: Option<Vec<u8>>) {
        match data {
            None => self.extensions.retain(|e| e.magic != magic),
            Some(data) => {
                if let Some(e) = self.extensions.iter_mut().find(|e| e.magic == magic) {
                    e.data = data;
                    return;
                }
                let known = [
                    EXT_BACKING_FORMAT,
                    EXT_DATA_FILE,
                    EXT_CRYPTO,
                    EXT_FEATURE_TABLE,
                    crate::EXT_BITMAPS,
                ];
                let pos = self
                    .extensions
                    .iter()
                    .position(|e| !known.contains(&e.magic))
                    .unwrap_or(self.extensions.len());
                self.extensions.insert(pos, Extension { magic, data });
            }
        }
    }

    /// Parses the header from the start of the file. `first_cluster` holds at least the
    /// first cluster (or the whole file when shorter); `file_len` bounds every offset.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize || be32(buf, 0) != MAGIC {
            return Err(Error::NotQcow2);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            unknown_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(invalid("qcow2 header exceeds cluster size"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(invalid("qcow2 header too short"));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    t => {
                        return Err(Error::Unsupported(format!(
                            "Unknown compression type '{t}'"
                        )))
                    }
                };
            }
            if h.header_length > V3_HEADER_LEN {
                h.unknown_fields = buf[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
            }
        }
        let unknown = h.incompatible_features & !INCOMPAT_MASK;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "Unsupported qcow2 feature(s): unknown incompatible feature bits {unknown:#x}"
            )));
        }
        if (h.compression_type != CompressionType::Deflate)
            != (h.incompatible_features & INCOMPAT_COMPRESSION != 0)
        {
            return Err(invalid(
                "compression_type field and the compression type incompatible bit disagree",
            ));
        }
        if h.refcount_order > 6 {
            return Err(invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if h.size > (1u64 << 62) {
            return Err(invalid("Image size too large"));
        }
        h.check_table(
            "L1 table",
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            file_len,
        )?;
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(invalid("Active L1 table too large"));
        }
        let l2_entries = cluster_size / 8;
        let needed_l1 = h.size.div_ceil(cluster_size * l2_entries);
        if u64::from(h.l1_size) < needed_l1 {
            return Err(invalid("L1 table is too small"));
        }
        let reftable_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if reftable_bytes > MAX_REFTABLE_BYTES || h.refcount_table_clusters == 0 {
            return Err(invalid("Reference count table too large"));
        }
        h.check_table(
            "Reference count table",
            h.refcount_table_offset,
            reftable_bytes,
            file_len,
        )?;
        if h.nb_snapshots > 65536 {
            return Err(invalid("Too many snapshots"));
        }
        if h.nb_snapshots > 0 {
            h.check_table("Snapshot table", h.snapshots_offset, 40, file_len)?;
        }
        h.parse_extensions(buf)?;
        if h.backing_file_offset != 0 {
            let name_end = h
                .backing_file_offset
                .checked_add(u64::from(h.backing_file_size));
            if h.backing_file_size > MAX_BACKING_NAME
                || name_end.is_none_or(|e| e > cluster_size || e > buf.len() as u64)
            {
                return Err(invalid("Backing file name too long"));
            }
            let start = h.backing_file_offset as usize;
            let name = &buf[start..start + h.backing_file_size as usize];
            h.backing_file = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| invalid("Backing file name is not valid UTF-8"))?,
            );
        }
        Ok(h)
    }

    fn check_table(&self, what: &str, offset: u64, len: u64, file_len: u64) -> Result<()> {
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(invalid(format!("Invalid {what} offset")));
        }
        // QEMU lets tables reach past the end of the file (they read as zeros) only up to
        // a sane bound; we are stricter: they must lie inside the file.
        match offset.checked_add(len) {
            Some(end) if end <= file_len.max(self.cluster_size()) || len == 0 => Ok(()),
            _ => Err(invalid(format!(
                "{what} offset or size points past end of file"
            ))),
        }
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let mut pos = self.header_length as usize;
        let end = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len().min(self.cluster_size() as usize)
        };
        loop {
            if pos + 8 > end {
                // No room for an extension header: the area just ends.
                return Ok(());
            }
            let magic = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            pos += 8;
            if magic == EXT_END {
                return Ok(());
            }
            if len > end - pos {
                return Err(invalid("qcow2_read_extension: ext_magic too large"));
            }
            if self.extensions.iter().any(|e| e.magic == magic) {
                return Err(invalid(format!("Duplicate header extension {magic:#x}")));
            }
            self.extensions.push(Extension {
                magic,
                data: buf[pos..pos + len].to_vec(),
            });
            pos += len.next_multiple_of(8);
        }
    }

    /// Serializes header, extensions and backing file name into one cluster-sized
    /// buffer (the area QEMU rewrites), or fails when they do not fit.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length.max(V2_HEADER_LEN) as usize];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Deflate => 0,
                    CompressionType::Zstd => 1,
                };
            }
            if !self.unknown_fields.is_empty() {
                b[V3_HEADER_LEN as usize..self.header_length as usize]
                    .copy_from_slice(&self.unknown_fields);
            }
        }
        for e in &self.extensions {
            b.extend_from_slice(&e.magic.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() > cs {
            return Err(Error::NoSpace(
                "header, extensions and backing file name do not fit in the first cluster".into(),
            ));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            unknown_fields: vec![],
            extensions: vec![Extension {
                magic: 0x1234_5678,
                data: vec![1, 2, 3],
            }],
            backing_file: Some("base.img".into()),
        };
        h.set_extension(EXT_BACKING_FORMAT, Some(b"raw".to_vec()));
        h
    }

    #[test]
    fn roundtrip_keeps_extensions_in_qemu_order() {
        let h = sample();
        assert_eq!(h.extensions[0].magic, EXT_BACKING_FORMAT);
        let buf = h.serialize().unwrap();
        let p = Header::parse(&buf, 1 << 20).unwrap();
        assert_eq!(p.extensions, h.extensions);
        assert_eq!(p.backing_file.as_deref(), Some("base.img"));
        assert_eq!(p.serialize().unwrap(), buf);
    }

    #[test]
    fn refuses_unknown_incompatible_bits() {
        let mut h = sample();
        h.incompatible_features = 1 << 40;
        let buf = h.serialize().unwrap();
        let e = Header::parse(&buf, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("Unsupported qcow2 feature"), "{e}");
    }

    #[test]
    fn backing_name_offset_near_u64_max_is_an_error() {
        let mut buf = sample().serialize().unwrap();
        buf[8..16].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
        buf[16..20].copy_from_slice(&16u32.to_be_bytes());
        let e = Header::parse(&buf, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("Backing file name"), "{e}");
    }

    #[test]
    fn oversized_extension_is_an_error() {
        let mut buf = sample().serialize().unwrap();
        let at = V3_HEADER_LEN as usize + 4;
        buf[at..at + 4].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert!(Header::parse(&buf, 1 << 20).is_err());
    }
}
