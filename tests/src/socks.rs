//! A SOCKS5 client (no authentication, CONNECT to an IPv4 or IPv6 address): how tests and
//! benchmarks reach through `ss-local` and v2ray's SOCKS inbound. One implementation, blocking;
//! [`connect_async`] runs it on tokio's blocking pool and hands the stream to the runtime.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
};

/// Connects to `target` through the SOCKS5 proxy at `proxy`; returns the stream once the proxy
/// answered success.
pub fn connect(proxy: SocketAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0])?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice)?;
    if choice != [5, 0] {
        return Err(io::Error::other(format!("socks5 method {choice:?}")));
    }
    let mut req = vec![5, 1, 0];
    match target {
        SocketAddr::V4(a) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
        }
    }
    req.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&req)?;
    let mut reply = [0u8; 4];
    s.read_exact(&mut reply)?;
    if reply[1] != 0 {
        return Err(io::Error::other(format!("socks5 reply {}", reply[1])));
    }
    // The bound address the proxy reports: read past it (ss-local and v2ray give IPv4).
    let rest = match reply[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        t => return Err(io::Error::other(format!("socks5 address type {t}"))),
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound)?;
    Ok(s)
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
