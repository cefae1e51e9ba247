//! A WireGuard load generator that is not the bottleneck: it measures what a server costs per
//! gigabit, not what its client costs (issue 23; `tunnel_cpu_*` benchmarks).
//!
//! # What it is
//!
//! One thread in the client's namespace, built on boringtun's `noise::Tunn` (the state machine
//! the agent drives): for each of P peers (each its own key and inner IPv4 address, known to the
//! server as a peer) it does the real WireGuard handshake with the server from its own UDP
//! socket, then sends **pre-encrypted** full-MTU datagrams with `sendmmsg`
//! ([`crate::bench::flood::SEND_BATCH`] per call), round robin over the peers. The load runs in
//! rounds: before each one (outside the measured window) the generator encrypts a pool of
//! [`POOL_BYTES`] of fresh datagrams (every WireGuard counter is used once, so the server's
//! replay window accepts them all and it decrypts every one); inside the window it only hands
//! that pool to the kernel.
//!
//! - **To the server**: each datagram carries an inner IPv4/UDP packet of `packet_len` bytes
//!   (1420, the tunnels' MTU, by default) from the peer's inner address to a UDP sink on the
//!   server's inner address ([`crate::bench::flood::UdpSink`]: a socket that is never read
//!   during the load, so the sink costs no process time; what reached it is its drops + the
//!   few it drains). Delivered bytes = packets that reached the sink × `packet_len`.
//! - **From the server**: a sender thread in the server's namespace aims plain UDP packets of
//!   `packet_len` (IP length) at the peers' inner addresses (`sendmmsg`, round robin), so the
//!   server reads them from its TUN, encrypts and sends them; the generator **does not decrypt**
//!   them: each peer's socket is left unread with a tiny receive buffer, and what arrived is
//!   its drops + drained datagrams (`/proc/net/udp` of the client's namespace). Delivered bytes
//!   = datagrams that arrived × `packet_len` (keepalives, 32 bytes, are a few in a million).
//! - **Both**: the two at once, delivered = the sum.
//!
//! Each round is paced: the first (a warm-up, not measured) is sent as fast as the generator
//! can; every later round offers 1.25 × the rate the previous round delivered, per direction,
//! so the server is kept saturated while little is dropped at its socket (dropped datagrams
//! cost softirq time, which is part of the server's bill, see below). The window of a round
//! ends [`DRAIN`] after the senders stop, so the server empties its queues inside it.
//!
//! # What a run reports ([`LoadResult`])
//!
//! Summed over the measured windows: wall time, delivered bytes per direction, the server's
//! CPU (`LoadSpec::server_cpu`, a closure the caller gives: a process's `/proc/PID/stat`, or
//! the agent's `wg-*` threads), the machine's softirq time (`/proc/stat`, all CPUs), and the
//! generator's own CPU (its sending threads, `/proc/thread-self/stat`; the handshakes and the
//! pool's encryption happen outside the windows).
//!
//! # Why it is not the bottleneck
//!
//! Inside a window the generator's threads do one `sendmmsg` per 64 datagrams that are already
//! encrypted; the veth's receive path (softirq, run in the sender's syscall) is the bulk of
//! their time. The `tunnel_cpu_*` benchmark reports the generator's CPU share as a figure
//! (`tunnel_cpu_loadgen_cores*`: its sending threads' CPU seconds per wall second). Measured
//! (2026-12-07, 2 cores loaded by other builds): 0.10–0.19 cores while the servers used
//! 0.15–0.44, and every round offered 1.02–1.45× what the server delivered — the server set
//! the pace. On a quieter machine it reached 0.76 cores at 2.7 Gbit/s (16 peers into the
//! agent's tunnel, whose server used 0.83): there it nearly co-limits, see
//! `crate::bench::tunnel_cpu`. Still far from the `wireguard-go` client whose CPU caps the
//! `tunnel_throughput_*` figures (as that module says). One sending thread: on these 2 cores a
//! second one would take its time from the server being measured; on a bigger machine a
//! thread per core (peers split between them) is the way to more load.
//!
//! # Softirq (the part of a server's cost no process is charged for)
//!
//! See `crate::bench::tunnel_cpu` for how a benchmark charges it: this module measures the
//! machine's softirq time in each window and returns it beside the server's own CPU.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use boringtun::{
    noise::{Tunn, TunnResult},
    x25519,
};
use capybara_agent::tunnel::{PeerConfig, PrivateKey, PublicKey};
use nix::sys::socket::{setsockopt, sockopt};

use crate::{
    bench::flood::{self, SEND_BATCH, UdpSink},
    cpu,
    netns::NetNs,
};

/// Bytes of encrypted datagrams prepared before each round (≈ 0.6 s of load at 1.5 Gbit/s):
/// big enough that a round's window is long against the 10 ms resolution of `/proc` times.
pub const POOL_BYTES: usize = 128 << 20;
/// Time after the senders stop, inside the window, for the server to empty its queues.
pub const DRAIN: Duration = Duration::from_millis(60);
/// The warm-up round (not measured) and the length of a from-server-only round.
const ROUND: Duration = Duration::from_millis(700);
/// Each measured round offers this much more than the previous round delivered.
const HEADROOM: f64 = 1.25;
/// The UDP port of the to-server sink on the server's inner address.
pub const SINK_PORT: u16 = 5299;
/// The UDP port the from-server sender aims at on each peer's inner address (the discard port;
/// the generator never decrypts, so nothing listens there).
pub const PEER_PORT: u16 = 9;
/// The source port of the from-server sender.
const SOURCE_PORT: u16 = 5298;
/// WireGuard's data message overhead: type, receiver index, counter (16 bytes) and the tag.
pub const WG_OVERHEAD: usize = 32;

/// Which way the load goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Peers → server (the server decrypts and writes to its TUN).
    ToServer,
    /// Server → peers (the server reads its TUN and encrypts).
    FromServer,
    /// Both at once.
    Both,
}

impl Direction {
    fn sends_to_server(self) -> bool {
        self != Direction::FromServer
    }

    fn sends_from_server(self) -> bool {
        self != Direction::ToServer
    }
}

/// One simulated client.
#[derive(Debug, Clone)]
pub struct LoadPeer {
    /// Its private key (the server knows the public key).
    pub key: PrivateKey,
    /// Its inner address (the server's allowed IP for it, a /32).
    pub inner: Ipv4Addr,
}

impl LoadPeer {
    /// A peer with a fresh key.
    pub fn generate(inner: Ipv4Addr) -> LoadPeer {
        LoadPeer {
            key: PrivateKey::generate(),
            inner,
        }
    }

    /// How the agent's tunnel knows this peer: its public key, its inner address as a /32.
    pub fn peer_config(&self) -> PeerConfig {
        PeerConfig {
            public_key: self.key.public_key(),
            preshared_key: None,
            allowed_ips: vec![ipnet::Ipv4Net::from(self.inner).into()],
            persistent_keepalive: None,
        }
    }
}

/// `n` peers with fresh keys on `10.<net>.1.<first + i>` (one /24: `first + n` ≤ 255).
pub fn peers(net: u8, first: u8, n: usize) -> Vec<LoadPeer> {
    (0..n)
        .map(|i| LoadPeer::generate(Ipv4Addr::new(10, net, 1, first + i as u8)))
        .collect()
}

/// A load to run against one server.
pub struct LoadSpec<'a> {
    /// The generator's namespace (its sockets are made there).
    pub client: &'a NetNs,
    /// The server's namespace (the sink and the from-server sender live there).
    pub server: &'a NetNs,
    /// The server's WireGuard endpoint as the client reaches it.
    pub endpoint: SocketAddrV4,
    /// The server's public key.
    pub server_key: PublicKey,
    /// The server's inner address (the sink binds it; the from-server sender sends from it).
    pub server_inner: Ipv4Addr,
    /// The peers, each already known to the server (public key, `inner/32` allowed).
    pub peers: &'a [LoadPeer],
    /// Which way.
    pub direction: Direction,
    /// Measured seconds of load (whole rounds: at least this much).
    pub seconds: f64,
    /// Inner IPv4 packet length (IP header included): 1420 fills the tunnels' MTU.
    pub packet_len: usize,
    /// The server's CPU time so far (user + system), sampled at each window's edges.
    pub server_cpu: &'a (dyn Fn() -> Result<Duration> + Sync),
}

/// What a run measured, summed over its windows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadResult {
    /// Wall time of the measured windows.
    pub wall: Duration,
    /// Inner bytes delivered to the server's sink.
    pub to_server_bytes: u64,
    /// Inner bytes of the datagrams that reached the peers.
    pub from_server_bytes: u64,
    /// Inner bytes the generator offered (both directions).
    pub offered_bytes: u64,
    /// The server's CPU (user + system, [`LoadSpec::server_cpu`]).
    pub server_cpu: Duration,
    /// Softirq time of the whole machine.
    pub softirq: Duration,
    /// The generator's sending threads' CPU (user + system).
    pub generator_cpu: Duration,
    /// Measured rounds.
    pub rounds: usize,
}

impl LoadResult {
    /// Delivered bytes, both directions.
    pub fn delivered_bytes(&self) -> u64 {
        self.to_server_bytes + self.from_server_bytes
    }

    /// Delivered Mbit/s.
    pub fn mbps(&self) -> f64 {
        self.delivered_bytes() as f64 * 8.0 / 1e6 / self.wall.as_secs_f64()
    }

    /// The server's CPU seconds per delivered gigabit, without softirq.
    pub fn server_s_per_gbit(&self) -> f64 {
        cpu::s_per_gbit(self.server_cpu, self.delivered_bytes())
    }

    /// The generator's CPU, in cores (CPU seconds per wall second).
    pub fn generator_cores(&self) -> f64 {
        self.generator_cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    /// The server's CPU (without softirq), in cores.
    pub fn server_cores(&self) -> f64 {
        self.server_cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    fn add(&mut self, o: &LoadResult) {
        self.wall += o.wall;
        self.to_server_bytes += o.to_server_bytes;
        self.from_server_bytes += o.from_server_bytes;
        self.offered_bytes += o.offered_bytes;
        self.server_cpu += o.server_cpu;
        self.softirq += o.softirq;
        self.generator_cpu += o.generator_cpu;
        self.rounds += o.rounds;
    }
}

/// A peer after its handshake: its socket (connected to the server) and its session.
struct Session {
    socket: UdpSocket,
    tunn: Tunn,
    port: u16,
}

/// Runs `spec`: handshakes, a warm-up round, then measured rounds until `spec.seconds`.
pub fn run(spec: &LoadSpec<'_>) -> Result<LoadResult> {
    validate(spec.peers.len(), spec.packet_len, spec.seconds)?;
    let mut sessions = spec
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| handshake(spec, p, i as u32 + 1))
        .collect::<Result<Vec<_>>>()?;
    let mut sink = if spec.direction.sends_to_server() {
        Some(UdpSink::bind(
            spec.server,
            SocketAddr::V4(SocketAddrV4::new(spec.server_inner, SINK_PORT)),
        )?)
    } else {
        None
    };
    let source = if spec.direction.sends_from_server() {
        let from = SocketAddrV4::new(spec.server_inner, SOURCE_PORT);
        Some(
            spec.server
                .run(|| UdpSocket::bind(from))
                .context("bind the from-server sender")?,
        )
    } else {
        None
    };
    // The peers' sockets count what arrives without being read: a tiny receive buffer.
    for s in &sessions {
        s.socket.set_nonblocking(true)?;
        setsockopt(&s.socket, sockopt::RcvBuf, &4096).context("SO_RCVBUF")?;
    }
    let mut pool = Pool::new(spec, sessions.len());
    let mut rates = (None, None);
    let mut total = LoadResult::default();
    let mut warm = true;
    while warm || total.wall.as_secs_f64() < spec.seconds {
        let r = round(spec, &mut sessions, &mut pool, &mut sink, &source, rates)?;
        if spec.direction.sends_to_server() && r.to_server_bytes == 0 {
            bail!("no datagram reached the sink through the server");
        }
        if spec.direction.sends_from_server() && r.from_server_bytes == 0 {
            bail!("no datagram from the server reached the peers");
        }
        let w = r.wall.as_secs_f64();
        rates = (
            Some(HEADROOM * r.to_server_bytes as f64 / spec.packet_len as f64 / w),
            Some(HEADROOM * r.from_server_bytes as f64 / spec.packet_len as f64 / w),
        );
        if !warm {
            total.add(&r);
        }
        warm = false;
    }
    Ok(total)
}

/// The checks of a spec's numbers, each error naming its field.
fn validate(peers: usize, packet_len: usize, seconds: f64) -> Result<()> {
    ensure!(peers > 0, "peers: at least one");
    ensure!(
        (28..=1500).contains(&packet_len),
        "packet_len: {packet_len} is not 28–1500"
    );
    ensure!(
        seconds > 0.0 && seconds.is_finite(),
        "seconds: {seconds} is not positive"
    );
    Ok(())
}

/// Performs the handshake of `peer` (initiator) with the server from a new socket in the
/// client's namespace; retries a lost message up to five times.
fn handshake(spec: &LoadSpec<'_>, peer: &LoadPeer, index: u32) -> Result<Session> {
    let socket = spec
        .client
        .run(|| UdpSocket::bind("0.0.0.0:0"))
        .context("bind a peer's socket")?;
    socket.connect(spec.endpoint)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let port = socket.local_addr()?.port();
    let mut tunn = Tunn::new(
        x25519::StaticSecret::from(*peer.key.as_bytes()),
        x25519::PublicKey::from(*spec.server_key.as_bytes()),
        None,
        None,
        index,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    for _ in 0..5 {
        match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => socket.send(p)?,
            other => bail!("peer {}: no handshake initiation: {other:?}", peer.inner),
        };
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e).context("receive the handshake response"),
        };
        // The response; boringtun answers it with a keepalive, which confirms the session to
        // the responder.
        let mut answer = tunn.decapsulate(None, &buf[..n], &mut out);
        loop {
            match answer {
                TunnResult::WriteToNetwork(p) => {
                    socket.send(p)?;
                }
                TunnResult::Done => break,
                TunnResult::Err(e) => bail!("peer {}: handshake response: {e:?}", peer.inner),
                other => bail!("peer {}: unexpected {other:?}", peer.inner),
            }
            answer = tunn.decapsulate(None, &[], &mut out);
        }
        if tunn.stats().0.is_some() {
            return Ok(Session { socket, tunn, port });
        }
    }
    bail!(
        "peer {}: no handshake with {} after 5 tries",
        peer.inner,
        spec.endpoint
    )
}

/// Encrypted datagrams, `per_peer` for each peer back to back, in one buffer.
struct Pool {
    buf: Vec<u8>,
    /// Bytes per slot (`packet_len + WG_OVERHEAD`, the datagram's exact length).
    stride: usize,
    per_peer: usize,
    /// The inner packet of each peer (its source address differs).
    inner: Vec<Vec<u8>>,
}

impl Pool {
    fn new(spec: &LoadSpec<'_>, peers: usize) -> Pool {
        let stride = spec.packet_len + WG_OVERHEAD;
        let per_peer = if spec.direction.sends_to_server() {
            (POOL_BYTES / stride / peers).max(SEND_BATCH)
        } else {
            0
        };
        let inner = spec
            .peers
            .iter()
            .map(|p| {
                crate::packets::udp4(
                    p.inner,
                    spec.server_inner,
                    SOURCE_PORT,
                    SINK_PORT,
                    spec.packet_len - 28,
                )
            })
            .collect();
        Pool {
            buf: vec![0u8; stride * per_peer * peers],
            stride,
            per_peer,
            inner,
        }
    }

    /// Encrypts a fresh datagram into every slot (new counters).
    fn fill(&mut self, sessions: &mut [Session]) -> Result<()> {
        let slots_per_peer = self.stride * self.per_peer;
        for (p, s) in sessions.iter_mut().enumerate() {
            let region = &mut self.buf[p * slots_per_peer..(p + 1) * slots_per_peer];
            for slot in region.chunks_exact_mut(self.stride) {
                match s.tunn.encapsulate(&self.inner[p], slot) {
                    TunnResult::WriteToNetwork(d) if d.len() == self.stride => {}
                    TunnResult::WriteToNetwork(d) => {
                        bail!("a datagram of {} bytes, not {}", d.len(), self.stride)
                    }
                    other => bail!("encapsulate: {other:?} (session lost?)"),
                }
            }
        }
        Ok(())
    }
}

/// What the peers' sockets received so far (drained + dropped), from the client's namespace.
fn peers_received(client: &NetNs, sessions: &[Session]) -> Result<u64> {
    let mut drained = 0u64;
    let mut buf = [0u8; 2048];
    for s in sessions {
        while s.socket.recv(&mut buf).is_ok() {
            drained += 1;
        }
    }
    let udp = client.exec(&["cat", "/proc/net/udp"]);
    let mut drops = 0;
    for s in sessions {
        drops += flood::parse_udp_drops(&udp, s.port)
            .with_context(|| format!("peer socket :{} not in /proc/net/udp", s.port))?;
    }
    Ok(drained + drops)
}

/// Sends `n` messages of `msgs` (round robin over `groups`, each a socket and its headers) at
/// `rate` messages per second (unpaced without), or for `for_time` when `n` is `None`.
/// Returns the messages the kernel took.
fn send_paced(
    groups: &mut [(i32, Vec<libc::mmsghdr>)],
    rate: Option<f64>,
    limit: Limit,
    stop: &AtomicBool,
) -> u64 {
    let t = Instant::now();
    let mut offered = 0u64;
    let mut taken = 0u64;
    let mut at = vec![0usize; groups.len()];
    'outer: loop {
        let mut progressed = false;
        for (g, (fd, hdrs)) in groups.iter_mut().enumerate() {
            let start = at[g];
            let end = match limit {
                Limit::Once => (start + SEND_BATCH).min(hdrs.len()),
                Limit::For(_) => start + SEND_BATCH.min(hdrs.len() - start),
            };
            if start >= end {
                continue;
            }
            progressed = true;
            if let Some(rate) = rate {
                let due = offered as f64 / rate;
                let el = t.elapsed().as_secs_f64();
                if due > el {
                    std::thread::sleep(Duration::from_secs_f64(due - el));
                }
            }
            // SAFETY: the headers point into the pool (or the packet buffer) and iovecs the
            // caller keeps alive for the whole call.
            let n = unsafe {
                libc::sendmmsg(*fd, hdrs[start..end].as_mut_ptr(), (end - start) as u32, 0)
            };
            taken += n.max(0) as u64;
            offered += (end - start) as u64;
            at[g] = if matches!(limit, Limit::For(_)) && end == hdrs.len() {
                0
            } else {
                end
            };
            match limit {
                Limit::For(d) if t.elapsed() >= d => break 'outer,
                _ => {}
            }
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
        }
        if !progressed {
            break;
        }
    }
    taken
}

/// Sockets and their `sendmmsg` headers, one group per socket, handed to a sender thread.
struct Groups(Vec<(i32, Vec<libc::mmsghdr>)>);

// SAFETY: the headers' pointers lead to buffers (the pool, the payloads, the iovecs and the
// names) that outlive the scoped sender thread and that nothing writes while it sends.
unsafe impl Send for Groups {}

/// How long a sender sends.
#[derive(Clone, Copy)]
enum Limit {
    /// Every message once (the pool).
    Once,
    /// Round and round for this long.
    For(Duration),
}

/// One round: fill the pool (outside the window), then the window: senders, drain, samples.
fn round(
    spec: &LoadSpec<'_>,
    sessions: &mut [Session],
    pool: &mut Pool,
    sink: &mut Option<UdpSink>,
    source: &Option<UdpSocket>,
    (rate_to, rate_from): (Option<f64>, Option<f64>),
) -> Result<LoadResult> {
    pool.fill(sessions)?;
    // iovecs and headers over the pool, one group per peer socket.
    let mut to_iov: Vec<Vec<libc::iovec>> = (0..sessions.len())
        .map(|p| {
            (0..pool.per_peer)
                .map(|i| libc::iovec {
                    iov_base: pool.buf[(p * pool.per_peer + i) * pool.stride..]
                        .as_mut_ptr()
                        .cast(),
                    iov_len: pool.stride,
                })
                .collect()
        })
        .collect();
    let mut to_groups = Groups(
        sessions
            .iter()
            .zip(to_iov.iter_mut())
            .map(|(s, iov)| (s.socket.as_raw_fd(), flood::headers(iov, &[])))
            .collect(),
    );
    // The from-server packets: UDP payloads (the kernel adds 28 bytes of headers) to each peer.
    let payload = crate::packets::payload(spec.packet_len - 28);
    let names: Vec<libc::sockaddr_in> = spec
        .peers
        .iter()
        .map(|p| flood::sockaddr_in(SocketAddrV4::new(p.inner, PEER_PORT)))
        .collect();
    let payloads = vec![payload; names.len() * SEND_BATCH];
    let mut from_iov = flood::iovecs(&payloads);
    let from_hdrs = flood::headers(&mut from_iov, &names);
    let mut from_groups = Groups(
        source
            .as_ref()
            .map(|s| vec![(s.as_raw_fd(), from_hdrs)])
            .unwrap_or_default(),
    );
    // The to-server pool takes `pool / rate`; the from-server sender runs as long (or ROUND).
    let to_len = (pool.per_peer * sessions.len()) as f64;
    let duration = match (spec.direction.sends_to_server(), rate_to) {
        (true, Some(r)) => Duration::from_secs_f64(to_len / r),
        (true, None) => ROUND,
        (false, _) => ROUND,
    };

    let sink_before = match sink {
        Some(s) => s.reached(spec.server)?,
        None => 0,
    };
    let peers_before = if spec.direction.sends_from_server() {
        peers_received(spec.client, sessions)?
    } else {
        0
    };
    let server_before = (spec.server_cpu)()?;
    let softirq_before = cpu::softirq()?;
    let t = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (to_sent, from_sent, gen_cpu) = std::thread::scope(|sc| -> Result<(u64, u64, Duration)> {
        let to = (spec.direction.sends_to_server()).then(|| {
            let stop = stop.clone();
            let groups = &mut to_groups;
            std::thread::Builder::new()
                .name("loadgen-tx".into())
                .spawn_scoped(sc, move || -> Result<(u64, Duration)> {
                    let c0 = cpu::this_thread()?;
                    let n = send_paced(&mut groups.0, rate_to, Limit::Once, &stop);
                    Ok((n, cpu::this_thread()? - c0))
                })
        });
        let from = (spec.direction.sends_from_server()).then(|| {
            let stop = stop.clone();
            let groups = &mut from_groups;
            std::thread::Builder::new()
                .name("loadgen-srv".into())
                .spawn_scoped(sc, move || -> Result<(u64, Duration)> {
                    let c0 = cpu::this_thread()?;
                    let n = send_paced(&mut groups.0, rate_from, Limit::For(duration), &stop);
                    Ok((n, cpu::this_thread()? - c0))
                })
        });
        let join = |h: Option<std::io::Result<std::thread::ScopedJoinHandle<'_, _>>>| -> Result<(u64, Duration)> {
            match h {
                None => Ok((0, Duration::ZERO)),
                Some(h) => h?.join().map_err(|_| anyhow::anyhow!("a sender panicked"))?,
            }
        };
        let had_to = to.is_some();
        let a = join(to);
        // Both ways: the from-server sender stops with the pool.
        if had_to {
            stop.store(true, Ordering::Relaxed);
        }
        let b = join(from);
        let (a, b) = (a?, b?);
        Ok((a.0, b.0, a.1 + b.1))
    })?;
    std::thread::sleep(DRAIN);
    let wall = t.elapsed();
    let server_cpu = (spec.server_cpu)()? - server_before;
    let softirq = cpu::softirq()? - softirq_before;
    let to_packets = match sink {
        Some(s) => s.reached(spec.server)? - sink_before,
        None => 0,
    };
    let from_packets = if spec.direction.sends_from_server() {
        peers_received(spec.client, sessions)? - peers_before
    } else {
        0
    };
    let len = spec.packet_len as u64;
    Ok(LoadResult {
        wall,
        to_server_bytes: to_packets * len,
        from_server_bytes: from_packets * len,
        offered_bytes: (to_sent + from_sent) * len,
        server_cpu,
        softirq,
        generator_cpu: gen_cpu,
        rounds: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two receivers on loopback with room for everything sent to them.
    fn receivers() -> Vec<UdpSocket> {
        (0..2)
            .map(|_| {
                let r = UdpSocket::bind("127.0.0.1:0").unwrap();
                setsockopt(&r, sockopt::RcvBuf, &(4 << 20)).unwrap();
                r.set_nonblocking(true).unwrap();
                r
            })
            .collect()
    }

    fn drain(r: &UdpSocket) -> Vec<u8> {
        let mut firsts = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = r.recv(&mut buf) {
            assert_eq!(n, 16);
            firsts.push(buf[0]);
        }
        firsts
    }

    #[test]
    fn a_pool_is_sent_once_round_robin_over_the_peers_sockets() {
        let rx = receivers();
        // 150 messages for socket 0 (more than two batches), 10 for socket 1.
        let senders: Vec<UdpSocket> = rx
            .iter()
            .map(|r| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(r.local_addr().unwrap()).unwrap();
                s
            })
            .collect();
        let bufs: Vec<Vec<Vec<u8>>> = [150usize, 10]
            .iter()
            .enumerate()
            .map(|(g, &n)| (0..n).map(|i| vec![(g * 200 + i) as u8; 16]).collect())
            .collect();
        let mut iov: Vec<Vec<libc::iovec>> = bufs.iter().map(|b| flood::iovecs(b)).collect();
        let mut groups: Vec<(i32, Vec<libc::mmsghdr>)> = senders
            .iter()
            .zip(iov.iter_mut())
            .map(|(s, v)| (s.as_raw_fd(), flood::headers(v, &[])))
            .collect();
        let taken = send_paced(&mut groups, None, Limit::Once, &AtomicBool::new(false));
        assert_eq!(taken, 160);
        let got0 = drain(&rx[0]);
        let got1 = drain(&rx[1]);
        // Each message once, in order, each on its own peer's socket.
        assert_eq!(got0, (0..150).map(|i| i as u8).collect::<Vec<_>>());
        assert_eq!(got1, (0..10).map(|i| (200 + i) as u8).collect::<Vec<_>>());
    }

    #[test]
    fn a_timed_sender_goes_round_and_round_and_stops() {
        let rx = receivers();
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let bufs: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 16]).collect();
        let names: Vec<libc::sockaddr_in> = rx
            .iter()
            .map(|r| match r.local_addr().unwrap() {
                SocketAddr::V4(a) => flood::sockaddr_in(a),
                SocketAddr::V6(_) => unreachable!(),
            })
            .collect();
        let mut iov = flood::iovecs(&bufs);
        let mut groups = vec![(s.as_raw_fd(), flood::headers(&mut iov, &names))];
        // Paced at 2000 messages/s for 50 ms: round and round over 3 messages, about 100 sent
        // (the count is not asserted: timing is the machine's).
        let taken = send_paced(
            &mut groups,
            Some(2000.0),
            Limit::For(Duration::from_millis(50)),
            &AtomicBool::new(false),
        );
        assert!(taken > 3, "sent only {taken}: did not go round");
        let (a, b) = (drain(&rx[0]), drain(&rx[1]));
        assert_eq!(a.len() + b.len(), taken as usize);
        // Message i goes to name i % 2: receiver 0 gets messages 0 and 2, receiver 1 message 1.
        assert!(a.iter().all(|&x| x == 0 || x == 2), "{a:?}");
        assert!(b.iter().all(|&x| x == 1), "{b:?}");
        // A raised stop flag ends a timed sender at once.
        let taken = send_paced(
            &mut groups,
            None,
            Limit::For(Duration::from_secs(3600)),
            &AtomicBool::new(true),
        );
        assert!(taken <= 3, "{taken}");
    }

    #[test]
    fn bad_specs_name_their_field() {
        // The checks `run` makes before any socket.
        let err = validate(0, 1420, 1.0).unwrap_err().to_string();
        assert_eq!(err, "peers: at least one");
        let err = validate(1, 20, 1.0).unwrap_err().to_string();
        assert!(err.starts_with("packet_len"), "{err}");
        let err = validate(1, 1420, 0.0).unwrap_err().to_string();
        assert!(err.starts_with("seconds"), "{err}");
        assert!(validate(16, 1420, 2.5).is_ok());
    }

    #[test]
    fn throughput_and_shares_of_a_result() {
        let mut r = LoadResult {
            wall: Duration::from_secs(2),
            to_server_bytes: 250_000_000,
            server_cpu: Duration::from_millis(800),
            generator_cpu: Duration::from_millis(200),
            rounds: 1,
            ..LoadResult::default()
        };
        assert!((r.mbps() - 1000.0).abs() < 1e-9);
        assert!((r.server_s_per_gbit() - 0.4).abs() < 1e-12);
        assert!((r.generator_cores() - 0.1).abs() < 1e-12);
        let one = r;
        r.add(&one);
        assert_eq!(r.rounds, 2);
        assert!((r.mbps() - 1000.0).abs() < 1e-9);
    }
}
