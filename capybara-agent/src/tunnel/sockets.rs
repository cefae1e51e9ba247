//! The tunnel's UDP sockets: one per worker on the listen port (`SO_REUSEPORT` when more than
//! one), which socket a datagram goes to (steered by peer), and UDP segmentation offload
//! (`UDP_SEGMENT`, `UDP_GRO`).
//!
//! # Steering by peer
//!
//! With several sockets in a reuseport group the kernel picks one per datagram by the hash of
//! its 4-tuple: one peer's datagrams land on one socket, but how many peers each worker gets
//! is chance (16 peers on 2 workers: 8/8 only 20 % of the time, 11/5 or worse 21 %). A classic
//! BPF program on the group ([`steering_program`], `SO_ATTACH_REUSEPORT_CBPF`) picks the socket
//! from the WireGuard message itself: data packets, handshake responses and cookie replies
//! carry the receiver index, whose upper 24 bits are our peer index (see `peers::Peer::index`),
//! so peer `p` goes to worker `p mod N`. Peer indices are handed out consecutively, so peers
//! spread evenly whatever their addresses, and a peer that roams (new 4-tuple) keeps its
//! worker. Handshake initiations name no peer in clear text: they go by the hash, and any
//! worker can answer one (the peer's state is behind its own lock). The program is 27
//! instructions, run once per datagram (not per segment of a GRO run: the kernel steers the
//! coalesced skb once).
//!
//! # UDP segmentation offload
//!
//! `UDP_SEGMENT` (GSO): `wg-tun-<i>` sends a run of equal-size datagrams to one endpoint as
//! one message, segmented by the kernel after routing (or by the NIC), so the stack is crossed
//! once per run instead of once per datagram. `UDP_GRO`: the kernel coalesces a sender's
//! datagrams into one receive with the segment size in a control message; `wg-udp-<i>` splits
//! it. A kernel without the options runs without them; a GSO send refused with `EIO` (a device
//! without checksum offload on the route) turns GSO off for the tunnel's life and is sent again
//! without it, as wireguard-go does.

use std::{
    net::{Ipv6Addr, SocketAddr, UdpSocket},
    sync::atomic::AtomicBool,
};

use super::{shared::UdpOffload, wg::WgError};

/// Binds `n` UDP sockets to `port` (0: a free one, the same for all), with `SO_REUSEPORT`
/// when `n > 1`. Dual-stack IPv6 first (Linux's default bindv6only=0 lets one [::] socket take
/// IPv4 too); IPv4 alone where IPv6 is disabled. With `only`, to that one address instead
/// (`IP_FREEBIND`: it need not be on an interface yet). Returns the sockets and whether they
/// are IPv6.
pub(super) fn bind_udp(
    port: u16,
    only: Option<std::net::IpAddr>,
    n: usize,
) -> Result<(Vec<UdpSocket>, bool), WgError> {
    let bind_err = |source| WgError::Bind { port, source };
    let v6 = match only {
        Some(a) => Some(bind_one(SocketAddr::new(a, port), n > 1).map_err(bind_err)?),
        None => match bind_one(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), n > 1) {
            Ok(s) => Some(s),
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => None,
            Err(e) => return Err(bind_err(e)),
        },
    };
    let first = match v6 {
        Some(s) => s,
        None => bind_one(SocketAddr::from(([0, 0, 0, 0], port)), n > 1).map_err(bind_err)?,
    };
    let local = first.local_addr().map_err(bind_err)?;
    let mut sockets = vec![first];
    for _ in 1..n {
        sockets.push(bind_one(local, true).map_err(bind_err)?);
    }
    if n > 1 {
        let mut program = steering_program(n as u32);
        let prog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_mut_ptr(),
        };
        if let Err(e) = nix::sys::socket::setsockopt(
            &sockets[0],
            nix::sys::socket::sockopt::AttachReusePortCbpf,
            &prog,
        ) {
            tracing::warn!(error = %e, "cannot steer datagrams by peer; by 4-tuple hash instead");
        }
    }
    Ok((sockets, local.is_ipv6()))
}

/// One UDP socket bound to `addr`, with `SO_REUSEPORT` if `reuse`, big buffers.
fn bind_one(addr: SocketAddr, reuse: bool) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd as _;
    let family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    if reuse {
        setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if !addr.ip().is_unspecified() {
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
    }
    match addr {
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
    }
    // Big buffers absorb bursts between wake-ups; FORCE needs CAP_NET_ADMIN, else the capped
    // plain option is used.
    for (force, plain) in [(true, false), (false, true)] {
        let _ = force.then(|| setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20)));
        let _ = force.then(|| setsockopt(&fd, sockopt::SndBufForce, &(4 << 20)));
        let _ = plain.then(|| setsockopt(&fd, sockopt::RcvBuf, &(4 << 20)));
        let _ = plain.then(|| setsockopt(&fd, sockopt::SndBuf, &(4 << 20)));
    }
    Ok(UdpSocket::from(fd))
}

/// Turns on what the kernel offers of UDP segmentation offload on `sockets`: `UDP_GRO` on every
/// one (all or none), and whether `UDP_SEGMENT` sends are possible (the option is known).
pub(super) fn udp_offload(sockets: &[UdpSocket]) -> UdpOffload {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let gso = getsockopt(&sockets[0], sockopt::UdpGsoSegment).is_ok();
    let mut gro = true;
    for s in sockets {
        gro &= setsockopt(s, sockopt::UdpGroSegment, &true).is_ok();
    }
    if !gro {
        for s in sockets {
            let _ = setsockopt(s, sockopt::UdpGroSegment, &false);
        }
    }
    UdpOffload {
        gso: AtomicBool::new(gso),
        gro,
        ..UdpOffload::default()
    }
}

/// The reuseport program for `n` sockets (classic BPF; it sees the datagram from the UDP
/// payload on): the receiver index of a data packet or cookie reply (bytes 4–7) or of a
/// handshake response (bytes 8–11), little-endian, whose upper 24 bits are the peer index;
/// returns `peer index mod n`. Anything else returns `u32::MAX`, which makes the kernel fall
/// back to the 4-tuple hash.
pub(super) fn steering_program(n: u32) -> Vec<libc::sock_filter> {
    const LDB: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const LSH: u16 = 0x64; // BPF_ALU | BPF_LSH | BPF_K
    const TAX: u16 = 0x07; // BPF_MISC | BPF_TAX
    const ADDX: u16 = 0x0c; // BPF_ALU | BPF_ADD | BPF_X
    const MOD: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
    const RETA: u16 = 0x16; // BPF_RET | BPF_A
    const RETK: u16 = 0x06; // BPF_RET | BPF_K
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // The peer index of the receiver index at `at`: bytes at+1..at+4, little-endian.
    let peer_mod_n = |at: u32| {
        [
            op(LDB, 0, 0, at + 3),
            op(LSH, 0, 0, 8),
            op(TAX, 0, 0, 0),
            op(LDB, 0, 0, at + 2),
            op(ADDX, 0, 0, 0),
            op(LSH, 0, 0, 8),
            op(TAX, 0, 0, 0),
            op(LDB, 0, 0, at + 1),
            op(ADDX, 0, 0, 0),
            op(MOD, 0, 0, n),
            op(RETA, 0, 0, 0),
        ]
    };
    let mut p = vec![
        op(LDB, 0, 0, 0),         // 0: the message type
        op(JEQ, 3, 0, 4),         // 1: data → 5
        op(JEQ, 2, 0, 3),         // 2: cookie reply → 5
        op(JEQ, 12, 0, 2),        // 3: handshake response → 16
        op(RETK, 0, 0, u32::MAX), // 4: initiation or junk: by hash
    ];
    p.extend(peer_mod_n(4)); // 5..=15
    p.extend(peer_mod_n(8)); // 16..=26
    p
}

#[cfg(test)]
mod tests {
    use std::{
        net::{SocketAddr, UdpSocket},
        time::Duration,
    };

    use super::bind_udp;

    /// A WireGuard-shaped datagram of `kind` whose receiver index names `peer`.
    fn datagram(kind: u8, peer: u32) -> Vec<u8> {
        let mut d = vec![0u8; 64];
        d[0] = kind;
        let at = if kind == 2 { 8 } else { 4 };
        d[at..at + 4].copy_from_slice(&(peer << 8 | 7).to_le_bytes());
        d
    }

    /// Which of `sockets` got `d`.
    fn receiver(sockets: &[UdpSocket], d: &[u8]) -> usize {
        let port = sockets[0].local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .send_to(d, SocketAddr::from(([127, 0, 0, 1], port)))
            .unwrap();
        let mut buf = [0u8; 256];
        for _ in 0..200 {
            for (i, s) in sockets.iter().enumerate() {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    assert_eq!(&buf[..n], d);
                    return i;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no socket received the datagram");
    }

    #[test]
    fn datagrams_go_to_the_worker_of_their_peer() {
        let (sockets, _) = bind_udp(0, None, 3).expect("bind 3 reuseport sockets on loopback");
        for s in &sockets {
            s.set_nonblocking(true).unwrap();
        }
        assert_eq!(sockets.len(), 3);
        let port = sockets[0].local_addr().unwrap().port();
        assert!(
            sockets
                .iter()
                .all(|s| s.local_addr().unwrap().port() == port)
        );
        // Data (4), cookie reply (3), handshake response (2): peer index mod 3, whatever the
        // client's port (a new one per datagram: by the hash, 24 right guesses in a row
        // would be a 3^-24 chance).
        for peer in [0u32, 1, 2, 3, 4, 5, 0x00ff_fffe, 0x0012_3456] {
            for kind in [4u8, 3, 2] {
                assert_eq!(
                    receiver(&sockets, &datagram(kind, peer)),
                    (peer % 3) as usize,
                    "kind {kind}, peer {peer:#x}"
                );
            }
        }
        // An initiation names no peer: some socket gets it (by hash).
        let mut init = vec![0u8; 148];
        init[0] = 1;
        assert!(receiver(&sockets, &init) < 3);
    }
}
