//! `handshake_flood_cpu_ratio`: what the XDP guard saves the agent under a flood of invalid
//! handshake initiations (issue 22): the agent's CPU time with the flood's sources in a blocked
//! source list (the guard drops them before the socket) over its CPU time under the same flood
//! with the guard not blocking them (the agent's `wg-udp` thread reads each datagram and checks
//! its MAC), same agent, same run. Target ≤ 0.1.
//!
//! ## Method
//! [`crate::auth_flood`]'s rig with the guard ([`FloodRig::start_guarded`]: `capybara-agent`,
//! release, next to this binary, in a namespace of its own with `--uplink` on its end of the
//! veth, the reputation engine off so that nothing but the list decides), and its generator:
//! handshake initiations (148 bytes, type 1, random MACs) through a raw socket with `sendmmsg`
//! from [`SOURCES`] addresses of `198.18.0.0/15` (the benchmarking range), paced to [`PPS`] for
//! [`FLOOD`]. First the flood with no list (the guard passes it: the agent does the handshake
//! work), then `198.18.0.0/15` added to the `manual` source list over the control socket and
//! the same flood again. Each phase's agent CPU is user + system time of all its threads
//! (`/proc/PID/stat`) over the flood's wall time:
//!
//! - `handshake_flood_cpu_share_unblocked`, `handshake_flood_cpu_share_blocked`: cores;
//! - `handshake_flood_cpu_ratio`: blocked / unblocked;
//! - `handshake_flood_pps`: the rate sent (the slower phase's).
//!
//! XDP runs in the receiving CPU's softirq, charged to whatever task it interrupted (the
//! sender, or nobody), never to the agent: the blocked phase's agent CPU is its idle cost.
//! `cargo xtask bench --filter handshake_flood` runs this module alone (≈ 25 s).
//!
//! ## Figures
//! Two runs (release, AMD EPYC, 2 cores shared with other builds at load average ~7, Linux
//! 6.18, 2026-12-07): 50 000 pps from 20 000 sources for 8 s each phase; the agent took 0.169
//! and 0.167 cores with the guard passing the flood (its `wg-udp` thread reading each datagram
//! and checking its MAC) and 0.0012 cores with the sources blocked: `handshake_flood_cpu_ratio`
//! **0.0074** and **0.0075** (target ≤ 0.1).

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context as _, Result};

use super::{Figure, Selection};
use crate::{
    auth_flood::{FloodRig, PORT, flood},
    progress,
};

/// Blocked over unblocked agent CPU.
pub const HANDSHAKE_FLOOD_CPU_RATIO: &str = "handshake_flood_cpu_ratio";
/// The agent's CPU with the sources blocked, cores.
pub const HANDSHAKE_FLOOD_CPU_SHARE_BLOCKED: &str = "handshake_flood_cpu_share_blocked";
/// The agent's CPU with the sources not blocked, cores.
pub const HANDSHAKE_FLOOD_CPU_SHARE_UNBLOCKED: &str = "handshake_flood_cpu_share_unblocked";
/// Datagrams sent per second.
pub const HANDSHAKE_FLOOD_PPS: &str = "handshake_flood_pps";

/// This module's name for `--filter`.
pub const GROUP: &str = "handshake_flood";

/// Every figure of this module, in report order.
pub const NAMES: &[&str] = &[
    HANDSHAKE_FLOOD_CPU_RATIO,
    HANDSHAKE_FLOOD_CPU_SHARE_BLOCKED,
    HANDSHAKE_FLOOD_CPU_SHARE_UNBLOCKED,
    HANDSHAKE_FLOOD_PPS,
];

/// Datagrams per second.
pub const PPS: u64 = 50_000;
/// Distinct sources.
pub const SOURCES: usize = 20_000;
/// Each phase.
const FLOOD: Duration = Duration::from_secs(8);
/// The blocked range.
const BLOCKED: &str = "198.18.0.0/15";

/// `n` addresses spread over `198.18.0.0/15`.
fn sources(n: usize) -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    (0..n as u32)
        .map(|i| Ipv4Addr::from(base + (i.wrapping_mul(2_654_435_761) % (1 << 17))))
        .collect()
}

/// Adds `198.18.0.0/15` to the `manual` source list over the agent's control socket.
fn block(socket: &Path) -> Result<()> {
    use capybara_agent::{
        api::client::{Client, Endpoint},
        blocklist::Direction,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = Client::connect(&Endpoint::Unix(socket.to_owned())).await?;
        c.change_entries(Direction::Source, "manual", vec![BLOCKED.into()], true)
            .await?;
        anyhow::Ok(())
    })
}

/// Runs the module (see the module docs) if the selection wants any of its figures.
pub fn run(sel: &Selection, pins: &Path) -> Result<Vec<Figure>> {
    if !NAMES.iter().any(|n| sel.wants_in(GROUP, n)) {
        return Ok(Vec::new());
    }
    let bin = crate::agent_proc::bench_agent_binary()?;
    let work = tempfile::tempdir()?;
    let mut rig = FloodRig::start_guarded(&bin, work.path(), pins, 193)?;
    std::thread::sleep(Duration::from_secs(1));
    let srcs = sources(SOURCES);
    let phase = |rig: &FloodRig| -> Result<(f64, f64)> {
        let c0 = rig.agent_cpu()?;
        let stats = flood(&rig.sender_ns, &srcs, rig.veth.a.v4, PORT, PPS, FLOOD)?;
        let cpu = (rig.agent_cpu()? - c0).as_secs_f64() / stats.elapsed.as_secs_f64();
        Ok((cpu, stats.sent as f64 / stats.elapsed.as_secs_f64()))
    };
    let (unblocked, pps_a) = phase(&rig)?;
    block(
        rig.socket
            .as_deref()
            .context("the rig has no control socket")?,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let (blocked, pps_b) = phase(&rig)?;
    rig.stop();
    let ratio = blocked / unblocked;
    progress!(
        "handshake flood: {:.0} pps; agent {unblocked:.3} cores with the guard passing the \
         flood, {blocked:.4} with the sources blocked: ratio {ratio:.4}",
        pps_a.min(pps_b)
    );
    let figures = vec![
        Figure {
            name: HANDSHAKE_FLOOD_CPU_RATIO,
            value: ratio,
            unit: "ratio",
        },
        Figure {
            name: HANDSHAKE_FLOOD_CPU_SHARE_BLOCKED,
            value: blocked,
            unit: "ratio",
        },
        Figure {
            name: HANDSHAKE_FLOOD_CPU_SHARE_UNBLOCKED,
            value: unblocked,
            unit: "ratio",
        },
        Figure {
            name: HANDSHAKE_FLOOD_PPS,
            value: pps_a.min(pps_b),
            unit: "pps",
        },
    ];
    Ok(figures
        .into_iter()
        .filter(|f| sel.wants_in(GROUP, f.name))
        .collect())
}
