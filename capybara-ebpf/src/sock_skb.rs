//! `sock_egress` / `sock_ingress`: cgroup_skb programs on the agent's cgroup (v2) that enforce a
//! proxy identity's policy on the sockets of its Shadowsocks and VLESS connections (issue 24;
//! which socket is charged what: `capybara-agent`'s `proxy` module).
//!
//! ## Attribution
//! The agent binds each socket of a proxied connection to the identity's id and role by writing
//! a `capybara_common::sock::SockBinding` into the socket's storage (`SOCK_BIND`,
//! `BPF_MAP_TYPE_SK_STORAGE`): the upstream socket before `connect`, the client socket right
//! after `accept`. The programs read `bpf_sk_storage_get(skb->sk)`: a packet of a socket without
//! a binding (every other socket of the cgroup, and another agent's: each agent has its own
//! map) passes untouched, counted in packets as `SOCK_PASS_UNBOUND` — one helper call that
//! walks the socket's (usually empty) storage list, plus the counter. Measured with
//! `BPF_PROG_TEST_RUN` (200 000 repeats; `prog_test_run::socket_programs_pass_unbound_packets_
//! untouched` prints it; 3 runs while other builds shared the 2 cores): 36–39 ns per packet,
//! test-run loop included, against 149–199 ns for `tc_egress`'s cheapest path (a packet of no
//! peer) in the same runs. Not yet a `cargo xtask bench` figure.
//!
//! ## Checks: the tunnel's pipeline, unforked
//! A bound packet goes through `crate::pipeline` with `Source::Socket`: the same gate, lists,
//! flow, quota, accounting and shaping steps as the tunnel's, with the socket's binding in place
//! of the address lookup. The programs' `Direction`s are the upstream socket's:
//!
//! | | upstream socket (endpoint → destination) | client socket (user → endpoint) |
//! |---|---|---|
//! | egress | from the user: like the tunnel's ingress — the gate, destination lists on the **destination**, the flow (its SYN is the new flow), quota, counted in `rx_*`, `skb->priority` = `shape_rx` | to the user: the gate; `skb->priority` = `shape_tx` |
//! | ingress | to the user: like the tunnel's egress — the gate, destination lists on the **source**, flow, quota, counted in `tx_*` | from the user: the gate |
//!
//! The client socket's bytes are not counted or charged: they are the upstream socket's bytes
//! in the protocol's framing (and TLS), so charging both would bill the user twice.
//!
//! ## Bounds (what the user may get beyond a limit)
//! - **Gate**: from the packet after the agent's store of the gate, in both directions of both
//!   sockets (no round trip through the endpoint). TCP retransmits what was dropped; nothing
//!   gets through while held.
//! - **Quota**: the tunnel's rule (`crate::quota`): the skb during which the bucket runs out
//!   passes whole, the next is dropped. A socket's skb is a TSO/GRO super-packet of at most
//!   64 KiB (`gso_max_size`; the segments counted with their repeated headers, as on the
//!   tunnel), so the overrun is at most one super-packet per CPU charging the bucket at that
//!   moment — ≤ 64 KiB × CPUs (2 here: 128 KiB), shared with the user's WireGuard devices on
//!   the same bucket. A dropped TCP segment is retransmitted, and each retransmission is
//!   dropped again while the bucket is exhausted: the user receives no more than the bucket
//!   plus that bound. Measured (`e2e_proxy_kernel`, 20 MB offered against 10 MB, 2 CPUs):
//!   10 067 180 bytes charged, 67 180 over the limit, against a bound of 135 856.
//! - **Flow limit**: one flow per upstream socket (its 5-tuple). The SYN of a connection over
//!   the limit is dropped on egress; `connect` does not fail at once (a cgroup egress drop is
//!   `EPERM` to TCP's transmit, which only `ECONNREFUSED` aborts) — SYNs are retried with
//!   backoff and dropped while the identity is over its limit, so the endpoint's connect times
//!   out (`proxy::relay::CONNECT_TIMEOUT`, 10 s) and the user's client sees its proxied
//!   connection closed. Counted as `SOCK_OUT_DROP_FLOWS` and a flow-limit event.
//! - **Destination lists / geo rules**: every packet; a listed destination's SYN never leaves.
//!
//! ## Shaping
//! A cgroup_skb program may set `skb->priority` but not redirect: the class is set on egress,
//! and an HTB whose major is `capybara_common::shape::SHAPE_QDISC_MAJOR` on the device the
//! packet leaves by picks the class from it (HTB reads `priority` as a class id before any
//! filter). On a device without such an HTB the priority is inert.
//!
//! Verdicts: 1 passes, 0 drops (for an egress packet of TCP, `EPERM` to the transmit path,
//! which keeps the segment queued for retransmission). Every packet increments exactly one
//! `SOCK_COUNTERS` slot.

use aya_ebpf::{
    bindings::TC_ACT_SHOT, helpers::generated::bpf_sk_storage_get, macros::cgroup_skb,
    programs::SkBuffContext,
};
use capybara_common::{
    counters::Counter,
    sock::{
        SOCK_IN_DROP_BLOCKLIST, SOCK_IN_DROP_FLOWS, SOCK_IN_DROP_GATE, SOCK_IN_DROP_QUOTA,
        SOCK_IN_DROP_UNPARSEABLE, SOCK_IN_MALFORMED, SOCK_IN_PASS, SOCK_IN_SHAPED,
        SOCK_IN_UNKNOWN_PEER, SOCK_OUT_DROP_BLOCKLIST, SOCK_OUT_DROP_FLOWS, SOCK_OUT_DROP_GATE,
        SOCK_OUT_DROP_QUOTA, SOCK_OUT_DROP_UNPARSEABLE, SOCK_OUT_MALFORMED, SOCK_OUT_PASS,
        SOCK_OUT_SHAPED, SOCK_OUT_UNKNOWN_PEER, SOCK_PASS_UNBOUND, SOCK_ROLE_CLIENT,
        SOCK_ROLE_UPSTREAM, SockBinding,
    },
};

use crate::{
    counters::count,
    maps::SOCK_BIND,
    pipeline::{self, Direction, Source},
};

/// cgroup_skb verdicts.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// Egress of an upstream socket: from the user (the tunnel's ingress: the peer is the source).
const UPSTREAM_EGRESS: Direction = Direction {
    peer_is_source: true,
    pass: SOCK_OUT_PASS,
    unknown_peer: SOCK_OUT_UNKNOWN_PEER,
    drop_blocklist: SOCK_OUT_DROP_BLOCKLIST,
    malformed: SOCK_OUT_MALFORMED,
    // Never used: an unknown id passes (`pipeline` drops unknown peers on the tunnel only).
    drop_unknown: SOCK_OUT_UNKNOWN_PEER,
    drop_gate: SOCK_OUT_DROP_GATE,
    drop_quota: SOCK_OUT_DROP_QUOTA,
    drop_flows: SOCK_OUT_DROP_FLOWS,
    drop_unparseable: SOCK_OUT_DROP_UNPARSEABLE,
    shaped: SOCK_OUT_SHAPED,
};

/// Ingress of an upstream socket: to the user (the tunnel's egress: the peer is the
/// destination).
const UPSTREAM_INGRESS: Direction = Direction {
    peer_is_source: false,
    pass: SOCK_IN_PASS,
    unknown_peer: SOCK_IN_UNKNOWN_PEER,
    drop_blocklist: SOCK_IN_DROP_BLOCKLIST,
    malformed: SOCK_IN_MALFORMED,
    drop_unknown: SOCK_IN_UNKNOWN_PEER,
    drop_gate: SOCK_IN_DROP_GATE,
    drop_quota: SOCK_IN_DROP_QUOTA,
    drop_flows: SOCK_IN_DROP_FLOWS,
    drop_unparseable: SOCK_IN_DROP_UNPARSEABLE,
    shaped: SOCK_IN_SHAPED,
};

/// Egress of a client socket: to the user (the peer is the destination). The same counters as
/// the upstream socket's egress.
const CLIENT_EGRESS: Direction = Direction {
    peer_is_source: false,
    ..UPSTREAM_EGRESS
};

/// Ingress of a client socket: from the user.
const CLIENT_INGRESS: Direction = Direction {
    peer_is_source: true,
    ..UPSTREAM_INGRESS
};

#[cgroup_skb(egress)]
pub fn sock_egress(ctx: SkBuffContext) -> i32 {
    run(&ctx, [&UPSTREAM_EGRESS, &CLIENT_EGRESS], true)
}

#[cgroup_skb(ingress)]
pub fn sock_ingress(ctx: SkBuffContext) -> i32 {
    run(&ctx, [&UPSTREAM_INGRESS, &CLIENT_INGRESS], false)
}

/// `dirs`: the upstream and the client socket's direction. The pipeline is inlined once per
/// role with the role a constant, so each copy keeps the tunnel's stack (a role known only at
/// run time pushed the inlined pipeline past the 512-byte stack).
#[inline(always)]
fn run(ctx: &SkBuffContext, [upstream_dir, client_dir]: [&Direction; 2], egress: bool) -> i32 {
    let Some((id, upstream)) = binding(ctx) else {
        count(
            SOCK_PASS_UNBOUND,
            Counter {
                packets: 1,
                bytes: 0,
            },
        );
        return PASS;
    };
    let verdict = if upstream {
        let source = Source::Socket {
            id,
            upstream: true,
            egress,
        };
        pipeline::run_socket(&ctx.skb, upstream_dir, source)
    } else {
        let source = Source::Socket {
            id,
            upstream: false,
            egress,
        };
        pipeline::run_socket(&ctx.skb, client_dir, source)
    };
    match verdict {
        TC_ACT_SHOT => DROP,
        _ => PASS,
    }
}

/// The identity and role (`true`: upstream) the packet's socket is bound to, if any.
#[inline(always)]
fn binding(ctx: &SkBuffContext) -> Option<(u32, bool)> {
    // SAFETY: the context pointer of this run; `sk` is a readable field of it for cgroup_skb
    // programs (null when the skb has no socket).
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper takes the map (this object's `SOCK_BIND`) and the socket the kernel
    // gave us; without `F_CREATE` it only looks up, returning null for no storage (or a socket
    // that is not a full one).
    let b = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCK_BIND).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockBinding>();
    if b.is_null() {
        return None;
    }
    // SAFETY: the socket's storage of a successful lookup, valid for this run; the agent writes
    // it whole (one update) before the socket carries a byte of the user's traffic.
    let (peer, role) = unsafe { ((*b).peer, (*b).role) };
    match role {
        SOCK_ROLE_UPSTREAM => Some((peer, true)),
        SOCK_ROLE_CLIENT => Some((peer, false)),
        _ => None,
    }
}
