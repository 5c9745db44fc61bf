//! Shared test fixtures: a sparse in-memory export with a fake dirty bitmap, a raw NBD
//! client written independently of the crate's encoders, and helpers for external tools.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nbd::{Export, Extent, Server, ServerOptions, ALLOCATION_DEPTH, BASE_ALLOCATION};

/// Allocation unit and bitmap granularity of [`MemExport`].
pub const CHUNK: u64 = 64 << 10;

/// A sparse in-memory disk: 64 KiB chunks allocated on write; unallocated ones read as
/// zeroes. Offers `qemu:allocation-depth` (1 = allocated) and the dirty bitmaps in
/// `bitmaps` (64 KiB granularity, marked by the test). Optional read delay with entry/exit
/// accounting, to prove when reads run.
pub struct MemExport {
    size: u64,
    read_only: bool,
    chunks: RwLock<HashMap<u64, Vec<u8>>>,
    pub bitmaps: Vec<(String, Mutex<BTreeSet<u64>>)>,
    pub read_delay: Mutex<Duration>,
    pub reads_in_flight: AtomicUsize,
    pub reads_started: AtomicUsize,
    pub reads_finished: AtomicUsize,
    pub calls: AtomicUsize,
    pub flushes: AtomicUsize,
    pub description: Option<String>,
}

impl MemExport {
    pub fn new(size: u64, read_only: bool, bitmaps: &[&str]) -> MemExport {
        MemExport {
            size,
            read_only,
            chunks: RwLock::new(HashMap::new()),
            bitmaps: bitmaps
                .iter()
                .map(|b| (b.to_string(), Mutex::new(BTreeSet::new())))
                .collect(),
            read_delay: Mutex::new(Duration::ZERO),
            reads_in_flight: AtomicUsize::new(0),
            reads_started: AtomicUsize::new(0),
            reads_finished: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            description: Some("in-memory test disk".to_string()),
        }
    }

    /// Marks the granules of `[offset, offset + len)` dirty in bitmap `name`.
    pub fn mark(&self, name: &str, offset: u64, len: u64) {
        let set = &self.bitmaps.iter().find(|(n, _)| n == name).unwrap().1;
        let mut set = set.lock().unwrap();
        for g in offset / CHUNK..(offset + len).div_ceil(CHUNK) {
            set.insert(g);
        }
    }

    /// Writes directly (bypassing NBD), allocating.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        self.write_inner(offset, data);
    }

    /// Reads directly (bypassing NBD).
    pub fn get(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.read_inner(offset, &mut buf);
        buf
    }

    pub fn allocated(&self) -> BTreeSet<u64> {
        self.chunks.read().unwrap().keys().copied().collect()
    }

    fn read_inner(&self, offset: u64, buf: &mut [u8]) {
        let chunks = self.chunks.read().unwrap();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(buf.len() - done);
            match chunks.get(&idx) {
                Some(c) => buf[done..done + n].copy_from_slice(&c[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write_inner(&self, offset: u64, data: &[u8]) {
        let mut chunks = self.chunks.write().unwrap();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let idx = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(data.len() - done);
            let c = chunks
                .entry(idx)
                .or_insert_with(|| vec![0u8; CHUNK as usize]);
            c[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Zeroes a range: whole chunks are deallocated when `dealloc`, partial ones zeroed.
    fn zero_inner(&self, offset: u64, len: u64, dealloc: bool) {
        let mut chunks = self.chunks.write().unwrap();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / CHUNK;
            let cstart = idx * CHUNK;
            let cend = (cstart + CHUNK).min(end);
            let whole = pos == cstart && cend == cstart + CHUNK;
            if whole && dealloc {
                chunks.remove(&idx);
            } else if let Some(c) = chunks.get_mut(&idx) {
                c[(pos - cstart) as usize..(cend - cstart) as usize].fill(0);
            } else if !dealloc {
                let mut c = vec![0u8; CHUNK as usize];
                c[(pos - cstart) as usize..(cend - cstart) as usize].fill(0);
                chunks.insert(idx, c);
            }
            pos = cend;
        }
    }

    fn check(&self, offset: u64, len: u64) {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.size),
            "export called past its end: {offset}+{len}"
        );
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> Option<String> {
        self.description.clone()
    }

    fn preferred_block_size(&self) -> u32 {
        4096
    }

    fn meta_contexts(&self) -> Vec<String> {
        let mut v = vec![ALLOCATION_DEPTH.to_string()];
        v.extend(
            self.bitmaps
                .iter()
                .map(|(n, _)| format!("qemu:dirty-bitmap:{n}")),
        );
        v
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.check(offset, buf.len() as u64);
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        self.reads_in_flight.fetch_add(1, Ordering::SeqCst);
        let delay = *self.read_delay.lock().unwrap();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        self.read_inner(offset, buf);
        self.reads_in_flight.fetch_sub(1, Ordering::SeqCst);
        self.reads_finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert!(!self.read_only, "write on a read-only export");
        self.check(offset, data.len() as u64);
        self.write_inner(offset, data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, _fua: bool) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert!(!self.read_only, "write zeroes on a read-only export");
        self.check(offset, len);
        self.zero_inner(offset, len, may_trim);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert!(!self.read_only, "trim on a read-only export");
        self.check(offset, len);
        self.zero_inner(offset, len, true);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.check(offset, len);
        let chunks = self.chunks.read().unwrap();
        let bitmap = context.strip_prefix("qemu:dirty-bitmap:").map(|n| {
            self.bitmaps
                .iter()
                .find(|(b, _)| b == n)
                .unwrap()
                .1
                .lock()
                .unwrap()
        });
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = pos / CHUNK;
            // Extents end on chunk boundaries: the last one may run past the request.
            let cend = ((idx + 1) * CHUNK).min(self.size);
            let flags = match context {
                BASE_ALLOCATION => {
                    if chunks.contains_key(&idx) {
                        0
                    } else {
                        3
                    }
                }
                ALLOCATION_DEPTH => u32::from(chunks.contains_key(&idx)),
                _ => u32::from(bitmap.as_ref().unwrap().contains(&idx)),
            };
            let length = cend - pos;
            let full = out.len() == max_extents;
            match out.last_mut() {
                Some(l) if l.flags == flags => l.length += length,
                _ if full => break,
                _ => out.push(Extent { length, flags }),
            }
            pos = cend;
        }
        Ok(out)
    }
}

/// A server with exports, listening on a unix socket in a tempdir and on 127.0.0.1.
pub struct Fixture {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub tcp: SocketAddr,
}

impl Fixture {
    pub fn new(options: ServerOptions, exports: &[(&str, Arc<dyn Export>)]) -> Fixture {
        let _ = env_logger::builder().is_test(true).try_init();
        let server = Server::new(options);
        for (name, e) in exports {
            server.add_export(name, e.clone()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        server
            .serve_unix(UnixListener::bind(&sock).unwrap())
            .unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        server.serve_tcp(tcp).unwrap();
        Fixture {
            server,
            dir,
            sock,
            tcp: addr,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    pub fn client(&self) -> Client {
        Client::unix(&self.sock)
    }

    /// Waits until `cond` holds (polling), panicking after `secs`.
    pub fn wait_for(&self, what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
        wait_for(what, secs, &mut cond)
    }
}

pub fn wait_for(what: &str, secs: u64, cond: &mut dyn FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- raw client -------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const ERR_UNSUP: u32 = 0x8000_0001;
pub const ERR_POLICY: u32 = 0x8000_0002;
pub const ERR_INVALID: u32 = 0x8000_0003;
pub const ERR_UNKNOWN: u32 = 0x8000_0006;
pub const ERR_TOO_BIG: u32 = 0x8000_0009;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

pub enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One structured chunk or simple reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

/// A raw, deliberately simple NBD client (own encoding, no crate helpers).
pub struct Client {
    pub s: Sock,
}

impl Client {
    pub fn unix(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client { s: Sock::Unix(s) }
    }

    pub fn tcp(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client { s: Sock::Tcp(s) }
    }

    /// Reads the greeting and sends the client flags (fixed newstyle + no zeroes).
    pub fn greet(mut self) -> Client {
        self.greet_with(3);
        self
    }

    pub fn greet_with(&mut self, flags: u32) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        self.s.write_all(&flags.to_be_bytes()).unwrap();
    }

    pub fn send_opt(&mut self, option: u32, data: &[u8]) {
        self.send_opt_len(option, data.len() as u32, data);
    }

    /// An option whose header claims `len` bytes, followed by `data`.
    pub fn send_opt_len(&mut self, option: u32, len: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    pub fn read_opt_reply(&mut self) -> io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9,
            "option reply magic"
        );
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data)?;
        Ok(OptReply { option, kind, data })
    }

    /// Sends an option and reads replies up to the final one (ACK or error).
    pub fn opt(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_opt(option, data);
        self.replies_until_final(option)
    }

    pub fn replies_until_final(&mut self, option: u32) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply().unwrap();
            assert_eq!(r.option, option, "reply for another option: {r:?}");
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// The final reply type of an option.
    pub fn opt_final(&mut self, option: u32, data: &[u8]) -> u32 {
        self.opt(option, data).last().unwrap().kind
    }

    pub fn structured(&mut self) {
        assert_eq!(self.opt_final(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    }

    /// SET_META_CONTEXT; returns `(id, name)` of the selected contexts.
    pub fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let r = self.opt(OPT_SET_META_CONTEXT, &meta_payload(export, queries));
        assert_eq!(r.last().unwrap().kind, REP_ACK, "{r:?}");
        contexts_of(&r)
    }

    /// GO with no info requests; returns `(size, flags)`.
    pub fn go(&mut self, export: &str) -> (u64, u16) {
        let r = self.opt(OPT_GO, &info_payload(export, &[]));
        assert_eq!(r.last().unwrap().kind, REP_ACK, "GO failed: {r:?}");
        export_info(&r).expect("INFO_EXPORT sent")
    }

    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        self.s
            .write_all(&request_bytes(flags, cmd, cookie, offset, len))
            .unwrap();
    }

    pub fn write_req(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut b = request_bytes(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads a simple reply header.
    pub fn simple(&mut self) -> io::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
        Ok((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    /// Reads one message in structured mode (a simple reply or a chunk).
    pub fn reply(&mut self) -> io::Result<Reply> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        match u32::from_be_bytes(m) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h)?;
                Ok(Reply::Simple {
                    error: u32::from_be_bytes(h[..4].try_into().unwrap()),
                    cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                })
            }
            0x668e_33ef => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h)?;
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload)?;
                Ok(Reply::Chunk {
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    kind: u16::from_be_bytes([h[2], h[3]]),
                    cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                    payload,
                })
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads messages until one is final (simple reply or chunk with DONE).
    pub fn reply_chunks(&mut self) -> Vec<Reply> {
        let mut v = Vec::new();
        loop {
            let r = self.reply().unwrap();
            let done = match &r {
                Reply::Simple { .. } => true,
                Reply::Chunk { flags, .. } => flags & 1 != 0,
            };
            v.push(r);
            if done {
                return v;
            }
        }
    }

    /// Whether the server closed the connection (EOF or reset) within 10 s.
    pub fn closed(&mut self) -> bool {
        match &self.s {
            Sock::Unix(s) => s.set_read_timeout(Some(Duration::from_secs(10))).unwrap(),
            Sock::Tcp(s) => s.set_read_timeout(Some(Duration::from_secs(10))).unwrap(),
        }
        let mut b = [0u8; 1];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return false,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    }
}

pub fn request_bytes(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

pub fn info_payload(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = (export.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

pub fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = (export.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

pub fn contexts_of(replies: &[OptReply]) -> Vec<(u32, String)> {
    replies
        .iter()
        .filter(|r| r.kind == REP_META_CONTEXT)
        .map(|r| {
            (
                u32::from_be_bytes(r.data[..4].try_into().unwrap()),
                String::from_utf8(r.data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

/// `(size, flags)` from the NBD_INFO_EXPORT reply.
pub fn export_info(replies: &[OptReply]) -> Option<(u64, u16)> {
    replies
        .iter()
        .find(|r| r.kind == REP_INFO && r.data[..2] == [0, 0])
        .map(|r| {
            assert_eq!(r.data.len(), 12);
            (
                u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
                u16::from_be_bytes([r.data[10], r.data[11]]),
            )
        })
}

/// Decodes a BLOCK_STATUS chunk payload: `(context id, [(length, flags)])`.
pub fn extents_of(payload: &[u8]) -> (u32, Vec<(u32, u32)>) {
    assert_eq!((payload.len() - 4) % 8, 0);
    let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
    let ext = payload[4..]
        .chunks(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..8].try_into().unwrap()),
            )
        })
        .collect();
    (id, ext)
}

/// The error code of an ERROR chunk payload.
pub fn chunk_error(payload: &[u8]) -> (u32, String) {
    let err = u32::from_be_bytes(payload[..4].try_into().unwrap());
    let len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    (
        err,
        String::from_utf8(payload[6..6 + len].to_vec()).unwrap(),
    )
}

// ---- external tools -----------------------------------------------------------------

/// Whether `tool` runs; if not: panics under `CI=true` (naming the Debian package),
/// else prints a skip note and returns false.
pub fn have_tool(tool: &str, package: &str) -> bool {
    let ok = tool_command(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{tool} is missing: install the Debian package {package}");
    }
    eprintln!("SKIP: {tool} not found (Debian package {package})");
    false
}

/// A command for `tool` with `/usr/bin` first in `PATH`: `nbdsh` runs `python3 -m nbd`,
/// and the python3 found first (e.g. a pyenv one) may not have the `nbd` module.
pub fn tool_command(tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("/usr/bin:{path}"));
    cmd
}

/// Whether `/usr/bin/python3` can `import nbd` (same policy as [`have_tool`]).
pub fn have_python_nbd() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("/usr/bin/python3 cannot import nbd: install the Debian package python3-libnbd");
    }
    eprintln!("SKIP: python3-libnbd not found (Debian package python3-libnbd)");
    false
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
