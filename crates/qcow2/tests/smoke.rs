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
