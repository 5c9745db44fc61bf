//! Wire format: constants of the NBD protocol and bounded encode/decode of its messages.
//!
//! Everything here is pure (no I/O), so it is unit-tested and fuzzed directly.

use std::io;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported (structured replies only).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may share the export (flush is global).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

/// Option: choose an export and enter transmission (no reply on failure).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list meta contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select meta contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (not supported).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one `NBD_INFO_*` item.
pub const REP_INFO: u32 = 3;
/// Option reply: one meta context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: malformed or out of place.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: the option is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: free text.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (READ): do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail fast rather than write slowly.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: empty (only with DONE).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: block status extents of one context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD error: input/output error.
pub const NBD_EIO: u32 = 5;
/// NBD error: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD error: not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD error: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest option payload the server reads; larger ones are discarded (`ERR_TOO_BIG`).
pub const MAX_OPTION_PAYLOAD: u32 = 64 << 10;
/// Largest READ/WRITE payload (QEMU's `NBD_MAX_BUFFER_SIZE`), announced as maximum block size.
pub const MAX_IO: u32 = 32 << 20;
/// Most extents in one BLOCK_STATUS chunk (QEMU's cap: 1 MiB of 8-byte extents).
pub const MAX_EXTENTS: usize = (1 << 20) / 8;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of an option header on the wire.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a simple reply header.
pub const SIMPLE_HEADER_LEN: usize = 16;
/// Size of a structured chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// The name of an option for messages and logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        4 => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// The name of a command for messages and logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// The transmission flags of an export.
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    if read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

/// Maps an error of an [`crate::Export`] to the NBD error sent to the client
/// (default `EIO`).
pub fn errno_to_nbd(err: &io::Error) -> u32 {
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::EPERM | libc::EROFS | libc::EACCES => NBD_EPERM,
            libc::EIO => NBD_EIO,
            libc::ENOMEM => NBD_ENOMEM,
            libc::EINVAL => NBD_EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
            libc::EOVERFLOW => NBD_EOVERFLOW,
            libc::ENOTSUP => NBD_ENOTSUP,
            libc::ESHUTDOWN => NBD_ESHUTDOWN,
            _ => NBD_EIO,
        };
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NBD_EPERM,
        io::ErrorKind::OutOfMemory => NBD_ENOMEM,
        io::ErrorKind::InvalidInput => NBD_EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => NBD_ENOSPC,
        io::ErrorKind::Unsupported => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

/// The header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Must be [`IHAVEOPT`].
    pub magic: u64,
    /// The option number.
    pub option: u32,
    /// Length of the payload that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes the 16 header bytes.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> OptionHeader {
        OptionHeader {
            magic: be_u64(&b[0..8]),
            option: be_u32(&b[8..12]),
            length: be_u32(&b[12..16]),
        }
    }

    /// Encodes the header (used by tests and the fuzz harness).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&self.magic.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Must be [`REQUEST_MAGIC`].
    pub magic: u32,
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for WRITE also the payload length).
    pub length: u32,
}

impl Request {
    /// Decodes the 28 header bytes.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Request {
        Request {
            magic: be_u32(&b[0..4]),
            flags: be_u16(&b[4..6]),
            command: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            length: be_u32(&b[24..28]),
        }
    }

    /// Encodes the header (used by tests and the fuzz harness).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Whether `[offset, offset + length)` lies within an export of `size` bytes.
    pub fn within(&self, size: u64) -> bool {
        self.offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= size)
    }
}

/// The server's greeting: magics and handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// One option reply: header and `data`.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("option reply data fits u32");
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless `no_zeroes`) 124 zeroes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.resize(b.len() + 124, 0);
    }
    b
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// Payload of `NBD_REP_INFO` with a string item (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(info: u16, text: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + text.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(text.as_bytes());
    b
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// Payload of `NBD_REP_SERVER`: name length, name, description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let len = u32::try_from(name.len()).expect("export names are bounded");
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// Payload of `NBD_REP_META_CONTEXT`: context id and name.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Writes a simple reply header into `b[..16]`.
pub fn put_simple_header(b: &mut [u8], error: u32, cookie: u64) {
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// A simple reply without data.
pub fn encode_simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut b = vec![0u8; SIMPLE_HEADER_LEN];
    put_simple_header(&mut b, error, cookie);
    b
}

/// Writes a structured chunk header into `b[..20]`.
pub fn put_chunk_header(b: &mut [u8], flags: u16, kind: u16, cookie: u64, length: u32) {
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
}

/// Appends a whole structured chunk to `out`.
pub fn push_chunk(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("chunk payloads are bounded");
    let start = out.len();
    out.resize(start + CHUNK_HEADER_LEN, 0);
    put_chunk_header(&mut out[start..], flags, kind, cookie, len);
    out.extend_from_slice(payload);
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with `error` and a human-readable `message`.
pub fn encode_error_chunk(error: u32, cookie: u64, message: &str) -> Vec<u8> {
    let msg = truncate_str(message, MAX_STRING);
    let mut payload = Vec::with_capacity(6 + msg.len());
    payload.extend_from_slice(&error.to_be_bytes());
    payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    payload.extend_from_slice(msg.as_bytes());
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    push_chunk(
        &mut out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        &payload,
    );
    out
}

/// Appends a `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id then `(length, flags)` pairs.
pub fn push_block_status_chunk(
    out: &mut Vec<u8>,
    done: bool,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
) {
    let mut payload = Vec::with_capacity(4 + 8 * extents.len());
    payload.extend_from_slice(&context_id.to_be_bytes());
    for &(length, flags) in extents {
        payload.extend_from_slice(&length.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    push_chunk(out, flags, REPLY_TYPE_BLOCK_STATUS, cookie, &payload);
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why an option payload was rejected (`NBD_REP_ERR_INVALID` with this message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

/// A bounds-checked big-endian reader over an option payload.
#[derive(Debug)]
pub struct Payload<'a> {
    buf: &'a [u8],
}

impl<'a> Payload<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Payload { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The next `n` bytes, or `None` if fewer are left.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    /// The next big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be_u16)
    }

    /// The next big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be_u32)
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name as sent (not necessarily UTF-8).
    pub name: Vec<u8>,
    /// The `NBD_INFO_*` items the client asked for.
    pub requests: Vec<u16>,
}

/// Parses the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Malformed> {
    let mut p = Payload::new(data);
    let name_len = p
        .u32()
        .ok_or_else(|| Malformed("payload too short for the export name length".into()))?;
    let name_len = name_len as usize;
    if name_len > MAX_STRING {
        return Err(Malformed(format!(
            "export name length {name_len} exceeds {MAX_STRING}"
        )));
    }
    let name = p
        .bytes(name_len)
        .ok_or_else(|| Malformed("export name runs past the option".into()))?
        .to_vec();
    let count = p
        .u16()
        .ok_or_else(|| Malformed("payload too short for the number of info requests".into()))?;
    if p.remaining() != usize::from(count) * 2 {
        return Err(Malformed(format!(
            "{count} info requests do not match the remaining {} bytes",
            p.remaining()
        )));
    }
    let requests = (0..count).filter_map(|_| p.u16()).collect();
    Ok(InfoRequest { name, requests })
}

/// Encodes an INFO/GO payload (used by tests and the fuzz harness).
pub fn encode_info_request(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name as sent.
    pub name: Vec<u8>,
    /// Queries; those longer than [`MAX_STRING`] are dropped (they cannot match).
    pub queries: Vec<Vec<u8>>,
    /// Number of queries the client sent (including dropped ones).
    pub query_count: u32,
}

/// Parses the payload of the meta-context options.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, Malformed> {
    let mut p = Payload::new(data);
    let name_len = p
        .u32()
        .ok_or_else(|| Malformed("payload too short for the export name length".into()))?
        as usize;
    if name_len > MAX_STRING {
        return Err(Malformed(format!(
            "export name length {name_len} exceeds {MAX_STRING}"
        )));
    }
    let name = p
        .bytes(name_len)
        .ok_or_else(|| Malformed("export name runs past the option".into()))?
        .to_vec();
    let query_count = p
        .u32()
        .ok_or_else(|| Malformed("payload too short for the number of queries".into()))?;
    // Each query needs at least its 4-byte length: reject counts the payload cannot hold
    // before looping over them.
    if u64::from(query_count) * 4 > p.remaining() as u64 {
        return Err(Malformed(format!(
            "{query_count} queries do not fit in the remaining {} bytes",
            p.remaining()
        )));
    }
    let mut queries = Vec::new();
    for i in 0..query_count {
        let len = p
            .u32()
            .ok_or_else(|| Malformed(format!("query {i}: length missing")))?
            as usize;
        let query = p
            .bytes(len)
            .ok_or_else(|| Malformed(format!("query {i}: runs past the option")))?;
        if len <= MAX_STRING {
            queries.push(query.to_vec());
        }
    }
    if p.remaining() != 0 {
        return Err(Malformed(format!(
            "{} unexpected bytes after the queries",
            p.remaining()
        )));
    }
    Ok(MetaRequest {
        name,
        queries,
        query_count,
    })
}

/// Encodes a meta-context option payload (used by tests and the fuzz harness).
pub fn encode_meta_request(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q);
    }
    b
}

/// Converts extents of an export into wire extents for a request at `offset` of `len`
/// bytes: drops the part past the request end (the last extent is clipped; the protocol
/// allows it to run past only without REQ_ONE, and clipping is always allowed), keeps at
/// most `max` extents and skips zero-length ones. Because the request length is a u32,
/// every clipped extent fits a u32 length.
pub fn clip_extents(extents: &[crate::Extent], len: u32, max: usize) -> Vec<(u32, u32)> {
    let mut out = Vec::with_capacity(extents.len().min(max));
    let mut left = u64::from(len);
    for e in extents {
        if left == 0 || out.len() == max {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let take = e.length.min(left);
        left -= take;
        // `take <= len <= u32::MAX`.
        out.push((take as u32, e.flags));
    }
    out
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Extent;

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn option_header_roundtrip_and_layout() {
        let h = OptionHeader {
            magic: IHAVEOPT,
            option: OPT_GO,
            length: 0x0102_0304,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], b"IHAVEOPT");
        assert_eq!(&b[8..12], &[0, 0, 0, 7]);
        assert_eq!(&b[12..16], &[1, 2, 3, 4]);
        assert_eq!(OptionHeader::decode(&b), h);
    }

    #[test]
    fn request_roundtrip_and_layout() {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            command: CMD_BLOCK_STATUS,
            cookie: 0x1122_3344_5566_7788,
            offset: 0x0a0b_0c0d_0e0f_1011,
            length: 0xdead_beef,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[0, 9]);
        assert_eq!(&b[6..8], &[0, 7]);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(&b[24..28], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(Request::decode(&b), r);
    }

    #[test]
    fn request_within_bounds() {
        let mut r = Request {
            magic: REQUEST_MAGIC,
            flags: 0,
            command: CMD_READ,
            cookie: 0,
            offset: 1000,
            length: 24,
        };
        assert!(r.within(1024));
        assert!(!r.within(1023));
        r.offset = 1024;
        r.length = 0;
        assert!(r.within(1024));
        r.offset = 1025;
        assert!(!r.within(1024));
        r.offset = u64::MAX;
        r.length = 2;
        assert!(!r.within(u64::MAX), "overflow must not wrap");
    }

    #[test]
    fn option_reply_layout() {
        let b = encode_option_reply(OPT_LIST, REP_ERR_INVALID, b"hi");
        assert_eq!(b.len(), 22);
        assert_eq!(&b[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[8..12], &3u32.to_be_bytes());
        assert_eq!(&b[12..16], &0x8000_0003u32.to_be_bytes());
        assert_eq!(&b[16..20], &2u32.to_be_bytes());
        assert_eq!(&b[20..], b"hi");
    }

    #[test]
    fn export_name_reply_zeroes() {
        assert_eq!(encode_export_name_reply(5, 1, true).len(), 10);
        let b = encode_export_name_reply(5, 0x0103, false);
        assert_eq!(b.len(), 134);
        assert_eq!(&b[0..8], &5u64.to_be_bytes());
        assert_eq!(&b[8..10], &[1, 3]);
        assert!(b[10..].iter().all(|&x| x == 0));
    }

    #[test]
    fn info_payloads() {
        assert_eq!(
            encode_info_export(0x100, 0x3),
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 3]
        );
        assert_eq!(encode_info_string(INFO_NAME, "ab"), [0, 1, b'a', b'b']);
        assert_eq!(
            encode_info_block_size(1, 4096, MAX_IO),
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]
        );
        assert_eq!(encode_rep_server("x", "d"), [0, 0, 0, 1, b'x', b'd']);
        assert_eq!(encode_rep_meta_context(2, "q"), [0, 0, 0, 2, b'q']);
    }

    #[test]
    fn simple_and_error_replies() {
        let s = encode_simple_reply(NBD_EINVAL, 7);
        assert_eq!(&s[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&s[4..8], &22u32.to_be_bytes());
        assert_eq!(&s[8..16], &7u64.to_be_bytes());

        let e = encode_error_chunk(NBD_EPERM, 9, "no");
        assert_eq!(&e[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&e[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&e[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e[8..16], &9u64.to_be_bytes());
        assert_eq!(&e[16..20], &8u32.to_be_bytes());
        assert_eq!(&e[20..24], &1u32.to_be_bytes());
        assert_eq!(&e[24..26], &2u16.to_be_bytes());
        assert_eq!(&e[26..], b"no");
    }

    #[test]
    fn error_message_truncated_on_char_boundary() {
        let long = "é".repeat(3000); // 6000 bytes
        let e = encode_error_chunk(NBD_EIO, 1, &long);
        let msg_len = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert!(msg_len <= MAX_STRING);
        assert_eq!(msg_len % 2, 0);
        assert!(std::str::from_utf8(&e[26..]).is_ok());
        assert_eq!(e.len(), 26 + msg_len);
    }

    #[test]
    fn block_status_chunk_layout() {
        let mut out = Vec::new();
        push_block_status_chunk(&mut out, false, 5, 2, &[(512, 1), (1024, 0)]);
        push_block_status_chunk(&mut out, true, 5, 0, &[(4096, 3)]);
        assert_eq!(out.len(), 20 + 4 + 16 + 20 + 4 + 8);
        assert_eq!(&out[4..6], &[0, 0]);
        assert_eq!(&out[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(&out[20..24], &2u32.to_be_bytes());
        assert_eq!(&out[24..28], &512u32.to_be_bytes());
        assert_eq!(&out[28..32], &1u32.to_be_bytes());
        let second = &out[40..];
        assert_eq!(&second[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&second[20..24], &0u32.to_be_bytes());
        assert_eq!(&second[24..28], &4096u32.to_be_bytes());
        assert_eq!(&second[28..32], &3u32.to_be_bytes());
    }

    #[test]
    fn parse_info_ok_and_errors() {
        let ok = encode_info_request(b"disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
        let r = parse_info_request(&ok).unwrap();
        assert_eq!(r.name, b"disk");
        assert_eq!(r.requests, vec![INFO_NAME, INFO_BLOCK_SIZE]);

        let empty = encode_info_request(b"", &[]);
        assert_eq!(parse_info_request(&empty).unwrap().name, b"");

        // Too short for anything.
        assert!(parse_info_request(&[0, 0]).is_err());
        // Name longer than the payload.
        assert!(parse_info_request(&[0, 0, 0, 9, b'a', 0, 0]).is_err());
        // Missing request count.
        assert!(parse_info_request(&[0, 0, 0, 1, b'a']).is_err());
        // Count does not match the rest (both directions).
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 2, 0, 1]).is_err());
        let mut extra = encode_info_request(b"a", &[1]);
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
        // Name too long for the protocol.
        let long = encode_info_request(&[b'x'; MAX_STRING + 1], &[]);
        assert!(parse_info_request(&long).is_err());
        let max = encode_info_request(&[b'x'; MAX_STRING], &[]);
        assert!(parse_info_request(&max).is_ok());
    }

    #[test]
    fn parse_meta_ok_and_errors() {
        let ok = encode_meta_request(b"d", &[b"base:allocation", b"qemu:"]);
        let r = parse_meta_request(&ok).unwrap();
        assert_eq!(r.name, b"d");
        assert_eq!(r.query_count, 2);
        assert_eq!(
            r.queries,
            vec![b"base:allocation".to_vec(), b"qemu:".to_vec()]
        );

        let none = encode_meta_request(b"d", &[]);
        let r = parse_meta_request(&none).unwrap();
        assert_eq!(r.query_count, 0);
        assert!(r.queries.is_empty());

        // Truncated anywhere → error.
        for cut in 0..ok.len() {
            assert!(parse_meta_request(&ok[..cut]).is_err(), "cut at {cut}");
        }
        // Trailing garbage.
        let mut extra = ok.clone();
        extra.push(1);
        assert!(parse_meta_request(&extra).is_err());
        // Absurd query count does not loop or allocate.
        let mut huge = encode_meta_request(b"d", &[]);
        let n = huge.len();
        huge[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge).is_err());
        // Over-long query is parsed but dropped.
        let long_q = vec![b'q'; MAX_STRING + 1];
        let r = parse_meta_request(&encode_meta_request(b"d", &[&long_q, b"x"])).unwrap();
        assert_eq!(r.query_count, 2);
        assert_eq!(r.queries, vec![b"x".to_vec()]);
    }

    #[test]
    fn clip_extents_rules() {
        let e = |length, flags| Extent { length, flags };
        // Last extent clipped to the request end.
        assert_eq!(
            clip_extents(&[e(100, 1), e(1000, 0)], 300, MAX_EXTENTS),
            vec![(100, 1), (200, 0)]
        );
        // Extents past the end are dropped.
        assert_eq!(
            clip_extents(&[e(100, 1), e(200, 0), e(50, 1)], 300, MAX_EXTENTS),
            vec![(100, 1), (200, 0)]
        );
        // REQ_ONE: max = 1.
        assert_eq!(
            clip_extents(&[e(100, 1), e(200, 0)], 300, 1),
            vec![(100, 1)]
        );
        // Huge extents (u64) fit u32 after clipping to a u32 request.
        assert_eq!(
            clip_extents(&[e(1 << 40, 2)], u32::MAX, MAX_EXTENTS),
            vec![(u32::MAX, 2)]
        );
        // Zero lengths skipped; nothing left → empty.
        assert_eq!(clip_extents(&[e(0, 1)], 10, 5), vec![]);
        assert_eq!(clip_extents(&[e(0, 1), e(5, 3)], 10, 5), vec![(5, 3)]);
    }

    #[test]
    fn errno_mapping() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(errno_to_nbd(&os(libc::EPERM)), NBD_EPERM);
        assert_eq!(errno_to_nbd(&os(libc::EROFS)), NBD_EPERM);
        assert_eq!(errno_to_nbd(&os(libc::EIO)), NBD_EIO);
        assert_eq!(errno_to_nbd(&os(libc::ENOMEM)), NBD_ENOMEM);
        assert_eq!(errno_to_nbd(&os(libc::EINVAL)), NBD_EINVAL);
        assert_eq!(errno_to_nbd(&os(libc::ENOSPC)), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(&os(libc::EDQUOT)), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(&os(libc::EOVERFLOW)), NBD_EOVERFLOW);
        assert_eq!(errno_to_nbd(&os(libc::EOPNOTSUPP)), NBD_ENOTSUP);
        assert_eq!(errno_to_nbd(&os(libc::ESHUTDOWN)), NBD_ESHUTDOWN);
        assert_eq!(errno_to_nbd(&os(libc::ENOENT)), NBD_EIO);
        assert_eq!(errno_to_nbd(&io::Error::other("x")), NBD_EIO);
        assert_eq!(
            errno_to_nbd(&io::Error::from(io::ErrorKind::InvalidInput)),
            NBD_EINVAL
        );
        assert_eq!(
            errno_to_nbd(&io::Error::from(io::ErrorKind::Unsupported)),
            NBD_ENOTSUP
        );
    }

    #[test]
    fn flags_by_mode() {
        let rw = transmission_flags(false, false);
        assert_eq!(rw & TFLAG_READ_ONLY, 0);
        assert_ne!(rw & TFLAG_SEND_TRIM, 0);
        assert_ne!(rw & TFLAG_SEND_WRITE_ZEROES, 0);
        assert_eq!(rw & TFLAG_SEND_DF, 0, "DF only with structured replies");
        let ro = transmission_flags(true, true);
        assert_ne!(ro & TFLAG_READ_ONLY, 0);
        assert_eq!(ro & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
        assert_ne!(ro & TFLAG_SEND_DF, 0);
        assert_ne!(ro & TFLAG_HAS_FLAGS, 0);
        assert_ne!(ro & TFLAG_CAN_MULTI_CONN, 0);
    }
}
