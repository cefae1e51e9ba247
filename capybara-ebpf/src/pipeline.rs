//! The pipeline shared by `tc_ingress` and `tc_egress` on the tunnel device, and by the socket
//! programs (`crate::sock_skb`) for proxied connections' sockets: those enter with
//! [`Source::Socket`] (the identity from the socket's binding instead of step 1's address
//! lookup, no header pull, shaping by `skb->priority` only, and a client socket stops after the
//! gate); everything below is written for the tunnel and holds for them as described there.
//!
//! The tunnel device is a TUN: packets are raw IPv4/IPv6, no link-layer header, so the IP
//! version comes from the first nibble. The two directions differ only in which address is the
//! peer and which counters they use ([`Direction`]):
//!
//! | | peer end | other end (destination blocklists) | per-peer counters |
//! |---|---|---|---|
//! | ingress (from peers) | source | destination | `rx_*` |
//! | egress (to peers) | destination | source | `tx_*` |
//!
//! Steps: parse the addresses → attribute the peer → admission gate (known peers; see
//! [`crate::gate`]) → destination-blocklist check on the other end → flow limit (known peers
//! with a limit; see [`crate::flows`]) → data quota (known peers
//! with a bucket; see [`crate::quota`]) → count → shaping (known peers with a rate in this
//! direction; see [`crate::shape`]). The quota comes after the blocklists so that
//! only bytes that are actually delivered are charged. Outcomes, each
//! counted in exactly one `TC_*` slot:
//!
//! | case | verdict | counters |
//! |---|---|---|
//! | known peer held at the gate (reason `r`), not to/from the verification endpoint | shot | `TC_*_DROP_GATE`, `DROPS_BASE + r`, the peer's `drops[r]`; a gate-drop event (first per interval per peer: `EVENTS_EMITTED` or `EVENTS_LOST`) |
//! | other end in list `n` (known or unknown peer) | shot | `TC_*_DROP_BLOCKLIST`, `DROPS_BASE + DestinationBlocklist`, `LIST_HITS[n]`, the peer's `drops[DestinationBlocklist]` if known |
//! | known peer, a new flow over its flow limit (or the flow table full) | shot | `TC_*_DROP_FLOWS`, `DROPS_BASE + FlowLimit`, the peer's `drops[FlowLimit]` (and `FLOWS_TABLE_FULL` when full); a flow-limit event (first per interval per peer) |
//! | known peer with a flow limit, a packet whose 5-tuple cannot be read (IPv6 headers deeper than the parser follows, a transport header cut short) | shot | `TC_*_DROP_UNPARSEABLE`, `DROPS_BASE + Unparseable`, the peer's `drops[Unparseable]` |
//! | known peer whose quota bucket was exhausted before this packet | shot | `TC_*_DROP_QUOTA`, `DROPS_BASE + QuotaExhausted`, the peer's `drops[QuotaExhausted]` |
//! | known peer (admitted, or held and to/from the verification endpoint) | ok | `TC_*_PASS`, the peer's `rx_*`/`tx_*` |
//! | the same, peer shaped in this direction | egress: ok with `skb->priority` = its HTB class; ingress: the same and redirected to the shaping device | `TC_*_SHAPED`, the peer's `rx_*`/`tx_*` |
//! | unknown peer | ok | `TC_*_UNKNOWN_PEER` |
//! | unknown peer, `CONFIG_F_DROP_UNKNOWN_PEER` | shot | `TC_*_DROP_UNKNOWN`, `DROPS_BASE + UnknownPeer` |
//! | not IPv4/IPv6, truncated | ok | `TC_*_MALFORMED` |
//!
//! Amounts are what leaves (egress) or arrived (ingress) as separate IP packets: `skb->len`
//! minus [`TUNNEL_L2_HLEN`] (0 on a TUN) for an ordinary packet. The tunnel device has offloads
//! (`IFF_VNET_HDR`, the agent's default), so an skb may be a super-packet; it is counted as the
//! packets that cross the tunnel — its segments — with the headers every extra segment repeats
//! (IP + TCP with options, or IP + UDP: `parse::gso_header_len`) added to the bytes:
//!
//! | direction | the super-packet | `__sk_buff` (measured) | segments counted |
//! |---|---|---|---|
//! | egress (to peers) | a TSO/USO skb the stack hands the device; the tunnel splits it after TC | `gso_segs` set by the stack (`qdisc_pkt_len_init` runs before TC egress), `gso_size` set | `gso_segs` |
//! | ingress (from peers) | decrypted packets the tunnel coalesced (GRO: TCP, and UDP as UDP_L4) and wrote with a virtio-net header | `gso_size` = the segments' payload, `gso_segs` **0** (`virtio_net_hdr_to_skb` leaves it for the stack, `SKB_GSO_DODGY`) | ⌈(IP length − headers) / `gso_size`⌉ |
//!
//! The ingress count is exact because GRO only coalesces segments of one flow with equal
//! headers (IPv4 without options, IPv6 without extension headers, the same TCP options) and
//! equal payload lengths except a shorter last one: cut back into `gso_size` pieces they are
//! the packets that crossed, one for one. Measured with the TC programs on the device of a
//! wireguard-go peer's tunnel (`e2e_wg_dataplane`, a temporary counter of the two fields):
//! 200 UDP datagrams of 1000 bytes in bursts of 20 entered the device as 63 skbs over IPv4 (16
//! over IPv6), 13 of them GSO, every one with `gso_segs` 0 and `gso_size` 1000; in a 4 MB / 1.5
//! MB TCP transfer the 126 ingress GSO skbs had `gso_segs` 0 (`gso_size` 1367 on average: the
//! MSS), the 117 egress ones `gso_segs` set (1134 segments). With this rule the peer's counters
//! equal the 3286 packets / 4 173 844 bytes the client's offload-free device sent (the server's
//! device counted 493 skbs) and the packets it received plus the datagrams its socket dropped.
//! Before the egress rule: a TCP transfer counted 1183 packets / 1 561 524 bytes where the
//! device sent 2147 / 1 611 652.
//!
//! Decisions are per skb: one gate, blocklist and flow verdict per super-packet (its segments
//! share one 5-tuple, so it is one flow, tracked once), and one quota charge of all its
//! segments' bytes — the rule at a boundary inside a super-packet is in [`crate::quota`].
//! Shaping queues the super-packet in the peer's HTB class whole; HTB charges it as
//! `qdisc_pkt_len`, which the stack sets to the segments' bytes (headers repeated) on the
//! tunnel device and on the shaping device alike, so the rate is kept, at the granularity of
//! one super-packet (≤ 64 KiB).

use core::num::NonZeroU64;

use aya_ebpf::{
    Global,
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT},
    programs::{TcContext, sk_buff::SkBuff},
};
use capybara_common::{
    config::CONFIG_F_DROP_UNKNOWN_PEER,
    counters::Counter,
    counters::FLOWS_TABLE_FULL,
    drop::DropReason,
    event::{EVENT_F_EGRESS, EVENT_FLOW_LIMIT, EVENT_GATE_DROP},
    peer::{PeerHot, PeerId, PeerInfo},
};

use crate::{
    atomic::fetch_add,
    counters::{count, count_drop, count_list_hit},
    events, flows, gate,
    lookup::{DESTINATION, config, peer_v4, peer_v6},
    maps::{EVENT_SCRATCH, PEER_HOT},
    parse::{self, Addrs, IPV6_HDR_LEN, Malformed, Packet},
    quota, shape,
};

/// Bytes of link-layer header before the IP header on the tunnel device. 0 for the TUN device
/// Capybara attaches to (the default, never changed in production). `BPF_PROG_TEST_RUN` always
/// hands `sched_cls` programs a 14-byte Ethernet header before the data, so the tests override
/// it with 14 through `EbpfLoader::override_global`; a value above 64 is treated as 0.
#[unsafe(no_mangle)]
static TUNNEL_L2_HLEN: Global<u32> = Global::new(0);

const MAX_L2_HLEN: u32 = 64;

/// What distinguishes the two directions.
pub struct Direction {
    /// Ingress: the peer is the packet's source (and counted in `rx_*`). Egress: its destination
    /// (counted in `tx_*`).
    pub peer_is_source: bool,
    pub pass: u32,
    pub unknown_peer: u32,
    pub drop_blocklist: u32,
    pub malformed: u32,
    pub drop_unknown: u32,
    pub drop_gate: u32,
    pub drop_quota: u32,
    pub drop_flows: u32,
    pub drop_unparseable: u32,
    pub shaped: u32,
}

/// Who a packet belongs to: how the pipeline attributes it.
#[derive(Clone, Copy)]
pub enum Source {
    /// A packet on the tunnel device: the peer whose allowed IPs hold the peer end's address.
    Tunnel,
    /// A packet of a proxied socket bound to identity `id` (`crate::sock_skb`, cgroup_skb).
    /// `upstream`: the endpoint's connection to the destination, which every step applies to;
    /// otherwise the user's connection to the endpoint, which only the gate and (`egress`)
    /// the shaping decision apply to. Headers are never pulled (cgroup_skb may not) and
    /// shaping only sets `skb->priority` (no redirect).
    Socket {
        id: PeerId,
        upstream: bool,
        egress: bool,
    },
}

/// What the steps of the pipeline share about an attributed peer with a table entry.
#[derive(Clone, Copy)]
struct Known {
    id: PeerId,
    /// The peer's policy: the first half of its `PEER_HOT` line.
    info: *const PeerInfo,
    /// The peer's `PEER_HOT` line (policy and the counters, shared by every CPU).
    hot: *mut PeerHot,
    /// CLOCK_BOOTTIME when the packet was attributed.
    now_ns: u64,
}

/// Runs the pipeline for one packet and returns the TC verdict.
#[inline(always)]
pub fn run(ctx: &TcContext, dir: &Direction) -> i32 {
    let l2 = match TUNNEL_L2_HLEN.load() {
        n if n <= MAX_L2_HLEN => n,
        _ => 0,
    };
    run_skb(&ctx.skb, dir, Source::Tunnel, l2)
}

/// Runs the pipeline for one packet of a bound socket (`Source::Socket`; cgroup_skb: the data
/// starts at the IP header) and returns the verdict as a TC action (`TC_ACT_OK` or
/// `TC_ACT_SHOT`), which the caller turns into its own.
#[inline(always)]
pub fn run_socket(skb: &SkBuff, dir: &Direction, source: Source) -> i32 {
    run_skb(skb, dir, source, 0)
}

#[inline(always)]
fn run_skb(skb: &SkBuff, dir: &Direction, source: Source, l2: u32) -> i32 {
    let bytes = skb.len().saturating_sub(l2) as u64;
    match try_tunnel(skb, dir, source, l2 as usize, bytes) {
        Ok(verdict) => verdict,
        Err(Malformed) => {
            count(dir.malformed, Counter::one(bytes));
            TC_ACT_OK
        }
    }
}

/// Packets and bytes of this skb as separate IP packets (see the module docs on GSO).
#[inline(always)]
fn amount(skb: *mut __sk_buff, v6: bool, l2: usize, bytes: u64) -> Counter {
    // SAFETY: `skb` is the `__sk_buff` context pointer the kernel passed to this program;
    // `gso_segs` and `gso_size` are readable fields of it for `sched_cls` and `cgroup_skb`
    // programs.
    let (segs, size) = unsafe { ((*skb).gso_segs, (*skb).gso_size) };
    if segs <= 1 && size == 0 {
        return Counter::one(bytes);
    }
    let split = gso_split(skb, l2, v6, bytes);
    Counter {
        packets: split >> 32,
        bytes: bytes + (split & 0xffff_ffff),
    }
}

/// The segments of a GSO skb of `bytes` IP bytes (bits 32..64) and the header bytes they
/// repeat beyond the first (bits 0..32). Inlined: as a BPF-to-BPF call its frame on top of
/// `tc_ingress`'s (504 bytes then) was over the 512-byte combined limit (measured).
#[inline(always)]
fn gso_split(skb: *mut __sk_buff, l2: usize, v6: bool, bytes: u64) -> u64 {
    // SAFETY: `skb` is this run's context pointer (see `amount`).
    let (segs, size) = unsafe { ((*skb).gso_segs, (*skb).gso_size) };
    let pkt = packet(skb);
    let hdr = parse::gso_header_len(&pkt, l2, v6).unwrap_or(0) as u64;
    // Egress: the stack set `gso_segs`. Ingress: the TUN's virtio-net header set `gso_size`
    // and left `gso_segs` 0 (measured; the stack fills it in later), so the segments are the
    // payload cut into `gso_size` pieces, the last one shorter. (`NonZeroU64`: a division
    // that cannot trap.)
    let segs = match (segs, NonZeroU64::new(u64::from(size))) {
        (0, Some(size)) => (bytes.saturating_sub(hdr) + (size.get() - 1)) / size,
        (n, _) => u64::from(n),
    };
    if segs <= 1 {
        return 1 << 32;
    }
    segs << 32 | ((segs - 1) * hdr) & 0xffff_ffff
}

#[inline(always)]
fn try_tunnel(
    skb: &SkBuff,
    dir: &Direction,
    source: Source,
    l2: usize,
    bytes: u64,
) -> Result<i32, Malformed> {
    // Headers must be in the linear part for direct access. TUN skbs practically always are;
    // pull them in if not (this invalidates earlier packet pointers, so it comes first).
    // cgroup_skb programs may not pull: a bound socket's packet whose headers are not linear
    // is counted as malformed and passes (TCP/IP headers of a socket's own skbs are linear).
    if let Source::Tunnel = source {
        let want = (skb.len() as usize).min(l2 + IPV6_HDR_LEN);
        let pkt = packet(skb.skb);
        if pkt.len() < want {
            let _ = skb.pull_data(want as u32);
        }
    }
    let pkt = packet(skb.skb);
    let addrs = parse::ip_addrs(&pkt, l2)?;
    let amount = amount(skb.skb, matches!(addrs, Addrs::V6 { .. }), l2, bytes);

    let cfg = config();
    // 1. Attribution: the peer end on the tunnel, the socket's binding for a proxied socket.
    // `charged`: the steps after the gate apply (all but a proxy's client socket).
    // (Two statements, not one tuple: built together, the tunnel's `None` left `peer`'s payload
    // undefined and LLVM spilled it, which the verifier refuses: "R5 !read_ok".)
    let peer = match source {
        Source::Tunnel => match addrs {
            Addrs::V4 { src, dst } => peer_v4(if dir.peer_is_source { src } else { dst }, &cfg),
            Addrs::V6 { src, dst } => {
                peer_v6(if dir.peer_is_source { &src } else { &dst }, cfg.flags)
            }
        },
        Source::Socket { id, .. } => Some(id),
    };
    let charged = !matches!(
        source,
        Source::Socket {
            upstream: false,
            ..
        }
    );

    // The peer's hot line (policy and counters in one cache line, see
    // `capybara_common::peer::PeerHot`), used by the steps below: looked up once. The clock is
    // read once for the gate deadline, the flow table and events (it was read up to three times
    // per packet).
    //
    // `hot` is null for an unknown peer, never undefined: built as `Option::map` over the
    // lookup, the `None` case left the pointer undefined, and LLVM spilled it from a register
    // a helper call had clobbered, which the verifier refuses ("R5 !read_ok"; it happened when
    // the GSO accounting and this line met, issue 23).
    let hot = match peer {
        Some(id) => PEER_HOT.get_ptr_mut(id).unwrap_or_default(),
        None => core::ptr::null_mut(),
    };
    let known = match peer {
        Some(id) if !hot.is_null() => Some(Known {
            id,
            // SAFETY: a field address inside the element of a successful array lookup.
            info: unsafe { &raw const (*hot).info },
            hot,
            now_ns: gate::now_ns(),
        }),
        _ => None,
    };

    // 2. Admission gate (known peers only), before accounting and the blocklists.
    if let Some(Known {
        id, info, now_ns, ..
    }) = known
        && let Some(held) = gate::held(info, now_ns)
        && !gate::to_endpoint(&pkt, l2, &addrs, dir.peer_is_source)
    {
        let reason = gate::deadline_reason(info, &held);
        count_drop(dir.drop_gate, reason, amount, peer);
        let deadline = if matches!(held.reason, DropReason::GateExpired) {
            held.deadline_ns
        } else {
            0
        };
        gate_event(
            (id, reason as u32),
            deadline,
            amount.bytes,
            dir.peer_is_source,
            cfg.event_interval_ns,
            now_ns,
        );
        return Ok(TC_ACT_SHOT);
    }

    if !charged {
        // A proxy's client socket: its bytes are the upstream socket's, framed; only the
        // gate (above) and the shaping of the download (to the user) apply.
        let info = known.map_or(core::ptr::null(), |k| k.info);
        return Ok(socket_verdict(skb.skb, dir, source, info, amount));
    }
    // 3. Destination blocklists: the other end.
    let list = match addrs {
        Addrs::V4 { src, dst } => DESTINATION.v4(&cfg, if dir.peer_is_source { dst } else { src }),
        Addrs::V6 { src, dst } => {
            DESTINATION.v6(&cfg, if dir.peer_is_source { &dst } else { &src })
        }
    };
    if list != 0 {
        count_drop(
            dir.drop_blocklist,
            DropReason::DestinationBlocklist,
            amount,
            peer,
        );
        count_list_hit(list, amount);
        return Ok(TC_ACT_SHOT);
    }
    // 4. Flow limit (known peers with a limit): a new flow over it is refused, and so is a
    // packet whose flow cannot be read. Before the quota, so a refused packet is not charged.
    if let Some(Known {
        id, info, now_ns, ..
    }) = known
    {
        match flows::track(
            &pkt,
            l2,
            &addrs,
            (id, info),
            dir.peer_is_source,
            &cfg,
            now_ns,
        ) {
            flows::Flow::Pass => {}
            flows::Flow::Unparseable => {
                count_drop(dir.drop_unparseable, DropReason::Unparseable, amount, peer);
                return Ok(TC_ACT_SHOT);
            }
            flows::Flow::Refused {
                limit,
                count: flows,
                full,
                proto,
            } => {
                count_drop(dir.drop_flows, DropReason::FlowLimit, amount, peer);
                if full {
                    count(
                        FLOWS_TABLE_FULL,
                        Counter {
                            packets: 1,
                            bytes: 0,
                        },
                    );
                }
                flow_event(
                    id,
                    u64::from(limit) | u64::from(proto) << 32 | u64::from(full) << 40,
                    flows,
                    dir.peer_is_source,
                    cfg.event_interval_ns,
                    now_ns,
                );
                return Ok(TC_ACT_SHOT);
            }
        }
    }
    // 5. Data quota (known peers with a bucket): charge, or drop when exhausted.
    if let Some(Known {
        id, info, now_ns, ..
    }) = known
        && let quota::Quota::Exhausted =
            quota::charge(id, info, amount.bytes, !dir.peer_is_source, now_ns)
    {
        count_drop(dir.drop_quota, DropReason::QuotaExhausted, amount, peer);
        return Ok(TC_ACT_SHOT);
    }
    // 6. Accounting, and 7. the shaping decision.
    match known {
        Some(Known { info, hot, .. }) => {
            count_peer(hot, dir.peer_is_source, amount);
            if let Source::Socket { .. } = source {
                return Ok(socket_verdict(skb.skb, dir, source, info, amount));
            }
            let class = shape::class(info, dir.peer_is_source, cfg.shape_ifindex);
            if class == 0 {
                count(dir.pass, amount);
                return Ok(TC_ACT_OK);
            }
            count(dir.shaped, amount);
            Ok(shape::apply(
                skb,
                class,
                dir.peer_is_source,
                cfg.shape_ifindex,
                l2,
            ))
        }
        _ if matches!(source, Source::Tunnel) && cfg.flags & CONFIG_F_DROP_UNKNOWN_PEER != 0 => {
            count_drop(dir.drop_unknown, DropReason::UnknownPeer, amount, None);
            Ok(TC_ACT_SHOT)
        }
        _ => {
            count(dir.unknown_peer, amount);
            Ok(TC_ACT_OK)
        }
    }
}

/// The data of `skb` as a bounds-checked packet.
#[inline(always)]
fn packet(skb: *mut __sk_buff) -> Packet {
    // SAFETY: `skb` is this run's context pointer; `data` and `data_end` are readable fields
    // of it for `sched_cls` and `cgroup_skb` programs (the verifier turns them into packet
    // pointers).
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    Packet::new(data, end)
}

/// The verdict for a bound socket's packet that passed the checks (step 7 for sockets): on
/// egress with a rate class, `skb->priority` = the class (`shape_rx` for the upload an
/// upstream socket sends, `shape_tx` for the download a client socket sends), for the HTB the
/// packet meets on its way out (`crate::sock_skb`). `info` is the identity's policy (null when
/// its line does not exist).
#[inline(always)]
fn socket_verdict(
    skb: *mut __sk_buff,
    dir: &Direction,
    source: Source,
    info: *const PeerInfo,
    amount: Counter,
) -> i32 {
    let Source::Socket {
        upstream,
        egress: true,
        ..
    } = source
    else {
        count(dir.pass, amount);
        return TC_ACT_OK;
    };
    let class = if info.is_null() {
        0
    } else {
        // SAFETY: the policy half of the identity's `PEER_HOT` line, valid for this program
        // run; each class is read whole (one aligned u32).
        unsafe {
            if upstream {
                (*info).shape_rx
            } else {
                (*info).shape_tx
            }
        }
    };
    if class == 0 {
        count(dir.pass, amount);
        return TC_ACT_OK;
    }
    count(dir.shaped, amount);
    // SAFETY: this run's context pointer; `priority` is a field cgroup_skb programs may write.
    unsafe { (*skb).priority = class };
    TC_ACT_OK
}

/// Emits a rate-limited gate-drop event for peer `id` held for `reason`, built in the per-CPU
/// `EVENT_SCRATCH` like [`flow_event`]'s: on the stack, its 56 bytes left no room for the GSO
/// accounting (`tc_ingress` measured at 504 of 512 bytes with the record there).
#[inline(always)]
fn gate_event(
    (id, reason): (u32, u32),
    deadline_ns: u64,
    bytes: u64,
    from_peer: bool,
    interval_ns: u64,
    now_ns: u64,
) {
    let Some(rec) = EVENT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch element of a successful per-CPU lookup, valid for this run and
    // used by nothing else while this program runs on this CPU.
    let rec = unsafe { &mut *rec };
    rec.kind = EVENT_GATE_DROP;
    rec.peer = id;
    rec.reason = reason;
    rec.flags = if from_peer { 0 } else { EVENT_F_EGRESS };
    rec.time_ns = now_ns;
    rec.args = [deadline_ns, bytes, 0, 0];
    events::emit_limited(rec, events::SLOT_GATE, interval_ns);
}

/// Emits a rate-limited flow-limit event. The record is built in the per-CPU `EVENT_SCRATCH`:
/// on the stack it would push the inlined pipeline past the 512-byte limit (measured: 472 bytes
/// without it). `packed`: limit (bits 0..32), protocol (32..40), table full (40).
#[inline(always)]
fn flow_event(id: u32, packed: u64, flows: u64, from_peer: bool, interval_ns: u64, now_ns: u64) {
    let Some(rec) = EVENT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch element of a successful per-CPU lookup, valid for this run and
    // used by nothing else while this program runs on this CPU.
    let rec = unsafe { &mut *rec };
    rec.kind = EVENT_FLOW_LIMIT;
    rec.peer = id;
    rec.reason = DropReason::FlowLimit as u32;
    rec.flags = if from_peer { 0 } else { EVENT_F_EGRESS };
    rec.time_ns = now_ns;
    rec.args = [
        packed & 0xffff_ffff,
        flows,
        (packed >> 32) & 0xff,
        packed >> 40,
    ];
    events::emit_limited(rec, events::SLOT_FLOW, interval_ns);
}

/// Adds `amount` to the peer's counters in its hot line: atomic adds, as every CPU (and the
/// agent, which zeroes them for a re-used id) shares the line.
#[inline(always)]
fn count_peer(hot: *mut PeerHot, rx: bool, amount: Counter) {
    // SAFETY: `hot` comes from a successful lookup of `PEER_HOT`, valid for the program run;
    // the counters are 8-byte aligned `u64`s changed only atomically.
    unsafe {
        let c = &raw mut (*hot).counters;
        if rx {
            fetch_add(&raw mut (*c).rx_packets, amount.packets);
            fetch_add(&raw mut (*c).rx_bytes, amount.bytes);
        } else {
            fetch_add(&raw mut (*c).tx_packets, amount.packets);
            fetch_add(&raw mut (*c).tx_bytes, amount.bytes);
        }
    }
}
