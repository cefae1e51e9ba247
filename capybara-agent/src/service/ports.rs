//! What the service layer needs from the kernel dataplane ([`Plane`], with the policy's per-peer
//! operations in [`PolicyPlane`]) and from the WireGuard tunnel ([`TunnelPort`]), as small
//! traits. The adapters live beside what they adapt: `dataplane::port` (the real dataplane),
//! `tunnel::port` (the WireGuard tunnel); [`super::testing`] has in-memory ones for tests.
//!
//! Methods take `&self`: implementations lock inside, and the service calls them while holding
//! its own locks, so calls are serialised. [`PolicyPlane`] writes are skipped when the kernel
//! already holds the value (rates and flow limits are read back first), so re-applying an
//! unchanged policy to many peers costs reads, not class changes or flow-table sweeps.

use std::{collections::BTreeMap, net::SocketAddr, time::SystemTime};

use capybara_common::{
    counters::Counter,
    drop::DropReason,
    peer::{PeerId, PeerStats},
    quota::BucketId,
};

use super::domain::PublicKey;
use crate::{
    blocklist::{
        Direction, ListName,
        registry::{ListOp, ListSummary, RegistrySnapshot},
    },
    dataplane::{DataplaneError, Gate, PeerRates, QuotaUsage},
    net::Cidr,
};

/// The dataplane operations the service uses.
pub trait Plane: PolicyPlane + Send + Sync {
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
    /// The global verdict counters by name (`capybara_common::counters::COUNTER_NAMES`: passes,
    /// drops by attach point, kernel events written and lost), for metrics. The default (a plane
    /// without programs) has none.
    fn verdicts(&self) -> Result<Vec<(&'static str, Counter)>, DataplaneError> {
        Ok(Vec::new())
    }
    /// Every list with its hits.
    fn lists(&self) -> Result<Vec<(ListSummary, Counter)>, DataplaneError>;
    /// The CIDRs of one list, if it exists.
    fn list_cidrs(&self, direction: Direction, name: &ListName) -> Option<Vec<Cidr>>;
    /// The registry snapshot to persist.
    fn list_snapshot(&self) -> RegistrySnapshot;
}

/// The per-peer policy operations of the dataplane.
pub trait PolicyPlane {
    /// Sets a peer's rates (both `None`: unshaped).
    fn policy_rates(&self, id: PeerId, rates: PeerRates) -> Result<(), DataplaneError>;
    /// Sets (or with `None` removes) a peer's flow limit.
    fn policy_flows(&self, id: PeerId, limit: Option<u32>) -> Result<(), DataplaneError>;
    /// Creates bucket `bucket` or changes its budget (usage kept).
    fn policy_bucket(&self, bucket: BucketId, limit_bytes: u64) -> Result<(), DataplaneError>;
    /// Charges a peer to a bucket, or to none.
    fn policy_assign(&self, id: PeerId, bucket: Option<BucketId>) -> Result<(), DataplaneError>;
    /// Sets a peer's flow limit and quota bucket together (one kernel update when they
    /// differ). The default does it with the two calls above.
    fn policy_limits(
        &self,
        id: PeerId,
        flows: Option<u32>,
        bucket: Option<BucketId>,
    ) -> Result<(), DataplaneError> {
        self.policy_flows(id, flows)?;
        self.policy_assign(id, bucket)
    }
    /// Starts a new period of a bucket.
    fn policy_reset(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError>;
    /// A bucket's usage.
    fn policy_usage(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError>;
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
    /// Whether it has a session now (the tunnel's liveness: connected until idle or kicked).
    pub connected: bool,
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

/// What the tunnel counts for metrics ([`TunnelPort::telemetry`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelTelemetry {
    /// Peers connected now.
    pub sessions_online: u64,
    /// Handshakes completed since the tunnel started (rekeys included).
    pub handshakes_completed: u64,
    /// Handshakes failed since the tunnel started, by reason (`unknown-key`, `bad-mac`,
    /// `undecryptable`, `rejected`: the names of the auth attempts in the history).
    pub handshakes_failed: Vec<(&'static str, u64)>,
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
    /// The public endpoint a peer was last seen at, if any. The default looks through
    /// [`TunnelPort::peers`]; the real tunnel looks the one peer up.
    fn endpoint(&self, key: &PublicKey) -> Option<SocketAddr> {
        self.peers()
            .into_iter()
            .find(|p| p.key == *key)
            .and_then(|p| p.endpoint)
    }
    /// The names of the tunnel's threads that have died (health: `server-down`). The default
    /// (a tunnel without threads) has none.
    fn dead_threads(&self) -> Vec<String> {
        Vec::new()
    }
    /// Sessions online and handshakes counted, for metrics. The default (a tunnel that counts
    /// nothing) answers zeros.
    fn telemetry(&self) -> TunnelTelemetry {
        TunnelTelemetry::default()
    }
}
