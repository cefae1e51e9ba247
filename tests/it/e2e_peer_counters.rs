//! Per-peer byte and packet counters on the tunnel device are exact.
//!
//! The TC programs are attached to the server's TUN device of a [`TunWire`]; the peer's inner
//! addresses are its allowed IPs. UDP: N datagrams of S payload bytes are N × (S + 28) bytes of
//! IPv4 (N × (S + 48) of IPv6) in each direction. TCP: the peer's counters equal what the TUN
//! device itself counted — the same packets — minus what the programs attributed to no peer
//! (the kernel's own MLD reports), which is read from the global counters so the identity is
//! exact, not approximate.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use capybara_agent::dataplane::Dataplane;
use capybara_common::{
    counters::{TC_IN_MALFORMED, TC_IN_UNKNOWN_PEER, TC_OUT_MALFORMED, TC_OUT_UNKNOWN_PEER},
    peer::PeerStats,
};
use capybara_tests::traffic::{IfCounters, UdpSink, send_udp, tcp_transfer, udp_overhead};

use crate::e2e_support::{TunPeer, WAIT, tun_peer};

const PEER: u32 = 7;

fn setup(net: u8) -> TunPeer {
    tun_peer(net, PEER)
}

fn peer(dp: &Dataplane) -> PeerStats {
    dp.peer_stats(PEER).expect("read peer stats")
}

fn delta(after: &PeerStats, before: &PeerStats) -> PeerStats {
    PeerStats {
        rx_packets: after.rx_packets - before.rx_packets,
        rx_bytes: after.rx_bytes - before.rx_bytes,
        tx_packets: after.tx_packets - before.tx_packets,
        tx_bytes: after.tx_bytes - before.tx_bytes,
        drops: std::array::from_fn(|i| after.drops[i] - before.drops[i]),
    }
}

/// UDP both ways to `server`/from `client` addresses: exact counts from the datagrams sent.
fn udp_both_ways(s: &TunPeer, server: IpAddr, client: IpAddr) {
    let (n, size) = (400u64, 1000usize);

    let sink = UdpSink::start(&s.a, SocketAddr::new(server, 0));
    let before = peer(&s.dp);
    let if_before = IfCounters::read(&s.a, &s.wire.a.ifname);
    send_udp(&s.b, Some(client), sink.addr(), n, size);
    assert_eq!(
        sink.wait_for(n, WAIT),
        n,
        "UDP peer → server ({client} → {server}) lost datagrams"
    );
    let d = delta(&peer(&s.dp), &before);
    let ifd = IfCounters::read(&s.a, &s.wire.a.ifname).since(&if_before);
    let expect_bytes = n * (size as u64 + udp_overhead(&sink.addr()));
    assert_eq!(
        d.rx_packets, n,
        "peer rx packets, {client} → {server}: {d:?}"
    );
    assert_eq!(
        d.rx_bytes, expect_bytes,
        "peer rx bytes, {client} → {server}: {d:?}"
    );
    assert_eq!(d.tx_packets, 0, "nothing was sent to the peer: {d:?}");
    assert_eq!(
        ifd.rx_bytes, expect_bytes,
        "the device saw other bytes: {ifd:?}"
    );

    let back = UdpSink::start(&s.b, SocketAddr::new(client, 0));
    let before = peer(&s.dp);
    send_udp(&s.a, Some(server), back.addr(), n, size);
    assert_eq!(
        back.wait_for(n, WAIT),
        n,
        "UDP server → peer ({server} → {client}) lost datagrams"
    );
    let d = delta(&peer(&s.dp), &before);
    assert_eq!(
        d.tx_packets, n,
        "peer tx packets, {server} → {client}: {d:?}"
    );
    assert_eq!(
        d.tx_bytes, expect_bytes,
        "peer tx bytes, {server} → {client}: {d:?}"
    );
    assert_eq!(d.rx_packets, 0, "nothing came from the peer: {d:?}");
    assert_eq!(d.drops, [0; 16], "no drops expected: {d:?}");
}

/// A TCP transfer both ways: the peer's counters equal the device's own counters minus what
/// the programs counted as no peer's.
fn tcp_both_ways(s: &TunPeer, server: IpAddr) {
    let (up, down) = (4_000_000u64, 1_500_000u64);
    let quiet = Duration::from_millis(300);
    let if_before = IfCounters::settled(&s.a, &s.wire.a.ifname, quiet, WAIT);
    let before = peer(&s.dp);
    let g_before = s.dp.counters().expect("read counters");

    let r = tcp_transfer(
        &s.a,
        SocketAddr::new(server, 0),
        &s.b,
        up,
        down,
        Duration::from_secs(15),
    );
    assert_eq!((r.server_received, r.client_received), (up, down));

    let ifd = IfCounters::settled(&s.a, &s.wire.a.ifname, quiet, WAIT).since(&if_before);
    let d = delta(&peer(&s.dp), &before);
    let g = s.dp.counters().expect("read counters");
    let other = |slots: [u32; 2]| {
        slots.iter().fold((0u64, 0u64), |(p, b), &slot| {
            let (x, y) = (g.get(slot), g_before.get(slot));
            (p + x.packets - y.packets, b + x.bytes - y.bytes)
        })
    };
    let (in_other_p, in_other_b) = other([TC_IN_UNKNOWN_PEER, TC_IN_MALFORMED]);
    let (out_other_p, out_other_b) = other([TC_OUT_UNKNOWN_PEER, TC_OUT_MALFORMED]);
    let ctx = format!(
        "TCP via {server}: peer {d:?}, device {ifd:?}, not the peer's: in {in_other_p} pkts \
         {in_other_b} B, out {out_other_p} pkts {out_other_b} B"
    );
    assert_eq!(ifd.tx_dropped, 0, "the device dropped packets: {ctx}");
    assert!(
        d.rx_bytes > up && d.tx_bytes > down,
        "counters below the payload: {ctx}"
    );
    assert_eq!(
        d.rx_packets,
        ifd.rx_packets - in_other_p,
        "rx packets: {ctx}"
    );
    assert_eq!(d.rx_bytes, ifd.rx_bytes - in_other_b, "rx bytes: {ctx}");
    assert_eq!(
        d.tx_packets,
        ifd.tx_packets - out_other_p,
        "tx packets: {ctx}"
    );
    assert_eq!(d.tx_bytes, ifd.tx_bytes - out_other_b, "tx bytes: {ctx}");
    assert!(
        in_other_p + out_other_p <= 16,
        "unexpected amount of traffic of no peer during the transfer: {ctx}"
    );
}

#[test]
fn udp_ipv4_counts_exact_bytes_both_ways() {
    let s = setup(41);
    udp_both_ways(&s, IpAddr::V4(s.wire.a.v4), IpAddr::V4(s.wire.b.v4));
}

#[test]
fn udp_ipv6_counts_exact_bytes_both_ways() {
    let s = setup(42);
    udp_both_ways(&s, IpAddr::V6(s.wire.a.v6), IpAddr::V6(s.wire.b.v6));
}

#[test]
fn tcp_ipv4_counters_match_the_device() {
    let s = setup(43);
    tcp_both_ways(&s, IpAddr::V4(s.wire.a.v4));
}

#[test]
fn tcp_ipv6_counters_match_the_device() {
    let s = setup(44);
    tcp_both_ways(&s, IpAddr::V6(s.wire.a.v6));
}

/// With the peer's address in the IPv4 address pool (attributed by array), moved to another pool
/// (back to the hash) and into a pool again, every byte still lands on the peer; a pool larger
/// than the array is refused and changes nothing.
#[test]
fn udp_ipv4_counts_exact_bytes_through_pool_changes() {
    let mut s = setup(56);
    let (server, client) = (IpAddr::V4(s.wire.a.v4), IpAddr::V4(s.wire.b.v4));
    let cfg_before = s.dp.runtime_config();
    let e =
        s.dp.set_peer_pool_v4(Some("10.0.0.0/11".parse().unwrap()))
            .unwrap_err();
    assert!(e.to_string().contains("10.0.0.0/11"), "{e}");
    assert_eq!(
        s.dp.runtime_config(),
        cfg_before,
        "a refused pool changed the config"
    );
    for pool in ["10.56.0.0/24", "10.57.0.0/16", "10.48.0.0/12"] {
        s.dp.set_peer_pool_v4(Some(pool.parse().unwrap()))
            .unwrap_or_else(|e| panic!("pool {pool}: {e}"));
        udp_both_ways(&s, server, client);
    }
    s.dp.set_peer_pool_v4(None).expect("remove the pool");
    udp_both_ways(&s, server, client);
}
