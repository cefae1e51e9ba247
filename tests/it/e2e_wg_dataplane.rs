//! The kernel programs see what the WireGuard tunnel decrypts: the TC programs attached to the
//! agent's tunnel device count a `wireguard-go` peer's traffic under its dataplane peer id —
//! UDP datagrams exactly (N × (S + 28) bytes of IPv4, N × (S + 48) of IPv6, each way), TCP as
//! what crossed the tunnel. The tunnel runs as the daemon runs it (`DEFAULT_OFFLOAD`: offloads
//! on), so the device carries super-packets both ways — UDP bursts and TCP coalesced by the
//! tunnel's GRO, TCP super-segments from the stack — and every test checks that it did (fewer
//! skbs on the device than packets counted). The reference for TCP is the client's device:
//! wireguard-go 0.0.20220316 opens it without offloads, one count per IP packet; a datagram
//! its socket (or the server's) drops is read from `/proc/net/snmp`. A quota on coalesced UDP
//! is overrun by at most one super-packet per CPU, and what passed is what was charged.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use capybara_agent::{dataplane::Dataplane, net::Cidr, tunnel::DEFAULT_OFFLOAD};
use capybara_common::{
    counters::{TC_IN_MALFORMED, TC_IN_UNKNOWN_PEER, TC_OUT_MALFORMED, TC_OUT_UNKNOWN_PEER},
    drop::DropReason,
    peer::PeerStats,
};
use capybara_tests::{
    netns::{BpffsDir, NetNs},
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

    let ifname = s.lab.tunnel.name();
    let sink = UdpSink::start(&s.lab.server, SocketAddr::new(server, 0));
    let before = peer(&s.dp);
    let if_before = IfCounters::read(&s.lab.server, ifname);
    send_paced(&c.ns, client, sink.addr(), n, size);
    assert_eq!(
        sink.wait_for(n, WAIT),
        n,
        "UDP {client} → {server} lost datagrams"
    );
    let after = peer(&s.dp);
    let ifd = IfCounters::read(&s.lab.server, ifname).since(&if_before);
    // The bursts of 20 (`send_paced`) arrive coalesced (UDP GRO in the tunnel): fewer skbs
    // entered the server's device than datagrams crossed.
    assert!(
        ifd.rx_packets < n,
        "no coalesced skbs, {client} → {server}: {ifd:?}"
    );
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

/// UDP datagrams `ns` dropped on receipt (`/proc/net/snmp` `Udp: InErrors`, which counts the
/// receive-buffer overflows too): a WireGuard datagram lost between the two ends.
fn udp_errors(ns: &NetNs) -> u64 {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InErrors")
        .map_or(0, |(_, v)| v.parse::<u64>().unwrap())
}

/// `counted` (packets, bytes) against what one end saw, `seen`, when `lost` WireGuard datagrams
/// (one inner packet each, at most `mtu` bytes) went missing between the count and that end:
/// `counted` is `seen` plus the lost packets — exactly `seen` when nothing was lost.
fn matches_with_loss(counted: (u64, u64), seen: (u64, u64), lost: u64, mtu: u64) -> bool {
    counted.0 == seen.0 + lost && (seen.1..=seen.1 + lost * mtu).contains(&counted.1)
}

/// A TCP transfer both ways between the server's `server` address and the client: the peer's
/// counters equal what crossed the tunnel, read on the client's own TUN device — wireguard-go
/// 0.0.20220316 opens it without offloads, so its counters are one per IP packet, while the
/// server's device (offloads on) counts coalesced skbs. What the programs attributed to no
/// peer (nothing, here) is read from the global counters so the identity is exact.
fn tcp_exact(s: &Setup, server: IpAddr) {
    let c = &s.lab.clients[0];
    let ifname = s.lab.tunnel.name().to_owned();
    let quiet = Duration::from_millis(300);
    let (up, down) = (4_000_000u64, 1_500_000u64);
    let (server_errors, client_errors) = (udp_errors(&s.lab.server), udp_errors(&c.ns));
    let client_before = IfCounters::settled(&c.ns, &c.wg.ifname, quiet, WAIT);
    let if_before = IfCounters::read(&s.lab.server, &ifname);
    let before = peer(&s.dp);
    let g_before = s.dp.counters().expect("read counters");
    let r = tcp_transfer(
        &s.lab.server,
        SocketAddr::new(server, 0),
        &c.ns,
        up,
        down,
        Duration::from_secs(20),
    );
    assert_eq!((r.server_received, r.client_received), (up, down));
    let client = IfCounters::settled(&c.ns, &c.wg.ifname, quiet, WAIT).since(&client_before);
    let ifd = IfCounters::read(&s.lab.server, &ifname).since(&if_before);
    // Lost on the way in (at the server's socket) and out (at the client's: wireguard-go
    // 0.0.20220316 reads one datagram per syscall and drops a few of a fast TCP burst).
    let lost_in = udp_errors(&s.lab.server) - server_errors;
    let lost_out = udp_errors(&c.ns) - client_errors;

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
        "{server}: peer rx {rx_p} pkts {rx_b} B, tx {tx_p} pkts {tx_b} B; client device \
         {client:?}; server device {ifd:?}; no peer's: in {in_p}/{in_b}, out {out_p}/{out_b}; \
         WireGuard datagrams lost in {lost_in}, out {lost_out}"
    );
    eprintln!("{ctx}");
    assert!(
        rx_b > up && tx_b > down,
        "counters below the payload: {ctx}"
    );
    // Offloads on: the server's device saw super-packets both ways (fewer skbs than packets),
    // so the identity below is the GSO accounting's, not one skb per packet.
    assert!(
        ifd.rx_packets < rx_p && ifd.tx_packets < tx_p,
        "no coalesced skbs: {ctx}"
    );
    // From the peer: what the client sent into the tunnel, less what was lost before the
    // server's device. To the peer: what the client received, plus what was lost after it.
    let mtu = 1420;
    assert!(
        matches_with_loss(
            (client.tx_packets, client.tx_bytes),
            (rx_p + in_p, rx_b + in_b),
            lost_in,
            mtu
        ),
        "from the peer: {ctx}"
    );
    assert!(
        matches_with_loss(
            (tx_p, tx_b),
            (client.rx_packets, client.rx_bytes),
            lost_out,
            mtu
        ),
        "to the peer: {ctx}"
    );
    // The tunnel's own count (WireGuard datagrams) is above the inner bytes by its overhead.
    let wg = s.lab.tunnel.peer(&c.wg.public_key()).unwrap();
    assert!(wg.rx_bytes > rx_b && wg.tx_bytes > tx_b, "{wg:?} vs {ctx}");
}

#[test]
fn tcp_through_wireguard_matches_what_crossed_ipv4_and_ipv6() {
    let s = setup(76);
    tcp_exact(&s, s.lab.v4);
    tcp_exact(&s, s.lab.v6);
    let st = peer(&s.dp);
    assert_eq!(st.drops, [0; 16], "no drops expected: {st:?}");
}

/// A data quota on super-packets, end to end: UDP bursts from the peer arrive coalesced (UDP
/// GRO in the tunnel), and the quota step charges each super-packet whole. The bucket is
/// overrun by at most one super-packet (≤ 64 KiB) per CPU; what passed is exactly what was
/// charged and counted, and every datagram that did not arrive is a counted quota drop.
#[test]
fn quota_on_coalesced_udp_overruns_by_at_most_one_super_packet_per_cpu() {
    const BUCKET: u32 = 5;
    const LIMIT: u64 = 1_000_000;
    const SUPER_PACKET: u64 = 65_536;
    let mut s = setup(96);
    s.dp.set_quota_limit(BUCKET, LIMIT).expect("create bucket");
    s.dp.assign_quota(PEER, Some(BUCKET))
        .expect("assign bucket");
    let c = &s.lab.clients[0];
    let errors_before = udp_errors(&s.lab.server);

    // 2 MB in bursts of 20 datagrams: twice the budget.
    let (n, size) = (2_000u64, 1000usize);
    let ifname = s.lab.tunnel.name();
    let sink = UdpSink::start(&s.lab.server, SocketAddr::new(s.lab.v4, 0));
    let ip_len = size as u64 + udp_overhead(&sink.addr());
    let used_before = s.dp.quota_usage(BUCKET).unwrap().used_bytes;
    let before = peer(&s.dp);
    let if_before = IfCounters::read(&s.lab.server, ifname);
    send_paced(&c.ns, c.v4, sink.addr(), n, size);
    let got = sink.settle(Duration::from_millis(500), WAIT);
    let lost = udp_errors(&s.lab.server) - errors_before;
    let ifd = IfCounters::read(&s.lab.server, ifname).since(&if_before);
    let usage = s.dp.quota_usage(BUCKET).unwrap();
    let after = peer(&s.dp);
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    let drops = after.drops[DropReason::QuotaExhausted as usize]
        - before.drops[DropReason::QuotaExhausted as usize];
    let (rx_p, rx_b) = (
        after.rx_packets - before.rx_packets,
        after.rx_bytes - before.rx_bytes,
    );
    let ctx = format!(
        "{got} of {n} datagrams delivered ({ip_len} B each), bucket {usage:?} \
         ({used_before} charged before), peer rx {rx_p}/{rx_b}, quota drops {drops}, \
         UDP datagrams lost {lost}, server device {ifd:?}, {cpus} CPUs"
    );
    eprintln!("{ctx}");
    assert!(ifd.rx_packets < n, "no coalesced skbs: {ctx}");
    assert!(usage.exhausted(), "the budget was not spent: {ctx}");
    assert!(
        usage.used_bytes <= LIMIT + cpus * SUPER_PACKET,
        "charged past the limit by more than one super-packet per CPU: {ctx}"
    );
    assert_eq!(
        (rx_p, rx_b),
        (got, got * ip_len),
        "what passed is what arrived: {ctx}"
    );
    assert_eq!(
        usage.used_bytes - used_before,
        rx_b,
        "what passed is what was charged: {ctx}"
    );
    assert_eq!(
        drops + lost,
        n - got,
        "every datagram that did not arrive is a counted quota drop (or lost before the \
         tunnel: counted as UDP errors): {ctx}"
    );
}

/// Shaping on super-packets: a peer limited to 20 Mbit/s each way gets 0.85–1.02 × that (the
/// median second, as `e2e_shape` measures it) through the offloading tunnel. HTB queues each
/// super-packet whole and charges it its segments' bytes (`qdisc_pkt_len`), on the tunnel
/// device (to the peer) and on the shaping device the ingress program redirects to (from it).
#[test]
fn shaping_holds_its_rate_on_super_packets_both_ways() {
    use capybara_agent::{dataplane::PeerRates, units::Rate};
    use capybara_common::counters::{TC_IN_SHAPED, TC_OUT_SHAPED};
    use capybara_tests::iperf::{self, IperfTcp};

    let mut s = setup(100);
    let rate = Rate::mbit(20).unwrap();
    s.dp.set_rates(
        PEER,
        PeerRates {
            to_peer: Some(rate),
            from_peer: Some(rate),
        },
    )
    .expect("set rates");
    let c = &s.lab.clients[0];
    let ifname = s.lab.tunnel.name();
    let spec = IperfTcp {
        seconds: 4,
        ..IperfTcp::default()
    };
    for to_peer in [true, false] {
        let g_before = s.dp.counters().expect("read counters");
        let before = peer(&s.dp);
        let if_before = IfCounters::read(&s.lab.server, ifname);
        let r = if to_peer {
            iperf::tcp(&s.lab.server, &c.ns, c.v4, &spec)
        } else {
            iperf::tcp(&c.ns, &s.lab.server, s.lab.v4, &spec)
        };
        let ifd = IfCounters::read(&s.lab.server, ifname).since(&if_before);
        let after = peer(&s.dp);
        let g = s.dp.counters().expect("read counters");
        let (slot, packets, skbs) = if to_peer {
            (
                TC_OUT_SHAPED,
                after.tx_packets - before.tx_packets,
                ifd.tx_packets,
            )
        } else {
            (
                TC_IN_SHAPED,
                after.rx_packets - before.rx_packets,
                ifd.rx_packets,
            )
        };
        let shaped = g.get(slot).packets - g_before.get(slot).packets;
        let bps = rate.bits_per_sec() as f64;
        let (ratio, median) = (r.received_bps / bps, r.received_median_second_bps / bps);
        let ctx = format!(
            "to peer {to_peer}: {:.2} Mbit/s = {ratio:.3} × {rate} (median second {median:.3} ×), \
             {shaped} packets shaped, {packets} counted in {skbs} skbs, {} retransmits",
            r.received_bps / 1e6,
            r.retransmits
        );
        eprintln!("{ctx}");
        assert!(skbs < packets, "no super-packets: {ctx}");
        assert_eq!(
            shaped, packets,
            "every packet of the peer went through its class: {ctx}"
        );
        assert!((0.85..=1.02).contains(&median), "{ctx}");
        assert!(ratio <= 1.02, "{ctx}");
    }
}
