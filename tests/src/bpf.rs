//! Fixtures for BPF_PROG_TEST_RUN tests (and benchmarks): load the agent's embedded kernel
//! object with its maps pinned in a private bpffs directory, write raw map entries in the
//! `capybara_common` layouts, run a program on one packet, read the counters back.
//!
//! - [`PinDir`] is a unique directory `/sys/fs/bpf/capytest-<pid>-<n>`, removed with everything
//!   pinned in it on drop — also when a test panics — so tests never share or leak maps.
//! - [`Fixture::load`] loads the object (all maps fresh and zero) and all three programs, i.e.
//!   it also proves each program passes the verifier.
//! - Runs: [`Fixture::run_xdp`] takes an Ethernet frame; [`Fixture::run_tc`] takes a raw IP
//!   packet like the TUN device carries. `BPF_PROG_TEST_RUN` always gives `sched_cls` programs
//!   a 14-byte Ethernet header, so the fixture prepends one and loads the object with the
//!   global `TUNNEL_L2_HLEN` = 14; the programs then see exactly the IP packet, and count
//!   exactly its length — down to a 0-byte IP packet. (XDP frames must hold at least the
//!   14-byte Ethernet header: the kernel refuses shorter test input.)
//!
//! Privileged (root, bpffs at `/sys/fs/bpf`): failures panic with a message saying what failed.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use capybara_common::{
    blocklist::{DirEntry, DirSlot, ListId, V4LongKey, V6KeyData, dir_index, dir_slot},
    config::{
        CONFIG_F_DST_V4_LISTS, CONFIG_F_DST_V6_LISTS, CONFIG_F_SRC_V4_LISTS, CONFIG_F_SRC_V6_LISTS,
        Config,
    },
    counters::{COUNTER_SLOTS, Counter},
    event::EventRecord,
    flow::{FlowKey, FlowState},
    gate::GateAllowKey,
    maps as names,
    peer::{PeerDrops, PeerHot, PeerId, PeerInfo, PeerStats},
    quota::{BucketId, QuotaBucket},
};

use crate::packets;

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// IEEE 802 local experimental EtherType, used in front of truncated tunnel packets.
const ETH_P_802_EX1: u16 = 0x88b5;

/// `sizeof(struct __sk_buff)` (uapi `linux/bpf.h`), the context `BPF_PROG_TEST_RUN` copies
/// back for `sched_cls` programs.
const SK_BUFF_SIZE: usize = 192;
/// Offset of `__sk_buff.priority`: after `len, pkt_type, mark, queue_mapping, protocol,
/// vlan_present, vlan_tci, vlan_proto` (eight `__u32`).
const SK_BUFF_PRIORITY_OFFSET: usize = 32;
/// Offset of `__sk_buff.gso_segs` (after `wire_len`, 160) and of `__sk_buff.gso_size` (after
/// the 8-byte `sk` pointer at 168): the two GSO fields `BPF_PROG_TEST_RUN` copies into the
/// skb it builds (`convert___skb_to_skb`).
const SK_BUFF_GSO_SEGS_OFFSET: usize = 164;
const SK_BUFF_GSO_SIZE_OFFSET: usize = 176;

/// Length of the link-layer header `BPF_PROG_TEST_RUN` puts before a `sched_cls` program's data.
pub const TEST_RUN_L2_HLEN: u32 = 14;

/// Capacities the fixture lowers (hash maps preallocate every entry, which makes a full-size
/// load slow): capacity changes no lookup semantics. The DIR-24 tables keep their size, it is
/// part of their index layout.
pub const TEST_CAPACITIES: &[(&str, u32)] = &[
    (names::SRC_V4_LONG, 4096),
    (names::DST_V4_LONG, 4096),
    (names::PEER_V4, 4096),
    (names::PEER_V6, 4096),
    (names::PEER_HOT, 4096),
    (names::PEER_DROPS, 4096),
    (names::PEER_EVENTS, 4096),
    (names::QUOTA, 4096),
    (names::FLOW_COUNT, 4096),
    (names::FLOWS, 4096),
];

/// A unique bpffs directory for one fixture's pins, removed (with its pins) on drop.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Creates `/sys/fs/bpf/capytest-<pid>-<n>`.
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(BPFFS).join(format!("capytest-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| {
            panic!(
                "cannot create {} (root and bpffs at {BPFFS} needed): {e}",
                path.display()
            )
        });
        PinDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Pinned maps are files: removing them drops the pin's reference.
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Which compiled blocklists a map write targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lists {
    /// Source lists (XDP guard).
    Source,
    /// Destination lists (tunnel device).
    Destination,
}

impl Lists {
    fn dir(self) -> &'static str {
        match self {
            Lists::Source => names::SRC_V4_DIR,
            Lists::Destination => names::DST_V4_DIR,
        }
    }
    fn long(self) -> &'static str {
        match self {
            Lists::Source => names::SRC_V4_LONG,
            Lists::Destination => names::DST_V4_LONG,
        }
    }
    fn v6(self) -> &'static str {
        match self {
            Lists::Source => names::SRC_V6,
            Lists::Destination => names::DST_V6,
        }
    }
}

/// The tunnel-device programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tc {
    /// `tc_ingress` (from peers).
    Ingress,
    /// `tc_egress` (to peers).
    Egress,
}

impl Tc {
    /// The program's name in the object.
    pub fn name(self) -> &'static str {
        match self {
            Tc::Ingress => names::PROG_TC_INGRESS,
            Tc::Egress => names::PROG_TC_EGRESS,
        }
    }
}

/// The loaded object with its programs, over maps pinned in a private [`PinDir`].
pub struct Fixture {
    // Dropped before `pins`: close every fd, then remove the pins.
    ebpf: Ebpf,
    pins: PinDir,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Fixture {
    /// Loads the agent's embedded object (fresh, zeroed maps pinned in a new [`PinDir`], the
    /// preallocated hashes at [`TEST_CAPACITIES`]) and all three programs through the verifier.
    /// About 0.8 s (zeroing the two 128 MiB DIR-24 tables dominates).
    pub fn load() -> Self {
        Self::load_with_capacities(TEST_CAPACITIES)
    }

    /// Like [`Fixture::load`] with every map at its production capacity (about 3 s: the
    /// long-prefix hashes preallocate 2 × 2^20 entries each). For benchmarks with big lists.
    pub fn load_full_size() -> Self {
        Self::load_with_capacities(&[])
    }

    /// Loads with the given `(map name, max_entries)` overrides.
    pub fn load_with_capacities(capacities: &[(&str, u32)]) -> Self {
        let object = capybara_agent::dataplane::object::OBJECT;
        assert!(
            !object.is_empty(),
            "the embedded eBPF object is empty: build without AYA_BUILD_SKIP (bpf-linker on PATH)"
        );
        let pins = PinDir::new();
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.path());
        for &(name, n) in capacities {
            loader.map_max_entries(name, n);
        }
        let mut ebpf = loader
            .override_global("TUNNEL_L2_HLEN", &TEST_RUN_L2_HLEN, true)
            .load(object)
            .unwrap_or_else(|e| panic!("loading the eBPF object failed: {e:?}"));
        load_program::<Xdp>(&mut ebpf, names::PROG_XDP_GUARD);
        load_program::<SchedClassifier>(&mut ebpf, names::PROG_TC_INGRESS);
        load_program::<SchedClassifier>(&mut ebpf, names::PROG_TC_EGRESS);
        Fixture { ebpf, pins }
    }

    /// `xdp_guard`, loaded (for benchmarks that call `test_run` themselves, e.g. with
    /// `repeat`).
    pub fn xdp_program(&self) -> &Xdp {
        self.ebpf
            .program(names::PROG_XDP_GUARD)
            .expect("xdp_guard in the object")
            .try_into()
            .expect("xdp_guard is an XDP program")
    }

    /// A tunnel-device program, loaded. Its input needs the 14-byte Ethernet header
    /// [`Fixture::run_tc`] adds.
    pub fn tc_program(&self, which: Tc) -> &SchedClassifier {
        self.ebpf
            .program(which.name())
            .expect("tc program in the object")
            .try_into()
            .expect("a sched_cls program")
    }

    /// The loaded object.
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    // ---- runs ----

    /// Runs `xdp_guard` on the Ethernet frame `frame` and returns its XDP action. The kernel
    /// refuses frames shorter than an Ethernet header (14 bytes), as real NICs never deliver
    /// them either: this panics on one.
    pub fn run_xdp(&mut self, frame: &[u8]) -> u32 {
        assert!(
            frame.len() >= 14,
            "BPF_PROG_TEST_RUN refuses XDP frames below 14 bytes"
        );
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        self.xdp_program()
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test run of xdp_guard failed: {e:?}"))
            .return_value
    }

    /// Runs a tunnel-device program on the raw IP packet `ip` (any length, even 0) and returns
    /// its TC verdict (as the `u32` the kernel reports: `TC_ACT_OK` = 0, `TC_ACT_SHOT` = 2).
    pub fn run_tc(&mut self, which: Tc, ip: &[u8]) -> u32 {
        // The kernel sets skb->protocol from this header and, for IPv4/IPv6, refuses packets
        // shorter than the fixed IP header. The programs read the version nibble, never
        // skb->protocol, so a truncated packet goes behind a neutral EtherType.
        let complete = match ip.first().map(|b| b >> 4) {
            Some(4) => ip.len() >= 20,
            Some(6) => ip.len() >= 40,
            _ => false,
        };
        let input = if complete {
            packets::eth_ip(ip)
        } else {
            packets::eth(ETH_P_802_EX1, ip)
        };
        let opts = TestRunOptions {
            data_in: Some(&input),
            ..TestRunOptions::new()
        };
        self.tc_program(which)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test run of {} failed: {e:?}", which.name()))
            .return_value
    }

    /// Runs a tunnel-device program like [`Fixture::run_tc`] and also returns the
    /// `skb->priority` the program left (from the `__sk_buff` the kernel copies back).
    pub fn run_tc_priority(&mut self, which: Tc, ip: &[u8]) -> (u32, u32) {
        let input = packets::eth_ip(ip);
        let mut ctx = [0u8; SK_BUFF_SIZE];
        let opts = TestRunOptions {
            data_in: Some(&input),
            ctx_out: Some(&mut ctx),
            ..TestRunOptions::new()
        };
        let verdict = self
            .tc_program(which)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test run of {} failed: {e:?}", which.name()))
            .return_value;
        let at = SK_BUFF_PRIORITY_OFFSET;
        let priority = u32::from_ne_bytes(ctx[at..at + 4].try_into().unwrap());
        (verdict, priority)
    }

    /// Runs a tunnel-device program like [`Fixture::run_tc`] on a GSO skb: `gso_segs` and
    /// `gso_size` set in the `__sk_buff` handed in (`ctx_in`), as the stack sets them at egress
    /// (both) or a TUN's virtio-net header at ingress (`gso_size`, `gso_segs` 0). `ip` is the
    /// super-packet: one IP and transport header, the segments' payloads together.
    pub fn run_tc_gso(&mut self, which: Tc, ip: &[u8], gso_segs: u32, gso_size: u32) -> u32 {
        let input = packets::eth_ip(ip);
        let mut ctx = [0u8; SK_BUFF_SIZE];
        ctx[SK_BUFF_GSO_SEGS_OFFSET..SK_BUFF_GSO_SEGS_OFFSET + 4]
            .copy_from_slice(&gso_segs.to_ne_bytes());
        ctx[SK_BUFF_GSO_SIZE_OFFSET..SK_BUFF_GSO_SIZE_OFFSET + 4]
            .copy_from_slice(&gso_size.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(&input),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        self.tc_program(which)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("GSO test run of {} failed: {e:?}", which.name()))
            .return_value
    }

    // ---- map writes ----

    fn map(&mut self, name: &str) -> &mut aya::maps::Map {
        self.ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name} missing from the object"))
    }

    /// Writes `CONFIG[0]` with every `CONFIG_F_*_LISTS` bit set, so entries the tests write
    /// into either generation are looked up (the agent sets those bits only when a generation
    /// holds entries; [`Fixture::set_config_exact`] writes the flags as given).
    pub fn set_config(&mut self, mut cfg: Config) {
        cfg.flags |= CONFIG_F_SRC_V4_LISTS
            | CONFIG_F_SRC_V6_LISTS
            | CONFIG_F_DST_V4_LISTS
            | CONFIG_F_DST_V6_LISTS;
        self.set_config_exact(cfg);
    }

    /// Writes `CONFIG[0]` exactly as given.
    pub fn set_config_exact(&mut self, cfg: Config) {
        let mut m: Array<&mut MapData, Config> = Array::try_from(self.map(names::CONFIG)).unwrap();
        m.set(0, cfg, 0).expect("write CONFIG");
    }

    /// Reads `CONFIG[0]`.
    pub fn config(&mut self) -> Config {
        let m: Array<&MapData, Config> = Array::try_from(&*self.map(names::CONFIG)).unwrap();
        m.get(&0, 0).expect("read CONFIG")
    }

    /// Marks UDP port `port` as guarded by the XDP guard.
    pub fn guard_port(&mut self, port: u16) {
        self.guard(port, capybara_common::maps::GUARD_UDP);
    }

    /// Marks port `port` as guarded for the transports of `mask` (`GUARD_UDP` | `GUARD_TCP`).
    pub fn guard(&mut self, port: u16, mask: u32) {
        let mut m: Array<&mut MapData, u32> =
            Array::try_from(self.map(names::GUARD_PORTS)).unwrap();
        let old = m.get(&u32::from(port), 0).unwrap_or(0);
        m.set(u32::from(port), old | mask, 0)
            .expect("write GUARD_PORTS");
    }

    /// Host route: IPv4 `addr` belongs to peer `id`.
    pub fn peer_v4(&mut self, addr: Ipv4Addr, id: PeerId) {
        let mut m: HashMap<&mut MapData, u32, PeerId> =
            HashMap::try_from(self.map(names::PEER_V4)).unwrap();
        m.insert(u32::from(addr), id, 0).expect("write PEER_V4");
    }

    /// IPv4 address pool slot `offset` names peer `id` (`None`: empty).
    pub fn peer_pool_v4(&mut self, offset: u32, id: Option<PeerId>) {
        let mut m: Array<&mut MapData, u32> =
            Array::try_from(self.map(names::PEER_POOL_V4)).unwrap();
        m.set(offset, id.map_or(0, |i| i + 1), 0)
            .expect("write PEER_POOL_V4");
    }

    /// Range: IPv4 `net/len` belongs to peer `id` (needs `CONFIG_F_PEER_V4_RANGES` to be used).
    pub fn peer_v4_range(&mut self, net: Ipv4Addr, len: u32, id: PeerId) {
        let mut m: LpmTrie<&mut MapData, [u8; 4], PeerId> =
            LpmTrie::try_from(self.map(names::PEER_V4_LPM)).unwrap();
        m.insert(&Key::new(len, net.octets()), id, 0)
            .expect("write PEER_V4_LPM");
    }

    /// Host route: IPv6 `addr` belongs to peer `id`.
    pub fn peer_v6(&mut self, addr: Ipv6Addr, id: PeerId) {
        let mut m: HashMap<&mut MapData, [u8; 16], PeerId> =
            HashMap::try_from(self.map(names::PEER_V6)).unwrap();
        m.insert(addr.octets(), id, 0).expect("write PEER_V6");
    }

    /// Range: IPv6 `net/len` belongs to peer `id` (needs `CONFIG_F_PEER_V6_RANGES` to be used).
    pub fn peer_v6_range(&mut self, net: Ipv6Addr, len: u32, id: PeerId) {
        let mut m: LpmTrie<&mut MapData, [u8; 16], PeerId> =
            LpmTrie::try_from(self.map(names::PEER_V6_LPM)).unwrap();
        m.insert(&Key::new(len, net.octets()), id, 0)
            .expect("write PEER_V6_LPM");
    }

    /// Writes the DIR-24 entry of the /24 holding `addr` in generation `generation`.
    pub fn dir_entry(&mut self, lists: Lists, generation: u32, addr: Ipv4Addr, e: DirEntry) {
        let mut m: Array<&mut MapData, DirSlot> = Array::try_from(self.map(lists.dir())).unwrap();
        let (slot, half) = dir_slot(dir_index(generation, u32::from(addr)));
        let mut pair = m.get(&slot, 0).expect("read V4 DIR");
        pair[half as usize] = e;
        m.set(slot, pair, 0).expect("write V4 DIR");
    }

    /// Writes a long prefix `addr/len` (25..=32) → `list` in generation `generation`. (The DIR
    /// entry's length mask must name `len` for the kernel to probe it.)
    pub fn v4_long(&mut self, lists: Lists, generation: u8, addr: Ipv4Addr, len: u8, list: ListId) {
        let mut m: HashMap<&mut MapData, V4LongKey, ListId> =
            HashMap::try_from(self.map(lists.long())).unwrap();
        m.insert(V4LongKey::new(u32::from(addr), len, generation), list, 0)
            .expect("write V4 LONG");
    }

    /// Writes an IPv6 prefix `addr/len` → `list` in generation `generation`.
    pub fn v6_prefix(
        &mut self,
        lists: Lists,
        generation: u8,
        addr: Ipv6Addr,
        len: u32,
        list: ListId,
    ) {
        let mut m: LpmTrie<&mut MapData, V6KeyData, ListId> =
            LpmTrie::try_from(self.map(lists.v6())).unwrap();
        let mut data = [0u8; 17];
        data[0] = generation;
        data[1..].copy_from_slice(&addr.octets());
        m.insert(&Key::new(8 + len, data), list, 0)
            .expect("write V6 trie");
    }

    /// Writes the policy half of `PEER_HOT[id]` (gate, limits, classes), counters kept.
    pub fn peer_info(&mut self, id: PeerId, info: PeerInfo) {
        let mut m: Array<&mut MapData, PeerHot> =
            Array::try_from(self.map(names::PEER_HOT)).unwrap();
        let mut line = m.get(&id, 0).expect("read PEER_HOT");
        line.info = info;
        m.set(id, line, 0).expect("write PEER_HOT");
    }

    /// Writes `QUOTA[id]` whole.
    pub fn quota_bucket(&mut self, id: BucketId, bucket: QuotaBucket) {
        let mut m: Array<&mut MapData, QuotaBucket> =
            Array::try_from(self.map(names::QUOTA)).unwrap();
        m.set(id, bucket, 0).expect("write QUOTA");
    }

    /// Reads `QUOTA[id]`.
    pub fn read_quota_bucket(&mut self, id: BucketId) -> QuotaBucket {
        let m: Array<&MapData, QuotaBucket> = Array::try_from(&*self.map(names::QUOTA)).unwrap();
        m.get(&id, 0).expect("read QUOTA")
    }

    // ---- flows ----

    /// `FLOW_COUNT[id]`: peer `id`'s flow count as the kernel keeps it.
    pub fn flow_count(&mut self, id: PeerId) -> u64 {
        let m: Array<&MapData, u64> = Array::try_from(&*self.map(names::FLOW_COUNT)).unwrap();
        m.get(&id, 0).expect("read FLOW_COUNT")
    }

    /// Writes `FLOW_COUNT[id]`.
    pub fn set_flow_count(&mut self, id: PeerId, n: u64) {
        let mut m: Array<&mut MapData, u64> = Array::try_from(self.map(names::FLOW_COUNT)).unwrap();
        m.set(id, n, 0).expect("write FLOW_COUNT");
    }

    /// Every entry of `FLOWS`.
    pub fn flows(&mut self) -> Vec<(FlowKey, FlowState)> {
        let m: HashMap<&MapData, FlowKey, FlowState> =
            HashMap::try_from(&*self.map(names::FLOWS)).unwrap();
        m.iter().map(|e| e.expect("read FLOWS")).collect()
    }

    /// Inserts or replaces a `FLOWS` entry (the count is not touched).
    pub fn set_flow(&mut self, key: FlowKey, st: FlowState) {
        let mut m: HashMap<&mut MapData, FlowKey, FlowState> =
            HashMap::try_from(self.map(names::FLOWS)).unwrap();
        m.insert(key, st, 0).expect("write FLOWS");
    }

    /// Runs the agent's flow sweeper (`dataplane::flows::sweep`) on this fixture's maps at
    /// `now_ns` (CLOCK_BOOTTIME), with the counts decremented through a mapping of
    /// `FLOW_COUNT`, exactly as the agent does.
    pub fn sweep_flows(&mut self, now_ns: u64) -> capybara_agent::dataplane::FlowSweep {
        let cfg = self.config();
        let counts = self.map_flow_counts();
        let mut flows: HashMap<&mut MapData, FlowKey, FlowState> =
            HashMap::try_from(self.map(names::FLOWS)).unwrap();
        capybara_agent::dataplane::flows::sweep(&mut flows, counts.as_atomic_u64(), &cfg, now_ns)
            .expect("sweep FLOWS")
    }

    /// Runs the agent's `dataplane::flows::forget_peer` (what clearing a limit does) on this
    /// fixture's maps.
    pub fn forget_peer_flows(&mut self, peer: PeerId) -> capybara_agent::dataplane::FlowSweep {
        let counts = self.map_flow_counts();
        let mut flows: HashMap<&mut MapData, FlowKey, FlowState> =
            HashMap::try_from(self.map(names::FLOWS)).unwrap();
        capybara_agent::dataplane::flows::forget_peer(&mut flows, counts.as_atomic_u64(), peer)
            .expect("forget a peer's flows")
    }

    fn map_flow_counts(&mut self) -> capybara_agent::dataplane::sys::MmapArray {
        use std::os::fd::AsFd as _;
        {
            let aya::maps::Map::Array(data) = &*self.map(names::FLOW_COUNT) else {
                panic!("FLOW_COUNT is not an array");
            };
            let entries = data.info().expect("FLOW_COUNT info").max_entries() as usize;
            capybara_agent::dataplane::sys::MmapArray::new(data.fd().as_fd(), entries * 2)
                .expect("mmap FLOW_COUNT")
        }
    }

    /// Adds a verification endpoint entry to `GATE_ALLOW`.
    pub fn gate_allow(&mut self, key: GateAllowKey) {
        let mut m: HashMap<&mut MapData, GateAllowKey, u32> =
            HashMap::try_from(self.map(names::GATE_ALLOW)).unwrap();
        m.insert(key, 1, 0).expect("write GATE_ALLOW");
    }

    /// Drains the events ring buffer: every record written since the last call.
    pub fn events(&mut self) -> Vec<EventRecord> {
        let mut ring = RingBuf::try_from(self.map(names::EVENTS)).expect("EVENTS is a ring buffer");
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            let rec = capybara_agent::dataplane::events::record(&item)
                .unwrap_or_else(|e| panic!("bad record in EVENTS: {e}"));
            out.push(rec);
        }
        out
    }

    // ---- map reads (summed over CPUs) ----

    /// Every `COUNTERS` slot, summed over CPUs; index = slot.
    pub fn counters(&mut self) -> Vec<Counter> {
        let m: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(&*self.map(names::COUNTERS)).unwrap();
        (0..COUNTER_SLOTS)
            .map(|i| sum_counter(&m.get(&i, 0).expect("read COUNTERS")))
            .collect()
    }

    /// `LIST_HITS[list]`, summed over CPUs.
    pub fn list_hits(&mut self, list: ListId) -> Counter {
        let m: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(&*self.map(names::LIST_HITS)).unwrap();
        sum_counter(&m.get(&list, 0).expect("read LIST_HITS"))
    }

    /// Peer `id`'s counters (its `PEER_HOT` line) and drops (summed over CPUs).
    pub fn peer_stats(&mut self, id: PeerId) -> PeerStats {
        let mut total = PeerStats::default();
        let d: PerCpuArray<&MapData, PeerDrops> =
            PerCpuArray::try_from(&*self.map(names::PEER_DROPS)).unwrap();
        for v in d.get(&id, 0).expect("read PEER_DROPS").iter() {
            total.add_drops(v);
        }
        let m: Array<&MapData, PeerHot> = Array::try_from(&*self.map(names::PEER_HOT)).unwrap();
        total.add_counters(&m.get(&id, 0).expect("read PEER_HOT").counters);
        total
    }
}

fn sum_counter(values: &[Counter]) -> Counter {
    let mut total = Counter::default();
    for v in values {
        total.add(v);
    }
    total
}

fn load_program<P>(ebpf: &mut Ebpf, name: &str)
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    P: Loadable,
{
    let prog: &mut P = ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("program {name} missing from the object"))
        .try_into()
        .unwrap_or_else(|e| panic!("program {name} has an unexpected type: {e:?}"));
    prog.load_program()
        .unwrap_or_else(|e| panic!("the verifier rejected {name}: {e:?}"));
}

/// The programs the fixture loads (aya has no common `load` trait).
trait Loadable {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl Loadable for Xdp {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl Loadable for SchedClassifier {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}
