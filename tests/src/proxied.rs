//! Shadowsocks and VLESS through the real agent (issue 24), the lab the `e2e_proxies` tests and
//! the `multi_protocol_quota_*` benchmark share: the agent of a [`Lab`] with both endpoints on
//! its uplink (`--shadowsocks-listen`, `--vless-listen`), and Debian's real clients in the client
//! namespace, each started with the configuration `capybara user add alice --protocol
//! wireguard,shadowsocks,vless` printed (`ss-local` with the `ss-local` JSON, `v2ray` with the
//! v2ray JSON that pins the endpoint's generated certificate; only their local SOCKS ports are
//! changed, since both print 1080), and a `wireguard-go` client with the printed wg-quick
//! config. The destination of proxied traffic is an [`Origin`] on the client namespace's side
//! of the veth, so every proxied byte crosses the agent's uplink both ways; WireGuard's traffic
//! goes through the tunnel to an origin on the server's tunnel address.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    lab::Lab,
    origin::{self, Origin, STREAM},
    shadowsocks::{SsProcess, ss_local_with},
    socks,
    v2ray::V2ray,
    wg::WgProcess,
};

/// The Shadowsocks endpoint's port (on the uplink's address).
pub const SS_PORT: u16 = 8388;
/// The VLESS endpoint's port.
pub const VLESS_PORT: u16 = 8443;
const SNI: &str = "vless.capybara.test";
/// The file's size.
pub const FILE_LEN: usize = 2 * 1024 * 1024;

/// The lab with the agent serving both endpoints, alice added with all three protocols, her
/// three clients running in the client namespace and an origin on each side.
pub struct Proxied {
    /// The lab: the agent's namespace, the clients'.
    pub lab: Lab,
    _ss: SsProcess,
    _v2ray: V2ray,
    _wg: WgProcess,
    /// The clients' SOCKS5 addresses (in the client namespace), by protocol name.
    pub socks: [(&'static str, SocketAddr); 2],
    /// The origin the proxied connections reach (client side of the veth).
    pub far: Origin,
    /// The origin WireGuard traffic reaches (the server's tunnel address).
    pub near: Origin,
    pub file: Arc<Vec<u8>>,
}

impl Proxied {
    /// Starts the agent of `lab` with both endpoints and alice's three clients.
    pub fn start(lab: Lab) -> Proxied {
        Proxied::start_with(lab, &[])
    }

    /// [`Proxied::start`] with more agent flags.
    pub fn start_with(lab: Lab, extra: &[&str]) -> Proxied {
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
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
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
        let v2ray_port = lab.client.run(crate::free_port);
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
    pub fn through(&self, protocol: &str) -> std::io::Result<TcpStream> {
        let (_, proxy) = self.socks.iter().find(|(p, _)| *p == protocol).unwrap();
        let (proxy, far) = (*proxy, self.far.addr);
        self.lab.client.run(move || socks::connect(proxy, far))
    }

    /// Whether a UDP datagram to the far origin's echo through `protocol`'s client (SOCKS5 UDP
    /// ASSOCIATE, as the printed configs enable it) comes back echoed within `within`.
    pub fn echoes(&self, protocol: &str, within: Duration) -> bool {
        let (_, proxy) = self.socks.iter().find(|(p, _)| *p == protocol).unwrap();
        let (proxy, far) = (*proxy, self.far.udp);
        let payload = format!("a datagram through {protocol}").into_bytes();
        let want = [origin::ECHO_PREFIX, &payload].concat();
        let got = self
            .lab
            .client
            .run(move || socks::udp_exchange(proxy, far, &payload, within));
        match got {
            Ok(got) => {
                assert_eq!(got, want, "{protocol}: the echo came back altered");
                true
            }
            Err(e) => {
                eprintln!("{protocol}: no UDP echo: {e}");
                false
            }
        }
    }

    /// A connection to the near origin through the tunnel.
    pub fn tunnelled(&self) -> std::io::Result<TcpStream> {
        let near = self.near.addr;
        self.lab
            .client
            .run(move || TcpStream::connect_timeout(&near, Duration::from_secs(5)))
    }

    /// Whether a new download through `protocol` (`wireguard`, `shadowsocks` or `vless`) gets
    /// a byte within 2 s.
    pub fn carries(&self, protocol: &str) -> bool {
        use std::io::{Read as _, Write as _};
        let s = if protocol == "wireguard" {
            self.tunnelled()
        } else {
            self.through(protocol)
        };
        let got = s.and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(&[STREAM])?;
            let mut b = [0u8; 1];
            s.read(&mut b)
        });
        matches!(got, Ok(1))
    }

    /// Starts an endless download on `s`; its bytes are added to `count`.
    pub fn download(s: TcpStream, count: &Arc<AtomicU64>) -> std::thread::JoinHandle<Instant> {
        use std::io::Write as _;
        let mut s = s;
        s.write_all(&[STREAM]).expect("ask for the stream");
        origin::drain(s, count.clone())
    }

    /// Alice's `quota show`.
    pub fn quota(&self) -> Value {
        self.lab.json(&["quota", "show", "alice"])[0].clone()
    }

    /// Alice's sessions of `protocol` (`history show`).
    pub fn sessions(&self, protocol: &str) -> Vec<Value> {
        let all = self.lab.json(&["history", "show", "alice"]);
        all.as_array()
            .expect("sessions")
            .iter()
            .filter(|s| s["protocol"] == protocol)
            .cloned()
            .collect()
    }
}

/// The kernel's overshoot bound past a bucket's cutoff (`sock_skb` and the TC programs' docs):
/// one super-packet (≤ 64 KiB of payload plus its segments' headers) per CPU, whichever line of
/// the user's (device or proxy identity) carried it.
pub fn quota_bound(cutoff: u64) -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    cutoff + cpus * (64 * 1024 + 46 * 52)
}

/// What spending a quota through all three protocols at once did.
#[derive(Clone, Debug)]
pub struct QuotaSpent {
    /// Payload bytes each download received, by protocol.
    pub per: Vec<(&'static str, u64)>,
    /// Their sum.
    pub delivered: u64,
    /// What the kernel charged (`quota show`'s `used_bytes`).
    pub used: u64,
    /// Where the kernel stops traffic.
    pub cutoff: u64,
    /// `quota show`'s verdict: at or over the budget.
    pub exceeding: bool,
    /// When the last byte arrived, from the downloads' start.
    pub stopped_after: Duration,
}

/// Sets alice's quota to `limit`, starts a new period and spends it with three endless downloads at once (through
/// the tunnel, Shadowsocks and VLESS) until nothing more arrives for 2 s (at most 30 s); then
/// closes them.
pub fn spend_quota(p: &Proxied, limit: &str) -> QuotaSpent {
    p.lab.capybara(&["quota", "set", "alice", "--limit", limit]);
    // A new period: nothing used (setting the limit keeps what the period used so far).
    p.lab.capybara(&["quota", "reset", "alice"]);
    let cutoff = p.quota()["cutoff_bytes"].as_u64().expect("cutoff_bytes");
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
    // Handles to close them at the end (a reset quota would let them go on).
    let handles: Vec<TcpStream> = streams
        .iter()
        .map(|(_, s)| s.try_clone().expect("clone a stream"))
        .collect();
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
    let q = p.quota();
    for s in handles {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    QuotaSpent {
        per: running
            .iter()
            .map(|(p, c, _)| (*p, c.load(Ordering::Relaxed)))
            .collect(),
        delivered: total(),
        used: q["used_bytes"].as_u64().expect("used_bytes"),
        cutoff,
        exceeding: q["exceeding"] == true,
        stopped_after: since - t0,
    }
}
