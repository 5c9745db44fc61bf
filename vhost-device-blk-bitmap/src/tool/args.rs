//! Arguments of the offline subcommands (`bitmap …`, `create`, `check`).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

/// `bitmap` operations, one per invocation (like `qemu-img bitmap` with one operation).
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum BitmapCommand {
    /// Add a new persistent bitmap (recording unless --disabled).
    Add(AddArgs),
    /// Remove a bitmap (also an inconsistent one) from the image.
    Remove(NameArgs),
    /// Clear every bit of a bitmap.
    Clear(NameArgs),
    /// Make a bitmap record writes again.
    Enable(NameArgs),
    /// Stop a bitmap from recording writes.
    Disable(NameArgs),
    /// OR one or more source bitmaps into TARGET.
    Merge(MergeArgs),
    /// List the bitmaps of an image (read-only).
    List(ListArgs),
    /// Print every clean and dirty extent of a bitmap as JSON (read-only).
    Dump(NameArgs),
}

impl BitmapCommand {
    /// The image the operation works on.
    pub fn image(&self) -> &std::path::Path {
        match self {
            BitmapCommand::Add(a) => &a.image,
            BitmapCommand::Remove(a)
            | BitmapCommand::Clear(a)
            | BitmapCommand::Enable(a)
            | BitmapCommand::Disable(a)
            | BitmapCommand::Dump(a) => &a.image,
            BitmapCommand::Merge(a) => &a.image,
            BitmapCommand::List(a) => &a.image,
        }
    }
}

/// An image and one bitmap of it.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct NameArgs {
    /// The qcow2 image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Bitmap name.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// `bitmap add`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct AddArgs {
    /// The qcow2 image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Name of the new bitmap.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Bytes covered by one bit: a power of two from 512 to 2G (suffixes K, M, G).
    /// Default: the cluster size clamped to 4K..64K, as QEMU.
    #[arg(short = 'g', long, value_name = "SIZE")]
    pub granularity: Option<String>,
    /// Create the bitmap disabled (not recording writes).
    #[arg(long)]
    pub disabled: bool,
}

/// `bitmap merge`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct MergeArgs {
    /// The qcow2 image holding TARGET.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Bitmap that receives the union.
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// Source bitmap name (repeatable); merged in the order given.
    #[arg(long = "source", value_name = "NAME", required = true)]
    pub sources: Vec<String>,
    /// Take the sources from this other qcow2 image (opened read-only).
    #[arg(long, value_name = "OTHER")]
    pub source_image: Option<PathBuf>,
}

/// `bitmap list`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ListArgs {
    /// The qcow2 image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Backing file formats accepted by `create`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl BackingFormat {
    /// The name recorded in the image header.
    pub fn name(self) -> &'static str {
        match self {
            BackingFormat::Raw => "raw",
            BackingFormat::Qcow2 => "qcow2",
        }
    }
}

/// qcow2 versions accepted by `create --compat`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// qcow2 version 2 (no persistent bitmaps).
    #[value(name = "0.10")]
    V010,
    /// qcow2 version 3 (the default).
    #[value(name = "1.1")]
    V11,
}

/// `create`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct CreateArgs {
    /// Path of the new qcow2 image (must not exist).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Virtual size (suffixes K, M, G, T, P). Optional with --backing: then the backing
    /// file's size.
    #[arg(value_name = "SIZE")]
    pub size: Option<String>,
    /// Cluster size: a power of two from 512 to 2M (default 64K).
    #[arg(long, value_name = "SIZE")]
    pub cluster_size: Option<String>,
    /// Backing file, stored as given (relative names are relative to the image).
    #[arg(short = 'b', long, value_name = "FILE")]
    pub backing: Option<String>,
    /// Format of the backing file; probed when absent.
    #[arg(short = 'F', long, value_enum, requires = "backing")]
    pub backing_format: Option<BackingFormat>,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (default 16).
    #[arg(long, value_name = "N")]
    pub refcount_bits: Option<u32>,
    /// qcow2 version: 1.1 (v3, default) or 0.10 (v2).
    #[arg(long, value_enum)]
    pub compat: Option<Compat>,
}

/// What `check --repair` fixes.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairArg {
    /// Leaked clusters only.
    Leaks,
    /// Leaks and refcounts that are too low.
    All,
}

/// `check`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct CheckArgs {
    /// The qcow2 image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Repair what was found (opens the image read-write).
    #[arg(short = 'r', long, value_enum)]
    pub repair: Option<RepairArg>,
    /// Print the result as JSON (keys as `qemu-img check --output=json`).
    #[arg(long)]
    pub json: bool,
}

/// `ctl`: a QMP client for operators without a QMP library.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct CtlArgs {
    /// The daemon's `--qmp-socket`.
    #[arg(long, value_name = "PATH")]
    pub qmp_socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `ctl` commands.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlCommand {
    /// Bitmap commands of a node.
    #[command(subcommand)]
    Bitmap(CtlBitmap),
    /// The node's bitmaps and I/O counters, as tables.
    Query,
    /// Sends one QMP request as given (`{"execute": ...}`) and prints the reply.
    Raw {
        /// The request, JSON.
        #[arg(value_name = "JSON")]
        request: String,
    },
    /// Any QMP command, with its arguments as a JSON object; prints the result.
    #[command(external_subcommand)]
    Exec(Vec<String>),
}

/// `ctl bitmap` commands (QMP's `block-dirty-bitmap-*`).
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlBitmap {
    /// Adds a bitmap (persistent unless --transient).
    Add {
        /// Node name.
        node: String,
        /// Bitmap name.
        name: String,
        /// Bytes per bit (suffixes K, M, G).
        #[arg(short = 'g', long, value_name = "SIZE")]
        granularity: Option<String>,
        /// Keep it in memory only.
        #[arg(long)]
        transient: bool,
        /// Create it not recording.
        #[arg(long)]
        disabled: bool,
    },
    /// Removes a bitmap.
    Remove {
        /// Node name.
        node: String,
        /// Bitmap name.
        name: String,
    },
    /// Clears a bitmap.
    Clear {
        /// Node name.
        node: String,
        /// Bitmap name.
        name: String,
    },
    /// Starts recording.
    Enable {
        /// Node name.
        node: String,
        /// Bitmap name.
        name: String,
    },
    /// Stops recording.
    Disable {
        /// Node name.
        node: String,
        /// Bitmap name.
        name: String,
    },
    /// ORs the sources into the target.
    Merge {
        /// Node name.
        node: String,
        /// Target bitmap.
        target: String,
        /// Source bitmaps.
        #[arg(required = true)]
        sources: Vec<String>,
    },
    /// Prints the bitmap's extents (as `bitmap dump`).
    Dump {
        /// Node name.
        node: String,
        /// Bitmap name.
        name: String,
    },
}
