//! `wg-tun`: TUN → encrypt → UDP. TUN packets are read in batches (with offloads, a TCP
//! super-segment split into many), routed to their peer by destination (cryptokey routing),
//! encrypted by the peer's `Tunn` under its lock (kept across consecutive packets of one peer),
//! and the ciphertexts of a batch sent with `sendmmsg`.

use std::{
    io::IoSlice,
    os::fd::AsRawFd as _,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use boringtun::noise::{Tunn, TunnResult};
use nix::{
    errno::Errno,
    poll::PollTimeout,
    sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg},
};

use super::{BATCH, GRO_CAP, SLOT, View, wait_readable};
use crate::tunnel::{
    peers::{Peer, PeerState, Table},
    shared::Inner,
};

/// TUN → encrypt → UDP. Up to [`BATCH`] packets per round (with offloads, one read may return a
/// TCP super-segment already split into many); their ciphertexts go out in one `sendmmsg`.
pub(in crate::tunnel) fn tun_loop(inner: &Inner, stop: &std::io::PipeReader) {
    let dev = &inner.device.device;
    let mut view = View::new(inner);
    let mut orig = vec![0u8; GRO_CAP];
    let mut pkts: Vec<Vec<u8>> = (0..tun_rs::IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; SLOT])
        .collect();
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut tx = vec![0u8; BATCH * SLOT];
    let mut tx_lens = [0usize; BATCH];
    let mut tx_addrs: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
    let mut tx_peers: [Option<Arc<Peer>>; BATCH] = std::array::from_fn(|_| None);
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut handshake = vec![0u8; SLOT];
    // Without offloads each read is one packet; with them a read may be a super-segment split
    // into up to 64 packets (64 KiB at an MSS of 1 KiB), so another read needs that much room.
    let room = if inner.device.offload { 64 } else { 1 };
    loop {
        if !wait_readable(dev, stop, PollTimeout::NONE) {
            return;
        }
        loop {
            let mut n = 0;
            let mut drained = false;
            while n < BATCH && (n == 0 || pkts.len() - n >= room) {
                match dev.recv_multiple(&mut orig, &mut pkts[n..], &mut sizes[n..], 0) {
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "TUN read failed");
                        break;
                    }
                }
            }
            if n > 0 {
                view.refresh(inner);
                encrypt_batch(
                    inner,
                    &view.table,
                    &pkts[..n],
                    &sizes[..n],
                    &mut tx,
                    &mut tx_lens,
                    &mut tx_addrs,
                    &mut tx_peers,
                    &mut headers,
                    &mut handshake,
                );
            }
            if drained || n == 0 {
                break;
            }
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the per-thread buffers are passed in so nothing is allocated per batch"
)]
fn encrypt_batch(
    inner: &Inner,
    table: &Table,
    pkts: &[Vec<u8>],
    sizes: &[usize],
    tx: &mut [u8],
    tx_lens: &mut [usize; BATCH],
    tx_addrs: &mut [Option<SockaddrStorage>; BATCH],
    tx_peers: &mut [Option<Arc<Peer>>; BATCH],
    headers: &mut MultiHeaders<SockaddrStorage>,
    handshake: &mut [u8],
) {
    let now = Instant::now();
    let mut start = 0;
    while start < pkts.len() {
        let end = (start + BATCH).min(pkts.len());
        let mut m = 0;
        let mut current: Option<(&Arc<Peer>, std::sync::MutexGuard<'_, PeerState>)> = None;
        for i in start..end {
            let pkt = &pkts[i][..sizes[i]];
            let Some(dst) = Tunn::dst_address(pkt) else {
                inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(peer) = table.routes.lookup(dst) else {
                inner.drops_no_route.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // Keep the lock while consecutive packets go to the same peer.
            if !current.as_ref().is_some_and(|(p, _)| Arc::ptr_eq(p, peer)) {
                drop(current.take());
                current = Some((peer, peer.state.lock().unwrap_or_else(|p| p.into_inner())));
            }
            let Some((_, st)) = current.as_mut() else {
                continue;
            };
            let Some(endpoint) = st.endpoint else {
                inner.drops_no_endpoint.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let slot = &mut tx[m * SLOT..(m + 1) * SLOT];
            match inner.tunn(peer, st).encapsulate(pkt, slot) {
                TunnResult::WriteToNetwork(c) => {
                    let len = c.len();
                    if c[0] == 1 {
                        // No session: boringtun queued the packet and asks for a handshake.
                        handshake[..len].copy_from_slice(c);
                        inner.send_to(Some(peer), &handshake[..len], endpoint);
                    } else {
                        tx_lens[m] = len;
                        tx_addrs[m] = Some(SockaddrStorage::from(inner.wire_addr(endpoint)));
                        tx_peers[m] = Some(peer.clone());
                        m += 1;
                    }
                    st.last_tx = now;
                }
                TunnResult::Err(_) => {
                    inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        drop(current);
        send_batch(inner, tx, &tx_lens[..m], &tx_addrs[..m], headers);
        for (peer, len) in tx_peers[..m].iter_mut().zip(&tx_lens[..m]) {
            if let Some(p) = peer.take() {
                p.tx_bytes.fetch_add(*len as u64, Ordering::Relaxed);
            }
        }
        start = end;
    }
}

/// Sends `lens.len()` datagrams from the slots of `tx` with as few `sendmmsg` calls as the
/// socket allows.
fn send_batch(
    inner: &Inner,
    tx: &[u8],
    lens: &[usize],
    addrs: &[Option<SockaddrStorage>],
    headers: &mut MultiHeaders<SockaddrStorage>,
) {
    let fd = inner.socket.as_raw_fd();
    let mut done = 0;
    while done < lens.len() {
        let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
            let k = done + i;
            if k < lens.len() {
                [IoSlice::new(&tx[k * SLOT..k * SLOT + lens[k]])]
            } else {
                [IoSlice::new(&[])]
            }
        });
        let count = lens.len() - done;
        let no_cmsgs: [nix::sys::socket::ControlMessage<'_>; 0] = [];
        match sendmmsg(
            fd,
            headers,
            iovs[..count].iter(),
            &addrs[done..],
            no_cmsgs,
            MsgFlags::empty(),
        ) {
            Ok(r) => {
                let sent = r.count();
                if sent == 0 {
                    break;
                }
                done += sent;
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                // One bad destination (e.g. unreachable) must not stall the rest: skip it.
                tracing::debug!(error = %e, "sendmmsg failed");
                done += 1;
            }
        }
    }
}
