mod common;
use qcow2::*;

#[test]
fn create_write_read_check() {
    if !common::require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.qcow2");
    create(
        &p,
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    common::assert_clean(&p);
    {
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        img.write_at(&[0xab; 4096], 65536).unwrap();
        img.write_at(&[0xcd; 1 << 20], 3 << 20).unwrap();
        img.flush().unwrap();
        let mut b = vec![0u8; 4096];
        img.read_at(&mut b, 65536).unwrap();
        assert_eq!(b, vec![0xab; 4096]);
    }
    common::assert_clean(&p);
    let raw = common::qemu_raw(&p);
    assert_eq!(&raw[65536..65536 + 4096], &[0xab; 4096][..]);
    assert_eq!(&raw[3 << 20..(3 << 20) + 10], &[0xcd; 10][..]);
}

/// A 4 KiB-aligned buffer, as the daemon's request buffers are.
#[repr(C, align(4096))]
struct Aligned([u8; 8192]);

#[test]
fn direct_io_opens_qcow2_and_serves_aligned_and_unaligned_requests() {
    if !common::require_tool("qemu-img") {
        return;
    }
    // O_DIRECT needs a file system that supports it: use a folder next to the build.
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let d = tempfile::tempdir_in(base).unwrap();
    let p = d.path().join("d.qcow2");
    create(
        &p,
        &CreateOptions {
            size: 16 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let img = Qcow2Image::open(
            &p,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut a = Box::new(Aligned([0x3c; 8192]));
        img.write_at(&a.0, 1 << 20).unwrap();
        img.write_at(&[0x4d; 100], 7).unwrap();
        img.flush().unwrap();
        a.0.fill(0);
        img.read_at(&mut a.0, 1 << 20).unwrap();
        assert!(a.0.iter().all(|&b| b == 0x3c));
        let mut u = [0u8; 100];
        img.read_at(&mut u, 7).unwrap();
        assert_eq!(u, [0x4d; 100]);
    }
    common::assert_clean(&p);
    let raw = common::qemu_raw(&p);
    assert_eq!(raw[(1 << 20) + 8191], 0x3c);
    assert_eq!(raw[7], 0x4d);
}

/// A write-zeroes of part of a cluster that already reads as zeros allocates nothing
/// (as QEMU); over allocated data it zeroes exactly the range.
#[test]
fn partial_write_zeroes_of_a_zero_cluster_allocates_nothing() {
    if !common::require_tool("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("z.qcow2");
    create(
        &p,
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let len0 = std::fs::metadata(&p).unwrap().len();
    {
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        img.write_zeroes(4096, 8192, false).unwrap();
        img.write_zeroes((1 << 20) + 512, 65536, true).unwrap();
        img.flush().unwrap();
    }
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        len0,
        "no cluster allocated"
    );
    {
        let img = Qcow2Image::open(&p, &OpenOptions::default()).unwrap();
        img.write_at(&[0x5a; 65536], 2 << 20).unwrap();
        img.write_zeroes((2 << 20) + 1024, 2048, false).unwrap();
        let mut b = vec![0u8; 65536];
        img.read_at(&mut b, 2 << 20).unwrap();
        assert!(b[..1024].iter().all(|&x| x == 0x5a));
        assert!(b[1024..3072].iter().all(|&x| x == 0));
        assert!(b[3072..].iter().all(|&x| x == 0x5a));
    }
    common::assert_clean(&p);
}
