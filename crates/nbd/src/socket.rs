//! Sockets: the two stream kinds behind one type, a writer that never raises SIGPIPE, and
//! the wakeup that ends listener threads. All of the crate's `unsafe` lives here.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// A connected client socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Another handle to the same socket.
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Sets `SO_RCVTIMEO` (shared by every handle of the socket).
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Shuts both directions down: blocked reads return EOF and writes fail, on every
    /// handle of the socket. Errors (already closed) are ignored.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// A [`SockWriter`] on a new handle of the socket.
    pub(crate) fn writer(&self) -> io::Result<SockWriter> {
        let fd: OwnedFd = match self.try_clone()? {
            Stream::Unix(s) => s.into(),
            Stream::Tcp(s) => s.into(),
        };
        Ok(SockWriter { fd })
    }

    /// The peer, for logs.
    pub(crate) fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix".to_string(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".to_string()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub(crate) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    /// Accepts one connection as a blocking stream (TCP with `TCP_NODELAY`).
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Stream::Unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// Writes to a socket with `send(MSG_NOSIGNAL)`: a peer that went away yields `EPIPE`
/// instead of killing the process with SIGPIPE (a library cannot rely on the binary
/// ignoring it).
#[derive(Debug)]
pub(crate) struct SockWriter {
    fd: OwnedFd,
}

impl Write for SockWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `self.fd` is an open socket owned by `self` for the whole call, and
            // `buf` is valid for reads of `buf.len()` bytes; send() does not keep the pointer.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An eventfd that, once signalled, stays readable: wakes every listener thread polling it.
#[derive(Debug)]
pub(crate) struct Wakeup {
    fd: OwnedFd,
}

impl Wakeup {
    pub(crate) fn new() -> io::Result<Wakeup> {
        // SAFETY: eventfd() takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd(), is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Wakeup { fd })
    }

    /// Makes the eventfd readable for good.
    pub(crate) fn signal(&self) {
        let mut f = std::fs::File::from(match self.fd.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("nbd: cannot signal the listener wakeup: {e}");
                return;
            }
        });
        if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
            log::error!("nbd: cannot signal the listener wakeup: {e}");
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits until `listener` or `wakeup` is readable; returns `(listener_ready, woken)`.
pub(crate) fn poll_two(listener: RawFd, wakeup: RawFd) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wakeup,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of 2 pollfd structs that lives across the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}
