//! An origin server for proxied and tunnelled traffic in tests: plain TCP on an address of a
//! namespace, threads only. A client's first byte says what it wants:
//! - [`FILE`]: the server's file, then it waits for the client to close (so a proxied
//!   connection stays open until the client has checked what it got);
//! - [`STREAM`]: 64 KiB writes until the connection fails or the server stops (downloads that
//!   only a limit, a cut or the test ends).
//!
//! It also answers UDP on the same address ([`Origin::udp`]): each datagram comes back with
//! [`ECHO_PREFIX`] before it (proxied datagrams in tests).
//!
//! Stops (and closes its sockets) when dropped.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// Asks for the file.
pub const FILE: u8 = b'F';
/// Asks for an endless stream.
pub const STREAM: u8 = b'S';
/// What the UDP echo puts before each datagram it returns.
pub const ECHO_PREFIX: &[u8] = b"echo:";
/// The size of each stream write.
const CHUNK: usize = 64 * 1024;

/// A running origin.
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its UDP echo listens.
    pub udp: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    echo: Option<JoinHandle<()>>,
}

impl Origin {
    /// Listens on `ip` (port chosen by the kernel) in `ns` and serves `file`.
    pub fn start(ns: &NetNs, ip: IpAddr, file: Arc<Vec<u8>>) -> Origin {
        let listener = ns
            .run(|| TcpListener::bind(SocketAddr::new(ip, 0)))
            .unwrap_or_else(|e| panic!("origin: bind {ip} in {}: {e}", ns.name()));
        let addr = listener.local_addr().expect("origin address");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let accept = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (file, flag) = (file.clone(), flag.clone());
                        std::thread::spawn(move || serve(s, &file, &flag));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let socket = ns
            .run(|| std::net::UdpSocket::bind(SocketAddr::new(ip, 0)))
            .unwrap_or_else(|e| panic!("origin: bind udp {ip} in {}: {e}", ns.name()));
        let udp = socket.local_addr().expect("origin udp address");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let flag = stop.clone();
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf[ECHO_PREFIX.len()..]) {
                    buf[..ECHO_PREFIX.len()].copy_from_slice(ECHO_PREFIX);
                    let _ = socket.send_to(&buf[..ECHO_PREFIX.len() + n], from);
                }
            }
        });
        Origin {
            addr,
            udp,
            stop,
            accept: Some(accept),
            echo: Some(echo),
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in [self.accept.take(), self.echo.take()].into_iter().flatten() {
            let _ = h.join();
        }
    }
}

fn serve(mut s: TcpStream, file: &[u8], stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let mut what = [0u8; 1];
    if s.read_exact(&mut what).is_err() {
        return;
    }
    match what[0] {
        FILE if s.write_all(file).is_ok() => {
            let mut rest = [0u8; 1024];
            while matches!(s.read(&mut rest), Ok(n) if n > 0) {}
        }
        STREAM => {
            // A write blocked by a stalled reader (a quota, a hold) wakes every 200 ms to see
            // whether the origin stopped.
            let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
            let buf = vec![0x5a; CHUNK];
            while !stop.load(Ordering::Relaxed) {
                match s.write(&buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        }
        _ => {}
    }
}

/// Reads `s` (a [`STREAM`] download) on a thread, adding each read to `count`, until the
/// connection ends or fails; the thread returns when it ended.
pub fn drain(mut s: TcpStream, count: Arc<std::sync::atomic::AtomicU64>) -> JoinHandle<Instant> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    })
}

/// Asks `s` for the file and reads `len` bytes of it (≤ `within`).
pub fn fetch_file(s: &mut TcpStream, len: usize, within: Duration) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(within))?;
    s.write_all(&[FILE])?;
    let mut got = vec![0u8; len];
    s.read_exact(&mut got)?;
    Ok(got)
}
