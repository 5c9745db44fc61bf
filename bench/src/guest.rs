//! Shared "guest RAM": one memfd mapped `MAP_SHARED`, handed to the server in
//! SET_MEM_TABLE with guest physical address 0.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

use crate::error::{os, BenchError, Result};

/// A memfd-backed mapping; guest address `a` is byte `a` of the mapping.
#[derive(Debug)]
pub struct GuestMem {
    file: File,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all accesses go through raw pointers with
// volatile or atomic operations, and the pointer stays valid until `Drop`.
unsafe impl Send for GuestMem {}

impl GuestMem {
    /// Creates and maps `len` bytes of zeroed shared memory.
    pub fn new(len: usize) -> Result<Self> {
        let name = c"vhost-blk-bench-ram";
        // SAFETY: `name` is a valid NUL-terminated string; flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(|e| BenchError::Os {
            what: format!("sizing guest memory to {len} bytes"),
            source: e,
        })?;
        // SAFETY: mapping a file we own with a valid length; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap of guest memory"));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| os("mmap returned NULL"))?;
        Ok(GuestMem { file, base, len })
    }

    /// The memfd (for SET_MEM_TABLE).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, but clippy wants it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host virtual address of guest address 0.
    pub fn host_base(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Pointer to guest address `addr`, checked to leave room for `size` bytes.
    pub fn ptr(&self, addr: u64, size: usize) -> *mut u8 {
        assert!(
            (addr as usize)
                .checked_add(size)
                .is_some_and(|e| e <= self.len),
            "guest access {addr:#x}+{size} outside {} bytes",
            self.len
        );
        // SAFETY: the offset is inside the mapping (checked above).
        unsafe { self.base.as_ptr().add(addr as usize) }
    }

    /// Fills `[addr, addr+len)` with pseudo-random bytes (so no server can skip zeros).
    pub fn fill_random(&self, addr: u64, len: usize, seed: u64) {
        let p = self.ptr(addr, len);
        let mut x = seed | 1;
        for i in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // SAFETY: `p..p+len` is inside the mapping (checked by `ptr`).
            unsafe { p.add(i).write_volatile(x as u8) };
        }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`, used by nobody after.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
