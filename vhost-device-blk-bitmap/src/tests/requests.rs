//! Every request type, every IOERR/UNSUPP path and malformed chains.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

use super::common::*;
use crate::virtio_blk::*;

fn dwz_segment(f: &Fixture, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    f.mem.write_slice(&s, GuestAddress(DATA)).unwrap();
}

#[test]
fn read_returns_disk_data() {
    let mut f = Fixture::new(false, 512);
    f.header(T_IN, 3);
    let used = f.run(&[
        hdr(),
        wr(DATA, sectors(2)),
        wr(DATA + 0x1000, sectors(1)),
        status(),
    ]);
    assert_eq!(used, sectors(3) + 1);
    assert_eq!(f.status(), S_OK);
    let want: Vec<u8> = (3 * 512..6 * 512).map(pattern).collect();
    let mut got = f.read_guest(DATA, 1024);
    got.extend(f.read_guest(DATA + 0x1000, 512));
    assert_eq!(got, want);
    assert!(f.tracker.take().is_empty(), "reads are not tracked");
}

#[test]
fn large_read_spans_several_chunks() {
    let mut f = Fixture::new(false, 512);
    f.header(T_IN, 0);
    let len = (2 << 20) + 4096;
    let used = f.run(&[hdr(), wr(DATA, len), status()]);
    assert_eq!(used, len + 1);
    assert_eq!(f.status(), S_OK);
    let got = f.read_guest(DATA, len as usize);
    assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i as u64)));
}

#[test]
fn write_stores_data_and_marks() {
    let mut f = Fixture::new(false, 512);
    f.header(T_OUT, 8);
    let data: Vec<u8> = (0..1536u32).map(|i| (i % 251) as u8).collect();
    f.mem
        .write_slice(&data[..1024], GuestAddress(DATA))
        .unwrap();
    f.mem
        .write_slice(&data[1024..], GuestAddress(DATA + 0x4000))
        .unwrap();
    let used = f.run(&[hdr(), rd(DATA, 1024), rd(DATA + 0x4000, 512), status()]);
    assert_eq!(used, 1);
    assert_eq!(f.status(), S_OK);
    assert_eq!(&f.disk()[4096..4096 + 1536], &data[..]);
    assert_eq!(f.tracker.take(), vec![(4096, 1536)]);
    // Writeback by default: no flush per write.
    assert_eq!(f.storage.syncs.load(Ordering::SeqCst), 0);
}

#[test]
fn write_through_flushes_each_write() {
    let mut f = Fixture::new(false, 512);
    f.device.set_wce(0);
    assert!(f.device.writethrough());
    f.header(T_OUT, 0);
    assert_eq!(f.run(&[hdr(), rd(DATA, 512), status()]), 1);
    assert_eq!(f.status(), S_OK);
    assert_eq!(f.storage.syncs.load(Ordering::SeqCst), 1);
    // Writeback again, but FLUSH not negotiated: still writethrough.
    f.device.set_wce(1);
    f.device.set_acked_features(0);
    f.header(T_OUT, 0);
    f.run(&[hdr(), rd(DATA, 512), status()]);
    assert_eq!(f.storage.syncs.load(Ordering::SeqCst), 2);
    f.device.set_acked_features(device_features(false));
    f.header(T_OUT, 0);
    f.run(&[hdr(), rd(DATA, 512), status()]);
    assert_eq!(f.storage.syncs.load(Ordering::SeqCst), 2);
}

#[test]
fn failed_write_is_ioerr_but_still_marked() {
    let mut f = Fixture::new(false, 512);
    f.storage.fail_writes.store(true, Ordering::SeqCst);
    f.header(T_OUT, 2);
    assert_eq!(f.run(&[hdr(), rd(DATA, 512), status()]), 1);
    assert_eq!(f.status(), S_IOERR);
    assert_eq!(f.tracker.take(), vec![(1024, 512)]);
}

#[test]
fn write_on_read_only_disk_is_ioerr() {
    let mut f = Fixture::new(true, 512);
    let before = f.disk();
    f.header(T_OUT, 0);
    assert_eq!(f.run(&[hdr(), rd(DATA, 512), status()]), 1);
    assert_eq!(f.status(), S_IOERR);
    for t in [T_DISCARD, T_WRITE_ZEROES] {
        f.header(t, 0);
        dwz_segment(&f, 0, 1, 0);
        assert_eq!(f.run(&[hdr(), rd(DATA, 16), status()]), 1);
        assert_eq!(f.status(), S_IOERR, "type {t}");
    }
    assert_eq!(f.disk(), before);
    assert!(f.tracker.take().is_empty());
    // Reads still work.
    f.header(T_IN, 0);
    f.run(&[hdr(), wr(DATA, 512), status()]);
    assert_eq!(f.status(), S_OK);
}

#[test]
fn out_of_range_and_misaligned_are_ioerr() {
    let mut f = Fixture::new(false, 4096);
    let last = DISK / 512;
    let cases: &[(u32, u64, u32)] = &[
        (T_IN, last, 4096),           // starts at the end
        (T_IN, last - 8, 8192),       // crosses the end
        (T_OUT, last - 8, 8192),      // crosses the end
        (T_IN, 1, 4096),              // not aligned to 4096
        (T_OUT, 4, 4096),             // not aligned to 4096
        (T_IN, 0, 512),               // not a whole logical block
        (T_OUT, 0, 4096 + 100),       // not a whole sector
        (T_IN, u64::MAX / 256, 4096), // offset overflows
    ];
    for &(t, sector, len) in cases {
        f.header(t, sector);
        let data = if t == T_IN {
            wr(DATA, len)
        } else {
            rd(DATA, len)
        };
        assert_eq!(f.run(&[hdr(), data, status()]), 1, "{t} {sector} {len}");
        assert_eq!(f.status(), S_IOERR, "{t} {sector} {len}");
    }
    assert!(f.tracker.take().is_empty());
    // The last block itself is fine.
    f.header(T_IN, last - 8);
    assert_eq!(f.run(&[hdr(), wr(DATA, 4096), status()]), 4097);
    assert_eq!(f.status(), S_OK);
}

#[test]
fn flush_and_get_id() {
    let mut f = Fixture::new(false, 512);
    f.header(T_FLUSH, 0);
    assert_eq!(f.run(&[hdr(), status()]), 1);
    assert_eq!(f.status(), S_OK);
    assert_eq!(f.storage.syncs.load(Ordering::SeqCst), 1);

    f.mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
    f.header(T_GET_ID, 0);
    assert_eq!(f.run(&[hdr(), wr(DATA, 32), status()]), 21);
    assert_eq!(f.status(), S_OK);
    let mut want = b"serial-42".to_vec();
    want.resize(20, 0);
    want.extend([0xaa; 12]);
    assert_eq!(f.read_guest(DATA, 32), want);
    // A short buffer gets a prefix.
    f.header(T_GET_ID, 0);
    assert_eq!(f.run(&[hdr(), wr(DATA, 4), status()]), 5);
    assert_eq!(f.read_guest(DATA, 4), b"seri");
}

#[test]
fn discard_and_write_zeroes() {
    let mut f = Fixture::new(false, 512);
    // Discard 4 sectors at sector 16.
    f.header(T_DISCARD, 0);
    dwz_segment(&f, 16, 4, 0);
    assert_eq!(f.run(&[hdr(), rd(DATA, 16), status()]), 1);
    assert_eq!(f.status(), S_OK);
    assert!(f.disk()[8192..8192 + 2048].iter().all(|&b| b == 0));
    assert_eq!(f.disk()[8192 + 2048], pattern(8192 + 2048));
    assert_eq!(f.tracker.take(), vec![(8192, 2048)]);
    // Write zeroes with and without UNMAP.
    for (sector, flags) in [(32u64, 0u32), (64, WRITE_ZEROES_FLAG_UNMAP)] {
        f.header(T_WRITE_ZEROES, 0);
        dwz_segment(&f, sector, 8, flags);
        assert_eq!(f.run(&[hdr(), rd(DATA, 16), status()]), 1);
        assert_eq!(f.status(), S_OK);
        let off = (sector * 512) as usize;
        assert!(f.disk()[off..off + 4096].iter().all(|&b| b == 0));
        assert_eq!(f.tracker.take(), vec![(sector * 512, 4096)]);
    }
}

#[test]
fn discard_and_write_zeroes_errors() {
    let mut f = Fixture::new(false, 4096);
    let before = f.disk();
    let last = DISK / 512;
    // (type, sector, num, flags, payload len, expected status)
    let cases: &[(u32, u64, u32, u32, u32, u8)] = &[
        (T_DISCARD, 0, 8, WRITE_ZEROES_FLAG_UNMAP, 16, S_UNSUPP), // unmap on discard
        (T_DISCARD, 0, 8, 2, 16, S_UNSUPP),                       // unknown flag
        (T_WRITE_ZEROES, 0, 8, 4, 16, S_UNSUPP),                  // unknown flag
        (T_DISCARD, 0, 8, 0, 32, S_UNSUPP),                       // two segments
        (T_WRITE_ZEROES, 0, 8, 0, 32, S_UNSUPP),                  // two segments
        (T_DISCARD, 0, 8, 0, 8, S_IOERR),                         // short segment
        (T_WRITE_ZEROES, 0, 0, 0, 0, S_IOERR),                    // no segment
        (T_DISCARD, 0, MAX_DISCARD_SECTORS + 8, 0, 16, S_IOERR),  // too long
        (
            T_WRITE_ZEROES,
            0,
            MAX_WRITE_ZEROES_SECTORS + 8,
            0,
            16,
            S_IOERR,
        ),
        (T_DISCARD, last - 8, 16, 0, 16, S_IOERR), // past the end
        (T_WRITE_ZEROES, 1, 8, 0, 16, S_IOERR),    // misaligned start
        (T_DISCARD, 0, 4, 0, 16, S_IOERR),         // not whole blocks
    ];
    for &(t, sector, num, flags, plen, want) in cases {
        f.header(t, 0);
        dwz_segment(&f, sector, num, flags);
        let descs: Vec<RawDescriptor> = if plen == 0 {
            vec![hdr(), status()]
        } else {
            vec![hdr(), rd(DATA, plen), status()]
        };
        assert_eq!(f.run(&descs), 1);
        assert_eq!(f.status(), want, "{t} {sector} {num} {flags} {plen}");
    }
    assert_eq!(f.disk(), before);
    assert!(f.tracker.take().is_empty());
}

#[test]
fn unknown_types_are_unsupp() {
    let mut f = Fixture::new(false, 512);
    for t in [2u32, 10, 14, 15, 99, u32::MAX] {
        f.header(t, 0);
        assert_eq!(f.run(&[hdr(), wr(DATA, 512), status()]), 1);
        assert_eq!(f.status(), S_UNSUPP, "type {t}");
    }
}

#[test]
fn indirect_chain() {
    let mut f = Fixture::new(false, 512);
    let table = 0x30_0000u64;
    let descs = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(DATA, 512, (VRING_DESC_F_NEXT | 2) as u16, 2),
        SplitDescriptor::new(STATUS, 1, 2, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        f.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    f.header(T_IN, 1);
    assert_eq!(f.run(&[indirect(table, 3)]), 513);
    assert_eq!(f.status(), S_OK);
    let want: Vec<u8> = (512..1024).map(pattern).collect();
    assert_eq!(f.read_guest(DATA, 512), want);
}

#[test]
fn malformed_chains_are_rejected_without_touching_memory() {
    let mut f = Fixture::new(false, 512);
    f.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    // Readable descriptor after a writable one.
    f.header(T_IN, 0);
    assert_eq!(
        f.run(&[hdr(), wr(DATA, 512), rd(DATA + 0x1000, 16), status()]),
        0
    );
    assert_eq!(f.status(), 0xff);
    assert_eq!(f.read_guest(DATA, 512), vec![0x55; 512]);
    // No writable byte for the status.
    f.header(T_OUT, 0);
    assert_eq!(f.run(&[hdr(), rd(DATA, 512)]), 0);
    assert!(f.tracker.take().is_empty());
    // Data buffer past the end of guest memory.
    f.header(T_IN, 0);
    let end = MEM_SIZE as u64;
    assert_eq!(f.run(&[hdr(), wr(end - 256, 512), status()]), 0);
    assert_eq!(f.status(), 0xff);
    // Status byte past the end of guest memory.
    assert_eq!(f.run(&[hdr(), wr(DATA, 512), wr(end, 1)]), 0);
    assert_eq!(f.read_guest(DATA, 512), vec![0x55; 512]);
    // Header past the end (OUT needs it readable).
    assert_eq!(f.run(&[rd(end - 8, 16), status()]), 0);
    // Length wrapping the address space.
    assert_eq!(f.run(&[hdr(), wr(u64::MAX - 10, 512), status()]), 0);
    // Too many descriptors.
    let mut many = vec![hdr()];
    many.extend((0..crate::transport::MAX_DESCRIPTORS).map(|i| wr(DATA + 512 * i as u64, 512)));
    many.push(status());
    f.header(T_IN, 0);
    assert_eq!(f.run(&many), 0);
    assert_eq!(f.status(), 0xff);
    assert_eq!(f.read_guest(DATA, 512), vec![0x55; 512]);
    // Exactly the limit is fine.
    let mut ok = vec![hdr()];
    ok.extend((0..SEG_MAX).map(|i| wr(DATA + 512 * u64::from(i), 512)));
    ok.push(status());
    assert_eq!(f.run(&ok), SEG_MAX * 512 + 1);
    assert_eq!(f.status(), S_OK);
}

#[test]
fn short_header_is_ioerr() {
    let mut f = Fixture::new(false, 512);
    f.header(T_OUT, 0);
    assert_eq!(f.run(&[rd(HDR, 8), status()]), 1);
    assert_eq!(f.status(), S_IOERR);
    // Only a status byte.
    f.header(T_OUT, 0);
    assert_eq!(f.run(&[status()]), 1);
    assert_eq!(f.status(), S_IOERR);
    // Header split over two descriptors is fine.
    f.header(T_FLUSH, 0);
    assert_eq!(f.run(&[rd(HDR, 8), rd(HDR + 8, 8), status()]), 1);
    assert_eq!(f.status(), S_OK);
    assert!(f.tracker.take().is_empty());
}

#[test]
fn status_shares_the_last_data_descriptor() {
    // Linux never does this, but a chain whose last writable descriptor holds data and
    // status together is valid: the status is its last byte.
    let mut f = Fixture::new(false, 512);
    f.header(T_IN, 0);
    f.mem.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
    assert_eq!(f.run(&[hdr(), wr(DATA, 513)]), 513);
    assert_eq!(
        f.mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(),
        S_OK
    );
}

#[test]
fn probed_raw_refuses_an_image_header_in_sector_0() {
    let mut f = Fixture::new(false, 512);
    f.device.guard_probed_raw();
    let before = f.disk();
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    f.mem.write_slice(&header, GuestAddress(DATA)).unwrap();
    f.header(T_OUT, 0);
    f.run(&[hdr(), rd(DATA, 512), status()]);
    assert_eq!(f.status(), S_IOERR);
    assert_eq!(f.disk(), before, "nothing was written");
    // The same bytes elsewhere, and ordinary data in sector 0, are written.
    f.header(T_OUT, 1);
    f.run(&[hdr(), rd(DATA, 512), status()]);
    assert_eq!(f.status(), S_OK);
    f.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    f.header(T_OUT, 0);
    f.run(&[hdr(), rd(DATA, 512), status()]);
    assert_eq!(f.status(), S_OK);
    assert_eq!(&f.disk()[..512], &[0x55; 512]);
    // A VDI signature sits at byte 64.
    let mut vdi = vec![0u8; 512];
    vdi[64..68].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
    f.mem.write_slice(&vdi, GuestAddress(DATA)).unwrap();
    f.run(&[hdr(), rd(DATA, 512), status()]);
    assert_eq!(f.status(), S_IOERR);
}

#[test]
fn an_explicit_format_allows_any_sector_0() {
    let mut f = Fixture::new(false, 512);
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    f.mem.write_slice(&header, GuestAddress(DATA)).unwrap();
    f.header(T_OUT, 0);
    f.run(&[hdr(), rd(DATA, 512), status()]);
    assert_eq!(f.status(), S_OK);
    assert_eq!(&f.disk()[..4], b"QFI\xfb");
}
