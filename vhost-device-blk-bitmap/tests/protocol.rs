//! vhost-user protocol tests against the daemon with a real in-process frontend.

mod common;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier, Condvar, Mutex};

use common::*;
use qcow2::BlockImage;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vhost_device_blk_bitmap::tracker::{TrackerError, WriteTracker};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

#[test]
fn negotiation_config_and_device_state() {
    let daemon = TestDaemon::start(2);
    let mut d = Driver::connect(&daemon.socket, 2);
    let offered = d.fe.get_features().unwrap();
    for bit in [32u32, 29, 28, 2, 6, 9, 10, 11, 12, 13, 14, 30, 26] {
        assert_ne!(offered & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_eq!(offered & (1 << 5), 0, "RO not offered for a writable disk");
    let p = d.protocol;
    for want in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::DEVICE_STATE,
        VhostUserProtocolFeatures::LOG_SHMFD,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    ] {
        assert!(p.contains(want), "{want:?}");
    }
    assert_eq!(d.fe.get_queue_num().unwrap(), 2);

    let (_, cfg) =
        d.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK_SIZE / 512
    );
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 2);
    assert_eq!(cfg[32], 1, "writeback by default");
    d.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    let (_, cfg) =
        d.fe.get_config(32, 1, VhostUserConfigFlags::WRITABLE, &[0u8; 1])
            .unwrap();
    assert_eq!(cfg, vec![0]);
    // Writes to read-only fields are ignored and keep the connection.
    d.fe.set_config(0, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap();
    let (_, cfg) =
        d.fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK_SIZE / 512
    );

    // GET_ID and FLUSH through the rings.
    let (st, used) = d.request(0, T_GET_ID, 0, Some((20, true)));
    assert_eq!((st, used), (0, 21));
    assert_eq!(&d.read_data(0, 11), b"test-serial");
    assert_eq!(d.request(1, T_FLUSH, 0, None), (0, 1));

    // Device state: empty blob, transferred in-band.
    let (tx, _rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let r =
        d.fe.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            tx.into(),
        )
        .unwrap();
    assert!(r.is_none());
    d.fe.check_device_state().unwrap();
    drop(d);
    daemon.stop().unwrap();
}

#[test]
fn io_on_two_queues_in_parallel() {
    let daemon = TestDaemon::start(2);
    let mut driver = Driver::connect(&daemon.socket, 2);
    let queues: Vec<QueueDriver> = driver.queues.drain(..).collect();
    let barrier = Arc::new(Barrier::new(2));
    let mut threads = Vec::new();
    for mut qd in queues {
        let barrier = barrier.clone();
        threads.push(std::thread::spawn(move || {
            let q = qd.q as u64;
            barrier.wait();
            for i in 0..60u64 {
                let sector = q * 8192 + i * 16;
                let data: Vec<u8> = (0..8192u64)
                    .map(|j| (j as u8) ^ (i as u8) ^ (q as u8 * 0x55))
                    .collect();
                qd.write_data(&data);
                assert_eq!(qd.request(T_OUT, sector, Some((8192, false))), (0, 1));
                qd.write_data(&[0u8; 8192]);
                assert_eq!(qd.request(T_IN, sector, Some((8192, true))), (0, 8193));
                assert_eq!(qd.read_data(8192), data);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    // Data reached the image.
    for q in 0..2u64 {
        let img = daemon.image_bytes((q * 8192 + 16) * 512, 8192);
        let want: Vec<u8> = (0..8192u64)
            .map(|j| (j as u8) ^ 1 ^ (q as u8 * 0x55))
            .collect();
        assert_eq!(img, want, "queue {q}");
    }
    drop(driver);
    daemon.stop().unwrap();
}

/// Reads of one sector block until released; everything else passes through.
#[derive(Debug)]
struct GateImage {
    inner: Arc<dyn BlockImage>,
    gated_offset: u64,
    open: Mutex<bool>,
    cv: Condvar,
    entered: Mutex<bool>,
}

impl BlockImage for GateImage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2::Result<()> {
        if offset == self.gated_offset {
            *self.entered.lock().unwrap() = true;
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> qcow2::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> qcow2::Result<()> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> qcow2::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> qcow2::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_blocked_queue_does_not_block_the_other() {
    let gate: Arc<Mutex<Option<Arc<GateImage>>>> = Arc::new(Mutex::new(None));
    let g2 = gate.clone();
    let daemon = TestDaemon::start_with(2, move |inner| {
        let g = Arc::new(GateImage {
            inner,
            gated_offset: 4096 * 100,
            open: Mutex::new(false),
            cv: Condvar::new(),
            entered: Mutex::new(false),
        });
        *g2.lock().unwrap() = Some(g.clone());
        g
    });
    let gate = gate.lock().unwrap().clone().unwrap();
    let mut d = Driver::connect(&daemon.socket, 2);
    // Queue 0: a read that blocks inside the image.
    let bufs = d.queues[0].prepare(T_IN, 800, Some((4096, true)));
    d.queues[0].submit(&bufs);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !*gate.entered.lock().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "queue 0 never reached the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Queue 1 keeps working meanwhile.
    for i in 0..10u64 {
        d.write_data(1, &[i as u8; 4096]);
        assert_eq!(d.request(1, T_OUT, i * 8, Some((4096, false))), (0, 1));
        assert_eq!(d.request(1, T_IN, i * 8, Some((4096, true))), (0, 4097));
        assert_eq!(d.read_data(1, 4096), vec![i as u8; 4096]);
    }
    assert!(!d.queues[0].is_complete(), "queue 0 is still blocked");
    *gate.open.lock().unwrap() = true;
    gate.cv.notify_all();
    assert_eq!(d.queues[0].wait(), 4097);
    assert_eq!(d.queues[0].status(), 0);
    let want: Vec<u8> = (800 * 512..800 * 512 + 4096).map(pattern).collect();
    assert_eq!(d.read_data(0, 4096), want);
    drop(d);
    daemon.stop().unwrap();
}

#[test]
fn reconnect_after_disconnect() {
    let daemon = TestDaemon::start(1);
    for round in 0..3u8 {
        let mut d = Driver::connect(&daemon.socket, 1);
        d.write_data(0, &[round + 10; 512]);
        assert_eq!(
            d.request(0, T_OUT, u64::from(round), Some((512, false))),
            (0, 1)
        );
        assert_eq!(d.request(0, T_IN, 0, Some((512, true))), (0, 513));
        assert_eq!(d.read_data(0, 512), vec![10; 512]);
        drop(d);
    }
    assert_eq!(daemon.image_bytes(1024, 512), vec![12; 512]);
    daemon.stop().unwrap();
}

#[test]
fn stop_while_connected_ends_cleanly() {
    let daemon = TestDaemon::start(1);
    let mut d = Driver::connect(&daemon.socket, 1);
    assert_eq!(d.request(0, T_FLUSH, 0, None), (0, 1));
    let socket = daemon.socket.clone();
    daemon.stop().unwrap();
    assert!(!socket.exists(), "socket removed on stop");
    // The connection is gone.
    assert!(d.fe.get_features().is_err());
}

#[test]
fn migration_log_marks_exactly_the_written_pages_io_uring() {
    migration_log_marks_exactly_the_written_pages(vhost_device_blk_bitmap::config::Aio::IoUring);
}

#[test]
fn migration_log_marks_exactly_the_written_pages_threads() {
    migration_log_marks_exactly_the_written_pages(vhost_device_blk_bitmap::config::Aio::Threads);
}

/// Under io_uring the kernel writes the data pages behind vm-memory's back: the daemon
/// must log them itself.
fn migration_log_marks_exactly_the_written_pages(aio: vhost_device_blk_bitmap::config::Aio) {
    let daemon = TestDaemon::start_opts(
        &common::DaemonOpts {
            num_queues: 1,
            aio: Some(aio),
            ..Default::default()
        },
        |i| i,
        std::sync::Arc::new(vhost_device_blk_bitmap::tracker::NoopTracker),
    );
    let mut d = Driver::connect(&daemon.socket, 1);
    // Warm up: one request so the ring state is settled before logging starts.
    assert_eq!(d.request(0, T_FLUSH, 0, None), (0, 1));

    let pages = MEM_SIZE / 4096;
    let log_len = (pages / 8) as u64;
    let log = memfd("dirty-log", 4096.max(log_len));
    d.fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: 4096.max(log_len),
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        }),
    )
    .unwrap();
    d.fe.set_features(d.features | VhostUserVirtioFeatures::LOG_ALL.bits())
        .unwrap();

    // Read 3 pages + 512 bytes into the data area (4 guest pages touched).
    let len = 3 * 4096 + 512;
    assert_eq!(d.request(0, T_IN, 0, Some((len, true))), (0, len + 1));

    let bits = {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; log_len as usize];
        log.read_exact_at(&mut v, 0).unwrap();
        v
    };
    let dirty: Vec<u64> = (0..pages as u64)
        .filter(|p| bits[(*p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect();
    let data_page = data_addr(0) / 4096;
    let mut want = vec![
        (ring_base(0) + 0x2000) / 4096, // used ring
        status_addr(0) / 4096,          // status byte
        data_page,
        data_page + 1,
        data_page + 2,
        data_page + 3,
    ];
    want.sort();
    assert_eq!(dirty, want, "dirty guest pages");
    // Data is right too.
    let want_data: Vec<u8> = (0..u64::from(len)).map(pattern).collect();
    assert_eq!(d.read_data(0, len as usize), want_data);
    drop(d);
    daemon.stop().unwrap();
}

#[test]
fn memory_added_with_add_mem_reg_is_usable() {
    use vhost::VhostUserMemoryRegionInfo;
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    let daemon = TestDaemon::start(1);
    let mut d = Driver::connect(&daemon.socket, 1);
    assert!(d.fe.get_max_mem_slots().unwrap() >= 2);
    let gpa = 0x4000_0000u64;
    let file = memfd("hotplug", 1 << 20);
    let extra = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(gpa),
        1 << 20,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let region = extra.find_region(GuestAddress(gpa)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    d.fe.add_mem_region(&info).unwrap();
    // Read 8 KiB from sector 16 into the new region.
    let mut bufs = d.queues[0].prepare(T_IN, 16, None);
    bufs.insert(1, (gpa + 0x1000, 8192, true));
    d.queues[0].submit(&bufs);
    assert_eq!(d.queues[0].wait(), 8193);
    assert_eq!(d.queues[0].status(), 0);
    let mut got = vec![0u8; 8192];
    extra
        .read_slice(&mut got, GuestAddress(gpa + 0x1000))
        .unwrap();
    let want: Vec<u8> = (16 * 512..16 * 512 + 8192).map(pattern).collect();
    assert_eq!(got, want);
    // After removing it, a request pointing there is rejected, not served.
    d.fe.remove_mem_region(&info).unwrap();
    extra
        .write_slice(&[0xee; 8192], GuestAddress(gpa + 0x1000))
        .unwrap();
    d.queues[0].submit(&bufs);
    assert_eq!(d.queues[0].wait(), 0);
    extra
        .read_slice(&mut got, GuestAddress(gpa + 0x1000))
        .unwrap();
    assert_eq!(got, vec![0xee; 8192]);
    drop(d);
    daemon.stop().unwrap();
}

/// Records the order of tracker calls.
#[derive(Debug, Default)]
struct EventLog(Mutex<Vec<String>>);

impl WriteTracker for EventLog {
    fn mark(&self, offset: u64, len: u64) -> u64 {
        self.0.lock().unwrap().push(format!("mark {offset} {len}"));
        0
    }
    fn on_frontend_connected(&self) -> Result<(), TrackerError> {
        self.0.lock().unwrap().push("connected".into());
        Ok(())
    }
    fn on_frontend_disconnected(&self) -> Result<(), TrackerError> {
        self.0.lock().unwrap().push("disconnected".into());
        Ok(())
    }
    fn on_shutdown(&self) -> Result<(), TrackerError> {
        self.0.lock().unwrap().push("shutdown".into());
        Ok(())
    }
}

#[test]
fn tracker_sees_connections_and_every_write_in_order() {
    let log = Arc::new(EventLog::default());
    let daemon = TestDaemon::start_full(1, |i| i, log.clone());
    for round in 0..2u64 {
        let mut d = Driver::connect(&daemon.socket, 1);
        d.write_data(0, &[1; 1024]);
        assert_eq!(d.request(0, T_OUT, 8 + round, Some((1024, false))), (0, 1));
        // A rejected write (past the end) is not marked.
        assert_eq!(
            d.request(0, T_OUT, DISK_SIZE / 512, Some((512, false))).0,
            1
        );
        // CH may reset features to 0 on a device the guest never started: tolerated.
        d.fe.set_features(0).unwrap();
        assert!(d.fe.get_features().is_ok());
        drop(d);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| *e == "disconnected")
            .count()
            <= round as usize
        {
            assert!(std::time::Instant::now() < deadline, "no disconnect seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    daemon.stop().unwrap();
    assert_eq!(
        *log.0.lock().unwrap(),
        vec![
            "connected",
            "mark 4096 1024",
            "disconnected",
            "connected",
            "mark 4608 1024",
            "disconnected"
        ]
    );
}
