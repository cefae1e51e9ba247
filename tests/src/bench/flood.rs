//! UDP floods, shared by [`super::vs_nftables`] and [`super::vs_enforcement`]: the sending loop
//! (`sendmmsg` batches for a fixed time) and the receiving [`UdpSink`] that counts what reached
//! it without being read during the flood.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::RawFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::sys::socket::{setsockopt, sockopt};

use crate::netns::NetNs;

/// Messages per `sendmmsg`: one `sendto` per packet spent a larger share of the shared core on
/// syscalls (203k pps through the blocklist's no-filter rig against 259k with batches of 64).
pub const SEND_BATCH: usize = 64;

/// Sends `msgs` round and round on `fd`, [`SEND_BATCH`] per `sendmmsg`, for `seconds`; returns
/// the messages the kernel took and the time spent. A short count or ENOBUFS (-1) when a
/// queue is full loses the rest of that batch, as on a wire.
///
/// # Safety
/// Every header in `msgs` must point at live buffers (iovecs, and names if set) for the call.
pub unsafe fn send_for(fd: RawFd, msgs: &mut [libc::mmsghdr], seconds: f64) -> (u64, Duration) {
    let t = Instant::now();
    let end = Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    loop {
        for batch in msgs.chunks_mut(SEND_BATCH) {
            // SAFETY: the caller vouches for the headers' pointers.
            let n = unsafe { libc::sendmmsg(fd, batch.as_mut_ptr(), batch.len() as u32, 0) };
            sent += n.max(0) as u64;
            if t.elapsed() >= end {
                return (sent, t.elapsed());
            }
        }
    }
}

/// `mmsghdr`s for `iov`, one buffer each, message `i` sent to `names[i % names.len()]` (no
/// names: the socket's bound or connected peer). The headers point into `iov` and `names`:
/// keep both alive while they are used.
pub fn headers(iov: &mut [libc::iovec], names: &[libc::sockaddr_in]) -> Vec<libc::mmsghdr> {
    iov.iter_mut()
        .enumerate()
        .map(|(i, v)| {
            // SAFETY: all-zero is a valid `msghdr` (null pointers, zero lengths).
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            if !names.is_empty() {
                h.msg_name = (&raw const names[i % names.len()]).cast_mut().cast();
                h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            }
            h.msg_iov = v;
            h.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            }
        })
        .collect()
}

/// `addr` as a `sockaddr_in`.
pub fn sockaddr_in(addr: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// An iovec over each of `bufs`.
pub fn iovecs(bufs: &[Vec<u8>]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect()
}

/// A UDP socket with a small receive buffer that is not read during a flood: every packet that
/// got past the filters and the IP layer to it is counted, drained or dropped by the full
/// buffer (the `drops` column of `/proc/net/udp`). Not reading keeps the receiving application
/// out of the CPU budget the rigs share. (The `Udp:` counters of `/proc/net/snmp` do not move in
/// this kernel's namespaces, so the socket's own counters are used.)
pub struct UdpSink {
    socket: UdpSocket,
    port: u16,
    /// Packets drained from the socket so far.
    drained: u64,
}

impl UdpSink {
    /// Binds `addr` in `ns`.
    pub fn bind(ns: &NetNs, addr: SocketAddr) -> Result<UdpSink> {
        let socket = ns
            .run(|| UdpSocket::bind(addr))
            .with_context(|| format!("bind the receiver to {addr}"))?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::RcvBuf, &4096).context("SO_RCVBUF")?;
        Ok(UdpSink {
            socket,
            port: addr.port(),
            drained: 0,
        })
    }

    /// Packets that reached the socket so far (`ns` is the namespace it was bound in).
    pub fn reached(&mut self, ns: &NetNs) -> Result<u64> {
        let mut buf = [0u8; 2048];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(_) => self.drained += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("drain the receiver"),
            }
        }
        let drops = parse_udp_drops(&ns.exec(&["cat", "/proc/net/udp"]), self.port)
            .context("the receiver's socket is not in /proc/net/udp")?;
        Ok(self.drained + drops)
    }
}

/// The summed `drops` of the sockets bound to local `port` in a `/proc/net/udp`.
pub fn parse_udp_drops(text: &str, port: u16) -> Option<u64> {
    let want = format!("{port:04X}");
    let mut found = None;
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(local) = fields.get(1) else { continue };
        if local.rsplit(':').next() != Some(want.as_str()) {
            continue;
        }
        let drops: u64 = fields.last()?.parse().ok()?;
        *found.get_or_insert(0) += drops;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
        12936: 01004D0A:CA6C 00000000:0000 07 00000000:00001040 00:00000000 00000000     0        0 861310 2 000000008e102444 77\n\
        12937: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 861311 2 000000008e102445 5\n";

    #[test]
    fn udp_drops_of_the_port_only() {
        assert_eq!(parse_udp_drops(UDP, 51820), Some(77));
        assert_eq!(parse_udp_drops(UDP, 53), Some(5));
        assert_eq!(parse_udp_drops(UDP, 9), None);
        assert_eq!(parse_udp_drops("header only\n", 51820), None);
    }
}
