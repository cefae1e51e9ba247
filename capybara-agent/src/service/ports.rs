//! What the service layer needs from the kernel dataplane ([`Plane`]) and from the WireGuard
//! tunnel ([`TunnelPort`]), as two small traits.
//!
//! The daemon passes the real ones (`Mutex<Dataplane>`, the WireGuard tunnel); host tests pass
//! [`MemoryPlane`] and [`MemoryTunnel`], which keep the same state in memory, so the service,
//! the API and the CLI are tested without root. Methods take `&self`: implementations lock
//! inside, and the service calls them while holding its own state lock, so calls are serialised.

use std::{collections::BTreeMap, net::SocketAddr, sync::Mutex, time::SystemTime};

use capybara_common::{
    counters::{Counter, DROPS_BASE},
    drop::DropReason,
    peer::{PeerId, PeerStats},
};

use super::domain::PublicKey;
use crate::{
    blocklist::{
        Direction, ListName,
        registry::{ListOp, ListSummary, Registry, RegistrySnapshot},
    },
    dataplane::{Dataplane, DataplaneError, Gate},
    net::Cidr,
};

/// The dataplane operations the service uses.
pub trait Plane: super::policy::plane::PolicyPlane + Send + Sync {
    /// Adds or updates peer `id` with exactly these allowed IPs.
    fn set_peer(&self, id: PeerId, allowed: &[Cidr]) -> Result<(), DataplaneError>;
    /// [`Plane::set_peer`] for many peers (agent start); the real dataplane writes new peers
    /// with batch syscalls. The default sets them one by one.
    fn set_peers(&self, peers: &[(PeerId, Vec<Cidr>)]) -> Result<(), DataplaneError> {
        peers
            .iter()
            .try_for_each(|(id, allowed)| self.set_peer(*id, allowed))
    }
    /// Removes peer `id`.
    fn remove_peer(&self, id: PeerId) -> Result<(), DataplaneError>;
    /// Active peers and their allowed IPs.
    fn peers(&self) -> BTreeMap<PeerId, Vec<Cidr>>;
    /// Admits or holds active peer `id`.
    fn set_gate(&self, id: PeerId, gate: Gate) -> Result<(), DataplaneError>;
    /// The gate the kernel holds for active peer `id` (read back: holds written before a
    /// restart, by whoever wrote them).
    fn gate(&self, id: PeerId) -> Result<Gate, DataplaneError>;
    /// Counters of peer `id`.
    fn peer_stats(&self, id: PeerId) -> Result<PeerStats, DataplaneError>;
    /// Every drop of the dataplane by reason (global counters, not only attributed peers').
    fn drops(&self) -> Result<Vec<(DropReason, Counter)>, DataplaneError>;
    /// The attached programs (their link pins' names), for health; `None`: this plane has no
    /// programs (the in-memory one).
    fn attached(&self) -> Result<Option<Vec<String>>, DataplaneError> {
        Ok(None)
    }
    /// Applies one list operation (validated by the caller).
    fn list_op(
        &self,
        direction: Direction,
        name: &ListName,
        op: ListOp<'_>,
    ) -> Result<(), DataplaneError>;
    /// Applies several operations of one direction as one generation (all or none).
    fn list_batch(
        &self,
        direction: Direction,
        ops: &[(ListName, ListOp<'_>)],
    ) -> Result<(), DataplaneError>;
    /// Every list with its hits.
    fn lists(&self) -> Result<Vec<(ListSummary, Counter)>, DataplaneError>;
    /// The CIDRs of one list, if it exists.
    fn list_cidrs(&self, direction: Direction, name: &ListName) -> Option<Vec<Cidr>>;
    /// The registry snapshot to persist.
    fn list_snapshot(&self) -> RegistrySnapshot;
}

impl Plane for Mutex<Dataplane> {
    fn set_peer(&self, id: PeerId, allowed: &[Cidr]) -> Result<(), DataplaneError> {
        self.lock().unwrap().set_peer(id, allowed).map(|_| ())
    }
    fn set_peers(&self, peers: &[(PeerId, Vec<Cidr>)]) -> Result<(), DataplaneError> {
        self.lock().unwrap().set_peers(peers)
    }
    fn remove_peer(&self, id: PeerId) -> Result<(), DataplaneError> {
        self.lock().unwrap().remove_peer(id)
    }
    fn peers(&self) -> BTreeMap<PeerId, Vec<Cidr>> {
        self.lock().unwrap().peers()
    }
    fn set_gate(&self, id: PeerId, gate: Gate) -> Result<(), DataplaneError> {
        self.lock().unwrap().set_gate(id, gate)
    }
    fn gate(&self, id: PeerId) -> Result<Gate, DataplaneError> {
        self.lock().unwrap().gate(id)
    }
    fn peer_stats(&self, id: PeerId) -> Result<PeerStats, DataplaneError> {
        self.lock().unwrap().peer_stats(id)
    }
    fn attached(&self) -> Result<Option<Vec<String>>, DataplaneError> {
        let links = self.lock().unwrap().pinned_links()?;
        Ok(Some(
            links
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
        ))
    }
    fn drops(&self) -> Result<Vec<(DropReason, Counter)>, DataplaneError> {
        let c = self.lock().unwrap().counters()?;
        Ok(DropReason::ALL
            .iter()
            .map(|r| (*r, c.get(DROPS_BASE + *r as u32)))
            .collect())
    }
    fn list_op(
        &self,
        direction: Direction,
        name: &ListName,
        op: ListOp<'_>,
    ) -> Result<(), DataplaneError> {
        let mut dp = self.lock().unwrap();
        match op {
            ListOp::Add(c) => dp.list_add(direction, name, c),
            ListOp::Remove(c) => dp.list_remove(direction, name, c),
            ListOp::Replace(c) => dp.list_replace(direction, name, c),
            ListOp::Delete => dp.list_delete(direction, name),
        }
        .map(|_| ())
    }
    fn list_batch(
        &self,
        direction: Direction,
        ops: &[(ListName, ListOp<'_>)],
    ) -> Result<(), DataplaneError> {
        self.lock().unwrap().list_batch(direction, ops).map(|_| ())
    }
    fn lists(&self) -> Result<Vec<(ListSummary, Counter)>, DataplaneError> {
        self.lock().unwrap().list_hits_all()
    }
    fn list_cidrs(&self, direction: Direction, name: &ListName) -> Option<Vec<Cidr>> {
        self.lock().unwrap().list_cidrs(direction, name)
    }
    fn list_snapshot(&self) -> RegistrySnapshot {
        self.lock().unwrap().list_snapshot()
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
    pub policy: super::policy::plane::MemoryPolicy,
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

/// What the tunnel reports about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPeerStatus {
    /// The peer's public key.
    pub key: PublicKey,
    /// Where its packets come from, if it has sent any.
    pub endpoint: Option<SocketAddr>,
    /// Its latest completed handshake (a timestamp, not an age).
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// A tunnel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelPortError {
    /// The tunnel refused or failed the operation.
    #[error("tunnel {op} failed")]
    Failed {
        /// `add_peer`, `remove_peer` or `kick`.
        op: &'static str,
        /// The tunnel's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The tunnel operations the service uses.
pub trait TunnelPort: Send + Sync {
    /// Adds (or updates) a peer with these allowed IPs, without disturbing other peers.
    fn add_peer(&self, key: PublicKey, allowed: &[Cidr]) -> Result<(), TunnelPortError>;
    /// [`TunnelPort::add_peer`] for many peers (agent start): the real tunnel publishes one
    /// peer table for the whole batch. The default adds them one by one.
    fn add_peers(&self, peers: &[(PublicKey, Vec<Cidr>)]) -> Result<(), TunnelPortError> {
        peers
            .iter()
            .try_for_each(|(key, allowed)| self.add_peer(*key, allowed))
    }
    /// Removes a peer (its sessions end).
    fn remove_peer(&self, key: &PublicKey) -> Result<(), TunnelPortError>;
    /// Ends a peer's sessions now; the peer stays configured and may handshake again.
    fn kick(&self, key: &PublicKey) -> Result<(), TunnelPortError>;
    /// Every configured peer's status.
    fn peers(&self) -> Vec<TunnelPeerStatus>;
}

/// An in-memory [`TunnelPort`]: configured peers, settable statuses, a kick count per peer.
#[derive(Debug, Default)]
pub struct MemoryTunnel {
    inner: Mutex<BTreeMap<PublicKey, MemoryTunnelPeer>>,
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
