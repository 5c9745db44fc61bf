//! Hostile images: a corpus of corrupted images built from valid ones (header fields,
//! extensions, L1/L2/refcount tables, compressed descriptors). Each is opened read-only
//! and read-write, read completely, written and checked: every case must fail with an
//! `Err` where the format forbids it (or work correctly where the format allows it),
//! never panic, and never allocate memory sized by an unchecked field. A proptest flips
//! random bytes in the first clusters of a valid image.

mod common;

use proptest::prelude::*;
use qcow2::header::Header;
use qcow2::{
    create, BlockImage, CreateOptions, MemStorage, OpenOptions, Qcow2Image, Repair, Storage,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// What a case must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Both opens fail.
    OpenFails,
    /// Read-only open works (and reads the original data); read-write open fails.
    RwOpenFails,
    /// Opens work, but reading the whole disk fails somewhere.
    ReadFails,
    /// Everything works and reads the original data.
    Works,
    /// Anything but a panic (QEMU does not define the outcome either).
    NoPanic,
}

/// Where things are in the valid image a case starts from.
#[derive(Clone, Debug)]
struct Layout {
    cs: u64,
    l1: u64,
    rt: u64,
    rb: u64,
    l2: u64,
    /// File offset of the L2 entry of guest cluster 0 and its value.
    l2e0: u64,
    data0: u64,
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}
fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}

fn layout(img: &[u8]) -> Layout {
    let h = Header::parse(img, img.len() as u64).unwrap();
    let cs = h.cluster_size();
    let l2 = be64(img, h.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    let rb = be64(img, h.refcount_table_offset);
    Layout {
        cs,
        l1: h.l1_table_offset,
        rt: h.refcount_table_offset,
        rb,
        l2,
        l2e0: l2,
        data0: be64(img, l2) & 0x00ff_ffff_ffff_fe00,
    }
}

/// A valid v3 image with 64 KiB clusters and data in several clusters (cluster 0 is
/// allocated, so L1[0] and L2[0] exist).
fn valid_image(dir: &Path, cluster: u64, version: u32) -> Vec<u8> {
    let p = dir.join(format!("valid-{cluster}-{version}.qcow2"));
    qcow2::create(
        &p,
        &CreateOptions {
            size: 4 << 20,
            cluster_size: cluster,
            version,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        img.write_at(&vec![0xa5; 3 * cluster as usize], 0).unwrap();
        img.write_at(&vec![0x3c; 4096], 3 << 20).unwrap();
        img.write_zeroes(cluster * 5, cluster, false).unwrap();
    }
    std::fs::read(&p).unwrap()
}

/// Peak resident memory since the last reset, and a reset (Linux `clear_refs` 5).
fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
fn vm_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// What happened to one image.
#[derive(Default)]
struct Outcome {
    ro_open: Option<String>,
    rw_open: Option<String>,
    read_err: Option<String>,
    ro_data: Option<Vec<u8>>,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("ro_open_err", &self.ro_open)
            .field("rw_open_err", &self.rw_open)
            .field("read_err", &self.read_err)
            .field("ro_bytes_read", &self.ro_data.as_ref().map(Vec::len))
            .finish()
    }
}

fn read_everything(img: &Qcow2Image) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; img.size().min(64 << 20) as usize];
    for (i, chunk) in v.chunks_mut(65536).enumerate() {
        img.read_at(chunk, (i as u64) << 16)
            .map_err(|e| e.to_string())?;
    }
    Ok(v)
}

/// Opens read-only and read-write, reads all, writes a bit, checks.
fn exercise(path: &Path) -> Outcome {
    let mut out = Outcome::default();
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let bytes = std::fs::read(path).unwrap();
    match Qcow2Image::open(path, &ro) {
        Err(e) => out.ro_open = Some(e.to_string()),
        Ok(img) => {
            match read_everything(&img) {
                Ok(d) => out.ro_data = Some(d),
                Err(e) => out.read_err = Some(e),
            }
            let _ = qcow2::check_image(&img, Repair::None);
            // Reading past the end and writing must fail cleanly.
            assert!(img.read_at(&mut [0u8; 1], img.size()).is_err());
            assert!(img.write_at(&[1u8; 1], 0).is_err());
        }
    }
    match Qcow2Image::open(path, &OpenOptions::default()) {
        Err(e) => out.rw_open = Some(e.to_string()),
        Ok(img) => {
            if let Err(e) = read_everything(&img) {
                out.read_err.get_or_insert(e);
            }
            let size = img.size();
            let cs = img.cluster_size();
            let _ = img.write_at(&[0x77; 4096], 0);
            let _ = img.write_at(&vec![0x78; cs as usize], (size / 2) & !(cs - 1));
            let _ = img.write_at(&[0x79; 100], size.saturating_sub(100));
            let _ = img.write_zeroes(0, cs.min(size), true);
            let _ = img.discard(cs.min(size), cs.min(size - cs.min(size)));
            let _ = img.flush();
            let _ = read_everything(&img);
            let _ = qcow2::check_image(&img, Repair::None);
        }
    }
    // The same bytes through the in-memory storage (no file, no backing).
    let mem = Arc::new(MemStorage::new());
    mem.write_at(&bytes, 0).unwrap();
    if let Ok(img) = Qcow2Image::open_storage(mem, &OpenOptions::default()) {
        let _ = read_everything(&img);
        let _ = img.write_at(&[1; 512], 0);
        let _ = img.flush();
    }
    out
}

type Mutate = Box<dyn Fn(&mut Vec<u8>, &Layout)>;

struct Case {
    name: &'static str,
    expect: Expect,
    mutate: Mutate,
}

fn case(name: &'static str, expect: Expect, f: impl Fn(&mut Vec<u8>, &Layout) + 'static) -> Case {
    Case {
        name,
        expect,
        mutate: Box::new(f),
    }
}

fn header_cases() -> Vec<Case> {
    use Expect::*;
    let mut v = vec![
        case("bad magic", OpenFails, |b, _| b[0] = b'X'),
        case("empty file", OpenFails, |b, _| b.clear()),
        case("truncated to 71 bytes", OpenFails, |b, _| b.truncate(71)),
        case("truncated to 100 bytes", OpenFails, |b, _| b.truncate(100)),
        case("version 0", OpenFails, |b, _| put32(b, 4, 0)),
        case("version 1", OpenFails, |b, _| put32(b, 4, 1)),
        case("version 4", OpenFails, |b, _| put32(b, 4, 4)),
        case("l1 offset past EOF", OpenFails, |b, _| {
            let n = b.len() as u64;
            put64(b, 40, n.next_multiple_of(65536) + (1 << 30))
        }),
        case("l1 offset unaligned", OpenFails, |b, l| {
            put64(b, 40, l.l1 + 8)
        }),
        case("l1 offset near u64::MAX", OpenFails, |b, _| {
            put64(b, 40, !0xffff)
        }),
        case("l1 at the header", NoPanic, |b, _| put64(b, 40, 0)),
        case("l1 on the refcount table", NoPanic, |b, l| {
            put64(b, 40, l.rt)
        }),
        case("l1_size 0x7fffffff", OpenFails, |b, _| {
            put32(b, 36, 0x7fff_ffff)
        }),
        case("l1_size 0xffffffff", OpenFails, |b, _| {
            put32(b, 36, u32::MAX)
        }),
        case("l1_size too small for the disk", OpenFails, |b, _| {
            put32(b, 36, 0);
            put64(b, 24, 1 << 40);
        }),
        case("refcount table past EOF", OpenFails, |b, _| {
            put64(b, 48, 1 << 40)
        }),
        case("refcount table unaligned", OpenFails, |b, l| {
            put64(b, 48, l.rt + 512)
        }),
        case("refcount table on the L1 table", NoPanic, |b, l| {
            put64(b, 48, l.l1)
        }),
        case("refcount table at the header", NoPanic, |b, _| {
            put64(b, 48, 0)
        }),
        case("refcount_table_clusters 0", OpenFails, |b, _| {
            put32(b, 56, 0)
        }),
        case("refcount_table_clusters huge", OpenFails, |b, _| {
            put32(b, 56, u32::MAX)
        }),
        case("refcount_table_clusters past EOF", OpenFails, |b, _| {
            put32(b, 56, 100)
        }),
        case("cluster_bits 8", OpenFails, |b, _| put32(b, 20, 8)),
        case("cluster_bits 22", OpenFails, |b, _| put32(b, 20, 22)),
        case("cluster_bits 63", OpenFails, |b, _| put32(b, 20, 63)),
        case("cluster_bits 64", OpenFails, |b, _| put32(b, 20, 64)),
        case("cluster_bits u32::MAX", OpenFails, |b, _| {
            put32(b, 20, u32::MAX)
        }),
        case("cluster_bits 9 (tables now misaligned)", NoPanic, |b, _| {
            put32(b, 20, 9)
        }),
        case("refcount_order 7", OpenFails, |b, _| put32(b, 96, 7)),
        case("refcount_order u32::MAX", OpenFails, |b, _| {
            put32(b, 96, u32::MAX)
        }),
        case("refcount_order 0 (refcounts misread)", NoPanic, |b, _| {
            put32(b, 96, 0)
        }),
        case("refcount_order 6 (refcounts misread)", NoPanic, |b, _| {
            put32(b, 96, 6)
        }),
        case("header_length 0", OpenFails, |b, _| put32(b, 100, 0)),
        case("header_length 103", OpenFails, |b, _| put32(b, 100, 103)),
        case("header_length past the cluster", OpenFails, |b, _| {
            put32(b, 100, 65537)
        }),
        case("header_length u32::MAX", OpenFails, |b, _| {
            put32(b, 100, u32::MAX)
        }),
        case("header_length 104 (no compression byte)", Works, |b, _| {
            put32(b, 100, 104);
            b[104..112].fill(0);
        }),
        case("image size 2^63", OpenFails, |b, _| put64(b, 24, 1 << 63)),
        case("image size u64::MAX", OpenFails, |b, _| {
            put64(b, 24, u64::MAX)
        }),
        case("crypt_method 1 (AES)", OpenFails, |b, _| put32(b, 32, 1)),
        case("crypt_method 2 (LUKS)", OpenFails, |b, _| put32(b, 32, 2)),
        case("crypt_method u32::MAX", OpenFails, |b, _| {
            put32(b, 32, u32::MAX)
        }),
        case("unknown incompatible bit", OpenFails, |b, _| {
            put64(b, 72, 1 << 20)
        }),
        case("incompatible bit 63", OpenFails, |b, _| {
            put64(b, 72, 1 << 63)
        }),
        case("unknown compatible bit", Works, |b, _| {
            put64(b, 80, 1 << 40)
        }),
        case("unknown autoclear bit", Works, |b, _| put64(b, 88, 1 << 40)),
        case("corrupt bit", RwOpenFails, |b, _| put64(b, 72, 2)),
        case("dirty bit", Works, |b, _| put64(b, 72, 1)),
        case("external data file bit", OpenFails, |b, _| put64(b, 72, 4)),
        case("extended L2 bit", OpenFails, |b, _| put64(b, 72, 16)),
        case("compression bit without zstd type", OpenFails, |b, _| {
            put64(b, 72, 8)
        }),
        case("compression type 2", OpenFails, |b, _| b[104] = 2),
        case(
            "compression type zstd without the bit",
            OpenFails,
            |b, _| b[104] = 1,
        ),
        case("nb_snapshots huge", OpenFails, |b, _| {
            put32(b, 60, u32::MAX)
        }),
        case("snapshot table past EOF", OpenFails, |b, _| {
            put32(b, 60, 1);
            put64(b, 64, 1 << 40);
        }),
        case("snapshot table unaligned", OpenFails, |b, _| {
            put32(b, 60, 1);
            put64(b, 64, 12345);
        }),
        case("snapshot table on the L1 table", NoPanic, |b, l| {
            put32(b, 60, 3);
            put64(b, 64, l.l1);
        }),
        case("snapshot table of garbage", NoPanic, |b, l| {
            put32(b, 60, 2);
            put64(b, 64, l.data0);
        }),
        case("backing name offset past the cluster", OpenFails, |b, _| {
            put64(b, 8, 70000);
            put32(b, 16, 4);
        }),
        case("backing name size past the cluster", OpenFails, |b, _| {
            put64(b, 8, 200);
            put32(b, 16, 65500);
        }),
        case("backing name offset+size overflow", OpenFails, |b, _| {
            put64(b, 8, u64::MAX - 1);
            put32(b, 16, 16);
        }),
        case("backing name not UTF-8", OpenFails, |b, _| {
            put64(b, 8, 512);
            put32(b, 16, 4);
            b[512..516].copy_from_slice(&[0xff, 0xfe, 0x00, 0x80]);
        }),
        case("backing file missing", OpenFails, |b, _| {
            put64(b, 8, 512);
            put32(b, 16, 11);
            b[512..523].copy_from_slice(b"nonexistent");
        }),
        case("backing file is the image itself", NoPanic, |b, _| {
            put64(b, 8, 512);
            put32(b, 16, 9);
            b[512..521].copy_from_slice(b"img.qcow2");
        }),
        case("extension length overflow", OpenFails, |b, _| {
            put32(b, 112, 0x1234_5678);
            put32(b, 116, u32::MAX);
        }),
        case("extension length past the cluster", OpenFails, |b, _| {
            put32(b, 112, 0x1234_5678);
            put32(b, 116, 65536 - 120 + 1);
        }),
        case("extension filling the cluster exactly", Works, |b, _| {
            put32(b, 112, 0x1234_5678);
            put32(b, 116, 65536 - 120);
        }),
        case("duplicate extensions", NoPanic, |b, _| {
            for at in [112u64, 128] {
                put32(b, at, 0x1234_5678);
                put32(b, at + 4, 8);
            }
        }),
        case(
            "backing format extension without a backing file",
            NoPanic,
            |b, _| {
                put32(b, 112, 0xe279_2aca);
                put32(b, 116, 5);
                b[120..125].copy_from_slice(b"qcow2");
            },
        ),
        case("bitmaps extension of garbage", NoPanic, |b, _| {
            put64(b, 88, 1);
            put32(b, 112, 0x2385_2875);
            put32(b, 116, 24);
            b[120..144].fill(0xff);
        }),
        case(
            "bitmaps extension pointing at the L1 table",
            NoPanic,
            |b, l| {
                put64(b, 88, 1);
                put32(b, 112, 0x2385_2875);
                put32(b, 116, 24);
                put32(b, 120, 1000);
                put64(b, 128, 65536);
                put64(b, 136, l.l1);
            },
        ),
    ];
    // Tables.
    v.extend([
        case("L1 entry with reserved bits", ReadFails, |b, l| {
            let e = be64(b, l.l1);
            put64(b, l.l1, e | 1 << 56)
        }),
        case("L1 entry unaligned", ReadFails, |b, l| {
            let e = be64(b, l.l1);
            put64(b, l.l1, e + 512)
        }),
        case("L1 entry past EOF", NoPanic, |b, l| {
            put64(b, l.l1, COPIED | 1 << 40)
        }),
        case("L1 entry at the maximum offset", NoPanic, |b, l| {
            put64(b, l.l1, COPIED | 0x00ff_ffff_ffff_0000)
        }),
        case("L1 entry at the header", NoPanic, |b, l| {
            put64(b, l.l1, COPIED)
        }),
        case("L1 entry pointing at the L1 table", NoPanic, |b, l| {
            put64(b, l.l1, COPIED | l.l1)
        }),
        case(
            "L1 entry pointing at the refcount table",
            NoPanic,
            |b, l| put64(b, l.l1, COPIED | l.rt),
        ),
        case("L1 entries all the same L2", NoPanic, |b, l| {
            let e = be64(b, l.l1);
            put64(b, l.l1 + 8, e);
        }),
        case("L2 entry unaligned", ReadFails, |b, l| {
            let e = be64(b, l.l2e0);
            put64(b, l.l2e0, e + 512)
        }),
        case("L2 entry with reserved bits", ReadFails, |b, l| {
            let e = be64(b, l.l2e0);
            put64(b, l.l2e0, e | 1 << 57)
        }),
        case("L2 entry past EOF", NoPanic, |b, l| {
            put64(b, l.l2e0, COPIED | 1 << 40)
        }),
        case("L2 entry at the maximum offset", NoPanic, |b, l| {
            put64(b, l.l2e0, COPIED | 0x00ff_ffff_ffff_0000)
        }),
        case("L2 entry of offset 0 with COPIED", NoPanic, |b, l| {
            put64(b, l.l2e0, COPIED)
        }),
        case(
            "L2 entry pointing at the refcount table",
            NoPanic,
            |b, l| put64(b, l.l2e0, COPIED | l.rt),
        ),
        case("L2 entry pointing at the L1 table", NoPanic, |b, l| {
            put64(b, l.l2e0, COPIED | l.l1)
        }),
        case("L2 entry pointing at its own table", NoPanic, |b, l| {
            put64(b, l.l2e0, COPIED | l.l2)
        }),
        case("two L2 entries sharing a cluster", NoPanic, |b, l| {
            let e = be64(b, l.l2e0);
            put64(b, l.l2e0 + 8, e);
        }),
        case(
            "compressed with the largest sector count",
            ReadFails,
            |b, l| {
                // 64 KiB clusters: offset bits 0..54, sector count bits 54..62.
                put64(b, l.l2e0, COMPRESSED | 0xff << 54 | l.data0)
            },
        ),
        case("compressed past EOF", ReadFails, |b, l| {
            put64(b, l.l2e0, COMPRESSED | 1 << 40)
        }),
        case("compressed at the maximum offset", ReadFails, |b, l| {
            put64(b, l.l2e0, COMPRESSED | ((1 << 54) - 1))
        }),
        case("compressed garbage", ReadFails, |b, l| {
            put64(b, l.l2e0, COMPRESSED | 4 << 54 | l.data0)
        }),
        case("compressed over the header", ReadFails, |b, l| {
            put64(b, l.l2e0, COMPRESSED | 1 << 54)
        }),
        case("refcount block unaligned", OpenFails, |b, l| {
            put64(b, l.rt, l.rb + 512)
        }),
        case("refcount block past EOF", OpenFails, |b, l| {
            put64(b, l.rt, 1 << 40)
        }),
        case("refcount block at the header", OpenFails, |b, l| {
            put64(b, l.rt, 0x200)
        }),
        case(
            "refcount block with reserved low bits (masked, as QEMU does)",
            Works,
            |b, l| put64(b, l.rt, l.rb | 1),
        ),
        case("refcount block on the L1 table", NoPanic, |b, l| {
            put64(b, l.rt, l.l1)
        }),
        case("refcount block missing", NoPanic, |b, l| put64(b, l.rt, 0)),
        case("refcount block all zero", NoPanic, |b, l| {
            let (s, e) = (l.rb as usize, (l.rb + l.cs) as usize);
            b[s..e].fill(0)
        }),
        case("refcount block all ones", NoPanic, |b, l| {
            let (s, e) = (l.rb as usize, (l.rb + l.cs) as usize);
            b[s..e].fill(0xff)
        }),
        case("refcount table of garbage", OpenFails, |b, l| {
            let (s, e) = (l.rt as usize, (l.rt + l.cs) as usize);
            b[s..e].fill(0x5a)
        }),
        case("L2 table of garbage", NoPanic, |b, l| {
            let (s, e) = (l.l2 as usize, (l.l2 + l.cs) as usize);
            for (i, x) in b[s..e].iter_mut().enumerate() {
                *x = (i as u8).wrapping_mul(151) ^ 0x3d;
            }
        }),
        case("file truncated after the L2 table", NoPanic, |b, l| {
            b.truncate((l.l2 + l.cs) as usize)
        }),
        case(
            "file truncated in the middle of the L1 table",
            OpenFails,
            |b, l| b.truncate(l.l1 as usize + 4),
        ),
    ]);
    v
}

fn run_case(dir: &Path, base: &[u8], data: &[u8], c: &Case) -> Result<(), String> {
    let mut bytes = base.to_vec();
    let l = layout(base);
    (c.mutate)(&mut bytes, &l);
    let path = dir.join("img.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    let rss0 = vm_rss_kib();
    reset_hwm();
    let t = Instant::now();
    let out = catch_unwind(AssertUnwindSafe(|| exercise(&path))).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("PANIC: {msg}")
    })?;
    let took = t.elapsed();
    if took > Duration::from_secs(20) {
        return Err(format!("took {took:?}"));
    }
    if let (Some(r0), Some(hwm)) = (rss0, vm_hwm_kib()) {
        let grew = hwm.saturating_sub(r0);
        if grew > 200 << 10 {
            return Err(format!("peak memory grew by {} MiB", grew >> 10));
        }
    }
    let fail = |why: &str| Err(format!("{why}: {out:?}"));
    let data_ok = out.ro_data.as_deref() == Some(data);
    match c.expect {
        Expect::OpenFails if out.ro_open.is_none() || out.rw_open.is_none() => {
            fail("an open succeeded")
        }
        Expect::RwOpenFails if out.ro_open.is_some() || out.rw_open.is_none() || !data_ok => {
            fail("expected a read-only open that reads the data and a failing read-write open")
        }
        Expect::ReadFails if out.ro_open.is_none() && out.read_err.is_none() => {
            fail("reading everything succeeded")
        }
        Expect::Works
            if out.ro_open.is_some()
                || out.rw_open.is_some()
                || out.read_err.is_some()
                || !data_ok =>
        {
            fail("expected the image to work and read its data")
        }
        _ => Ok(()),
    }
}

#[test]
fn corpus_of_corrupted_images() {
    let dir = tempfile::tempdir().unwrap();
    let base = valid_image(dir.path(), 65536, 3);
    let data = {
        let p = dir.path().join("valid-65536-3.qcow2");
        let img = Qcow2Image::open(
            &p,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        read_everything(&img).unwrap()
    };
    let cases = header_cases();
    let mut failures = Vec::new();
    for c in &cases {
        if let Err(e) = run_case(dir.path(), &base, &data, c) {
            failures.push(format!("{} ({:?}): {e}", c.name, c.expect));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A small valid image (512-byte clusters, data in most clusters) for the byte flips.
fn small_image() -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    qcow2::create_on(
        &*mem,
        &CreateOptions {
            size: 64 << 10,
            cluster_size: 512,
            refcount_bits: 16,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let img = Qcow2Image::open_storage(mem.clone(), &OpenOptions::default()).unwrap();
        for i in 0..100u64 {
            img.write_at(&[i as u8 + 1; 300], i * 611 % (63 << 10))
                .unwrap();
        }
        img.write_zeroes(8192, 4096, false).unwrap();
        img.discard(20480, 2048).unwrap();
    }
    mem.snapshot()
}

/// Opens (read-only and read-write), reads, writes, flushes and checks the bytes from
/// memory; only a panic is a failure.
fn exercise_bytes(bytes: &[u8]) {
    for read_only in [true, false] {
        let mem = Arc::new(MemStorage::with_max_len(64 << 20));
        mem.write_at(bytes, 0).unwrap();
        let opts = OpenOptions {
            read_only,
            ..Default::default()
        };
        let Ok(img) = Qcow2Image::open_storage(mem, &opts) else {
            continue;
        };
        let _ = read_everything(&img);
        let size = img.size();
        if !read_only {
            for (i, off) in [0, size / 3, size.saturating_sub(700)]
                .into_iter()
                .enumerate()
            {
                let len = 700.min(size - off.min(size));
                let _ = img.write_at(&vec![0xe0 + i as u8; len as usize], off);
            }
            let _ = img.write_zeroes(0, 1024.min(size), false);
            let _ = img.discard(size / 2, 2048.min(size / 2));
            let _ = img.flush();
            let _ = read_everything(&img);
        }
        let _ = qcow2::check_image(&img, Repair::None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
    #[test]
    fn random_byte_flips_never_panic(
        flips in prop::collection::vec((0usize..8192, any::<u8>()), 1..12),
    ) {
        let mut img = small_image();
        for (at, x) in flips {
            if at < img.len() {
                img[at] ^= x.max(1);
            }
        }
        exercise_bytes(&img);
    }

    #[test]
    fn random_header_words_never_panic(
        words in prop::collection::vec((0usize..32, any::<u32>()), 1..4),
    ) {
        let mut img = small_image();
        for (w, v) in words {
            img[w * 4..w * 4 + 4].copy_from_slice(&v.to_be_bytes());
        }
        exercise_bytes(&img);
    }
}

/// A guest write through an L2 entry that points at metadata is refused (the image is
/// marked corrupt) instead of overwriting the L1 or refcount table.
#[test]
fn guest_writes_never_land_on_metadata() {
    // (Offset 0, the header, means "unallocated" in an L2 entry.)
    for target in ["l1", "reftable"] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.qcow2");
        create(
            &p,
            &CreateOptions {
                size: 8 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        {
            let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
            img.write_at(&[1; 4096], 0).unwrap();
        }
        let mut bytes = std::fs::read(&p).unwrap();
        let h = qcow2::header::Header::parse(&bytes, bytes.len() as u64).unwrap();
        let l1e = u64::from_be_bytes(bytes[h.l1_table_offset as usize..][..8].try_into().unwrap());
        let l2 = (l1e & 0x00ff_ffff_ffff_fe00) as usize;
        let to = match target {
            "l1" => h.l1_table_offset,
            _ => h.refcount_table_offset,
        };
        bytes[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | to).to_be_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let before = std::fs::read(&p).unwrap();
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        let e = img.write_at(&[0xff; 512], 0).unwrap_err();
        assert!(matches!(e, qcow2::Error::Corrupt(_)), "{target}: {e}");
        drop(img);
        let after = std::fs::read(&p).unwrap();
        let (s, n) = (to as usize, 4096);
        assert_eq!(
            &after[s..s + n],
            &before[s..s + n],
            "{target} was overwritten"
        );
    }
}

/// A hostile refcount: a 64-bit refcount of 2^62 on the header cluster and 2,000 leaked
/// clusters past the end of the file. The repair sets each refcount in one store (the
/// old one-decrement-per-reference loop would run for ever), and the report keeps at most
/// 1,000 problem lines plus a count of the rest.
#[test]
fn huge_refcounts_and_many_problems_are_repaired_in_bounded_time_and_memory() {
    if !common::require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r64.qcow2");
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=64",
            p.to_str().unwrap(),
            "64M",
        ],
    );
    let mut f = std::fs::read(&p).unwrap();
    let rt = u64::from_be_bytes(f[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(f[rt..rt + 8].try_into().unwrap()) as usize;
    let cs = 65536usize;
    let clusters = f.len().div_ceil(cs);
    // Cluster 0 (the header): 2^62 references.
    f[rb..rb + 8].copy_from_slice(&(1u64 << 62).to_be_bytes());
    // 2,000 clusters past the end of the file, each with a refcount of 1.
    for c in clusters + 10..clusters + 2010 {
        f[rb + 8 * c..rb + 8 * c + 8].copy_from_slice(&1u64.to_be_bytes());
    }
    std::fs::write(&p, &f).unwrap();
    let t = std::time::Instant::now();
    let report = qcow2::check(&p, qcow2::Repair::Leaks).unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
    assert_eq!((report.leaks, report.leaks_fixed), (2001, 2001), "{report}");
    assert_eq!(report.messages.len(), 1001, "capped");
    assert!(
        report.messages[1000].contains("and 1001 more"),
        "{}",
        report.messages[1000]
    );
    let again = qcow2::check(&p, qcow2::Repair::None).unwrap();
    assert!(again.is_clean(), "{again}");
    common::assert_clean(&p);
}

/// An image whose refcounts call its L2 table free: the next allocating write would get
/// that cluster; the overlap check refuses it (image marked corrupt) instead of letting
/// guest data overwrite the table.
#[test]
fn allocation_never_hands_out_a_cluster_of_live_metadata() {
    if !common::require_tool("qemu-img") || !common::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"],
    );
    common::qemu_io(&p, "qcow2", &["write -P 1 0 64k".to_string()]);
    let mut f = std::fs::read(&p).unwrap();
    let cs = 65536usize;
    let l1 = u64::from_be_bytes(f[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(f[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let rt = u64::from_be_bytes(f[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(f[rt..rt + 8].try_into().unwrap()) as usize;
    // 16-bit refcounts: the L2 table's cluster now reads as free.
    let idx = rb + 2 * (l2 / cs);
    f[idx..idx + 2].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&p, &f).unwrap();
    let l2_before = f[l2..l2 + cs].to_vec();
    let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
    // Allocate guest clusters until one would land on the table (the lowest free one).
    let mut refused = None;
    for i in 1..8u64 {
        if let Err(e) = img.write_at(&[0xee; 65536], i << 20) {
            refused = Some(e.to_string());
            break;
        }
    }
    drop(img);
    let e = refused.expect("an allocation landed on the L2 table without error");
    assert!(e.contains("overlaps an active L2 table"), "{e}");
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        &after[l2..l2 + cs],
        &l2_before[..],
        "the L2 table was overwritten"
    );
}

/// An image whose L2 table lies where no refcount block reaches (such clusters count as
/// free): when allocations outgrow the first refcount block, the new block would be
/// placed on the table; the overlap check refuses it instead (image marked corrupt).
#[test]
fn a_new_refcount_block_never_lands_on_live_metadata() {
    if !common::require_tool("qemu-img") || !common::require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    // 512-byte clusters and 64-bit refcounts: one refcount block covers 64 clusters.
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            p.to_str().unwrap(),
            "1M",
        ],
    );
    common::qemu_io(&p, "qcow2", &["write -P 1 0 512".to_string()]);
    let mut f = std::fs::read(&p).unwrap();
    let cs = 512usize;
    let l1 = u64::from_be_bytes(f[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(f[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    // Move the L2 table to cluster 64, the first one no refcount block covers.
    let moved = 64 * cs;
    if f.len() < moved + cs {
        f.resize(moved + cs, 0);
    }
    let table = f[l2..l2 + cs].to_vec();
    f[moved..moved + cs].copy_from_slice(&table);
    f[l1..l1 + 8].copy_from_slice(&((moved as u64) | (1 << 63)).to_be_bytes());
    std::fs::write(&p, &f).unwrap();
    let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
    // Allocate guest clusters (all mapped by that table) until the first refcount block
    // is full and a second one is needed.
    let mut refused = None;
    for i in 1..64u64 {
        if let Err(e) = img.write_at(&[0xee; 512], i * 512) {
            refused = Some(e.to_string());
            break;
        }
    }
    drop(img);
    let e = refused.expect("a refcount block was placed on the L2 table without error");
    assert!(e.contains("overlaps an active L2 table"), "{e}");
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        &after[moved..moved + 8],
        &table[..8],
        "the L2 table was overwritten"
    );
}
