//! `tunnel_throughput_16_peers_*`: the agent's tunnel with 1 and with 2 workers per direction
//! under 16 peers at once, in the same run, and `tunnel_workers_2_over_1`, their ratio.
//!
//! The load is [`crate::loadgen`] (our own WireGuard client on boringtun's `Tunn`: 16 peers,
//! real handshakes, pre-encrypted full-MTU datagrams, both directions at once), from a client
//! namespace joined by a veth to the server namespace where `WgTunnel` runs with `workers` set
//! (the daemon's `--tunnel-workers`; no TC programs: the tunnel's own scaling is the subject).
//! Peers are steered to worker `peer index mod N` (the reuseport program of
//! `capybara_agent::tunnel`'s `sockets` module), so 16 peers are 8 per worker. Runs alternate
//! 1, 2, 1, 2, … ([`RUNS`] of each) and each figure is the median of its runs.
//!
//! What to expect on the 2-core development machine: the generator, the kernel's softirq work
//! for both veth ends and the server's threads share the same two cores, so a second worker can
//! only win what the first left idle; the ratio says whether the workers contend (a ratio
//! below 1) more than whether they scale (that needs more cores than the load generator takes).
//!
//! First run (2026-12-07 12:56 UTC, release, `--filter tunnel_workers`, 5 s rounds, both
//! directions, while other builds kept the load average at ≈ 10 on the 2 cores, so noisy):
//! 1 worker 2498, 1646, 1451 Mbit/s (median **1646**), 2 workers 2075, 1559, 1485 (median
//! **1559**): `tunnel_workers_2_over_1` **0.95**, no gain and no collapse on 2 shared cores.
//! The steering is exact: 16 peers' received datagrams split 277 311 / 277 313 between the two
//! workers; their sends (the TUN's flow-based queue choice) 126 091 / 155 251.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result};
use capybara_agent::tunnel::{PrivateKey, TunnelDeviceConfig, WgConfig};

use super::{Figure, Selection, median};
use crate::{
    cpu,
    loadgen::{self, Direction, LoadPeer, LoadSpec},
    netns::{NetNs, VethPair, unique_name},
    progress,
    wg::start_tunnel,
};

/// `tunnel_throughput_16_peers_1_worker_mbps`: Mbit/s delivered (both directions) through the
/// agent's tunnel with one worker per direction, 16 peers.
pub const TUNNEL_THROUGHPUT_16_PEERS_1_WORKER_MBPS: &str =
    "tunnel_throughput_16_peers_1_worker_mbps";
/// `tunnel_throughput_16_peers_2_workers_mbps`: the same with two workers per direction.
pub const TUNNEL_THROUGHPUT_16_PEERS_2_WORKERS_MBPS: &str =
    "tunnel_throughput_16_peers_2_workers_mbps";
/// `tunnel_workers_2_over_1`: the 2-worker figure over the 1-worker figure, same run.
pub const TUNNEL_WORKERS_2_OVER_1: &str = "tunnel_workers_2_over_1";

/// This module's figures.
pub const NAMES: &[&str] = &[
    TUNNEL_THROUGHPUT_16_PEERS_1_WORKER_MBPS,
    TUNNEL_THROUGHPUT_16_PEERS_2_WORKERS_MBPS,
    TUNNEL_WORKERS_2_OVER_1,
];

/// Runs of each worker count (alternating).
pub const RUNS: usize = 3;
/// Peers at once.
const PEERS: usize = 16;
/// The veth's network number (`10.<NET>.0.0/24`) and the inner one (`10.<NET+1>.1.0/24`).
const NET: u8 = 231;

/// One load through a fresh tunnel with `workers` workers; delivered Mbit/s.
fn measure(workers: usize, seconds: f64) -> Result<f64> {
    let s = NetNs::new("bws");
    let c = NetNs::new("bwc");
    let veth = VethPair::new(&s, &c, NET);
    let inner = NET + 1;
    let server_inner = std::net::Ipv4Addr::new(10, inner, 1, 1);
    let tunnel = start_tunnel(
        &s,
        WgConfig {
            uapi_dir: None,
            workers,
            ..WgConfig::new(
                TunnelDeviceConfig {
                    name: unique_name("bw"),
                    ipv4: Some((server_inner, 24)),
                    ipv6: None,
                    mtu: 1420,
                    offload: capybara_agent::tunnel::DEFAULT_OFFLOAD,
                },
                0,
                PrivateKey::generate(),
            )
        },
    );
    let peers = loadgen::peers(inner, 2, PEERS);
    tunnel
        .add_peers(peers.iter().map(LoadPeer::peer_config).collect())
        .context("add the 16 peers")?;
    let server_cpu = || cpu::threads("wg-").map(|(t, _)| t);
    let r = loadgen::run(&LoadSpec {
        client: &c,
        server: &s,
        endpoint: SocketAddrV4::new(veth.a.v4, tunnel.listen_port()),
        server_key: tunnel.public_key(),
        server_inner,
        peers: &peers,
        direction: Direction::Both,
        seconds,
        packet_len: 1420,
        server_cpu: &server_cpu,
    })?;
    let per_worker = tunnel.worker_counters();
    progress!(
        "tunnel, 16 peers, {workers} worker(s): {:.0} Mbit/s, server {:.2} cores, generator {:.2} \
         cores, per worker {per_worker:?}",
        r.mbps(),
        r.server_cores(),
        r.generator_cores()
    );
    Ok(r.mbps())
}

/// The figures of [`NAMES`] that `sel` wants: [`RUNS`] alternating runs of `seconds` each way.
pub fn run(sel: &Selection, seconds: f64) -> Result<Vec<Figure>> {
    if !sel.wants_any(NAMES) {
        return Ok(Vec::new());
    }
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        one.push(measure(1, seconds)?);
        two.push(measure(2, seconds)?);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (one, two) = (median(&one), median(&two));
    Ok([
        (TUNNEL_THROUGHPUT_16_PEERS_1_WORKER_MBPS, one, "Mbit/s"),
        (TUNNEL_THROUGHPUT_16_PEERS_2_WORKERS_MBPS, two, "Mbit/s"),
        (TUNNEL_WORKERS_2_OVER_1, two / one, "ratio"),
    ]
    .into_iter()
    .filter(|(name, _, _)| sel.wants(name))
    .map(|(name, value, unit)| Figure { name, value, unit })
    .collect())
}
