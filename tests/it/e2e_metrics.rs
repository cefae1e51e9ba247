//! Prometheus metrics end to end: the real `capybara-agent` in a namespace with
//! `--metrics-listen`, a stock `wireguard-go` client in another (configured from `capybara user
//! add`, in the shared `capybara_tests::lab::Lab`), a known amount of UDP through the tunnel, then:
//!
//! 1. a scrape of `/metrics` passes `promtool check metrics` (Debian's `prometheus` package,
//!    installed by `cargo xtask setup`) and holds the series the issue names;
//! 2. a real Prometheus server (the `prometheus` binary, started by the test inside the agent's
//!    namespace with its own config file and its own temporary storage directory, on a loopback
//!    port of that fresh namespace, so free by construction; killed by the namespace guard and
//!    its files removed with the temporary directory, even when the test fails) scrapes the
//!    agent every second, and the PromQL query
//!    `capybara_user_bytes_total{user="alice",direction="rx"}` through its HTTP API
//!    (`/api/v1/query`) answers the IP bytes the client sent, within 1 %.
//!
//! **Why it takes as long as it does** (measured, debug build, two shared cores; the phases are
//! printed): the test itself takes ~7 s after the agent is ready: the client's first handshake
//! and ping (0.3 s), 3 000 datagrams paced in bursts of 20 (this wireguard-go cannot take faster
//! bursts, see `e2e_support::send_paced`; 0.8 s), a scrape and promtool (0.2 s), then Prometheus's
//! start (it opens its TSDB and replays an empty WAL) and up to two scrape intervals (1 s each)
//! until a sample taken after the traffic is queryable (5.8 s; polled every 200 ms, 30 s
//! deadline). Before that, the agent starts in ~4 s (2.6 s of it opening the installed country
//! database), and `agent_proc::agent_crate_binary` checks that the two binaries are built (two
//! `cargo build` no-ops, ~30 s each here because the agent's build script re-checks the eBPF
//! crate): ~60 s in all, as for the other tests that start the agent binary.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use capybara_tests::{
    lab::Lab,
    traffic::{UdpSink, udp_overhead},
    wg::ping_until,
};
use serde_json::Value;

use crate::e2e_support::send_paced;

const WAIT: Duration = Duration::from_secs(10);
/// The agent's metrics listener and Prometheus's, on the server namespace's own loopback.
const METRICS: &str = "127.0.0.1:9464";
const PROMETHEUS: &str = "127.0.0.1:9090";

/// `curl` inside the lab's server namespace.
fn get(lab: &Lab, url: &str) -> String {
    lab.server.exec(&["curl", "-sS", "--max-time", "5", url])
}

/// `promtool check metrics` on `text` (its stdin); panics with its complaints.
fn promtool_check(text: &str) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (cargo xtask setup installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed: {}{}\n--- the scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `series` (name and labels exactly as exposed) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn prometheus_scrapes_the_bytes_a_wireguard_go_client_sent() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>6.2} s  {what}", t0.elapsed().as_secs_f64());
    let lab = Lab::new(95, 97);
    lab.start_agent(
        1,
        &["--metrics-listen", METRICS, "--metrics-top-users", "5"],
    );
    phase("agent ready");
    let (_wg, client_v4) = lab.add_client("alice");
    let server = IpAddr::V4(lab.server_v4);
    assert!(
        ping_until(&lab.client, server, WAIT),
        "no ping through the tunnel\n{}",
        lab.log(1)
    );

    phase("client connected");
    // A known amount through the tunnel: n datagrams of `size` bytes, all received.
    let (n, size) = (3_000u64, 1_200usize);
    let sink = UdpSink::start(&lab.server, SocketAddr::new(server, 0));
    let before = lab.json(&["stats", "alice"])["users"]["alice"]["rx"]["bytes"]
        .as_u64()
        .unwrap();
    send_paced(&lab.client, client_v4, sink.addr(), n, size);
    assert_eq!(sink.wait_for(n, WAIT), n, "datagrams lost in the tunnel");
    let sent = n * (size as u64 + udp_overhead(&sink.addr()));
    phase("traffic sent and received");
    // What the client sent before (its pings), as the kernel counted it.
    let expect = before + sent;

    // 1. A scrape in the Prometheus text format passes promtool, with the series named.
    let text = get(&lab, &format!("http://{METRICS}/metrics"));
    promtool_check(&text);
    let rx = sample(
        &text,
        r#"capybara_user_bytes_total{user="alice",direction="rx"}"#,
    )
    .unwrap_or_else(|| panic!("no alice rx series:\n{text}"));
    assert_eq!(rx as u64, expect, "the scrape's alice rx bytes");
    for (series, at_least) in [
        ("capybara_sessions_online", 1.0),
        ("capybara_handshakes_completed_total", 1.0),
        (
            r#"capybara_api_request_duration_seconds_count{route="/capybara.v1.Users/AddUser",code="OK"}"#,
            1.0,
        ),
        (r#"capybara_store_duration_seconds_count{op="write"}"#, 1.0),
        (r#"capybara_quota_users{standing="unlimited"}"#, 1.0),
        (
            r#"capybara_user_bytes_total{user="_other",direction="rx"}"#,
            0.0,
        ),
        (r#"capybara_drops_total{reason="gate-kicked"}"#, 0.0),
        ("capybara_kernel_events_lost_total", 0.0),
    ] {
        let v = sample(&text, series).unwrap_or_else(|| panic!("no {series}:\n{text}"));
        assert!(v >= at_least, "{series} = {v}, want ≥ {at_least}");
    }
    // OpenMetrics for whoever asks for it (Prometheus does).
    let om = lab.server.exec(&[
        "curl",
        "-sS",
        "-H",
        "Accept: application/openmetrics-text;version=1.0.0",
        &format!("http://{METRICS}/metrics"),
    ]);
    assert!(om.ends_with("# EOF\n"), "not OpenMetrics: {om}");

    phase("scrape checked by promtool");
    // 2. A real Prometheus server scrapes the agent; PromQL answers the client's bytes.
    let prometheus = tempfile::tempdir().expect("temp dir");
    let dir = prometheus.path().to_owned();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: capybara\n    static_configs:\n\
             \x20     - targets: ['{METRICS}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = lab
        .server
        .command(&[
            "prometheus",
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address={PROMETHEUS}"),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus (cargo xtask setup installs it)");
    let pid = lab.server.adopt(child);
    phase("prometheus started");

    let query = "capybara_user_bytes_total{user=\"alice\",direction=\"rx\"}";
    let url = format!(
        "http://{PROMETHEUS}/api/v1/query?query={}",
        query
            .replace('{', "%7B")
            .replace('}', "%7D")
            .replace('"', "%22")
            .replace('=', "%3D")
            .replace(',', "%2C")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        assert!(
            lab.server.is_running(pid),
            "prometheus exited:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        let out = lab
            .server
            .try_exec(&["curl", "-sS", "--max-time", "2", &url]);
        let answer: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        let value = answer.as_ref().and_then(|a| {
            a["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        });
        if let Some(v) = value.filter(|v| *v >= sent as f64) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "PromQL {query} did not answer the traffic within 30 s; last answer {answer:?}\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    phase("PromQL answered the traffic");
    let err = (got - sent as f64).abs() / sent as f64;
    eprintln!(
        "client sent {sent} IP bytes in {n} datagrams (+ {before} before: its pings); \
         Prometheus answers {got} ({:.4} % from the datagrams sent)",
        err * 100.0
    );
    assert!(
        err < 0.01,
        "PromQL answers {got} B, the client sent {sent} B: {:.3} % apart",
        err * 100.0
    );
}
