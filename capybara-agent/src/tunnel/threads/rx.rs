//! `wg-udp-<i>`: UDP → decrypt → TUN. Datagrams are read in batches (`recvmmsg`; with `UDP_GRO`
//! a slot may hold a coalesced run of one sender's datagrams, split here), each is routed to
//! its peer by index (data, responses, cookies) or by the static key it carries (initiations,
//! after the MAC check and under load a cookie), decrypted by the peer's `Tunn`, checked against
//! the peer's allowed IPs, and the plaintexts of a batch written to the TUN together.

use std::{
    io::IoSliceMut,
    net::{IpAddr, SocketAddr, SocketAddrV6},
    os::fd::AsRawFd as _,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use boringtun::noise::{
    Packet, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon,
};
use nix::{
    errno::Errno,
    poll::PollTimeout,
    sys::socket::{ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg},
};

use super::{BATCH, GRO_CAP, SLOT, UDP_GRO_SLOT, UDP_GRO_SLOTS, VNET, View, wait_readable};
use crate::tunnel::{events::AuthFailure, keys::PublicKey, peers::Table, shared::Inner};

/// UDP → decrypt → TUN for worker `worker`: its socket, its TUN queue. One `recvmmsg` takes
/// up to [`BATCH`] datagrams, or with `UDP_GRO` up to [`UDP_GRO_SLOTS`] coalesced runs, each
/// split by the segment size the kernel reports; their plaintexts are written to the TUN
/// [`BATCH`] at a time (coalesced by GRO when the device offloads).
pub(in crate::tunnel) fn udp_loop(inner: &Inner, worker: usize, stop: &std::io::PipeReader) {
    let socket = &inner.sockets[worker];
    let queue = &inner.device.queues[worker];
    let udp_gro = inner.udp.gro;
    let (slots, slot) = if udp_gro {
        (UDP_GRO_SLOTS, UDP_GRO_SLOT)
    } else {
        (BATCH, SLOT)
    };
    let mut view = View::new(inner);
    let mut rx = vec![0u8; slots * slot];
    let cmsg = || udp_gro.then(|| nix::cmsg_space!(i32));
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slots, cmsg());
    let cap = if inner.device.offload {
        GRO_CAP
    } else {
        VNET + SLOT
    };
    let mut out: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(cap)).collect();
    let mut gro = tun_rs::GROTable::default();
    let mut scratch = vec![0u8; SLOT];
    let mut lens = [0usize; BATCH];
    let mut strides = [0usize; BATCH];
    let mut srcs = [None::<SocketAddr>; BATCH];
    let fd = socket.as_raw_fd();
    loop {
        if !wait_readable(socket, stop, PollTimeout::NONE) {
            return;
        }
        loop {
            let (n, reset) = {
                let mut chunks = rx.chunks_exact_mut(slot);
                let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                    std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
                match recvmmsg(
                    fd,
                    &mut headers,
                    iovs[..slots].iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                ) {
                    Ok(msgs) => {
                        let (mut n, mut reset) = (0, false);
                        for m in msgs {
                            lens[n] = m.bytes;
                            strides[n] = m.bytes;
                            srcs[n] = m.address.and_then(|a| sockaddr(&a));
                            match m.cmsgs() {
                                Ok(cmsgs) => {
                                    let mut coalesced = false;
                                    for c in cmsgs {
                                        if let ControlMessageOwned::UdpGroSegments(size) = c
                                            && size > 0
                                        {
                                            strides[n] = size as usize;
                                            coalesced = true;
                                        }
                                    }
                                    // The kernel writes back how much control data it
                                    // used (none for a lone datagram) and nix does not
                                    // restore the room before the next call: a slot left
                                    // without room would lose the next run's segment size.
                                    reset |= udp_gro && !coalesced;
                                }
                                // MSG_CTRUNC: the segment size is unknown.
                                Err(_) => {
                                    srcs[n] = None;
                                    reset = true;
                                }
                            }
                            if m.flags.contains(MsgFlags::MSG_TRUNC) {
                                srcs[n] = None;
                            }
                            n += 1;
                        }
                        (n, reset)
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => (0, false),
                    Err(e) => {
                        tracing::warn!(error = %e, "recvmmsg on the WireGuard socket failed");
                        (0, false)
                    }
                }
            };
            if reset {
                headers = MultiHeaders::preallocate(slots, cmsg());
            }
            if n == 0 {
                break;
            }
            view.refresh(inner);
            let now = Instant::now();
            let mut n_out = 0;
            let (mut runs, mut run_datagrams, mut datagrams) = (0u64, 0u64, 0u64);
            for i in 0..n {
                let Some(src) = srcs[i] else {
                    inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let run = &rx[i * slot..i * slot + lens[i]];
                if lens[i] > strides[i] {
                    runs += 1;
                    run_datagrams += run.len().div_ceil(strides[i]) as u64;
                }
                for data in run.chunks(strides[i].max(1)) {
                    datagrams += 1;
                    let buf = &mut out[n_out];
                    buf.clear();
                    buf.resize(VNET + SLOT, 0);
                    if let Some(len) = on_datagram(
                        inner,
                        &view.table,
                        data,
                        src,
                        now,
                        &mut buf[VNET..],
                        &mut scratch,
                    ) {
                        buf.truncate(VNET + len);
                        n_out += 1;
                        if n_out == out.len() {
                            write_tun(queue, &mut gro, &mut out);
                            n_out = 0;
                        }
                    }
                }
            }
            if n_out > 0 {
                write_tun(queue, &mut gro, &mut out[..n_out]);
            }
            inner.workers[worker]
                .rx_datagrams
                .fetch_add(datagrams, Ordering::Relaxed);
            if runs > 0 {
                inner.udp.gro_receives.fetch_add(runs, Ordering::Relaxed);
                inner
                    .udp
                    .gro_datagrams
                    .fetch_add(run_datagrams, Ordering::Relaxed);
            }
            if n < slots {
                break;
            }
        }
    }
}

/// Writes decrypted packets to the TUN queue (coalesced by GRO when the device offloads).
fn write_tun(queue: &tun_rs::SyncDevice, gro: &mut tun_rs::GROTable, out: &mut [Vec<u8>]) {
    if let Err(e) = queue.send_multiple(gro, out, VNET) {
        tracing::debug!(error = %e, "TUN write failed");
    }
}

fn sockaddr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v6) = a.as_sockaddr_in6() {
        return Some(normalize(SocketAddr::V6(SocketAddrV6::from(*v6))));
    }
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::V4(std::net::SocketAddrV4::from(*v4)))
}

/// An endpoint as the data path stores it: IPv4-mapped IPv6 addresses become IPv4.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, a.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Handles one datagram; returns the length of a plaintext packet written to `dst` for the TUN.
fn on_datagram(
    inner: &Inner,
    table: &Table,
    data: &[u8],
    src: SocketAddr,
    now: Instant,
    dst: &mut [u8],
    scratch: &mut [u8],
) -> Option<usize> {
    if data.len() < 4 || data[1..4] != [0, 0, 0] {
        inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let word = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let peer = match (data[0], data.len()) {
        (4, 32..) => table.by_index.get(&(word(4) >> 8)),
        (1, 148) => return on_initiation(inner, table, data, src, now, scratch),
        (2, 92) => table.by_index.get(&(word(8) >> 8)),
        (3, 64) => table.by_index.get(&(word(4) >> 8)),
        _ => None,
    };
    let Some(peer) = peer else {
        inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
    // No `Tunn` yet: no session, no handshake in flight and no cookie asked for, so a fresh one
    // would refuse this packet too.
    let Some(tunn) = st.tunn.as_mut() else {
        inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let (src_ip, len) = match tunn.decapsulate(Some(src.ip()), data, dst) {
        TunnResult::WriteToTunnelV4(p, ip) => (IpAddr::V4(ip), p.len()),
        TunnResult::WriteToTunnelV6(p, ip) => (IpAddr::V6(ip), p.len()),
        TunnResult::Done => {
            // A keepalive or a cookie.
            if data[0] == 4 {
                peer.rx_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                inner.authenticated(peer, &mut st, src, now);
            }
            return None;
        }
        TunnResult::WriteToNetwork(reply) => {
            // Our handshake was answered (we initiated): boringtun replies with a keepalive.
            let len = reply.len();
            scratch[..len].copy_from_slice(reply);
            peer.rx_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            inner.send_to(Some(peer), &scratch[..len], src);
            if data[0] == 2 {
                inner.handshake_done(peer, &mut st, src, now);
            }
            inner.flush_queue(peer, &mut st, src, scratch);
            return None;
        }
        TunnResult::Err(_) => {
            inner.drops_invalid.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    peer.rx_bytes
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    inner.authenticated(peer, &mut st, src, now);
    drop(st);
    // Cryptokey routing, inbound half: the source must be one of this peer's allowed IPs.
    match table.routes.lookup(src_ip) {
        Some(owner) if Arc::ptr_eq(owner, peer) => Some(len),
        _ => {
            inner.drops_bad_source.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A handshake initiation: verify the MAC (and demand a cookie under load), find the peer by
/// the static key it carries, let its `Tunn` answer.
fn on_initiation(
    inner: &Inner,
    table: &Table,
    data: &[u8],
    src: SocketAddr,
    now: Instant,
    buf: &mut [u8],
) -> Option<usize> {
    let key = match inner.rate_limiter.verify_packet(Some(src.ip()), data, buf) {
        Ok(Packet::HandshakeInit(init)) => {
            match parse_handshake_anon(&inner.secret, &inner.static_public, &init) {
                Ok(half) => PublicKey::from_bytes(half.peer_static_public),
                Err(_) => {
                    inner.auth_failed(src, None, AuthFailure::Undecryptable);
                    return None;
                }
            }
        }
        Ok(_) => return None,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            let len = cookie.len();
            let cookie = buf[..len].to_vec();
            inner.send_to(None, &cookie, src);
            return None;
        }
        Err(TunnResult::Err(WireGuardError::UnderLoad)) => return None,
        Err(_) => {
            inner.auth_failed(src, None, AuthFailure::BadMac);
            return None;
        }
    };
    let Some(peer) = table.by_key.get(&key) else {
        inner.auth_failed(src, Some(key), AuthFailure::UnknownKey);
        return None;
    };
    let mut st = peer.state.lock().unwrap_or_else(|p| p.into_inner());
    // Not admitting (a cluster node without its lease): only live sessions may rekey.
    if !inner.admitting.load(Ordering::Relaxed) && !st.liveness.is_connected() {
        return None;
    }
    match inner
        .tunn(peer, &mut st)
        .decapsulate(Some(src.ip()), data, buf)
    {
        TunnResult::WriteToNetwork(resp) => {
            let response = resp[0] == 2;
            let len = resp.len();
            peer.rx_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let resp = buf[..len].to_vec();
            inner.send_to(Some(peer), &resp, src);
            if response {
                // Complete once the initiator uses the session (its first authenticated
                // packet), as the kernel counts it: a client with the wrong preshared key
                // never gets that far.
                st.confirm_pending = true;
                if st.liveness.is_connected() {
                    inner.seen(peer, &mut st, src, now);
                } else {
                    st.endpoint = Some(src);
                }
            }
            inner.flush_queue(peer, &mut st, src, buf);
        }
        TunnResult::Err(_) => {
            drop(st);
            inner.auth_failed(src, Some(key), AuthFailure::Rejected);
        }
        _ => {}
    }
    None
}
