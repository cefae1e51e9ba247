//! Shadowsocks and VLESS through the real agent (issue 24): `capybara-agent` in a namespace
//! with both endpoints on its uplink (`--shadowsocks-listen`, `--vless-listen`), and Debian's
//! real clients in the client namespace, each started with the configuration `capybara user
//! add alice --protocol wireguard,shadowsocks,vless` printed (`ss-local` with the `ss-local`
//! JSON, `v2ray` with the v2ray JSON that pins the endpoint's generated certificate; only their
//! local SOCKS ports are changed, since both print 1080). The destination is an origin server
//! ([`capybara_tests::origin`]) on the client namespace's side of the veth, so every proxied
//! byte crosses the agent's uplink both ways; WireGuard's traffic goes through the tunnel to an
//! origin on the server's tunnel address.
//!
//! - **Printed configs, kick, hold.** Each client fetches a 2 MiB file byte for byte; then
//!   with an endless download open through each, `kick alice` ends both within 1 s (the
//!   endpoints abort the connections: a reset, which the client relays as the end), the
//!   sessions are recorded with their protocol, reason `kicked` and at least the file's bytes
//!   sent; new connections are admitted again; then `user expire alice` (a policy hold) ends
//!   both within 1 s and refuses new ones (recorded as `held` auth attempts) until `user
//!   renew`.
//! - **One quota.** A 10 MB quota on alice, spent by three endless downloads at once (through
//!   the tunnel, Shadowsocks and VLESS): all three stop, and what was charged and what arrived
//!   stay within the kernel's bound (one 64 KiB super-packet per CPU past the budget).
//! - **One rate.** A 20 Mbit/s limit on alice: a download through each protocol in turn keeps
//!   goodput within 0.95–1.00 of the rate (the rate is of IP bytes; TCP's headers make an exact
//!   rate show as about 0.965 of payload).
//!
//! Each test starts its own lab and agent (about 2 s) and bounds every wait; the rate test
//! runs three 4.5 s downloads, the slowest part of the file.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use capybara_tests::{
    origin::{self, Origin, STREAM},
    shadowsocks::{SsProcess, ss_local_with},
    socks,
    v2ray::V2ray,
    wg::WgProcess,
};
use serde_json::Value;

use crate::e2e_session_history::Lab;

const SS_PORT: u16 = 8388;
const VLESS_PORT: u16 = 8443;
const SNI: &str = "vless.capybara.test";
const FILE_LEN: usize = 2 * 1024 * 1024;

/// The lab with the agent serving both endpoints, alice added with all three protocols, her
/// three clients running in the client namespace and an origin on each side.
struct Proxied {
    lab: Lab,
    _ss: SsProcess,
    _v2ray: V2ray,
    _wg: WgProcess,
    /// The clients' SOCKS5 addresses (in the client namespace), by protocol name.
    socks: [(&'static str, SocketAddr); 2],
    /// The origin the proxied connections reach (client side of the veth).
    far: Origin,
    /// The origin WireGuard traffic reaches (the server's tunnel address).
    near: Origin,
    file: Arc<Vec<u8>>,
}

impl Proxied {
    fn start(veth_net: u8, tunnel_net: u8) -> Proxied {
        let lab = Lab::new(veth_net, tunnel_net);
        let ss = format!("{}:{SS_PORT}", lab.veth.a.v4);
        let vl = format!("{}:{VLESS_PORT}", lab.veth.a.v4);
        lab.start_agent(
            1,
            &[
                "--shadowsocks-listen",
                &ss,
                // shadowsocks-libev 3.3.5 has no 2022 edition (the agent's default cipher).
                "--shadowsocks-cipher",
                "chacha20-ietf-poly1305",
                "--vless-listen",
                &vl,
                "--vless-sni",
                SNI,
            ],
        );
        let added = lab.json(&[
            "user",
            "add",
            "alice",
            "--protocol",
            "wireguard,shadowsocks,vless",
            "--no-qr",
        ]);
        let printed = |protocol: &str| -> Value {
            let p = added["proxies"]
                .as_array()
                .expect("proxies")
                .iter()
                .find(|p| p["access"]["protocol"] == protocol)
                .unwrap_or_else(|| panic!("no {protocol} config in {added:#}"));
            serde_json::from_str(p["json"].as_str().expect("json")).expect("the printed JSON")
        };
        let ss_config = printed("shadowsocks");
        let ss_client = lab
            .client
            .run(|| ss_local_with(ss_config))
            .expect("ss-local with the printed config");
        let mut v2ray_config = printed("vless");
        let v2ray_port = lab.client.run(capybara_tests::free_port);
        v2ray_config["inbounds"][0]["port"] = v2ray_port.into();
        let v2ray = lab.client.run(|| V2ray::start(&v2ray_config, v2ray_port));
        let cfg = &added["config"];
        let v4: IpAddr = cfg["peer"]["ipv4"].as_str().unwrap().parse().unwrap();
        let wg = WgProcess::from_wg_quick(
            &lab.client,
            "px",
            cfg["wg_quick"].as_str().expect("wg_quick"),
            None,
            lab.server_v4.into(),
            v4,
        );
        let file: Arc<Vec<u8>> = Arc::new(
            (0..FILE_LEN)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        );
        let far = Origin::start(&lab.client, lab.veth.b.v4.into(), file.clone());
        let near = Origin::start(&lab.server, lab.server_v4.into(), file.clone());
        Proxied {
            socks: [
                ("shadowsocks", ss_client.addr),
                ("vless", SocketAddr::from(([127, 0, 0, 1], v2ray_port))),
            ],
            _ss: ss_client,
            _v2ray: v2ray,
            _wg: wg,
            lab,
            far,
            near,
            file,
        }
    }

    /// A connection to the far origin through `protocol`'s client.
    fn through(&self, protocol: &str) -> std::io::Result<TcpStream> {
        let (_, proxy) = self.socks.iter().find(|(p, _)| *p == protocol).unwrap();
        let (proxy, far) = (*proxy, self.far.addr);
        self.lab.client.run(move || socks::connect(proxy, far))
    }

    /// A connection to the near origin through the tunnel.
    fn tunnelled(&self) -> std::io::Result<TcpStream> {
        let near = self.near.addr;
        self.lab
            .client
            .run(move || TcpStream::connect_timeout(&near, Duration::from_secs(5)))
    }

    /// Starts an endless download on `s`; its bytes are added to `count`.
    fn download(s: TcpStream, count: &Arc<AtomicU64>) -> std::thread::JoinHandle<Instant> {
        use std::io::Write as _;
        let mut s = s;
        s.write_all(&[STREAM]).expect("ask for the stream");
        origin::drain(s, count.clone())
    }

    fn sessions(&self, protocol: &str) -> Vec<Value> {
        let all = self.lab.json(&["history", "show", "alice"]);
        all.as_array()
            .expect("sessions")
            .iter()
            .filter(|s| s["protocol"] == protocol)
            .cloned()
            .collect()
    }
}

/// Waits (≤ 10 s) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Endless downloads through both proxies, each flowing (≥ 256 KiB read) before it returns.
fn open_downloads(
    p: &Proxied,
) -> Vec<(
    &'static str,
    Arc<AtomicU64>,
    std::thread::JoinHandle<Instant>,
)> {
    let mut open = Vec::new();
    for (protocol, _) in p.socks {
        let s = p.through(protocol).expect("connect through the proxy");
        let count = Arc::new(AtomicU64::new(0));
        let h = Proxied::download(s, &count);
        wait_until(&format!("{protocol}: the download flows"), || {
            count.load(Ordering::Relaxed) >= 256 * 1024
        });
        open.push((protocol, count, h));
    }
    open
}

/// Runs `capybara args` and asserts every download of `open` ended within 1 s of its start.
fn ends_all_within_1s(
    p: &Proxied,
    args: &[&str],
    open: Vec<(
        &'static str,
        Arc<AtomicU64>,
        std::thread::JoinHandle<Instant>,
    )>,
) {
    let t0 = Instant::now();
    p.lab.capybara(args);
    for (protocol, count, h) in open {
        let deadline = t0 + Duration::from_secs(5);
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            h.is_finished(),
            "{protocol}: the download still runs 5 s after `capybara {args:?}` ({} bytes)",
            count.load(Ordering::Relaxed)
        );
        let ended = h.join().unwrap().saturating_duration_since(t0);
        eprintln!("{protocol}: ended {ended:?} after `capybara {args:?}` began");
        assert!(
            ended <= Duration::from_secs(1),
            "{protocol}: ended {ended:?} after `capybara {args:?}` began (CLI start-up \
             included), not within 1 s"
        );
    }
}

#[test]
fn printed_configs_fetch_byte_for_byte_and_kick_and_a_hold_cut_each_protocol_within_1s() {
    let p = Proxied::start(211, 213);

    // The printed configs work: the file, byte for byte, through each.
    for (protocol, _) in p.socks {
        let mut s = p.through(protocol).expect("connect through the proxy");
        let got = origin::fetch_file(&mut s, FILE_LEN, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{protocol}: fetching the file: {e}"));
        assert!(got == *p.file, "{protocol}: the file arrived altered");
    }

    // A kick ends both at once; the sessions are recorded as kicked, with the bytes sent.
    let open = open_downloads(&p);
    ends_all_within_1s(&p, &["kick", "alice"], open);
    for (protocol, _) in p.socks {
        let mut sessions = Vec::new();
        wait_until(&format!("{protocol}: a kicked session"), || {
            sessions = p.sessions(protocol);
            sessions.iter().any(|s| s["reason"] == "kicked")
        });
        let s = sessions.iter().find(|s| s["reason"] == "kicked").unwrap();
        assert_eq!(s["device"], protocol, "{s:#}");
        let tx = s["traffic"]["tx"]["bytes"].as_u64().unwrap_or(0);
        assert!(
            tx >= (FILE_LEN + 256 * 1024) as u64,
            "{protocol}: the session's tx {tx} < the file and the stream it carried: {s:#}"
        );
    }

    // New connections are admitted after a kick; a hold (the account expired) ends them
    // within 1 s and refuses new ones until the user is renewed.
    let open = open_downloads(&p);
    ends_all_within_1s(&p, &["user", "expire", "alice", "--at", "2020-01-01"], open);
    for (protocol, _) in p.socks {
        use std::io::{Read as _, Write as _};
        // The clients answer SOCKS themselves; the endpoint refuses the user behind them.
        let got = p.through(protocol).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(&[STREAM])?;
            let mut b = [0u8; 1];
            s.read(&mut b)
        });
        assert!(
            !matches!(got, Ok(1)),
            "{protocol}: a held user's connection carried data"
        );
    }
    // Recorded as auth attempts of the client's address, reason `held`, protocol each.
    let ip = p.lab.veth.b.v4.to_string();
    wait_until("held auth attempts of both protocols", || {
        let found = p.lab.json(&["history", "search", "--ip", &ip]);
        let held: Vec<&Value> = found["auth_attempts"]
            .as_array()
            .map(|a| a.iter().filter(|a| a["reason"] == "held").collect())
            .unwrap_or_default();
        p.socks
            .iter()
            .all(|(protocol, _)| held.iter().any(|a| a["protocol"] == *protocol))
    });
    p.lab.capybara(&["user", "renew", "alice"]);
    for (protocol, _) in p.socks {
        let mut s = p.through(protocol).expect("connect through the proxy");
        let got = origin::fetch_file(&mut s, FILE_LEN, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{protocol} after the renewal: {e}"));
        assert!(got == *p.file, "{protocol}: the file arrived altered");
    }
}

/// The kernel's overshoot bound past a bucket's cutoff (`sock_skb` and the TC programs' docs):
/// one super-packet (≤ 64 KiB of payload plus its segments' headers) per CPU, whichever line of
/// the user's (device or proxy identity) carried it.
fn quota_bound(cutoff: u64) -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    cutoff + cpus * (64 * 1024 + 46 * 52)
}

#[test]
fn a_10mb_quota_shared_by_wireguard_shadowsocks_and_vless_stops_all_three_within_the_bound() {
    let p = Proxied::start(215, 217);
    p.lab
        .capybara(&["quota", "set", "alice", "--limit", "10MB"]);
    let quota = || p.lab.json(&["quota", "show", "alice"])[0].clone();
    let q = quota();
    let cutoff = q["cutoff_bytes"].as_u64().expect("cutoff_bytes");
    assert!(cutoff >= 10_000_000, "{q:#}");

    // Three endless downloads at once: through the tunnel, Shadowsocks and VLESS.
    let mut streams = vec![(
        "wireguard",
        p.tunnelled().expect("connect through the tunnel"),
    )];
    for (protocol, _) in p.socks {
        streams.push((
            protocol,
            p.through(protocol).expect("connect through the proxy"),
        ));
    }
    let t0 = Instant::now();
    let running: Vec<_> = streams
        .into_iter()
        .map(|(protocol, s)| {
            let count = Arc::new(AtomicU64::new(0));
            (protocol, count.clone(), Proxied::download(s, &count))
        })
        .collect();
    let total = || -> u64 {
        running
            .iter()
            .map(|(_, c, _)| c.load(Ordering::Relaxed))
            .sum()
    };
    // Until nothing more arrives for 2 s (or 30 s in all).
    let (mut last, mut since) = (0, Instant::now());
    while since.elapsed() < Duration::from_secs(2) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "still flowing after 30 s: {} bytes",
            total()
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = total();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    let q = quota();
    let used = q["used_bytes"].as_u64().unwrap();
    let per: Vec<(&str, u64)> = running
        .iter()
        .map(|(p, c, _)| (*p, c.load(Ordering::Relaxed)))
        .collect();
    let delivered = total();
    let bound = quota_bound(cutoff);
    let ctx = format!(
        "payload delivered {per:?} = {delivered}, charged {used}, cutoff {cutoff}, bound {bound}, \
         stopped after {:?}",
        since - t0
    );
    eprintln!("{ctx}");
    assert!(
        q["exceeding"] == true,
        "the budget was not spent: {q:#} {ctx}"
    );
    assert!(used <= bound, "charged past the bound: {ctx}");
    assert!(delivered <= bound, "delivered past the bound: {ctx}");
    for (protocol, got) in &per {
        assert!(*got > 0, "{protocol} carried nothing: {ctx}");
    }
    // Each stopped: a new download through each gets nothing.
    let mut fresh = vec![("wireguard", p.tunnelled())];
    for (protocol, _) in p.socks {
        fresh.push((protocol, p.through(protocol)));
    }
    for (protocol, s) in fresh {
        use std::io::{Read as _, Write as _};
        let got = s.and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(&[STREAM])?;
            let mut b = [0u8; 1];
            s.read(&mut b)
        });
        assert!(
            !matches!(got, Ok(1)),
            "{protocol}: a new download carried data past the quota"
        );
    }
}

/// Goodput (payload bits per second at the receiver) over `rate_bps`.
fn goodput_ratio(bytes: u64, secs: f64, rate_bps: f64) -> f64 {
    bytes as f64 * 8.0 / secs / rate_bps
}

#[test]
fn a_20_mbit_limit_holds_for_each_protocol() {
    let p = Proxied::start(219, 221);
    p.lab
        .capybara(&["quota", "set", "alice", "--bandwidth", "20Mbps"]);
    let mut ratios = Vec::new();
    for protocol in ["wireguard", "shadowsocks", "vless"] {
        let s = if protocol == "wireguard" {
            p.tunnelled()
        } else {
            p.through(protocol)
        }
        .expect("connect");
        let count = Arc::new(AtomicU64::new(0));
        let h = Proxied::download(s.try_clone().unwrap(), &count);
        // From 1 s (past slow start and the classes' burst) to 4 s.
        std::thread::sleep(Duration::from_secs(1));
        let (b1, t1) = (count.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        let (b4, secs) = (count.load(Ordering::Relaxed), t1.elapsed().as_secs_f64());
        let ratio = goodput_ratio(b4 - b1, secs, 20e6);
        eprintln!(
            "{protocol}: {} payload bytes in {secs:.2} s: goodput {ratio:.3} × 20 Mbit/s",
            b4 - b1
        );
        ratios.push((protocol, ratio));
        s.shutdown(std::net::Shutdown::Both).ok();
        let _ = h.join();
    }
    for (protocol, ratio) in ratios {
        assert!(
            (0.95..=1.00).contains(&ratio),
            "{protocol}: goodput {ratio:.3} × the 20 Mbit/s limit, outside 0.95–1.00"
        );
    }
}
