//! Opens an image built from the fuzz input over `qcow2::MemStorage` read-write, runs
//! reads, writes, write-zeroes, discards and flushes on it, and checks it.
//!
//! Input layout: byte 0 = number of op bytes `k` (ops are 5 bytes each), byte 1 = mode,
//! then `k` op bytes, then the rest:
//! * mode even: the rest is the whole image file;
//! * mode odd: the rest is a list of (offset u16, xor u8) patches applied to a valid
//!   template image (512-byte clusters, 16-bit refcounts, data in most clusters), so
//!   mutations land in real metadata.
//!
//! Oracle: never panic, never abort. When our own check finds the image fully
//! consistent before any op, every write must read back, and the image must still have
//! no corruption afterwards.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use qcow2::Storage;
use qcow2::{check_image, BlockImage, CreateOptions, MemStorage, OpenOptions, Qcow2Image, Repair};

/// Largest image file the fuzzer may grow (a hostile offset fails with EFBIG instead).
const MAX_FILE: u64 = 64 << 20;

fn template() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let mem = Arc::new(MemStorage::new());
        qcow2::create_on(
            &*mem,
            &CreateOptions {
                size: 64 << 10,
                cluster_size: 512,
                ..Default::default()
            },
        )
        .unwrap();
        {
            let img = Qcow2Image::open_storage(mem.clone(), &OpenOptions::default()).unwrap();
            for i in 0..64u64 {
                img.write_at(&[i as u8 + 1; 700], i * 977 % (63 << 10))
                    .unwrap();
            }
            img.write_zeroes(8192, 4096, false).unwrap();
            img.discard(20480, 2048).unwrap();
        }
        mem.snapshot()
    })
}

fn image_bytes(mode: u8, rest: &[u8]) -> Vec<u8> {
    if mode % 2 == 0 {
        return rest.to_vec();
    }
    let mut img = template().to_vec();
    for p in rest.chunks_exact(3) {
        let at = u16::from_le_bytes([p[0], p[1]]) as usize;
        if at < img.len() {
            img[at] ^= p[2];
        }
    }
    img
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(13))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let k = data[0] as usize;
    let mode = data[1];
    let ops_end = (2 + k).min(data.len());
    let ops = &data[2..ops_end];
    let bytes = image_bytes(mode, &data[ops_end..]);

    let mem = Arc::new(MemStorage::with_max_len(MAX_FILE));
    if mem.write_at(&bytes, 0).is_err() {
        return;
    }
    let opts = OpenOptions {
        known_autoclear: qcow2::AUTOCLEAR_BITMAPS,
        ..Default::default()
    };
    let Ok(img) = Qcow2Image::open_storage(mem, &opts) else {
        return;
    };
    let clean =
        matches!(check_image(&img, Repair::None), Ok(r) if r.is_clean() && r.corruptions == 0);
    let size = img.size();
    if size == 0 {
        let _ = check_image(&img, Repair::Leaks);
        return;
    }
    for op in ops.chunks_exact(5) {
        let off = u64::from(u16::from_le_bytes([op[1], op[2]])) * 509 % size;
        let len = (u64::from(u16::from_le_bytes([op[3], op[4]])) % 8192).min(size - off);
        match op[0] % 6 {
            0 => {
                let mut b = vec![0u8; len as usize];
                let _ = img.read_at(&mut b, off);
            }
            1 => {
                let d = pattern(op[1], len as usize);
                if img.write_at(&d, off).is_ok() && clean {
                    let mut b = vec![0u8; len as usize];
                    img.read_at(&mut b, off)
                        .expect("read after write on a clean image");
                    assert!(
                        b == d,
                        "write at {off:#x}+{len} did not read back on a clean image"
                    );
                }
            }
            2 => {
                let r = img.write_zeroes(off, len, op[2] & 1 == 1);
                if r.is_ok() && clean {
                    let mut b = vec![0u8; len as usize];
                    img.read_at(&mut b, off)
                        .expect("read after write-zeroes on a clean image");
                    assert!(
                        b.iter().all(|&x| x == 0),
                        "zeroes at {off:#x}+{len} did not read back"
                    );
                }
            }
            3 => {
                let _ = img.discard(off, len);
            }
            4 => {
                let _ = img.flush();
            }
            _ => {
                let _ = check_image(&img, Repair::None);
            }
        }
    }
    let after = check_image(&img, Repair::None);
    if clean {
        let r = after.expect("check of an image that was clean");
        assert_eq!(r.corruptions, 0, "a clean image got corrupted: {r}");
    }
    let _ = check_image(&img, Repair::Leaks);
});
