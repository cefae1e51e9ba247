//! The tunnel's workers and its UDP segmentation offload, against stock clients (`wireguard-go`
//! in namespaces of their own, as in `e2e_wg_tunnel`):
//! - several peers at once through two workers: every TCP byte arrives both ways, each peer's
//!   received WireGuard bytes are exactly what its client sent, and both workers carried datagrams each
//!   way (peers are steered to worker `peer index mod N`, so four peers are two per worker);
//! - a bulk TCP flow each way takes `UDP_SEGMENT` sends (their counters move), the data
//!   intact; runs of datagrams sent with `UDP_SEGMENT` by a client of our own (boringtun's
//!   `Tunn`) arrive as `UDP_GRO` receives, are split, and every packet is delivered.

use std::{
    io::IoSlice,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use boringtun::{
    noise::{Tunn, TunnResult},
    x25519,
};
use capybara_agent::tunnel::{DEFAULT_OFFLOAD, PeerConfig, PrivateKey, WgConfig};
use capybara_tests::{
    netns::NetNs,
    packets::udp4,
    traffic::{UdpSink, tcp_transfer},
    wg::{WgLab, ping_until, tunnel_config},
};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// How long a test waits for a first ping through the tunnel.
const WAIT: Duration = Duration::from_secs(5);

/// The lab's tunnel with `workers` workers.
fn config(net: u8, workers: usize) -> WgConfig {
    WgConfig {
        workers,
        ..tunnel_config(net, PrivateKey::generate(), DEFAULT_OFFLOAD)
    }
}

#[test]
fn four_peers_through_two_workers_carry_every_byte() {
    let net = 140;
    let s = WgLab::with_config(net, 4, true, config(net, 2));
    assert_eq!(s.tunnel.workers(), 2);
    for c in &s.clients {
        assert!(
            ping_until(&c.ns, s.v4, WAIT),
            "no IPv4 ping from {} through the tunnel",
            c.v4
        );
    }
    // Each client sends and receives its own amounts at the same time as the others.
    let (up, down) = (
        |i: u64| 2_000_000 + i * 1_000,
        |i: u64| 1_500_000 + i * 1_000,
    );
    let results: Vec<_> = std::thread::scope(|scope| {
        let s = &s;
        let handles: Vec<_> = (0..s.clients.len())
            .map(|i| {
                scope.spawn(move || {
                    let server = if i % 2 == 0 { s.v4 } else { s.v6 };
                    tcp_transfer(
                        &s.server,
                        SocketAddr::new(server, 0),
                        &s.clients[i].ns,
                        up(i as u64),
                        down(i as u64),
                        Duration::from_secs(30),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            (r.server_received, r.client_received),
            (up(i as u64), down(i as u64)),
            "TCP of client {i}"
        );
    }
    // Each peer's WireGuard bytes: what the server received is exactly what its client sent
    // (both count whole datagrams, handshakes included); what the server sent the client
    // counted unless its socket dropped it (Debian's wireguard-go reads one datagram per
    // call with the default receive buffer: TCP resent what it lost), so never more.
    std::thread::sleep(Duration::from_millis(300));
    for c in &s.clients {
        let key = c.wg.public_key();
        let ours = s.tunnel.peer(&key).expect("the peer");
        let theirs = c.wg.dump();
        let theirs = theirs.peer(&s.tunnel.public_key());
        assert!(ours.connected, "peer {key} connected");
        assert_eq!(
            ours.rx_bytes, theirs.tx_bytes,
            "peer {key}: server rx against the client's tx"
        );
        assert!(
            ours.tx_bytes >= theirs.rx_bytes && theirs.rx_bytes > 0,
            "peer {key}: server tx {} against the client's rx {}",
            ours.tx_bytes,
            theirs.rx_bytes
        );
    }
    let workers = s.tunnel.worker_counters();
    assert_eq!(workers.len(), 2);
    for (i, w) in workers.iter().enumerate() {
        // Two peers each, ≈ 1 400 datagrams per megabyte of TCP each way.
        assert!(
            w.rx_datagrams > 2_000 && w.tx_datagrams > 2_000,
            "worker {i} carried too little of four peers' traffic: {workers:?}"
        );
    }
    assert_eq!(s.tunnel.drops().invalid, 0, "{:?}", s.tunnel.drops());
}

/// A WireGuard client made of boringtun's `Tunn` on a socket of its own in `ns`, after its
/// handshake with the lab's server: it sends runs of equal datagrams with `UDP_SEGMENT`, which
/// reach the server's socket whole, as a coalesced receive (no stock client here sends so:
/// Debian's wireguard-go predates offloads, and a veth coalesces nothing it is handed one
/// datagram per softirq).
struct GsoClient {
    socket: UdpSocket,
    tunn: Tunn,
}

impl GsoClient {
    fn connect(s: &WgLab, ns: &NetNs, server: SocketAddr, key: &PrivateKey) -> GsoClient {
        let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0")).expect("bind");
        socket.connect(server).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut tunn = Tunn::new(
            x25519::StaticSecret::from(*key.as_bytes()),
            x25519::PublicKey::from(*s.tunnel.public_key().as_bytes()),
            None,
            None,
            1,
            None,
        );
        let (mut buf, mut out) = (vec![0u8; 2048], vec![0u8; 2048]);
        for _ in 0..5 {
            if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut buf, true)
            {
                socket.send(p).unwrap();
            }
            let Ok(n) = socket.recv(&mut buf) else {
                continue;
            };
            // The response; the keepalive boringtun answers it with confirms the session.
            let mut answer = tunn.decapsulate(None, &buf[..n], &mut out);
            while let TunnResult::WriteToNetwork(p) = answer {
                socket.send(p).unwrap();
                answer = tunn.decapsulate(None, &[], &mut out);
            }
            if tunn.stats().0.is_some() {
                return GsoClient { socket, tunn };
            }
        }
        panic!("no handshake with {server}");
    }

    /// Encrypts `packets` (equal lengths) and sends them as one `UDP_SEGMENT` message.
    fn send_run(&mut self, packets: &[Vec<u8>]) {
        let seg = packets[0].len() + 32;
        let mut run = vec![0u8; seg * packets.len()];
        for (p, slot) in packets.iter().zip(run.chunks_exact_mut(seg)) {
            match self.tunn.encapsulate(p, slot) {
                TunnResult::WriteToNetwork(c) => assert_eq!(c.len(), seg),
                other => panic!("encapsulate: {other:?}"),
            }
        }
        let size = seg as u16;
        sendmsg::<()>(
            self.socket.as_raw_fd(),
            &[IoSlice::new(&run)],
            &[ControlMessage::UdpGsoSegments(&size)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg with UDP_SEGMENT");
    }
}

#[test]
fn a_bulk_flow_takes_udp_gso_and_gro_and_arrives_intact() {
    let net = 146;
    let s = WgLab::with_config(net, 1, true, config(net, 2));
    let c = &s.clients[0];
    assert!(
        ping_until(&c.ns, s.v4, WAIT),
        "no IPv4 ping through the tunnel"
    );
    let before = s.tunnel.udp_offload();
    assert!(
        before.gso && before.gro,
        "this kernel has UDP_SEGMENT and UDP_GRO: {before:?}"
    );

    // GSO: a bulk TCP flow each way; the server's datagrams leave in runs.
    let (up, down) = (10_000_000, 10_000_000);
    let r = tcp_transfer(
        &s.server,
        SocketAddr::new(s.v4, 0),
        &c.ns,
        up,
        down,
        Duration::from_secs(30),
    );
    assert_eq!((r.server_received, r.client_received), (up, down));
    let after = s.tunnel.udp_offload();
    let sends = after.gso_sends - before.gso_sends;
    assert!(
        sends > 0,
        "no UDP_SEGMENT send under a bulk flow: {after:?}"
    );
    assert!(
        after.gso_datagrams - before.gso_datagrams >= 2 * sends,
        "{after:?}"
    );

    // GRO: a client that sends runs of 32 datagrams with UDP_SEGMENT; the server splits each
    // run it receives whole and delivers every packet, byte for byte.
    let key = PrivateKey::generate();
    let inner = Ipv4Addr::new(10, net, 1, 50);
    s.tunnel
        .add_peer(PeerConfig {
            public_key: key.public_key(),
            preshared_key: None,
            allowed_ips: vec![format!("{inner}/32").parse().unwrap()],
            persistent_keepalive: None,
        })
        .unwrap();
    let endpoint = SocketAddr::new(IpAddr::V4(c.veth.a.v4), s.tunnel.listen_port());
    let mut client = GsoClient::connect(&s, &c.ns, endpoint, &key);
    let sink = UdpSink::start(&s.server, SocketAddr::new(s.v4, 0));
    let IpAddr::V4(server_v4) = s.v4 else {
        unreachable!()
    };
    let (runs, per_run, payload) = (20u64, 32usize, 1000usize);
    let before = s.tunnel.udp_offload();
    for _ in 0..runs {
        let packets: Vec<Vec<u8>> = (0..per_run)
            .map(|_| udp4(inner, server_v4, 4000, sink.addr().port(), payload))
            .collect();
        client.send_run(&packets);
        std::thread::sleep(Duration::from_millis(5));
    }
    let n = runs * per_run as u64;
    assert_eq!(sink.wait_for(n, WAIT), n, "datagrams of GSO runs lost");
    assert_eq!(sink.bytes(), n * payload as u64);
    let after = s.tunnel.udp_offload();
    let received = after.gro_receives - before.gro_receives;
    assert!(received > 0, "no coalesced UDP_GRO receive: {after:?}");
    assert_eq!(
        after.gro_datagrams - before.gro_datagrams,
        received * per_run as u64,
        "each run split into its {per_run} datagrams: {after:?}"
    );
    assert_eq!(s.tunnel.drops().invalid, 0, "{:?}", s.tunnel.drops());
}
