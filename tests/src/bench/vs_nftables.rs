//! `blocklist_vs_nftables_1m` and `blocklist_vs_iptables_ipset_1m`: packets per second that
//! reach a receiver while a sender floods UDP from random sources, with a 1M-prefix source
//! blocklist enforced by the XDP guard, by an nftables interval set and by iptables + ipset, in
//! the same run.
//!
//! ## Method
//! - Four rigs, each two namespaces of its own joined by a veth pair (receiver `a`, sender `b`):
//!   no filter (the reference), the XDP guard (our [`Dataplane`], `attach_xdp` on `a`'s end: native
//!   XDP on the veth), nftables, iptables + ipset. All four are built first and stay up; the
//!   rounds then alternate between them (starting with a different rig each round) so a slow
//!   phase of the shared machine weighs on every rig alike.
//! - The list: the same 1M random prefixes as `xdp_guard_ns_1m` ([`random_v4_prefixes`], seed
//!   1 000 000; 95 % of lengths /20–/32, 5 % /16–/19), which cover about 39 % of IPv4.
//! - Traffic: one sender thread in `b` writes prebuilt Ethernet frames (IPv4/UDP, 148-byte
//!   payload, a WireGuard handshake initiation's size) to `a`'s address, port 51820 (the guarded
//!   port), as fast as it can for the run's seconds, on a packet socket bound to `b`'s veth end
//!   with `PACKET_QDISC_BYPASS` (how packet generators such as `trafgen` send), 64 frames per
//!   `sendmmsg`. The sender's cost is common to every rig and pulls every ratio towards 1, so it
//!   is kept small: a raw IP socket (`IPPROTO_RAW`, through routing and the IP output path) let
//!   no filter reach 290k pps against 520k with the packet socket, and gave 1.43 against 1.54
//!   for `blocklist_vs_nftables_1m` in the same session (2026-12-02); one `sendto` per packet
//!   instead of batches had cost more again (203k pps through no filter). The pool holds
//!   65 536 packets with uniformly random sources (martian sources and 10/8 left out, as the
//!   kernel would drop them for every rig alike), so the filters see many distinct addresses and
//!   about 61 % of the packets are clean.
//! - "Reaching the receiver": `a` has a UDP socket bound to the port with a small receive buffer
//!   that is not read during the flood; the figure is the packets that reached the socket — its
//!   drops (the `drops` column of `a`'s `/proc/net/udp`: buffer full) plus the packets drained
//!   from it after the run — divided by the run's seconds: every packet that got past the filter
//!   and the IP layer to the socket. Not reading during the flood keeps the receiver's
//!   application out of the CPU budget (two shared cores), so what differs between the rigs is
//!   the filter. (The `Udp:` counters of `/proc/net/snmp` do not move in this kernel's
//!   namespaces, so the socket's own counters are used.)
//! - Before the rounds, each rig is checked: 64 clean packets must all arrive and (filters only)
//!   64 packets from inside the list must all be dropped.
//! - The figure per rig is the median over the rounds; the ratios are medians over medians.
//!
//! ## The baselines, as their documentation recommends
//! - **nftables**: a `netdev` table with an `ingress` chain on `a`'s veth end (priority -500),
//!   one rule `ip saddr @blocklist drop`, the set `type ipv4_addr; flags interval;`. The netdev
//!   ingress hook is the earliest nftables can see a packet (before IP input, routing and the
//!   `inet` prerouting hook), so it is the fastest fair place for a source blocklist. The rule
//!   does not match the UDP port (the XDP guard only checks UDP to the guarded port); every
//!   packet of the flood goes to that port, so the outcome is the same and nftables does less
//!   work. The prefixes are merged into disjoint ranges before loading (what the set's
//!   `auto-merge` flag would do; 1M overlapping prefixes become ~590k ranges), loaded with one
//!   `nft -f FILE`.
//! - **iptables + ipset**: `ipset restore` of a `hash:net` set (`hashsize 1048576 maxelem
//!   2097152`, every prefix as is), and `iptables -t raw -A PREROUTING -m set --match-set
//!   capybl src -j DROP`: the raw table is iptables' earliest hook (before conntrack). On this
//!   distribution `iptables` is `iptables-nft` (the xt `set` match runs inside nf_tables); the
//!   report shows `iptables -V`.
//!
//! ## What it measures (and what not)
//! On a veth, native XDP runs in the veth's NAPI poll on an skb the sender already built (and
//! copies it when its headroom is short of 256 bytes), so the XDP advantage seen here is smaller
//! than on a NIC, where XDP runs before any skb exists. The sender's own cost is part of every
//! rig's budget: the veth delivers on the sending CPU, so one core sends, filters and receives.
//! Per packet sent (2026-12-02, one run, medians): no filter 2.0 µs, XDP guard 2.6 µs, nftables
//! 4.1 µs, iptables + ipset 6.6 µs. The XDP guard's lookup itself is ≈ 0.3 µs of its 0.6 µs
//! (`xdp_guard_ns_1m` − `xdp_guard_ns_empty`); the rest comes with veth's XDP mode (not measured
//! apart here): NAPI, and a copy of every skb whose headroom is short of 256 bytes, which a packet
//! socket's skb on a veth always is.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use capybara_agent::{
    blocklist::{Direction, ListName, sample::random_v4_prefixes},
    dataplane::{Dataplane, DataplaneConfig},
    net::Cidr,
};
use nix::sys::socket::{MsgFlags, send, setsockopt, sockopt};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use super::{
    Figure, Selection,
    flood::{self, UdpSink},
    median,
    report::BaselineDoc,
};
use crate::{
    netns::{NetNs, VethPair},
    packets, progress,
};

/// pps through the XDP guard over 1M source prefixes / the same through nftables (target ≥ 1.5).
pub const BLOCKLIST_VS_NFTABLES_1M: &str = "blocklist_vs_nftables_1m";
/// The same over iptables + ipset.
pub const BLOCKLIST_VS_IPTABLES_IPSET_1M: &str = "blocklist_vs_iptables_ipset_1m";
/// Packets per second reaching the receiver, XDP guard, 1M prefixes.
pub const BLOCKLIST_PPS_XDP_1M: &str = "blocklist_pps_xdp_1m";
/// Packets per second reaching the receiver, nftables interval set, 1M prefixes.
pub const BLOCKLIST_PPS_NFTABLES_1M: &str = "blocklist_pps_nftables_1m";
/// Packets per second reaching the receiver, iptables + ipset hash:net, 1M prefixes.
pub const BLOCKLIST_PPS_IPTABLES_IPSET_1M: &str = "blocklist_pps_iptables_ipset_1m";
/// Packets per second reaching the receiver without any filter (every packet is clean).
pub const BLOCKLIST_PPS_NO_FILTER: &str = "blocklist_pps_no_filter";

/// Every figure of this module, in report order.
pub const NAMES: &[&str] = &[
    BLOCKLIST_VS_NFTABLES_1M,
    BLOCKLIST_VS_IPTABLES_IPSET_1M,
    BLOCKLIST_PPS_XDP_1M,
    BLOCKLIST_PPS_NFTABLES_1M,
    BLOCKLIST_PPS_IPTABLES_IPSET_1M,
    BLOCKLIST_PPS_NO_FILTER,
];

/// The guarded port, the receiver's port.
const PORT: u16 = 51820;
/// UDP payload of the flood (a WireGuard handshake initiation).
const PAYLOAD: usize = 148;
/// Packets in the sender's pool (distinct random sources).
const POOL: usize = 65_536;
/// Seed of the 1M list (the one `xdp_guard_ns_1m` measures).
const SEED_1M: u64 = 1_000_000;
/// Seed of the pool's sources.
const SEED_POOL: u64 = 4242;
/// Packets of each kind sent by the correctness check.
const CHECK: u64 = 64;
/// The nftables table, the ipset set.
const NFT_TABLE: &str = "capybench";
const IPSET: &str = "capybl";

/// How the flood benchmark samples.
#[derive(Debug, Clone, Copy)]
pub struct FloodOptions {
    /// Rounds (each rig once per round); the median is reported.
    pub rounds: usize,
    /// Seconds of each flood.
    pub seconds: f64,
}

/// Which filter a rig runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    None,
    Xdp,
    Nft,
    IptIpset,
}

impl Filter {
    fn label(self) -> &'static str {
        match self {
            Filter::None => "no filter",
            Filter::Xdp => "XDP guard",
            Filter::Nft => "nftables",
            Filter::IptIpset => "iptables+ipset",
        }
    }

    fn figure(self) -> &'static str {
        match self {
            Filter::None => BLOCKLIST_PPS_NO_FILTER,
            Filter::Xdp => BLOCKLIST_PPS_XDP_1M,
            Filter::Nft => BLOCKLIST_PPS_NFTABLES_1M,
            Filter::IptIpset => BLOCKLIST_PPS_IPTABLES_IPSET_1M,
        }
    }
}

/// Two namespaces, a veth pair, a filter on the receiver's end and the receiver's socket. Fields
/// drop in order: the dataplane and the socket before the devices and the namespaces.
struct Rig {
    filter: Filter,
    dp: Option<Dataplane>,
    sink: UdpSink,
    veth: VethPair,
    b: NetNs,
    a: NetNs,
    pps: Vec<f64>,
}

impl Rig {
    fn new(filter: Filter, net: u8) -> Result<Rig> {
        let a = NetNs::new("a");
        let b = NetNs::new("b");
        let veth = VethPair::new(&a, &b, net);
        // Sources are random: no reverse-path filter (the host's setting is inherited).
        let ifname = veth.a.ifname.clone();
        a.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.conf.all.rp_filter=0",
            &format!("net.ipv4.conf.{ifname}.rp_filter=0"),
        ]);
        let sink = UdpSink::bind(&a, SocketAddr::new(IpAddr::V4(veth.a.v4), PORT))?;
        Ok(Rig {
            filter,
            dp: None,
            sink,
            veth,
            b,
            a,
            pps: Vec::new(),
        })
    }

    /// Packets that reached the receiver's socket so far.
    fn reached(&mut self) -> Result<u64> {
        self.sink.reached(&self.a)
    }

    /// Sends `packets` paced (no queue overflows) and returns how many reached the receiver.
    fn deliver(&mut self, packets: &[Vec<u8>]) -> Result<u64> {
        let before = self.reached()?;
        let ifname = self.veth.b.ifname.clone();
        self.b.run(|| -> Result<()> {
            let fd = packet_socket(&ifname)?;
            for p in packets {
                send(fd.as_raw_fd(), p, MsgFlags::empty())?;
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(())
        })?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(self.reached()? - before)
    }

    /// One flood of `seconds`; records and returns the receiver's pps.
    fn flood(&mut self, pool: &Arc<Vec<Vec<u8>>>, seconds: f64, record: bool) -> Result<f64> {
        let before = self.reached()?;
        let ifname = self.veth.b.ifname.clone();
        let pool = pool.clone();
        let (sent, elapsed) = self.b.run(move || -> Result<(u64, Duration)> {
            let fd = packet_socket(&ifname)?;
            let mut iov = flood::iovecs(&pool);
            let mut msgs = flood::headers(&mut iov, &[]);
            // SAFETY: the headers point into `iov` and `pool`, alive until the end.
            Ok(unsafe { flood::send_for(fd.as_raw_fd(), &mut msgs, seconds) })
        })?;
        std::thread::sleep(Duration::from_millis(100));
        let reached = self.reached()? - before;
        let pps = reached as f64 / elapsed.as_secs_f64();
        progress!(
            "{}: {sent} sent ({:.0}/s), {reached} reached the receiver: {pps:.0} pps",
            self.filter.label(),
            sent as f64 / elapsed.as_secs_f64()
        );
        if record {
            self.pps.push(pps);
        }
        Ok(pps)
    }
}

/// A packet socket bound to `ifname` (in the calling thread's namespace) that sends whole
/// Ethernet frames straight to the device (`PACKET_QDISC_BYPASS`), and receives nothing
/// (protocol 0).
fn packet_socket(ifname: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let ifindex =
        nix::net::if_::if_nametoindex(ifname).with_context(|| format!("ifindex of {ifname}"))?;
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid `sockaddr_ll`.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_ifindex = ifindex as i32;
    // SAFETY: `ll` is a valid `sockaddr_ll` of the length given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(
        r == 0,
        "bind the packet socket to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    let one: libc::c_int = 1;
    // SAFETY: an int option of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    ensure!(
        r == 0,
        "PACKET_QDISC_BYPASS: {}",
        std::io::Error::last_os_error()
    );
    setsockopt(&fd, sockopt::SndBuf, &(4 << 20)).context("SO_SNDBUF")?;
    Ok(fd)
}

/// The IPv4 addresses covered by `prefixes`, as sorted, disjoint, non-adjacent inclusive ranges.
pub fn merge_ranges(prefixes: &[Cidr]) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = prefixes
        .iter()
        .filter_map(Cidr::as_v4)
        .map(|n| (u32::from(n.network()), u32::from(n.broadcast())))
        .collect();
    v.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match merged.last_mut() {
            Some(last) if u64::from(s) <= u64::from(last.1) + 1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Whether `a` is in one of the sorted disjoint `ranges`.
fn covered(ranges: &[(u32, u32)], a: u32) -> bool {
    let i = ranges.partition_point(|&(s, _)| s <= a);
    i > 0 && ranges[i - 1].1 >= a
}

/// The nftables ruleset (one `nft -f` file) for `ranges` on device `ifname`.
pub fn nft_ruleset(ifname: &str, ranges: &[(u32, u32)]) -> String {
    let mut s = String::with_capacity(ranges.len() * 32 + 512);
    s.push_str(&format!("table netdev {NFT_TABLE} {{\n"));
    s.push_str("  set blocklist {\n    type ipv4_addr; flags interval;\n    elements = {\n");
    let mut first = true;
    for &(lo, hi) in ranges {
        if !first {
            s.push_str(",\n");
        }
        first = false;
        if lo == hi {
            s.push_str(&format!("      {}", Ipv4Addr::from(lo)));
        } else {
            s.push_str(&format!(
                "      {}-{}",
                Ipv4Addr::from(lo),
                Ipv4Addr::from(hi)
            ));
        }
    }
    s.push_str("\n    }\n  }\n");
    s.push_str(&format!(
        "  chain ingress {{\n    type filter hook ingress device \"{ifname}\" priority -500; \
         policy accept;\n    ip saddr @blocklist drop\n  }}\n}}\n"
    ));
    s
}

/// The `ipset restore` input for `prefixes`.
pub fn ipset_restore(prefixes: &[Cidr]) -> String {
    let mut s = format!("create {IPSET} hash:net family inet hashsize 1048576 maxelem 2097152\n");
    for p in prefixes {
        s.push_str(&format!("add {IPSET} {p}\n"));
    }
    s
}

/// The report's text for a ruleset too long to print: its first and last lines around a count.
fn abridge(text: &str, keep: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 2 * keep + 1 {
        return text.to_owned();
    }
    format!(
        "{}\n      … ({} more lines) …\n{}",
        lines[..keep].join("\n"),
        lines.len() - 2 * keep,
        lines[lines.len() - keep..].join("\n")
    )
}

/// Runs the flood benchmarks when selected; returns the figures and the baselines' commands.
pub fn run(
    sel: &Selection,
    pins: &Path,
    opts: FloodOptions,
) -> Result<(Vec<Figure>, Vec<BaselineDoc>)> {
    if !sel.wants_any(NAMES) {
        return Ok((Vec::new(), Vec::new()));
    }
    ensure!(
        opts.rounds > 0 && opts.seconds > 0.0,
        "rounds and seconds must be > 0"
    );
    let t = Instant::now();
    let prefixes = random_v4_prefixes(SEED_1M, 1_000_000);
    let ranges = merge_ranges(&prefixes);
    let mut rng = StdRng::seed_from_u64(SEED_POOL);
    let clean_fraction;
    let pool: Vec<Ipv4Addr>;
    let (clean, blocked): (Vec<Ipv4Addr>, Vec<Ipv4Addr>);
    {
        let mut sources = Vec::with_capacity(POOL);
        while sources.len() < POOL {
            let a: u32 = rng.random();
            let first = a >> 24;
            if first == 0 || first == 10 || first == 127 || first >= 224 {
                continue;
            }
            sources.push(Ipv4Addr::from(a));
        }
        let n_clean = sources
            .iter()
            .filter(|&&a| !covered(&ranges, u32::from(a)))
            .count();
        clean_fraction = n_clean as f64 / POOL as f64;
        clean = sources
            .iter()
            .copied()
            .filter(|&a| !covered(&ranges, u32::from(a)))
            .take(CHECK as usize)
            .collect();
        blocked = sources
            .iter()
            .copied()
            .filter(|&a| covered(&ranges, u32::from(a)))
            .take(CHECK as usize)
            .collect();
        ensure!(clean.len() == CHECK as usize && blocked.len() == CHECK as usize);
        // The packets are built per rig (each receiver has its own address).
        pool = sources;
    }
    progress!(
        "blocklist flood: {} prefixes ({} disjoint ranges), {POOL} random sources, {:.1} % clean; \
         prepared in {:.1} s",
        prefixes.len(),
        ranges.len(),
        clean_fraction * 100.0,
        t.elapsed().as_secs_f64()
    );

    let mut docs = Vec::new();
    let mut rigs = Vec::new();
    for (i, filter) in [Filter::None, Filter::Xdp, Filter::Nft, Filter::IptIpset]
        .into_iter()
        .enumerate()
    {
        let mut rig = Rig::new(filter, 81 + i as u8)?;
        let t = Instant::now();
        let ifname = rig.veth.a.ifname.clone();
        match filter {
            Filter::None => {}
            Filter::Xdp => {
                let mut dp = Dataplane::open(DataplaneConfig {
                    bpffs_dir: pins.join("vs-nft"),
                    tunnel_l2_hlen: 0,
                })
                .context("Dataplane::open")?;
                dp.set_guard_ports(&[PORT], &[])?;
                dp.list_replace(Direction::Source, &ListName::parse("bench")?, &prefixes)
                    .context("Dataplane::list_replace")?;
                rig.a.run(|| dp.attach_xdp(&ifname)).context("attach_xdp")?;
                rig.dp = Some(dp);
            }
            Filter::Nft => {
                let file = tempfile::NamedTempFile::new()?;
                let ruleset = nft_ruleset(&ifname, &ranges);
                std::fs::write(file.path(), &ruleset)?;
                let path = file.path().to_string_lossy().into_owned();
                rig.a.exec(&["nft", "-f", &path]);
                docs.push(BaselineDoc {
                    benchmark: BLOCKLIST_VS_NFTABLES_1M,
                    tool: "nftables",
                    commands: vec![
                        format!(
                            "nft -f blocklist.nft   # {}",
                            version(&rig.a, &["nft", "--version"])
                        ),
                        format!("# blocklist.nft:\n{}", abridge(&ruleset, 6)),
                    ],
                });
            }
            Filter::IptIpset => {
                let file = tempfile::NamedTempFile::new()?;
                let restore = ipset_restore(&prefixes);
                std::fs::write(file.path(), &restore)?;
                let path = file.path().to_string_lossy().into_owned();
                rig.a.exec(&["ipset", "restore", "-exist", "-f", &path]);
                let rule = [
                    "iptables",
                    "-t",
                    "raw",
                    "-A",
                    "PREROUTING",
                    "-m",
                    "set",
                    "--match-set",
                    IPSET,
                    "src",
                    "-j",
                    "DROP",
                ];
                rig.a.exec(&rule);
                docs.push(BaselineDoc {
                    benchmark: BLOCKLIST_VS_IPTABLES_IPSET_1M,
                    tool: "iptables + ipset",
                    commands: vec![
                        format!(
                            "ipset restore -exist -f blocklist.ipset   # {}",
                            version(&rig.a, &["ipset", "--version"])
                        ),
                        format!("# blocklist.ipset:\n{}", abridge(&restore, 3)),
                        format!(
                            "{}   # {}",
                            rule.join(" "),
                            version(&rig.a, &["iptables", "-V"])
                        ),
                    ],
                });
            }
        }
        progress!(
            "blocklist flood: {} rig ready in {:.1} s",
            filter.label(),
            t.elapsed().as_secs_f64()
        );
        rigs.push(rig);
    }

    // Per rig: its packets (destination = its receiver), and the correctness check.
    let mut pools = Vec::with_capacity(rigs.len());
    for rig in &mut rigs {
        let dst = rig.veth.a.v4;
        let mut head = mac(&rig.a, &rig.veth.a.ifname)?.to_vec();
        head.extend_from_slice(&mac(&rig.b, &rig.veth.b.ifname)?);
        head.extend_from_slice(&packets::ethertype::IPV4.to_be_bytes());
        let build = |src: Ipv4Addr| {
            let mut frame = head.clone();
            frame.extend_from_slice(&packets::udp4(src, dst, 40_000, PORT, PAYLOAD));
            frame
        };
        let clean_got = rig.deliver(&clean.iter().map(|&a| build(a)).collect::<Vec<_>>())?;
        let blocked_got = rig.deliver(&blocked.iter().map(|&a| build(a)).collect::<Vec<_>>())?;
        let blocked_want = if rig.filter == Filter::None { CHECK } else { 0 };
        ensure!(
            clean_got == CHECK && blocked_got == blocked_want,
            "{}: of {CHECK} clean packets {clean_got} arrived (want {CHECK}); of {CHECK} listed \
             packets {blocked_got} arrived (want {blocked_want})",
            rig.filter.label()
        );
        pools.push(Arc::new(pool.iter().map(|&a| build(a)).collect::<Vec<_>>()));
    }
    progress!("blocklist flood: every rig passes clean sources and (filters) drops listed ones");

    for (rig, pool) in rigs.iter_mut().zip(&pools) {
        rig.flood(pool, 1.0, false)?; // warm-up
    }
    let n = rigs.len();
    for r in 0..opts.rounds {
        for k in 0..n {
            let i = (r + k) % n;
            rigs[i].flood(&pools[i], opts.seconds, true)?;
        }
    }
    let pps = |f: Filter| -> f64 {
        rigs.iter()
            .find(|r| r.filter == f)
            .map_or(f64::NAN, |r| median(&r.pps))
    };
    let (xdp, nft, ipt) = (pps(Filter::Xdp), pps(Filter::Nft), pps(Filter::IptIpset));
    progress!(
        "{BLOCKLIST_VS_NFTABLES_1M}: {:.3} (target >= 1.5); {BLOCKLIST_VS_IPTABLES_IPSET_1M}: {:.3}",
        xdp / nft,
        xdp / ipt
    );
    let mut figures = vec![
        Figure {
            name: BLOCKLIST_VS_NFTABLES_1M,
            value: xdp / nft,
            unit: "ratio",
        },
        Figure {
            name: BLOCKLIST_VS_IPTABLES_IPSET_1M,
            value: xdp / ipt,
            unit: "ratio",
        },
    ];
    for f in [Filter::Xdp, Filter::Nft, Filter::IptIpset, Filter::None] {
        figures.push(Figure {
            name: f.figure(),
            value: pps(f),
            unit: "pps",
        });
    }
    figures.retain(|f| sel.wants(f.name));
    Ok((figures, docs))
}

/// The MAC address of `ifname` in `ns`.
fn mac(ns: &NetNs, ifname: &str) -> Result<[u8; 6]> {
    let text = ns.exec(&["cat", &format!("/sys/class/net/{ifname}/address")]);
    let bytes = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<Vec<u8>, _>>()
        .with_context(|| format!("MAC of {ifname}: {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC of {ifname}: {text:?}"))
}

/// The first line of a tool's version output.
fn version(ns: &NetNs, args: &[&str]) -> String {
    let out = ns.try_exec(args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().unwrap_or("?").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_overlapping_and_adjacent_prefixes() {
        let c = |s: &str| -> Cidr { s.parse().unwrap() };
        let r = merge_ranges(&[
            c("10.0.1.0/24"),
            c("10.0.0.0/24"),
            c("10.0.0.128/25"),
            c("192.168.0.1/32"),
        ]);
        assert_eq!(
            r,
            vec![(0x0a00_0000, 0x0a00_01ff), (0xc0a8_0001, 0xc0a8_0001)]
        );
        assert!(covered(&r, 0x0a00_01ff));
        assert!(!covered(&r, 0x0a00_0200));
        assert!(!covered(&r, 0));
    }

    #[test]
    fn nft_ruleset_lists_ranges_and_hosts() {
        let r = nft_ruleset(
            "veth0",
            &[(0x0a00_0000, 0x0a00_01ff), (0xc0a8_0001, 0xc0a8_0001)],
        );
        assert!(
            r.contains("10.0.0.0-10.0.1.255,\n      192.168.0.1\n"),
            "{r}"
        );
        assert!(r.contains("flags interval;"));
        assert!(r.contains("hook ingress device \"veth0\" priority -500"));
        assert!(r.contains("ip saddr @blocklist drop"));
    }

    #[test]
    fn ipset_input_creates_then_adds() {
        let s = ipset_restore(&["10.0.0.0/24".parse().unwrap()]);
        assert_eq!(
            s,
            "create capybl hash:net family inet hashsize 1048576 maxelem 2097152\n\
             add capybl 10.0.0.0/24\n"
        );
    }

    #[test]
    fn abridge_keeps_head_and_tail() {
        let text: String = (0..20).map(|i| format!("l{i}\n")).collect();
        let a = abridge(&text, 2);
        assert!(a.starts_with("l0\nl1\n"));
        assert!(a.contains("(16 more lines)"));
        assert!(a.ends_with("l18\nl19"));
        assert_eq!(abridge("a\nb", 2), "a\nb");
    }
}
