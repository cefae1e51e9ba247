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
    process::Command,
    time::{Duration, Instant},
};

use capybara_agent::geo::mmdb_writer::MmdbWriter;
use capybara_tests::{
    agent_proc::{self, agent_crate_binary},
    netns::{BpffsDir, NetNs, VethPair, unique_name},
    traffic::UdpStream,
    wg::{WgProcess, ping, ping_until},
};
use rand::Rng as _;
use serde_json::Value;

const PORT: u16 = 51820;
const WAIT: Duration = Duration::from_secs(15);
/// Entries of the big Tor lists.
const BIG: usize = 1_000_000;

struct Lab {
    cli: PathBuf,
    tmp: tempfile::TempDir,
    server: NetNs,
    client: NetNs,
    _pins: BpffsDir,
    veth: VethPair,
    server_v4: Ipv4Addr,
}

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

impl Lab {
    fn start(veth_net: u8, tunnel_net: u8) -> Lab {
        let server = NetNs::new("is");
        let client = NetNs::new("ic");
        let veth = VethPair::new(&server, &client, veth_net);
        let lab = Lab {
            cli: agent_crate_binary("capybara"),
            tmp: tempfile::tempdir().expect("temp dir"),
            _pins: BpffsDir::new(),
            server,
            client,
            veth,
            server_v4: Ipv4Addr::new(10, tunnel_net, 0, 1),
        };
        write_mmdb(&lab.mmdb("a"), &format!("10.{veth_net}.0.64/26"));
        let mut cmd = Command::new(agent_crate_binary("capybara-agent"));
        cmd.args(["--netns", lab.server.name(), "--uplink", &lab.veth.a.ifname])
            .args(["--tunnel", &unique_name("it")])
            .args(["--tunnel-ipv4", &format!("{}/24", lab.server_v4)])
            .args(["--tunnel-ipv6", &format!("fd00:{tunnel_net:x}::1/64")])
            .args(["--listen-port", &PORT.to_string()])
            .args(["--public-endpoint", &format!("{}:{PORT}", lab.veth.a.v4)])
            .arg("--geoip-db")
            .arg(lab.mmdb("a"))
            .arg("--data-dir")
            .arg(lab.tmp.path().join("data"))
            .arg("--bpffs")
            .arg(lab._pins.path())
            .arg("--wg-uapi-dir")
            .arg(lab.tmp.path().join("wg"))
            .arg("--api-socket")
            .arg(lab.socket());
        agent_proc::start_agent(
            &lab.server,
            cmd,
            &lab.tmp.path().join("agent.log"),
            Duration::from_secs(60),
        );
        lab
    }

    fn mmdb(&self, which: &str) -> PathBuf {
        self.tmp.path().join(format!("{which}.mmdb"))
    }

    fn socket(&self) -> PathBuf {
        self.tmp.path().join("run/agent.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("agent.log")).unwrap_or_default()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.cli)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .env_remove("CAPYBARA_TOKEN")
            .env_remove("CAPYBARA_ENDPOINT")
            .output()
            .expect("run capybara")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "capybara {args:?}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap_or_else(|e| panic!("capybara {args:?}: {e}"))
    }

    /// The `ip-intel list` row of `name`.
    fn intel(&self, name: &str) -> Value {
        let j = self.json(&["ip-intel", "list"]);
        j["lists"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {j}"))
    }

    /// Packets the kernel dropped under `tor`.
    fn tor_hits(&self) -> u64 {
        self.intel("tor")["hits"]["packets"].as_u64().unwrap()
    }

    /// Packets the kernel dropped under `geo:CN`.
    fn cn_hits(&self) -> u64 {
        let j = self.json(&["geo", "list"]);
        j["lists"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "geo:CN")
            .map_or(0, |l| l["hits"]["packets"].as_u64().unwrap())
    }

    /// `user add`, the generated config on a `wireguard-go` client (as `e2e_metrics`).
    fn add_client(&self, user: &str) -> WgProcess {
        let cfg = self.json(&["user", "add", user, "--no-qr"]);
        let v4: IpAddr = cfg["peer"]["ipv4"].as_str().unwrap().parse().unwrap();
        let wg_quick = cfg["wg_quick"].as_str().expect("wg_quick");
        WgProcess::from_wg_quick(
            &self.client,
            "iw",
            wg_quick,
            None,
            self.server_v4.into(),
            v4,
        )
    }

    /// Waits until the `tor` list holds `entries` (the schedule reloaded the file).
    fn wait_tor_entries(&self, entries: usize, within: Duration) {
        let end = Instant::now() + within;
        loop {
            let l = self.intel("tor");
            if l["entries"].as_u64() == Some(entries as u64) {
                return;
            }
            assert!(
                Instant::now() < end,
                "the tor list was not reloaded to {entries} entries: {l}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn tor_list_disable_allow_big_swaps_and_geo_update_under_traffic() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>7.2} s  {what}", t0.elapsed().as_secs_f64());
    let (net, tnet) = (161, 163);
    let lab = Lab::start(net, tnet);
    phase("agent ready");
    let server = IpAddr::V4(lab.server_v4);
    let client_uplink = lab.veth.b.v4;
    let guarded = SocketAddr::new(IpAddr::V4(lab.veth.a.v4), PORT);

    // 1. The client's address in the Tor list: no handshake, its packets counted under tor.
    let tor_file = lab.tmp.path().join("tor.txt");
    write_list(
        &tor_file,
        &[
            "# Tor exits".to_owned(),
            "185.220.101.1".to_owned(),
            client_uplink.to_string(),
        ],
    );
    lab.ok(&["ip-intel", "enable"]);
    let out = lab.ok(&[
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
    let wg = lab.add_client("alice");
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
    let hits = lab.tor_hits();
    assert!(hits > 0, "nothing counted under tor");
    phase("blocked as tor: no handshake");

    // Off: it connects. On again: cut. Allowed: through again.
    lab.ok(&["ip-intel", "disable"]);
    assert!(
        ping_until(&lab.client, server, WAIT),
        "no ping with IP intelligence disabled\n{}",
        lab.log()
    );
    assert!(peer(&wg).latest_handshake > 0);
    phase("disabled: connected");
    lab.ok(&["ip-intel", "enable"]);
    assert!(
        !ping(&lab.client, server),
        "a ping got through after enable"
    );
    lab.ok(&["ip-intel", "allow", &client_uplink.to_string()]);
    assert!(
        ping_until(&lab.client, server, WAIT),
        "no ping with the address allowed"
    );
    lab.ok(&["ip-intel", "allow", "--remove", &client_uplink.to_string()]);
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
    lab.wait_tor_entries(len_a, Duration::from_secs(120));
    phase("1M list A loaded");
    let before = lab.tor_hits();
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
        lab.wait_tor_entries(len, Duration::from_secs(120));
        phase(&format!("swap {i} live"));
    }
    let sent = stream.stop();
    // Counted once dropped; let the last datagrams land.
    std::thread::sleep(Duration::from_millis(300));
    let counted = lab.tor_hits() - before;
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
    lab.ok(&["geo", "block", "CN"]);
    write_mmdb(&lab.mmdb("b"), &format!("{cn_source}/32"));
    let before = lab.cn_hits();
    let stream = UdpStream::start(
        &lab.client,
        Some(IpAddr::V4(cn_source)),
        guarded,
        120,
        Duration::from_micros(500),
        Duration::from_secs(600),
    );
    for which in ["b", "a", "b"] {
        let out = lab.ok(&[
            "geo",
            "update",
            "--file",
            &lab.mmdb(which).display().to_string(),
        ]);
        assert!(out.starts_with("database "), "{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = stream.stop();
    std::thread::sleep(Duration::from_millis(300));
    let counted = lab.cn_hits() - before;
    assert!(sent > 500, "the stream sent only {sent}");
    assert_eq!(
        counted, sent,
        "{sent} datagrams from a blocked country, {counted} dropped under geo:CN"
    );
    // A bad file is refused; the lists stay.
    let bad = lab.mmdb("bad");
    std::fs::write(&bad, b"not a database").unwrap();
    let o = lab.run(&["geo", "update", "--file", &bad.display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    let geo = lab.json(&["geo", "list"]);
    assert_eq!(geo["database"]["path"], lab.mmdb("b").display().to_string());
    phase(&format!(
        "{sent} datagrams from CN across 3 database swaps, all dropped"
    ));
}
