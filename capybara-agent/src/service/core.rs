//! The transaction core every feature is handed: the store, the dataplane and the tunnel (as
//! ports), the configuration, the writer lock, the audit trail and the commit → publish step.
//!
//! ## Order of a change, and what "acknowledged" means
//! Mutations are serialised by one writer lock ([`Core::writer`]) held across the write (not
//! the fsync: callers [`Core::settle`] after it, sharing fsyncs — group commit, see `store`), so
//! id and address allocation and the audit sequence never race; in-memory indexes (the
//! devices: `directory`; the policy cache) are behind read-write locks taken only briefly, so
//! reads never wait for a disk flush (measured by the `api_load` benchmark: with reads queued
//! behind the writer lock, one slow fsync of a busy disk held every call for ~1 s). The store is
//! the truth; the kernel maps and the tunnel are derived from it. Every mutation stages its
//! audit record ([`Core::audit`]) in the batch that commits it ([`Core::commit`]); the commit
//! publishes the record's `config-changed` event (`service::events`) once the batch is written.
//! A change the kernel or the tunnel may still refuse commits with
//! [`Core::commit_unpublished`], deletes its batch again on a refusal ([`Core::rewind_audit`]
//! hands the sequence number out again) and publishes only once it took effect.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;

use ipnet::{Ipv4Net, Ipv6Net};

use super::{
    ServiceError,
    domain::{Actor, AuditRecord, PublicKey, UserName, unix_secs},
    events::{EVENT_BUS_CAPACITY, ServiceEvent},
    ports::{Plane, TunnelPort},
    secrets::Sealer,
};
use crate::{
    geo::GeoDb,
    store::{Batch, Cf, Store, keys},
};

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
    /// Leave kernel peers the store does not know in place at start (`--keep-unknown-peers`);
    /// by default they are removed (see `service::devices`).
    pub keep_unknown_peers: bool,
}

/// What every feature of the service shares. One per agent.
pub struct Core {
    /// The store: the truth.
    pub store: Arc<Store>,
    /// The kernel dataplane.
    pub plane: Arc<dyn Plane>,
    /// The WireGuard tunnel.
    pub tunnel: Arc<dyn TunnelPort>,
    /// The service's configuration.
    pub cfg: ServiceConfig,
    /// Serialises mutations (validation, commit, programming); held across the write.
    pub writer: Mutex<()>,
    /// The next audit sequence number (advanced under `writer` once a batch is written).
    next_audit: AtomicU64,
    /// The event bus (`service::events`).
    events: tokio::sync::broadcast::Sender<ServiceEvent>,
    /// The `config-changed` event of the audit record staged in the batch being built (under
    /// `writer`); the commit step takes and publishes it.
    staged: Mutex<Option<ServiceEvent>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").finish_non_exhaustive()
    }
}

/// Now, in Unix seconds.
pub fn now() -> u64 {
    unix_secs(SystemTime::now())
}

/// The JSON form of a value for an audit record.
pub fn to_json<T: Serialize>(v: &T) -> Option<serde_json::Value> {
    serde_json::to_value(v).ok()
}

impl Core {
    /// The core over `store`, continuing its audit sequence.
    pub fn new(
        store: Arc<Store>,
        plane: Arc<dyn Plane>,
        tunnel: Arc<dyn TunnelPort>,
        cfg: ServiceConfig,
    ) -> Result<Core, ServiceError> {
        let next_audit = store
            .last_key(Cf::Audit)?
            .and_then(|k| keys::audit_seq(&k))
            .map_or(1, |s| s + 1);
        Ok(Core {
            store,
            plane,
            tunnel,
            cfg,
            writer: Mutex::new(()),
            next_audit: AtomicU64::new(next_audit),
            events: tokio::sync::broadcast::channel(EVENT_BUS_CAPACITY).0,
            staged: Mutex::new(None),
        })
    }

    /// Stages the audit record of a change into `batch` (and its `config-changed` event, for
    /// the commit step).
    pub fn audit(
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
    /// wait for the disk: the caller (the API, before it replies) calls [`Core::settle`]
    /// after the lock is released, so concurrent mutations share one fsync (see `store`).
    pub fn commit(&self, batch: Batch) -> Result<(), ServiceError> {
        let event = self.commit_unpublished(batch)?;
        self.publish(event);
        Ok(())
    }

    /// [`Core::commit`] for a change that may still be undone (the kernel or the tunnel is
    /// programmed after the commit): its event is returned, for [`Core::publish`] once the
    /// change took effect.
    pub fn commit_unpublished(&self, batch: Batch) -> Result<Option<ServiceEvent>, ServiceError> {
        let event = self.staged.lock().unwrap().take();
        let _ = self.store.write(batch)?;
        self.next_audit.fetch_add(1, Ordering::SeqCst);
        Ok(event)
    }

    /// Publishes a committed change's event (no subscriber is not an error).
    pub fn publish(&self, event: Option<ServiceEvent>) {
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
    pub fn next_audit_seq(&self) -> u64 {
        self.next_audit.load(Ordering::SeqCst)
    }

    /// Hands `seq` out again after its record was deleted by a compensating batch.
    pub fn rewind_audit(&self, seq: u64) {
        self.next_audit.store(seq, Ordering::SeqCst);
    }

    /// The service's event bus: `subscribe()` for a receiver of every event from then on.
    pub fn events(&self) -> tokio::sync::broadcast::Sender<ServiceEvent> {
        self.events.clone()
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
}
