//! Shared setup of the end-to-end tests (the `e2e_*` and `geo` modules): open the dataplane on a
//! private pin dir, attach it inside a namespace.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use capybara_agent::{
    blocklist::{Direction, ListName},
    dataplane::{Dataplane, DataplaneConfig, Event, EventStream},
    net::Cidr,
    service::domain::ClientConfig,
};
use capybara_common::{counters::Counter, drop::DropReason, peer::PeerId, quota::BucketId};
use capybara_tests::{
    netns::{BpffsDir, NetNs, VethPair},
    traffic::send_udp,
    tunwire::TunWire,
    wg::{Implementation, WgProcess, ping},
};

/// How long a test waits for traffic that should arrive.
pub const WAIT: Duration = Duration::from_secs(5);

/// Opens the dataplane with its maps pinned in `pins` (fresh maps, or the ones pinned there by
/// an earlier open: that is how a restart re-uses them). `tunnel_l2_hlen` is 0 for a TUN device.
pub fn open_dataplane(pins: &BpffsDir) -> Dataplane {
    Dataplane::open(DataplaneConfig {
        bpffs_dir: pins.path().to_owned(),
        tunnel_l2_hlen: 0,
    })
    .unwrap_or_else(|e| panic!("Dataplane::open on {}: {e}", pins.path().display()))
}

/// Attaches the TC programs to the tunnel device `ifname` of namespace `ns` (attaching resolves
/// the interface in the calling thread's namespace, so it runs on a thread inside `ns`).
pub fn attach_tc(dp: &mut Dataplane, ns: &NetNs, ifname: &str) {
    ns.run(|| dp.attach_tc(ifname))
        .unwrap_or_else(|e| panic!("attach TC to {ifname} in {}: {e}", ns.name()));
}

/// Attaches the XDP guard to `ifname` of namespace `ns`.
pub fn attach_xdp(dp: &mut Dataplane, ns: &NetNs, ifname: &str) {
    ns.run(|| dp.attach_xdp(ifname))
        .unwrap_or_else(|e| panic!("attach XDP to {ifname} in {}: {e}", ns.name()));
}

/// Parses a CIDR (test constants; panics on a typo).
pub fn cidr(s: &str) -> Cidr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad CIDR {s:?} in a test: {e}"))
}

/// A list name (test constants).
pub fn list(name: &str) -> ListName {
    ListName::parse(name).unwrap_or_else(|e| panic!("bad list name {name:?}: {e}"))
}

/// The id the dataplane gave list `name` of `direction`.
pub fn list_id(dp: &Dataplane, direction: Direction, name: &ListName) -> u32 {
    dp.list_id(direction, name)
        .unwrap_or_else(|| panic!("no {direction} list {name} in the dataplane"))
}

/// Two namespaces joined by a TUN wire (`a` the server, `b` the peer), the dataplane attached to
/// the server's device, and one peer whose allowed IPs are the peer device's IPv4 and IPv6
/// addresses. Fields drop in declaration order: the dataplane first, the pin dir last.
pub struct TunPeer {
    /// The dataplane, TC programs attached to `wire.a`.
    pub dp: Dataplane,
    /// The wire between the namespaces.
    pub wire: TunWire,
    /// The peer's namespace.
    pub b: NetNs,
    /// The server's namespace.
    pub a: NetNs,
    _pins: BpffsDir,
}

/// Sets up a [`TunPeer`] on `10.<net>.0.0/24` with peer id `peer`.
pub fn tun_peer(net: u8, peer: PeerId) -> TunPeer {
    let pins = BpffsDir::new();
    let a = NetNs::new("a");
    let b = NetNs::new("b");
    let wire = TunWire::new(&a, &b, net);
    let mut dp = open_dataplane(&pins);
    attach_tc(&mut dp, &a, &wire.a.ifname);
    dp.add_peer(
        peer,
        &[
            Cidr::host(IpAddr::V4(wire.b.v4)),
            Cidr::host(IpAddr::V6(wire.b.v6)),
        ],
    )
    .expect("add peer");
    TunPeer {
        dp,
        wire,
        b,
        a,
        _pins: pins,
    }
}

/// The quota events `events` delivers (of `bucket` only, when given): waits up to [`WAIT`] for
/// each of the first three (80, 90, 100 %), then 500 ms for any extra, so that a duplicate shows.
pub async fn quota_events(events: &mut EventStream, bucket: Option<BucketId>) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        let wait = if out.len() < 3 {
            WAIT
        } else {
            Duration::from_millis(500)
        };
        match tokio::time::timeout(wait, events.next()).await {
            Ok(e) => {
                let e = e.expect("read an event");
                if let Event::Quota { bucket: b, .. } = e
                    && bucket.is_none_or(|want| want == b)
                {
                    out.push(e);
                }
            }
            Err(_) => return out,
        }
    }
}

/// `a - b` as (packets, bytes).
pub fn sub(a: Counter, b: Counter) -> (u64, u64) {
    (a.packets - b.packets, a.bytes - b.bytes)
}

/// Sends `n` datagrams in bursts of 20 with a pause between them: this wireguard-go (2022) reads
/// its UDP socket one datagram at a time with the default 208 KiB receive buffer (about 90
/// datagrams, `UdpRcvbufErrors` beyond), and on two shared cores it cannot keep up with a
/// server that sends in batches.
pub fn send_paced(ns: &NetNs, from: IpAddr, to: SocketAddr, n: u64, size: usize) {
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(20);
        send_udp(ns, Some(from), to, k, size);
        sent += k;
        std::thread::sleep(Duration::from_millis(4));
    }
}

/// A `wireguard-go` client with an agent-generated config, in a namespace of its own linked to
/// the server's by a veth (`10.<link>.0.0/24`); it reaches the server's tunnel subnets
/// `10.<net>.1.0/24` and `fd01:<net>::/64` (what `ServiceConfig::for_tests` pools give), with a
/// one-second keepalive. Fields drop in declaration order: the client, the link, the namespace.
pub struct GeneratedClient {
    /// The client process (`None` once a test has stopped it).
    pub wg: Option<WgProcess>,
    _veth: VethPair,
    /// The client's namespace.
    pub ns: NetNs,
    /// The device's tunnel IPv4 address.
    pub v4: IpAddr,
}

impl GeneratedClient {
    /// Starts the client for `cfg` against the tunnel listening on `port` in `server`.
    pub fn start(server: &NetNs, port: u16, net: u8, link: u8, cfg: &ClientConfig) -> Self {
        let ns = NetNs::new("c");
        let veth = VethPair::new(server, &ns, link);
        let wg = WgProcess::start(&ns, Implementation::WireguardGo, "c");
        let endpoint = SocketAddr::new(IpAddr::V4(veth.a.v4), port);
        wg.setconf(&format!(
            "[Interface]\nPrivateKey = {}\n\n[Peer]\nPublicKey = {}\nEndpoint = {endpoint}\n\
             AllowedIPs = 10.{net}.1.0/24, fd01:{net:x}::/64\nPersistentKeepalive = 1\n",
            cfg.private_key.as_deref().expect("a new device's key"),
            cfg.server_public_key,
        ));
        wg.up(
            &ns,
            &[
                &format!("{}/24", cfg.peer.ipv4),
                &format!("{}/64", cfg.peer.ipv6),
            ],
        );
        GeneratedClient {
            wg: Some(wg),
            _veth: veth,
            ns,
            v4: IpAddr::V4(cfg.peer.ipv4),
        }
    }

    /// Three pings to `to`, none answered.
    pub fn dropped(&self, to: IpAddr) -> bool {
        (0..3).all(|_| !ping(&self.ns, to))
    }
}

/// The drops of peer `id` for `reason`, summed over CPUs.
pub fn peer_drops(dp: &Mutex<Dataplane>, id: PeerId, reason: DropReason) -> u64 {
    dp.lock().unwrap().peer_stats(id).expect("peer stats").drops[reason as usize]
}
