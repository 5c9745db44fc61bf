//! Generic guest test scripts: a list of block operations rendered as a busybox `sh`
//! script for the guest, plus the host-side model of what they must leave behind
//! (expected disk contents and expected dirty granules). Any vhost-user-blk server can be
//! checked against the same model.

use crate::error::{E2eError, Result};
use crate::tools::merge_extents;

/// One block operation the guest performs on the test disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// O_DIRECT write of `len` bytes of `pattern` at `offset`.
    Write {
        /// Byte offset (multiple of 512).
        offset: u64,
        /// Length in bytes (multiple of 512).
        len: u64,
        /// Fill byte.
        pattern: u8,
    },
    /// O_DIRECT read of `len` bytes at `offset`, which must all equal `pattern`.
    Verify {
        /// Byte offset (multiple of 512).
        offset: u64,
        /// Length in bytes (multiple of 512).
        len: u64,
        /// Expected byte.
        pattern: u8,
    },
    /// `blkdiscard -o offset -l len`.
    Discard {
        /// Byte offset (multiple of 512).
        offset: u64,
        /// Length in bytes (multiple of 512).
        len: u64,
    },
    /// `blkdiscard -z` (BLKZEROOUT; a virtio-blk WRITE_ZEROES request when offered).
    WriteZeroes {
        /// Byte offset (multiple of 512).
        offset: u64,
        /// Length in bytes (multiple of 512).
        len: u64,
    },
    /// Waits (polling O_DIRECT reads, up to 240 s) until the 512-byte sector at `offset`
    /// holds `pattern` in every byte: the host's signal that the guest may go on (the
    /// host writes the sector, e.g. through a writable NBD export of the same disk).
    WaitFor {
        /// Byte offset (multiple of 512).
        offset: u64,
        /// Expected byte.
        pattern: u8,
    },
    /// A cache flush of the device (fsync on the block device). The guest sends it only
    /// while the device's write cache is on (see [`DiskOp::WriteCache`]).
    Flush,
    /// Switches the device's volatile write cache (virtio-blk `wce`, written by the guest
    /// through sysfs `cache_type`); on = "write back", off = "write through".
    WriteCache {
        /// Whether the cache is on.
        enabled: bool,
    },
}

/// A sequence of [`DiskOp`]s on one guest block device, optionally pinned to guest CPUs
/// (with several queues, the guest's virtio-blk driver uses the queue of the submitting CPU).
#[derive(Debug, Clone)]
pub struct GuestScript {
    device: String,
    ops: Vec<(DiskOp, Option<u32>)>,
    cpu: Option<u32>,
}

impl GuestScript {
    /// An empty script acting on `device` (e.g. `/dev/vda`).
    pub fn new(device: &str) -> Self {
        Self {
            device: device.to_owned(),
            ops: Vec::new(),
            cpu: None,
        }
    }

    /// Runs the following operations on guest CPU `cpu` (`None`: anywhere).
    pub fn on_cpu(mut self, cpu: Option<u32>) -> Self {
        self.cpu = cpu;
        self
    }

    /// Appends an operation.
    pub fn op(mut self, op: DiskOp) -> Self {
        self.ops.push((op, self.cpu));
        self
    }

    /// Appends a pattern write.
    pub fn write(self, offset: u64, len: u64, pattern: u8) -> Self {
        self.op(DiskOp::Write {
            offset,
            len,
            pattern,
        })
    }

    /// Appends a pattern check.
    pub fn verify(self, offset: u64, len: u64, pattern: u8) -> Self {
        self.op(DiskOp::Verify {
            offset,
            len,
            pattern,
        })
    }

    /// Appends a discard.
    pub fn discard(self, offset: u64, len: u64) -> Self {
        self.op(DiskOp::Discard { offset, len })
    }

    /// Appends a write-zeroes.
    pub fn write_zeroes(self, offset: u64, len: u64) -> Self {
        self.op(DiskOp::WriteZeroes { offset, len })
    }

    /// Appends a write-cache switch.
    pub fn write_cache(self, enabled: bool) -> Self {
        self.op(DiskOp::WriteCache { enabled })
    }

    /// Appends a wait for the host's signal in the sector at `offset`.
    pub fn wait_for(self, offset: u64, pattern: u8) -> Self {
        self.op(DiskOp::WaitFor { offset, pattern })
    }

    /// Appends a flush.
    pub fn flush(self) -> Self {
        self.op(DiskOp::Flush)
    }

    /// Appends all operations of `other` (keeping their CPU pinning); useful to model
    /// several guest runs on the same disk.
    pub fn then(mut self, other: &GuestScript) -> Self {
        self.ops.extend(other.ops.iter().copied());
        self
    }

    /// The operations in order.
    pub fn ops(&self) -> impl Iterator<Item = &DiskOp> {
        self.ops.iter().map(|(op, _)| op)
    }

    fn validate(&self) -> Result<()> {
        if !self.device.starts_with("/dev/")
            || !self
                .device
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '/' || c == '_' || c == '-')
        {
            return Err(E2eError::InvalidRequest(format!(
                "device path {:?} must be a plain /dev/ path",
                self.device
            )));
        }
        for op in self.ops() {
            let (offset, len) = match *op {
                DiskOp::Write { offset, len, .. }
                | DiskOp::Verify { offset, len, .. }
                | DiskOp::Discard { offset, len }
                | DiskOp::WriteZeroes { offset, len } => (offset, len),
                DiskOp::WaitFor { offset, .. } => (offset, 512),
                DiskOp::Flush | DiskOp::WriteCache { .. } => continue,
            };
            if (offset | len) & 511 != 0 || len == 0 {
                return Err(E2eError::InvalidRequest(format!(
                    "{op:?}: offset and length must be non-zero multiples of 512"
                )));
            }
        }
        Ok(())
    }

    /// Renders the script for the guest's busybox `sh`. It waits for the device, prints
    /// `E2E-STEP n` before each operation and exits non-zero at the first failure
    /// (10 + n for step n), 0 when all passed.
    pub fn render(&self) -> Result<String> {
        self.validate()?;
        let dev = &self.device;
        let mut s = String::new();
        s.push_str("# generated by e2e::GuestScript\n");
        s.push_str("fail() { echo \"E2E-FAIL step $1: $2\"; exit $((10 + $1)); }\n");
        s.push_str(&format!(
            "i=0; while [ ! -b {dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n\
             [ -b {dev} ] || {{ echo \"E2E-FAIL {dev} did not appear\"; exit 2; }}\n\
             echo \"E2E-DEVICE {dev} sectors=$(cat /sys/class/block/{name}/size) \
             queues=$(ls /sys/class/block/{name}/mq | wc -l)\"\n",
            name = dev.trim_start_matches("/dev/")
        ));
        for (i, (op, cpu)) in self.ops.iter().enumerate() {
            let n = i + 1;
            let pin = cpu.map(|c| format!("taskset -c {c} ")).unwrap_or_default();
            s.push_str(&format!("echo \"E2E-STEP {n} {op:?}\"\n"));
            match *op {
                DiskOp::Write {
                    offset,
                    len,
                    pattern,
                } => {
                    let (bs, count, at) = blocks(offset, len);
                    s.push_str(&format!(
                        "head -c {len} /dev/zero | tr '\\000' '\\{pattern:03o}' > /tmp/pat || fail {n} pattern\n\
                         {pin}dd if=/tmp/pat of={dev} bs={bs} count={count} seek={at} oflag=direct 2>/tmp/dd.err \
                         || {{ cat /tmp/dd.err; fail {n} write; }}\n"
                    ));
                }
                DiskOp::Verify {
                    offset,
                    len,
                    pattern,
                } => {
                    let (bs, count, at) = blocks(offset, len);
                    s.push_str(&format!(
                        "head -c {len} /dev/zero | tr '\\000' '\\{pattern:03o}' > /tmp/pat || fail {n} pattern\n\
                         {pin}dd if={dev} of=/tmp/got bs={bs} count={count} skip={at} iflag=direct 2>/tmp/dd.err \
                         || {{ cat /tmp/dd.err; fail {n} read; }}\n\
                         cmp /tmp/got /tmp/pat || fail {n} mismatch\n"
                    ));
                }
                DiskOp::Discard { offset, len } => {
                    s.push_str(&format!(
                        "{pin}blkdiscard -o {offset} -l {len} {dev} || fail {n} discard\n"
                    ));
                }
                DiskOp::WriteZeroes { offset, len } => {
                    s.push_str(&format!(
                        "{pin}/usr/sbin/blkdiscard -z -o {offset} -l {len} {dev} \
                         || fail {n} write-zeroes\n"
                    ));
                }
                DiskOp::WriteCache { enabled } => {
                    let mode = if enabled {
                        "write back"
                    } else {
                        "write through"
                    };
                    let attr = format!("/sys/block/{}/cache_type", dev.trim_start_matches("/dev/"));
                    s.push_str(&format!(
                        "echo '{mode}' > {attr} || fail {n} cache_type\n\
                         [ \"$(cat {attr})\" = '{mode}' ] || fail {n} \"cache_type is $(cat {attr})\"\n"
                    ));
                }
                DiskOp::WaitFor { offset, pattern } => {
                    s.push_str(&format!(
                        "head -c 512 /dev/zero | tr '\\000' '\\{pattern:03o}' > /tmp/want || fail {n} pattern\n\
                         i=0; while :; do\n\
                         {pin}dd if={dev} of=/tmp/got bs=512 count=1 skip={at} iflag=direct 2>/dev/null\n\
                         cmp -s /tmp/got /tmp/want && break\n\
                         i=$((i + 1)); [ $i -lt 2400 ] || fail {n} \"no signal at {offset}\"\n\
                         sleep 0.1; done\n",
                        at = offset / 512
                    ));
                }
                DiskOp::Flush => {
                    s.push_str(&format!(
                        "{pin}dd if=/dev/null of={dev} conv=fsync 2>/tmp/dd.err \
                         || {{ cat /tmp/dd.err; fail {n} flush; }}\n"
                    ));
                }
            }
        }
        s.push_str("echo \"E2E-DONE\"\nexit 0\n");
        Ok(s)
    }

    /// Expected guest-visible contents of a disk of `size` bytes that was all zeroes before
    /// the script ran. Discarded ranges read back as zeroes (true for a qcow2 without a
    /// backing file when the range covers whole clusters).
    pub fn expected_contents(&self, size: u64) -> Result<Vec<u8>> {
        let len = usize::try_from(size)
            .map_err(|_| E2eError::InvalidRequest(format!("disk size {size} too large")))?;
        let mut disk = vec![0u8; len];
        for op in self.ops() {
            let (offset, l, byte) = match *op {
                DiskOp::Write {
                    offset,
                    len,
                    pattern,
                } => (offset, len, pattern),
                DiskOp::Discard { offset, len } | DiskOp::WriteZeroes { offset, len } => {
                    (offset, len, 0)
                }
                DiskOp::Verify { .. }
                | DiskOp::WaitFor { .. }
                | DiskOp::Flush
                | DiskOp::WriteCache { .. } => continue,
            };
            let end = offset
                .checked_add(l)
                .filter(|&e| e <= size)
                .ok_or_else(|| {
                    E2eError::InvalidRequest(format!("{op:?} reaches past the {size}-byte disk"))
                })?;
            // Both bounds are <= size, which fits in usize (checked above).
            disk[offset as usize..end as usize].fill(byte);
        }
        Ok(disk)
    }

    /// Granule-aligned extents `(offset, length)` a dirty bitmap of `granularity` bytes
    /// must show after the script: every granule touched by a write, write-zeroes or
    /// discard, clipped
    /// to the disk `size`, merged.
    pub fn expected_dirty_extents(&self, granularity: u64, size: u64) -> Vec<(u64, u64)> {
        if granularity == 0 {
            return Vec::new();
        }
        let v = self
            .ops()
            .filter_map(|op| match *op {
                DiskOp::Write { offset, len, .. }
                | DiskOp::Discard { offset, len }
                | DiskOp::WriteZeroes { offset, len } => Some((offset, len)),
                DiskOp::Verify { .. }
                | DiskOp::WaitFor { .. }
                | DiskOp::Flush
                | DiskOp::WriteCache { .. } => None,
            })
            .filter(|&(o, l)| l > 0 && o < size)
            .map(|(o, l)| {
                let start = o / granularity * granularity;
                let end = o.saturating_add(l).min(size);
                let end = end
                    .div_ceil(granularity)
                    .saturating_mul(granularity)
                    .min(size);
                (start, end - start)
            })
            .collect();
        merge_extents(v)
    }
}

/// dd block size, count and start block for an (offset, len) pair aligned to 512.
fn blocks(offset: u64, len: u64) -> (u64, u64, u64) {
    let bs = if (offset | len) & 4095 == 0 {
        4096
    } else {
        512
    };
    (bs, len / bs, offset / bs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_steps_and_rejects_misaligned() {
        let s = GuestScript::new("/dev/vda")
            .write(4096, 4096, 0xab)
            .on_cpu(Some(1))
            .verify(512, 1024, 0)
            .discard(1 << 20, 1 << 16)
            .write_zeroes(1 << 21, 4096)
            .write_cache(true)
            .render()
            .unwrap();
        assert!(s.contains("seek=1 oflag=direct"));
        assert!(s.contains("'\\253'"));
        assert!(s.contains("taskset -c 1 dd if=/dev/vda of=/tmp/got bs=512 count=2 skip=1"));
        assert!(s.contains("blkdiscard -o 1048576 -l 65536 /dev/vda"));
        assert!(s.contains("/usr/sbin/blkdiscard -z -o 2097152 -l 4096 /dev/vda"));
        assert!(s.contains("echo 'write back' > /sys/block/vda/cache_type"));
        assert!(GuestScript::new("/dev/vda")
            .write(100, 4096, 1)
            .render()
            .is_err());
        assert!(GuestScript::new("/dev/vda; rm").render().is_err());
    }

    #[test]
    fn model_contents_and_dirty_granules() {
        let k64 = 65536;
        let s = GuestScript::new("/dev/vda")
            .write(k64 + 4096, 4096, 7)
            .write(3 * k64 - 512, 1024, 9)
            .discard(8 * k64, 2 * k64)
            .verify(0, 512, 0);
        assert_eq!(
            s.expected_dirty_extents(k64, 16 * k64),
            vec![(k64, 3 * k64), (8 * k64, 2 * k64)]
        );
        let c = s.expected_contents(16 * k64).unwrap();
        assert_eq!(c[(k64 + 4096) as usize], 7);
        assert_eq!(c[(3 * k64) as usize], 9);
        assert_eq!(c[(3 * k64 + 512) as usize], 0);
        assert!(s.expected_contents(k64).is_err());
    }
}
