//! IP intelligence end to end: the real `capybara-agent` in a namespace (XDP guard on its
//! uplink, a fixture country database), a stock `wireguard-go` client in another, driven with
//! the `capybara` binary as an admin would:
//!
//! 1. the client's uplink address is in the Tor list (`ip-intel block-tor --file`): it never
//!    completes a handshake (the client's `latest handshake` stays 0 while it tries), and its
//!    packets are counted under `tor`; `ip-intel disable` → it connects; `enable` → cut again;
//!    `ip-intel allow` its address → it gets through;
//! 2. a 1M-entry Tor list file is replaced (written aside and renamed over, as feeds are) again
//!    and again under a stream from a blocked source to the WireGuard port, and the agent's
//!    reload schedule picks each version up: every datagram of the stream is counted under `tor`
//!    (the XDP guard's per-list counter is exact), so none got through during the swaps
//!    (`e2e_list_replace`'s method, through the agent's own file watch);
//! 3. `geo update --file` swaps the country database back and forth under a stream from a
//!    blocked country: every datagram is counted under `geo:CN`.
//!
//! Why it takes as long as it does: the agent is a debug build, and a 1M-entry list is parsed,
//! sorted, compiled into the kernel layout and stored (twice: the list and the registry) at
//! each swap; the phases are printed with their times.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use capybara_agent::geo::mmdb_writer::MmdbWriter;
use capybara_tests::{
    lab::Lab,
    traffic::UdpStream,
    wg::{WgProcess, ping, ping_until},
};
use rand::Rng as _;
use serde_json::Value;

const PORT: u16 = 51820;
const WAIT: Duration = Duration::from_secs(15);
/// Entries of the big Tor lists.
const BIG: usize = 1_000_000;

/// A country database: `cn` is China, and a network elsewhere so the file has two countries.
fn write_mmdb(path: &Path, cn: &str) {
    let mut w = MmdbWriter::new(6);
    w.insert(cn.parse().unwrap(), "CN").unwrap();
    w.insert("3.0.0.0/8".parse().unwrap(), "US").unwrap();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, w.to_bytes()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes `lines` to `path` the way feeds are updated: aside, then renamed over.
fn write_list(path: &Path, lines: &[String]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `count` random IPv4 prefixes (lengths as in real threat lists: mostly /20–/32, some
/// /16–/19) clear of 10.0.0.0/8 (the lab's addresses), plus `extra`.
fn random_list(count: usize, extra: &str) -> Vec<String> {
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(count + 1);
    out.push(extra.to_owned());
    while out.len() < count + 1 {
        let len: u32 = if rng.random_range(0..100) < 5 {
            rng.random_range(16..=19)
        } else {
            rng.random_range(20..=32)
        };
        let net = rng.random::<u32>() & (u32::MAX << (32 - len));
        if net >> 24 == 10 {
            continue;
        }
        out.push(format!("{}/{len}", Ipv4Addr::from(net)));
    }
    out
}

/// The lab's agent started with a fixture country database (`a.mmdb`: the client uplink's /26
/// in China).
fn start(veth_net: u8, tunnel_net: u8) -> Lab {
    let lab = Lab::new(veth_net, tunnel_net);
    let db = mmdb(&lab, "a");
    write_mmdb(&db, &format!("10.{veth_net}.0.64/26"));
    lab.start_agent(1, &["--geoip-db", &db.display().to_string()]);
    lab
}

fn mmdb(lab: &Lab, which: &str) -> PathBuf {
    lab.file(&format!("{which}.mmdb"))
}

/// The `ip-intel list` row of `name`.
fn intel(lab: &Lab, name: &str) -> Value {
    let j = lab.json(&["ip-intel", "list"]);
    j["lists"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {j}"))
}

/// Packets the kernel dropped under `tor`.
fn tor_hits(lab: &Lab) -> u64 {
    intel(lab, "tor")["hits"]["packets"].as_u64().unwrap()
}

/// Packets the kernel dropped under `geo:CN`.
fn cn_hits(lab: &Lab) -> u64 {
    let j = lab.json(&["geo", "list"]);
    j["lists"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "geo:CN")
        .map_or(0, |l| l["hits"]["packets"].as_u64().unwrap())
}

/// Waits until the `tor` list holds `entries` (the schedule reloaded the file).
fn wait_tor_entries(lab: &Lab, entries: usize, within: Duration) {
    let end = Instant::now() + within;
    loop {
        let l = intel(lab, "tor");
        if l["entries"].as_u64() == Some(entries as u64) {
            return;
        }
        assert!(
            Instant::now() < end,
            "the tor list was not reloaded to {entries} entries: {l}\n{}",
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tor_list_disable_allow_big_swaps_and_geo_update_under_traffic() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>7.2} s  {what}", t0.elapsed().as_secs_f64());
    let (net, tnet) = (161, 163);
    let lab = start(net, tnet);
    phase("agent ready");
    let server = IpAddr::V4(lab.server_v4);
    let client_uplink = lab.veth.b.v4;
    let guarded = SocketAddr::new(IpAddr::V4(lab.veth.a.v4), PORT);

    // 1. The client's address in the Tor list: no handshake, its packets counted under tor.
    let tor_file = lab.file("tor.txt");
    write_list(
        &tor_file,
        &[
            "# Tor exits".to_owned(),
            "185.220.101.1".to_owned(),
            client_uplink.to_string(),
        ],
    );
    lab.capybara(&["ip-intel", "enable"]);
    let out = lab.capybara(&[
        "ip-intel",
        "block-tor",
        "--file",
        &tor_file.display().to_string(),
    ]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("tor ") && l.contains("enforced")),
        "{out}"
    );
    let (wg, _) = lab.add_client("alice");
    for _ in 0..3 {
        assert!(
            !ping(&lab.client, server),
            "a ping got through the Tor block"
        );
    }
    let key = wg.dump().peers[0].public_key.clone();
    let peer = |wg: &WgProcess| {
        wg.dump()
            .peers
            .into_iter()
            .find(|p| p.public_key == key)
            .unwrap()
    };
    assert_eq!(peer(&wg).latest_handshake, 0, "a handshake completed");
    assert!(peer(&wg).tx_bytes > 0, "the client did not try");
    let hits = tor_hits(&lab);
    assert!(hits > 0, "nothing counted under tor");
    phase("blocked as tor: no handshake");

    // Off: it connects. On again: cut. Allowed: through again.
    lab.capybara(&["ip-intel", "disable"]);
    assert!(
        ping_until(&lab.client, server, WAIT),
        "no ping with IP intelligence disabled\n{}",
        lab.log(1)
    );
    assert!(peer(&wg).latest_handshake > 0);
    phase("disabled: connected");
    lab.capybara(&["ip-intel", "enable"]);
    assert!(
        !ping(&lab.client, server),
        "a ping got through after enable"
    );
    lab.capybara(&["ip-intel", "allow", &client_uplink.to_string()]);
    assert!(
        ping_until(&lab.client, server, WAIT),
        "no ping with the address allowed"
    );
    lab.capybara(&["ip-intel", "allow", "--remove", &client_uplink.to_string()]);
    drop(wg);
    phase("allowed: connected");

    // 2. 1M-entry list swaps under traffic, through the agent's watch of the file. A: the
    // client's /32; B: a /31 over it, so each swap also changes how it is blocked.
    let list_a = random_list(BIG, &format!("{client_uplink}/32"));
    // Sizes apart, so the list shows which one is live.
    let list_b = random_list(BIG - 1000, &format!("{}/31", client_uplink));
    let (len_a, len_b) = (
        list_a
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        list_b
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
    );
    write_list(&tor_file, &list_a);
    wait_tor_entries(&lab, len_a, Duration::from_secs(120));
    phase("1M list A loaded");
    let before = tor_hits(&lab);
    let stream = UdpStream::start(
        &lab.client,
        Some(IpAddr::V4(client_uplink)),
        guarded,
        120,
        Duration::from_micros(500),
        Duration::from_secs(600),
    );
    for (i, (list, len)) in [(&list_b, len_b), (&list_a, len_a)].into_iter().enumerate() {
        write_list(&tor_file, list);
        wait_tor_entries(&lab, len, Duration::from_secs(120));
        phase(&format!("swap {i} live"));
    }
    let sent = stream.stop();
    // Counted once dropped; let the last datagrams land.
    std::thread::sleep(Duration::from_millis(300));
    let counted = tor_hits(&lab) - before;
    assert!(sent > 1000, "the stream sent only {sent}");
    assert_eq!(
        counted, sent,
        "{sent} datagrams from a blocked source, {counted} dropped under tor: the rest got through"
    );
    phase(&format!("{sent} blocked datagrams, all dropped under tor"));

    // 3. geo update under a stream from a blocked country (a source outside the Tor lists).
    let cn_source = Ipv4Addr::new(10, net, 0, 77);
    lab.client
        .add_addr(&lab.veth.b.ifname, &format!("{cn_source}/24"));
    lab.capybara(&["geo", "block", "CN"]);
    write_mmdb(&mmdb(&lab, "b"), &format!("{cn_source}/32"));
    let before = cn_hits(&lab);
    let stream = UdpStream::start(
        &lab.client,
        Some(IpAddr::V4(cn_source)),
        guarded,
        120,
        Duration::from_micros(500),
        Duration::from_secs(600),
    );
    for which in ["b", "a", "b"] {
        let out = lab.capybara(&[
            "geo",
            "update",
            "--file",
            &mmdb(&lab, which).display().to_string(),
        ]);
        assert!(out.starts_with("database "), "{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = stream.stop();
    std::thread::sleep(Duration::from_millis(300));
    let counted = cn_hits(&lab) - before;
    assert!(sent > 500, "the stream sent only {sent}");
    assert_eq!(
        counted, sent,
        "{sent} datagrams from a blocked country, {counted} dropped under geo:CN"
    );
    // A bad file is refused; the lists stay.
    let bad = mmdb(&lab, "bad");
    std::fs::write(&bad, b"not a database").unwrap();
    let o = lab.run(&["geo", "update", "--file", &bad.display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    let geo = lab.json(&["geo", "list"]);
    assert_eq!(
        geo["database"]["path"],
        mmdb(&lab, "b").display().to_string()
    );
    phase(&format!(
        "{sent} datagrams from CN across 3 database swaps, all dropped"
    ));
}
