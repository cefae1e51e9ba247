//! Privileged tests of the agent's dataplane module against the real kernel: pins re-used across
//! opens, attach/re-attach/detach in a network namespace, blocklist generations, and "bad input
//! changes nothing". Each test uses its own bpffs directory (removed on drop, also on panic) and
//! its own namespaces. Run as root: `cargo test -p capybara-tests --test it -- dataplane::`; the
//! 1M-prefix timing is meaningful in a release build (`--release`).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Instant,
};

use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuValues};
use capybara_agent::{
    blocklist::{
        BlocklistError, Direction, ListName, RegistrySnapshot, sample::random_v4_prefixes,
    },
    dataplane::{AttachHow, Dataplane, DataplaneConfig, DataplaneError, lists::Restored},
    net::Cidr,
};
use capybara_common::{
    LAYOUT_VERSION,
    blocklist::V4_DIR_ENTRIES_PER_GEN,
    config::{CONFIG_F_PEER_V4_RANGES, CONFIG_F_PEER_V6_RANGES, Config},
    counters::{Counter, XDP_PASS_CLEAN},
    maps as names,
};
use capybara_tests::netns::{BpffsDir, NetNs, VethPair};

fn open(dir: &Path) -> Dataplane {
    Dataplane::open(DataplaneConfig {
        bpffs_dir: dir.to_path_buf(),
        tunnel_l2_hlen: 14,
    })
    .unwrap_or_else(|e| panic!("opening the dataplane in {}: {e}", dir.display()))
}

fn cidrs(s: &[&str]) -> Vec<Cidr> {
    s.iter()
        .map(|c| c.parse().unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

fn name(s: &str) -> ListName {
    ListName::parse(s).unwrap()
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn reopen_reuses_pins_and_counters_survive() {
    let dir = BpffsDir::new();
    let dp = open(dir.path());
    for m in names::ALL {
        assert!(dir.path().join(m).exists(), "map {m} pinned");
    }
    assert_eq!(dp.runtime_config().layout_version, LAYOUT_VERSION);
    drop(dp);

    // Write a counter the way the kernel would, through the pin.
    let ncpu = aya::util::nr_cpus().unwrap();
    {
        let md = MapData::from_pin(dir.path().join(names::COUNTERS)).unwrap();
        let mut arr: PerCpuArray<MapData, Counter> =
            PerCpuArray::try_from(Map::PerCpuArray(md)).unwrap();
        let v = PerCpuValues::try_from(vec![
            Counter {
                packets: 3,
                bytes: 300
            };
            ncpu
        ])
        .unwrap();
        arr.set(XDP_PASS_CLEAN, v, 0).unwrap();
    }
    let mut dp = open(dir.path());
    let c = dp.counters().unwrap().get(XDP_PASS_CLEAN);
    assert_eq!(
        c,
        Counter {
            packets: 3 * ncpu as u64,
            bytes: 300 * ncpu as u64
        }
    );

    // Peers and list contents survive a reopen too (the agent rebuilds its mirror from the maps).
    dp.set_peer(5, &cidrs(&["10.7.0.2/32", "fd00:7::2/128", "10.99.0.0/16"]))
        .unwrap();
    assert_eq!(
        dp.runtime_config().flags & CONFIG_F_PEER_V4_RANGES,
        CONFIG_F_PEER_V4_RANGES
    );
    dp.list_replace(
        Direction::Source,
        &name("manual"),
        &cidrs(&["192.0.2.0/24", "198.51.100.7"]),
    )
    .unwrap();
    let snap = dp.list_snapshot();
    drop(dp);
    let mut dp = open(dir.path());
    assert_eq!(
        dp.counters().unwrap().get(XDP_PASS_CLEAN).packets,
        3 * ncpu as u64
    );
    assert_eq!(
        dp.peers().get(&5).unwrap(),
        &cidrs(&["10.7.0.2/32", "10.99.0.0/16", "fd00:7::2/128"])
    );
    // The restored registry matches what the kernel holds: nothing rewritten.
    let before = dp.read_kernel_lists(Direction::Source).unwrap();
    let r = dp.restore_lists(&snap).unwrap();
    assert_eq!(
        (r.source, r.destination),
        (Restored::Unchanged, Restored::Unchanged)
    );
    assert_eq!(dp.read_kernel_lists(Direction::Source).unwrap(), before);
    assert_eq!(
        dp.lookup_v4(Direction::Source, v4("198.51.100.7")).unwrap(),
        1
    );
    // A different snapshot is written.
    let r = dp.restore_lists(&RegistrySnapshot::default()).unwrap();
    assert_eq!(r.source, Restored::Rewritten);
    assert_eq!(
        dp.lookup_v4(Direction::Source, v4("198.51.100.7")).unwrap(),
        0
    );

    // A re-used peer id starts at zero; removing a peer clears the range flag.
    dp.remove_peer(5).unwrap();
    assert_eq!(
        dp.runtime_config().flags & (CONFIG_F_PEER_V4_RANGES | CONFIG_F_PEER_V6_RANGES),
        0
    );
    assert!(dp.peers().is_empty());
}

#[test]
fn pins_of_another_layout_are_refused_with_a_reset_hint() {
    let dir = BpffsDir::new();
    drop(open(dir.path()));
    {
        let md = MapData::from_pin(dir.path().join(names::CONFIG)).unwrap();
        let mut arr: Array<MapData, Config> = Array::try_from(Map::Array(md)).unwrap();
        arr.set(
            0,
            Config {
                layout_version: LAYOUT_VERSION + 1,
                ..Config::default()
            },
            0,
        )
        .unwrap();
    }
    let e = Dataplane::open(DataplaneConfig {
        bpffs_dir: dir.path().into(),
        tunnel_l2_hlen: 0,
    })
    .unwrap_err();
    assert!(
        matches!(e, DataplaneError::LayoutMismatch { found, .. } if found == LAYOUT_VERSION + 1)
    );
    assert!(e.to_string().contains("rm -rf"), "{e}");
}

fn xdp_attached(ns: &NetNs, ifname: &str) -> bool {
    ns.exec(&["ip", "-d", "link", "show", "dev", ifname])
        .contains("prog/xdp")
}

#[test]
fn attach_in_a_namespace_survives_the_agent_and_reattach_replaces_in_place() {
    let dir = BpffsDir::new();
    let up = NetNs::new("u");
    let peer = NetNs::new("p");
    let veth = VethPair::new(&up, &peer, 61);
    let tun = VethPair::new(&up, &peer, 62);
    let (uplink, tundev) = (veth.a.ifname.clone(), tun.a.ifname.clone());

    let mut dp = open(dir.path());
    let (x, t) = up.run(|| {
        (
            dp.attach_xdp(&uplink).unwrap(),
            dp.attach_tc(&tundev).unwrap(),
        )
    });
    assert_eq!(x.how, AttachHow::XdpDriver, "veth has native XDP");
    assert!(t.iter().all(|a| a.how == AttachHow::Tcx));
    for a in std::iter::once(&x).chain(&t) {
        assert!(a.pin.exists(), "{} pinned", a.pin.display());
    }
    assert!(xdp_attached(&up, &uplink));
    dp.shutdown(false).unwrap();
    // The agent is gone; the programs keep enforcing.
    assert!(xdp_attached(&up, &uplink));

    // A new agent swaps its programs into the same links.
    let mut dp = open(dir.path());
    let (x2, t2) = up.run(|| {
        (
            dp.attach_xdp(&uplink).unwrap(),
            dp.attach_tc(&tundev).unwrap(),
        )
    });
    assert_eq!(x2.how, AttachHow::Replaced);
    assert!(t2.iter().all(|a| a.how == AttachHow::Replaced), "{t2:?}");
    assert_eq!(x2.pin, x.pin);
    assert!(xdp_attached(&up, &uplink));

    // Loopback has no native XDP: SKB mode.
    let d = up.run(|| dp.attach_xdp("lo").unwrap());
    assert_eq!(d.how, AttachHow::XdpSkb);
    assert!(xdp_attached(&up, "lo"));

    // Unknown interfaces are named.
    let e = up.run(|| dp.attach_xdp("nosuchif0").unwrap_err());
    assert!(
        matches!(&e, DataplaneError::UnknownInterface { ifname } if ifname == "nosuchif0"),
        "{e}"
    );

    let removed = dp.detach().unwrap();
    assert_eq!(removed.len(), 4, "{removed:?}");
    assert!(!xdp_attached(&up, &uplink));
    assert!(dp.pinned_links().unwrap().is_empty());
    // Re-attaching after a detach makes a new link (the stale pin is gone).
    let x3 = up.run(|| dp.attach_xdp(&uplink).unwrap());
    assert_eq!(x3.how, AttachHow::XdpDriver);
    dp.detach().unwrap();
}

#[test]
fn replace_writes_the_inactive_generation_then_flips() {
    let dir = BpffsDir::new();
    let mut dp = open(dir.path());
    let src = Direction::Source;
    let g0 = dp.runtime_config().src_generation;

    dp.list_replace(
        src,
        &name("geo:CN"),
        &cidrs(&["1.0.0.0/8", "2001:db8::/32"]),
    )
    .unwrap();
    let manual = dp
        .list_replace(
            src,
            &name("manual"),
            &cidrs(&["1.2.3.0/24", "1.2.4.128/25", "5.6.7.8", "2001:db8:1::/48"]),
        )
        .unwrap();
    dp.list_replace(
        src,
        &name("allow"),
        &cidrs(&["1.2.3.4", "2001:db8:1:1::/64"]),
    )
    .unwrap();
    let geo = dp.list_id(src, &name("geo:CN")).unwrap();
    assert_eq!(manual.id, dp.list_id(src, &name("manual")).unwrap());
    assert_ne!(geo, manual.id);
    // Three writes: the generation flipped three times.
    let g = dp.runtime_config().src_generation;
    assert_eq!(g, g0 ^ 1);

    for (a, want) in [
        ("1.9.9.9", geo),
        ("1.2.3.5", manual.id),
        ("1.2.3.4", 0),
        ("1.2.4.200", manual.id),
        ("1.2.4.100", geo),
        ("5.6.7.8", manual.id),
        ("5.6.7.9", 0),
        ("2.0.0.0", 0),
    ] {
        assert_eq!(dp.lookup_v4(src, v4(a)).unwrap(), want, "{a}");
    }
    for (a, want) in [
        ("2001:db8::1", geo),
        ("2001:db8:1:2::1", manual.id),
        ("2001:db8:1:1::1", 0),
        ("2001:db9::1", 0),
    ] {
        assert_eq!(
            dp.lookup_v6(src, a.parse::<Ipv6Addr>().unwrap()).unwrap(),
            want,
            "{a}"
        );
    }
    // Only the active generation holds long and IPv6 entries; destination lists are untouched.
    let k = dp.read_kernel_lists(src).unwrap();
    assert!(
        !k.long.is_empty() && k.long.iter().all(|e| u32::from(e.0) == g),
        "{:?}",
        k.long
    );
    assert!(!k.v6.is_empty() && k.v6.iter().all(|e| u32::from(e.0[4]) == g));
    let active = &k.dir[(g as usize) << 24..][..V4_DIR_ENTRIES_PER_GEN as usize];
    assert_eq!(
        active[0x010203] & 0xffff,
        0,
        "the /24 with the allow hole defaults to pass"
    );
    let dst = dp.read_kernel_lists(Direction::Destination).unwrap();
    assert!(dst.long.is_empty() && dst.v6.is_empty() && dst.dir.iter().all(|&e| e == 0));

    // Remove and delete.
    dp.list_remove(src, &name("manual"), &cidrs(&["5.6.7.8"]))
        .unwrap();
    assert_eq!(dp.lookup_v4(src, v4("5.6.7.8")).unwrap(), 0);
    dp.list_delete(src, &name("geo:CN")).unwrap();
    assert_eq!(dp.lookup_v4(src, v4("1.9.9.9")).unwrap(), 0);
    assert_eq!(dp.lookup_v4(src, v4("1.2.3.5")).unwrap(), manual.id);
    // Destination lists are separate.
    let d = dp
        .list_add(
            Direction::Destination,
            &name("manual"),
            &cidrs(&["9.9.9.9"]),
        )
        .unwrap();
    assert_ne!(d.id, manual.id);
    assert_eq!(
        dp.lookup_v4(Direction::Destination, v4("9.9.9.9")).unwrap(),
        d.id
    );
    assert_eq!(dp.lookup_v4(src, v4("9.9.9.9")).unwrap(), 0);
}

#[test]
fn bad_input_leaves_the_maps_byte_identical() {
    let dir = BpffsDir::new();
    let mut dp = open(dir.path());
    let src = Direction::Source;
    dp.list_replace(
        src,
        &name("manual"),
        &cidrs(&["10.0.0.0/8", "10.1.1.1", "2001:db8::/32"]),
    )
    .unwrap();
    dp.set_peer(1, &cidrs(&["10.8.0.2/32"])).unwrap();
    let before = [
        dp.read_kernel_lists(src).unwrap(),
        dp.read_kernel_lists(Direction::Destination).unwrap(),
    ];
    let peers = dp.peers();
    let registry = dp.list_snapshot();

    // Unknown list.
    let e = dp
        .list_remove(src, &name("tor"), &cidrs(&["1.1.1.1"]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            DataplaneError::Blocklist(BlocklistError::UnknownList { .. })
        ),
        "{e}"
    );
    // More long prefixes than a generation holds: refused after compiling, before writing.
    let too_many: Vec<Cidr> = (0..1_100_000u32)
        .map(|i| Cidr::v4(Ipv4Addr::from(0x2000_0000 + i * 2), 32).unwrap())
        .collect();
    let e = dp.list_replace(src, &name("auto"), &too_many).unwrap_err();
    assert!(
        matches!(
            e,
            DataplaneError::Blocklist(BlocklistError::TooManyV4LongPrefixes { .. })
        ),
        "{e}"
    );
    // An inconsistent snapshot.
    let mut bad = registry.clone();
    bad.lists.push(bad.lists[0].clone());
    assert!(dp.restore_lists(&bad).is_err());
    // A peer taking another peer's address.
    let e = dp
        .set_peer(2, &cidrs(&["10.8.0.3/32", "10.8.0.2/32"]))
        .unwrap_err();
    assert!(
        matches!(e, DataplaneError::AddressInUse { owner: 1, .. }),
        "{e}"
    );
    let e = dp.set_peer(1 << 20, &[]).unwrap_err();
    assert!(matches!(e, DataplaneError::PeerIdOutOfRange { .. }), "{e}");

    let after = [
        dp.read_kernel_lists(src).unwrap(),
        dp.read_kernel_lists(Direction::Destination).unwrap(),
    ];
    assert!(
        before == after,
        "blocklist maps changed after refused operations"
    );
    assert_eq!(dp.peers(), peers);
    assert_eq!(dp.list_snapshot(), registry);
    assert!(dp.list_id(src, &name("auto")).is_none());
}

#[test]
fn list_replace_1m() {
    let dir = BpffsDir::new();
    let mut dp = open(dir.path());
    let list = random_v4_prefixes(42, 1_000_000);
    let other = random_v4_prefixes(7, 1_000_000);
    // Warm up: the first write also faults in the DIR mapping.
    dp.list_replace(Direction::Source, &name("geo:XX"), &other)
        .unwrap();
    let start = Instant::now();
    let u = dp
        .list_replace(Direction::Source, &name("geo:XX"), &list)
        .unwrap();
    let live = start.elapsed().as_secs_f64() * 1000.0;
    let [cleanup, _] = dp.wait_list_cleanup();
    let total = start.elapsed().as_secs_f64() * 1000.0;
    println!(
        "list_replace_1m_ms = {live:.0} (new lists live; old generation deleted in the background \
         in {cleanup:.0} ms, all done at {total:.0} ms; v4_long = {}, timings = {:?})",
        u.v4_long, u.timings
    );
    // The old generation's entries are gone, the new one's are all there.
    let k = dp.read_kernel_lists(Direction::Source).unwrap();
    assert_eq!(k.long.len(), u.v4_long);
    // Spot-check against the list: every sampled prefix's first address is blocked.
    for c in list.iter().step_by(997) {
        let std::net::IpAddr::V4(a) = c.addr() else {
            unreachable!()
        };
        assert_eq!(dp.lookup_v4(Direction::Source, a).unwrap(), u.id, "{c}");
    }
}

/// The "has entries" bits of CONFIG follow the active generation of each direction and family,
/// so the kernel skips lookups in empty tables, and never skips a table that has entries.
#[test]
fn list_bits_follow_what_each_generation_holds() {
    use capybara_common::config::{
        CONFIG_F_DST_V4_LISTS, CONFIG_F_DST_V6_LISTS, CONFIG_F_SRC_V4_LISTS, CONFIG_F_SRC_V6_LISTS,
    };
    let dir = BpffsDir::new();
    let mut dp = open(dir.path());
    let bits = |dp: &Dataplane| {
        dp.runtime_config().flags
            & (CONFIG_F_SRC_V4_LISTS
                | CONFIG_F_SRC_V6_LISTS
                | CONFIG_F_DST_V4_LISTS
                | CONFIG_F_DST_V6_LISTS)
    };
    assert_eq!(bits(&dp), 0, "a fresh dataplane has no lists");

    let src = Direction::Source;
    let dst = Direction::Destination;
    dp.list_replace(src, &name("manual"), &cidrs(&["1.2.3.0/24"]))
        .unwrap();
    assert_eq!(bits(&dp), CONFIG_F_SRC_V4_LISTS);
    // A prefix longer than /24 alone lives only in the long-prefix hash: still "has entries".
    dp.list_replace(
        src,
        &name("manual"),
        &cidrs(&["1.2.3.4/32", "2001:db8::/32"]),
    )
    .unwrap();
    assert_eq!(bits(&dp), CONFIG_F_SRC_V4_LISTS | CONFIG_F_SRC_V6_LISTS);
    dp.list_replace(dst, &name("malware"), &cidrs(&["2001:db8:1::/48"]))
        .unwrap();
    assert_eq!(
        bits(&dp),
        CONFIG_F_SRC_V4_LISTS | CONFIG_F_SRC_V6_LISTS | CONFIG_F_DST_V6_LISTS
    );
    // An allow list alone compiles to nothing to drop.
    dp.list_delete(src, &name("manual")).unwrap();
    dp.list_replace(src, &name("allow"), &cidrs(&["9.9.9.0/24"]))
        .unwrap();
    assert_eq!(bits(&dp), CONFIG_F_DST_V6_LISTS);
    dp.list_delete(dst, &name("malware")).unwrap();
    assert_eq!(bits(&dp), 0);
}

/// The quota API: buckets created, peers assigned with one `PeerInfo` write (gate kept), top-up
/// and reset as documented; bad input is a typed error naming the field and changes nothing.
#[test]
fn quota_api_validates_and_writes_whole_buckets() {
    use capybara_agent::dataplane::{Gate, QuotaUsage};
    use capybara_common::{drop::DropReason, quota::MAX_QUOTA_BUCKETS};
    let dir = BpffsDir::new();
    let mut dp = open(dir.path());
    dp.set_peer(1, &cidrs(&["10.8.0.2/32"])).unwrap();
    dp.set_peer(2, &cidrs(&["10.8.0.3/32"])).unwrap();
    dp.set_gate(1, Gate::Held(DropReason::GateMfaPending))
        .unwrap();
    let u = dp.set_quota_limit(5, 1000).unwrap();
    assert_eq!(
        u,
        QuotaUsage {
            limit_bytes: 1000,
            used_bytes: 0,
            epoch: 0,
            warned: [false; 3]
        }
    );
    dp.assign_quota(1, Some(5)).unwrap();
    dp.assign_quota(2, Some(5)).unwrap();
    assert_eq!(dp.quota_of(1).unwrap(), Some(5));
    // The assignment kept the gate state.
    assert_eq!(dp.gate(1).unwrap(), Gate::Held(DropReason::GateMfaPending));

    // Bad input: typed errors, nothing written.
    let before = (dp.quota_usage(5).unwrap(), dp.quota_of(1).unwrap());
    let e = dp.set_quota_limit(0, 10).unwrap_err();
    assert!(
        matches!(e, DataplaneError::QuotaBucketOutOfRange { bucket: 0, .. }),
        "{e}"
    );
    let e = dp.set_quota_limit(MAX_QUOTA_BUCKETS, 10).unwrap_err();
    assert!(
        matches!(e, DataplaneError::QuotaBucketOutOfRange { .. }),
        "{e}"
    );
    let e = dp.set_quota_limit(5, 0).unwrap_err();
    assert!(
        matches!(e, DataplaneError::QuotaLimitZero { bucket: 5 }),
        "{e}"
    );
    let e = dp.assign_quota(1, Some(MAX_QUOTA_BUCKETS)).unwrap_err();
    assert!(
        matches!(e, DataplaneError::QuotaBucketOutOfRange { .. }),
        "{e}"
    );
    let e = dp.assign_quota(9, Some(5)).unwrap_err();
    assert!(matches!(e, DataplaneError::UnknownPeer { id: 9 }), "{e}");
    let e = dp.top_up_quota(6, 100).unwrap_err();
    assert!(
        matches!(e, DataplaneError::UnknownQuotaBucket { bucket: 6 }),
        "{e}"
    );
    let e = dp.reset_quota(5, Some(0)).unwrap_err();
    assert!(
        matches!(e, DataplaneError::QuotaLimitZero { bucket: 5 }),
        "{e}"
    );
    assert_eq!(
        (dp.quota_usage(5).unwrap(), dp.quota_of(1).unwrap()),
        before
    );
    assert_eq!(dp.quota_usage(6).unwrap().limit_bytes, 0);

    // Top-up raises the limit; reset starts a new epoch; remove unlimits.
    assert_eq!(dp.top_up_quota(5, 500).unwrap().limit_bytes, 1500);
    let r = dp.reset_quota(5, Some(2000)).unwrap();
    assert_eq!((r.limit_bytes, r.used_bytes, r.epoch), (2000, 0, 1));
    dp.assign_quota(2, None).unwrap();
    assert_eq!(dp.quota_of(2).unwrap(), None);
    dp.remove_quota(5).unwrap();
    assert_eq!(dp.quota_usage(5).unwrap().limit_bytes, 0);
}

/// The flow-limit API: one `PeerInfo` write keeping gate and quota; counts read through the
/// mapping; timeouts in `CAPY_CONFIG`; bad input is a typed error naming the field and changes
/// nothing; an empty table sweeps to nothing.
#[test]
fn flow_limit_api_validates_and_keeps_the_rest_of_the_peer() {
    use capybara_agent::dataplane::{FlowTimeouts, Gate, sys::boottime_now};
    use capybara_common::{drop::DropReason, flow::MAX_FLOWS};
    use std::time::Duration;
    let dir = BpffsDir::new();
    let mut dp = open(dir.path());
    dp.set_peer(1, &cidrs(&["10.8.0.2/32"])).unwrap();
    dp.set_gate(1, Gate::Held(DropReason::GateMfaPending))
        .unwrap();
    dp.assign_quota(1, Some(5)).unwrap();
    assert_eq!(dp.flow_limit(1).unwrap(), None);
    dp.set_flow_limit(1, 3).unwrap();
    assert_eq!(dp.flow_limit(1).unwrap(), Some(3));
    assert_eq!(dp.gate(1).unwrap(), Gate::Held(DropReason::GateMfaPending));
    assert_eq!(dp.quota_of(1).unwrap(), Some(5));
    assert_eq!(dp.flow_count(1).unwrap(), 0);

    let e = dp.set_flow_limit(1, 0).unwrap_err();
    assert!(
        matches!(e, DataplaneError::FlowLimitZero { peer: 1 }),
        "{e}"
    );
    assert!(e.to_string().contains("flow_limit"), "{e}");
    let e = dp.set_flow_limit(1, MAX_FLOWS + 1).unwrap_err();
    assert!(
        matches!(e, DataplaneError::FlowLimitTooLarge { peer: 1, .. }),
        "{e}"
    );
    let e = dp.set_flow_limit(9, 3).unwrap_err();
    assert!(matches!(e, DataplaneError::UnknownPeer { id: 9 }), "{e}");
    let e = dp.flow_count(u32::MAX).unwrap_err();
    assert!(matches!(e, DataplaneError::PeerIdOutOfRange { .. }), "{e}");
    let cfg = dp.runtime_config();
    let e = dp
        .set_flow_timeouts(FlowTimeouts {
            udp: Duration::from_secs(30),
            tcp: Duration::from_secs(3600),
            tcp_close: Duration::ZERO,
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            DataplaneError::FlowTimeout {
                field: "tcp_close",
                secs: 0
            }
        ),
        "{e}"
    );
    assert_eq!(dp.runtime_config(), cfg);
    assert_eq!(dp.flow_limit(1).unwrap(), Some(3));

    dp.set_flow_timeouts(FlowTimeouts {
        udp: Duration::from_secs(30),
        tcp: Duration::from_secs(3600),
        tcp_close: Duration::from_secs(5),
    })
    .unwrap();
    let c = dp.runtime_config();
    assert_eq!(
        (
            c.flow_timeout_udp_s,
            c.flow_timeout_tcp_s,
            c.flow_timeout_tcp_close_s
        ),
        (30, 3600, 5)
    );
    assert_eq!(dp.expire_flows(boottime_now()).unwrap().scanned, 0);
    dp.clear_flow_limit(1).unwrap();
    assert_eq!(dp.flow_limit(1).unwrap(), None);
    assert_eq!(dp.gate(1).unwrap(), Gate::Held(DropReason::GateMfaPending));
}

/// What the peer maps of the dataplane pinned in `dir` hold: the policy of `PEER_HOT[0..16]`,
/// the IPv4 and IPv6 host routes (sorted), pool slots `0..16` and the counters of
/// `PEER_HOT[0..16]`.
type PeerMapsView = (
    Vec<capybara_common::peer::PeerInfo>,
    Vec<(u32, u32)>,
    Vec<([u8; 16], u32)>,
    Vec<u32>,
    Vec<capybara_common::peer::PeerCounters>,
);

fn peer_maps(dir: &Path) -> PeerMapsView {
    use aya::maps::HashMap;
    use capybara_common::peer::PeerHot;
    let pin = |name: &str| MapData::from_pin(dir.join(name)).unwrap();
    let lines: Array<MapData, PeerHot> = Array::try_from(Map::Array(pin(names::PEER_HOT))).unwrap();
    let pool: Array<MapData, u32> = Array::try_from(Map::Array(pin(names::PEER_POOL_V4))).unwrap();
    let v4: HashMap<MapData, u32, u32> =
        HashMap::try_from(Map::HashMap(pin(names::PEER_V4))).unwrap();
    let v6: HashMap<MapData, [u8; 16], u32> =
        HashMap::try_from(Map::HashMap(pin(names::PEER_V6))).unwrap();
    let mut v4: Vec<(u32, u32)> = v4.iter().map(Result::unwrap).collect();
    v4.sort_unstable();
    let mut v6: Vec<([u8; 16], u32)> = v6.iter().map(Result::unwrap).collect();
    v6.sort_unstable();
    (
        (0..16).map(|i| lines.get(&i, 0).unwrap().info).collect(),
        v4,
        v6,
        (0..16).map(|i| pool.get(&i, 0).unwrap()).collect(),
        (0..16)
            .map(|i| lines.get(&i, 0).unwrap().counters)
            .collect(),
    )
}

#[test]
fn set_peers_writes_what_set_peer_writes_one_by_one() {
    use capybara_common::peer::PeerCounters;
    let dirs = [BpffsDir::new(), BpffsDir::new()];
    let mut dps = dirs.each_ref().map(|d| open(d.path()));
    for (dp, dir) in dps.iter_mut().zip(&dirs) {
        dp.set_peer_pool_v4(Some("10.8.0.0/28".parse().unwrap()))
            .unwrap();
        dp.set_peer(7, &cidrs(&["10.8.0.7/32"])).unwrap();
        dp.set_peer(9, &cidrs(&["10.8.0.9/32"])).unwrap();
        dp.remove_peer(9).unwrap();
        // Counters the kernel left for id 9: a peer re-using the id must start at zero.
        let md = MapData::from_pin(dir.path().join(names::PEER_HOT)).unwrap();
        let mut arr: Array<MapData, capybara_common::peer::PeerHot> =
            Array::try_from(Map::Array(md)).unwrap();
        let mut line = arr.get(&9, 0).unwrap();
        line.counters = PeerCounters {
            rx_packets: 1,
            rx_bytes: 100,
            tx_packets: 2,
            tx_bytes: 200,
        };
        arr.set(9, line, 0).unwrap();
    }
    let batch = vec![
        (1, cidrs(&["10.8.0.2/32", "fd00:8::2/128"])),
        // A re-used id.
        (9, cidrs(&["10.8.0.3/32", "fd00:8::3/128"])),
        // An active peer changing its allowed IPs, with a range (not a batch write).
        (7, cidrs(&["10.8.0.7/32", "10.9.0.0/24"])),
        // Outside the pool.
        (3, cidrs(&["192.168.5.5/32"])),
        // The same peer again: the later entry wins, as with set_peer in order.
        (
            1,
            cidrs(&["10.8.0.2/32", "fd00:8::2/128", "fd00:8::22/128"]),
        ),
    ];
    let [one, all] = &mut dps;
    for (id, allowed) in &batch {
        one.set_peer(*id, allowed).unwrap();
    }
    all.set_peers(&batch).unwrap();
    assert_eq!(all.peers(), one.peers());
    assert_eq!(all.runtime_config().flags, one.runtime_config().flags);
    let [a, b] = dirs.each_ref().map(|d| peer_maps(d.path()));
    assert_eq!(b, a, "maps after set_peers vs set_peer one by one");
    assert_eq!(b.4[9], PeerCounters::default(), "re-used id's counters");
    assert_eq!(b.3[3], 10, "pool slot of 10.8.0.3 → peer 9 (id + 1)");

    // Conflicts are refused: an address another peer has, two new peers with the same address.
    let e = all.set_peers(&[(4, cidrs(&["10.8.0.2/32"]))]).unwrap_err();
    assert!(
        matches!(
            e,
            DataplaneError::AddressInUse {
                id: 4,
                owner: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = all
        .set_peers(&[(5, cidrs(&["10.8.0.5/32"])), (6, cidrs(&["10.8.0.5/32"]))])
        .unwrap_err();
    assert!(
        matches!(
            e,
            DataplaneError::AddressInUse {
                id: 6,
                owner: 5,
                ..
            }
        ),
        "{e}"
    );
    let e = all.set_peers(&[(1 << 20, Vec::new())]).unwrap_err();
    assert!(matches!(e, DataplaneError::PeerIdOutOfRange { .. }), "{e}");
}

/// Pins of layout 7 — the peer table `CAPY_PEERS` and the per-CPU counters `CAPY_PEER_STATS`
/// apart — are migrated into the hot lines of layout 8: every peer's policy and its counters
/// summed over the CPUs (a removed peer's too), the old pins removed, the version written.
#[test]
fn pins_of_layout_7_are_migrated_into_the_hot_lines() {
    use capybara_agent::dataplane::Gate;
    use capybara_common::{
        drop::DropReason,
        peer::{PEER_F_ACTIVE, PeerCounters, PeerInfo},
    };
    let dir = BpffsDir::new();
    drop({
        let mut dp = open(dir.path());
        dp.set_peer(4, &cidrs(&["10.66.0.4/32"])).unwrap();
        dp
    });
    // Turn the directory into what an agent of layout 7 left: version 7, the two old maps, no
    // hot lines.
    {
        let md = MapData::from_pin(dir.path().join(names::CONFIG)).unwrap();
        let mut arr: Array<MapData, Config> = Array::try_from(Map::Array(md)).unwrap();
        let cfg = arr.get(&0, 0).unwrap();
        arr.set(
            0,
            Config {
                layout_version: 7,
                ..cfg
            },
            0,
        )
        .unwrap();
    }
    std::fs::remove_file(dir.path().join(names::PEER_HOT)).unwrap();
    for (name, kind) in [
        (names::OLD_PEERS, "array"),
        (names::OLD_PEER_STATS, "percpu_array"),
    ] {
        let pin = dir.path().join(name);
        let out = std::process::Command::new("bpftool")
            .args(["map", "create", pin.to_str().unwrap(), "type", kind])
            .args(["key", "4", "value", "32", "entries", "131072", "name", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "bpftool: {out:?}");
    }
    let kicked = PeerInfo {
        flags: PEER_F_ACTIVE,
        gate: DropReason::GateKicked as u32,
        flow_limit: 7,
        ..PeerInfo::default()
    };
    {
        let md = MapData::from_pin(dir.path().join(names::OLD_PEERS)).unwrap();
        let mut arr: Array<MapData, PeerInfo> = Array::try_from(Map::Array(md)).unwrap();
        arr.set(4, kicked, 0).unwrap();
        let md = MapData::from_pin(dir.path().join(names::OLD_PEER_STATS)).unwrap();
        let mut arr: PerCpuArray<MapData, PeerCounters> =
            PerCpuArray::try_from(Map::PerCpuArray(md)).unwrap();
        let ncpu = aya::util::nr_cpus().unwrap();
        let per_cpu = |k: u64| {
            (0..ncpu as u64)
                .map(|c| PeerCounters {
                    rx_packets: k + c,
                    rx_bytes: 100 * (k + c),
                    tx_packets: 2 * k,
                    tx_bytes: 200 * k,
                })
                .collect::<Vec<_>>()
        };
        arr.set(4, PerCpuValues::try_from(per_cpu(5)).unwrap(), 0)
            .unwrap();
        // A removed peer: no policy, counters still readable.
        arr.set(9, PerCpuValues::try_from(per_cpu(1)).unwrap(), 0)
            .unwrap();
    }

    let dp = open(dir.path());
    let n = aya::util::nr_cpus().unwrap() as u64;
    let sum = |k: u64| (0..n).map(|c| k + c).sum::<u64>();
    let s = dp.peer_stats(4).unwrap();
    assert_eq!(
        (s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes),
        (sum(5), 100 * sum(5), 2 * 5 * n, 200 * 5 * n)
    );
    let s = dp.peer_stats(9).unwrap();
    assert_eq!((s.rx_packets, s.tx_bytes), (sum(1), 200 * n));
    assert_eq!(dp.gate(4).unwrap(), Gate::Held(DropReason::GateKicked));
    assert_eq!(dp.flow_limit(4).unwrap(), Some(7));
    assert_eq!(
        dp.peers().get(&4).map(Vec::len),
        Some(1),
        "the peer and its address"
    );
    assert_eq!(dp.runtime_config().layout_version, LAYOUT_VERSION);
    for old in [names::OLD_PEERS, names::OLD_PEER_STATS] {
        assert!(!dir.path().join(old).exists(), "{old} still pinned");
    }
    assert!(dir.path().join(names::PEER_HOT).exists());
}
