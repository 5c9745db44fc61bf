//! The shadow's on-disk side: the header extension, the region (coverage mask and
//! bits), its validation, and what an open finds (see `docs/crash-consistent-bitmaps.md`).

use qcow2::{HostOffset, ImageMetadata};

use super::{AUTOCLEAR_SHADOW, DEFAULT_GRANULARITY, EXT_SHADOW, MAX_SHADOW_BITS, SHADOW_VERSION};
use crate::format::BitmapsExt;
use qcow2::AUTOCLEAR_BITMAPS;

/// Length of the extension data.
pub(super) const EXT_LEN: usize = 32;
/// Bytes before the shadow bits in the region: the mask header and the coverage mask.
pub(crate) const MASK_AREA: u64 = 16384;
/// Mask header: magic, directory offset, entry count, CRC, mask length.
pub(super) const MASK_HEADER: usize = 32;
const MASK_MAGIC: [u8; 8] = *b"VDBBSHDW";
/// Shadow bits are written in pages of this size.
pub(super) const PAGE: u64 = 4096;
const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 40;

/// Bytes per shadow bit for a disk of `virtual_size` bytes whose finest bitmap has
/// `min_bitmap_granularity` bytes per bit (a power of two).
pub fn granularity_bits_for(virtual_size: u64, min_bitmap_granularity: Option<u64>) -> u32 {
    let want = min_bitmap_granularity
        .unwrap_or(DEFAULT_GRANULARITY)
        .max(DEFAULT_GRANULARITY);
    let mut bits = want
        .trailing_zeros()
        .clamp(MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS);
    while bits < MAX_GRANULARITY_BITS && virtual_size.div_ceil(1u64 << bits) > MAX_SHADOW_BITS {
        bits += 1;
    }
    bits
}

/// Bytes of shadow bits (whole pages) for `nbits` bits.
fn bits_len(nbits: u64) -> u64 {
    nbits.div_ceil(8).div_ceil(PAGE) * PAGE
}

/// The shadow header extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowExt {
    /// Host offset of the region (cluster aligned).
    pub region_offset: u64,
    /// Region length in bytes (whole clusters).
    pub region_len: u64,
    /// Virtual disk size the shadow covers.
    pub virtual_size: u64,
    /// log2 of the bytes per shadow bit.
    pub granularity_bits: u32,
}

impl ShadowExt {
    /// Region length for a disk size and granularity, in whole clusters.
    pub(super) fn region_len_for(
        virtual_size: u64,
        granularity_bits: u32,
        cluster_size: u64,
    ) -> u64 {
        let nbits = virtual_size.div_ceil(1u64 << granularity_bits);
        (MASK_AREA + bits_len(nbits)).div_ceil(cluster_size) * cluster_size
    }

    /// Number of shadow bits.
    pub(super) fn nbits(&self) -> u64 {
        self.virtual_size.div_ceil(1u64 << self.granularity_bits)
    }

    /// The extension bytes (big-endian, like every qcow2 field).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXT_LEN);
        v.extend_from_slice(&self.region_offset.to_be_bytes());
        v.extend_from_slice(&self.region_len.to_be_bytes());
        v.extend_from_slice(&self.virtual_size.to_be_bytes());
        v.extend_from_slice(&self.granularity_bits.to_be_bytes());
        v.extend_from_slice(&SHADOW_VERSION.to_be_bytes());
        v
    }

    /// Parses the extension and checks it against the image: version, granularity, disk
    /// size, region length, alignment, inside the file and clear of the engine's
    /// metadata. `None` (with the reason) if anything is off.
    pub fn parse(data: &[u8], img: &dyn ImageMetadata) -> std::result::Result<Self, String> {
        if data.len() != EXT_LEN {
            return Err(format!(
                "extension length {} (expected {EXT_LEN})",
                data.len()
            ));
        }
        let be64 = |r: std::ops::Range<usize>| u64::from_be_bytes(data[r].try_into().unwrap());
        let be32 = |r: std::ops::Range<usize>| u32::from_be_bytes(data[r].try_into().unwrap());
        let ext = ShadowExt {
            region_offset: be64(0..8),
            region_len: be64(8..16),
            virtual_size: be64(16..24),
            granularity_bits: be32(24..28),
        };
        let version = be32(28..32);
        if version != SHADOW_VERSION {
            return Err(format!("unknown version {version}"));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&ext.granularity_bits) {
            return Err(format!("granularity bits {}", ext.granularity_bits));
        }
        if ext.virtual_size != img.virtual_size() {
            return Err(format!(
                "made for a disk of {} bytes, the disk has {}",
                ext.virtual_size,
                img.virtual_size()
            ));
        }
        if ext.nbits() > MAX_SHADOW_BITS {
            return Err("too many shadow bits".into());
        }
        let cs = img.cluster_size();
        if ext.region_len != Self::region_len_for(ext.virtual_size, ext.granularity_bits, cs) {
            return Err(format!("region length {}", ext.region_len));
        }
        if ext.region_offset == 0 || !ext.region_offset.is_multiple_of(cs) {
            return Err(format!("region offset {:#x}", ext.region_offset));
        }
        let end = ext
            .region_offset
            .checked_add(ext.region_len)
            .ok_or("region past the end of the file")?;
        if img.file_len().is_some_and(|len| end > len) {
            return Err("region past the end of the file".into());
        }
        img.check_no_overlap(HostOffset(ext.region_offset), ext.region_len)
            .map_err(|e| format!("region overlaps image metadata: {e}"))?;
        Ok(ext)
    }
}

/// The mask area: which entries of which directory the shadow covers.
pub(super) fn mask_area(dir: Option<BitmapsExt>, covered: &[bool]) -> Vec<u8> {
    let mut area = vec![0u8; MASK_AREA as usize];
    let mask_len = covered.len().div_ceil(8);
    area[0..8].copy_from_slice(&MASK_MAGIC);
    area[8..16].copy_from_slice(&dir.map_or(0, |d| d.directory_offset).to_be_bytes());
    area[16..20].copy_from_slice(&(covered.len() as u32).to_be_bytes());
    area[24..28].copy_from_slice(&(mask_len as u32).to_be_bytes());
    for (i, &c) in covered.iter().enumerate() {
        if c {
            area[MASK_HEADER + i / 8] |= 1 << (i % 8);
        }
    }
    let crc = crc32fast::hash(&area[..MASK_HEADER + mask_len]);
    area[20..24].copy_from_slice(&crc.to_be_bytes());
    area
}

/// Reads the coverage mask back; `None` unless it is intact and made for `dir`.
pub(super) fn parse_mask(area: &[u8], dir: &BitmapsExt) -> Option<Vec<bool>> {
    if area.len() < MASK_HEADER || area[0..8] != MASK_MAGIC {
        return None;
    }
    let dir_offset = u64::from_be_bytes(area[8..16].try_into().ok()?);
    let n = u32::from_be_bytes(area[16..20].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(area[20..24].try_into().ok()?);
    let mask_len = u32::from_be_bytes(area[24..28].try_into().ok()?) as usize;
    if mask_len != n.div_ceil(8) || MASK_HEADER + mask_len > area.len() {
        return None;
    }
    let mut copy = area[..MASK_HEADER + mask_len].to_vec();
    copy[20..24].fill(0);
    if crc32fast::hash(&copy) != crc {
        return None;
    }
    if dir_offset != dir.directory_offset || n != dir.nb_bitmaps as usize {
        return None;
    }
    Some(
        (0..n)
            .map(|i| area[MASK_HEADER + i / 8] & (1 << (i % 8)) != 0)
            .collect(),
    )
}

/// What the open found about the shadow.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// The extension as parsed, when structurally valid.
    pub ext: Option<ShadowExt>,
    /// Its clusters are ours (the autoclear bit is still set): they may be reused or
    /// freed. When false they are left alone (leaked: another program may own them now).
    pub ours: bool,
    /// Trusted coverage of the current directory, with the shadow bits as words.
    pub trusted: Option<(Vec<bool>, Vec<u64>)>,
    /// Why the shadow is not trusted (for the log), when an extension was present.
    pub why_not: Option<String>,
}

/// Reads the shadow of `img` for the directory `dir` (the bitmaps extension on disk).
/// Never fails: anything off makes the shadow untrusted.
pub(crate) fn read_found(img: &dyn ImageMetadata, dir: Option<BitmapsExt>) -> Found {
    let Some(data) = img.header_extension(EXT_SHADOW) else {
        return Found::default();
    };
    let ext = match ShadowExt::parse(&data, img) {
        Ok(x) => x,
        Err(why) => {
            return Found {
                why_not: Some(format!("the shadow extension is invalid: {why}")),
                ..Found::default()
            }
        }
    };
    let ac = img.autoclear_features();
    let ours = ac & AUTOCLEAR_SHADOW != 0;
    let mut found = Found {
        ext: Some(ext),
        ours,
        ..Found::default()
    };
    if !ours {
        found.why_not = Some(
            "another program opened the image read-write since the shadow was written \
             (its autoclear bit is clear)"
                .into(),
        );
        return found;
    }
    if ac & AUTOCLEAR_BITMAPS == 0 {
        found.why_not = Some("the bitmaps autoclear bit is clear".into());
        return found;
    }
    let Some(dir) = dir else {
        return found;
    };
    let mut area = vec![0u8; MASK_AREA as usize];
    if let Err(e) = img.read_metadata(HostOffset(ext.region_offset), &mut area) {
        found.why_not = Some(format!("reading the shadow failed: {e}"));
        return found;
    }
    let Some(mask) = parse_mask(&area, &dir) else {
        found.why_not =
            Some("the shadow's coverage is not for the current bitmap directory".into());
        return found;
    };
    let nbits = ext.nbits();
    let mut bytes = vec![0u8; bits_len(nbits) as usize];
    if let Err(e) = img.read_metadata(HostOffset(ext.region_offset + MASK_AREA), &mut bytes) {
        found.why_not = Some(format!("reading the shadow bits failed: {e}"));
        return found;
    }
    let nwords = nbits.div_ceil(64) as usize;
    let mut words: Vec<u64> = bytes
        .chunks_exact(8)
        .take(nwords)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // Bits past the disk are meaningless: drop them.
    if nbits % 64 != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (nbits % 64)) - 1;
        }
    }
    found.trusted = Some((mask, words));
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BitmapsExt;

    #[test]
    fn granularity_grows_with_the_disk() {
        assert_eq!(granularity_bits_for(1 << 40, None), 20);
        assert_eq!(granularity_bits_for(1 << 40, Some(1 << 16)), 20);
        assert_eq!(granularity_bits_for(1 << 40, Some(1 << 22)), 22);
        // 2^27 bits of 1 MiB cover 128 TiB; 1 PiB needs 8 MiB granules.
        assert_eq!(granularity_bits_for(1 << 50, None), 23);
        assert!((1u64 << 50).div_ceil(1 << 23) <= MAX_SHADOW_BITS);
    }

    #[test]
    fn mask_round_trips_and_rejects_other_directories_and_damage() {
        let dir = BitmapsExt {
            nb_bitmaps: 10,
            directory_size: 400,
            directory_offset: 0x30000,
        };
        let covered: Vec<bool> = (0..10).map(|i| i % 3 != 1).collect();
        let area = mask_area(Some(dir), &covered);
        assert_eq!(parse_mask(&area, &dir), Some(covered.clone()));
        let other = BitmapsExt {
            directory_offset: 0x40000,
            ..dir
        };
        assert_eq!(parse_mask(&area, &other), None);
        let fewer = BitmapsExt {
            nb_bitmaps: 9,
            ..dir
        };
        assert_eq!(parse_mask(&area, &fewer), None);
        for byte in [0, 9, 17, 21, 25, MASK_HEADER] {
            let mut bad = area.clone();
            bad[byte] ^= 0x10;
            assert_eq!(parse_mask(&bad, &dir), None, "byte {byte} flipped");
        }
    }
}
