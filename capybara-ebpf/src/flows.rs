//! Per-peer concurrent flow limits: find the packet's flow in `FLOWS`, admit or refuse a new
//! one against the peer's limit, free the slot on TCP FIN/RST. The design (canonical keys, the
//! reservation, who decrements, expiry, a full table) is documented in `capybara_common::flow`.
//!
//! The per-peer count lives in `FLOW_COUNT` (shared by every CPU and the agent) and is changed
//! only with the atomic `fetch_add` of [`crate::atomic`] (inline assembly: the eBPF target has no
//! atomic read-modify-write types). Adding `u64::MAX` is the decrement.
//!
//! **Unparseable packets of a limited peer are dropped** (`DropReason::Unparseable`,
//! `TC_*_DROP_UNPARSEABLE`, the peer's `drops[Unparseable]`; no event): IPv6 with more
//! extension headers than the parser follows (`parse::MAX_IPV6_EXT_HEADERS` = 4) or a header
//! starting past `parse::MAX_HEADER_OFFSET` (1 024 bytes), and packets whose transport header
//! is cut short of the ports (TCP: 14 bytes, UDP: 4, ICMP: 6). They used to pass untracked: a
//! limited peer opened as many flows as it liked behind 5 extension headers (the other end's
//! stack walks any number of them). The cut-short ones are no loss (no endpoint accepts them);
//! the deep ones cost a limited peer only its traffic with unusually long header chains, which
//! a limit cannot count. Peers without a limit are not parsed here and keep passing them.
//!
//! Cost, measured with `BPF_PROG_TEST_RUN` (repeat 1 000 000, warm cache, best of 5, on this
//! 2-CPU machine kind): `tc_ingress` on a packet of an existing UDP flow takes 182 ns for a peer
//! without a limit and 266 ns for a peer with one — the flow step (transport parse, the clock,
//! one lookup of the 44-byte key, the `last_ns` store) costs ≈ 85 ns. Peers without a limit pay
//! one field of the policy in the `PEER_HOT` line the pipeline read.

use capybara_common::{
    config::Config,
    flow::{
        FLOW_F_FROM_PEER, FLOW_S_OPEN, FLOW_S_TCP_SYN, FlowKey, FlowState, PROTO_ICMP,
        PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, flow_expired,
    },
    peer::{PeerId, PeerInfo},
};

use crate::{
    atomic::fetch_add,
    maps::{FLOW_COUNT, FLOW_SCRATCH, FLOWS},
    parse::{self, Addrs, Malformed, Packet},
};

/// `bpf_map_update_elem` flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;
/// `-EEXIST` from `bpf_map_update_elem`.
const EEXIST: i32 = -17;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// ICMP echo request / reply, ICMPv6 echo request / reply.
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
const ICMPV6_ECHO: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// The outcome of the flow step.
pub enum Flow {
    /// No limit, an existing flow, a new flow within the limit, or untracked: the packet passes.
    Pass,
    /// A packet of a limited peer whose 5-tuple cannot be read (headers deeper than the parser
    /// follows, or a transport header cut short): dropped, since untracked it would go around
    /// the limit (module docs).
    Unparseable,
    /// A new flow refused: `count` is the peer's count when refused; `full` when the table was
    /// full (rather than the peer at its limit).
    Refused {
        limit: u32,
        count: u64,
        full: bool,
        proto: u8,
    },
}

/// Writes the packet's flow key (canonical: peer side / other side) into `key` and returns its
/// TCP flags (0 for other protocols). `None`: a non-first fragment (not tracked). [`Malformed`]:
/// the key cannot be read (a transport header cut short, or IPv6 headers deeper than
/// `parse::ipv6` follows).
#[inline(always)]
fn key_of(
    key: &mut FlowKey,
    pkt: &Packet,
    l2: usize,
    addrs: &Addrs,
    peer: PeerId,
    peer_is_source: bool,
) -> Result<Option<u8>, Malformed> {
    let upper = match addrs {
        Addrs::V4 { .. } => parse::ipv4(pkt, l2)?,
        Addrs::V6 { .. } => parse::ipv6(pkt, l2)?,
    };
    if upper.deep {
        return Err(Malformed);
    }
    if upper.later_fragment {
        return Ok(None);
    }
    key.peer = peer;
    key.proto = upper.protocol;
    key._pad = [0; 2];
    key.peer_addr = [0; 16];
    key.other_addr = [0; 16];
    // Written straight into the key (no temporaries: the programs' stack is 512 bytes).
    match addrs {
        Addrs::V4 { src, dst } => {
            key.family = 4;
            let (p, o) = if peer_is_source {
                (src, dst)
            } else {
                (dst, src)
            };
            let (p, o) = (p.to_be_bytes(), o.to_be_bytes());
            key.peer_addr[0] = p[0];
            key.peer_addr[1] = p[1];
            key.peer_addr[2] = p[2];
            key.peer_addr[3] = p[3];
            key.other_addr[0] = o[0];
            key.other_addr[1] = o[1];
            key.other_addr[2] = o[2];
            key.other_addr[3] = o[3];
        }
        Addrs::V6 { src, dst } => {
            key.family = 6;
            let (p, o) = if peer_is_source {
                (src, dst)
            } else {
                (dst, src)
            };
            key.peer_addr = *p;
            key.other_addr = *o;
        }
    }
    let (mut src_port, mut dst_port, mut tcp_flags) = (0u16, 0u16, 0u8);
    match upper.protocol {
        PROTO_TCP => {
            // Ports, and the flags at byte 13.
            let h: [u8; 14] = pkt.read(upper.l4_off)?;
            src_port = u16::from_be_bytes([h[0], h[1]]);
            dst_port = u16::from_be_bytes([h[2], h[3]]);
            tcp_flags = h[13];
        }
        PROTO_UDP => {
            let h: [u8; 4] = pkt.read(upper.l4_off)?;
            src_port = u16::from_be_bytes([h[0], h[1]]);
            dst_port = u16::from_be_bytes([h[2], h[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // Type, code, checksum, identifier: an echo is its identifier's flow, on the peer
            // side whichever way it travels.
            let h: [u8; 6] = pkt.read(upper.l4_off)?;
            let echo = if upper.protocol == PROTO_ICMP {
                h[0] == ICMP_ECHO || h[0] == ICMP_ECHO_REPLY
            } else {
                h[0] == ICMPV6_ECHO || h[0] == ICMPV6_ECHO_REPLY
            };
            if echo {
                let id = u16::from_be_bytes([h[4], h[5]]);
                src_port = id;
                dst_port = id;
            }
        }
        _ => {}
    }
    if peer_is_source {
        key.peer_port = src_port;
        key.other_port = dst_port;
    } else {
        key.peer_port = dst_port;
        key.other_port = src_port;
    }
    if upper.protocol == PROTO_ICMP || upper.protocol == PROTO_ICMPV6 {
        key.other_port = 0;
    }
    Ok(Some(tcp_flags))
}

/// The state a new flow starts in.
#[inline(always)]
fn fresh(proto: u8, tcp_flags: u8, from_peer: bool, now_ns: u64) -> FlowState {
    FlowState {
        last_ns: now_ns,
        state: if proto == PROTO_TCP && tcp_flags & TCP_SYN != 0 {
            FLOW_S_TCP_SYN
        } else {
            FLOW_S_OPEN
        },
        flags: if from_peer { FLOW_F_FROM_PEER } else { 0 },
    }
}

/// The flow step for a packet of known peer `id` with table entry `info` (see the module docs).
/// A packet of a limited peer whose flow key cannot be read is [`Flow::Unparseable`].
#[inline(always)]
pub fn track(
    pkt: &Packet,
    l2: usize,
    addrs: &Addrs,
    (id, info): (PeerId, *const PeerInfo),
    peer_is_source: bool,
    cfg: &Config,
    now_ns: u64,
) -> Flow {
    // SAFETY: `info` is the policy in the peer's `PEER_HOT` line the pipeline looked up, valid for this run.
    let limit = unsafe { (*info).flow_limit };
    if limit == 0 {
        return Flow::Pass;
    }
    let Some(scratch) = FLOW_SCRATCH.get_ptr_mut(0) else {
        return Flow::Pass;
    };
    // SAFETY: this CPU's scratch element of a successful per-CPU lookup, valid for this run and
    // used by nothing else while this program runs on this CPU.
    let key = unsafe { &mut *scratch };
    let tcp_flags = match key_of(key, pkt, l2, addrs, id, peer_is_source) {
        Ok(Some(flags)) => flags,
        // A non-first fragment: its first fragment was the flow's packet.
        Ok(None) => return Flow::Pass,
        Err(_) => return Flow::Unparseable,
    };
    let key: &FlowKey = key;
    let Some(count) = FLOW_COUNT.get_ptr_mut(id) else {
        return Flow::Pass;
    };
    let tcp = key.proto == PROTO_TCP;

    if let Some(e) = FLOWS.get_ptr_mut(key) {
        if tcp && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            // The flow ends: free its slot now. Only a successful delete decrements.
            if FLOWS.remove(key).is_ok() {
                // SAFETY: `count` points at this peer's `u64` in the `FLOW_COUNT` array
                // (aligned, valid for this run); changed only atomically.
                unsafe { fetch_add(count, u64::MAX) };
            }
            return Flow::Pass;
        }
        // SAFETY: `e` points at the hash element of a successful lookup, valid for this run
        // (RCU); other CPUs and the agent may write it concurrently: each field is a whole
        // aligned word, read and written with volatile accesses, and a lost refresh only makes
        // a flow look idle a little earlier.
        unsafe {
            let st = core::ptr::read_volatile(e);
            if flow_expired(cfg, key.proto, &st, now_ns) {
                // Idle past its timeout: a new flow re-using its own (already counted) slot.
                core::ptr::write_volatile(e, fresh(key.proto, tcp_flags, peer_is_source, now_ns));
                return Flow::Pass;
            }
            let from_initiator = (st.flags & FLOW_F_FROM_PEER != 0) == peer_is_source;
            if st.state == FLOW_S_TCP_SYN && !from_initiator {
                core::ptr::write_volatile(&raw mut (*e).state, FLOW_S_OPEN);
            }
            core::ptr::write_volatile(&raw mut (*e).last_ns, now_ns);
        }
        return Flow::Pass;
    }
    if tcp && tcp_flags & TCP_SYN == 0 {
        // Not an opening: the tail of a flow a FIN/RST ended, or a connection older than the
        // limit. Untracked, so it cannot take a slot.
        return Flow::Pass;
    }
    // A new flow: reserve a slot, then insert.
    // SAFETY: as above for `count`.
    let old = unsafe { fetch_add(count, 1) };
    if old >= u64::from(limit) {
        // SAFETY: as above.
        unsafe { fetch_add(count, u64::MAX) };
        return Flow::Refused {
            limit,
            count: old,
            full: false,
            proto: key.proto,
        };
    }
    match FLOWS.insert(
        key,
        fresh(key.proto, tcp_flags, peer_is_source, now_ns),
        BPF_NOEXIST,
    ) {
        Ok(()) => Flow::Pass,
        Err(e) => {
            // SAFETY: as above.
            unsafe { fetch_add(count, u64::MAX) };
            if e == EEXIST {
                // Another CPU inserted this flow first: it is an existing flow.
                Flow::Pass
            } else {
                Flow::Refused {
                    limit,
                    count: old,
                    full: true,
                    proto: key.proto,
                }
            }
        }
    }
}
