//! The cluster lab (issue 25): a LAN (a bridge in a namespace of its own) joining a three-member
//! etcd cluster (Debian's `etcd`, on the bridge's own addresses; with [`Etcd::start_tls`] its
//! client URLs are TLS with required client certificates) and agents, each a [`Lab`]
//! (its server namespace attached to the LAN, its client namespace behind it). Everything goes
//! when the lab drops: the namespaces with their processes, etcd's data directories.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use crate::{
    ca::TestCa,
    lab::Lab,
    netns::{NetNs, host, unique_name},
};

/// etcd's client port.
pub const CLIENT_PORT: u16 = 2379;
/// etcd's peer port.
pub const PEER_PORT: u16 = 2380;

/// A bridge in a namespace of its own: `10.<net>.0.0/24`.
pub struct Lan {
    /// The LAN's namespace (the bridge, etcd's members).
    pub ns: NetNs,
    bridge: String,
    net: u8,
}

impl Lan {
    /// A LAN on `10.<net>.0.0/24`.
    pub fn new(net: u8) -> Lan {
        let ns = NetNs::new("ln");
        let bridge = unique_name("br");
        ns.exec(&["ip", "link", "add", &bridge, "type", "bridge"]);
        ns.exec(&["ip", "link", "set", &bridge, "up"]);
        Lan { ns, bridge, net }
    }

    /// `10.<net>.0.<host>`.
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, 0, host)
    }

    /// Plugs `ns` into the LAN as host `host`: a veth whose LAN end is on the bridge and whose
    /// other end, in `ns`, has `10.<net>.0.<host>/24`. Returns that interface's name (to take it
    /// down: the node cut off).
    pub fn attach(&self, ns: &NetNs, host_no: u8) -> String {
        let inner = unique_name("lm");
        let outer = unique_name("lp");
        host(&[
            "ip",
            "link",
            "add",
            "name",
            &inner,
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &outer,
            "netns",
            self.ns.name(),
        ]);
        self.ns
            .exec(&["ip", "link", "set", &outer, "master", &self.bridge, "up"]);
        ns.add_addr(&inner, &format!("{}/24", self.addr(host_no)));
        ns.exec(&["ip", "link", "set", &inner, "up"]);
        inner
    }

    /// Gives the bridge itself the address of host `host` (etcd's members listen there).
    fn own(&self, host_no: u8) {
        self.ns
            .add_addr(&self.bridge, &format!("{}/24", self.addr(host_no)));
    }
}

/// One etcd member.
struct Member {
    name: String,
    ip: Ipv4Addr,
    pid: Option<u32>,
}

/// A three-member etcd cluster on the LAN's hosts 1–3.
pub struct Etcd {
    members: Vec<Member>,
    initial: String,
    token: String,
    dir: tempfile::TempDir,
    tls: Option<Tls>,
}

/// The TLS files of an [`Etcd`] started with [`Etcd::start_tls`].
pub struct Tls {
    /// The CA (also what signs the nodes' client certificates).
    pub ca: TestCa,
    /// Each member's certificate and key.
    members: Vec<(PathBuf, PathBuf)>,
    /// A client certificate and key (`etcdctl`'s).
    client: (PathBuf, PathBuf),
}

impl Etcd {
    /// Starts three members on `lan` (hosts 1, 2, 3) and waits until the cluster answers.
    pub fn start(lan: &Lan) -> Etcd {
        Etcd::start_with(lan, false)
    }

    /// [`Etcd::start`] with TLS on the client URLs (`https://`): each member's certificate is
    /// for its address and signed by a throw-away CA ([`Etcd::tls`]), and a client must show a
    /// certificate of that CA (`--client-cert-auth`).
    pub fn start_tls(lan: &Lan) -> Etcd {
        Etcd::start_with(lan, true)
    }

    /// The TLS files, when started with TLS.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    fn start_with(lan: &Lan, tls: bool) -> Etcd {
        let members: Vec<Member> = (1..=3)
            .map(|i| {
                lan.own(i);
                Member {
                    name: format!("m{i}"),
                    ip: lan.addr(i),
                    pid: None,
                }
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect::<Vec<_>>()
            .join(",");
        let dir = tempfile::tempdir().expect("etcd's temp dir");
        let tls = tls.then(|| {
            let ca_dir = dir.path().join("ca");
            std::fs::create_dir(&ca_dir).expect("the CA's dir");
            let ca = TestCa::generate(&ca_dir);
            let members = members
                .iter()
                .map(|m| ca.issue(&m.name, &format!("IP:{}", m.ip), "serverAuth,clientAuth"))
                .collect();
            let client = ca.issue("etcdctl", "", "clientAuth");
            Tls {
                ca,
                members,
                client,
            }
        });
        let mut etcd = Etcd {
            members,
            initial,
            token: unique_name("etcd"),
            dir,
            tls,
        };
        for i in 0..3 {
            etcd.start_member(lan, i);
        }
        etcd.wait_healthy(lan, Duration::from_secs(30));
        etcd
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The members' client URLs, comma-separated (`--etcd`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}://{}:{CLIENT_PORT}", self.scheme(), m.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_member(&mut self, lan: &Lan, i: usize) {
        let m = &self.members[i];
        let data: PathBuf = self.dir.path().join(&m.name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd's log");
        let client = format!("{}://{}:{CLIENT_PORT}", self.scheme(), m.ip);
        let peer = format!("http://{}:{PEER_PORT}", m.ip);
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(t) = &self.tls {
            let (cert, key) = &t.members[i];
            tls_args = vec![
                "--cert-file".into(),
                cert.display().to_string(),
                "--key-file".into(),
                key.display().to_string(),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                t.ca.ca_pem.display().to_string(),
            ];
        }
        let child = lan
            .ns
            .command(&[
                "etcd",
                "--name",
                &m.name,
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
            ])
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (cargo xtask setup installs etcd-server)");
        self.members[i].pid = Some(lan.ns.adopt(child));
    }

    /// Kills member `i` (0–2) with SIGKILL.
    pub fn kill(&mut self, lan: &Lan, i: usize) {
        if let Some(pid) = self.members[i].pid.take() {
            lan.ns.kill(pid, Signal::SIGKILL);
        }
    }

    /// Starts member `i` again, on its data directory (it rejoins the cluster).
    pub fn restart(&mut self, lan: &Lan, i: usize) {
        assert!(self.members[i].pid.is_none(), "member {i} runs");
        self.start_member(lan, i);
    }

    /// Waits until every running member reports healthy (`etcdctl endpoint health`).
    pub fn wait_healthy(&self, lan: &Lan, within: Duration) {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.pid.is_some())
            .map(|m| format!("{}://{}:{CLIENT_PORT}", self.scheme(), m.ip))
            .collect();
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(t) = &self.tls {
            tls_args = vec![
                format!("--cacert={}", t.ca.ca_pem.display()),
                format!("--cert={}", t.client.0.display()),
                format!("--key={}", t.client.1.display()),
            ];
        }
        let running_joined = running.join(",");
        let end = Instant::now() + within;
        loop {
            let mut args: Vec<&str> = vec![
                "etcdctl",
                "--endpoints",
                &running_joined,
                "--dial-timeout",
                "1s",
                "--command-timeout",
                "2s",
            ];
            args.extend(tls_args.iter().map(String::as_str));
            args.extend(["endpoint", "health"]);
            let out = lan.ns.try_exec(&args);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < end,
                "etcd not healthy within {within:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default()
    }
}

impl Node {
    /// Whether the node's namespace has `addr` on its LAN interface.
    pub fn holds(&self, addr: Ipv4Addr) -> bool {
        let o = self
            .lab
            .server
            .try_exec(&["ip", "-o", "-4", "addr", "show", "dev", &self.lan_if]);
        String::from_utf8_lossy(&o.stdout).contains(&format!("inet {addr}/"))
    }
}

/// An agent of the cluster: a [`Lab`] whose server namespace is on the LAN.
pub struct Node {
    /// Its name (`--node-name`).
    pub name: String,
    /// Its lab.
    pub lab: Lab,
    /// Its LAN interface (in its server namespace).
    pub lan_if: String,
    /// Its agent's pid.
    pub pid: u32,
}

impl Node {
    /// Starts agent `name` as host `host_no` of `lan`, a node of `etcd`'s cluster with a lease
    /// of `ttl`; its lab on `veth_net`/`tunnel_net`.
    pub fn start(
        lan: &Lan,
        etcd: &Etcd,
        name: &str,
        host_no: u8,
        nets: (u8, u8),
        ttl: &str,
    ) -> Node {
        Node::start_with(lan, etcd, name, host_no, nets, &["--cluster-ttl", ttl])
    }

    /// [`Node::start`] with these agent flags after `--etcd` and `--node-name`.
    pub fn start_with(
        lan: &Lan,
        etcd: &Etcd,
        name: &str,
        host_no: u8,
        nets: (u8, u8),
        extra: &[&str],
    ) -> Node {
        Node::start_keyed(lan, etcd, name, host_no, nets, extra, None)
    }

    /// [`Node::start_with`], `{lan_if}` in `extra` replaced by the node's LAN interface, and
    /// the keys of `key_of` copied into its data directory first (a failover group's nodes
    /// share the server key; every node needs the sealing keys of the shared records).
    pub fn start_keyed(
        lan: &Lan,
        etcd: &Etcd,
        name: &str,
        host_no: u8,
        (veth_net, tunnel_net): (u8, u8),
        extra: &[&str],
        key_of: Option<&Node>,
    ) -> Node {
        let lab = Lab::new(veth_net, tunnel_net);
        let lan_if = lan.attach(&lab.server, host_no);
        if let Some(other) = key_of {
            std::fs::create_dir_all(lab.file("data")).expect("data dir");
            std::fs::copy(
                other.lab.file("data/server.key"),
                lab.file("data/server.key"),
            )
            .expect("copy the server key");
        }
        let endpoints = etcd.endpoints();
        let extra: Vec<String> = extra
            .iter()
            .map(|a| a.replace("{lan_if}", &lan_if))
            .collect();
        let mut args = vec!["--etcd", &endpoints, "--node-name", name];
        args.extend(extra.iter().map(String::as_str));
        let pid = lab.start_agent(1, &args);
        Node {
            name: name.to_owned(),
            lab,
            lan_if,
            pid,
        }
    }
}
