//! Shadowsocks and VLESS through the real agent (issue 24), in the lab of
//! [`capybara_tests::proxied`]: the agent with both endpoints, alice's real clients (`ss-local`,
//! `v2ray`, `wireguard-go`) started with the configs it printed, origins on both sides.
//!
//! - **Printed configs, kick, hold.** Each client fetches a 2 MiB file byte for byte; then
//!   with an endless download open through each, `kick alice` ends both within 1 s (the
//!   endpoints abort the connections: a reset, which the client relays as the end), the
//!   sessions are recorded with their protocol, reason `kicked` and at least the file's bytes
//!   sent; new connections are admitted again; then `user expire alice` (a policy hold) ends
//!   both within 1 s and refuses new ones (recorded as `held` auth attempts) until `user
//!   renew`.
//! - **One quota.** A 10 MB quota on alice, spent by three endless downloads at once (through
//!   the tunnel, Shadowsocks and VLESS): all three stop, and what was charged and what arrived
//!   stay within the kernel's bound (one 64 KiB super-packet per CPU past the budget).
//! - **One rate.** A 20 Mbit/s limit on alice: a download through each protocol in turn keeps
//!   goodput within 0.95–1.00 of the rate (the rate is of IP bytes; TCP's headers make an exact
//!   rate show as about 0.965 of payload).
//!
//! - **Reputation.** Five connections with a wrong key to the Shadowsocks endpoint score their
//!   source (`proxy-auth`) up to the threshold: the source is auto-blocked, and the XDP guard
//!   keeps it from both endpoints.
//! - **Lists.** The clients' address in a source list: the XDP guard drops what it sends to
//!   either endpoint (their TCP ports are guarded as WireGuard's UDP port is); the origin in a
//!   destination list: no proxied connection reaches it. Both undone, traffic flows again.
//!
//! Each test starts its own lab and agent (about 2 s) and bounds every wait; the rate test
//! runs three 4.5 s downloads, the slowest part of the file.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use capybara_tests::origin;
use serde_json::Value;

use capybara_tests::{
    lab::Lab,
    proxied::{FILE_LEN, Proxied, SS_PORT, quota_bound, spend_quota},
};

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
        std::thread::sleep(Duration::from_secs(3));
        let (b4, secs) = (count.load(Ordering::Relaxed), t1.elapsed().as_secs_f64());
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
    }
    p.lab
        .capybara(&[&["blocklist", "remove", "bad", &origin][..], &dst].concat());
    for protocol in proxies {
        assert!(
            p.carries(protocol),
            "{protocol}: no traffic once the destination is off the list"
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
