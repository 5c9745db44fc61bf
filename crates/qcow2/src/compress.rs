//! Decompression of compressed clusters (raw deflate, zstd).

use std::io::Read;

use crate::error::{Error, Result};
use crate::header::CompressionType;

/// Decompresses one cluster from `input` (which may carry trailing bytes from the
/// sector rounding) into `out`, which must be filled exactly.
pub(crate) fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    let bad = |why: String| Error::Corrupt(format!("bad compressed cluster: {why}"));
    match kind {
        CompressionType::Deflate => {
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| bad(e.to_string()))?;
            if d.total_out() != out.len() as u64 {
                return Err(bad(format!(
                    "inflated to {} bytes instead of {} ({status:?})",
                    d.total_out(),
                    out.len()
                )));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| bad(e.to_string()))?
                .single_frame();
            d.read_exact(out).map_err(|e| bad(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn deflate_roundtrip_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        c.extend_from_slice(&[0xaa; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Deflate, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_roundtrip_and_garbage_is_an_error() {
        let data = vec![7u8; 65536];
        let c = zstd::bulk::compress(&data, 1).unwrap();
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zstd, &[1, 2, 3, 4], &mut out).is_err());
        assert!(decompress(CompressionType::Deflate, &[0xff; 16], &mut out).is_err());
    }
}
