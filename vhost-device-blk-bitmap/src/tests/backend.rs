//! The vhost-user backend over a mock vring: notification, used ring, config space.

use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use super::common::*;
use crate::backend::{BlkBackend, BlkVring};
use crate::device::BlkDevice;
use crate::virtio_blk::*;

fn backend(
    read_only: bool,
    queues: usize,
) -> (BlkBackend, GuestMemoryAtomic<crate::transport::GuestMem>) {
    let f = Fixture::new(read_only, 512);
    let image = f.device.image().clone();
    let device = Arc::new(BlkDevice::new(image, f.tracker.clone(), 512, b"x", true));
    let mem = GuestMemoryAtomic::new(guest_memory());
    (
        BlkBackend::new(
            device,
            queues,
            256,
            crate::config::Aio::Threads,
            mem.clone(),
        )
        .unwrap(),
        mem,
    )
}

#[test]
fn features_and_protocol_features() {
    let (b, _) = backend(false, 2);
    let f = b.features();
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    assert_ne!(f & VhostUserVirtioFeatures::LOG_ALL.bits(), 0);
    assert_eq!(f & (1 << 5), 0, "not read-only");
    let (ro, _) = backend(true, 1);
    assert_ne!(ro.features() & (1 << 5), 0);
    let p = b.protocol_features();
    for want in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::DEVICE_STATE,
        VhostUserProtocolFeatures::LOG_SHMFD,
        // Answered by the relay in front of the crate.
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    ] {
        assert!(p.contains(want), "{want:?}");
    }
    assert_eq!(b.queues_per_thread(), vec![1, 2]);
    assert_eq!(b.num_queues(), 2);
    assert_eq!(b.max_queue_size(), 256);
    assert!(b.check_device_state().is_ok());
}

#[test]
fn config_space_reads_and_wce_writes() {
    let (b, _) = backend(false, 3);
    let cfg = b.get_config(0, 60);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK / 512
    );
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 3);
    assert_eq!(cfg[32], 1);
    // Partial and oversized reads.
    assert_eq!(b.get_config(20, 4), 512u32.to_le_bytes());
    let big = b.get_config(0, 96);
    assert_eq!(big.len(), 96);
    assert_eq!(&big[..60], &cfg[..]);
    assert!(big[60..].iter().all(|&x| x == 0));
    assert_eq!(b.get_config(200, 4), vec![0; 4]);
    // Only wce is writable.
    b.set_config(32, &[0]).unwrap();
    assert_eq!(b.get_config(32, 1), vec![0]);
    assert!(b.device().writethrough());
    // Other fields are ignored (an error would drop the connection).
    let before = b.get_config(0, 60);
    b.set_config(0, &[0xee; 8]).unwrap();
    b.set_config(33, &[7, 7]).unwrap();
    assert_eq!(b.get_config(0, 60), before);
    // A write covering wce and more applies only wce.
    let mut all = before.clone();
    all[32] = 1;
    all[0] = 0x99;
    b.set_config(0, &all).unwrap();
    let after = b.get_config(0, 60);
    assert_eq!(after[32], 1);
    assert_eq!(after[0], before[0]);
    assert!(!b.device().writethrough());
}

fn ready_vring(
    mem: &GuestMemoryAtomic<crate::transport::GuestMem>,
    vq: &MockSplitQueue<'_, crate::transport::GuestMem>,
    event_idx: bool,
) -> BlkVring {
    let vring = BlkVring::new(mem.clone(), 256).unwrap();
    vring.set_queue_size(256);
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

#[test]
fn handle_event_completes_requests_on_the_used_ring() {
    for event_idx in [false, true] {
        let (b, mem) = backend(false, 1);
        b.set_event_idx(event_idx);
        let guard = mem.memory();
        let m: &crate::transport::GuestMem = &guard;
        let vq = MockSplitQueue::new(m, 256);
        // Two chains: a read of sector 1, then a flush.
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&1u64.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
        let mut h2 = [0u8; 16];
        h2[0..4].copy_from_slice(&T_FLUSH.to_le_bytes());
        m.write_slice(&h2, GuestAddress(HDR + 16)).unwrap();
        let descs = [
            with_next(hdr(), 1),
            with_next(wr(DATA, 512), 2),
            status(),
            with_next(rd(HDR + 16, 16), 4),
            wr(STATUS + 1, 1),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let vring = ready_vring(&mem, &vq, event_idx);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        assert_eq!(vq.used().idx().load(), 2, "event_idx={event_idx}");
        let e0 = vq.used().ring().ref_at(0).unwrap().load();
        let e1 = vq.used().ring().ref_at(1).unwrap().load();
        assert_eq!((e0.id(), e0.len()), (0, 513));
        assert_eq!((e1.id(), e1.len()), (3, 1));
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), S_OK);
        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, &x)| x == pattern(512 + i as u64)));
        // A disabled ring is left alone.
        let descs2 = [with_next(rd(HDR + 16, 16), 6), wr(STATUS + 1, 1)];
        vq.add_desc_chains(&descs2, 5).unwrap();
        vring.set_enabled(false);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        assert_eq!(vq.used().idx().load(), 2, "disabled ring not processed");
        vring.set_enabled(true);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        assert_eq!(vq.used().idx().load(), 3, "processed once enabled");
        let e2 = vq.used().ring().ref_at(2).unwrap().load();
        assert_eq!((e2.id(), e2.len()), (5, 1));
        // Unexpected events are ignored, not fatal.
        b.handle_event(0, EventSet::OUT, std::slice::from_ref(&vring), 0)
            .unwrap();
        b.handle_event(5, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
    }
}

fn with_next(d: virtio_queue::desc::RawDescriptor, next: u16) -> virtio_queue::desc::RawDescriptor {
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor;
    let s = Descriptor::from(d);
    virtio_queue::desc::RawDescriptor::from(Descriptor::new(
        s.addr().0,
        s.len(),
        s.flags() | VRING_DESC_F_NEXT as u16,
        next,
    ))
}

#[test]
fn exit_events_are_distinct_per_thread() {
    let (b, _) = backend(false, 2);
    let (c0, _n0) = b.exit_event(0).unwrap();
    let (_c1, n1) = b.exit_event(1).unwrap();
    assert!(b.exit_event(2).is_none());
    n1.notify().unwrap();
    assert!(
        c0.consume().is_err(),
        "thread 0 must not see thread 1's exit"
    );
    b.signal_exit();
    c0.consume().unwrap();
    drop(c0);
    drop(_c1);
}
