//! `--audit-retention` in the real daemon: the `capybara-agent` binary, started on a store whose
//! audit records are older than its retention, prunes them at start, before it serves; records
//! younger than the retention, and everything that is not audit (the users themselves), stay.
//!
//! Three runs on one data directory and one set of pins: the first writes two records with the
//! default retention (365 days); the second, with the default again, still shows them (a restart
//! alone loses nothing) and writes a third; 3 s later the third starts with
//! `--audit-retention 2s`, and `capybara history audit` shows none of the three, then only the
//! record written after that start.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use capybara_tests::{
    agent_proc::{self, agent_crate_binary},
    netns::{BpffsDir, NetNs, unique_name},
};
use nix::sys::signal::Signal;

use crate::api_support::Cli;

struct Dirs<'a> {
    data: &'a Path,
    pins: &'a Path,
    socket: &'a Path,
}

fn start_agent(
    bin: &Path,
    ns: &NetNs,
    tunnel: &str,
    d: &Dirs<'_>,
    run: u32,
    retention: Option<&str>,
) -> u32 {
    let log = d.data.parent().unwrap().join(format!("agent-{run}.log"));
    let mut cmd = Command::new(bin);
    cmd.args(["--netns", ns.name(), "--tunnel", tunnel])
        .args([
            "--tunnel-ipv4",
            "10.84.0.1/24",
            "--tunnel-ipv6",
            "fd00:84::1/64",
        ])
        .args(["--listen-port", "51820"])
        .arg("--data-dir")
        .arg(d.data)
        .arg("--bpffs")
        .arg(d.pins)
        .arg("--api-socket")
        .arg(d.socket)
        .args(["--public-endpoint", "192.0.2.1:51820"]);
    if let Some(r) = retention {
        cmd.args(["--audit-retention", r]);
    }
    agent_proc::start_agent(ns, cmd, &log, Duration::from_secs(30))
}

/// Stops the agent cleanly (SIGTERM) and waits until it has exited.
fn stop_agent(ns: &NetNs, pid: u32) {
    ns.kill(pid, Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(30);
    while ns.is_running(pid) {
        assert!(Instant::now() < end, "the agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `capybara history audit` as (action, target) pairs, oldest first.
fn audit(cli: &Cli) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = cli
        .json(&["history", "audit"])
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.reverse();
    v
}

fn add(user: &str) -> (String, String) {
    ("user.add".to_owned(), format!("user:{user}"))
}

#[test]
fn a_restart_with_a_short_audit_retention_prunes_the_older_records_at_start() {
    let bin = agent_crate_binary("capybara-agent");
    let cli_bin = agent_crate_binary("capybara");
    let pins = BpffsDir::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let socket: PathBuf = tmp.path().join("run/agent.sock");
    let d = Dirs {
        data: &data,
        pins: pins.path(),
        socket: &socket,
    };
    let ns = NetNs::new("ar");
    let tunnel = unique_name("ar");
    let cli = Cli::socket(&cli_bin, &socket);

    let pid = start_agent(&bin, &ns, &tunnel, &d, 1, None);
    cli.ok(&["user", "add", "old-a"]);
    cli.ok(&["user", "add", "old-b"]);
    assert_eq!(audit(&cli), [add("old-a"), add("old-b")]);
    stop_agent(&ns, pid);

    let pid = start_agent(&bin, &ns, &tunnel, &d, 2, None);
    assert_eq!(
        audit(&cli),
        [add("old-a"), add("old-b")],
        "the default retention keeps them"
    );
    cli.ok(&["user", "add", "old-c"]);
    stop_agent(&ns, pid);

    // Every record is now more than 2 s old.
    std::thread::sleep(Duration::from_secs(3));
    let _pid = start_agent(&bin, &ns, &tunnel, &d, 3, Some("2s"));
    assert_eq!(audit(&cli), [], "pruned at start, before the agent served");
    cli.ok(&["user", "add", "new-d"]);
    assert_eq!(audit(&cli), [add("new-d")]);
    // Only the audit trail is pruned: the users stay.
    let users = cli.json(&["user", "list"]);
    let mut names: Vec<&str> = users
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|u| u["user"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new-d", "old-a", "old-b", "old-c"]);
}
