//! Many clients, disconnects in the middle of replies, export removal, client limits and
//! shutdown.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nbd::{Export, NbdError, RemoveMode, Server, ServerOptions};

const MIB: u64 = 1 << 20;

#[test]
fn fifty_clients_each_on_their_own_region() {
    let disk = Arc::new(MemExport::new(64 * MIB, false, &[]));
    let f = Fixture::new(
        ServerOptions::default(),
        &[("disk", disk.clone() as Arc<dyn Export>)],
    );
    let region = MIB;
    let threads: Vec<_> = (0..50u64)
        .map(|i| {
            let sock = f.sock.clone();
            let tcp = f.tcp;
            thread::spawn(move || {
                let mut c = if i % 2 == 0 {
                    Client::unix(&sock)
                } else {
                    Client::tcp(tcp)
                }
                .greet();
                if i % 3 == 0 {
                    c.structured();
                }
                c.go("disk");
                let base = i * region;
                let data: Vec<u8> = (0..region)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8))
                    .collect();
                // 16 pipelined writes of 64 KiB, then 16 reads.
                for k in 0..16u64 {
                    let off = k * 65536;
                    c.write_req(
                        0,
                        k,
                        base + off,
                        &data[off as usize..(off + 65536) as usize],
                    );
                }
                let mut acked = std::collections::BTreeSet::new();
                for _ in 0..16 {
                    let cookie = match c.reply().unwrap() {
                        Reply::Simple { error: 0, cookie } => cookie,
                        other => panic!("client {i}: {other:?}"),
                    };
                    acked.insert(cookie);
                }
                assert_eq!(acked.len(), 16);
                for k in 0..16u64 {
                    c.request(0, CMD_READ, 100 + k, base + k * 65536, 65536);
                }
                let structured = i % 3 == 0;
                for _ in 0..16 {
                    let (cookie, got) = if structured {
                        match c.reply().unwrap() {
                            Reply::Chunk {
                                kind: 1,
                                cookie,
                                payload,
                                ..
                            } => (cookie, payload[8..].to_vec()),
                            other => panic!("client {i}: {other:?}"),
                        }
                    } else {
                        // Simple replies: data follows the header; lengths all equal.
                        let (err, cookie) = c.simple().unwrap();
                        assert_eq!(err, 0);
                        let mut buf = vec![0u8; 65536];
                        std::io::Read::read_exact(&mut c.s, &mut buf).unwrap();
                        (cookie, buf)
                    };
                    let k = cookie - 100;
                    assert!(
                        got == data[(k * 65536) as usize..((k + 1) * 65536) as usize],
                        "client {i} read {k}"
                    );
                }
                c.request(0, CMD_FLUSH, 999, 0, 0);
                assert_eq!(c.simple().unwrap(), (0, 999));
                c.request(0, CMD_DISC, 1000, 0, 0);
                assert!(c.closed());
                data
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let data = t.join().unwrap();
        assert!(
            disk.get(i as u64 * region, region as usize) == data,
            "region {i} in memory"
        );
    }
    f.wait_for("all clients gone", 10, || {
        f.server.client_count("disk") == 0
    });
}

#[test]
fn disconnect_mid_reply_does_not_disturb_others() {
    let disk = Arc::new(MemExport::new(64 * MIB, false, &[]));
    disk.fill(0, &vec![9u8; MIB as usize]);
    let f = Fixture::new(
        ServerOptions::default(),
        &[("disk", disk.clone() as Arc<dyn Export>)],
    );
    let mut steady = f.client().greet();
    steady.structured();
    steady.go("disk");
    for round in 0..5 {
        // Ask for 32 MiB several times and hang up without reading.
        let mut rude = f.client().greet();
        rude.structured();
        rude.go("disk");
        for k in 0..4 {
            rude.request(0, CMD_READ, k, 0, 32 << 20);
        }
        let mut buf = [0u8; 100];
        std::io::Read::read_exact(&mut rude.s, &mut buf).unwrap();
        drop(rude);
        // The other client is served normally meanwhile.
        steady.request(0, CMD_READ, round, 4096, 8192);
        let r = steady.reply_chunks();
        let Reply::Chunk {
            payload, cookie, ..
        } = &r[0]
        else {
            panic!("{r:?}")
        };
        assert_eq!(*cookie, round);
        assert!(payload[8..].iter().all(|&b| b == 9));
    }
    f.wait_for("rude clients gone", 20, || {
        f.server.client_count("disk") == 1
    });
    steady.request(0, CMD_DISC, 0, 0, 0);
    assert!(steady.closed());
    f.wait_for("all gone", 10, || f.server.client_count("disk") == 0);
}

#[test]
fn remove_export_safe_refuses_while_in_use() {
    let disk = Arc::new(MemExport::new(MIB, false, &[]));
    let f = Fixture::new(
        ServerOptions::default(),
        &[("disk", disk.clone() as Arc<dyn Export>)],
    );
    // A client in the handshake only does not count.
    let mut idle = f.client().greet();
    assert_eq!(idle.opt_final(OPT_LIST, &[]), REP_ACK);
    assert_eq!(f.server.client_count("disk"), 0);

    let mut c = f.client().greet();
    c.go("disk");
    assert_eq!(f.server.client_count("disk"), 1);
    let err = f
        .server
        .remove_export("disk", RemoveMode::Safe)
        .unwrap_err();
    assert!(matches!(err, NbdError::InUse(_)));
    assert_eq!(err.to_string(), "export 'disk' still in use");
    assert_eq!(f.server.export_names(), vec!["disk"]);
    // Still served.
    c.request(0, CMD_FLUSH, 1, 0, 0);
    assert_eq!(c.simple().unwrap(), (0, 1));

    c.request(0, CMD_DISC, 2, 0, 0);
    assert!(c.closed());
    f.wait_for("client gone", 10, || f.server.client_count("disk") == 0);
    f.server.remove_export("disk", RemoveMode::Safe).unwrap();
    assert!(f.server.export_names().is_empty());
    assert_eq!(
        idle.opt_final(OPT_GO, &info_payload("disk", &[])),
        ERR_UNKNOWN
    );
    let err = f
        .server
        .remove_export("disk", RemoveMode::Safe)
        .unwrap_err();
    assert_eq!(err.to_string(), "Export 'disk' is not found");
}

#[test]
fn remove_export_hard_waits_for_running_requests() {
    let disk = Arc::new(MemExport::new(MIB, false, &[]));
    *disk.read_delay.lock().unwrap() = Duration::from_millis(400);
    let other = Arc::new(MemExport::new(MIB, false, &[]));
    let f = Fixture::new(
        ServerOptions {
            max_clients: 10,
            workers_per_client: 2,
        },
        &[
            ("slow", disk.clone() as Arc<dyn Export>),
            ("other", other as Arc<dyn Export>),
        ],
    );
    let mut bystander = f.client().greet();
    bystander.go("other");
    let mut clients: Vec<Client> = (0..2)
        .map(|_| {
            let mut c = f.client().greet();
            c.go("slow");
            for k in 0..6 {
                c.request(0, CMD_READ, k, k * 4096, 4096);
            }
            c
        })
        .collect();
    f.wait_for("reads running", 10, || {
        disk.reads_in_flight.load(Ordering::SeqCst) >= 2
    });
    assert_eq!(f.server.client_count("slow"), 2);
    let t0 = Instant::now();
    f.server.remove_export("slow", RemoveMode::Hard).unwrap();
    let waited = t0.elapsed();
    // On return nothing runs in the export and nothing starts later.
    assert_eq!(disk.reads_in_flight.load(Ordering::SeqCst), 0);
    let started = disk.reads_started.load(Ordering::SeqCst);
    assert_eq!(started, disk.reads_finished.load(Ordering::SeqCst));
    assert!(
        waited >= Duration::from_millis(100),
        "returned after {waited:?} while reads were sleeping"
    );
    // 2 workers per client: 4 reads were running, the 8 queued ones are dropped.
    assert!(
        started <= 6,
        "queued reads were dropped, not run ({started})"
    );
    let calls = disk.calls.load(Ordering::SeqCst);
    for c in &mut clients {
        assert!(c.closed());
    }
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        disk.calls.load(Ordering::SeqCst),
        calls,
        "export called after removal"
    );
    assert_eq!(f.server.client_count("slow"), 0);
    assert_eq!(f.server.export_names(), vec!["other"]);
    // New clients cannot pick it; the other export's client is untouched.
    let mut c = f.client().greet();
    assert_eq!(c.opt_final(OPT_GO, &info_payload("slow", &[])), ERR_UNKNOWN);
    bystander.request(0, CMD_FLUSH, 5, 0, 0);
    assert_eq!(bystander.simple().unwrap(), (0, 5));
}

#[test]
fn export_name_errors() {
    let server = Server::new(ServerOptions::default());
    let e = Arc::new(MemExport::new(MIB, false, &[]));
    server.add_export("a", e.clone()).unwrap();
    let err = server.add_export("a", e.clone()).unwrap_err();
    assert_eq!(err.to_string(), "NBD export 'a' already exists");
    let long = "n".repeat(4097);
    assert!(matches!(
        server.add_export(&long, e.clone()),
        Err(NbdError::InvalidName(_))
    ));
    server.add_export(&"n".repeat(4096), e.clone()).unwrap();
    assert_eq!(server.export_names().len(), 2);
    assert!(matches!(
        server.remove_export("zz", RemoveMode::Hard),
        Err(NbdError::NoSuchExport(_))
    ));
    assert_eq!(server.client_count("zz"), 0);
    assert!(format!("{server:?}").contains("\"a\""));
}

#[test]
fn max_clients_refuses_extra_connections() {
    let disk = Arc::new(MemExport::new(MIB, false, &[]));
    let f = Fixture::new(
        ServerOptions {
            max_clients: 2,
            workers_per_client: 2,
        },
        &[("disk", disk as Arc<dyn Export>)],
    );
    let a = f.client().greet();
    let mut b = f.client().greet();
    b.go("disk");
    // The third is closed without a greeting.
    let mut c = f.client();
    assert!(c.closed());
    drop(a);
    // A slot frees up once the first one is gone.
    wait_for("a slot", 10, &mut || {
        let mut s = UnixStream::connect(&f.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut g = [0u8; 18];
        std::io::Read::read_exact(&mut s, &mut g).is_ok()
    });
    b.request(0, CMD_FLUSH, 1, 0, 0);
    assert_eq!(b.simple().unwrap(), (0, 1));
}

#[test]
fn shutdown_disconnects_and_stops_listening() {
    let disk = Arc::new(MemExport::new(MIB, false, &[]));
    let f = Fixture::new(
        ServerOptions::default(),
        &[("disk", disk as Arc<dyn Export>)],
    );
    let mut c = f.client().greet();
    c.go("disk");
    let mut hs = f.client().greet(); // still in the handshake
    let handle = f.server.clone();
    let t0 = Instant::now();
    handle.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(c.closed());
    assert!(hs.closed());
    assert!(UnixStream::connect(&f.sock).is_err(), "listener closed");
    assert!(
        std::net::TcpStream::connect(f.tcp).is_err(),
        "tcp listener closed"
    );
    f.server.shutdown(); // idempotent
    assert!(f
        .server
        .serve_unix(std::os::unix::net::UnixListener::bind(f.dir.path().join("x")).unwrap())
        .is_err());
}

#[test]
fn dropping_the_last_handle_shuts_down() {
    let disk = Arc::new(MemExport::new(MIB, false, &[]));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let server = Server::new(ServerOptions::default());
    server.add_export("disk", disk).unwrap();
    server
        .serve_unix(std::os::unix::net::UnixListener::bind(&sock).unwrap())
        .unwrap();
    let clone = server.clone();
    let mut c = Client::unix(&sock).greet();
    c.go("disk");
    drop(server);
    // Another handle lives: still serving.
    c.request(0, CMD_FLUSH, 1, 0, 0);
    assert_eq!(c.simple().unwrap(), (0, 1));
    drop(clone);
    assert!(c.closed());
    assert!(UnixStream::connect(&sock).is_err());
}

#[test]
fn a_silent_client_does_not_block_others() {
    let disk = Arc::new(MemExport::new(MIB, false, &[]));
    let f = Fixture::new(
        ServerOptions::default(),
        &[("disk", disk as Arc<dyn Export>)],
    );
    // Connects and never speaks; another one is served meanwhile.
    let _silent = UnixStream::connect(&f.sock).unwrap();
    let mut c = f.client().greet();
    c.go("disk");
    c.s.write_all(&request_bytes(0, CMD_FLUSH, 3, 0, 0))
        .unwrap();
    assert_eq!(c.simple().unwrap(), (0, 3));
}
