//! Validated daemon configuration, built from the command line with `TryFrom`.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::args::{AioArg, FormatArg, ServeArgs};
use crate::disk::ImageFormat;
use crate::virtio_blk::ID_BYTES;

/// Largest number of queues: vhost-user-backend assigns queues to threads with 64-bit masks.
pub const MAX_QUEUES: u16 = 64;
/// Largest virtqueue size allowed by virtio (split rings).
pub const MAX_QUEUE_SIZE: u32 = 32768;
/// Longest bitmap name QEMU accepts.
pub const MAX_BITMAP_NAME: usize = 1023;

/// A bad command-line value; the message is one line naming the option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// A `--bitmap` request: record writes into the persistent bitmap `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSpec {
    /// Bitmap name.
    pub name: String,
    /// Granularity in bytes when the bitmap has to be created; `None` = default.
    pub granularity: Option<u64>,
}

/// How the queue workers do their I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Aio {
    /// io_uring per queue (falls back to `Threads` when unavailable).
    #[default]
    IoUring,
    /// One synchronous request at a time per queue thread.
    Threads,
}

/// Where the vhost-user socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostSocket {
    /// `--socket-path`: created with mode 0600 (or `--socket-mode`), removed at exit if
    /// it is still ours.
    Path(PathBuf),
    /// An already listening unix stream socket inherited as a descriptor (`--socket-fd`
    /// or socket activation): served as it is, never chmod-ed nor unlinked (it belongs to
    /// whoever created it).
    Inherited(InheritedSocket),
}

/// A listening socket we were given (checked: an open `AF_UNIX` `SOCK_STREAM` socket in
/// listening state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InheritedSocket {
    /// The descriptor; the server takes ownership of it when it starts.
    pub fd: RawFd,
    /// Passed by socket activation (`LISTEN_FDS`) rather than `--socket-fd`.
    pub activated: bool,
    /// Its `LISTEN_FDNAMES` name, if any.
    pub name: Option<String>,
    /// The address it is bound to (a path, or `@name` in the abstract namespace).
    pub address: Option<PathBuf>,
}

impl VhostSocket {
    /// The socket's path, if it has one on the file system.
    pub fn path(&self) -> Option<&Path> {
        match self {
            VhostSocket::Path(p) => Some(p),
            VhostSocket::Inherited(i) => i
                .address
                .as_deref()
                .filter(|a| !a.as_os_str().as_encoded_bytes().starts_with(b"@")),
        }
    }
}

impl std::fmt::Display for VhostSocket {
    /// The path (or `@name`), else `fd N`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VhostSocket::Path(p) => write!(f, "{}", p.display()),
            VhostSocket::Inherited(InheritedSocket {
                address: Some(a), ..
            }) => write!(f, "{}", a.display()),
            VhostSocket::Inherited(i) => write!(f, "fd {}", i.fd),
        }
    }
}

/// Everything the daemon needs to serve, already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Socket to listen on.
    pub socket: VhostSocket,
    /// Image path.
    pub image: PathBuf,
    /// Image format, `None` = probe.
    pub format: Option<ImageFormat>,
    /// Read-only device.
    pub read_only: bool,
    /// Request queues (1..=64).
    pub num_queues: u16,
    /// Maximum queue size (power of two).
    pub queue_size: u16,
    /// Logical block size (512 or 4096).
    pub logical_block_size: u32,
    /// GET_ID serial (≤ 20 bytes).
    pub serial: Vec<u8>,
    /// O_DIRECT.
    pub direct: bool,
    /// I/O engine.
    pub aio: Aio,
    /// Initial wce byte: write cache enabled.
    pub writeback: bool,
    /// Bitmaps to record into.
    pub bitmaps: Vec<BitmapSpec>,
    /// Create the image with this size when missing.
    pub create_size: Option<u64>,
    /// QMP control socket.
    pub qmp_socket: Option<PathBuf>,
    /// Node name in QMP.
    pub node_name: String,
    /// The NBD server started at once, if any.
    pub nbd: Option<crate::exports::NbdAddr>,
    /// The export made at start (with `nbd`).
    pub export: crate::exports::ExportSpec,
    /// Where fleecing stores go.
    pub fleece_dir: PathBuf,
    /// Which backing files the image may name.
    pub backing: qcow2::BackingPolicy,
    /// Mode and group of the vhost-user socket.
    pub socket_access: crate::server::SocketAccess,
    /// Cap on the memory of the loaded bitmaps.
    pub max_bitmap_memory: u64,
    /// Keep the crash-consistency shadow of the bitmaps.
    pub crash_consistent_bitmaps: bool,
}

/// Whether two paths name the same file (or the same path when neither exists yet).
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

/// Checks a node name as QEMU does: a letter, then letters, digits, `-`, `.` and `_`,
/// 31 characters at most.
pub fn check_node_name(name: &str) -> Result<(), ConfigError> {
    let ok = name.len() <= 31
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "invalid --node-name '{name}': start with a letter, use letters, digits, '-', '.' \
             and '_', at most 31 characters"
        )))
    }
}

/// Parses a size such as `4096`, `64K`, `10G` (binary units; optional trailing `B`/`iB`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || {
        bad(format!(
            "invalid size '{s}': expected a whole number with an optional K, M, G, T or P suffix"
        ))
    };
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(err()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| bad(format!("invalid size '{s}': too large")))
}

/// Parses `NAME[,granularity=SIZE]`.
pub fn parse_bitmap(s: &str) -> Result<BitmapSpec, ConfigError> {
    let mut parts = s.split(',');
    let name = parts.next().unwrap_or_default();
    if name.is_empty() {
        return Err(bad(format!("--bitmap '{s}': the bitmap name is empty")));
    }
    if name.len() > MAX_BITMAP_NAME {
        return Err(bad(format!(
            "--bitmap: name is {} bytes, the limit is {MAX_BITMAP_NAME}",
            name.len()
        )));
    }
    let mut granularity = None;
    for opt in parts {
        match opt.split_once('=') {
            Some(("granularity", v)) => {
                let g =
                    parse_size(v).map_err(|e| bad(format!("--bitmap {name}: granularity: {e}")))?;
                if !g.is_power_of_two() || !(512..=(2u64 << 30)).contains(&g) {
                    return Err(bad(format!(
                        "--bitmap {name}: granularity {g} must be a power of two from 512 to 2G"
                    )));
                }
                if granularity.replace(g).is_some() {
                    return Err(bad(format!("--bitmap {name}: granularity given twice")));
                }
            }
            _ => {
                return Err(bad(format!(
                    "--bitmap {name}: unknown option '{opt}' (expected granularity=SIZE)"
                )))
            }
        }
    }
    Ok(BitmapSpec {
        name: name.to_owned(),
        granularity,
    })
}

/// Which vhost-user socket to serve: `--socket-path`, `--socket-fd` or the socket passed
/// by socket activation; exactly one of them. Inherited descriptors are checked here.
fn vhost_socket(
    a: &ServeArgs,
    activation: Option<&crate::systemd::Activation>,
) -> Result<VhostSocket, ConfigError> {
    let inherited = |fd: RawFd, activated, name: Option<&str>| {
        let what = if activated {
            "socket activation (LISTEN_FDS)".to_string()
        } else {
            format!("--socket-fd {fd}")
        };
        let address = crate::systemd::check_listening_unix_socket(fd).map_err(|e| {
            bad(format!(
                "{what}: {e}; expected a listening unix stream socket"
            ))
        })?;
        if a.socket_mode.is_some() || a.socket_group.is_some() {
            return Err(bad(format!(
                "--socket-mode/--socket-group cannot be used with {what}: whoever created \
                 the socket sets its mode and group (SocketMode=, SocketGroup= in a .socket unit)"
            )));
        }
        Ok(VhostSocket::Inherited(InheritedSocket {
            fd,
            activated,
            name: name.map(str::to_owned),
            address,
        }))
    };
    match (&a.socket_path, a.socket_fd, activation) {
        (Some(_), Some(_), _) => Err(bad("--socket-path and --socket-fd cannot be used together")),
        (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
            let opt = if a.socket_fd.is_some() {
                "--socket-fd"
            } else {
                "--socket-path"
            };
            Err(bad(format!(
                "socket activation passed a socket (LISTEN_FDS) and {opt} was given: leave \
                 {opt} out, the activated socket is served"
            )))
        }
        (Some(p), None, None) => Ok(VhostSocket::Path(p.clone())),
        (None, Some(fd), None) => {
            if fd < crate::systemd::LISTEN_FDS_START {
                return Err(bad(format!(
                    "--socket-fd {fd}: must be 3 or more (0, 1 and 2 are stdin, stdout and stderr)"
                )));
            }
            inherited(fd, false, None)
        }
        (None, None, Some(act)) => {
            let (fd, name) = act.vhost_user_socket();
            inherited(fd, true, name)
        }
        (None, None, None) => Err(bad(
            "--socket-path is required (or --socket-fd, or systemd socket activation)",
        )),
    }
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    /// The configuration without socket activation (see [`Config::from_args`]).
    fn try_from(a: ServeArgs) -> Result<Self, ConfigError> {
        Config::from_args(a, None)
    }
}

impl Config {
    /// Checks the command line; `activation` is what socket activation passed (see
    /// [`crate::systemd::take_activation`]), whose socket then replaces `--socket-path`.
    pub fn from_args(
        a: ServeArgs,
        activation: Option<&crate::systemd::Activation>,
    ) -> Result<Self, ConfigError> {
        let socket = vhost_socket(&a, activation)?;
        let image = a.image.ok_or_else(|| bad("--image is required"))?;
        if a.num_queues == 0 || a.num_queues > MAX_QUEUES {
            return Err(bad(format!(
                "--num-queues {} is out of range (1-{MAX_QUEUES})",
                a.num_queues
            )));
        }
        if !a.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&a.queue_size) {
            return Err(bad(format!(
                "--queue-size {} must be a power of two from 2 to {MAX_QUEUE_SIZE}",
                a.queue_size
            )));
        }
        if a.logical_block_size != 512 && a.logical_block_size != 4096 {
            return Err(bad(format!(
                "--logical-block-size {} must be 512 or 4096",
                a.logical_block_size
            )));
        }
        if a.serial.len() > ID_BYTES {
            return Err(bad(format!(
                "--serial is {} bytes long, the limit is {ID_BYTES}",
                a.serial.len()
            )));
        }
        let mut bitmaps: Vec<BitmapSpec> = Vec::new();
        for b in &a.bitmaps {
            let spec = parse_bitmap(b)?;
            if bitmaps.iter().any(|x| x.name == spec.name) {
                return Err(bad(format!("--bitmap {} given twice", spec.name)));
            }
            bitmaps.push(spec);
        }
        if a.readonly && !bitmaps.is_empty() {
            return Err(bad(
                "--bitmap cannot be used with --readonly (nothing is written)",
            ));
        }
        let create_size = match &a.create_size {
            None => None,
            Some(s) => {
                let n = parse_size(s).map_err(|e| bad(format!("--create-size: {e}")))?;
                if n == 0 || n % u64::from(a.logical_block_size) != 0 {
                    return Err(bad(format!(
                        "--create-size {n} must be a positive multiple of the logical block size {}",
                        a.logical_block_size
                    )));
                }
                if a.readonly {
                    return Err(bad("--create-size cannot be used with --readonly"));
                }
                Some(n)
            }
        };
        check_node_name(&a.node_name)?;
        let max_bitmap_memory = parse_size(&a.max_bitmap_memory)
            .map_err(|e| bad(format!("--max-bitmap-memory: {e}")))?;
        let socket_access = socket_access(a.socket_mode.as_deref(), a.socket_group.as_deref())?;
        let nbd = match (&a.nbd_socket, &a.nbd_listen) {
            (Some(_), Some(_)) => {
                return Err(bad("--nbd-socket and --nbd-listen cannot be used together"))
            }
            (Some(p), None) => {
                if same_file(p, &image) || socket.path().is_some_and(|s| same_file(p, s)) {
                    return Err(bad(format!(
                        "--nbd-socket '{}' names the image or the vhost-user socket",
                        p.display()
                    )));
                }
                Some(crate::exports::NbdAddr::Unix(p.clone()))
            }
            (None, Some(addr)) => Some(parse_listen(addr)?),
            (None, None) => None,
        };
        if nbd.is_none() && (a.export_writable || !a.export_bitmaps.is_empty()) {
            return Err(bad(
                "--export-writable and --export-bitmap need --nbd-socket or --nbd-listen",
            ));
        }
        if a.export_writable && a.readonly {
            return Err(bad("--export-writable cannot be used with --readonly"));
        }
        if a.export_name.len() > 4096 {
            return Err(bad("--export-name is longer than NBD's 4096 bytes"));
        }
        let fleece_dir = match a.fleece_dir {
            Some(d) => {
                if !d.is_dir() {
                    return Err(bad(format!(
                        "--fleece-dir '{}' is not a directory",
                        d.display()
                    )));
                }
                d
            }
            None => match image.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            },
        };
        let export = crate::exports::ExportSpec {
            id: "cli0".into(),
            name: a.export_name,
            description: None,
            writable: a.export_writable,
            bitmaps: a.export_bitmaps,
            allocation_depth: true,
            snapshot: false,
        };
        if let VhostSocket::Path(p) = &socket {
            if same_file(p, &image) {
                return Err(bad(format!(
                    "--socket-path '{}' is the image: the socket would replace it",
                    p.display()
                )));
            }
        }
        Ok(Config {
            socket,
            image,
            format: a.format.map(|f| match f {
                FormatArg::Qcow2 => ImageFormat::Qcow2,
                FormatArg::Raw => ImageFormat::Raw,
            }),
            read_only: a.readonly,
            num_queues: a.num_queues,
            queue_size: a.queue_size as u16,
            logical_block_size: a.logical_block_size,
            serial: a.serial.into_bytes(),
            direct: a.direct,
            aio: match a.aio {
                AioArg::IoUring => Aio::IoUring,
                AioArg::Threads => Aio::Threads,
            },
            writeback: !a.writethrough,
            bitmaps,
            create_size,
            qmp_socket: a.qmp_socket,
            node_name: a.node_name,
            nbd,
            export,
            fleece_dir,
            socket_access,
            max_bitmap_memory,
            crash_consistent_bitmaps: !a.no_crash_consistent_bitmaps,
            backing: match a.backing {
                crate::args::BackingArg::Allow => qcow2::BackingPolicy::Allow,
                crate::args::BackingArg::Deny => qcow2::BackingPolicy::Deny,
                crate::args::BackingArg::WithinDir => qcow2::BackingPolicy::WithinDir,
            },
        })
    }
}

/// `--socket-mode` and `--socket-group`.
fn socket_access(
    mode: Option<&str>,
    group: Option<&str>,
) -> Result<crate::server::SocketAccess, ConfigError> {
    let mut access = crate::server::SocketAccess::default();
    if let Some(m) = mode {
        access.mode = u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|&m| m <= 0o777)
            .ok_or_else(|| {
                bad(format!(
                    "--socket-mode '{m}': expected an octal mode like 0660"
                ))
            })?;
        if access.mode & 0o600 != 0o600 {
            return Err(bad(format!(
                "--socket-mode {:04o} must let the owner read and write",
                access.mode
            )));
        }
        if access.mode & 0o007 != 0 {
            log::warn!(
                "--socket-mode {:04o}: every local user can connect and read or write the disk",
                access.mode
            );
        }
    }
    if let Some(g) = group {
        access.gid = Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                group_id(g).ok_or_else(|| bad(format!("--socket-group '{g}': no such group")))?
            }
        });
    }
    Ok(access)
}

/// The id of group `name` (getgrnam_r).
fn group_id(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: group and result are plain C structs we own; all-zero is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to memory we own for the duration of the call, and
    // `buf.len()` is its size; getgrnam_r writes only into grp, buf and result.
    let r = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (r == 0 && !result.is_null()).then_some(grp.gr_gid)
}

/// `--nbd-listen HOST:PORT` (an IPv6 host in brackets: `[::1]:10809`).
fn parse_listen(addr: &str) -> Result<crate::exports::NbdAddr, ConfigError> {
    let err = || {
        bad(format!(
            "--nbd-listen '{addr}': expected HOST:PORT, e.g. 127.0.0.1:10809"
        ))
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(err)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(err());
    }
    Ok(crate::exports::NbdAddr::Inet {
        host: host.to_string(),
        port: port.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Cli;
    use clap::Parser;

    fn cfg(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec![
            "vhost-device-blk-bitmap",
            "-s",
            "/tmp/s.sock",
            "--image",
            "/tmp/i",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::try_from(cli.serve).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.socket, VhostSocket::Path("/tmp/s.sock".into()));
        assert_eq!(c.image, PathBuf::from("/tmp/i"));
        assert_eq!(c.format, None);
        assert!(!c.read_only && !c.direct && c.writeback);
        assert_eq!(
            (c.num_queues, c.queue_size, c.logical_block_size),
            (1, 1024, 512)
        );
        assert_eq!(c.serial, b"vhost_user_blk");
        assert!(c.bitmaps.is_empty());
        assert_eq!(c.create_size, None);
        assert_eq!((c.qmp_socket, c.node_name.as_str()), (None, "disk0"));
        assert_eq!(c.aio, Aio::IoUring);
        assert_eq!(c.backing, qcow2::BackingPolicy::WithinDir);
        assert_eq!(c.socket_access, crate::server::SocketAccess::default());
        assert_eq!(c.max_bitmap_memory, 1 << 30);
        assert_eq!(
            cfg(&["--max-bitmap-memory", "64M"])
                .unwrap()
                .max_bitmap_memory,
            64 << 20
        );
        assert!(cfg(&["--max-bitmap-memory", "lots"])
            .unwrap_err()
            .contains("--max-bitmap-memory"));
        let c = cfg(&["--socket-mode", "0660", "--socket-group", "root"]).unwrap();
        assert_eq!(
            (c.socket_access.mode, c.socket_access.gid),
            (0o660, Some(0))
        );
        let c = cfg(&["--socket-group", "4242"]).unwrap();
        assert_eq!(c.socket_access.gid, Some(4242));
        for (args, want) in [
            (&["--socket-mode", "999"][..], "octal"),
            (&["--socket-mode", "0440"][..], "read and write"),
            (
                &["--socket-group", "no-such-group-here"][..],
                "no such group",
            ),
        ] {
            let e = cfg(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        let c = cfg(&["--backing", "allow"]).unwrap();
        assert_eq!(c.backing, qcow2::BackingPolicy::Allow);
        let e = cfg(&["--backing", "anywhere"]).unwrap_err();
        assert!(e.contains("within-dir"), "{e}");
    }

    #[test]
    fn nbd_export_options() {
        use crate::exports::NbdAddr;
        let c = cfg(&[]).unwrap();
        assert_eq!(c.nbd, None);
        assert_eq!(c.fleece_dir, PathBuf::from("/tmp"), "next to the image");
        let c = cfg(&[
            "--nbd-socket",
            "/tmp/n.sock",
            "--export-bitmap",
            "b0",
            "--export-bitmap",
            "b1",
            "--export-name",
            "vm",
            "--fleece-dir",
            "/",
        ])
        .unwrap();
        assert_eq!(c.nbd, Some(NbdAddr::Unix("/tmp/n.sock".into())));
        assert_eq!(c.export.bitmaps, ["b0", "b1"]);
        assert_eq!((c.export.name.as_str(), c.export.writable), ("vm", false));
        assert_eq!(c.fleece_dir, PathBuf::from("/"));
        let c = cfg(&["--nbd-listen", "[::1]:10809", "--export-writable"]).unwrap();
        assert_eq!(
            c.nbd,
            Some(NbdAddr::Inet {
                host: "::1".into(),
                port: "10809".into()
            })
        );
        assert!(c.export.writable);
        for (args, want) in [
            (&["--nbd-listen", "10809"][..], "expected HOST:PORT"),
            (&["--nbd-listen", ":10809"][..], "expected HOST:PORT"),
            (
                &["--nbd-listen", "localhost:http"][..],
                "expected HOST:PORT",
            ),
            (&["--export-bitmap", "b0"][..], "need --nbd-socket"),
            (
                &["--nbd-socket", "/tmp/a", "--nbd-listen", "h:1"][..],
                "cannot be used together",
            ),
            (&["--nbd-socket", "/tmp/s.sock"][..], "names the image or"),
            (
                &["--nbd-socket", "/tmp/n", "--export-writable", "--readonly"][..],
                "--readonly",
            ),
            (&["--fleece-dir", "/nonexistent/x"][..], "not a directory"),
        ] {
            let e = cfg(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn control_and_engine_options() {
        let c = cfg(&[
            "--qmp-socket",
            "/tmp/q.sock",
            "--node-name",
            "drive-virtio0",
            "--aio",
            "threads",
        ])
        .unwrap();
        assert_eq!(c.qmp_socket, Some(PathBuf::from("/tmp/q.sock")));
        assert_eq!(c.node_name, "drive-virtio0");
        assert_eq!(c.aio, Aio::Threads);
        for bad in ["0abc", "a b", "", &"x".repeat(32)] {
            let e = cfg(&["--node-name", bad]).unwrap_err();
            assert!(e.contains("invalid --node-name"), "{bad}: {e}");
        }
        let e = cfg(&["--aio", "posix"]).unwrap_err();
        assert!(e.contains("io_uring") && e.contains("threads"), "{e}");
    }

    #[test]
    fn all_options() {
        let c = cfg(&[
            "--format",
            "qcow2",
            "--readonly",
            "--num-queues",
            "4",
            "--queue-size",
            "256",
            "--logical-block-size",
            "4096",
            "--serial",
            "abc",
            "--direct",
            "--writethrough",
        ])
        .unwrap();
        assert_eq!(c.format, Some(ImageFormat::Qcow2));
        assert!(c.read_only && c.direct && !c.writeback);
        assert_eq!(
            (c.num_queues, c.queue_size, c.logical_block_size),
            (4, 256, 4096)
        );
        assert_eq!(c.serial, b"abc");
        let c = cfg(&[
            "--bitmap",
            "b0",
            "--bitmap",
            "b1,granularity=64K",
            "--create-size",
            "1G",
        ])
        .unwrap();
        assert_eq!(
            c.bitmaps,
            vec![
                BitmapSpec {
                    name: "b0".into(),
                    granularity: None
                },
                BitmapSpec {
                    name: "b1".into(),
                    granularity: Some(65536)
                }
            ]
        );
        assert_eq!(c.create_size, Some(1 << 30));
    }

    #[test]
    fn bad_values_have_clear_errors() {
        let cases: &[(&[&str], &str)] = &[
            (&["--num-queues", "0"], "--num-queues 0 is out of range"),
            (&["--num-queues", "65"], "--num-queues 65 is out of range"),
            (
                &["--queue-size", "100"],
                "--queue-size 100 must be a power of two",
            ),
            (
                &["--queue-size", "65536"],
                "--queue-size 65536 must be a power of two",
            ),
            (&["--logical-block-size", "1024"], "must be 512 or 4096"),
            (
                &["--serial", "123456789012345678901"],
                "--serial is 21 bytes long",
            ),
            (&["--bitmap", ""], "the bitmap name is empty"),
            (
                &["--bitmap", "a,granularity=1000"],
                "must be a power of two from 512",
            ),
            (
                &["--bitmap", "a,granularity=256"],
                "must be a power of two from 512",
            ),
            (&["--bitmap", "a,foo=1"], "unknown option 'foo=1'"),
            (
                &["--bitmap", "a", "--bitmap", "a"],
                "--bitmap a given twice",
            ),
            (
                &["--bitmap", "a", "--readonly"],
                "cannot be used with --readonly",
            ),
            (&["--create-size", "12X"], "invalid size '12X'"),
            (&["--create-size", "0"], "positive multiple"),
            (&["--create-size", "1000"], "positive multiple"),
            (
                &["--create-size", "1G", "--readonly"],
                "--create-size cannot be used",
            ),
            (&["--format", "vmdk"], "invalid value 'vmdk'"),
        ];
        for (args, want) in cases {
            let err = cfg(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn required_options() {
        let cli = Cli::try_parse_from(["x", "--image", "/i"]).unwrap();
        assert_eq!(
            Config::try_from(cli.serve).unwrap_err().to_string(),
            "--socket-path is required (or --socket-fd, or systemd socket activation)"
        );
        let cli = Cli::try_parse_from(["x", "-s", "/s"]).unwrap();
        assert_eq!(
            Config::try_from(cli.serve).unwrap_err().to_string(),
            "--image is required"
        );
    }

    /// `--socket-fd` and socket activation: one listening unix stream socket, exactly
    /// one source, no mode or group of ours.
    #[test]
    fn inherited_sockets() {
        use crate::systemd::Activation;
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd = listener.as_raw_fd();
        let args = |extra: &[&str]| {
            let mut argv = vec!["x", "--image", "/tmp/i"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap().serve
        };
        let fd_arg = fd.to_string();
        let c = Config::try_from(args(&["--socket-fd", &fd_arg])).unwrap();
        let want = InheritedSocket {
            fd,
            activated: false,
            name: None,
            address: Some(path.clone()),
        };
        assert_eq!(c.socket, VhostSocket::Inherited(want.clone()));
        assert_eq!(c.socket.path(), Some(path.as_path()));
        assert_eq!(c.socket.to_string(), path.display().to_string());

        let act = Activation {
            fds: vec![(fd, Some("vhost-user".into()))],
        };
        let c = Config::from_args(args(&[]), Some(&act)).unwrap();
        assert_eq!(
            c.socket,
            VhostSocket::Inherited(InheritedSocket {
                activated: true,
                name: Some("vhost-user".into()),
                ..want
            })
        );

        let file = std::fs::File::open("/dev/null").unwrap();
        let file_arg = file.as_raw_fd().to_string();
        let cases: &[(&[&str], bool, &str)] = &[
            (
                &["--socket-fd", &fd_arg, "-s", "/tmp/s"],
                false,
                "--socket-path and --socket-fd cannot be used together",
            ),
            (
                &["--socket-fd", "2"],
                false,
                "--socket-fd 2: must be 3 or more",
            ),
            (
                &["--socket-fd", &file_arg],
                false,
                &format!("--socket-fd {file_arg}: fd {file_arg} is not a socket; expected a listening unix stream socket"),
            ),
            (
                &["--socket-fd", "999999"],
                false,
                "fd 999999 is not open",
            ),
            (
                &["--socket-fd", &fd_arg, "--socket-mode", "0660"],
                false,
                "--socket-mode/--socket-group cannot be used with --socket-fd",
            ),
            (
                &["-s", "/tmp/s"],
                true,
                "socket activation passed a socket (LISTEN_FDS) and --socket-path was given",
            ),
            (
                &["--socket-fd", &fd_arg],
                true,
                "and --socket-fd was given",
            ),
        ];
        for (extra, activated, want) in cases {
            let e = Config::from_args(args(extra), activated.then_some(&act))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let not_a_socket = Activation {
            fds: vec![(file.as_raw_fd(), None)],
        };
        let e = Config::from_args(args(&[]), Some(&not_a_socket))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("socket activation (LISTEN_FDS): fd ") && e.contains("is not a socket"),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("3G").unwrap(), 3 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1P").unwrap(), 1 << 50);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("10MB").unwrap(), 10 << 20);
        for bad in ["", "G", "1.5G", "-1", "1Q", "99999999999P"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
