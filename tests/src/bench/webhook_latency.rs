//! `webhook_latency_p99_ms`: from the kernel's quota-exhaustion event to the webhook's POST
//! received on loopback (issue 21, target < 50 ms).
//!
//! ## Method
//! `capybara-agent` (release, next to this binary) in a namespace of its own, a `wireguard-go`
//! client in another over a veth (the `e2e_notify` set-up), driven over the agent's API socket:
//! one user with a [`QUOTA`] quota, one webhook for `quota-exceeded` (`allow_private`) to a
//! fast HTTP/1.1 receiver on the agent namespace's loopback ([`crate::receivers::Sink`],
//! answering 204 and noting the time each body was read whole). Each of [`SAMPLES`] rounds
//! sends [`PACKETS`] UDP datagrams of 1 000 bytes from the client through the tunnel to a
//! closed port of the server (more than the quota and its grace), waits for the
//! `quota-exceeded` POST, and starts a new period with `ResetQuota` (`capybara quota reset`),
//! which re-arms the kernel's thresholds. One quota exhausted again and again rather than many
//! users' quotas once: the same path each time (kernel event → ring buffer → alerts thread →
//! outbox write → the endpoint's worker → signed POST), without 100 clients on two cores.
//!
//! A sample is the receiver's arrival time minus the event's `data.kernel_time_ns` (the
//! kernel's time of the packet that exhausted the quota, as Unix nanoseconds: the agent maps
//! the kernel's boot clock to the wall clock when it reads the event); both clocks are this
//! machine's. Every round must deliver exactly one `quota-exceeded`, for the user, at 100 %,
//! in a new period (`data.epoch`), or the stage fails.
//!
//! Figures: `webhook_latency_p99_ms` (nearest rank), `webhook_latency_p50_ms`,
//! `webhook_latency_samples`, and a same-run floor, `webhook_latency_post_p99_ms`: a bare
//! POST (a small JSON body on a kept-alive connection, from a thread in the agent's namespace)
//! to another such receiver, from before the write to the receiver's arrival time, as many
//! times. No other tool sends these events to compare with (wg-portal, Defguard and Marzban
//! send webhooks from memory, unsigned), so the absolute target is the comparison; the
//! floor shows how much of the figure is HTTP on loopback itself.
//!
//! `cargo xtask bench --filter webhook_latency` runs this module alone.
//!
//! ## Figures
//! One run (release, AMD EPYC, 2 cores shared with other builds, Linux 6.18, 2026-12-07, the
//! binary run alone with `--filter webhook_latency`): **p99 1.23 ms**, p50 0.27 ms, max 1.35 ms
//! over 100 events (target < 50 ms); a bare POST p99 0.044 ms. The rest of the figure is the
//! kernel's ring buffer wake-up, the alerts thread, the outbox write and the worker's wake-up and
//! signing.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, ensure};
use capybara_agent::{
    api::client::{Client, Endpoint},
    service::policy::model::LimitsText,
};
use capybara_proto::v1 as pb;

use super::{Figure, Selection, percentile};
use crate::{
    agent_proc::{bench_agent_binary, spawn_agent, stop_agent},
    netns::{NetNs, VethPair, unique_name},
    progress,
    receivers::{Sink, SinkLog},
    traffic::send_udp,
    wg::WgProcess,
};

/// p99 of the latency, ms (target < 50).
pub const WEBHOOK_LATENCY_P99_MS: &str = "webhook_latency_p99_ms";
/// p50 of the latency, ms.
pub const WEBHOOK_LATENCY_P50_MS: &str = "webhook_latency_p50_ms";
/// Samples the two percentiles are of.
pub const WEBHOOK_LATENCY_SAMPLES: &str = "webhook_latency_samples";
/// p99 of a bare POST to the same kind of receiver, same run, ms.
pub const WEBHOOK_LATENCY_POST_P99_MS: &str = "webhook_latency_post_p99_ms";

/// This module's name for `--filter`.
pub const GROUP: &str = "webhook_latency";

/// Every figure of this module, in report order.
pub const NAMES: &[&str] = &[
    WEBHOOK_LATENCY_P99_MS,
    WEBHOOK_LATENCY_P50_MS,
    WEBHOOK_LATENCY_SAMPLES,
    WEBHOOK_LATENCY_POST_P99_MS,
];

/// Quota-exhaustion events measured.
pub const SAMPLES: usize = 100;
/// The user's quota.
pub const QUOTA: &str = "50KB";
/// Datagrams of 1 000 bytes per round: 80 KB, more than the quota and any grace.
pub const PACKETS: u64 = 80;

/// `10.<VETH_NET>.0.0/24` between the namespaces; the tunnel is `10.<TUNNEL_NET>.0.0/24`.
const VETH_NET: u8 = 87;
const TUNNEL_NET: u8 = 88;
const PORT: u16 = 51820;
const USER: &str = "latency";

/// Runs the module (see the module docs) if the selection wants any of its figures.
pub fn run(sel: &Selection, pins: &Path) -> Result<Vec<Figure>> {
    if !NAMES.iter().any(|n| sel.wants_in(GROUP, n)) {
        return Ok(Vec::new());
    }
    let bin = bench_agent_binary()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let _entered = rt.enter();
    let work = tempfile::tempdir()?;
    let rig = Rig::start(&bin, work.path(), pins)?;
    let (latencies, floor) = measure(&rt, &rig)?;
    drop(rig);
    let mut ms: Vec<f64> = latencies.iter().map(|d| d * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let mut floor_ms: Vec<f64> = floor.iter().map(|d| d * 1e3).collect();
    floor_ms.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&ms, 0.50), percentile(&ms, 0.99));
    progress!(
        "webhook latency: p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.2} ms over {} events; a \
         bare POST p99 {:.2} ms",
        ms.last().copied().unwrap_or(f64::NAN),
        ms.len(),
        percentile(&floor_ms, 0.99)
    );
    Ok([
        (WEBHOOK_LATENCY_P99_MS, p99, "ms"),
        (WEBHOOK_LATENCY_P50_MS, p50, "ms"),
        (WEBHOOK_LATENCY_SAMPLES, ms.len() as f64, "count"),
        (
            WEBHOOK_LATENCY_POST_P99_MS,
            percentile(&floor_ms, 0.99),
            "ms",
        ),
    ]
    .into_iter()
    .filter(|(name, _, _)| sel.wants_in(GROUP, name))
    .map(|(name, value, unit)| Figure { name, value, unit })
    .collect())
}

/// The agent, its namespaces and the client.
struct Rig {
    /// Between the two namespaces (removed on drop, before them: fields drop in order).
    _veth: VethPair,
    agent_ns: NetNs,
    client_ns: NetNs,
    socket: PathBuf,
    pin_dir: PathBuf,
    pid: u32,
}

impl Rig {
    fn start(bin: &Path, work: &Path, pins: &Path) -> Result<Rig> {
        let agent_ns = NetNs::new("wl");
        let client_ns = NetNs::new("wc");
        let veth = VethPair::new(&agent_ns, &client_ns, VETH_NET);
        let log = work.join("agent.log");
        let socket = work.join("run/agent.sock");
        let uapi = work.join("uapi");
        std::fs::create_dir_all(&uapi)?;
        let pin_dir = pins.join(unique_name("wl"));
        let mut cmd = Command::new(bin);
        cmd.args(["--netns", agent_ns.name(), "--uplink", &veth.a.ifname])
            .args(["--tunnel", &unique_name("wl")])
            .args(["--tunnel-ipv4", &format!("10.{TUNNEL_NET}.0.1/24")])
            .args(["--tunnel-ipv6", &format!("fd00:{TUNNEL_NET:x}::1/64")])
            .args(["--listen-port", &PORT.to_string()])
            .args(["--public-endpoint", &format!("{}:{PORT}", veth.a.v4)])
            .arg("--data-dir")
            .arg(work.join("data"))
            .arg("--bpffs")
            .arg(&pin_dir)
            .arg("--wg-uapi-dir")
            .arg(&uapi)
            .arg("--api-socket")
            .arg(&socket);
        let pid = spawn_agent(&agent_ns, cmd, &log, Duration::from_secs(60)).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&pin_dir);
        })?;
        Ok(Rig {
            _veth: veth,
            agent_ns,
            client_ns,
            socket,
            pin_dir,
            pid,
        })
    }
}

impl Drop for Rig {
    /// Stops the agent (SIGTERM, then SIGKILL after 15 s) and removes its pins.
    fn drop(&mut self) {
        stop_agent(&self.agent_ns, self.pid);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// The rounds; the latencies (s) and the bare POSTs' (s).
fn measure(rt: &tokio::runtime::Runtime, rig: &Rig) -> Result<(Vec<f64>, Vec<f64>)> {
    let api = rt.block_on(Client::connect(&Endpoint::Unix(rig.socket.clone())))?;
    let sink = Sink::start_in(&rig.agent_ns);
    let (_, cfg) = rt.block_on(api.add_user(USER, "", 0))?;
    rt.block_on(api.add_webhook(pb::AddWebhookRequest {
        url: sink.url(),
        events: vec!["quota-exceeded".into()],
        allow_private: true,
        ..Default::default()
    }))?;
    rt.block_on(api.set_limits(
        USER,
        &LimitsText {
            limit: Some(QUOTA.into()),
            ..Default::default()
        },
    ))?;
    let server = Ipv4Addr::new(10, TUNNEL_NET, 0, 1);
    let v4 = cfg.peer.ipv4;
    // The generated config on a `wireguard-go` client.
    let _wg = WgProcess::from_wg_quick(
        &rig.client_ns,
        "wl",
        &cfg.wg_quick,
        None,
        server.into(),
        v4.into(),
    );
    let ok = rig
        .client_ns
        .try_exec(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            &server.to_string(),
        ])
        .status
        .success();
    ensure!(ok, "no ping through the agent's tunnel");
    // The pings' bytes count against the quota: start from an empty period.
    rt.block_on(api.reset_quota(USER, ""))?;
    let to = SocketAddr::new(IpAddr::V4(server), 9);
    progress!("webhook latency: {SAMPLES} quota exhaustions of {QUOTA}");
    for round in 0..SAMPLES {
        if round > 0 {
            rt.block_on(api.reset_quota(USER, ""))?;
        }
        send_udp(&rig.client_ns, Some(IpAddr::V4(v4)), to, PACKETS, 1000);
        let end = Instant::now() + Duration::from_secs(10);
        while sink.count() <= round {
            ensure!(
                Instant::now() < end,
                "round {round}: no quota-exceeded POST within 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // A late duplicate would show here.
    std::thread::sleep(Duration::from_millis(200));
    let latencies = latencies(&sink.log.lock().unwrap_or_else(|e| e.into_inner()))?;
    let floor = bare_posts(&rig.agent_ns, SAMPLES)?;
    Ok((latencies, floor))
}

/// Checks what the receiver got (one `quota-exceeded` per round, each in a new period) and
/// returns each one's latency from the kernel's packet, in seconds.
fn latencies(log: &SinkLog) -> Result<Vec<f64>> {
    ensure!(
        log.got.len() == SAMPLES,
        "{} POSTs for {SAMPLES} rounds",
        log.got.len()
    );
    let mut epochs = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(SAMPLES);
    for ((id, body), at) in log.got.iter().zip(&log.arrived) {
        let v: serde_json::Value = serde_json::from_slice(body)?;
        ensure!(
            v["event"] == "quota-exceeded"
                && v["user"] == USER
                && v["data"]["percent"] == 100
                && v["id"].as_str() == Some(id.as_str()),
            "not the round's event: {v}"
        );
        ensure!(
            epochs.insert(v["data"]["epoch"].as_u64()),
            "two events in one period: {v}"
        );
        let kernel_ns = v["data"]["kernel_time_ns"]
            .as_u64()
            .context("no data.kernel_time_ns")?;
        let arrived_ns = at.duration_since(UNIX_EPOCH)?.as_nanos() as f64;
        out.push((arrived_ns - kernel_ns as f64) / 1e9);
    }
    Ok(out)
}

/// `n` bare POSTs on one kept-alive connection from a thread in `ns` to a new receiver there:
/// the time from before each write to the receiver's arrival time, in seconds.
fn bare_posts(ns: &NetNs, n: usize) -> Result<Vec<f64>> {
    let sink = Arc::new(Sink::start_in(ns));
    let addr = sink.addr;
    let sent: Vec<SystemTime> = ns.run(move || -> Result<Vec<SystemTime>> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut sent = Vec::with_capacity(n);
        let mut buf = [0u8; 1024];
        for i in 0..n {
            let body = format!("{{\"event\":\"quota-exceeded\",\"i\":{i}}}");
            let req = format!(
                "POST /hook HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n{body}",
                body.len()
            );
            sent.push(SystemTime::now());
            s.write_all(req.as_bytes())?;
            // The 204's head (no body).
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let k = s.read(&mut buf)?;
                ensure!(k > 0, "the receiver closed the connection");
                head.extend_from_slice(&buf[..k]);
            }
        }
        Ok(sent)
    })?;
    let log = sink.log.lock().unwrap_or_else(|e| e.into_inner());
    ensure!(log.arrived.len() == n, "{} of {n} POSTs", log.arrived.len());
    Ok(log
        .arrived
        .iter()
        .zip(&sent)
        .map(|(a, s)| a.duration_since(*s).unwrap_or_default().as_secs_f64())
        .collect())
}
