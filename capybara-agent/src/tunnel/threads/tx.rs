//! `wg-tun-<i>`: TUN → encrypt → UDP. TUN packets are read in batches from the worker's queue
//! (with offloads, a TCP super-segment split into many), routed to their peer by destination
//! (cryptokey routing), encrypted by the peer's `Tunn` under its lock (kept across consecutive
//! packets of one peer), and the ciphertexts of a batch sent with `sendmmsg` on the worker's
//! socket: with `UDP_SEGMENT`, consecutive equal-size datagrams to one endpoint travel as one
//! message that the kernel (or the NIC) segments.

use std::{
    io::IoSlice,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use boringtun::noise::{Tunn, TunnResult};
use nix::{
    errno::Errno,
    poll::PollTimeout,
    sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg},
};

use super::{BATCH, GRO_CAP, GSO_MAX_BYTES, GSO_MAX_SEGMENTS, SLOT, View, wait_readable};
use crate::tunnel::{
    peers::{Peer, PeerState, Table},
    shared::Inner,
};

/// TUN → encrypt → UDP for worker `worker`: its TUN queue, its socket. Up to [`BATCH`] packets
/// per round (with offloads, one read may return a TCP super-segment already split into many);
/// their ciphertexts go out in one `sendmmsg` (a few more when segment sizes differ).
pub(in crate::tunnel) fn tun_loop(inner: &Inner, worker: usize, stop: &std::io::PipeReader) {
    let dev = &inner.device.queues[worker];
    let socket = &inner.sockets[worker];
    let mut view = View::new(inner);
    let mut orig = vec![0u8; GRO_CAP];
    let mut pkts: Vec<Vec<u8>> = (0..tun_rs::IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; SLOT])
        .collect();
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut tx = vec![0u8; BATCH * SLOT];
    let mut tx_lens = [0usize; BATCH];
    let mut tx_addrs = [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH];
    let mut tx_peers: [Option<Arc<Peer>>; BATCH] = std::array::from_fn(|_| None);
    let mut headers = Headers {
        plain: MultiHeaders::preallocate(BATCH, None),
        gso: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(u16))),
    };
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
                let sent = encrypt_batch(
                    inner,
                    socket,
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
                inner.workers[worker]
                    .tx_datagrams
                    .fetch_add(sent, Ordering::Relaxed);
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
/// Encrypts `pkts` and sends them; returns the number of data datagrams handed to the socket.
fn encrypt_batch(
    inner: &Inner,
    socket: &UdpSocket,
    table: &Table,
    pkts: &[Vec<u8>],
    sizes: &[usize],
    tx: &mut [u8],
    tx_lens: &mut [usize; BATCH],
    tx_addrs: &mut [SocketAddr; BATCH],
    tx_peers: &mut [Option<Arc<Peer>>; BATCH],
    headers: &mut Headers,
    handshake: &mut [u8],
) -> u64 {
    let now = Instant::now();
    let mut start = 0;
    let mut sent = 0;
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
                        tx_addrs[m] = inner.wire_addr(endpoint);
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
        send_batch(inner, socket, tx, &tx_lens[..m], &tx_addrs[..m], headers);
        sent += m as u64;
        for (peer, len) in tx_peers[..m].iter_mut().zip(&tx_lens[..m]) {
            if let Some(p) = peer.take() {
                p.tx_bytes.fetch_add(*len as u64, Ordering::Relaxed);
            }
        }
        start = end;
    }
    sent
}

/// The `sendmmsg` headers of a worker: without control data, and with room for one
/// `UDP_SEGMENT` (nix encodes the same control messages into every header of a call, and a
/// header with room but no message is refused, so the two kinds are kept apart).
pub(super) struct Headers {
    plain: MultiHeaders<SockaddrStorage>,
    gso: MultiHeaders<SockaddrStorage>,
}

/// One message of a GSO send: datagrams `first..first + count` of the batch, all `segment`
/// bytes long but the last (which may be shorter), to one endpoint.
#[derive(Clone, Copy, Default)]
struct Message {
    first: usize,
    count: usize,
    segment: usize,
    bytes: usize,
}

/// Groups consecutive datagrams to one endpoint into messages the kernel can segment: equal
/// sizes (the last may be shorter, and ends the message), at most [`GSO_MAX_SEGMENTS`] and
/// [`GSO_MAX_BYTES`]. Returns the number of messages written to `msgs`.
fn group(lens: &[usize], addrs: &[SocketAddr], msgs: &mut [Message; BATCH]) -> usize {
    let mut n = 0;
    let mut open = false;
    for (i, (&len, addr)) in lens.iter().zip(addrs).enumerate() {
        if open {
            let m = &mut msgs[n - 1];
            if addrs[m.first] == *addr
                && len <= m.segment
                && m.count < GSO_MAX_SEGMENTS
                && m.bytes + len <= GSO_MAX_BYTES
            {
                m.count += 1;
                m.bytes += len;
                open = len == m.segment;
                continue;
            }
        }
        msgs[n] = Message {
            first: i,
            count: 1,
            segment: len,
            bytes: len,
        };
        n += 1;
        open = true;
    }
    n
}

/// Sends `lens.len()` datagrams from the slots of `tx` on `socket`: with `UDP_SEGMENT`, runs
/// of equal-size datagrams to one endpoint as one message each, and messages of one segment
/// size in one `sendmmsg`; without, one message per datagram. A GSO send refused with `EIO`
/// (a device without checksum offload) turns GSO off for good and is sent again without it;
/// one refused with `EINVAL` (e.g. a segment over the route's MTU) is sent again without it.
fn send_batch(
    inner: &Inner,
    socket: &UdpSocket,
    tx: &[u8],
    lens: &[usize],
    addrs: &[SocketAddr],
    headers: &mut Headers,
) {
    if lens.is_empty() {
        return;
    }
    if !inner.udp.gso.load(Ordering::Relaxed) {
        send_plain(socket, tx, 0, lens, addrs, &mut headers.plain);
        return;
    }
    let iovs: [IoSlice<'_>; BATCH] = std::array::from_fn(|k| {
        let len = lens.get(k).copied().unwrap_or(0);
        IoSlice::new(&tx[k * SLOT..k * SLOT + len])
    });
    let mut msgs = [Message::default(); BATCH];
    let n = group(lens, addrs, &mut msgs);
    let msg_iovs: [&[IoSlice<'_>]; BATCH] =
        std::array::from_fn(|k| &iovs[msgs[k].first..msgs[k].first + msgs[k].count]);
    let msg_addrs: [Option<SockaddrStorage>; BATCH] =
        std::array::from_fn(|k| (k < n).then(|| SockaddrStorage::from(addrs[msgs[k].first])));
    let fd = socket.as_raw_fd();
    let (mut sends, mut datagrams) = (0u64, 0u64);
    let mut k = 0;
    while k < n {
        // Messages that one segment size fits: runs of that size and lone datagrams no longer.
        let segment = msgs[k].segment;
        let mut end = k + 1;
        while end < n
            && (msgs[end].segment == segment
                || (msgs[end].count == 1 && msgs[end].bytes <= segment))
        {
            end += 1;
        }
        let size = u16::try_from(segment).unwrap_or(u16::MAX);
        let cmsgs = [ControlMessage::UdpGsoSegments(&size)];
        match sendmmsg(
            fd,
            &mut headers.gso,
            msg_iovs[k..end].iter(),
            &msg_addrs[k..end],
            cmsgs,
            MsgFlags::empty(),
        ) {
            Ok(r) => {
                let sent = r.count();
                for m in &msgs[k..k + sent] {
                    if m.count > 1 {
                        sends += 1;
                        datagrams += m.count as u64;
                    }
                }
                if sent == 0 {
                    break;
                }
                k += sent;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EIO) => {
                if inner.udp.gso.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "UDP segmentation offload refused (EIO: a device without checksum \
                         offload?); sending without it from now on"
                    );
                }
                let first = msgs[k].first;
                send_plain(
                    socket,
                    tx,
                    first,
                    &lens[first..],
                    &addrs[first..],
                    &mut headers.plain,
                );
                k = n;
            }
            Err(Errno::EINVAL) if msgs[k].count > 1 => {
                let (first, count) = (msgs[k].first, msgs[k].count);
                send_plain(
                    socket,
                    tx,
                    first,
                    &lens[first..first + count],
                    &addrs[first..first + count],
                    &mut headers.plain,
                );
                k += 1;
            }
            Err(e) => {
                // One bad destination (e.g. unreachable) must not stall the rest: skip it.
                tracing::debug!(error = %e, "sendmmsg failed");
                k += 1;
            }
        }
    }
    if sends > 0 {
        inner.udp.gso_sends.fetch_add(sends, Ordering::Relaxed);
        inner
            .udp
            .gso_datagrams
            .fetch_add(datagrams, Ordering::Relaxed);
    }
}

/// Sends datagrams `first..first + lens.len()` of `tx`, one message each, with as few
/// `sendmmsg` calls as the socket allows.
fn send_plain(
    socket: &UdpSocket,
    tx: &[u8],
    first: usize,
    lens: &[usize],
    addrs: &[SocketAddr],
    headers: &mut MultiHeaders<SockaddrStorage>,
) {
    let fd = socket.as_raw_fd();
    let sockaddrs: [Option<SockaddrStorage>; BATCH] =
        std::array::from_fn(|k| addrs.get(k).map(|a| SockaddrStorage::from(*a)));
    let mut done = 0;
    while done < lens.len() {
        let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
            let k = done + i;
            if k < lens.len() {
                let at = (first + k) * SLOT;
                [IoSlice::new(&tx[at..at + lens[k]])]
            } else {
                [IoSlice::new(&[])]
            }
        });
        let count = lens.len() - done;
        let no_cmsgs: [ControlMessage<'_>; 0] = [];
        match sendmmsg(
            fd,
            headers,
            iovs[..count].iter(),
            &sockaddrs[done..lens.len()],
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::{BATCH, GSO_MAX_SEGMENTS, Message, group};

    fn groups(lens: &[usize], addrs: &[SocketAddr]) -> Vec<(usize, usize, usize)> {
        let mut msgs = [Message::default(); BATCH];
        let n = group(lens, addrs, &mut msgs);
        msgs[..n]
            .iter()
            .map(|m| (m.first, m.count, m.segment))
            .collect()
    }

    #[test]
    fn equal_datagrams_to_one_endpoint_are_one_message_ended_by_a_shorter_one() {
        let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        // Three full, one short (ends the run), one full again, then another endpoint.
        let lens = [1452, 1452, 1452, 100, 1452, 1452, 80];
        let addrs = [a, a, a, a, a, b, b];
        assert_eq!(
            groups(&lens, &addrs),
            vec![(0, 4, 1452), (4, 1, 1452), (5, 2, 1452)]
        );
        // A longer datagram never joins a run of shorter ones.
        assert_eq!(
            groups(&[100, 200, 200], &[a, a, a]),
            vec![(0, 1, 100), (1, 2, 200)]
        );
    }

    #[test]
    fn a_message_holds_at_most_the_kernels_segments_and_bytes() {
        let a: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        let lens = [100; BATCH];
        let addrs = [a; BATCH];
        let g = groups(&lens, &addrs);
        assert_eq!(g[0], (0, GSO_MAX_SEGMENTS, 100));
        assert_eq!(g.iter().map(|m| m.1).sum::<usize>(), BATCH);
        let big = [1452; BATCH];
        let g = groups(&big, &addrs);
        // 44 × 1452 = 63 888 bytes fit under 64 000; 45 would not.
        assert_eq!(g[0], (0, 44, 1452));
        assert_eq!(g[1], (44, 20, 1452));
    }
}
