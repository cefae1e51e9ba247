//! Shadowsocks and VLESS through the real agent (issue 24), in the lab of
//! [`capybara_tests::proxied`]: the agent with both endpoints, alice's real clients (`ss-local`,
//! `v2ray`, `wireguard-go`) started with the configs it printed, origins on both sides.
//!
//! - **Printed configs, kick, hold.** Each client fetches a 2 MiB file byte for byte and gets a
//!   UDP datagram echoed (SOCKS5 UDP ASSOCIATE: Shadowsocks's UDP relay, VLESS UDP); then
//!   with an endless download open through each, `kick alice` ends both within 1 s (the
//!   endpoints abort the connections: a reset, which the client relays as the end), the
//!   sessions are recorded with their protocol, reason `kicked` and at least the file's bytes
//!   sent; new connections are admitted again; then `user expire alice` (a policy hold) ends
//!   both within 1 s and refuses new ones (recorded as `held` auth attempts) until `user
//!   renew`; then, with no connection open, a kick of the idle sessions ends them as `kicked`
//!   at once; and an expiry 3 s ahead (a hold the kernel applies at its deadline) ends open
//!   downloads within 1.5 s of the deadline (the policy's tick cuts them).
//! - **One quota.** A 10 MB quota on alice, spent by three endless downloads at once (through
//!   the tunnel, Shadowsocks and VLESS): all three stop, and what was charged and what arrived
//!   stay within the kernel's bound (one 64 KiB super-packet per CPU past the budget).
//! - **One rate.** A 20 Mbit/s limit on alice: a download through each protocol in turn keeps
//!   goodput within 0.95–1.00 of the rate (the rate is of IP bytes; TCP's headers make an exact
//!   rate show as about 0.965 of payload), and the live view (`stats --watch`) shows it on the
//!   protocol's row of alice (a proxy identity's row is named by its protocol).
//!
//! - **Reputation.** Five connections with a wrong key to the Shadowsocks endpoint score their
//!   source (`proxy-auth`) up to the threshold: the source is auto-blocked, and the XDP guard
//!   keeps it from both endpoints.
//! - **Lists.** The clients' address in a source list: the XDP guard drops what it sends to
//!   either endpoint (their TCP ports are guarded as WireGuard's UDP port is); the origin in a
//!   destination list: no proxied connection or datagram reaches it. Both undone, traffic flows
//!   again. Every check is made for TCP and UDP.
//!
//! Each test starts its own lab and agent (about 2 s) and bounds every wait; the rate test
//! runs three 4.5 s downloads, the slowest part of the file.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use capybara_tests::origin;
use serde_json::Value;

use capybara_tests::{
    lab::Lab,
    proxied::{FILE_LEN, Proxied, SS_PORT, quota_bound, spend_quota},
};

/// How long a datagram through a proxy may take to come back (the client resends every 500 ms).
const ECHO_WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to see that no datagram comes back.
const NO_ECHO_WAIT: Duration = Duration::from_secs(2);

/// Waits (≤ 10 s) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Endless downloads through both proxies, each flowing (≥ 256 KiB read) before it returns.
fn open_downloads(
    p: &Proxied,
) -> Vec<(
    &'static str,
    Arc<AtomicU64>,
    std::thread::JoinHandle<Instant>,
)> {
    let mut open = Vec::new();
    for (protocol, _) in p.socks {
        let s = p.through(protocol).expect("connect through the proxy");
        let count = Arc::new(AtomicU64::new(0));
        let h = Proxied::download(s, &count);
        wait_until(&format!("{protocol}: the download flows"), || {
            count.load(Ordering::Relaxed) >= 256 * 1024
        });
        open.push((protocol, count, h));
    }
    open
}

/// Runs `capybara args` and asserts every download of `open` ended within 1 s of its start.
fn ends_all_within_1s(
    p: &Proxied,
    args: &[&str],
    open: Vec<(
        &'static str,
        Arc<AtomicU64>,
        std::thread::JoinHandle<Instant>,
    )>,
) {
    let t0 = Instant::now();
    p.lab.capybara(args);
    for (protocol, count, h) in open {
        let deadline = t0 + Duration::from_secs(5);
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            h.is_finished(),
            "{protocol}: the download still runs 5 s after `capybara {args:?}` ({} bytes)",
            count.load(Ordering::Relaxed)
        );
        let ended = h.join().unwrap().saturating_duration_since(t0);
        eprintln!("{protocol}: ended {ended:?} after `capybara {args:?}` began");
        assert!(
            ended <= Duration::from_secs(1),
            "{protocol}: ended {ended:?} after `capybara {args:?}` began (CLI start-up \
             included), not within 1 s"
        );
    }
}

#[test]
fn printed_configs_fetch_byte_for_byte_and_kick_and_a_hold_cut_each_protocol_within_1s() {
    let p = Proxied::start(Lab::new(211, 213));

    // The printed configs work: the file, byte for byte, through each.
    for (protocol, _) in p.socks {
        let mut s = p.through(protocol).expect("connect through the proxy");
        let got = origin::fetch_file(&mut s, FILE_LEN, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{protocol}: fetching the file: {e}"));
        assert!(got == *p.file, "{protocol}: the file arrived altered");
        // And UDP: SOCKS5 UDP ASSOCIATE through the printed configs, relayed by the endpoint.
        assert!(p.echoes(protocol, ECHO_WAIT), "{protocol}: no UDP echo");
    }

    // A kick ends both at once; the sessions are recorded as kicked, with the bytes sent.
    let open = open_downloads(&p);
    ends_all_within_1s(&p, &["kick", "alice"], open);
    for (protocol, _) in p.socks {
        let mut sessions = Vec::new();
        wait_until(&format!("{protocol}: a kicked session"), || {
            sessions = p.sessions(protocol);
            sessions.iter().any(|s| s["reason"] == "kicked")
        });
        let s = sessions.iter().find(|s| s["reason"] == "kicked").unwrap();
        assert_eq!(s["device"], protocol, "{s:#}");
        let tx = s["traffic"]["tx"]["bytes"].as_u64().unwrap_or(0);
        assert!(
            tx >= (FILE_LEN + 256 * 1024) as u64,
            "{protocol}: the session's tx {tx} < the file and the stream it carried: {s:#}"
        );
    }

    // New connections are admitted after a kick; a hold (the account expired) ends them
    // within 1 s and refuses new ones until the user is renewed.
    let open = open_downloads(&p);
    ends_all_within_1s(&p, &["user", "expire", "alice", "--at", "2020-01-01"], open);
    for (protocol, _) in p.socks {
        // The clients answer SOCKS themselves; the endpoint refuses the user behind them.
        assert!(
            !p.carries(protocol),
            "{protocol}: a held user's connection carried data"
        );
        assert!(
            !p.echoes(protocol, NO_ECHO_WAIT),
            "{protocol}: a held user's datagram was relayed"
        );
    }
    // Recorded as auth attempts of the client's address, reason `held`, protocol each.
    let ip = p.lab.veth.b.v4.to_string();
    wait_until("held auth attempts of both protocols", || {
        let found = p.lab.json(&["history", "search", "--ip", &ip]);
        let held: Vec<&Value> = found["auth_attempts"]
            .as_array()
            .map(|a| a.iter().filter(|a| a["reason"] == "held").collect())
            .unwrap_or_default();
        p.socks
            .iter()
            .all(|(protocol, _)| held.iter().any(|a| a["protocol"] == *protocol))
    });
    p.lab.capybara(&["user", "renew", "alice"]);
    for (protocol, _) in p.socks {
        let mut s = p.through(protocol).expect("connect through the proxy");
        let got = origin::fetch_file(&mut s, FILE_LEN, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{protocol} after the renewal: {e}"));
        assert!(got == *p.file, "{protocol}: the file arrived altered");
    }
    // Those connections closed: once none is listed, the sessions are idle (open, within their
    // idle time). A kick ends them now, as kicked, not a minute later as idle.
    wait_until("no proxied connection open", || {
        let open = p.lab.json(&["connections"]);
        open.as_array()
            .is_none_or(|rows| rows.iter().all(|r| r["protocol"] == "wireguard"))
    });
    let kicked = |protocol| {
        p.sessions(protocol)
            .iter()
            .filter(|s| s["reason"] == "kicked")
            .count()
    };
    let before: Vec<usize> = p
        .socks
        .iter()
        .map(|(protocol, _)| kicked(protocol))
        .collect();
    p.lab.capybara(&["kick", "alice"]);
    for ((protocol, _), before) in p.socks.iter().zip(before) {
        wait_until(
            &format!("{protocol}: the idle session ended as kicked"),
            || kicked(protocol) > before,
        );
        assert!(
            p.echoes(protocol, ECHO_WAIT),
            "{protocol}: no UDP echo after the kick"
        );
    }

    // A hold the kernel applies by itself at a deadline (an expiry 3 s ahead): from the deadline
    // the kernel drops the user's packets, and the endpoints cut the connections when the
    // policy's tick (every second) writes the hold.
    let open = open_downloads(&p);
    let (t0, wall0) = (Instant::now(), SystemTime::now());
    let set = p.lab.json(&["user", "expire", "alice", "--in", "3s"]);
    let deadline = UNIX_EPOCH + Duration::from_secs(set["user"]["expires_at"].as_u64().unwrap());
    for (protocol, _, h) in open {
        wait_until(&format!("{protocol}: the download ended"), || {
            h.is_finished()
        });
        let ended = wall0 + h.join().unwrap().saturating_duration_since(t0);
        let after = ended.duration_since(deadline);
        eprintln!("{protocol}: ended {after:?} after the deadline");
        let after = after
            .unwrap_or_else(|e| panic!("{protocol}: ended {:?} before the deadline", e.duration()));
        assert!(
            after <= Duration::from_millis(1_500),
            "{protocol}: ended {after:?} after the deadline, not within the policy's tick"
        );
    }
}

#[test]
fn a_10mb_quota_shared_by_wireguard_shadowsocks_and_vless_stops_all_three_within_the_bound() {
    let p = Proxied::start(Lab::new(215, 217));
    let spent = spend_quota(&p, "10MB");
    let bound = quota_bound(spent.cutoff);
    let ctx = format!("{spent:?}, bound {bound}");
    eprintln!("{ctx}");
    assert!(spent.cutoff >= 10_000_000, "{ctx}");
    assert!(spent.exceeding, "the budget was not spent: {ctx}");
    assert!(spent.used <= bound, "charged past the bound: {ctx}");
    assert!(spent.delivered <= bound, "delivered past the bound: {ctx}");
    for (protocol, got) in &spent.per {
        assert!(*got > 0, "{protocol} carried nothing: {ctx}");
    }
    // Each stopped: a new download through each gets nothing.
    for protocol in ["wireguard", "shadowsocks", "vless"] {
        assert!(
            !p.carries(protocol),
            "{protocol}: a new download carried data past the quota"
        );
    }
}

/// The first `n` ticks of `capybara --json stats --watch alice`.
fn watch_ticks(lab: &Lab, n: usize) -> Vec<Value> {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(&lab.cli)
        .arg("--socket")
        .arg(lab.socket())
        .args(["--json", "stats", "--watch", "alice"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run capybara stats --watch");
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let ticks: Vec<Value> = out
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(&l.expect("a tick")).expect("a JSON tick"))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ticks.len(), n, "the watch ended early");
    ticks
}

/// Goodput (payload bits per second at the receiver) over `rate_bps`.
fn goodput_ratio(bytes: u64, secs: f64, rate_bps: f64) -> f64 {
    bytes as f64 * 8.0 / secs / rate_bps
}

#[test]
fn a_20_mbit_limit_holds_for_each_protocol() {
    let p = Proxied::start(Lab::new(219, 221));
    p.lab
        .capybara(&["quota", "set", "alice", "--bandwidth", "20Mbps"]);
    let mut ratios = Vec::new();
    for protocol in ["wireguard", "shadowsocks", "vless"] {
        let s = if protocol == "wireguard" {
            p.tunnelled()
        } else {
            p.through(protocol)
        }
        .expect("connect");
        let count = Arc::new(AtomicU64::new(0));
        let h = Proxied::download(s.try_clone().unwrap(), &count);
        // From 1 s (past slow start and the classes' burst) to 4 s.
        std::thread::sleep(Duration::from_secs(1));
        let (b1, t1) = (count.load(Ordering::Relaxed), Instant::now());
        // Meanwhile the live view (`stats --watch`, 2 ticks, about 3 s) shows the protocol's
        // row of alice: a proxy identity's row named by its protocol, a device's by its name.
        let ticks = watch_ticks(&p.lab, 2);
        if t1.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_secs(3) - t1.elapsed());
        }
        let (b4, secs) = (count.load(Ordering::Relaxed), t1.elapsed().as_secs_f64());
        for t in &ticks {
            let row = t["top_devices"]
                .as_array()
                .and_then(|rows| {
                    rows.iter().find(|r| {
                        r["proxy"]["protocol"] == protocol
                            || (protocol == "wireguard" && r["peer"]["user"] == "alice")
                    })
                })
                .unwrap_or_else(|| panic!("{protocol}: no row in the live view: {t:#}"));
            // 20 Mbit/s of IP bytes to the user: 2.5 MB/s, within a tick's jitter.
            let tx = row["traffic"]["tx"]["bytes"].as_f64().unwrap_or(0.0);
            eprintln!("{protocol}: live view tx {tx:.0} B/s");
            assert!(
                (1.75e6..=3.25e6).contains(&tx),
                "{protocol}: the live view shows {tx} B/s to the user, not about 2.5 MB/s: {row:#}"
            );
        }
        let ratio = goodput_ratio(b4 - b1, secs, 20e6);
        eprintln!(
            "{protocol}: {} payload bytes in {secs:.2} s: goodput {ratio:.3} × 20 Mbit/s",
            b4 - b1
        );
        ratios.push((protocol, ratio));
        s.shutdown(std::net::Shutdown::Both).ok();
        let _ = h.join();
    }
    for (protocol, ratio) in ratios {
        assert!(
            (0.95..=1.00).contains(&ratio),
            "{protocol}: goodput {ratio:.3} × the 20 Mbit/s limit, outside 0.95–1.00"
        );
    }
}

#[test]
fn source_blocklists_guard_both_endpoints_and_destination_lists_apply_to_proxied_traffic() {
    let p = Proxied::start(Lab::new(227, 229));
    let proxies = ["shadowsocks", "vless"];
    for protocol in proxies {
        assert!(
            p.carries(protocol),
            "{protocol}: no traffic before any list"
        );
        assert!(
            p.echoes(protocol, ECHO_WAIT),
            "{protocol}: no UDP before any list"
        );
    }
    // The clients' address in a source list: the XDP guard drops what it sends to either
    // endpoint's port (the origin on the same address still answers the agent's upstream
    // connections: their ports are never guarded).
    let client = p.lab.veth.b.v4.to_string();
    p.lab.capybara(&["blocklist", "add", "manual", &client]);
    for protocol in proxies {
        assert!(
            !p.carries(protocol),
            "{protocol}: a blocked source reached the endpoint"
        );
        // Shadowsocks's UDP relay port is guarded for UDP as its TCP port is.
        assert!(
            !p.echoes(protocol, NO_ECHO_WAIT),
            "{protocol}: a blocked source's datagram was relayed"
        );
    }
    let lists = p.lab.json(&["blocklist", "list"]);
    eprintln!("{lists:#}");
    p.lab.capybara(&["blocklist", "remove", "manual", &client]);
    for protocol in proxies {
        assert!(p.carries(protocol), "{protocol}: no traffic once unblocked");
    }
    // The origin in a destination list: no proxied connection reaches it.
    let origin = p.far.addr.ip().to_string();
    let dst = ["--direction", "destination"];
    p.lab
        .capybara(&[&["blocklist", "add", "bad", &origin][..], &dst].concat());
    for protocol in proxies {
        assert!(
            !p.carries(protocol),
            "{protocol}: a proxied connection reached a listed destination"
        );
        // Every datagram is checked by the kernel on the upstream socket.
        assert!(
            !p.echoes(protocol, NO_ECHO_WAIT),
            "{protocol}: a proxied datagram reached a listed destination"
        );
    }
    p.lab
        .capybara(&[&["blocklist", "remove", "bad", &origin][..], &dst].concat());
    for protocol in proxies {
        assert!(
            p.carries(protocol),
            "{protocol}: no traffic once the destination is off the list"
        );
        assert!(
            p.echoes(protocol, ECHO_WAIT),
            "{protocol}: no UDP once the destination is off the list"
        );
    }
}

#[test]
fn wrong_keys_on_an_endpoint_score_their_source_until_it_is_auto_blocked_from_both() {
    let p = Proxied::start_with(
        Lab::new(231, 233),
        &["--reputation", "--reputation-threshold", "5"],
    );
    assert!(p.carries("vless"), "no traffic before any wrong key");
    // Five connections to the Shadowsocks endpoint whose bytes no user's key opens, from the
    // clients' address: five `proxy-auth` points, the threshold.
    let ss = std::net::SocketAddr::new(p.lab.veth.a.v4.into(), SS_PORT);
    for _ in 0..5 {
        p.lab
            .client
            .run(move || {
                use std::io::Write as _;
                let mut s = std::net::TcpStream::connect(ss)?;
                s.write_all(&[0x42; 200])
            })
            .expect("a connection with a wrong key");
    }
    let source = p.lab.veth.b.v4.to_string();
    wait_until("the clients' address in the auto list", || {
        p.lab
            .capybara(&["blocklist", "show", "auto"])
            .contains(&source)
    });
    for protocol in ["shadowsocks", "vless"] {
        assert!(
            !p.carries(protocol),
            "{protocol}: an auto-blocked source reached the endpoint"
        );
    }
    let score = p.lab.json(&["ip-intel", "score", &source]);
    eprintln!("{score:#}");
    assert!(score.to_string().contains("proxy-auth"), "{score:#}");
}
