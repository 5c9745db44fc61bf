//! Child processes with bounded waits: run-to-completion with a timeout, kill-on-drop
//! guards, graceful SIGTERM shutdown and waiting for a server's unix socket.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{E2eError, Result};

/// Poll interval for child processes and sockets.
const POLL: Duration = Duration::from_millis(10);

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Output of a finished command.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout (lossy UTF-8).
    pub stdout: String,
    /// Everything written to stderr (lossy UTF-8).
    pub stderr: String,
}

fn read_lossy(f: &mut File) -> String {
    let mut buf = Vec::new();
    // A read error only loses diagnostics; the exit status still decides.
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Runs `cmd` to completion, killing it after `timeout`. Stdin is /dev/null; stdout and
/// stderr are captured through temporary files (no pipe can fill up and block the child).
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    let text = describe(cmd);
    let tmp = |what: &str| {
        tempfile::tempfile().map_err(|source| E2eError::Io {
            path: PathBuf::from(format!("<temporary {what} file>")),
            source,
        })
    };
    let mut out = tmp("stdout")?;
    let mut err = tmp("stderr")?;
    let clone = |f: &File| {
        f.try_clone().map_err(|source| E2eError::Io {
            path: PathBuf::from("<temporary output file>"),
            source,
        })
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(clone(&out)?))
        .stderr(Stdio::from(clone(&err)?));
    let child = cmd.spawn().map_err(|source| E2eError::Spawn {
        cmd: text.clone(),
        source,
    })?;
    let mut guard = ChildGuard::new(child, &text);
    let status = match guard.wait_timeout(timeout)? {
        Some(status) => status,
        None => {
            guard.kill();
            return Err(E2eError::Timeout {
                cmd: text,
                timeout,
                stderr: read_lossy(&mut err),
            });
        }
    };
    use std::io::Seek;
    let _ = out.rewind();
    let _ = err.rewind();
    Ok(CmdOutput {
        status,
        stdout: read_lossy(&mut out),
        stderr: read_lossy(&mut err),
    })
}

/// Like [`run_cmd`], but an unsuccessful exit status is an error carrying the output.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    let text = describe(cmd);
    let out = run_cmd(cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(E2eError::CommandFailed {
            cmd: text,
            status: out.status.to_string(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

/// Owns a running child process; dropping it kills (SIGKILL) and reaps the child.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Takes ownership of `child`; `name` is used in messages.
    pub fn new(child: Child, name: &str) -> Self {
        Self {
            child: Some(child),
            name: name.to_owned(),
        }
    }

    /// Process id of the child, if it has not been reaped yet.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Non-blocking check whether the child has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(c) => c.try_wait().map_err(|source| E2eError::Io {
                path: PathBuf::from(format!("<wait for {}>", self.name)),
                source,
            }),
        }
    }

    /// Waits up to `timeout` for the child to exit; `None` when it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends SIGTERM and waits up to `timeout`; falls back to SIGKILL. Returns the exit
    /// status and whether the child honoured SIGTERM in time.
    pub fn terminate(&mut self, timeout: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(status) = self.try_wait()? {
            return Ok((status, true));
        }
        if let Some(pid) = self.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) only sends a signal; `pid` is our own un-reaped child, so the
            // id cannot have been recycled for another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if let Some(status) = self.wait_timeout(timeout)? {
            return Ok((status, true));
        }
        let status = self.kill().ok_or_else(|| E2eError::Io {
            path: PathBuf::from(format!("<kill {}>", self.name)),
            source: std::io::Error::other("child could not be reaped"),
        })?;
        Ok((status, false))
    }

    /// Kills (SIGKILL) and reaps the child; returns its status if it could be reaped.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `path` exists as a unix socket. When `child` is given and exits first,
/// fails at once; `log` (e.g. the server's output file) is quoted in errors.
pub fn wait_for_socket(
    path: &Path,
    timeout: Duration,
    mut child: Option<&mut ChildGuard>,
    log: Option<&Path>,
) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + timeout;
    let log_text = || log.map(read_file_lossy).unwrap_or_default();
    loop {
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.file_type().is_socket() {
                return Ok(());
            }
        }
        if let Some(c) = child.as_deref_mut() {
            if let Some(status) = c.try_wait()? {
                return Err(E2eError::SocketTimeout {
                    path: path.to_owned(),
                    timeout,
                    detail: format!(
                        "`{}` exited first ({status}); log: {}",
                        c.name(),
                        log_text()
                    ),
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(E2eError::SocketTimeout {
                path: path.to_owned(),
                timeout,
                detail: format!("log: {}", log_text()),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Reads a file for diagnostics; a missing or unreadable file gives an explanatory text.
pub fn read_file_lossy(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
