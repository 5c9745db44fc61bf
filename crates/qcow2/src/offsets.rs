//! Newtype offsets: a guest (virtual disk) offset can never be passed where a host (image
//! file) offset is expected, and vice versa.

use std::fmt;

/// A byte offset inside the virtual disk the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset inside the image file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

impl HostOffset {
    /// The raw byte offset.
    pub fn get(self) -> u64 {
        self.0
    }
    /// Offset `n` bytes further.
    pub fn offset_by(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }
    /// Whether the offset is a multiple of `cluster_size` (a power of two).
    pub fn is_aligned(self, cluster_size: u64) -> bool {
        self.0 & (cluster_size - 1) == 0
    }
}

impl GuestOffset {
    /// The raw byte offset.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
