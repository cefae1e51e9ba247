//! The agent's lab for end-to-end tests and benchmarks: the real `capybara-agent` in a server
//! namespace joined by a veth pair to a client namespace, driven by the `capybara` CLI over its
//! control socket, with stock `wireguard-go` clients made from the configs it prints. Everything
//! (namespaces, the agent, the clients, bpffs pins, files) goes when the lab drops.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    agent_proc::{self, agent_crate_binary},
    netns::{BpffsDir, NetNs, VethPair, unique_name},
    wg::WgProcess,
};

const PORT: u16 = 51820;
const WAIT: Duration = Duration::from_secs(10);

/// The server side: namespace, veth to the client namespace, the agent's files.
pub struct Lab {
    bin: PathBuf,
    pub cli: PathBuf,
    pins: BpffsDir,
    tmp: tempfile::TempDir,
    pub server: NetNs,
    pub client: NetNs,
    pub veth: VethPair,
    tunnel: String,
    /// `10.<net>.0.1`: the server's tunnel address.
    pub server_v4: Ipv4Addr,
    /// The tunnel's network: `10.<net>.0.0/24`.
    pub net: u8,
}

impl Lab {
    pub fn new(veth_net: u8, tunnel_net: u8) -> Lab {
        let bin = agent_crate_binary("capybara-agent");
        let cli = agent_crate_binary("capybara");
        Lab::with_binaries(bin, cli, veth_net, tunnel_net)
    }

    /// [`Lab::new`] with binaries built already (the benchmarks': next to the bench binary).
    pub fn with_binaries(bin: PathBuf, cli: PathBuf, veth_net: u8, tunnel_net: u8) -> Lab {
        let server = NetNs::new("hs");
        let client = NetNs::new("hc");
        let veth = VethPair::new(&server, &client, veth_net);
        Lab {
            bin,
            cli,
            pins: BpffsDir::new(),
            tmp: tempfile::tempdir().expect("temp dir"),
            server,
            client,
            veth,
            tunnel: unique_name("hy"),
            server_v4: Ipv4Addr::new(10, tunnel_net, 0, 1),
            net: tunnel_net,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.tmp.path().join("run/agent.sock")
    }

    /// Starts the agent (run `run`), waiting for "ready"; the pid belongs to the namespace
    /// guard (killed on drop).
    pub fn start_agent(&self, run: u32, extra: &[&str]) -> u32 {
        self.start_agent_logging(run, extra, "info")
    }

    /// [`Lab::start_agent`] with `RUST_LOG=rust_log`.
    pub fn start_agent_logging(&self, run: u32, extra: &[&str], rust_log: &str) -> u32 {
        let log = self.tmp.path().join(format!("agent-{run}.log"));
        let data = self.tmp.path().join("data");
        let uapi = self.tmp.path().join("wg");
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--netns",
            self.server.name(),
            "--uplink",
            &self.veth.a.ifname,
        ])
        .args(["--tunnel", &self.tunnel])
        .args(["--tunnel-ipv4", &format!("{}/24", self.server_v4)])
        .args(["--tunnel-ipv6", &format!("fd00:{:x}::1/64", self.net)])
        .args(["--listen-port", &PORT.to_string()])
        .args(["--public-endpoint", &format!("{}:{PORT}", self.veth.a.v4)])
        .arg("--data-dir")
        .arg(&data)
        .arg("--bpffs")
        .arg(self.pins.path())
        .arg("--wg-uapi-dir")
        .arg(&uapi)
        .arg("--api-socket")
        .arg(self.socket())
        .args(extra)
        .env("RUST_LOG", rust_log);
        // A debug build loading big lists or databases at start takes its time.
        agent_proc::start_agent(&self.server, cmd, &log, Duration::from_secs(60))
    }

    pub fn log(&self, run: u32) -> String {
        std::fs::read_to_string(self.tmp.path().join(format!("agent-{run}.log")))
            .unwrap_or_default()
    }

    /// A path for a test's own file in the lab's temporary directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Runs `capybara args` against the agent, whatever its outcome.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.cli)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .env_remove("CAPYBARA_TOKEN")
            .env_remove("CAPYBARA_ENDPOINT")
            .output()
            .expect("run capybara")
    }

    /// Runs `capybara args`, which must succeed; its output.
    pub fn capybara(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "capybara {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.capybara(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("capybara {args:?}: {e}: {out}"))
    }

    /// `user add NAME`, then the generated config on a new `wireguard-go` client in the client
    /// namespace: `wg setconf` with the wg-quick-only lines taken out, the addresses on the
    /// interface, a route to the server's tunnel address. Returns the client and its address.
    pub fn add_client(&self, user: &str) -> (WgProcess, IpAddr) {
        self.add_client_in(user, &self.client, None)
    }

    /// [`Lab::add_client`] in namespace `ns`, the config's `Endpoint` replaced by `endpoint` if
    /// given (a namespace with its own link to the server).
    pub fn add_client_in(
        &self,
        user: &str,
        ns: &NetNs,
        endpoint: Option<SocketAddr>,
    ) -> (WgProcess, IpAddr) {
        let cfg = self.json(&["user", "add", user, "--no-qr"]);
        let wg_quick = cfg["wg_quick"].as_str().expect("wg_quick");
        let v4: IpAddr = cfg["peer"]["ipv4"].as_str().unwrap().parse().unwrap();
        let server = self.server_v4.into();
        (
            WgProcess::from_wg_quick(ns, "hw", wg_quick, endpoint, server, v4),
            v4,
        )
    }

    pub fn sessions(&self, user: &str) -> Vec<Value> {
        self.json(&["history", "show", user])
            .as_array()
            .expect("sessions")
            .clone()
    }

    /// Waits until `user`'s newest session satisfies `f`.
    pub fn wait_session(&self, user: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + WAIT;
        loop {
            let s = self.sessions(user);
            if let Some(found) = s.iter().find(|s| f(s)) {
                return found.clone();
            }
            assert!(
                Instant::now() < end,
                "no session of {user} {what} after {WAIT:?}: {s:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
