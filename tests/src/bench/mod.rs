//! The benchmarks run by `capybara-bench` (and so by `cargo xtask bench`).
//!
//! - [`guard`]: the XDP guard's cost per packet over source blocklists of 0, 1k, 100k and 1M
//!   random IPv4 prefixes, measured with `BPF_PROG_TEST_RUN` one distinct packet per run;
//!   replacing a 1M-prefix list; optionally the kernel's own LPM trie over the same prefixes as
//!   a baseline measured in the same run.
//! - [`geo`]: compiling a generated GeoLite2-size MaxMind DB.
//! - [`pipeline`]: the tunnel device's whole pipeline per packet at 10 and 100 000 peers.
//! - [`throttle`]: shaping accuracy with real TCP, and veth throughput with every program on.
//! - [`tunnel`]: iperf3 TCP through the agent's WireGuard tunnel, `boringtun-cli` and
//!   `wireguard-go`, from a `wireguard-go` client, same machine, same run.
//! - [`api_load`]: the gRPC API at 500 mixed calls per second over TCP with tokens for 30 s.
//! - [`rest`]: the same mixed calls over the REST mirror and over gRPC, p50 of each.
//! - [`policy`]: a group policy change fanned out to 10 000 users' kernel maps; single-user
//!   policy updates, call to kernel map.
//! - [`vs_nftables`]: a UDP flood from random sources against a 1M-prefix source blocklist:
//!   the XDP guard against nftables and iptables + ipset, same run.
//! - [`agent_load`]: the agent binary's start-up time and resident memory with 100k peers in
//!   its store.
//! - [`vs_enforcement`]: 1k peers with counters, rate and flow limits: the tunnel-device
//!   programs against nftables + tc HTB, throughput (bulk TCP and small UDP packets) and
//!   rule-update latency.
//! - [`flood`]: the UDP flood loop and the counting receiver both comparisons above use.
//! - [`vs_tc`]: throttle accuracy of a `tc` HTB script and of nftables `limit rate` at the
//!   rates of `throttle_accuracy_*`.
//! - [`webhooks`]: webhook events delivered per second to one receiver on loopback.
//! - [`webhook_latency`]: the kernel's quota-exhaustion event to the webhook's POST on
//!   loopback, through the agent binary, p50 and p99.
//! - [`report`]: `report.md`, the SVG plots, and the progress bar with each stage's host
//!   noise.
//! - [`usage_report`]: a month's usage report over 10 000 users' hourly rollups, against
//!   summing the hourly records alone.
//! - [`handshake_flood`]: the agent's CPU under a flood of invalid handshake initiations from
//!   sources in a blocked list (the XDP guard drops them) over the same flood unblocked.
//! - [`tunnel_cpu`]: the server's CPU seconds per gigabit (softirq included) of the agent's
//!   tunnel, `boringtun-cli` and `wireguard-go` under the same load from [`crate::loadgen`]
//!   (1 peer, both ways, 16 peers).
//! - [`tunnel_workers`]: the tunnel with 1 and 2 workers under 16 peers of our own load
//!   generator, same run.
//! - [`vless`]: bulk download through the VLESS endpoint against Debian's v2ray as the VLESS+TLS
//!   server, the same v2ray client, same run.
//! - [`shadowsocks`]: bulk download from Debian's `ss-local` through the agent's Shadowsocks
//!   endpoint and through `ss-server`, same run; the cost of finding a user by key trial.
//! - [`multi_quota`]: one user's quota spent through WireGuard, Shadowsocks and VLESS at once,
//!   the kernel's charge past the cutoff against its stated bound.
//! - [`cluster`]: two nodes on a three-member etcd: a change on one in the other's kernel maps,
//!   and a 10 000-user group change applied on both.
//!
//! Every figure is a [`Figure`]; the binary writes them as
//! `{"benchmarks":[{"name":…, "value":…, "unit":…}]}`. The names below are what reports and CI
//! compare across runs: keep them stable.

pub mod agent_load;
pub mod api_load;
pub mod auth_flood;
pub mod cluster;
pub mod flood;
pub mod floor;
pub mod geo;
pub mod guard;
pub mod handshake_flood;
pub mod multi_quota;
pub mod pipeline;
pub mod policy;
pub mod report;
pub mod rest;
pub mod shadowsocks;
pub mod throttle;
pub mod tunnel;
pub mod tunnel_cpu;
pub mod tunnel_workers;
pub mod usage_report;
pub mod vs_enforcement;
pub mod vs_nftables;
pub mod vs_tc;
pub mod webhook_latency;
pub mod webhooks;
// Issue 24.
pub mod vless;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use serde::Serialize;

/// `xdp_guard_ns_empty`: ns per packet, no blocklist.
pub const XDP_GUARD_NS_EMPTY: &str = "xdp_guard_ns_empty";
/// `xdp_guard_ns_1k`: ns per packet, 1 000 prefixes.
pub const XDP_GUARD_NS_1K: &str = "xdp_guard_ns_1k";
/// `xdp_guard_ns_100k`: ns per packet, 100 000 prefixes.
pub const XDP_GUARD_NS_100K: &str = "xdp_guard_ns_100k";
/// `xdp_guard_ns_1m`: ns per packet, 1 000 000 prefixes.
pub const XDP_GUARD_NS_1M: &str = "xdp_guard_ns_1m";
/// `xdp_guard_1m_over_1k`: the 1M figure over the 1k figure (target ≤ 1.5).
pub const XDP_GUARD_1M_OVER_1K: &str = "xdp_guard_1m_over_1k";
/// `xdp_guard_ns_1m_lpm_baseline`: the same probes against the kernel's LPM trie holding the
/// same 1M prefixes.
pub const XDP_GUARD_NS_1M_LPM_BASELINE: &str = "xdp_guard_ns_1m_lpm_baseline";
/// `list_replace_1m_ms`: replacing a 1M-prefix source list with another one (target < 2000).
pub const LIST_REPLACE_1M_MS: &str = "list_replace_1m_ms";
/// `geo_compile_500k_ms`: `GeoDb::open` of a generated 500k-network database.
pub const GEO_COMPILE_500K_MS: &str = "geo_compile_500k_ms";
/// ns per packet of the tunnel device's pipeline, 10 peers.
pub const TC_PIPELINE_NS_10_PEERS: &str = "tc_pipeline_ns_10_peers";
/// ns per packet of the tunnel device's pipeline, 100 000 peers.
pub const TC_PIPELINE_NS_100K_PEERS: &str = "tc_pipeline_ns_100k_peers";
/// `tc_pipeline_ns_100k_peers` over `tc_pipeline_ns_10_peers`.
pub const TC_PIPELINE_100K_OVER_10: &str = "tc_pipeline_100k_over_10";

/// Goodput / rate of TCP to a peer shaped to 5 Mbit/s (target 0.95–1.00).
pub const THROTTLE_ACCURACY_5M: &str = "throttle_accuracy_5m";
/// Goodput / rate of TCP to a peer shaped to 50 Mbit/s (target 0.95–1.00).
pub const THROTTLE_ACCURACY_50M: &str = "throttle_accuracy_50m";
/// Goodput / rate of TCP to a peer shaped to 500 Mbit/s (target 0.95–1.00).
pub const THROTTLE_ACCURACY_500M: &str = "throttle_accuracy_500m";
/// The same from the peer (through the IFB).
pub const THROTTLE_ACCURACY_5M_FROM_PEER: &str = "throttle_accuracy_5m_from_peer";
/// The same from the peer (through the IFB).
pub const THROTTLE_ACCURACY_50M_FROM_PEER: &str = "throttle_accuracy_50m_from_peer";
/// The same from the peer (through the IFB).
pub const THROTTLE_ACCURACY_500M_FROM_PEER: &str = "throttle_accuracy_500m_from_peer";
/// Retransmits of the median 5 Mbit/s run to the peer.
pub const THROTTLE_RETRANSMITS_5M: &str = "throttle_retransmits_5m";
/// Retransmits of the median 50 Mbit/s run to the peer.
pub const THROTTLE_RETRANSMITS_50M: &str = "throttle_retransmits_50m";
/// Retransmits of the median 500 Mbit/s run to the peer.
pub const THROTTLE_RETRANSMITS_500M: &str = "throttle_retransmits_500m";
/// veth TCP throughput with every program and feature on over without (target ≥ 0.95).
pub const VETH_THROUGHPUT_RATIO: &str = "veth_throughput_ratio";
/// The veth figure without programs, Mbit/s.
pub const VETH_THROUGHPUT_MBIT_BARE: &str = "veth_throughput_mbit_bare";
/// The veth figure with every program and feature on, Mbit/s.
pub const VETH_THROUGHPUT_MBIT_PROGRAMS: &str = "veth_throughput_mbit_programs";

/// The same with the peer shaped at 10 Gbit/s both ways (HTB and IFB in the path).
pub const VETH_THROUGHPUT_RATIO_SHAPED: &str = "veth_throughput_ratio_shaped";
/// Mbit/s of iperf3 TCP from a wireguard-go client through the agent's tunnel.
pub const TUNNEL_THROUGHPUT_MBPS: &str = "tunnel_throughput_mbps";
/// Mbit/s of the same through `boringtun-cli`.
pub const TUNNEL_THROUGHPUT_BORINGTUN_CLI_MBPS: &str = "tunnel_throughput_boringtun_cli_mbps";
/// Mbit/s of the same through a server-side `wireguard-go`.
pub const TUNNEL_THROUGHPUT_WIREGUARD_GO_MBPS: &str = "tunnel_throughput_wireguard_go_mbps";
/// `tunnel_throughput_mbps` over `tunnel_throughput_boringtun_cli_mbps` (target ≥ 1.0).
pub const TUNNEL_THROUGHPUT_VS_BORINGTUN_CLI: &str = "tunnel_throughput_vs_boringtun_cli";
/// `tunnel_throughput_mbps` over `tunnel_throughput_wireguard_go_mbps`.
pub const TUNNEL_THROUGHPUT_VS_WIREGUARD_GO: &str = "tunnel_throughput_vs_wireguard_go";
pub use api_load::{API_LOAD_CALLS_PER_S, API_LOAD_ERRORS, API_LOAD_P50_MS, API_LOAD_P99_MS};
pub use policy::{
    GROUP_POLICY_FANOUT_10K_MS, GROUP_POLICY_FANOUT_RPC_MS, POLICY_UPDATE_P50_US,
    POLICY_UPDATE_P50_US_TWO_CORES, POLICY_UPDATE_P99_US, POLICY_UPDATE_P99_US_TWO_CORES,
    POLICY_UPDATE_RPC_P99_US,
};

/// Every benchmark, in the order they run and are reported: the modules' own lists where they
/// have one, so a figure is named in one list only.
pub const ALL: &[&str] = &concat::<{ total(ALL_PARTS) }>(ALL_PARTS);

const ALL_PARTS: &[&[&str]] = &[
    &[
        XDP_GUARD_NS_EMPTY,
        XDP_GUARD_NS_1K,
        XDP_GUARD_NS_100K,
        XDP_GUARD_NS_1M,
        XDP_GUARD_1M_OVER_1K,
        XDP_GUARD_NS_1M_LPM_BASELINE,
        LIST_REPLACE_1M_MS,
        GEO_COMPILE_500K_MS,
    ],
    pipeline::NAMES,
    &[
        THROTTLE_ACCURACY_5M,
        THROTTLE_ACCURACY_50M,
        THROTTLE_ACCURACY_500M,
        THROTTLE_ACCURACY_5M_FROM_PEER,
        THROTTLE_ACCURACY_50M_FROM_PEER,
        THROTTLE_ACCURACY_500M_FROM_PEER,
        THROTTLE_RETRANSMITS_5M,
        THROTTLE_RETRANSMITS_50M,
        THROTTLE_RETRANSMITS_500M,
        VETH_THROUGHPUT_RATIO,
        VETH_THROUGHPUT_MBIT_BARE,
        VETH_THROUGHPUT_MBIT_PROGRAMS,
        VETH_THROUGHPUT_RATIO_SHAPED,
        TUNNEL_THROUGHPUT_MBPS,
        TUNNEL_THROUGHPUT_BORINGTUN_CLI_MBPS,
        TUNNEL_THROUGHPUT_WIREGUARD_GO_MBPS,
        TUNNEL_THROUGHPUT_VS_BORINGTUN_CLI,
        TUNNEL_THROUGHPUT_VS_WIREGUARD_GO,
        API_LOAD_P99_MS,
        API_LOAD_P50_MS,
        API_LOAD_CALLS_PER_S,
        API_LOAD_ERRORS,
        GROUP_POLICY_FANOUT_10K_MS,
        GROUP_POLICY_FANOUT_RPC_MS,
        POLICY_UPDATE_P99_US,
        POLICY_UPDATE_P50_US,
        POLICY_UPDATE_RPC_P99_US,
        POLICY_UPDATE_P99_US_TWO_CORES,
        POLICY_UPDATE_P50_US_TWO_CORES,
    ],
    vs_nftables::NAMES,
    vs_enforcement::NAMES,
    vs_tc::NAMES,
    agent_load::NAMES,
    auth_flood::NAMES,
    handshake_flood::NAMES,
    rest::NAMES,
    usage_report::NAMES,
    webhooks::NAMES,
    webhook_latency::NAMES,
    tunnel_cpu::NAMES,
    tunnel_workers::NAMES,
    vless::NAMES,
    shadowsocks::NAMES,
    multi_quota::NAMES,
    cluster::NAMES,
];

/// What `--quick` runs: a few of the kernel probes, one rate of each throttle baseline, and the
/// comparisons and the agent's load as a whole (their modules' lists).
pub const QUICK: &[&str] = &concat::<{ total(QUICK_PARTS) }>(QUICK_PARTS);

const QUICK_PARTS: &[&[&str]] = &[
    &[
        XDP_GUARD_NS_1K,
        XDP_GUARD_NS_1M,
        XDP_GUARD_1M_OVER_1K,
        TC_PIPELINE_NS_10_PEERS,
        TC_PIPELINE_NS_100K_PEERS,
        TC_PIPELINE_100K_OVER_10,
        vs_tc::THROTTLE_ACCURACY_TC_HTB_50M,
        vs_tc::THROTTLE_ACCURACY_NFT_LIMIT_50M,
    ],
    vs_nftables::NAMES,
    vs_enforcement::NAMES,
    agent_load::NAMES,
];

/// The number of names in `parts`.
const fn total(parts: &[&[&str]]) -> usize {
    let (mut n, mut i) = (0, 0);
    while i < parts.len() {
        n += parts[i].len();
        i += 1;
    }
    n
}

/// `parts` one after the other (`N` = [`total`] of them).
const fn concat<const N: usize>(parts: &[&[&'static str]]) -> [&'static str; N] {
    let mut out = [""; N];
    let (mut k, mut i) = (0, 0);
    while i < parts.len() {
        let mut j = 0;
        while j < parts[i].len() {
            out[k] = parts[i][j];
            k += 1;
            j += 1;
        }
        i += 1;
    }
    out
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// Stable benchmark name (one of [`ALL`]).
    pub name: &'static str,
    /// The value, in `unit`.
    pub value: f64,
    /// `ns`, `ms`, `ratio`, `count`, `calls/s`, `Mbit/s`, `cores`, `s/Gbit`, …
    pub unit: &'static str,
}

/// The JSON document the binary writes.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Every figure, in [`ALL`] order.
    pub benchmarks: Vec<Figure>,
}

/// Which benchmarks to run: those whose name contains the filter (all without one).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    filter: Option<String>,
    /// When set, only these names (`--quick`), further narrowed by the filter.
    only: Option<&'static [&'static str]>,
}

impl Selection {
    /// Benchmarks whose name contains `filter`, or all.
    pub fn new(filter: Option<String>) -> Self {
        Selection { filter, only: None }
    }

    /// The same selection narrowed to `names`.
    pub fn only(self, names: &'static [&'static str]) -> Self {
        Selection {
            only: Some(names),
            ..self
        }
    }

    /// True if `name` is to be reported.
    pub fn wants(&self, name: &str) -> bool {
        self.only.is_none_or(|o| o.contains(&name))
            && self.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    /// True if any of `names` is to be reported.
    pub fn wants_any(&self, names: &[&str]) -> bool {
        names.iter().any(|n| self.wants(n))
    }

    /// [`Selection::wants`], where a filter equal to `group` (a benchmark module's name, e.g.
    /// `agent_load`) also selects every figure of that module.
    pub fn wants_in(&self, group: &str, name: &str) -> bool {
        self.wants(name)
            || (self.filter.as_deref() == Some(group)
                && self.only.is_none_or(|o| o.contains(&name)))
    }
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
/// The value at quantile `p` (0–1) of `sorted` (nearest rank); NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The agent's real gRPC API over `svc`, served on `127.0.0.1:0` (TCP, tokens) until
/// [`TcpApi::stop`].
pub struct TcpApi {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), capybara_agent::api::ApiError>>,
}

impl TcpApi {
    /// Starts serving (call inside a tokio runtime).
    pub async fn start(
        svc: std::sync::Arc<capybara_agent::service::Service>,
    ) -> anyhow::Result<TcpApi> {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = tcp.local_addr()?;
        let url = format!("http://{addr}");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(capybara_agent::api::run(
            svc,
            capybara_agent::api::Listeners {
                tcp: Some(tcp),
                unix: None,
                tcp_tls: None,
                metrics: None,
                // No rate limit: the benchmarks measure the API, not its limiter.
                tcp_access: Some(capybara_agent::service::access::ApiAccess {
                    listen: addr,
                    tls: None,
                    insecure: false,
                    rate_limit: 0,
                }),
                in_process: None,
            },
            async {
                let _ = stopped.await;
            },
        ));
        Ok(TcpApi { url, stop, server })
    }

    /// Stops serving and waits for the server to end; its error, if it failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        Ok(())
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Progress on stderr, prefixed so it stands out from cargo's output (above the progress bar
/// when one is shown).
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {
        $crate::bench::report::log(&format!("bench: {}", format_args!($($arg)*)))
    };
}

/// Where bpffs is mounted.
const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of the benchmark's pin directories: `capybench-<pid>`.
const PIN_PREFIX: &str = "capybench-";

/// The benchmark's own bpffs directory, `/sys/fs/bpf/capybench-<pid>`, removed with everything
/// pinned in it on drop (also when a benchmark fails or panics). Directories left by benchmark
/// processes that no longer exist (killed by a signal) are removed when a new one is created.
#[derive(Debug)]
pub struct BenchPins {
    path: PathBuf,
}

impl BenchPins {
    /// Sweeps stale directories, then creates this process's.
    pub fn new() -> anyhow::Result<Self> {
        static CREATED: AtomicBool = AtomicBool::new(false);
        anyhow::ensure!(
            !CREATED.swap(true, Ordering::SeqCst),
            "one pin directory per benchmark process"
        );
        sweep_stale();
        let path = Path::new(BPFFS).join(format!("{PIN_PREFIX}{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir(&path).map_err(|e| {
            anyhow::anyhow!(
                "cannot create {}: {e} (root and bpffs at {BPFFS} needed)",
                path.display()
            )
        })?;
        Ok(BenchPins { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BenchPins {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => progress!("removed {}", self.path.display()),
            Err(e) => eprintln!("warning: cannot remove {}: {e}", self.path.display()),
        }
    }
}

/// Removes `capybench-<pid>` directories of processes that no longer exist.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(BPFFS) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PIN_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            progress!("removing stale {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        agent_load::{AGENT_RSS_MB_100K_PEERS, LOAD_100K_PEERS_MS},
        *,
    };

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn selection_matches_substrings() {
        let s = Selection::new(Some("1m".into()));
        assert!(s.wants(XDP_GUARD_NS_1M));
        assert!(s.wants(LIST_REPLACE_1M_MS));
        assert!(!s.wants(XDP_GUARD_NS_1K));
        assert!(Selection::new(None).wants(GEO_COMPILE_500K_MS));
    }

    #[test]
    fn quick_selection_is_narrowed_by_the_filter() {
        let s = Selection::new(None).only(&[XDP_GUARD_NS_1K, XDP_GUARD_NS_1M]);
        assert!(s.wants(XDP_GUARD_NS_1K));
        assert!(!s.wants(LIST_REPLACE_1M_MS));
        let s = Selection::new(Some("1m".into())).only(&[XDP_GUARD_NS_1K, XDP_GUARD_NS_1M]);
        assert!(s.wants(XDP_GUARD_NS_1M));
        assert!(!s.wants(XDP_GUARD_NS_1K));
    }

    #[test]
    fn a_module_name_selects_the_module() {
        let s = Selection::new(Some(agent_load::GROUP.into()));
        assert!(!s.wants(AGENT_RSS_MB_100K_PEERS));
        assert!(s.wants_in(agent_load::GROUP, AGENT_RSS_MB_100K_PEERS));
        assert!(s.wants_in(agent_load::GROUP, LOAD_100K_PEERS_MS));
        assert!(!s.wants_in("pipeline", AGENT_RSS_MB_100K_PEERS));
        let s = Selection::new(Some("rss".into()));
        assert!(s.wants_in(agent_load::GROUP, AGENT_RSS_MB_100K_PEERS));
        assert!(!s.wants_in(agent_load::GROUP, LOAD_100K_PEERS_MS));
        let quick = Selection::new(Some(agent_load::GROUP.into())).only(&[XDP_GUARD_NS_1K]);
        assert!(!quick.wants_in(agent_load::GROUP, LOAD_100K_PEERS_MS));
    }
}
