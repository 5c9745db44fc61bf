//! Running the transmission phase of a connection: the request reader, the per-client
//! worker pool and the reply writer.
//!
//! One reader (the connection's thread) parses requests and reads WRITE payloads; valid
//! requests go to at most `workers` worker threads (started on demand), so at most
//! `workers` requests (each at most 32 MiB) are in flight. Every reply is written whole
//! under one mutex, so chunks of different replies never interleave; replies go out in
//! completion order.

use std::io::{self, BufReader, Read, Write};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

use crate::handshake::Negotiated;
use crate::proto::{Request, REQUEST_LEN, REQUEST_MAGIC};
use crate::socket::{SockWriter, Stream};
pub(crate) use crate::transmission::Session;
use crate::transmission::{check, execute, Payload, Verdict};
use crate::NbdError;

impl Session {
    /// The transmission state after a successful handshake.
    pub fn new(n: Negotiated) -> Session {
        let export = n.lease.export();
        Session {
            size: export.size(),
            read_only: export.read_only(),
            structured: n.structured,
            contexts: n.contexts,
            lease: n.lease,
        }
    }
}

/// The two halves of a socket during the handshake.
pub(crate) struct SocketIo {
    pub reader: BufReader<Stream>,
    pub writer: SockWriter,
}

impl Read for SocketIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for SocketIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// Serializes replies of one connection. After the first write error the connection is
/// dead: its socket is shut down (so the reader stops) and later replies are dropped.
pub(crate) struct ReplyWriter {
    out: Mutex<Box<dyn Write + Send>>,
    /// Shared with the server's registry, which sets it when it disconnects the client.
    dead: Arc<AtomicBool>,
    closer: Option<Stream>,
}

impl ReplyWriter {
    pub fn new(
        out: Box<dyn Write + Send>,
        closer: Option<Stream>,
        dead: Arc<AtomicBool>,
    ) -> ReplyWriter {
        ReplyWriter {
            out: Mutex::new(out),
            dead,
            closer,
        }
    }

    /// Writes one whole reply.
    pub fn send(&self, reply: &[u8]) {
        if self.is_dead() {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = out.write_all(reply).and_then(|()| out.flush()) {
            log::debug!("nbd: cannot send a reply: {e}");
            self.kill();
        }
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Marks the connection dead and shuts its socket down.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Some(c) = &self.closer {
            c.shutdown();
        }
    }
}

/// Reads one request header; `None` on EOF before its first byte.
pub(crate) fn read_request<R: Read>(r: &mut R) -> io::Result<Option<Request>> {
    let mut buf = [0u8; REQUEST_LEN];
    let mut got = 0;
    while got < REQUEST_LEN {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(Request::decode(&buf)))
}

/// Reads and drops `len` bytes.
pub(crate) fn discard<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let n = io::copy(&mut r.take(len), &mut io::sink())?;
    if n < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn read_payload<R: Read>(r: &mut R, len: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// What the reader does after a request header.
enum Step {
    /// Read the payload if any and run the request.
    Run,
    /// Send this reply, then go on.
    Reply(Vec<u8>),
    /// Stop; with a reply to send first.
    Stop(Option<Vec<u8>>, Result<(), NbdError>),
}

/// Decides on a request header, consuming a rejected WRITE's payload.
fn step<R: Read>(r: &mut R, s: &Session, req: &Request) -> Result<Step, NbdError> {
    if req.magic != REQUEST_MAGIC {
        return Ok(Step::Stop(
            None,
            Err(NbdError::Protocol(format!(
                "bad request magic 0x{:08x}",
                req.magic
            ))),
        ));
    }
    Ok(match check(s, req) {
        Verdict::Disconnect => Step::Stop(None, Ok(())),
        Verdict::Execute => Step::Run,
        Verdict::Reject {
            error,
            message,
            payload,
        } => {
            log::debug!("nbd: rejecting request: {message}");
            let reply = s.error_reply(req.cookie, error, &message);
            match payload {
                Payload::None => Step::Reply(reply),
                Payload::Discard => {
                    discard(r, u64::from(req.length))?;
                    Step::Reply(reply)
                }
                Payload::Close => Step::Stop(
                    Some(reply),
                    Err(NbdError::Protocol(format!(
                        "write payload of {} bytes is too large",
                        req.length
                    ))),
                ),
            }
        }
    })
}

/// Serves requests one at a time on a single stream (no threads): for
/// [`crate::serve_stream`].
pub(crate) fn run_inline<S: Read + Write>(io: &mut S, s: &Session) -> Result<(), NbdError> {
    loop {
        let Some(req) = read_request(io)? else {
            return Ok(());
        };
        match step(io, s, &req)? {
            Step::Run => {
                let payload = if req.command == crate::proto::CMD_WRITE {
                    read_payload(io, req.length)?
                } else {
                    Vec::new()
                };
                io.write_all(&execute(s, &req, payload))?;
            }
            Step::Reply(reply) => io.write_all(&reply)?,
            Step::Stop(reply, result) => {
                if let Some(reply) = reply {
                    io.write_all(&reply)?;
                }
                io.flush()?;
                return result;
            }
        }
        io.flush()?;
    }
}

/// Serves requests with up to `workers` concurrent workers, until DISC, EOF, an error or
/// the death of the writer; then waits for the requests in flight (their replies are
/// still sent if the connection is alive).
pub(crate) fn run_threaded<R: Read>(
    reader: &mut R,
    writer: Arc<ReplyWriter>,
    session: Arc<Session>,
    workers: usize,
) -> Result<(), NbdError> {
    let mut pool = Pool::new(session.clone(), writer.clone(), workers);
    let result = reader_loop(reader, &writer, &session, &mut pool);
    if result.is_err() {
        // A broken client: drop requests not started yet.
        writer.kill();
    }
    pool.finish();
    result
}

fn reader_loop<R: Read>(
    reader: &mut R,
    writer: &ReplyWriter,
    s: &Session,
    pool: &mut Pool,
) -> Result<(), NbdError> {
    loop {
        if writer.is_dead() {
            return Ok(());
        }
        let req = match read_request(reader) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) if writer.is_dead() => {
                log::debug!("nbd: reader stopped: {e}");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match step(reader, s, &req)? {
            Step::Run => {
                pool.slots.acquire();
                let payload = if req.command == crate::proto::CMD_WRITE {
                    match read_payload(reader, req.length) {
                        Ok(p) => p,
                        Err(e) => {
                            pool.slots.release();
                            return Err(e.into());
                        }
                    }
                } else {
                    Vec::new()
                };
                pool.submit(Job { req, payload });
            }
            Step::Reply(reply) => writer.send(&reply),
            Step::Stop(reply, result) => {
                if let Some(reply) = reply {
                    writer.send(&reply);
                }
                return result;
            }
        }
    }
}

/// A counting semaphore bounding the requests in flight.
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Slots {
    fn acquire(&self) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= self.max {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
    }

    fn release(&self) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= 1;
        self.freed.notify_one();
    }
}

struct Job {
    req: Request,
    payload: Vec<u8>,
}

/// Worker threads of one connection, started when no worker is idle, at most `max`.
struct Pool {
    tx: Option<SyncSender<Job>>,
    rx: Arc<Mutex<Receiver<Job>>>,
    handles: Vec<JoinHandle<()>>,
    idle: Arc<AtomicUsize>,
    slots: Arc<Slots>,
    session: Arc<Session>,
    writer: Arc<ReplyWriter>,
    max: usize,
}

impl Pool {
    fn new(session: Arc<Session>, writer: Arc<ReplyWriter>, max: usize) -> Pool {
        let (tx, rx) = mpsc::sync_channel(max);
        Pool {
            tx: Some(tx),
            rx: Arc::new(Mutex::new(rx)),
            handles: Vec::new(),
            idle: Arc::new(AtomicUsize::new(0)),
            slots: Arc::new(Slots {
                used: Mutex::new(0),
                freed: Condvar::new(),
                max,
            }),
            session,
            writer,
            max,
        }
    }

    /// Hands a job to a worker (the caller holds a slot for it).
    fn submit(&mut self, job: Job) {
        if self.idle.load(Ordering::SeqCst) == 0 && self.handles.len() < self.max {
            self.spawn();
        }
        if self.handles.is_empty() {
            // No thread could be started: run it here.
            run_job(&self.session, &self.writer, job);
            self.slots.release();
            return;
        }
        let tx = self.tx.as_ref().expect("pool is open until finish");
        // Cannot block for long: a slot is held, so fewer than `max` jobs are queued.
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            run_job(&self.session, &self.writer, job);
            self.slots.release();
        }
    }

    fn spawn(&mut self) {
        let rx = self.rx.clone();
        let idle = self.idle.clone();
        let slots = self.slots.clone();
        let session = self.session.clone();
        let writer = self.writer.clone();
        let spawned = thread::Builder::new()
            .name("nbd-worker".into())
            .spawn(move || loop {
                idle.fetch_add(1, Ordering::SeqCst);
                let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                idle.fetch_sub(1, Ordering::SeqCst);
                let Ok(job) = job else { break };
                let ran = panic::catch_unwind(AssertUnwindSafe(|| run_job(&session, &writer, job)));
                slots.release();
                if ran.is_err() {
                    // The request got no reply: the client would wait forever.
                    log::error!("nbd: a request panicked; closing the connection");
                    writer.kill();
                }
            });
        match spawned {
            Ok(h) => self.handles.push(h),
            Err(e) => log::warn!("nbd: cannot start a worker thread: {e}"),
        }
    }

    /// Closes the queue and waits for every worker (all queued jobs done).
    fn finish(&mut self) {
        self.tx = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn run_job(session: &Session, writer: &ReplyWriter, job: Job) {
    if writer.is_dead() {
        return;
    }
    let reply = execute(session, &job.req, job.payload);
    writer.send(&reply);
}
