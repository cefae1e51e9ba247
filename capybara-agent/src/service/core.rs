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
//!
//! The audit trail is read a page at a time ([`Core::audit_page`]: at most [`MAX_PAGE_SIZE`]
//! records, newest first, the page token being the sequence number to continue below) and
//! pruned to `--audit-retention` (default [`DEFAULT_AUDIT_RETENTION_DAYS`] days) at start and
//! hourly by [`Core::prune_audit`], a streaming prune from the oldest record (keys sort by
//! sequence, which follows time), a batch of 1 000 deletions at a time.
//! A change the kernel or the tunnel may still refuse commits with
//! [`Core::commit_unpublished`], deletes its batch again on a refusal ([`Core::rewind_audit`]
//! hands the sequence number out again) and publishes only once it took effect.
//!
//! ## Webhook events
//! [`Core::notify`] writes a webhook event to the durable outbox (`store`'s `outbox` family,
//! delivered by `service::webhooks`) before it publishes it: when it returns, the event survives
//! a SIGKILL of the agent (it is in the WAL; power loss too once the next group-commit fsync
//! covers it). [`Core::stage_notification`] stages one into a batch the caller writes itself, so
//! the event and the change that caused it are written together or not at all. Every audit
//! record stages its `config-changed` event that way ([`Core::audit`]). A change committed with
//! [`Core::commit_unpublished`] may still be undone: its `config-changed` event is written with
//! it but *held* (no endpoint reads past it, [`Core::outbox_readable`]) until [`Core::publish`]
//! releases it or [`Core::rewind_audit`] deletes it; a hold is released after [`HOLD_LIMIT`]
//! whatever happens (the undo paths take milliseconds), so a forgotten hold never stalls
//! delivery. `config-changed` is on the bus as [`ServiceEvent::ConfigChanged`] (not again as
//! `Notified`).

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
    notify::{Notification, NotifyKind, OutboxEvent},
    ports::{Plane, TunnelPort},
    secrets::Sealer,
};
use crate::{
    geo::GeoDb,
    store::{Batch, Cf, Store, keys, page::Page},
};

/// Records per page of a list call when the caller names no size (`page_size` 0).
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The most records per page of a list call: a bigger `page_size` is clamped to it (as
/// Google's API guidelines, AIP-158, advise), so no call returns or holds more.
pub const MAX_PAGE_SIZE: usize = 1000;
/// How long audit records are kept by default (`--audit-retention`): a year, so a yearly
/// review finds the whole year.
pub const DEFAULT_AUDIT_RETENTION_DAYS: u64 = 365;

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
    /// The proxy endpoints' open connections (`crate::proxy`): in-memory state the endpoints
    /// register into and `kick` cuts; the daemon hands the same registry to the endpoints.
    pub proxies: Arc<crate::proxy::registry::Registry>,
    /// Serialises mutations (validation, commit, programming); held across the write.
    pub writer: Mutex<()>,
    /// The next audit sequence number (advanced under `writer` once a batch is written).
    next_audit: AtomicU64,
    /// The event bus (`service::events`).
    events: tokio::sync::broadcast::Sender<ServiceEvent>,
    /// The `config-changed` event of the audit record staged in the batch being built (under
    /// `writer`); the commit step takes and publishes it.
    staged: Mutex<Option<ServiceEvent>>,
    /// Outbox events of changes that may still be undone: (audit sequence, outbox sequence,
    /// since when), see the module docs.
    held: Mutex<Vec<(u64, u64, std::time::Instant)>>,
}

/// The longest an outbox event of a change that may still be undone is held back.
pub const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

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
            proxies: Arc::default(),
            writer: Mutex::new(()),
            next_audit: AtomicU64::new(next_audit),
            events: tokio::sync::broadcast::channel(EVENT_BUS_CAPACITY).0,
            staged: Mutex::new(None),
            held: Mutex::new(Vec::new()),
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
        let mut n = Notification::new(NotifyKind::ConfigChanged);
        n.at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(rec.at);
        n.user = rec
            .target
            .strip_prefix("user:")
            .map(str::to_owned)
            .or_else(|| {
                rec.target
                    .strip_prefix("peer:")
                    .and_then(|p| p.split('/').next())
                    .map(str::to_owned)
            });
        n.data = serde_json::json!({
            "seq": seq,
            "actor": rec.actor,
            "action": rec.action,
            "target": rec.target,
        });
        self.stage_notification(batch, n)?;
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
        let event = self.staged.lock().unwrap().take();
        let _ = self.store.write(batch)?;
        self.next_audit.fetch_add(1, Ordering::SeqCst);
        self.publish(event);
        Ok(())
    }

    /// [`Core::commit`] for a change that may still be undone (the kernel or the tunnel is
    /// programmed after the commit): its event is returned, for [`Core::publish`] once the
    /// change took effect.
    pub fn commit_unpublished(&self, batch: Batch) -> Result<Option<ServiceEvent>, ServiceError> {
        let event = self.staged.lock().unwrap().take();
        let (_, appended) = self.store.write_appending(batch)?;
        if let (Some(ServiceEvent::ConfigChanged { seq, .. }), false) =
            (&event, appended.is_empty())
        {
            let now = std::time::Instant::now();
            let mut held = self.held.lock().unwrap();
            held.retain(|h| now.duration_since(h.2) < HOLD_LIMIT);
            held.push((*seq, appended.start, now));
        }
        self.next_audit.fetch_add(1, Ordering::SeqCst);
        Ok(event)
    }

    /// Publishes a committed change's event (no subscriber is not an error), releasing its
    /// held outbox event.
    pub fn publish(&self, event: Option<ServiceEvent>) {
        if let Some(ServiceEvent::ConfigChanged { seq, .. }) = &event {
            self.release(*seq);
        }
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

    /// Hands `seq` out again after its record was deleted by a compensating batch; its held
    /// `config-changed` outbox event is deleted (never delivered).
    pub fn rewind_audit(&self, seq: u64) {
        if let Some(outbox) = self.release(seq) {
            let mut undo = Batch::default();
            undo.delete(Cf::Outbox, &keys::outbox(outbox));
            if let Err(e) = self.store.write(undo) {
                tracing::error!(error = %e, seq, "cannot delete the config-changed event of an undone change");
            }
        }
        self.next_audit.store(seq, Ordering::SeqCst);
    }

    /// Ends the hold of audit record `seq`'s outbox event; its outbox sequence if it was held.
    fn release(&self, seq: u64) -> Option<u64> {
        let mut held = self.held.lock().unwrap();
        let i = held.iter().position(|h| h.0 == seq)?;
        Some(held.swap_remove(i).1)
    }

    /// The outbox sequence endpoints may read up to (exclusive): the outbox's end, or the
    /// first event still held back (see the module docs).
    pub fn outbox_readable(&self, end: u64) -> u64 {
        let now = std::time::Instant::now();
        self.held
            .lock()
            .unwrap()
            .iter()
            .filter(|h| now.duration_since(h.2) < HOLD_LIMIT)
            .map(|h| h.1)
            .fold(end, u64::min)
    }

    /// Hands a webhook event (`service::notify`) to the durable outbox (written before this
    /// returns: it survives a SIGKILL of the agent), then publishes it on the bus. Never blocks
    /// on a receiver: delivery is the webhook workers' (`service::webhooks`). Sources call it
    /// from any task or thread.
    pub fn notify(&self, n: Notification) -> Result<(), ServiceError> {
        self.notify_event(OutboxEvent::new(n)).map(|_| ())
    }

    /// [`Core::notify`] of a prepared outbox record; answers its outbox sequence number.
    pub fn notify_event(&self, ev: OutboxEvent) -> Result<u64, ServiceError> {
        // The whole body at debug: the e2e tests of the sources read it from the agent's log.
        tracing::debug!(event = %ev.event.kind, payload = %ev.event.payload(&ev.id), "notification");
        let mut batch = Batch::default();
        batch.append_outbox(&ev)?;
        let (_, seqs) = self.store.write_appending(batch)?;
        let _ = self.events.send(ServiceEvent::Notified(Box::new(ev.event)));
        Ok(seqs.start)
    }

    /// Stages webhook event `n` into `batch`, for a source that writes a batch of its own: the
    /// event is written with the batch (in the outbox, before any delivery) or not at all.
    /// Publishing it on the bus after the write is the caller's (the webhooks need not: they
    /// read the outbox).
    pub fn stage_notification(
        &self,
        batch: &mut Batch,
        n: Notification,
    ) -> Result<(), ServiceError> {
        Ok(batch.append_outbox(&OutboxEvent::new(n))?)
    }

    /// The service's event bus: `subscribe()` for a receiver of every event from then on.
    pub fn events(&self) -> tokio::sync::broadcast::Sender<ServiceEvent> {
        self.events.clone()
    }

    /// One page of audit records, newest first: up to `size` (at most [`MAX_PAGE_SIZE`]),
    /// only those about `user` if given, starting below the sequence number `before` (the
    /// previous page's `next`). The page's `next` is `None` on the last page.
    pub fn audit_page(
        &self,
        user: Option<&UserName>,
        before: Option<u64>,
        size: usize,
    ) -> Result<Page<AuditRecord>, ServiceError> {
        let user_t = user.map(|u| format!("user:{u}"));
        let peer_t = user.map(|u| format!("peer:{u}/"));
        let before = before.map(keys::audit);
        let page = self.store.page_back(
            Cf::Audit,
            before.as_deref(),
            size.clamp(1, MAX_PAGE_SIZE),
            |r: &AuditRecord| match (&user_t, &peer_t) {
                (Some(u), Some(p)) => r.target == *u || r.target.starts_with(p.as_str()),
                _ => true,
            },
        )?;
        Ok(page)
    }

    /// The newest audit records, at most `limit` (and [`MAX_PAGE_SIZE`]): the first page.
    pub fn audit_records(
        &self,
        user: Option<&UserName>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, ServiceError> {
        Ok(self.audit_page(user, None, limit)?.items)
    }

    /// Deletes the audit records made before `cutoff` (Unix seconds), oldest first in batches
    /// (`store::page`), never all in memory; returns how many.
    pub fn prune_audit(&self, cutoff: u64) -> Result<u64, ServiceError> {
        let n = self
            .store
            .prune_front(Cf::Audit, |r: &AuditRecord| r.at < cutoff)?;
        if n > 0 {
            tracing::info!(records = n, cutoff, "pruned the audit trail");
        }
        Ok(n)
    }
}

/// How often the audit trail is pruned after the prune at start.
pub const AUDIT_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Prunes the audit trail to `retention` now (at start, before the API serves) and then every
/// [`AUDIT_PRUNE_EVERY`] on the blocking pool, for as long as the core lives (the timer holds
/// it weakly, so it never keeps a stopped agent's store open).
pub fn prune_audit_at_start_and_hourly(
    core: &Arc<Core>,
    retention: std::time::Duration,
) -> Result<(), ServiceError> {
    let cutoff = move || now().saturating_sub(retention.as_secs());
    core.prune_audit(cutoff())?;
    let weak = Arc::downgrade(core);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(AUDIT_PRUNE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now: pruned above
        loop {
            tick.tick().await;
            let Some(core) = weak.upgrade() else { return };
            match tokio::task::spawn_blocking(move || core.prune_audit(cutoff())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "audit prune failed; next try in an hour"),
                Err(e) => tracing::warn!(error = %e, "audit prune aborted"),
            }
        }
    });
    Ok(())
}
