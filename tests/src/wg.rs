//! WireGuard for the tests and the tunnel benchmark: stock `wireguard-go` interfaces in
//! namespaces configured with `wg setconf` (the client side, or a baseline server), the agent's
//! [`WgTunnel`] started inside a namespace, `boringtun-cli` as a baseline server, and
//! `wg show <iface> dump` parsed.
//!
//! Interface names are unique per test ([`unique_name`]), so the UAPI sockets they create in
//! `/var/run/wireguard` never collide; each guard kills its process and removes its socket.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use capybara_agent::{
    paths,
    tunnel::{
        PeerConfig, PresharedKey, PrivateKey, PublicKey, TunnelDeviceConfig, WgConfig, WgTunnel,
    },
};

use crate::netns::{NetNs, VethPair, unique_name};

/// The UAPI socket of `ifname`.
pub fn uapi_socket(ifname: &str) -> PathBuf {
    paths::uapi_socket(std::path::Path::new(paths::WG_UAPI_DIR), ifname)
}

/// Waits until `ifname`'s UAPI socket answers.
fn wait_for_socket(ifname: &str, child: &mut Child) {
    let path = uapi_socket(ifname);
    let end = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&path).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the WireGuard process for {ifname} exited ({status}) before its UAPI socket");
        }
        assert!(
            Instant::now() < end,
            "no UAPI socket {} after 10 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Which userspace WireGuard runs an interface made by [`WgProcess`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// `wireguard-go -f IFACE` (Debian's package).
    WireguardGo,
    /// `boringtun-cli -f --disable-drop-privileges IFACE` (installed by `cargo xtask setup`).
    BoringtunCli,
}

/// A userspace WireGuard interface in a namespace, driven by `wg`. Killed (and its socket
/// removed) on drop.
pub struct WgProcess {
    /// The interface name (in its namespace).
    pub ifname: String,
    /// Its private key.
    pub private_key: PrivateKey,
    child: Child,
}

/// The boringtun-cli binary: `$CAPYBARA_CACHE/tools/bin`, `/var/cache/capybara/tools/bin`, or
/// `PATH`.
pub fn boringtun_cli() -> PathBuf {
    let cache =
        std::env::var("CAPYBARA_CACHE").unwrap_or_else(|_| "/var/cache/capybara".to_owned());
    let p = PathBuf::from(cache).join("tools/bin/boringtun-cli");
    if p.exists() {
        p
    } else {
        PathBuf::from("boringtun-cli")
    }
}

impl WgProcess {
    /// Starts `implementation` on a new interface `ct<pid><n><suffix>` inside `ns` and waits for
    /// its UAPI socket. The interface is down and has no address yet.
    pub fn start(ns: &NetNs, implementation: Implementation, suffix: &str) -> Self {
        let ifname = unique_name(suffix);
        let program = match implementation {
            Implementation::WireguardGo => PathBuf::from("wireguard-go"),
            Implementation::BoringtunCli => boringtun_cli(),
        };
        let program = program.to_string_lossy().into_owned();
        let mut args = vec![program.as_str(), "-f"];
        if implementation == Implementation::BoringtunCli {
            args.push("--disable-drop-privileges");
        }
        args.push(&ifname);
        let mut child = ns
            .command(&args)
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} (is it installed?): {e}"));
        wait_for_socket(&ifname, &mut child);
        WgProcess {
            ifname,
            private_key: PrivateKey::generate(),
            child,
        }
    }

    /// The interface's public key.
    pub fn public_key(&self) -> PublicKey {
        self.private_key.public_key()
    }

    /// The process id (`ip netns exec` execs the program: the WireGuard process itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `wg setconf` with this interface's key, `listen_port` (if any) and one peer.
    pub fn set_peer(
        &self,
        listen_port: Option<u16>,
        peer: &PublicKey,
        endpoint: Option<SocketAddr>,
        allowed_ips: &[&str],
        keepalive: Option<u16>,
    ) {
        let mut conf = format!(
            "[Interface]\nPrivateKey = {}\n",
            self.private_key.to_base64()
        );
        if let Some(p) = listen_port {
            conf += &format!("ListenPort = {p}\n");
        }
        conf += &format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
            peer.to_base64(),
            allowed_ips.join(", ")
        );
        if let Some(e) = endpoint {
            conf += &format!("Endpoint = {e}\n");
        }
        if let Some(k) = keepalive {
            conf += &format!("PersistentKeepalive = {k}\n");
        }
        self.setconf(&conf);
    }

    /// `wg set <iface> peer <peer> preshared-key <file>`.
    pub fn set_preshared_key(&self, peer: &PublicKey, psk: &PresharedKey) {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(psk.to_base64().as_bytes()).expect("write psk");
        let path = f.path().to_string_lossy().into_owned();
        crate::netns::host(&[
            "wg",
            "set",
            &self.ifname,
            "peer",
            &peer.to_base64(),
            "preshared-key",
            &path,
        ]);
    }

    /// `wg setconf <iface> <file with conf>`.
    pub fn setconf(&self, conf: &str) {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(conf.as_bytes()).expect("write wg config");
        let path = f.path().to_string_lossy().into_owned();
        crate::netns::host(&["wg", "setconf", &self.ifname, &path]);
    }

    /// Adds addresses (`10.x.y.z/24`, `fd..::2/64`) to the interface in `ns`, sets MTU 1420 and
    /// brings it up.
    pub fn up(&self, ns: &NetNs, addrs: &[&str]) {
        for a in addrs {
            ns.add_addr(&self.ifname, a);
        }
        ns.exec(&["ip", "link", "set", &self.ifname, "mtu", "1420", "up"]);
    }

    /// A `wireguard-go` client in `ns` from a generated wg-quick config, as `wg-quick up` would
    /// bring it up: the wg-quick-only lines (`Address`, `DNS`) taken out of what `wg setconf`
    /// gets, the addresses put on the interface, its `Endpoint` replaced by `endpoint` if given
    /// (a namespace with its own link to the server), and a route to `server` (the server's
    /// tunnel address) through it from `source`.
    pub fn from_wg_quick(
        ns: &NetNs,
        suffix: &str,
        wg_quick: &str,
        endpoint: Option<SocketAddr>,
        server: IpAddr,
        source: IpAddr,
    ) -> Self {
        let (mut conf, mut addrs) = (String::new(), Vec::new());
        for line in wg_quick.lines() {
            match line.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("Address", v)) => addrs.extend(v.split(',').map(|a| a.trim().to_owned())),
                Some(("DNS", _)) => {}
                Some(("Endpoint", _)) if let Some(e) = endpoint => {
                    conf.push_str(&format!("Endpoint = {e}\n"));
                }
                _ => {
                    conf.push_str(line);
                    conf.push('\n');
                }
            }
        }
        let wg = WgProcess::start(ns, Implementation::WireguardGo, suffix);
        wg.setconf(&conf);
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        wg.up(ns, &refs);
        let host = if server.is_ipv4() { 32 } else { 128 };
        ns.add_route(&format!("{server}/{host}"), &wg.ifname, Some(source));
        wg
    }

    /// `wg show <iface> dump`, parsed.
    pub fn dump(&self) -> WgDump {
        wg_dump(&self.ifname)
    }
}

impl Drop for WgProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(uapi_socket(&self.ifname));
    }
}

/// One peer line of `wg show <iface> dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpPeer {
    /// Base64 public key.
    pub public_key: String,
    /// Endpoint, if known.
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs as printed (comma-separated).
    pub allowed_ips: String,
    /// Latest handshake, unix seconds (0: never).
    pub latest_handshake: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// `wg show <iface> dump`.
#[derive(Clone, Debug)]
pub struct WgDump {
    /// Base64 public key of the interface.
    pub public_key: String,
    /// Listen port.
    pub listen_port: u16,
    /// The peers.
    pub peers: Vec<DumpPeer>,
}

impl WgDump {
    /// The peer with `key`; panics if absent.
    pub fn peer(&self, key: &PublicKey) -> &DumpPeer {
        let k = key.to_base64();
        self.peers
            .iter()
            .find(|p| p.public_key == k)
            .unwrap_or_else(|| panic!("peer {k} not in wg show: {self:?}"))
    }
}

/// Runs and parses `wg show <ifname> dump` (from the host: UAPI sockets are files).
pub fn wg_dump(ifname: &str) -> WgDump {
    let out = crate::netns::host(&["wg", "show", ifname, "dump"]);
    parse_dump(&out).unwrap_or_else(|| panic!("cannot parse wg show {ifname} dump: {out:?}"))
}

/// Parses `wg show <iface> dump` output.
pub fn parse_dump(out: &str) -> Option<WgDump> {
    let mut lines = out.lines();
    let first: Vec<&str> = lines.next()?.split('\t').collect();
    let mut dump = WgDump {
        public_key: first.get(1)?.to_string(),
        listen_port: first.get(2)?.parse().ok()?,
        peers: Vec::new(),
    };
    for l in lines {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() < 8 {
            return None;
        }
        dump.peers.push(DumpPeer {
            public_key: f[0].to_owned(),
            endpoint: f[2].parse().ok(),
            allowed_ips: f[3].to_owned(),
            latest_handshake: f[4].parse().ok()?,
            rx_bytes: f[5].parse().ok()?,
            tx_bytes: f[6].parse().ok()?,
        });
    }
    Some(dump)
}

/// One client namespace with its wireguard-go interface.
pub struct WgClient {
    pub wg: WgProcess,
    /// The veth pair to the server (`a` is the server's end).
    pub veth: VethPair,
    pub ns: NetNs,
    /// The client's veth address (what the server sees as its endpoint).
    pub outer: IpAddr,
    /// Inner IPv4 address.
    pub v4: IpAddr,
    /// Inner IPv6 address.
    pub v6: IpAddr,
}

/// The server namespace with the agent's tunnel (the tests' "lab"), and its clients.
pub struct WgLab {
    /// The clients (dropped first).
    pub clients: Vec<WgClient>,
    /// The agent's tunnel.
    pub tunnel: WgTunnel,
    /// The server's namespace.
    pub server: NetNs,
    /// The server's inner IPv4 address.
    pub v4: IpAddr,
    /// The server's inner IPv6 address.
    pub v6: IpAddr,
    /// The lab's network number.
    pub net: u8,
}

/// Inner IPv6 address `fd01:<net>::<host>`.
pub fn inner_v6(net: u8, host: u8) -> IpAddr {
    format!("fd01:{net:x}::{host:x}").parse().unwrap()
}

/// Inner IPv4 address `10.<net>.1.<host>`.
pub fn inner_v4(net: u8, host: u8) -> IpAddr {
    format!("10.{net}.1.{host}").parse().unwrap()
}

/// The lab's tunnel configuration: `10.<net>.1.1/24`, `fd01:<net>::1/64`, a free port.
pub fn tunnel_config(net: u8, private_key: PrivateKey, offload: bool) -> WgConfig {
    let mut c = WgConfig::new(
        TunnelDeviceConfig {
            name: unique_name("wg"),
            ipv4: Some(([10, net, 1, 1].into(), 24)),
            ipv6: Some((format!("fd01:{net:x}::1").parse().unwrap(), 64)),
            mtu: 1420,
            offload,
        },
        0,
        private_key,
    );
    c.disconnect_after = Duration::from_secs(180);
    c
}

impl WgLab {
    /// A lab: a server on `10.<net>.1.1/24`, `fd01:<net>::1/64` and `clients` wireguard-go
    /// clients, each in its own namespace on veth `10.<net+i>.0.0/24`, inner
    /// `10.<net>.1.<i+2>`. With `add_peers`, each client is a peer of the server.
    pub fn new(net: u8, clients: usize, add_peers: bool, offload: bool) -> WgLab {
        Self::with_config(
            net,
            clients,
            add_peers,
            tunnel_config(net, PrivateKey::generate(), offload),
        )
    }

    /// [`WgLab::new`] with the tunnel's configuration given (from [`tunnel_config`]).
    pub fn with_config(net: u8, clients: usize, add_peers: bool, config: WgConfig) -> WgLab {
        let server = NetNs::new("s");
        let tunnel = start_tunnel(&server, config);
        let mut s = WgLab {
            clients: Vec::new(),
            tunnel,
            server,
            v4: inner_v4(net, 1),
            v6: inner_v6(net, 1),
            net,
        };
        for i in 0..clients {
            let ns = NetNs::new("c");
            let veth = VethPair::new(&s.server, &ns, net + 1 + i as u8);
            let host = 2 + i as u8;
            let wg = WgProcess::start(&ns, Implementation::WireguardGo, "c");
            let endpoint = SocketAddr::new(IpAddr::V4(veth.a.v4), s.tunnel.listen_port());
            wg.set_peer(
                None,
                &s.tunnel.public_key(),
                Some(endpoint),
                &[&format!("10.{net}.1.0/24"), &format!("fd01:{net:x}::/64")],
                None,
            );
            wg.up(
                &ns,
                &[
                    &format!("{}/24", inner_v4(net, host)),
                    &format!("{}/64", inner_v6(net, host)),
                ],
            );
            if add_peers {
                s.tunnel
                    .add_peer(peer_config(&wg, net, host))
                    .expect("add peer");
            }
            s.clients.push(WgClient {
                outer: IpAddr::V4(veth.b.v4),
                v4: inner_v4(net, host),
                v6: inner_v6(net, host),
                wg,
                veth,
                ns,
            });
        }
        s
    }
}

/// The peer configuration of `wg` as client `host` of lab `net` (its inner /32 and /128).
pub fn peer_config(wg: &WgProcess, net: u8, host: u8) -> PeerConfig {
    PeerConfig {
        public_key: wg.public_key(),
        preshared_key: None,
        allowed_ips: vec![
            format!("{}/32", inner_v4(net, host)).parse().unwrap(),
            format!("{}/128", inner_v6(net, host)).parse().unwrap(),
        ],
        persistent_keepalive: None,
    }
}

/// One ping (1 s timeout); true if answered.
pub fn ping(ns: &NetNs, to: IpAddr) -> bool {
    ns.try_exec(&["ping", "-c", "1", "-W", "1", &to.to_string()])
        .status
        .success()
}

/// Pings until one answer or `timeout`.
pub fn ping_until(ns: &NetNs, to: IpAddr, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if ping(ns, to) {
            return true;
        }
    }
    false
}

/// `ping -D` from a namespace in the background, every `interval` for `duration`: when each
/// reply came (for "traffic stops within …" checks against a moment taken by the test).
pub struct PingLog {
    out: std::thread::JoinHandle<String>,
}

impl PingLog {
    /// Starts pinging `to` from `ns`; the namespace guard kills the `ping` if the test ends
    /// first.
    pub fn start(ns: &NetNs, to: IpAddr, interval: Duration, duration: Duration) -> PingLog {
        let mut child = ns
            .command(&[
                "ping",
                "-n",
                "-D",
                "-i",
                &format!("{:.3}", interval.as_secs_f64()),
                "-W",
                "1",
                "-w",
                &duration.as_secs().max(1).to_string(),
                &to.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ping");
        let mut stdout = child.stdout.take().expect("ping's stdout");
        ns.adopt(child);
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        });
        PingLog { out }
    }

    /// Waits for the `ping` to end; the times of its replies (Unix seconds, as `-D` prints
    /// them), in order.
    pub fn replies(self) -> Vec<f64> {
        let out = self.out.join().expect("ping reader");
        parse_ping_replies(&out)
    }
}

/// The reply times of `ping -D` output: lines `[<unix secs>] <n> bytes from …`.
pub fn parse_ping_replies(out: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| l.strip_prefix('[')?.split_once(']')?.0.parse().ok())
        .collect()
}

/// Starts the agent's tunnel inside `ns` (its device, socket and threads live there).
pub fn start_tunnel(ns: &NetNs, config: WgConfig) -> WgTunnel {
    ns.run(|| WgTunnel::start(config))
        .unwrap_or_else(|e| panic!("WgTunnel::start in {}: {e:?}", ns.name()))
}

/// Now as unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ping_replies_are_read_with_their_times() {
        let out = "PING 10.9.0.1 (10.9.0.1) 56(84) bytes of data.\n\
                   [1765073784.123456] 64 bytes from 10.9.0.1: icmp_seq=1 ttl=64 time=0.4 ms\n\
                   [1765073784.223456] From 10.9.0.2 icmp_seq=2 Destination Host Unreachable\n\
                   [1765073784.323456] 64 bytes from 10.9.0.1: icmp_seq=3 ttl=64 time=0.5 ms\n\
                   \n--- 10.9.0.1 ping statistics ---\n";
        assert_eq!(
            super::parse_ping_replies(out),
            vec![1_765_073_784.123_456, 1_765_073_784.323_456]
        );
    }

    use super::*;

    #[test]
    fn parses_wg_dump() {
        let out = "cHJpdg==\tcHVi\t51820\toff\n\
                   a2V5\t(none)\t10.1.0.2:40000\t10.9.0.2/32,fd00::2/128\t1790000000\t100\t200\toff\n\
                   a2V6\t(none)\t(none)\t(none)\t0\t0\t0\t25\n";
        let d = parse_dump(out).unwrap();
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.peers.len(), 2);
        assert_eq!(d.peers[0].endpoint, Some("10.1.0.2:40000".parse().unwrap()));
        assert_eq!(d.peers[0].latest_handshake, 1_790_000_000);
        assert_eq!((d.peers[0].rx_bytes, d.peers[0].tx_bytes), (100, 200));
        assert_eq!(d.peers[1].endpoint, None);
    }
}
