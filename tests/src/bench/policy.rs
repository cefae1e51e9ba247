//! `group_policy_fanout_10k_ms` and `policy_update_p99_us` / `policy_update_p50_us`: how fast a
//! policy change reaches the kernel maps.
//!
//! An in-process agent API (the real gRPC server on `127.0.0.1:0` with a write token, RocksDB in
//! a temporary directory, the real dataplane on the benchmark's pins, the in-memory tunnel
//! table). The change measured is a flow limit (`--flows`), which lives in the peers'
//! `PeerInfo` (the policy half of their `CAPY_PEER_HOT` lines).
//!
//! The kernel's entries are watched through the pinned `CAPY_PEER_HOT` map (`CAPY_PEERS` until
//! layout 7) opened on its own, while
//! the call is in flight: a sample ends when the kernel holds the new value. The agent writes
//! the maps right after its (unsynced) store write and before it waits for the WAL sync that
//! makes the change durable; that wait is reported apart, as the whole call.
//!
//! - `group_policy_fanout_10k_ms`: 10 000 users with one device each, all in one group; the
//!   group's `--flows` is changed by one `SetGroupPolicy` call (median of 3 changes). From
//!   sending the call until a sweep over all 10 000 entries has seen each hold the new value (an
//!   upper bound: the sweep's lag behind the last write is included).
//!   `group_policy_fanout_rpc_ms` is the whole call (store batch + audit record + 10 000 map
//!   writes + the synced commit).
//! - `policy_update_p99_us` / `policy_update_p50_us`: `SetLimits` calls on one user (one
//!   device), alternating its `--flows` between two values; each sample runs from sending the
//!   call until the kernel's entry holds the new value. [`WARMUP`] calls are not counted, then
//!   [`UPDATE_RUNS`] runs of 10 000 calls with every thread of the process (agent, client and
//!   watcher) on one core, each followed by a run with the threads free on both cores
//!   (`policy_update_p99_us_two_cores`, `policy_update_p50_us_two_cores`); each run starts with
//!   [`RUN_WARMUP`] calls not counted, and each figure is the median of its runs' percentiles.
//!   `policy_update_rpc_p99_us` is the whole call including the synced commit (one core).
//!
//! ## Why one core
//! This host is a Firecracker VM with guest halt polling off (`haltpoll.guest_halt_poll_ns=0`
//! on the kernel command line): a thread woken on the other, idle vCPU waits for the hypervisor
//! to schedule that vCPU again, and the guest accounts the wait as stolen time. A call hops
//! between several threads (client, HTTP/2 connection tasks, the server's worker, the blocking
//! pool, the watcher), so on two cores its tail is the hypervisor's, not the agent's. Measured
//! on 2026-12-02:
//! - two processes bouncing one byte over pipes: 134 000–142 000 round trips/s and 0.0–0.1 %
//!   stolen on one core; 5 700–17 300/s and 0.4–40 % stolen on two;
//! - inside this benchmark, a read-only `GetLimits` call (no write at all): p50 141–153 µs, p99
//!   253–269 µs on one core; p50 315–349 µs, p99 2 676–3 059 µs on two, while the service's own
//!   `set_limits` (store write and map update, no RPC) took p50 31–45 µs, p99 93–198 µs;
//! - runs alternating in one process: on one core p99 588–956 µs with 0.4–6.0 % stolen; on two
//!   608–5 221 µs with 1.0–26.2 % stolen — the slow runs are exactly the ones with the most
//!   stolen time, and a quiet host gives both placements the same figures.
//!
//! On a server whose idle CPUs answer a wake-up at once (bare metal, or a VM that polls before
//! halting), both placements measure the agent; here only the one-core figure does. Both are
//! reported.
//!
//! ## Figures
//! - 2026-11-28 (whole calls, 2 cores shared with three builds): fan-out 175–277 ms; update p50
//!   1089–2080 µs, p99 10 004–11 931 µs — every sample included a synced RocksDB commit.
//! - 2026-12-01 (load average 1.6): `group_policy_fanout_10k_ms` **56 ms** (whole call 92 ms),
//!   `policy_update_p50_us` **267 µs**, `policy_update_p99_us` **493 µs** (whole call p99
//!   1163 µs). What changed: the commit is group-committed and synced after the kernel write,
//!   the dataplane keeps a copy of `CAPY_PEERS` (no read syscall per peer, unchanged entries not
//!   rewritten), and `group.policy`'s audit record no longer carries the 10 000 member names.
//!   A watcher that spins instead of sleeping between reads took a core from the agent and
//!   measured a 2.6 ms median: [`POLL`].
//! - 2026-12-02, two runs of this benchmark alone: `policy_update_p99_us` **644** and
//!   **608 µs** (p50 330, 308 µs); on two cores p99 851 and 3 538 µs (p50 307, 381 µs), the
//!   second run's two-core runs losing 26.2, 19.8 and 1.0 % of their CPU time to the host.
//! - 2026-12-02, full runs of `cargo xtask bench` (05:40 and 06:14 UTC): `policy_update_p99_us`
//!   **747** and **908 µs**; on two cores 2 996 and 5 668 µs, its runs losing 12.9–36.4 % of
//!   their CPU time to the host against 0.3–10.8 % for the one-core runs between them.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{Array, Map, MapData};
use capybara_agent::{
    api::client::{Client, Endpoint},
    dataplane::{Dataplane, DataplaneConfig},
    service::{
        NewToken, NewUser, Service, ServiceConfig,
        domain::{Actor, DeviceName, PublicKey, Scope, UserName},
        policy::model::{GroupName, LimitsText},
        testing::MemoryTunnel,
    },
    store::Store,
};

use capybara_common::{maps as names, peer::PeerHot};

use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

use super::{BenchPins, Figure, TcpApi, percentile, report::CpuTimes};
use crate::progress;

/// `group_policy_fanout_10k_ms`.
pub const GROUP_POLICY_FANOUT_10K_MS: &str = "group_policy_fanout_10k_ms";
/// `group_policy_fanout_rpc_ms`: the whole `SetGroupPolicy` call, including its durable commit.
pub const GROUP_POLICY_FANOUT_RPC_MS: &str = "group_policy_fanout_rpc_ms";
/// `policy_update_p99_us`.
pub const POLICY_UPDATE_P99_US: &str = "policy_update_p99_us";
/// `policy_update_p50_us`.
pub const POLICY_UPDATE_P50_US: &str = "policy_update_p50_us";
/// `policy_update_rpc_p99_us`: the whole call, including the durable commit it waits for.
pub const POLICY_UPDATE_RPC_P99_US: &str = "policy_update_rpc_p99_us";
/// `policy_update_p99_us` with the threads free on both cores.
pub const POLICY_UPDATE_P99_US_TWO_CORES: &str = "policy_update_p99_us_two_cores";
/// `policy_update_p50_us` with the threads free on both cores.
pub const POLICY_UPDATE_P50_US_TWO_CORES: &str = "policy_update_p50_us_two_cores";

/// Users in the group.
const GROUP_USERS: usize = 10_000;
/// Pause between two reads of a map entry that does not hold the new value yet. A watcher that
/// spins takes one of the two cores from the agent it watches (measured: the median call → map
/// time went from 2.6 ms spinning to the figures in the docs sleeping); the sleep (≈ 60–80 µs
/// in this VM: the default 50 µs timer slack) is the measurement's resolution, and it only ever
/// adds to a sample. A 1 ns timer slack for the watcher made the figures worse (2026-12-02,
/// alternating runs: p50 349–351 µs against 290–294 µs): the more frequent wake-ups take CPU
/// from the agent.
pub(super) const POLL: std::time::Duration = std::time::Duration::from_micros(20);
/// `SetLimits` calls per run.
const UPDATES: usize = 10_000;
/// Runs of [`UPDATES`] calls; each figure is the median of the runs' percentiles.
const UPDATE_RUNS: usize = 3;
/// `SetLimits` calls before the first run, not counted (connection, first writes, the blocking
/// pool's threads).
const WARMUP: usize = 500;
/// Calls at the start of each run, not counted (the threads settling on their new cores).
const RUN_WARMUP: usize = 100;

/// Runs both benchmarks (those `wants` selects) and returns their figures.
pub fn run(pins: &BenchPins, fanout: bool, updates: bool) -> Result<Vec<Figure>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(pins, fanout, updates))
}

pub(super) fn flows(n: u32) -> LimitsText {
    LimitsText {
        flows: Some(n.to_string()),
        ..LimitsText::default()
    }
}

/// The pinned `CAPY_PEER_HOT` map opened on its own: the benchmark watches the kernel's entries
/// through it, never through the agent's dataplane (whose lock and userspace copy of the map
/// the agent itself uses).
pub(super) struct KernelPeers(Array<MapData, PeerHot>);

impl KernelPeers {
    pub(super) fn open(bpffs: &std::path::Path) -> Result<KernelPeers> {
        let data = MapData::from_pin(capybara_agent::paths::map_pin(bpffs, names::PEER_HOT))
            .context("open the pinned CAPY_PEER_HOT")?;
        Ok(KernelPeers(Array::try_from(Map::Array(data))?))
    }

    /// Peer `id`'s flow limit as the kernel holds it.
    pub(super) fn flow_limit(&self, id: u32) -> Result<Option<u32>> {
        let info = self.0.get(&id, 0)?.info;
        Ok((info.flow_limit != 0).then_some(info.flow_limit))
    }
}

/// One `SetLimits` call setting the user's `--flows` to `want`, watched in the kernel: µs from
/// sending the call until the kernel's entry for peer `id` holds `want`, and µs of the whole
/// call.
async fn set_flows(
    client: &Client,
    kernel: &KernelPeers,
    id: u32,
    want: u32,
) -> Result<(f64, f64)> {
    let t = Instant::now();
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.set_limits("solo", &flows(want)).await })
    };
    // The sample ends when the kernel map holds the new value, seen from here while the call
    // is still in flight (the agent writes the map before its durable commit).
    let seen = loop {
        if kernel.flow_limit(id)? == Some(want) {
            break t.elapsed();
        }
        if call.is_finished() {
            let got = kernel.flow_limit(id)?;
            ensure!(
                got == Some(want),
                "flow limit {got:?} after SetLimits {want}"
            );
            break t.elapsed();
        }
        std::thread::sleep(POLL);
    };
    call.await??;
    Ok((seen.as_secs_f64() * 1e6, t.elapsed().as_secs_f64() * 1e6))
}

async fn run_async(pins: &BenchPins, fanout: bool, updates: bool) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let bpffs = pins.path().join("policy");
    let dp = Arc::new(Mutex::new(Dataplane::open(DataplaneConfig {
        bpffs_dir: bpffs.clone(),
        ..DataplaneConfig::default()
    })?));
    let kernel = KernelPeers::open(&bpffs)?;
    let svc = Arc::new(Service::open(
        Arc::new(Store::open(&dir.path().join("data"))?),
        dp,
        Arc::new(MemoryTunnel::default()),
        ServiceConfig {
            server_v4: "10.64.0.1/16".parse()?,
            server_v6: "fd00:64::1/64".parse()?,
            server_public_key: PublicKey([1; 32]),
            endpoint: "192.0.2.1:51820".into(),
            dns: vec![],
            keep_client_keys: None,
            geo_db: None,
            keep_unknown_peers: false,
        },
    )?);
    let root = Actor::Local { uid: 0 };
    let (_, write) = svc.tokens.create_token(
        &root,
        NewToken {
            scope: Scope::Write,
            name: "bench-policy".into(),
            expires_at: None,
            user: None,
        },
    )?;
    let api = TcpApi::start(svc.clone()).await?;
    let url = api.url.clone();
    let client = Client::connect(&Endpoint::Tcp {
        url,
        token: Some(write),
        ca_cert: None,
    })
    .await?;
    let mut out = Vec::new();

    if updates {
        let user = UserName::parse("user", "solo")?;
        let (_, cfg) = svc.users.add_user(
            &root,
            NewUser {
                name: user.clone(),
                device: DeviceName::default_device(),
                expires_at: None,
            },
        )?;
        let id = cfg.peer.id;
        progress!(
            "policy_update: {WARMUP} warm-up calls, then {UPDATE_RUNS} runs of {UPDATES} on one \
             core and on two, alternating"
        );
        let mut want = 100;
        for _ in 0..WARMUP {
            want = 201 - want;
            set_flows(&client, &kernel, id, want).await?;
        }
        let all = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let one = one_core(&all)?;
        let restore = Unconfine(all);
        let (mut on_one, mut on_two) = (Vec::new(), Vec::new());
        for run in 0..UPDATE_RUNS {
            for (placement, cpus, runs) in [
                ("one core", &one, &mut on_one),
                ("two cores", &all, &mut on_two),
            ] {
                confine_threads(cpus)?;
                let steal = CpuTimes::now();
                let mut samples = Vec::with_capacity(UPDATES);
                let mut rpcs = Vec::with_capacity(UPDATES);
                for i in 0..RUN_WARMUP + UPDATES {
                    want = 201 - want;
                    let (seen, rpc) = set_flows(&client, &kernel, id, want).await?;
                    if i >= RUN_WARMUP {
                        samples.push(seen);
                        rpcs.push(rpc);
                    }
                }
                let steal = CpuTimes::stolen_since(steal);
                samples.sort_by(f64::total_cmp);
                rpcs.sort_by(f64::total_cmp);
                let p = Percentiles {
                    p50: percentile(&samples, 0.50),
                    p99: percentile(&samples, 0.99),
                    rpc_p99: percentile(&rpcs, 0.99),
                };
                progress!(
                    "policy_update: run {} on {placement}: p50 {:.0} µs, p99 {:.0} µs, whole call \
                     p99 {:.0} µs, {steal:.1} % of CPU time stolen",
                    run + 1,
                    p.p50,
                    p.p99,
                    p.rpc_p99
                );
                runs.push(p);
            }
        }
        drop(restore);
        let of = |runs: &[Percentiles], pick: fn(&Percentiles) -> f64| {
            super::median(&runs.iter().map(pick).collect::<Vec<_>>())
        };
        for (name, value) in [
            (POLICY_UPDATE_RPC_P99_US, of(&on_one, |p| p.rpc_p99)),
            (POLICY_UPDATE_P99_US, of(&on_one, |p| p.p99)),
            (POLICY_UPDATE_P50_US, of(&on_one, |p| p.p50)),
            (POLICY_UPDATE_P99_US_TWO_CORES, of(&on_two, |p| p.p99)),
            (POLICY_UPDATE_P50_US_TWO_CORES, of(&on_two, |p| p.p50)),
        ] {
            out.push(Figure {
                name,
                value,
                unit: "us",
            });
        }
    }

    if fanout {
        progress!("group_policy_fanout: creating {GROUP_USERS} users");
        let t = Instant::now();
        let mut names = Vec::with_capacity(GROUP_USERS);
        let mut ids = Vec::with_capacity(GROUP_USERS);
        for i in 0..GROUP_USERS {
            let name = UserName::parse("user", &format!("g{i}"))?;
            let (_, cfg) = svc.users.add_user(
                &root,
                NewUser {
                    name: name.clone(),
                    device: DeviceName::default_device(),
                    expires_at: None,
                },
            )?;
            names.push(name);
            ids.push(cfg.peer.id);
        }
        progress!(
            "group_policy_fanout: {GROUP_USERS} users in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let group = GroupName::parse("group", "all")?;
        svc.policy.create_group(&root, &group)?;
        svc.policy.change_members(&root, &group, &names, true)?;
        client.set_group_policy("all", &flows(100), None).await?;
        let mut runs = Vec::new();
        let mut calls = Vec::new();
        for want in [200u32, 300, 400] {
            let t = Instant::now();
            let call = {
                let client = client.clone();
                tokio::spawn(
                    async move { client.set_group_policy("all", &flows(want), None).await },
                )
            };
            // One sweep over every member while the call is in flight: each entry is polled
            // until it holds the new value, so the sweep ends no earlier than the last write
            // (an upper bound: the sweep's own lag after the last write is counted too).
            for id in &ids {
                loop {
                    let got = kernel.flow_limit(*id)?;
                    if got == Some(want) {
                        break;
                    }
                    ensure!(
                        !call.is_finished(),
                        "peer {id}: flow limit {got:?} after the call returned, want {want}"
                    );
                    std::thread::sleep(POLL);
                }
            }
            runs.push(t.elapsed().as_secs_f64() * 1e3);
            call.await??;
            calls.push(t.elapsed().as_secs_f64() * 1e3);
        }
        progress!("group_policy_fanout: whole calls {calls:?} ms");
        out.push(Figure {
            name: GROUP_POLICY_FANOUT_RPC_MS,
            value: super::median(&calls),
            unit: "ms",
        });
        progress!("group_policy_fanout: runs {runs:?} ms");
        out.push(Figure {
            name: GROUP_POLICY_FANOUT_10K_MS,
            value: super::median(&runs),
            unit: "ms",
        });
    }

    let _ = api.stop().await;
    Ok(out)
}

/// One run's percentiles, µs.
struct Percentiles {
    p50: f64,
    p99: f64,
    rpc_p99: f64,
}

/// The highest-numbered core of `all`, alone.
fn one_core(all: &CpuSet) -> Result<CpuSet> {
    let cpu = (0..CpuSet::count())
        .rev()
        .find(|&c| all.is_set(c).unwrap_or(false))
        .context("no core in this process's affinity mask")?;
    let mut one = CpuSet::new();
    one.set(cpu)?;
    Ok(one)
}

/// Gives every thread its whole mask back when dropped, so a run that fails does not leave
/// the rest of the benchmark on one core.
struct Unconfine(CpuSet);

impl Drop for Unconfine {
    fn drop(&mut self) {
        if let Err(e) = confine_threads(&self.0) {
            progress!("policy_update: cannot give the threads both cores back: {e:#}");
        }
    }
}

/// Moves every thread of this process (the tokio workers and blocking pool, RocksDB's, the
/// watcher) onto `cpus`; threads started later inherit their starter's mask.
fn confine_threads(cpus: &CpuSet) -> Result<()> {
    for task in std::fs::read_dir("/proc/self/task").context("/proc/self/task")? {
        let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        match sched_setaffinity(Pid::from_raw(tid), cpus) {
            // A thread that ended since the listing has nothing left to move.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e).context(format!("sched_setaffinity of thread {tid}")),
        }
    }
    Ok(())
}
