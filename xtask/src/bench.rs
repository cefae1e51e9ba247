//! `cargo xtask bench`: build in release, run `capybara-bench` (a binary of the tests crate),
//! print its figures as a table and copy its JSON to `--json FILE`.
//!
//! The binary writes `{"benchmarks":[{"name":…, "value":…, "unit":…}]}` to the file given by
//! `--out` (here `<target>/bench/capybara-bench.json`); `--filter NAME` and anything after `--`
//! are passed to it. Benchmark names and this JSON shape are what reports and CI compare across
//! runs: keep them stable. The binary also writes `report.md` and SVG plots next to the JSON
//! (`<target>/bench/`); `--quick` runs its two-minute subset.
use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::exec::{self, cmd};
use crate::setup;

/// The package and binary that run the benchmarks.
const PACKAGE: &str = "capybara-tests";
const BINARY: &str = "capybara-bench";

/// Flags of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also write the results, as `{"benchmarks":[{"name","value","unit"}]}`, to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run only the benchmarks whose name contains NAME (passed to the benchmark binary).
    #[arg(long, value_name = "NAME")]
    filter: Option<String>,
    /// Run the quick subset (about two minutes) instead of every benchmark.
    #[arg(long)]
    quick: bool,
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    no_setup: bool,
    /// More arguments for the benchmark binary, after `--`.
    #[arg(last = true, value_name = "BENCH ARGS")]
    bench_args: Vec<String>,
}

/// The JSON the benchmark binary writes.
#[derive(Debug, Deserialize)]
struct Report {
    benchmarks: Vec<Benchmark>,
}

/// One figure: a stable name, its value and its unit (`ns`, `ms`, `ratio`, …).
#[derive(Debug, Deserialize)]
struct Benchmark {
    name: String,
    value: f64,
    unit: String,
}

/// Entry point of `cargo xtask bench`.
pub fn run(args: &Args) -> Result<()> {
    if !exec::is_root() {
        bail!("`cargo xtask bench` needs root: the benchmarks load BPF programs");
    }
    ensure_bench_binary()?;
    if !args.no_setup {
        setup::run(&setup::Args {})?;
    }
    let out_dir = exec::target_dir()?.join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let out = out_dir.join(format!("{BINARY}.json"));
    // A previous run's JSON, report and plots: never mistaken for this run's.
    for entry in fs::read_dir(&out_dir).with_context(|| format!("read {}", out_dir.display()))? {
        let path = entry?.path();
        let stale = path == out
            || path.file_name().is_some_and(|n| n == "report.md")
            || path.extension().is_some_and(|e| e == "svg");
        if stale {
            fs::remove_file(&path).with_context(|| format!("remove stale {}", path.display()))?;
        }
    }

    // `agent_load` starts the agent binary, found next to the bench binary. Both are built by one
    // cargo invocation: built apart, the agent crate is compiled twice (once with the features
    // the tests crate adds, once without), which cost 2 minutes of every run.
    exec::run(cmd("cargo").args([
        "build",
        "--release",
        "-p",
        "capybara-agent",
        "--bin",
        "capybara-agent",
        // The CLI drives the lab of the `multi_protocol_quota_*` benchmark.
        "--bin",
        "capybara",
        "-p",
        PACKAGE,
        "--bin",
        BINARY,
    ]))?;
    let mut command = cmd(exec::target_dir()?.join("release").join(BINARY));
    command.arg("--out").arg(&out);
    if let Some(filter) = &args.filter {
        command.args(["--filter", filter]);
    }
    if args.quick {
        command.arg("--quick");
    }
    exec::run(command.args(&args.bench_args))?;

    let text = fs::read_to_string(&out)
        .with_context(|| format!("{BINARY} succeeded but wrote no {}", out.display()))?;
    let report: Report = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not {{\"benchmarks\":[{{\"name\",\"value\",\"unit\"}}]}}",
            out.display()
        )
    })?;
    print_table(&report.benchmarks);
    let md = out_dir.join("report.md");
    if md.exists() {
        eprintln!("bench: report and plots in {}", md.display());
    }
    if let Some(json) = &args.json {
        if let Some(parent) = json.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
        fs::copy(&out, json)
            .with_context(|| format!("copy {} to {}", out.display(), json.display()))?;
        eprintln!("bench: wrote {}", json.display());
    }
    Ok(())
}

/// Fail clearly, before building anything, when the tests crate has no benchmark binary.
fn ensure_bench_binary() -> Result<()> {
    let metadata = exec::cargo_metadata()?;
    let package = metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["name"] == PACKAGE))
        .with_context(|| format!("no package {PACKAGE} in the workspace"))?;
    let has_binary = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|target| {
            target["name"] == BINARY
                && target["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"))
        });
    if !has_binary {
        bail!(
            "the benchmark binary `{BINARY}` does not exist yet: {PACKAGE} has no [[bin]] \
             `{BINARY}` (expected at tests/src/bin/{BINARY}.rs); nothing to run"
        );
    }
    Ok(())
}

/// The results as an aligned table on stdout.
fn print_table(benchmarks: &[Benchmark]) {
    if benchmarks.is_empty() {
        println!("no benchmarks ran");
        return;
    }
    let values: Vec<String> = benchmarks.iter().map(|b| format_value(b.value)).collect();
    let name_width = benchmarks
        .iter()
        .map(|b| b.name.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let value_width = values.iter().map(String::len).chain([5]).max().unwrap_or(5);
    println!("{:<name_width$}  {:>value_width$}  unit", "name", "value");
    for (bench, value) in benchmarks.iter().zip(&values) {
        println!(
            "{:<name_width$}  {value:>value_width$}  {}",
            bench.name, bench.unit
        );
    }
}

/// Integers as integers, small figures with enough digits to compare.
fn format_value(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else if value.abs() >= 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}
