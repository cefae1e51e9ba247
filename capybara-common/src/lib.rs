//! Types, map names and constants shared by the kernel programs (`capybara-ebpf`) and the agent.
//!
//! This crate is the one source of truth for everything both sides of the bpf(2) boundary see:
//!
//! - [`maps`]: every map's name (the name it is pinned under), its size, and what it costs.
//! - [`peer`]: dense peer ids, per-peer counters and the peer table entry.
//! - [`blocklist`]: list ids and the compiled blocklist layout (DIR-24 table, long-prefix hash,
//!   IPv6 trie, generations for atomic replacement).
//! - [`counters`]: the global per-CPU verdict counters, indexed by named constants.
//! - [`drop`]: the one enum of drop reasons, used by the kernel, the API and the CLI.
//! - [`config`]: the single-entry runtime configuration map.
//! - [`gate`]: the admission gate's verification-endpoint map key.
//! - [`event`]: the records the kernel writes into the events ring buffer.
//! - [`flow`]: per-peer concurrent flow limits (the flow table, canonical keys, timeouts).
//! - [`quota`]: data-quota buckets (byte budgets shared by peers) and their warning thresholds.
//! - [`shape`]: the HTB classes that shape a peer's bandwidth, selected by the kernel.
//! - [`sock`]: proxied sockets bound to an identity's line, and the socket programs' counters.
//!
//! Rules: every map key and value is `#[repr(C)]` with explicit padding, no `bool` and no
//! data-carrying enum, and a compile-time size assertion. The `user` feature adds `aya::Pod`
//! impls for the agent.
#![no_std]

pub mod blocklist;
pub mod config;
pub mod counters;
pub mod drop;
pub mod event;
pub mod flow;
pub mod gate;
pub mod maps;
pub mod peer;
pub mod quota;
pub mod shape;
pub mod sock;

/// Implements `aya::Pod` for plain-old-data map types when built for userspace.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy`, has explicit padding fields and every
            // bit pattern is a valid value (integers and arrays of integers only).
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;

/// Bumped whenever the layout of a pinned map changes. The agent refuses to reuse pins made by
/// a different layout version (it would read garbage) and says how to reset them, except
/// layout 7 (the peer table and per-CPU counters apart), which it migrates to 8 (one hot line
/// per peer) keeping every counter.
pub const LAYOUT_VERSION: u32 = 8;
