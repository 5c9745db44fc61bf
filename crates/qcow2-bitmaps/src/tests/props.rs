//! Property: random marks survive store and load exactly, for random geometries.

use super::bits;
use crate::testing::MemImage;
use crate::{AddOptions, Bitmaps};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_marks_store_load_equal(
        cluster_bits in 9u32..17,
        gran_bits in 9u32..20,
        disk in 1u64..(64u64 << 20),
        marks in proptest::collection::vec((0u64..(64u64 << 20), 1u64..(1 << 20)), 0..40),
        disabled in proptest::bool::ANY,
    ) {
        let img = MemImage::new(1 << cluster_bits, disk);
        let set = Bitmaps::open(&img, "p").unwrap();
        set.add(&img, "a", AddOptions { granularity: Some(1 << gran_bits), persistent: true, disabled: false }).unwrap();
        set.add(&img, "b", AddOptions { granularity: None, persistent: true, disabled }).unwrap();
        for (o, l) in &marks {
            set.mark(*o % disk, *l);
        }
        let a = bits(&set.bitmap("a").unwrap());
        let b = bits(&set.bitmap("b").unwrap());
        set.store(&img).unwrap();
        // reopen read-write, then read-only after a second store
        let rw = MemImage::from_state(img.reopen_state(false));
        let set2 = Bitmaps::open(&rw, "p").unwrap();
        prop_assert_eq!(&bits(&set2.bitmap("a").unwrap()), &a);
        prop_assert_eq!(&bits(&set2.bitmap("b").unwrap()), &b);
        prop_assert_eq!(set2.list()[1].enabled, !disabled);
        set2.store(&rw).unwrap();
        let ro = MemImage::from_state(rw.reopen_state(true));
        let set3 = Bitmaps::open(&ro, "p").unwrap();
        prop_assert_eq!(&bits(&set3.bitmap("a").unwrap()), &a);
        prop_assert_eq!(&bits(&set3.bitmap("b").unwrap()), &b);
        // nothing leaked across the two stores: header + per bitmap (dirty clusters + table) + directory
        let cs = 1u64 << cluster_bits;
        let per = |v: &Vec<u8>| v.chunks(cs as usize).filter(|c| c.iter().any(|&x| x != 0)).count()
            + ((v.len() as u64).div_ceil(cs) * 8).div_ceil(cs) as usize;
        prop_assert_eq!(rw.allocated_clusters(), 1 + per(&a) + per(&b) + 1);
    }
}
