//! `cargo xtask fuzz [--time SECS] [TARGET…]`: runs the fuzz targets of the agent's parsers
//! of outside input (the `capybara-fuzz` crate, `fuzz/tests/targets.rs`, bolero) one after the
//! other, each for `--time` seconds (default 60), all of them unless some are named.
//!
//! The targets run as the crate's tests (bolero's random engine under `cargo test`: no extra
//! tool, no nightly), built once first. A target still running [`GRACE`] after its time is
//! killed and the run fails: an input that hangs a parser is a finding. `cargo xtask test`
//! runs every target for [`SMOKE_SECS`] in its `fuzz` stage.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::exec::{self, cmd};

/// The fuzz crate.
const CRATE: &str = "capybara-fuzz";
/// Its test file holding the targets.
const TEST: &str = "targets";
/// Every target, one per parser (`fuzz/tests/targets.rs` says what each feeds).
pub const TARGETS: [&str; 8] = [
    "policy_yaml",
    "template_yaml",
    "cidr",
    "window",
    "mmdb",
    "uapi",
    "cron",
    "intel_list",
];
/// Seconds per target in `cargo xtask test`'s smoke stage (eight targets: ~16 s plus the build).
pub const SMOKE_SECS: u64 = 2;
/// How long a target may run past its time (start-up, the seeds, the last input) before it
/// counts as hung.
const GRACE: Duration = Duration::from_secs(30);

/// Flags of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Run only these targets (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
}

/// Entry point of `cargo xtask fuzz`.
pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    run_targets(&targets, args.time)
}

/// Builds the targets, then runs each of `targets` for `secs` seconds.
pub fn run_targets(targets: &[&str], secs: u64) -> Result<()> {
    exec::run(cmd("cargo").args(["test", "-p", CRATE, "--test", TEST, "--no-run"]))?;
    for target in targets {
        let mut command = cmd("cargo");
        command
            .args(["test", "-p", CRATE, "--test", TEST, "--", "--exact"])
            .arg(target)
            .args(["--nocapture", "--test-threads=1"])
            .env("CAPYBARA_FUZZ_SECS", secs.to_string());
        exec::echo(&command);
        let mut child = command.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(secs) + GRACE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "fuzz target {target} still running {GRACE:?} after its {secs} s: an input hangs it"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        exec::check(&command, status)?;
    }
    Ok(())
}
