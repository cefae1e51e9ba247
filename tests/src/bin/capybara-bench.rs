//! `capybara-bench`: the benchmarks behind `cargo xtask bench` (root required: they load BPF
//! programs and pin maps under `/sys/fs/bpf/capybench-<pid>`, removed at the end).
//!
//! ```text
//! cargo run --release -p capybara-tests --bin capybara-bench -- --out FILE [--filter NAME]
//! ```
//!
//! Writes `{"benchmarks":[{"name":…, "value":…, "unit":…}]}` to `--out` (stdout without it);
//! progress goes to stderr. See `capybara_tests::bench` for what each benchmark measures.

use std::{io::Write as _, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};
use capybara_tests::{
    bench::{
        self, BenchPins, Figure, GEO_COMPILE_500K_MS, Report, Selection, guard::GuardOptions,
        pipeline::PipelineOptions, tunnel::TunnelOptions,
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
    /// List the benchmark names and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.list {
        for name in bench::ALL {
            println!("{name}");
        }
        return Ok(());
    }
    let sel = Selection::new(args.filter.clone());
    if !bench::ALL.iter().any(|n| sel.wants(n)) {
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
    // Declared first, dropped last: every benchmark's fds are closed before the pins go.
    let pins = BenchPins::new()?;
    let mut figures: Vec<Figure> = bench::guard::run(
        &sel,
        &pins,
        GuardOptions {
            probes: args.probes,
            rounds: args.rounds,
        },
    )?;
    figures.extend(bench::pipeline::run(
        &sel,
        &pins,
        PipelineOptions {
            probes: args.probes,
            rounds: args.rounds,
        },
    )?);
    figures.extend(bench::throttle::run(&sel, &pins)?);
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
    if sel.wants(GEO_COMPILE_500K_MS) {
        figures.push(bench::geo::compile_500k()?);
    }
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
    let fanout = sel.wants(bench::GROUP_POLICY_FANOUT_10K_MS);
    let updates = sel.wants_any(&[bench::POLICY_UPDATE_P99_US, bench::POLICY_UPDATE_P50_US]);
    if fanout || updates {
        figures.extend(
            bench::policy::run(&pins, fanout, updates)?
                .into_iter()
                .filter(|f| sel.wants(f.name)),
        );
    }
    figures.sort_by_key(|f| bench::ALL.iter().position(|n| *n == f.name));
    progress!("done in {:.0} s", start.elapsed().as_secs_f64());
    for f in &figures {
        progress!("{:<32} {:>12.3} {}", f.name, f.value, f.unit);
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
