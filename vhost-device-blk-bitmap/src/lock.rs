//! QEMU-compatible image locking: open-file-description byte-range locks on the image
//! file, so QEMU's tools, QEMU itself and a second copy of this daemon exclude each other.
//!
//! QEMU takes a shared (read) lock on byte `100 + i` for each permission `i` it holds and
//! on byte `200 + i` for each permission it refuses to share, after testing that nobody
//! holds a conflicting byte.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Base of the "permission held" bytes.
const PERM_BASE: i64 = 100;
/// Base of the "permission not shared" bytes.
const SHARED_BASE: i64 = 200;

/// QEMU block permissions, by bit index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Perm {
    /// Reads see consistent data.
    ConsistentRead = 0,
    /// Guest-visible writes.
    Write = 1,
    /// Writes that do not change data.
    WriteUnchanged = 2,
    /// Changing the image size.
    Resize = 3,
}

impl Perm {
    /// QEMU's name for the permission, used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }
}

/// Which permissions we hold and which we refuse to share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSpec {
    /// Permissions we hold (bytes 100+i).
    pub held: Vec<Perm>,
    /// Permissions nobody else may hold (bytes 200+i).
    pub unshared: Vec<Perm>,
}

impl LockSpec {
    /// What QEMU takes when serving an image: a writable qcow2 holds consistent read,
    /// write and resize and shares neither write nor resize; a writable raw image holds
    /// consistent read and write and shares everything; a read-only image holds consistent
    /// read and refuses to share write.
    pub fn for_image(qcow2: bool, writable: bool) -> Self {
        match (qcow2, writable) {
            (true, true) => LockSpec {
                held: vec![Perm::ConsistentRead, Perm::Write, Perm::Resize],
                unshared: vec![Perm::Write, Perm::Resize],
            },
            (false, true) => LockSpec {
                held: vec![Perm::ConsistentRead, Perm::Write],
                unshared: vec![],
            },
            (_, false) => LockSpec {
                held: vec![Perm::ConsistentRead],
                unshared: vec![Perm::Write],
            },
        }
    }
}

/// Locking failures.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone holds a lock that conflicts with ours.
    #[error("Failed to get {kind} lock\nIs another process using the image [{path}]?")]
    Conflict {
        /// `"write"` or `shared "write"`, as QEMU words it.
        kind: String,
        /// The image path.
        path: PathBuf,
    },
    /// The lock file could not be opened or a lock call failed.
    #[error("locking {path}: {source}")]
    Io {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Locks held on an image; released when dropped (the file description closes).
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
}

impl ImageLock {
    /// Tests for conflicts and then takes the locks of `spec` on `path`, through a file
    /// description of our own that stays open as long as the returned value lives.
    pub fn acquire(path: &Path, spec: &LockSpec) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new().read(true).open(path).map_err(io_err)?;
        // Test first, like QEMU: wanted permission vs. others' "not shared" bytes, then
        // our "not shared" bytes vs. others' held permissions.
        for &p in &spec.held {
            if is_locked_by_other(&file, SHARED_BASE + p as i64).map_err(io_err)? {
                return Err(LockError::Conflict {
                    kind: format!("\"{}\"", p.name()),
                    path: path.to_owned(),
                });
            }
        }
        for &p in &spec.unshared {
            if is_locked_by_other(&file, PERM_BASE + p as i64).map_err(io_err)? {
                return Err(LockError::Conflict {
                    kind: format!("shared \"{}\"", p.name()),
                    path: path.to_owned(),
                });
            }
        }
        for &p in &spec.held {
            set_read_lock(&file, PERM_BASE + p as i64).map_err(io_err)?;
        }
        for &p in &spec.unshared {
            set_read_lock(&file, SHARED_BASE + p as i64).map_err(io_err)?;
        }
        Ok(ImageLock {
            file,
            path: path.to_owned(),
        })
    }

    /// The locked path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file description that carries the locks.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn flock_for(byte: i64, l_type: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0;
    fl
}

/// Whether another open file description holds a lock that would block a write lock on
/// `byte`.
fn is_locked_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_for(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we own; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn set_read_lock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_for(byte, libc::F_RDLCK);
    // SAFETY: F_OFD_SETLK only reads the flock struct we own; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn tool(name: &str) -> bool {
        let found = Command::new(name).arg("--version").output().is_ok();
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{name} is required when CI=true"
            );
            eprintln!("note: {name} not installed, skipping");
        }
        found
    }

    fn image(dir: &Path, fmt: &str) -> PathBuf {
        let p = dir.join(format!("img.{fmt}"));
        if tool("qemu-img") {
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt])
                .arg(&p)
                .arg("1M")
                .status()
                .unwrap();
            assert!(st.success());
        } else {
            File::create(&p).unwrap().set_len(1 << 20).unwrap();
        }
        p
    }

    #[test]
    fn second_writer_is_refused_and_lock_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "raw");
        let spec = LockSpec::for_image(true, true);
        let first = ImageLock::acquire(&p, &spec).unwrap();
        let err = ImageLock::acquire(&p, &spec).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("Failed to get \"write\" lock"), "{msg}");
        assert!(
            msg.contains(&format!(
                "Is another process using the image [{}]?",
                p.display()
            )),
            "{msg}"
        );
        // A read-only user refuses to share write: conflicts with our held write.
        let ro = ImageLock::acquire(&p, &LockSpec::for_image(true, false)).unwrap_err();
        assert!(ro
            .to_string()
            .starts_with("Failed to get shared \"write\" lock"));
        drop(first);
        ImageLock::acquire(&p, &spec).unwrap();
    }

    #[test]
    fn raw_writers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "raw");
        let spec = LockSpec::for_image(false, true);
        let _a = ImageLock::acquire(&p, &spec).unwrap();
        let _b = ImageLock::acquire(&p, &spec).unwrap();
        // But a read-only user (unshares write) is refused.
        assert!(ImageLock::acquire(&p, &LockSpec::for_image(false, false)).is_err());
    }

    #[test]
    fn qemu_tools_respect_our_locks() {
        if !tool("qemu-img") || !tool("qemu-io") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "qcow2");
        let lock = ImageLock::acquire(&p, &LockSpec::for_image(true, true)).unwrap();
        let out = Command::new("qemu-img")
            .arg("info")
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
        let out = Command::new("qemu-img")
            .args(["info", "-U"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success());
        let out = Command::new("qemu-io")
            .args(["-c", "read 0 512"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Failed to get \"write\" lock"), "{err}");
        drop(lock);
        // Released. (A child another test forks at this moment shares our descriptor
        // until it execs, and with it the lock: retry for a moment.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let out = Command::new("qemu-img")
                .arg("info")
                .arg(&p)
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still locked after the drop: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn refused_while_qemu_holds_the_image() {
        if !tool("qemu-io") {
            return;
        }
        use std::io::Write;
        use std::process::Stdio;
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "qcow2");
        // qemu-io keeps the image open (writable) while it waits for commands on stdin.
        let mut child = Command::new("qemu-io")
            .arg(&p)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let spec = LockSpec::for_image(true, true);
        let mut refused = None;
        while std::time::Instant::now() < deadline {
            match ImageLock::acquire(&p, &spec) {
                Err(e) => {
                    refused = Some(e.to_string());
                    break;
                }
                Ok(l) => {
                    drop(l);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"quit\n");
        drop(stdin);
        let _ = child.wait();
        let msg = refused.expect("qemu-io's locks were never seen");
        assert!(msg.contains("lock"), "{msg}");
    }
}
