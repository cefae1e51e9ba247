//! `cluster_propagation_p99_ms` and `cluster_apply_10k_users_ms` (issue 25): how fast a change
//! made on one node of a cluster reaches another node's kernel maps.
//!
//! ## Method
//! Three etcd members (Debian's `etcd`, [`crate::cluster::Etcd`]) on a LAN namespace, and two
//! nodes in this process, on a runtime whose threads are in that namespace: each the real
//! service over its own RocksDB, its own dataplane (pins under the benchmark's bpffs) and the
//! in-memory tunnel table, joined to etcd as the daemon joins it (the node's lease, the store's
//! replication through etcd, the watch that applies the others' changes). A change is made
//! through node A's service; the sample ends when node B's kernel entry (its pinned
//! `CAPY_PEER_HOT`, opened on its own and polled every 20 µs) holds the new value: the etcd
//! transaction, the watch's delivery, B's store write, its reload and its map write.
//!
//! - `cluster_propagation_p99_ms` (and `_p50_ms`): [`SAMPLES`] `SetLimits` changes of one
//!   user's `--flows`, alternating between two values (target < 200 ms).
//! - `cluster_apply_10k_users_ms`: 10 000 users with a device each, in one group, whose
//!   `--flows` is changed on A: from the call until a sweep over the 10 000 entries of B's
//!   kernel saw each hold the new value (median of 3 changes; target < 2 000 ms). The same-run
//!   baseline `cluster_apply_10k_users_local_ms` is the same sweep over A's own kernel.
//!
//! `cargo xtask bench --filter cluster` runs this module alone.

use std::{sync::Arc, time::Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use capybara_agent::{
    cluster::{ClusterConfig, Node, state},
    dataplane::{Dataplane, DataplaneConfig},
    service::{
        NewUser, Service, ServiceConfig,
        domain::{Actor, DeviceName, PublicKey, UserName},
        policy::{LimitsTarget, model::GroupName},
        testing::MemoryTunnel,
    },
    store::Store,
};
use tokio_util::sync::CancellationToken;

use super::{
    BenchPins, Figure, Selection, percentile,
    policy::{KernelPeers, POLL, flows},
};
use crate::{
    cluster::{Etcd, Lan},
    progress,
};

/// p99 of a change on one node until another node's kernel holds it, ms.
pub const CLUSTER_PROPAGATION_P99_MS: &str = "cluster_propagation_p99_ms";
/// Its median, ms.
pub const CLUSTER_PROPAGATION_P50_MS: &str = "cluster_propagation_p50_ms";
/// A group policy change of 10 000 users, until another node's kernel holds it for all, ms.
pub const CLUSTER_APPLY_10K_USERS_MS: &str = "cluster_apply_10k_users_ms";
/// The same on the node that made the change (the baseline), ms.
pub const CLUSTER_APPLY_10K_USERS_LOCAL_MS: &str = "cluster_apply_10k_users_local_ms";
/// The figures of this module.
pub const NAMES: &[&str] = &[
    CLUSTER_PROPAGATION_P99_MS,
    CLUSTER_PROPAGATION_P50_MS,
    CLUSTER_APPLY_10K_USERS_MS,
    CLUSTER_APPLY_10K_USERS_LOCAL_MS,
];
/// Propagation samples.
pub const SAMPLES: usize = 200;
/// Users of the group change.
pub const USERS: usize = 10_000;
/// The LAN's network.
const NET: u8 = 231;

/// One node in this process.
struct Agent {
    svc: Arc<Service>,
    kernel: KernelPeers,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn join(
        name: &str,
        endpoints: &[String],
        pins: &BenchPins,
        stop: &CancellationToken,
    ) -> Result<Agent> {
        let dir = tempfile::tempdir()?;
        let bpffs = pins.path().join(format!("cluster-{name}"));
        let dp = Arc::new(std::sync::Mutex::new(Dataplane::open(DataplaneConfig {
            bpffs_dir: bpffs.clone(),
            ..DataplaneConfig::default()
        })?));
        let kernel = KernelPeers::open(&bpffs)?;
        let svc = Arc::new(Service::open(
            Arc::new(Store::open(&dir.path().join("data"))?),
            dp,
            Arc::new(MemoryTunnel::default()),
            ServiceConfig {
                server_v4: "10.96.0.1/16".parse()?,
                server_v6: "fd00:96::1/64".parse()?,
                server_public_key: PublicKey([1; 32]),
                endpoint: "192.0.2.1:51820".into(),
                dns: vec![],
                keep_client_keys: None,
                geo_db: None,
                keep_unknown_peers: false,
            },
        )?);
        let weak = Arc::downgrade(&svc);
        let node = Node::connect(
            ClusterConfig {
                endpoints: endpoints.to_vec(),
                node: name.into(),
                prefix: "/bench".into(),
                ttl: std::time::Duration::from_secs(10),
                tls: None,
                failover: None,
            },
            Box::new(|| 0),
            Box::new(move || weak.upgrade().map_or(0, |s| s.core.store.shared_revision())),
        )
        .await?;
        svc.cluster.set_node(node.clone());
        svc.core
            .store
            .replicate_through(Arc::new(state::Replication::new(
                node.clone(),
                tokio::runtime::Handle::current(),
            )));
        let applier: Arc<dyn state::Applier> = svc.clone();
        tokio::spawn(state::follow(node.clone(), applier, stop.clone()));
        tokio::spawn(node.run(stop.clone()));
        Ok(Agent {
            svc,
            kernel,
            _dir: dir,
        })
    }

    /// Runs `f` on the service from the blocking pool (a shared write waits for etcd).
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Service) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let svc = self.svc.clone();
        tokio::task::spawn_blocking(move || f(&svc)).await?
    }
}

/// Polls until `f` holds, for at most `secs` seconds.
async fn until(what: &str, secs: u64, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + std::time::Duration::from_secs(secs);
    while !f()? {
        ensure!(Instant::now() < end, "{what}: not within {secs} s");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Runs the module if the selection wants any of its figures.
pub fn run(sel: &Selection, pins: &BenchPins) -> Result<Vec<Figure>> {
    if !sel.wants_any(NAMES) {
        return Ok(Vec::new());
    }
    // The lab's helpers panic with what they saw; here that is the stage's error.
    let lab = std::panic::catch_unwind(|| {
        let lan = Lan::new(NET);
        let etcd = Etcd::start(&lan);
        (lan, etcd)
    })
    .map_err(|_| anyhow!("cannot start etcd (cargo xtask setup installs etcd-server)"))?;
    let (lan, etcd) = lab;
    let endpoints: Vec<String> = etcd.endpoints().split(',').map(str::to_owned).collect();
    let figures = lan.ns.run(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        rt.block_on(run_async(sel, pins, &endpoints))
    })?;
    drop(etcd);
    Ok(figures)
}

async fn run_async(sel: &Selection, pins: &BenchPins, endpoints: &[String]) -> Result<Vec<Figure>> {
    let stop = CancellationToken::new();
    let a = Agent::join("a", endpoints, pins, &stop).await?;
    let b = Agent::join("b", endpoints, pins, &stop).await?;
    let root = Actor::Local { uid: 0 };
    let mut out = Vec::new();
    let figure = |name, value| Figure {
        name,
        value,
        unit: "ms",
    };

    if sel.wants_any(&[CLUSTER_PROPAGATION_P99_MS, CLUSTER_PROPAGATION_P50_MS]) {
        let r = root.clone();
        let id = a
            .call(move |svc| {
                let (_, cfg) = svc.users.add_user(
                    &r,
                    NewUser {
                        name: UserName::parse("user", "solo")?,
                        device: DeviceName::default_device(),
                        expires_at: None,
                    },
                )?;
                Ok(cfg.peer.id)
            })
            .await?;
        until("the user on b", 10, || Ok(b.svc.directory.has_id(id))).await?;
        let mut samples = Vec::with_capacity(SAMPLES);
        let mut want = 100u32;
        for _ in 0..SAMPLES {
            want = 301 - want;
            let t = Instant::now();
            let r = root.clone();
            let call = tokio::spawn({
                let svc = a.svc.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        svc.policy.set_limits(
                            &r,
                            &LimitsTarget::User(UserName::parse("user", "solo")?),
                            &flows(want).parse()?,
                        )?;
                        anyhow::Ok(())
                    })
                    .await?
                }
            });
            loop {
                if b.kernel.flow_limit(id)? == Some(want) {
                    break;
                }
                ensure!(
                    t.elapsed() < std::time::Duration::from_secs(10),
                    "b's kernel did not get flows {want}"
                );
                std::thread::sleep(POLL);
            }
            samples.push(t.elapsed().as_secs_f64() * 1e3);
            call.await??;
        }
        samples.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
        progress!("cluster propagation: p50 {p50:.2} ms, p99 {p99:.2} ms over {SAMPLES} changes");
        out.push(figure(CLUSTER_PROPAGATION_P99_MS, p99));
        out.push(figure(CLUSTER_PROPAGATION_P50_MS, p50));
    }

    if sel.wants_any(&[CLUSTER_APPLY_10K_USERS_MS, CLUSTER_APPLY_10K_USERS_LOCAL_MS]) {
        progress!("cluster apply: creating {USERS} users on a (each one etcd transaction)");
        let t = Instant::now();
        let r = root.clone();
        let (names, ids) = a
            .call(move |svc| {
                let (mut names, mut ids) = (Vec::new(), Vec::new());
                for i in 0..USERS {
                    let name = UserName::parse("user", &format!("g{i}"))?;
                    let (_, cfg) = svc.users.add_user(
                        &r,
                        NewUser {
                            name: name.clone(),
                            device: DeviceName::default_device(),
                            expires_at: None,
                        },
                    )?;
                    names.push(name);
                    ids.push(cfg.peer.id);
                }
                Ok((names, ids))
            })
            .await?;
        let last = *ids.last().context("no users")?;
        until("every user on b", 120, || Ok(b.svc.directory.has_id(last))).await?;
        progress!(
            "cluster apply: {USERS} users on both nodes after {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let r = root.clone();
        a.call(move |svc| {
            let group = GroupName::parse("group", "all")?;
            svc.policy.create_group(&r, &group)?;
            svc.policy.change_members(&r, &group, &names, true)?;
            svc.policy
                .set_group_policy(&r, &group, &flows(100).parse()?, None)?;
            Ok(())
        })
        .await?;
        let (mut remote, mut local) = (Vec::new(), Vec::new());
        for want in [200u32, 300, 400] {
            let t = Instant::now();
            let r = root.clone();
            let call = tokio::spawn({
                let svc = a.svc.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        let group = GroupName::parse("group", "all")?;
                        svc.policy
                            .set_group_policy(&r, &group, &flows(want).parse()?, None)?;
                        anyhow::Ok(())
                    })
                    .await?
                }
            });
            // One sweep over each node's entries: each polled until it holds the new value,
            // so a sweep ends no earlier than that node's last write.
            let mut local_ms = None;
            for (node, kernel) in [("a", &a.kernel), ("b", &b.kernel)] {
                for id in &ids {
                    loop {
                        if kernel.flow_limit(*id)? == Some(want) {
                            break;
                        }
                        ensure!(
                            t.elapsed() < std::time::Duration::from_secs(60),
                            "{node}: peer {id} did not get flows {want}"
                        );
                        std::thread::sleep(POLL);
                    }
                }
                if node == "a" {
                    local_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            remote.push(t.elapsed().as_secs_f64() * 1e3);
            local.push(local_ms.unwrap_or_default());
            call.await??;
        }
        progress!("cluster apply: on b {remote:?} ms, on a {local:?} ms");
        out.push(figure(CLUSTER_APPLY_10K_USERS_MS, super::median(&remote)));
        out.push(figure(
            CLUSTER_APPLY_10K_USERS_LOCAL_MS,
            super::median(&local),
        ));
    }
    stop.cancel();
    Ok(out.into_iter().filter(|f| sel.wants(f.name)).collect())
}
