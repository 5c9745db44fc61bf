//! Our daemon (`vhost-device-blk-bitmap`) as the server under test: locating its binary
//! and building its command line.
//!
//! The binary is taken from `$E2E_DAEMON_BIN` when set. Otherwise it is
//! `target/<profile>/vhost-device-blk-bitmap` next to the running test executable (the
//! profile directory of `cargo test` / `cargo test --release`). When that file is missing
//! or older than any source of the daemon and its workspace crates (`src/`, `Cargo.toml`),
//! it is built once per test process with
//! `cargo build -p vhost-device-blk-bitmap --bin vhost-device-blk-bitmap` (`--release` for
//! the release directory). `cargo test --workspace` has already built it for the daemon's
//! own tests, so then nothing is rebuilt.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::error::{E2eError, Result};
use crate::guest::workspace_root;
use crate::process::{describe, run_cmd};

/// Environment variable naming a prebuilt daemon binary.
pub const DAEMON_BIN_ENV: &str = "E2E_DAEMON_BIN";
/// Name of the daemon's binary target.
pub const DAEMON_BIN_NAME: &str = "vhost-device-blk-bitmap";
/// Limit for building the daemon.
pub const DAEMON_BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The daemon binary (see the module docs); located or built once per process.
pub fn daemon_binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate().map_err(|e| e.to_string()))
        .clone()
        .map_err(E2eError::Daemon)
}

/// A command serving `image` on `socket` with `num_queues` queues plus `extra` options.
pub fn daemon_command(
    bin: &Path,
    image: &Path,
    socket: &Path,
    num_queues: u32,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .arg("--num-queues")
        .arg(num_queues.to_string())
        .args(extra);
    cmd
}

/// Our daemon's command line, to start again after it was killed: each start first
/// removes the socket files a killed daemon leaves behind.
#[derive(Debug, Clone)]
pub struct Restartable {
    /// The daemon binary ([`daemon_binary`]).
    pub bin: PathBuf,
    /// The image it serves.
    pub image: PathBuf,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its queues.
    pub num_queues: u32,
    /// Further arguments.
    pub extra: Vec<String>,
    /// Other socket files it creates (e.g. `--nbd-socket`), removed before each start.
    pub stale: Vec<PathBuf>,
}

impl Restartable {
    /// Starts the daemon and waits up to `timeout` for its vhost-user socket.
    pub fn start(&self, timeout: std::time::Duration) -> Result<crate::Backend> {
        for path in std::iter::once(&self.socket).chain(&self.stale) {
            let _ = std::fs::remove_file(path);
        }
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        crate::Backend::spawn(
            daemon_command(
                &self.bin,
                &self.image,
                &self.socket,
                self.num_queues,
                &extra,
            ),
            &self.socket,
            timeout,
        )
    }
}

fn locate() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(DAEMON_BIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(E2eError::Daemon(format!(
                "{DAEMON_BIN_ENV}={} is not a file",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(|source| E2eError::Io {
        path: PathBuf::from("<current test executable>"),
        source,
    })?;
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| E2eError::Daemon(format!("unexpected test path {}", exe.display())))?;
    let bin = profile_dir.join(DAEMON_BIN_NAME);
    if is_fresh(&bin) {
        return Ok(bin);
    }
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .args(["-p", DAEMON_BIN_NAME, "--bin", DAEMON_BIN_NAME]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let text = describe(&cmd);
    let out = run_cmd(&mut cmd, DAEMON_BUILD_TIMEOUT)?;
    if !out.status.success() || !bin.is_file() {
        return Err(E2eError::Daemon(format!(
            "`{text}` failed ({}) or did not produce {}:\n{}",
            out.status,
            bin.display(),
            out.stderr
        )));
    }
    Ok(bin)
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Newest modification time of the files under `dir` (recursively).
fn newest_file(dir: &Path, newest: &mut SystemTime) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        if let Some(t) = mtime(dir) {
            *newest = (*newest).max(t);
        }
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            newest_file(&p, newest);
        } else if let Some(t) = mtime(&p) {
            *newest = (*newest).max(t);
        }
    }
}

/// The binary exists and is newer than every source it is built from: `src/` and
/// `Cargo.toml` of the daemon and of every crate under `crates/`, and the root
/// `Cargo.toml` (tests, benches and `Cargo.lock` are not looked at).
fn is_fresh(bin: &Path) -> bool {
    let Some(built) = mtime(bin) else {
        return false;
    };
    let root = workspace_root();
    let mut packages = vec![root.join(DAEMON_BIN_NAME)];
    if let Ok(entries) = std::fs::read_dir(root.join("crates")) {
        packages.extend(entries.flatten().map(|e| e.path()));
    }
    let mut newest = mtime(&root.join("Cargo.toml")).unwrap_or(SystemTime::UNIX_EPOCH);
    for p in packages {
        newest_file(&p.join("src"), &mut newest);
        newest_file(&p.join("Cargo.toml"), &mut newest);
    }
    built >= newest
}
