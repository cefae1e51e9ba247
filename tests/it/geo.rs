//! Geo restrictions end to end: a MaxMind DB fixture (built here with `MmdbWriter`, nothing
//! downloaded) compiled by `GeoDb::open`, a `GeoPolicy` applied with `service::geo::apply` to a
//! real `Dataplane` (maps pinned in a private bpffs directory), then checked through the
//! dataplane's own lookups, the real `xdp_guard` program over BPF_PROG_TEST_RUN, and real UDP
//! traffic over a veth pair between two namespaces of this test.
//!
//! Privileged (root, bpffs at `/sys/fs/bpf`): `cargo test -p capybara-tests --test it -- geo::
//! --test-threads=1`. Only crafted packets carry public addresses; real traffic uses the
//! namespaces' own private addresses (which the fixture maps to a country).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use capybara_agent::{
    blocklist::{BlocklistError, Direction, ListId},
    dataplane::{Dataplane, DataplaneError, lists::KernelLists},
    geo::{CountryCode, GeoDb, GeoDbError, allow_mode_block, mmdb_writer::MmdbWriter},
    net::Cidr,
    service::geo::{self, GeoApplyError, GeoPolicy, OUTSIDE_LIST},
};
use capybara_common::{
    blocklist::{V4_DIR_ENTRIES_PER_GEN, V6_MAX, dir_list},
    config::{CONFIG_F_SRC_V4_LISTS, CONFIG_F_SRC_V6_LISTS},
    counters::Counter,
    maps as names,
};
use capybara_tests::{
    netns::{BpffsDir, NetNs, VethPair},
    packets,
    traffic::{UdpSink, UdpStream, send_udp, udp_overhead},
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use crate::e2e_support::{WAIT, attach_xdp, cidr, list, list_id, open_dataplane, sub};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const GUARDED: u16 = 51820;
const UNGUARDED: u16 = 51821;
const ETH_HLEN: u64 = 14;

/// The fixture's networks. `10.88.0.0/16` (the e2e client's veth subnet), `10.1.0.0/16` and
/// `fd00::/16` are private ranges mapped to countries on purpose: block mode blocks what the
/// database says, allow mode must never drop private/reserved ranges whatever it says.
const NETS: &[(&str, &str)] = &[
    ("1.0.0.0/24", "CN"),
    ("1.0.1.0/24", "CN"),
    ("10.88.0.0/16", "CN"),
    ("2400:3200::/32", "CN"),
    ("5.8.0.0/16", "RU"),
    ("2a00:1fa0::/32", "RU"),
    ("3.0.0.0/8", "US"),
    ("8.8.8.0/24", "US"),
    ("2600:1f00::/24", "US"),
    ("46.4.0.0/16", "DE"),
    ("10.1.0.0/16", "DE"),
    ("2a01:4f8::/29", "DE"),
    ("fd00::/16", "DE"),
];

/// Writes an IPv6 (IPv4 included, with MaxMind's aliases) GeoLite2-Country-layout database of
/// `nets` to `dir/name` and returns its path.
fn write_fixture(dir: &Path, name: &str, nets: &[(&str, &str)]) -> PathBuf {
    let mut w = MmdbWriter::new(6);
    for (net, country) in nets {
        let net = net
            .parse()
            .unwrap_or_else(|e| panic!("bad fixture network {net:?}: {e}"));
        w.insert(net, country)
            .unwrap_or_else(|e| panic!("fixture insert {net}: {e}"));
    }
    let path = dir.join(name);
    std::fs::write(&path, w.to_bytes())
        .unwrap_or_else(|e| panic!("write fixture {}: {e}", path.display()));
    path
}

fn open_db(path: &Path) -> GeoDb {
    GeoDb::open(path).unwrap_or_else(|e| panic!("GeoDb::open({}): {e:?}", path.display()))
}

fn cc(s: &str) -> CountryCode {
    CountryCode::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create a temporary directory for the fixture")
}

/// The list the dataplane's maps give `addr` as a source (0 = none).
fn lookup(dp: &Dataplane, addr: &str) -> ListId {
    match addr.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => dp.lookup_v4(Direction::Source, a),
        IpAddr::V6(a) => dp.lookup_v6(Direction::Source, a),
    }
    .unwrap_or_else(|e| panic!("lookup of {addr}: {e}"))
}

fn assert_lookups(dp: &Dataplane, cases: &[(&str, ListId)], when: &str) {
    for &(addr, want) in cases {
        assert_eq!(lookup(dp, addr), want, "source list of {addr} {when}");
    }
}

/// Source list names currently in the dataplane, sorted.
fn source_lists(dp: &Dataplane) -> Vec<String> {
    let mut v: Vec<String> = dp
        .lists()
        .into_iter()
        .filter(|l| l.direction == Direction::Source)
        .map(|l| l.name.to_string())
        .collect();
    v.sort();
    v
}

/// Applies `policy` and checks it was written as exactly one generation change of the source
/// lists (and none of the destination lists).
fn apply_one_flip(dp: &mut Dataplane, db: &GeoDb, policy: &GeoPolicy) {
    let before = dp.runtime_config();
    let update =
        geo::apply(dp, db, policy).unwrap_or_else(|e| panic!("apply {policy:?}: {e} ({e:?})"));
    let after = dp.runtime_config();
    assert_eq!(update.direction, Direction::Source);
    assert_eq!(
        after.src_generation,
        before.src_generation ^ 1,
        "applying {policy:?} must flip the source generation exactly once"
    );
    assert_eq!(
        update.generation, after.src_generation,
        "the update reports the generation now live"
    );
    assert_eq!(
        after.dst_generation, before.dst_generation,
        "applying {policy:?} must not touch the destination lists"
    );
    // Only the bits describing the source generation's contents may change.
    let src_bits = CONFIG_F_SRC_V4_LISTS | CONFIG_F_SRC_V6_LISTS;
    assert_eq!(after.flags & !src_bits, before.flags & !src_bits);
}

/// Every list id the source direction's **active** generation can give: its half of the DIR
/// table, and every long-prefix and IPv6 entry (the old generation's are deleted by then).
fn live_ids(dp: &mut Dataplane) -> BTreeSet<ListId> {
    let k: KernelLists = dp
        .read_kernel_lists(Direction::Source)
        .expect("read the source lists from the kernel");
    let g = (k.config.src_generation & 1) as usize;
    let per = V4_DIR_ENTRIES_PER_GEN as usize;
    let mut ids: BTreeSet<ListId> = k.dir[g * per..(g + 1) * per]
        .iter()
        .map(|&e| dir_list(e))
        .collect();
    for &(gen_, _, _, id) in &k.long {
        assert_eq!(
            usize::from(gen_ & 1),
            g,
            "long-prefix entry of the old generation left behind"
        );
        ids.insert(id);
    }
    for (key, id) in &k.v6 {
        assert_eq!(
            usize::from(key[4] & 1),
            g,
            "IPv6 entry of the old generation left behind"
        );
        ids.insert(*id);
    }
    ids.remove(&0);
    ids
}

fn id_of(dp: &Dataplane, name: &str) -> ListId {
    list_id(dp, Direction::Source, &list(name))
}

/// Test 1: block mode through the real dataplane.
#[test]
fn block_mode_writes_one_list_per_country_in_one_flip_and_off_removes_them() {
    let tmp = tempdir();
    let db = open_db(&write_fixture(tmp.path(), "fixture.mmdb", NETS));
    let pins = BpffsDir::new();
    let mut dp = open_dataplane(&pins);

    // Lists the geo service must never touch: a source `manual` list (partly inside CN, where
    // it outranks geo:CN), and a destination list that happens to be named like a geo list.
    let manual = list("manual");
    let manual_cidrs = [cidr("1.0.0.128/25"), cidr("198.51.100.0/24")];
    dp.list_replace(Direction::Source, &manual, &manual_cidrs)
        .expect("write manual");
    dp.list_replace(
        Direction::Destination,
        &list("geo:CN"),
        &[cidr("192.0.2.0/24")],
    )
    .expect("write a destination geo:CN list");
    let manual_id = id_of(&dp, "manual");
    let dst_before = dp.read_kernel_lists(Direction::Destination).unwrap();
    let untouched = |dp: &mut Dataplane, when: &str| {
        assert_eq!(id_of(dp, "manual"), manual_id, "manual's id {when}");
        let mut got = dp.list_cidrs(Direction::Source, &manual).unwrap();
        got.sort();
        let mut want = manual_cidrs.to_vec();
        want.sort();
        assert_eq!(got, want, "manual's CIDRs {when}");
        assert_eq!(
            dp.list_cidrs(Direction::Destination, &list("geo:CN")),
            Some(vec![cidr("192.0.2.0/24")]),
            "the destination geo:CN list {when}"
        );
        let mut dst = dp.read_kernel_lists(Direction::Destination).unwrap();
        dst.config.src_generation = dst_before.config.src_generation;
        let src_bits = CONFIG_F_SRC_V4_LISTS | CONFIG_F_SRC_V6_LISTS;
        dst.config.flags = (dst.config.flags & !src_bits) | (dst_before.config.flags & src_bits);
        assert_eq!(dst, dst_before, "destination maps {when}");
        assert_eq!(lookup(dp, "198.51.100.7"), manual_id, "manual {when}");
    };

    // --- Block CN and RU ---
    apply_one_flip(
        &mut dp,
        &db,
        &GeoPolicy::Block(vec![cc("RU"), cc("CN"), cc("cn")]),
    );
    assert_eq!(source_lists(&dp), ["geo:CN", "geo:RU", "manual"]);
    let (cn, ru) = (id_of(&dp, "geo:CN"), id_of(&dp, "geo:RU"));
    assert!(cn != 0 && ru != 0 && cn != ru && cn != manual_id && ru != manual_id);
    // The lists hold exactly the countries' merged networks.
    for (name, code) in [("geo:CN", "CN"), ("geo:RU", "RU")] {
        let nets = &db.per_country[&cc(code)];
        let mut want: Vec<Cidr> = nets
            .v4
            .iter()
            .map(|n| Cidr::from(*n))
            .chain(nets.v6.iter().map(|n| Cidr::from(*n)))
            .collect();
        want.sort();
        let mut got = dp.list_cidrs(Direction::Source, &list(name)).unwrap();
        got.sort();
        assert_eq!(got, want, "contents of {name}");
    }
    assert_eq!(
        dp.list_cidrs(Direction::Source, &list("geo:CN"))
            .unwrap()
            .len(),
        3,
        "1.0.0.0/24 + 1.0.1.0/24 merged into 1.0.0.0/23, 10.88.0.0/16, 2400:3200::/32"
    );
    let blocked = [
        ("1.0.0.5", cn),
        ("1.0.1.255", cn),
        ("1.0.0.200", manual_id), // manual outranks geo:CN
        ("10.88.3.4", cn),
        ("2400:3200::1", cn),
        ("2400:3200:ffff::1", cn),
        ("5.8.0.1", ru),
        ("5.8.255.254", ru),
        ("2a00:1fa0::5", ru),
        ("8.8.8.8", 0),
        ("3.3.3.3", 0),
        ("46.4.1.1", 0),
        ("10.1.2.3", 0),
        ("1.0.2.1", 0),
        ("5.9.0.1", 0),
        ("2600:1f00::1", 0),
        ("2a01:4f8::1", 0),
        ("2400:3201::1", 0),
        ("::ffff:1.0.0.5", 0),
    ];
    assert_lookups(&dp, &blocked, "with Block(CN, RU)");
    assert_eq!(
        live_ids(&mut dp),
        BTreeSet::from([cn, ru, manual_id]),
        "ids in the live generation with Block(CN, RU)"
    );
    untouched(&mut dp, "after Block(CN, RU)");

    // Re-applying the same policy keeps the ids (hit counters stay attributed).
    apply_one_flip(&mut dp, &db, &GeoPolicy::Block(vec![cc("CN"), cc("RU")]));
    assert_eq!((id_of(&dp, "geo:CN"), id_of(&dp, "geo:RU")), (cn, ru));
    assert_lookups(&dp, &blocked, "with Block(CN, RU) applied again");

    // --- Block RU only: geo:CN is deleted in the same flip that rewrites geo:RU ---
    apply_one_flip(&mut dp, &db, &GeoPolicy::Block(vec![cc("RU")]));
    assert_eq!(source_lists(&dp), ["geo:RU", "manual"]);
    assert_eq!(id_of(&dp, "geo:RU"), ru, "geo:RU keeps its id");
    assert_lookups(
        &dp,
        &[
            ("1.0.0.5", 0),
            ("1.0.1.255", 0),
            ("1.0.0.200", manual_id),
            ("10.88.3.4", 0),
            ("2400:3200::1", 0),
            ("5.8.0.1", ru),
            ("2a00:1fa0::5", ru),
            ("8.8.8.8", 0),
        ],
        "with Block(RU)",
    );
    assert_eq!(
        live_ids(&mut dp),
        BTreeSet::from([ru, manual_id]),
        "geo:CN's id must be gone from the live generation"
    );
    untouched(&mut dp, "after Block(RU)");

    // --- Off: every source geo list goes, in one flip ---
    apply_one_flip(&mut dp, &db, &GeoPolicy::Off);
    assert_eq!(source_lists(&dp), ["manual"]);
    assert_lookups(
        &dp,
        &[
            ("5.8.0.1", 0),
            ("2a00:1fa0::5", 0),
            ("1.0.0.5", 0),
            ("1.0.0.200", manual_id),
        ],
        "with Off",
    );
    assert_eq!(live_ids(&mut dp), BTreeSet::from([manual_id]));
    untouched(&mut dp, "after Off");

    // Block with no country is Off too.
    apply_one_flip(&mut dp, &db, &GeoPolicy::Block(vec![cc("RU")]));
    apply_one_flip(&mut dp, &db, &GeoPolicy::Block(vec![]));
    assert_eq!(source_lists(&dp), ["manual"]);
    untouched(&mut dp, "at the end");
}

/// `xdp_guard`, loaded a second time over the dataplane's pinned maps (what the kernel would run
/// on the uplink), so BPF_PROG_TEST_RUN sees exactly the lists the dataplane wrote.
fn xdp_over_pins(dp: &Dataplane) -> Ebpf {
    let object = capybara_agent::dataplane::object::OBJECT;
    assert!(
        !object.is_empty(),
        "the embedded eBPF object is empty: build without AYA_BUILD_SKIP (bpf-linker on PATH)"
    );
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dp.bpffs_dir())
        .load(object)
        .unwrap_or_else(|e| {
            panic!(
                "loading the object over {}: {e:?}",
                dp.bpffs_dir().display()
            )
        });
    let prog: &mut Xdp = ebpf
        .program_mut(names::PROG_XDP_GUARD)
        .expect("xdp_guard in the object")
        .try_into()
        .expect("xdp_guard is an XDP program");
    prog.load()
        .unwrap_or_else(|e| panic!("the verifier rejected xdp_guard: {e:?}"));
    ebpf
}

fn run_xdp(ebpf: &Ebpf, frame: &[u8]) -> u32 {
    let prog: &Xdp = ebpf
        .program(names::PROG_XDP_GUARD)
        .expect("xdp_guard in the object")
        .try_into()
        .expect("xdp_guard is an XDP program");
    let opts = TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::new()
    };
    prog.test_run(opts)
        .unwrap_or_else(|e| panic!("test run of xdp_guard failed: {e:?}"))
        .return_value
}

/// An Ethernet/IP/UDP frame from `src` to the guarded port.
fn udp_frame(src: IpAddr, port: u16) -> Vec<u8> {
    let ip = match src {
        IpAddr::V4(s) => packets::udp4(s, Ipv4Addr::new(10, 200, 0, 1), 40000, port, 64),
        IpAddr::V6(s) => packets::udp6(s, v6("fd00:200::1"), 40000, port, 64),
    };
    packets::eth_ip(&ip)
}

/// Test 2: allow mode through the dataplane's maps and the real XDP program.
#[test]
fn allow_mode_drops_sources_outside_the_allowed_countries_except_reserved_and_allows() {
    let tmp = tempdir();
    let db = open_db(&write_fixture(tmp.path(), "fixture.mmdb", NETS));
    let pins = BpffsDir::new();
    let mut dp = open_dataplane(&pins);
    dp.set_guard_ports(&[GUARDED], &[])
        .expect("set guard ports");

    // Explicit allows inside DE (not allowed): the `allow` list outranks geo:outside.
    dp.list_replace(
        Direction::Source,
        &list("allow"),
        &[cidr("46.4.7.0/24"), cidr("2a01:4f8:1::/48")],
    )
    .expect("write the allow list");
    // A block mode left over from before must be replaced in the same flip.
    apply_one_flip(&mut dp, &db, &GeoPolicy::Block(vec![cc("CN")]));
    let cn = id_of(&dp, "geo:CN");
    apply_one_flip(&mut dp, &db, &GeoPolicy::Allow(vec![cc("US")]));
    assert_eq!(source_lists(&dp), ["allow", OUTSIDE_LIST]);
    let out = id_of(&dp, OUTSIDE_LIST);
    assert_ne!(out, 0);
    assert_ne!(
        out, cn,
        "geo:outside must not re-use the id of geo:CN, deleted in the same flip"
    );

    assert_lookups(
        &dp,
        &[
            // Outside the allowed country: dropped.
            ("46.4.1.1", out),
            ("2a01:4f8::1", out),
            ("1.0.0.5", out),
            ("5.8.0.1", out),
            ("2400:3200::1", out),
            // Absent from the database: dropped (an allowlist admits what it can place).
            ("77.77.77.77", out),
            ("1.0.2.1", out),
            ("2c0f:f000::1", out),
            // Allowed country.
            ("8.8.8.8", 0),
            ("8.8.8.0", 0),
            ("8.8.8.255", 0),
            ("3.0.0.1", 0),
            ("3.255.255.255", 0),
            ("2600:1f00::1", 0),
            ("2600:1fff:ffff::1", 0),
            // Just outside the allowed networks.
            ("8.8.9.0", out),
            ("8.8.7.255", out),
            ("4.0.0.0", out),
            ("2601::1", out),
            // Private / reserved: never dropped, also when the database maps them to DE or CN.
            ("10.1.2.3", 0),
            ("10.88.3.4", 0),
            ("192.168.1.1", 0),
            ("127.0.0.1", 0),
            ("172.16.5.5", 0),
            ("100.64.0.1", 0),
            ("169.254.1.1", 0),
            ("fe80::1", 0),
            ("fd00::1", 0),
            ("::1", 0),
            ("ff02::1", 0),
            // Explicit allows inside DE.
            ("46.4.7.9", 0),
            ("2a01:4f8:1::9", 0),
            ("46.4.8.9", out),
        ],
        "with Allow(US)",
    );
    assert_eq!(live_ids(&mut dp), BTreeSet::from([out]));

    // The real program over the same maps.
    let ebpf = xdp_over_pins(&dp);
    let cases: [(&str, u32); 8] = [
        ("46.4.1.1", XDP_DROP),
        ("2a01:4f8::1", XDP_DROP),
        ("77.77.77.77", XDP_DROP),
        ("8.8.8.8", XDP_PASS),
        ("2600:1f00::1", XDP_PASS),
        ("10.1.2.3", XDP_PASS),
        ("fd00::1", XDP_PASS),
        ("46.4.7.9", XDP_PASS),
    ];
    for (src, want) in cases {
        let frame = udp_frame(src.parse().unwrap(), GUARDED);
        let before = dp.list_hits(out).expect("read list hits");
        let got = run_xdp(&ebpf, &frame);
        let after = dp.list_hits(out).expect("read list hits");
        assert_eq!(
            got, want,
            "XDP verdict for UDP from {src} to the guarded port"
        );
        let hits = if want == XDP_DROP {
            (1, frame.len() as u64)
        } else {
            (0, 0)
        };
        assert_eq!(
            sub(after, before),
            hits,
            "LIST_HITS of {OUTSIDE_LIST} for {src}"
        );
    }
    // An unguarded port is not the guard's business.
    let before = dp.list_hits(out).unwrap();
    assert_eq!(
        run_xdp(&ebpf, &udp_frame(IpAddr::V4(v4("46.4.1.1")), UNGUARDED)),
        XDP_PASS
    );
    assert_eq!(sub(dp.list_hits(out).unwrap(), before), (0, 0));

    // Allowing DE as well: the same id, DE now passes.
    apply_one_flip(&mut dp, &db, &GeoPolicy::Allow(vec![cc("US"), cc("DE")]));
    assert_eq!(id_of(&dp, OUTSIDE_LIST), out);
    assert_eq!(
        run_xdp(&ebpf, &udp_frame(IpAddr::V4(v4("46.4.1.1")), GUARDED)),
        XDP_PASS
    );
    assert_eq!(
        run_xdp(&ebpf, &udp_frame(IpAddr::V4(v4("5.8.0.1")), GUARDED)),
        XDP_DROP
    );

    // Off: nothing geo is left, everything passes.
    apply_one_flip(&mut dp, &db, &GeoPolicy::Off);
    assert_eq!(source_lists(&dp), ["allow"]);
    let before = dp.list_hits(out).unwrap();
    for src in ["46.4.1.1", "77.77.77.77", "2a01:4f8::1"] {
        assert_eq!(
            run_xdp(&ebpf, &udp_frame(src.parse().unwrap(), GUARDED)),
            XDP_PASS,
            "{src} with the policy off"
        );
    }
    assert_eq!(sub(dp.list_hits(out).unwrap(), before), (0, 0));
}

/// What the service does with a configuration: open the database, parse the codes, apply.
fn apply_from_config(
    dp: &mut Dataplane,
    path: &Path,
    allow: bool,
    codes: &[&str],
) -> Result<(), String> {
    let db = GeoDb::open(path).map_err(|e| format!("{e}"))?;
    let codes = codes
        .iter()
        .map(|c| CountryCode::parse(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{e}"))?;
    let policy = if allow {
        GeoPolicy::Allow(codes)
    } else {
        GeoPolicy::Block(codes)
    };
    geo::apply(dp, &db, &policy)
        .map(|_| ())
        .map_err(|e| format!("{e}"))
}

/// Everything observable about the source lists.
#[derive(Debug, PartialEq, Eq)]
struct State {
    kernel: KernelLists,
    snapshot: capybara_agent::blocklist::RegistrySnapshot,
    lists: Vec<String>,
}

fn state(dp: &mut Dataplane) -> State {
    State {
        kernel: dp
            .read_kernel_lists(Direction::Source)
            .expect("read the source lists"),
        snapshot: dp.list_snapshot(),
        lists: source_lists(dp),
    }
}

/// Test 3: bad input is refused with an error naming it, and the maps stay exactly as they were.
#[test]
fn bad_input_names_the_culprit_and_leaves_the_maps_exactly_as_they_were() {
    let tmp = tempdir();
    let good = write_fixture(tmp.path(), "good.mmdb", NETS);
    let pins = BpffsDir::new();
    let mut dp = open_dataplane(&pins);
    dp.list_replace(Direction::Source, &list("manual"), &[cidr("192.0.2.0/24")])
        .expect("write manual");
    apply_from_config(&mut dp, &good, false, &["CN", "RU"]).expect("apply the good fixture");
    let cn = id_of(&dp, "geo:CN");
    let before = state(&mut dp);

    let bytes = std::fs::read(&good).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let garbage: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    // A valid database of another kind (an ASN database: no country at all).
    let mut asn = MmdbWriter::new(6).database_type("GeoLite2-ASN");
    asn.insert_value(
        "5.8.0.0/16".parse().unwrap(),
        &capybara_agent::geo::mmdb_writer::Value::map([(
            "autonomous_system_number",
            capybara_agent::geo::mmdb_writer::Value::Uint32(64500),
        )]),
    )
    .unwrap();
    let mut bad_files: Vec<(&str, Vec<u8>)> = vec![
        ("empty.mmdb", Vec::new()),
        ("half.mmdb", bytes[..bytes.len() / 2].to_vec()),
        ("tail-cut.mmdb", bytes[..bytes.len() - 20].to_vec()),
        ("head.mmdb", bytes[..64].to_vec()),
        ("garbage.mmdb", garbage),
        ("asn.mmdb", asn.to_bytes()),
    ];
    // The right metadata after a search tree of garbage: tree pointers lead nowhere valid.
    let marker = b"\xab\xcd\xefMaxMind.com";
    let meta = bytes
        .windows(marker.len())
        .rposition(|w| w == marker)
        .expect("the fixture has a metadata marker");
    let mut scrambled = bytes.clone();
    for b in &mut scrambled[..meta] {
        *b = 0xff;
    }
    bad_files.push(("scrambled-tree.mmdb", scrambled));

    for (name, content) in &bad_files {
        let path = tmp.path().join(name);
        std::fs::write(&path, content).unwrap();
        let err = GeoDb::open(&path).expect_err(&format!("{name} must not compile"));
        assert!(
            matches!(
                err,
                GeoDbError::Corrupt { .. } | GeoDbError::WrongLayout { .. }
            ),
            "{name}: {err:?}"
        );
        if *name == "asn.mmdb" {
            assert!(matches!(err, GeoDbError::WrongLayout { .. }), "{err:?}");
        }
        let msg = apply_from_config(&mut dp, &path, false, &["RU"])
            .expect_err(&format!("applying {name} must fail"));
        assert!(
            msg.contains(&path.display().to_string()),
            "the error for {name} names the file: {msg}"
        );
        assert_eq!(state(&mut dp), before, "maps after {name}");
    }

    // A database with a code outside ISO 3166-1.
    let bad_code = write_fixture(
        tmp.path(),
        "bad-code.mmdb",
        &[("5.8.0.0/16", "RU"), ("6.0.0.0/8", "XX")],
    );
    let err = GeoDb::open(&bad_code).unwrap_err();
    assert!(
        matches!(&err, GeoDbError::UnknownCountry { source, .. } if source.input == "XX"),
        "{err:?}"
    );
    let msg = apply_from_config(&mut dp, &bad_code, false, &["RU"]).unwrap_err();
    assert!(msg.contains(&bad_code.display().to_string()), "{msg}");
    assert_eq!(state(&mut dp), before, "maps after a database with XX");

    // A missing file.
    let missing = tmp.path().join("no-such-dir").join("missing.mmdb");
    let err = GeoDb::open(&missing).unwrap_err();
    assert!(matches!(err, GeoDbError::Unreadable { .. }), "{err:?}");
    let msg = apply_from_config(&mut dp, &missing, true, &["US"]).unwrap_err();
    assert!(
        msg.contains(&missing.display().to_string()),
        "the error names the missing file: {msg}"
    );
    assert_eq!(state(&mut dp), before, "maps after a missing file");

    // Unknown country codes, in a good database: refused naming the code.
    for code in ["XX", "ZZ", "USA", ""] {
        let msg = apply_from_config(&mut dp, &good, false, &["RU", code]).unwrap_err();
        assert!(msg.contains(&format!("{code:?}")), "names {code:?}: {msg}");
        let msg = apply_from_config(&mut dp, &good, true, &[code]).unwrap_err();
        assert!(msg.contains(&format!("{code:?}")), "names {code:?}: {msg}");
        assert_eq!(state(&mut dp), before, "maps after country code {code:?}");
    }

    // A policy the kernel cannot hold (allow mode around 6,000 scattered US /48s needs more
    // IPv6 prefixes than a generation has room for): refused by the dataplane before it writes.
    let mut nets: Vec<(String, &str)> = Vec::new();
    let mut rng = StdRng::seed_from_u64(5);
    let mut seen = BTreeSet::new();
    while nets.len() < 6000 {
        let n: u128 = (0x26_u128 << 120) | (u128::from(rng.random::<u64>() & 0xff_ffff_ffff) << 80);
        if seen.insert(n) {
            nets.push((format!("{}/48", Ipv6Addr::from(n)), "US"));
        }
    }
    let nets: Vec<(&str, &str)> = nets.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    let big = write_fixture(tmp.path(), "fragmented-us.mmdb", &nets);
    let big_db = open_db(&big);
    let (_, v6_drop) = allow_mode_block(&big_db, &[cc("US")], &[]);
    assert!(
        v6_drop.len() > (V6_MAX / 2) as usize,
        "the fixture must exceed the IPv6 capacity ({} prefixes)",
        v6_drop.len()
    );
    let err = geo::apply(&mut dp, &big_db, &GeoPolicy::Allow(vec![cc("US")]))
        .expect_err("a policy beyond capacity must be refused");
    assert!(
        matches!(
            err,
            GeoApplyError::Dataplane(DataplaneError::Blocklist(
                BlocklistError::TooManyV6Prefixes { .. }
            ))
        ),
        "{err:?}"
    );
    assert_eq!(state(&mut dp), before, "maps after a refused write");

    // And the previous policy is still enforced.
    assert_eq!(lookup(&dp, "1.0.0.5"), cn);
    assert_eq!(lookup(&dp, "2400:3200::1"), cn);
}

/// Sends `n` datagrams from `src` (client namespace `b`) to `dst:port` in server namespace `a`;
/// returns how many arrived.
fn udp(b: &NetNs, a: &NetNs, src: IpAddr, dst: IpAddr, port: u16, n: u64, expect: u64) -> u64 {
    let sink = UdpSink::start(a, SocketAddr::new(dst, port));
    send_udp(b, Some(src), sink.addr(), n, 200);
    if expect == n {
        sink.wait_for(n, WAIT)
    } else {
        sink.settle(Duration::from_millis(500), WAIT)
    }
}

/// Test 4: real traffic over a veth pair between two namespaces.
#[test]
fn block_mode_stops_real_traffic_from_a_blocked_country_and_off_restores_it() {
    const N: u64 = 150;
    const SIZE: u64 = 200;
    let tmp = tempdir();
    let db = open_db(&write_fixture(tmp.path(), "fixture.mmdb", NETS));
    let pins = BpffsDir::new();
    let server = NetNs::new("gs");
    let client = NetNs::new("gc");
    // Client 10.88.0.2: inside 10.88.0.0/16, which the fixture maps to CN. Its IPv6 address
    // (fd00:58::2) is in fd00::/16, mapped to DE: a source in another country.
    let veth = VethPair::new(&server, &client, 88);
    let cn_src = IpAddr::V4(veth.b.v4);
    assert_eq!(
        db.country(cc("CN"))
            .map(|c| c.v4.iter().any(|n| n.contains(&veth.b.v4))),
        Some(true)
    );
    let de_src = IpAddr::V6(veth.b.v6);
    let (dst4, dst6) = (IpAddr::V4(veth.a.v4), IpAddr::V6(veth.a.v6));

    let mut dp = open_dataplane(&pins);
    attach_xdp(&mut dp, &server, &veth.a.ifname);
    dp.set_guard_ports(&[GUARDED], &[])
        .expect("set guard ports");

    assert_eq!(
        udp(&client, &server, cn_src, dst4, GUARDED, N, N),
        N,
        "before any policy"
    );

    apply_one_flip(&mut dp, &db, &GeoPolicy::Block(vec![cc("CN")]));
    let cn = id_of(&dp, "geo:CN");
    let frame = SIZE + udp_overhead(&SocketAddr::new(dst4, 0)) + ETH_HLEN;

    let before = dp.list_hits(cn).unwrap();
    assert_eq!(
        udp(&client, &server, cn_src, dst4, GUARDED, N, 0),
        0,
        "datagrams from CN ({cn_src}) reached the guarded port"
    );
    assert_eq!(
        sub(dp.list_hits(cn).unwrap(), before),
        (N, N * frame),
        "LIST_HITS of geo:CN"
    );

    // Same client, a source in DE: not blocked.
    let before = dp.list_hits(cn).unwrap();
    assert_eq!(
        udp(&client, &server, de_src, dst6, GUARDED, N, N),
        N,
        "{de_src} (DE) with Block(CN)"
    );
    // The CN source to an unguarded port is not the guard's business.
    assert_eq!(
        udp(&client, &server, cn_src, dst4, UNGUARDED, N, N),
        N,
        "{cn_src} to an unguarded port"
    );
    assert_eq!(sub(dp.list_hits(cn).unwrap(), before), (0, 0));

    // Switching to Block(RU) while CN datagrams flow: geo:CN is deleted and geo:RU created in
    // the same flip. There is no RU source at all, so geo:RU must count nothing; every CN
    // datagram is either dropped as a hit of geo:CN (before the flip) or delivered (after).
    let sink = UdpSink::start(&server, SocketAddr::new(dst4, GUARDED));
    let cn_before = dp.list_hits(cn).unwrap();
    let stream = UdpStream::start(
        &client,
        Some(cn_src),
        sink.addr(),
        SIZE as usize,
        Duration::from_micros(200),
        Duration::from_secs(30),
    );
    while stream.sent() < 200 {
        std::thread::sleep(Duration::from_millis(5));
    }
    apply_one_flip(&mut dp, &db, &GeoPolicy::Block(vec![cc("RU")]));
    let at_flip = stream.sent();
    std::thread::sleep(Duration::from_millis(300));
    let sent = stream.stop();
    assert!(sent > at_flip, "the stream kept sending after the flip");
    let arrived = sink.settle(Duration::from_millis(500), WAIT);
    drop(sink);
    let ru = id_of(&dp, "geo:RU");
    assert_eq!(
        dp.list_hits(ru).unwrap(),
        Counter::default(),
        "hits of geo:RU (id {ru}; geo:CN had id {cn}) while only CN sources sent"
    );
    assert_ne!(
        ru, cn,
        "a list created by a policy switch must not re-use the id of a list deleted by it"
    );
    let dropped = sub(dp.list_hits(cn).unwrap(), cn_before);
    assert!(dropped.0 > 0, "CN datagrams before the flip were dropped");
    assert!(arrived > 0, "CN datagrams after the flip arrived");
    assert_eq!(
        dropped.0 + arrived,
        sent,
        "every CN datagram was either dropped as geo:CN ({}) or delivered ({arrived})",
        dropped.0
    );
    assert_eq!(dropped.1, dropped.0 * frame);

    apply_one_flip(&mut dp, &db, &GeoPolicy::Off);
    assert!(source_lists(&dp).is_empty());
    let before = dp.list_hits(cn).unwrap();
    assert_eq!(
        udp(&client, &server, cn_src, dst4, GUARDED, N, N),
        N,
        "{cn_src} after the policy is off"
    );
    assert_eq!(sub(dp.list_hits(cn).unwrap(), before), (0, 0));
}
