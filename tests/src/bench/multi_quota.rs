//! `multi_protocol_quota_overshoot_bytes` (issue 24): how far past its cutoff one user's quota
//! is charged when WireGuard, Shadowsocks and VLESS spend it at once.
//!
//! ## Method
//! The lab of `e2e_proxies` ([`crate::proxied`]): the release `capybara-agent` and `capybara`
//! (next to this binary) in a namespace with both proxy endpoints, alice's real clients
//! (`wireguard-go`, `ss-local`, `v2ray`, started with the configs the agent printed) in
//! another. Each of [`ROUNDS`] rounds sets a 10 MB quota, starts a new period (`quota reset`) and runs
//! three endless downloads at once, one per protocol, until nothing more arrives for 2 s
//! ([`crate::proxied::spend_quota`]). The figure is the worst round's `used − cutoff` of
//! `capybara quota show` (the kernel's own charge); `multi_protocol_quota_overshoot_bound_bytes`
//! is the bound the kernel states (one 64 KiB super-packet and its headers per CPU), which the
//! report shows as its same-run baseline.
//!
//! No reference server to compare with here: the userspace panels the issue names (Outline,
//! Xray's panels) count per user in the proxy and check every few seconds to an hour, so their
//! overshoot is the traffic of that interval (at the 0.8–1 Gbit/s these downloads reach, about
//! 100 MB per second of interval), not a figure of the same kind.
//!
//! `cargo xtask bench --filter multi_protocol_quota` runs this module alone.

use anyhow::{Context as _, Result, anyhow, ensure};

use super::{Figure, Selection};
use crate::{
    agent_proc::bench_agent_binary,
    lab::Lab,
    progress,
    proxied::{Proxied, quota_bound, spend_quota},
};

/// The worst round's bytes charged past the cutoff.
pub const MULTI_PROTOCOL_QUOTA_OVERSHOOT_BYTES: &str = "multi_protocol_quota_overshoot_bytes";
/// The kernel's stated bound on it, on this machine.
pub const MULTI_PROTOCOL_QUOTA_OVERSHOOT_BOUND_BYTES: &str =
    "multi_protocol_quota_overshoot_bound_bytes";
/// The figures of this module.
pub const NAMES: &[&str] = &[
    MULTI_PROTOCOL_QUOTA_OVERSHOOT_BYTES,
    MULTI_PROTOCOL_QUOTA_OVERSHOOT_BOUND_BYTES,
];
/// Rounds (a new quota period each).
pub const ROUNDS: usize = 3;
/// The lab's veth and tunnel networks.
const NETS: (u8, u8) = (223, 225);

/// Runs the module if the selection wants any of its figures.
pub fn run(sel: &Selection) -> Result<Vec<Figure>> {
    if !sel.wants_any(NAMES) {
        return Ok(Vec::new());
    }
    let bin = bench_agent_binary()?;
    let cli = bin.with_file_name("capybara");
    ensure!(
        cli.exists(),
        "{} missing: `cargo xtask bench` builds it",
        cli.display()
    );
    // The lab's helpers panic with what they saw (they are the end-to-end tests'); here that
    // is the stage's error.
    let rounds = std::panic::catch_unwind(move || {
        let p = Proxied::start(Lab::with_binaries(bin, cli, NETS.0, NETS.1));
        (0..ROUNDS)
            .map(|_| spend_quota(&p, "10MB"))
            .collect::<Vec<_>>()
    })
    .map_err(|e| {
        let what = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        anyhow!("the lab failed: {what}")
    })?;
    let worst = rounds
        .iter()
        .max_by_key(|r| r.used.saturating_sub(r.cutoff))
        .context("no round")?;
    for r in &rounds {
        progress!(
            "multi-protocol quota: charged {} past the cutoff {} ({:?} delivered), stopped \
             after {:?}",
            r.used as i64 - r.cutoff as i64,
            r.cutoff,
            r.per,
            r.stopped_after
        );
        ensure!(r.exceeding, "a round did not spend the quota: {r:?}");
    }
    Ok([
        (
            MULTI_PROTOCOL_QUOTA_OVERSHOOT_BYTES,
            worst.used.saturating_sub(worst.cutoff) as f64,
        ),
        (
            MULTI_PROTOCOL_QUOTA_OVERSHOOT_BOUND_BYTES,
            (quota_bound(worst.cutoff) - worst.cutoff) as f64,
        ),
    ]
    .into_iter()
    .filter(|(name, _)| sel.wants(name))
    .map(|(name, value)| Figure {
        name,
        value,
        unit: "bytes",
    })
    .collect())
}
