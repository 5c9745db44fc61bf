//! The byte store under an image: a file by default, anything else (memory, fault
//! injection) in tests.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Positional byte storage. Implementations must be safe to call from many threads.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Writes `buf` at `offset` and returns once these bytes are durable, without
    /// making anything else durable where the storage can (a file: an `RWF_DSYNC`
    /// write, through O_DIRECT when aligned, which an overwrite of allocated blocks turns
    /// into one FUA write instead of a journal commit). The default writes, then syncs.
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.sync()
    }
    /// Deallocates a range, which then reads as zeros. The default writes zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
    /// Makes `[offset, offset+len)` read as zeros and lie inside the storage (which grows
    /// if needed), without transferring data where the file system can. The default
    /// writes zeros.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
    /// Whether `offset` lies in data (`true`) or in a hole, and where that state ends
    /// (at most `end`). Storage that cannot tell reports data up to `end`.
    fn data_extent(&self, offset: u64, end: u64) -> io::Result<(bool, u64)> {
        let _ = offset;
        Ok((true, end))
    }
    /// The file descriptors, when the storage is a file (for io_uring).
    fn data_files(&self) -> Option<crate::DataFiles> {
        None
    }
}

/// Writes `len` zero bytes at `offset`, a MiB at a time.
fn write_zeros<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        s.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A regular file or block device.
///
/// With `direct`, a second descriptor opened with O_DIRECT carries every request whose
/// buffer, offset and length are aligned to [`DIRECT_ALIGN`] (the data path with the
/// daemon's aligned buffers); the rest (small metadata updates, header) goes through the
/// buffered descriptor. Linux keeps the two coherent: a direct read writes back cached
/// pages of its range first, a direct write invalidates them.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    direct: Option<File>,
}

/// Alignment of buffer address, offset and length for O_DIRECT requests.
pub const DIRECT_ALIGN: usize = 512;

fn direct_ok(ptr: *const u8, len: usize, offset: u64) -> bool {
    (ptr as usize | len).is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
        && len > 0
}

impl FileStorage {
    /// Opens `path`; `direct` adds an O_DIRECT descriptor for aligned requests.
    pub fn open(path: &Path, writable: bool, direct: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        let direct = if direct {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)?,
            )
        } else {
            None
        };
        Ok(FileStorage { file, direct })
    }

    /// Opens a backing file read-only without blocking on it (a FIFO would) and accepts
    /// only a regular file or a block device.
    pub fn open_backing(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        let t = file.metadata()?.file_type();
        if !(t.is_file() || t.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            ));
        }
        // Ordinary blocking I/O from here on.
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL/F_SETFL only read and set the flags of a descriptor we own.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags < 0
                || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(FileStorage { file, direct: None })
    }

    /// Wraps an open file.
    pub fn from_file(file: File) -> Self {
        FileStorage { file, direct: None }
    }

    /// The descriptor for a request: O_DIRECT when it is aligned.
    fn fd_for(&self, ptr: *const u8, len: usize, offset: u64) -> &File {
        match &self.direct {
            Some(d) if direct_ok(ptr, len, offset) => d,
            _ => &self.file,
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut file = self.fd_for(buf.as_ptr(), buf.len(), offset);
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                // A short direct read leaves an unaligned rest: finish it buffered.
                Ok(n) => {
                    done += n;
                    file = &self.file;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A device with a larger logical block size refuses 512-byte direct I/O.
                Err(e)
                    if e.raw_os_error() == Some(libc::EINVAL)
                        && !std::ptr::eq(file, &self.file) =>
                {
                    file = &self.file;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let file = self.fd_for(buf.as_ptr(), buf.len(), offset);
        match file.write_all_at(buf, offset) {
            // A device with a larger logical block size refuses 512-byte direct I/O.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !std::ptr::eq(file, &self.file) => {
                self.file.write_all_at(buf, offset)
            }
            r => r,
        }
    }

    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let file = self.fd_for(buf.as_ptr(), buf.len(), offset);
        match write_all_dsync(file, buf, offset) {
            // A device with a larger logical block size refuses 512-byte direct I/O.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !std::ptr::eq(file, &self.file) => {
                write_all_dsync(&self.file, buf, offset)
            }
            // A kernel without pwritev2 flags: write, then fdatasync.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) => {
                self.write_at(buf, offset)?;
                self.sync()
            }
            r => r,
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                ) =>
            {
                write_zeros(self, offset, len)
            }
            r => r,
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        // ZERO_RANGE where the file system has it (ext4, xfs); else punch the range and
        // allocate it again (tmpfs: a punched range inside the file reads as zeros, and
        // mode 0 extends the file over a range past its end); else write zeros. A file
        // system out of space says so at once: writing zeros would fail too, after
        // filling what space is left.
        let nospace =
            |r: &io::Result<()>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::ENOSPC));
        let zeroed = fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE, offset, len);
        if zeroed.is_ok() || nospace(&zeroed) {
            return zeroed;
        }
        let punched = fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        if punched.is_ok() {
            let allocated = fallocate(&self.file, 0, offset, len);
            if allocated.is_ok() || nospace(&allocated) {
                return allocated;
            }
        }
        write_zeros(self, offset, len)
    }

    fn data_extent(&self, offset: u64, end: u64) -> io::Result<(bool, u64)> {
        let next = |whence| lseek(&self.file, offset, whence);
        match next(libc::SEEK_DATA) {
            // A hole up to the next data (or to the end of the file).
            Ok(d) if d > offset => Ok((false, d.min(end))),
            Ok(_) => Ok((
                true,
                next(libc::SEEK_HOLE)
                    .unwrap_or(end)
                    .min(end)
                    .max(offset + 1),
            )),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((false, end)),
            // File systems without SEEK_DATA: all data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((true, end)),
            Err(e) => Err(e),
        }
    }

    fn data_files(&self) -> Option<crate::DataFiles> {
        use std::os::fd::AsRawFd;
        Some(crate::DataFiles {
            buffered: self.file.as_raw_fd(),
            direct: self.direct.as_ref().map(AsRawFd::as_raw_fd),
        })
    }
}

/// `lseek(2)` with SEEK_DATA or SEEK_HOLE (the file position is not used by our I/O,
/// which is all positioned).
/// `pwritev2(RWF_DSYNC)` until all of `buf` is written: returns once it is durable.
fn write_all_dsync(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let at = i64::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `iov` points at `rest`, which lives and is not written during the
        // call; the descriptor is ours; the kernel only reads the buffer.
        let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, at, libc::RWF_DSYNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        done += n as usize;
    }
    Ok(())
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek only reads its integer arguments; the fd is owned by `file`.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// `fallocate(2)` on a file.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An in-memory storage, for tests and scratch images.
#[derive(Debug)]
pub struct MemStorage {
    data: std::sync::RwLock<Vec<u8>>,
    max_len: u64,
}

/// How large a [`MemStorage`] may grow unless told otherwise.
pub const MEM_STORAGE_DEFAULT_MAX: u64 = 1 << 30;

impl Default for MemStorage {
    fn default() -> Self {
        Self::with_max_len(MEM_STORAGE_DEFAULT_MAX)
    }
}

impl MemStorage {
    /// An empty store that may grow to [`MEM_STORAGE_DEFAULT_MAX`] bytes.
    pub fn new() -> Self {
        Self::default()
    }
    /// An empty store that refuses (with `EFBIG`) to grow past `max_len` bytes, so a
    /// hostile image cannot make it allocate without bound.
    pub fn with_max_len(max_len: u64) -> Self {
        MemStorage {
            data: Default::default(),
            max_len,
        }
    }
    /// A copy of the contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }
    fn bounded(&self, end: Option<u64>) -> io::Result<usize> {
        match end {
            Some(end) if end <= self.max_len => Ok(end as usize),
            _ => Err(io::Error::from_raw_os_error(libc::EFBIG)),
        }
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap();
        let start = offset.min(data.len() as u64) as usize;
        let end = offset
            .saturating_add(buf.len() as u64)
            .min(data.len() as u64) as usize;
        let n = end - start;
        buf[..n].copy_from_slice(&data[start..end]);
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = self.bounded(offset.checked_add(buf.len() as u64))?;
        let mut data = self.data.write().unwrap();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = self.bounded(Some(len))?;
        self.data.write().unwrap().resize(len, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_writes_land_through_both_descriptors() {
        // /var/tmp: a real file system, where O_DIRECT works (tmpfs refuses it).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 3 * 4096]).unwrap();
        for direct in [false, true] {
            let st = FileStorage::open(&path, true, direct).unwrap();
            let mut aligned = crate::AlignedBuf::new(4096);
            aligned.as_mut_slice().fill(0xa5 ^ u8::from(direct));
            st.write_durable(aligned.as_slice(), 4096).unwrap();
            st.write_durable(&[0x3c; 100], 8192 + 7).unwrap();
            let mut back = vec![0u8; 3 * 4096];
            st.read_at(&mut back, 0).unwrap();
            assert!(back[4096..8192]
                .iter()
                .all(|&b| b == 0xa5 ^ u8::from(direct)));
            assert!(back[8199..8299].iter().all(|&b| b == 0x3c));
            assert!(back[..4096].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn mem_storage_refuses_to_grow_past_its_bound() {
        let m = MemStorage::with_max_len(4096);
        m.write_at(&[1; 96], 4000).unwrap();
        let e = m.write_at(&[1; 97], 4000).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG));
        assert!(m.write_at(&[1], u64::MAX).is_err());
        assert!(m.set_len(1 << 40).is_err());
        assert_eq!(m.len().unwrap(), 4096);
        let mut b = [9u8; 8];
        m.read_at(&mut b, u64::MAX - 2).unwrap();
        assert_eq!(b, [0; 8]);
    }
}
