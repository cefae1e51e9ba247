//! `capybara-bench`: the benchmarks behind `cargo xtask bench` (root required: they load BPF
//! programs and pin maps under `/sys/fs/bpf/capybench-<pid>`, removed at the end).
//!
//! ```text
//! cargo run --release -p capybara-tests --bin capybara-bench -- --out FILE [--filter NAME]
//! ```
//!
//! Writes `{"benchmarks":[{"name":…, "value":…, "unit":…}]}` to `--out` (stdout without it) and
//! `report.md` with SVG plots to `--report-dir` (default: the directory of `--out`); progress
//! goes to stderr, under a progress bar. `--quick` runs a subset in about two minutes. See `capybara_tests::bench` for what each benchmark measures.

use std::{io::Write as _, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};
use capybara_tests::{
    bench::{
        self, BenchPins, Figure, GEO_COMPILE_500K_MS, Report, Selection, guard::GuardOptions,
        pipeline::PipelineOptions, report, tunnel::TunnelOptions, vs_nftables::FloodOptions,
    },
    progress,
};
use clap::Parser;

/// Runs Capybara's benchmarks and writes their figures as JSON.
#[derive(Debug, Parser)]
#[command(name = "capybara-bench")]
struct Args {
    /// Write `{"benchmarks":[{"name","value","unit"}]}` to this file (stdout without it).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Run only the benchmarks whose name contains NAME.
    #[arg(long, value_name = "NAME")]
    filter: Option<String>,
    /// Distinct probe packets per round of the XDP and pipeline benchmarks (each run once).
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    probes: usize,
    /// Rounds per XDP and pipeline benchmark; the median round is reported.
    #[arg(long, default_value_t = 7, value_name = "N")]
    rounds: usize,
    /// Seconds of each iperf3 run of the tunnel throughput benchmarks.
    #[arg(long, default_value_t = 10, value_name = "S")]
    iperf_seconds: u32,
    /// TUN offloads of the agent's tunnel in the tunnel benchmark: `on`/`off` (default: what
    /// the daemon uses, `capybara_agent::tunnel::DEFAULT_OFFLOAD`).
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    tunnel_offload: Option<String>,
    /// A subset in about two minutes: the benchmarks in `bench::QUICK`, fewer rounds.
    #[arg(long)]
    quick: bool,
    /// Where `report.md` and the plots go (default: the directory of `--out`; none without).
    #[arg(long, value_name = "DIR")]
    report_dir: Option<PathBuf>,
    /// Rounds of the blocklist flood (each rig once per round).
    #[arg(long, default_value_t = 5, value_name = "N")]
    flood_rounds: usize,
    /// Seconds of each flood.
    #[arg(long, default_value_t = 3.0, value_name = "S")]
    flood_seconds: f64,
    /// List the benchmark names and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.rounds = args.rounds.min(3);
        args.flood_rounds = args.flood_rounds.min(2);
        args.flood_seconds = args.flood_seconds.min(2.0);
        args.iperf_seconds = args.iperf_seconds.min(5);
    }
    if args.list {
        for name in bench::ALL {
            println!("{name}");
        }
        return Ok(());
    }
    let mut sel = Selection::new(args.filter.clone());
    if args.quick {
        sel = sel.only(bench::QUICK);
    }
    let agent_load = bench::agent_load::NAMES
        .iter()
        .any(|n| sel.wants_in(bench::agent_load::GROUP, n))
        || bench::auth_flood::NAMES
            .iter()
            .any(|n| sel.wants_in(bench::auth_flood::GROUP, n))
        || bench::handshake_flood::NAMES
            .iter()
            .any(|n| sel.wants_in(bench::handshake_flood::GROUP, n))
        || bench::tunnel_cpu::NAMES
            .iter()
            .any(|n| sel.wants_in(bench::tunnel_cpu::GROUP, n));
    if !agent_load && !bench::ALL.iter().any(|n| sel.wants(n)) {
        bail!(
            "no benchmark matches --filter {:?}; the benchmarks are: {}",
            args.filter.as_deref().unwrap_or_default(),
            bench::ALL.join(", ")
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("capybara-bench needs root: it loads BPF programs and pins maps in /sys/fs/bpf");
    }
    if args.probes < 20_000 {
        progress!(
            "warning: --probes {} is below the 20000 the benchmark specifies",
            args.probes
        );
    }

    let start = Instant::now();
    let when = now_utc();
    // Declared first, dropped last: every benchmark's fds are closed before the pins go.
    let pins = BenchPins::new()?;
    let mut stages = report::Stages::start(22);
    let mut failures: Vec<report::Failure> = Vec::new();
    stages.next("XDP guard");
    let mut figures: Vec<Figure> = bench::guard::run(
        &sel,
        &pins,
        GuardOptions {
            probes: args.probes,
            rounds: args.rounds,
        },
    )?;
    stages.next("blocklist flood vs nftables and iptables+ipset");
    let (flood, mut docs) = bench::vs_nftables::run(
        &sel,
        pins.path(),
        FloodOptions {
            rounds: args.flood_rounds,
            seconds: args.flood_seconds,
        },
    )?;
    figures.extend(flood);
    stages.next("tunnel-device pipeline");
    figures.extend(bench::pipeline::run(
        &sel,
        &pins,
        PipelineOptions {
            probes: args.probes,
            rounds: args.rounds,
        },
    )?);
    stages.next("throttle accuracy and veth throughput");
    figures.extend(bench::throttle::run(&sel, &pins)?);
    let (throttle, throttle_docs) = bench::vs_tc::run(
        &sel,
        bench::vs_tc::ThrottleOptions {
            runs: if args.quick { 1 } else { bench::vs_tc::RUNS },
            seconds: if args.quick { 5 } else { 10 },
        },
    )?;
    figures.extend(throttle);
    docs.extend(throttle_docs);
    stages.next("enforcement vs nftables + tc, 1k peers");
    let (enforcement, enforcement_docs) = bench::vs_enforcement::run(
        &sel,
        pins.path(),
        bench::vs_enforcement::EnforcementOptions {
            runs: if args.quick {
                1
            } else {
                bench::vs_enforcement::RUNS
            },
            seconds: if args.quick {
                3
            } else {
                bench::vs_enforcement::SECONDS
            },
            flood_seconds: if args.quick { 1.0 } else { 3.0 },
        },
    )?;
    figures.extend(enforcement);
    docs.extend(enforcement_docs);
    stages.next("tunnel throughput");
    figures.extend(bench::tunnel::run(
        &sel,
        &pins,
        TunnelOptions {
            seconds: args.iperf_seconds,
            offload: args
                .tunnel_offload
                .as_deref()
                .map_or(capybara_agent::tunnel::DEFAULT_OFFLOAD, |o| o == "on"),
        },
    )?);
    stages.next("geo compile");
    if sel.wants(GEO_COMPILE_500K_MS) {
        figures.push(bench::geo::compile_500k()?);
    }
    stages.next("agent start-up with 100k peers");
    // The agent may not come up in time with 100k peers: that is a finding, not a reason to
    // lose every other figure of the run.
    match bench::agent_load::run(&sel, pins.path(), if args.quick { 1 } else { 3 }) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("agent start-up benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::agent_load::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("auth flood from spoofed sources");
    match bench::auth_flood::run(&sel, pins.path()) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("auth flood benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::auth_flood::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("handshake flood, blocked and not");
    match bench::handshake_flood::run(&sel, pins.path()) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("handshake flood benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::handshake_flood::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("API load");
    if sel.wants_any(&[
        bench::API_LOAD_P99_MS,
        bench::API_LOAD_P50_MS,
        bench::API_LOAD_CALLS_PER_S,
        bench::API_LOAD_ERRORS,
    ]) {
        figures.extend(
            bench::api_load::run(&pins)?
                .into_iter()
                .filter(|f| sel.wants(f.name)),
        );
    }
    stages.next("REST vs gRPC");
    match bench::rest::run(&sel) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("REST vs gRPC benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::rest::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("policy fan-out and updates");
    let fanout = sel.wants(bench::GROUP_POLICY_FANOUT_10K_MS);
    let updates = sel.wants_any(&[
        bench::POLICY_UPDATE_P99_US,
        bench::POLICY_UPDATE_P50_US,
        bench::POLICY_UPDATE_P99_US_TWO_CORES,
        bench::POLICY_UPDATE_P50_US_TWO_CORES,
    ]);
    if fanout || updates {
        figures.extend(
            bench::policy::run(&pins, fanout, updates)?
                .into_iter()
                .filter(|f| sel.wants(f.name)),
        );
    }
    stages.next("usage report over 10k users");
    match bench::usage_report::run(&sel) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("usage report benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::usage_report::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("webhook delivery");
    match bench::webhooks::run(&sel) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("webhook benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::webhooks::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("webhook latency from the kernel's quota event");
    match bench::webhook_latency::run(&sel, pins.path()) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("webhook latency benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::webhook_latency::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("tunnel CPU per gigabit");
    match bench::tunnel_cpu::run(&sel, &pins) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("tunnel CPU benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::tunnel_cpu::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("tunnel workers, 16 peers");
    match bench::tunnel_workers::run(&sel, if args.quick { 2.0 } else { 5.0 }) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("tunnel workers benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::tunnel_workers::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    // Issue 24.
    stages.next("VLESS endpoint vs v2ray");
    match bench::vless::run(&sel, if args.quick { 2.0 } else { 3.0 }) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("VLESS benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::vless::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("Shadowsocks endpoint against ss-server");
    match bench::shadowsocks::run(&sel) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("shadowsocks benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::shadowsocks::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("one quota spent through WireGuard, Shadowsocks and VLESS");
    match bench::multi_quota::run(&sel) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("multi-protocol quota benchmark failed: {e:#}");
            failures.push(report::Failure {
                group: bench::multi_quota::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    stages.next("a cluster of two nodes on etcd: propagation and a 10k-user change");
    match bench::cluster::run(&sel, &pins) {
        Ok(f) => figures.extend(f),
        Err(e) => {
            progress!("cluster benchmarks failed: {e:#}");
            failures.push(report::Failure {
                group: bench::cluster::NAMES.join(", "),
                error: format!("{e:#}"),
            });
        }
    }
    let stages = stages.finish();
    figures.sort_by_key(|f| bench::ALL.iter().position(|n| *n == f.name));
    docs.sort_by_key(|d| bench::ALL.iter().position(|n| *n == d.benchmark));
    progress!("done in {:.0} s", start.elapsed().as_secs_f64());
    for f in &figures {
        progress!("{:<32} {:>12.3} {}", f.name, f.value, f.unit);
    }

    let report_dir = args.report_dir.clone().or_else(|| {
        args.out.as_ref().and_then(|o| o.parent()).map(|p| {
            if p.as_os_str().is_empty() {
                ".".into()
            } else {
                p.to_path_buf()
            }
        })
    });
    if let Some(dir) = report_dir {
        let path = report::write(
            &dir,
            &figures,
            &docs,
            &failures,
            &stages,
            &report::Machine::current(),
            &when,
        )?;
        progress!("wrote {}", path.display());
    }

    let json = serde_json::to_string_pretty(&Report {
        benchmarks: figures,
    })?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, json + "\n")
                .with_context(|| format!("write {}", path.display()))?;
            progress!("wrote {}", path.display());
        }
        None => writeln!(std::io::stdout(), "{json}")?,
    }
    Ok(())
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC` (from `date`, which every system has).
fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "(unknown time)".into())
}
