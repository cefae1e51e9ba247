//! The real `capybara-agent` killed with SIGKILL and started again: kernel counters are intact
//! (not reset) and enforcement never lapsed while it was down.
//!
//! The agent runs in the server namespace (`--netns`, so its pins stay on the host's bpffs) with
//! the server's veth end as its uplink (XDP guard on the WireGuard port) and its own tunnel
//! device. The test prepares what an admin would have configured before: a peer in the pinned
//! peer table and a `manual` source list holding a blocked client address, saved in the agent's
//! store as the agent itself saves it. Traffic:
//! - UDP from the server to the peer's inner address leaves through the agent's tunnel device
//!   (TC egress): the peer's `tx_*` counters count it exactly;
//! - UDP from a blocked client source to the WireGuard port is dropped by the XDP guard.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use capybara_agent::{
    blocklist::Direction,
    dataplane::Dataplane,
    net::Cidr,
    store::{Cf, Store, keys::BLOCKLISTS},
};
use capybara_common::{
    counters::{Counter, XDP_DROP_BLOCKLIST},
    peer::PeerStats,
};
use capybara_tests::{
    agent_proc,
    netns::{BpffsDir, NetNs, VethPair, unique_name},
    traffic::{UDP4_OVERHEAD, send_udp},
};
use nix::sys::signal::Signal;

use crate::e2e_support::{WAIT, list, list_id, open_dataplane};

const PEER: u32 = 5;
const PORT: u16 = 51820;
const N: u64 = 100;
const SIZE: usize = 200;

/// One running agent process; its pid is owned by the namespace guard (killed on drop).
struct Agent {
    pid: u32,
    log: PathBuf,
}

fn start_agent(
    bin: &Path,
    ns: &NetNs,
    uplink: &str,
    tunnel: &str,
    data: &Path,
    pins: &Path,
    run: u32,
) -> Agent {
    let log = data.parent().unwrap().join(format!("agent-{run}.log"));
    let mut cmd = Command::new(bin);
    cmd.args(["--netns", ns.name(), "--uplink", uplink, "--tunnel", tunnel])
        .args([
            "--tunnel-ipv4",
            "10.81.0.1/24",
            "--tunnel-ipv6",
            "fd00:81::1/64",
        ])
        .args(["--listen-port", &PORT.to_string()])
        .arg("--data-dir")
        .arg(data)
        .arg("--bpffs")
        .arg(pins)
        // No control socket: the host's `/run/capybara` belongs to a real agent, not a test.
        .arg("--no-api-socket")
        // The peer is configured in the pinned maps only (outside the agent's store): kept.
        .arg("--keep-unknown-peers");
    let pid = agent_proc::start_agent(ns, cmd, &log, Duration::from_secs(20));
    Agent { pid, log }
}

fn peer(dp: &Dataplane) -> PeerStats {
    dp.peer_stats(PEER).expect("read peer stats")
}

struct Enforcement {
    drops: Counter,
    hits: Counter,
}

fn enforcement(dp: &Dataplane, id: u32) -> Enforcement {
    Enforcement {
        drops: dp.counters().expect("counters").get(XDP_DROP_BLOCKLIST),
        hits: dp.list_hits(id).expect("list hits"),
    }
}

/// UDP datagrams namespace `ns`'s IPv4 stack took in: delivered to a socket (`InDatagrams`,
/// counted when read), refused by a full socket (`InErrors`) or for a closed port (`NoPorts`).
/// The WireGuard port is the agent's own socket while it runs, so the test counts there
/// instead of binding a receiver of its own.
fn udp_arrived(ns: &NetNs) -> u64 {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap_or(""), udp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| matches!(*n, "InDatagrams" | "InErrors" | "NoPorts"))
        .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
        .sum()
}

/// Blocked client → WireGuard port: nothing arrives, exactly N counted as dropped and as hits.
fn assert_blocked(dp: &Dataplane, id: u32, a: &NetNs, b: &NetNs, server: Ipv4Addr, when: &str) {
    let before = enforcement(dp, id);
    let arrived = udp_arrived(a);
    let to = SocketAddr::new(IpAddr::V4(server), PORT);
    send_udp(b, Some(IpAddr::from(BLOCKED)), to, N, SIZE);
    std::thread::sleep(Duration::from_millis(300));
    let got = udp_arrived(a) - arrived;
    assert_eq!(got, 0, "blocked datagrams arrived {when}");
    let after = enforcement(dp, id);
    let frame = SIZE as u64 + UDP4_OVERHEAD + 14;
    assert_eq!(
        (
            after.drops.packets - before.drops.packets,
            after.drops.bytes - before.drops.bytes
        ),
        (N, N * frame),
        "xdp_drop_blocklist {when}"
    );
    assert_eq!(
        (
            after.hits.packets - before.hits.packets,
            after.hits.bytes - before.hits.bytes
        ),
        (N, N * frame),
        "list hits {when}"
    );
}

/// Server → peer through the agent's tunnel device: the peer's tx counters grow by exactly N.
fn assert_tunnel_counted(dp: &Dataplane, a: &NetNs, when: &str) {
    let before = peer(dp);
    send_udp(
        a,
        None,
        SocketAddr::new(IpAddr::from(PEER_ADDR), 9),
        N,
        SIZE,
    );
    // The datagrams are counted by TC egress synchronously with the send.
    let after = peer(dp);
    assert_eq!(
        after.tx_packets - before.tx_packets,
        N,
        "peer tx packets {when}"
    );
    assert_eq!(
        after.tx_bytes - before.tx_bytes,
        N * (SIZE as u64 + UDP4_OVERHEAD),
        "peer tx bytes {when}"
    );
}

const BLOCKED: Ipv4Addr = Ipv4Addr::new(10, 82, 0, 99);
const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 81, 0, 2);

#[test]
fn sigkilled_agent_restarts_with_counters_intact_and_enforcement_never_lapses() {
    let bin = agent_proc::agent_crate_binary("capybara-agent");
    let pins = BpffsDir::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let a = NetNs::new("a");
    let b = NetNs::new("b");
    let veth = VethPair::new(&a, &b, 82);
    b.add_addr(&veth.b.ifname, &format!("{BLOCKED}/24"));
    let tunnel = unique_name("cp");

    // What the admin configured earlier: the peer (pinned maps) and the manual list (pinned maps
    // and the agent's store, exactly as the agent persists it).
    let manual = list("manual");
    let id = {
        let mut dp = open_dataplane(&pins);
        dp.add_peer(PEER, &[Cidr::host(IpAddr::from(PEER_ADDR))])
            .expect("add peer");
        dp.list_add(
            Direction::Source,
            &manual,
            &[Cidr::host(IpAddr::from(BLOCKED))],
        )
        .expect("block the client");
        let id = list_id(&dp, Direction::Source, &manual);
        let store = Store::open(&data).expect("open the agent's store");
        store
            .put(Cf::Blocklists, BLOCKLISTS, &dp.list_snapshot())
            .expect("save the lists");
        id
    };

    let agent = start_agent(&bin, &a, &veth.a.ifname, &tunnel, &data, pins.path(), 1);
    let dp = open_dataplane(&pins); // a second handle on the pinned maps, for reading
    assert_tunnel_counted(&dp, &a, "with the first agent");
    assert_blocked(&dp, id, &a, &b, veth.a.v4, "with the first agent");
    // A clean client still reaches the WireGuard port (the agent's tunnel reads, and drops, the
    // datagrams: they are no WireGuard messages).
    let arrived = udp_arrived(&a);
    let to = SocketAddr::new(IpAddr::V4(veth.a.v4), PORT);
    send_udp(&b, Some(IpAddr::V4(veth.b.v4)), to, N, SIZE);
    let end = Instant::now() + WAIT;
    while udp_arrived(&a) - arrived < N && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        udp_arrived(&a) - arrived,
        N,
        "clean client with the first agent"
    );

    let peer_before_kill = peer(&dp);
    let enf_before_kill = enforcement(&dp, id);
    a.kill(agent.pid, Signal::SIGKILL);
    assert!(!a.is_running(agent.pid));

    // While no agent runs: counters unchanged, the guard still enforcing.
    assert_eq!(
        peer(&dp),
        peer_before_kill,
        "peer counters changed when the agent died"
    );
    let e = enforcement(&dp, id);
    assert_eq!(
        (e.drops, e.hits),
        (enf_before_kill.drops, enf_before_kill.hits)
    );
    assert_blocked(&dp, id, &a, &b, veth.a.v4, "while the agent is down");
    let enf_before_restart = enforcement(&dp, id);

    let agent2 = start_agent(&bin, &a, &veth.a.ifname, &tunnel, &data, pins.path(), 2);
    let log = std::fs::read_to_string(&agent2.log).unwrap_or_default();
    let p = peer(&dp);
    assert_eq!(
        p, peer_before_kill,
        "peer counters after the restart differ (reset?)\nagent log:\n{log}"
    );
    let e = enforcement(&dp, id);
    assert_eq!(
        (e.drops, e.hits),
        (enf_before_restart.drops, enf_before_restart.hits),
        "drop counters after the restart differ (reset?)\nagent log:\n{log}"
    );
    assert!(
        p.tx_packets >= N,
        "the peer's earlier traffic is gone: {p:?}"
    );

    assert_tunnel_counted(&dp, &a, "after the restart");
    assert_blocked(&dp, id, &a, &b, veth.a.v4, "after the restart");
    let p = peer(&dp);
    assert_eq!(
        p.tx_packets,
        peer_before_kill.tx_packets + N,
        "counters did not continue from where they were"
    );
    a.kill(agent2.pid, Signal::SIGTERM);
}
