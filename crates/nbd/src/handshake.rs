//! The fixed newstyle handshake: greeting, client flags and option haggling up to
//! `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME` (or `NBD_OPT_ABORT`).

use std::io::{Read, Write};
use std::sync::Arc;

use crate::meta::{self, MetaContext};
use crate::proto::*;
use crate::server::{Lease, Shared};
use crate::session::discard;
use crate::NbdError;

/// How the handshake ended.
pub(crate) enum Outcome {
    /// The client sent `NBD_OPT_ABORT` (answered with an ACK).
    Aborted,
    /// The client selected an export.
    Transmission(Negotiated),
}

/// The result of a handshake that entered transmission.
pub(crate) struct Negotiated {
    /// The selected export, held as a client lease.
    pub lease: Lease,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The selected meta contexts (id order).
    pub contexts: Vec<MetaContext>,
}

/// The meta contexts of the last `NBD_OPT_SET_META_CONTEXT`.
struct Selection {
    /// Canonical name of the export it named.
    export: String,
    contexts: Vec<MetaContext>,
}

struct Handshake<'a, S> {
    io: &'a mut S,
    shared: &'a Arc<Shared>,
    /// The connection id, `None` for [`crate::serve_stream`].
    conn: Option<u64>,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    selection: Option<Selection>,
}

/// Runs the handshake on `io`. Errors close the connection: I/O errors, protocol
/// violations that cannot be answered (bad magic, unknown client flags, a failed
/// `NBD_OPT_EXPORT_NAME`).
pub(crate) fn negotiate<S: Read + Write>(
    io: &mut S,
    shared: &Arc<Shared>,
    conn: Option<u64>,
) -> Result<Outcome, NbdError> {
    io.write_all(&encode_greeting())?;
    io.flush()?;
    let mut flags = [0u8; 4];
    io.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags 0x{flags:x}"
        )));
    }
    let mut hs = Handshake {
        io,
        shared,
        conn,
        fixed: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        selection: None,
    };
    loop {
        if let Some(outcome) = hs.option()? {
            return Ok(outcome);
        }
    }
}

impl<S: Read + Write> Handshake<'_, S> {
    /// Handles one option; `Some` when the handshake is over.
    fn option(&mut self) -> Result<Option<Outcome>, NbdError> {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        self.io.read_exact(&mut hdr)?;
        let hdr = OptionHeader::decode(&hdr);
        if hdr.magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "bad option magic 0x{:016x}",
                hdr.magic
            )));
        }
        let opt = hdr.option;
        log::trace!("nbd: option {} ({} bytes)", option_name(opt), hdr.length);
        if !self.fixed && opt != OPT_EXPORT_NAME {
            return Err(NbdError::Protocol(format!(
                "{} from a client without fixed newstyle",
                option_name(opt)
            )));
        }
        if hdr.length > MAX_OPTION_PAYLOAD {
            if opt == OPT_EXPORT_NAME {
                return Err(NbdError::Protocol(format!(
                    "export name of {} bytes",
                    hdr.length
                )));
            }
            discard(self.io, u64::from(hdr.length))?;
            self.error(
                opt,
                REP_ERR_TOO_BIG,
                &format!("option payload of {} bytes is too large", hdr.length),
            )?;
            return Ok(None);
        }
        let mut data = vec![0u8; hdr.length as usize];
        self.io.read_exact(&mut data)?;

        if opt != OPT_ABORT && self.shared.is_shutting_down() {
            if opt == OPT_EXPORT_NAME {
                return Err(NbdError::ShutDown);
            }
            self.error(opt, REP_ERR_SHUTDOWN, "server is shutting down")?;
            return Ok(None);
        }
        match opt {
            OPT_EXPORT_NAME => self.export_name(&data).map(Some),
            OPT_ABORT => {
                // The client may already be gone: a failed ACK changes nothing.
                let _ = self.reply(opt, REP_ACK, &[]);
                Ok(Some(Outcome::Aborted))
            }
            OPT_LIST => {
                self.list(&data)?;
                Ok(None)
            }
            OPT_STARTTLS => {
                self.error(opt, REP_ERR_POLICY, "TLS not configured")?;
                Ok(None)
            }
            OPT_INFO | OPT_GO => self.info(opt, &data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(
                        opt,
                        REP_ERR_INVALID,
                        "option 'NBD_OPT_STRUCTURED_REPLY' has unexpected length",
                    )?;
                } else if self.structured {
                    self.error(opt, REP_ERR_INVALID, "structured reply already negotiated")?;
                } else {
                    self.reply(opt, REP_ACK, &[])?;
                    self.structured = true;
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, &data)?;
                Ok(None)
            }
            OPT_EXTENDED_HEADERS => {
                self.error(opt, REP_ERR_UNSUP, "extended headers are not supported")?;
                Ok(None)
            }
            _ => {
                self.error(opt, REP_ERR_UNSUP, &format!("unsupported option {opt}"))?;
                Ok(None)
            }
        }
    }

    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
        self.io.write_all(&encode_option_reply(opt, kind, data))?;
        self.io.flush()?;
        Ok(())
    }

    fn error(&mut self, opt: u32, kind: u32, message: &str) -> Result<(), NbdError> {
        log::debug!("nbd: {} refused: {message}", option_name(opt));
        self.reply(opt, kind, truncate_str(message, MAX_STRING).as_bytes())
    }

    fn lease(&self, name: &[u8], client: bool) -> Option<Lease> {
        let client = client.then_some(self.conn);
        self.shared.lease(name, client)
    }

    /// `NBD_OPT_EXPORT_NAME`: no way to report an error but closing.
    fn export_name(&mut self, name: &[u8]) -> Result<Outcome, NbdError> {
        if name.len() > MAX_STRING {
            return Err(NbdError::Protocol("export name too long".into()));
        }
        let Some(lease) = self.lease(name, true) else {
            return Err(NbdError::Protocol(format!(
                "unknown export '{}'",
                String::from_utf8_lossy(name)
            )));
        };
        let export = lease.export();
        let flags = transmission_flags(export.read_only(), self.structured);
        let reply = encode_export_name_reply(export.size(), flags, self.no_zeroes);
        self.io.write_all(&reply)?;
        self.io.flush()?;
        Ok(self.enter(lease))
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`.
    fn info(&mut self, opt: u32, data: &[u8]) -> Result<Option<Outcome>, NbdError> {
        let req = match parse_info_request(data) {
            Ok(r) => r,
            Err(Malformed(m)) => {
                self.error(opt, REP_ERR_INVALID, &m)?;
                return Ok(None);
            }
        };
        let Some(lease) = self.lease(&req.name, opt == OPT_GO) else {
            let msg = format!(
                "export '{}' not present",
                String::from_utf8_lossy(&req.name)
            );
            self.error(opt, REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        };
        let export = lease.export();
        if req.requests.contains(&INFO_NAME) {
            self.reply(opt, REP_INFO, &encode_info_string(INFO_NAME, lease.name()))?;
        }
        if req.requests.contains(&INFO_DESCRIPTION) {
            if let Some(d) = export.description() {
                let d = truncate_str(&d, MAX_STRING);
                self.reply(opt, REP_INFO, &encode_info_string(INFO_DESCRIPTION, d))?;
            }
        }
        // Like QEMU, always announce the block sizes (minimum 1: any alignment works).
        let preferred = export
            .preferred_block_size()
            .clamp(1, MAX_IO)
            .checked_next_power_of_two()
            .unwrap_or(MAX_IO)
            .min(MAX_IO);
        self.reply(opt, REP_INFO, &encode_info_block_size(1, preferred, MAX_IO))?;
        let flags = transmission_flags(export.read_only(), self.structured);
        self.reply(opt, REP_INFO, &encode_info_export(export.size(), flags))?;
        self.reply(opt, REP_ACK, &[])?;
        if opt == OPT_GO {
            Ok(Some(self.enter(lease)))
        } else {
            Ok(None)
        }
    }

    /// Ends the handshake on `lease`: keeps the meta contexts only if they were set for
    /// the same export (the spec makes a selection for another export unusable).
    fn enter(&mut self, lease: Lease) -> Outcome {
        let contexts = match self.selection.take() {
            Some(sel) if sel.export == lease.name() && !sel.contexts.is_empty() => {
                // The export may have been replaced under the same name since: keep only
                // contexts it still offers.
                let now = meta::available(&lease.export().meta_contexts());
                sel.contexts
                    .into_iter()
                    .filter(|c| now.iter().any(|n| n.name == c.name))
                    .collect()
            }
            Some(sel) => {
                if !sel.contexts.is_empty() {
                    log::debug!(
                        "nbd: meta contexts were set for '{}', not '{}': dropped",
                        sel.export,
                        lease.name()
                    );
                }
                Vec::new()
            }
            None => Vec::new(),
        };
        Outcome::Transmission(Negotiated {
            lease,
            structured: self.structured,
            contexts,
        })
    }

    fn list(&mut self, data: &[u8]) -> Result<(), NbdError> {
        if !data.is_empty() {
            return self.error(
                OPT_LIST,
                REP_ERR_INVALID,
                "option 'NBD_OPT_LIST' has unexpected length",
            );
        }
        for name in self.shared.export_names() {
            // Removed meanwhile: leave it out.
            let Some(lease) = self.lease(name.as_bytes(), false) else {
                continue;
            };
            let desc = lease.export().description().unwrap_or_default();
            drop(lease);
            let desc = truncate_str(&desc, MAX_STRING);
            self.reply(OPT_LIST, REP_SERVER, &encode_rep_server(&name, desc))?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(&mut self, opt: u32, data: &[u8]) -> Result<(), NbdError> {
        if opt == OPT_SET_META_CONTEXT {
            // A new SET replaces the old selection, even if it fails.
            self.selection = None;
        }
        if !self.structured {
            let msg = format!(
                "request option '{}' when structured reply is not negotiated",
                option_name(opt)
            );
            return self.error(opt, REP_ERR_INVALID, &msg);
        }
        let req = match parse_meta_request(data) {
            Ok(r) => r,
            Err(Malformed(m)) => return self.error(opt, REP_ERR_INVALID, &m),
        };
        let Some(lease) = self.lease(&req.name, false) else {
            let msg = format!(
                "export '{}' not present",
                String::from_utf8_lossy(&req.name)
            );
            return self.error(opt, REP_ERR_UNKNOWN, &msg);
        };
        let all = meta::available(&lease.export().meta_contexts());
        let export = lease.name().to_string();
        drop(lease);
        let chosen = if opt == OPT_LIST_META_CONTEXT {
            meta::list(&all, req.query_count, &req.queries)
        } else {
            meta::select(&all, &req.queries)
        };
        for c in &chosen {
            // LIST replies carry id 0 (reserved), like QEMU.
            let id = if opt == OPT_SET_META_CONTEXT { c.id } else { 0 };
            self.reply(opt, REP_META_CONTEXT, &encode_rep_meta_context(id, &c.name))?;
        }
        self.reply(opt, REP_ACK, &[])?;
        if opt == OPT_SET_META_CONTEXT {
            self.selection = Some(Selection {
                export,
                contexts: chosen,
            });
        }
        Ok(())
    }
}
