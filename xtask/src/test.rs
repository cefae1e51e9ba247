//! `cargo xtask test`: setup, then every check CI runs, in order, stopping at the first failure.
//!
//! Stages (`--only` picks some): fmt, clippy on the host crates, clippy on the eBPF crate
//! (nightly, bpfel target), unit tests of the host crates, the fuzz targets for a few seconds
//! each (`fuzz`, see `fuzz.rs`), BPF_PROG_TEST_RUN tests, and the
//! privileged end-to-end tests (one at a time). All stages share one target dir (cargo honours
//! `CARGO_TARGET_DIR`). Tests run under cargo-nextest when it is installed, else `cargo test`;
//! either way the last stage is one runner invocation, so its summary is the last output.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::exec::{self, cmd};
use crate::{fuzz, setup};

/// The crate of privileged tests, left out of the host stages.
const TESTS_CRATE: &str = "capybara-tests";
/// The kernel crate, built only for bpfel-unknown-none.
const EBPF_CRATE: &str = "capybara-ebpf";
/// The fuzz targets: their own stage.
const FUZZ_CRATE: &str = "capybara-fuzz";
/// The one integration-test binary of the tests crate (`tests/it/main.rs`).
const IT: &str = "it";
/// The module of `it` that holds the BPF_PROG_TEST_RUN tests: its own stage; every other test
/// of the tests crate is in the e2e stage.
const PROG_TEST_RUN: &str = "prog_test_run::";

/// One step of the pipeline, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Stage {
    /// `cargo fmt --all --check`.
    Fmt,
    /// Clippy with `-D warnings` on the host crates, all targets.
    Clippy,
    /// Clippy with `-D warnings` on the eBPF crate (nightly, bpfel-unknown-none).
    ClippyEbpf,
    /// Unit tests (and doc tests) of the host crates.
    Unit,
    /// The fuzz targets, a few seconds each (`cargo xtask fuzz` for longer runs).
    Fuzz,
    /// BPF_PROG_TEST_RUN tests (root).
    ProgTestRun,
    /// Privileged end-to-end tests in network namespaces, serially (root).
    E2e,
}

impl Stage {
    const ALL: [Stage; 7] = [
        Stage::Fmt,
        Stage::Clippy,
        Stage::ClippyEbpf,
        Stage::Unit,
        Stage::Fuzz,
        Stage::ProgTestRun,
        Stage::E2e,
    ];

    fn name(self) -> &'static str {
        match self {
            Stage::Fmt => "fmt",
            Stage::Clippy => "clippy",
            Stage::ClippyEbpf => "clippy-ebpf",
            Stage::Unit => "unit",
            Stage::Fuzz => "fuzz",
            Stage::ProgTestRun => "prog-test-run",
            Stage::E2e => "e2e",
        }
    }

    fn needs_root(self) -> bool {
        matches!(self, Stage::ProgTestRun | Stage::E2e)
    }
}

/// Flags of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Do not run `cargo xtask setup` first.
    #[arg(long)]
    no_setup: bool,
    /// Run only these stages (repeat the flag or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Stage>,
    /// Use `cargo test` even when cargo-nextest is installed.
    #[arg(long)]
    no_nextest: bool,
}

/// Which test runner runs the test stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Nextest,
    CargoTest,
}

/// Entry point of `cargo xtask test`.
pub fn run(args: &Args) -> Result<()> {
    if !args.no_setup {
        setup::run(&setup::Args {})?;
    }
    let stages: Vec<Stage> = if args.only.is_empty() {
        Stage::ALL.to_vec()
    } else {
        let mut only = args.only.clone();
        only.sort();
        only.dedup();
        only
    };
    let runner = if args.no_nextest || !nextest_installed() {
        Runner::CargoTest
    } else {
        Runner::Nextest
    };
    let total = stages.len();
    for (index, stage) in stages.into_iter().enumerate() {
        eprintln!("\n==> [{}/{total}] {}", index + 1, stage.name());
        if stage.needs_root() && !exec::is_root() {
            bail!(
                "test stage `{}` needs root (BPF and network namespaces)",
                stage.name()
            );
        }
        run_stage(stage, runner).with_context(|| {
            format!(
                "test stage `{}` failed{}",
                stage.name(),
                if index == 0 {
                    String::new()
                } else {
                    format!(" (after {index} passed)")
                }
            )
        })?;
    }
    Ok(())
}

fn nextest_installed() -> bool {
    exec::output_unchecked(cmd("cargo").args(["nextest", "--version"]))
        .is_ok_and(|out| out.status.success())
}

fn run_stage(stage: Stage, runner: Runner) -> Result<()> {
    match stage {
        Stage::Fmt => exec::run(cmd("cargo").args(["fmt", "--all", "--check"])),
        Stage::Clippy => exec::run(
            cmd("cargo")
                .args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    EBPF_CRATE,
                    "--all-targets",
                ])
                .args(["--", "-D", "warnings"]),
        ),
        Stage::ClippyEbpf => exec::run(
            cmd("cargo")
                .current_dir(exec::workspace_root().join(EBPF_CRATE))
                .args([
                    "+nightly",
                    "clippy",
                    "-p",
                    EBPF_CRATE,
                    "--target",
                    "bpfel-unknown-none",
                ])
                .args(["-Z", "build-std=core", "--", "-D", "warnings"]),
        ),
        Stage::Unit => {
            let host = [
                "--workspace",
                "--exclude",
                EBPF_CRATE,
                "--exclude",
                TESTS_CRATE,
                // Its targets are the fuzz stage.
                "--exclude",
                FUZZ_CRATE,
            ];
            match runner {
                Runner::Nextest => {
                    // nextest does not run doc tests; run them first so nextest's summary
                    // stays the last line.
                    exec::run(cmd("cargo").args(["test", "--doc"]).args(host))?;
                    exec::run(cmd("cargo").args(["nextest", "run"]).args(host))
                }
                Runner::CargoTest => exec::run(cmd("cargo").arg("test").args(host)),
            }
        }
        Stage::Fuzz => fuzz::run_targets(&fuzz::TARGETS, fuzz::SMOKE_SECS),
        Stage::ProgTestRun => {
            let mut command = test_command(runner);
            command.args(["-p", TESTS_CRATE, "--test", IT]);
            match runner {
                Runner::Nextest => command.arg("-E").arg(prog_test_run_filter()),
                Runner::CargoTest => command.args(["--", PROG_TEST_RUN]),
            };
            exec::run(&mut command)
        }
        Stage::E2e => match runner {
            Runner::Nextest => exec::run(
                test_command(runner)
                    .args(["-p", TESTS_CRATE, "--test-threads", "1", "-E"])
                    .arg(format!("not ({})", prog_test_run_filter())),
            ),
            Runner::CargoTest => exec::run(
                test_command(runner)
                    .args(["-p", TESTS_CRATE, "--lib", "--bins", "--test", IT])
                    .args(["--", "--skip", PROG_TEST_RUN, "--test-threads=1"]),
            ),
        },
    }
}

/// The nextest filter expression of the BPF_PROG_TEST_RUN tests.
fn prog_test_run_filter() -> String {
    format!("binary_id({TESTS_CRATE}::{IT}) and test(/^{PROG_TEST_RUN}/)")
}

/// `cargo nextest run` or `cargo test`.
fn test_command(runner: Runner) -> Command {
    let mut command = cmd("cargo");
    match runner {
        Runner::Nextest => command.args(["nextest", "run"]),
        Runner::CargoTest => command.arg("test"),
    };
    command
}
