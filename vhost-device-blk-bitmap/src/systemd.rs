//! systemd integration without libsystemd: socket activation (`sd_listen_fds(3)`),
//! listening sockets inherited by descriptor (`--socket-fd`), and readiness notification
//! (`sd_notify(3)`).
//!
//! * **Activation**: when `LISTEN_PID` is our pid, descriptors `3 .. 3 + LISTEN_FDS` were
//!   passed to us, named by the colon-separated `LISTEN_FDNAMES`. [`take_activation`]
//!   reads them once, marks them close-on-exec and removes the three variables from the
//!   environment, as `sd_listen_fds(1)` does.
//! * **Notification**: `NOTIFY_SOCKET` names a unix datagram socket (a path, or
//!   `@name` for the abstract namespace); every [`Notifier::notify`] sends one datagram of
//!   newline-separated `KEY=VALUE` assignments such as `READY=1\nSTATUS=…`.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;

/// The first descriptor passed by socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The `FileDescriptorName=` that marks the vhost-user socket among several passed ones.
pub const VHOST_USER_FD_NAME: &str = "vhost-user";

/// Why a descriptor cannot be served as the vhost-user socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketFdError {
    /// Nothing is open under that number.
    #[error("fd {fd} is not open")]
    NotOpen {
        /// The descriptor.
        fd: RawFd,
    },
    /// A file, pipe, device … rather than a socket.
    #[error("fd {fd} is not a socket")]
    NotASocket {
        /// The descriptor.
        fd: RawFd,
    },
    /// A socket of another address family (TCP, netlink …).
    #[error("fd {fd} is an {family} socket, not a unix (AF_UNIX) socket")]
    NotUnix {
        /// The descriptor.
        fd: RawFd,
        /// Its address family, by name.
        family: String,
    },
    /// A datagram or seqpacket unix socket.
    #[error("fd {fd} is a {kind} unix socket, not a stream (SOCK_STREAM) socket")]
    NotStream {
        /// The descriptor.
        fd: RawFd,
        /// Its type, by name.
        kind: String,
    },
    /// A connected (or only bound) stream socket.
    #[error(
        "fd {fd} is a unix stream socket that is not listening (listen() was not called on it)"
    )]
    NotListening {
        /// The descriptor.
        fd: RawFd,
    },
    /// A system call failed.
    #[error("fd {fd}: {what}: {source}")]
    Io {
        /// The descriptor.
        fd: RawFd,
        /// The call.
        what: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
}

/// A malformed socket-activation environment.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// A variable that is not what `sd_listen_fds(3)` defines.
    #[error("socket activation: invalid {var}={value:?}: {why}")]
    BadVariable {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `LISTEN_FDNAMES` has another number of names than `LISTEN_FDS` descriptors.
    #[error(
        "socket activation: LISTEN_FDNAMES names {names} descriptor(s) but LISTEN_FDS is {fds}"
    )]
    NameCount {
        /// Names given.
        names: usize,
        /// Descriptors passed.
        fds: usize,
    },
    /// A passed descriptor is not open, or cannot be marked close-on-exec.
    #[error("socket activation: {0}")]
    Fd(#[from] SocketFdError),
}

/// The descriptors passed by socket activation, in order from [`LISTEN_FDS_START`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// `(descriptor, name)`; the name is `None` without `LISTEN_FDNAMES` (systemd calls
    /// such descriptors `unknown`).
    pub fds: Vec<(RawFd, Option<String>)>,
}

impl Activation {
    /// The socket to serve: the one named [`VHOST_USER_FD_NAME`] if any, else the first.
    pub fn vhost_user_socket(&self) -> (RawFd, Option<&str>) {
        let (fd, name) = self
            .fds
            .iter()
            .find(|(_, n)| n.as_deref() == Some(VHOST_USER_FD_NAME))
            .unwrap_or(&self.fds[0]);
        (*fd, name.as_deref())
    }
}

/// Interprets the socket-activation variables for process `pid`, as `sd_listen_fds(3)`
/// does: `None` unless `LISTEN_PID` is `pid` and `LISTEN_FDS` is at least 1.
pub fn parse_activation(
    pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
) -> Result<Option<Activation>, ActivationError> {
    let Some(listen_pid) = listen_pid else {
        return Ok(None);
    };
    let for_pid: u32 =
        listen_pid
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| ActivationError::BadVariable {
                var: "LISTEN_PID",
                value: listen_pid.into(),
                why: "not a process id",
            })?;
    if for_pid != pid {
        // Meant for another process (e.g. a parent that did not clear its environment).
        return Ok(None);
    }
    let Some(listen_fds) = listen_fds else {
        return Ok(None);
    };
    let n: usize = listen_fds
        .parse()
        .ok()
        .filter(|&n: &usize| n <= (RawFd::MAX - LISTEN_FDS_START) as usize)
        .ok_or_else(|| ActivationError::BadVariable {
            var: "LISTEN_FDS",
            value: listen_fds.into(),
            why: "not a number of descriptors",
        })?;
    if n == 0 {
        return Ok(None);
    }
    let names: Vec<Option<String>> = match listen_fdnames {
        None => vec![None; n],
        Some(s) => {
            let names: Vec<Option<String>> = s.split(':').map(|x| Some(x.to_owned())).collect();
            if names.len() != n {
                return Err(ActivationError::NameCount {
                    names: names.len(),
                    fds: n,
                });
            }
            names
        }
    };
    Ok(Some(Activation {
        fds: (LISTEN_FDS_START..).zip(names).collect(),
    }))
}

/// Reads the socket-activation variables of this process, removes them from the
/// environment (so nothing we start inherits them) and marks every passed descriptor
/// close-on-exec: what `sd_listen_fds(1)` does. Call before starting threads (the
/// environment is changed).
pub fn take_activation() -> Result<Option<Activation>, ActivationError> {
    let var = |name| std::env::var(name).ok();
    let parsed = parse_activation(
        std::process::id(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
    );
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    let activation = parsed?;
    if let Some(a) = &activation {
        for &(fd, _) in &a.fds {
            set_cloexec(fd)?;
        }
    }
    Ok(activation)
}

/// Marks `fd` close-on-exec (a descriptor we were given stays ours only).
pub fn set_cloexec(fd: RawFd) -> Result<(), SocketFdError> {
    let io = |what| {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EBADF) {
            SocketFdError::NotOpen { fd }
        } else {
            SocketFdError::Io { fd, what, source }
        }
    };
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; an fd that is not open
    // gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io("fcntl(F_GETFD)"));
    }
    if flags & libc::FD_CLOEXEC == 0 {
        // SAFETY: F_SETFD only changes the descriptor flags of `fd`, which is open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io("fcntl(F_SETFD)"));
        }
    }
    Ok(())
}

/// An `int` socket option of `fd`.
fn sockopt(fd: RawFd, option: libc::c_int, what: &'static str) -> Result<i32, SocketFdError> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes for the whole call and `len` is the
    // size of `value`; getsockopt does not keep the pointers.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        let source = io::Error::last_os_error();
        return Err(match source.raw_os_error() {
            Some(libc::EBADF) => SocketFdError::NotOpen { fd },
            Some(libc::ENOTSOCK) => SocketFdError::NotASocket { fd },
            _ => SocketFdError::Io { fd, what, source },
        });
    }
    Ok(value)
}

fn family_name(family: i32) -> String {
    match family {
        libc::AF_INET => "AF_INET (IPv4)".into(),
        libc::AF_INET6 => "AF_INET6 (IPv6)".into(),
        libc::AF_NETLINK => "AF_NETLINK".into(),
        libc::AF_VSOCK => "AF_VSOCK".into(),
        libc::AF_PACKET => "AF_PACKET".into(),
        other => format!("address family {other}"),
    }
}

fn type_name(kind: i32) -> String {
    match kind {
        libc::SOCK_DGRAM => "datagram (SOCK_DGRAM)".into(),
        libc::SOCK_SEQPACKET => "seqpacket (SOCK_SEQPACKET)".into(),
        libc::SOCK_RAW => "raw (SOCK_RAW)".into(),
        other => format!("type {other}"),
    }
}

/// Checks that `fd` is a listening unix stream socket (`SO_DOMAIN`, `SO_TYPE`,
/// `SO_ACCEPTCONN`) and returns the address it is bound to (for messages): a path, or
/// `@name` for the abstract namespace; `None` when unnamed.
pub fn check_listening_unix_socket(fd: RawFd) -> Result<Option<PathBuf>, SocketFdError> {
    let domain = sockopt(fd, libc::SO_DOMAIN, "getsockopt(SO_DOMAIN)")?;
    if domain != libc::AF_UNIX {
        return Err(SocketFdError::NotUnix {
            fd,
            family: family_name(domain),
        });
    }
    let kind = sockopt(fd, libc::SO_TYPE, "getsockopt(SO_TYPE)")?;
    if kind != libc::SOCK_STREAM {
        return Err(SocketFdError::NotStream {
            fd,
            kind: type_name(kind),
        });
    }
    if sockopt(fd, libc::SO_ACCEPTCONN, "getsockopt(SO_ACCEPTCONN)")? == 0 {
        return Err(SocketFdError::NotListening { fd });
    }
    // SAFETY: `fd` was just checked to be an open socket; it is only borrowed for this
    // function, which does not close it (the duplicate below is a new descriptor).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let listener =
        UnixListener::from(
            borrowed
                .try_clone_to_owned()
                .map_err(|source| SocketFdError::Io {
                    fd,
                    what: "dup",
                    source,
                })?,
        );
    Ok(listener.local_addr().ok().and_then(|a| address_name(&a)))
}

/// A unix socket address for messages: its path, or `@name` (abstract namespace).
fn address_name(addr: &SocketAddr) -> Option<PathBuf> {
    if let Some(p) = addr.as_pathname() {
        return Some(p.to_path_buf());
    }
    addr.as_abstract_name()
        .map(|n| PathBuf::from(format!("@{}", String::from_utf8_lossy(n))))
}

/// Takes ownership of the listening unix socket `fd` (checked with
/// [`check_listening_unix_socket`]): marks it close-on-exec and returns it as a listener.
///
/// # Safety
///
/// `fd` must be open and owned by nobody else in this process: the returned listener
/// closes it when dropped. Call it at most once per descriptor.
pub unsafe fn take_listener(fd: RawFd) -> Result<UnixListener, SocketFdError> {
    check_listening_unix_socket(fd)?;
    set_cloexec(fd)?;
    // SAFETY: the caller guarantees that `fd` is open and owned by nobody else; it was
    // just checked to be a listening unix stream socket.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    Ok(UnixListener::from(owned))
}

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is neither an absolute path nor `@name`.
    #[error("NOTIFY_SOCKET={0:?} is not supported (expected an absolute path or @abstract-name)")]
    Unsupported(String),
    /// The address does not fit a `sockaddr_un`, or the datagram socket could not be made.
    #[error("NOTIFY_SOCKET={socket:?}: {source}")]
    Socket {
        /// The address.
        socket: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Sending failed (nobody listening, permission …).
    #[error("sending {state:?} to NOTIFY_SOCKET={socket:?}: {source}")]
    Send {
        /// What was sent.
        state: String,
        /// The address.
        socket: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Sends `sd_notify(3)` messages to the service manager.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`, which is removed from the environment (nothing we
    /// start may notify in our name); `Ok(None)` when it is not set or empty. Call before
    /// starting threads (the environment is changed).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        let value = std::env::var_os("NOTIFY_SOCKET");
        std::env::remove_var("NOTIFY_SOCKET");
        match value {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(&v.to_string_lossy()).map(Some),
        }
    }

    /// A notifier for the datagram socket `socket`: an absolute path, or `@name` for the
    /// abstract namespace (`@` stands for the leading NUL byte).
    pub fn new(socket: &str) -> Result<Notifier, NotifyError> {
        let err = |source| NotifyError::Socket {
            socket: socket.into(),
            source,
        };
        let addr = if let Some(name) = socket.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(socket).map_err(err)?
        } else {
            return Err(NotifyError::Unsupported(socket.into()));
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound().map_err(err)?,
            addr,
            name: socket.into(),
        })
    }

    /// Sends `state` (newline-separated assignments, e.g. `READY=1\nSTATUS=serving`) as
    /// one datagram.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        match self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            Ok(n) if n == state.len() => Ok(()),
            Ok(n) => Err(NotifyError::Send {
                state: state.into(),
                socket: self.name.clone(),
                source: io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("sent {n} of {} bytes", state.len()),
                ),
            }),
            Err(source) => Err(NotifyError::Send {
                state: state.into(),
                socket: self.name.clone(),
                source,
            }),
        }
    }

    /// [`Notifier::notify`], logging a failure as a warning (a service manager that
    /// cannot be told is no reason to stop serving).
    pub fn notify_or_warn(&self, state: &str) {
        match self.notify(state) {
            Ok(()) => log::debug!("sd_notify: {}", state.replace('\n', " ")),
            Err(e) => log::warn!("{e}"),
        }
    }

    /// The `NOTIFY_SOCKET` address, as given.
    pub fn socket_name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn activation_follows_sd_listen_fds() {
        let p = |pid, fds, names| parse_activation(42, pid, fds, names);
        assert_eq!(p(None, Some("1"), None).unwrap(), None);
        assert_eq!(p(Some("41"), Some("1"), None).unwrap(), None, "not ours");
        assert_eq!(p(Some("42"), None, None).unwrap(), None);
        assert_eq!(p(Some("42"), Some("0"), None).unwrap(), None);
        let a = p(Some("42"), Some("1"), None).unwrap().unwrap();
        assert_eq!(a.fds, vec![(3, None)]);
        assert_eq!(a.vhost_user_socket(), (3, None));
        let a = p(Some("42"), Some("3"), Some("qmp:vhost-user:x"))
            .unwrap()
            .unwrap();
        assert_eq!(a.vhost_user_socket(), (4, Some("vhost-user")));
        let a = p(Some("42"), Some("2"), Some("a:b")).unwrap().unwrap();
        assert_eq!(a.vhost_user_socket(), (3, Some("a")), "the first");
        for (pid, fds, names, want) in [
            (Some("x"), Some("1"), None, "invalid LISTEN_PID=\"x\""),
            (Some("0"), Some("1"), None, "invalid LISTEN_PID"),
            (Some("42"), Some("-1"), None, "invalid LISTEN_FDS=\"-1\""),
            (Some("42"), Some("1"), Some("a:b"), "names 2 descriptor(s)"),
        ] {
            let e = p(pid, fds, names).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn only_listening_unix_stream_sockets_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        assert_eq!(
            check_listening_unix_socket(listener.as_raw_fd()).unwrap(),
            Some(path.clone())
        );
        let abs = UnixListener::bind_addr(
            &SocketAddr::from_abstract_name(format!("vblk-test-{}", std::process::id())).unwrap(),
        )
        .unwrap();
        let name = check_listening_unix_socket(abs.as_raw_fd()).unwrap();
        assert_eq!(
            name,
            Some(PathBuf::from(format!("@vblk-test-{}", std::process::id())))
        );

        let stream = UnixStream::connect(&path).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let dgram = UnixDatagram::unbound().unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cases: [(RawFd, &str); 5] = [
            (
                stream.as_raw_fd(),
                "is a unix stream socket that is not listening",
            ),
            (file.as_raw_fd(), "is not a socket"),
            (dgram.as_raw_fd(), "is a datagram (SOCK_DGRAM) unix socket"),
            (tcp.as_raw_fd(), "is an AF_INET (IPv4) socket, not a unix"),
            (999_999, "fd 999999 is not open"),
        ];
        for (fd, want) in cases {
            let e = check_listening_unix_socket(fd).unwrap_err().to_string();
            assert!(e.contains(want), "fd {fd}: {e}");
        }
        assert!(matches!(
            set_cloexec(999_999),
            Err(SocketFdError::NotOpen { fd: 999_999 })
        ));
    }

    #[test]
    fn take_listener_sets_cloexec_and_owns_the_fd() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();
        let fd: OwnedFd = listener.into();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(raw, libc::F_SETFD, 0) };
        // SAFETY: `raw` is open and owned by nothing else (into_raw_fd gave it up).
        let l = unsafe { take_listener(raw) }.unwrap();
        // SAFETY: F_GETFD only reads the flags of the open descriptor `raw`.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        assert_eq!(l.as_raw_fd(), raw);
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.notify("READY=1\nSTATUS=ok").unwrap();
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");

        let name = format!("vblk-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::new(&format!("@{name}")).unwrap();
        n.notify("STOPPING=1").unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");

        assert!(matches!(
            Notifier::new("vsock:2:1234"),
            Err(NotifyError::Unsupported(_))
        ));
        let gone = Notifier::new(dir.path().join("nobody").to_str().unwrap()).unwrap();
        let e = gone.notify("READY=1").unwrap_err().to_string();
        assert!(e.contains("sending \"READY=1\" to NOTIFY_SOCKET="), "{e}");
    }
}
