//! `auth_flood_store_bytes_per_min` and `auth_flood_agent_cpu_share`: the agent under a flood
//! of failed handshakes from 100 000 spoofed sources a second (issue 19).
//!
//! ## Method
//! [`crate::auth_flood`]: `capybara-agent` (release, next to this binary) in a namespace of its
//! own, a sender namespace over a veth, reverse-path filtering off. The sender writes
//! handshake initiations (148 bytes, type 1, random MACs) from 100 000 random IPv4 sources
//! (nearly all in distinct /24s; 2 % from one /24, `192.0.2.0/24`) through a raw socket with
//! `sendmmsg`, paced to [`PPS`] for [`FLOOD`]: every second, 100 000 sources the agent has not
//! seen in that second.
//!
//! - `auth_flood_store_bytes_per_min`: growth of the agent's data directory (every file:
//!   RocksDB's WAL, tables, logs) during the flood plus the 12 s after it (the last flush and
//!   the recorder's drain), per minute of flood.
//! - `auth_flood_agent_cpu_share`: the agent's CPU time (user + system, `/proc/PID/stat`, all
//!   threads) during the flood over its wall time: 1.0 = one core busy.
//!
//! **Baselines, same run**: the old per-source behaviour is gone, so the flood is compared
//! with (a) the same agent idle for the same time before the flood
//! (`auth_flood_agent_cpu_share_idle`) and (b) the generator's own cost
//! (`auth_flood_sender_cpu_share`, its thread's CPU over the same wall time: what putting the
//! packets on the wire costs, the floor of any receiver's cost). `auth_flood_pps` is the rate
//! sent, `auth_flood_records_per_min` the auth records the store holds afterwards per minute.
//! The bound the agent keeps (`capybara_agent::tunnel::auth_table`): at most 24 records per
//! 10 s (144 a minute) whatever the flood; the CPU is the agent's `wg-udp` thread doing a MAC
//! check (BLAKE2s) and one hash-table probe per datagram.
//!
//! `cargo xtask bench --filter auth_flood` runs this module alone.
//!
//! ## Figures
//! One run (release, AMD EPYC, 2 cores shared with other builds, Linux 6.18, 2026-12-07):
//! 100 000 pps for 30 s (3 000 000 datagrams, every one counted in the records: the counts
//! added up to 3 000 000), `auth_flood_store_bytes_per_min` **25 KB/min** (136 records a
//! minute, bound 144), `auth_flood_agent_cpu_share` **0.30** cores against 0.000 idle and 0.45
//! for the generator itself. Before the fix the same flood meant up to 4 096 synced records
//! per 10 s (a table scan per new source on the UDP thread) and a log line each.

use std::{path::Path, time::Duration};

use anyhow::Result;

use super::{Figure, Selection};
use crate::{
    auth_flood::{FloodRig, PORT, auth_records, dir_bytes, flood, sources},
    progress,
};

/// Store growth under the flood, bytes per minute.
pub const AUTH_FLOOD_STORE_BYTES_PER_MIN: &str = "auth_flood_store_bytes_per_min";
/// The agent's CPU under the flood, cores.
pub const AUTH_FLOOD_AGENT_CPU_SHARE: &str = "auth_flood_agent_cpu_share";
/// The agent's CPU idle, same run, cores.
pub const AUTH_FLOOD_AGENT_CPU_SHARE_IDLE: &str = "auth_flood_agent_cpu_share_idle";
/// The generator's CPU, same run, cores.
pub const AUTH_FLOOD_SENDER_CPU_SHARE: &str = "auth_flood_sender_cpu_share";
/// Datagrams sent per second.
pub const AUTH_FLOOD_PPS: &str = "auth_flood_pps";
/// Auth records stored per minute of flood.
pub const AUTH_FLOOD_RECORDS_PER_MIN: &str = "auth_flood_records_per_min";

/// This module's name for `--filter`.
pub const GROUP: &str = "auth_flood";

/// Every figure of this module, in report order.
pub const NAMES: &[&str] = &[
    AUTH_FLOOD_STORE_BYTES_PER_MIN,
    AUTH_FLOOD_AGENT_CPU_SHARE,
    AUTH_FLOOD_AGENT_CPU_SHARE_IDLE,
    AUTH_FLOOD_SENDER_CPU_SHARE,
    AUTH_FLOOD_PPS,
    AUTH_FLOOD_RECORDS_PER_MIN,
];

/// Spoofed sources per second.
pub const PPS: u64 = 100_000;
/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(30);
/// After the flood: the last flush (10 s) and the recorder's drain (1 s).
const AFTER: Duration = Duration::from_secs(12);

/// Runs the module (see the module docs) if the selection wants any of its figures.
pub fn run(sel: &Selection, pins: &Path) -> Result<Vec<Figure>> {
    if !NAMES.iter().any(|n| sel.wants_in(GROUP, n)) {
        return Ok(Vec::new());
    }
    let bin = crate::agent_proc::bench_agent_binary()?;
    let work = tempfile::tempdir()?;
    let mut rig = FloodRig::start(&bin, work.path(), pins, 192)?;
    std::thread::sleep(Duration::from_secs(2));
    // Idle baseline: the same agent, the same wall time, no flood.
    let c0 = rig.agent_cpu()?;
    std::thread::sleep(FLOOD);
    let idle = (rig.agent_cpu()? - c0).as_secs_f64() / FLOOD.as_secs_f64();
    let srcs = sources(98_000, 2_000, 100_000);
    let before = dir_bytes(&rig.data_dir);
    let c1 = rig.agent_cpu()?;
    let stats = flood(&rig.sender_ns, &srcs, rig.veth.a.v4, PORT, PPS, FLOOD)?;
    let busy = (rig.agent_cpu()? - c1).as_secs_f64() / stats.elapsed.as_secs_f64();
    std::thread::sleep(AFTER);
    let grown = dir_bytes(&rig.data_dir).saturating_sub(before);
    rig.stop();
    let r = auth_records(&rig.data_dir)?;
    let (records, failures) = (r.records, r.failures);
    let minutes = stats.elapsed.as_secs_f64() / 60.0;
    let pps = stats.sent as f64 / stats.elapsed.as_secs_f64();
    progress!(
        "auth flood: {:.0} pps for {:.1} s; agent {busy:.2} cores (idle {idle:.3}), sender {:.2}; \
         store +{grown} B; {records} records counting {failures} failures",
        pps,
        stats.elapsed.as_secs_f64(),
        stats.cpu.as_secs_f64() / stats.elapsed.as_secs_f64()
    );
    let figures = vec![
        Figure {
            name: AUTH_FLOOD_STORE_BYTES_PER_MIN,
            value: grown as f64 / minutes,
            unit: "B/min",
        },
        Figure {
            name: AUTH_FLOOD_AGENT_CPU_SHARE,
            value: busy,
            unit: "ratio",
        },
        Figure {
            name: AUTH_FLOOD_AGENT_CPU_SHARE_IDLE,
            value: idle,
            unit: "ratio",
        },
        Figure {
            name: AUTH_FLOOD_SENDER_CPU_SHARE,
            value: stats.cpu.as_secs_f64() / stats.elapsed.as_secs_f64(),
            unit: "ratio",
        },
        Figure {
            name: AUTH_FLOOD_PPS,
            value: pps,
            unit: "pps",
        },
        Figure {
            name: AUTH_FLOOD_RECORDS_PER_MIN,
            value: records as f64 / minutes,
            unit: "count",
        },
    ];
    Ok(figures
        .into_iter()
        .filter(|f| sel.wants_in(GROUP, f.name))
        .collect())
}
