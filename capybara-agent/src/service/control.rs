//! The control service: users, devices, tokens, stats, connections, blocklists and the audit
//! trail, in domain types. The API calls it; it programs the tunnel and the dataplane and keeps
//! the store.
//!
//! ## Order of a change, and what "acknowledged" means
//! Mutations are serialised by one writer lock held across the write (not the fsync: callers
//! [`Service::settle`] after it, sharing fsyncs — group commit, see `store`), so id and
//! address allocation and the audit sequence never race; the in-memory index of devices is
//! behind a read-write lock taken only briefly, so reads never wait for a disk flush (measured
//! by the `api_load` benchmark: with reads queued behind the writer lock, one slow fsync of a
//! busy disk held every call for ~1 s). The store is the truth; the kernel maps and the tunnel
//! are derived from it:
//! - **Adding** a device: validate (typed input, existence, uniqueness — an error here changed
//!   nothing) → commit the records **and their audit record** in one synced RocksDB write batch
//!   → program the dataplane (peer, allowed IPs, gate) and the tunnel. If programming fails, a
//!   compensating batch deletes what was committed (audit record included: the change never
//!   took effect) and the error is returned. A SIGKILL after the commit leaves a stored device
//!   that is not programmed yet: [`Service::open`] programs every stored device at start-up.
//!   The reply (the acknowledgement) is sent only after both steps.
//! - **Removing**: the kernel and the tunnel first, then the batch; a failed commit puts the
//!   device back. A SIGKILL in between leaves a stored device that start-up programs again:
//!   the removal was not acknowledged, so nothing acknowledged is lost.
//!
//! Kernel peers the store does not know (set up by tests or tools outside the agent) are left
//! alone and logged; allocation never hands out their ids or addresses.
//!
//! ## Addresses and ids
//! A device gets the lowest free host of the tunnel's IPv4 subnet (not the network, the
//! server's address or the broadcast) and the IPv6 address with the same host offset in the
//! IPv6 subnet, and the lowest free dense peer id. Both are rebuilt from the store at open.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use capybara_common::{
    counters::Counter,
    drop::DropReason,
    peer::{MAX_PEERS, PeerId, PeerStats},
};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::{
    domain::{
        Actor, AuditRecord, ClientConfig, DeviceName, Peer, PublicKey, Scope, Token, TokenId, User,
        UserDetail, UserName, ValidationError, encode_key, unix_secs,
    },
    events::ServiceEvent,
    ports::{Plane, TunnelPort, TunnelPortError},
    secrets::{self, Sealer},
};
use crate::{
    blocklist::{
        Direction, ListName,
        registry::{ListOp, RegistrySnapshot},
    },
    dataplane::{DataplaneError, Gate},
    geo::{CountryCode, GeoDb},
    net::Cidr,
    service::geo::{GeoPlan, GeoPolicy},
    store::{Batch, Cf, Store, StoreError, keys},
};

/// Errors of the control service. The API maps each variant to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Input is invalid; nothing was changed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The named object does not exist.
    #[error("{what} {name:?} not found")]
    NotFound {
        /// `user`, `device`, `token` or `list`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An object of that name exists already.
    #[error("{what} {name:?} already exists")]
    AlreadyExists {
        /// `user` or `device`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The device's private key was not kept, so its config cannot be shown again.
    #[error(
        "the private key of {user}/{device} was shown once and not kept; use --rotate for a new \
         key pair (or run the agent with --keep-client-keys)"
    )]
    KeyNotKept {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
    /// A user has several devices and none was named.
    #[error("device: {user} has {count} devices; name one")]
    DeviceRequired {
        /// The user.
        user: String,
        /// How many devices it has.
        count: usize,
    },
    /// The token was revoked already.
    #[error("token {id} is already revoked")]
    AlreadyRevoked {
        /// The token.
        id: String,
    },
    /// The tunnel subnet has no free address, or every peer id is in use.
    #[error("no free {what}")]
    Exhausted {
        /// `IPv4 address in <subnet>` or `peer id`.
        what: String,
    },
    /// The store failed; nothing was acknowledged.
    #[error("store")]
    Store(#[from] StoreError),
    /// The dataplane failed; the change was undone.
    #[error("dataplane")]
    Dataplane(#[from] DataplaneError),
    /// The tunnel failed; the change was undone.
    #[error(transparent)]
    Tunnel(#[from] TunnelPortError),
    /// A kept client key did not open.
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    /// The object is still used by others (a quota template applied to users).
    #[error("{what} {name:?} is applied to {users}; detach them first")]
    InUse {
        /// `quota template`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Who uses it, comma-separated.
        users: String,
    },
    /// A geo policy was asked for but the agent has no country database.
    #[error("no country database: start the agent with --geoip-db FILE")]
    NoGeoDb,
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer …` header.
    #[error("missing bearer token")]
    Missing,
    /// The header is not a token of ours, or no token has that id and secret.
    #[error("invalid token")]
    Invalid,
    /// The token expired.
    #[error("token expired")]
    Expired,
    /// The token was revoked.
    #[error("token revoked")]
    Revoked,
    /// The token is valid but its scope is too small for the call.
    #[error("this call needs scope {need}; the token has {have}")]
    Scope {
        /// The token's scope.
        have: Scope,
        /// The call's scope.
        need: Scope,
    },
    /// A local connection from a uid other than 0.
    #[error("uid {uid} is not allowed on the control socket")]
    LocalUid {
        /// The peer's uid.
        uid: u32,
    },
    /// The store failed while looking the token up.
    #[error("token lookup failed")]
    Store(#[source] Arc<StoreError>),
}

/// Configuration of the service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The server's address and prefix on the tunnel (IPv4); devices get hosts of this subnet.
    pub server_v4: Ipv4Net,
    /// The server's address and prefix on the tunnel (IPv6).
    pub server_v6: Ipv6Net,
    /// The server's WireGuard public key (for client configs).
    pub server_public_key: PublicKey,
    /// `host:port` clients connect to.
    pub endpoint: String,
    /// DNS servers written into client configs.
    pub dns: Vec<String>,
    /// Keep client private keys, sealed with this sealer (`--keep-client-keys`).
    pub keep_client_keys: Option<Sealer>,
    /// The MaxMind country database for geo policies (`--geoip-db`); `None` = geo unavailable.
    pub geo_db: Option<Arc<GeoDb>>,
}

/// What the store holds for a device.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PeerRecord {
    peer: Peer,
    /// The client's private key, sealed; only with `--keep-client-keys`.
    sealed_key: Option<String>,
}

/// What the store holds for a token.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TokenRecord {
    token: Token,
    /// SHA-256 of the secret, hex.
    hash: String,
}

/// Input of [`Service::add_user`].
#[derive(Clone, Debug)]
pub struct NewUser {
    /// The user.
    pub name: UserName,
    /// Its first device.
    pub device: DeviceName,
    /// Account expiry.
    pub expires_at: Option<SystemTime>,
}

/// Input of [`Service::create_token`].
#[derive(Clone, Debug)]
pub struct NewToken {
    /// What it may do.
    pub scope: Scope,
    /// A label.
    pub name: String,
    /// When it stops working.
    pub expires_at: Option<SystemTime>,
}

/// Counters of one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// The device.
    pub peer: Peer,
    /// Its counters.
    pub stats: PeerStatsView,
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

impl From<Counter> for Traffic {
    fn from(c: Counter) -> Traffic {
        Traffic {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

/// Counters of a peer or a user: bytes/packets each way and drops by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatsView {
    /// From the peer, passed.
    pub rx: Traffic,
    /// To the peer, passed.
    pub tx: Traffic,
    /// Dropped packets by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
}

impl PeerStatsView {
    /// The view of kernel counters.
    pub fn from_kernel(s: &PeerStats) -> PeerStatsView {
        let mut v = PeerStatsView::default();
        v.add(s);
        v
    }

    fn add(&mut self, s: &PeerStats) {
        self.rx.packets += s.rx_packets;
        self.rx.bytes += s.rx_bytes;
        self.tx.packets += s.tx_packets;
        self.tx.bytes += s.tx_bytes;
        for r in DropReason::ALL {
            let n = s.drops[r as usize];
            if n > 0 {
                *self.drops.entry(r.name().to_owned()).or_default() += n;
            }
        }
    }
}

/// The answer of [`Service::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Per device.
    pub peers: Vec<PeerCounters>,
    /// Per user (sums of its devices).
    pub users: BTreeMap<String, PeerStatsView>,
    /// Every drop of the dataplane by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
}

/// A live (or configured) session of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// The device.
    pub peer: Peer,
    /// Where it connects from.
    pub endpoint: Option<String>,
    /// Latest handshake, Unix seconds.
    pub last_handshake: Option<u64>,
    /// Bytes from it.
    pub rx_bytes: u64,
    /// Bytes to it.
    pub tx_bytes: u64,
}

/// A blocklist with its contents and hits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocklistView {
    /// Where it is enforced.
    pub direction: Direction,
    /// Its name.
    pub name: String,
    /// Its CIDRs.
    pub cidrs: Vec<Cidr>,
    /// Packets and bytes dropped because of it.
    pub hits: Traffic,
}

/// Change to a list's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntriesOp {
    /// Add (creating the list).
    Add,
    /// Remove (the list must exist).
    Remove,
}

struct State {
    /// Peer key (`user/device`) → record.
    peers: BTreeMap<String, PeerRecord>,
    used_ids: BTreeSet<PeerId>,
    used_v4: BTreeSet<Ipv4Addr>,
    pubkeys: HashMap<PublicKey, String>,
}

/// The control service. One per agent, shared by every API connection.
pub struct Service {
    pub(super) store: Arc<Store>,
    pub(super) plane: Arc<dyn Plane>,
    tunnel: Arc<dyn TunnelPort>,
    cfg: ServiceConfig,
    /// Serialises mutations (validation, commit, programming); held across the synced write.
    pub(super) writer: Mutex<()>,
    /// The in-memory index of devices; reads take it briefly and never wait for the disk.
    state: RwLock<State>,
    /// The next audit sequence number (advanced under `writer` once a batch is durable).
    next_audit: AtomicU64,
    /// Groups, quotas and limits (`service::policy`).
    pub(super) policy: super::policy::PolicyCell,
    /// The event bus (`service::events`).
    pub(super) events: tokio::sync::broadcast::Sender<ServiceEvent>,
    /// The `config-changed` event of the audit record staged in the batch being built (under
    /// `writer`); the commit step takes and publishes it.
    staged: Mutex<Option<ServiceEvent>>,
    /// The WireGuard port the agent listens on (told by the daemon; for templates).
    pub(super) listen_port: std::sync::OnceLock<u16>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

fn now() -> u64 {
    unix_secs(SystemTime::now())
}

fn to_json<T: Serialize>(v: &T) -> Option<serde_json::Value> {
    serde_json::to_value(v).ok()
}

impl Service {
    /// Loads the users' devices from the store and reconciles the tunnel and the dataplane with
    /// them: every stored device is (re-)programmed, every kernel peer the store does not know
    /// is removed.
    pub fn open(
        store: Arc<Store>,
        plane: Arc<dyn Plane>,
        tunnel: Arc<dyn TunnelPort>,
        cfg: ServiceConfig,
    ) -> Result<Service, ServiceError> {
        let mut state = State {
            peers: BTreeMap::new(),
            used_ids: BTreeSet::new(),
            used_v4: BTreeSet::new(),
            pubkeys: HashMap::new(),
        };
        let next_audit = store
            .last_key(Cf::Audit)?
            .and_then(|k| keys::audit_seq(&k))
            .map_or(1, |s| s + 1);
        let t = std::time::Instant::now();
        for (key, rec) in store.scan::<PeerRecord>(Cf::Peers, "")? {
            state.used_ids.insert(rec.peer.id);
            state.used_v4.insert(rec.peer.ipv4);
            state.pubkeys.insert(rec.peer.public_key, key.clone());
            state.peers.insert(key, rec);
        }
        tracing::info!(
            devices = state.peers.len(),
            ms = t.elapsed().as_millis(),
            "devices read from the store"
        );
        let store_ref = store.clone();
        let svc = Service {
            store,
            plane,
            tunnel,
            cfg,
            writer: Mutex::new(()),
            state: RwLock::new(state),
            next_audit: AtomicU64::new(next_audit),
            policy: super::policy::PolicyCell::load(&store_ref)?,
            events: tokio::sync::broadcast::channel(super::events::EVENT_BUS_CAPACITY).0,
            staged: Mutex::new(None),
            listen_port: std::sync::OnceLock::new(),
        };
        svc.reconcile()?;
        svc.reapply_policy()?;
        svc.apply_log_level();
        Ok(svc)
    }

    fn reconcile(&self) -> Result<(), ServiceError> {
        let st = self.state.read().unwrap();
        let foreign: Vec<PeerId> = self
            .plane
            .peers()
            .into_keys()
            .filter(|id| !st.used_ids.contains(id))
            .collect();
        if !foreign.is_empty() {
            tracing::warn!(
                ?foreign,
                "kernel peers the store does not know are left alone; their ids and addresses are not handed out"
            );
        }
        // In batches (the dataplane's batch syscalls, one tunnel table for all): one call per
        // device took minutes at 100 000 devices (see `Service::open`).
        let mut plane = Vec::with_capacity(st.peers.len());
        let mut tunnel = Vec::with_capacity(st.peers.len());
        for rec in st.peers.values() {
            let allowed = allowed_ips(&rec.peer);
            plane.push((rec.peer.id, allowed.clone()));
            tunnel.push((rec.peer.public_key, allowed));
        }
        let t = std::time::Instant::now();
        self.plane.set_peers(&plane)?;
        drop(plane);
        let plane_ms = t.elapsed().as_millis();
        let t = std::time::Instant::now();
        self.tunnel.add_peers(&tunnel)?;
        tracing::info!(
            peers = st.peers.len(),
            plane_ms,
            tunnel_ms = t.elapsed().as_millis(),
            "devices restored from the store"
        );
        Ok(())
    }

    /// The DNS servers given at start (`--dns`).
    pub(super) fn agent_dns(&self) -> &[String] {
        &self.cfg.dns
    }

    /// The store (for the daemon's own records).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    // ---- audit -------------------------------------------------------------------------

    pub(super) fn audit(
        &self,
        batch: &mut Batch,
        actor: &Actor,
        action: &str,
        target: String,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
    ) -> Result<(), ServiceError> {
        let seq = self.next_audit.load(Ordering::SeqCst);
        let rec = AuditRecord {
            seq,
            at: now(),
            actor: actor.to_string(),
            action: action.to_owned(),
            target,
            before,
            after,
        };
        batch.put(Cf::Audit, &keys::audit(seq), &rec)?;
        *self.staged.lock().unwrap() = Some(ServiceEvent::ConfigChanged {
            seq,
            actor: rec.actor,
            action: rec.action,
            target: rec.target,
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(rec.at),
        });
        Ok(())
    }

    /// Writes `batch` and advances the audit sequence, then publishes the batch's
    /// `config-changed` event (`service::events`). Called under the writer lock, it does not
    /// wait for the disk: the caller (the API, before it replies) calls [`Service::settle`]
    /// after the lock is released, so concurrent mutations share one fsync (see `store`).
    pub(super) fn commit(&self, batch: Batch) -> Result<(), ServiceError> {
        let event = self.commit_unpublished(batch)?;
        self.publish(event);
        Ok(())
    }

    /// [`Service::commit`] for a change that may still be undone (the kernel or the tunnel is
    /// programmed after the commit): its event is returned, for [`Service::publish`] once the
    /// change took effect.
    pub(super) fn commit_unpublished(
        &self,
        batch: Batch,
    ) -> Result<Option<ServiceEvent>, ServiceError> {
        let event = self.staged.lock().unwrap().take();
        let _ = self.store.write(batch)?;
        self.next_audit.fetch_add(1, Ordering::SeqCst);
        Ok(event)
    }

    /// Publishes a committed change's event (no subscriber is not an error).
    pub(super) fn publish(&self, event: Option<ServiceEvent>) {
        if let Some(e) = event {
            tracing::debug!(event = ?e, "service event");
            let _ = self.events.send(e);
        }
    }

    /// Waits until the mutations this thread made are on disk. A mutation is applied, and
    /// survives the agent being killed, when its method returns; it survives power loss once
    /// this returned. The API settles before every reply, so every acknowledgement is durable.
    pub fn settle(&self) -> Result<(), ServiceError> {
        Ok(self.store.sync_mine()?)
    }

    /// The sequence number the next audit record gets.
    pub(super) fn next_audit_seq(&self) -> u64 {
        self.next_audit.load(Ordering::SeqCst)
    }

    /// Hands `seq` out again after its record was deleted by a compensating batch.
    pub(super) fn rewind_audit(&self, seq: u64) {
        self.next_audit.store(seq, Ordering::SeqCst);
    }

    /// The devices of `user` (from the in-memory index).
    pub(super) fn user_peers(&self, user: &UserName) -> Vec<Peer> {
        self.peer_records(user)
            .into_iter()
            .map(|r| r.peer)
            .collect()
    }

    /// The device with public key `key`.
    pub(super) fn peer_by_key(&self, key: &PublicKey) -> Option<Peer> {
        let st = self.state.read().unwrap();
        st.pubkeys
            .get(key)
            .and_then(|k| st.peers.get(k))
            .map(|r| r.peer.clone())
    }

    /// Audit records, newest first, at most `limit`; only those about `user` if given.
    pub fn audit_records(
        &self,
        user: Option<&UserName>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, ServiceError> {
        let user_t = user.map(|u| format!("user:{u}"));
        let peer_t = user.map(|u| format!("peer:{u}/"));
        Ok(self.store.scan_back(Cf::Audit, limit, |r: &AuditRecord| {
            match (&user_t, &peer_t) {
                (Some(u), Some(p)) => r.target == *u || r.target.starts_with(p.as_str()),
                _ => true,
            }
        })?)
    }

    // ---- users and devices ---------------------------------------------------------------

    fn allocate(&self) -> Result<(PeerId, Ipv4Addr, Ipv6Addr), ServiceError> {
        let st = self.state.read().unwrap();
        // Peers in the kernel that the store does not know keep their ids and addresses.
        let kernel = self.plane.peers();
        let kernel_addrs: BTreeSet<std::net::IpAddr> = kernel
            .values()
            .flatten()
            .filter(|c| c.is_host())
            .map(|c| c.addr())
            .collect();
        let id = (0..MAX_PEERS)
            .find(|i| !st.used_ids.contains(i) && !kernel.contains_key(i))
            .ok_or_else(|| ServiceError::Exhausted {
                what: "peer id".into(),
            })?;
        let net = self.cfg.server_v4.trunc();
        let base = u32::from(net.network());
        let hosts = (1u32 << (32 - net.prefix_len().min(31))).saturating_sub(2);
        let server = self.cfg.server_v4.addr();
        let (offset, v4) = (1..=hosts)
            .map(|o| (o, Ipv4Addr::from(base + o)))
            .find(|(_, a)| {
                *a != server
                    && !st.used_v4.contains(a)
                    && !kernel_addrs.contains(&std::net::IpAddr::V4(*a))
            })
            .ok_or_else(|| ServiceError::Exhausted {
                what: format!("IPv4 address in {net}"),
            })?;
        let v6 =
            Ipv6Addr::from(u128::from(self.cfg.server_v6.trunc().network()) + u128::from(offset));
        Ok((id, v4, v6))
    }

    /// Makes a device record: allocates an id and addresses and generates its key pair.
    fn new_peer(
        &self,
        user: &UserName,
        device: &DeviceName,
    ) -> Result<(PeerRecord, [u8; 32]), ServiceError> {
        let (id, ipv4, ipv6) = self.allocate()?;
        let (private, public_key) = secrets::generate_keypair();
        let key_kept = self.cfg.keep_client_keys.is_some();
        let peer = Peer {
            id,
            user: user.clone(),
            device: device.clone(),
            public_key,
            ipv4,
            ipv6,
            created_at: now(),
            key_kept,
        };
        let sealed_key = self
            .cfg
            .keep_client_keys
            .as_ref()
            .map(|s| s.seal(&private, &keys::peer(user.as_str(), device.as_str())));
        Ok((PeerRecord { peer, sealed_key }, private))
    }

    /// Deletes what an add committed (the device, the user if it was new, the audit record)
    /// after programming the kernel or the tunnel failed: the change never took effect.
    fn undo_add(&self, seq: u64, peer: &Peer, added_user: bool) -> Result<(), ServiceError> {
        let mut batch = Batch::default();
        batch.delete(
            Cf::Peers,
            &keys::peer(peer.user.as_str(), peer.device.as_str()),
        );
        if added_user {
            batch.delete(Cf::Users, &keys::user(peer.user.as_str()));
        }
        batch.delete(Cf::Audit, &keys::audit(seq));
        self.store.commit(batch)?;
        self.next_audit.store(seq, Ordering::SeqCst);
        Ok(())
    }

    /// Programs a peer into the dataplane and the tunnel; on error nothing stays programmed.
    fn program(&self, peer: &Peer) -> Result<(), ServiceError> {
        let allowed = allowed_ips(peer);
        self.plane.set_peer(peer.id, &allowed)?;
        if let Err(e) = self.plane.set_gate(peer.id, Gate::Admitted { until: None }) {
            let _ = self.plane.remove_peer(peer.id);
            return Err(e.into());
        }
        if let Err(e) = self.tunnel.add_peer(peer.public_key, &allowed) {
            let _ = self.plane.remove_peer(peer.id);
            return Err(e.into());
        }
        Ok(())
    }

    /// Removes a peer from the tunnel and the dataplane.
    fn unprogram(&self, peer: &Peer) -> Result<(), ServiceError> {
        self.tunnel.remove_peer(&peer.public_key)?;
        match self.plane.remove_peer(peer.id) {
            Ok(()) | Err(DataplaneError::UnknownPeer { .. }) => Ok(()),
            Err(e) => {
                let _ = self.tunnel.add_peer(peer.public_key, &allowed_ips(peer));
                Err(e.into())
            }
        }
    }

    fn config_for(&self, peer: &Peer, private: Option<&[u8; 32]>) -> ClientConfig {
        let private_key = private.map(encode_key);
        let mut wg = String::from("[Interface]\n");
        if let Some(k) = &private_key {
            wg.push_str(&format!("PrivateKey = {k}\n"));
        } else {
            wg.push_str("# PrivateKey = <shown once when the device was created>\n");
        }
        wg.push_str(&format!("Address = {}/32, {}/128\n", peer.ipv4, peer.ipv6));
        // The DNS of the configuration template applied last, else the agent's `--dns`.
        let dns = self.client_dns();
        if !dns.is_empty() {
            wg.push_str(&format!("DNS = {}\n", dns.join(", ")));
        }
        wg.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nEndpoint = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
            self.cfg.server_public_key, self.cfg.endpoint
        ));
        ClientConfig {
            peer: peer.clone(),
            private_key,
            server_public_key: self.cfg.server_public_key,
            endpoint: self.cfg.endpoint.clone(),
            dns,
            wg_quick: wg,
        }
    }

    fn peer_records(&self, user: &UserName) -> Vec<PeerRecord> {
        Self::peer_records_in(&self.state.read().unwrap(), user)
    }

    fn peer_records_in(st: &State, user: &UserName) -> Vec<PeerRecord> {
        let prefix = keys::user_peers_prefix(user.as_str());
        st.peers
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Creates a user and its first device in one write; the config carries the device's
    /// private key, shown this once.
    pub fn add_user(
        &self,
        actor: &Actor,
        new: NewUser,
    ) -> Result<(User, ClientConfig), ServiceError> {
        let _w = self.writer.lock().unwrap();
        let expires_at = expiry("expires_at", new.expires_at)?;
        if self
            .store
            .get::<User>(Cf::Users, &keys::user(new.name.as_str()))?
            .is_some()
        {
            return Err(ServiceError::AlreadyExists {
                what: "user",
                name: new.name.to_string(),
            });
        }
        let user = User {
            name: new.name.clone(),
            created_at: now(),
            expires_at,
        };
        let (rec, private) = self.new_peer(&new.name, &new.device)?;
        let added_user = true;
        let pkey = keys::peer(new.name.as_str(), new.device.as_str());
        let mut batch = Batch::default();
        batch.put(Cf::Users, &keys::user(new.name.as_str()), &user)?;
        batch.put(Cf::Peers, &pkey, &rec)?;
        let detail = UserDetail {
            user: user.clone(),
            peers: vec![rec.peer.clone()],
        };
        self.audit(
            &mut batch,
            actor,
            "user.add",
            format!("user:{}", new.name),
            None,
            to_json(&detail),
        )?;
        let cfg = self.commit_device(batch, pkey, rec, &private, added_user)?;
        tracing::info!(%actor, user = %new.name, "user added");
        Ok((user, cfg))
    }

    /// Adds a device to an existing user.
    pub fn add_device(
        &self,
        actor: &Actor,
        user: &UserName,
        device: &DeviceName,
    ) -> Result<ClientConfig, ServiceError> {
        let _w = self.writer.lock().unwrap();
        self.get_user_record(user)?;
        let pkey = keys::peer(user.as_str(), device.as_str());
        if self.state.read().unwrap().peers.contains_key(&pkey) {
            return Err(ServiceError::AlreadyExists {
                what: "device",
                name: pkey,
            });
        }
        let (rec, private) = self.new_peer(user, device)?;
        let added_user = false;
        let mut batch = Batch::default();
        batch.put(Cf::Peers, &pkey, &rec)?;
        self.audit(
            &mut batch,
            actor,
            "peer.add",
            format!("peer:{pkey}"),
            None,
            to_json(&rec.peer),
        )?;
        self.commit_device(batch, pkey, rec, &private, added_user)
    }

    /// Commits `batch` (a new device `rec` under `pkey`, maybe its new user, the audit record),
    /// then programs the kernel and the tunnel; if that fails, the commit is undone. On success
    /// the device joins the in-memory index and its client config (with `private`) is returned.
    fn commit_device(
        &self,
        batch: Batch,
        pkey: String,
        rec: PeerRecord,
        private: &[u8; 32],
        added_user: bool,
    ) -> Result<ClientConfig, ServiceError> {
        let seq = self.next_audit.load(Ordering::SeqCst);
        let event = self.commit_unpublished(batch)?;
        if let Err(e) = self.program(&rec.peer) {
            self.undo_add(seq, &rec.peer, added_user)?;
            return Err(e);
        }
        self.publish(event);
        let cfg = self.config_for(&rec.peer, Some(private));
        let user = rec.peer.user.clone();
        // A new device is not online and has no gate decision yet, whatever a removed device
        // that had its id left behind.
        self.policy_forget_online(std::slice::from_ref(&rec.peer));
        let mut st = self.state.write().unwrap();
        st.used_ids.insert(rec.peer.id);
        st.used_v4.insert(rec.peer.ipv4);
        st.pubkeys.insert(rec.peer.public_key, pkey.clone());
        st.peers.insert(pkey, rec);
        drop(st);
        // The user's policy covers the new device before the reply (rates, flows, quota, gate).
        if let Err(e) = self.apply_policy(std::slice::from_ref(&user), false) {
            tracing::error!(error = %e, %user, "cannot apply the policy to a new device");
        }
        Ok(cfg)
    }

    pub(super) fn get_user_record(&self, name: &UserName) -> Result<User, ServiceError> {
        self.store
            .get::<User>(Cf::Users, &keys::user(name.as_str()))?
            .ok_or_else(|| ServiceError::NotFound {
                what: "user",
                name: name.to_string(),
            })
    }

    /// Every user with its devices, by name.
    pub fn list_users(&self) -> Result<Vec<UserDetail>, ServiceError> {
        let st = self.state.read().unwrap();
        let users: Vec<(String, User)> = self.store.scan(Cf::Users, "")?;
        Ok(users
            .into_iter()
            .map(|(_, user)| UserDetail {
                peers: Self::peer_records_in(&st, &user.name)
                    .into_iter()
                    .map(|r| r.peer)
                    .collect(),
                user,
            })
            .collect())
    }

    /// One user with its devices.
    pub fn get_user(&self, name: &UserName) -> Result<UserDetail, ServiceError> {
        let st = self.state.read().unwrap();
        let user = self.get_user_record(name)?;
        Ok(UserDetail {
            user,
            peers: Self::peer_records_in(&st, name)
                .into_iter()
                .map(|r| r.peer)
                .collect(),
        })
    }

    /// Devices of `user`, or of everyone.
    pub fn list_peers(&self, user: Option<&UserName>) -> Result<Vec<Peer>, ServiceError> {
        let st = self.state.read().unwrap();
        match user {
            Some(u) => {
                self.get_user_record(u)?;
                Ok(Self::peer_records_in(&st, u)
                    .into_iter()
                    .map(|r| r.peer)
                    .collect())
            }
            None => Ok(st.peers.values().map(|r| r.peer.clone()).collect()),
        }
    }

    /// Removes a user and all its devices (tunnel, dataplane, then one store batch).
    pub fn remove_user(&self, actor: &Actor, name: &UserName) -> Result<UserDetail, ServiceError> {
        let _w = self.writer.lock().unwrap();
        let user = self.get_user_record(name)?;
        let recs = self.peer_records(name);
        let detail = UserDetail {
            user,
            peers: recs.iter().map(|r| r.peer.clone()).collect(),
        };
        for (i, r) in recs.iter().enumerate() {
            if let Err(e) = self.unprogram(&r.peer) {
                for undo in &recs[..i] {
                    let _ = self.program(&undo.peer);
                }
                return Err(e);
            }
        }
        let mut batch = Batch::default();
        batch.delete(Cf::Users, &keys::user(name.as_str()));
        for r in &recs {
            batch.delete(
                Cf::Peers,
                &keys::peer(name.as_str(), r.peer.device.as_str()),
            );
        }
        // Its own limits and group memberships go with it (same batch).
        let policy = self.policy_forget_user(&mut batch, name)?;
        self.audit(
            &mut batch,
            actor,
            "user.remove",
            format!("user:{name}"),
            to_json(&detail),
            None,
        )?;
        if let Err(e) = self.commit(batch) {
            for r in &recs {
                let _ = self.program(&r.peer);
            }
            return Err(e);
        }
        let mut st = self.state.write().unwrap();
        for r in &recs {
            st.used_ids.remove(&r.peer.id);
            st.used_v4.remove(&r.peer.ipv4);
            st.pubkeys.remove(&r.peer.public_key);
            st.peers
                .remove(&keys::peer(name.as_str(), r.peer.device.as_str()));
        }
        drop(st);
        self.policy_forgotten(policy);
        tracing::info!(%actor, user = %name, "user removed");
        Ok(detail)
    }

    /// Removes one device.
    pub fn remove_device(
        &self,
        actor: &Actor,
        user: &UserName,
        device: &DeviceName,
    ) -> Result<Peer, ServiceError> {
        let _w = self.writer.lock().unwrap();
        let pkey = keys::peer(user.as_str(), device.as_str());
        let rec = self
            .state
            .read()
            .unwrap()
            .peers
            .get(&pkey)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound {
                what: "device",
                name: pkey.clone(),
            })?;
        self.unprogram(&rec.peer)?;
        let mut batch = Batch::default();
        batch.delete(Cf::Peers, &pkey);
        self.audit(
            &mut batch,
            actor,
            "peer.remove",
            format!("peer:{pkey}"),
            to_json(&rec.peer),
            None,
        )?;
        if let Err(e) = self.commit(batch) {
            let _ = self.program(&rec.peer);
            return Err(e);
        }
        let mut st = self.state.write().unwrap();
        st.used_ids.remove(&rec.peer.id);
        st.used_v4.remove(&rec.peer.ipv4);
        st.pubkeys.remove(&rec.peer.public_key);
        st.peers.remove(&pkey);
        drop(st);
        // Its slot of the device limit is free: the user's other devices are decided again.
        self.policy_forget_online(std::slice::from_ref(&rec.peer));
        if let Err(e) = self.apply_policy(std::slice::from_ref(user), false) {
            tracing::error!(error = %e, %user, "cannot re-apply the policy after a device was removed");
        }
        Ok(rec.peer)
    }

    /// The wg-quick config of a device: from the kept key, or with a new key pair if `rotate`.
    pub fn user_config(
        &self,
        actor: &Actor,
        user: &UserName,
        device: Option<&DeviceName>,
        rotate: bool,
    ) -> Result<ClientConfig, ServiceError> {
        let _w = self.writer.lock().unwrap();
        self.get_user_record(user)?;
        let recs = self.peer_records(user);
        let rec = match device {
            Some(d) => recs
                .into_iter()
                .find(|r| r.peer.device == *d)
                .ok_or_else(|| ServiceError::NotFound {
                    what: "device",
                    name: keys::peer(user.as_str(), d.as_str()),
                })?,
            None if recs.len() == 1 => recs.into_iter().next().expect("one device"),
            None => {
                return Err(ServiceError::DeviceRequired {
                    user: user.to_string(),
                    count: recs.len(),
                });
            }
        };
        let pkey = keys::peer(user.as_str(), rec.peer.device.as_str());
        if !rotate {
            let sealed = match (&rec.sealed_key, &self.cfg.keep_client_keys) {
                (Some(s), Some(sealer)) => sealer.open(s, &pkey)?,
                _ => {
                    return Err(ServiceError::KeyNotKept {
                        user: user.to_string(),
                        device: rec.peer.device.to_string(),
                    });
                }
            };
            return Ok(self.config_for(&rec.peer, Some(&sealed)));
        }
        // Rotate: the new key replaces the old one in the tunnel; id, addresses and counters stay.
        let (private, public_key) = secrets::generate_keypair();
        let mut new = rec.clone();
        new.peer.public_key = public_key;
        new.peer.key_kept = self.cfg.keep_client_keys.is_some();
        new.sealed_key = self
            .cfg
            .keep_client_keys
            .as_ref()
            .map(|s| s.seal(&private, &pkey));
        let allowed = allowed_ips(&new.peer);
        self.tunnel.remove_peer(&rec.peer.public_key)?;
        if let Err(e) = self.tunnel.add_peer(public_key, &allowed) {
            let _ = self.tunnel.add_peer(rec.peer.public_key, &allowed);
            return Err(e.into());
        }
        let mut batch = Batch::default();
        batch.put(Cf::Peers, &pkey, &new)?;
        self.audit(
            &mut batch,
            actor,
            "peer.rotate",
            format!("peer:{pkey}"),
            to_json(&rec.peer),
            to_json(&new.peer),
        )?;
        if let Err(e) = self.commit(batch) {
            let _ = self.tunnel.remove_peer(&public_key);
            let _ = self.tunnel.add_peer(rec.peer.public_key, &allowed);
            return Err(e);
        }
        let mut st = self.state.write().unwrap();
        st.pubkeys.remove(&rec.peer.public_key);
        st.pubkeys.insert(public_key, pkey.clone());
        let cfg = self.config_for(&new.peer, Some(&private));
        st.peers.insert(pkey, new);
        Ok(cfg)
    }

    // ---- tokens ---------------------------------------------------------------------------

    /// Creates a token; the bearer string is returned this once and never stored.
    pub fn create_token(
        &self,
        actor: &Actor,
        new: NewToken,
    ) -> Result<(Token, String), ServiceError> {
        let _w = self.writer.lock().unwrap();
        if new.name.len() > 64 || new.name.chars().any(char::is_control) {
            return Err(ValidationError::Name {
                field: "name",
                value: new.name,
                reason: "at most 64 printable characters",
            }
            .into());
        }
        let expires_at = expiry("expires", new.expires_at)?;
        let id = TokenId::random();
        let secret = secrets::new_token_secret(&id);
        let token = Token {
            id: id.clone(),
            name: new.name,
            scope: new.scope,
            created_at: now(),
            expires_at,
            revoked_at: None,
        };
        let mut batch = Batch::default();
        batch.put(
            Cf::Tokens,
            &keys::token(id.as_str()),
            &TokenRecord {
                token: token.clone(),
                hash: secret.hash,
            },
        )?;
        self.audit(
            &mut batch,
            actor,
            "token.create",
            format!("token:{id}"),
            None,
            to_json(&token),
        )?;
        self.commit(batch)?;
        tracing::info!(%actor, token = %id, scope = %token.scope, "token created");
        Ok((token, secret.bearer))
    }

    /// Every token (revoked ones too), by id.
    pub fn list_tokens(&self) -> Result<Vec<Token>, ServiceError> {
        Ok(self
            .store
            .scan::<TokenRecord>(Cf::Tokens, "")?
            .into_iter()
            .map(|(_, r)| r.token)
            .collect())
    }

    /// Revokes a token: it stops working at once; the record stays for the audit trail.
    pub fn revoke_token(&self, actor: &Actor, id: &TokenId) -> Result<Token, ServiceError> {
        let _w = self.writer.lock().unwrap();
        let mut rec: TokenRecord = self
            .store
            .get(Cf::Tokens, &keys::token(id.as_str()))?
            .ok_or_else(|| ServiceError::NotFound {
                what: "token",
                name: id.to_string(),
            })?;
        if rec.token.revoked_at.is_some() {
            return Err(ServiceError::AlreadyRevoked { id: id.to_string() });
        }
        let before = rec.token.clone();
        rec.token.revoked_at = Some(now());
        let mut batch = Batch::default();
        batch.put(Cf::Tokens, &keys::token(id.as_str()), &rec)?;
        self.audit(
            &mut batch,
            actor,
            "token.revoke",
            format!("token:{id}"),
            to_json(&before),
            to_json(&rec.token),
        )?;
        self.commit(batch)?;
        Ok(rec.token)
    }

    /// The actor a bearer string stands for, if it is a valid token.
    pub fn authenticate(&self, bearer: &str) -> Result<Actor, AuthError> {
        let (id, hash) = secrets::parse_bearer(bearer).ok_or(AuthError::Invalid)?;
        let rec: TokenRecord = self
            .store
            .get(Cf::Tokens, &keys::token(id.as_str()))
            .map_err(|e| AuthError::Store(Arc::new(e)))?
            .ok_or(AuthError::Invalid)?;
        if !secrets::hashes_equal(&hash, &rec.hash) {
            return Err(AuthError::Invalid);
        }
        if rec.token.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        if rec.token.expires_at.is_some_and(|e| e <= now()) {
            return Err(AuthError::Expired);
        }
        Ok(Actor::Token {
            id,
            scope: rec.token.scope,
        })
    }

    // ---- stats and connections ----------------------------------------------------------

    /// Counters per device and per user (of `user` only if given), and global drops by reason.
    pub fn stats(&self, user: Option<&UserName>) -> Result<Stats, ServiceError> {
        let peers = self.list_peers(user)?;
        let mut out = Stats::default();
        for peer in peers {
            let k = self.plane.peer_stats(peer.id)?;
            out.users.entry(peer.user.to_string()).or_default().add(&k);
            out.peers.push(PeerCounters {
                stats: PeerStatsView::from_kernel(&k),
                peer,
            });
        }
        for (r, c) in self.plane.drops()? {
            if c.packets > 0 {
                out.drops.insert(r.name().to_owned(), c.packets);
            }
        }
        Ok(out)
    }

    /// Every device the tunnel reports, with its endpoint and latest handshake.
    pub fn connections(&self) -> Result<Vec<Connection>, ServiceError> {
        let st = self.state.read().unwrap();
        let mut out: Vec<Connection> = self
            .tunnel
            .peers()
            .into_iter()
            .filter_map(|s| {
                let rec = st.pubkeys.get(&s.key).and_then(|k| st.peers.get(k))?;
                Some(Connection {
                    peer: rec.peer.clone(),
                    endpoint: s.endpoint.map(|e| e.to_string()),
                    last_handshake: s.last_handshake.map(unix_secs),
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.peer.user, &a.peer.device).cmp(&(&b.peer.user, &b.peer.device)));
        Ok(out)
    }

    /// Ends every session of `user` now: its devices are held at the gate as kicked and their
    /// tunnel sessions torn down. A device passes the gate again when it completes a new
    /// handshake ([`Service::on_handshake`]).
    pub fn kick(&self, actor: &Actor, user: &UserName) -> Result<Vec<Peer>, ServiceError> {
        let _w = self.writer.lock().unwrap();
        self.get_user_record(user)?;
        let recs = self.peer_records(user);
        for r in &recs {
            self.plane
                .set_gate(r.peer.id, Gate::Held(DropReason::GateKicked))?;
            self.tunnel.kick(&r.peer.public_key)?;
        }
        let peers: Vec<Peer> = recs.into_iter().map(|r| r.peer).collect();
        self.policy_forget_online(&peers);
        let mut batch = Batch::default();
        self.audit(
            &mut batch,
            actor,
            "connection.kick",
            format!("user:{user}"),
            None,
            to_json(&peers),
        )?;
        self.commit(batch)?;
        Ok(peers)
    }

    /// The tunnel saw a completed handshake of `key`: the device passes the gate again (a
    /// kicked device is admitted by its next handshake). Unknown keys are ignored.
    pub fn on_handshake(&self, key: &PublicKey) -> Result<(), ServiceError> {
        // The policy decides the gate (admitted, or held by a device limit or a window).
        self.policy_on_connect(key, SystemTime::now())
    }

    // ---- blocklists ---------------------------------------------------------------------

    /// Every list with its contents and hits.
    pub fn blocklists(&self) -> Result<Vec<BlocklistView>, ServiceError> {
        let lists = self.plane.lists()?;
        Ok(lists
            .into_iter()
            .map(|(s, hits)| BlocklistView {
                cidrs: self
                    .plane
                    .list_cidrs(s.direction, &s.name)
                    .unwrap_or_default(),
                direction: s.direction,
                name: s.name.as_str().to_owned(),
                hits: hits.into(),
            })
            .collect())
    }

    /// One list.
    pub fn blocklist(
        &self,
        direction: Direction,
        name: &ListName,
    ) -> Result<BlocklistView, ServiceError> {
        self.blocklists()?
            .into_iter()
            .find(|l| l.direction == direction && l.name == name.as_str())
            .ok_or_else(|| ServiceError::NotFound {
                what: "list",
                name: format!("{direction}/{}", name.as_str()),
            })
    }

    /// Adds or removes entries, persisting the registry and an audit record in one batch.
    pub fn change_entries(
        &self,
        actor: &Actor,
        direction: Direction,
        name: &ListName,
        op: EntriesOp,
        cidrs: &[Cidr],
    ) -> Result<BlocklistView, ServiceError> {
        let _w = self.writer.lock().unwrap();
        let before = self.plane.list_cidrs(direction, name);
        if op == EntriesOp::Remove && before.is_none() {
            return Err(ServiceError::NotFound {
                what: "list",
                name: format!("{direction}/{}", name.as_str()),
            });
        }
        let list_op = match op {
            EntriesOp::Add => ListOp::Add(cidrs),
            EntriesOp::Remove => ListOp::Remove(cidrs),
        };
        let action = match op {
            EntriesOp::Add => "blocklist.add",
            EntriesOp::Remove => "blocklist.remove",
        };
        self.list_change(actor, direction, name, list_op, action, before)?;
        drop(_w);
        self.blocklist(direction, name)
    }

    /// Deletes a list.
    pub fn delete_blocklist(
        &self,
        actor: &Actor,
        direction: Direction,
        name: &ListName,
    ) -> Result<(), ServiceError> {
        let _w = self.writer.lock().unwrap();
        let before = self.plane.list_cidrs(direction, name);
        if before.is_none() {
            return Err(ServiceError::NotFound {
                what: "list",
                name: format!("{direction}/{}", name.as_str()),
            });
        }
        self.list_change(
            actor,
            direction,
            name,
            ListOp::Delete,
            "blocklist.delete",
            before,
        )
    }

    fn list_change(
        &self,
        actor: &Actor,
        direction: Direction,
        name: &ListName,
        op: ListOp<'_>,
        action: &str,
        before: Option<Vec<Cidr>>,
    ) -> Result<(), ServiceError> {
        let old_snapshot: RegistrySnapshot = self.plane.list_snapshot();
        self.plane.list_op(direction, name, op)?;
        let after = self.plane.list_cidrs(direction, name);
        let mut batch = Batch::default();
        batch.put(
            Cf::Blocklists,
            keys::BLOCKLISTS,
            &self.plane.list_snapshot(),
        )?;
        self.audit(
            &mut batch,
            actor,
            action,
            format!("blocklist:{direction}/{}", name.as_str()),
            before.as_ref().and_then(to_json),
            after.as_ref().and_then(to_json),
        )?;
        if let Err(e) = self.commit(batch) {
            // Put the old contents back so the kernel matches the store.
            let restore = match &before {
                Some(c) => self.plane.list_op(direction, name, ListOp::Replace(c)),
                None => self.plane.list_op(direction, name, ListOp::Delete),
            };
            if let Err(r) = restore {
                tracing::error!(error = %r, snapshot = old_snapshot.lists.len(), "cannot undo a list change after a failed commit");
            }
            return Err(e);
        }
        Ok(())
    }
}

/// The geo policy as stored (`blocklists` family, [`keys::GEO_POLICY`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeoStatus {
    /// `off`, `block` or `allow`.
    pub mode: String,
    /// The countries of the policy, ISO codes.
    pub countries: Vec<String>,
    /// The geo lists in the kernel with their sizes and hits.
    pub lists: Vec<BlocklistView>,
}

/// The stored form of a policy.
fn geo_record(policy: &GeoPolicy) -> (String, Vec<String>) {
    let codes = |c: &[CountryCode]| c.iter().map(|c| c.as_str().to_owned()).collect();
    match policy {
        GeoPolicy::Off => ("off".into(), Vec::new()),
        GeoPolicy::Block(c) => ("block".into(), codes(c)),
        GeoPolicy::Allow(c) => ("allow".into(), codes(c)),
    }
}

impl Service {
    /// The geo policy and its lists.
    pub fn geo(&self) -> Result<GeoStatus, ServiceError> {
        let mut status: GeoStatus = self
            .store
            .get(Cf::Blocklists, keys::GEO_POLICY)?
            .unwrap_or_else(|| GeoStatus {
                mode: "off".into(),
                ..GeoStatus::default()
            });
        status.lists = self
            .blocklists()?
            .into_iter()
            .filter(|l| l.direction == Direction::Source && l.name.starts_with("geo:"))
            .collect();
        Ok(status)
    }

    /// Replaces the geo lists with those of `policy` in one generation, and stores the policy,
    /// the registry and an audit record in one batch.
    pub fn set_geo(&self, actor: &Actor, policy: &GeoPolicy) -> Result<GeoStatus, ServiceError> {
        let db = self.cfg.geo_db.clone().ok_or(ServiceError::NoGeoDb)?;
        let _w = self.writer.lock().unwrap();
        let before = self.geo()?;
        let current: Vec<ListName> = self
            .plane
            .lists()?
            .into_iter()
            .filter(|(l, _)| l.direction == Direction::Source)
            .map(|(l, _)| l.name)
            .collect();
        let plan = GeoPlan::new(&db, policy, &current);
        let old: Vec<(ListName, Vec<Cidr>)> = current
            .iter()
            .filter(|n| n.as_str().starts_with("geo:"))
            .filter_map(|n| Some((n.clone(), self.plane.list_cidrs(Direction::Source, n)?)))
            .collect();
        self.plane.list_batch(Direction::Source, &plan.ops())?;
        let (mode, countries) = geo_record(policy);
        let record = GeoStatus {
            mode,
            countries,
            lists: Vec::new(),
        };
        let mut batch = Batch::default();
        batch.put(Cf::Blocklists, keys::GEO_POLICY, &record)?;
        batch.put(
            Cf::Blocklists,
            keys::BLOCKLISTS,
            &self.plane.list_snapshot(),
        )?;
        self.audit(
            &mut batch,
            actor,
            "geo.set",
            "geo".into(),
            to_json(&GeoStatus {
                lists: Vec::new(),
                ..before
            }),
            to_json(&record),
        )?;
        if let Err(e) = self.commit(batch) {
            // Back to the old geo lists, in one generation again.
            let undo = GeoPlan {
                delete: plan
                    .replace
                    .iter()
                    .map(|(n, _)| n.clone())
                    .filter(|n| !old.iter().any(|(o, _)| o == n))
                    .collect(),
                replace: old,
            };
            if let Err(u) = self.plane.list_batch(Direction::Source, &undo.ops()) {
                tracing::error!(error = %u, "cannot restore the geo lists after a failed commit");
            }
            return Err(e);
        }
        drop(_w);
        self.geo()
    }
}

/// The allowed IPs of a device: its two host routes.
/// An expiry given in `field` as seconds since the epoch; one in the past is refused.
fn expiry(field: &'static str, at: Option<SystemTime>) -> Result<Option<u64>, ValidationError> {
    match at {
        Some(t) if t <= SystemTime::now() => Err(ValidationError::Time {
            field,
            reason: "is in the past",
        }),
        t => Ok(t.map(unix_secs)),
    }
}

pub fn allowed_ips(peer: &Peer) -> Vec<Cidr> {
    vec![
        Cidr::host(std::net::IpAddr::V4(peer.ipv4)),
        Cidr::host(std::net::IpAddr::V6(peer.ipv6)),
    ]
}

pub mod health;
pub mod history;

#[cfg(test)]
mod tests;
