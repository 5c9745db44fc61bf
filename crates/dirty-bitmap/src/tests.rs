//! Edge-case unit tests of the public behaviour.

use crate::{DirtyBitmap, Error, Extent, MAX_GRANULARITY, MAX_SERIALIZED_BYTES};

const K64: u64 = 64 * 1024;
const GIB: u64 = 1 << 30;

fn dirty_bits(bm: &DirtyBitmap) -> Vec<u64> {
    (0..bm.bit_count()).filter(|&b| bm.get_bit(b)).collect()
}

#[test]
fn granularity_validation() {
    for g in [0, 1, 256, 511, 513, 3 * 512, 4096 + 512, 1 << 32, u64::MAX] {
        assert_eq!(
            DirtyBitmap::new(GIB, g).unwrap_err(),
            Error::InvalidGranularity { granularity: g },
            "granularity {g}"
        );
    }
    for bits in 9..=31 {
        let bm = DirtyBitmap::new(GIB, 1 << bits).unwrap();
        assert_eq!(bm.granularity(), 1 << bits);
        assert_eq!(bm.granularity_bits(), bits);
    }
}

#[test]
fn error_messages_have_context() {
    let e = DirtyBitmap::new(GIB, 1000).unwrap_err().to_string();
    assert!(
        e.contains("1000") && e.contains("512") && e.contains("2147483648"),
        "{e}"
    );
    let e = DirtyBitmap::new(u64::MAX, 512).unwrap_err().to_string();
    assert!(
        e.contains("larger granularity") && e.contains(&u64::MAX.to_string()),
        "{e}"
    );
}

#[test]
fn size_limit_is_exact_and_never_overflows() {
    // Largest disk at 512 B granularity: 2^29 bytes * 8 bits * 512 B.
    let max_size = MAX_SERIALIZED_BYTES * 8 * 512;
    assert!(matches!(
        DirtyBitmap::new(max_size + 1, 512),
        Err(Error::TooLarge { needed, limit, .. }) if needed == MAX_SERIALIZED_BYTES + 1 && limit == MAX_SERIALIZED_BYTES
    ));
    // Sizes near u64::MAX must be rejected, not wrap around.
    assert!(matches!(
        DirtyBitmap::new(u64::MAX, 1 << 20),
        Err(Error::TooLarge { .. })
    ));
    // u64::MAX at 2 GiB granularity needs 2^33 bits = 2^30 bytes: too large.
    assert!(matches!(
        DirtyBitmap::new(u64::MAX, MAX_GRANULARITY),
        Err(Error::TooLarge { .. })
    ));
    // The limit itself (2^32 bits at 2 GiB = 2^63 bytes of disk) is accepted
    // without allocating here: check the geometry on a smaller twin instead.
    let bm = DirtyBitmap::new(u64::MAX / 4, MAX_GRANULARITY).unwrap();
    assert_eq!(bm.bit_count(), (u64::MAX / 4).div_ceil(MAX_GRANULARITY));
    assert_eq!(bm.serialized_len(), bm.bit_count() / 8);
}

#[test]
fn zero_size_bitmap() {
    let bm = DirtyBitmap::new(0, 512).unwrap();
    assert_eq!(bm.bit_count(), 0);
    assert_eq!(bm.serialized_len(), 0);
    bm.mark(0, 4096);
    bm.deserialize_ones(0, 100);
    assert_eq!(bm.count(), 0);
    assert_eq!(bm.dirty_bytes(), 0);
    assert!(!bm.get(0));
    assert_eq!(bm.extents().count(), 0);
    assert!(bm.is_serialized_range_zero(0, 10));
    let mut out = [0xffu8; 3];
    bm.serialize_into(0, &mut out);
    assert_eq!(out, [0; 3]);
    bm.deserialize_from(0, &[0xff]).unwrap();
    assert_eq!(bm.count(), 0);
}

#[test]
fn partial_last_granule() {
    let size = 10 * K64 + 100;
    let bm = DirtyBitmap::new(size, K64).unwrap();
    assert_eq!(bm.bit_count(), 11);
    assert_eq!(bm.serialized_len(), 2);
    bm.mark(size - 1, 1);
    assert_eq!(dirty_bits(&bm), vec![10]);
    assert_eq!(bm.dirty_bytes(), 100);
    assert!(bm.get(10 * K64) && bm.get(size - 1) && !bm.get(size));
    bm.mark(0, 1);
    assert_eq!(bm.dirty_bytes(), K64 + 100);
}

#[test]
fn mark_is_clamped_at_end() {
    let size = 1000 * 512 + 1;
    let bm = DirtyBitmap::new(size, 512).unwrap();
    bm.mark(size - 1, u64::MAX); // offset + len would overflow
    assert_eq!(dirty_bits(&bm), vec![1000]);
    bm.mark(size, 512); // starts at the end: nothing
    bm.mark(u64::MAX, 1);
    assert_eq!(bm.count(), 1);
    bm.mark(0, u64::MAX);
    assert_eq!(bm.count(), 1001);
    assert_eq!(bm.dirty_bytes(), size);
    // No bit beyond bit_count was set in the last word.
    let mut out = vec![0u8; 200];
    bm.serialize_into(0, &mut out);
    assert_eq!(out[125], 0x01);
    assert!(out[126..].iter().all(|&b| b == 0));
}

#[test]
fn zero_length_does_nothing() {
    let bm = DirtyBitmap::new(GIB, 4096).unwrap();
    bm.mark(4096, 0);
    bm.set_range(0, 0);
    assert!(bm.is_clean());
    bm.set_range(0, GIB);
    bm.clear_range(4096, 0);
    assert_eq!(bm.count(), bm.bit_count());
}

#[test]
fn unaligned_marks_touch_every_granule() {
    let bm = DirtyBitmap::new(GIB, 4096).unwrap();
    bm.mark(4095, 2); // straddles granules 0 and 1
    assert_eq!(dirty_bits(&bm), vec![0, 1]);
    bm.mark(3 * 4096 + 1, 4096); // granules 3 and 4
    assert_eq!(dirty_bits(&bm), vec![0, 1, 3, 4]);
    bm.mark(8 * 4096, 4096); // exactly granule 8
    assert_eq!(dirty_bits(&bm), vec![0, 1, 3, 4, 8]);
}

#[test]
fn marks_spanning_words() {
    let bm = DirtyBitmap::new(GIB, 512).unwrap();
    // Bits 60..=200: partial first word, two full words, partial last word.
    bm.mark(60 * 512, 141 * 512);
    assert_eq!(dirty_bits(&bm), (60..=200).collect::<Vec<_>>());
    // Exactly one whole word.
    bm.clear();
    bm.mark(256 * 512, 64 * 512);
    assert_eq!(dirty_bits(&bm), (256..320).collect::<Vec<_>>());
    // Last bit of one word and first of the next.
    bm.clear();
    bm.mark(63 * 512 + 511, 2);
    assert_eq!(dirty_bits(&bm), vec![63, 64]);
}

#[test]
fn disabled_ignores_mark_but_not_set_range() {
    let bm = DirtyBitmap::new(GIB, K64).unwrap();
    assert!(bm.is_enabled());
    bm.set_enabled(false);
    assert!(!bm.is_enabled());
    bm.mark(0, GIB);
    assert!(bm.is_clean());
    bm.set_range(K64, 1);
    assert_eq!(dirty_bits(&bm), vec![1]);
    bm.set_enabled(true);
    bm.mark(0, 1);
    assert_eq!(dirty_bits(&bm), vec![0, 1]);
}

#[test]
fn clear_range_clears_touched_granules() {
    let bm = DirtyBitmap::new(GIB, 4096).unwrap();
    bm.set_range(0, 20 * 4096);
    // Touches granules 2..=5 partially at both ends: all four are cleared.
    bm.clear_range(2 * 4096 + 1, 3 * 4096);
    let expect: Vec<u64> = (0..2).chain(6..20).collect();
    assert_eq!(dirty_bits(&bm), expect);
    bm.clear_range(10 * 4096, u64::MAX);
    assert_eq!(dirty_bits(&bm), vec![0, 1, 6, 7, 8, 9]);
    bm.clear_range(GIB, 4096); // past the end: nothing
    assert_eq!(bm.count(), 6);
    bm.clear();
    assert!(bm.is_clean() && bm.count() == 0);
}

#[test]
fn granularity_2g() {
    let size = 5 * GIB + 7;
    let bm = DirtyBitmap::new(size, MAX_GRANULARITY).unwrap();
    assert_eq!(bm.bit_count(), 3);
    bm.mark(4 * GIB, 1);
    assert_eq!(dirty_bits(&bm), vec![2]);
    assert_eq!(bm.dirty_bytes(), GIB + 7);
    bm.mark(MAX_GRANULARITY - 1, 1);
    assert_eq!(
        bm.extents().collect::<Vec<_>>(),
        vec![
            Extent {
                start: 0,
                length: 2 * GIB,
                dirty: true
            },
            Extent {
                start: 2 * GIB,
                length: 2 * GIB,
                dirty: false
            },
            Extent {
                start: 4 * GIB,
                length: GIB + 7,
                dirty: true
            },
        ]
    );
    let mut out = [0xaa; 2];
    bm.serialize_into(0, &mut out);
    assert_eq!(out, [0b101, 0]);
}

#[test]
fn extents_cover_whole_disk() {
    let size = 100 * 512 + 3;
    let bm = DirtyBitmap::new(size, 512).unwrap();
    assert_eq!(
        bm.extents().collect::<Vec<_>>(),
        vec![Extent {
            start: 0,
            length: size,
            dirty: false
        }]
    );
    bm.mark(0, 512);
    bm.mark(64 * 512, 512 * 3);
    bm.mark(100 * 512, 1);
    let ext: Vec<_> = bm.extents().collect();
    assert_eq!(
        ext,
        vec![
            Extent {
                start: 0,
                length: 512,
                dirty: true
            },
            Extent {
                start: 512,
                length: 63 * 512,
                dirty: false
            },
            Extent {
                start: 64 * 512,
                length: 3 * 512,
                dirty: true
            },
            Extent {
                start: 67 * 512,
                length: 33 * 512,
                dirty: false
            },
            Extent {
                start: 100 * 512,
                length: 3,
                dirty: true
            },
        ]
    );
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), size);
    assert_eq!(
        bm.dirty_extents().collect::<Vec<_>>(),
        vec![(0, 512), (64 * 512, 3 * 512), (100 * 512, 3)]
    );
    bm.set_range(0, size);
    assert_eq!(
        bm.extents().collect::<Vec<_>>(),
        vec![Extent {
            start: 0,
            length: size,
            dirty: true
        }]
    );
}

#[test]
fn merge_requires_same_size() {
    let a = DirtyBitmap::new(GIB, K64).unwrap();
    let b = DirtyBitmap::new(GIB + 512, K64).unwrap();
    assert_eq!(
        a.merge_from(&b),
        Err(Error::SizeMismatch {
            ours: GIB,
            theirs: GIB + 512
        })
    );
}

#[test]
fn merge_same_granularity_and_self() {
    let a = DirtyBitmap::new(GIB, 4096).unwrap();
    let b = DirtyBitmap::new(GIB, 4096).unwrap();
    a.mark(0, 4096);
    b.mark(70 * 4096, 4096);
    b.set_enabled(false);
    a.set_enabled(false); // merge ignores the flag
    a.merge_from(&b).unwrap();
    assert_eq!(dirty_bits(&a), vec![0, 70]);
    assert_eq!(dirty_bits(&b), vec![70]);
    a.merge_from(&a).unwrap();
    assert_eq!(dirty_bits(&a), vec![0, 70]);
}

#[test]
fn merge_fine_into_coarse() {
    let size = 10 * K64 + 512;
    let fine = DirtyBitmap::new(size, 512).unwrap();
    let coarse = DirtyBitmap::new(size, K64).unwrap();
    fine.mark(K64 - 512, 512); // last 512 B of coarse granule 0
    fine.mark(3 * K64 + 1024, 512); // inside coarse granule 3
    fine.mark(10 * K64, 1); // the partial last granule
    coarse.merge_from(&fine).unwrap();
    assert_eq!(dirty_bits(&coarse), vec![0, 3, 10]);
}

#[test]
fn merge_coarse_into_fine() {
    let size = 4 * K64 + 1000;
    let fine = DirtyBitmap::new(size, 512).unwrap();
    let coarse = DirtyBitmap::new(size, K64).unwrap();
    coarse.mark(K64 + 5, 1); // coarse granule 1 -> fine 128..256
    coarse.mark(4 * K64, 1); // last coarse granule, clipped to size
    fine.merge_from(&coarse).unwrap();
    let expect: Vec<u64> = (128..256).chain(512..=513).collect();
    assert_eq!(dirty_bits(&fine), expect);
    assert_eq!(fine.dirty_bytes(), K64 + 1000);
}

#[test]
fn serialization_matches_qemu_example() {
    // Reference 1.5: 64 KiB granules #1, #16, #17 dirty -> [0]=0x02, [2]=0x03.
    let bm = DirtyBitmap::new(GIB, K64).unwrap();
    bm.mark(K64, K64);
    bm.mark(16 * K64 + 4096, 4096);
    bm.mark(17 * K64 + 100, 1);
    let mut out = vec![0xffu8; bm.serialized_len() as usize];
    bm.serialize_into(0, &mut out);
    assert_eq!(&out[..4], &[0x02, 0x00, 0x03, 0x00]);
    assert!(out[3..].iter().all(|&b| b == 0));
    // Unaligned window.
    let mut win = [0xffu8; 3];
    bm.serialize_into(1, &mut win);
    assert_eq!(win, [0x00, 0x03, 0x00]);
}

#[test]
fn serialize_past_end_is_zero() {
    // 13 bits -> 2 bytes, tail bits 13..16 are zero.
    let bm = DirtyBitmap::new(13 * 512, 512).unwrap();
    bm.set_range(0, u64::MAX);
    let mut out = [0xaau8; 20];
    bm.serialize_into(0, &mut out);
    assert_eq!(out[0], 0xff);
    assert_eq!(out[1], 0x1f);
    assert!(out[2..].iter().all(|&b| b == 0));
    let mut far = [0xaau8; 4];
    bm.serialize_into(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn serialize_large_unaligned_window() {
    let bm = DirtyBitmap::new(64 * GIB, 512).unwrap();
    for i in 0..1000u64 {
        bm.set_range(i * 7919 * 512, 512);
    }
    let len = bm.serialized_len() as usize;
    let mut whole = vec![0u8; len];
    bm.serialize_into(0, &mut whole);
    for (off, n) in [
        (3usize, 100usize),
        (5, 8),
        (8, 17),
        (1000, 4096),
        (len - 5, 5),
    ] {
        let mut part = vec![0u8; n];
        bm.serialize_into(off as u64, &mut part);
        assert_eq!(part, whole[off..off + n], "window {off}+{n}");
    }
    // Bit k must be byte k/8, bit k%8.
    for i in 0..1000u64 {
        let k = i * 7919;
        assert_eq!(whole[(k / 8) as usize] >> (k % 8) & 1, 1);
    }
}

#[test]
fn deserialize_overwrites_and_masks_tail() {
    let bm = DirtyBitmap::new(13 * 512, 512).unwrap();
    bm.set_range(0, 512); // bit 0 is overwritten below
    bm.deserialize_from(0, &[0x02, 0xff, 0xff, 0xff]).unwrap();
    assert_eq!(dirty_bits(&bm), vec![1, 8, 9, 10, 11, 12]);
    assert_eq!(bm.count(), 6);
    let mut out = [0u8; 2];
    bm.serialize_into(0, &mut out);
    assert_eq!(out, [0x02, 0x1f]);
    // Start at the exact end: accepted, writes nothing; past it: error.
    bm.deserialize_from(2, &[0xff]).unwrap();
    assert_eq!(
        bm.deserialize_from(3, &[0xff]),
        Err(Error::OutOfRange {
            byte_offset: 3,
            len: 1,
            serialized_len: 2
        })
    );
}

#[test]
fn deserialize_partial_word_keeps_neighbours() {
    let bm = DirtyBitmap::new(GIB, 512).unwrap();
    bm.set_range(0, 64 * 512 * 3); // words 0..3 all ones
    bm.deserialize_from(3, &[0x00, 0x0f]).unwrap(); // bytes 3 and 4 of word 0
    let mut out = [0u8; 8];
    bm.serialize_into(0, &mut out);
    assert_eq!(out, [0xff, 0xff, 0xff, 0x00, 0x0f, 0xff, 0xff, 0xff]);
    // Crossing a word boundary unaligned.
    bm.deserialize_from(6, &[0, 0, 0, 0, 0]).unwrap();
    let mut out = [0u8; 16];
    bm.serialize_into(0, &mut out);
    assert_eq!(out[5..12], [0xff, 0, 0, 0, 0, 0, 0xff]);
}

#[test]
fn deserialize_ones_and_zero_check() {
    let bm = DirtyBitmap::new(100 * 512, 512).unwrap(); // 100 bits, 13 bytes
    assert!(bm.is_serialized_range_zero(0, 13));
    bm.deserialize_ones(12, 65536); // a whole cluster: only bits 96..100
    assert_eq!(dirty_bits(&bm), vec![96, 97, 98, 99]);
    assert!(bm.is_serialized_range_zero(0, 12));
    assert!(!bm.is_serialized_range_zero(12, 1));
    assert!(!bm.is_serialized_range_zero(0, u64::MAX));
    assert!(bm.is_serialized_range_zero(13, 100));
    assert!(bm.is_serialized_range_zero(u64::MAX, u64::MAX));
    bm.deserialize_ones(1, 1);
    assert_eq!(dirty_bits(&bm)[..8], (8..16).collect::<Vec<_>>()[..]);
    assert!(!bm.is_serialized_range_zero(1, 1));
    assert!(bm.is_serialized_range_zero(0, 1) && bm.is_serialized_range_zero(2, 10));
    bm.deserialize_ones(u64::MAX, u64::MAX); // clamped, no overflow
    assert_eq!(bm.count(), 12);
}

#[test]
fn snapshot_is_independent() {
    let bm = DirtyBitmap::new(GIB, K64).unwrap();
    bm.mark(0, 1);
    bm.set_enabled(false);
    let snap = bm.snapshot();
    assert_eq!(snap.size(), bm.size());
    assert_eq!(snap.granularity(), bm.granularity());
    assert!(!snap.is_enabled());
    bm.set_range(K64, 1);
    assert_eq!(dirty_bits(&snap), vec![0]);
    assert_eq!(dirty_bits(&bm), vec![0, 1]);

    let cloned = bm.clone();
    assert_eq!(dirty_bits(&cloned), vec![0, 1]);
    assert!(!cloned.is_enabled());

    let taken = bm.snapshot_and_clear();
    assert_eq!(dirty_bits(&taken), vec![0, 1]);
    assert!(bm.is_clean());
}

#[test]
fn debug_is_compact() {
    let bm = DirtyBitmap::new(GIB, K64).unwrap();
    bm.mark(0, 3 * K64);
    let s = format!("{bm:?}");
    assert!(
        s.contains("size: 1073741824") && s.contains("dirty: 3"),
        "{s}"
    );
}

#[test]
fn send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<DirtyBitmap>();
}
