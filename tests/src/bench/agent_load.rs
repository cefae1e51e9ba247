//! `agent_rss_mb_100k_peers` and `load_100k_peers_ms`: the agent binary started on a store
//! holding 100 000 users with one device each, no traffic.
//!
//! ## Method
//! - The store is populated directly through the agent library's store API ([`Store::commit`]
//!   of [`Batch`]es of 10 000 records): one [`User`] and one device record per user, in the
//!   shape the control service writes (`{"peer": Peer, "sealed_key": null}` under
//!   `keys::peer(user, "d")`), with random public keys, dense ids `0..100 000` and addresses
//!   from the tunnel's `/14`. Going through gRPC would measure the API, not the start-up; if the
//!   record shape ever drifts from the service's, the agent refuses the store and the bench
//!   fails.
//! - The agent binary (`capybara-agent`, next to this binary in the same target directory) runs
//!   in a namespace of its own with its own tunnel device, data dir and pins, no uplink, no API
//!   socket. "Loaded" is its readiness signal: the `capybara-agent ready` log line, written after
//!   the service programmed every stored device into the kernel and the tunnel (the log's
//!   `devices restored from the store` line must say `peers=100000`, or the run fails).
//! - `load_100k_peers_ms`: time from spawn to ready with 100k peers **minus** the same with an
//!   empty store, both in the same run (median of the runs each), so the figure is the cost of
//!   the peers and not of loading the programs. `agent_start_ms_empty` and
//!   `agent_start_ms_100k_peers` are the raw start times.
//! - `agent_rss_mb_100k_peers`: `VmRSS` of the ready agent (1 s after ready) with 100k peers, in
//!   MiB; `agent_rss_mb_empty` the same with none.
//!
//! `cargo xtask bench --filter agent_load` runs this module alone (no figure's name contains
//! `agent_load`; the filter names the module).
//!
//! ## Figures and what changed them
//! `cargo xtask bench --filter agent_load` (3 starts each, medians), AMD EPYC, 2 cores shared
//! with other builds (their load average given), Linux 6.18:
//!
//! | | before (main 4396222, load ≈ 7) | after, load ≈ 1.4 | load ≈ 2.6 | load ≈ 7.4 |
//! |---|---:|---:|---:|---:|
//! | `agent_start_ms_empty` | 1 201 ms | 509 ms | 767 ms | 1 246 ms |
//! | `agent_start_ms_100k_peers` | not ready after 120 s | 1 378 ms | 2 236 ms | 3 389 ms |
//! | `load_100k_peers_ms` (target < 3000) | — | **868 ms** | 1 469 ms | 2 143 ms |
//! | `agent_rss_mb_empty` | 296 MiB | 42 MiB | 42 MiB | 42 MiB |
//! | `agent_rss_mb_100k_peers` (target < 300) | 810 MiB at 120 s, growing | **194 MiB** | 194 MiB | 194 MiB |
//!
//! The time figures move with the machine's load (the three "after" columns are one build);
//! the memory figures do not. Where
//! the 100k start's time goes now (one start, from the agent's log fields): reading the devices
//! from the store 543 ms (RocksDB scan, JSON, the service's index), the dataplane 441 ms, the
//! tunnel 107 ms, the start-up policy pass 616 ms. What was done, each measured on its own
//! where it could be (details in the modules named):
//! - Tunnel (`capybara_agent::tunnel`): one peer table for the whole batch instead of a copy
//!   per peer (quadratic), and a boringtun `Tunn` only at a peer's first handshake (11 040 B and
//!   an X25519 product each: 1.05 GiB and ≈ 17 s of CPU for 100k peers up front).
//! - Dataplane (`capybara_agent::dataplane::peers`): new peers written with batch syscalls
//!   (four per 65 536 peers instead of six per peer); range flags from a count instead of a
//!   scan of every allowed IP per peer (quadratic); a copy of `CAPY_PEERS` (since layout 8 the
//!   mapped `CAPY_PEER_HOT` itself) so that the policy pass reads gates and limits without
//!   syscalls and skips writes of unchanged values (300 000 `bpf(2)` calls at start before).
//! - Memory: the blocklists' DIR tables (2 × 128 MiB, resident in full as soon as mapped) are
//!   mapped only while a generation is written or compared (`dataplane::lists`): 254 MiB of the
//!   empty agent. The policy cache keeps the effective policy only of users the tick looks at
//!   (an `Effective` is ≈ 450 B: ≈ 60 MiB of table at 100k users, plus its growth), store scans
//!   bypass RocksDB's block cache (15 MiB of blocks read once, heaptrack), and the policy pass
//!   lists user names without copying every device: together 298 → 195 MiB.
//!
//! What the 194 MiB are (`/proc/PID/status` and heaptrack, one start): 27 MiB of mapped files
//! (the binary and libraries) and 171 MiB anonymous, of which 17 MiB are there without peers.
//! The rest is three per-device indexes, each keyed the way its owner looks devices up — the
//! tunnel's (≈ 45 MiB: 28 MiB of `Peer`s, its key, index and route tables), the service's
//! (≈ 30 MiB: records by `user/device` with their strings, public keys, ids and addresses) and
//! the dataplane's (≈ 30 MiB: allowed IPs per peer, their owners, the `PEERS` copy) — plus the
//! policy's per-device state and what the allocator keeps of the start-up's temporaries. Not
//! done: a device added at run time still copies the tunnel's peer table and the service
//! still asks the dataplane for every peer to allocate an id (both O(peers) per add, not
//! measured here); the store's records are JSON (most of the 543 ms).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};
use capybara_agent::service::domain::{DeviceName, Peer, PublicKey, User, UserName};
use capybara_agent::store::{Batch, Cf, Store, keys};
use nix::sys::signal::Signal;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde::Serialize;

use super::{Figure, Selection, median};
use crate::{
    netns::{NetNs, unique_name},
    progress,
};

/// Resident memory of the agent with 100k peers loaded, MiB (target < 300).
pub const AGENT_RSS_MB_100K_PEERS: &str = "agent_rss_mb_100k_peers";
/// Start-up time the 100k peers add, ms (target < 3000).
pub const LOAD_100K_PEERS_MS: &str = "load_100k_peers_ms";
/// Resident memory of the agent with an empty store, MiB.
pub const AGENT_RSS_MB_EMPTY: &str = "agent_rss_mb_empty";
/// Spawn to ready with an empty store, ms.
pub const AGENT_START_MS_EMPTY: &str = "agent_start_ms_empty";
/// Spawn to ready with 100k peers, ms.
pub const AGENT_START_MS_100K_PEERS: &str = "agent_start_ms_100k_peers";

/// This module's name: `--filter agent_load` selects all of its figures (none of their names
/// contains it).
pub const GROUP: &str = "agent_load";

/// Every figure of this module, in report order.
pub const NAMES: &[&str] = &[
    AGENT_RSS_MB_100K_PEERS,
    LOAD_100K_PEERS_MS,
    AGENT_RSS_MB_EMPTY,
    AGENT_START_MS_EMPTY,
    AGENT_START_MS_100K_PEERS,
];

/// Users (one device each) in the populated store.
const USERS: u32 = 100_000;
/// Records per store batch.
const BATCH: u32 = 10_000;
/// The tunnel's server addresses (a /14 holds 262 142 hosts).
const TUNNEL_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 64, 0, 1), 14);
const TUNNEL_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1), 64);
/// How long an agent may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The device record as the control service stores it (`service::directory::PeerRecord`).
#[derive(Serialize)]
struct PeerRecord<'a> {
    peer: &'a Peer,
    sealed_key: Option<String>,
}

/// The name of user `i`.
pub fn user_name(i: u32) -> String {
    format!("bench{i:06}")
}

/// Writes `n` users with one device each into the store under `data_dir`.
pub fn populate(data_dir: &Path, n: u32) -> Result<()> {
    let store = Store::open(data_dir).context("Store::open")?;
    let mut rng = StdRng::seed_from_u64(100_000);
    let device = DeviceName::parse("device", "d")?;
    let created_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let v4_base = u32::from(TUNNEL_V4.0) & !((1u32 << (32 - TUNNEL_V4.1)) - 1);
    let v6_base = u128::from(TUNNEL_V6.0) & !((1u128 << (128 - TUNNEL_V6.1)) - 1);
    let mut batch = Batch::default();
    for i in 0..n {
        let name = user_name(i);
        let user = User {
            name: UserName::parse("user", &name)?,
            created_at,
            expires_at: None,
        };
        // Host offsets from 2 (1 is the server).
        let offset = i + 2;
        let peer = Peer {
            id: i,
            user: user.name.clone(),
            device: device.clone(),
            public_key: PublicKey(rng.random()),
            ipv4: Ipv4Addr::from(v4_base + offset),
            ipv6: Ipv6Addr::from(v6_base + u128::from(offset)),
            created_at,
            key_kept: false,
        };
        batch.put(Cf::Users, &keys::user(&name), &user)?;
        batch.put(
            Cf::Peers,
            &keys::peer(&name, device.as_str()),
            &PeerRecord {
                peer: &peer,
                sealed_key: None,
            },
        )?;
        if (i + 1) % BATCH == 0 || i + 1 == n {
            store.commit(std::mem::take(&mut batch))?;
        }
    }
    Ok(())
}

/// `VmRSS` of a `/proc/PID/status`, in KiB.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// One start of the agent: spawn to ready, and its RSS once ready.
struct Start {
    ms: f64,
    rss_mb: f64,
}

fn start_agent(bin: &Path, pins: &Path, data_dir: &Path, peers: u32, run: usize) -> Result<Start> {
    let ns = NetNs::new("ag");
    let tunnel = unique_name("tn");
    let work = data_dir.parent().context("data dir has no parent")?;
    let log = work.join(format!("agent-{peers}-{run}.log"));
    let uapi = work.join(format!("uapi-{peers}-{run}"));
    std::fs::create_dir_all(&uapi)?;
    let pin_dir = pins.join(format!("agent-{peers}-{run}"));
    let out = std::fs::File::create(&log)?;
    let t = Instant::now();
    let child = Command::new(bin)
        .args(["--netns", ns.name(), "--tunnel", &tunnel])
        .args(["--tunnel-ipv4", &format!("{}/{}", TUNNEL_V4.0, TUNNEL_V4.1)])
        .args(["--tunnel-ipv6", &format!("{}/{}", TUNNEL_V6.0, TUNNEL_V6.1)])
        .args([
            "--listen-port",
            "51820",
            "--no-api-socket",
            "--detach-on-exit",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--bpffs")
        .arg(&pin_dir)
        .arg("--wg-uapi-dir")
        .arg(&uapi)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let pid = ns.adopt(child);
    let ready_ms = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("capybara-agent ready") {
            break t.elapsed().as_secs_f64() * 1e3;
        }
        let tail = || text.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        if !ns.is_running(pid) {
            bail!(
                "capybara-agent with {peers} peers exited before it was ready; its last log \
                 lines (newest first): {}",
                tail()
            );
        }
        if t.elapsed() > READY_TIMEOUT {
            let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| vm_rss_kib(&s))
                .map_or_else(|| "?".to_owned(), |k| format!("{:.0}", k as f64 / 1024.0));
            bail!(
                "capybara-agent with {peers} peers not ready after {READY_TIMEOUT:?} (RSS then \
                 {rss} MiB); its last log line: {}",
                text.lines().last().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        text.lines()
            .any(|l| l.contains("devices restored from the store")
                && l.contains(&format!("peers={peers}"))),
        "the agent did not restore {peers} devices:\n{}",
        text.lines().take(40).collect::<Vec<_>>().join("\n")
    );
    std::thread::sleep(Duration::from_secs(1));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = vm_rss_kib(&status).context("no VmRSS in /proc/PID/status")?;
    ns.kill(pid, Signal::SIGTERM);
    let end = Instant::now() + Duration::from_secs(15);
    while ns.is_running(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    if ns.is_running(pid) {
        progress!("capybara-agent did not stop on SIGTERM within 15 s; killing it");
        ns.kill(pid, Signal::SIGKILL);
    }
    let _ = std::fs::remove_dir_all(&pin_dir);
    let rss_mb = rss_kib as f64 / 1024.0;
    progress!("agent with {peers} peers: ready in {ready_ms:.0} ms, RSS {rss_mb:.1} MiB");
    Ok(Start {
        ms: ready_ms,
        rss_mb,
    })
}

/// Runs the agent start-up benchmarks when selected.
pub fn run(sel: &Selection, pins: &Path, runs: usize) -> Result<Vec<Figure>> {
    if !NAMES.iter().any(|n| sel.wants_in(GROUP, n)) {
        return Ok(Vec::new());
    }
    let bin = crate::agent_proc::bench_agent_binary()?;
    let work = tempfile::tempdir()?;
    let empty = work.path().join("empty");
    let full = work.path().join("full");
    Store::open(&empty).context("Store::open (empty)")?;
    let t = Instant::now();
    populate(&full, USERS)?;
    progress!(
        "store populated with {USERS} users in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (mut e, mut f) = (Vec::new(), Vec::new());
    for run in 0..runs.max(1) {
        e.push(start_agent(&bin, pins, &empty, 0, run)?);
        f.push(start_agent(&bin, pins, &full, USERS, run)?);
    }
    let med = |v: &[Start], g: fn(&Start) -> f64| median(&v.iter().map(g).collect::<Vec<_>>());
    let (e_ms, f_ms) = (med(&e, |s| s.ms), med(&f, |s| s.ms));
    let figures = vec![
        Figure {
            name: AGENT_RSS_MB_100K_PEERS,
            value: med(&f, |s| s.rss_mb),
            unit: "MiB",
        },
        Figure {
            name: LOAD_100K_PEERS_MS,
            value: f_ms - e_ms,
            unit: "ms",
        },
        Figure {
            name: AGENT_RSS_MB_EMPTY,
            value: med(&e, |s| s.rss_mb),
            unit: "MiB",
        },
        Figure {
            name: AGENT_START_MS_EMPTY,
            value: e_ms,
            unit: "ms",
        },
        Figure {
            name: AGENT_START_MS_100K_PEERS,
            value: f_ms,
            unit: "ms",
        },
    ];
    Ok(figures
        .into_iter()
        .filter(|f| sel.wants_in(GROUP, f.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_parsed_in_kib() {
        let status =
            "Name:\tcapybara-agent\nVmPeak:\t  900000 kB\nVmRSS:\t  123456 kB\nThreads:\t9\n";
        assert_eq!(vm_rss_kib(status), Some(123_456));
        assert_eq!(vm_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn populated_store_holds_users_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        populate(&data, 25).unwrap();
        let store = Store::open(&data).unwrap();
        let users: Vec<(String, User)> = store.scan(Cf::Users, "").unwrap();
        assert_eq!(users.len(), 25);
        let peers: Vec<(String, serde_json::Value)> = store.scan(Cf::Peers, "").unwrap();
        assert_eq!(peers.len(), 25);
        let p = &peers[0].1["peer"];
        assert_eq!(p["id"], 0);
        assert_eq!(p["ipv4"], "10.64.0.2");
        assert!(peers[0].1["sealed_key"].is_null());
        assert_eq!(user_name(7), "bench000007");
    }

    #[test]
    fn the_control_service_reads_the_populated_store() {
        use capybara_agent::service::{
            Service, ServiceConfig,
            testing::{MemoryPlane, MemoryTunnel},
        };
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        populate(&data, 25).unwrap();
        let plane = Arc::new(MemoryPlane::default());
        let svc = Service::open(
            Arc::new(Store::open(&data).unwrap()),
            plane,
            Arc::new(MemoryTunnel::default()),
            ServiceConfig {
                server_v4: ipnet::Ipv4Net::new(TUNNEL_V4.0, TUNNEL_V4.1).unwrap(),
                server_v6: ipnet::Ipv6Net::new(TUNNEL_V6.0, TUNNEL_V6.1).unwrap(),
                server_public_key: PublicKey([1; 32]),
                endpoint: "example.test:51820".into(),
                dns: Vec::new(),
                keep_client_keys: None,
                geo_db: None,
                keep_unknown_peers: false,
            },
        )
        .unwrap();
        let peers = svc.devices.list_peers(None).unwrap();
        assert_eq!(peers.len(), 25);
        assert_eq!(svc.users.list_users().unwrap().len(), 25);
        assert!(
            peers
                .iter()
                .any(|p| p.id == 24 && p.ipv4 == Ipv4Addr::new(10, 64, 0, 26))
        );
    }
}
