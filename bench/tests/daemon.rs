//! The load generator against our daemon's library server on a small raw image:
//! requests really complete, writes really land, CPU accounting works.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost_blk_bench::conn::connect;
use vhost_blk_bench::guest::GuestMem;
use vhost_blk_bench::job::{run_job, JobSpec, RunTimes};
use vhost_blk_bench::vq::MEM_SIZE;
use vhost_device_blk_bitmap::device::BlkDevice;
use vhost_device_blk_bitmap::disk::{open_disk, DiskOptions, ImageFormat};
use vhost_device_blk_bitmap::server::{Server, ServerConfig, StopHandle};
use vhost_device_blk_bitmap::tracker::NoopTracker;

const DISK: usize = 4 << 20;

fn times(ms: u64) -> RunTimes {
    RunTimes {
        ramp: Duration::from_millis(20),
        runtime: Duration::from_millis(ms),
        timeout: Duration::from_secs(10),
    }
}

#[test]
fn drives_the_daemon_and_writes_land() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; DISK]).unwrap();
    let socket = dir.path().join("vhost.sock");
    let disk = open_disk(&DiskOptions {
        path: image.clone(),
        format: Some(ImageFormat::Raw),
        read_only: false,
        direct: false,
        create_size: None,
        known_autoclear: 0,
        backing: Default::default(),
    })
    .unwrap();
    let device = Arc::new(BlkDevice::new(
        disk.image.clone(),
        Arc::new(NoopTracker),
        512,
        b"bench-test",
        true,
    ));
    let stop = StopHandle::new().unwrap();
    let server = Server::new(
        ServerConfig {
            socket_path: socket.clone(),
            num_queues: 1,
            queue_size: 1024,
            aio: Default::default(),
            access: Default::default(),
        },
        device,
        stop.clone(),
    );
    let t = thread::spawn(move || server.run());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "daemon socket never appeared");
        thread::sleep(Duration::from_millis(10));
    }

    // Without and with an inflight region (the daemon listens again after a disconnect).
    for inflight in [false, true] {
        let mem = GuestMem::new(MEM_SIZE).unwrap();
        let (conn, mut q) = connect(&socket, &mem, true, inflight).unwrap();
        assert_eq!(conn.capacity, DISK as u64);
        let pid = Some(std::process::id());
        for (i, name) in ["randwrite-4k-qd4", "randread-4k-qd1", "write-64k-qd2"]
            .iter()
            .enumerate()
        {
            let spec = JobSpec::parse(name).unwrap();
            let r = run_job(
                &mut q,
                &mem,
                &spec,
                conn.capacity,
                times(150),
                pid,
                i as u64,
            )
            .unwrap();
            assert!(r.ios > 0, "{name}: no request completed");
            assert_eq!(r.errors, 0, "{name}: failed requests");
            assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us, "{name}: {r:?}");
            assert!(r.cpu_us_per_io.is_some_and(|c| c >= 0.0));
        }
    }
    // Random data went to the disk (it was all zeros).
    let data = std::fs::read(&image).unwrap();
    let nonzero = data
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count();
    assert!(nonzero > 8, "only {nonzero} blocks written");

    stop.stop();
    t.join().unwrap().unwrap();
    drop(disk);
}

#[test]
fn refuses_a_missing_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMem::new(MEM_SIZE).unwrap();
    let e = connect(&dir.path().join("none.sock"), &mem, true, false).unwrap_err();
    assert!(e.to_string().contains("none.sock"), "{e}");
}
