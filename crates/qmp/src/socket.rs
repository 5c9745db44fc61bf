//! Creating the listening socket, and the wake-up pipe of the accept loop.

use std::fs::{self, File, Permissions};
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::ServerError;

/// `sun_path` holds 108 bytes including the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// Identity of the socket inode we created, to remove only our own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (not following a symlink).
    pub fn of(path: &Path) -> Option<FileId> {
        fs::symlink_metadata(path).ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks what is at `path`: nothing is fine, a stale socket (nobody
/// accepting) is removed, a live socket or anything else is an error.
fn clear_path(path: &Path) -> Result<(), ServerError> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    if !md.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            log::info!("removing stale socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    Err(io_err("removing stale socket", path)(e))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(io_err("probing existing socket", path)(e)),
    }
}

/// Binds a listening unix socket at `path` with mode 0600.
///
/// The socket is created inside a fresh directory of mode 0700 next to
/// `path`, made 0600 there, and then hard-linked to `path`. So there is no
/// moment at which another user could connect through a wider mode, and
/// unlike setting the umask (process-wide) it is safe in a multithreaded
/// program. `link()` never replaces an existing file, so a file appearing at
/// `path` meanwhile is left alone. A path too long for `sun_path` inside the
/// private directory is reached through `/proc/self/fd`.
pub fn bind(path: &Path) -> Result<(UnixListener, FileId), ServerError> {
    if path.file_name().is_none() {
        return Err(ServerError::BadPath(path.to_path_buf()));
    }
    if path.as_os_str().len() > SUN_PATH_MAX {
        return Err(io_err("socket path", path)(io::Error::new(
            ErrorKind::InvalidInput,
            "longer than 107 bytes",
        )));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    clear_path(path)?;
    let dir = tempfile::Builder::new()
        .prefix(".qmp-")
        .permissions(Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(io_err("creating private directory", parent))?;
    let tmp = dir.path().join("s");
    let listener = if tmp.as_os_str().len() <= SUN_PATH_MAX {
        UnixListener::bind(&tmp).map_err(io_err("bind", &tmp))?
    } else {
        let dirfd = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir.path())
            .map_err(io_err("open", dir.path()))?;
        let short = PathBuf::from(format!("/proc/self/fd/{}/s", dirfd.as_raw_fd()));
        UnixListener::bind(&short).map_err(io_err("bind", &tmp))?
    };
    fs::set_permissions(&tmp, Permissions::from_mode(0o600)).map_err(io_err("chmod", &tmp))?;
    if let Err(e) = fs::hard_link(&tmp, path) {
        return Err(if e.kind() == ErrorKind::AlreadyExists {
            match clear_path(path) {
                Err(err) => err,
                Ok(()) => ServerError::InUse(path.to_path_buf()),
            }
        } else {
            io_err("link", path)(e)
        });
    }
    let id = FileId::of(path);
    let _ = fs::remove_file(&tmp);
    drop(dir);
    let id = id.ok_or_else(|| {
        io_err("stat", path)(io::Error::new(ErrorKind::NotFound, "socket vanished"))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("set_nonblocking", path))?;
    Ok((listener, id))
}

/// Removes `path` if it is still the socket we created.
pub fn remove_if_ours(path: &Path, id: FileId) {
    if FileId::of(path) == Some(id) {
        if let Err(e) = fs::remove_file(path) {
            log::warn!("removing socket {}: {e}", path.display());
        }
    }
}

/// A self-pipe waking the accept loop.
#[derive(Debug)]
pub(crate) struct Waker {
    read: OwnedFd,
    write: OwnedFd,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by
        // nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Waker { read, write })
    }

    pub fn wake(&self) {
        let b = 1u8;
        // SAFETY: writes one byte from a valid buffer to an open descriptor.
        // A full pipe (EAGAIN) already guarantees a wake-up.
        let _ = unsafe { libc::write(self.write.as_raw_fd(), (&b as *const u8).cast(), 1) };
    }

    /// Waits until `fd` is readable or the waker was woken. Returns whether
    /// the waker fired (its pipe is drained).
    pub fn wait(&self, fd: &impl AsRawFd) -> io::Result<bool> {
        let mut pfds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `pfds` is a valid array of two pollfd structures.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        let woken = pfds[1].revents != 0;
        if woken {
            let mut buf = [0u8; 64];
            // SAFETY: reads into a valid 64-byte buffer from an open,
            // non-blocking descriptor.
            while unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
                > 0
            {}
        }
        Ok(woken)
    }
}
