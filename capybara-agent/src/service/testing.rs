//! In-memory implementations of the service's ports ([`MemoryPlane`], [`MemoryTunnel`]) that
//! keep the same state as the kernel and the tunnel would, so the service, the API and the CLI
//! are tested without root. Built for the crate's own tests and, with the `test-support`
//! feature, for the privileged test crate and its benchmarks; never in the agent.

use std::{collections::BTreeMap, sync::Mutex};

use capybara_common::{
    counters::Counter,
    drop::DropReason,
    peer::{PeerId, PeerStats},
    quota::BucketId,
};

use super::{
    core::ServiceConfig,
    domain::PublicKey,
    ports::{Plane, PolicyPlane, TunnelPeerStatus, TunnelPort, TunnelPortError},
};
use crate::{
    blocklist::{
        Direction, ListName,
        registry::{ListOp, ListSummary, Registry, RegistrySnapshot},
    },
    dataplane::{DataplaneError, Gate, PeerRates, QuotaUsage},
    net::Cidr,
};

/// A service over a new or existing store in `store_dir`, with `plane` and an empty in-memory
/// tunnel: what most unit tests of the service open.
pub fn open_service(
    store_dir: &std::path::Path,
    plane: std::sync::Arc<MemoryPlane>,
    cfg: ServiceConfig,
) -> super::Service {
    super::Service::open(
        std::sync::Arc::new(crate::store::Store::open(store_dir).expect("open the test store")),
        plane,
        std::sync::Arc::new(MemoryTunnel::default()),
        cfg,
    )
    .expect("open the service")
}

impl ServiceConfig {
    /// A configuration for tests: the server's subnets (e.g. `10.99.0.1/24`, `fd99::1/64`) and the
    /// endpoint clients are told, a fixed server key, no DNS, no kept client keys, no country
    /// database.
    pub fn for_tests(server_v4: &str, server_v6: &str, endpoint: &str) -> ServiceConfig {
        ServiceConfig {
            server_v4: server_v4.parse().expect("a test's server IPv4 subnet"),
            server_v6: server_v6.parse().expect("a test's server IPv6 subnet"),
            server_public_key: PublicKey([1; 32]),
            endpoint: endpoint.into(),
            dns: vec![],
            keep_client_keys: None,
            geo_db: None,
            keep_unknown_peers: false,
        }
    }
}

/// An in-memory [`Plane`]: peers, gates, settable counters and a list registry.
#[derive(Debug, Default)]
pub struct MemoryPlane {
    inner: Mutex<MemoryPlaneState>,
}

/// What a [`MemoryPlane`] holds.
#[derive(Debug, Default, Clone)]
pub struct MemoryPlaneState {
    /// Active peers and their allowed IPs.
    pub peers: BTreeMap<PeerId, Vec<Cidr>>,
    /// Gate per active peer.
    pub gates: BTreeMap<PeerId, Gate>,
    /// Counters per peer id (set by tests).
    pub stats: BTreeMap<PeerId, PeerStats>,
    /// Global drops by reason (set by tests).
    pub drops: BTreeMap<u32, Counter>,
    /// Lists.
    pub registry: Registry,
    /// Fail the next `set_peer` (to test rollback).
    pub fail_next_set_peer: bool,
    /// Rates, flow limits and quota buckets (`service::policy`).
    pub policy: MemoryPolicy,
    /// What `attached()` reports: the link pins' names (`None`: a plane without programs).
    pub links: Option<Vec<String>>,
}

impl MemoryPlane {
    /// A copy of the state.
    pub fn state(&self) -> MemoryPlaneState {
        self.inner.lock().unwrap().clone()
    }

    /// Changes the state (tests set counters this way).
    pub fn with<R>(&self, f: impl FnOnce(&mut MemoryPlaneState) -> R) -> R {
        f(&mut self.inner.lock().unwrap())
    }
}

impl Plane for MemoryPlane {
    fn set_peer(&self, id: PeerId, allowed: &[Cidr]) -> Result<(), DataplaneError> {
        let mut s = self.inner.lock().unwrap();
        if std::mem::take(&mut s.fail_next_set_peer) {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: 0 });
        }
        if let Some((&owner, c)) = s.peers.iter().find_map(|(o, cs)| {
            cs.iter()
                .find(|c| allowed.contains(c))
                .filter(|_| *o != id)
                .map(|c| (o, *c))
        }) {
            return Err(DataplaneError::AddressInUse { cidr: c, id, owner });
        }
        if s.peers.insert(id, allowed.to_vec()).is_none() {
            s.gates.insert(id, Gate::Admitted { until: None });
        }
        Ok(())
    }
    fn remove_peer(&self, id: PeerId) -> Result<(), DataplaneError> {
        let mut s = self.inner.lock().unwrap();
        s.gates.remove(&id);
        s.peers
            .remove(&id)
            .map(|_| ())
            .ok_or(DataplaneError::UnknownPeer { id })
    }
    fn peers(&self) -> BTreeMap<PeerId, Vec<Cidr>> {
        self.inner.lock().unwrap().peers.clone()
    }
    fn set_gate(&self, id: PeerId, gate: Gate) -> Result<(), DataplaneError> {
        let mut s = self.inner.lock().unwrap();
        if !s.peers.contains_key(&id) {
            return Err(DataplaneError::UnknownPeer { id });
        }
        s.gates.insert(id, gate);
        Ok(())
    }
    fn gate(&self, id: PeerId) -> Result<Gate, DataplaneError> {
        self.inner
            .lock()
            .unwrap()
            .gates
            .get(&id)
            .copied()
            .ok_or(DataplaneError::UnknownPeer { id })
    }
    fn peer_stats(&self, id: PeerId) -> Result<PeerStats, DataplaneError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .stats
            .get(&id)
            .copied()
            .unwrap_or_default())
    }
    fn attached(&self) -> Result<Option<Vec<String>>, DataplaneError> {
        Ok(self.inner.lock().unwrap().links.clone())
    }
    fn drops(&self) -> Result<Vec<(DropReason, Counter)>, DataplaneError> {
        let s = self.inner.lock().unwrap();
        Ok(DropReason::ALL
            .iter()
            .map(|r| (*r, s.drops.get(&(*r as u32)).copied().unwrap_or_default()))
            .collect())
    }
    fn list_op(
        &self,
        direction: Direction,
        name: &ListName,
        op: ListOp<'_>,
    ) -> Result<(), DataplaneError> {
        let mut s = self.inner.lock().unwrap();
        let change = s.registry.plan(direction, name, op)?;
        s.registry.commit(change);
        Ok(())
    }
    fn list_batch(
        &self,
        direction: Direction,
        ops: &[(ListName, ListOp<'_>)],
    ) -> Result<(), DataplaneError> {
        let mut s = self.inner.lock().unwrap();
        let mut next = s.registry.clone();
        for (name, op) in ops {
            let change = next.plan(direction, name, *op)?;
            next.commit(change);
        }
        s.registry = next;
        Ok(())
    }
    fn lists(&self) -> Result<Vec<(ListSummary, Counter)>, DataplaneError> {
        Ok(self
            .inner
            .lock()
            .unwrap()
            .registry
            .summaries()
            .into_iter()
            .map(|l| (l, Counter::default()))
            .collect())
    }
    fn list_cidrs(&self, direction: Direction, name: &ListName) -> Option<Vec<Cidr>> {
        self.inner
            .lock()
            .unwrap()
            .registry
            .get(direction, name)
            .map(|l| l.cidrs())
    }
    fn list_snapshot(&self) -> RegistrySnapshot {
        self.inner.lock().unwrap().registry.snapshot()
    }
}

/// The policy state of a [`MemoryPlane`].
#[derive(Debug, Default, Clone)]
pub struct MemoryPolicy {
    /// Rates per peer (absent: unshaped).
    pub rates: BTreeMap<PeerId, PeerRates>,
    /// Flow limits per peer.
    pub flows: BTreeMap<PeerId, u32>,
    /// Buckets.
    pub buckets: BTreeMap<BucketId, QuotaUsage>,
    /// Bucket per peer.
    pub assigned: BTreeMap<PeerId, BucketId>,
    /// Writes done (tests check that re-applying an unchanged policy writes nothing).
    pub writes: u64,
}

fn known(p: &MemoryPlane, id: PeerId) -> Result<(), DataplaneError> {
    if p.with(|s| s.peers.contains_key(&id)) {
        Ok(())
    } else {
        Err(DataplaneError::UnknownPeer { id })
    }
}

impl PolicyPlane for MemoryPlane {
    fn policy_rates(&self, id: PeerId, rates: PeerRates) -> Result<(), DataplaneError> {
        known(self, id)?;
        self.with(|s| {
            let p = &mut s.policy;
            if p.rates.get(&id).copied().unwrap_or_default() != rates {
                p.writes += 1;
                if rates == PeerRates::default() {
                    p.rates.remove(&id);
                } else {
                    p.rates.insert(id, rates);
                }
            }
        });
        Ok(())
    }
    fn policy_flows(&self, id: PeerId, limit: Option<u32>) -> Result<(), DataplaneError> {
        known(self, id)?;
        self.with(|s| {
            let p = &mut s.policy;
            if p.flows.get(&id).copied() != limit {
                p.writes += 1;
                match limit {
                    Some(l) => p.flows.insert(id, l),
                    None => p.flows.remove(&id),
                };
            }
        });
        Ok(())
    }
    fn policy_bucket(&self, bucket: BucketId, limit_bytes: u64) -> Result<(), DataplaneError> {
        crate::dataplane::quota::check_bucket(bucket)?;
        self.with(|s| {
            let p = &mut s.policy;
            let b = p.buckets.entry(bucket).or_insert(QuotaUsage {
                limit_bytes: 0,
                used_bytes: 0,
                epoch: 0,
                warned: [false; 3],
            });
            if b.limit_bytes != limit_bytes {
                b.limit_bytes = limit_bytes;
                p.writes += 1;
            }
        });
        Ok(())
    }
    fn policy_assign(&self, id: PeerId, bucket: Option<BucketId>) -> Result<(), DataplaneError> {
        known(self, id)?;
        self.with(|s| {
            let p = &mut s.policy;
            if p.assigned.get(&id).copied() != bucket {
                p.writes += 1;
                match bucket {
                    Some(b) => p.assigned.insert(id, b),
                    None => p.assigned.remove(&id),
                };
            }
        });
        Ok(())
    }
    fn policy_reset(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError> {
        self.with(|s| {
            let b = s
                .policy
                .buckets
                .get_mut(&bucket)
                .ok_or(DataplaneError::UnknownQuotaBucket { bucket })?;
            b.used_bytes = 0;
            b.warned = [false; 3];
            b.epoch = b.epoch.wrapping_add(1);
            Ok(*b)
        })
    }
    fn policy_usage(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError> {
        crate::dataplane::quota::check_bucket(bucket)?;
        Ok(self.with(|s| {
            s.policy
                .buckets
                .get(&bucket)
                .copied()
                .unwrap_or(QuotaUsage {
                    limit_bytes: 0,
                    used_bytes: 0,
                    epoch: 0,
                    warned: [false; 3],
                })
        }))
    }
}
/// An in-memory [`TunnelPort`]: configured peers, settable statuses, a kick count per peer.
#[derive(Debug, Default)]
pub struct MemoryTunnel {
    inner: Mutex<BTreeMap<PublicKey, MemoryTunnelPeer>>,
    /// What `dead_threads()` reports (tests kill threads this way).
    pub dead: Mutex<Vec<String>>,
}

/// One peer of a [`MemoryTunnel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryTunnelPeer {
    /// Allowed IPs.
    pub allowed: Vec<Cidr>,
    /// What `peers()` reports.
    pub status: TunnelPeerStatus,
    /// How often it was kicked.
    pub kicks: u32,
}

impl MemoryTunnel {
    /// A copy of the configured peers.
    pub fn state(&self) -> BTreeMap<PublicKey, MemoryTunnelPeer> {
        self.inner.lock().unwrap().clone()
    }

    /// Changes a peer's state (tests set endpoints and handshakes this way).
    pub fn with_peer<R>(&self, key: &PublicKey, f: impl FnOnce(&mut MemoryTunnelPeer) -> R) -> R {
        f(self
            .inner
            .lock()
            .unwrap()
            .get_mut(key)
            .expect("configured peer"))
    }
}

impl TunnelPort for MemoryTunnel {
    fn dead_threads(&self) -> Vec<String> {
        self.dead.lock().unwrap().clone()
    }
    fn add_peer(&self, key: PublicKey, allowed: &[Cidr]) -> Result<(), TunnelPortError> {
        let mut m = self.inner.lock().unwrap();
        let e = m.entry(key).or_insert_with(|| MemoryTunnelPeer {
            allowed: Vec::new(),
            status: TunnelPeerStatus {
                key,
                endpoint: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                connected: false,
            },
            kicks: 0,
        });
        e.allowed = allowed.to_vec();
        Ok(())
    }
    fn remove_peer(&self, key: &PublicKey) -> Result<(), TunnelPortError> {
        self.inner.lock().unwrap().remove(key);
        Ok(())
    }
    fn kick(&self, key: &PublicKey) -> Result<(), TunnelPortError> {
        if let Some(p) = self.inner.lock().unwrap().get_mut(key) {
            p.kicks += 1;
            p.status.endpoint = None;
            p.status.last_handshake = None;
            p.status.connected = false;
        }
        Ok(())
    }
    fn peers(&self) -> Vec<TunnelPeerStatus> {
        self.inner
            .lock()
            .unwrap()
            .values()
            .map(|p| p.status.clone())
            .collect()
    }
}
