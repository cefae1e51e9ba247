//! The tunnel's data path and timer threads, one module each: [`rx`] (`wg-udp-<i>`: UDP →
//! decrypt → TUN), [`tx`] (`wg-tun-<i>`: TUN → encrypt → UDP), one of each per worker `i`, and
//! [`timers`] (`wg-timers`: boringtun's timers, persistent keepalive, the disconnect timeout).
//! Here: what they share — the batch and buffer sizes, the wait on a descriptor or the stop
//! pipe, and a thread's [`View`] of the peer table.
//! The design and its numbers are in the tunnel's module docs.

use std::{
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
};

use crate::tunnel::{peers::Table, shared::Inner};

pub(super) mod rx;
pub(super) mod timers;
pub(super) mod tx;

/// Datagrams / TUN packets handled per wake-up and per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 64;
/// Bytes per packet slot: the largest datagram (MTU + 32 bytes of WireGuard header/tag) fits.
const SLOT: usize = 2048;
/// Room for the virtio-net header in front of packets written to an offloading TUN.
const VNET: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Capacity of a TUN write buffer with offloads: GRO may coalesce up to 64 KiB into it.
const GRO_CAP: usize = VNET + 65_536;
/// Bytes per receive slot with `UDP_GRO`: a coalesced run is at most 64 KiB, and a slot too
/// small would truncate it.
const UDP_GRO_SLOT: usize = 65_536;
/// Receive slots per `recvmmsg` with `UDP_GRO` (2 MiB per `wg-udp` thread): fewer than
/// [`BATCH`] because each may hold up to 64 datagrams.
const UDP_GRO_SLOTS: usize = 32;
/// Most datagrams in one `UDP_SEGMENT` send (the kernel's `UDP_MAX_SEGMENTS` is 64 on older
/// kernels, 128 on newer).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one `UDP_SEGMENT` send (the IP length field is 16 bits; room is left
/// for the IP and UDP headers).
const GSO_MAX_BYTES: usize = 64_000;

/// Waits until `fd` is readable; false when `stop` is.
fn wait_readable(fd: impl AsFd, stop: &std::io::PipeReader, timeout: PollTimeout) -> bool {
    let mut fds = [
        PollFd::new(fd.as_fd(), PollFlags::POLLIN),
        PollFd::new(stop.as_fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, timeout) {
        Ok(_) => !fds[1].any().unwrap_or(false),
        Err(Errno::EINTR) => true,
        Err(e) => {
            tracing::error!(error = %e, "poll failed in the tunnel");
            std::thread::sleep(Duration::from_millis(10));
            true
        }
    }
}

/// A thread's view of the peer table, refreshed when the generation moved.
struct View {
    table: Arc<Table>,
    generation: u64,
}

impl View {
    fn new(inner: &Inner) -> View {
        View {
            generation: inner.generation.load(Ordering::Acquire),
            table: inner.snapshot(),
        }
    }

    fn refresh(&mut self, inner: &Inner) {
        let g = inner.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.generation = g;
            self.table = inner.snapshot();
        }
    }
}
