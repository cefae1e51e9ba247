//! The reputation engine end to end (issue 22): the real `capybara-agent` in a namespace with
//! its XDP guard on the uplink (the `e2e_session_history` lab), `--reputation` on with a 4 s
//! TTL, a real webhook receiver (the Python `standardwebhooks` one on the agent namespace's
//! loopback), and handshake initiations with bad MACs sent from the client namespace through a
//! raw socket (`auth_flood::send_bad_initiations`).
//!
//! 20 bad handshakes from the client's address: the source lands in the `auto` source list and
//! the XDP guard drops its next datagrams (probes sent every 5 ms after the 20th are counted as
//! the list's hits) within 1 s of the 20th; exactly one `suspicious-activity` event reaches the
//! receiver (`data.kind` `auto-block`; the prefix detector of `service::alerts` is set out of
//! reach with `--suspicious-auth-threshold 100000`: the bystander's 19 failures are in the same
//! /24, and 39 failures of one /24 are rightly a prefix event of their own);
//! `ip-intel score` explains the block. 19 from another address of the client namespace block
//! nothing. When the TTL expires the source leaves `auto` and a `wireguard-go` client from that
//! very address completes a handshake and pings the server through the tunnel.
//!
//! Measured (debug build, two shared cores at load average ~7, two runs): the first dropped
//! probe was seen 142 ms and 93 ms after the 20th bad handshake (the CLI's polling of the list's
//! hits included: an upper bound); the block ended 4.2 s after it (TTL 4 s). The 1 s bound is
//! the requirement, so it is asserted.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use capybara_tests::{
    auth_flood::send_bad_initiations,
    receivers::{PyReceiver, random_secret},
    wg::{ping, ping_until},
};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::e2e_session_history::Lab;

const PORT: u16 = 51820;
const WAIT: Duration = Duration::from_secs(10);

/// The `auto` source list's hit packets and entries.
fn auto_list(lab: &Lab) -> (u64, Vec<String>) {
    let lists = lab.json(&["blocklist", "list"]);
    lists
        .as_array()
        .expect("lists")
        .iter()
        .find(|l| l["name"] == "auto" && l["direction"] == "source")
        .map_or((0, Vec::new()), |l| {
            (
                l["hits"]["packets"].as_u64().unwrap_or(0),
                l["cidrs"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .filter_map(|c| c.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            )
        })
}

fn suspicious(rx: &PyReceiver) -> Vec<Value> {
    rx.records()
        .into_iter()
        .filter(|r| r.body["event"] == "suspicious-activity")
        .map(|r| {
            assert!(r.verified, "{r:?}");
            r.body
        })
        .collect()
}

/// Slow by design, about 10 s: the block must outlive a few probes and then expire (4 s TTL).
#[test]
fn twenty_bad_handshakes_block_the_source_within_a_second_until_the_ttl_expires() {
    let lab = Lab::new(151, 153);
    let tmp = tempfile::tempdir().expect("temp dir");
    let secret = random_secret();
    let rx = PyReceiver::start_in(
        Some(lab.server.name()),
        &secret,
        0,
        tmp.path().join("rx.jsonl"),
    );
    let pid = lab.start_agent_logging(
        1,
        &[
            "--reputation",
            "--reputation-ttl",
            "4s",
            "--suspicious-auth-threshold",
            "100000",
        ],
        "info",
    );
    lab.capybara(&[
        "webhook",
        "add",
        &rx.url(),
        "--event",
        "suspicious-activity",
        "--secret",
        &secret,
        "--allow-private",
    ]);
    let source = lab.veth.b.v4;
    let bystander = Ipv4Addr::from(u32::from(source) + 10);
    lab.client
        .add_addr(&lab.veth.b.ifname, &format!("{bystander}/24"));
    let server = lab.veth.a.v4;

    // 19 from the bystander, 20 from the source.
    send_bad_initiations(&lab.client, bystander, server, PORT, 19).expect("bystander");
    let twentieth =
        send_bad_initiations(&lab.client, source, server, PORT, 20).expect("20 bad handshakes");
    // Probes from the source every 5 ms until the guard drops one.
    let dropped_after = loop {
        send_bad_initiations(&lab.client, source, server, PORT, 1).expect("probe");
        let (hits, entries) = auto_list(&lab);
        if hits > 0 {
            assert_eq!(entries, vec![format!("{source}/32")]);
            break twentieth.elapsed();
        }
        assert!(
            twentieth.elapsed() < WAIT,
            "the source was not dropped by the guard: {entries:?}\n{}",
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "the source was dropped by the XDP guard {:.1} ms after its 20th bad handshake",
        dropped_after.as_secs_f64() * 1000.0
    );
    assert!(
        dropped_after < Duration::from_secs(1),
        "dropped {dropped_after:?} after the 20th"
    );

    // One event, the block's.
    let end = Instant::now() + WAIT;
    while suspicious(&rx).is_empty() {
        assert!(Instant::now() < end, "no event:\n{}", lab.log(1));
        std::thread::sleep(Duration::from_millis(20));
    }
    let score = lab.json(&["ip-intel", "score", &source.to_string()]);
    assert_eq!(score["ip"], source.to_string());
    assert_eq!(score["blocked"]["parts"]["bad-mac"]["count"], 20, "{score}");
    let other = lab.json(&["ip-intel", "score", &bystander.to_string()]);
    assert_eq!(other["score"], 19.0, "{other}");
    assert!(other["blocked"].is_null(), "the bystander is not blocked");
    let out = lab.capybara(&["ip-intel", "score", &source.to_string()]);
    assert!(out.contains("auto-blocked since"), "{out}");

    // The TTL: the source leaves `auto` on its own; a valid client from it then connects.
    let (_wg, _v4) = lab.add_client("alice");
    let tunnel_server = IpAddr::V4(lab.server_v4);
    assert!(
        !ping(&lab.client, tunnel_server),
        "a handshake passed while the source was blocked"
    );
    let end = Instant::now() + WAIT;
    while !auto_list(&lab).1.is_empty() {
        assert!(
            Instant::now() < end,
            "the block did not expire\n{}",
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let expired_after = twentieth.elapsed();
    assert!(
        ping_until(&lab.client, tunnel_server, WAIT),
        "the client from the unblocked source does not connect\n{}",
        lab.log(1)
    );
    eprintln!(
        "the block expired {:.1} s after the 20th bad handshake (TTL 4 s)",
        expired_after.as_secs_f64()
    );
    assert!(expired_after >= Duration::from_secs(4));
    let events = suspicious(&rx);
    assert_eq!(
        events.len(),
        1,
        "exactly one suspicious-activity: {events:#?}"
    );
    let b = &events[0];
    assert_eq!(b["ip"], source.to_string());
    assert_eq!(b["data"]["kind"], "auto-block");
    assert_eq!(b["data"]["score"], 20.0);
    assert_eq!(b["data"]["threshold"], 20.0);
    assert_eq!(b["data"]["ttl_s"], 4);
    assert_eq!(b["data"]["parts"]["bad-mac"]["count"], 20);
    lab.server.kill(pid, Signal::SIGTERM);
}
