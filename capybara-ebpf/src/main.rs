//! Capybara's kernel programs.
//!
//! Layout (one file per attach point, shared steps in their own modules):
//! - [`xdp_guard`]: XDP on the uplink — source blocklists for the WireGuard port.
//! - [`tc_ingress`] / [`tc_egress`]: TC (TCX) on the tunnel device — peer attribution,
//!   admission gate, destination blocklists, flow limits, data quotas, per-peer accounting,
//!   shaping; both run the pipeline in [`pipeline`].
//! - [`sock_skb`]: cgroup_skb on the agent's cgroup — the sockets of proxied (Shadowsocks,
//!   VLESS) connections, bound to an identity, through the same pipeline.
//! - [`parse`]: the one bounds-checked packet read and the header parsing steps.
//! - [`lookup`]: config, peer attribution, blocklist lookups (shared by both directions).
//! - [`gate`]: the admission gate (held peers, deadlines, the verification endpoint).
//! - [`events`]: rate-limited records into the events ring buffer.
//! - [`flows`]: per-peer concurrent flow limits (flow table, atomic per-peer counts).
//! - [`quota`]: data-quota buckets shared by peers (atomic charge, exhaustion drop, warnings).
//! - [`shape`]: the shaping decision (the peer's HTB class as `skb->priority`; from the peer, a
//!   redirect through the IFB).
//! - [`atomic`]: BPF atomic read-modify-write and compare-exchange (inline assembly).
//! - [`counters`]: per-CPU verdict, drop-reason, per-list and per-peer counting.
//! - [`maps`]: every map, pinned by name (names and layouts from `capybara_common`).
//!
//! Invariants: no loop without a constant bound; no slice indexing, no panics; every packet
//! read goes through `parse::Packet::read`; every verdict increments exactly one `COUNTERS`
//! slot; malformed packets pass (counted), they never make a program fail.
#![no_std]
#![no_main]
// atomic: BPF's atomic fetch and compare-exchange instructions through inline assembly.
#![feature(asm_experimental_arch)]

mod atomic;
mod counters;
mod events;
mod flows;
mod gate;
mod lookup;
mod maps;
mod parse;
mod pipeline;
mod quota;
mod shape;
mod sock_skb;
mod tc_egress;
mod tc_ingress;
mod xdp_guard;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Unreachable by construction (no indexing, no unwrap); if a panic path ever appears, this
    // unbounded loop makes the verifier reject the program instead of it misbehaving.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
