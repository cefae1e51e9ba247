//! Every map the programs use, declared once. Names, sizes and layouts come from
//! `capybara_common` (see `capybara_common::maps` for sizing and memory). All maps are pinned by
//! name so the agent re-uses them across restarts: counters never reset, enforcement never lapses
//! (except `FLOW_SCRATCH` and `EVENT_SCRATCH`, per-CPU scratch space that holds nothing between
//! packets).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use capybara_common::{
    blocklist::{
        DirSlot, ListId, MAX_LISTS, V4_DIR_SLOTS, V4_LONG_MAX, V4LongKey, V6_MAX, V6KeyData,
    },
    config::Config,
    counters::{COUNTER_SLOTS, Counter},
    event::{EVENTS_RING_BYTES, EventRecord},
    flow::{FlowKey, FlowState, MAX_FLOWS},
    gate::{GATE_ALLOW_MAX, GateAllowKey},
    peer::{
        MAX_PEER_ADDRS, MAX_PEER_POOL_V4, MAX_PEERS, PeerDrops, PeerEventState, PeerHot, PeerId,
        PeerV4LpmData, PeerV6LpmData,
    },
    quota::{MAX_QUOTA_BUCKETS, QuotaBucket},
    sock::{SOCK_COUNTER_SLOTS, SockBinding},
};

#[map(name = "CAPY_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "CAPY_COUNTERS")]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

#[map(name = "CAPY_LIST_HITS")]
pub static LIST_HITS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_LISTS, 0);

/// One 64-byte line per peer: policy and traffic counters (`capybara_common::peer::PeerHot`
/// states who writes what). Mmapable: the agent writes it through its mapping, and the values
/// start on a page, so every line is cache-line aligned.
#[map(name = "CAPY_PEER_HOT")]
pub static PEER_HOT: Array<PeerHot> = Array::pinned(MAX_PEERS, BPF_F_MMAPABLE);

#[map(name = "CAPY_PEER_DROPS")]
pub static PEER_DROPS: PerCpuArray<PeerDrops> = PerCpuArray::pinned(MAX_PEERS, 0);

#[map(name = "CAPY_PEER_POOL4")]
pub static PEER_POOL_V4: Array<u32> = Array::pinned(MAX_PEER_POOL_V4, 0);

#[map(name = "CAPY_PEER_V4")]
pub static PEER_V4: HashMap<u32, PeerId> = HashMap::pinned(MAX_PEER_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_PEER_V6")]
pub static PEER_V6: HashMap<[u8; 16], PeerId> = HashMap::pinned(MAX_PEER_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_PEER_V4L")]
pub static PEER_V4_LPM: LpmTrie<PeerV4LpmData, PeerId> =
    LpmTrie::pinned(MAX_PEER_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_PEER_V6L")]
pub static PEER_V6_LPM: LpmTrie<PeerV6LpmData, PeerId> =
    LpmTrie::pinned(MAX_PEER_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_SRC_V4DIR")]
pub static SRC_V4_DIR: Array<DirSlot> = Array::pinned(V4_DIR_SLOTS, BPF_F_MMAPABLE);

#[map(name = "CAPY_SRC_V4LNG")]
pub static SRC_V4_LONG: HashMap<V4LongKey, ListId> =
    HashMap::pinned(V4_LONG_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_SRC_V6")]
pub static SRC_V6: LpmTrie<V6KeyData, ListId> = LpmTrie::pinned(V6_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_DST_V4DIR")]
pub static DST_V4_DIR: Array<DirSlot> = Array::pinned(V4_DIR_SLOTS, BPF_F_MMAPABLE);

#[map(name = "CAPY_DST_V4LNG")]
pub static DST_V4_LONG: HashMap<V4LongKey, ListId> =
    HashMap::pinned(V4_LONG_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_DST_V6")]
pub static DST_V6: LpmTrie<V6KeyData, ListId> = LpmTrie::pinned(V6_MAX, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_GUARD_PORT")]
pub static GUARD_PORTS: Array<u32> = Array::pinned(65_536, 0);

#[map(name = "CAPY_GATE_ALLOW")]
pub static GATE_ALLOW: HashMap<GateAllowKey, u32> = HashMap::pinned(GATE_ALLOW_MAX, 0);

#[map(name = "CAPY_PEER_EVT")]
pub static PEER_EVENTS: Array<PeerEventState> = Array::pinned(MAX_PEERS, 0);

#[map(name = "CAPY_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

#[map(name = "CAPY_QUOTA")]
pub static QUOTA: Array<QuotaBucket> = Array::pinned(MAX_QUOTA_BUCKETS, BPF_F_MMAPABLE);

#[map(name = "CAPY_FLOWS")]
pub static FLOWS: HashMap<FlowKey, FlowState> = HashMap::pinned(MAX_FLOWS, BPF_F_NO_PREALLOC);

#[map(name = "CAPY_FLOW_CNT")]
pub static FLOW_COUNT: Array<u64> = Array::pinned(MAX_PEERS, BPF_F_MMAPABLE);

/// Scratch space for the flow key being built (one per CPU, not pinned: it holds nothing between
/// packets). The key is 44 bytes and the inlined pipeline's stack is near its 512-byte limit.
#[map(name = "CAPY_FLOW_SCR")]
pub static FLOW_SCRATCH: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for a flow-limit event record (one per CPU, not pinned), for the same reason.
#[map(name = "CAPY_EVT_SCR")]
pub static EVENT_SCRATCH: PerCpuArray<EventRecord> = PerCpuArray::with_max_entries(1, 0);

/// The socket programs' verdict counters (`capybara_common::sock`), apart from `COUNTERS`.
#[map(name = "CAPY_SOCK_CNT")]
pub static SOCK_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(SOCK_COUNTER_SLOTS, 0);

/// Proxied sockets' bindings to identities (`capybara_common::sock::SockBinding`), in the
/// sockets' own storage. A BTF map (the kernel creates `SK_STORAGE` maps only with BTF key and
/// value types), not pinned: every agent has its own (see `capybara_common::maps::SOCK_BIND`).
#[btf_map(name = "CAPY_SOCK_BIND")]
pub static SOCK_BIND: SkStorage<SockBinding> = SkStorage::new();
