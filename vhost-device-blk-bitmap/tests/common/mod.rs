//! A minimal in-process vhost-user-blk frontend ("driver") and daemon fixture.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use qcow2::BlockImage;
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_device_blk_bitmap::device::BlkDevice;
use vhost_device_blk_bitmap::disk::{open_disk, DiskOptions, ImageFormat};
use vhost_device_blk_bitmap::server::{Server, ServerConfig, ServerError, StopHandle};
use vhost_device_blk_bitmap::tracker::{NoopTracker, WriteTracker};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM of the test driver.
pub const MEM_SIZE: usize = 16 << 20;
/// Disk size of the test image.
pub const DISK_SIZE: u64 = 8 << 20;
/// Queue size used by the driver.
pub const QSIZE: u16 = 256;

/// Byte `i` of the initial image.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(13) ^ (i >> 10)) as u8
}

/// A memfd of `len` bytes.
pub fn memfd(name: &str, len: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: cname is a valid NUL-terminated string; flags are valid.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// The I/O engine of test daemons: io_uring unless `VBLK_TEST_AIO=threads` (the
/// protocol tests also run the threads engine explicitly).
pub fn aio() -> vhost_device_blk_bitmap::config::Aio {
    match std::env::var("VBLK_TEST_AIO").as_deref() {
        Ok("threads") => vhost_device_blk_bitmap::config::Aio::Threads,
        _ => vhost_device_blk_bitmap::config::Aio::IoUring,
    }
}

/// How a [`TestDaemon`] serves.
#[derive(Debug, Clone, Default)]
pub struct DaemonOpts {
    /// Request queues (0 means 1).
    pub num_queues: usize,
    /// An empty qcow2 image instead of a raw one filled with [`pattern`].
    pub qcow2: bool,
    /// Cluster size of the qcow2 image (0: the default, 64 KiB).
    pub cluster_size: u64,
    /// O_DIRECT.
    pub direct: bool,
    /// The I/O engine; `None` = [`aio`].
    pub aio: Option<vhost_device_blk_bitmap::config::Aio>,
}

/// A daemon served by the library's `Server` in a thread.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub stop: StopHandle,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestDaemon {
    pub fn start(num_queues: usize) -> Self {
        Self::start_with(num_queues, |i| i)
    }

    /// Like `start`, with the image wrapped by `wrap` (e.g. to inject delays).
    pub fn start_with(
        num_queues: usize,
        wrap: impl FnOnce(Arc<dyn BlockImage>) -> Arc<dyn BlockImage>,
    ) -> Self {
        Self::start_full(num_queues, wrap, Arc::new(NoopTracker))
    }

    /// Like `start_with`, with a write tracker.
    pub fn start_full(
        num_queues: usize,
        wrap: impl FnOnce(Arc<dyn BlockImage>) -> Arc<dyn BlockImage>,
        tracker: Arc<dyn WriteTracker>,
    ) -> Self {
        Self::start_opts(
            &DaemonOpts {
                num_queues,
                ..Default::default()
            },
            wrap,
            tracker,
        )
    }

    /// A daemon with every option: image format, O_DIRECT, I/O engine.
    pub fn start_opts(
        opts: &DaemonOpts,
        wrap: impl FnOnce(Arc<dyn BlockImage>) -> Arc<dyn BlockImage>,
        tracker: Arc<dyn WriteTracker>,
    ) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let num_queues = opts.num_queues.max(1);
        let dir = tempfile::tempdir().unwrap();
        let image = if opts.qcow2 {
            // An empty qcow2 (64 KiB clusters): every first write allocates.
            let image = dir.path().join("disk.qcow2");
            qcow2::create(
                &image,
                &qcow2::CreateOptions {
                    size: DISK_SIZE,
                    cluster_size: if opts.cluster_size == 0 {
                        65536
                    } else {
                        opts.cluster_size
                    },
                    ..Default::default()
                },
            )
            .unwrap();
            image
        } else {
            let image = dir.path().join("disk.raw");
            let data: Vec<u8> = (0..DISK_SIZE).map(pattern).collect();
            std::fs::write(&image, data).unwrap();
            image
        };
        let socket = dir.path().join("vhost.sock");
        let disk = open_disk(&DiskOptions {
            path: image.clone(),
            format: Some(if opts.qcow2 {
                ImageFormat::Qcow2
            } else {
                ImageFormat::Raw
            }),
            read_only: false,
            direct: opts.direct,
            create_size: None,
            known_autoclear: 0,
            backing: Default::default(),
        })
        .unwrap();
        let aio = opts.aio.unwrap_or_else(aio);
        let device = Arc::new(BlkDevice::new(
            wrap(disk.image.clone()),
            tracker,
            512,
            b"test-serial",
            true,
        ));
        let stop = StopHandle::new().unwrap();
        let server = Server::new(
            ServerConfig {
                socket_path: socket.clone(),
                num_queues,
                queue_size: 1024,
                aio,
                access: Default::default(),
            },
            device,
            stop.clone(),
        );
        let thread = thread::spawn(move || {
            let r = server.run();
            drop(disk);
            r
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "daemon socket never appeared");
            thread::sleep(Duration::from_millis(10));
        }
        TestDaemon {
            dir,
            socket,
            image,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the daemon and returns its result.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap()
    }

    /// Stops the daemon and hands over its folder (image included) for inspection.
    pub fn stop_keep_dir(mut self) -> (Result<(), ServerError>, tempfile::TempDir) {
        self.stop.stop();
        let r = self.thread.take().unwrap().join().unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (r, dir)
    }

    pub fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; len];
        File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut v, offset)
            .unwrap();
        v
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.stop();
            let _ = t.join();
        }
    }
}

/// One queue of the driver; can be moved to its own thread.
pub struct QueueDriver {
    pub q: usize,
    mem: GuestMemoryMmap<()>,
    base: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// The guest side: memory, rings, and a vhost-user frontend connection.
pub struct Driver {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub host_base: u64,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub queues: Vec<QueueDriver>,
    mem_file: File,
    /// The inflight region the daemon gave (`connect_inflight`), kept across reconnects
    /// as QEMU and cloud-hypervisor keep it.
    pub inflight: Option<(VhostUserInflight, File)>,
}

/// Which ring base a reconnecting frontend sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingBase {
    /// The used index (QEMU after a backend it could not stop).
    Used,
    /// The avail index (cloud-hypervisor).
    Avail,
}

/// Guest address of queue `q`'s ring area.
pub fn ring_base(q: usize) -> u64 {
    q as u64 * 0x4000
}
/// Guest address of queue `q`'s request header.
pub fn header_addr(q: usize) -> u64 {
    0x10_0000 + q as u64 * 0x2000
}
/// Guest address of queue `q`'s status byte (own page).
pub fn status_addr(q: usize) -> u64 {
    header_addr(q) + 0x1000
}
/// Guest address of queue `q`'s data area (1 MiB).
pub fn data_addr(q: usize) -> u64 {
    0x20_0000 + q as u64 * 0x10_0000
}

impl Driver {
    /// Connects and negotiates everything offered except LOG_ALL.
    pub fn connect(socket: &Path, num_queues: usize) -> Self {
        Self::connect_opts(socket, num_queues, false)
    }

    /// Like [`Driver::connect`], and asks for an inflight region (GET_INFLIGHT_FD) and
    /// hands it back (SET_INFLIGHT_FD) before the rings start, as QEMU does.
    pub fn connect_inflight(socket: &Path, num_queues: usize) -> Self {
        Self::connect_opts(socket, num_queues, true)
    }

    /// SET_OWNER to SET_FEATURES; returns the frontend, acked features and protocol.
    fn negotiate(socket: &Path, num_queues: usize) -> (Frontend, u64, VhostUserProtocolFeatures) {
        let fe = Frontend::connect(socket, num_queues as u64).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let mut fe = fe;
        let protocol = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(protocol).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let features = offered & !VhostUserVirtioFeatures::LOG_ALL.bits();
        fe.set_features(features).unwrap();
        (fe, features, protocol)
    }

    fn connect_opts(socket: &Path, num_queues: usize, inflight: bool) -> Self {
        let (mut fe, features, protocol) = Self::negotiate(socket, num_queues);
        let mem_file = memfd("guest-ram", MEM_SIZE as u64);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(mem_file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let host_base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let region = mem.find_region(GuestAddress(0)).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
            .unwrap();
        let inflight = inflight.then(|| {
            assert!(protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
            let ask = VhostUserInflight {
                num_queues: num_queues as u16,
                queue_size: QSIZE,
                ..Default::default()
            };
            let (info, file) = fe.get_inflight_fd(&ask).unwrap();
            fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
            (info, file)
        });
        let mut d = Driver {
            fe,
            mem,
            host_base,
            features,
            protocol,
            queues: Vec::new(),
            mem_file,
            inflight,
        };
        for q in 0..num_queues {
            d.setup_queue(q);
        }
        d
    }

    /// Connects again to a (restarted) daemon with the same memory, rings and inflight
    /// region, the way QEMU and cloud-hypervisor reconnect: each ring restarts at `base`
    /// and is kicked.
    pub fn reconnect(&mut self, socket: &Path, base: RingBase) {
        let n = self.queues.len();
        let (mut fe, _, _) = Self::negotiate(socket, n);
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
            .unwrap();
        if let Some((info, file)) = &self.inflight {
            fe.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        }
        self.fe = fe;
        for q in 0..n {
            let ring = ring_base(q);
            self.fe.set_vring_num(q, QSIZE).unwrap();
            self.fe.set_vring_addr(q, &self.vring_config(ring)).unwrap();
            let qd = &self.queues[q];
            let b = match base {
                RingBase::Used => qd.used_idx(),
                RingBase::Avail => qd.next_avail,
            };
            self.fe.set_vring_base(q, b).unwrap();
            self.fe.set_vring_call(q, &qd.call).unwrap();
            self.fe.set_vring_kick(q, &qd.kick).unwrap();
            self.fe.set_vring_enable(q, true).unwrap();
            let _ = qd.kick.write(1);
        }
    }

    fn vring_config(&self, base: u64) -> VringConfigData {
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.host_base + base,
            avail_ring_addr: self.host_base + base + 0x1000,
            used_ring_addr: self.host_base + base + 0x2000,
            log_addr: None,
        }
    }

    fn setup_queue(&mut self, q: usize) {
        let base = ring_base(q);
        self.fe.set_vring_num(q, QSIZE).unwrap();
        self.fe.set_vring_addr(q, &self.vring_config(base)).unwrap();
        self.fe.set_vring_base(q, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        self.fe.set_vring_call(q, &call).unwrap();
        self.fe.set_vring_kick(q, &kick).unwrap();
        self.fe.set_vring_enable(q, true).unwrap();
        self.queues.push(QueueDriver {
            q,
            mem: self.mem.clone(),
            base,
            next_avail: 0,
            last_used: 0,
            kick,
            call,
        });
    }

    /// Sends a request on queue `q` and waits for it; returns (status, used length).
    pub fn request(
        &mut self,
        q: usize,
        request_type: u32,
        sector: u64,
        data: Option<(u32, bool)>,
    ) -> (u8, u32) {
        self.queues[q].request(request_type, sector, data)
    }

    /// Writes queue `q`'s data area.
    pub fn write_data(&self, q: usize, data: &[u8]) {
        self.queues[q].write_data(data)
    }

    /// Reads queue `q`'s data area.
    pub fn read_data(&self, q: usize, len: usize) -> Vec<u8> {
        self.queues[q].read_data(len)
    }
}

impl QueueDriver {
    /// Places a chain of (guest address, length, device-writable) buffers on the queue
    /// (descriptors 0..n) and kicks; does not wait.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)]) {
        self.submit_batch(&[bufs.to_vec()], bufs.len().max(1) as u16);
    }

    /// Writes a chain's descriptors from `first` on and its head into the next avail
    /// slot (not yet published: the caller writes the avail index and kicks).
    fn place_chain(&mut self, first: u16, bufs: &[(u64, u32, bool)]) {
        let avail = self.base + 0x1000;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = first + i as u16;
            let mut flags = 0u16;
            if i + 1 < bufs.len() {
                flags |= 1; // NEXT
            }
            if write {
                flags |= 2; // WRITE
            }
            let d = self.base + 16 * u64::from(idx);
            self.mem.write_obj(addr.to_le(), GuestAddress(d)).unwrap();
            self.mem
                .write_obj(len.to_le(), GuestAddress(d + 8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), GuestAddress(d + 12))
                .unwrap();
            self.mem
                .write_obj((idx + 1).to_le(), GuestAddress(d + 14))
                .unwrap();
        }
        let slot = u64::from(self.next_avail % QSIZE);
        self.mem
            .write_obj(first.to_le(), GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Places several chains at once (chain `i` uses descriptors from `i * stride`) and
    /// kicks once; returns their head indices in submission order.
    pub fn submit_batch(&mut self, chains: &[Vec<(u64, u32, bool)>], stride: u16) -> Vec<u16> {
        let avail = self.base + 0x1000;
        let mut heads = Vec::new();
        for (c, bufs) in chains.iter().enumerate() {
            let first = c as u16 * stride;
            assert!(bufs.len() <= stride as usize && first + stride <= QSIZE);
            self.place_chain(first, bufs);
            heads.push(first);
        }
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.next_avail.to_le(), GuestAddress(avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
        heads
    }

    /// Waits for `n` more used entries; returns (head, used length) in used-ring order.
    pub fn wait_used(&mut self, n: usize) -> Vec<(u16, u32)> {
        let used = self.base + 0x2000;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while out.len() < n {
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            fence(Ordering::SeqCst);
            while self.last_used != idx && out.len() < n {
                let slot = u64::from(self.last_used % QSIZE);
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(used + 4 + 8 * slot))
                    .unwrap();
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(used + 8 + 8 * slot))
                    .unwrap();
                out.push((id as u16, len));
                self.last_used = self.last_used.wrapping_add(1);
            }
            if out.len() < n {
                assert!(
                    Instant::now() < deadline,
                    "queue {}: only {} of {n} requests completed",
                    self.q,
                    out.len()
                );
                thread::sleep(Duration::from_micros(100));
            }
        }
        let _ = self.call.read();
        out
    }

    /// The used index the device last published.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.base + 0x2002)).unwrap()
    }

    /// Guest memory of the driver.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Whether the oldest submitted request has completed.
    pub fn is_complete(&self) -> bool {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.base + 0x2002)).unwrap();
        idx != self.last_used
    }

    /// Waits for the oldest submitted request; returns its used length.
    pub fn wait(&mut self) -> u32 {
        let used = self.base + 0x2000;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.is_complete() {
            assert!(
                Instant::now() < deadline,
                "request on queue {} never completed",
                self.q
            );
            thread::sleep(Duration::from_micros(200));
        }
        fence(Ordering::SeqCst);
        let slot = u64::from(self.last_used % QSIZE);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(used + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(used + 8 + 8 * slot))
            .unwrap();
        assert_eq!(id, 0, "head index");
        self.last_used = self.last_used.wrapping_add(1);
        let _ = self.call.read();
        len
    }

    /// Writes the header of a request and returns its chain (header, data area, status).
    pub fn prepare(
        &self,
        request_type: u32,
        sector: u64,
        data: Option<(u32, bool)>,
    ) -> Vec<(u64, u32, bool)> {
        let q = self.q;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(header_addr(q)))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(status_addr(q)))
            .unwrap();
        let mut bufs = vec![(header_addr(q), 16, false)];
        if let Some((len, write)) = data {
            bufs.push((data_addr(q), len, write));
        }
        bufs.push((status_addr(q), 1, true));
        bufs
    }

    /// The status byte of the last request.
    pub fn status(&self) -> u8 {
        self.mem
            .read_obj(GuestAddress(status_addr(self.q)))
            .unwrap()
    }

    /// Sends a request with a data buffer in the queue's data area and waits for it;
    /// returns (status, used length).
    pub fn request(
        &mut self,
        request_type: u32,
        sector: u64,
        data: Option<(u32, bool)>,
    ) -> (u8, u32) {
        let bufs = self.prepare(request_type, sector, data);
        self.submit(&bufs);
        let used = self.wait();
        (self.status(), used)
    }

    /// Writes the data area.
    pub fn write_data(&self, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(data_addr(self.q)))
            .unwrap();
    }

    /// Reads the data area.
    pub fn read_data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(data_addr(self.q)))
            .unwrap();
        v
    }
}

/// The daemon binary of this package.
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-blk-bitmap");

pub fn raw_image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    let data: Vec<u8> = (0..DISK_SIZE).map(pattern).collect();
    std::fs::write(&p, data).unwrap();
    p
}

/// The daemon process; killed if a test fails before it exits.
pub struct Daemon(pub Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the daemon binary serving `image` on `socket` with `extra` options.
pub fn spawn(socket: &Path, image: &Path, extra: &[&str]) -> Daemon {
    Daemon(
        Command::new(BIN)
            .arg("--socket-path")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Waits until the daemon created `socket` (fails if it exits first).
pub fn wait_for_socket(child: &mut Child, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited early: {st}");
        }
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `secs` for the child to exit (kills it and fails after that).
pub fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("daemon did not exit within {secs}s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to the child.
pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill only sends a signal to the child we spawned (not yet reaped).
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0);
}

/// Everything the child wrote to its (piped) stderr.
pub fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// A small tmpfs mounted for a test (unmounted on drop), to fill a file system up.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    /// Mounts a tmpfs of `size` (e.g. "1m") at `dir/small`; `None` (with a note) when
    /// that is not allowed here — which fails the test under CI=true (CI runs as root).
    pub fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        let mnt = dir.join("small");
        std::fs::create_dir(&mnt).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "mounting a small tmpfs failed under CI=true"
            );
            eprintln!("note: cannot mount a tmpfs, test skipped");
            return None;
        }
        Some(SmallFs(mnt))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Whether `tool` is installed; under CI=true a missing tool fails the test (Debian
/// package qemu-utils for QEMU's tools).
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required when CI=true (apt-get install qemu-utils)"
        );
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

/// A descriptor chain: (guest address, length, device-writable) per buffer.
pub type Chain = Vec<(u64, u32, bool)>;

/// Continuous queue depth: chains placed at chosen descriptors, used entries polled
/// without waiting (a daemon killed with requests in flight never completes them).
impl QueueDriver {
    /// Places each `(first descriptor, chain)` at its descriptors, publishes them all in
    /// the avail ring and kicks once. The caller keeps the descriptor ranges of chains
    /// still in flight apart.
    pub fn submit_at(&mut self, chains: &[(u16, Chain)]) {
        if chains.is_empty() {
            return;
        }
        let avail = self.base + 0x1000;
        for (first, bufs) in chains {
            assert!(usize::from(*first) + bufs.len() <= usize::from(QSIZE));
            self.place_chain(*first, bufs);
        }
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.next_avail.to_le(), GuestAddress(avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        // The daemon may be gone (killed): the eventfd is ours, so this cannot fail
        // because of it, and a lost kick only leaves the chains in the ring.
        let _ = self.kick.write(1);
    }

    /// The used entries `(head, used length)` published since the last call, in
    /// used-ring order; returns at once (empty if there are none).
    pub fn poll_used(&mut self) -> Vec<(u16, u32)> {
        let used = self.base + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        fence(Ordering::SeqCst);
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = u64::from(self.last_used % QSIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(used + 4 + 8 * slot))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(used + 8 + 8 * slot))
                .unwrap();
            out.push((id as u16, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        if !out.is_empty() {
            let _ = self.call.read();
        }
        out
    }
}

/// Starts the daemon binary like [`spawn`], with its stderr (the log) going to the file
/// `log` instead of a pipe, so a long run cannot block on a full pipe. A socket left
/// behind by a killed daemon is removed first (so [`wait_for_socket`] sees the new one).
pub fn spawn_logged(socket: &Path, image: &Path, extra: &[&str], log: &Path) -> Daemon {
    let _ = std::fs::remove_file(socket);
    let err = File::create(log).unwrap();
    Daemon(
        Command::new(BIN)
            .arg("--socket-path")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap(),
    )
}

/// A running daemon (its log in a file); killed if the test fails first.
pub struct Served {
    child: Daemon,
    log: PathBuf,
}

impl Served {
    /// Starts the daemon and waits for its socket; panics with the log if it exits first.
    pub fn start(socket: &Path, image: &Path, extra: &[&str], log: &Path) -> Served {
        let mut child = spawn_logged(socket, image, extra, log);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("daemon exited ({st}) instead of serving:\n{}", read(log));
            }
            assert!(
                Instant::now() < deadline,
                "no socket after 30 s:\n{}",
                read(log)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Served {
            child,
            log: log.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }

    /// SIGKILL, reaped: every request it completed is in the used rings now.
    pub fn kill9(mut self) -> String {
        signal(&self.child, libc::SIGKILL);
        self.child.wait().unwrap();
        self.log()
    }

    /// SIGTERM; it must exit 0 within 30 s. Returns the log.
    pub fn term(mut self) -> String {
        signal(&self.child, libc::SIGTERM);
        let st = wait_exit(&mut self.child, 30);
        let log = self.log();
        assert!(st.success(), "exit {st} after SIGTERM:\n{log}");
        log
    }
}

/// A file's text (empty if it cannot be read).
pub fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}
