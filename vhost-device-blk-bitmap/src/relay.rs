//! The frontend's vhost-user connection, carried to vhost-user-backend's request handler
//! message by message, except for what that crate cannot do yet.
//!
//! vhost-user-backend 0.24 answers `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD` with "not
//! supported" and keeps its request handler private, so the inflight messages are
//! answered here, between the frontend and the crate: everything else passes through
//! untouched (payload and file descriptors, in order), and the crate's replies pass back.
//! The relay also tells the queue workers when a ring gets its kick descriptor, which is
//! when a restarted ring looks for requests to resubmit.
//!
//! This module can go once the crate lets a backend handle the inflight messages (the
//! handler hook proposed in rust-vmm/vhost-user-backend#20): the two answers below
//! would move into that hook and the server would hand the frontend's socket to the
//! crate directly.

use std::fs::File;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight::{self, InflightLog, InflightRegion};

/// Bytes of a message header: request, flags, payload size.
const HEADER: usize = 12;
/// Largest payload (vhost's limit for the messages it accepts).
const MAX_PAYLOAD: usize = vhost::vhost_user::message::MAX_MSG_SIZE;
/// Most descriptors one message may carry.
const MAX_FDS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_KICK: u32 = 12;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
/// In a SET_VRING_KICK/CALL payload: no descriptor comes with the message.
const VRING_NOFD: u64 = 0x100;

/// One vhost-user message with its descriptors.
#[derive(Debug)]
pub struct Message {
    /// Request code.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Descriptors that came with it (owned).
    pub fds: Vec<File>,
}

/// Reads into `buf` completely, collecting the descriptors that arrive with it;
/// `Ok(false)` on end of stream before the first byte.
fn recv_exact(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<File>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec points into `buf`, which we may write arbitrary bytes to.
        let (n, nfds) = match unsafe { stream.recv_with_fds(&mut iov, &mut raw) } {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for &fd in &raw[..nfds] {
            // SAFETY: the kernel just installed these descriptors for us; nobody else
            // owns them.
            fds.push(unsafe { File::from_raw_fd(fd) });
        }
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

impl Message {
    /// Reads one message; `None` when the peer closed the connection between messages.
    pub fn recv(stream: &UnixStream) -> io::Result<Option<Message>> {
        let mut fds = Vec::new();
        let mut hdr = [0u8; HEADER];
        if !recv_exact(stream, &mut hdr, &mut fds)? {
            return Ok(None);
        }
        let word = |i: usize| u32::from_le_bytes(hdr[4 * i..4 * i + 4].try_into().unwrap());
        let (request, flags, size) = (word(0), word(1), word(2) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message {request} of {size} bytes (at most {MAX_PAYLOAD})"),
            ));
        }
        let mut payload = vec![0u8; size];
        if size > 0 && !recv_exact(stream, &mut payload, &mut fds)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(Some(Message {
            request,
            flags,
            payload,
            fds,
        }))
    }

    /// Writes the message with its descriptors.
    pub fn send(&self, stream: &UnixStream) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(HEADER + self.payload.len());
        bytes.extend_from_slice(&self.request.to_le_bytes());
        bytes.extend_from_slice(&self.flags.to_le_bytes());
        bytes.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&self.payload);
        let fds: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = loop {
            match stream.send_with_fds(&[&bytes[..]], &fds) {
                Ok(n) => break n,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        };
        // A stream socket may take less; the rest goes without descriptors.
        (&*stream).write_all(&bytes[sent..])
    }

    /// A reply to `request` with `payload`.
    fn reply(request: u32, payload: &[u8], fds: Vec<File>) -> Message {
        Message {
            request,
            flags: FLAG_VERSION | FLAG_REPLY,
            payload: payload.to_vec(),
            fds,
        }
    }

    /// The payload's first little-endian u64.
    fn u64_payload(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.payload.get(..8)?.try_into().ok()?))
    }
}

/// What the relay needs to know of the device.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Queues of the device.
    pub num_queues: u16,
}

/// The two threads carrying one connection.
#[derive(Debug)]
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts carrying messages between `frontend` and `backend` (the crate's end).
    /// When either side closes, the other is shut down.
    pub fn start(
        frontend: UnixStream,
        backend: UnixStream,
        inflight: Arc<InflightLog>,
        config: RelayConfig,
    ) -> io::Result<Relay> {
        let front_out = Arc::new(Mutex::new(frontend.try_clone()?));
        let protocol = Arc::new(AtomicU64::new(0));
        let back_in = backend.try_clone()?;
        let front_for_replies = front_out.clone();
        let front_for_close = frontend.try_clone()?;
        let inbound = std::thread::Builder::new()
            .name("vhost-relay-in".into())
            .spawn(move || {
                let mut h = Inbound {
                    frontend_out: front_for_replies,
                    protocol,
                    inflight,
                    config,
                };
                if let Err(e) = h.run(&frontend, &backend) {
                    debug!("relay: frontend side ended: {e}");
                }
                let _ = backend.shutdown(Shutdown::Both);
            })?;
        let outbound = std::thread::Builder::new()
            .name("vhost-relay-out".into())
            .spawn(move || {
                loop {
                    match Message::recv(&back_in) {
                        Ok(Some(m)) => {
                            let out = front_out.lock().unwrap_or_else(|p| p.into_inner());
                            if let Err(e) = m.send(&out) {
                                debug!("relay: sending to the frontend: {e}");
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            debug!("relay: backend side ended: {e}");
                            break;
                        }
                    }
                }
                let _ = front_for_close.shutdown(Shutdown::Both);
            })?;
        Ok(Relay {
            threads: vec![inbound, outbound],
        })
    }

    /// Waits until both directions ended.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The frontend-to-backend direction.
struct Inbound {
    frontend_out: Arc<Mutex<UnixStream>>,
    /// Protocol features the frontend acked.
    protocol: Arc<AtomicU64>,
    inflight: Arc<InflightLog>,
    config: RelayConfig,
}

impl Inbound {
    fn run(&mut self, frontend: &UnixStream, backend: &UnixStream) -> io::Result<()> {
        while let Some(m) = Message::recv(frontend)? {
            match m.request {
                GET_INFLIGHT_FD => self.get_inflight_fd(&m)?,
                SET_INFLIGHT_FD => self.set_inflight_fd(m)?,
                SET_PROTOCOL_FEATURES => {
                    if let Some(v) = m.u64_payload() {
                        self.protocol.store(v, Ordering::Relaxed);
                    }
                    m.send(backend)?;
                }
                SET_VRING_KICK => self.set_vring_kick(m, backend)?,
                _ => m.send(backend)?,
            }
        }
        Ok(())
    }

    fn send_to_frontend(&self, m: &Message) -> io::Result<()> {
        m.send(&self.frontend_out.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn inflight_payload(m: &Message) -> Option<VhostUserInflight> {
        let size = std::mem::size_of::<VhostUserInflight>();
        VhostUserInflight::from_slice(m.payload.get(..size)?).copied()
    }

    /// A new zeroed region for the layout asked for; an empty answer (size 0, no
    /// descriptor), which frontends take as "no inflight tracking", when it is refused.
    fn get_inflight_fd(&mut self, m: &Message) -> io::Result<()> {
        let asked = Self::inflight_payload(m).unwrap_or_default();
        let made = inflight::create(asked.num_queues, asked.queue_size, self.config.num_queues);
        let (answer, fds) = match made {
            Ok((file, size)) => {
                info!(
                    "inflight region created: {} queue(s) of {} descriptors, {size} bytes",
                    asked.num_queues, asked.queue_size
                );
                (
                    VhostUserInflight::new(size, 0, asked.num_queues, asked.queue_size),
                    vec![file],
                )
            }
            Err(e) => {
                warn!("GET_INFLIGHT_FD refused: {e}");
                (
                    VhostUserInflight::new(0, 0, asked.num_queues, asked.queue_size),
                    Vec::new(),
                )
            }
        };
        self.send_to_frontend(&Message::reply(GET_INFLIGHT_FD, answer.as_slice(), fds))
    }

    /// Maps the region the frontend hands back (the one from an earlier GET, possibly to
    /// an earlier instance of this daemon); a refused one leaves the connection without
    /// inflight tracking.
    fn set_inflight_fd(&mut self, m: Message) -> io::Result<()> {
        let result = match (Self::inflight_payload(&m), m.fds.first()) {
            (Some(p), _) if p.mmap_size == 0 => {
                self.inflight.set_region(None);
                Ok(())
            }
            (Some(p), Some(file)) => InflightRegion::map(
                file,
                p.mmap_size,
                p.mmap_offset,
                p.num_queues,
                p.queue_size,
                self.config.num_queues,
            )
            .map(|r| {
                info!(
                    "inflight region set: {} queue(s) of {} descriptors",
                    p.num_queues, p.queue_size
                );
                self.inflight.set_region(Some(r));
            })
            .map_err(|e| e.to_string()),
            (None, _) => Err("payload too short".to_string()),
            (Some(_), None) => Err("no file descriptor".to_string()),
        };
        if let Err(e) = &result {
            warn!("SET_INFLIGHT_FD refused ({e}): requests in flight at a crash cannot be resubmitted");
        }
        let reply_ack = self.protocol.load(Ordering::Relaxed)
            & VhostUserProtocolFeatures::REPLY_ACK.bits()
            != 0;
        if reply_ack && m.flags & FLAG_NEED_REPLY != 0 {
            let code = u64::from(result.is_err());
            self.send_to_frontend(&Message::reply(
                SET_INFLIGHT_FD,
                &code.to_le_bytes(),
                Vec::new(),
            ))?;
        }
        Ok(())
    }

    /// Forwards the kick descriptor and tells the queue's worker that its ring starts.
    /// With a region, the ring is also kicked once, so the worker looks for requests to
    /// resubmit even if the guest has nothing new to say.
    fn set_vring_kick(&mut self, m: Message, backend: &UnixStream) -> io::Result<()> {
        let arg = m.u64_payload().unwrap_or(VRING_NOFD);
        let q = (arg & 0xff) as usize;
        self.inflight.ring_started(q);
        let kick = if arg & VRING_NOFD == 0 && self.inflight.has_region() {
            m.fds.first().and_then(|f| f.try_clone().ok())
        } else {
            None
        };
        m.send(backend)?;
        if let Some(mut fd) = kick {
            // An eventfd counter: readable from now on, so the worker runs once the
            // crate watches the descriptor.
            let _ = fd.write_all(&1u64.to_ne_bytes());
        }
        Ok(())
    }
}

/// Reads `n` bytes or less from `r` (test helper for the message framing).
#[cfg(test)]
fn read_some(r: &mut impl std::io::Read, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    let got = r.read(&mut b).unwrap();
    b.truncate(got);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn msg(request: u32, flags: u32, payload: &[u8], fds: Vec<File>) -> Message {
        Message {
            request,
            flags,
            payload: payload.to_vec(),
            fds,
        }
    }

    /// A relay between a test frontend and a test backend end.
    fn relay(queues: u16) -> (UnixStream, UnixStream, Arc<InflightLog>, Relay) {
        let (front, front_peer) = UnixStream::pair().unwrap();
        let (back, back_peer) = UnixStream::pair().unwrap();
        let log = Arc::new(InflightLog::new(usize::from(queues)));
        let r = Relay::start(
            front_peer,
            back,
            log.clone(),
            RelayConfig { num_queues: queues },
        )
        .unwrap();
        (front, back_peer, log, r)
    }

    #[test]
    fn messages_and_descriptors_pass_both_ways_untouched() {
        let (front, back, _log, r) = relay(1);
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(b"shared", 0).unwrap();
        msg(5, FLAG_VERSION | FLAG_NEED_REPLY, &[1, 2, 3], vec![f])
            .send(&front)
            .unwrap();
        let got = Message::recv(&back).unwrap().unwrap();
        assert_eq!(
            (got.request, got.flags, &got.payload[..]),
            (5, 9, &[1u8, 2, 3][..])
        );
        let mut b = [0u8; 6];
        got.fds[0].read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"shared");
        msg(
            5,
            FLAG_VERSION | FLAG_REPLY,
            &0u64.to_le_bytes(),
            Vec::new(),
        )
        .send(&back)
        .unwrap();
        let reply = Message::recv(&front).unwrap().unwrap();
        assert_eq!((reply.request, reply.flags), (5, 5));
        // The frontend leaves: the backend side is shut down, and the relay ends.
        drop(front);
        assert!(Message::recv(&back).unwrap().is_none());
        r.join();
    }

    #[test]
    fn the_backend_closing_closes_the_frontend() {
        let (mut front, back, _log, r) = relay(1);
        back.shutdown(Shutdown::Both).unwrap();
        assert!(read_some(&mut front, 12).is_empty());
        r.join();
    }

    #[test]
    fn oversized_messages_end_the_connection() {
        let (mut front, back, _log, r) = relay(1);
        let mut hdr = Vec::new();
        for w in [1u32, 1, 0x10_0000] {
            hdr.extend_from_slice(&w.to_le_bytes());
        }
        front.write_all(&hdr).unwrap();
        assert!(Message::recv(&back).unwrap().is_none());
        assert!(read_some(&mut front, 12).is_empty());
        r.join();
    }

    #[test]
    fn inflight_fds_are_answered_here_and_installed() {
        let (front, back, log, r) = relay(2);
        // REPLY_ACK acked (and passed on).
        let acked =
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        msg(
            SET_PROTOCOL_FEATURES,
            FLAG_VERSION,
            &acked.bits().to_le_bytes(),
            Vec::new(),
        )
        .send(&front)
        .unwrap();
        assert_eq!(
            Message::recv(&back).unwrap().unwrap().request,
            SET_PROTOCOL_FEATURES
        );
        let ask = VhostUserInflight::new(0, 0, 2, 256);
        msg(GET_INFLIGHT_FD, FLAG_VERSION, ask.as_slice(), Vec::new())
            .send(&front)
            .unwrap();
        let got = Message::recv(&front).unwrap().unwrap();
        assert_eq!(
            (got.request, got.flags),
            (GET_INFLIGHT_FD, FLAG_VERSION | FLAG_REPLY)
        );
        let desc = *VhostUserInflight::from_slice(&got.payload).unwrap();
        assert_eq!({ desc.mmap_size }, 2 * inflight::queue_stride(256) as u64);
        assert_eq!((desc.num_queues, desc.queue_size), (2, 256));
        assert_eq!(got.fds.len(), 1);
        assert!(!log.has_region());
        msg(
            SET_INFLIGHT_FD,
            FLAG_VERSION | FLAG_NEED_REPLY,
            desc.as_slice(),
            got.fds,
        )
        .send(&front)
        .unwrap();
        let ack = Message::recv(&front).unwrap().unwrap();
        assert_eq!((ack.request, ack.u64_payload()), (SET_INFLIGHT_FD, Some(0)));
        assert!(log.has_region());
        // Too many queues: an empty answer, no descriptor.
        let ask = VhostUserInflight::new(0, 0, 3, 256);
        msg(GET_INFLIGHT_FD, FLAG_VERSION, ask.as_slice(), Vec::new())
            .send(&front)
            .unwrap();
        let got = Message::recv(&front).unwrap().unwrap();
        let desc = *VhostUserInflight::from_slice(&got.payload).unwrap();
        assert_eq!(({ desc.mmap_size }, got.fds.len()), (0, 0));
        // A region that is not ours (unsealed): refused with a failure ack.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(1 << 16).unwrap();
        let bad = VhostUserInflight::new(1 << 16, 0, 1, 256);
        msg(
            SET_INFLIGHT_FD,
            FLAG_VERSION | FLAG_NEED_REPLY,
            bad.as_slice(),
            vec![plain],
        )
        .send(&front)
        .unwrap();
        let ack = Message::recv(&front).unwrap().unwrap();
        assert_eq!(ack.u64_payload(), Some(1));
        // None of it reached the backend.
        drop(front);
        assert!(Message::recv(&back).unwrap().is_none());
        r.join();
    }

    #[test]
    fn a_kick_descriptor_starts_the_ring_and_is_kicked_with_a_region() {
        let (front, back, log, r) = relay(1);
        let (file, len) = inflight::create(1, 8, 1).unwrap();
        let desc = VhostUserInflight::new(len, 0, 1, 8);
        msg(SET_INFLIGHT_FD, FLAG_VERSION, desc.as_slice(), vec![file])
            .send(&front)
            .unwrap();
        let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: dup of a descriptor we own; the File owns the copy.
        let dup = unsafe { File::from_raw_fd(libc::dup(kick.as_raw_fd())) };
        msg(SET_VRING_KICK, FLAG_VERSION, &0u64.to_le_bytes(), vec![dup])
            .send(&front)
            .unwrap();
        let got = Message::recv(&back).unwrap().unwrap();
        assert_eq!((got.request, got.fds.len()), (SET_VRING_KICK, 1));
        assert!(matches!(log.take_start(0), Some(Some(_))));
        // The relay wrote once the message was passed on.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if let Ok(v) = kick.read() {
                assert_eq!(v, 1);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never kicked");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(front);
        r.join();
    }
}
