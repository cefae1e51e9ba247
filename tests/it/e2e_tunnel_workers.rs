//! The tunnel's workers and its UDP segmentation offload, against stock clients (`wireguard-go`
//! in namespaces of their own, as in `e2e_wg_tunnel`):
//! - several peers at once through two workers: every TCP byte arrives both ways, each peer's
//!   WireGuard counters match what its client counted, and both workers carried datagrams each
//!   way (peers are steered to worker `peer index mod N`, so four peers are two per worker);
//! - a bulk TCP flow each way with `UDP_SEGMENT` sends and `UDP_GRO` receives taken (their
//!   counters move), the data intact.

use std::{net::SocketAddr, time::Duration};

use capybara_agent::tunnel::{DEFAULT_OFFLOAD, PrivateKey, WgConfig};
use capybara_tests::{
    traffic::tcp_transfer,
    wg::{WgLab, ping_until, tunnel_config},
};

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
    // Each peer's WireGuard bytes as the server counted them are what its client counted the
    // other way (the client's `wg show` dump; both count whole datagrams), once quiet.
    std::thread::sleep(Duration::from_millis(300));
    for c in &s.clients {
        let key = c.wg.public_key();
        let ours = s.tunnel.peer(&key).expect("the peer");
        let theirs = c.wg.dump();
        let theirs = theirs.peer(&s.tunnel.public_key());
        assert!(ours.connected, "peer {key} connected");
        assert_eq!(
            (ours.rx_bytes, ours.tx_bytes),
            (theirs.tx_bytes, theirs.rx_bytes),
            "peer {key}: server rx/tx against the client's tx/rx"
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

#[test]
fn a_bulk_flow_takes_udp_gso_and_gro_and_arrives_intact() {
    let net = 146;
    let s = WgLab::with_config(net, 1, true, config(net, 2));
    let c = &s.clients[0];
    // The client's datagrams reach the server's socket coalesced only if the server's end of
    // the veth runs GRO (a veth does once asked to: it then receives through NAPI).
    s.server
        .exec(&["ethtool", "-K", &c.veth.a.ifname, "gro", "on"]);
    assert!(
        ping_until(&c.ns, s.v4, WAIT),
        "no IPv4 ping through the tunnel"
    );
    let before = s.tunnel.udp_offload();
    assert!(
        before.gso && before.gro,
        "this kernel has UDP_SEGMENT and UDP_GRO: {before:?}"
    );
    let (up, down) = (20_000_000, 20_000_000);
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
    assert!(
        after.gso_sends > before.gso_sends,
        "no UDP_SEGMENT send under a bulk flow: {after:?}"
    );
    assert!(
        after.gso_datagrams - before.gso_datagrams >= 2 * (after.gso_sends - before.gso_sends),
        "{after:?}"
    );
    assert!(
        after.gro_receives > before.gro_receives,
        "no coalesced UDP_GRO receive under a bulk flow: {after:?}"
    );
    assert!(
        after.gro_datagrams - before.gro_datagrams
            >= 2 * (after.gro_receives - before.gro_receives),
        "{after:?}"
    );
    // Every datagram of a GRO run was split and decrypted: nothing invalid, and the peer's
    // bytes are the client's.
    assert_eq!(s.tunnel.drops().invalid, 0, "{:?}", s.tunnel.drops());
    std::thread::sleep(Duration::from_millis(300));
    let ours = s.tunnel.peer(&c.wg.public_key()).expect("the peer");
    let theirs = c.wg.dump();
    let theirs = theirs.peer(&s.tunnel.public_key());
    assert_eq!(
        (ours.rx_bytes, ours.tx_bytes),
        (theirs.tx_bytes, theirs.rx_bytes)
    );
}
