//! The delivery worker of one endpoint and the outbox's garbage collector (see the module docs
//! of `service::webhooks` for the rules they keep).
//!
//! A worker reads the outbox after its cursor, up to what may be read
//! ([`Core::outbox_readable`](crate::service::core::Core::outbox_readable)), 256 events at a
//! time, and delivers those for its endpoint one after the other. Its store writes (the
//! delivery record and the cursor, one batch per attempt) are not synced: after a power loss
//! the cursor may be behind, so an event is delivered again — at least once, never lost.

use std::{
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};

use hyper::body::Bytes;
use tokio::sync::watch;

use super::{
    DeadLetter, Delivery, DeliveryStatus, GC_EVERY, KEEP_DELIVERIES, Live, MAX_DEAD_LETTERS,
    Shared, WebhookId, backoff, http, sign,
};
use crate::{
    service::{core::now, domain::Actor, notify::OutboxEvent},
    store::{Batch, Cf, keys},
};

/// Events read from the outbox at a time.
const CHUNK: usize = 256;
/// How often a worker looks again while an event is held back (a change that may be undone).
const HOLD_POLL: Duration = Duration::from_millis(50);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What became of one event.
enum Outcome {
    /// Delivered or dead-lettered: the cursor moved past it.
    Done,
    /// The endpoint was reconfigured (its URL or secret): read it again, then this event.
    Again,
    /// The endpoint was disabled or deleted, or the agent stops.
    Stop,
}

/// Delivers endpoint `id`'s events until it is disabled or deleted or the agent stops.
pub(super) async fn run(
    sh: Arc<Shared>,
    id: WebhookId,
    mut cfg: watch::Receiver<Option<Arc<Live>>>,
    cursor: Arc<AtomicU64>,
) {
    let mut stop = sh.stop.subscribe();
    let mut end_rx = sh.core.store.outbox_end();
    let mut conn = http::Conn::default();
    tracing::debug!(webhook = %id, "webhook worker started");
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(live) = cfg.borrow_and_update().clone() else {
            return;
        };
        let cur = cursor.load(Ordering::Relaxed);
        let end = *end_rx.borrow_and_update();
        let readable = sh.core.outbox_readable(end);
        if cur + 1 >= readable {
            tokio::select! {
                r = end_rx.changed() => if r.is_err() { return },
                r = cfg.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
                () = tokio::time::sleep(HOLD_POLL), if readable < end => {}
            }
            continue;
        }
        let events = match sh.core.store.range::<OutboxEvent>(
            Cf::Outbox,
            &keys::outbox(cur + 1),
            Some(&keys::outbox(readable)),
            CHUNK,
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(webhook = %id, error = %e, "cannot read the webhook outbox; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Nothing left below `readable`: the events were deleted (undone changes, or dropped at
        // the cap).
        let mut next = if events.is_empty() { readable - 1 } else { cur };
        let mut persisted = next == cur;
        for (key, ev) in events {
            let Some(seq) = keys::outbox_seq(&key) else {
                continue;
            };
            if seq < sh.dropped_below.load(Ordering::Relaxed) {
                // Dropped at the cap after this chunk was read (and counted then).
                next = seq;
                persisted = false;
                continue;
            }
            let mine = match &ev.only {
                Some(only) => only == id.as_str(),
                None => live.hook.events.contains(ev.event.kind),
            };
            if !mine {
                next = seq;
                persisted = false;
                continue;
            }
            match deliver(&sh, &id, &live, &mut conn, seq, &ev, &mut cfg, &mut stop).await {
                Outcome::Done => {
                    next = seq;
                    persisted = true;
                    cursor.store(next, Ordering::Relaxed);
                }
                Outcome::Again => break,
                Outcome::Stop => {
                    if !persisted {
                        write_cursor(&sh, &id, next);
                    }
                    cursor.store(next, Ordering::Relaxed);
                    return;
                }
            }
        }
        if !persisted {
            write_cursor(&sh, &id, next);
        }
        cursor.store(next, Ordering::Relaxed);
    }
}

fn write_cursor(sh: &Shared, id: &WebhookId, seq: u64) {
    let mut batch = Batch::default();
    if batch
        .put(Cf::Webhooks, &keys::webhook_cursor(id.as_str()), &seq)
        .is_ok()
        && let Err(e) = sh.core.store.write(batch)
    {
        tracing::error!(webhook = %id, error = %e, "cannot write a webhook's cursor");
    }
}

fn write(sh: &Shared, id: &WebhookId, batch: Batch) {
    if let Err(e) = sh.core.store.write(batch) {
        tracing::error!(webhook = %id, error = %e, "cannot write a webhook delivery record");
    }
}

/// Attempts event `seq` until it is delivered, dead-lettered or the endpoint stops.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site: the worker's state, lent"
)]
async fn deliver(
    sh: &Arc<Shared>,
    id: &WebhookId,
    live: &Arc<Live>,
    conn: &mut http::Conn,
    seq: u64,
    ev: &OutboxEvent,
    cfg: &mut watch::Receiver<Option<Arc<Live>>>,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let w = id.as_str();
    let dkey = keys::webhook_delivery(w, seq);
    let body = Bytes::from(
        serde_json::to_vec(&ev.event.payload(&ev.id)).expect("a JSON value always encodes"),
    );
    // A delivery under way before a restart goes on counting its attempts.
    let mut d = sh
        .core
        .store
        .get::<Delivery>(Cf::Webhooks, &dkey)
        .ok()
        .flatten()
        .filter(|d| d.status == DeliveryStatus::Retrying)
        .unwrap_or_else(|| Delivery {
            id: format!("{w}-{seq}"),
            event_id: ev.id.clone(),
            event: ev.event.kind,
            status: DeliveryStatus::Retrying,
            attempts: 0,
            status_code: None,
            error: None,
            last_attempt_ms: 0,
            next_attempt_ms: None,
        });
    let mut live = live.clone();
    loop {
        d.attempts += 1;
        let ts = now();
        let secrets: Vec<&sign::Secret> = live.secrets.iter().collect();
        let headers = [
            ("webhook-id", ev.id.clone()),
            ("webhook-timestamp", ts.to_string()),
            (
                "webhook-signature",
                sign::signature_header(&secrets, &ev.id, ts, &body),
            ),
        ];
        let allow = live.hook.allow_private || sh.allow_private_all.load(Ordering::Relaxed);
        // The agent stopping ends an attempt at once (the event is sent again after the
        // restart), so a dead receiver never holds the store open past the service.
        let res = tokio::select! {
            r = conn.post(&live.url, allow, &headers, body.clone()) => r,
            _ = stop.changed() => return Outcome::Stop,
        };
        d.last_attempt_ms = now_ms();
        let mut batch = Batch::default();
        match res {
            Ok(a) if (200..300).contains(&a.status) => {
                d.status = DeliveryStatus::Delivered;
                d.status_code = Some(a.status);
                d.error = None;
                d.next_attempt_ms = None;
                let _ = batch.put(Cf::Webhooks, &dkey, &d);
                let _ = batch.put(Cf::Webhooks, &keys::webhook_cursor(w), &seq);
                write(sh, id, batch);
                sh.stats.delivered.fetch_add(1, Ordering::Relaxed);
                return Outcome::Done;
            }
            Ok(a) if a.status == 410 => {
                d.status = DeliveryStatus::Gone;
                d.status_code = Some(410);
                d.error = Some("410 Gone: the endpoint was disabled".into());
                d.next_attempt_ms = None;
                let _ = batch.put(Cf::Webhooks, &dkey, &d);
                write(sh, id, batch);
                sh.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(webhook = %id, "the endpoint answered 410 Gone: disabling it");
                let (sh, id) = (sh.clone(), id.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = sh.set_enabled(
                        &Actor::Agent,
                        &id,
                        false,
                        Some("the endpoint answered 410 Gone".into()),
                    ) {
                        tracing::error!(webhook = %id, error = %e, "cannot disable a webhook");
                    }
                })
                .await;
                return Outcome::Stop;
            }
            Ok(a) => {
                d.status_code = Some(a.status);
                let body = a.body.trim();
                d.error = Some(if body.is_empty() {
                    format!("HTTP {}", a.status)
                } else {
                    format!("HTTP {}: {body}", a.status)
                });
            }
            Err(e) => {
                d.status_code = None;
                d.error = Some(e.to_string());
            }
        }
        sh.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let tuning = *sh.tuning.lock().unwrap();
        if seq < sh.dropped_below.load(Ordering::Relaxed) {
            // Dropped at the cap while it was being retried (counted by the GC).
            d.status = DeliveryStatus::Dead;
            d.error = Some(format!(
                "{}; dropped at the outbox's cap",
                d.error.as_deref().unwrap_or("failed")
            ));
            d.next_attempt_ms = None;
            let _ = batch.put(Cf::Webhooks, &dkey, &d);
            let _ = batch.put(Cf::Webhooks, &keys::webhook_cursor(w), &seq);
            write(sh, id, batch);
            return Outcome::Done;
        }
        if d.attempts >= tuning.max_attempts {
            d.status = DeliveryStatus::Dead;
            d.next_attempt_ms = None;
            let _ = batch.put(Cf::Webhooks, &dkey, &d);
            let _ = batch.put(
                Cf::Webhooks,
                &keys::webhook_dead(w, seq),
                &DeadLetter {
                    delivery: d.clone(),
                    event: ev.clone(),
                },
            );
            let _ = batch.put(Cf::Webhooks, &keys::webhook_cursor(w), &seq);
            write(sh, id, batch);
            sh.stats.dead.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(webhook = %id, delivery = %d.id, event = %ev.id, error = ?d.error, "webhook event dead-lettered");
            return Outcome::Done;
        }
        let wait = backoff(d.attempts, rand::random()).mul_f64(tuning.wait_scale);
        d.next_attempt_ms = Some(d.last_attempt_ms + wait.as_millis() as u64);
        let _ = batch.put(Cf::Webhooks, &dkey, &d);
        write(sh, id, batch);
        tracing::debug!(webhook = %id, delivery = %d.id, attempts = d.attempts, error = ?d.error, wait_ms = wait.as_millis() as u64, "webhook attempt failed");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            r = cfg.changed() => {
                if r.is_err() {
                    return Outcome::Stop;
                }
                match cfg.borrow_and_update().clone() {
                    None => return Outcome::Stop,
                    // A new URL or secret: try at once with it.
                    Some(l) => live = l,
                }
            }
            _ = stop.changed() => return Outcome::Stop,
        }
        if cfg.borrow().is_none() {
            return Outcome::Stop;
        }
        if !Arc::ptr_eq(&live, cfg.borrow().as_ref().expect("checked")) {
            return Outcome::Again;
        }
    }
}

/// Starts the outbox's garbage collector: every [`GC_EVERY`] until the agent stops.
pub(super) fn spawn_gc(sh: &Arc<Shared>) {
    let Some(rt) = sh.runtime.clone() else {
        return;
    };
    let sh = sh.clone();
    rt.spawn(async move {
        let mut stop = sh.stop.subscribe();
        let mut tick = tokio::time::interval(GC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let (sh2, deep) = (sh.clone(), n.is_multiple_of(60));
            n += 1;
            match tokio::task::spawn_blocking(move || sh2.gc(deep)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "webhook outbox GC failed; next pass in 1 s")
                }
                Err(_) => return,
            }
        }
    });
}

impl Shared {
    /// One GC pass: deletes the outbox events every enabled endpoint passed, drops the oldest
    /// past [`OUTBOX_CAP`] (counting those a lagging endpoint had subscribed to), and prunes
    /// delivery records (every pass) and dead letters (`deep`).
    pub(super) fn gc(&self, deep: bool) -> Result<(), crate::service::ServiceError> {
        let store = &self.core.store;
        let end = *store.outbox_end().borrow();
        let endpoints: Vec<(WebhookId, u64, Option<Arc<Live>>)> = self
            .running
            .lock()
            .unwrap()
            .iter()
            .map(|(id, r)| {
                (
                    id.clone(),
                    r.cursor.load(Ordering::Relaxed),
                    r.cfg.borrow().clone(),
                )
            })
            .collect();
        for (id, cur, _) in &endpoints {
            let dlv = keys::webhook_deliveries(id.as_str());
            if *cur > KEEP_DELIVERIES {
                store.delete_range(
                    Cf::Webhooks,
                    &dlv,
                    &keys::webhook_delivery(id.as_str(), cur - KEEP_DELIVERIES),
                )?;
            }
            if deep {
                let dead = keys::webhook_dead_letters(id.as_str());
                let upper = format!("{dead}~");
                let n = store.count_range(Cf::Webhooks, &dead, &upper)?;
                if n > MAX_DEAD_LETTERS {
                    let over = store.range::<serde_json::Value>(
                        Cf::Webhooks,
                        &dead,
                        Some(&upper),
                        (n - MAX_DEAD_LETTERS) as usize + 1,
                    )?;
                    if let Some((k, _)) = over.last() {
                        store.delete_range(Cf::Webhooks, &dead, k)?;
                    }
                }
            }
        }
        let Some((first_key, _)) = store.first_from::<serde_json::Value>(Cf::Outbox, "")? else {
            return Ok(());
        };
        let first = keys::outbox_seq(&first_key).unwrap_or(0);
        let passed = endpoints
            .iter()
            .map(|e| e.1)
            .min()
            .unwrap_or(end.saturating_sub(1));
        let mut cut = passed + 1;
        let cap = self.tuning.lock().unwrap().cap;
        let cap_cut = end.saturating_sub(cap);
        if cap_cut > cut {
            for (id, cur, live) in &endpoints {
                if cur + 1 >= cap_cut {
                    continue;
                }
                let lost = store
                    .range::<OutboxEvent>(
                        Cf::Outbox,
                        &keys::outbox(cur + 1),
                        Some(&keys::outbox(cap_cut)),
                        usize::MAX,
                    )?
                    .into_iter()
                    .filter(|(_, ev)| match (&ev.only, live) {
                        (Some(only), _) => only == id.as_str(),
                        (None, Some(l)) => l.hook.events.contains(ev.event.kind),
                        (None, None) => false,
                    })
                    .count() as u64;
                if lost > 0 {
                    self.stats.dropped.fetch_add(lost, Ordering::Relaxed);
                    tracing::warn!(webhook = %id, dropped = lost, cap, "webhook outbox full: dropped the oldest undelivered events");
                }
            }
            cut = cap_cut;
            self.dropped_below.fetch_max(cap_cut, Ordering::Relaxed);
        }
        if cut > first {
            store.delete_range(Cf::Outbox, &first_key, &keys::outbox(cut))?;
        }
        Ok(())
    }
}
