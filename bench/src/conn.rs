//! vhost-user negotiation and queue 0 set-up, as a VMM does before starting a guest.

use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{BenchError, Result};
use crate::guest::GuestMem;
use crate::vq::{SplitQueue, AVAIL, DESC, QSIZE, USED};

const F_SEG_MAX: u64 = 1 << 2;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_TOPOLOGY: u64 = 1 << 10;
const F_EVENT_IDX: u64 = 1 << 29;
const F_PROTOCOL: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;

/// A negotiated connection with one started queue.
pub struct Connection {
    /// Keeps the session open; dropping it disconnects.
    _fe: Frontend,
    /// Negotiated virtio features.
    pub features: u64,
    /// Disk size in bytes from the config space.
    pub capacity: u64,
    /// The inflight region, when negotiated (kept as a frontend keeps it).
    _inflight: Option<std::fs::File>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("features", &format_args!("{:#x}", self.features))
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn vu<T>(socket: &Path, step: &'static str, r: vhost::Result<T>) -> Result<T> {
    r.map_err(|source| BenchError::VhostUser {
        step,
        socket: PathBuf::from(socket),
        source,
    })
}

fn eventfd(flags: i32) -> Result<EventFd> {
    EventFd::new(flags).map_err(|e| BenchError::Os {
        what: "eventfd".into(),
        source: e,
    })
}

/// Connects to `socket`, negotiates VERSION_1, FLUSH (writeback cache, as a Linux
/// guest), BLK_SIZE, SEG_MAX, TOPOLOGY and (when `event_idx`) RING_EVENT_IDX, shares
/// `mem` and starts queue 0. With `inflight`, also INFLIGHT_SHMFD when the server offers
/// it, with a region fetched and handed back before the ring starts (as QEMU and
/// cloud-hypervisor do), so the server tracks every request in it.
pub fn connect<'m>(
    socket: &Path,
    mem: &'m GuestMem,
    event_idx: bool,
    inflight: bool,
) -> Result<(Connection, SplitQueue<'m>)> {
    let mut fe = vu(socket, "connect", Frontend::connect(socket, 1))?;
    vu(socket, "SET_OWNER", fe.set_owner())?;
    let offered = vu(socket, "GET_FEATURES", fe.get_features())?;
    for (bit, name) in [
        (F_PROTOCOL, "VHOST_USER_F_PROTOCOL_FEATURES"),
        (F_VERSION_1, "VIRTIO_F_VERSION_1"),
    ] {
        if offered & bit == 0 {
            return Err(BenchError::MissingFeature(name));
        }
    }
    let proto = vu(socket, "GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
    let mut need = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG;
    if !proto.contains(need) {
        return Err(BenchError::MissingFeature(
            "protocol features REPLY_ACK and CONFIG",
        ));
    }
    let inflight = inflight && proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    if inflight {
        need |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    vu(
        socket,
        "SET_PROTOCOL_FEATURES",
        fe.set_protocol_features(need),
    )?;
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let mut wanted = F_VERSION_1 | F_PROTOCOL | F_FLUSH | F_BLK_SIZE | F_SEG_MAX | F_TOPOLOGY;
    if event_idx {
        wanted |= F_EVENT_IDX;
    }
    let features = offered & wanted;
    vu(socket, "SET_FEATURES", fe.set_features(features))?;

    let (_, cfg) = vu(
        socket,
        "GET_CONFIG",
        fe.get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8]),
    )?;
    let sectors = u64::from_le_bytes(cfg.get(..8).and_then(|b| b.try_into().ok()).ok_or(
        BenchError::MissingFeature("an 8-byte capacity in GET_CONFIG"),
    )?);
    let capacity = sectors * 512;

    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: mem.len() as u64,
        userspace_addr: mem.host_base(),
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(mem.file()),
    };
    vu(socket, "SET_MEM_TABLE", fe.set_mem_table(&[region]))?;

    let region = if inflight {
        let ask = VhostUserInflight {
            num_queues: 1,
            queue_size: QSIZE,
            ..Default::default()
        };
        let (info, file) = vu(socket, "GET_INFLIGHT_FD", fe.get_inflight_fd(&ask))?;
        vu(
            socket,
            "SET_INFLIGHT_FD",
            fe.set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&file)),
        )?;
        Some(file)
    } else {
        None
    };
    let base = mem.host_base();
    vu(socket, "SET_VRING_NUM", fe.set_vring_num(0, QSIZE))?;
    vu(
        socket,
        "SET_VRING_ADDR",
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: base + DESC,
                avail_ring_addr: base + AVAIL,
                used_ring_addr: base + USED,
                log_addr: None,
            },
        ),
    )?;
    vu(socket, "SET_VRING_BASE", fe.set_vring_base(0, 0))?;
    let kick = eventfd(0)?;
    let call = eventfd(EFD_NONBLOCK)?;
    vu(socket, "SET_VRING_CALL", fe.set_vring_call(0, &call))?;
    vu(socket, "SET_VRING_KICK", fe.set_vring_kick(0, &kick))?;
    let q = SplitQueue::new(mem, features & F_EVENT_IDX != 0, kick, call);
    vu(socket, "SET_VRING_ENABLE", fe.set_vring_enable(0, true))?;
    Ok((
        Connection {
            _fe: fe,
            features,
            capacity,
            _inflight: region,
        },
        q,
    ))
}
