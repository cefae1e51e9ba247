//! The kernel programs see what the WireGuard tunnel decrypts: the TC programs attached to the
//! agent's tunnel device count a `wireguard-go` peer's traffic under its dataplane peer id —
//! UDP datagrams exactly (N × (S + 28) bytes of IPv4, N × (S + 48) of IPv6, each way), TCP as
//! the device's own counters. The tunnel runs as the daemon runs it (`DEFAULT_OFFLOAD`).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use capybara_agent::{dataplane::Dataplane, net::Cidr, tunnel::DEFAULT_OFFLOAD};
use capybara_common::{
    counters::{TC_IN_MALFORMED, TC_IN_UNKNOWN_PEER, TC_OUT_MALFORMED, TC_OUT_UNKNOWN_PEER},
    peer::PeerStats,
};
use capybara_tests::{
    netns::BpffsDir,
    traffic::{IfCounters, UdpSink, tcp_transfer, udp_overhead},
    wg::{WgLab, ping_until},
};

use crate::e2e_support::{WAIT, attach_tc, open_dataplane, send_paced};

const PEER: u32 = 11;

/// Fields drop in order: the dataplane, the lab, the pin dir.
struct Setup {
    dp: Dataplane,
    lab: WgLab,
    _pins: BpffsDir,
}

fn setup(net: u8) -> Setup {
    let pins = BpffsDir::new();
    let lab = WgLab::new(net, 1, true, DEFAULT_OFFLOAD);
    let mut dp = open_dataplane(&pins);
    attach_tc(&mut dp, &lab.server, lab.tunnel.name());
    let c = &lab.clients[0];
    dp.add_peer(PEER, &[Cidr::host(c.v4), Cidr::host(c.v6)])
        .expect("add dataplane peer");
    assert!(
        ping_until(&c.ns, lab.v4, WAIT),
        "no ping through the tunnel"
    );
    Setup {
        dp,
        lab,
        _pins: pins,
    }
}

fn peer(dp: &Dataplane) -> PeerStats {
    dp.peer_stats(PEER).expect("read peer stats")
}

fn udp_exact(s: &Setup, server: IpAddr, client: IpAddr) {
    let (n, size) = (200u64, 1000usize);
    let c = &s.lab.clients[0];

    let sink = UdpSink::start(&s.lab.server, SocketAddr::new(server, 0));
    let before = peer(&s.dp);
    send_paced(&c.ns, client, sink.addr(), n, size);
    assert_eq!(
        sink.wait_for(n, WAIT),
        n,
        "UDP {client} → {server} lost datagrams"
    );
    let after = peer(&s.dp);
    let bytes = n * (size as u64 + udp_overhead(&sink.addr()));
    assert_eq!(
        (
            after.rx_packets - before.rx_packets,
            after.rx_bytes - before.rx_bytes
        ),
        (n, bytes),
        "the kernel's count of what the tunnel decrypted, {client} → {server}"
    );

    let back = UdpSink::start(&c.ns, SocketAddr::new(client, 0));
    let before = peer(&s.dp);
    send_paced(&s.lab.server, server, back.addr(), n, size);
    assert_eq!(
        back.wait_for(n, WAIT),
        n,
        "UDP {server} → {client} lost datagrams"
    );
    let after = peer(&s.dp);
    assert_eq!(
        (
            after.tx_packets - before.tx_packets,
            after.tx_bytes - before.tx_bytes
        ),
        (n, bytes),
        "the kernel's count of what the tunnel encrypted, {server} → {client}"
    );
}

#[test]
fn udp_through_wireguard_is_counted_exactly_ipv4_and_ipv6() {
    let s = setup(74);
    let c = &s.lab.clients[0];
    udp_exact(&s, s.lab.v4, c.v4);
    udp_exact(&s, s.lab.v6, c.v6);
    let st = peer(&s.dp);
    assert_eq!(st.drops, [0; 16], "no drops expected: {st:?}");
}

#[test]
fn tcp_through_wireguard_matches_the_device_counters() {
    let s = setup(76);
    let c = &s.lab.clients[0];
    let ifname = s.lab.tunnel.name().to_owned();
    let quiet = Duration::from_millis(300);
    let (up, down) = (4_000_000u64, 1_500_000u64);
    let if_before = IfCounters::settled(&s.lab.server, &ifname, quiet, WAIT);
    let before = peer(&s.dp);
    let g_before = s.dp.counters().expect("read counters");
    let r = tcp_transfer(
        &s.lab.server,
        SocketAddr::new(s.lab.v4, 0),
        &c.ns,
        up,
        down,
        Duration::from_secs(20),
    );
    assert_eq!((r.server_received, r.client_received), (up, down));
    let ifd = IfCounters::settled(&s.lab.server, &ifname, quiet, WAIT).since(&if_before);
    let after = peer(&s.dp);
    let g = s.dp.counters().expect("read counters");
    let other = |slots: [u32; 2]| {
        slots.iter().fold((0u64, 0u64), |(p, b), &slot| {
            let (x, y) = (g.get(slot), g_before.get(slot));
            (p + x.packets - y.packets, b + x.bytes - y.bytes)
        })
    };
    let (in_p, in_b) = other([TC_IN_UNKNOWN_PEER, TC_IN_MALFORMED]);
    let (out_p, out_b) = other([TC_OUT_UNKNOWN_PEER, TC_OUT_MALFORMED]);
    let (rx_p, rx_b) = (
        after.rx_packets - before.rx_packets,
        after.rx_bytes - before.rx_bytes,
    );
    let (tx_p, tx_b) = (
        after.tx_packets - before.tx_packets,
        after.tx_bytes - before.tx_bytes,
    );
    let ctx = format!(
        "peer rx {rx_p} pkts {rx_b} B, tx {tx_p} pkts {tx_b} B; device {ifd:?}; \
         no peer's: in {in_p}/{in_b}, out {out_p}/{out_b}"
    );
    assert!(
        rx_b > up && tx_b > down,
        "counters below the payload: {ctx}"
    );
    assert_eq!(
        (rx_p, rx_b),
        (ifd.rx_packets - in_p, ifd.rx_bytes - in_b),
        "{ctx}"
    );
    assert_eq!(
        (tx_p, tx_b),
        (ifd.tx_packets - out_p, ifd.tx_bytes - out_b),
        "{ctx}"
    );
    // The tunnel's own count (WireGuard datagrams) is above the inner bytes by its overhead.
    let wg = s.lab.tunnel.peer(&c.wg.public_key()).unwrap();
    assert!(wg.rx_bytes > rx_b && wg.tx_bytes > tx_b, "{wg:?} vs {ctx}");
}
