//! Booting the test guest: QEMU + kernel + initramfs built by `resources/build-guest.sh`,
//! one vhost-user-blk disk, a shell script delivered through fw_cfg, and the
//! `E2E-EXIT <status>` marker read back from the serial console.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{E2eError, Result};
use crate::process::{describe, read_file_lossy, run_cmd, ChildGuard};

/// Limit for building the guest cache from scratch (downloads included).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Paths of the guest pieces (the contents of `CACHE_DIR/env.sh`).
#[derive(Debug, Clone)]
pub struct GuestEnv {
    /// The unpacked `qemu-system-x86_64`.
    pub qemu_system: PathBuf,
    /// `LD_LIBRARY_PATH` it needs.
    pub ld_library_path: String,
    /// Firmware search arguments (`-L DIR ...`).
    pub datadir_args: Vec<String>,
    /// Uncompressed kernel (PVH entry).
    pub kernel: PathBuf,
    /// gzip'ed cpio initramfs.
    pub initrd: PathBuf,
}

/// Root of the workspace (parent of this package).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cache directory: `$E2E_GUEST_CACHE`, else `<workspace>/target/guest`.
pub fn guest_cache_dir() -> PathBuf {
    std::env::var_os("E2E_GUEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target").join("guest"))
}

impl GuestEnv {
    /// Makes sure the guest cache exists (running `resources/build-guest.sh`, which is a
    /// quick no-op on a complete cache) and returns its paths. The result is computed once
    /// per process; a failure is reported with the build log's tail every time.
    pub fn ensure() -> Result<&'static GuestEnv> {
        static ENV: OnceLock<std::result::Result<GuestEnv, String>> = OnceLock::new();
        ENV.get_or_init(|| Self::build(&guest_cache_dir()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| E2eError::GuestEnv(e.clone()))
    }

    /// Runs the build script for `cache` and loads the resulting `env.sh`.
    pub fn build(cache: &Path) -> Result<GuestEnv> {
        let script = workspace_root().join("resources").join("build-guest.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(cache);
        let text = describe(&cmd);
        let out = run_cmd(&mut cmd, BUILD_TIMEOUT)?;
        if !out.status.success() {
            let tail: Vec<&str> = out.stderr.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(E2eError::GuestEnv(format!(
                "`{text}` failed ({}):\n{}",
                out.status,
                tail.join("\n")
            )));
        }
        Self::from_env_file(&cache.join("env.sh"))
    }

    /// Parses an `env.sh` written by the build script (`export KEY="value"` lines).
    pub fn from_env_file(path: &Path) -> Result<GuestEnv> {
        let text = std::fs::read_to_string(path).map_err(|source| E2eError::Io {
            path: path.to_owned(),
            source,
        })?;
        let get = |key: &str| -> Result<String> {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim_matches('"').to_owned())
                .ok_or_else(|| {
                    E2eError::GuestEnv(format!("{} does not export {key}", path.display()))
                })
        };
        let env = GuestEnv {
            qemu_system: get("QEMU_SYSTEM")?.into(),
            ld_library_path: get("QEMU_LD_LIBRARY_PATH")?,
            datadir_args: get("QEMU_DATADIRS")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            kernel: get("GUEST_KERNEL")?.into(),
            initrd: get("GUEST_INITRD")?.into(),
        };
        for p in [&env.qemu_system, &env.kernel, &env.initrd] {
            if !p.is_file() {
                return Err(E2eError::GuestEnv(format!(
                    "{} names {}, which does not exist",
                    path.display(),
                    p.display()
                )));
            }
        }
        Ok(env)
    }

    /// Boots the guest with the vhost-user-blk disk of `cfg` and runs `script` in it.
    /// The server must already listen on `cfg.socket`. QEMU is always killed on return.
    pub fn run(&self, cfg: &GuestConfig, script: &str) -> Result<GuestOutcome> {
        let sock = cfg.socket.to_string_lossy();
        if sock.contains(',') {
            return Err(E2eError::InvalidRequest(format!(
                "socket path {sock} contains a comma (QEMU option syntax)"
            )));
        }
        if cfg.num_queues == 0 || cfg.cpus == 0 || cfg.memory_mib < 64 {
            return Err(E2eError::InvalidRequest(format!(
                "bad guest config: {} queues, {} cpus, {} MiB",
                cfg.num_queues, cfg.cpus, cfg.memory_mib
            )));
        }
        if !cfg.socket.exists() {
            return Err(E2eError::InvalidRequest(format!(
                "no server socket at {sock}; start the backend first"
            )));
        }
        let dir = tempfile::tempdir().map_err(|source| E2eError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| E2eError::Io { path, source }
        };
        let script_path = dir.path().join("script.sh");
        std::fs::write(&script_path, script).map_err(io_err(&script_path))?;
        let serial = dir.path().join("serial.log");
        let stderr_path = dir.path().join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(io_err(&stderr_path))?;

        let accel = cfg.accel.unwrap_or_else(Accel::detect);
        let mut cmd = Command::new(&self.qemu_system);
        cmd.env("LD_LIBRARY_PATH", &self.ld_library_path)
            .args(&self.datadir_args)
            .args(["-bios", "qboot.rom", "-machine"])
            .arg(format!("q35,accel={}", accel.name()))
            .args(["-cpu", accel.cpu_model()])
            .args(["-smp", &cfg.cpus.to_string()])
            .args(["-m", &format!("{}M", cfg.memory_mib)])
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                cfg.memory_mib
            ))
            .args(["-numa", "node,memdev=mem", "-chardev"])
            .arg(format!(
                "socket,id=vu,path={sock}{}",
                reconnect_opt(cfg.reconnect)
            ))
            .arg("-device")
            .arg(format!(
                "vhost-user-blk-pci,chardev=vu,num-queues={}",
                cfg.num_queues
            ))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1 8250.nr_uarts=1"])
            .args(["-nodefaults", "-display", "none", "-no-reboot", "-serial"])
            .arg(format!("file:{}", serial.display()))
            .arg("-fw_cfg")
            .arg(format!(
                "name=opt/test/script,file={}",
                script_path.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let text = describe(&cmd);
        let start = Instant::now();
        let child = cmd.spawn().map_err(|source| E2eError::Spawn {
            cmd: text.clone(),
            source,
        })?;
        let mut guard = ChildGuard::new(child, &text);
        let deadline = start + cfg.timeout;
        let cancelled = || {
            cfg.cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst))
        };
        let (status, is_cancelled) = loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            let status = guard.wait_timeout(slice)?;
            if status.is_some() || Instant::now() >= deadline {
                break (status, false);
            }
            if cancelled() {
                break (None, true);
            }
        };
        let timed_out = status.is_none() && !is_cancelled;
        if status.is_none() {
            guard.kill();
        }
        let elapsed = start.elapsed();
        let serial_log = if serial.exists() {
            read_file_lossy(&serial).replace('\r', "")
        } else {
            String::new()
        };
        Ok(GuestOutcome {
            exit_status: parse_exit_marker(&serial_log),
            serial_log,
            qemu_stderr: read_file_lossy(&stderr_path),
            qemu_status: status,
            timed_out,
            cancelled: is_cancelled,
            elapsed,
        })
    }
}

/// The chardev option that makes QEMU reconnect to a vhost-user server that went away.
/// The guest's QEMU is 7.2 (from `resources/build-guest.sh`), which knows only
/// `reconnect=SECONDS` (`reconnect-ms` came with 9.2), so the delay is rounded up to
/// whole seconds (at least 1).
fn reconnect_opt(delay: Option<Duration>) -> String {
    match delay {
        None => String::new(),
        Some(d) => {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            format!(",reconnect={}", secs.max(1))
        }
    }
}

/// Last `E2E-EXIT <n>` marker in a serial log.
pub fn parse_exit_marker(log: &str) -> Option<i32> {
    log.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("E2E-EXIT ")
            .and_then(|n| n.trim().parse().ok())
    })
}

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization (only with real vmx/svm).
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// `$E2E_GUEST_ACCEL` (`kvm`/`tcg`) if set; KVM only when /dev/kvm exists and
    /// /proc/cpuinfo shows vmx or svm (a paravirtual nested KVM cannot run the guest);
    /// TCG otherwise.
    pub fn detect() -> Accel {
        match std::env::var("E2E_GUEST_ACCEL").as_deref() {
            Ok("kvm") => return Accel::Kvm,
            Ok("tcg") => return Accel::Tcg,
            _ => {}
        }
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw && Path::new("/dev/kvm").exists() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    fn cpu_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

/// How to boot the guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// vhost-user-blk server socket.
    pub socket: PathBuf,
    /// virtio-blk queues requested from the server.
    pub num_queues: u32,
    /// Guest CPUs (the driver uses at most one queue per CPU).
    pub cpus: u32,
    /// Guest RAM in MiB (shared memfd).
    pub memory_mib: u32,
    /// Limit from launch to power-off.
    pub timeout: Duration,
    /// Accelerator; `None` = [`Accel::detect`].
    pub accel: Option<Accel>,
    /// When set, QEMU reconnects to the vhost-user socket this long after the server
    /// went away (chardev `reconnect=`, whole seconds), and the guest's disk resumes
    /// with the server started again on the same path; `None` (the default): no
    /// reconnection.
    pub reconnect: Option<Duration>,
    /// When set, QEMU is killed as soon as the flag becomes true (e.g. a host-side part of
    /// the test failed and the guest would only wait for it until the timeout).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl GuestConfig {
    /// Defaults: one CPU per queue, 512 MiB, detected accelerator.
    pub fn new(socket: &Path, num_queues: u32, timeout: Duration) -> Self {
        Self {
            socket: socket.to_owned(),
            num_queues,
            cpus: num_queues.max(1),
            memory_mib: 512,
            timeout,
            accel: None,
            reconnect: None,
            cancel: None,
        }
    }

    /// The same with QEMU reconnecting to the socket `delay` after the server went away
    /// (see [`GuestConfig::reconnect`]).
    pub fn with_reconnect(mut self, delay: Duration) -> Self {
        self.reconnect = Some(delay);
        self
    }

    /// The same, killed early when `flag` becomes true (see [`GuestConfig::cancel`]).
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }
}

/// Result of one guest run.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// Status printed by the guest's `E2E-EXIT` marker (`None`: no marker, e.g. hang/crash).
    pub exit_status: Option<i32>,
    /// The serial console output.
    pub serial_log: String,
    /// QEMU's stderr.
    pub qemu_stderr: String,
    /// QEMU's exit status (`None` when it was killed on timeout).
    pub qemu_status: Option<ExitStatus>,
    /// Whether the timeout expired.
    pub timed_out: bool,
    /// Whether QEMU was killed because [`GuestConfig::cancel`] was set.
    pub cancelled: bool,
    /// Launch to exit.
    pub elapsed: Duration,
}

impl GuestOutcome {
    /// Ok when the script exited 0 and QEMU ended by itself; otherwise an error carrying
    /// the reason and the serial log.
    pub fn check_success(&self) -> Result<()> {
        let reason = if self.timed_out {
            format!("timed out after {:?}", self.elapsed)
        } else if self.cancelled {
            format!("cancelled by the test after {:?}", self.elapsed)
        } else if self.exit_status != Some(0) {
            match self.exit_status {
                Some(n) => format!("script exited with status {n}"),
                None => format!(
                    "no E2E-EXIT marker; qemu {}; qemu stderr: {}",
                    self.qemu_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "killed".into()),
                    self.qemu_stderr
                ),
            }
        } else {
            return Ok(());
        };
        Err(E2eError::GuestFailed {
            reason,
            serial_log: self.serial_log.clone(),
        })
    }
}

/// Convenience entry point.
#[derive(Debug)]
pub struct Guest;

impl Guest {
    /// Ensures the guest cache ([`GuestEnv::ensure`]) and runs `script` in a guest whose
    /// disk is served on `socket` with `num_queues` queues (and as many CPUs).
    pub fn run(
        socket: &Path,
        num_queues: u32,
        script: &str,
        timeout: Duration,
    ) -> Result<GuestOutcome> {
        GuestEnv::ensure()?.run(&GuestConfig::new(socket, num_queues, timeout), script)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_marker_takes_last_valid_line() {
        assert_eq!(
            parse_exit_marker("a\nE2E-EXIT 3\nE2E-EXIT 0\n[ 1.0] x"),
            Some(0)
        );
        assert_eq!(parse_exit_marker("E2E-EXIT 17\r"), Some(17));
        assert_eq!(parse_exit_marker("E2E-EXIT x\nnothing"), None);
        assert_eq!(parse_exit_marker(""), None);
    }

    #[test]
    fn reconnect_option_in_whole_seconds() {
        assert_eq!(reconnect_opt(None), "");
        assert_eq!(reconnect_opt(Some(Duration::from_secs(1))), ",reconnect=1");
        assert_eq!(
            reconnect_opt(Some(Duration::from_millis(1500))),
            ",reconnect=2"
        );
        assert_eq!(reconnect_opt(Some(Duration::ZERO)), ",reconnect=1");
    }
}
