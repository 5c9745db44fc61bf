//! vhost-user-blk server processes under test: any command that listens on a unix
//! socket (our daemon, or `qemu-storage-daemon` as the reference implementation).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::error::{E2eError, Result};
use crate::process::{describe, read_file_lossy, wait_for_socket, ChildGuard};

/// A running server; dropping it kills the process (SIGKILL), [`Backend::stop`] ends it
/// gracefully.
#[derive(Debug)]
pub struct Backend {
    guard: ChildGuard,
    socket: PathBuf,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Backend {
    /// Starts `cmd` (stdout and stderr go to a log file) and waits up to `timeout` for it to
    /// create `socket`.
    pub fn spawn(mut cmd: Command, socket: &Path, timeout: Duration) -> Result<Backend> {
        let dir = tempfile::tempdir().map_err(|source| E2eError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let log = dir.path().join("backend.log");
        let io_err = |source| E2eError::Io {
            path: log.clone(),
            source,
        };
        let out = std::fs::File::create(&log).map_err(io_err)?;
        let err = out.try_clone().map_err(io_err)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let text = describe(&cmd);
        let child = cmd.spawn().map_err(|source| E2eError::Spawn {
            cmd: text.clone(),
            source,
        })?;
        let mut guard = ChildGuard::new(child, &text);
        wait_for_socket(socket, timeout, Some(&mut guard), Some(&log))?;
        Ok(Backend {
            guard,
            socket: socket.to_owned(),
            log,
            _log_dir: dir,
        })
    }

    /// The socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the server printed so far.
    pub fn log(&self) -> String {
        read_file_lossy(&self.log)
    }

    /// The server's process id (`None` once it was killed and reaped), e.g. to signal it.
    pub fn pid(&self) -> Option<u32> {
        self.guard.id()
    }

    /// Whether the server is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.guard.id().is_some() && self.guard.try_wait()?.is_none())
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill(mut self) -> Option<ExitStatus> {
        self.guard.kill()
    }

    /// Sends SIGTERM and waits up to `timeout`. Errors if the server had to be killed or
    /// exited unsuccessfully (the log is included).
    pub fn stop(mut self, timeout: Duration) -> Result<ExitStatus> {
        let (status, graceful) = self.guard.terminate(timeout)?;
        if graceful && status.success() {
            return Ok(status);
        }
        Err(E2eError::CommandFailed {
            cmd: self.guard.name().to_owned(),
            status: if graceful {
                status.to_string()
            } else {
                format!("ignored SIGTERM for {timeout:?}, killed")
            },
            stdout: self.log(),
            stderr: String::new(),
        })
    }
}

/// A `qemu-storage-daemon` command serving the qcow2 `image` as a writable vhost-user-blk
/// export on `socket` with `num_queues` queues. Discards are passed down (`discard=unmap`)
/// so they reach the image and its dirty bitmaps.
pub fn qsd_vhost_user_blk(qsd: &Path, image: &Path, socket: &Path, num_queues: u32) -> Command {
    let mut cmd = Command::new(qsd);
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},discard=unmap",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0,discard=unmap")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path={},\
             writable=on,num-queues={num_queues},logical-block-size=512",
            socket.display()
        ));
    cmd
}
