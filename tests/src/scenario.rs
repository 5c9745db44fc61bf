//! The standard real-guest scenario, independent of the server under test: prepare a
//! qcow2 with a persistent bitmap, let a guest write / read back / discard / zero blocks
//! through the server, stop the server, then check with QEMU's own tools that the image
//! is consistent, holds exactly the expected data and that the bitmap marks exactly the
//! touched granules.

use std::path::Path;
use std::time::Duration;

use crate::backend::Backend;
use crate::error::{E2eError, Result};
use crate::guest::Guest;
use crate::script::{DiskOp, GuestScript};
use crate::tools::{
    bitmap_dirty_extents, qemu_img_bitmap_add, qemu_img_bitmaps, qemu_img_check, qemu_img_compare,
    qemu_img_create_qcow2, qemu_io,
};

/// Image geometry and bitmap of a scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Bitmap granularity in bytes (also used to place the operations).
    pub granularity: u64,
    /// Name of the persistent bitmap.
    pub bitmap: String,
    /// Limit for one guest run.
    pub guest_timeout: Duration,
    /// Limit for the server to exit after SIGTERM.
    pub stop_timeout: Duration,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            size: 64 << 20,
            granularity: 64 << 10,
            bitmap: "b0".to_owned(),
            guest_timeout: Duration::from_secs(240),
            stop_timeout: Duration::from_secs(20),
        }
    }
}

/// What a finished scenario observed.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// Guest launch to power-off.
    pub guest_elapsed: Duration,
    /// The guest's serial console.
    pub serial_log: String,
    /// Dirty extents read back from the image.
    pub dirty: Vec<(u64, u64)>,
}

impl Scenario {
    /// `qemu-img create` a qcow2 of `size` and add the (enabled, persistent) bitmap.
    pub fn prepare_image(&self, image: &Path) -> Result<()> {
        qemu_img_create_qcow2(image, self.size)?;
        qemu_img_bitmap_add(image, &self.bitmap, self.granularity)
    }

    /// The standard operations: single 4 KiB writes, a write spanning two granules, one
    /// on the last block, a discard over one written and two untouched granules,
    /// write-zeroes over written data and over an untouched granule, read-backs, and a
    /// write + flush with the write cache switched on (so the guest really sends FLUSH). With `cpus > 1` the second half runs on CPU 1, so a second queue is used.
    /// Needs a disk of at least 401 granules.
    pub fn script(&self, cpus: u32) -> GuestScript {
        let g = self.granularity;
        let second = (cpus > 1).then_some(1);
        GuestScript::new("/dev/vda")
            .write(g, 4096, 0xab)
            .write(5 * g + 3 * 4096, 4096, 0x5a)
            .write(32 * g - 4096, 8192, 0x11)
            .verify(g, 4096, 0xab)
            .verify(5 * g + 3 * 4096, 4096, 0x5a)
            .verify(32 * g - 4096, 8192, 0x11)
            .on_cpu(second)
            .write(self.size - 4096, 4096, 0xee)
            .write(100 * g, g, 0xcc)
            .verify(100 * g, g, 0xcc)
            .discard(100 * g, 3 * g)
            .verify(100 * g, 3 * g, 0)
            .verify(self.size - 4096, 4096, 0xee)
            .write(200 * g, 8192, 0x33)
            .write_zeroes(200 * g + 4096, 4096)
            .write_zeroes(300 * g + 512, 1024)
            .verify(200 * g, 4096, 0x33)
            .verify(200 * g + 4096, 4096, 0)
            .write_cache(true)
            .write(400 * g, 4096, 0x44)
            .flush()
            .write_cache(false)
    }

    /// Full run: prepare `dir/disk.qcow2`, start the server with `start(image, socket)`
    /// (it must listen on `socket` when it returns), boot the guest with `num_queues`
    /// queues running [`Scenario::script`], stop the server with SIGTERM and verify the
    /// image ([`Scenario::verify_image`]).
    pub fn run<F>(&self, dir: &Path, num_queues: u32, start: F) -> Result<ScenarioReport>
    where
        F: FnOnce(&Path, &Path) -> Result<Backend>,
    {
        let image = dir.join("disk.qcow2");
        let socket = dir.join("vhost.sock");
        self.prepare_image(&image)?;
        let script = self.script(num_queues);
        let text = script.render()?;
        let backend = start(&image, &socket)?;
        let outcome = Guest::run(&socket, num_queues, &text, self.guest_timeout)?;
        if let Err(e) = outcome.check_success() {
            return Err(E2eError::Check(format!(
                "{e}\n--- server log ---\n{}",
                backend.log()
            )));
        }
        let device_line = format!(
            "E2E-DEVICE /dev/vda sectors={} queues={num_queues}",
            self.size / 512
        );
        if !outcome.serial_log.contains(&device_line) {
            return Err(E2eError::Check(format!(
                "expected `{device_line}` in the serial log:\n{}",
                outcome.serial_log
            )));
        }
        for step in 1..=script.ops().count() {
            if !outcome.serial_log.contains(&format!("E2E-STEP {step} ")) {
                return Err(E2eError::Check(format!(
                    "step {step} missing from the serial log:\n{}",
                    outcome.serial_log
                )));
            }
        }
        backend.stop(self.stop_timeout)?;
        let dirty = self.verify_image(&image, &script, dir)?;
        Ok(ScenarioReport {
            guest_elapsed: outcome.elapsed,
            serial_log: outcome.serial_log,
            dirty,
        })
    }

    /// Checks a stopped server's image against the model of `script`: `qemu-img check`
    /// clean, exactly one bitmap (ours, granularity kept, flags exactly `auto`, i.e. not
    /// in-use), contents equal to the model (`qemu-img compare` against a raw file in
    /// `scratch`, plus `qemu-io read -P` of every written range still holding its
    /// pattern), and dirty extents equal to the touched granules. Returns the extents.
    pub fn verify_image(
        &self,
        image: &Path,
        script: &GuestScript,
        scratch: &Path,
    ) -> Result<Vec<(u64, u64)>> {
        qemu_img_check(image)?;
        let bitmaps = qemu_img_bitmaps(image)?;
        let want = vec![(
            self.bitmap.clone(),
            self.granularity,
            vec!["auto".to_owned()],
        )];
        if bitmaps != want {
            return Err(E2eError::Check(format!(
                "bitmaps after shutdown: {bitmaps:?}, expected {want:?}"
            )));
        }

        let model = script.expected_contents(self.size)?;
        let expected = scratch.join("expected.raw");
        std::fs::write(&expected, &model).map_err(|source| E2eError::Io {
            path: expected.clone(),
            source,
        })?;
        let (same, diff) = qemu_img_compare(&expected, "raw", image, "qcow2")?;
        if !same {
            return Err(E2eError::Check(format!(
                "guest-visible contents differ from the model: {diff}"
            )));
        }
        let reads: Vec<String> = script
            .ops()
            .filter_map(|op| match *op {
                DiskOp::Write {
                    offset,
                    len,
                    pattern,
                } => Some((offset, len, pattern)),
                _ => None,
            })
            .filter(|&(o, l, p)| {
                // Bounds were validated by expected_contents above.
                model[o as usize..(o + l) as usize].iter().all(|&b| b == p)
            })
            .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
            .collect();
        let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
        if !reads.is_empty() {
            qemu_io(image, "qcow2", true, &reads)?;
        }

        let dirty = bitmap_dirty_extents(image, &self.bitmap)?;
        let want = script.expected_dirty_extents(self.granularity, self.size);
        if dirty != want {
            return Err(E2eError::Check(format!(
                "dirty extents {dirty:?}, expected exactly {want:?}"
            )));
        }
        Ok(dirty)
    }
}
