//! Map names (the names they are pinned under in the bpffs directory) and their sizing.
//!
//! Memory (kernel memory, charged to the agent's cgroup; `ncpu` = possible CPUs), as
//! `bpftool map show` reports it on this machine kind (2 CPUs):
//!
//! | map | type | entries | cost |
//! |---|---|---|---|
//! | `CONFIG` | array | 1 | 24 B |
//! | `COUNTERS` | per-CPU array | 48 | 768 B × ncpu |
//! | `LIST_HITS` | per-CPU array | 1024 | 16 KiB × ncpu |
//! | `PEER_HOT` | mmapable array | 131 072 | 8 MiB (one 64 B line per peer: policy + counters) |
//! | `PEER_DROPS` | per-CPU array | 131 072 | 16 MiB × ncpu (128 B per peer and CPU) |
//! | `PEER_V4`, `PEER_V6` | hash, not preallocated | up to 262 144 each | ≈ 80 B per allowed IP |
//! | `PEER_V4_LPM`, `PEER_V6_LPM` | LPM trie | up to 262 144 each | per entry |
//! | `PEER_POOL_V4` | array | 2^20 (a /12) | 4 MiB (4 B per pool address) |
//! | `SRC_V4_DIR`, `DST_V4_DIR` | mmapable array | 2^24 entry pairs each | 128 MiB each |
//! | `SRC_V4_LONG`, `DST_V4_LONG` | hash, not preallocated | up to 2 × 2^20 each | ≈ 80 B per prefix longer than /24 |
//! | `SRC_V6`, `DST_V6` | LPM trie | up to 262 144 each | per entry |
//! | `GUARD_PORTS` | array | 65 536 | 256 KiB |
//! | `GATE_ALLOW` | hash, preallocated | 64 | ≈ 6 KiB |
//! | `PEER_EVENTS` | array | 131 072 | 4 MiB |
//! | `QUOTA` | mmapable array | 131 072 | 4 MiB (32 B per bucket) |
//! | `FLOWS` | hash, not preallocated | up to 262 144 | ≈ 140 B per flow (≈ 36 MiB full) |
//! | `FLOW_CNT` | mmapable array | 131 072 | 1 MiB (8 B per peer) |
//! | `EVENTS` | ring buffer | 256 KiB | 256 KiB (4096 records of 64 B in flight) |
//! | `SOCK_COUNTERS` | per-CPU array | 32 | 512 B × ncpu |
//! | `SOCK_BIND` | socket storage (not pinned) | one per bound socket | 8 B value + ≈ 100 B of storage bookkeeping per proxied socket, freed with it |
//!
//! The two DIR tables are the price of a lookup that does not grow with the list: 256 MiB in all
//! (kernel memory; the agent maps one 64 MiB generation only while writing or comparing it, see
//! `capybara-agent/src/dataplane/lists.rs`).
//! The hashes are not preallocated: preallocated, the two long-prefix hashes alone took 2 × 168 MiB
//! and the peer hashes 44 MiB before a single entry existed (measured: 695 MiB for an empty
//! agent, 374 MiB now, of which 2 × 32 MiB are the long-prefix hashes' bucket arrays). The price
//! is paid when lists change: inserting the ≈ 355 000 long prefixes of a 1M-prefix list moves
//! the allocation into the insert (`list_replace_1m_ms`: 488 ms on a quiet machine, ≈ 750 ms
//! while a build shares the CPUs; ≈ 380 ms preallocated; target 2000 ms). Lookups cost the same.
//!
//! `PEER_DROPS` grows with the CPU count (128 B per peer per CPU): 1 GiB at 64 CPUs (the
//! traffic counters, per CPU until layout 7, are shared now: `PEER_HOT`). Lowering
//! `MAX_PEERS` at load time (not yet an agent option) is the remedy for large machines.

/// Runtime configuration (one [`crate::config::Config`]).
pub const CONFIG: &str = "CAPY_CONFIG";
/// Global verdict counters ([`crate::counters`]).
pub const COUNTERS: &str = "CAPY_COUNTERS";
/// Per-list hit counters, indexed by list id.
pub const LIST_HITS: &str = "CAPY_LIST_HITS";
/// Each peer's hot line ([`crate::peer::PeerHot`]: policy and traffic counters), indexed by
/// peer id; mmapable, written by the agent through its mapping.
pub const PEER_HOT: &str = "CAPY_PEER_HOT";
/// Layout 7's peer table (`PeerInfo` per id), replaced by [`PEER_HOT`]: read once to migrate
/// pins of that layout, then unpinned.
pub const OLD_PEERS: &str = "CAPY_PEERS";
/// Layout 7's per-CPU traffic counters (`PeerCounters` per id and CPU), replaced by
/// [`PEER_HOT`]: read once to migrate, then unpinned.
pub const OLD_PEER_STATS: &str = "CAPY_PEER_STATS";
/// Per-peer per-CPU drops by reason ([`crate::peer::PeerDrops`]), indexed by peer id.
pub const PEER_DROPS: &str = "CAPY_PEER_DROPS";
/// IPv4 host route → peer id.
pub const PEER_V4: &str = "CAPY_PEER_V4";
/// IPv6 host route → peer id.
pub const PEER_V6: &str = "CAPY_PEER_V6";
/// IPv4 address pool → peer id + 1 (0 = none), indexed by the address's offset in the pool
/// (`Config::peer_pool_v4_base`): the tunnel's own addresses, attributed with one array read
/// instead of a hash lookup. The hash `PEER_V4` holds the same host routes too.
pub const PEER_POOL_V4: &str = "CAPY_PEER_POOL4";
/// IPv4 range → peer id.
pub const PEER_V4_LPM: &str = "CAPY_PEER_V4L";
/// IPv6 range → peer id.
pub const PEER_V6_LPM: &str = "CAPY_PEER_V6L";
/// Source blocklists: IPv4 DIR-24 table.
pub const SRC_V4_DIR: &str = "CAPY_SRC_V4DIR";
/// Source blocklists: IPv4 long prefixes.
pub const SRC_V4_LONG: &str = "CAPY_SRC_V4LNG";
/// Source blocklists: IPv6 trie.
pub const SRC_V6: &str = "CAPY_SRC_V6";
/// Destination blocklists: IPv4 DIR-24 table.
pub const DST_V4_DIR: &str = "CAPY_DST_V4DIR";
/// Destination blocklists: IPv4 long prefixes.
pub const DST_V4_LONG: &str = "CAPY_DST_V4LNG";
/// Destination blocklists: IPv6 trie.
pub const DST_V6: &str = "CAPY_DST_V6";
/// Ports the XDP guard inspects: index = port, value = which transports of it are guarded
/// ([`GUARD_UDP`] | [`GUARD_TCP`]; 0 = none).
pub const GUARD_PORTS: &str = "CAPY_GUARD_PORT";
/// In a [`GUARD_PORTS`] value: the UDP port is guarded (the WireGuard socket).
pub const GUARD_UDP: u32 = 1;
/// In a [`GUARD_PORTS`] value: the TCP port is guarded (the Shadowsocks and VLESS endpoints).
pub const GUARD_TCP: u32 = 2;
/// The admission gate's verification endpoint ([`crate::gate`]).
pub const GATE_ALLOW: &str = "CAPY_GATE_ALLOW";
/// Per-peer rate-limit state of events ([`crate::peer::PeerEventState`]), indexed by peer id.
pub const PEER_EVENTS: &str = "CAPY_PEER_EVT";
/// The events ring buffer ([`crate::event`]).
pub const EVENTS: &str = "CAPY_EVENTS";
/// Data-quota buckets ([`crate::quota::QuotaBucket`]), indexed by bucket id. A shared array
/// (not per-CPU): several CPUs charge one bucket with atomic adds; mmapable, so the agent changes
/// a budget with an atomic store instead of rewriting the bucket.
pub const QUOTA: &str = "CAPY_QUOTA";
/// The flow table ([`crate::flow::FlowKey`] → [`crate::flow::FlowState`]); a plain hash, not
/// LRU (see [`crate::flow`]).
pub const FLOWS: &str = "CAPY_FLOWS";
/// Per-peer flow counts (`u64`, indexed by peer id; atomics on both sides).
pub const FLOW_COUNT: &str = "CAPY_FLOW_CNT";

/// The socket programs' verdict counters ([`crate::sock`]): a per-CPU array of
/// [`crate::counters::Counter`], `SOCK_COUNTER_SLOTS` (32) entries, 512 B × ncpu. Pinned like
/// `COUNTERS`, whose layout it leaves as it was.
pub const SOCK_COUNTERS: &str = "CAPY_SOCK_CNT";
/// Proxied sockets' bindings ([`crate::sock::SockBinding`]): `BPF_MAP_TYPE_SK_STORAGE`, one
/// 8-byte value per bound socket, freed with the socket. **Not pinned**: the sockets are the
/// agent's own and die with it, and each agent (tests run several) must see only its own.
pub const SOCK_BIND: &str = "CAPY_SOCK_BIND";

/// Every pinned map, for listing and removal.
pub const ALL: [&str; 24] = [
    CONFIG,
    COUNTERS,
    LIST_HITS,
    PEER_HOT,
    PEER_DROPS,
    PEER_V4,
    PEER_V6,
    PEER_V4_LPM,
    PEER_V6_LPM,
    PEER_POOL_V4,
    SRC_V4_DIR,
    SRC_V4_LONG,
    SRC_V6,
    DST_V4_DIR,
    DST_V4_LONG,
    DST_V6,
    GUARD_PORTS,
    GATE_ALLOW,
    PEER_EVENTS,
    EVENTS,
    QUOTA,
    FLOWS,
    FLOW_COUNT,
    SOCK_COUNTERS,
];

/// Program names in the object.
pub const PROG_XDP_GUARD: &str = "xdp_guard";
/// TC ingress program on the tunnel device.
pub const PROG_TC_INGRESS: &str = "tc_ingress";
/// TC egress program on the tunnel device.
pub const PROG_TC_EGRESS: &str = "tc_egress";
/// cgroup_skb egress program: packets leaving the agent's proxied sockets.
pub const PROG_SOCK_EGRESS: &str = "sock_egress";
/// cgroup_skb ingress program: packets arriving at the agent's proxied sockets.
pub const PROG_SOCK_INGRESS: &str = "sock_ingress";

#[cfg(test)]
mod tests {
    #[test]
    fn names_fit_the_kernel_limit_and_are_unique() {
        for (i, a) in super::ALL.iter().enumerate() {
            assert!(a.len() <= 15, "{a} exceeds BPF_OBJ_NAME_LEN - 1");
            for b in &super::ALL[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
