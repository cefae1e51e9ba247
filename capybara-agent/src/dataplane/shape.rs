//! Bandwidth shaping per peer and direction: HTB classes selected by the kernel programs.
//!
//! ## Design (kernel side: `capybara_common::shape`)
//! - **To the peer**: an HTB qdisc (`ca:`) at the root of the tunnel device; each shaped peer has
//!   a class `ca:<minor>` (rate = ceil = the peer's rate) with a byte-limited fifo. TC egress sets
//!   `skb->priority` to the class id; HTB picks the class by it before consulting any filter.
//!   Unshaped traffic carries no class id and goes through HTB's direct queue, unpaced.
//! - **From the peer**: an IFB device `<tunnel>-in` with the same kind of HTB at its root. TC
//!   ingress sets the class id and redirects the packet to the IFB's egress; after shaping,
//!   IFB hands it back to the tunnel device's receive path (TC ingress is not run twice).
//! - Per-peer changes are single class changes over rtnetlink (`RTM_NEWTCLASS`): other classes,
//!   hence other peers, are not touched. Class ids are allocated per direction (`1..=65534`).
//!   The kernel learns a peer's classes from its `PeerInfo`, stored into its hot line after the
//!   classes exist (and before they are deleted), so a packet never names a class that is gone
//!   and then sticks to it: a stale id on the tunnel device falls into the direct queue.
//! - The qdiscs are created on the first shaped peer, so a server without rates keeps the
//!   device's default qdisc and pays nothing.
//!
//! ## Why shaping (HTB), not policing in the program
//! Measured on this machine kind (2 cores, Linux 6.18, no fq), iperf3 TCP for 4 s after 1 s
//! of slow start through the tunnel device of a TUN wire between two namespaces, goodput /
//! configured rate and the sender's retransmits, each direction, for the kernel's default
//! congestion control (bbr) and cubic. The policer was a per-peer token bucket in the TC
//! program (drop when out of tokens; burst max(20 ms, 70 kB) — it must exceed one 64 KiB GSO
//! packet or egress never passes), the same place in the pipeline as the shaping decision:
//!
//! | rate | policer: to peer | policer: from peer (retransmits) | HTB: to peer | HTB: from peer (retransmits) |
//! |---|---|---|---|---|
//! | 5 Mbit/s, bbr | 0.533 | 0.546 (173) | 0.956 | 0.956 (0) |
//! | 5 Mbit/s, cubic | 0.523 | 0.534 (170) | 0.958 | 0.956 (0) |
//! | 50 Mbit/s, bbr | 0.077 | 0.114 (456) | 0.965 | 0.956 (0) |
//! | 50 Mbit/s, cubic | 0.110 | 0.243 (454) | 0.964 | 0.963 (1) |
//!
//! Policing loses 45–92 % of the rate (a drop at the sender's own device counts as local
//! congestion, so "to peer" shows no retransmits but collapses); shaping reaches 0.956–0.965,
//! which is the ceiling: the rate counts IP bytes and TCP's payload is 1448 of every 1500
//! (0.965). HTB it is. (Those HTB figures predate the link-layer compensation below: from the
//! peer, HTB on the IFB also counted the 14-byte header the program pushes, 0.956.)
//!
//! ## Rates are of IP bytes
//! HTB counts `skb->len`, which includes a link-layer header where there is one: on the IFB
//! always (the pushed Ethernet header), on the tunnel device only when it is an Ethernet device
//! (the benchmarks' veth; the agent's TUN has none). A class's HTB rate is therefore the peer's
//! rate scaled by `(mtu + header) / mtu` (`wire_bytes_per_sec`), exact for full-size packets and
//! never above the rate in IP bytes for smaller ones. The MTU is the tunnel device's when shaping
//! starts. Its costs: a qdisc lock on the tunnel device once any peer is shaped
//! (`veth_throughput_ratio` in `cargo xtask bench` measures it) and one IFB hop for traffic
//! from shaped peers.

use std::collections::HashMap;

use capybara_common::{
    peer::{MAX_PEERS, PeerId, PeerInfo},
    shape::{MAX_SHAPE_MINOR, QDISC_HANDLE, class_id},
};

use super::{
    Dataplane, DataplaneError, Result,
    netlink::{
        self, IFLA_IFNAME, IFLA_INFO_KIND, IFLA_LINKINFO, IFLA_MTU, Msg, NLM_F_CREATE, NLM_F_ECHO,
        NLM_F_EXCL, NLM_F_REPLACE, Netlink, RTM_DELLINK, RTM_DELQDISC, RTM_DELTCLASS, RTM_GETLINK,
        RTM_GETTCLASS, RTM_NEWLINK, RTM_NEWQDISC, RTM_NEWTCLASS, TCA_KIND, TCA_OPTIONS,
        TCA_STATS_QUEUE, TCA_STATS2, tcmsg,
    },
};
use crate::units::Rate;

/// A peer's rates; `None` = unlimited in that direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerRates {
    /// Traffic to the peer (the tunnel device's egress).
    pub to_peer: Option<Rate>,
    /// Traffic from the peer (the tunnel device's ingress).
    pub from_peer: Option<Rate>,
}

/// `TC_H_ROOT`.
const TC_H_ROOT: u32 = u32::MAX;
/// `TCA_HTB_*` attributes.
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
/// `TC_HTB_PROTOVER`, the version `tc_htb_glob` must carry.
const HTB_PROTOVER: u32 = 3;
/// `TC_LINKLAYER_ETHERNET`: rates are computed from the packet length as is (no rate table).
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// Nanoseconds per psched tick (`PSCHED_SHIFT` = 6).
const PSCHED_TICK_NS: u64 = 64;

/// Burst of a class: how many bytes may leave back to back at line rate after an idle period:
/// 1 ms of the rate, at least 16 KiB. Not tuned further: with it (and the link-layer
/// compensation) `throttle_accuracy_5m/50m/500m` measured 0.959/0.965/0.959 on the benchmark's
/// veth, against a ceiling of 1448/1500 = 0.965 (TCP payload per IP byte).
fn burst_bytes(rate: Rate) -> u64 {
    (rate.bytes_per_sec() / 1000).max(16 * 1024)
}

/// Byte limit of a class's fifo. It must hold at least one GSO packet (64 KiB: TC egress of the
/// TUN sees them before segmentation) and enough of a queue that TCP keeps the class busy: 50 ms
/// of the rate, at least 256 KiB (≈ 420 ms at 5 Mbit/s: the price of drop-tail without an AQM,
/// which this kernel lacks), at most 64 MiB. Measured with it: 0–1 retransmits per 10 s TCP run
/// to the peer, up to ≈ 100 from the peer at 5 Mbit/s.
fn queue_limit_bytes(rate: Rate) -> u32 {
    (rate.bytes_per_sec() / 20).clamp(256 * 1024, 64 * 1024 * 1024) as u32
}

/// `struct tc_ratespec` for `bytes_per_sec` (clamped to u32; the 64-bit value goes in
/// `TCA_HTB_RATE64`).
fn ratespec(bytes_per_sec: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = TC_LINKLAYER_ETHERNET;
    b[8..12].copy_from_slice(&(bytes_per_sec.min(u32::MAX as u64) as u32).to_ne_bytes());
    b
}

/// `ETH_HLEN`: the header TC ingress pushes on packets it redirects to the IFB.
const ETH_HLEN: u32 = 14;

/// The rate HTB must run at so that full-size packets of `mtu` IP bytes carry `rate` of IP
/// bytes when every packet also has `l2` bytes of link-layer header, which HTB counts.
///
/// A peer's rate is a rate of IP bytes (what its tunnel carries). HTB counts `skb->len`: on the
/// TUN device that is the IP packet, but on the IFB it includes the 14-byte Ethernet header the
/// ingress program pushes, and on an Ethernet tunnel device its header. Without this a peer
/// shaped from its side got 1500/1514 of its rate in IP bytes (goodput 0.956 of it instead of
/// 0.965 on a TUN). Scaling by `(mtu + l2) / mtu` is exact for full-size packets and never lets
/// smaller packets exceed the rate (their header share is larger). HTB's own `overhead` cannot
/// subtract: it is unsigned.
fn wire_bytes_per_sec(rate: Rate, l2: u32, mtu: u32) -> u64 {
    let mtu = u128::from(mtu.max(576));
    let scaled = u128::from(rate.bytes_per_sec()) * (mtu + u128::from(l2)) / mtu;
    scaled.min(u128::from(u64::MAX)) as u64
}

/// The `RTM_NEWTCLASS` request creating or changing class `classid` of the HTB on `ifindex`,
/// for a peer shaped to `rate` whose packets carry `l2` bytes of link-layer header on a device
/// of `mtu` (see [`wire_bytes_per_sec`]).
fn class_msg(ifindex: u32, classid: u32, rate: Rate, l2: u32, mtu: u32) -> Msg {
    let bps = wire_bytes_per_sec(rate, l2, mtu);
    let burst = burst_bytes(rate);
    let buffer_ticks =
        (burst.saturating_mul(1_000_000_000) / bps / PSCHED_TICK_NS).min(u32::MAX as u64) as u32;
    // `struct tc_htb_opt`: rate, ceil, buffer, cbuffer, quantum, level, prio.
    let mut opt = Vec::with_capacity(44);
    opt.extend_from_slice(&ratespec(bps));
    opt.extend_from_slice(&ratespec(bps));
    opt.extend_from_slice(&buffer_ticks.to_ne_bytes());
    opt.extend_from_slice(&buffer_ticks.to_ne_bytes());
    // Quantum only matters between classes borrowing from a parent; these have none. Set
    // explicitly so the kernel does not derive (and warn about) one from the rate.
    let quantum = (bps / 10).clamp(1514, 200_000) as u32;
    opt.extend_from_slice(&quantum.to_ne_bytes());
    opt.extend_from_slice(&0u32.to_ne_bytes());
    opt.extend_from_slice(&0u32.to_ne_bytes());
    let mut m = Msg::new(
        RTM_NEWTCLASS,
        NLM_F_CREATE,
        &tcmsg(ifindex, classid, QDISC_HANDLE),
    );
    m.attr_str(TCA_KIND, "htb").nested(TCA_OPTIONS, |m| {
        m.attr(TCA_HTB_PARMS, &opt);
        if bps > u32::MAX as u64 {
            m.attr(TCA_HTB_RATE64, &bps.to_ne_bytes());
            m.attr(TCA_HTB_CEIL64, &bps.to_ne_bytes());
        }
    });
    m
}

/// The `RTM_NEWQDISC` request giving class `classid` a byte fifo sized for `rate`.
fn leaf_msg(ifindex: u32, classid: u32, rate: Rate) -> Msg {
    let mut m = Msg::new(
        RTM_NEWQDISC,
        NLM_F_CREATE | NLM_F_REPLACE,
        &tcmsg(ifindex, 0, classid),
    );
    // `struct tc_fifo_qopt { __u32 limit; }`, not nested.
    m.attr_str(TCA_KIND, "bfifo")
        .attr(TCA_OPTIONS, &queue_limit_bytes(rate).to_ne_bytes());
    m
}

/// The `RTM_NEWQDISC` request replacing the root qdisc of `ifindex` with an empty HTB.
fn htb_root_msg(ifindex: u32) -> Msg {
    // `struct tc_htb_glob`: version, rate2quantum, defcls (0: unclassified = direct), debug,
    // direct_pkts.
    let mut glob = Vec::with_capacity(20);
    for v in [HTB_PROTOVER, 10, 0, 0, 0] {
        glob.extend_from_slice(&u32::to_ne_bytes(v));
    }
    let mut m = Msg::new(
        RTM_NEWQDISC,
        NLM_F_CREATE | NLM_F_REPLACE,
        &tcmsg(ifindex, QDISC_HANDLE, TC_H_ROOT),
    );
    m.attr_str(TCA_KIND, "htb").nested(TCA_OPTIONS, |m| {
        m.attr(TCA_HTB_INIT, &glob);
    });
    m
}

/// Minors of the classes *from* peers start above this one; those *to* peers are
/// `1..=FROM_PEER_MINOR_BASE`. Disjoint, because a proxy shaping device
/// ([`Dataplane::shape_proxy_device`]) holds both directions' classes in one HTB (a proxied
/// connection's upload and download usually leave by the same uplink). So each direction has
/// 32 767 minors (65 534 each before proxied sockets were shaped).
const FROM_PEER_MINOR_BASE: u16 = 0x7fff;

/// One direction's classes.
#[derive(Debug, Default)]
struct Classes {
    /// Peer → (minor, rate).
    by_peer: HashMap<PeerId, (u16, Rate)>,
    /// Minors released, re-used first.
    free: Vec<u16>,
    /// Next never-used minor.
    next: u16,
    /// Minors are `base + 1 ..= base + FROM_PEER_MINOR_BASE` (0 to peers,
    /// `FROM_PEER_MINOR_BASE` from peers).
    base: u16,
}

impl Classes {
    fn from_peers() -> Classes {
        Classes {
            base: FROM_PEER_MINOR_BASE,
            next: FROM_PEER_MINOR_BASE,
            ..Classes::default()
        }
    }

    fn allocate(&mut self) -> Option<u16> {
        if let Some(m) = self.free.pop() {
            return Some(m);
        }
        let last = u32::from(self.base) + u32::from(FROM_PEER_MINOR_BASE);
        if u32::from(self.next) >= last.min(MAX_SHAPE_MINOR) {
            return None;
        }
        self.next += 1;
        Some(self.next)
    }
}

/// A device proxied traffic leaves by, with an HTB holding every class of both directions
/// ([`Dataplane::shape_proxy_device`]).
#[derive(Debug)]
struct ProxyDevice {
    name: String,
    ifindex: u32,
    mtu: u32,
}

/// The shaping state of one tunnel device (see the module docs).
#[derive(Debug)]
pub(super) struct Shaper {
    /// Bound in the tunnel device's namespace.
    nl: Netlink,
    tunnel: String,
    tunnel_ifindex: u32,
    /// Link-layer header bytes of the tunnel device (0 on the TUN).
    tunnel_l2: u32,
    /// The tunnel device's MTU when shaping started.
    mtu: u32,
    /// The HTB at the tunnel device's root exists.
    tunnel_htb: bool,
    /// The IFB device's index, once created (with its HTB).
    ifb_ifindex: Option<u32>,
    to_peer: Classes,
    from_peer: Classes,
    /// Drops of classes already deleted, per peer (so a peer's count survives rate changes).
    retired_drops: HashMap<PeerId, u64>,
    /// Devices proxied sockets' packets leave by, each with a copy of every class.
    proxy_devices: Vec<ProxyDevice>,
}

/// The IFB device of tunnel device `tunnel` (15 characters at most).
pub fn ifb_name(tunnel: &str) -> String {
    let mut base: String = tunnel.chars().take(12).collect();
    base.push_str("-in");
    base
}

impl Shaper {
    /// A shaper for the tunnel device `tunnel` (`ifindex`, `l2` bytes of link-layer header),
    /// bound to the calling thread's namespace. Creates nothing yet.
    pub(super) fn new(tunnel: &str, ifindex: u32, l2: u32) -> Result<Shaper> {
        let nl = Netlink::open().map_err(|source| DataplaneError::Shape {
            device: tunnel.to_owned(),
            op: "open rtnetlink socket",
            source,
        })?;
        let mut shaper = Shaper {
            nl,
            tunnel: tunnel.to_owned(),
            tunnel_ifindex: ifindex,
            tunnel_l2: l2,
            mtu: 0,
            tunnel_htb: false,
            ifb_ifindex: None,
            to_peer: Classes::default(),
            from_peer: Classes::from_peers(),
            retired_drops: HashMap::new(),
            proxy_devices: Vec::new(),
        };
        shaper.mtu = shaper.link(tunnel)?.1;
        Ok(shaper)
    }

    fn request(&self, device: &str, op: &'static str, msg: Msg) -> Result<Vec<Vec<u8>>> {
        self.nl
            .request(msg)
            .map_err(|source| DataplaneError::Shape {
                device: device.to_owned(),
                op,
                source,
            })
    }

    fn ensure_tunnel_htb(&mut self) -> Result<()> {
        if !self.tunnel_htb {
            let tunnel = self.tunnel.clone();
            self.request(&tunnel, "install HTB", htb_root_msg(self.tunnel_ifindex))?;
            self.tunnel_htb = true;
        }
        Ok(())
    }

    /// Creates (or re-uses) the IFB device, brings it up and installs a fresh HTB on it.
    /// Returns its index.
    fn ensure_ifb(&mut self) -> Result<u32> {
        if let Some(i) = self.ifb_ifindex {
            return Ok(i);
        }
        let name = ifb_name(&self.tunnel);
        let mut create = Msg::new(
            RTM_NEWLINK,
            NLM_F_CREATE | NLM_F_EXCL,
            &netlink::ifinfomsg(0, libc::IFF_UP as u32, libc::IFF_UP as u32),
        );
        create
            .attr_str(IFLA_IFNAME, &name)
            .nested(IFLA_LINKINFO, |m| {
                m.attr_str(IFLA_INFO_KIND, "ifb");
            });
        match self.nl.request(create) {
            Ok(_) => {}
            // Left by an earlier run: re-use it (its old classes go with the new root below).
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(DataplaneError::Shape {
                    device: name,
                    op: "create IFB device",
                    source,
                });
            }
        }
        let (ifindex, _) = self.link(&name)?;
        self.request(
            &name,
            "bring up",
            Msg::new(
                RTM_NEWLINK,
                0,
                &netlink::ifinfomsg(ifindex, libc::IFF_UP as u32, libc::IFF_UP as u32),
            ),
        )?;
        self.request(&name, "install HTB", htb_root_msg(ifindex))?;
        self.ifb_ifindex = Some(ifindex);
        Ok(ifindex)
    }

    /// The index and MTU of device `name`.
    fn link(&self, name: &str) -> Result<(u32, u32)> {
        let mut get = Msg::new(RTM_GETLINK, 0, &netlink::ifinfomsg(0, 0, 0));
        get.attr_str(IFLA_IFNAME, name);
        let answers = self.request(name, "look up", get)?;
        let unknown = || DataplaneError::UnknownInterface {
            ifname: name.to_owned(),
        };
        let answer = answers.first().ok_or_else(unknown)?;
        let index = answer
            .get(4..8)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u32)
            .ok_or_else(unknown)?;
        let mtu = netlink::attrs(answer.get(16..).unwrap_or_default())
            .find(|(ty, _)| *ty == IFLA_MTU)
            .and_then(|(_, v)| v.get(..4))
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(unknown)?;
        Ok((index, mtu))
    }

    /// Creates or changes class `minor` on the device of `to_peer`'s direction.
    fn set_class(&mut self, to_peer: bool, minor: u16, rate: Rate) -> Result<()> {
        let (device, ifindex, l2) = if to_peer {
            self.ensure_tunnel_htb()?;
            (self.tunnel.clone(), self.tunnel_ifindex, self.tunnel_l2)
        } else {
            (ifb_name(&self.tunnel), self.ensure_ifb()?, ETH_HLEN)
        };
        let classid = class_id(minor);
        let class = class_msg(ifindex, classid, rate, l2, self.mtu);
        self.request(&device, "set HTB class", class)?;
        self.request(&device, "set class queue", leaf_msg(ifindex, classid, rate))?;
        for d in &self.proxy_devices {
            self.set_proxy_class(d, classid, rate)?;
        }
        Ok(())
    }

    /// Creates or changes class `classid` on proxy device `d` (an Ethernet device: HTB counts
    /// its 14-byte header, paid for as on the IFB).
    fn set_proxy_class(&self, d: &ProxyDevice, classid: u32, rate: Rate) -> Result<()> {
        let class = class_msg(d.ifindex, classid, rate, ETH_HLEN, d.mtu);
        self.request(&d.name, "set HTB class", class)?;
        self.request(
            &d.name,
            "set class queue",
            leaf_msg(d.ifindex, classid, rate),
        )?;
        Ok(())
    }

    /// Installs the HTB on proxy device `name` with every class there is.
    fn add_proxy_device(&mut self, name: &str) -> Result<()> {
        if self.proxy_devices.iter().any(|d| d.name == name) {
            return Ok(());
        }
        let (ifindex, mtu) = self.link(name)?;
        self.request(name, "install HTB", htb_root_msg(ifindex))?;
        let d = ProxyDevice {
            name: name.to_owned(),
            ifindex,
            mtu,
        };
        for classes in [&self.to_peer, &self.from_peer] {
            for (minor, rate) in classes.by_peer.values() {
                self.set_proxy_class(&d, class_id(*minor), *rate)?;
            }
        }
        self.proxy_devices.push(d);
        Ok(())
    }

    /// Removes the HTB of every proxy device (their default qdisc comes back).
    pub(super) fn remove_proxy_devices(&mut self) -> Result<()> {
        for d in std::mem::take(&mut self.proxy_devices) {
            let msg = Msg::new(RTM_DELQDISC, 0, &tcmsg(d.ifindex, QDISC_HANDLE, TC_H_ROOT));
            match self.nl.request(msg) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {}
                Err(source) => {
                    return Err(DataplaneError::Shape {
                        device: d.name,
                        op: "remove HTB",
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// The device (name, index) of `to_peer`'s direction, if it has been set up.
    fn device(&self, to_peer: bool) -> Option<(String, u32)> {
        if to_peer {
            self.tunnel_htb
                .then(|| (self.tunnel.clone(), self.tunnel_ifindex))
        } else {
            self.ifb_ifindex.map(|i| (ifb_name(&self.tunnel), i))
        }
    }

    /// Packets class `minor` of `to_peer`'s direction dropped (its fifo was full).
    fn class_drops(&self, to_peer: bool, minor: u16) -> Result<u64> {
        let Some((device, ifindex)) = self.device(to_peer) else {
            return Ok(0);
        };
        // The kernel answers a single-class GET only to a request that asks for an echo.
        let get = Msg::new(
            RTM_GETTCLASS,
            NLM_F_ECHO,
            &tcmsg(ifindex, class_id(minor), 0),
        );
        let answers = match self.nl.request(get) {
            Ok(a) => a,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(0),
            Err(source) => {
                return Err(DataplaneError::Shape {
                    device,
                    op: "read HTB class statistics",
                    source,
                });
            }
        };
        // After the 20-byte tcmsg: TCA_STATS2 { TCA_STATS_QUEUE: qlen, backlog, drops, … }.
        Ok(answers
            .iter()
            .filter_map(|a| a.get(20..))
            .flat_map(netlink::attrs)
            .filter(|(ty, _)| *ty == TCA_STATS2)
            .flat_map(|(_, v)| netlink::attrs(v))
            .find(|(ty, _)| *ty == TCA_STATS_QUEUE)
            .and_then(|(_, q)| q.get(8..12))
            .map_or(0, |d| {
                u64::from(u32::from_ne_bytes([d[0], d[1], d[2], d[3]]))
            }))
    }

    /// Packets peer `id`'s classes dropped, both directions, including deleted classes.
    pub(super) fn peer_drops(&self, id: PeerId) -> Result<u64> {
        let mut sum = self.retired_drops.get(&id).copied().unwrap_or(0);
        for to_peer in [true, false] {
            let classes = if to_peer {
                &self.to_peer
            } else {
                &self.from_peer
            };
            if let Some((minor, _)) = classes.by_peer.get(&id) {
                sum += self.class_drops(to_peer, *minor)?;
            }
        }
        Ok(sum)
    }

    /// Deletes class `minor` of `to_peer`'s direction, keeping its drop count for `peer`.
    fn retire_class(&mut self, peer: PeerId, to_peer: bool, minor: u16) -> Result<()> {
        let drops = self.class_drops(to_peer, minor).unwrap_or(0);
        *self.retired_drops.entry(peer).or_default() += drops;
        self.delete_class(to_peer, minor)
    }

    fn delete_class(&mut self, to_peer: bool, minor: u16) -> Result<()> {
        let Some((device, ifindex)) = self.device(to_peer) else {
            return Ok(());
        };
        for d in &self.proxy_devices {
            let msg = Msg::new(
                RTM_DELTCLASS,
                0,
                &tcmsg(d.ifindex, class_id(minor), QDISC_HANDLE),
            );
            match self.nl.request(msg) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(DataplaneError::Shape {
                        device: d.name.clone(),
                        op: "delete HTB class",
                        source,
                    });
                }
            }
        }
        let msg = Msg::new(
            RTM_DELTCLASS,
            0,
            &tcmsg(ifindex, class_id(minor), QDISC_HANDLE),
        );
        match self.nl.request(msg) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(DataplaneError::Shape {
                device,
                op: "delete HTB class",
                source,
            }),
        }
    }

    fn classes(&mut self, to_peer: bool) -> &mut Classes {
        if to_peer {
            &mut self.to_peer
        } else {
            &mut self.from_peer
        }
    }

    /// Removes the IFB device (the tunnel device's qdisc goes with the device).
    pub(super) fn remove_ifb(&mut self) -> Result<()> {
        let Some(ifindex) = self.ifb_ifindex.take() else {
            return Ok(());
        };
        let name = ifb_name(&self.tunnel);
        match self
            .nl
            .request(Msg::new(RTM_DELLINK, 0, &netlink::ifinfomsg(ifindex, 0, 0)))
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            Err(source) => Err(DataplaneError::Shape {
                device: name,
                op: "delete IFB device",
                source,
            }),
        }
    }
}

/// What one direction of a [`Dataplane::set_rates`] call did, to finish or undo it.
#[derive(Clone, Copy)]
enum Step {
    /// Nothing to do.
    Keep,
    /// Class `minor` now has the new rate; `old` = its previous rate (`None`: created now).
    Set { minor: u16, old: Option<Rate> },
    /// Class `minor` is to be deleted once `PeerInfo` no longer names it.
    Delete { minor: u16 },
}

impl Step {
    /// The class id `PeerInfo` names in this direction after the step, from `current`.
    fn class(self, current: u32) -> u32 {
        match self {
            Step::Keep => current,
            Step::Set { minor, .. } => class_id(minor),
            Step::Delete { .. } => 0,
        }
    }
}

/// The two directions of a rate change, in the order `[to the peer, from the peer]`.
const DIRECTIONS: [bool; 2] = [true, false];

impl Shaper {
    /// Creates or changes the classes `rates` need (deletions wait for [`Shaper::finish`]). On
    /// error, what was done is undone.
    fn plan_rates(&mut self, id: PeerId, rates: PeerRates) -> Result<[Step; 2]> {
        let to_peer = plan(self, id, true, rates.to_peer)?;
        match plan(self, id, false, rates.from_peer) {
            Ok(from_peer) => Ok([to_peer, from_peer]),
            Err(e) => {
                self.undo([to_peer, Step::Keep]);
                Err(e)
            }
        }
    }

    /// Records the planned classes as the peer's and deletes the ones no longer named.
    fn finish(&mut self, id: PeerId, rates: PeerRates, steps: [Step; 2]) -> Result<()> {
        for (to_peer, step) in DIRECTIONS.into_iter().zip(steps) {
            let rate = if to_peer {
                rates.to_peer
            } else {
                rates.from_peer
            };
            match (step, rate) {
                (Step::Set { minor, .. }, Some(rate)) => {
                    self.classes(to_peer).by_peer.insert(id, (minor, rate));
                }
                (Step::Delete { minor }, _) => {
                    self.classes(to_peer).by_peer.remove(&id);
                    self.classes(to_peer).free.push(minor);
                    self.retire_class(id, to_peer, minor)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Undoes the qdisc side of planned steps (the kernel never saw their classes named).
    fn undo(&mut self, steps: [Step; 2]) {
        for (to_peer, step) in DIRECTIONS.into_iter().zip(steps) {
            match step {
                Step::Set {
                    minor,
                    old: Some(old),
                } => {
                    let _ = self.set_class(to_peer, minor, old);
                }
                Step::Set { minor, old: None } => {
                    let _ = self.delete_class(to_peer, minor);
                    self.classes(to_peer).free.push(minor);
                }
                Step::Keep | Step::Delete { .. } => {}
            }
        }
    }
}

impl Dataplane {
    /// Sets peer `id`'s rates in both directions (`None` = unlimited): the classes are created
    /// or changed first, then the peer's `PeerInfo` names them (one map update), then classes
    /// no longer used are deleted. Other peers are not touched. On error nothing changed.
    pub fn set_rates(&mut self, id: PeerId, rates: PeerRates) -> Result<()> {
        let info = self.active_peer_info(id)?;
        let mut shaper = self
            .shaper
            .take()
            .ok_or(DataplaneError::ShapeNotAttached { peer: id })?;
        let result = self.set_rates_with(&mut shaper, id, info, rates);
        self.shaper = Some(shaper);
        if result.is_ok() {
            tracing::debug!(id, ?rates, "rates set");
        }
        result
    }

    fn set_rates_with(
        &mut self,
        shaper: &mut Shaper,
        id: PeerId,
        info: PeerInfo,
        rates: PeerRates,
    ) -> Result<()> {
        let steps = shaper.plan_rates(id, rates)?;
        let info = PeerInfo {
            shape_tx: steps[0].class(info.shape_tx),
            shape_rx: steps[1].class(info.shape_rx),
            ..info
        };
        match self.name_classes(shaper.ifb_ifindex, id, info) {
            Ok(()) => shaper.finish(id, rates, steps),
            Err(e) => {
                shaper.undo(steps);
                Err(e)
            }
        }
    }

    /// Points the kernel at the classes: the shaping device in the config (once the IFB
    /// exists), then the peer's `PeerInfo`.
    fn name_classes(&mut self, ifb: Option<u32>, id: PeerId, info: PeerInfo) -> Result<()> {
        if let Some(ifb) = ifb
            && self.cfg.shape_ifindex != ifb
        {
            let mut c = self.cfg;
            c.shape_ifindex = ifb;
            self.write_config(c)?;
        }
        self.write_peer_info(id, info, "write rates")
    }

    /// Shapes proxied traffic leaving by device `ifname` (resolved in the calling thread's
    /// namespace, like `attach_tc`; an Ethernet device, e.g. the uplink): replaces its root
    /// qdisc with an HTB `ca:` holding a copy of every class of both directions (and of every
    /// class made later), so a packet whose `skb->priority` the socket programs set to an
    /// identity's class is queued and paced there; other traffic goes through HTB's direct
    /// queue, unpaced (the price: one qdisc lock on the device for all its traffic). Each
    /// device's classes pace only what leaves by it. Needs the shaper (`attach_tc` first).
    /// Removed by [`Dataplane::detach`].
    pub fn shape_proxy_device(&mut self, ifname: &str) -> Result<()> {
        let shaper = self
            .shaper
            .as_mut()
            .ok_or(DataplaneError::ShapeNotAttached { peer: 0 })?;
        shaper.add_proxy_device(ifname)?;
        tracing::info!(ifname, "proxied traffic shaped on the device");
        Ok(())
    }

    /// Peer `id`'s rates as set (unlimited when never set).
    pub fn rates(&self, id: PeerId) -> Result<PeerRates> {
        if id >= MAX_PEERS {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: MAX_PEERS });
        }
        let Some(shaper) = self.shaper.as_ref() else {
            return Ok(PeerRates::default());
        };
        Ok(PeerRates {
            to_peer: shaper.to_peer.by_peer.get(&id).map(|(_, r)| *r),
            from_peer: shaper.from_peer.by_peer.get(&id).map(|(_, r)| *r),
        })
    }

    /// Deletes the classes of peer `id` after its `PeerInfo` was reset (peer removal).
    pub(super) fn forget_rates(&mut self, id: PeerId) -> Result<()> {
        let Some(shaper) = self.shaper.as_mut() else {
            return Ok(());
        };
        for to_peer in [true, false] {
            if let Some((minor, _)) = shaper.classes(to_peer).by_peer.remove(&id) {
                shaper.classes(to_peer).free.push(minor);
                shaper.delete_class(to_peer, minor)?;
            }
        }
        // The id may be re-used by another peer: its counters start from zero.
        shaper.retired_drops.remove(&id);
        Ok(())
    }

    /// Starts shaping on tunnel device `ifname` (called by `attach_tc`, in the device's
    /// namespace). Class ids in `PeerInfo` left by an earlier run name classes this run does
    /// not know: they are cleared (those peers are unshaped until their rates are set again).
    pub(super) fn start_shaping(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        if self
            .shaper
            .as_ref()
            .is_some_and(|s| s.tunnel_ifindex == ifindex)
        {
            return Ok(());
        }
        let ids: Vec<PeerId> = self.peers.mirror.keys().copied().collect();
        for id in ids {
            let info = self.peers.info(id);
            if info.shape_tx != 0 || info.shape_rx != 0 {
                let cleared = PeerInfo {
                    shape_tx: 0,
                    shape_rx: 0,
                    ..info
                };
                self.write_peer_info(id, cleared, "clear stale rates")?;
            }
        }
        self.shaper = Some(Shaper::new(ifname, ifindex, self.config.tunnel_l2_hlen)?);
        Ok(())
    }
}

/// Plans (and performs, on the qdisc side) one direction of `set_rates`.
fn plan(shaper: &mut Shaper, id: PeerId, to_peer: bool, want: Option<Rate>) -> Result<Step> {
    let current = shaper.classes(to_peer).by_peer.get(&id).copied();
    match (current, want) {
        (None, None) => Ok(Step::Keep),
        (Some((_, old)), Some(new)) if old == new => Ok(Step::Keep),
        (Some((minor, _)), None) => Ok(Step::Delete { minor }),
        (Some((minor, old)), Some(new)) => {
            shaper.set_class(to_peer, minor, new)?;
            Ok(Step::Set {
                minor,
                old: Some(old),
            })
        }
        (None, Some(new)) => {
            let minor = shaper.classes(to_peer).allocate().ok_or(
                DataplaneError::ShapeClassesExhausted {
                    peer: id,
                    max: u32::from(FROM_PEER_MINOR_BASE),
                },
            )?;
            if let Err(e) = shaper.set_class(to_peer, minor, new) {
                let _ = shaper.delete_class(to_peer, minor);
                shaper.classes(to_peer).free.push(minor);
                return Err(e);
            }
            Ok(Step::Set { minor, old: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifb_names_fit_ifnamsiz() {
        assert_eq!(ifb_name("capy0"), "capy0-in");
        assert_eq!(ifb_name("averyverylongname").len(), 15);
    }

    #[test]
    fn minors_are_reused_and_bounded() {
        let mut c = Classes::default();
        assert_eq!(c.allocate(), Some(1));
        assert_eq!(c.allocate(), Some(2));
        c.free.push(1);
        assert_eq!(c.allocate(), Some(1));
        c.next = MAX_SHAPE_MINOR as u16;
        assert_eq!(c.allocate(), None);
        // The two directions' minors are disjoint (a proxy device holds both).
        let mut to = Classes {
            next: FROM_PEER_MINOR_BASE - 1,
            ..Classes::default()
        };
        assert_eq!(to.allocate(), Some(FROM_PEER_MINOR_BASE));
        assert_eq!(to.allocate(), None);
        let mut from = Classes::from_peers();
        assert_eq!(from.allocate(), Some(FROM_PEER_MINOR_BASE + 1));
        from.next = MAX_SHAPE_MINOR as u16 - 1;
        assert_eq!(from.allocate(), Some(MAX_SHAPE_MINOR as u16));
        assert_eq!(from.allocate(), None);
    }

    #[test]
    fn class_parameters_encode_rate_and_burst() {
        let rate = Rate::mbit(50).unwrap();
        // A TUN device (no link-layer header): the rate as is.
        let m = class_msg(3, class_id(7), rate, 0, 1420);
        let opts: Vec<u8> = netlink::attrs(&m_body(&m)[20..])
            .find(|(t, _)| *t == TCA_OPTIONS)
            .map(|(_, v)| v.to_vec())
            .unwrap();
        let parms = netlink::attrs(&opts)
            .find(|(t, _)| *t == TCA_HTB_PARMS)
            .map(|(_, v)| v.to_vec())
            .unwrap();
        assert_eq!(parms.len(), 44);
        let u32_at = |o: usize| u32::from_ne_bytes(parms[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(8), 6_250_000, "rate in bytes/s");
        assert_eq!(u32_at(20), 6_250_000, "ceil in bytes/s");
        let burst_ns = u64::from(u32_at(24)) * PSCHED_TICK_NS;
        let burst = burst_ns * 6_250_000 / 1_000_000_000;
        assert!(
            burst.abs_diff(burst_bytes(rate)) < 64,
            "buffer encodes {burst} bytes"
        );
    }

    #[test]
    fn link_layer_headers_are_paid_for_at_full_size() {
        let rate = Rate::mbit(50).unwrap();
        assert_eq!(wire_bytes_per_sec(rate, 0, 1420), 6_250_000);
        // 1420 + 14 bytes on the IFB for every 1420 of IP: 6 311 619 bytes/s of HTB rate.
        let ifb = wire_bytes_per_sec(rate, ETH_HLEN, 1420);
        assert_eq!(ifb, 6_250_000 * 1434 / 1420);
        // Full-size packets get exactly the rate in IP bytes; small ones stay below it.
        let ip_rate = |pkt: u64| ifb as f64 * pkt as f64 / (pkt + 14) as f64;
        assert!((ip_rate(1420) - 6_250_000.0).abs() < 1.0);
        assert!(ip_rate(100) < 6_250_000.0);
    }

    fn m_body(m: &Msg) -> Vec<u8> {
        m.body().to_vec()
    }
}
