//! Directory format: round trips and every check QEMU makes, with QEMU's texts.

use super::{install_directory, raw_entry, zero_table};
use crate::error::Error;
use crate::format::*;
use crate::testing::MemImage;
use crate::Bitmaps;

const CS: u64 = 65536;
const DISK: u64 = 64 << 20;

fn parse(dir: &[u8], nb: u32) -> crate::Result<Vec<DirEntry>> {
    parse_directory(dir, nb, CS, DISK)
}

fn good(name: &str) -> Vec<u8> {
    raw_entry(CS * 3, 1, FLAG_AUTO, 1, 16, name.as_bytes(), &[])
}

#[test]
fn ext_round_trip_and_bytes() {
    let x = BitmapsExt {
        nb_bitmaps: 2,
        directory_size: 80,
        directory_offset: 0x50000,
    };
    let b = x.to_bytes();
    assert_eq!(b.len(), 24);
    assert_eq!(&b[0..4], &[0, 0, 0, 2]);
    assert_eq!(&b[4..8], &[0; 4]);
    assert_eq!(&b[8..16], &80u64.to_be_bytes());
    assert_eq!(&b[16..24], &0x50000u64.to_be_bytes());
    assert_eq!(BitmapsExt::parse(&b, CS).unwrap(), x);
}

#[test]
fn ext_violations_give_qemu_texts() {
    let x = BitmapsExt {
        nb_bitmaps: 1,
        directory_size: 32,
        directory_offset: CS,
    }
    .to_bytes();
    for len in [0usize, 16, 23, 25, 32] {
        let mut d = x.clone();
        d.resize(len, 0);
        let e = BitmapsExt::parse(&d, CS).unwrap_err();
        assert_eq!(e.to_string(), "bitmaps_ext: Invalid extension length");
    }
    let mut d = x.clone();
    d[7] = 1;
    assert_eq!(
        BitmapsExt::parse(&d, CS).unwrap_err().to_string(),
        "bitmaps_ext: Reserved field is not zero"
    );
    let mut d = x.clone();
    d[0..4].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        BitmapsExt::parse(&d, CS).unwrap_err().to_string(),
        "found bitmaps extension with zero bitmaps"
    );
    let mut d = x.clone();
    d[0..4].copy_from_slice(&65536u32.to_be_bytes());
    assert_eq!(
        BitmapsExt::parse(&d, CS).unwrap_err().to_string(),
        "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535"
    );
    let mut d = x.clone();
    d[16..24].copy_from_slice(&(CS + 512).to_be_bytes());
    assert_eq!(
        BitmapsExt::parse(&d, CS).unwrap_err().to_string(),
        "bitmaps_ext: invalid bitmap directory offset"
    );
    let mut d = x.clone();
    d[8..16].copy_from_slice(&(67107840u64 + 1).to_be_bytes());
    assert_eq!(
        BitmapsExt::parse(&d, CS).unwrap_err().to_string(),
        "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)"
    );
    d[8..16].copy_from_slice(&67107840u64.to_be_bytes());
    assert!(BitmapsExt::parse(&d, CS).is_ok());
}

#[test]
fn directory_round_trip() {
    let entries: Vec<DirEntry> = (0..5)
        .map(|i| DirEntry {
            table_offset: CS * (i + 2),
            table_size: 1,
            flags: [0, FLAG_AUTO, FLAG_IN_USE, FLAG_AUTO | FLAG_IN_USE, 0][i as usize],
            granularity_bits: 9 + i as u8,
            name: "n".repeat(1 + i as usize * 3).into_bytes(),
        })
        .collect();
    let d = serialize_directory(&entries);
    assert_eq!(d.len() as u64, directory_size(&entries));
    assert_eq!(d.len() % 8, 0);
    assert_eq!(parse(&d, 5).unwrap(), entries);
    // byte layout of one entry: 24-byte header + name, padded to 8
    let one = serialize_directory(&entries[1..2]);
    assert_eq!(one, raw_entry(CS * 3, 1, FLAG_AUTO, 1, 10, b"nnnn", &[]));
    assert_eq!(one.len(), 32);
    // 1023-byte name is accepted
    let long = raw_entry(CS * 3, 1, 0, 1, 16, &[b'x'; 1023], &[]);
    assert_eq!(parse(&long, 1).unwrap()[0].name.len(), 1023);
}

fn constraints(dir: &[u8], name: &str) {
    let e = parse(dir, 1).unwrap_err();
    assert!(matches!(e, Error::EntryConstraints(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("Bitmap '{name}' doesn't satisfy the constraints")
    );
}

#[test]
fn entry_violations_give_qemu_texts() {
    // flag bit 2 (extra_data_compatible), as crafted by iotest 242
    constraints(
        &raw_entry(CS * 3, 1, 0x4 | FLAG_AUTO, 1, 16, b"bitmap-0", &[]),
        "bitmap-0",
    );
    constraints(&raw_entry(CS * 3, 1, 0x8000_0000, 1, 16, b"b", &[]), "b");
    // zero table size / zero or misaligned table offset / too big table
    constraints(&raw_entry(CS * 3, 0, 0, 1, 16, b"b", &[]), "b");
    constraints(&raw_entry(0, 1, 0, 1, 16, b"b", &[]), "b");
    constraints(&raw_entry(CS * 3 + 512, 1, 0, 1, 16, b"b", &[]), "b");
    constraints(
        &raw_entry(CS * 3, 0x800_0001, FLAG_IN_USE, 1, 16, b"b", &[]),
        "b",
    );
    // granularity bits 8 and 32
    constraints(&raw_entry(CS * 3, 1, 0, 1, 8, b"b", &[]), "b");
    constraints(&raw_entry(CS * 3, 1, 0, 1, 32, b"b", &[]), "b");
    // type other than dirty tracking
    constraints(&raw_entry(CS * 3, 1, 0, 2, 16, b"b", &[]), "b");
    // name too long
    constraints(
        &raw_entry(CS * 3, 1, 0, 1, 16, &[b'y'; 1024], &[]),
        &"y".repeat(1024),
    );
    // phys size > 512 MiB (8193 clusters of 64 KiB)
    constraints(&raw_entry(CS * 3, 8193, FLAG_IN_USE, 1, 16, b"b", &[]), "b");
    // table too small for the disk: only checked without IN_USE
    let small = 1u64; // 1 cluster at 512 B granularity covers 256 MiB: fine for 64 MiB
    assert!(parse(&raw_entry(CS * 3, small as u32, 0, 1, 9, b"b", &[]), 1).is_ok());
    let big_disk = 1u64 << 40;
    let e = parse_directory(&raw_entry(CS * 3, 1, 0, 1, 9, b"b", &[]), 1, CS, big_disk);
    assert!(matches!(e, Err(Error::EntryConstraints(_))));
    let e = parse_directory(
        &raw_entry(CS * 3, 1, FLAG_IN_USE, 1, 9, b"b", &[]),
        1,
        CS,
        big_disk,
    );
    assert!(e.is_ok(), "in-use entries skip the size check");
}

#[test]
fn directory_violations_give_qemu_texts() {
    let mut two = good("a");
    two.extend(good("b"));
    assert_eq!(
        parse(&two, 1).unwrap_err().to_string(),
        "More bitmaps found than specified in header extension"
    );
    assert_eq!(
        parse(&two, 3).unwrap_err().to_string(),
        "Less bitmaps found than specified in header extension"
    );
    assert_eq!(parse(&two, 2).unwrap().len(), 2);
    // extra data
    let x = raw_entry(CS * 3, 1, 0, 1, 16, b"b", &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        parse(&x, 1).unwrap_err().to_string(),
        "Bitmap extra data is not supported"
    );
    // directory size mismatch: trailing bytes too short for an entry, or a truncated entry
    let mut t = good("a");
    t.extend([0u8; 8]);
    assert_eq!(
        parse(&t, 1).unwrap_err().to_string(),
        "Broken bitmap directory"
    );
    let g = good("abcdefghij");
    assert_eq!(
        parse(&g[..g.len() - 8], 1).unwrap_err().to_string(),
        "Broken bitmap directory"
    );
    // trailing zero entry counted as a further bitmap
    let mut t = good("a");
    t.extend([0u8; 24]);
    assert_eq!(
        parse(&t, 1).unwrap_err().to_string(),
        "More bitmaps found than specified in header extension"
    );
    // directory sizes
    assert_eq!(
        parse(&[], 1).unwrap_err().to_string(),
        "Requested bitmap directory size is zero"
    );
    assert_eq!(
        check_directory_size(67107841).unwrap_err().to_string(),
        "Requested bitmap directory size is too big"
    );
    // duplicate names
    let mut dup = good("a");
    dup.extend(good("a"));
    assert_eq!(
        parse(&dup, 2).unwrap_err().to_string(),
        "Bitmap already exists: a"
    );
    // a name_size pointing past the end with a huge extra size never panics
    let mut e = good("a");
    e[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        parse(&e, 1).unwrap_err().to_string(),
        "Broken bitmap directory"
    );
}

#[test]
fn table_entries() {
    assert_eq!(decode_table_entry(0, CS), Ok(TableEntry::Zeros));
    assert_eq!(decode_table_entry(1, CS), Ok(TableEntry::Ones));
    assert_eq!(decode_table_entry(CS * 5, CS), Ok(TableEntry::Data(CS * 5)));
    assert!(
        decode_table_entry((CS * 5) | 1, CS).is_err(),
        "all-ones with offset"
    );
    assert!(decode_table_entry(CS * 5 + 512, CS).is_err(), "misaligned");
    assert!(decode_table_entry(2, CS).is_err(), "reserved bit 1");
    assert!(
        decode_table_entry(1 << 56 | CS, CS).is_err(),
        "reserved bit 56"
    );
    assert_eq!(
        decode_table_entry(CS * 5 + 512, 512),
        Ok(TableEntry::Data(CS * 5 + 512))
    );
}

#[test]
fn crafted_image_fails_to_open_with_qemu_text() {
    // The iotest 242 case through the whole open path, read-write and read-only.
    let img = MemImage::new(CS, DISK);
    let t = zero_table(&img, 1);
    install_directory(
        &img,
        &raw_entry(t, 1, FLAG_AUTO | 0x4, 1, 16, b"bitmap-0", &[]),
        1,
    );
    let before = img.state().file.clone();
    for ro in [false, true] {
        img.state().read_only = ro;
        let e = Bitmaps::open(&img, "disk0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bitmap 'bitmap-0' doesn't satisfy the constraints"
        );
    }
    assert_eq!(img.state().file, before, "a failed open writes nothing");
    assert!(img
        .state()
        .log
        .iter()
        .all(|o| matches!(o, crate::testing::Op::Alloc { .. })));
}

#[test]
fn bad_tables_fail_to_load() {
    let img = MemImage::new(CS, DISK);
    let t = zero_table(&img, 1);
    install_directory(&img, &raw_entry(t, 1, FLAG_AUTO, 1, 16, b"b0", &[]), 1);
    // reserved bits in the table entry
    img.state().file[t as usize..t as usize + 8].copy_from_slice(&((CS * 9) | 2).to_be_bytes());
    let e = Bitmaps::open(&img, "disk0").unwrap_err();
    assert!(matches!(e, Error::BadTable { .. }), "{e}");
    assert!(e
        .to_string()
        .starts_with("Could not read bitmap_table table from image for bitmap 'b0'"));
    // wrong table size for the disk (2 entries where 1 is needed)
    let img = MemImage::new(CS, DISK);
    let t = zero_table(&img, 2);
    install_directory(&img, &raw_entry(t, 2, FLAG_AUTO, 1, 16, b"b0", &[]), 1);
    let e = Bitmaps::open(&img, "disk0").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Could not read bitmap 'b0' from image"),
        "{e}"
    );
}

proptest::proptest! {
    #[test]
    fn random_directories_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300), nb in 0u32..5) {
        let _ = parse(&data, nb);
        let _ = BitmapsExt::parse(&data[..data.len().min(24)], CS);
    }

    #[test]
    fn mutated_directory_never_panics(pos in 0usize..64, val in proptest::num::u8::ANY) {
        let mut d = good("abc");
        d.extend(good("defghijklmnop"));
        if pos < d.len() { d[pos] = val; }
        let _ = parse(&d, 2);
    }
}
