//! Fuzzing harnesses, shared by `fuzz/` (cargo-fuzz targets) and the regression test
//! `tests/fuzz_inputs.rs`. Not a stable API.
//!
//! Oracle: no panic, no hang, bounded memory; with structured replies the server's
//! output must be a well-framed stream of replies.

use std::io::{self, Read, Write};
use std::sync::{Arc, RwLock};

use crate::export::{Export, Extent, ALLOCATION_DEPTH, BASE_ALLOCATION};
use crate::proto::*;
use crate::session::run_inline;
use crate::transmission::Session;
use crate::{meta, serve_stream, Server, ServerOptions};

/// Size of the fuzz exports (small: a READ of the whole export stays cheap).
pub const EXPORT_SIZE: usize = 256 << 10;
const BLOCK: usize = 4096;

/// An in-memory export whose block status derives from its data: 4 KiB blocks of zeroes
/// are holes; bitmap `b0` marks odd blocks dirty; bitmap `b1` fails past the middle.
#[derive(Debug)]
pub struct FuzzExport {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl FuzzExport {
    /// A zeroed export with some data in the first blocks.
    pub fn new(read_only: bool) -> FuzzExport {
        let mut data = vec![0u8; EXPORT_SIZE];
        for (i, b) in data[..3 * BLOCK].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        FuzzExport {
            data: RwLock::new(data),
            read_only,
        }
    }

    fn range(offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if end > EXPORT_SIZE {
            // The server checks bounds before calling: reaching this is a bug.
            panic!("export called past its end: {offset}+{len}");
        }
        Ok(start..end)
    }
}

impl Export for FuzzExport {
    fn size(&self) -> u64 {
        EXPORT_SIZE as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn description(&self) -> Option<String> {
        Some("fuzz export".into())
    }
    fn meta_contexts(&self) -> Vec<String> {
        vec![
            ALLOCATION_DEPTH.into(),
            "qemu:dirty-bitmap:b0".into(),
            "qemu:dirty-bitmap:b1".into(),
        ]
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = Self::range(offset, buf.len())?;
        buf.copy_from_slice(&self.data.read().unwrap()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        assert!(!self.read_only, "write to a read-only export");
        let r = Self::range(offset, data.len())?;
        self.data.write().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> io::Result<()> {
        assert!(!self.read_only, "write zeroes to a read-only export");
        let r = Self::range(offset, len as usize)?;
        self.data.write().unwrap()[r].fill(0);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        assert!(!self.read_only, "trim on a read-only export");
        if offset % 3 == 1 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.write_zeroes(offset, len, true, false)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        let r = Self::range(offset, len as usize)?;
        let data = self.data.read().unwrap();
        if context == "qemu:dirty-bitmap:b1" && r.start >= EXPORT_SIZE / 2 {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = r.start;
        while pos < r.end && out.len() <= max_extents {
            let block = pos / BLOCK;
            // Extents end at block boundaries, so the last one may run past `len`.
            let end = ((block + 1) * BLOCK).min(EXPORT_SIZE);
            let zero = data[block * BLOCK..end].iter().all(|&b| b == 0);
            let flags = match context {
                BASE_ALLOCATION if zero => 3,
                BASE_ALLOCATION => 0,
                ALLOCATION_DEPTH => u32::from(!zero),
                _ => (block % 2) as u32,
            };
            let length = (end - pos) as u64;
            let full = out.len() == max_extents;
            match out.last_mut() {
                Some(l) if l.flags == flags => l.length += length,
                _ if full => break,
                _ => out.push(Extent { length, flags }),
            }
            pos = end;
        }
        Ok(out)
    }
}

/// An in-memory client: reads `input`, hands what the server writes to `output`.
struct Duplex<'a, W> {
    input: &'a [u8],
    output: W,
}

impl<W> Read for Duplex<'_, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl<W: Write> Write for Duplex<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.output.flush()
    }
}

fn server() -> Server {
    let server = Server::new(ServerOptions::default());
    server
        .add_export("disk", Arc::new(FuzzExport::new(false)))
        .expect("fresh server");
    server
        .add_export("ro", Arc::new(FuzzExport::new(true)))
        .expect("fresh server");
    server
}

/// Checks the handshake output: the greeting, then option replies with consistent
/// lengths, until something else (the EXPORT_NAME reply, transmission) follows.
struct HandshakeChecker {
    buf: Vec<u8>,
}

impl Write for HandshakeChecker {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Only the first 1 MiB is kept and checked (transmission may follow).
        if self.buf.len() < 1 << 20 {
            self.buf.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HandshakeChecker {
    fn check(&self) {
        let b = &self.buf;
        assert!(b.len() >= 18, "no greeting");
        assert_eq!(&b[..18], &encode_greeting());
        let mut pos = 18;
        while b.len() >= pos + 20 && b[pos..pos + 8] == OPTION_REPLY_MAGIC.to_be_bytes() {
            let len = u32::from_be_bytes(b[pos + 16..pos + 20].try_into().unwrap()) as usize;
            let kind = u32::from_be_bytes(b[pos + 12..pos + 16].try_into().unwrap());
            assert!(
                matches!(kind, REP_ACK | REP_SERVER | REP_INFO | REP_META_CONTEXT)
                    || kind & (1 << 31) != 0,
                "unknown option reply type {kind:#x}"
            );
            assert!(kind != REP_ACK || len == 0, "ACK with data");
            pos += 20 + len;
        }
    }
}

/// Feeds `data` as everything a client sends, from the first byte of the handshake.
pub fn handshake(data: &[u8]) {
    let server = server();
    let mut out = HandshakeChecker { buf: Vec::new() };
    let _ = serve_stream(
        &server,
        Duplex {
            input: data,
            output: &mut out,
        },
    );
    out.check();
    for name in ["disk", "ro"] {
        assert_eq!(server.client_count(name), 0, "lease leaked");
    }
}

/// Checks that a structured-reply transmission stream is well framed, on the fly.
struct ReplyChecker {
    header: Vec<u8>,
    skip: u64,
    replies: u64,
}

impl Write for ReplyChecker {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            if self.skip > 0 {
                let k = (self.skip.min(buf.len() as u64)) as usize;
                self.skip -= k as u64;
                buf = &buf[k..];
                continue;
            }
            self.header.push(buf[0]);
            buf = &buf[1..];
            let h = &self.header;
            if h.len() == 4 {
                let magic = u32::from_be_bytes(h[..4].try_into().unwrap());
                assert!(
                    magic == SIMPLE_REPLY_MAGIC || magic == STRUCTURED_REPLY_MAGIC,
                    "bad reply magic {magic:#x}"
                );
            }
            let magic = (h.len() >= 4).then(|| u32::from_be_bytes(h[..4].try_into().unwrap()));
            if magic == Some(SIMPLE_REPLY_MAGIC) && h.len() == SIMPLE_HEADER_LEN {
                // With structured replies a simple reply never carries data.
                self.header.clear();
                self.replies += 1;
            } else if magic == Some(STRUCTURED_REPLY_MAGIC) && h.len() == CHUNK_HEADER_LEN {
                let flags = u16::from_be_bytes([h[4], h[5]]);
                let kind = u16::from_be_bytes([h[6], h[7]]);
                let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
                match kind {
                    REPLY_TYPE_NONE => assert!(len == 0 && flags & REPLY_FLAG_DONE != 0),
                    REPLY_TYPE_OFFSET_DATA => assert!(len > 8),
                    REPLY_TYPE_BLOCK_STATUS => assert!(len >= 12 && (len - 4) % 8 == 0),
                    REPLY_TYPE_ERROR => assert!(len >= 6 && flags & REPLY_FLAG_DONE != 0),
                    other => panic!("unexpected chunk type {other}"),
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    self.replies += 1;
                }
                self.skip = u64::from(len);
                self.header.clear();
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Feeds a malformed reply stream to the checker used by [`request`]; it must panic.
/// Proves that the oracle is live.
pub fn request_output_check_self_test() {
    let mut c = ReplyChecker {
        header: Vec::new(),
        skip: 0,
        replies: 0,
    };
    let _ = c.write(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
}

/// Enters transmission directly (byte 0 of `data`: bit 0 = structured replies with every
/// meta context selected, bit 1 = read-only export, bit 2 = no contexts) and feeds the
/// rest as requests.
pub fn request(data: &[u8]) {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let server = server();
    let name: &[u8] = if mode & 2 != 0 { b"ro" } else { b"disk" };
    let lease = server
        .shared()
        .lease(name, Some(None))
        .expect("export exists");
    let structured = mode & 1 != 0;
    let contexts = if structured && mode & 4 == 0 {
        meta::available(&lease.export().meta_contexts())
    } else {
        Vec::new()
    };
    let session = Session {
        size: lease.export().size(),
        read_only: lease.export().read_only(),
        structured,
        contexts,
        lease,
    };
    if structured {
        let mut checker = ReplyChecker {
            header: Vec::new(),
            skip: 0,
            replies: 0,
        };
        let _ = run_inline(
            &mut Duplex {
                input,
                output: &mut checker,
            },
            &session,
        );
        assert!(checker.header.is_empty(), "reply cut short");
        assert_eq!(checker.skip, 0, "reply cut short");
        // Every full request header gets exactly one final reply, except DISC and the
        // one that ended the session.
        assert!(checker.replies <= (input.len() / REQUEST_LEN) as u64);
    } else {
        let _ = run_inline(
            &mut Duplex {
                input,
                output: io::sink(),
            },
            &session,
        );
    }
}

/// A valid client byte stream for [`handshake`]: fixed newstyle, structured replies,
/// SET_META_CONTEXT of every context, GO on "disk", then `requests`. Seeds fuzzing.
pub fn valid_session(requests: &[Request], payloads: &[&[u8]]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let opt = |b: &mut Vec<u8>, option: u32, data: &[u8]| {
        b.extend_from_slice(
            &OptionHeader {
                magic: IHAVEOPT,
                option,
                length: data.len() as u32,
            }
            .encode(),
        );
        b.extend_from_slice(data);
    };
    opt(&mut b, OPT_LIST, &[]);
    opt(&mut b, OPT_STRUCTURED_REPLY, &[]);
    opt(
        &mut b,
        OPT_LIST_META_CONTEXT,
        &encode_meta_request(b"disk", &[b"qemu:"]),
    );
    opt(
        &mut b,
        OPT_SET_META_CONTEXT,
        &encode_meta_request(
            b"disk",
            &[
                b"base:allocation",
                b"qemu:allocation-depth",
                b"qemu:dirty-bitmap:b0",
            ],
        ),
    );
    opt(
        &mut b,
        OPT_INFO,
        &encode_info_request(b"ro", &[INFO_NAME, INFO_DESCRIPTION]),
    );
    opt(
        &mut b,
        OPT_GO,
        &encode_info_request(b"disk", &[INFO_BLOCK_SIZE]),
    );
    for (i, r) in requests.iter().enumerate() {
        b.extend_from_slice(&r.encode());
        if let Some(p) = payloads.get(i) {
            b.extend_from_slice(p);
        }
    }
    b
}
