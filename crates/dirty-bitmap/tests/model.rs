//! Property tests: `DirtyBitmap` against a plain `Vec<bool>` model.

use dirty_bitmap::{DirtyBitmap, Error, Extent};
use proptest::prelude::*;

/// The obvious, slow reference implementation.
#[derive(Debug, Clone)]
struct Model {
    size: u64,
    g: u64,
    enabled: bool,
    bits: Vec<bool>,
}

impl Model {
    fn new(size: u64, g: u64) -> Self {
        Self {
            size,
            g,
            enabled: true,
            bits: vec![false; size.div_ceil(g) as usize],
        }
    }

    /// Indices of the granules touching `off..off+len`, clamped to the disk.
    fn touched(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || off >= self.size {
            return 0..0;
        }
        let end = off.saturating_add(len).min(self.size);
        (off / self.g) as usize..((end - 1) / self.g + 1) as usize
    }

    fn fill(&mut self, off: u64, len: u64, v: bool) {
        for i in self.touched(off, len) {
            self.bits[i] = v;
        }
    }

    fn slen(&self) -> u64 {
        (self.bits.len() as u64).div_ceil(8)
    }

    fn byte(&self, b: u64) -> u8 {
        (0..8)
            .filter(|i| self.bits.get((b * 8 + i) as usize) == Some(&true))
            .fold(0u8, |acc, i| acc | 1 << i)
    }

    fn extents(&self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (i, &d) in self.bits.iter().enumerate() {
            let start = i as u64 * self.g;
            let length = self.g.min(self.size - start);
            match out.last_mut() {
                Some(e) if e.dirty == d => e.length += length,
                _ => out.push(Extent {
                    start,
                    length,
                    dirty: d,
                }),
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
enum Op {
    Mark(u64, u64),
    SetRange(u64, u64),
    ClearRange(u64, u64),
    Clear,
    SetEnabled(bool),
    /// Merge from a bitmap with granularity `512 << shift` marked at ranges.
    Merge(u32, Vec<(u64, u64)>),
    Deserialize(u64, Vec<u8>),
    DeserializeOnes(u64, u64),
    SnapshotAndClear,
    /// Compare a serialized window and point queries.
    Probe(u64, u64, u64),
}

fn geometry() -> impl Strategy<Value = (u64, u64)> {
    (0u32..4).prop_flat_map(|shift| {
        let g = 512u64 << shift;
        (Just(g), 0..=260 * g)
    })
}

fn ops(size: u64, g: u64) -> impl Strategy<Value = Vec<Op>> {
    let off = 0..=size + g;
    let len = prop_oneof![8 => 0..=70 * g, 1 => Just(u64::MAX)];
    let range = (off.clone(), len);
    let slen = size.div_ceil(g).div_ceil(8);
    let op = prop_oneof![
        6 => range.clone().prop_map(|(o, l)| Op::Mark(o, l)),
        2 => range.clone().prop_map(|(o, l)| Op::SetRange(o, l)),
        3 => range.clone().prop_map(|(o, l)| Op::ClearRange(o, l)),
        1 => Just(Op::Clear),
        2 => any::<bool>().prop_map(Op::SetEnabled),
        2 => (0u32..5, prop::collection::vec(range.clone(), 0..6))
            .prop_map(|(s, r)| Op::Merge(s, r)),
        2 => (0..=slen + 2, prop::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(o, d)| Op::Deserialize(o, d)),
        1 => (0..=slen + 1, 0..=slen + 1).prop_map(|(o, l)| Op::DeserializeOnes(o, l)),
        1 => Just(Op::SnapshotAndClear),
        2 => (0..=slen + 1, 0..=slen + 1, off).prop_map(|(o, l, p)| Op::Probe(o, l, p)),
    ];
    prop::collection::vec(op, 0..40)
}

fn case() -> impl Strategy<Value = (u64, u64, Vec<Op>)> {
    geometry().prop_flat_map(|(g, size)| (Just(g), Just(size), ops(size, g)))
}

fn assert_same(bm: &DirtyBitmap, m: &Model) -> Result<(), TestCaseError> {
    let bits: Vec<bool> = (0..bm.bit_count()).map(|b| bm.get_bit(b)).collect();
    prop_assert_eq!(&bits, &m.bits);
    let count = m.bits.iter().filter(|&&b| b).count() as u64;
    prop_assert_eq!(bm.count(), count);
    prop_assert_eq!(bm.is_clean(), count == 0);
    prop_assert_eq!(bm.is_enabled(), m.enabled);
    let ext = m.extents();
    let dirty_bytes: u64 = ext.iter().filter(|e| e.dirty).map(|e| e.length).sum();
    prop_assert_eq!(bm.dirty_bytes(), dirty_bytes);
    prop_assert_eq!(bm.extents().collect::<Vec<_>>(), ext.clone());
    let dirty: Vec<(u64, u64)> = ext
        .iter()
        .filter(|e| e.dirty)
        .map(|e| (e.start, e.length))
        .collect();
    prop_assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), dirty);
    prop_assert_eq!(bm.serialized_len(), m.slen());
    let mut out = vec![0xa5u8; m.slen() as usize + 9];
    bm.serialize_into(0, &mut out);
    let expect: Vec<u8> = (0..out.len() as u64).map(|b| m.byte(b)).collect();
    prop_assert_eq!(&out, &expect);
    // Round trip through the serialized form.
    let copy = DirtyBitmap::new(m.size, m.g).unwrap();
    copy.deserialize_from(0, &out).unwrap();
    prop_assert_eq!(
        (0..copy.bit_count())
            .map(|b| copy.get_bit(b))
            .collect::<Vec<_>>(),
        bits
    );
    Ok(())
}

fn apply(bm: &DirtyBitmap, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match *op {
        Op::Mark(o, l) => {
            bm.mark(o, l);
            if m.enabled {
                m.fill(o, l, true);
            }
        }
        Op::SetRange(o, l) => {
            bm.set_range(o, l);
            m.fill(o, l, true);
        }
        Op::ClearRange(o, l) => {
            bm.clear_range(o, l);
            m.fill(o, l, false);
        }
        Op::Clear => {
            bm.clear();
            m.bits.fill(false);
        }
        Op::SetEnabled(on) => {
            bm.set_enabled(on);
            m.enabled = on;
        }
        Op::Merge(shift, ref ranges) => {
            let g2 = 512u64 << shift;
            let other = DirtyBitmap::new(m.size, g2).unwrap();
            let mut om = Model::new(m.size, g2);
            for &(o, l) in ranges {
                other.mark(o, l);
                om.fill(o, l, true);
            }
            bm.merge_from(&other).unwrap();
            for (j, &d) in om.bits.iter().enumerate() {
                if d {
                    let start = j as u64 * g2;
                    m.fill(start, g2.min(m.size - start), true);
                }
            }
            let mismatched = DirtyBitmap::new(m.size + 1, g2).unwrap();
            let r = bm.merge_from(&mismatched);
            prop_assert!(matches!(r, Err(Error::SizeMismatch { .. })), "{:?}", r);
        }
        Op::Deserialize(o, ref data) => {
            let r = bm.deserialize_from(o, data);
            if o > m.slen() {
                prop_assert!(matches!(r, Err(Error::OutOfRange { .. })), "{:?}", r);
            } else {
                prop_assert!(r.is_ok());
                for (i, &byte) in data.iter().enumerate() {
                    for bit in 0..8 {
                        let k = (o + i as u64) * 8 + bit;
                        if let Some(slot) = m.bits.get_mut(k as usize) {
                            *slot = byte >> bit & 1 == 1;
                        }
                    }
                }
            }
        }
        Op::DeserializeOnes(o, l) => {
            bm.deserialize_ones(o, l);
            for k in o * 8..(o + l) * 8 {
                if let Some(slot) = m.bits.get_mut(k as usize) {
                    *slot = true;
                }
            }
        }
        Op::SnapshotAndClear => {
            let snap = bm.snapshot_and_clear();
            assert_same(&snap, m)?;
            m.bits.fill(false);
        }
        Op::Probe(o, l, p) => {
            let zero = (o..o + l).all(|b| m.byte(b) == 0);
            prop_assert_eq!(bm.is_serialized_range_zero(o, l), zero);
            let mut win = vec![0x5au8; l as usize];
            bm.serialize_into(o, &mut win);
            prop_assert_eq!(win, (o..o + l).map(|b| m.byte(b)).collect::<Vec<_>>());
            let expect = p < m.size && m.bits[(p / m.g) as usize];
            prop_assert_eq!(bm.get(p), expect);
            prop_assert_eq!(bm.get(p), expect);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn matches_model((g, size, ops) in case()) {
        let bm = DirtyBitmap::new(size, g).unwrap();
        let mut m = Model::new(size, g);
        prop_assert_eq!(bm.bit_count(), m.bits.len() as u64);
        for op in &ops {
            apply(&bm, &mut m, op)?;
            assert_same(&bm, &m)?;
        }
        let snap = bm.snapshot();
        assert_same(&snap, &m)?;
    }
}
