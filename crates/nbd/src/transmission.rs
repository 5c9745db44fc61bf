//! Transmission phase: validating one request and executing it into reply bytes.
//!
//! No I/O on the connection happens here: [`check`] decides what to do with a request
//! header, [`execute`] runs a valid request against the export and returns the complete
//! reply (all chunks), which the caller writes in one piece.

use crate::meta::MetaContext;
use crate::proto::*;
use crate::server::Lease;

/// The state of a connection in transmission.
pub(crate) struct Session {
    /// Keeps the export alive and counted as used.
    pub lease: Lease,
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// Selected meta contexts, in id order.
    pub contexts: Vec<MetaContext>,
}

/// What to do with the payload of a rejected WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payload {
    /// No payload follows.
    None,
    /// Read and drop `length` bytes, then go on.
    Discard,
    /// Too large to trust: reply, then close the connection.
    Close,
}

/// The verdict on a request header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `NBD_CMD_DISC`: finish in-flight requests, then close.
    Disconnect,
    /// Valid: read the payload (WRITE) and [`execute`] it.
    Execute,
    /// Invalid: send [`error_reply`] with `error`.
    Reject {
        error: u32,
        message: String,
        payload: Payload,
    },
}

impl Session {
    /// The request's reply when it fails with `error`: an error chunk with structured
    /// replies (it carries `message`), else a simple reply.
    pub fn error_reply(&self, cookie: u64, error: u32, message: &str) -> Vec<u8> {
        if self.structured {
            encode_error_chunk(error, cookie, message)
        } else {
            encode_simple_reply(error, cookie)
        }
    }
}

/// Validates a request header (after its magic), in QEMU's order: type, flags, size
/// limit, bounds, read-only, then BLOCK_STATUS specifics.
pub(crate) fn check(s: &Session, req: &Request) -> Verdict {
    let cmd = req.command;
    let payload = if cmd == CMD_WRITE {
        if req.length > MAX_IO {
            Payload::Close
        } else {
            Payload::Discard
        }
    } else {
        Payload::None
    };
    let reject = |error: u32, message: String| Verdict::Reject {
        error,
        message,
        payload,
    };
    let mut valid_flags = CMD_FLAG_FUA;
    match cmd {
        CMD_DISC => return Verdict::Disconnect,
        CMD_READ => {
            if s.structured {
                valid_flags |= CMD_FLAG_DF;
            }
        }
        CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
        CMD_WRITE_ZEROES => valid_flags |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => valid_flags |= CMD_FLAG_REQ_ONE,
        _ => return reject(NBD_EINVAL, format!("invalid request type ({cmd}) received")),
    }
    if req.flags & !valid_flags != 0 {
        return reject(
            NBD_EINVAL,
            format!(
                "unsupported flags for {} (got 0x{:x})",
                command_name(cmd),
                req.flags
            ),
        );
    }
    if (cmd == CMD_READ || cmd == CMD_WRITE) && req.length > MAX_IO {
        return reject(
            NBD_EINVAL,
            format!("len ({}) is larger than max len ({MAX_IO})", req.length),
        );
    }
    if cmd != CMD_FLUSH && !req.within(s.size) {
        let error = if cmd == CMD_WRITE || cmd == CMD_WRITE_ZEROES {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        };
        return reject(
            error,
            format!(
                "operation from {}, len {} goes beyond export size {}",
                req.offset, req.length, s.size
            ),
        );
    }
    if s.read_only && matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return reject(NBD_EPERM, "export is read-only".to_string());
    }
    if cmd == CMD_BLOCK_STATUS {
        if s.contexts.is_empty() {
            return reject(NBD_EINVAL, "no meta contexts were negotiated".to_string());
        }
        if req.length == 0 {
            return reject(NBD_EINVAL, "block status of zero length".to_string());
        }
    }
    Verdict::Execute
}

/// Runs a request that passed [`check`] (`payload` is the WRITE data) and returns the
/// whole reply.
pub(crate) fn execute(s: &Session, req: &Request, payload: Vec<u8>) -> Vec<u8> {
    let export = s.lease.export();
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.length);
    let result = match req.command {
        CMD_READ => return read(s, req),
        CMD_BLOCK_STATUS => return block_status(s, req),
        CMD_WRITE if payload.is_empty() => Ok(()),
        CMD_WRITE => export.write(req.offset, &payload, fua),
        CMD_FLUSH => export.flush(),
        CMD_TRIM if len == 0 => Ok(()),
        CMD_TRIM => {
            export
                .trim(req.offset, len)
                .and_then(|()| if fua { export.flush() } else { Ok(()) })
        }
        CMD_WRITE_ZEROES if req.flags & CMD_FLAG_FAST_ZERO != 0 => {
            return s.error_reply(req.cookie, NBD_ENOTSUP, "fast zeroing is not supported");
        }
        CMD_WRITE_ZEROES if len == 0 => Ok(()),
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            export.write_zeroes(req.offset, len, may_trim, fua)
        }
        CMD_CACHE => Ok(()),
        other => {
            // `check` rejects every other command.
            return s.error_reply(
                req.cookie,
                NBD_EINVAL,
                &format!("invalid request type ({other}) received"),
            );
        }
    };
    match result {
        Ok(()) => encode_simple_reply(0, req.cookie),
        Err(e) => {
            log::debug!(
                "nbd: {} at {} len {} failed: {e}",
                command_name(req.command),
                req.offset,
                req.length
            );
            s.error_reply(
                req.cookie,
                errno_to_nbd(&e),
                &format!("{} failed: {e}", command_name(req.command)),
            )
        }
    }
}

/// READ: one data chunk (or a simple reply with the data).
fn read(s: &Session, req: &Request) -> Vec<u8> {
    let len = req.length as usize;
    if len == 0 {
        if s.structured {
            let mut out = Vec::with_capacity(CHUNK_HEADER_LEN);
            push_chunk(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[]);
            return out;
        }
        return encode_simple_reply(0, req.cookie);
    }
    let header = if s.structured {
        CHUNK_HEADER_LEN + 8
    } else {
        SIMPLE_HEADER_LEN
    };
    let mut buf = vec![0u8; header + len];
    if let Err(e) = s.lease.export().read(req.offset, &mut buf[header..]) {
        log::debug!("nbd: read at {} len {len} failed: {e}", req.offset);
        return s.error_reply(
            req.cookie,
            errno_to_nbd(&e),
            &format!("NBD_CMD_READ failed: {e}"),
        );
    }
    if s.structured {
        // `len <= MAX_IO`, so the chunk length fits.
        put_chunk_header(
            &mut buf,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            (8 + len) as u32,
        );
        buf[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8].copy_from_slice(&req.offset.to_be_bytes());
    } else {
        put_simple_header(&mut buf, 0, req.cookie);
    }
    buf
}

/// BLOCK_STATUS: one chunk per selected context in id order, DONE on the last. All
/// contexts are queried before anything is sent, so a failure is a single error chunk.
fn block_status(s: &Session, req: &Request) -> Vec<u8> {
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let len = u64::from(req.length);
    let mut per_context = Vec::with_capacity(s.contexts.len());
    for ctx in &s.contexts {
        let extents = match s
            .lease
            .export()
            .block_status(&ctx.name, req.offset, len, max)
        {
            Ok(e) => e,
            Err(e) => {
                log::debug!(
                    "nbd: block status of {} at {} len {len} failed: {e}",
                    ctx.name,
                    req.offset
                );
                return s.error_reply(
                    req.cookie,
                    errno_to_nbd(&e),
                    &format!("block status of {} failed: {e}", ctx.name),
                );
            }
        };
        let wire = clip_extents(&extents, req.length, max);
        if wire.is_empty() {
            log::warn!(
                "nbd: export returned no extent for {} at {} len {len}",
                ctx.name,
                req.offset
            );
            return s.error_reply(
                req.cookie,
                NBD_EIO,
                &format!("no block status for {}", ctx.name),
            );
        }
        per_context.push((ctx.id, wire));
    }
    let mut out = Vec::new();
    let last = per_context.len().saturating_sub(1);
    for (i, (id, wire)) in per_context.iter().enumerate() {
        push_block_status_chunk(&mut out, i == last, req.cookie, *id, wire);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fuzzing::{FuzzExport, EXPORT_SIZE};
    use crate::{meta, Server, ServerOptions};

    fn session(server: &Server, read_only: bool, structured: bool, contexts: bool) -> Session {
        let name = if read_only { "ro" } else { "rw" };
        let _ = server.add_export(name, Arc::new(FuzzExport::new(read_only)));
        let lease = server.shared().lease(name.as_bytes(), Some(None)).unwrap();
        let contexts = if contexts {
            meta::available(&lease.export().meta_contexts())
        } else {
            Vec::new()
        };
        Session {
            size: EXPORT_SIZE as u64,
            read_only,
            structured,
            contexts,
            lease,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            magic: REQUEST_MAGIC,
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    fn rejected(v: Verdict) -> (u32, Payload) {
        match v {
            Verdict::Reject { error, payload, .. } => (error, payload),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn check_edge_cases() {
        let server = Server::new(ServerOptions::default());
        let s = session(&server, false, true, true);
        let size = EXPORT_SIZE as u64;
        assert_eq!(check(&s, &req(CMD_READ, 0, 0, 4096)), Verdict::Execute);
        assert_eq!(
            check(&s, &req(CMD_READ, CMD_FLAG_DF, size - 1, 1)),
            Verdict::Execute
        );
        assert_eq!(check(&s, &req(CMD_READ, 0, size, 0)), Verdict::Execute);
        assert_eq!(check(&s, &req(CMD_DISC, 0, 0, 0)), Verdict::Disconnect);
        assert_eq!(check(&s, &req(CMD_FLUSH, 0, u64::MAX, 9)), Verdict::Execute);
        // Bounds.
        assert_eq!(
            rejected(check(&s, &req(CMD_READ, 0, size, 1))),
            (NBD_EINVAL, Payload::None)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_READ, 0, u64::MAX, 2))),
            (NBD_EINVAL, Payload::None)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_WRITE, 0, size, 1))),
            (NBD_ENOSPC, Payload::Discard)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_WRITE_ZEROES, 0, size - 1, 2))),
            (NBD_ENOSPC, Payload::None)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_BLOCK_STATUS, 0, size - 1, 2))),
            (NBD_EINVAL, Payload::None)
        );
        // Size limit: a WRITE that large cannot be resynchronised.
        assert_eq!(
            rejected(check(&s, &req(CMD_WRITE, 0, 0, MAX_IO + 1))),
            (NBD_EINVAL, Payload::Close)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_READ, 0, 0, MAX_IO + 1))),
            (NBD_EINVAL, Payload::None)
        );
        // Flags per command.
        assert_eq!(
            rejected(check(&s, &req(CMD_READ, CMD_FLAG_REQ_ONE, 0, 1))),
            (NBD_EINVAL, Payload::None)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1))),
            (NBD_EINVAL, Payload::Discard)
        );
        assert_eq!(
            check(
                &s,
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
                    0,
                    1
                )
            ),
            Verdict::Execute
        );
        assert_eq!(
            check(&s, &req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1)),
            Verdict::Execute
        );
        // Unknown command, zero-length block status.
        assert_eq!(
            rejected(check(&s, &req(9, 0, 0, 0))),
            (NBD_EINVAL, Payload::None)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_BLOCK_STATUS, 0, 0, 0))),
            (NBD_EINVAL, Payload::None)
        );

        // Simple replies: DF is not a valid flag; no contexts → EINVAL.
        let s = session(&server, false, false, false);
        assert_eq!(
            rejected(check(&s, &req(CMD_READ, CMD_FLAG_DF, 0, 1))),
            (NBD_EINVAL, Payload::None)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_BLOCK_STATUS, 0, 0, 1))),
            (NBD_EINVAL, Payload::None)
        );

        // Read-only export.
        let s = session(&server, true, true, true);
        assert_eq!(
            rejected(check(&s, &req(CMD_WRITE, 0, 0, 1))),
            (NBD_EPERM, Payload::Discard)
        );
        assert_eq!(
            rejected(check(&s, &req(CMD_TRIM, 0, 0, 1))),
            (NBD_EPERM, Payload::None)
        );
        assert_eq!(check(&s, &req(CMD_READ, 0, 0, 1)), Verdict::Execute);
    }

    #[test]
    fn execute_block_status_and_errors() {
        let server = Server::new(ServerOptions::default());
        let s = session(&server, false, true, true);
        // All four contexts; b1 fails past the middle → one error chunk only.
        let out = execute(&s, &req(CMD_BLOCK_STATUS, 0, 0, 8192), Vec::new());
        let mut pos = 0;
        let mut ids = Vec::new();
        while pos < out.len() {
            let len = u32::from_be_bytes(out[pos + 16..pos + 20].try_into().unwrap()) as usize;
            let flags = u16::from_be_bytes([out[pos + 4], out[pos + 5]]);
            ids.push(u32::from_be_bytes(
                out[pos + 20..pos + 24].try_into().unwrap(),
            ));
            pos += CHUNK_HEADER_LEN + len;
            assert_eq!(flags & REPLY_FLAG_DONE != 0, pos == out.len());
        }
        assert_eq!(ids, vec![0, 1, 2, 3]);
        let mid = EXPORT_SIZE as u64 / 2;
        let out = execute(&s, &req(CMD_BLOCK_STATUS, 0, mid, 4096), Vec::new());
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_ERROR);
        assert_eq!(
            u32::from_be_bytes(out[20..24].try_into().unwrap()),
            NBD_ENOMEM
        );
        assert_eq!(
            out.len(),
            CHUNK_HEADER_LEN + 6 + u16::from_be_bytes([out[24], out[25]]) as usize
        );
        // Trim error mapped from EIO.
        let out = execute(&s, &req(CMD_TRIM, 0, 1, 10), Vec::new());
        assert_eq!(u32::from_be_bytes(out[20..24].try_into().unwrap()), NBD_EIO);
        // Write then read back (simple and structured layouts).
        let out = execute(&s, &req(CMD_WRITE, 0, 100, 3), vec![1, 2, 3]);
        assert_eq!(out, encode_simple_reply(0, 7));
        let out = execute(&s, &req(CMD_READ, 0, 100, 3), Vec::new());
        assert_eq!(
            &out[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8],
            &100u64.to_be_bytes()
        );
        assert_eq!(&out[CHUNK_HEADER_LEN + 8..], &[1, 2, 3]);
        let simple = session(&server, false, false, false);
        let out = execute(&simple, &req(CMD_READ, 0, 100, 3), Vec::new());
        assert_eq!(out.len(), SIMPLE_HEADER_LEN + 3);
        assert_eq!(&out[SIMPLE_HEADER_LEN..], &[1, 2, 3]);
        // FAST_ZERO refused.
        let out = execute(
            &simple,
            &req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1),
            Vec::new(),
        );
        assert_eq!(out, encode_simple_reply(NBD_ENOTSUP, 7));
    }
}
