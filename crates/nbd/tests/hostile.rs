//! Hostile and broken clients: each gets the right NBD error or a clean close, and the
//! server keeps serving new clients afterwards.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use common::*;
use nbd::{Export, ServerOptions};

const MIB: u64 = 1 << 20;

fn fixture() -> (Fixture, Arc<MemExport>) {
    let rw = Arc::new(MemExport::new(64 * MIB, false, &["b0"]));
    let ro = Arc::new(MemExport::new(MIB, true, &[]));
    let f = Fixture::new(
        ServerOptions::default(),
        &[
            ("disk", rw.clone() as Arc<dyn Export>),
            ("ro", ro as Arc<dyn Export>),
        ],
    );
    (f, rw)
}

/// A fresh client can still negotiate and read.
fn assert_serves(f: &Fixture) {
    let mut c = f.client().greet();
    c.structured();
    c.go("disk");
    c.request(0, CMD_READ, 77, 0, 4096);
    let r = c.reply_chunks();
    assert!(
        matches!(
            &r[0],
            Reply::Chunk {
                kind: 1,
                cookie: 77,
                ..
            }
        ),
        "{r:?}"
    );
}

fn go_structured(f: &Fixture, export: &str) -> Client {
    let mut c = f.client().greet();
    c.structured();
    c.set_meta(export, &["base:allocation"]);
    c.go(export);
    c
}

fn expect_error(c: &mut Client, cookie: u64, errno: u32) -> String {
    let r = c.reply_chunks();
    assert_eq!(r.len(), 1, "{r:?}");
    match &r[0] {
        Reply::Chunk {
            flags: 1,
            kind: 0x8001,
            cookie: k,
            payload,
        } => {
            assert_eq!(*k, cookie);
            let (e, msg) = chunk_error(payload);
            assert_eq!(e, errno, "{msg}");
            msg
        }
        other => panic!("expected an error chunk, got {other:?}"),
    }
}

#[test]
fn bad_option_magic_closes() {
    let (f, _) = fixture();
    let mut c = f.client().greet();
    c.s.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").unwrap();
    assert!(c.closed());
    assert_serves(&f);
}

#[test]
fn option_before_flags_closes() {
    let (f, _) = fixture();
    let mut c = f.client();
    let mut g = [0u8; 18];
    c.s.read_exact(&mut g).unwrap();
    // The option header arrives where the client flags belong: "IHAV" = unknown flags.
    c.s.write_all(b"IHAVEOPT\0\0\0\x03\0\0\0\0").unwrap();
    assert!(c.closed());
    assert_serves(&f);
}

#[test]
fn unknown_client_flags_close() {
    let (f, _) = fixture();
    let mut c = f.client();
    c.greet_with(1 | 4);
    assert!(c.closed());
    assert_serves(&f);
}

#[test]
fn non_fixed_client_only_gets_export_name() {
    let (f, _) = fixture();
    let mut c = f.client();
    c.greet_with(0);
    c.send_opt(OPT_LIST, &[]);
    assert!(c.closed(), "no option replies without fixed newstyle");
    let mut c = f.client();
    c.greet_with(0);
    c.send_opt(OPT_EXPORT_NAME, b"disk");
    let mut b = [0u8; 134];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 64 * MIB);
}

#[test]
fn malformed_option_lengths() {
    let (f, _) = fixture();
    let mut c = f.client().greet();
    // INFO whose name length runs past the payload.
    let mut bad = info_payload("disk", &[]);
    bad[3] = 200;
    assert_eq!(c.opt_final(OPT_INFO, &bad), ERR_INVALID);
    // GO whose request count does not match.
    let mut bad = info_payload("disk", &[1]);
    bad.push(0);
    assert_eq!(c.opt_final(OPT_GO, &bad), ERR_INVALID);
    // GO too short to hold anything.
    assert_eq!(c.opt_final(OPT_GO, &[0, 0]), ERR_INVALID);
    // Name longer than 4096 bytes.
    let long = "x".repeat(5000);
    assert_eq!(c.opt_final(OPT_GO, &info_payload(&long, &[])), ERR_INVALID);
    // LIST and STRUCTURED_REPLY take no payload.
    assert_eq!(c.opt_final(OPT_LIST, b"x"), ERR_INVALID);
    assert_eq!(c.opt_final(OPT_STRUCTURED_REPLY, b"x"), ERR_INVALID);
    c.structured();
    // Meta options: truncated query, absurd query count, trailing bytes.
    let good = meta_payload("disk", &["base:allocation"]);
    assert_eq!(
        c.opt_final(OPT_SET_META_CONTEXT, &good[..good.len() - 3]),
        ERR_INVALID
    );
    let mut huge = meta_payload("disk", &[]);
    let n = huge.len();
    huge[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(c.opt_final(OPT_LIST_META_CONTEXT, &huge), ERR_INVALID);
    let mut extra = good.clone();
    extra.extend_from_slice(&[0, 0]);
    assert_eq!(c.opt_final(OPT_SET_META_CONTEXT, &extra), ERR_INVALID);
    // The session is still usable.
    c.go("disk");
    c.request(0, CMD_FLUSH, 1, 0, 0);
    assert_eq!(
        c.reply().unwrap(),
        Reply::Simple {
            error: 0,
            cookie: 1
        }
    );
    assert_serves(&f);
}

#[test]
fn huge_options() {
    let (f, _) = fixture();
    let mut c = f.client().greet();
    // 1 MiB payload: read and dropped, then ERR_TOO_BIG; the session goes on.
    let payload = vec![0xaau8; 1 << 20];
    c.send_opt(99, &payload);
    let r = c.read_opt_reply().unwrap();
    assert_eq!((r.option, r.kind), (99, ERR_TOO_BIG));
    c.send_opt(OPT_GO, &info_payload("disk", &[]));
    assert_eq!(c.replies_until_final(OPT_GO).last().unwrap().kind, REP_ACK);

    // A length of 4 GiB - 1 then hang up: no allocation, no harm.
    let mut c = f.client().greet();
    c.send_opt_len(OPT_GO, u32::MAX, b"abc");
    drop(c);
    // EXPORT_NAME cannot be answered: too long → closed.
    let mut c = f.client().greet();
    c.send_opt_len(OPT_EXPORT_NAME, 70_000, &[b'a'; 100]);
    assert!(c.closed());
    assert_serves(&f);
}

#[test]
fn options_twice_and_out_of_place() {
    let (f, _) = fixture();
    let mut c = f.client().greet();
    // Meta contexts before structured replies.
    let q = meta_payload("disk", &["base:allocation"]);
    assert_eq!(c.opt_final(OPT_SET_META_CONTEXT, &q), ERR_INVALID);
    assert_eq!(c.opt_final(OPT_LIST_META_CONTEXT, &q), ERR_INVALID);
    c.structured();
    assert_eq!(c.opt_final(OPT_STRUCTURED_REPLY, &[]), ERR_INVALID, "twice");
    assert_eq!(c.opt_final(OPT_LIST, &[]), REP_ACK);
    assert_eq!(c.opt_final(OPT_LIST, &[]), REP_ACK);
    assert_eq!(c.opt_final(OPT_INFO, &info_payload("disk", &[])), REP_ACK);
    assert_eq!(c.opt_final(OPT_INFO, &info_payload("disk", &[])), REP_ACK);
    assert_eq!(c.set_meta("disk", &["base:allocation"]).len(), 1);
    assert_eq!(c.set_meta("disk", &["base:allocation"]).len(), 1);
    // Unsupported and refused options.
    assert_eq!(c.opt_final(OPT_STARTTLS, &[]), ERR_POLICY);
    assert_eq!(c.opt_final(OPT_EXTENDED_HEADERS, &[]), ERR_UNSUP);
    assert_eq!(c.opt_final(4, &[]), ERR_UNSUP);
    assert_eq!(c.opt_final(0x1234_5678, b"junk"), ERR_UNSUP);
    let r = c.opt(OPT_INFO, &info_payload("nope", &[]));
    assert_eq!(r.last().unwrap().kind, ERR_UNKNOWN);
    // A failed SET clears the selection: BLOCK_STATUS then has no context.
    assert_eq!(
        c.opt_final(
            OPT_SET_META_CONTEXT,
            &meta_payload("nope", &["base:allocation"])
        ),
        ERR_UNKNOWN
    );
    c.go("disk");
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 512);
    expect_error(&mut c, 5, EINVAL);
}

#[test]
fn requests_past_the_end() {
    let (f, rw) = fixture();
    let mut c = go_structured(&f, "disk");
    let end = 64 * MIB;
    c.request(0, CMD_READ, 1, end - 512, 1024);
    expect_error(&mut c, 1, EINVAL);
    c.request(0, CMD_READ, 2, u64::MAX - 10, 512);
    expect_error(&mut c, 2, EINVAL);
    // WRITE past the end: ENOSPC (QEMU), and its payload is consumed.
    c.write_req(0, 3, end - 10, &[0xee; 4096]);
    expect_error(&mut c, 3, ENOSPC);
    c.request(0, CMD_WRITE_ZEROES, 4, end, 1);
    expect_error(&mut c, 4, ENOSPC);
    c.request(0, CMD_TRIM, 5, end + 1, 0);
    expect_error(&mut c, 5, EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 6, end - 4096, 8192);
    expect_error(&mut c, 6, EINVAL);
    c.request(0, CMD_CACHE, 7, end, 4096);
    expect_error(&mut c, 7, EINVAL);
    // Still in sync: a read at the very end works.
    rw.fill(end - 4, b"tail");
    c.request(0, CMD_READ, 8, end - 4, 4);
    let r = c.reply_chunks();
    let Reply::Chunk { payload, .. } = &r[0] else {
        panic!()
    };
    assert_eq!(&payload[8..], b"tail");
    assert_eq!(rw.get(end - 4096, 4096)[..4092], vec![0u8; 4092][..]);

    // Simple replies: the same errors.
    let mut c = f.client().greet();
    c.go("disk");
    c.request(0, CMD_READ, 9, end, 1);
    assert_eq!(c.simple().unwrap(), (EINVAL, 9));
    c.write_req(0, 10, end, &[1; 100]);
    assert_eq!(c.simple().unwrap(), (ENOSPC, 10));
    c.request(0, CMD_FLUSH, 11, 0, 0);
    assert_eq!(c.simple().unwrap(), (0, 11));
}

#[test]
fn unknown_commands_and_flags() {
    let (f, _) = fixture();
    let mut c = go_structured(&f, "disk");
    c.request(0, 99, 1, 0, 0);
    let msg = expect_error(&mut c, 1, EINVAL);
    assert!(msg.contains("99"), "{msg}");
    c.request(0, 8, 2, 0, 0); // RESIZE: not supported
    expect_error(&mut c, 2, EINVAL);
    c.request(0x100, CMD_READ, 3, 0, 512);
    expect_error(&mut c, 3, EINVAL);
    c.request(FLAG_REQ_ONE, CMD_READ, 4, 0, 512);
    expect_error(&mut c, 4, EINVAL);
    c.request(FLAG_NO_HOLE, CMD_TRIM, 5, 0, 512);
    expect_error(&mut c, 5, EINVAL);
    c.request(0, CMD_FLUSH, 6, 0, 0);
    assert_eq!(
        c.reply().unwrap(),
        Reply::Simple {
            error: 0,
            cookie: 6
        }
    );
}

#[test]
fn oversized_read_is_refused_but_32_mib_works() {
    let (f, _) = fixture();
    let mut c = go_structured(&f, "disk");
    c.request(0, CMD_READ, 1, 0, (32 << 20) + 1);
    expect_error(&mut c, 1, EINVAL);
    c.request(0, CMD_READ, 2, 0, 32 << 20);
    let r = c.reply_chunks();
    let Reply::Chunk { kind, payload, .. } = &r[0] else {
        panic!()
    };
    assert_eq!(*kind, 1);
    assert_eq!(payload.len(), 8 + (32 << 20));
}

#[test]
fn oversized_write_is_refused_and_closes() {
    let (f, rw) = fixture();
    let mut c = go_structured(&f, "disk");
    // The header alone: the server cannot trust the payload, replies and closes.
    c.request(0, CMD_WRITE, 1, 0, (32 << 20) + 1);
    let _ = c.s.write_all(&[0xff; 4096]);
    expect_error(&mut c, 1, EINVAL);
    assert!(c.closed());
    assert!(rw.allocated().is_empty(), "nothing written");
    f.wait_for("client gone", 10, || f.server.client_count("disk") == 0);
    assert_serves(&f);
}

#[test]
fn bad_request_magic_closes() {
    let (f, _) = fixture();
    let mut c = go_structured(&f, "disk");
    let mut req = request_bytes(0, CMD_READ, 1, 0, 512);
    req[0] ^= 0xff;
    c.s.write_all(&req).unwrap();
    assert!(c.closed());
    assert_serves(&f);
}

#[test]
fn block_status_without_contexts_or_length() {
    let (f, _) = fixture();
    let mut c = f.client().greet();
    c.structured();
    c.go("disk");
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    expect_error(&mut c, 1, EINVAL);

    let mut c = go_structured(&f, "disk");
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 0);
    expect_error(&mut c, 2, EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 4096);
    let r = c.reply_chunks();
    assert!(matches!(
        &r[0],
        Reply::Chunk {
            kind: 5,
            cookie: 3,
            ..
        }
    ));

    // Without structured replies BLOCK_STATUS can never have contexts.
    let mut c = f.client().greet();
    c.go("disk");
    c.request(0, CMD_BLOCK_STATUS, 4, 0, 4096);
    assert_eq!(c.simple().unwrap(), (EINVAL, 4));
}

#[test]
fn read_only_export_refuses_writes() {
    let (f, _) = fixture();
    let mut c = go_structured(&f, "ro");
    c.write_req(0, 1, 0, &[1; 512]);
    expect_error(&mut c, 1, EPERM);
    c.request(0, CMD_TRIM, 2, 0, 512);
    expect_error(&mut c, 2, EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512);
    expect_error(&mut c, 3, EPERM);
    c.request(0, CMD_READ, 4, 0, 512);
    let r = c.reply_chunks();
    assert!(matches!(
        &r[0],
        Reply::Chunk {
            kind: 1,
            cookie: 4,
            ..
        }
    ));
}

#[test]
fn truncated_messages_close_quietly() {
    let (f, _) = fixture();
    // Half an option header.
    let mut c = f.client().greet();
    c.s.write_all(b"IHAVE").unwrap();
    drop(c);
    // Half a request, then a write whose payload never comes.
    let mut c = go_structured(&f, "disk");
    c.s.write_all(&request_bytes(0, CMD_READ, 1, 0, 512)[..10])
        .unwrap();
    drop(c);
    let mut c = go_structured(&f, "disk");
    c.request(0, CMD_WRITE, 1, 0, 1 << 20);
    c.s.write_all(&[1; 1000]).unwrap();
    drop(c);
    f.wait_for("clients gone", 10, || f.server.client_count("disk") == 0);
    assert_serves(&f);
}
