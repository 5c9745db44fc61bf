//! The protocol as a well-behaved raw client sees it: handshake options, meta contexts,
//! every command, simple and structured replies, over unix and TCP sockets.

mod common;

use std::sync::Arc;

use common::*;
use nbd::{Export, ServerOptions};

const MIB: u64 = 1 << 20;

fn fixture() -> (Fixture, Arc<MemExport>, Arc<MemExport>) {
    let rw = Arc::new(MemExport::new(64 * MIB, false, &["b0", "b1"]));
    let ro = Arc::new(MemExport::new(8 * MIB, true, &[]));
    let f = Fixture::new(
        ServerOptions::default(),
        &[
            ("disk", rw.clone() as Arc<dyn Export>),
            ("ro", ro.clone() as Arc<dyn Export>),
        ],
    );
    (f, rw, ro)
}

#[test]
fn list_info_and_go() {
    let (f, _rw, _ro) = fixture();
    let mut c = f.client().greet();

    let r = c.opt(OPT_LIST, &[]);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let servers: Vec<(String, String)> = r
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
            (
                String::from_utf8(r.data[4..4 + n].to_vec()).unwrap(),
                String::from_utf8(r.data[4 + n..].to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        servers,
        vec![
            ("disk".into(), "in-memory test disk".into()),
            ("ro".into(), "in-memory test disk".into())
        ]
    );

    // INFO with NAME, DESCRIPTION and BLOCK_SIZE requested.
    let r = c.opt(OPT_INFO, &info_payload("ro", &[1, 2, 3]));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let item = |t: u16| {
        r.iter()
            .find(|x| x.kind == REP_INFO && x.data[..2] == t.to_be_bytes())
            .map(|x| x.data[2..].to_vec())
    };
    assert_eq!(item(1).unwrap(), b"ro");
    assert_eq!(item(2).unwrap(), b"in-memory test disk");
    let bs = item(3).unwrap();
    let bs: Vec<u32> = bs
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(bs, vec![1, 4096, 32 << 20]);
    let (size, flags) = export_info(&r).unwrap();
    assert_eq!(size, 8 * MIB);
    assert_ne!(flags & 2, 0, "READ_ONLY");
    assert_eq!(flags & (1 << 5), 0, "no TRIM on a read-only export");
    assert_eq!(flags & (1 << 7), 0, "no DF without structured replies");
    assert_ne!(flags & 1, 0, "HAS_FLAGS");

    // INFO without requests: no NAME/DESCRIPTION, but EXPORT.
    let r = c.opt(OPT_INFO, &info_payload("disk", &[]));
    assert!(r
        .iter()
        .all(|x| x.kind != REP_INFO || x.data[..2] != [0, 1]));
    assert!(r
        .iter()
        .all(|x| x.kind != REP_INFO || x.data[..2] != [0, 2]));
    let (size, flags) = export_info(&r).unwrap();
    assert_eq!(size, 64 * MIB);
    assert_eq!(flags & 2, 0);
    for bit in [2, 3, 5, 6, 8] {
        assert_ne!(flags & (1 << bit), 0, "flag bit {bit} in {flags:#x}");
    }

    // Unknown export; the empty name is ambiguous with two exports.
    let r = c.opt(OPT_INFO, &info_payload("nope", &[]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].data).contains("nope"));
    assert_eq!(c.opt_final(OPT_GO, &info_payload("", &[])), ERR_UNKNOWN);

    c.structured();
    let r = c.opt(OPT_GO, &info_payload("disk", &[]));
    let (_, flags) = export_info(&r).unwrap();
    assert_ne!(flags & (1 << 7), 0, "DF with structured replies");
    assert_eq!(f.server.client_count("disk"), 1);
    assert_eq!(f.server.client_count("ro"), 0);
    c.request(0, CMD_DISC, 1, 0, 0);
    assert!(c.closed());
    f.wait_for("client gone", 10, || f.server.client_count("disk") == 0);
}

#[test]
fn empty_name_selects_the_only_export() {
    let e = Arc::new(MemExport::new(MIB, false, &[]));
    let f = Fixture::new(ServerOptions::default(), &[("only", e as Arc<dyn Export>)]);
    let mut c = f.client().greet();
    let r = c.opt(OPT_GO, &info_payload("", &[1]));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let name = r
        .iter()
        .find(|x| x.kind == REP_INFO && x.data[..2] == [0, 1])
        .unwrap();
    assert_eq!(
        &name.data[2..],
        b"only",
        "INFO_NAME gives the canonical name"
    );
    assert_eq!(f.server.client_count("only"), 1);
}

#[test]
fn meta_context_list_and_set() {
    let (f, _rw, _ro) = fixture();
    let mut c = f.client().greet();
    c.structured();

    // LIST with no query: everything, ids 0.
    let r = c.opt(OPT_LIST_META_CONTEXT, &meta_payload("disk", &[]));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert_eq!(
        contexts_of(&r),
        vec![
            (0, "base:allocation".to_string()),
            (0, "qemu:allocation-depth".to_string()),
            (0, "qemu:dirty-bitmap:b0".to_string()),
            (0, "qemu:dirty-bitmap:b1".to_string()),
        ]
    );
    let names =
        |r: &[OptReply]| -> Vec<String> { contexts_of(r).into_iter().map(|(_, n)| n).collect() };
    let r = c.opt(
        OPT_LIST_META_CONTEXT,
        &meta_payload("disk", &["qemu:dirty-bitmap:"]),
    );
    assert_eq!(
        names(&r),
        vec!["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    );
    let r = c.opt(OPT_LIST_META_CONTEXT, &meta_payload("disk", &["qemu:"]));
    assert_eq!(
        names(&r),
        vec![
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:b0",
            "qemu:dirty-bitmap:b1"
        ]
    );
    let r = c.opt(
        OPT_LIST_META_CONTEXT,
        &meta_payload("ro", &["qemu:dirty-bitmap:", "base:"]),
    );
    assert_eq!(names(&r), vec!["base:allocation"]);
    let r = c.opt(OPT_LIST_META_CONTEXT, &meta_payload("disk", &["x-foo:bar"]));
    assert_eq!(r.len(), 1, "unknown query: only the ACK");
    assert_eq!(r[0].kind, REP_ACK);

    // SET: exact names, QEMU's ids, unknown ignored, empty suffix selects nothing.
    let sel = c.set_meta(
        "disk",
        &[
            "qemu:dirty-bitmap:b1",
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:",
            "qemu:",
            "nope:x",
        ],
    );
    assert_eq!(
        sel,
        vec![
            (0, "base:allocation".to_string()),
            (1, "qemu:allocation-depth".to_string()),
            (3, "qemu:dirty-bitmap:b1".to_string()),
        ]
    );
    assert!(
        c.set_meta("disk", &[]).is_empty(),
        "no query selects nothing"
    );
    let r = c.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("nope", &["base:allocation"]),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, ERR_UNKNOWN);
}

/// Checks BLOCK_STATUS replies against the marked bitmap and allocation.
#[test]
fn block_status_per_context() {
    let (f, rw, _ro) = fixture();
    rw.fill(CHUNK, &vec![7u8; CHUNK as usize]); // chunk 1 allocated
    rw.mark("b0", 2 * CHUNK + 10, 100); // granule 2
    rw.mark("b0", 5 * CHUNK, 2 * CHUNK); // granules 5, 6

    let mut c = f.client().greet();
    c.structured();
    let sel = c.set_meta(
        "disk",
        &[
            "qemu:dirty-bitmap:b0",
            "base:allocation",
            "qemu:allocation-depth",
        ],
    );
    assert_eq!(sel.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    c.go("disk");

    // [0, 8 chunks - 1000): last extents clipped to the request.
    let len = (8 * CHUNK - 1000) as u32;
    c.request(0, CMD_BLOCK_STATUS, 42, 0, len);
    let chunks = c.reply_chunks();
    assert_eq!(chunks.len(), 3);
    let mut got = Vec::new();
    for (i, ch) in chunks.iter().enumerate() {
        let Reply::Chunk {
            flags,
            kind,
            cookie,
            payload,
        } = ch
        else {
            panic!("expected chunks: {ch:?}")
        };
        assert_eq!(*kind, 5);
        assert_eq!(*cookie, 42);
        assert_eq!(*flags & 1 != 0, i == 2, "DONE only on the last chunk");
        let (id, ext) = extents_of(payload);
        assert_eq!(
            ext.iter().map(|e| u64::from(e.0)).sum::<u64>(),
            u64::from(len)
        );
        got.push((id, ext));
    }
    let c64 = CHUNK as u32;
    assert_eq!(got[0], (0, vec![(c64, 3), (c64, 0), (len - 2 * c64, 3)]));
    assert_eq!(got[1], (1, vec![(c64, 0), (c64, 1), (len - 2 * c64, 0)]));
    assert_eq!(
        got[2],
        (
            2,
            vec![
                (2 * c64, 0),
                (c64, 1),
                (2 * c64, 0),
                (2 * c64, 1),
                (len - 7 * c64, 0)
            ]
        )
    );

    // REQ_ONE: exactly one extent per context, not past the request.
    c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 43, 2 * CHUNK + 512, 4096);
    for ch in c.reply_chunks() {
        let Reply::Chunk { payload, .. } = ch else {
            panic!()
        };
        let (id, ext) = extents_of(&payload);
        assert_eq!(ext.len(), 1);
        assert_eq!(ext[0].0, 4096, "context {id}");
        if id == 2 {
            assert_eq!(ext[0].1, 1, "granule 2 is dirty");
        }
    }
    // REQ_ONE where the first extent is shorter than the request.
    c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 44, CHUNK / 2, CHUNK as u32);
    let chunks = c.reply_chunks();
    let Reply::Chunk { payload, .. } = &chunks[0] else {
        panic!()
    };
    assert_eq!(extents_of(payload), (0, vec![((CHUNK / 2) as u32, 3)]));

    // Last bytes of the export.
    c.request(0, CMD_BLOCK_STATUS, 45, 64 * MIB - 512, 512);
    let chunks = c.reply_chunks();
    assert_eq!(chunks.len(), 3);
}

#[test]
fn go_for_another_export_drops_the_selection() {
    let (f, _rw, _ro) = fixture();
    let mut c = f.client().greet();
    c.structured();
    assert_eq!(c.set_meta("disk", &["base:allocation"]).len(), 1);
    c.go("ro");
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    let r = c.reply_chunks();
    let Reply::Chunk { kind, payload, .. } = &r[0] else {
        panic!("{r:?}")
    };
    assert_eq!(*kind, 0x8001);
    assert_eq!(chunk_error(payload).0, EINVAL);
}

#[test]
fn later_set_replaces_the_earlier_one() {
    let (f, _rw, _ro) = fixture();
    let mut c = f.client().greet();
    c.structured();
    c.set_meta("disk", &["qemu:dirty-bitmap:b0", "base:allocation"]);
    assert_eq!(
        c.set_meta("disk", &["qemu:dirty-bitmap:b1"]),
        vec![(3, "qemu:dirty-bitmap:b1".to_string())]
    );
    c.go("disk");
    c.request(0, CMD_BLOCK_STATUS, 9, 0, 4096);
    let r = c.reply_chunks();
    assert_eq!(r.len(), 1);
    let Reply::Chunk { payload, flags, .. } = &r[0] else {
        panic!()
    };
    assert_eq!(flags & 1, 1);
    assert_eq!(extents_of(payload), (3, vec![(4096, 0)]));
}

#[test]
fn commands_with_simple_replies() {
    let (f, rw, _ro) = fixture();
    let mut c = f.client().greet();
    let (size, _) = c.go("disk");
    assert_eq!(size, 64 * MIB);

    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    c.write_req(FLAG_FUA, 0xdead_beef_0000_0001, 12345, &data);
    assert_eq!(c.simple().unwrap(), (0, 0xdead_beef_0000_0001));
    assert_eq!(rw.get(12345, data.len()), data);

    c.request(0, CMD_READ, 7, 12345, data.len() as u32);
    assert_eq!(c.simple().unwrap(), (0, 7));
    let mut back = vec![0u8; data.len()];
    std::io::Read::read_exact(&mut c.s, &mut back).unwrap();
    assert_eq!(back, data);

    c.request(0, CMD_FLUSH, 8, 0, 0);
    assert_eq!(c.simple().unwrap(), (0, 8));
    assert!(rw.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // WRITE_ZEROES without NO_HOLE may trim: whole chunks deallocated.
    rw.fill(10 * CHUNK, &vec![1u8; 2 * CHUNK as usize]);
    c.request(0, CMD_WRITE_ZEROES, 9, 10 * CHUNK, 2 * CHUNK as u32);
    assert_eq!(c.simple().unwrap(), (0, 9));
    assert!(!rw.allocated().contains(&10) && !rw.allocated().contains(&11));
    // With NO_HOLE: allocated zeroes.
    c.request(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 10, 20 * CHUNK, CHUNK as u32);
    assert_eq!(c.simple().unwrap(), (0, 10));
    assert!(rw.allocated().contains(&20));
    assert_eq!(
        rw.get(20 * CHUNK, CHUNK as usize),
        vec![0u8; CHUNK as usize]
    );
    // FAST_ZERO is refused with ENOTSUP.
    c.request(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 11, 0, 4096);
    assert_eq!(c.simple().unwrap(), (ENOTSUP, 11));

    rw.fill(30 * CHUNK, &vec![1u8; CHUNK as usize]);
    c.request(FLAG_FUA, CMD_TRIM, 12, 30 * CHUNK, CHUNK as u32);
    assert_eq!(c.simple().unwrap(), (0, 12));
    assert!(!rw.allocated().contains(&30));

    c.request(0, CMD_CACHE, 13, 0, 4096);
    assert_eq!(c.simple().unwrap(), (0, 13));

    // Zero-length READ: a reply without data.
    c.request(0, CMD_READ, 14, 0, 0);
    assert_eq!(c.simple().unwrap(), (0, 14));
    c.request(0, CMD_FLUSH, 15, 0, 0);
    assert_eq!(c.simple().unwrap(), (0, 15));

    // DF without structured replies is an unsupported flag.
    c.request(FLAG_DF, CMD_READ, 16, 0, 512);
    assert_eq!(c.simple().unwrap(), (EINVAL, 16));
    c.request(0, CMD_DISC, 17, 0, 0);
    assert!(c.closed());
}

#[test]
fn structured_read_and_errors() {
    let (f, rw, _ro) = fixture();
    rw.fill(4096, &[5u8; 8192]);
    let mut c = f.client().greet();
    c.structured();
    c.go("disk");

    c.request(FLAG_DF, CMD_READ, 100, 4096, 8192);
    let r = c.reply_chunks();
    assert_eq!(r.len(), 1);
    let Reply::Chunk {
        flags,
        kind,
        cookie,
        payload,
    } = &r[0]
    else {
        panic!()
    };
    assert_eq!((*flags, *kind, *cookie), (1, 1, 100));
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 4096);
    assert_eq!(&payload[8..], &[5u8; 8192][..]);

    c.request(0, CMD_READ, 101, 0, 0);
    assert_eq!(
        c.reply_chunks(),
        vec![Reply::Chunk {
            flags: 1,
            kind: 0,
            cookie: 101,
            payload: vec![]
        }]
    );

    // Errors come as ERROR chunks with a message.
    c.request(0, CMD_READ, 102, 64 * MIB, 1);
    let r = c.reply_chunks();
    let Reply::Chunk { kind, payload, .. } = &r[0] else {
        panic!()
    };
    assert_eq!(*kind, 0x8001);
    let (err, msg) = chunk_error(payload);
    assert_eq!(err, EINVAL);
    assert!(msg.contains("beyond"), "{msg}");

    // Success of non-read commands: a simple reply.
    c.write_req(0, 103, 0, &[1, 2, 3]);
    assert_eq!(
        c.reply().unwrap(),
        Reply::Simple {
            error: 0,
            cookie: 103
        }
    );
}

#[test]
fn export_name_old_style() {
    let (f, rw, _ro) = fixture();
    rw.fill(0, b"hello");
    // Without NO_ZEROES: 124 zero bytes follow.
    let mut c = f.client();
    c.greet_with(1);
    c.send_opt(OPT_EXPORT_NAME, b"disk");
    let mut b = [0u8; 134];
    std::io::Read::read_exact(&mut c.s, &mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 64 * MIB);
    assert!(b[10..].iter().all(|&x| x == 0));
    c.request(0, CMD_READ, 1, 0, 5);
    assert_eq!(c.simple().unwrap(), (0, 1));
    let mut d = [0u8; 5];
    std::io::Read::read_exact(&mut c.s, &mut d).unwrap();
    assert_eq!(&d, b"hello");

    // Structured replies negotiated first still apply after EXPORT_NAME.
    let mut c = f.client().greet();
    c.structured();
    c.send_opt(OPT_EXPORT_NAME, b"ro");
    let mut b = [0u8; 10];
    std::io::Read::read_exact(&mut c.s, &mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 8 * MIB);
    let flags = u16::from_be_bytes([b[8], b[9]]);
    assert_ne!(flags & 2, 0);
    c.request(0, CMD_READ, 2, 0, 16);
    let r = c.reply_chunks();
    assert!(matches!(
        &r[0],
        Reply::Chunk {
            kind: 1,
            cookie: 2,
            ..
        }
    ));

    // Unknown export: the connection is closed (no way to report it).
    let mut c = f.client().greet();
    c.send_opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
}

#[test]
fn abort_is_acknowledged() {
    let (f, _rw, _ro) = fixture();
    let mut c = f.client().greet();
    let r = c.opt(OPT_ABORT, &[]);
    assert_eq!(
        r,
        vec![OptReply {
            option: OPT_ABORT,
            kind: REP_ACK,
            data: vec![]
        }]
    );
    assert!(c.closed());
}

/// Many pipelined requests of mixed kinds and sizes: every reply complete and correct,
/// whatever order they come in (replies are never interleaved).
#[test]
fn pipelined_mixed_requests_over_tcp() {
    let (f, rw, _ro) = fixture();
    let pattern: Vec<u8> = (0..4 * MIB as usize).map(|i| (i % 253) as u8).collect();
    rw.fill(0, &pattern);
    let mut c = Client::tcp(f.tcp).greet();
    c.structured();
    c.set_meta("disk", &["base:allocation", "qemu:dirty-bitmap:b0"]);
    c.go("disk");
    let mut expected = std::collections::HashMap::new();
    for i in 0..200u64 {
        let off = (i * 7919 * 512) % (3 * MIB);
        let len = [512u32, 4096, 65536, 1 << 20][(i % 4) as usize];
        if i % 5 == 4 {
            c.request(0, CMD_BLOCK_STATUS, i, off, len);
            expected.insert(i, None);
        } else {
            c.request(0, CMD_READ, i, off, len);
            expected.insert(i, Some((off, len)));
        }
    }
    let mut done = 0;
    let mut bs_chunks = std::collections::HashMap::<u64, usize>::new();
    while done < 200 {
        match c.reply().unwrap() {
            Reply::Chunk {
                flags,
                kind,
                cookie,
                payload,
            } => match expected[&cookie] {
                Some((off, len)) => {
                    assert_eq!(kind, 1);
                    assert_eq!(flags, 1);
                    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), off);
                    assert_eq!(payload.len() - 8, len as usize);
                    assert!(
                        payload[8..] == pattern[off as usize..(off + u64::from(len)) as usize],
                        "data of request {cookie}"
                    );
                    done += 1;
                }
                None => {
                    assert_eq!(kind, 5);
                    let n = bs_chunks.entry(cookie).or_default();
                    *n += 1;
                    let (id, ext) = extents_of(&payload);
                    assert_eq!(id, if *n == 1 { 0 } else { 2 });
                    assert!(!ext.is_empty());
                    if flags & 1 != 0 {
                        assert_eq!(*n, 2);
                        done += 1;
                    }
                }
            },
            other => panic!("unexpected {other:?}"),
        }
    }
}
