//! BPF_PROG_TEST_RUN tests of the kernel programs (root and bpffs required).
//!
//! The core is two tables (`xdp_cases`, `tc_cases`) of {name, packet builder, map setup,
//! expected verdict, expected counter deltas}. Each case gets a freshly loaded object with
//! private pinned maps, runs one packet, and then checks the verdict and *every* counter it
//! could have touched:
//!
//! - all `COUNTERS` slots: exactly the listed slots moved, by one packet and the packet's
//!   length (frame length on the uplink, IP length on the tunnel device); every other slot is
//!   unchanged — so "every verdict increments exactly one verdict slot" is checked each time;
//! - `LIST_HITS` for list ids 0..16: only the expected list moved;
//! - the counters of `PEER_HOT` (and the drops of `PEER_DROPS`) for peer ids 0..16: only the
//!   expected peer moved, in the expected field.
//!
//! Scenarios that need several packets on one fixture (exact per-peer byte counts, generation
//! flips, truncation sweeps over every prefix length) are separate tests below the tables.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use capybara_common::{
    blocklist::{ListId, dir_entry},
    config::{
        CONFIG_F_DROP_UNKNOWN_PEER, CONFIG_F_DST_V4_LISTS, CONFIG_F_DST_V6_LISTS,
        CONFIG_F_PEER_V4_RANGES, CONFIG_F_PEER_V6_RANGES, CONFIG_F_SRC_V4_LISTS,
        CONFIG_F_SRC_V6_LISTS, Config,
    },
    counters::*,
    drop::DropReason,
    event::{EVENT_F_EGRESS, EVENT_FLOW_LIMIT, EVENT_GATE_DROP, EVENT_QUOTA},
    flow::{FLOW_F_FROM_PEER, FLOW_S_OPEN, FLOW_S_TCP_SYN, FlowKey},
    gate::GateAllowKey,
    peer::{PeerId, PeerInfo, PeerStats},
    quota::{QUOTA_WARNED_80, QUOTA_WARNED_90, QUOTA_WARNED_100, QuotaBucket},
};
use capybara_tests::{
    bpf::{Fixture, Lists, Tc},
    packets::{self, Ext, ethertype},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// The guarded WireGuard port.
const WG_PORT: u16 = 51820;
/// A guarded TCP port (a Shadowsocks or VLESS endpoint's).
const PROXY_PORT: u16 = 8388;
/// The server's uplink address.
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Peer 1: IPv4 host route 10.8.0.2/32 and IPv6 host route fd00::2/128.
const PEER1: PeerId = 1;
const PEER1_V4: Ipv4Addr = Ipv4Addr::new(10, 8, 0, 2);
const PEER1_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// Peer 2: IPv4 range 10.9.0.0/16.
const PEER2: PeerId = 2;
const PEER2_NET: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 0);
const PEER2_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 4, 4);
/// Peer 4: IPv4 range 10.9.3.0/24, nested in peer 2's (longest prefix wins).
const PEER4: PeerId = 4;
const PEER4_NET: Ipv4Addr = Ipv4Addr::new(10, 9, 3, 0);
const PEER4_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 3, 4);
/// Peer 3: IPv6 range fd01::/64.
const PEER3: PeerId = 3;
const PEER3_NET: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0);
const PEER3_V6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 1, 2);
/// Peer 5: IPv6 range fd01::ab:cd00/120, nested in peer 3's.
const PEER5: PeerId = 5;
const PEER5_NET: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0xab, 0xcd00);
const PEER5_V6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0xab, 0xcd42);
/// An address of no peer (inside the tunnel's address space).
const STRANGER_V4: Ipv4Addr = Ipv4Addr::new(10, 7, 7, 7);
const STRANGER_V6: Ipv6Addr = Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, 9);

/// An internet host in no list.
const CLEAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLEAN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1ea, 0, 0, 0, 0, 1);
/// A /24 in list `LIST_NET`.
const BLOCKED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const LIST_NET: ListId = 5;
/// 203.0.112.0/24, in list `LIST_EVEN`: its DIR-24 entry shares a map element (an entry
/// pair) with `BLOCKED`'s /24, as the even half.
const LIST_EVEN: ListId = 8;
const IN_EVEN: Ipv4Addr = Ipv4Addr::new(203, 0, 112, 5);
/// A /32 (203.0.113.77) in list `LIST_HOST`.
const LIST_HOST: ListId = 6;
const IN_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);
/// A /25 (203.0.113.128/25) in list `LIST_25`.
const LIST_25: ListId = 7;
const IN_25: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
/// An allow hole (list 0) 203.0.113.16/28 inside the blocked /24.
const HOLE_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 16);
const IN_HOLE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// An IPv6 /48 in list `LIST_V6`.
const BLOCKED6_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 0);
const BLOCKED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 1);
const LIST_V6: ListId = 9;

/// Bit of a DIR entry's long-prefix mask for prefix length `len`.
const fn len_bit(len: u8) -> u8 {
    1 << (len - 25)
}

// ---- expectations ----

#[derive(Clone, Copy, Debug)]
enum Prog {
    Xdp,
    In,
    Out,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerDelta {
    Rx,
    Tx,
    Drop(DropReason),
}

struct Case {
    name: &'static str,
    prog: Prog,
    /// Ethernet frame for XDP, raw IP packet for the tunnel device.
    packet: fn() -> Vec<u8>,
    setup: Box<dyn Fn(&mut Fixture)>,
    verdict: u32,
    /// `COUNTERS` slots that count this packet (once, with its length); all others stay.
    counters: Vec<u32>,
    list_hit: Option<ListId>,
    peer: Option<(PeerId, PeerDelta)>,
}

fn drop_slot(r: DropReason) -> u32 {
    DROPS_BASE + r as u32
}

fn name_of(slot: u32) -> String {
    COUNTER_NAMES
        .iter()
        .find(|(s, _)| *s == slot)
        .map(|(_, n)| (*n).to_owned())
        .or_else(|| {
            slot.checked_sub(DROPS_BASE)
                .and_then(DropReason::from_u32)
                .map(|r| format!("drops[{}]", r.name()))
        })
        .unwrap_or_else(|| format!("slot {slot}"))
}

/// Everything a packet could have changed.
struct Snapshot {
    counters: Vec<Counter>,
    lists: Vec<Counter>,
    peers: Vec<PeerStats>,
}

const WATCHED_IDS: u32 = 16;

fn snapshot(f: &mut Fixture) -> Snapshot {
    Snapshot {
        counters: f.counters(),
        lists: (0..WATCHED_IDS).map(|i| f.list_hits(i)).collect(),
        peers: (0..WATCHED_IDS).map(|i| f.peer_stats(i)).collect(),
    }
}

fn sub(a: &Counter, b: &Counter) -> Counter {
    Counter {
        packets: a.packets - b.packets,
        bytes: a.bytes - b.bytes,
    }
}

/// Checks the change from `before` to `after` for one skb counted as `one` (one packet of its
/// length; a GSO skb: its segments); returns the mismatches.
fn check_deltas(
    before: &Snapshot,
    after: &Snapshot,
    one: Counter,
    counters: &[u32],
    list_hit: Option<ListId>,
    peer: Option<(PeerId, PeerDelta)>,
) -> Vec<String> {
    let mut errors = Vec::new();
    for (slot, (b, a)) in before.counters.iter().zip(&after.counters).enumerate() {
        let slot = slot as u32;
        let want = if counters.contains(&slot)
            && (slot == EVENTS_EMITTED || slot == EVENTS_LOST || slot == FLOWS_TABLE_FULL)
        {
            // Event counters count records (table-full counts refusals); their bytes stay 0.
            Counter {
                packets: 1,
                bytes: 0,
            }
        } else if counters.contains(&slot) {
            one
        } else {
            Counter::default()
        };
        let got = sub(a, b);
        if got != want {
            errors.push(format!(
                "COUNTERS {}: got {got:?}, want {want:?}",
                name_of(slot)
            ));
        }
    }
    for (id, (b, a)) in before.lists.iter().zip(&after.lists).enumerate() {
        let id = id as u32;
        let want = if list_hit == Some(id) {
            one
        } else {
            Counter::default()
        };
        let got = sub(a, b);
        if got != want {
            errors.push(format!("LIST_HITS[{id}]: got {got:?}, want {want:?}"));
        }
    }
    for (id, (b, a)) in before.peers.iter().zip(&after.peers).enumerate() {
        let id = id as u32;
        let mut want = PeerStats::default();
        match peer {
            Some((p, PeerDelta::Rx)) if p == id => {
                want.rx_packets = one.packets;
                want.rx_bytes = one.bytes;
            }
            Some((p, PeerDelta::Tx)) if p == id => {
                want.tx_packets = one.packets;
                want.tx_bytes = one.bytes;
            }
            Some((p, PeerDelta::Drop(r))) if p == id => want.drops[r as usize] = one.packets,
            _ => {}
        }
        let mut got = *a;
        got.rx_packets -= b.rx_packets;
        got.rx_bytes -= b.rx_bytes;
        got.tx_packets -= b.tx_packets;
        got.tx_bytes -= b.tx_bytes;
        for (g, bb) in got.drops.iter_mut().zip(b.drops) {
            *g -= bb;
        }
        if got != want {
            errors.push(format!("peer {id}'s counters: got {got:?}, want {want:?}"));
        }
    }
    errors
}

fn run(f: &mut Fixture, prog: Prog, packet: &[u8]) -> u32 {
    match prog {
        Prog::Xdp => f.run_xdp(packet),
        Prog::In => f.run_tc(Tc::Ingress, packet),
        Prog::Out => f.run_tc(Tc::Egress, packet),
    }
}

fn run_table(cases: Vec<Case>) {
    let mut failures = Vec::new();
    let total = cases.len();
    for case in cases {
        let mut f = Fixture::load();
        (case.setup)(&mut f);
        let packet = (case.packet)();
        let before = snapshot(&mut f);
        let verdict = run(&mut f, case.prog, &packet);
        let after = snapshot(&mut f);
        let mut errors = check_deltas(
            &before,
            &after,
            Counter {
                packets: 1,
                bytes: packet.len() as u64,
            },
            &case.counters,
            case.list_hit,
            case.peer,
        );
        if verdict != case.verdict {
            errors.insert(0, format!("verdict {verdict}, want {}", case.verdict));
        }
        if errors.is_empty() {
            eprintln!("ok   {} ({:?})", case.name, case.prog);
        } else {
            eprintln!("FAIL {} ({:?})", case.name, case.prog);
            failures.push(format!("{}:\n    {}", case.name, errors.join("\n    ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Verdict, counted slots and per-peer delta of a tunnel-device case without a list hit.
type PeerExpect = (u32, Vec<u32>, Option<(PeerId, PeerDelta)>);

/// A tunnel-device case without a list hit.
fn peer_case(
    name: &'static str,
    prog: Prog,
    packet: fn() -> Vec<u8>,
    setup: impl Fn(&mut Fixture) + 'static,
    (verdict, counters, peer): PeerExpect,
) -> Case {
    Case {
        name,
        prog,
        packet,
        setup: Box::new(setup),
        verdict,
        counters,
        list_hit: None,
        peer,
    }
}

/// Passed from `peer` and counted in its `rx_*`.
fn pass_in(peer: PeerId) -> PeerExpect {
    (TC_ACT_OK, vec![TC_IN_PASS], Some((peer, PeerDelta::Rx)))
}

/// Passed to `peer` and counted in its `tx_*`.
fn pass_out(peer: PeerId) -> PeerExpect {
    (TC_ACT_OK, vec![TC_OUT_PASS], Some((peer, PeerDelta::Tx)))
}

/// Dropped from `peer` because the destination is in a destination list.
fn blocklisted_in(peer: PeerId) -> PeerExpect {
    let r = DropReason::DestinationBlocklist;
    (
        TC_ACT_SHOT,
        vec![TC_IN_DROP_BLOCKLIST, drop_slot(r)],
        Some((peer, PeerDelta::Drop(r))),
    )
}

/// A case whose packet is dropped by a destination list hits `LIST_NET` (the list `lists`
/// puts `BLOCKED` in).
fn hits_list_net(mut case: Case) -> Case {
    if case.counters.contains(&TC_IN_DROP_BLOCKLIST) {
        case.list_hit = Some(LIST_NET);
    }
    case
}

// ---- setups ----

fn config(f: &mut Fixture, src_generation: u32, dst_generation: u32, flags: u32) {
    f.set_config(Config {
        src_generation,
        dst_generation,
        flags,
        layout_version: 1,
        ..Config::default()
    });
}

/// The guarded ports (WireGuard's UDP port, a proxy endpoint's TCP port), every peer, ranges
/// enabled.
fn base(f: &mut Fixture) {
    f.guard_port(WG_PORT);
    f.guard(PROXY_PORT, capybara_common::maps::GUARD_TCP);
    f.peer_v4(PEER1_V4, PEER1);
    f.peer_v6(PEER1_V6, PEER1);
    f.peer_v4_range(PEER2_NET, 16, PEER2);
    f.peer_v6_range(PEER3_NET, 64, PEER3);
    f.peer_v4_range(PEER4_NET, 24, PEER4);
    f.peer_v6_range(PEER5_NET, 120, PEER5);
    config(f, 0, 0, CONFIG_F_PEER_V4_RANGES | CONFIG_F_PEER_V6_RANGES);
}

/// Like [`base`] without the range flags: the tries hold ranges but must not be consulted.
fn base_no_range_flags(f: &mut Fixture) {
    base(f);
    config(f, 0, 0, 0);
}

/// `base` plus `CONFIG_F_DROP_UNKNOWN_PEER`.
fn base_drop_unknown(f: &mut Fixture) {
    base(f);
    config(
        f,
        0,
        0,
        CONFIG_F_PEER_V4_RANGES | CONFIG_F_PEER_V6_RANGES | CONFIG_F_DROP_UNKNOWN_PEER,
    );
}

/// The lists of generation `generation` of `lists`: the /24 of `BLOCKED` in `LIST_NET` with a
/// /32 (`LIST_HOST`), a /25 (`LIST_25`) and an allow hole /28 (list 0) under it, the /24 next
/// to it (`LIST_EVEN`), and the IPv6 /48 in `LIST_V6`.
fn lists(f: &mut Fixture, lists: Lists, generation: u8) {
    f.dir_entry(
        lists,
        u32::from(generation),
        BLOCKED,
        dir_entry(LIST_NET, len_bit(32) | len_bit(28) | len_bit(25)),
    );
    f.dir_entry(
        lists,
        u32::from(generation),
        IN_EVEN,
        dir_entry(LIST_EVEN, 0),
    );
    f.v4_long(lists, generation, IN_HOST, 32, LIST_HOST);
    f.v4_long(lists, generation, IN_25, 25, LIST_25);
    f.v4_long(lists, generation, HOLE_NET, 28, 0);
    f.v6_prefix(lists, generation, BLOCKED6_NET, 48, LIST_V6);
}

fn src_lists(f: &mut Fixture) {
    base(f);
    lists(f, Lists::Source, 0);
}

/// Source lists present but CONFIG says the active generation has no entries of `flag_cleared`'s
/// family: the lookup of that family is skipped.
fn src_lists_flag_cleared(f: &mut Fixture, flag_cleared: u32) {
    base(f);
    lists(f, Lists::Source, 0);
    let all = CONFIG_F_SRC_V4_LISTS
        | CONFIG_F_SRC_V6_LISTS
        | CONFIG_F_DST_V4_LISTS
        | CONFIG_F_DST_V6_LISTS;
    f.set_config_exact(Config {
        flags: (CONFIG_F_PEER_V4_RANGES | CONFIG_F_PEER_V6_RANGES | all) & !flag_cleared,
        ..Config::default()
    });
}

fn src_lists_v4_flag_cleared(f: &mut Fixture) {
    src_lists_flag_cleared(f, CONFIG_F_SRC_V4_LISTS);
}

fn src_lists_v6_flag_cleared(f: &mut Fixture) {
    src_lists_flag_cleared(f, CONFIG_F_SRC_V6_LISTS);
}

fn src_lists_gen1_inactive(f: &mut Fixture) {
    base(f);
    lists(f, Lists::Source, 1);
}

fn src_lists_gen1_active(f: &mut Fixture) {
    base(f);
    lists(f, Lists::Source, 1);
    config(f, 1, 0, CONFIG_F_PEER_V4_RANGES | CONFIG_F_PEER_V6_RANGES);
}

fn dst_lists(f: &mut Fixture) {
    base(f);
    lists(f, Lists::Destination, 0);
}

fn dst_lists_drop_unknown(f: &mut Fixture) {
    base_drop_unknown(f);
    lists(f, Lists::Destination, 0);
}

fn dst_lists_gen1_inactive(f: &mut Fixture) {
    base(f);
    lists(f, Lists::Destination, 1);
}

fn dst_lists_gen1_active(f: &mut Fixture) {
    base(f);
    lists(f, Lists::Destination, 1);
    config(f, 0, 1, CONFIG_F_PEER_V4_RANGES | CONFIG_F_PEER_V6_RANGES);
}

/// The peer's own address in the destination lists (to prove which end is checked).
fn peer1_in_dst_list(f: &mut Fixture) {
    base(f);
    f.dir_entry(Lists::Destination, 0, PEER1_V4, dir_entry(LIST_NET, 0));
}

/// A /32 in the long-prefix hash whose length the DIR entry's mask does *not* name.
fn long_without_mask_bit(f: &mut Fixture) {
    base(f);
    f.dir_entry(Lists::Source, 0, BLOCKED, dir_entry(0, len_bit(25)));
    f.v4_long(Lists::Source, 0, BLOCKED, 32, LIST_HOST);
}

/// Overlapping /32 and /25 for the same address: the longer one wins.
fn overlapping_long(f: &mut Fixture) {
    base(f);
    f.dir_entry(
        Lists::Source,
        0,
        IN_25,
        dir_entry(LIST_NET, len_bit(32) | len_bit(25)),
    );
    f.v4_long(Lists::Source, 0, IN_25, 25, LIST_25);
    f.v4_long(Lists::Source, 0, IN_25, 32, LIST_HOST);
}

// ---- packets ----

fn wg4(src: Ipv4Addr) -> Vec<u8> {
    packets::udp4(src, SERVER, 40000, WG_PORT, 148)
}

fn wg6(src: Ipv6Addr) -> Vec<u8> {
    packets::udp6(src, SERVER6, 40000, WG_PORT, 148)
}

// ---- the XDP table ----

fn xdp_case(
    name: &'static str,
    packet: fn() -> Vec<u8>,
    setup: fn(&mut Fixture),
    verdict: u32,
    counters: Vec<u32>,
    list_hit: Option<ListId>,
) -> Case {
    Case {
        name,
        prog: Prog::Xdp,
        packet,
        setup: Box::new(setup),
        verdict,
        counters,
        list_hit,
        peer: None,
    }
}

fn xdp_cases() -> Vec<Case> {
    let drop = |list: ListId| {
        (
            XDP_DROP,
            vec![XDP_DROP_BLOCKLIST, drop_slot(DropReason::SourceBlocklist)],
            Some(list),
        )
    };
    let clean = (XDP_PASS, vec![XDP_PASS_CLEAN], None);
    let unguarded = (XDP_PASS, vec![XDP_PASS_UNGUARDED], None);
    let malformed = (XDP_PASS, vec![XDP_PASS_MALFORMED], None);
    let fragment = (XDP_PASS, vec![XDP_PASS_FRAGMENT], None);
    let unparseable = |list: ListId| {
        (
            XDP_DROP,
            vec![XDP_DROP_UNPARSEABLE, drop_slot(DropReason::Unparseable)],
            Some(list),
        )
    };
    let unparseable_pass = (XDP_PASS, vec![XDP_PASS_UNPARSEABLE], None);
    type Expect = (u32, Vec<u32>, Option<ListId>);
    let c = |name: &'static str,
             packet: fn() -> Vec<u8>,
             setup: fn(&mut Fixture),
             (verdict, counters, list): Expect| {
        xdp_case(name, packet, setup, verdict, counters, list)
    };
    vec![
        c(
            "clean v4 source passes",
            || packets::eth_ip(&wg4(CLEAN)),
            src_lists,
            clean.clone(),
        ),
        c(
            "clean v6 source passes",
            || packets::eth_ip(&wg6(CLEAN6)),
            src_lists,
            clean.clone(),
        ),
        c(
            "v4 source in a /24 (DIR entry) dropped",
            || packets::eth_ip(&wg4(BLOCKED)),
            src_lists,
            drop(LIST_NET),
        ),
        c(
            "v4 source in the even /24 of a DIR entry pair dropped",
            || packets::eth_ip(&wg4(IN_EVEN)),
            src_lists,
            drop(LIST_EVEN),
        ),
        c(
            "v4 source in a /32 (long prefix) dropped",
            || packets::eth_ip(&wg4(IN_HOST)),
            src_lists,
            drop(LIST_HOST),
        ),
        c(
            "v4 source in a /25 (long prefix) dropped",
            || packets::eth_ip(&wg4(IN_25)),
            src_lists,
            drop(LIST_25),
        ),
        c(
            "v4 allow hole (list 0) inside a blocked /24 passes",
            || packets::eth_ip(&wg4(IN_HOLE)),
            src_lists,
            clean.clone(),
        ),
        c(
            "long prefix whose length is not in the mask is not probed",
            || packets::eth_ip(&wg4(BLOCKED)),
            long_without_mask_bit,
            clean.clone(),
        ),
        c(
            "overlapping long prefixes: longest first",
            || packets::eth_ip(&wg4(IN_25)),
            overlapping_long,
            drop(LIST_HOST),
        ),
        c(
            "v6 source in a /48 dropped",
            || packets::eth_ip(&wg6(BLOCKED6)),
            src_lists,
            drop(LIST_V6),
        ),
        // The proxy endpoints' TCP port: every segment of a client's connection is guarded.
        c(
            "blocked v4 source, TCP SYN to a guarded proxy port dropped",
            || packets::eth_ip(&packets::tcp4(BLOCKED, SERVER, 40000, PROXY_PORT, 0)),
            src_lists,
            drop(LIST_NET),
        ),
        c(
            "blocked v6 source, TCP data to a guarded proxy port dropped",
            || packets::eth_ip(&packets::tcp6(BLOCKED6, SERVER6, 40000, PROXY_PORT, 100)),
            src_lists,
            drop(LIST_V6),
        ),
        c(
            "clean source, TCP to a guarded proxy port passes",
            || packets::eth_ip(&packets::tcp4(CLEAN, SERVER, 40000, PROXY_PORT, 100)),
            src_lists,
            clean.clone(),
        ),
        c(
            "blocked source, UDP to a port guarded for TCP only passes",
            || packets::eth_ip(&packets::udp4(BLOCKED, SERVER, 40000, PROXY_PORT, 40)),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "blocked source, TCP from a guarded proxy port (a reply to an upstream) passes",
            || packets::eth_ip(&packets::tcp4(BLOCKED, SERVER, PROXY_PORT, 40000, 100)),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "v4 lists of the inactive generation have no effect",
            || packets::eth_ip(&wg4(BLOCKED)),
            src_lists_gen1_inactive,
            clean.clone(),
        ),
        c(
            "v4 lookup skipped when CONFIG says the generation has no v4 entries",
            || packets::eth_ip(&wg4(BLOCKED)),
            src_lists_v4_flag_cleared,
            clean.clone(),
        ),
        c(
            "v6 lookup skipped when CONFIG says the generation has no v6 entries",
            || packets::eth_ip(&wg6(BLOCKED6)),
            src_lists_v6_flag_cleared,
            clean.clone(),
        ),
        c(
            "v4 lookup still done when only the v6 bit is clear",
            || packets::eth_ip(&wg4(BLOCKED)),
            src_lists_v6_flag_cleared,
            drop(LIST_NET),
        ),
        c(
            "v4 long prefix of the inactive generation has no effect",
            || packets::eth_ip(&wg4(IN_HOST)),
            src_lists_gen1_inactive,
            clean.clone(),
        ),
        c(
            "v6 lists of the inactive generation have no effect",
            || packets::eth_ip(&wg6(BLOCKED6)),
            src_lists_gen1_inactive,
            clean.clone(),
        ),
        c(
            "v4 lists of generation 1 live when active",
            || packets::eth_ip(&wg4(IN_HOST)),
            src_lists_gen1_active,
            drop(LIST_HOST),
        ),
        c(
            "v6 lists of generation 1 live when active",
            || packets::eth_ip(&wg6(BLOCKED6)),
            src_lists_gen1_active,
            drop(LIST_V6),
        ),
        c(
            "source lists do not act on the tunnel side's lists",
            || packets::eth_ip(&wg4(BLOCKED)),
            dst_lists,
            clean.clone(),
        ),
        c(
            "blocked source to an unguarded UDP port passes",
            || packets::eth_ip(&packets::udp4(BLOCKED, SERVER, 53, 40000, 40)),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "blocked v6 source to an unguarded UDP port passes",
            || packets::eth_ip(&packets::udp6(BLOCKED6, SERVER6, 443, 40000, 40)),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "blocked source, TCP to the WireGuard port passes",
            || packets::eth_ip(&packets::tcp4(BLOCKED, SERVER, 443, WG_PORT, 0)),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "blocked source, ICMP passes",
            || packets::eth_ip(&packets::icmp4(BLOCKED, SERVER, 56)),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "blocked v6 source, ICMPv6 passes",
            || packets::eth_ip(&packets::icmp6(BLOCKED6, SERVER6, 56)),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "blocked v6 source, TCP passes",
            || packets::eth_ip(&packets::tcp6(BLOCKED6, SERVER6, 443, WG_PORT, 10)),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "ARP passes",
            || packets::eth(ethertype::ARP, &[0u8; 28]),
            src_lists,
            unguarded.clone(),
        ),
        c(
            "no guarded port configured: blocked source passes",
            || packets::eth_ip(&wg4(BLOCKED)),
            |f| lists(f, Lists::Source, 0),
            unguarded.clone(),
        ),
        c(
            "802.1Q tagged blocked source dropped",
            || packets::eth_vlan_ip(ethertype::VLAN, 42, &wg4(BLOCKED)),
            src_lists,
            drop(LIST_NET),
        ),
        c(
            "802.1ad tagged blocked v6 source dropped",
            || packets::eth_vlan_ip(ethertype::QINQ, 42, &wg6(BLOCKED6)),
            src_lists,
            drop(LIST_V6),
        ),
        c(
            "802.1Q tagged clean source passes",
            || packets::eth_vlan_ip(ethertype::VLAN, 7, &wg4(CLEAN)),
            src_lists,
            clean.clone(),
        ),
        c(
            "v4 with options: blocked source dropped",
            || packets::eth_ip(&v4_with_options(BLOCKED, 8)),
            src_lists,
            drop(LIST_NET),
        ),
        c(
            "v4 non-first fragment of a blocked source passes",
            || packets::eth_ip(&v4_fragment(BLOCKED, 100, false)),
            src_lists,
            fragment.clone(),
        ),
        c(
            "v4 first fragment of a blocked source dropped",
            || packets::eth_ip(&v4_fragment(BLOCKED, 0, true)),
            src_lists,
            drop(LIST_NET),
        ),
        c(
            "v6 non-first fragment of a blocked source passes",
            || {
                packets::eth_ip(&v6_ext(
                    BLOCKED6,
                    &[Ext::Fragment {
                        offset_8: 10,
                        more: false,
                    }],
                ))
            },
            src_lists,
            fragment.clone(),
        ),
        c(
            "v6 first fragment of a blocked source dropped",
            || {
                packets::eth_ip(&v6_ext(
                    BLOCKED6,
                    &[Ext::Fragment {
                        offset_8: 0,
                        more: true,
                    }],
                ))
            },
            src_lists,
            drop(LIST_V6),
        ),
        c(
            "v6 with 4 extension headers: blocked source dropped",
            || packets::eth_ip(&v6_ext(BLOCKED6, &FOUR_EXTS)),
            src_lists,
            drop(LIST_V6),
        ),
        c(
            "v6 with 4 extension headers: clean source passes",
            || packets::eth_ip(&v6_ext(CLEAN6, &FOUR_EXTS)),
            src_lists,
            clean.clone(),
        ),
        // Deeper than the guard parses: the UDP port is unknown, so a listed source is dropped
        // (it could be a handshake) and a clean one passes (it would pass whatever its port).
        c(
            "v6 with 5 extension headers from a blocked source dropped as unparseable",
            || packets::eth_ip(&v6_ext(BLOCKED6, &FIVE_EXTS)),
            src_lists,
            unparseable(LIST_V6),
        ),
        c(
            "v6 with 5 extension headers from a clean source passes as unparseable",
            || packets::eth_ip(&v6_ext(CLEAN6, &FIVE_EXTS)),
            src_lists,
            unparseable_pass.clone(),
        ),
        c(
            "v6 UDP header past 1024 bytes from a blocked source dropped as unparseable",
            || packets::eth_ip(&v6_ext(BLOCKED6, &DEEP_EXTS)),
            src_lists,
            unparseable(LIST_V6),
        ),
        c(
            "v6 UDP header past 1024 bytes from a clean source passes as unparseable",
            || packets::eth_ip(&v6_ext(CLEAN6, &DEEP_EXTS)),
            src_lists,
            unparseable_pass.clone(),
        ),
        c(
            "v6 4th extension header past 1024 bytes from a blocked source dropped as unparseable",
            || packets::eth_ip(&v6_ext(BLOCKED6, &DEEP_FOUR_EXTS)),
            src_lists,
            unparseable(LIST_V6),
        ),
        // TCP ports are guarded too (the proxy endpoints'): a TCP header past the bound hides its
        // port as a UDP one does. A transport the guard never guards passes.
        c(
            "v6 TCP header past 1024 bytes from a blocked source dropped as unparseable",
            || {
                packets::eth_ip(&set_byte(
                    v6_ext(BLOCKED6, &DEEP_EXTS),
                    40,
                    packets::proto::TCP,
                ))
            },
            src_lists,
            unparseable(LIST_V6),
        ),
        c(
            "v6 ICMPv6 past 1024 bytes from a blocked source passes (never guarded)",
            || {
                packets::eth_ip(&set_byte(
                    v6_ext(BLOCKED6, &DEEP_EXTS),
                    40,
                    packets::proto::ICMPV6,
                ))
            },
            src_lists,
            unguarded.clone(),
        ),
        c(
            "IPv4 EtherType without an IP header is malformed",
            || packets::eth(ethertype::IPV4, &[]),
            src_lists,
            malformed.clone(),
        ),
        c(
            "v4 IHL 4 is malformed",
            || packets::eth_ip(&set_byte(wg4(BLOCKED), 0, 0x44)),
            src_lists,
            malformed.clone(),
        ),
        c(
            "v4 EtherType with version 6 is malformed",
            || packets::eth(ethertype::IPV4, &wg6(BLOCKED6)),
            src_lists,
            malformed.clone(),
        ),
        c(
            "v4 IHL beyond the packet is malformed",
            || packets::eth_ip(&set_byte(packets::truncated(&wg4(BLOCKED), 24), 0, 0x4f)),
            src_lists,
            malformed.clone(),
        ),
        c(
            "v4 non-first fragment with IHL beyond the packet is malformed",
            || {
                let mut p = packets::truncated(&v4_fragment(BLOCKED, 100, false), 24);
                p[0] = 0x4f;
                packets::eth_ip(&p)
            },
            src_lists,
            malformed.clone(),
        ),
    ]
}

const FOUR_EXTS: [Ext; 4] = [
    Ext::HopByHop { extra_8: 1 },
    Ext::Routing,
    Ext::DestOpts { extra_8: 0 },
    Ext::Fragment {
        offset_8: 0,
        more: true,
    },
];
const FIVE_EXTS: [Ext; 5] = [
    Ext::HopByHop { extra_8: 0 },
    Ext::Routing,
    Ext::DestOpts { extra_8: 0 },
    Ext::Routing,
    Ext::DestOpts { extra_8: 2 },
];

/// One hop-by-hop header of 1 024 bytes: the UDP header starts at byte 1 078 of the frame
/// (1 064 of a tunnel packet behind the test's 14-byte link header), past
/// `MAX_HEADER_OFFSET`. (The PadN option's length byte wraps; the programs never read
/// options.)
const DEEP_EXTS: [Ext; 1] = [Ext::HopByHop { extra_8: 127 }];
/// Four extension headers (as many as the parser follows), the fourth starting at byte 1 094 of
/// the frame, past `MAX_HEADER_OFFSET`.
const DEEP_FOUR_EXTS: [Ext; 4] = [
    Ext::HopByHop { extra_8: 0 },
    Ext::Routing,
    Ext::DestOpts { extra_8: 127 },
    Ext::Routing,
];

fn set_byte(mut p: Vec<u8>, at: usize, v: u8) -> Vec<u8> {
    p[at] = v;
    p
}

fn v4_with_options(src: Ipv4Addr, opt_len: usize) -> Vec<u8> {
    // UDP to the WireGuard port behind `opt_len` bytes of NOP options.
    let inner = wg4(src);
    packets::ipv4_with_options(
        src,
        SERVER,
        packets::proto::UDP,
        &vec![1u8; opt_len],
        &inner[20..],
    )
}

fn v4_fragment(src: Ipv4Addr, offset_8: u16, more: bool) -> Vec<u8> {
    let mut p = wg4(src);
    packets::set_ipv4_fragment(&mut p, offset_8, more);
    p
}

fn v6_ext(src: Ipv6Addr, exts: &[Ext]) -> Vec<u8> {
    packets::udp6_with_ext(src, SERVER6, 40000, WG_PORT, 100, exts)
}

#[test]
fn xdp_guard_table() {
    run_table(xdp_cases());
}

// ---- the tunnel-device table ----

fn tc_cases() -> Vec<Case> {
    type Expect = (u32, Vec<u32>, Option<ListId>, Option<(PeerId, PeerDelta)>);
    let pass_in = |peer: PeerId| {
        (
            TC_ACT_OK,
            vec![TC_IN_PASS],
            None,
            Some((peer, PeerDelta::Rx)),
        )
    };
    let pass_out = |peer: PeerId| {
        (
            TC_ACT_OK,
            vec![TC_OUT_PASS],
            None,
            Some((peer, PeerDelta::Tx)),
        )
    };
    let unknown_in = (TC_ACT_OK, vec![TC_IN_UNKNOWN_PEER], None, None);
    let unknown_out = (TC_ACT_OK, vec![TC_OUT_UNKNOWN_PEER], None, None);
    let dest = DropReason::DestinationBlocklist;
    let blocked_in = |list: ListId, peer: Option<PeerId>| -> Expect {
        (
            TC_ACT_SHOT,
            vec![TC_IN_DROP_BLOCKLIST, drop_slot(dest)],
            Some(list),
            peer.map(|p| (p, PeerDelta::Drop(dest))),
        )
    };
    let blocked_out = |list: ListId, peer: Option<PeerId>| -> Expect {
        (
            TC_ACT_SHOT,
            vec![TC_OUT_DROP_BLOCKLIST, drop_slot(dest)],
            Some(list),
            peer.map(|p| (p, PeerDelta::Drop(dest))),
        )
    };
    let malformed_in = (TC_ACT_OK, vec![TC_IN_MALFORMED], None, None);
    let malformed_out = (TC_ACT_OK, vec![TC_OUT_MALFORMED], None, None);
    let c = |name: &'static str,
             prog: Prog,
             packet: fn() -> Vec<u8>,
             setup: fn(&mut Fixture),
             (verdict, counters, list_hit, peer): Expect| Case {
        name,
        prog,
        packet,
        setup: Box::new(setup),
        verdict,
        counters,
        list_hit,
        peer,
    };
    use Prog::{In, Out};
    vec![
        // Attribution.
        c(
            "v4 host route: ingress by source",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            base,
            pass_in(PEER1),
        ),
        c(
            "v4 host route: egress by destination",
            Out,
            || packets::udp4(CLEAN, PEER1_V4, 53, 4000, 60),
            base,
            pass_out(PEER1),
        ),
        c(
            "ingress is not attributed by destination",
            In,
            || packets::udp4(CLEAN, PEER1_V4, 53, 4000, 60),
            base,
            unknown_in.clone(),
        ),
        c(
            "egress is not attributed by source",
            Out,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            base,
            unknown_out.clone(),
        ),
        c(
            "v4 range via LPM: ingress",
            In,
            || packets::tcp4(PEER2_V4, CLEAN, 4000, 443, 100),
            base,
            pass_in(PEER2),
        ),
        c(
            "v4 range via LPM: egress",
            Out,
            || packets::tcp4(CLEAN, PEER2_V4, 443, 4000, 1000),
            base,
            pass_out(PEER2),
        ),
        c(
            "v4 range ignored without CONFIG_F_PEER_V4_RANGES",
            In,
            || packets::tcp4(PEER2_V4, CLEAN, 4000, 443, 100),
            base_no_range_flags,
            unknown_in.clone(),
        ),
        c(
            "v4 host route works without range flags",
            In,
            || packets::icmp4(PEER1_V4, CLEAN, 56),
            base_no_range_flags,
            pass_in(PEER1),
        ),
        c(
            "v6 host route: ingress by source",
            In,
            || packets::udp6(PEER1_V6, CLEAN6, 4000, 53, 60),
            base,
            pass_in(PEER1),
        ),
        c(
            "v6 host route: egress by destination",
            Out,
            || packets::icmp6(CLEAN6, PEER1_V6, 56),
            base,
            pass_out(PEER1),
        ),
        c(
            "v6 range via LPM: ingress",
            In,
            || packets::tcp6(PEER3_V6, CLEAN6, 4000, 443, 10),
            base,
            pass_in(PEER3),
        ),
        c(
            "v6 range via LPM: egress",
            Out,
            || packets::udp6(CLEAN6, PEER3_V6, 443, 4000, 1200),
            base,
            pass_out(PEER3),
        ),
        c(
            "nested v4 range: the longest prefix wins (ingress)",
            In,
            || packets::udp4(PEER4_V4, CLEAN, 4000, 53, 10),
            base,
            pass_in(PEER4),
        ),
        c(
            "nested v6 range: the longest prefix wins (egress)",
            Out,
            || packets::udp6(CLEAN6, PEER5_V6, 53, 4000, 10),
            base,
            pass_out(PEER5),
        ),
        c(
            "v6 range ignored without CONFIG_F_PEER_V6_RANGES",
            Out,
            || packets::udp6(CLEAN6, PEER3_V6, 443, 4000, 1200),
            base_no_range_flags,
            unknown_out.clone(),
        ),
        // Unknown peers.
        c(
            "unknown v4 peer counted and passed (ingress)",
            In,
            || packets::udp4(STRANGER_V4, CLEAN, 1, 2, 10),
            base,
            unknown_in.clone(),
        ),
        c(
            "unknown v6 peer counted and passed (egress)",
            Out,
            || packets::udp6(CLEAN6, STRANGER_V6, 1, 2, 10),
            base,
            unknown_out.clone(),
        ),
        c(
            "unknown peer dropped with CONFIG_F_DROP_UNKNOWN_PEER (ingress)",
            In,
            || packets::udp4(STRANGER_V4, CLEAN, 1, 2, 10),
            base_drop_unknown,
            (
                TC_ACT_SHOT,
                vec![TC_IN_DROP_UNKNOWN, drop_slot(DropReason::UnknownPeer)],
                None,
                None,
            ),
        ),
        c(
            "unknown peer dropped with CONFIG_F_DROP_UNKNOWN_PEER (egress)",
            Out,
            || packets::udp6(CLEAN6, STRANGER_V6, 1, 2, 10),
            base_drop_unknown,
            (
                TC_ACT_SHOT,
                vec![TC_OUT_DROP_UNKNOWN, drop_slot(DropReason::UnknownPeer)],
                None,
                None,
            ),
        ),
        c(
            "known peer still passes with CONFIG_F_DROP_UNKNOWN_PEER",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 1, 2, 10),
            base_drop_unknown,
            pass_in(PEER1),
        ),
        // Destination blocklists.
        c(
            "ingress: destination in a /24 dropped",
            In,
            || packets::udp4(PEER1_V4, BLOCKED, 4000, 53, 60),
            dst_lists,
            blocked_in(LIST_NET, Some(PEER1)),
        ),
        c(
            "egress: source in a /24 dropped",
            Out,
            || packets::udp4(BLOCKED, PEER1_V4, 53, 4000, 60),
            dst_lists,
            blocked_out(LIST_NET, Some(PEER1)),
        ),
        c(
            "egress: source in the even /24 of a DIR entry pair dropped",
            Out,
            || packets::udp4(IN_EVEN, PEER1_V4, 53, 4000, 60),
            dst_lists,
            blocked_out(LIST_EVEN, Some(PEER1)),
        ),
        c(
            "ingress: destination in a /32 dropped",
            In,
            || packets::tcp4(PEER2_V4, IN_HOST, 4000, 443, 0),
            dst_lists,
            blocked_in(LIST_HOST, Some(PEER2)),
        ),
        c(
            "egress: source in a /25 dropped",
            Out,
            || packets::tcp4(IN_25, PEER2_V4, 443, 4000, 0),
            dst_lists,
            blocked_out(LIST_25, Some(PEER2)),
        ),
        c(
            "ingress: allow hole inside a blocked /24 passes",
            In,
            || packets::udp4(PEER1_V4, IN_HOLE, 4000, 53, 60),
            dst_lists,
            pass_in(PEER1),
        ),
        c(
            "ingress: v6 destination in a /48 dropped",
            In,
            || packets::udp6(PEER1_V6, BLOCKED6, 4000, 53, 60),
            dst_lists,
            blocked_in(LIST_V6, Some(PEER1)),
        ),
        c(
            "egress: v6 source in a /48 dropped",
            Out,
            || packets::tcp6(BLOCKED6, PEER3_V6, 443, 4000, 0),
            dst_lists,
            blocked_out(LIST_V6, Some(PEER3)),
        ),
        c(
            "ingress checks the destination, not the peer's source",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 1, 2, 3),
            peer1_in_dst_list,
            pass_in(PEER1),
        ),
        c(
            "egress checks the source, not the peer's destination",
            Out,
            || packets::udp4(CLEAN, PEER1_V4, 1, 2, 3),
            peer1_in_dst_list,
            pass_out(PEER1),
        ),
        c(
            "unknown peer: blocked destination still dropped (ingress)",
            In,
            || packets::udp4(STRANGER_V4, BLOCKED, 1, 2, 3),
            dst_lists,
            blocked_in(LIST_NET, None),
        ),
        c(
            "unknown peer: blocked source still dropped (egress)",
            Out,
            || packets::udp6(BLOCKED6, STRANGER_V6, 1, 2, 3),
            dst_lists_drop_unknown,
            blocked_out(LIST_V6, None),
        ),
        c(
            "destination lists of the inactive generation have no effect",
            In,
            || packets::udp4(PEER1_V4, IN_HOST, 1, 2, 3),
            dst_lists_gen1_inactive,
            pass_in(PEER1),
        ),
        c(
            "v6 destination lists of the inactive generation have no effect",
            Out,
            || packets::udp6(BLOCKED6, PEER1_V6, 1, 2, 3),
            dst_lists_gen1_inactive,
            pass_out(PEER1),
        ),
        c(
            "destination lists of generation 1 live when active",
            In,
            || packets::udp4(PEER1_V4, IN_HOST, 1, 2, 3),
            dst_lists_gen1_active,
            blocked_in(LIST_HOST, Some(PEER1)),
        ),
        c(
            "source lists do not act on the tunnel device",
            In,
            || packets::udp4(PEER1_V4, BLOCKED, 1, 2, 3),
            src_lists,
            pass_in(PEER1),
        ),
        // Malformed.
        c(
            "empty packet is malformed (ingress)",
            In,
            Vec::new,
            base,
            malformed_in.clone(),
        ),
        c(
            "empty packet is malformed (egress)",
            Out,
            Vec::new,
            base,
            malformed_out.clone(),
        ),
        c(
            "version 5 is malformed",
            In,
            || set_byte(packets::udp4(PEER1_V4, CLEAN, 1, 2, 3), 0, 0x55),
            base,
            malformed_in.clone(),
        ),
        c(
            "v4 IHL 4 is malformed",
            Out,
            || set_byte(packets::udp4(CLEAN, PEER1_V4, 1, 2, 3), 0, 0x44),
            base,
            malformed_out.clone(),
        ),
        c(
            "v4 header cut at 19 bytes is malformed",
            In,
            || packets::truncated(&packets::udp4(PEER1_V4, CLEAN, 1, 2, 3), 19),
            base,
            malformed_in.clone(),
        ),
        c(
            "v6 header cut at 39 bytes is malformed",
            Out,
            || packets::truncated(&packets::udp6(CLEAN6, PEER1_V6, 1, 2, 3), 39),
            base,
            malformed_out.clone(),
        ),
        c(
            "v4 header alone (20 bytes) is attributed",
            In,
            || packets::truncated(&packets::udp4(PEER1_V4, CLEAN, 1, 2, 3), 20),
            base,
            pass_in(PEER1),
        ),
    ]
}

#[test]
fn tunnel_device_table() {
    run_table(tc_cases());
}

// ---- scenarios ----

/// All three programs pass the verifier (the fixture loads each one).
#[test]
fn programs_pass_the_verifier() {
    let mut f = Fixture::load();
    for name in ["xdp_guard", "tc_ingress", "tc_egress"] {
        let prog = f
            .ebpf()
            .program(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(prog.fd().is_ok(), "{name} is not loaded");
        // The verifier's work and the program's size, for the record (not asserted).
        let info = prog.info().expect("program info");
        eprintln!(
            "{name}: {} instructions verified, {} bytes translated",
            info.verified_instruction_count().unwrap_or(0),
            info.size_translated().unwrap_or(0),
        );
    }
}

/// Many packets of different sizes, both directions, IPv4 and IPv6 for one peer: the per-peer
/// and global byte counts are exactly the IP lengths sent.
#[test]
fn per_peer_bytes_and_packets_are_exact() {
    let mut f = Fixture::load();
    base(&mut f);
    let (mut rx_bytes, mut tx_bytes) = (0u64, 0u64);
    let sizes = [0usize, 1, 17, 100, 512, 1200, 1380];
    for (i, &n) in sizes.iter().enumerate() {
        let ins = [
            packets::udp4(PEER1_V4, CLEAN, 4000, 53, n),
            packets::tcp6(PEER1_V6, CLEAN6, 4000, 443, n + i),
        ];
        for p in &ins {
            assert_eq!(f.run_tc(Tc::Ingress, p), TC_ACT_OK);
            rx_bytes += p.len() as u64;
        }
        let out = packets::icmp4(CLEAN, PEER1_V4, n * 2);
        assert_eq!(f.run_tc(Tc::Egress, &out), TC_ACT_OK);
        tx_bytes += out.len() as u64;
    }
    // Other peers' traffic does not leak into peer 1.
    assert_eq!(
        f.run_tc(Tc::Ingress, &packets::udp4(PEER2_V4, CLEAN, 1, 2, 999)),
        TC_ACT_OK
    );

    let s = f.peer_stats(PEER1);
    let n = sizes.len() as u64;
    assert_eq!(
        (s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes),
        (2 * n, rx_bytes, n, tx_bytes),
        "peer 1 stats {s:?}"
    );
    assert_eq!(s.drops, [0; 16]);
    let c = f.counters();
    assert_eq!(c[TC_IN_PASS as usize].packets, 2 * n + 1);
    assert_eq!(c[TC_IN_PASS as usize].bytes, rx_bytes + 20 + 8 + 999);
    assert_eq!(
        c[TC_OUT_PASS as usize],
        Counter {
            packets: n,
            bytes: tx_bytes
        }
    );
    let s2 = f.peer_stats(PEER2);
    assert_eq!(
        (s2.rx_packets, s2.rx_bytes, s2.tx_packets),
        (1, 20 + 8 + 999, 0)
    );
}

/// Lists written into the inactive generation have no effect until CONFIG flips, and flipping
/// back retires them — for the source lists (XDP) and the destination lists (tunnel device).
#[test]
fn generation_flip_makes_lists_live_and_retires_them() {
    let mut f = Fixture::load();
    base(&mut f);
    lists(&mut f, Lists::Source, 1);
    lists(&mut f, Lists::Destination, 1);
    let flags = CONFIG_F_PEER_V4_RANGES | CONFIG_F_PEER_V6_RANGES;
    let up4 = packets::eth_ip(&wg4(IN_HOST));
    let up6 = packets::eth_ip(&wg6(BLOCKED6));
    let tun4 = packets::udp4(PEER1_V4, BLOCKED, 1, 2, 3);
    let tun6 = packets::udp6(BLOCKED6, PEER1_V6, 1, 2, 3);
    let verdicts = |f: &mut Fixture| {
        [
            f.run_xdp(&up4),
            f.run_xdp(&up6),
            f.run_tc(Tc::Ingress, &tun4),
            f.run_tc(Tc::Egress, &tun6),
        ]
    };
    let pass = [XDP_PASS, XDP_PASS, TC_ACT_OK, TC_ACT_OK];
    assert_eq!(
        verdicts(&mut f),
        pass,
        "generation 0 active: generation 1 lists must not act"
    );
    config(&mut f, 1, 0, flags);
    assert_eq!(
        verdicts(&mut f),
        [XDP_DROP, XDP_DROP, TC_ACT_OK, TC_ACT_OK],
        "source flipped"
    );
    config(&mut f, 1, 1, flags);
    assert_eq!(
        verdicts(&mut f),
        [XDP_DROP, XDP_DROP, TC_ACT_SHOT, TC_ACT_SHOT],
        "both flipped"
    );
    config(&mut f, 0, 0, flags);
    assert_eq!(verdicts(&mut f), pass, "flipped back");
    // Dropped while live: up4 twice (LIST_HOST), up6 twice and tun6 once (LIST_V6), tun4 once.
    assert_eq!(f.list_hits(LIST_HOST).packets, 2);
    assert_eq!(f.list_hits(LIST_V6).packets, 3);
    assert_eq!(f.list_hits(LIST_NET).packets, 1);
    assert_eq!(
        f.peer_stats(PEER1).drops[DropReason::DestinationBlocklist as usize],
        2
    );
}

/// Runs every prefix of `full` through `prog`: prefixes shorter than `needed` must pass as
/// malformed; longer ones must give `verdict` and count in `slot`.
fn sweep(
    f: &mut Fixture,
    prog: Prog,
    full: &[u8],
    needed: usize,
    verdict: u32,
    slot: u32,
    malformed: u32,
) {
    let pass = match prog {
        Prog::Xdp => XDP_PASS,
        Prog::In | Prog::Out => TC_ACT_OK,
    };
    // The kernel refuses XDP test frames below an Ethernet header.
    let shortest = match prog {
        Prog::Xdp => 14,
        Prog::In | Prog::Out => 0,
    };
    for len in shortest..=full.len() {
        let p = packets::truncated(full, len);
        let before = f.counters();
        let got = run(f, prog, &p);
        let after = f.counters();
        let (want_verdict, want_slot) = if len < needed {
            (pass, malformed)
        } else {
            (verdict, slot)
        };
        assert_eq!(
            got,
            want_verdict,
            "{prog:?}: prefix of {len} of {} bytes",
            full.len()
        );
        let moved: Vec<u32> = (0..DROPS_BASE)
            .filter(|&i| after[i as usize] != before[i as usize])
            .collect();
        let want = Counter {
            packets: 1,
            bytes: len as u64,
        };
        assert!(
            moved == [want_slot]
                && sub(&after[want_slot as usize], &before[want_slot as usize]) == want,
            "{prog:?}: prefix of {len} bytes counted in {:?}, want {} += {want:?}",
            moved.iter().map(|&i| name_of(i)).collect::<Vec<_>>(),
            name_of(want_slot)
        );
    }
}

/// Every truncation of uplink frames (from the 14-byte minimum the kernel accepts) — inside
/// the VLAN tag, IPv4 (with options),
/// IPv6, each IPv6 extension header, UDP — passes as malformed; once the UDP header is
/// complete the blocked source is dropped.
#[test]
fn xdp_truncated_at_every_header_boundary() {
    let mut f = Fixture::load();
    src_lists(&mut f);
    let drop = XDP_DROP;
    let frames: Vec<(&str, Vec<u8>, usize)> = vec![
        ("v4", packets::eth_ip(&wg4(BLOCKED)), 14 + 20 + 8),
        (
            "v4 + 8 bytes of options",
            packets::eth_ip(&v4_with_options(BLOCKED, 8)),
            14 + 28 + 8,
        ),
        (
            "802.1Q v4",
            packets::eth_vlan_ip(ethertype::VLAN, 5, &wg4(BLOCKED)),
            18 + 20 + 8,
        ),
        ("v6", packets::eth_ip(&wg6(BLOCKED6)), 14 + 40 + 8),
        (
            "802.1ad v6",
            packets::eth_vlan_ip(ethertype::QINQ, 5, &wg6(BLOCKED6)),
            18 + 40 + 8,
        ),
        (
            "v6 + 4 extension headers",
            packets::eth_ip(&v6_ext(BLOCKED6, &FOUR_EXTS)),
            14 + 40 + 16 + 8 + 8 + 8 + 8,
        ),
    ];
    for (name, frame, needed) in frames {
        eprintln!(
            "sweeping {name}: {} bytes, UDP header complete at {needed}",
            frame.len()
        );
        sweep(
            &mut f,
            Prog::Xdp,
            &frame,
            needed,
            drop,
            XDP_DROP_BLOCKLIST,
            XDP_PASS_MALFORMED,
        );
    }
}

/// Every truncation of tunnel packets inside the fixed IPv4/IPv6 header passes as malformed;
/// from the complete fixed header on, the packet is attributed (and counted at its length).
#[test]
fn tc_truncated_at_every_header_boundary() {
    let mut f = Fixture::load();
    dst_lists(&mut f);
    let cases: Vec<(Prog, Vec<u8>, usize, u32, u32, u32)> = vec![
        (
            Prog::In,
            packets::udp4(PEER1_V4, CLEAN, 1, 2, 30),
            20,
            TC_ACT_OK,
            TC_IN_PASS,
            TC_IN_MALFORMED,
        ),
        (
            Prog::Out,
            packets::udp6(CLEAN6, PEER1_V6, 1, 2, 30),
            40,
            TC_ACT_OK,
            TC_OUT_PASS,
            TC_OUT_MALFORMED,
        ),
        (
            Prog::In,
            packets::udp6(PEER1_V6, BLOCKED6, 1, 2, 30),
            40,
            TC_ACT_SHOT,
            TC_IN_DROP_BLOCKLIST,
            TC_IN_MALFORMED,
        ),
        (
            Prog::Out,
            packets::tcp4(BLOCKED, PEER1_V4, 1, 2, 30),
            20,
            TC_ACT_SHOT,
            TC_OUT_DROP_BLOCKLIST,
            TC_OUT_MALFORMED,
        ),
    ];
    for (prog, p, needed, verdict, slot, malformed) in cases {
        sweep(&mut f, prog, &p, needed, verdict, slot, malformed);
    }
}

// ---- the admission gate ----

/// The server's own tunnel addresses (the verification endpoint lives there).
const SERVER_TUN_V4: Ipv4Addr = Ipv4Addr::new(10, 8, 0, 1);
const SERVER_TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// Verification endpoint ports: TCP 8443 and UDP 8053 on both server addresses.
const VERIFY_TCP: u16 = 8443;
const VERIFY_UDP: u16 = 8053;
const TCP: u8 = 6;
const UDP: u8 = 17;

const GATE_REASONS: [DropReason; 6] = [
    DropReason::GateMfaPending,
    DropReason::GateExpired,
    DropReason::GateKicked,
    DropReason::GateOverQuota,
    DropReason::GateOutsideWindow,
    DropReason::GateDeviceLimit,
];

fn boot_ns() -> u64 {
    capybara_agent::dataplane::sys::boottime_now().as_nanos() as u64
}

fn info(gate: u32, deadline_ns: u64) -> PeerInfo {
    PeerInfo {
        flags: capybara_common::peer::PEER_F_ACTIVE,
        gate,
        deadline_ns,
        ..PeerInfo::default()
    }
}

/// Admitted until `deadline_ns`, the end of an MFA admission (`PEER_F_DEADLINE_MFA`).
fn mfa_info(deadline_ns: u64) -> PeerInfo {
    PeerInfo {
        flags: capybara_common::peer::PEER_F_ACTIVE | capybara_common::peer::PEER_F_DEADLINE_MFA,
        ..info(0, deadline_ns)
    }
}

/// `base`, every peer active and admitted, the verification endpoint configured.
fn gate_base(f: &mut Fixture) {
    base(f);
    for id in [PEER1, PEER2, PEER3, PEER4, PEER5] {
        f.peer_info(id, info(0, 0));
    }
    for (proto, port) in [(TCP, VERIFY_TCP), (UDP, VERIFY_UDP)] {
        f.gate_allow(GateAllowKey::v4(u32::from(SERVER_TUN_V4), proto, port));
        f.gate_allow(GateAllowKey::v6(SERVER_TUN_V6.octets(), proto, port));
    }
}

/// `gate_base` with peers 1 and 2 held as `reason`.
fn held(f: &mut Fixture, reason: DropReason) {
    gate_base(f);
    f.peer_info(PEER1, info(reason as u32, 0));
    f.peer_info(PEER2, info(reason as u32, 0));
}

fn held_mfa(f: &mut Fixture) {
    held(f, DropReason::GateMfaPending);
}

fn gate_cases() -> Vec<Case> {
    type Expect = (u32, Vec<u32>, Option<(PeerId, PeerDelta)>);
    let gate_in = |peer: PeerId, r: DropReason| -> Expect {
        (
            TC_ACT_SHOT,
            vec![TC_IN_DROP_GATE, drop_slot(r), EVENTS_EMITTED],
            Some((peer, PeerDelta::Drop(r))),
        )
    };
    let gate_out = |peer: PeerId, r: DropReason| -> Expect {
        (
            TC_ACT_SHOT,
            vec![TC_OUT_DROP_GATE, drop_slot(r), EVENTS_EMITTED],
            Some((peer, PeerDelta::Drop(r))),
        )
    };
    let pass_in =
        |peer: PeerId| -> Expect { (TC_ACT_OK, vec![TC_IN_PASS], Some((peer, PeerDelta::Rx))) };
    let pass_out =
        |peer: PeerId| -> Expect { (TC_ACT_OK, vec![TC_OUT_PASS], Some((peer, PeerDelta::Tx))) };
    let mfa = DropReason::GateMfaPending;
    let expired = DropReason::GateExpired;
    let c = |name: String,
             prog: Prog,
             packet: fn() -> Vec<u8>,
             setup: Box<dyn Fn(&mut Fixture)>,
             (verdict, counters, peer): Expect| Case {
        name: Box::leak(name.into_boxed_str()),
        prog,
        packet,
        setup,
        verdict,
        counters,
        list_hit: None,
        peer,
    };
    let s = |f: fn(&mut Fixture)| -> Box<dyn Fn(&mut Fixture)> { Box::new(f) };
    use Prog::{In, Out};
    let mut cases = Vec::new();
    // Every hold reason, both directions, both families.
    for r in GATE_REASONS {
        cases.push(c(
            format!("held ({}): v4 from the peer dropped", r.name()),
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            Box::new(move |f| held(f, r)),
            gate_in(PEER1, r),
        ));
        cases.push(c(
            format!("held ({}): v6 to the peer dropped", r.name()),
            Out,
            || packets::tcp6(CLEAN6, PEER1_V6, 443, 4000, 100),
            Box::new(move |f| held(f, r)),
            gate_out(PEER1, r),
        ));
    }
    cases.extend([
        c(
            "held peer attributed by range (LPM) dropped".into(),
            In,
            || packets::tcp4(PEER2_V4, CLEAN, 4000, 443, 10),
            s(held_mfa),
            gate_in(PEER2, mfa),
        ),
        c(
            "other peers pass while one is held".into(),
            In,
            || packets::tcp4(PEER4_V4, CLEAN, 4000, 443, 10),
            s(held_mfa),
            pass_in(PEER4),
        ),
        c(
            "unknown peer is not gated".into(),
            In,
            || packets::udp4(STRANGER_V4, CLEAN, 1, 2, 10),
            s(held_mfa),
            (TC_ACT_OK, vec![TC_IN_UNKNOWN_PEER], None),
        ),
        c(
            "held peer to a blocked destination: the gate decides first".into(),
            In,
            || packets::udp4(PEER1_V4, BLOCKED, 4000, 53, 60),
            Box::new(|f| {
                held_mfa(f);
                lists(f, Lists::Destination, 0);
            }),
            gate_in(PEER1, mfa),
        ),
        // The verification endpoint.
        c(
            "held: v4 TCP to the verification port passes".into(),
            In,
            || packets::tcp4(PEER1_V4, SERVER_TUN_V4, 40000, VERIFY_TCP, 100),
            s(held_mfa),
            pass_in(PEER1),
        ),
        c(
            "held: v4 UDP to the verification port passes".into(),
            In,
            || packets::udp4(PEER1_V4, SERVER_TUN_V4, 40000, VERIFY_UDP, 100),
            s(held_mfa),
            pass_in(PEER1),
        ),
        c(
            "held: v6 TCP to the verification port passes".into(),
            In,
            || packets::tcp6(PEER1_V6, SERVER_TUN_V6, 40000, VERIFY_TCP, 100),
            s(held_mfa),
            pass_in(PEER1),
        ),
        c(
            "held: v6 UDP to the verification port passes".into(),
            In,
            || packets::udp6(PEER1_V6, SERVER_TUN_V6, 40000, VERIFY_UDP, 100),
            s(held_mfa),
            pass_in(PEER1),
        ),
        c(
            "held: v4 TCP reply from the verification port passes".into(),
            Out,
            || packets::tcp4(SERVER_TUN_V4, PEER1_V4, VERIFY_TCP, 40000, 100),
            s(held_mfa),
            pass_out(PEER1),
        ),
        c(
            "held: v6 UDP reply from the verification port passes".into(),
            Out,
            || packets::udp6(SERVER_TUN_V6, PEER1_V6, VERIFY_UDP, 40000, 100),
            s(held_mfa),
            pass_out(PEER1),
        ),
        c(
            "held: v6 UDP behind a destination-options header to the port passes".into(),
            In,
            || {
                packets::udp6_with_ext(
                    PEER1_V6,
                    SERVER_TUN_V6,
                    40000,
                    VERIFY_UDP,
                    50,
                    &[Ext::DestOpts { extra_8: 1 }],
                )
            },
            s(held_mfa),
            pass_in(PEER1),
        ),
        c(
            "held: first v4 fragment to the port passes".into(),
            In,
            || {
                let mut p = packets::udp4(PEER1_V4, SERVER_TUN_V4, 40000, VERIFY_UDP, 100);
                packets::set_ipv4_fragment(&mut p, 0, true);
                p
            },
            s(held_mfa),
            pass_in(PEER1),
        ),
        c(
            "held: other TCP port on the server address dropped".into(),
            In,
            || packets::tcp4(PEER1_V4, SERVER_TUN_V4, 40000, 22, 0),
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: TCP to the UDP verification port dropped".into(),
            In,
            || packets::tcp4(PEER1_V4, SERVER_TUN_V4, 40000, VERIFY_UDP, 0),
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: v6 UDP to the TCP verification port dropped".into(),
            In,
            || packets::udp6(PEER1_V6, SERVER_TUN_V6, 40000, VERIFY_TCP, 0),
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: the verification port on another address dropped (v4)".into(),
            In,
            || packets::tcp4(PEER1_V4, CLEAN, 40000, VERIFY_TCP, 0),
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: the verification port on another address dropped (v6)".into(),
            In,
            || packets::tcp6(PEER1_V6, CLEAN6, 40000, VERIFY_TCP, 0),
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: ingress from the verification port (source port) dropped".into(),
            In,
            || packets::tcp4(PEER1_V4, SERVER_TUN_V4, VERIFY_TCP, 40000, 0),
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: egress from another server port dropped".into(),
            Out,
            || packets::tcp4(SERVER_TUN_V4, PEER1_V4, 22, 40000, 0),
            s(held_mfa),
            gate_out(PEER1, mfa),
        ),
        c(
            "held: egress from the port on another address dropped".into(),
            Out,
            || packets::tcp4(CLEAN, PEER1_V4, VERIFY_TCP, 40000, 0),
            s(held_mfa),
            gate_out(PEER1, mfa),
        ),
        c(
            "held: ICMP to the server dropped".into(),
            In,
            || packets::icmp4(PEER1_V4, SERVER_TUN_V4, 56),
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: non-first v4 fragment to the verification port dropped".into(),
            In,
            || {
                let mut p = packets::udp4(PEER1_V4, SERVER_TUN_V4, 40000, VERIFY_UDP, 100);
                packets::set_ipv4_fragment(&mut p, 100, false);
                p
            },
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: non-first v6 fragment to the verification port dropped".into(),
            In,
            || {
                packets::udp6_with_ext(
                    PEER1_V6,
                    SERVER_TUN_V6,
                    40000,
                    VERIFY_UDP,
                    100,
                    &[Ext::Fragment {
                        offset_8: 10,
                        more: false,
                    }],
                )
            },
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        c(
            "held: TCP to the port with the TCP header cut off dropped".into(),
            In,
            || {
                packets::truncated(
                    &packets::tcp4(PEER1_V4, SERVER_TUN_V4, 40000, VERIFY_TCP, 0),
                    22,
                )
            },
            s(held_mfa),
            gate_in(PEER1, mfa),
        ),
        // Deadlines, decided by the kernel alone.
        c(
            "admitted with a future deadline passes".into(),
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, info(0, boot_ns() + 3_600_000_000_000));
            }),
            pass_in(PEER1),
        ),
        c(
            "admitted with a deadline in the past: dropped as expired (ingress)".into(),
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, info(0, boot_ns() - 1));
            }),
            gate_in(PEER1, expired),
        ),
        c(
            "admitted with a deadline in the past: dropped as expired (egress, v6)".into(),
            Out,
            || packets::udp6(CLEAN6, PEER1_V6, 53, 4000, 60),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, info(0, 1));
            }),
            gate_out(PEER1, expired),
        ),
        c(
            "expired admission still reaches the verification port".into(),
            In,
            || packets::tcp4(PEER1_V4, SERVER_TUN_V4, 40000, VERIFY_TCP, 10),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, info(0, 1));
            }),
            pass_in(PEER1),
        ),
        // An MFA admission (`PEER_F_DEADLINE_MFA`): held as mfa-pending, not expired, once
        // its deadline passed; the flag changes nothing before it.
        c(
            "MFA admission with a deadline in the past: dropped as mfa-pending".into(),
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, mfa_info(boot_ns() - 1));
            }),
            gate_in(PEER1, mfa),
        ),
        c(
            "MFA admission with a deadline in the past: dropped as mfa-pending (egress, v6)".into(),
            Out,
            || packets::udp6(CLEAN6, PEER1_V6, 53, 4000, 60),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, mfa_info(1));
            }),
            gate_out(PEER1, mfa),
        ),
        c(
            "MFA admission with a future deadline passes".into(),
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, mfa_info(boot_ns() + 3_600_000_000_000));
            }),
            pass_in(PEER1),
        ),
        c(
            "lapsed MFA admission still reaches the verification port".into(),
            In,
            || packets::tcp4(PEER1_V4, SERVER_TUN_V4, 40000, VERIFY_TCP, 10),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, mfa_info(1));
            }),
            pass_in(PEER1),
        ),
        c(
            "a gate value that is no gate reason fails closed (kicked)".into(),
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            Box::new(|f| {
                gate_base(f);
                f.peer_info(PEER1, info(DropReason::Malformed as u32, 0));
            }),
            gate_in(PEER1, DropReason::GateKicked),
        ),
    ]);
    cases
}

#[test]
fn admission_gate_table() {
    run_table(gate_cases());
}

/// One gate-drop event per peer per interval, with the record's fields as documented; the
/// events of an expired deadline carry it.
#[test]
fn gate_events_are_rate_limited_per_interval_and_read_from_the_ring() {
    let mut f = Fixture::load();
    held_mfa(&mut f);
    let t0 = boot_ns();
    let p_in = packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60);
    let p_out = packets::udp4(CLEAN, PEER1_V4, 53, 4000, 70);
    for _ in 0..5 {
        assert_eq!(f.run_tc(Tc::Ingress, &p_in), TC_ACT_SHOT);
        assert_eq!(f.run_tc(Tc::Egress, &p_out), TC_ACT_SHOT);
    }
    // Peer 2 (also held) has its own rate limit.
    assert_eq!(
        f.run_tc(Tc::Egress, &packets::udp4(CLEAN, PEER2_V4, 53, 4000, 10)),
        TC_ACT_SHOT
    );
    let t1 = boot_ns();
    let ev = f.events();
    assert_eq!(
        ev.len(),
        2,
        "one event per held peer within the interval: {ev:?}"
    );
    let (e1, e2) = (ev[0], ev[1]);
    assert_eq!(
        (e1.kind, e1.peer, e1.reason, e1.flags, e1.args),
        (
            EVENT_GATE_DROP,
            PEER1,
            DropReason::GateMfaPending as u32,
            0,
            [0, p_in.len() as u64, 0, 0]
        ),
        "{e1:?}"
    );
    assert!((t0..=t1).contains(&e1.time_ns), "{e1:?} outside {t0}..{t1}");
    assert_eq!((e2.peer, e2.flags), (PEER2, EVENT_F_EGRESS), "{e2:?}");
    let c = f.counters();
    assert_eq!(c[EVENTS_EMITTED as usize].packets, 2);
    assert_eq!(c[EVENTS_LOST as usize].packets, 0);
    // Every packet was still counted as a drop.
    assert_eq!(
        f.peer_stats(PEER1).drops[DropReason::GateMfaPending as usize],
        10
    );

    // A shorter interval (CONFIG): after it, the next drop emits again.
    let mut cfg = f.config();
    cfg.event_interval_ns = 50_000_000;
    f.set_config_exact(cfg);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(f.run_tc(Tc::Egress, &p_out), TC_ACT_SHOT);
    assert_eq!(f.run_tc(Tc::Egress, &p_out), TC_ACT_SHOT);
    let ev = f.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!((ev[0].peer, ev[0].flags), (PEER1, EVENT_F_EGRESS));

    // An admission that runs out: no userspace action between the two packets.
    let deadline = boot_ns() + 200_000_000;
    f.peer_info(PEER1, info(0, deadline));
    assert_eq!(f.run_tc(Tc::Ingress, &p_in), TC_ACT_OK);
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(f.run_tc(Tc::Ingress, &p_in), TC_ACT_SHOT);
    let ev = f.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].peer, ev[0].reason, ev[0].args[0]),
        (PEER1, DropReason::GateExpired as u32, deadline),
        "{:?}",
        ev[0]
    );
    assert!(ev[0].time_ns >= deadline);
    assert_eq!(
        f.peer_stats(PEER1).drops[DropReason::GateExpired as usize],
        1
    );
}

// ---- data quotas ----

/// The bucket peers 1 and 2 share (peer 4 has none).
const BUCKET: u32 = 7;
const QUOTA_LIMIT: u64 = 1_000_000;

fn bucket(limit_bytes: u64, used_bytes: u64) -> QuotaBucket {
    QuotaBucket {
        limit_bytes,
        used_bytes,
        ..QuotaBucket::default()
    }
}

fn with_bucket(gate: u32, b: u32) -> PeerInfo {
    PeerInfo {
        quota_bucket: b,
        ..info(gate, 0)
    }
}

/// `gate_base`, peers 1 and 2 charged to `BUCKET` with `used_bytes` of `QUOTA_LIMIT` spent.
fn quota_base(f: &mut Fixture, used_bytes: u64) {
    gate_base(f);
    f.peer_info(PEER1, with_bucket(0, BUCKET));
    f.peer_info(PEER2, with_bucket(0, BUCKET));
    f.quota_bucket(BUCKET, bucket(QUOTA_LIMIT, used_bytes));
}

fn quota_fresh(f: &mut Fixture) {
    quota_base(f, 0);
}

fn quota_exhausted(f: &mut Fixture) {
    quota_base(f, QUOTA_LIMIT);
}

fn quota_cases() -> Vec<Case> {
    let q = DropReason::QuotaExhausted;
    let quota_in = |peer: PeerId| -> PeerExpect {
        (
            TC_ACT_SHOT,
            vec![TC_IN_DROP_QUOTA, drop_slot(q)],
            Some((peer, PeerDelta::Drop(q))),
        )
    };
    let quota_out = |peer: PeerId| -> PeerExpect {
        (
            TC_ACT_SHOT,
            vec![TC_OUT_DROP_QUOTA, drop_slot(q)],
            Some((peer, PeerDelta::Drop(q))),
        )
    };
    use Prog::{In, Out};
    vec![
        peer_case(
            "quota: under the limit, v4 from the peer passes",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            quota_fresh,
            pass_in(PEER1),
        ),
        peer_case(
            "quota: under the limit, v6 to the peer passes",
            Out,
            || packets::tcp6(CLEAN6, PEER1_V6, 443, 4000, 100),
            quota_fresh,
            pass_out(PEER1),
        ),
        peer_case(
            "quota: exhausted, v4 from the peer dropped",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            quota_exhausted,
            quota_in(PEER1),
        ),
        peer_case(
            "quota: exhausted, v6 to the peer dropped",
            Out,
            || packets::udp6(CLEAN6, PEER1_V6, 53, 4000, 60),
            quota_exhausted,
            quota_out(PEER1),
        ),
        peer_case(
            "quota: exhausted, v6 from the peer dropped",
            In,
            || packets::tcp6(PEER1_V6, CLEAN6, 4000, 443, 10),
            quota_exhausted,
            quota_in(PEER1),
        ),
        peer_case(
            "quota: the shared bucket drops the other peer too (range-attributed)",
            Out,
            || packets::udp4(CLEAN, PEER2_V4, 53, 4000, 60),
            quota_exhausted,
            quota_out(PEER2),
        ),
        peer_case(
            "quota: a peer without a bucket passes while the bucket is exhausted",
            In,
            || packets::udp4(PEER4_V4, CLEAN, 4000, 53, 60),
            quota_exhausted,
            pass_in(PEER4),
        ),
        peer_case(
            "quota: unknown peer has no quota",
            In,
            || packets::udp4(STRANGER_V4, CLEAN, 1, 2, 10),
            quota_exhausted,
            (TC_ACT_OK, vec![TC_IN_UNKNOWN_PEER], None),
        ),
        peer_case(
            "quota: a bucket with limit 0 is not configured: passes",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            |f: &mut Fixture| {
                quota_base(f, 5_000_000);
                f.quota_bucket(BUCKET, bucket(0, 5_000_000));
            },
            pass_in(PEER1),
        ),
        peer_case(
            "quota: a bucket id beyond the map is no quota",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            |f: &mut Fixture| {
                quota_exhausted(f);
                f.peer_info(PEER1, with_bucket(0, u32::MAX));
            },
            pass_in(PEER1),
        ),
        peer_case(
            "quota: a held peer with an exhausted bucket: the gate decides first",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            |f: &mut Fixture| {
                quota_exhausted(f);
                f.peer_info(
                    PEER1,
                    with_bucket(DropReason::GateMfaPending as u32, BUCKET),
                );
            },
            (
                TC_ACT_SHOT,
                vec![
                    TC_IN_DROP_GATE,
                    drop_slot(DropReason::GateMfaPending),
                    EVENTS_EMITTED,
                ],
                Some((PEER1, PeerDelta::Drop(DropReason::GateMfaPending))),
            ),
        ),
        peer_case(
            "quota: a blocked destination is a blocklist drop, not charged",
            In,
            || packets::udp4(PEER1_V4, BLOCKED, 4000, 53, 60),
            |f: &mut Fixture| {
                quota_exhausted(f);
                lists(f, Lists::Destination, 0);
            },
            blocklisted_in(PEER1),
        ),
    ]
    .into_iter()
    .map(hits_list_net)
    .collect()
}

#[test]
fn quota_table() {
    run_table(quota_cases());
}

/// Both directions of two peers charge one shared bucket exactly; each threshold is emitted
/// once with the documented fields; from exhaustion on packets drop uncharged; a reset (new
/// epoch, zero usage) restores traffic and re-arms the warnings.
#[test]
fn quota_charges_a_shared_bucket_and_warns_once_per_threshold() {
    let mut f = Fixture::load();
    quota_base(&mut f, 0);
    f.quota_bucket(BUCKET, bucket(1000, 0));
    // 100-byte packets: v4 from peer 1, v6 to peer 1, v4 to peer 2 (shared bucket).
    let p_in = packets::udp4(PEER1_V4, CLEAN, 4000, 53, 72);
    let p_out6 = packets::udp6(CLEAN6, PEER1_V6, 53, 4000, 52);
    let p_peer2 = packets::udp4(CLEAN, PEER2_V4, 53, 4000, 72);
    for p in [&p_in, &p_out6, &p_peer2] {
        assert_eq!(p.len(), 100);
    }
    let mut expect_used = 0;
    let mut events = Vec::new();
    for i in 0..10 {
        let (which, p) = match i % 3 {
            0 => (Tc::Ingress, &p_in),
            1 => (Tc::Egress, &p_out6),
            _ => (Tc::Egress, &p_peer2),
        };
        assert_eq!(f.run_tc(which, p), TC_ACT_OK, "packet {i} under the limit");
        expect_used += 100;
        assert_eq!(f.read_quota_bucket(BUCKET).used_bytes, expect_used);
        events.extend(f.events());
    }
    // 10 × 100 = the limit: the 8th packet (to peer 1) reached 80 %, the 9th (to peer 2)
    // 90 %, the 10th (from peer 1) 100 %.
    let got: Vec<(u32, u32, u32, [u64; 4])> = events
        .iter()
        .map(|e| (e.kind, e.peer, e.reason, e.args))
        .collect();
    assert_eq!(
        got,
        vec![
            (EVENT_QUOTA, PEER1, 80, [BUCKET.into(), 800, 1000, 0]),
            (EVENT_QUOTA, PEER2, 90, [BUCKET.into(), 900, 1000, 0]),
            (EVENT_QUOTA, PEER1, 100, [BUCKET.into(), 1000, 1000, 0]),
        ]
    );
    assert_eq!(events[0].flags, EVENT_F_EGRESS);
    assert_eq!(events[2].flags, 0);
    assert_eq!(
        f.read_quota_bucket(BUCKET).warned,
        QUOTA_WARNED_80 | QUOTA_WARNED_90 | QUOTA_WARNED_100
    );
    // Exhausted: both peers, both directions dropped, nothing more charged, no more events.
    for _ in 0..3 {
        assert_eq!(f.run_tc(Tc::Ingress, &p_in), TC_ACT_SHOT);
        assert_eq!(f.run_tc(Tc::Egress, &p_out6), TC_ACT_SHOT);
        assert_eq!(f.run_tc(Tc::Egress, &p_peer2), TC_ACT_SHOT);
    }
    assert_eq!(f.read_quota_bucket(BUCKET).used_bytes, 1000);
    assert!(f.events().is_empty());
    let q = DropReason::QuotaExhausted as usize;
    assert_eq!(f.peer_stats(PEER1).drops[q], 6);
    assert_eq!(f.peer_stats(PEER2).drops[q], 3);
    let c = f.counters();
    assert_eq!(
        c[TC_IN_DROP_QUOTA as usize],
        Counter {
            packets: 3,
            bytes: 300
        }
    );
    assert_eq!(
        c[TC_OUT_DROP_QUOTA as usize],
        Counter {
            packets: 6,
            bytes: 600
        }
    );
    assert_eq!(c[drop_slot(DropReason::QuotaExhausted) as usize].packets, 9);
    assert_eq!(c[EVENTS_EMITTED as usize].packets, 3);
    // Passed bytes were counted per peer as usual.
    assert_eq!(f.peer_stats(PEER1).rx_bytes, 400);
    assert_eq!(f.peer_stats(PEER1).tx_bytes, 300);
    assert_eq!(f.peer_stats(PEER2).tx_bytes, 300);

    // One packet crossing every threshold at once emits all three, in order.
    f.quota_bucket(
        BUCKET,
        QuotaBucket {
            epoch: 1,
            ..bucket(150, 0)
        },
    );
    assert_eq!(f.run_tc(Tc::Ingress, &p_in), TC_ACT_OK);
    assert_eq!(f.run_tc(Tc::Ingress, &p_in), TC_ACT_OK);
    assert_eq!(f.run_tc(Tc::Ingress, &p_in), TC_ACT_SHOT);
    let ev: Vec<(u32, [u64; 4])> = f.events().iter().map(|e| (e.reason, e.args)).collect();
    assert_eq!(
        ev,
        vec![
            (80, [BUCKET.into(), 200, 150, 1]),
            (90, [BUCKET.into(), 200, 150, 1]),
            (100, [BUCKET.into(), 200, 150, 1]),
        ]
    );

    // Reset: zero usage, new epoch: traffic passes and the warnings are armed again.
    f.quota_bucket(
        BUCKET,
        QuotaBucket {
            epoch: 2,
            ..bucket(1000, 0)
        },
    );
    assert_eq!(f.run_tc(Tc::Ingress, &p_in), TC_ACT_OK);
    assert_eq!(f.read_quota_bucket(BUCKET).used_bytes, 100);
    assert!(f.events().is_empty());
}

// ---- concurrent flow limits ----

const FLOW_LIMIT: u32 = 3;

fn with_flow_limit(gate: u32, limit: u32) -> PeerInfo {
    PeerInfo {
        flow_limit: limit,
        ..info(gate, 0)
    }
}

/// Sets the TCP flags of an IPv4 (no options) or IPv6 (no extension headers) TCP packet.
fn tcp_flags(mut p: Vec<u8>, flags: u8) -> Vec<u8> {
    let at = if p[0] >> 4 == 4 { 20 } else { 40 } + 13;
    p[at] = flags;
    p
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

/// A TCP SYN from peer 1 (v4) to `CLEAN` port 443 from source port `sport`.
fn syn4(sport: u16) -> Vec<u8> {
    tcp_flags(packets::tcp4(PEER1_V4, CLEAN, sport, 443, 0), SYN)
}

/// The reply direction (egress, to peer 1) of flow `sport` with `flags`.
fn reply4(sport: u16, flags: u8) -> Vec<u8> {
    tcp_flags(packets::tcp4(CLEAN, PEER1_V4, 443, sport, 10), flags)
}

/// A UDP packet from peer 1 to `CLEAN` port 53 from `sport`.
fn udp_from1(sport: u16) -> Vec<u8> {
    packets::udp4(PEER1_V4, CLEAN, sport, 53, 20)
}

/// ICMP echo of `kind` (8 request, 0 reply) with identifier `id`, v4, `from_peer` or to it.
fn echo4(kind: u8, id: u16, from_peer: bool) -> Vec<u8> {
    let mut p = if from_peer {
        packets::icmp4(PEER1_V4, CLEAN, 8)
    } else {
        packets::icmp4(CLEAN, PEER1_V4, 8)
    };
    p[20] = kind;
    p[24..26].copy_from_slice(&id.to_be_bytes());
    p
}

/// `gate_base`, peer 1 limited to `FLOW_LIMIT` flows.
fn flows_base(f: &mut Fixture) {
    gate_base(f);
    f.peer_info(PEER1, with_flow_limit(0, FLOW_LIMIT));
}

/// `flows_base` with three TCP flows of peer 1 open (source ports 1001..=1003).
fn three_tcp(f: &mut Fixture) {
    flows_base(f);
    for sport in 1001..=1003 {
        assert_eq!(
            f.run_tc(Tc::Ingress, &syn4(sport)),
            TC_ACT_OK,
            "setup SYN {sport}"
        );
    }
    assert_eq!(f.flow_count(PEER1), 3);
}

fn flow_cases() -> Vec<Case> {
    let fl = DropReason::FlowLimit;
    let refused_in: PeerExpect = (
        TC_ACT_SHOT,
        vec![TC_IN_DROP_FLOWS, drop_slot(fl), EVENTS_EMITTED],
        Some((PEER1, PeerDelta::Drop(fl))),
    );
    let refused_out: PeerExpect = (
        TC_ACT_SHOT,
        vec![TC_OUT_DROP_FLOWS, drop_slot(fl), EVENTS_EMITTED],
        Some((PEER1, PeerDelta::Drop(fl))),
    );
    let pass_in: PeerExpect = (TC_ACT_OK, vec![TC_IN_PASS], Some((PEER1, PeerDelta::Rx)));
    let pass_out: PeerExpect = (TC_ACT_OK, vec![TC_OUT_PASS], Some((PEER1, PeerDelta::Tx)));
    let up = DropReason::Unparseable;
    let unparseable_in: PeerExpect = (
        TC_ACT_SHOT,
        vec![TC_IN_DROP_UNPARSEABLE, drop_slot(up)],
        Some((PEER1, PeerDelta::Drop(up))),
    );
    let unparseable_out: PeerExpect = (
        TC_ACT_SHOT,
        vec![TC_OUT_DROP_UNPARSEABLE, drop_slot(up)],
        Some((PEER1, PeerDelta::Drop(up))),
    );
    use Prog::{In, Out};
    vec![
        peer_case(
            "flows: a new flow within the limit passes",
            In,
            || syn4(2000),
            flows_base,
            pass_in.clone(),
        ),
        peer_case(
            "flows: a 4th TCP flow over a limit of 3 is dropped",
            In,
            || syn4(1004),
            three_tcp,
            refused_in.clone(),
        ),
        peer_case(
            "flows: a 4th UDP flow over a limit of 3 is dropped",
            In,
            || udp_from1(5000),
            three_tcp,
            refused_in.clone(),
        ),
        peer_case(
            "flows: a new flow towards the peer over the limit is dropped",
            Out,
            || tcp_flags(packets::tcp4(CLEAN, PEER1_V4, 5555, 22, 0), SYN),
            three_tcp,
            refused_out.clone(),
        ),
        peer_case(
            "flows: an existing flow's packets pass at the limit",
            In,
            || tcp_flags(packets::tcp4(PEER1_V4, CLEAN, 1002, 443, 100), ACK),
            three_tcp,
            pass_in.clone(),
        ),
        peer_case(
            "flows: the reply direction maps to the same flow",
            Out,
            || reply4(1001, SYN | ACK),
            three_tcp,
            pass_out.clone(),
        ),
        peer_case(
            "flows: after a FIN the next new flow passes at once",
            In,
            || syn4(1004),
            |f: &mut Fixture| {
                three_tcp(f);
                let fin = tcp_flags(packets::tcp4(PEER1_V4, CLEAN, 1002, 443, 0), FIN_ACK);
                assert_eq!(f.run_tc(Tc::Ingress, &fin), TC_ACT_OK);
                assert_eq!(f.flow_count(PEER1), 2);
            },
            pass_in.clone(),
        ),
        peer_case(
            "flows: after an RST from the other side the next new flow passes at once",
            In,
            || syn4(1004),
            |f: &mut Fixture| {
                three_tcp(f);
                assert_eq!(f.run_tc(Tc::Egress, &reply4(1003, RST)), TC_ACT_OK);
                assert_eq!(f.flow_count(PEER1), 2);
            },
            pass_in.clone(),
        ),
        peer_case(
            "flows: the tail of a closed flow (non-SYN, no entry) passes untracked at the limit",
            Out,
            || reply4(1009, ACK),
            three_tcp,
            pass_out.clone(),
        ),
        peer_case(
            "flows: IPv6, a second flow over a limit of 1 is dropped",
            Out,
            || packets::udp6(CLEAN6, PEER1_V6, 53, 4001, 20),
            |f: &mut Fixture| {
                flows_base(f);
                f.peer_info(PEER1, with_flow_limit(0, 1));
                let p = packets::udp6(PEER1_V6, CLEAN6, 4000, 53, 20);
                assert_eq!(f.run_tc(Tc::Ingress, &p), TC_ACT_OK);
            },
            refused_out.clone(),
        ),
        peer_case(
            "flows: IPv6, the reply of the one flow passes at a limit of 1",
            Out,
            || packets::udp6(CLEAN6, PEER1_V6, 53, 4000, 20),
            |f: &mut Fixture| {
                flows_base(f);
                f.peer_info(PEER1, with_flow_limit(0, 1));
                let p = packets::udp6(PEER1_V6, CLEAN6, 4000, 53, 20);
                assert_eq!(f.run_tc(Tc::Ingress, &p), TC_ACT_OK);
            },
            pass_out.clone(),
        ),
        peer_case(
            "flows: ICMP echo reply matches its request's flow",
            Out,
            || echo4(0, 77, false),
            |f: &mut Fixture| {
                flows_base(f);
                f.peer_info(PEER1, with_flow_limit(0, 1));
                assert_eq!(f.run_tc(Tc::Ingress, &echo4(8, 77, true)), TC_ACT_OK);
            },
            pass_out.clone(),
        ),
        peer_case(
            "flows: ICMP echo with another identifier is another flow",
            In,
            || echo4(8, 78, true),
            |f: &mut Fixture| {
                flows_base(f);
                f.peer_info(PEER1, with_flow_limit(0, 1));
                assert_eq!(f.run_tc(Tc::Ingress, &echo4(8, 77, true)), TC_ACT_OK);
            },
            refused_in.clone(),
        ),
        peer_case(
            "flows: a stale entry met again is a new flow re-using its slot",
            In,
            udp_from1_5000,
            |f: &mut Fixture| {
                flows_base(f);
                f.peer_info(PEER1, with_flow_limit(0, 1));
                assert_eq!(f.run_tc(Tc::Ingress, &udp_from1(5000)), TC_ACT_OK);
                let (key, mut st) = f.flows()[0];
                st.last_ns = boot_ns() - 61_000_000_000;
                f.set_flow(key, st);
            },
            pass_in.clone(),
        ),
        peer_case(
            "flows: limit 0 is unlimited",
            In,
            || syn4(1004),
            |f: &mut Fixture| {
                three_tcp(f);
                f.peer_info(PEER1, with_flow_limit(0, 0));
            },
            pass_in.clone(),
        ),
        peer_case(
            "flows: the gate still wins over the flow limit",
            In,
            || syn4(1004),
            |f: &mut Fixture| {
                three_tcp(f);
                f.peer_info(
                    PEER1,
                    with_flow_limit(DropReason::GateKicked as u32, FLOW_LIMIT),
                );
            },
            (
                TC_ACT_SHOT,
                vec![
                    TC_IN_DROP_GATE,
                    drop_slot(DropReason::GateKicked),
                    EVENTS_EMITTED,
                ],
                Some((PEER1, PeerDelta::Drop(DropReason::GateKicked))),
            ),
        ),
        // A packet whose 5-tuple cannot be read would pass untracked, around the limit.
        peer_case(
            "flows: v6 UDP behind 5 extension headers from a limited peer dropped as unparseable",
            In,
            || packets::udp6_with_ext(PEER1_V6, CLEAN6, 4000, 53, 20, &FIVE_EXTS),
            flows_base,
            unparseable_in.clone(),
        ),
        peer_case(
            "flows: v6 UDP header past 1024 bytes to a limited peer dropped as unparseable",
            Out,
            || packets::udp6_with_ext(CLEAN6, PEER1_V6, 53, 4000, 20, &DEEP_EXTS),
            flows_base,
            unparseable_out.clone(),
        ),
        peer_case(
            "flows: a UDP header cut short from a limited peer dropped as unparseable",
            In,
            || packets::truncated(&udp_from1(5000), 22),
            flows_base,
            unparseable_in.clone(),
        ),
        peer_case(
            "flows: a TCP header cut short at the limit dropped as unparseable",
            In,
            || packets::truncated(&syn4(1004), 30),
            three_tcp,
            unparseable_in.clone(),
        ),
        peer_case(
            "flows: without a limit, v6 UDP behind 5 extension headers passes",
            In,
            || packets::udp6_with_ext(PEER1_V6, CLEAN6, 4000, 53, 20, &FIVE_EXTS),
            gate_base,
            pass_in.clone(),
        ),
        peer_case(
            "flows: a non-first v6 fragment of a limited peer passes untracked",
            In,
            || {
                packets::udp6_with_ext(
                    PEER1_V6,
                    CLEAN6,
                    4000,
                    53,
                    20,
                    &[Ext::Fragment {
                        offset_8: 10,
                        more: false,
                    }],
                )
            },
            three_tcp,
            pass_in.clone(),
        ),
        peer_case(
            "flows: a blocked destination is a blocklist drop and takes no slot",
            In,
            || tcp_flags(packets::tcp4(PEER1_V4, BLOCKED, 1, 443, 0), SYN),
            |f: &mut Fixture| {
                three_tcp(f);
                lists(f, Lists::Destination, 0);
            },
            blocklisted_in(PEER1),
        ),
    ]
    .into_iter()
    .map(hits_list_net)
    .collect()
}

fn udp_from1_5000() -> Vec<u8> {
    udp_from1(5000)
}

#[test]
fn flow_limit_table() {
    run_table(flow_cases());
}

/// The refusal's counters and event are exact; FIN and RST free the slot at once (count and
/// entries); reply packets refresh the same entry; a stale entry is re-used in place without
/// changing the count; the sweeper deletes expired entries and decrements once.
#[test]
fn flow_limit_sequence_counts_events_and_expiry() {
    let mut f = Fixture::load();
    three_tcp(&mut f);
    let flows = f.flows();
    assert_eq!(flows.len(), 3);
    for (k, st) in &flows {
        assert_eq!((k.peer, k.proto, k.family), (PEER1, 6, 4));
        assert_eq!(&k.peer_addr[..4], &PEER1_V4.octets());
        assert_eq!(&k.other_addr[..4], &CLEAN.octets());
        assert_eq!(k.other_port, 443);
        assert_eq!(st.state, FLOW_S_TCP_SYN);
        assert_eq!(st.flags, FLOW_F_FROM_PEER);
    }
    // The answer establishes flow 1001 (2 h timeout from now on).
    assert_eq!(f.run_tc(Tc::Egress, &reply4(1001, SYN | ACK)), TC_ACT_OK);
    let st = f
        .flows()
        .into_iter()
        .find(|(k, _)| k.peer_port == 1001)
        .unwrap()
        .1;
    assert_eq!(st.state, FLOW_S_OPEN);

    // Refusals: two over the limit, one event (rate limit), exact counters.
    assert_eq!(f.run_tc(Tc::Ingress, &syn4(1004)), TC_ACT_SHOT);
    assert_eq!(f.run_tc(Tc::Ingress, &udp_from1(7)), TC_ACT_SHOT);
    let ev = f.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (
            ev[0].kind,
            ev[0].peer,
            ev[0].reason,
            ev[0].flags,
            ev[0].args
        ),
        (
            EVENT_FLOW_LIMIT,
            PEER1,
            DropReason::FlowLimit as u32,
            0,
            [3, 3, 6, 0]
        )
    );
    let c = f.counters();
    assert_eq!(c[TC_IN_DROP_FLOWS as usize].packets, 2);
    assert_eq!(c[drop_slot(DropReason::FlowLimit) as usize].packets, 2);
    assert_eq!(f.peer_stats(PEER1).drops[DropReason::FlowLimit as usize], 2);
    assert_eq!(f.flow_count(PEER1), 3);

    // FIN frees at once; the rest of the close handshake passes untracked.
    let fin = tcp_flags(packets::tcp4(PEER1_V4, CLEAN, 1001, 443, 0), FIN_ACK);
    assert_eq!(f.run_tc(Tc::Ingress, &fin), TC_ACT_OK);
    assert_eq!(f.flow_count(PEER1), 2);
    assert_eq!(f.run_tc(Tc::Egress, &reply4(1001, FIN_ACK)), TC_ACT_OK);
    assert_eq!(
        f.run_tc(
            Tc::Ingress,
            &tcp_flags(packets::tcp4(PEER1_V4, CLEAN, 1001, 443, 0), ACK)
        ),
        TC_ACT_OK
    );
    assert_eq!(f.flow_count(PEER1), 2);
    assert_eq!(f.flows().len(), 2);
    assert_eq!(f.run_tc(Tc::Ingress, &syn4(1004)), TC_ACT_OK);
    assert_eq!(f.flow_count(PEER1), 3);

    // A stale entry: re-used in place, the count unchanged, a new flow still refused until
    // the sweeper runs.
    let (key, mut st) = f
        .flows()
        .into_iter()
        .find(|(k, _)| k.peer_port == 1002)
        .unwrap();
    st.last_ns = boot_ns() - 11_000_000_000; // an unanswered SYN: 10 s timeout
    f.set_flow(key, st);
    let data = tcp_flags(packets::tcp4(PEER1_V4, CLEAN, 1002, 443, 10), ACK);
    assert_eq!(f.run_tc(Tc::Ingress, &data), TC_ACT_OK);
    assert_eq!(f.flow_count(PEER1), 3);
    let st = f
        .flows()
        .into_iter()
        .find(|(k, _)| k.peer_port == 1002)
        .unwrap()
        .1;
    assert!(boot_ns() - st.last_ns < 5_000_000_000, "refreshed");
    assert_eq!(f.run_tc(Tc::Ingress, &syn4(1005)), TC_ACT_SHOT);

    // The sweeper: nothing has expired yet.
    let now = boot_ns();
    assert_eq!(f.sweep_flows(now).expired, 0);
    assert_eq!(f.flow_count(PEER1), 3);
    // 11 s later the unanswered SYNs (1003, 1004) expire; 1002 (re-used from a data packet:
    // established) stays.
    let sweep = f.sweep_flows(now + 11_000_000_000);
    assert_eq!((sweep.scanned, sweep.expired), (3, 2));
    assert_eq!(f.flow_count(PEER1), 1);
    let left: Vec<u16> = f.flows().iter().map(|(k, _)| k.peer_port).collect();
    assert_eq!(left, vec![1002]);
    assert_eq!(f.run_tc(Tc::Ingress, &syn4(1005)), TC_ACT_OK);
    assert_eq!(f.flow_count(PEER1), 2);
}

/// No drift: many peers open, close (FIN/RST both ways), re-use and expire many flows, some
/// refused at the limit; after every phase each peer's count equals its live entries.
#[test]
fn flow_counts_do_not_drift() {
    let mut f = Fixture::load();
    gate_base(&mut f);
    // Peers 1 (v4 /32 + v6) and 2 (v4 range): limits 50 and 20.
    f.peer_info(PEER1, with_flow_limit(0, 50));
    f.peer_info(PEER2, with_flow_limit(0, 20));
    let check = |f: &mut Fixture, phase: &str| {
        let flows = f.flows();
        for (peer, limit) in [(PEER1, 50u64), (PEER2, 20)] {
            let live = flows.iter().filter(|(k, _)| k.peer == peer).count() as u64;
            let count = f.flow_count(peer);
            assert_eq!(
                count, live,
                "{phase}: peer {peer} count {count}, live entries {live}"
            );
            assert!(count <= limit, "{phase}: peer {peer} over its limit");
        }
    };
    let mut passed = 0;
    let mut refused = 0;
    for round in 0..4u16 {
        // Open 60 TCP + 30 UDP flows per peer (more than either limit).
        for i in 0..60u16 {
            let sport = 10_000 + round * 100 + i;
            for p in [
                tcp_flags(packets::tcp4(PEER1_V4, CLEAN, sport, 443, 0), SYN),
                tcp_flags(packets::tcp6(PEER1_V6, CLEAN6, sport, 443, 0), SYN),
                tcp_flags(packets::tcp4(PEER2_V4, CLEAN, sport, 443, 0), SYN),
            ] {
                match f.run_tc(Tc::Ingress, &p) {
                    TC_ACT_OK => passed += 1,
                    _ => refused += 1,
                }
            }
            if i < 30 {
                let u = packets::udp4(CLEAN, PEER2_V4, 53, sport, 10);
                match f.run_tc(Tc::Egress, &u) {
                    TC_ACT_OK => passed += 1,
                    _ => refused += 1,
                }
            }
        }
        check(&mut f, "after opening");
        // Close every other live TCP flow, alternating FIN from the peer and RST to it, and
        // send each close twice (the second finds no entry and must not decrement again).
        let live: Vec<FlowKey> = f.flows().into_iter().map(|(k, _)| k).collect();
        for (n, k) in live
            .iter()
            .enumerate()
            .filter(|(n, k)| n % 2 == 0 && k.proto == 6)
        {
            let (prog, pkt) = if k.family == 4 {
                let pa = Ipv4Addr::from(<[u8; 4]>::try_from(&k.peer_addr[..4]).unwrap());
                if n % 4 == 0 {
                    let fin = packets::tcp4(pa, CLEAN, k.peer_port, 443, 0);
                    (Tc::Ingress, tcp_flags(fin, FIN_ACK))
                } else {
                    let rst = packets::tcp4(CLEAN, pa, 443, k.peer_port, 0);
                    (Tc::Egress, tcp_flags(rst, RST))
                }
            } else {
                let fin = packets::tcp6(PEER1_V6, CLEAN6, k.peer_port, 443, 0);
                (Tc::Ingress, tcp_flags(fin, FIN_ACK))
            };
            for _ in 0..2 {
                assert_eq!(f.run_tc(prog, &pkt), TC_ACT_OK);
            }
        }
        check(&mut f, "after closing");
        // Expire: everything older than "now + 61 s" (unanswered SYNs and UDP).
        if round % 2 == 1 {
            let s = f.sweep_flows(boot_ns() + 61_000_000_000);
            assert!(s.expired > 0);
            check(&mut f, "after the sweep");
            // A second sweep finds nothing more to decrement.
            assert_eq!(f.sweep_flows(boot_ns() + 61_000_000_000).expired, 0);
            check(&mut f, "after a second sweep");
        }
    }
    // Clearing a limit forgets the peer's flows: entries and count go to zero together,
    // the other peer's are untouched.
    for sport in 30_000..30_010u16 {
        let p = tcp_flags(packets::tcp4(PEER2_V4, CLEAN, sport, 443, 0), SYN);
        assert_eq!(f.run_tc(Tc::Ingress, &p), TC_ACT_OK);
        let p = tcp_flags(packets::tcp4(PEER1_V4, CLEAN, sport, 443, 0), SYN);
        assert_eq!(f.run_tc(Tc::Ingress, &p), TC_ACT_OK);
    }
    check(&mut f, "before forgetting");
    assert_eq!(f.forget_peer_flows(PEER2).expired, 10);
    assert_eq!(f.flow_count(PEER2), 0);
    assert_eq!(f.flow_count(PEER1), 10);
    check(&mut f, "after forgetting peer 2");
    assert!(
        passed > 0 && refused > 0,
        "both outcomes exercised: {passed} passed, {refused} refused"
    );
    let drops = f.peer_stats(PEER1).drops[DropReason::FlowLimit as usize]
        + f.peer_stats(PEER2).drops[DropReason::FlowLimit as usize];
    assert_eq!(drops, refused);
}

/// A full flow table refuses new flows (dropped as `FlowLimit`, counted in
/// `FLOWS_TABLE_FULL`, an event with the table-full flag) instead of passing them silently;
/// existing flows still pass and the count still equals the entries.
#[test]
fn a_full_flow_table_refuses_new_flows_and_counts_them() {
    let mut f = Fixture::load();
    gate_base(&mut f);
    f.peer_info(PEER1, with_flow_limit(0, 1_000_000));
    let capacity = capybara_tests::bpf::TEST_CAPACITIES
        .iter()
        .find(|(n, _)| *n == capybara_common::maps::FLOWS)
        .map(|(_, c)| u64::from(*c))
        .unwrap();
    let (mut passed, mut refused) = (0u64, 0u64);
    for i in 0..capacity + 100 {
        let sport = 1 + (i % 60_000) as u16;
        let dst = Ipv4Addr::from(u32::from(CLEAN) + (i / 60_000) as u32);
        match f.run_tc(Tc::Ingress, &packets::udp4(PEER1_V4, dst, sport, 53, 8)) {
            TC_ACT_OK => passed += 1,
            _ => refused += 1,
        }
    }
    let entries = f.flows().len() as u64;
    eprintln!("capacity {capacity}: {passed} flows admitted, {refused} refused");
    assert!(refused > 0, "a full table refused nothing");
    assert!(passed <= capacity, "more flows than the table holds");
    assert_eq!(f.flow_count(PEER1), entries);
    assert_eq!(passed, entries);
    let c = f.counters();
    assert_eq!(c[FLOWS_TABLE_FULL as usize].packets, refused);
    assert_eq!(c[TC_IN_DROP_FLOWS as usize].packets, refused);
    assert_eq!(
        f.peer_stats(PEER1).drops[DropReason::FlowLimit as usize],
        refused
    );
    let ev = f.events();
    assert_eq!(ev.len(), 1, "one event per interval");
    assert_eq!(
        (ev[0].kind, ev[0].args[2], ev[0].args[3]),
        (EVENT_FLOW_LIMIT, 17, 1)
    );
    // An existing flow still passes.
    let first = packets::udp4(PEER1_V4, CLEAN, 1, 53, 8);
    assert_eq!(f.run_tc(Tc::Ingress, &first), TC_ACT_OK);
    // Expiring everything frees the table.
    let s = f.sweep_flows(boot_ns() + 61_000_000_000);
    assert_eq!(s.expired, entries);
    assert_eq!(f.flow_count(PEER1), 0);
    assert_eq!(
        f.run_tc(Tc::Ingress, &packets::udp4(PEER1_V4, CLEAN, 7, 53, 8)),
        TC_ACT_OK
    );
}

// ---- bandwidth shaping ----

const TC_ACT_REDIRECT: u32 = 7;
/// The shaping device's index in the tests (never redirected to: a test run only reports it).
const SHAPE_IFINDEX: u32 = 4242;
const TX_CLASS: u32 = capybara_common::shape::class_id(3);
const RX_CLASS: u32 = capybara_common::shape::class_id(9);

fn shaped(tx: u32, rx: u32) -> PeerInfo {
    PeerInfo {
        shape_tx: tx,
        shape_rx: rx,
        ..info(0, 0)
    }
}

fn with_shape_device(f: &mut Fixture) {
    let mut cfg = f.config();
    cfg.shape_ifindex = SHAPE_IFINDEX;
    f.set_config_exact(cfg);
}

/// `gate_base`; peer 1 shaped both ways, peer 3 (IPv6 range) to it only, the shaping device set.
fn shape_base(f: &mut Fixture) {
    gate_base(f);
    f.peer_info(PEER1, shaped(TX_CLASS, RX_CLASS));
    f.peer_info(PEER3, shaped(TX_CLASS, 0));
    with_shape_device(f);
}

/// `shape_base` without a shaping device: ingress cannot be shaped.
fn shape_no_device(f: &mut Fixture) {
    gate_base(f);
    f.peer_info(PEER1, shaped(TX_CLASS, RX_CLASS));
}

fn shape_held(f: &mut Fixture) {
    shape_base(f);
    f.peer_info(
        PEER1,
        PeerInfo {
            gate: DropReason::GateKicked as u32,
            ..shaped(TX_CLASS, RX_CLASS)
        },
    );
}

fn shape_quota_exhausted(f: &mut Fixture) {
    shape_base(f);
    f.peer_info(
        PEER1,
        PeerInfo {
            quota_bucket: BUCKET,
            ..shaped(TX_CLASS, RX_CLASS)
        },
    );
    f.quota_bucket(BUCKET, bucket(QUOTA_LIMIT, QUOTA_LIMIT));
}

fn shape_cases() -> Vec<Case> {
    let shaped_in = |p: PeerId| -> PeerExpect {
        (
            TC_ACT_REDIRECT,
            vec![TC_IN_SHAPED],
            Some((p, PeerDelta::Rx)),
        )
    };
    let shaped_out =
        |p: PeerId| -> PeerExpect { (TC_ACT_OK, vec![TC_OUT_SHAPED], Some((p, PeerDelta::Tx))) };
    use Prog::{In, Out};
    let kicked = DropReason::GateKicked;
    let q = DropReason::QuotaExhausted;
    vec![
        peer_case(
            "shape: v4 from a shaped peer is redirected to the shaping device",
            In,
            || packets::tcp4(PEER1_V4, CLEAN, 4000, 443, 100),
            shape_base,
            shaped_in(PEER1),
        ),
        peer_case(
            "shape: v6 from a shaped peer is redirected",
            In,
            || packets::udp6(PEER1_V6, CLEAN6, 4000, 53, 60),
            shape_base,
            shaped_in(PEER1),
        ),
        peer_case(
            "shape: a v4 non-first fragment from a shaped peer is redirected too",
            In,
            || {
                let mut p = packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60);
                packets::set_ipv4_fragment(&mut p, 100, false);
                p
            },
            shape_base,
            shaped_in(PEER1),
        ),
        peer_case(
            "shape: v4 to a shaped peer is queued in its class",
            Out,
            || packets::tcp4(CLEAN, PEER1_V4, 443, 4000, 1000),
            shape_base,
            shaped_out(PEER1),
        ),
        peer_case(
            "shape: v6 to a range-attributed peer shaped one way is queued",
            Out,
            || packets::tcp6(CLEAN6, PEER3_V6, 443, 4000, 10),
            shape_base,
            shaped_out(PEER3),
        ),
        peer_case(
            "shape: v6 from that peer (not shaped that way) passes",
            In,
            || packets::tcp6(PEER3_V6, CLEAN6, 4000, 443, 10),
            shape_base,
            pass_in(PEER3),
        ),
        peer_case(
            "shape: an unshaped peer passes both ways",
            Out,
            || packets::udp4(CLEAN, PEER4_V4, 53, 4000, 60),
            shape_base,
            pass_out(PEER4),
        ),
        peer_case(
            "shape: without a shaping device, traffic from a shaped peer passes unshaped",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            shape_no_device,
            pass_in(PEER1),
        ),
        peer_case(
            "shape: a held shaped peer is dropped at the gate first",
            In,
            || packets::udp4(PEER1_V4, CLEAN, 4000, 53, 60),
            shape_held,
            (
                TC_ACT_SHOT,
                vec![TC_IN_DROP_GATE, drop_slot(kicked), EVENTS_EMITTED],
                Some((PEER1, PeerDelta::Drop(kicked))),
            ),
        ),
        peer_case(
            "shape: a shaped peer over its quota is dropped, not queued",
            Out,
            || packets::udp4(CLEAN, PEER1_V4, 53, 4000, 60),
            shape_quota_exhausted,
            (
                TC_ACT_SHOT,
                vec![TC_OUT_DROP_QUOTA, drop_slot(q)],
                Some((PEER1, PeerDelta::Drop(q))),
            ),
        ),
    ]
}

#[test]
fn shaping_table() {
    run_table(shape_cases());
}

/// The class reaches the qdisc through `skb->priority`: each direction's class, and an
/// unshaped packet's priority left alone.
#[test]
fn shaping_sets_the_peers_class_as_priority() {
    let mut f = Fixture::load();
    shape_base(&mut f);
    let cases = [
        (
            Tc::Ingress,
            packets::tcp4(PEER1_V4, CLEAN, 4000, 443, 10),
            (TC_ACT_REDIRECT, RX_CLASS),
        ),
        (
            Tc::Egress,
            packets::tcp4(CLEAN, PEER1_V4, 443, 4000, 10),
            (TC_ACT_OK, TX_CLASS),
        ),
        (
            Tc::Egress,
            packets::tcp6(CLEAN6, PEER1_V6, 443, 4000, 10),
            (TC_ACT_OK, TX_CLASS),
        ),
        (
            Tc::Ingress,
            packets::tcp6(PEER3_V6, CLEAN6, 4000, 443, 10),
            (TC_ACT_OK, 0),
        ),
        (
            Tc::Egress,
            packets::tcp4(CLEAN, PEER4_V4, 443, 4000, 10),
            (TC_ACT_OK, 0),
        ),
    ];
    for (prog, packet, want) in cases {
        assert_eq!(
            f.run_tc_priority(prog, &packet),
            want,
            "{} of a {}-byte packet: (verdict, skb->priority)",
            prog.name(),
            packet.len()
        );
    }
}

// ---- the IPv4 address pool ----

/// The pool 10.9.0.0/16 (it holds `PEER2_V4`, `PEER4_V4` and `PEER2_NET`'s range).
const POOL_BASE: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 0);
/// An address in the pool with a slot for peer 5 (not in the host-route hash).
const POOL_PEER5: Ipv4Addr = Ipv4Addr::new(10, 9, 200, 1);

fn pool_offset(a: Ipv4Addr) -> u32 {
    u32::from(a) - u32::from(POOL_BASE)
}

/// `base` (ranges on) with the pool 10.9.0.0/16: a slot for peer 5 at `POOL_PEER5`, a slot for
/// peer 1 at `PEER4_V4` (in peer 4's range: the slot wins), and `STRANGER_V4`'s host route
/// in the hash for peer 3, outside the pool.
fn pool_base(f: &mut Fixture) {
    base(f);
    let mut cfg = f.config();
    cfg.peer_pool_v4_base = u32::from(POOL_BASE);
    cfg.peer_pool_v4_len = 1 << 16;
    f.set_config_exact(cfg);
    f.peer_pool_v4(pool_offset(POOL_PEER5), Some(PEER5));
    f.peer_pool_v4(pool_offset(PEER4_V4), Some(PEER1));
    f.peer_v4(STRANGER_V4, PEER3);
}

/// `pool_base` with a host route for peer 3 in the hash that the pool has no slot for.
fn pool_stale_hash(f: &mut Fixture) {
    pool_base(f);
    f.peer_v4(Ipv4Addr::new(10, 9, 250, 1), PEER3);
}

fn pool_cases() -> Vec<Case> {
    use Prog::In;
    vec![
        peer_case(
            "pool: an address with a slot is its peer's (no hash entry needed)",
            In,
            || packets::udp4(POOL_PEER5, CLEAN, 4000, 53, 60),
            pool_base,
            pass_in(PEER5),
        ),
        peer_case(
            "pool: a slot beats a range covering the same address",
            In,
            || packets::udp4(PEER4_V4, CLEAN, 4000, 53, 60),
            pool_base,
            pass_in(PEER1),
        ),
        peer_case(
            "pool: an address without a slot falls to the ranges",
            In,
            || packets::udp4(PEER2_V4, CLEAN, 4000, 53, 60),
            pool_base,
            pass_in(PEER2),
        ),
        peer_case(
            "pool: inside the pool the hash is not consulted (its peer 3 loses to the range)",
            In,
            || packets::udp4(Ipv4Addr::new(10, 9, 250, 1), CLEAN, 4000, 53, 60),
            pool_stale_hash,
            pass_in(PEER2),
        ),
        peer_case(
            "pool: outside the pool the hash decides",
            In,
            || packets::udp4(STRANGER_V4, CLEAN, 4000, 53, 60),
            pool_base,
            pass_in(PEER3),
        ),
    ]
}

#[test]
fn peer_pool_table() {
    run_table(pool_cases());
}

/// The benchmark's memory-floor programs (`capybara_tests::bench::floor`) pass the verifier and
/// make every access for a known peer; a probe from outside the peers is refused, so a floor
/// figure can only come from programs that did all their lookups.
#[test]
fn floor_programs_make_every_access() {
    use capybara_tests::bench::floor::{ACCESSES, Floor};
    let first = Ipv4Addr::new(10, 0, 0, 1);
    let frame = |i: u32| {
        packets::eth_ip(&packets::udp4(
            Ipv4Addr::from(u32::from(first) + i),
            Ipv4Addr::new(192, 0, 2, 77),
            40000,
            443,
            100,
        ))
    };
    let floor = Floor::new(u32::from(first), 10).expect("floor programs load");
    let ns = floor
        .round(&(0..10).map(frame).collect::<Vec<_>>())
        .expect("every probe of a known peer is OK");
    assert_eq!(ns.len(), ACCESSES.len());
    assert!(ns.iter().all(|n| *n > 0.0), "{ns:?}");
    let err = floor
        .round(&[frame(10)])
        .expect_err("a probe from outside the peers is refused");
    assert!(err.to_string().contains("returned 2"), "{err:#}");
}

// ---- GSO super-packets ----

/// One GSO skb run through a tunnel-device program: the super-packet, the `__sk_buff` GSO
/// fields, and what crossed (or will cross) the tunnel as separate IP packets.
struct GsoRow {
    name: &'static str,
    prog: Prog,
    packet: fn() -> Vec<u8>,
    gso_segs: u32,
    gso_size: u32,
    /// The IP packets the super-packet stands for: each one's IP length.
    crossed: &'static [u64],
}

impl GsoRow {
    fn crossed(&self) -> Counter {
        Counter {
            packets: self.crossed.len() as u64,
            bytes: self.crossed.iter().sum(),
        }
    }
}

/// Payload of the super-packets: 2800 bytes, three segments of `GSO_SIZE` (1000, 1000, 800).
const GSO_PAYLOAD: usize = 2800;
const GSO_SIZE: u32 = 1000;
/// UDP (UDP_L4 GSO) payload: three full segments.
const GSO_UDP_PAYLOAD: usize = 3000;

fn gso_tcp4_from1() -> Vec<u8> {
    packets::tcp4(PEER1_V4, CLEAN, 40000, 443, GSO_PAYLOAD)
}
fn gso_tcp6_from1() -> Vec<u8> {
    packets::tcp6(PEER1_V6, CLEAN6, 40000, 443, GSO_PAYLOAD)
}
fn gso_udp4_from1() -> Vec<u8> {
    packets::udp4(PEER1_V4, CLEAN, 40000, 443, GSO_UDP_PAYLOAD)
}
fn gso_udp6_from1() -> Vec<u8> {
    packets::udp6(PEER1_V6, CLEAN6, 40000, 443, GSO_UDP_PAYLOAD)
}
fn gso_tcp4_to1() -> Vec<u8> {
    packets::tcp4(CLEAN, PEER1_V4, 443, 40000, GSO_PAYLOAD)
}
fn gso_tcp6_to1() -> Vec<u8> {
    packets::tcp6(CLEAN6, PEER1_V6, 443, 40000, GSO_PAYLOAD)
}
fn gso_udp4_to1() -> Vec<u8> {
    packets::udp4(CLEAN, PEER1_V4, 443, 40000, GSO_UDP_PAYLOAD)
}
fn gso_udp6_to1() -> Vec<u8> {
    packets::udp6(CLEAN6, PEER1_V6, 443, 40000, GSO_UDP_PAYLOAD)
}

/// Segments of the rows: IP + TCP (20 + 20, 40 + 20) or IP + UDP (20 + 8, 40 + 8) headers in
/// front of each payload piece.
const TCP4_SEGS: &[u64] = &[1040, 1040, 840];
const TCP6_SEGS: &[u64] = &[1060, 1060, 860];
const UDP4_SEGS: &[u64] = &[1028, 1028, 1028];
const UDP6_SEGS: &[u64] = &[1048, 1048, 1048];

fn gso_rows() -> Vec<GsoRow> {
    use Prog::{In, Out};
    let row = |name, prog, packet, gso_segs, crossed| GsoRow {
        name,
        prog,
        packet,
        gso_segs,
        gso_size: GSO_SIZE,
        crossed,
    };
    vec![
        // Ingress as the TUN's virtio-net header leaves it: gso_size set, gso_segs 0.
        row(
            "GSO in, TCP v4, gso_segs 0",
            In,
            gso_tcp4_from1,
            0,
            TCP4_SEGS,
        ),
        row(
            "GSO in, TCP v6, gso_segs 0",
            In,
            gso_tcp6_from1,
            0,
            TCP6_SEGS,
        ),
        row(
            "GSO in, UDP_L4 v4, gso_segs 0",
            In,
            gso_udp4_from1,
            0,
            UDP4_SEGS,
        ),
        row(
            "GSO in, UDP_L4 v6, gso_segs 0",
            In,
            gso_udp6_from1,
            0,
            UDP6_SEGS,
        ),
        // A count the stack already set is used as it is.
        row(
            "GSO in, TCP v4, gso_segs 3",
            In,
            gso_tcp4_from1,
            3,
            TCP4_SEGS,
        ),
        // Egress as the stack hands TSO/USO skbs to the device: both set.
        row("GSO out, TCP v4", Out, gso_tcp4_to1, 3, TCP4_SEGS),
        row("GSO out, TCP v6", Out, gso_tcp6_to1, 3, TCP6_SEGS),
        row("GSO out, UDP_L4 v4", Out, gso_udp4_to1, 3, UDP4_SEGS),
        row("GSO out, UDP_L4 v6", Out, gso_udp6_to1, 3, UDP6_SEGS),
        // A super-packet that is one segment (payload ≤ gso_size) is one packet.
        GsoRow {
            name: "GSO in, one segment",
            prog: In,
            packet: gso_tcp4_from1,
            gso_segs: 0,
            gso_size: 4000,
            crossed: &[2840],
        },
    ]
}

/// A GSO skb is counted as the packets that cross the tunnel: `gso_segs` of them (at ingress,
/// where a TUN's virtio-net header leaves it 0, the payload cut into `gso_size` pieces), the
/// headers every extra segment repeats added to the bytes — in the pass slot and the peer's
/// counters, and nothing else moves.
#[test]
fn gso_skbs_count_the_segments_that_crossed() {
    let mut failures = Vec::new();
    for row in gso_rows() {
        let mut f = Fixture::load();
        gate_base(&mut f);
        let (slot, delta, which) = match row.prog {
            Prog::In => (TC_IN_PASS, PeerDelta::Rx, Tc::Ingress),
            _ => (TC_OUT_PASS, PeerDelta::Tx, Tc::Egress),
        };
        let before = snapshot(&mut f);
        let verdict = f.run_tc_gso(which, &(row.packet)(), row.gso_segs, row.gso_size);
        let after = snapshot(&mut f);
        let mut errors = check_deltas(
            &before,
            &after,
            row.crossed(),
            &[slot],
            None,
            Some((PEER1, delta)),
        );
        if verdict != TC_ACT_OK {
            errors.insert(0, format!("verdict {verdict}, want {TC_ACT_OK}"));
        }
        if !errors.is_empty() {
            failures.push(format!("{}:\n    {}", row.name, errors.join("\n    ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The quota rule on super-packets: the quota step decides per skb, so a GSO skb passes whole
/// (and is charged its segments' bytes) when the bucket was not exhausted before it — a quota
/// can be overrun by at most one super-packet per CPU (≤ 64 KiB each) — and is dropped whole,
/// all its segments counted as dropped, once it is.
#[test]
fn quota_boundary_inside_a_super_packet_passes_it_whole_then_drops_whole() {
    let tcp = TCP4_SEGS.iter().sum::<u64>();
    for (which, packet, slot, drop_slot_tc, delta) in [
        (
            Tc::Ingress,
            gso_tcp4_from1 as fn() -> Vec<u8>,
            TC_IN_PASS,
            TC_IN_DROP_QUOTA,
            PeerDelta::Rx,
        ),
        (
            Tc::Egress,
            gso_tcp4_to1,
            TC_OUT_PASS,
            TC_OUT_DROP_QUOTA,
            PeerDelta::Tx,
        ),
    ] {
        let segs = if which == Tc::Ingress { 0 } else { 3 };
        let crossed = Counter {
            packets: 3,
            bytes: tcp,
        };
        // One byte of budget left (the 80 and 90 % warnings given): the boundary falls inside
        // the first segment, and the super-packet crossing it gives the 100 % warning.
        let mut f = Fixture::load();
        quota_base(&mut f, QUOTA_LIMIT - 1);
        f.quota_bucket(
            BUCKET,
            QuotaBucket {
                warned: QUOTA_WARNED_80 | QUOTA_WARNED_90,
                ..bucket(QUOTA_LIMIT, QUOTA_LIMIT - 1)
            },
        );
        let before = snapshot(&mut f);
        assert_eq!(
            f.run_tc_gso(which, &packet(), segs, GSO_SIZE),
            TC_ACT_OK,
            "{which:?}: a super-packet before exhaustion passes whole"
        );
        let after = snapshot(&mut f);
        let errors = check_deltas(
            &before,
            &after,
            crossed,
            &[slot, EVENTS_EMITTED],
            None,
            Some((PEER1, delta)),
        );
        assert!(errors.is_empty(), "{which:?} pass: {}", errors.join("; "));
        let events = f.events();
        assert!(
            matches!(events.as_slice(), [e] if e.kind == EVENT_QUOTA && e.reason == 100),
            "{which:?}: one 100 % warning: {events:?}"
        );
        assert_eq!(
            f.read_quota_bucket(BUCKET).used_bytes,
            QUOTA_LIMIT - 1 + tcp,
            "{which:?}: charged every segment's bytes (the overrun is this super-packet)"
        );
        // Now exhausted: the next super-packet is dropped whole, all segments counted.
        let before = snapshot(&mut f);
        assert_eq!(
            f.run_tc_gso(which, &packet(), segs, GSO_SIZE),
            TC_ACT_SHOT,
            "{which:?}: a super-packet after exhaustion is dropped"
        );
        let after = snapshot(&mut f);
        let q = DropReason::QuotaExhausted;
        let errors = check_deltas(
            &before,
            &after,
            crossed,
            &[drop_slot_tc, drop_slot(q)],
            None,
            Some((PEER1, PeerDelta::Drop(q))),
        );
        assert!(errors.is_empty(), "{which:?} drop: {}", errors.join("; "));
        assert_eq!(
            f.read_quota_bucket(BUCKET).used_bytes,
            QUOTA_LIMIT - 1 + tcp,
            "{which:?}: a dropped super-packet is not charged"
        );
    }
}

/// A super-packet is one flow (every segment has the same 5-tuple): it opens one slot of the
/// peer's flow limit, not one per segment.
#[test]
fn a_super_packet_is_one_flow() {
    let mut f = Fixture::load();
    flows_base(&mut f);
    assert_eq!(
        f.run_tc_gso(Tc::Ingress, &gso_udp4_from1(), 0, GSO_SIZE),
        TC_ACT_OK
    );
    assert_eq!(f.flow_count(PEER1), 1);
    assert_eq!(
        f.run_tc_gso(Tc::Egress, &gso_udp4_to1(), 3, GSO_SIZE),
        TC_ACT_OK
    );
    assert_eq!(f.flow_count(PEER1), 1, "the reply is the same flow");
}

/// The concurrency rule of the hot line (`capybara_common::peer::PeerHot`): the agent writes a
/// peer's gate and deadline field by field through its mapping, deadline before gate when it
/// admits and gate before deadline when it holds, so the kernel never sees a torn admission.
/// The agent (`Dataplane::set_gate`, the real write path) flips a peer between held (kicked, no
/// deadline) and admitted under a deadline that has passed, as fast as it can, while
/// `tc_ingress` runs the peer's packets on the other CPU (BPF_PROG_TEST_RUN, 2 000 runs per
/// call). Every packet must be dropped, as kicked or as expired: a torn state — admitted with
/// the held state's deadline 0, i.e. no deadline — would pass it. The check is statistical:
/// a torn state lives for the nanoseconds between two stores, and the test overlaps a few
/// hundred thousand flips with the packets (it also asserts that both states were seen).
/// Bounded: 1.5 s of flipping.
#[test]
fn gate_and_deadline_written_field_by_field_are_never_seen_torn() {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::{Instant, SystemTime},
    };

    use aya::{
        EbpfLoader,
        programs::{SchedClassifier, TestRun as _, TestRunOptions},
    };
    use capybara_agent::{
        dataplane::{Dataplane, DataplaneConfig, Gate, object::OBJECT},
        net::Cidr,
    };
    use capybara_common::maps as names;
    use capybara_tests::{bpf::TEST_RUN_L2_HLEN, netns::BpffsDir};

    const PEER: PeerId = 3;
    let addr = Ipv4Addr::new(10, 77, 0, 3);
    let dir = BpffsDir::new();
    let mut dp = Dataplane::open(DataplaneConfig {
        bpffs_dir: dir.path().into(),
        tunnel_l2_hlen: 0,
    })
    .expect("open the dataplane");
    dp.add_peer(PEER, &[Cidr::host(addr.into())]).unwrap();
    dp.set_gate(PEER, Gate::Held(DropReason::GateKicked))
        .unwrap();
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(dir.path())
        .override_global("TUNNEL_L2_HLEN", &TEST_RUN_L2_HLEN, true);
    let mut ebpf = loader.load(OBJECT).expect("load the object over the pins");
    let prog: &mut SchedClassifier = ebpf
        .program_mut(names::PROG_TC_INGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("load (verify) tc_ingress");
    let prog: &SchedClassifier = prog;
    let frame = packets::eth_ip(&packets::udp4(
        addr,
        Ipv4Addr::new(192, 0, 2, 9),
        4000,
        53,
        20,
    ));
    let passed_at_start = dp.counters().unwrap().get(TC_IN_PASS).packets;

    let stop = AtomicBool::new(false);
    let (runs, flips) = std::thread::scope(|s| {
        let packets = s.spawn(|| {
            let mut runs = 0u64;
            while !stop.load(Ordering::Relaxed) {
                prog.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    repeat: 2000,
                    ..TestRunOptions::new()
                })
                .expect("BPF_PROG_TEST_RUN of tc_ingress");
                runs += 2000;
            }
            runs
        });
        let passed = Some(SystemTime::now() - Duration::from_secs(60));
        let t = Instant::now();
        let mut flips = 0u64;
        while t.elapsed() < Duration::from_millis(1500) {
            dp.set_gate(PEER, Gate::Admitted { until: passed }).unwrap();
            dp.set_gate(PEER, Gate::Held(DropReason::GateKicked))
                .unwrap();
            flips += 2;
        }
        stop.store(true, Ordering::Relaxed);
        (packets.join().unwrap(), flips)
    });

    let stats = dp.peer_stats(PEER).unwrap();
    let kicked = stats.drops[DropReason::GateKicked as usize];
    let expired = stats.drops[DropReason::GateExpired as usize];
    assert_eq!(
        stats.rx_packets, 0,
        "packets passed a torn admission: {stats:?}"
    );
    assert_eq!(
        dp.counters().unwrap().get(TC_IN_PASS).packets,
        passed_at_start,
        "TC_IN_PASS moved"
    );
    assert_eq!(
        kicked + expired,
        runs,
        "every run dropped at the gate: {stats:?}"
    );
    // The flips overlapped the packets: both states were seen.
    assert!(
        kicked > 0 && expired > 0,
        "{runs} runs, {flips} flips: {stats:?}"
    );
}

// ---- the socket programs (cgroup_skb, issue 24) ----
//
// `BPF_PROG_TEST_RUN` hands a cgroup_skb program a dummy socket of its own (`skb->sk` is set,
// to a socket userspace has no fd for), so its storage cannot hold a binding: every packet
// here takes the unbound path. These rows load both programs through the verifier and check
// that path — passed, `SOCK_PASS_UNBOUND` one packet (bytes 0), nothing else moved (no
// `COUNTERS` slot, no list, no peer, no other socket slot) — whatever the packet and the
// policy of the peers. The bound paths (gate, quota, flows, counters, shaping) are covered end
// to end in `e2e_proxy_kernel`, with real sockets.

fn sock_counters(f: &mut Fixture) -> Vec<Counter> {
    use aya::maps::{MapData, PerCpuArray};
    use capybara_common::{maps as names, sock::SOCK_COUNTER_SLOTS};
    let m: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(
        f.ebpf()
            .map(names::SOCK_COUNTERS)
            .expect("SOCK_COUNTERS in the object"),
    )
    .unwrap();
    (0..SOCK_COUNTER_SLOTS)
        .map(|i| {
            let mut total = Counter::default();
            for c in m.get(&i, 0).expect("read SOCK_COUNTERS").iter() {
                total.add(c);
            }
            total
        })
        .collect()
}

#[test]
fn socket_programs_pass_unbound_packets_untouched() {
    use aya::programs::{CgroupSkb, ProgramError, TestRun, TestRunOptions};
    use capybara_common::{
        maps::{PROG_SOCK_EGRESS, PROG_SOCK_INGRESS},
        sock::{SOCK_PASS_UNBOUND, SOCK_SLOT_BASE},
    };
    const CG_PASS: u32 = 1;
    let mut f = Fixture::load();
    base(&mut f);
    dst_lists(&mut f);
    // A held peer and a quota-limited one: an unbound packet must not reach their steps.
    f.peer_info(
        PEER1,
        PeerInfo {
            gate: DropReason::GateKicked as u32,
            ..PeerInfo::default()
        },
    );
    for name in [PROG_SOCK_EGRESS, PROG_SOCK_INGRESS] {
        let p: &mut CgroupSkb = f
            .ebpf()
            .program_mut(name)
            .unwrap_or_else(|| panic!("{name} in the object"))
            .try_into()
            .expect("a cgroup_skb program");
        p.load()
            .unwrap_or_else(|e: ProgramError| panic!("the verifier refused {name}: {e:?}"));
    }
    let packets: [(&str, Vec<u8>); 5] = [
        (
            "tcp4 to a blocked destination",
            packets::tcp4(PEER1_V4, BLOCKED, 40000, 443, 100),
        ),
        ("tcp6", packets::tcp6(PEER1_V6, CLEAN6, 40000, 443, 1000)),
        ("udp4", packets::udp4(PEER1_V4, CLEAN, 40000, 53, 60)),
        ("icmp4", packets::icmp4(CLEAN, PEER1_V4, 56)),
        (
            "tcp4, 1400 bytes",
            packets::tcp4(CLEAN, PEER1_V4, 443, 40000, 1400),
        ),
    ];
    let mut failures = Vec::new();
    for name in [PROG_SOCK_EGRESS, PROG_SOCK_INGRESS] {
        for (what, ip) in &packets {
            let input = packets::eth_ip(ip);
            let before = snapshot(&mut f);
            let sock_before = sock_counters(&mut f);
            let prog: &CgroupSkb = f
                .ebpf()
                .program(name)
                .unwrap()
                .try_into()
                .expect("a cgroup_skb program");
            let verdict = prog
                .test_run(TestRunOptions {
                    data_in: Some(&input),
                    ..TestRunOptions::new()
                })
                .unwrap_or_else(|e| panic!("test run of {name} failed: {e:?}"))
                .return_value;
            let after = snapshot(&mut f);
            let sock_after = sock_counters(&mut f);
            let mut errors = check_deltas(
                &before,
                &after,
                Counter {
                    packets: 1,
                    bytes: ip.len() as u64,
                },
                &[],
                None,
                None,
            );
            if verdict != CG_PASS {
                errors.insert(0, format!("verdict {verdict}, want {CG_PASS} (pass)"));
            }
            for (slot, (b, a)) in sock_before.iter().zip(&sock_after).enumerate() {
                let want = if slot as u32 == SOCK_PASS_UNBOUND - SOCK_SLOT_BASE {
                    Counter {
                        packets: 1,
                        bytes: 0,
                    }
                } else {
                    Counter::default()
                };
                let got = sub(a, b);
                if got != want {
                    errors.push(format!("SOCK_COUNTERS[{slot}]: got {got:?}, want {want:?}"));
                }
            }
            if errors.is_empty() {
                eprintln!("ok   {what} ({name})");
            } else {
                failures.push(format!("{what} ({name}):\n    {}", errors.join("\n    ")));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // What the unbound path costs per packet (printed, not asserted: performance is
    // `cargo xtask bench`'s), beside the tunnel program's cheapest path (a packet of no peer).
    let input = packets::eth_ip(&packets::tcp4(CLEAN, PEER1_V4, 443, 40000, 1400));
    let per_packet = |f: &mut Fixture, name: &str| -> f64 {
        let opts = || TestRunOptions {
            data_in: Some(&input),
            repeat: 200_000,
            ..TestRunOptions::new()
        };
        let p = f.ebpf().program(name).unwrap();
        let r = match p {
            aya::programs::Program::CgroupSkb(p) => p.test_run(opts()),
            aya::programs::Program::SchedClassifier(p) => p.test_run(opts()),
            _ => unreachable!("{name}"),
        }
        .unwrap_or_else(|e| panic!("test run of {name}: {e:?}"));
        r.duration.as_nanos() as f64
    };
    let sock = per_packet(&mut f, PROG_SOCK_EGRESS);
    let tc = per_packet(&mut f, capybara_common::maps::PROG_TC_EGRESS);
    eprintln!(
        "unbound packet through sock_egress: {sock:.0} ns; a packet of no peer through \
         tc_egress: {tc:.0} ns (BPF_PROG_TEST_RUN, 200 000 repeats, mean)"
    );
}
