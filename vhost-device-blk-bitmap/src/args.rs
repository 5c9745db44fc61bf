//! Command-line arguments (clap derive), in the vhost-device style. Values are checked
//! further when converted into a [`crate::config::Config`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Serve a qcow2 or raw disk image to a VMM as a vhost-user-blk device.
#[derive(Parser, Debug)]
#[command(name = "vhost-device-blk-bitmap", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Options for serving an image (used when no subcommand is given).
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Offline image maintenance subcommands.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands; serving is the default when none is given.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Manage the persistent dirty bitmaps of a qcow2 image no daemon is serving (what
    /// `qemu-img bitmap` does).
    #[command(subcommand)]
    Bitmap(crate::tool::args::BitmapCommand),
    /// Create a qcow2 image.
    Create(crate::tool::args::CreateArgs),
    /// Check a qcow2 image's refcounts (exit 0 clean, 1 check failed, 2 corruptions,
    /// 3 leaks only), optionally repairing it.
    Check(crate::tool::args::CheckArgs),
    /// Talk to a running daemon's QMP control socket: `bitmap add|remove|clear|enable|
    /// disable|merge|dump ...`, `query` (a table of bitmaps and counters), `raw JSON`, or
    /// any QMP command with its arguments as JSON (`query-blockstats`,
    /// `block-dirty-bitmap-add '{"node":"disk0","name":"b1"}'`).
    Ctl(crate::tool::args::CtlArgs),
    /// Print the manual page (roff) generated from these definitions, or write it and one
    /// page per subcommand into --dir (hidden: for packagers and resources/install-man.sh).
    #[command(hide = true)]
    Man(crate::tool::man::ManArgs),
}

/// Image formats.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatArg {
    /// QEMU qcow2 (version 2 or 3).
    Qcow2,
    /// Raw: the file is the disk.
    Raw,
}

/// How the queue workers do their I/O.
#[derive(ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AioArg {
    /// io_uring: many requests in flight per queue, guest memory handed to the kernel.
    #[default]
    #[value(name = "io_uring")]
    IoUring,
    /// One synchronous request at a time per queue thread.
    Threads,
}

/// Which backing files a qcow2 image may name.
#[derive(ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackingArg {
    /// Any file, as QEMU does.
    Allow,
    /// None: an image with a backing file is refused.
    Deny,
    /// Only regular files in the image's directory tree (after resolving symlinks).
    #[default]
    WithinDir,
}

/// Options of the serving mode.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeArgs {
    /// Location of the vhost-user Unix domain socket (created; a stale one is replaced).
    /// Not needed with --socket-fd or under systemd socket activation (LISTEN_FDS).
    #[arg(short = 's', long, value_name = "SOCKET")]
    pub socket_path: Option<PathBuf>,

    /// Serve on an already listening unix stream socket inherited as this file
    /// descriptor (3 or more) instead of creating --socket-path; it is never unlinked.
    #[arg(long, value_name = "FD")]
    pub socket_fd: Option<i32>,

    /// Mode of the vhost-user socket, octal (default 0600: whoever can connect gets the
    /// whole disk).
    #[arg(long, value_name = "OCTAL")]
    pub socket_mode: Option<String>,

    /// Group owner of the vhost-user socket (a name or a number), e.g. the VMM's group
    /// together with --socket-mode 0660.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// The disk image to serve.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,

    /// Image format; probed from the file's first bytes when absent.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,

    /// Serve the disk read-only (the guest sees a read-only device).
    #[arg(long)]
    pub readonly: bool,

    /// Number of request virtqueues (1-64), each served by its own thread.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_queues: u16,

    /// Largest virtqueue size a frontend may configure (power of two, 2-32768).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub queue_size: u32,

    /// Logical block size reported to the guest in bytes (512 or 4096).
    #[arg(long, default_value_t = 512, value_name = "BYTES")]
    pub logical_block_size: u32,

    /// Serial number answered to GET_ID (at most 20 bytes).
    #[arg(long, default_value = "vhost_user_blk", value_name = "STRING")]
    pub serial: String,

    /// Which backing files a qcow2 image may name: within-dir (regular files in the
    /// image's directory tree, after resolving symlinks), allow (any, as QEMU), deny.
    /// Backing files are opened read-only and locked against writers as QEMU does.
    #[arg(long, value_enum, default_value_t = BackingArg::WithinDir, value_name = "POLICY")]
    pub backing: BackingArg,

    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,

    /// I/O engine of the queue workers: io_uring (many requests in flight per queue;
    /// falls back to threads, with a log line saying why, where io_uring is missing or
    /// forbidden) or threads (one synchronous request at a time per queue).
    #[arg(long, value_enum, default_value_t = AioArg::IoUring, value_name = "ENGINE")]
    pub aio: AioArg,

    /// Start with the guest-visible write cache disabled (writethrough: every write is
    /// flushed before it completes). The guest may change it later.
    #[arg(long)]
    pub writethrough: bool,

    /// Persistent dirty bitmap to record guest writes into, as NAME[,granularity=SIZE]
    /// (SIZE a power of two from 512 to 2G, suffixes K/M/G). Repeatable.
    #[arg(long = "bitmap", value_name = "NAME[,granularity=SIZE]")]
    pub bitmaps: Vec<String>,

    /// Most memory all bitmaps of the image may take once loaded (suffixes K, M, G);
    /// an image whose bitmaps need more is refused with a message naming this cap.
    #[arg(long, default_value = "1G", value_name = "SIZE")]
    pub max_bitmap_memory: String,

    /// Do not keep the crash-consistency shadow of the bitmaps: a crash (kill -9, power
    /// loss) then leaves them in use and unusable, as with QEMU, instead of recoverable.
    #[arg(long)]
    pub no_crash_consistent_bitmaps: bool,

    /// Create the image with this virtual size when it does not exist (suffixes K, M, G,
    /// T, P; binary units). If it exists, its size must match.
    #[arg(long, value_name = "SIZE")]
    pub create_size: Option<String>,

    /// Serve QMP (QEMU's control protocol: bitmap commands, transactions, statistics)
    /// on this unix socket, mode 0600.
    #[arg(long, value_name = "PATH")]
    pub qmp_socket: Option<PathBuf>,

    /// The node name of the served disk in QMP commands.
    #[arg(long, default_value = "disk0", value_name = "NAME")]
    pub node_name: String,

    /// Export the disk over NBD on this unix socket (mode 0600), read-only unless
    /// --export-writable. QMP's nbd-server-start/block-export-add do the same at run time.
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,

    /// Export the disk over NBD on this TCP address (HOST:PORT; the host is required,
    /// there is no default on all interfaces).
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd_listen: Option<String>,

    /// NBD export name of the --nbd-socket/--nbd-listen export (default: empty, what
    /// `nbd+unix:///?socket=PATH` asks for).
    #[arg(long, default_value = "", value_name = "NAME")]
    pub export_name: String,

    /// Export this bitmap as the NBD meta context `qemu:dirty-bitmap:NAME` (it is busy
    /// while exported). Repeatable.
    #[arg(long = "export-bitmap", value_name = "NAME")]
    pub export_bitmaps: Vec<String>,

    /// Let NBD clients of the command-line export write.
    #[arg(long)]
    pub export_writable: bool,

    /// Directory of the fleecing stores of point-in-time exports (sparse, unlinked
    /// temporary files). Default: the image's directory.
    #[arg(long, value_name = "DIR")]
    pub fleece_dir: Option<PathBuf>,
}
