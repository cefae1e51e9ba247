//! The webhook events' real sources end to end (issue 21), with the real `capybara-agent` in a
//! namespace (the `e2e_session_history` lab) and stock clients in another. The first test
//! delivers to a real receiver (the Python `standardwebhooks` one, `receivers::PyReceiver`, on
//! the agent namespace's loopback); the others read the agent's log, where `Core::notify` logs
//! every event's body at debug level (`capybara_agent::service::core`) as it hands it to the
//! outbox.
//!
//! - A webhook added with the CLI for `user-connect` and `user-disconnect`: a `wireguard-go`
//!   client's handshake reaches the receiver as `user-connect` within 1 s of the handshake (the
//!   issue's requirement; the payload's `timestamp` is the session's start) with the design's
//!   fields (`user`, `ip` = the client's public address as the agent saw it, `vpn_ip`,
//!   `protocol`, a stable `id` = the `webhook-id`, `data.device`, `data.session` = the id
//!   `capybara connections` shows), its signature verified by `standardwebhooks`; a kick
//!   reaches it as `user-disconnect` with reason `kicked` and the session's bytes.
//! - A quota of 300 KB exhausted by real UDP through the tunnel publishes `quota-warning` at 80
//!   and 90 % and then `quota-exceeded`, once each, in that order, with the kernel's figures.
//! - A flood of bad handshakes from the client's address publishes one `suspicious-activity`
//!   (`auth-failures`, the client's /24); a second flood within the window publishes none.
//! - The uplink set down and up again (`ip link`) publishes `server-down` then `server-up`
//!   for the `uplink` component (health checked every second: `--health-interval 1s`).
//! - New UDP flows of a device with `--flows 2`, refused by the kernel every second, publish
//!   one `suspicious-activity` (`flow-limit-storm`, with `--suspicious-flow-threshold 3`).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use capybara_tests::{
    auth_flood::flood,
    receivers::{PyReceiver, PyRecord, random_secret},
    traffic::send_udp,
    wg::{ping, ping_until},
};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::e2e_session_history::Lab;

const PORT: u16 = 51820;
const WAIT: Duration = Duration::from_secs(10);
const RUST_LOG: &str = "info,capybara_agent::service::core=debug";

/// A notification as the agent logged it: the log line's time (seconds of the day) and body.
#[derive(Debug, Clone)]
struct Logged {
    logged_at: f64,
    body: Value,
}

/// Seconds of the day of an RFC 3339 UTC time (`…THH:MM:SS.fffZ`).
fn secs_of_day(ts: &str) -> Option<f64> {
    let t = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut p = t.split(':');
    let (h, m, s) = (p.next()?, p.next()?, p.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Every notification of `event` in the log, in order.
fn logged(log: &str, event: &str) -> Vec<Logged> {
    log.lines()
        .filter(|l| l.contains(" notification ") && l.contains(&format!("event={event} ")))
        .filter_map(|l| {
            let json = &l[l.find("payload=")? + "payload=".len()..];
            let body = serde_json::Deserializer::from_str(json)
                .into_iter::<Value>()
                .next()?
                .ok()?;
            let logged_at = secs_of_day(l.split_whitespace().next()?)?;
            Some(Logged { logged_at, body })
        })
        .collect()
}

/// Waits until the log of run 1 holds at least `n` notifications of `event`.
fn wait_logged(lab: &Lab, event: &str, n: usize, within: Duration) -> Vec<Logged> {
    let end = Instant::now() + within;
    loop {
        let found = logged(&lab.log(1), event);
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < end,
            "{} of {n} {event} after {within:?}:\n{}",
            found.len(),
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Unix seconds of an RFC 3339 UTC time as the payloads write it (`YYYY-MM-DDTHH:MM:SS.fffZ`);
/// `None` for anything else (another offset, no `Z`, a malformed field).
fn unix_of_rfc3339_utc(ts: &str) -> Option<f64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [y, m, d] = d[..] else { return None };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || date.len() != 10 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + secs_of_day(&format!("T{time}"))?)
}

/// Waits until the receiver holds a verified request whose body's `event` is `event`.
fn wait_received(rx: &PyReceiver, event: &str, lab: &Lab) -> PyRecord {
    let end = Instant::now() + WAIT;
    loop {
        if let Some(r) = rx.records().into_iter().find(|r| r.body["event"] == event) {
            return r;
        }
        assert!(
            Instant::now() < end,
            "no {event} at the receiver after {WAIT:?}: {:#?}\n{}",
            rx.records(),
            lab.log(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The proof: a `wireguard-go` client's connect reaches a webhook receiver within 1 s
/// with the right fields, and a kick reaches it as `user-disconnect` (reason `kicked`). The
/// webhook is added with the CLI; the receiver is the Python `standardwebhooks` one on the
/// agent namespace's loopback (so `--allow-private`), which verifies every signature and
/// records the time each body arrived. The latency is from the session's start (the payload's
/// `timestamp`: the tunnel's handshake, to the millisecond) to that arrival; 1 s is the
/// issue's requirement, so it is asserted here. Measured (debug build, two shared cores, two
/// runs): 8.3 ms and 4.4 ms from the handshake to the receiver.
#[test]
fn a_wireguard_go_connect_and_a_kick_reach_a_webhook_receiver_within_a_second() {
    let lab = Lab::new(113, 115);
    let tmp = tempfile::tempdir().expect("temp dir");
    let secret = random_secret();
    let rx = PyReceiver::start_in(
        Some(lab.server.name()),
        &secret,
        0,
        tmp.path().join("rx.jsonl"),
    );
    let pid = lab.start_agent_logging(1, &[], RUST_LOG);
    let added = lab.capybara(&[
        "webhook",
        "add",
        &rx.url(),
        "--event",
        "user-connect",
        "--event",
        "user-disconnect",
        "--secret",
        &secret,
        "--allow-private",
    ]);
    assert!(added.contains("on user-connect,user-disconnect"), "{added}");
    let (_wg, client_v4) = lab.add_client("alice");
    let server = IpAddr::V4(lab.server_v4);
    assert!(
        ping_until(&lab.client, server, WAIT),
        "no ping through the tunnel\n{}",
        lab.log(1)
    );
    let c = wait_received(&rx, "user-connect", &lab);
    assert!(c.verified, "standardwebhooks verified it: {c:?}");
    let b = &c.body;
    let id = b["id"].as_str().expect("an id");
    assert!(id.starts_with("msg_"), "{b}");
    assert_eq!(
        c.webhook_id.as_deref(),
        Some(id),
        "the id is the webhook-id"
    );
    let ts = b["timestamp"].as_str().expect("a timestamp");
    let started = unix_of_rfc3339_utc(ts).unwrap_or_else(|| panic!("not RFC 3339 UTC: {ts}"));
    assert_eq!(b["user"], "alice");
    assert_eq!(
        b["ip"],
        lab.veth.b.v4.to_string(),
        "the client's public address as the agent saw it"
    );
    assert_eq!(b["vpn_ip"], client_v4.to_string());
    assert_eq!(b["protocol"], "wireguard");
    assert_eq!(b["data"]["device"], "default");
    let conns = lab.json(&["connections"]);
    assert_eq!(
        b["data"]["session"], conns[0]["id"],
        "the session is the connection's id: {conns}"
    );
    let latency = c.received_at - started;
    eprintln!(
        "user-connect received {:.1} ms after the handshake",
        latency * 1000.0
    );
    assert!(
        (0.0..1.0).contains(&latency),
        "the connect reached the receiver {latency:.3} s after the handshake ({ts}, received at \
         {:.3})",
        c.received_at
    );

    let kicked = lab.capybara(&["kick", "alice"]);
    assert!(kicked.contains("kicked alice"), "{kicked}");
    assert!(!ping(&lab.client, server), "a ping passed after the kick");
    let d = wait_received(&rx, "user-disconnect", &lab);
    assert!(d.verified, "{d:?}");
    let b = &d.body;
    assert_eq!(b["user"], "alice");
    assert_eq!(b["data"]["reason"], "kicked");
    assert_eq!(b["data"]["session"], c.body["data"]["session"]);
    assert!(
        b["data"]["bytes_in"].as_u64().unwrap() > 0,
        "the pings' bytes: {b}"
    );
    assert_eq!(b["vpn_ip"], client_v4.to_string());
    assert_eq!(b["ip"], lab.veth.b.v4.to_string());
    assert_eq!(b["protocol"], "wireguard");
    assert_ne!(b["id"], c.body["id"], "another event, another id");
    assert_eq!(d.webhook_id.as_deref(), b["id"].as_str());
    // Each event once: no retry (the receiver answered 204 at once), nothing else subscribed.
    let all = rx.records();
    let events: Vec<&Value> = all.iter().map(|r| &r.body["event"]).collect();
    assert_eq!(events, ["user-connect", "user-disconnect"], "{all:#?}");
    lab.server.kill(pid, Signal::SIGTERM);
}

#[test]
fn a_quota_spent_by_real_traffic_publishes_two_warnings_then_exceeded() {
    let lab = Lab::new(117, 119);
    let pid = lab.start_agent_logging(1, &[], RUST_LOG);
    let (_wg, client_v4) = lab.add_client("bob");
    let server = IpAddr::V4(lab.server_v4);
    assert!(ping_until(&lab.client, server, WAIT), "{}", lab.log(1));
    lab.capybara(&["quota", "set", "bob", "--limit", "300KB"]);
    // 600 KB of UDP from bob to a closed port of the server: the kernel charges it on the
    // tunnel device before anything answers.
    send_udp(
        &lab.client,
        Some(client_v4),
        SocketAddr::new(server, 9),
        600,
        1000,
    );
    let exceeded = wait_logged(&lab, "quota-exceeded", 1, WAIT);
    let warnings = logged(&lab.log(1), "quota-warning");
    let percents: Vec<u64> = warnings
        .iter()
        .map(|w| w.body["data"]["percent"].as_u64().unwrap())
        .collect();
    assert_eq!(percents, [80, 90], "{warnings:?}");
    assert_eq!(exceeded.len(), 1, "{exceeded:?}");
    assert!(
        warnings[1].logged_at <= exceeded[0].logged_at,
        "the warnings come first"
    );
    let e = &exceeded[0].body;
    assert_eq!(e["user"], "bob");
    assert_eq!(e["vpn_ip"], client_v4.to_string());
    assert_eq!(e["ip"], lab.veth.b.v4.to_string());
    assert_eq!(e["data"]["percent"], 100);
    // The kernel's budget: 300 KB plus the default grace, if any.
    let limit = e["data"]["limit"].as_u64().unwrap();
    assert!((300_000..=330_000).contains(&limit), "{e}");
    assert!(e["data"]["used"].as_u64().unwrap() >= limit, "{e}");
    assert_eq!(e["data"]["period"], "monthly");
    assert!(e["data"]["kernel_time_ns"].as_u64().unwrap() > 0);
    let latency = exceeded[0].logged_at - secs_of_day(e["timestamp"].as_str().unwrap()).unwrap();
    eprintln!(
        "quota-exceeded handed to the outbox {:.2} ms after the kernel's packet",
        latency * 1000.0
    );
    lab.server.kill(pid, Signal::SIGTERM);
}

/// The failed handshakes of `prefix` the agent has recorded so far (its auth records' counts).
fn failures_recorded(lab: &Lab, prefix: &str) -> u64 {
    let page = lab.json(&["history", "search", "--ip", prefix]);
    page["auth_attempts"]
        .as_array()
        .map_or(0, |a| a.iter().filter_map(|r| r["count"].as_u64()).sum())
}

/// Slow by design, about 45 s: the tunnel reports a prefix's first failure at once and the
/// rest at its next 10 s flush that is at least 10 s after the prefix's previous report
/// (`tunnel::auth_table`), and the test waits for two such reports.
#[test]
fn a_bad_handshake_flood_publishes_one_suspicious_activity_per_window() {
    let lab = Lab::new(121, 123);
    let pid = lab.start_agent_logging(1, &[], RUST_LOG);
    let source = lab.veth.b.v4;
    let prefix = format!("{}.0/24", source.to_string().rsplit_once('.').unwrap().0);
    let flood_once = || {
        // Handshake initiations with random MACs (a wrong key) from the client's address.
        let f = flood(
            &lab.client,
            &[source],
            lab.veth.a.v4,
            PORT,
            1000,
            Duration::from_secs(1),
        )
        .expect("flood");
        assert!(f.sent > 100, "{f:?}");
        f.sent
    };
    let first = flood_once();
    let s = wait_logged(&lab, "suspicious-activity", 1, Duration::from_secs(25));
    let b = &s[0].body;
    assert_eq!(b["data"]["kind"], "auth-failures");
    assert_eq!(b["data"]["prefix"], prefix);
    assert_eq!(b["ip"], source.to_string());
    assert_eq!(b["data"]["reason"], "bad-mac");
    assert!(b["data"]["count"].as_u64().unwrap() >= 20, "{b}");
    assert_eq!(b["data"]["window_s"], 60);
    // The same source again within the window: counted and recorded, not reported again.
    let second = flood_once();
    let end = Instant::now() + Duration::from_secs(25);
    while failures_recorded(&lab, &prefix) < (first + second) * 9 / 10 {
        assert!(
            Instant::now() < end,
            "the second flood was not recorded: {} of {}",
            failures_recorded(&lab, &prefix),
            first + second
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The alerts thread has seen the report the recorder wrote (the same tunnel event).
    std::thread::sleep(Duration::from_millis(500));
    let s = logged(&lab.log(1), "suspicious-activity");
    assert_eq!(s.len(), 1, "{s:?}");
    lab.server.kill(pid, Signal::SIGTERM);
}

#[test]
fn refused_flows_every_second_make_one_flow_limit_storm() {
    let lab = Lab::new(125, 127);
    // A storm: refusals in 3 seconds of a minute (the kernel reports one per device per second).
    let pid = lab.start_agent_logging(1, &["--suspicious-flow-threshold", "3"], RUST_LOG);
    let (_wg, client_v4) = lab.add_client("carol");
    let server = IpAddr::V4(lab.server_v4);
    assert!(ping_until(&lab.client, server, WAIT), "{}", lab.log(1));
    lab.capybara(&["quota", "set", "carol", "--flows", "2"]);
    // A new UDP flow (port) every 100 ms for 5 s: all but the first two are refused.
    for port in 0..50u16 {
        send_udp(
            &lab.client,
            Some(client_v4),
            SocketAddr::new(server, 2000 + port),
            1,
            100,
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = wait_logged(&lab, "suspicious-activity", 1, WAIT);
    assert_eq!(s.len(), 1, "one per device per window: {s:?}");
    let b = &s[0].body;
    assert_eq!(b["data"]["kind"], "flow-limit-storm");
    assert_eq!(b["user"], "carol");
    assert_eq!(b["vpn_ip"], client_v4.to_string());
    assert_eq!(b["data"]["source"], "carol/default");
    assert_eq!(b["data"]["limit"], 2);
    assert!(b["data"]["count"].as_u64().unwrap() >= 3, "{b}");
    lab.server.kill(pid, Signal::SIGTERM);
}

#[test]
fn the_uplink_going_down_and_up_publishes_server_down_then_server_up() {
    let lab = Lab::new(129, 131);
    let pid = lab.start_agent_logging(1, &["--health-interval", "1s"], RUST_LOG);
    // A healthy start reports nothing (the devices are looked up in the agent's namespace).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        logged(&lab.log(1), "server-down").len(),
        0,
        "{}",
        lab.log(1)
    );
    let uplink = lab.veth.a.ifname.clone();
    lab.server.exec(&["ip", "link", "set", &uplink, "down"]);
    let down = wait_logged(&lab, "server-down", 1, WAIT);
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0].body["data"]["component"], "uplink");
    assert_eq!(
        down[0].body["data"]["detail"],
        format!("{uplink} is down (administratively)")
    );
    lab.server.exec(&["ip", "link", "set", &uplink, "up"]);
    let up = wait_logged(&lab, "server-up", 1, WAIT);
    assert_eq!(up[0].body["data"]["component"], "uplink");
    assert!(up[0].body["data"]["down_since"].is_string(), "{:?}", up[0]);
    assert_eq!(logged(&lab.log(1), "server-down").len(), 1);
    lab.server.kill(pid, Signal::SIGTERM);
}
