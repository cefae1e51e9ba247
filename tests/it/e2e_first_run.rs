//! The first run, as a newcomer does it (issue 19): `cargo xtask run` (the xtask binary itself,
//! with its own flags for unique names: namespace, veth pair, data dir, bpffs, tunnel, control
//! socket), then `capybara user add alice` through the CLI xtask says to use, then the config
//! exactly as printed given to a stock `wireguard-go` client (the `wg-quick strip` of it for
//! `wg setconf`, then wg-quick's own steps: addresses, up, routes for `AllowedIPs`), and a ping
//! through the tunnel. Also `capybara geo block CN RU` with the country database setup installed
//! and no `--geoip-db` given by the test.
//!
//! The client's WireGuard socket is on the host (where xtask says a client reaches the uplink:
//! through the host side of its veth pair); its TUN interface is moved into a namespace of the
//! test's own, so the ping can only go through the tunnel. Everything is removed on drop, also
//! when the test fails: xtask is stopped with SIGTERM (it stops the agent and removes its
//! namespace and veth pair), and whatever is left is removed by name.

use std::{
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use capybara_tests::{
    agent_proc::agent_crate_binary,
    netns::{BpffsDir, NetNs, host, try_host, unique_name},
    wg::{ping_until, uapi_socket},
};
use nix::{sys::signal::Signal, unistd::Pid};

/// How long the agent may take to be ready (debug build; it compiles the country database).
const READY: Duration = Duration::from_secs(120);

/// `xtask run` in the background with unique names; stopped and cleaned up on drop.
struct XtaskRun {
    child: Child,
    netns: String,
    host_veth: String,
    log: PathBuf,
}

impl XtaskRun {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `needle` in the log; panics with the log if xtask exits or time runs out.
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("xtask run exited ({status}) before {needle:?}:\n{log}");
            }
            assert!(
                Instant::now() < end,
                "no {needle:?} within {within:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for XtaskRun {
    fn drop(&mut self) {
        // xtask forwards SIGTERM to the agent, waits for it and removes what it made.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Whatever is left (xtask killed): the agent in the namespace, the namespace, the veth.
        let pids = try_host(&["ip", "netns", "pids", &self.netns]);
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if Path::new("/sys/class/net").join(&self.host_veth).exists() {
            let _ = try_host(&["ip", "link", "del", &self.host_veth]);
        }
        if Path::new("/run/netns").join(&self.netns).exists() {
            let _ = try_host(&["ip", "netns", "del", &self.netns]);
        }
    }
}

/// A stock `wireguard-go` interface started on the host; killed and its socket removed on drop.
struct WireguardGo {
    ifname: String,
    child: Child,
}

impl WireguardGo {
    fn start(ifname: &str) -> Self {
        let mut child = Command::new("wireguard-go")
            .args(["-f", ifname])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start wireguard-go (is it installed?): {e}"));
        let socket = uapi_socket(ifname);
        let end = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("wireguard-go {ifname} exited ({status})");
            }
            assert!(Instant::now() < end, "no UAPI socket for {ifname}");
            std::thread::sleep(Duration::from_millis(20));
        }
        WireguardGo {
            ifname: ifname.to_owned(),
            child,
        }
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(uapi_socket(&self.ifname));
    }
}

/// The wg-quick config at the start of `user add`'s output (the QR code follows it after a
/// blank line once the `[Peer]` section has begun).
fn printed_config(stdout: &str) -> String {
    let start = stdout
        .find("[Interface]")
        .expect("no [Interface] in the output");
    let text = &stdout[start..];
    let peer = text.find("[Peer]").expect("no [Peer] in the output");
    let end = text[peer..]
        .find("\n\n")
        .map_or(text.len(), |i| peer + i + 1);
    text[..end].to_owned()
}

/// The values of `key = …` lines (comma-separated lists split).
fn values(config: &str, key: &str) -> Vec<String> {
    config
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .flat_map(|(_, v)| v.split(',').map(|v| v.trim().to_owned()))
        .collect()
}

fn run_cli(cli: &Path, socket: &Path, args: &[&str]) -> String {
    let out = Command::new(cli)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cli.display()));
    assert!(
        out.status.success(),
        "capybara {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn xtask_run_then_user_add_then_a_stock_client_pings_through_the_tunnel() {
    let geoip = Path::new("/var/cache/capybara/geoip/geo-whois-asn-country.mmdb");
    assert!(
        geoip.is_file(),
        "{} is missing: run `cargo xtask setup` (or `cargo xtask geoip`) first",
        geoip.display()
    );
    let agent = agent_crate_binary("capybara-agent");
    let built_cli = agent_crate_binary("capybara");
    let xtask = capybara_tests::agent_proc::xtask_binary();

    let pid = std::process::id();
    let dir = tempfile::tempdir().unwrap();
    let bpffs = BpffsDir::new();
    let socket = dir.path().join("agent.sock");
    let log = dir.path().join("xtask.log");
    let tunnel = unique_name("fr");
    let log_file = std::fs::File::create(&log).unwrap();
    let run = XtaskRun {
        child: Command::new(&xtask)
            .args(["run", "--no-setup", "--agent-bin"])
            .arg(&agent)
            .args(["--netns", &format!("ct{pid}-firstrun")])
            .args(["--host-veth", &format!("ct{pid}frh")])
            .args(["--uplink-veth", &format!("ct{pid}fru")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--bpffs")
            .arg(bpffs.path())
            .args(["--tunnel", &tunnel, "--"])
            .arg("--api-socket")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .env_remove("CARGO_MANIFEST_DIR")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", xtask.display())),
        netns: format!("ct{pid}-firstrun"),
        host_veth: format!("ct{pid}frh"),
        log,
    };
    let mut run = run;
    let log = run.wait_for("capybara-agent ready", READY);

    // The CLI xtask says to use, as it says to call it.
    let cli_line = log
        .lines()
        .find_map(|l| l.strip_prefix("run: the CLI is "))
        .unwrap_or_else(|| panic!("xtask did not say where the CLI is:\n{log}"));
    let cli = PathBuf::from(cli_line.split(';').next().unwrap());
    assert_eq!(cli, built_cli, "{log}");
    assert!(
        log.contains("user add alice") && log.contains("--socket"),
        "{log}"
    );
    // The endpoint xtask tells clients to use.
    let endpoint = log
        .split("WireGuard client uses Endpoint = ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("xtask did not print the endpoint:\n{log}"))
        .to_owned();

    let out = run_cli(&cli, &socket, &["user", "add", "alice"]);
    let config = printed_config(&out);
    assert!(
        config.contains(&format!("Endpoint = {endpoint}\n")),
        "the printed config's endpoint is not {endpoint}:\n{config}"
    );

    // wg-quick's steps with a stock client: strip, setconf, addresses, up, routes.
    let ifname = unique_name("frc");
    let conf_path = dir.path().join(format!("{ifname}.conf"));
    std::fs::write(&conf_path, &config).unwrap();
    let stripped = host(&["wg-quick", "strip", conf_path.to_str().unwrap()]);
    let stripped_path = dir.path().join("stripped.conf");
    std::fs::write(&stripped_path, stripped).unwrap();
    let client = NetNs::new("frc");
    let wg = WireguardGo::start(&ifname);
    host(&["wg", "setconf", &ifname, stripped_path.to_str().unwrap()]);
    host(&["ip", "link", "set", &ifname, "netns", client.name()]);
    for addr in values(&config, "Address") {
        client.exec(&["ip", "address", "add", &addr, "dev", &ifname]);
    }
    client.exec(&["ip", "link", "set", &ifname, "up"]);
    for net in values(&config, "AllowedIPs") {
        let family = if net.contains(':') { "-6" } else { "-4" };
        client.exec(&["ip", family, "route", "add", &net, "dev", &ifname]);
    }
    // The server's tunnel address: the default --tunnel-ipv4.
    let server: IpAddr = capybara_agent::daemon::DEFAULT_TUNNEL_IPV4
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        ping_until(&client, server, Duration::from_secs(15)),
        "no ping through the tunnel to {server}; xtask log:\n{}\nclient: {}",
        run.log(),
        host(&["wg", "show", "all"]),
    );
    let shown = run_cli(&cli, &socket, &["connections"]);
    assert!(shown.contains("alice"), "{shown}");

    // Geo with the database setup installed, which xtask handed to the agent.
    assert!(
        run.log().contains("country database opened"),
        "{}",
        run.log()
    );
    run_cli(&cli, &socket, &["geo", "block", "CN", "RU"]);
    let lists = run_cli(&cli, &socket, &["geo", "list"]);
    assert!(
        lists.contains("geo:CN") && lists.contains("geo:RU"),
        "{lists}"
    );

    drop(wg);
    drop(client);
    drop(run);
    // xtask removed its namespace and veth pair.
    let mut leftover = String::new();
    let _ = std::fs::File::open("/proc/net/dev").and_then(|mut f| f.read_to_string(&mut leftover));
    assert!(!leftover.contains(&format!("ct{pid}frh")), "{leftover}");
    assert!(
        !Path::new("/run/netns")
            .join(format!("ct{pid}-firstrun"))
            .exists()
    );
}
