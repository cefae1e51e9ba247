//! Real traffic between namespaces: counted UDP datagrams, exact TCP transfers, interface
//! counters.
//!
//! Senders and receivers are small Rust loops on threads that entered a namespace
//! ([`NetNs::run`], [`NetNs::spawn_thread`]), so the tests know exactly what was sent and what
//! arrived. Every loop is bounded in count and time.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sys::{
    socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    },
    time::TimeVal,
};

use crate::netns::NetNs;

/// IPv4 + UDP header bytes: an IPv4 UDP datagram with `S` payload bytes is `S + 28` bytes of IP.
pub const UDP4_OVERHEAD: u64 = 28;
/// IPv6 + UDP header bytes: an IPv6 UDP datagram with `S` payload bytes is `S + 48` bytes of IP.
pub const UDP6_OVERHEAD: u64 = 48;

/// The IP + UDP overhead for datagrams to `addr`.
pub fn udp_overhead(addr: &SocketAddr) -> u64 {
    if addr.is_ipv4() {
        UDP4_OVERHEAD
    } else {
        UDP6_OVERHEAD
    }
}

/// A UDP receiver on a thread inside a namespace, counting datagrams and payload bytes until it
/// is dropped.
pub struct UdpSink {
    addr: SocketAddr,
    packets: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    /// Binds `bind` inside `ns` (with a large receive buffer, so bursts are not lost in the socket)
    /// and starts counting.
    pub fn start(ns: &NetNs, bind: SocketAddr) -> Self {
        let socket = ns.run(|| {
            let s = UdpSocket::bind(bind)
                .unwrap_or_else(|e| panic!("UDP bind {bind} in {}: {e}", ns.name()));
            setsockopt(&s, sockopt::RcvBufForce, &(8 << 20)).expect("SO_RCVBUFFORCE");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        });
        let addr = socket.local_addr().unwrap();
        let packets = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (packets, bytes, stop) = (packets.clone(), bytes.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    match socket.recv(&mut buf) {
                        Ok(n) => {
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                            packets.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(e) => panic!("UDP recv on {bind}: {e}"),
                    }
                }
            })
        };
        UdpSink {
            addr,
            packets,
            bytes,
            stop,
            thread: Some(thread),
        }
    }

    /// The bound address (with the actual port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn packets(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }

    /// Payload bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Waits until at least `packets` datagrams arrived or `timeout` passed; returns the count.
    pub fn wait_for(&self, packets: u64, timeout: Duration) -> u64 {
        let end = Instant::now() + timeout;
        while self.packets() < packets && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.packets()
    }

    /// Waits until no datagram arrived for `quiet` (at most `max`); returns the count. Use it
    /// where the expected count is zero or unknown.
    pub fn settle(&self, quiet: Duration, max: Duration) -> u64 {
        let end = Instant::now() + max;
        let mut last = self.packets();
        let mut since = Instant::now();
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
            let now = self.packets();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                break;
            }
        }
        self.packets()
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds a UDP socket to `from` (port 0 for any) inside the calling thread's namespace.
fn bind_sender(from: Option<IpAddr>, to: &SocketAddr) -> UdpSocket {
    let ip = from.unwrap_or(if to.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    });
    UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("UDP bind {ip}: {e}"))
}

/// Sends `count` datagrams of `size` payload bytes from namespace `ns` (source address `from`,
/// or the routing's choice) to `to`, paced so neither the devices' queues nor the receiver's
/// socket overflow. Returns the number sent (always `count`; a send error panics).
pub fn send_udp(ns: &NetNs, from: Option<IpAddr>, to: SocketAddr, count: u64, size: usize) -> u64 {
    ns.run(|| {
        let s = bind_sender(from, &to);
        let payload = vec![0xa5u8; size];
        for i in 0..count {
            let n = s
                .send_to(&payload, to)
                .unwrap_or_else(|e| panic!("UDP send {i} to {to}: {e}"));
            assert_eq!(n, size, "short UDP send");
            if i % 32 == 31 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        count
    })
}

/// A UDP sender on a background thread inside a namespace: one datagram every `interval` until
/// stopped (or `max` elapsed, so it always ends).
pub struct UdpStream {
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpStream {
    /// Starts sending `size`-byte datagrams from `from` to `to` every `interval`, for at most `max`.
    pub fn start(
        ns: &NetNs,
        from: Option<IpAddr>,
        to: SocketAddr,
        size: usize,
        interval: Duration,
        max: Duration,
    ) -> Self {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sent, stop) = (sent.clone(), stop.clone());
            ns.spawn_thread(move || {
                let s = bind_sender(from, &to);
                let payload = vec![0x5au8; size];
                let end = Instant::now() + max;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    s.send_to(&payload, to)
                        .unwrap_or_else(|e| panic!("UDP send to {to}: {e}"));
                    sent.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(interval);
                }
            })
        };
        UdpStream {
            sent,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the sender and returns how many datagrams it sent. Panics if the sender panicked.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && let Err(p) = t.join()
        {
            std::panic::resume_unwind(p);
        }
        self.sent()
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a [`tcp_transfer`] moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpResult {
    /// Payload bytes the server received from the client.
    pub server_received: u64,
    /// Payload bytes the client received from the server.
    pub client_received: u64,
}

/// One TCP connection from `client` (namespace) to `server` (namespace, listening on `addr`):
/// the client sends exactly `client_sends` bytes, the server exactly `server_sends`, both at
/// once; each side then half-closes and reads to the end. Returns what each side received; the
/// connection is fully closed when it returns. Panics after `timeout`.
pub fn tcp_transfer(
    server: &NetNs,
    addr: SocketAddr,
    client: &NetNs,
    client_sends: u64,
    server_sends: u64,
    timeout: Duration,
) -> TcpResult {
    tcp_transfer_from(
        server,
        addr,
        client,
        None,
        client_sends,
        server_sends,
        timeout,
    )
}

/// [`tcp_transfer`] with the client's socket bound to source address `client_src` first.
pub fn tcp_transfer_from(
    server: &NetNs,
    addr: SocketAddr,
    client: &NetNs,
    client_src: Option<IpAddr>,
    client_sends: u64,
    server_sends: u64,
    timeout: Duration,
) -> TcpResult {
    let listener =
        server.run(|| TcpListener::bind(addr).unwrap_or_else(|e| panic!("TCP bind {addr}: {e}")));
    let addr = listener.local_addr().unwrap();
    let server_thread = std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let end = Instant::now() + timeout;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("TCP accept on {addr}: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        exchange(stream, server_sends, timeout)
    });
    let client_received = client.run(|| {
        let stream = connect_from(client_src, addr, timeout);
        exchange(stream, client_sends, timeout)
    });
    let server_received = match server_thread.join() {
        Ok(n) => n,
        Err(p) => std::panic::resume_unwind(p),
    };
    TcpResult {
        server_received,
        client_received,
    }
}

/// Connects to `addr` from source address `src` (any when `None`), giving up after `timeout`.
fn connect_from(src: Option<IpAddr>, addr: SocketAddr, timeout: Duration) -> TcpStream {
    let Some(src) = src else {
        return TcpStream::connect_timeout(&addr, timeout)
            .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .unwrap_or_else(|e| panic!("TCP socket: {e}"));
    // Linux bounds a blocking connect by the send timeout.
    let tv = TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
    setsockopt(&fd, sockopt::SendTimeout, &tv).expect("SO_SNDTIMEO");
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )
    .unwrap_or_else(|e| panic!("TCP bind {src}: {e}"));
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .unwrap_or_else(|e| panic!("TCP connect {src} → {addr}: {e}"));
    TcpStream::from(fd)
}

/// Sends `send` bytes on one thread while reading to EOF on another; returns the bytes read.
fn exchange(stream: TcpStream, send: u64, timeout: Duration) -> u64 {
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let chunk = vec![0x3cu8; 64 * 1024];
        let mut left = send;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            writer
                .write_all(&chunk[..n])
                .unwrap_or_else(|e| panic!("TCP write: {e}"));
            left -= n as u64;
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("TCP read: {e}"),
        }
    }
    if let Err(p) = w.join() {
        std::panic::resume_unwind(p);
    }
    got
}

/// An interface's kernel counters (`/sys/class/net/<if>/statistics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfCounters {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Packets dropped on transmit.
    pub tx_dropped: u64,
}

impl IfCounters {
    /// Reads the counters of `ifname` in `ns` (through `ip netns exec`, which shows the
    /// namespace's own /sys).
    pub fn read(ns: &NetNs, ifname: &str) -> Self {
        const FIELDS: [&str; 6] = [
            "rx_packets",
            "rx_bytes",
            "tx_packets",
            "tx_bytes",
            "rx_dropped",
            "tx_dropped",
        ];
        let paths: Vec<String> = FIELDS
            .iter()
            .map(|f| format!("/sys/class/net/{ifname}/statistics/{f}"))
            .collect();
        let mut args = vec!["cat"];
        args.extend(paths.iter().map(String::as_str));
        let out = ns.exec(&args);
        let v: Vec<u64> = out
            .lines()
            .map(|l| {
                l.trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("counter {l:?}: {e}"))
            })
            .collect();
        assert_eq!(v.len(), FIELDS.len(), "statistics of {ifname}: {out:?}");
        IfCounters {
            rx_packets: v[0],
            rx_bytes: v[1],
            tx_packets: v[2],
            tx_bytes: v[3],
            rx_dropped: v[4],
            tx_dropped: v[5],
        }
    }

    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &IfCounters) -> IfCounters {
        IfCounters {
            rx_packets: self.rx_packets - earlier.rx_packets,
            rx_bytes: self.rx_bytes - earlier.rx_bytes,
            tx_packets: self.tx_packets - earlier.tx_packets,
            tx_bytes: self.tx_bytes - earlier.tx_bytes,
            rx_dropped: self.rx_dropped - earlier.rx_dropped,
            tx_dropped: self.tx_dropped - earlier.tx_dropped,
        }
    }

    /// Waits until the counters of `ifname` stop changing for `quiet` (at most `max`) and
    /// returns them: a snapshot taken after the last packet of a transfer (final ACKs included).
    pub fn settled(ns: &NetNs, ifname: &str, quiet: Duration, max: Duration) -> Self {
        let end = Instant::now() + max;
        let mut last = Self::read(ns, ifname);
        let mut since = Instant::now();
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
            let now = Self::read(ns, ifname);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                break;
            }
        }
        last
    }
}

/// A TCP server on a thread that accepts connections and keeps them open, echoing what it reads,
/// until dropped (so a test can hold flows open through a limit, or ask a port for an answer).
pub struct TcpEchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEchoServer {
    /// Listens on `addr` in `ns`.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Self {
        let listener = ns.run(|| {
            let l = TcpListener::bind(addr)
                .unwrap_or_else(|e| panic!("TCP bind {addr} in {}: {e}", ns.name()));
            l.set_nonblocking(true).unwrap();
            l
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(true).unwrap();
                            held.lock().unwrap().push(s);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            // Echo whatever arrived on the held connections.
                            for s in held.lock().unwrap().iter_mut() {
                                let mut buf = [0u8; 64];
                                if let Ok(n) = s.read(&mut buf)
                                    && n > 0
                                {
                                    let _ = s.write_all(&buf[..n]);
                                }
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("accept on {addr}: {e}"),
                    }
                }
            })
        };
        TcpEchoServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
