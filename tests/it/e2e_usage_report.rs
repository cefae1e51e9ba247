//! Usage rollups and the report end to end: the real `capybara-agent` in a namespace, a stock
//! `wireguard-go` client in another (the session history's `Lab`), driven by the `capybara` CLI.
//!
//! The client sends a known number of UDP datagrams through the tunnel (and the server sends
//! some back); `capybara report generate --format json` then shows for alice exactly the
//! bytes and packets each way that the kernel's counters (`capybara stats`) hold: the device
//! was added after the agent's usage writer started, so its rollups count from zero, and the
//! report makes the writer sample first. Then more traffic, never checkpointed, and a SIGKILL
//! of the agent: after the restart the report still equals the pinned counters to the byte (the
//! writer continues from its checkpoint and adds the counters since). The html report is
//! written with `--output` and names alice. Bounded: no wait longer than 10 s, two agent starts.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use capybara_tests::traffic::{UdpSink, send_udp};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::e2e_session_history::Lab;

const WAIT: Duration = Duration::from_secs(10);

fn counters(lab: &Lab) -> [u64; 4] {
    let s = lab.json(&["stats", "alice"]);
    let p = &s["peers"][0]["stats"];
    [
        p["rx"]["bytes"].as_u64().unwrap(),
        p["rx"]["packets"].as_u64().unwrap(),
        p["tx"]["bytes"].as_u64().unwrap(),
        p["tx"]["packets"].as_u64().unwrap(),
    ]
}

fn reported(lab: &Lab) -> (Value, [u64; 4]) {
    let r = lab.json(&["report", "generate", "--period", "day"]);
    let alice = r["users"]
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["user"] == "alice")
        .unwrap_or_else(|| panic!("alice is not in the report: {r:#}"))
        .clone();
    let u = &alice["usage"];
    let got = [
        u["rx_bytes"].as_u64().unwrap(),
        u["rx_packets"].as_u64().unwrap(),
        u["tx_bytes"].as_u64().unwrap(),
        u["tx_packets"].as_u64().unwrap(),
    ];
    (alice, got)
}

/// `n` datagrams of `size` bytes from the client to the server and `back` from the server.
fn traffic(lab: &Lab, client: IpAddr, n: u64, back: u64, size: usize) {
    let server = IpAddr::V4(lab.server_v4);
    let sink = UdpSink::start(&lab.server, SocketAddr::new(server, 0));
    send_udp(&lab.client, Some(client), sink.addr(), n, size);
    assert_eq!(sink.wait_for(n, WAIT), n, "datagrams lost in the tunnel");
    let sink = UdpSink::start(&lab.client, SocketAddr::new(client, 0));
    send_udp(&lab.server, Some(server), sink.addr(), back, size);
    assert_eq!(
        sink.wait_for(back, WAIT),
        back,
        "datagrams lost to the client"
    );
}

#[test]
fn report_equals_the_kernel_counters_across_a_sigkill() {
    let lab = Lab::new(147, 149);
    let pid = lab.start_agent(1, &[]);
    let (_wg, client) = lab.add_client("alice");
    assert!(
        capybara_tests::wg::ping_until(&lab.client, IpAddr::V4(lab.server_v4), WAIT),
        "no ping through the tunnel\n{}",
        lab.log(1)
    );
    let (n, back, size) = (300u64, 120u64, 1000usize);
    traffic(&lab, client, n, back, size);
    let (alice, got) = reported(&lab);
    let kernel = counters(&lab);
    eprintln!("report {got:?}, kernel {kernel:?}");
    assert_eq!(
        got, kernel,
        "the report's bytes and packets are the kernel's"
    );
    assert!(
        got[0] >= n * (size as u64 + 28) && got[2] >= back * (size as u64 + 28),
        "the datagrams sent are in it: {got:?}"
    );
    assert!(
        alice["usage"]["sessions"].as_u64().unwrap() >= 1,
        "{alice:#}"
    );
    assert!(alice["usage"]["online_seconds"].as_u64().is_some());

    // More traffic that no checkpoint saw, then the agent is killed.
    traffic(&lab, client, 200, 50, size);
    let before_kill = counters(&lab);
    lab.server.kill(pid, Signal::SIGKILL);
    let pid = lab.start_agent(2, &[]);
    let (_, got) = reported(&lab);
    let kernel = counters(&lab);
    eprintln!(
        "after the restart: report {got:?}, kernel {kernel:?}, before the kill {before_kill:?}"
    );
    assert_eq!(kernel, before_kill, "pinned counters survive");
    assert_eq!(
        got, kernel,
        "no byte lost or counted twice across the SIGKILL"
    );

    // The html report, written to a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.html");
    let said = lab.capybara(&[
        "report",
        "generate",
        "--format",
        "html",
        "--period",
        "week",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(said.starts_with("report written to "), "{said}");
    let html = std::fs::read_to_string(&file).unwrap();
    assert!(
        html.starts_with("<!DOCTYPE html>") && html.contains(">alice</th>"),
        "{html}"
    );
    lab.server.kill(pid, Signal::SIGTERM);
}
