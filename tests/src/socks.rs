//! A SOCKS5 client (no authentication, CONNECT to an IPv4 or IPv6 address, and UDP ASSOCIATE:
//! [`udp_exchange`]): how tests and benchmarks reach through `ss-local` and v2ray's SOCKS
//! inbound. One implementation, blocking;
//! [`connect_async`] runs it on tokio's blocking pool and hands the stream to the runtime.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
};

/// Connects to `target` through the SOCKS5 proxy at `proxy`; returns the stream once the proxy
/// answered success.
pub fn connect(proxy: SocketAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let (s, _) = request(proxy, 1, target)?;
    Ok(s)
}

/// `addr` as SOCKS5 writes it: address type, address, port.
fn encode(addr: SocketAddr, into: &mut Vec<u8>) {
    match addr {
        SocketAddr::V4(a) => {
            into.push(1);
            into.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            into.push(4);
            into.extend_from_slice(&a.ip().octets());
        }
    }
    into.extend_from_slice(&addr.port().to_be_bytes());
}

/// Sends SOCKS5 command `cmd` for `addr` on a new connection to `proxy`; returns the
/// connection and the bound address the proxy answered.
fn request(proxy: SocketAddr, cmd: u8, addr: SocketAddr) -> io::Result<(TcpStream, SocketAddr)> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0])?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice)?;
    if choice != [5, 0] {
        return Err(io::Error::other(format!("socks5 method {choice:?}")));
    }
    let mut req = vec![5, cmd, 0];
    encode(addr, &mut req);
    s.write_all(&req)?;
    let mut reply = [0u8; 4];
    s.read_exact(&mut reply)?;
    if reply[1] != 0 {
        return Err(io::Error::other(format!("socks5 reply {}", reply[1])));
    }
    let bound = match reply[3] {
        1 => {
            let mut b = [0u8; 6];
            s.read_exact(&mut b)?;
            SocketAddr::from(([b[0], b[1], b[2], b[3]], u16::from_be_bytes([b[4], b[5]])))
        }
        4 => {
            let mut b = [0u8; 18];
            s.read_exact(&mut b)?;
            let ip: [u8; 16] = b[..16].try_into().expect("16 bytes");
            SocketAddr::from((ip, u16::from_be_bytes([b[16], b[17]])))
        }
        t => return Err(io::Error::other(format!("socks5 address type {t}"))),
    };
    Ok((s, bound))
}

/// Sends `payload` to `target` as a UDP datagram through the SOCKS5 proxy at `proxy` (UDP
/// ASSOCIATE, then the datagram with its SOCKS5 UDP header to the relay address the proxy
/// named) and returns the payload of the first datagram that comes back within `within`,
/// sending again every 500 ms until then (the first datagram may be lost while the proxy sets
/// up its way to the server, as UDP's may).
pub fn udp_exchange(
    proxy: SocketAddr,
    target: SocketAddr,
    payload: &[u8],
    within: std::time::Duration,
) -> io::Result<Vec<u8>> {
    use std::time::{Duration, Instant};
    let any = SocketAddr::from(([0, 0, 0, 0], 0));
    let (_control, mut relay) = request(proxy, 3, any)?;
    if relay.ip().is_unspecified() {
        relay.set_ip(proxy.ip());
    }
    let socket = std::net::UdpSocket::bind(SocketAddr::new(proxy.ip(), 0))?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut datagram = vec![0, 0, 0];
    encode(target, &mut datagram);
    let header = datagram.len();
    datagram.extend_from_slice(payload);
    let end = Instant::now() + within;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < end {
        socket.send_to(&datagram, relay)?;
        match socket.recv(&mut buf) {
            // The reply's header names its source, the target: as long as the request's.
            Ok(n) if n >= header && buf[3] == datagram[3] => return Ok(buf[header..n].to_vec()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "socks5 udp reply {:?}",
                    &buf[..n]
                )));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no udp reply"))
}

/// [`connect`] for async callers: on the blocking pool, then registered with the runtime.
pub async fn connect_async(
    proxy: SocketAddr,
    target: SocketAddr,
) -> io::Result<tokio::net::TcpStream> {
    let s = tokio::task::spawn_blocking(move || connect(proxy, target))
        .await
        .map_err(io::Error::other)??;
    s.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(s)
}
