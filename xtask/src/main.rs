//! `cargo xtask`: the one entry point for developers and CI (the alias lives in
//! `.cargo/config.toml`).
//!
//! ```text
//! cargo xtask setup   install what a fresh Debian 12 machine lacks (idempotent)
//! cargo xtask test    setup, then fmt, clippy (host, eBPF), unit, BPF_PROG_TEST_RUN, end-to-end
//! cargo xtask run     setup, build, start the agent (in a namespace of its own by default)
//! cargo xtask bench   setup, build, run `capybara-bench`, print a table, copy the JSON
//! cargo xtask policy  apply FILE [--dry-run] | diff FILE | export [--file F] (via the agent's API)
//! cargo xtask geoip   fetch the country database into the cache (part of setup)
//! cargo xtask install [--prefix DIR]  release binaries, systemd unit, agent.toml, man pages, completions
//! ```
//!
//! Layout: one module per subcommand, each with its clap `Args` and a `run` function:
//! - `setup`: Debian packages, nightly `rust-src`, bpf-linker against nightly's libLLVM,
//!   boringtun-cli, bpffs. Everything is checked before anything is done.
//! - `test`: the test pipeline, stage by stage, stopping at the first failure.
//! - `run`: network namespace + veth pair, the agent in the foreground, signal forwarding,
//!   cleanup.
//! - `bench`: the benchmark binary and its `{"benchmarks":[…]}` JSON.
//! - `policy`: the declarative policy file: builds the `capybara` CLI and hands it its arguments
//!   (`capybara policy …`, which talks to the gRPC API).
//! - `geoip`: the country database (pinned npm tarball, SHA-512 checked) into the cache.
//! - `install`: the agent as a systemd service (binaries, unit, configuration file, man pages,
//!   completions), idempotent; `--prefix` keeps it inside one directory.
//! - `exec`: shared plumbing: every external command goes through it, is echoed as
//!   `$ program args…` before it runs, and gets `PATH` with `<cache>/tools/bin` in front.
//!   Paths (workspace root, cache dir, target dir) live there too.
mod bench;
mod exec;
mod fuzz;
mod geoip;
mod install;
mod policy;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Capybara's developer tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what this machine lacks: Debian packages, nightly rust-src, bpf-linker,
    /// boringtun-cli; mount bpffs. A second run does nothing.
    Setup(setup::Args),
    /// Run setup, then fmt, clippy, unit tests, BPF_PROG_TEST_RUN tests and the privileged
    /// end-to-end tests, stopping at the first failure.
    Test(test::Args),
    /// Run setup, build the agent and start it in the foreground (Ctrl-C stops it).
    Run(run::Args),
    /// Build in release and run the benchmarks; print a table and optionally save the JSON.
    Bench(bench::Args),
    /// Apply, diff or export the declarative policy file through the agent's API.
    Policy(policy::Args),
    /// Run the parsers' fuzz targets, each for a bounded time.
    Fuzz(fuzz::Args),
    /// Fetch the country database for `geo block/allow` into the cache (setup's geo step on
    /// its own; a second run does nothing).
    Geoip(geoip::Args),
    /// Build the release binaries and install them as a systemd service, with agent.toml,
    /// man pages and shell completions (`--prefix DIR`: all under DIR).
    Install(install::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(args) => setup::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Policy(args) => policy::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Geoip(args) => geoip::run(&args),
        Command::Install(args) => install::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The chain of contexts on one line each, without a backtrace: xtask's errors say
            // which command failed, which is what the reader needs.
            exec::say(format_args!("error: {err}"));
            for cause in err.chain().skip(1) {
                exec::say(format_args!("  caused by: {cause}"));
            }
            ExitCode::FAILURE
        }
    }
}
