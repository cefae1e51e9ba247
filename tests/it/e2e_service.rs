//! The agent as a systemd service (issue 20), without systemd: the agent installed by
//! `cargo xtask install --prefix` into a temporary prefix, configured by its `agent.toml` (as
//! the unit's `ExecStart` does), started with only the capabilities of the installed unit's
//! `CapabilityBoundingSet` (`setpriv`) and a `$NOTIFY_SOCKET` bound by the test: the first
//! datagram is `READY=1`, and when it arrives the programs are attached and the control socket
//! answers, and a user is added; SIGTERM brings `STOPPING=1`. `diagnose_against_a_running_agent`
//! runs `capybara diagnose` in the agent's namespace.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use capybara_tests::{
    agent_proc::{agent_crate_binary, xtask_install},
    netns::{BpffsDir, NetNs, unique_name},
};
use nix::sys::signal::Signal;

use crate::api_support::Cli;

/// The installed unit's capability bounding set, as `setpriv --bounding-set` takes it.
fn unit_capabilities(unit: &str) -> String {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit has a CapabilityBoundingSet");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(caps.len() >= 2, "{line}");
    format!("-all,{}", caps.join(","))
}

fn recv(sock: &UnixDatagram, within: Duration, log: &Path) -> String {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no notification within {within:?} ({e}):\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

#[test]
fn ready_is_sent_once_attached_and_serving_with_only_the_units_capabilities() {
    let cli_bin = agent_crate_binary("capybara");
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    xtask_install(&prefix);
    let unit = std::fs::read_to_string(prefix.join("etc/systemd/system/capybara-agent.service"))
        .expect("installed unit");
    let caps = unit_capabilities(&unit);

    let pins = BpffsDir::new();
    let ns = NetNs::new("sv");
    let tunnel = unique_name("sv");
    let data = tmp.path().join("data");
    let socket = tmp.path().join("run/agent.sock");
    // The settings go into the installed agent.toml, as an admin would write them.
    let config = prefix.join("etc/capybara/agent.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\ntunnel = \"{tunnel}\"\ntunnel_ipv4 = \"10.86.0.1/24\"\n\
         tunnel_ipv6 = \"fd00:86::1/64\"\nlisten_port = 51820\ndata_dir = \"{}\"\n\
         bpffs = \"{}\"\napi_socket = \"{}\"\nwg_uapi_dir = \"{}\"\n\
         public_endpoint = \"192.0.2.1:51820\"\n",
        data.display(),
        pins.path().display(),
        socket.display(),
        tmp.path().display(),
    ));
    std::fs::write(&config, text).unwrap();

    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let log = tmp.path().join("agent.log");
    let out = std::fs::File::create(&log).unwrap();
    // nsenter (not the agent's --netns: setns(2) needs CAP_SYS_ADMIN, which the unit does not
    // give) enters the namespace, keeping the host's mounts (bpffs); setpriv then leaves only
    // the unit's capabilities.
    let child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg("setpriv")
        .arg(format!("--bounding-set={caps}"))
        .arg("--")
        .arg(prefix.join("bin/capybara-agent"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start the agent under setpriv");
    let pid = ns.adopt(child);

    let first = recv(&notify, Duration::from_secs(120), &log);
    assert_eq!(first.trim(), "READY=1", "the first notification");
    // Ready means ready: the programs are attached (their links pinned), the log says so, and
    // the control socket answers at once.
    let links: Vec<String> = std::fs::read_dir(pins.path().join("links"))
        .expect("pinned links")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        links.iter().any(|l| l.contains(&tunnel)),
        "no TC link pinned for {tunnel} at READY=1: {links:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("capybara-agent ready"), "{text}");
    let cli = Cli::socket(&cli_bin, &socket);
    let health = cli.ok(&["health"]);
    assert!(
        health.contains("SERVING") || health.to_lowercase().contains("serving"),
        "{health}"
    );
    // With only the unit's capabilities the agent does real work: a user is added.
    cli.ok(&["user", "add", "svc-alice"]);

    ns.kill(pid, Signal::SIGTERM);
    let stopping = recv(&notify, Duration::from_secs(30), &log);
    assert_eq!(stopping.trim(), "STOPPING=1");
    let end = Instant::now() + Duration::from_secs(60);
    while ns.is_running(pid) {
        assert!(Instant::now() < end, "the agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A check's (status, finding, hint) from `capybara diagnose --json`.
fn check<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {doc:#}"))
}

/// `capybara diagnose` against a running agent in a namespace set up as a server should be
/// (forwarding on, a masquerade rule for the tunnel subnet, an uplink with a default route):
/// every check that depends on the agent and the network is ok and it exits 0; then forwarding
/// is turned off and the masquerade rule removed, and the same run fails naming forwarding,
/// with its hint, and warns about NAT.
#[test]
fn diagnose_against_a_running_agent() {
    let agent_bin = agent_crate_binary("capybara-agent");
    let cli_bin = agent_crate_binary("capybara");
    let tmp = tempfile::tempdir().unwrap();
    let pins = BpffsDir::new();
    let ns = NetNs::new("dg");
    let tunnel = unique_name("dg");
    let socket = tmp.path().join("run/agent.sock");
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "netns = \"{}\"\ntunnel = \"{tunnel}\"\ntunnel_ipv4 = \"10.87.0.1/24\"\n\
             tunnel_ipv6 = \"fd00:87::1/64\"\nlisten_port = 51820\ndata_dir = \"{}\"\n\
             bpffs = \"{}\"\napi_socket = \"{}\"\npublic_endpoint = \"192.0.2.1:51820\"\n",
            ns.name(),
            tmp.path().join("data").display(),
            pins.path().display(),
            socket.display(),
        ),
    )
    .unwrap();
    // An uplink with a default route (one end of a veth pair), forwarding on, NAT for the subnet.
    ns.exec(&[
        "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
    ]);
    ns.exec(&["ip", "link", "set", "up1", "up"]);
    ns.exec(&["ip", "link", "set", "up0", "up"]);
    ns.exec(&["ip", "addr", "add", "198.51.100.2/24", "dev", "up0"]);
    ns.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "198.51.100.1",
        "dev",
        "up0",
    ]);
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    ns.exec(&["nft", "add", "table", "ip", "capy_nat"]);
    ns.exec(&[
        "nft",
        "add chain ip capy_nat post { type nat hook postrouting priority 100 ; }",
    ]);
    ns.exec(&[
        "nft",
        "add",
        "rule",
        "ip",
        "capy_nat",
        "post",
        "ip",
        "saddr",
        "10.87.0.0/24",
        "oifname",
        "up0",
        "masquerade",
    ]);

    let mut cmd = Command::new(&agent_bin);
    cmd.arg("--config").arg(&config);
    let _pid = capybara_tests::agent_proc::start_agent(
        &ns,
        cmd,
        &tmp.path().join("agent.log"),
        Duration::from_secs(60),
    );

    // In the agent's network namespace but the host's mount namespace (as the agent itself).
    let diagnose = || {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(&cli_bin)
            .arg("--socket")
            .arg(&socket)
            .args(["--json", "diagnose", "--config"])
            .arg(&config)
            .output()
            .expect("run capybara diagnose");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), doc)
    };
    let (code, doc) = diagnose();
    for name in [
        "agent",
        "programs",
        "store",
        "tunnel",
        "listen-port",
        "forwarding",
        "nat",
        "mtu",
        "bpf",
        "btf",
        "tun",
    ] {
        assert_eq!(check(&doc, name)["status"], "ok", "{name}: {doc:#}");
        assert!(check(&doc, name)["hint"].is_null(), "{name}: {doc:#}");
    }
    // The disk and the clock depend on this machine (free space, NTP): present, not asserted ok.
    check(&doc, "disk");
    check(&doc, "clock");
    assert!(
        check(&doc, "programs")["finding"]
            .as_str()
            .unwrap()
            .contains("attached"),
        "{doc:#}"
    );
    let failed: Vec<&serde_json::Value> = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .collect();
    assert_eq!(doc["ok"], failed.is_empty(), "{doc:#}");
    assert_eq!(code, Some(if failed.is_empty() { 0 } else { 1 }), "{doc:#}");

    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    ns.exec(&["nft", "delete", "table", "ip", "capy_nat"]);
    let (code, doc) = diagnose();
    let fwd = check(&doc, "forwarding");
    assert_eq!(fwd["status"], "fail", "{doc:#}");
    assert!(
        fwd["hint"]
            .as_str()
            .unwrap()
            .contains("net.ipv4.ip_forward=1"),
        "{doc:#}"
    );
    assert_eq!(check(&doc, "nat")["status"], "warn", "{doc:#}");
    assert_eq!(doc["ok"], false);
    assert_eq!(code, Some(1), "{doc:#}");
}
