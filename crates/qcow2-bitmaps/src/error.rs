//! Errors of the bitmap persistence layer. Where QEMU reports the same condition, the
//! Display text is QEMU's, so users and scripts see the messages they know.

/// Everything that can go wrong loading, storing or changing persistent bitmaps.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bitmaps header extension is not exactly 24 bytes.
    /// The crash-consistency shadow could be neither written nor turned off.
    #[error("the crash-consistency shadow of the bitmaps failed: {0}")]
    Shadow(String),
    #[error("bitmaps_ext: Invalid extension length")]
    ExtLength,
    /// The reserved field of the bitmaps extension is not zero.
    #[error("bitmaps_ext: Reserved field is not zero")]
    ExtReserved,
    /// The extension claims more bitmaps than QEMU supports.
    #[error("bitmaps_ext: Image has {0} bitmaps, exceeding the QEMU supported maximum of 65535")]
    ExtTooManyBitmaps(u32),
    /// The extension says there are no bitmaps.
    #[error("found bitmaps extension with zero bitmaps")]
    ExtZeroBitmaps,
    /// The directory offset is not cluster aligned.
    #[error("bitmaps_ext: invalid bitmap directory offset")]
    ExtDirectoryOffset,
    /// The directory is larger than QEMU allows.
    #[error(
        "bitmaps_ext: bitmap directory size ({0}) exceeds the maximum supported size (67107840)"
    )]
    ExtDirectorySize(u64),
    /// The directory size is zero.
    #[error("Requested bitmap directory size is zero")]
    DirectorySizeZero,
    /// The directory size is over the limit.
    #[error("Requested bitmap directory size is too big")]
    DirectorySizeTooBig,
    /// The directory entries do not tile the directory exactly.
    #[error("Broken bitmap directory")]
    BrokenDirectory,
    /// The directory holds more entries than the extension says.
    #[error("More bitmaps found than specified in header extension")]
    MoreBitmaps,
    /// The directory holds fewer entries than the extension says.
    #[error("Less bitmaps found than specified in header extension")]
    LessBitmaps,
    /// A directory entry carries extra data.
    #[error("Bitmap extra data is not supported")]
    ExtraData,
    /// A directory entry violates a constraint (offsets, sizes, flags, granularity, type).
    #[error("Bitmap '{0}' doesn't satisfy the constraints")]
    EntryConstraints(String),
    /// A bitmap table could not be read or holds an invalid entry.
    #[error("Could not read bitmap_table table from image for bitmap '{name}': {reason}")]
    BadTable {
        /// Bitmap name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The bitmap data could not be read or does not match the bitmap's size.
    #[error("Could not read bitmap '{name}' from image: {reason}")]
    BadData {
        /// Bitmap name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Updating the IN_USE flags on open failed.
    #[error("Can't update bitmap directory: {0}")]
    InUseUpdate(Box<Error>),

    /// An operation on a bitmap that was not saved correctly (IN_USE on disk).
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    Inconsistent(String),
    /// A change to a bitmap of an image opened read-only.
    #[error("Bitmap '{0}' is readonly and cannot be modified")]
    ReadOnly(String),
    /// Loading the bitmaps would take more memory than allowed.
    #[error(
        "loading the bitmaps needs {needed} bytes of memory, over the cap of {cap} bytes \
         (--max-bitmap-memory)"
    )]
    MemoryCap {
        /// Bytes the bitmaps would take.
        needed: u64,
        /// The cap.
        cap: u64,
    },
    /// The bitmap is in use by another operation (an export).
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    /// No bitmap of that name.
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    /// A bitmap of that name is already in memory.
    #[error("Bitmap already exists: {0}")]
    Exists(String),
    /// An empty bitmap name.
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    /// A name too long for a non-persistent bitmap.
    #[error("Bitmap name too long: {0}")]
    NameTooLongTransient(String),
    /// The requested granularity is not a power of two ≥ 512.
    #[error("Granularity must be power of 2 and at least 512")]
    BadGranularity,
    /// A new persistent bitmap cannot be stored in this image.
    #[error("Can't make bitmap '{name}' persistent in '{node}': {reason}")]
    CannotPersist {
        /// Bitmap name.
        name: String,
        /// Node (image) name.
        node: String,
        /// Why.
        reason: Box<Error>,
    },
    /// qcow2 v2 has no autoclear bits, so bitmaps cannot be kept safely.
    #[error("Cannot store dirty bitmaps in qcow2 v2 files")]
    V2Image,
    /// Granularity over 2 GiB.
    #[error("Granularity exceeds maximum (2147483648 bytes)")]
    GranularityTooLarge,
    /// Granularity under 512 bytes.
    #[error("Granularity is under minimum (512 bytes)")]
    GranularityTooSmall,
    /// The bitmap would exceed QEMU's size limits.
    #[error("Too much space will be occupied by the bitmap. Use larger granularity")]
    TooBig,
    /// Name longer than 1023 bytes.
    #[error("Name length exceeds maximum (1023 characters)")]
    NameTooLong,
    /// 65535 persistent bitmaps already.
    #[error("Maximum number of persistent bitmaps is already reached")]
    MaxBitmaps,
    /// The directory would exceed its size limit.
    #[error("Not enough space in the bitmap directory")]
    DirectoryFull,
    /// Two bitmaps cannot be merged (different disk sizes).
    #[error("Bitmaps are incompatible and can't be merged")]
    Incompatible,
    /// Storing needs write access.
    #[error("No write access")]
    NoWriteAccess,
    /// Storing failed; the named bitmaps are not saved in the image.
    #[error(
        "Lost persistent bitmaps during inactivation of node '{node}': {reason} (lost: {})",
        .lost.join(", ")
    )]
    Lost {
        /// Node (image) name.
        node: String,
        /// Names of the bitmaps whose current contents are not in the image.
        lost: Vec<String>,
        /// The underlying failure.
        reason: Box<Error>,
    },
    /// Storing: a same-named consistent entry is on disk that we do not own.
    #[error("Bitmap '{0}' already exists in the image")]
    ExistsInImage(String),
    /// Storing would exceed 65535 bitmaps.
    #[error("Too many persistent bitmaps")]
    TooManyBitmaps,
    /// Storing would exceed the directory size limit.
    #[error("Bitmap directory is too large")]
    DirectoryTooLarge,
    /// Writing a bitmap to the image failed.
    #[error("Failed to write bitmap '{name}' to file: {source}")]
    WriteBitmap {
        /// Bitmap name.
        name: String,
        /// The image error.
        #[source]
        source: qcow2::Error,
    },
    /// Writing the new directory or switching the header failed.
    #[error("Failed to update bitmap extension: {0}")]
    UpdateExtension(#[source] qcow2::Error),
    /// Resizing is refused while persistent bitmaps exist.
    #[error("Cannot resize an image with persistent dirty bitmaps ({0}); remove them first")]
    ResizeWithBitmaps(String),
    /// The in-memory bitmap refused an operation.
    #[error("{0}")]
    Bitmap(String),
    /// The image engine failed.
    #[error(transparent)]
    Image(#[from] qcow2::Error),
}

impl Error {
    /// QEMU's second line for this error, if it gives one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Inconsistent(_) => {
                Some("Try block-dirty-bitmap-remove to delete this bitmap from disk")
            }
            _ => None,
        }
    }
}

/// Result with this crate's error.
pub type Result<T> = std::result::Result<T, Error>;
