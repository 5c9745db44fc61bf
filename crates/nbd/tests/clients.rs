//! Real clients against the server: libnbd's nbdinfo/nbdcopy/nbdsh and Python binding,
//! QEMU's qemu-img and qemu-io. A missing tool skips the test, except under `CI=true`.

mod common;

use std::io::Read;
use std::process::Command;
use std::sync::Arc;

use common::*;
use nbd::{Export, ServerOptions};

const MIB: u64 = 1 << 20;

/// A 64 MiB disk with data in chunks 1, 2 and 10, and bitmap b0 dirty at granules
/// 3, 7, 8 (a 4 KiB mark inside granule 3 marks the whole granule).
fn marked_disk() -> Arc<MemExport> {
    let d = Arc::new(MemExport::new(64 * MIB, false, &["b0"]));
    d.fill(CHUNK, &vec![0x11; 2 * CHUNK as usize]);
    d.fill(10 * CHUNK + 100, &[0x22; 1000]);
    d.mark("b0", 3 * CHUNK + 4096, 4096);
    d.mark("b0", 7 * CHUNK, 2 * CHUNK);
    d
}

fn fixture(disk: &Arc<MemExport>) -> Fixture {
    let ro = Arc::new(MemExport::new(MIB, true, &[]));
    Fixture::new(
        ServerOptions::default(),
        &[
            ("disk", disk.clone() as Arc<dyn Export>),
            ("ro", ro as Arc<dyn Export>),
        ],
    )
}

/// Parses `nbdinfo --map` lines into `(offset, length, type)`.
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_map_dirty_bitmap() {
    if !have_tool("nbdinfo", "libnbd-bin") {
        return;
    }
    let disk = marked_disk();
    let f = fixture(&disk);
    for uri in [f.uri("disk"), f.tcp_uri("disk")] {
        let out = run(Command::new("nbdinfo")
            .arg("--map=qemu:dirty-bitmap:b0")
            .arg(&uri));
        let map = parse_map(&out);
        let dirty: Vec<(u64, u64)> = map
            .iter()
            .filter(|e| e.2 == 1)
            .map(|e| (e.0, e.1))
            .collect();
        assert_eq!(
            dirty,
            vec![(3 * CHUNK, CHUNK), (7 * CHUNK, 2 * CHUNK)],
            "{out}"
        );
        assert!(out.contains("dirty") && out.contains("clean"), "{out}");
        assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 64 * MIB, "{out}");
    }
}

#[test]
fn nbdinfo_map_base_allocation() {
    if !have_tool("nbdinfo", "libnbd-bin") {
        return;
    }
    let disk = marked_disk();
    let f = fixture(&disk);
    let out = run(Command::new("nbdinfo").arg("--map").arg(f.uri("disk")));
    let map = parse_map(&out);
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.2 == 0)
        .map(|e| (e.0, e.1))
        .collect();
    let expected: Vec<(u64, u64)> = {
        // Merge the allocated chunks of the memory export.
        let mut v: Vec<(u64, u64)> = Vec::new();
        for c in disk.allocated() {
            match v.last_mut() {
                Some(l) if l.0 + l.1 == c * CHUNK => l.1 += CHUNK,
                _ => v.push((c * CHUNK, CHUNK)),
            }
        }
        v
    };
    assert_eq!(data, expected, "{out}");
    assert!(map.iter().all(|e| e.2 == 0 || e.2 == 3), "{out}");
    assert!(out.contains("hole,zero"), "{out}");
    // Allocation depth: 1 exactly where allocated.
    let out = run(Command::new("nbdinfo")
        .arg("--map=qemu:allocation-depth")
        .arg(f.uri("disk")));
    let depth: Vec<(u64, u64)> = parse_map(&out)
        .iter()
        .filter(|e| e.2 == 1)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(depth, expected, "{out}");
}

#[test]
fn nbdinfo_list_and_info() {
    if !have_tool("nbdinfo", "libnbd-bin") {
        return;
    }
    let disk = marked_disk();
    let f = fixture(&disk);
    let out = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix:///?socket={}", f.sock.display())));
    for want in [
        "export=\"disk\"",
        "export=\"ro\"",
        "description: in-memory test disk",
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
        "export-size: 67108864",
        "export-size: 1048576",
        "is_read_only: true",
        "is_read_only: false",
        "can_multi_conn: true",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let out = run(Command::new("nbdinfo").arg("--json").arg(f.tcp_uri("disk")));
    assert!(out.contains("\"export-size\": 67108864"), "{out}");
    assert!(out.contains("\"block_size_preferred\": 4096"), "{out}");
    assert!(out.contains("\"block_size_maximum\": 33554432"), "{out}");
    assert!(out.contains("\"can_trim\": true"), "{out}");
    assert!(out.contains("\"can_zero\": true"), "{out}");
    assert!(out.contains("\"can_df\": true"), "{out}");
}

/// `(start, length, data)` of `qemu-img map --output=json` lines.
fn parse_qemu_map(out: &str) -> Vec<(u64, u64, bool)> {
    let field = |line: &str, key: &str| -> String {
        let at = line
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("{key} in {line}"));
        line[at + key.len() + 3..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect()
    };
    out.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            (
                field(l, "start").parse().unwrap(),
                field(l, "length").parse().unwrap(),
                field(l, "data") == "true",
            )
        })
        .collect()
}

#[test]
fn qemu_img_map_dirty_bitmap() {
    if !have_tool("qemu-img", "qemu-utils") {
        return;
    }
    let disk = marked_disk();
    let f = fixture(&disk);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:b0",
        f.sock.display()
    );
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(&opts));
    let map = parse_qemu_map(&out);
    // Dirty ranges come out inverted: "data": false.
    let dirty: Vec<(u64, u64)> = map.iter().filter(|e| !e.2).map(|e| (e.0, e.1)).collect();
    assert_eq!(
        dirty,
        vec![(3 * CHUNK, CHUNK), (7 * CHUNK, 2 * CHUNK)],
        "{out}"
    );
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 64 * MIB);

    // Without the bitmap, base:allocation over TCP: data where allocated.
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(f.tcp_uri("disk")));
    let data: Vec<(u64, u64)> = parse_qemu_map(&out)
        .iter()
        .filter(|e| e.2)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(data, vec![(CHUNK, 2 * CHUNK), (10 * CHUNK, CHUNK)], "{out}");
}

#[test]
fn qemu_io_reads_and_writes() {
    if !have_tool("qemu-io", "qemu-utils") {
        return;
    }
    let disk = marked_disk();
    let f = fixture(&disk);
    for uri in [f.uri("disk"), f.tcp_uri("disk")] {
        let out = run(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "read -P 0x11 64k 128k",
                "-c",
                "read -P 0 0 64k",
            ])
            .arg(&uri));
        assert!(!out.contains("verification failed"), "{out}");
        assert!(out.contains("read 131072/131072 bytes"), "{out}");
    }
    // A wrong pattern is noticed (the check above can fail).
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x12 64k 4k"])
        .arg(f.uri("disk"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("verification failed"));

    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xcd 1M 300k",
            "-c",
            "write -z 2M 128k",
            "-c",
            "flush",
            "-c",
            "discard 64k 64k",
        ])
        .arg(f.uri("disk")));
    assert!(out.contains("wrote 307200/307200 bytes"), "{out}");
    assert_eq!(disk.get(MIB, 300 << 10), vec![0xcd; 300 << 10]);
    assert_eq!(disk.get(2 * MIB, 128 << 10), vec![0; 128 << 10]);
    assert_eq!(disk.get(CHUNK, CHUNK as usize), vec![0; CHUNK as usize]);
    assert_eq!(disk.get(2 * CHUNK, 16), vec![0x11; 16]);

    // Writing to the read-only export fails.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(f.uri("ro"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("wrote 4096/4096"), "{text}");
}

#[test]
fn qemu_img_compare_with_a_file() {
    if !have_tool("qemu-img", "qemu-utils") {
        return;
    }
    let disk = marked_disk();
    let f = fixture(&disk);
    let img = f.dir.path().join("copy.raw");
    std::fs::write(&img, disk.get(0, (64 * MIB) as usize)).unwrap();
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(f.uri("disk")));
    assert!(out.contains("Images are identical"), "{out}");
    // A one-byte difference is found at its offset.
    disk.fill(5 * MIB + 3, &[0x7f]);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(f.tcp_uri("disk"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Content mismatch at offset 5242880"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn nbdcopy_one_gib_sparse_export() {
    if !have_tool("nbdcopy", "libnbd-bin") {
        return;
    }
    const GIB: u64 = 1 << 30;
    let disk = Arc::new(MemExport::new(GIB, false, &[]));
    for i in 0..64u64 {
        let data: Vec<u8> = (0..CHUNK + 4096)
            .map(|j| (j as u8) ^ (i as u8) ^ 0x5a)
            .collect();
        disk.fill(i * 16 * MIB + i * 4096, &data);
    }
    let f = fixture(&disk);
    let out_file = f.dir.path().join("copy.img");
    run(Command::new("nbdcopy").arg(f.uri("disk")).arg(&out_file));
    assert_eq!(std::fs::metadata(&out_file).unwrap().len(), GIB);
    let mut file = std::fs::File::open(&out_file).unwrap();
    let mut buf = vec![0u8; 16 * MIB as usize];
    for block in 0..(GIB / (16 * MIB)) {
        file.read_exact(&mut buf).unwrap();
        assert!(
            buf == disk.get(block * 16 * MIB, buf.len()),
            "copy differs in block {block}"
        );
    }
    // Every byte through the server, over TCP, without block status.
    run(Command::new("nbdcopy")
        .arg("--no-extents")
        .arg(f.tcp_uri("disk"))
        .arg("null:"));
}

#[test]
fn nbdcopy_file_into_export() {
    if !have_tool("nbdcopy", "libnbd-bin") {
        return;
    }
    let disk = Arc::new(MemExport::new(48 * MIB, false, &[]));
    let f = fixture(&disk);
    let src = f.dir.path().join("src.img");
    let mut data = vec![0u8; (48 * MIB) as usize];
    let mut x = 0x1234_5678u32;
    for (i, b) in data.iter_mut().enumerate() {
        // A zero hole in the middle exercises write-zeroes.
        if (16 * MIB as usize..20 * MIB as usize).contains(&i) {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&src)
        .arg(f.uri("disk")));
    assert!(disk.get(0, data.len()) == data, "exported data differs");
}

const IMAGEIO_SCRIPT: &str = r#"
import json, sys
import nbd

sock, name = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_export_name(name)
h.set_request_structured_replies(True)
h.set_opt_mode(True)
h.connect_unix(sock)
assert h.get_structured_replies_negotiated()

listed = []
h.add_meta_context("qemu:dirty-bitmap:")
h.opt_list_meta_context(lambda ctx: listed.append(ctx))
h.clear_meta_contexts()

wanted = ["base:allocation", "qemu:allocation-depth"] + listed
for c in wanted:
    h.add_meta_context(c)
h.opt_go()
for c in wanted:
    assert h.can_meta_context(c), c
assert not h.can_meta_context("qemu:dirty-bitmap:other")

size = h.get_size()
seen = {}
def extents(metacontext, offset, entries, err):
    seen.setdefault(metacontext, []).extend(entries)
    return 0

h.block_status(size, 0, extents)
for ctx, ext in seen.items():
    assert sum(ext[0::2]) == size, (ctx, ext)

print(json.dumps({"listed": listed, "contexts": sorted(seen), "extents": seen}))
h.shutdown()
"#;

#[test]
fn python_libnbd_negotiates_like_imageio() {
    if !have_python_nbd() {
        return;
    }
    let disk = marked_disk();
    let f = fixture(&disk);
    let out = run(Command::new("/usr/bin/python3")
        .args(["-c", IMAGEIO_SCRIPT])
        .arg(&f.sock)
        .arg("disk"));
    // Exactly one bitmap listed, and only the three requested contexts answered.
    assert!(
        out.contains(r#""listed": ["qemu:dirty-bitmap:b0"]"#),
        "{out}"
    );
    assert!(
        out.contains(
            r#""contexts": ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]"#
        ),
        "{out}"
    );
    // The bitmap extents, as flat [length, flags, ...] pairs.
    let bitmap = {
        let at = out.find(r#""qemu:dirty-bitmap:b0": ["#).unwrap();
        let rest = &out[at + r#""qemu:dirty-bitmap:b0": ["#.len()..];
        let list = &rest[..rest.find(']').unwrap()];
        list.split(',')
            .map(|s| s.trim().parse::<u64>().unwrap())
            .collect::<Vec<_>>()
    };
    let c = CHUNK;
    assert_eq!(
        bitmap,
        vec![3 * c, 0, c, 1, 3 * c, 0, 2 * c, 1, 64 * MIB - 9 * c, 0]
    );
}

#[test]
fn nbdsh_reads_and_writes() {
    if !have_tool("nbdsh", "libnbd-bin") {
        return;
    }
    let disk = marked_disk();
    let f = fixture(&disk);
    let out = run(tool_command("nbdsh")
        .arg("-u")
        .arg(f.uri("disk"))
        .arg("-c")
        .arg(
            "h.pwrite(b'nbdsh!' * 100, 4096)\n\
             h.flush()\n\
             assert h.pread(600, 4096) == b'nbdsh!' * 100\n\
             h.zero(65536 * 4, 8192)\n\
             print(h.get_size(), h.can_multi_conn(), h.can_fua(), h.is_read_only())",
        ));
    assert_eq!(out.trim(), "67108864 True True False");
    assert_eq!(disk.get(4096, 600), b"nbdsh!".repeat(100));
    assert_eq!(disk.get(CHUNK, 100), vec![0u8; 100]);
}
