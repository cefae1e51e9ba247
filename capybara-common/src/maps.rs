//! Map names (the names they are pinned under in the bpffs directory) and their sizing.
//!
//! Memory at the maximum (kernel memory, charged to the agent's cgroup; `ncpu` = possible CPUs):
//!
//! | map | type | entries | cost |
//! |---|---|---|---|
//! | `CONFIG` | array | 1 | 16 B |
//! | `COUNTERS` | per-CPU array | 48 | 768 B × ncpu |
//! | `LIST_HITS` | per-CPU array | 1024 | 16 KiB × ncpu |
//! | `PEERS` | array | 131 072 | 4 MiB |
//! | `PEER_STATS` | per-CPU array | 131 072 | 20 MiB × ncpu |
//! | `PEER_V4`, `PEER_V6` | hash | 262 144 each | ≈ 20 MiB + 25 MiB |
//! | `PEER_V4_LPM`, `PEER_V6_LPM` | LPM trie | 262 144 each | allocated per entry |
//! | `SRC_V4_DIR`, `DST_V4_DIR` | mmapable array of entry pairs | 2^24 pairs (2 generations × 2^24 entries) each | 128 MiB each |
//! | `SRC_V4_LONG`, `DST_V4_LONG` | hash | 2 × 2^20 each | ≈ 130 MiB each when full (preallocated) |
//! | `SRC_V6`, `DST_V6` | LPM trie | 262 144 each | allocated per entry |
//! | `GUARD_PORTS` | array | 65 536 | 256 KiB |
//!
//! The two DIR tables are the price of a lookup that does not grow with the list: 256 MiB in all.

/// Runtime configuration (one [`crate::config::Config`]).
pub const CONFIG: &str = "CAPY_CONFIG";
/// Global verdict counters ([`crate::counters`]).
pub const COUNTERS: &str = "CAPY_COUNTERS";
/// Per-list hit counters, indexed by list id.
pub const LIST_HITS: &str = "CAPY_LIST_HITS";
/// Peer table, indexed by peer id.
pub const PEERS: &str = "CAPY_PEERS";
/// Per-peer per-CPU counters, indexed by peer id.
pub const PEER_STATS: &str = "CAPY_PEER_STATS";
/// IPv4 host route → peer id.
pub const PEER_V4: &str = "CAPY_PEER_V4";
/// IPv6 host route → peer id.
pub const PEER_V6: &str = "CAPY_PEER_V6";
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
/// UDP ports the XDP guard inspects (index = port, value non-zero = guarded).
pub const GUARD_PORTS: &str = "CAPY_GUARD_PORT";

/// Every pinned map, for listing and removal.
pub const ALL: [&str; 16] = [
    CONFIG,
    COUNTERS,
    LIST_HITS,
    PEERS,
    PEER_STATS,
    PEER_V4,
    PEER_V6,
    PEER_V4_LPM,
    PEER_V6_LPM,
    SRC_V4_DIR,
    SRC_V4_LONG,
    SRC_V6,
    DST_V4_DIR,
    DST_V4_LONG,
    DST_V6,
    GUARD_PORTS,
];

/// Program names in the object.
pub const PROG_XDP_GUARD: &str = "xdp_guard";
/// TC ingress program on the tunnel device.
pub const PROG_TC_INGRESS: &str = "tc_ingress";
/// TC egress program on the tunnel device.
pub const PROG_TC_EGRESS: &str = "tc_egress";

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
