//! Webhooks: endpoints that receive the agent's events (`service::notify`) from a durable
//! outbox, signed the Standard Webhooks way (`sign`), only to addresses that pass the
//! server-side request forgery check (`ssrf`), over `http`.
//!
//! ## The outbox
//! Every event is written to the store's `outbox` family before any attempt
//! ([`Core::notify`](super::core::Core::notify), or in the batch of the change that caused it:
//! [`Core::stage_notification`](super::core::Core::stage_notification), `config-changed` with
//! its audit record). Keys are sequence numbers assigned by the store under one lock as the
//! batch is written, so they appear in order with no gap a reader could skip. Each endpoint has
//! a **cursor** (`cursor/<id>`: every event up to it was delivered, dead-lettered or not for it)
//! and filters the log by its event set. The log is garbage-collected every [`GC_EVERY`] below
//! the lowest cursor of the enabled endpoints (a disabled endpoint holds nothing: events raised
//! while it is disabled are not sent to it, and `enable` starts it at the outbox's end).
//!
//! **Size cap**: the outbox keeps at most [`OUTBOX_CAP`] events (200 000; at the ~400 bytes of
//! a typical event, about 80 MB). Past it, the GC drops the oldest events, even undelivered
//! ones, moving lagging cursors past them; each dropped event an endpoint had subscribed to is
//! counted (`capybara_webhook_events_dropped_total`) and logged. So a receiver dead for
//! long enough loses the oldest events, never the agent its disk. The cap holds between GC
//! passes within one second of events.
//!
//! ## Delivery
//! One tokio task per enabled endpoint (`worker`): a slow or dead receiver delays only its own
//! events, never another endpoint, the API (which only writes the outbox) or the dataplane
//! (which never waits for the service). Per endpoint, events go **in order, one at a time**, at
//! least once: the cursor moves past an event only once it is delivered (a 2xx) or
//! dead-lettered, so after a crash the event being delivered is sent again, with the same
//! `webhook-id`. Each attempt is one POST of one event (`Content-Type: application/json`, the
//! body [`Notification::payload`](super::notify::Notification::payload)), with a connect
//! timeout of 5 s and a whole-request timeout of 10 s (`http`). Redirects are not followed (a
//! 3xx is a failed attempt).
//!
//! **Retries**: after the n-th failed attempt the worker waits [`RETRY_SCHEDULE_MS`]\[n-1\]
//! with ±20 % jitter: 0.5 s, 1 s, 2 s, 4 s, then 5 s six times (so a receiver down for 30 s,
//! the figure, gets its events within about 5 s of coming back), then 15 s, 30 s,
//! 1 min, 2 min, 5 min, 10 min, 30 min, 1 h, 2 h, 4 h, 6 h three times: [`MAX_ATTEMPTS`] (24)
//! attempts over about 26 hours. Then the event is **dead-lettered** (`dead/<id>/<seq>` keeps
//! it: `webhook deliveries ID --failed`, `webhook retry DELIVERY` sends it again through the
//! outbox with the same event id) and the endpoint goes on with the next. An endpoint that
//! answers **410 Gone** is disabled (with the reason shown by `webhook list`), as Standard
//! Webhooks advises. Delivery records (`dlv/<id>/<seq>`: attempts, status code, error, time)
//! are kept for the last [`KEEP_DELIVERIES`] events per endpoint, dead letters for the newest
//! [`MAX_DEAD_LETTERS`].
//!
//! ## Secrets
//! `whsec_` secrets (`sign`): made by the agent when `add` names none and shown once; stored
//! sealed with the agent's sealer when it has one (`--keep-client-keys`: the same key file and
//! ChaCha20-Poly1305 as kept client keys), as plain base64 otherwise (the store is the agent's
//! private data directory, mode 0700). `rotate-secret` keeps the previous secret for
//! [`ROTATION_OVERLAP`] (24 h): meanwhile each request carries both signatures. Audit records
//! and `show` hold only a fingerprint.

pub mod http;
pub mod sign;
pub mod ssrf;
mod worker;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, now, to_json},
    domain::{Actor, ValidationError},
    notify::{Notification, NotifyKind, OutboxEvent},
};
use crate::store::{Batch, Cf, keys};
use sign::Secret;
use ssrf::WebhookUrl;

/// The most events the outbox keeps (see the module docs).
pub const OUTBOX_CAP: u64 = 200_000;
/// How often the outbox and the delivery records are garbage-collected.
pub const GC_EVERY: Duration = Duration::from_secs(1);
/// Delivery records kept per endpoint (the newest).
pub const KEEP_DELIVERIES: u64 = 1000;
/// Dead letters kept per endpoint (the newest).
pub const MAX_DEAD_LETTERS: u64 = 1000;
/// Attempts before an event is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 24;
/// The wait after the n-th failed attempt, before jitter (milliseconds).
pub const RETRY_SCHEDULE_MS: [u64; 23] = [
    500, 1_000, 2_000, 4_000, 5_000, 5_000, 5_000, 5_000, 5_000, 5_000, 15_000, 30_000, 60_000,
    120_000, 300_000, 600_000, 1_800_000, 3_600_000, 7_200_000, 14_400_000, 21_600_000, 21_600_000,
    21_600_000,
];
/// How long the previous secret still signs after a rotation.
pub const ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);
/// How long `webhook test` waits for the first attempt's result.
pub const TEST_WAIT: Duration = Duration::from_secs(15);
/// The most webhooks an agent has.
pub const MAX_WEBHOOKS: usize = 100;

/// The wait after the `failed`-th failed attempt (1-based), with `jitter` in `0..1` spread over
/// ±20 %.
pub fn backoff(failed: u32, jitter: f64) -> Duration {
    let i = (failed.max(1) as usize - 1).min(RETRY_SCHEDULE_MS.len() - 1);
    let base = RETRY_SCHEDULE_MS[i] as f64;
    Duration::from_millis((base * (0.8 + 0.4 * jitter.clamp(0.0, 1.0))) as u64)
}

/// A webhook's id: `wh_` and 16 hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebhookId(String);

impl WebhookId {
    /// A new random id.
    pub fn random() -> WebhookId {
        WebhookId(format!("wh_{:016x}", rand::random::<u64>()))
    }

    /// Parses an id given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<WebhookId, ValidationError> {
        let ok = s.strip_prefix("wh_").is_some_and(|h| {
            h.len() == 16
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(WebhookId(s.to_owned()))
        } else {
            Err(ValidationError::Value {
                field,
                reason: format!("invalid webhook id {s:?} (expected wh_ and 16 hex digits)"),
            })
        }
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WebhookId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A delivery's id: `<webhook id>-<outbox sequence>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryId {
    /// The endpoint.
    pub webhook: WebhookId,
    /// The event's outbox sequence number.
    pub seq: u64,
}

impl DeliveryId {
    /// Parses `<webhook id>-<seq>` given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<DeliveryId, ValidationError> {
        let bad = || ValidationError::Value {
            field,
            reason: format!("invalid delivery id {s:?} (expected wh_<16 hex digits>-<number>)"),
        };
        let (w, n) = s.split_once('-').ok_or_else(bad)?;
        Ok(DeliveryId {
            webhook: WebhookId::parse(field, w).map_err(|_| bad())?,
            seq: n.parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.webhook, self.seq)
    }
}

/// Which events an endpoint gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventSet {
    /// Every kind, present and future (`--all`).
    All,
    /// These kinds (sorted, no duplicates).
    Only(Vec<NotifyKind>),
}

impl EventSet {
    /// The set of `names` (wire names, each checked: an unknown one names `event`), or every
    /// kind with `all`. Neither is an error naming `event`.
    pub fn parse(names: &[String], all: bool) -> Result<EventSet, ValidationError> {
        if all {
            if !names.is_empty() {
                return Err(ValidationError::Value {
                    field: "event",
                    reason: "give events or --all, not both".into(),
                });
            }
            return Ok(EventSet::All);
        }
        if names.is_empty() {
            return Err(ValidationError::Value {
                field: "event",
                reason: format!(
                    "no event (give --event one or more of {}, or --all)",
                    NotifyKind::ALL.map(NotifyKind::as_str).join(", ")
                ),
            });
        }
        let mut kinds = names
            .iter()
            .map(|n| NotifyKind::parse("event", n))
            .collect::<Result<Vec<_>, _>>()?;
        kinds.sort();
        kinds.dedup();
        Ok(EventSet::Only(kinds))
    }

    /// Whether an event of `kind` is for this set.
    pub fn contains(&self, kind: NotifyKind) -> bool {
        match self {
            EventSet::All => kind != NotifyKind::WebhookTest,
            EventSet::Only(k) => k.contains(&kind),
        }
    }

    /// The wire names (`["*"]` for every kind).
    pub fn names(&self) -> Vec<String> {
        match self {
            EventSet::All => vec!["*".into()],
            EventSet::Only(k) => k.iter().map(|k| k.as_str().to_owned()).collect(),
        }
    }
}

/// A webhook endpoint as shown (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// Its id.
    pub id: WebhookId,
    /// Where events are POSTed.
    pub url: String,
    /// Which events it gets.
    pub events: EventSet,
    /// Private, loopback and link-local addresses allowed (`--allow-private`).
    pub allow_private: bool,
    /// Whether events are sent to it.
    pub enabled: bool,
    /// Why it was disabled (`disabled by an admin`, `the endpoint answered 410 Gone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// When it was added (Unix seconds).
    pub created_at: u64,
    /// The current secret's fingerprint (`sha256:…`).
    pub secret_fingerprint: String,
    /// Until when the previous secret still signs, after a rotation (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_until: Option<u64>,
}

/// A secret as stored: sealed with the agent's sealer, or its key bytes in base64.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredSecret {
    Sealed(String),
    Plain(String),
}

/// What the store holds for an endpoint.
#[derive(Clone, Serialize, Deserialize)]
struct HookRecord {
    hook: Webhook,
    secret: StoredSecret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<StoredSecret>,
}

/// Where one delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryStatus {
    /// Attempted and failed; another attempt is due.
    Retrying,
    /// A 2xx answer.
    Delivered,
    /// Every attempt failed; kept as a dead letter.
    Dead,
    /// A dead letter sent again (`webhook retry`): see the new delivery.
    Retried,
    /// The endpoint answered 410 Gone and was disabled.
    Gone,
}

impl DeliveryStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Retried => "retried",
            DeliveryStatus::Gone => "gone",
        }
    }
}

/// One event's delivery to one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// `<webhook id>-<seq>`.
    pub id: String,
    /// The event's id (`webhook-id`).
    pub event_id: String,
    /// The event's kind.
    pub event: NotifyKind,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// The last answer's status code, if any.
    #[serde(default)]
    pub status_code: Option<u16>,
    /// The last failure (no answer, or a non-2xx answer and the start of its body).
    #[serde(default)]
    pub error: Option<String>,
    /// When the last attempt was made (Unix milliseconds).
    pub last_attempt_ms: u64,
    /// When the next attempt is due (Unix milliseconds), while retrying.
    #[serde(default)]
    pub next_attempt_ms: Option<u64>,
}

/// A dead letter: the delivery and the event, for `webhook retry`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct DeadLetter {
    delivery: Delivery,
    event: OutboxEvent,
}

/// Input of [`Webhooks::add`].
#[derive(Debug)]
pub struct NewWebhook {
    /// Where to POST.
    pub url: WebhookUrl,
    /// Which events.
    pub events: EventSet,
    /// The secret; `None`: a new one.
    pub secret: Option<Secret>,
    /// Allow private and loopback addresses.
    pub allow_private: bool,
}

/// Counters of the delivery workers since the agent started (the metrics read them).
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Events delivered (a 2xx).
    pub delivered: AtomicU64,
    /// Attempts that failed.
    pub failed_attempts: AtomicU64,
    /// Events dead-lettered.
    pub dead: AtomicU64,
    /// Subscribed events dropped at the outbox's cap before delivery.
    pub dropped: AtomicU64,
}

/// A snapshot for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsView {
    /// Events in the outbox.
    pub outbox_depth: u64,
    /// See [`WebhookStats`].
    pub delivered: u64,
    /// See [`WebhookStats`].
    pub failed_attempts: u64,
    /// See [`WebhookStats`].
    pub dead: u64,
    /// See [`WebhookStats`].
    pub dropped: u64,
    /// Enabled endpoints.
    pub endpoints: u64,
}

/// What a worker delivers to: the endpoint, parsed, with its live secrets.
struct Live {
    hook: Webhook,
    url: WebhookUrl,
    /// The current secret, then the previous one while it still signs.
    secrets: Vec<Secret>,
}

/// A running worker.
struct Running {
    cfg: tokio::sync::watch::Sender<Option<Arc<Live>>>,
    /// The endpoint's cursor, as the worker last wrote it.
    cursor: Arc<AtomicU64>,
}

/// What the feature and its workers share.
struct Shared {
    core: Arc<Core>,
    running: Mutex<HashMap<WebhookId, Running>>,
    /// `--webhook-allow-private`: every endpoint may reach private addresses.
    allow_private_all: AtomicBool,
    stats: WebhookStats,
    /// Set when the service is dropped: workers and the GC stop.
    stop: tokio::sync::watch::Sender<bool>,
    runtime: Option<tokio::runtime::Handle>,
    /// The outbox cap, attempts and waits in force ([`Webhooks::tune`]).
    tuning: Mutex<Tuning>,
    /// Events below this sequence number were dropped at the cap: a worker that read them
    /// before skips them (and gives up one it is retrying).
    dropped_below: AtomicU64,
}

/// The outbox cap, the attempts before a dead letter and a scale on the retry waits: the
/// constants above, smaller only for tests ([`Webhooks::tune`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    /// [`OUTBOX_CAP`].
    pub cap: u64,
    /// [`MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// Each wait of [`RETRY_SCHEDULE_MS`] is multiplied by this (1.0).
    pub wait_scale: f64,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            cap: OUTBOX_CAP,
            max_attempts: MAX_ATTEMPTS,
            wait_scale: 1.0,
        }
    }
}

/// The webhooks feature.
pub struct Webhooks {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}

impl Webhooks {
    /// The feature over the shared core. Opened inside a tokio runtime (the agent, in-process
    /// test agents), it starts a worker per enabled endpoint and the outbox GC; outside one
    /// (offline tools) it delivers nothing.
    pub fn new(core: Arc<Core>) -> Result<Webhooks, ServiceError> {
        let shared = Arc::new(Shared {
            core,
            running: Mutex::new(HashMap::new()),
            allow_private_all: AtomicBool::new(false),
            stats: WebhookStats::default(),
            stop: tokio::sync::watch::Sender::new(false),
            runtime: tokio::runtime::Handle::try_current().ok(),
            tuning: Mutex::new(Tuning::default()),
            dropped_below: AtomicU64::new(0),
        });
        let wh = Webhooks { shared };
        if wh.shared.runtime.is_some() {
            for rec in wh.records()? {
                if rec.hook.enabled {
                    wh.shared.start(&rec)?;
                }
            }
            worker::spawn_gc(&wh.shared);
        }
        Ok(wh)
    }

    /// Makes the delivery workers match the stored endpoints after the store changed under
    /// them (a cluster's change applied: `service::cluster`): a worker starts for each enabled
    /// endpoint without one, stops for each endpoint gone or disabled; the others are given
    /// their record again (URL, secret, events).
    pub fn resync(&self) -> Result<(), ServiceError> {
        let recs: Vec<HookRecord> = self
            .records()?
            .into_iter()
            .filter(|r| r.hook.enabled)
            .collect();
        let mut running = self.shared.running.lock().unwrap();
        running.retain(|id, r| {
            let keep = recs.iter().any(|rec| rec.hook.id == *id);
            if !keep {
                r.cfg.send_replace(None);
            }
            keep
        });
        for rec in &recs {
            match running.get(&rec.hook.id) {
                Some(r) => {
                    r.cfg.send_replace(Some(self.shared.live(rec)?));
                }
                None => self.shared.start_locked(&mut running, rec)?,
            }
        }
        Ok(())
    }

    /// `--webhook-allow-private`: lets every endpoint reach private and loopback addresses
    /// (for an agent whose receivers are on its own network).
    pub fn set_allow_private_everywhere(&self, allow: bool) {
        self.shared
            .allow_private_all
            .store(allow, Ordering::Relaxed);
    }

    /// Replaces the outbox cap, the attempts and the retry waits (tests: a cap reached in
    /// seconds, a dead letter after a few quick attempts). The agent never calls it.
    pub fn tune(&self, tuning: Tuning) {
        *self.shared.tuning.lock().unwrap() = tuning;
    }

    /// Runs one pass of the outbox GC now (tests; the agent runs one every [`GC_EVERY`]).
    pub fn gc_now(&self) -> Result<(), ServiceError> {
        self.shared.gc(true)
    }

    fn allow_private(&self, asked: bool) -> bool {
        asked || self.shared.allow_private_all.load(Ordering::Relaxed)
    }

    fn records(&self) -> Result<Vec<HookRecord>, ServiceError> {
        Ok(self
            .shared
            .core
            .store
            .scan::<HookRecord>(Cf::Webhooks, keys::WEBHOOKS)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    fn record(&self, id: &WebhookId) -> Result<HookRecord, ServiceError> {
        self.shared
            .core
            .store
            .get(Cf::Webhooks, &keys::webhook(id.as_str()))?
            .ok_or_else(|| ServiceError::NotFound {
                what: "webhook",
                name: id.to_string(),
            })
    }

    /// Resolves `url`'s host and checks its addresses (`ssrf`), as [`Webhooks::add`] needs
    /// first: a forbidden or unresolvable host is an error naming `url`.
    pub async fn check_url(
        &self,
        url: &WebhookUrl,
        allow_private: bool,
    ) -> Result<(), ServiceError> {
        ssrf::resolve(url, self.allow_private(allow_private))
            .await
            .map_err(|e| ValidationError::Value {
                field: "url",
                reason: e.to_string(),
            })?;
        Ok(())
    }

    /// Adds an endpoint whose URL passed [`Webhooks::check_url`]; answers it and its secret
    /// (`whsec_…`, shown this once).
    pub fn add(&self, actor: &Actor, new: NewWebhook) -> Result<(Webhook, String), ServiceError> {
        self.shared.add(actor, new)
    }

    /// Every endpoint.
    pub fn list(&self) -> Result<Vec<Webhook>, ServiceError> {
        Ok(self.records()?.into_iter().map(|r| r.hook).collect())
    }

    /// One endpoint.
    pub fn get(&self, id: &WebhookId) -> Result<Webhook, ServiceError> {
        Ok(self.record(id)?.hook)
    }

    /// Deletes an endpoint, its cursor, delivery records and dead letters.
    pub fn delete(&self, actor: &Actor, id: &WebhookId) -> Result<Webhook, ServiceError> {
        let core = &self.shared.core;
        let _w = core.writer.lock().unwrap();
        let rec = self.record(id)?;
        let mut batch = Batch::default();
        batch.delete(Cf::Webhooks, &keys::webhook(id.as_str()));
        batch.delete(Cf::Webhooks, &keys::webhook_cursor(id.as_str()));
        core.audit(
            &mut batch,
            actor,
            "webhook.delete",
            format!("webhook:{id}"),
            to_json(&rec.hook),
            None,
        )?;
        core.commit(batch)?;
        self.shared.stop_worker(id);
        for prefix in [
            keys::webhook_deliveries(id.as_str()),
            keys::webhook_dead_letters(id.as_str()),
        ] {
            core.store
                .delete_range(Cf::Webhooks, &prefix, &format!("{prefix}~"))?;
        }
        tracing::info!(%actor, webhook = %id, "webhook deleted");
        Ok(rec.hook)
    }

    /// Enables or disables an endpoint. Enabled, it starts at the outbox's end.
    pub fn set_enabled(
        &self,
        actor: &Actor,
        id: &WebhookId,
        enabled: bool,
    ) -> Result<Webhook, ServiceError> {
        let reason = (!enabled).then(|| format!("disabled by {actor}"));
        self.shared.set_enabled(actor, id, enabled, reason)
    }

    /// Replaces an endpoint's secret (`secret`, or a new one); the previous one still signs
    /// for [`ROTATION_OVERLAP`]. Answers the endpoint and the new secret (shown this once).
    pub fn rotate_secret(
        &self,
        actor: &Actor,
        id: &WebhookId,
        secret: Option<Secret>,
    ) -> Result<(Webhook, String), ServiceError> {
        let core = &self.shared.core;
        let _w = core.writer.lock().unwrap();
        let mut rec = self.record(id)?;
        let before = rec.hook.clone();
        let secret = secret.unwrap_or_else(Secret::generate);
        rec.previous = Some(rec.secret.clone());
        rec.secret = self.shared.seal(id, &secret);
        rec.hook.secret_fingerprint = secret.fingerprint();
        rec.hook.previous_secret_until = Some(now() + ROTATION_OVERLAP.as_secs());
        let mut batch = Batch::default();
        batch.put(Cf::Webhooks, &keys::webhook(id.as_str()), &rec)?;
        core.audit(
            &mut batch,
            actor,
            "webhook.rotate-secret",
            format!("webhook:{id}"),
            to_json(&before),
            to_json(&rec.hook),
        )?;
        core.commit(batch)?;
        if rec.hook.enabled {
            self.shared.reconfigure(&rec)?;
        }
        tracing::info!(%actor, webhook = %id, fingerprint = %rec.hook.secret_fingerprint, "webhook secret rotated");
        Ok((rec.hook, secret.reveal()))
    }

    /// The newest deliveries of an endpoint (at most `limit`, newest first); with `failed`
    /// its dead letters and the deliveries still retrying.
    pub fn deliveries(
        &self,
        id: &WebhookId,
        failed: bool,
        limit: usize,
    ) -> Result<Vec<Delivery>, ServiceError> {
        self.record(id)?;
        let store = &self.shared.core.store;
        let dlv = keys::webhook_deliveries(id.as_str());
        let mut out: Vec<Delivery> = store
            .range::<Delivery>(Cf::Webhooks, &dlv, Some(&format!("{dlv}~")), usize::MAX)?
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| !failed || d.status == DeliveryStatus::Retrying)
            .collect();
        if failed {
            let dead = keys::webhook_dead_letters(id.as_str());
            let letters: Vec<Delivery> = store
                .range::<DeadLetter>(Cf::Webhooks, &dead, Some(&format!("{dead}~")), usize::MAX)?
                .into_iter()
                .map(|(_, d)| d.delivery)
                .collect();
            out.extend(letters);
            out.sort_by_key(|d| DeliveryId::parse("id", &d.id).map_or(0, |d| d.seq));
        }
        out.reverse();
        out.truncate(limit.max(1));
        Ok(out)
    }

    /// One delivery.
    pub fn delivery(&self, id: &DeliveryId) -> Result<Option<Delivery>, ServiceError> {
        Ok(self.shared.core.store.get(
            Cf::Webhooks,
            &keys::webhook_delivery(id.webhook.as_str(), id.seq),
        )?)
    }

    /// Sends a dead letter again, through the outbox, with its event id; answers the new
    /// delivery's id.
    pub fn retry(&self, actor: &Actor, id: &DeliveryId) -> Result<DeliveryId, ServiceError> {
        let core = &self.shared.core;
        let w = id.webhook.as_str();
        let not_found = || ServiceError::NotFound {
            what: "dead letter",
            name: id.to_string(),
        };
        let rec = self.record(&id.webhook).map_err(|_| not_found())?;
        if !rec.hook.enabled {
            return Err(ServiceError::Webhook {
                id: id.webhook.to_string(),
                reason: "is disabled; enable it first (capybara webhook enable ID)".into(),
            });
        }
        let letter: DeadLetter = core
            .store
            .get(Cf::Webhooks, &keys::webhook_dead(w, id.seq))?
            .ok_or_else(not_found)?;
        let mut ev = letter.event.clone();
        ev.only = Some(w.to_owned());
        let seq = core.notify_event(ev)?;
        let _w = core.writer.lock().unwrap();
        let mut batch = Batch::default();
        batch.delete(Cf::Webhooks, &keys::webhook_dead(w, id.seq));
        let mut old = letter.delivery.clone();
        old.status = DeliveryStatus::Retried;
        old.error = Some(format!("sent again as {}-{seq}", id.webhook));
        batch.put(Cf::Webhooks, &keys::webhook_delivery(w, id.seq), &old)?;
        core.audit(
            &mut batch,
            actor,
            "webhook.retry",
            format!("webhook:{}", id.webhook),
            Some(serde_json::json!({ "delivery": id.to_string() })),
            Some(serde_json::json!({ "delivery": format!("{}-{seq}", id.webhook) })),
        )?;
        core.commit(batch)?;
        Ok(DeliveryId {
            webhook: id.webhook.clone(),
            seq,
        })
    }

    /// Writes a `webhook.test` event for endpoint `id` only, through the outbox; answers its
    /// delivery id (see [`Webhooks::wait_first_attempt`]).
    pub fn test(&self, id: &WebhookId) -> Result<DeliveryId, ServiceError> {
        let rec = self.record(id)?;
        if !rec.hook.enabled {
            return Err(ServiceError::Webhook {
                id: id.to_string(),
                reason: "is disabled; enable it first (capybara webhook enable ID)".into(),
            });
        }
        let mut n = Notification::new(NotifyKind::WebhookTest);
        n.data = serde_json::json!({ "webhook": id.as_str(), "message": "a test event from capybara webhook test" });
        let mut ev = OutboxEvent::new(n);
        ev.only = Some(id.as_str().to_owned());
        let seq = self.shared.core.notify_event(ev)?;
        Ok(DeliveryId {
            webhook: id.clone(),
            seq,
        })
    }

    /// Waits (up to [`TEST_WAIT`]) until delivery `id` had its first attempt; answers it as it
    /// stands then (`None`: not attempted yet, events ahead of it are still being delivered).
    pub async fn wait_first_attempt(
        &self,
        id: &DeliveryId,
    ) -> Result<Option<Delivery>, ServiceError> {
        let until = tokio::time::Instant::now() + TEST_WAIT;
        loop {
            if let Some(d) = self.delivery(id)? {
                return Ok(Some(d));
            }
            if tokio::time::Instant::now() >= until {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The counters for the metrics.
    pub fn stats(&self) -> StatsView {
        let s = &self.shared.stats;
        let store = &self.shared.core.store;
        let end = *store.outbox_end().borrow();
        let first = store
            .first_from::<serde_json::Value>(Cf::Outbox, "")
            .ok()
            .flatten()
            .and_then(|(k, _)| keys::outbox_seq(&k))
            .unwrap_or(end);
        StatsView {
            outbox_depth: end.saturating_sub(first),
            delivered: s.delivered.load(Ordering::Relaxed),
            failed_attempts: s.failed_attempts.load(Ordering::Relaxed),
            dead: s.dead.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            endpoints: self.shared.running.lock().unwrap().len() as u64,
        }
    }
}

impl Shared {
    fn seal(&self, id: &WebhookId, secret: &Secret) -> StoredSecret {
        match &self.core.cfg.keep_client_keys {
            Some(sealer) => {
                StoredSecret::Sealed(sealer.seal_bytes(secret.bytes(), &keys::webhook(id.as_str())))
            }
            None => StoredSecret::Plain(
                base64::engine::general_purpose::STANDARD.encode(secret.bytes()),
            ),
        }
    }

    fn open(&self, id: &WebhookId, s: &StoredSecret) -> Result<Secret, ServiceError> {
        let aad = keys::webhook(id.as_str());
        let bytes = match s {
            StoredSecret::Sealed(sealed) => match &self.core.cfg.keep_client_keys {
                Some(sealer) => sealer.open_bytes(sealed, &aad)?,
                None => {
                    return Err(super::secrets::SecretError::Unseal { what: aad }.into());
                }
            },
            StoredSecret::Plain(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| super::secrets::SecretError::Unseal { what: aad })?,
        };
        Ok(Secret::from_bytes(bytes))
    }

    fn live(&self, rec: &HookRecord) -> Result<Arc<Live>, ServiceError> {
        let mut secrets = vec![self.open(&rec.hook.id, &rec.secret)?];
        if let (Some(prev), Some(until)) = (&rec.previous, rec.hook.previous_secret_until)
            && now() < until
        {
            secrets.push(self.open(&rec.hook.id, prev)?);
        }
        Ok(Arc::new(Live {
            url: ssrf::parse_url(&rec.hook.url)?,
            hook: rec.hook.clone(),
            secrets,
        }))
    }

    fn add(
        self: &Arc<Self>,
        actor: &Actor,
        new: NewWebhook,
    ) -> Result<(Webhook, String), ServiceError> {
        let core = &self.core;
        let _w = core.writer.lock().unwrap();
        let existing = core
            .store
            .scan::<HookRecord>(Cf::Webhooks, keys::WEBHOOKS)?;
        if existing.len() >= MAX_WEBHOOKS {
            return Err(ServiceError::Exhausted {
                what: format!("webhook slot (at most {MAX_WEBHOOKS} webhooks)"),
            });
        }
        let id = WebhookId::random();
        let secret = new.secret.unwrap_or_else(Secret::generate);
        let hook = Webhook {
            id: id.clone(),
            url: new.url.url.clone(),
            events: new.events,
            allow_private: new.allow_private,
            enabled: true,
            disabled_reason: None,
            created_at: now(),
            secret_fingerprint: secret.fingerprint(),
            previous_secret_until: None,
        };
        let rec = HookRecord {
            hook: hook.clone(),
            secret: self.seal(&id, &secret),
            previous: None,
        };
        let mut running = self.running.lock().unwrap();
        let cursor = (*core.store.outbox_end().borrow()).saturating_sub(1);
        let mut batch = Batch::default();
        batch.put(Cf::Webhooks, &keys::webhook(id.as_str()), &rec)?;
        batch.put(Cf::Webhooks, &keys::webhook_cursor(id.as_str()), &cursor)?;
        core.audit(
            &mut batch,
            actor,
            "webhook.add",
            format!("webhook:{id}"),
            None,
            to_json(&hook),
        )?;
        core.commit(batch)?;
        self.start_locked(&mut running, &rec)?;
        drop(running);
        tracing::info!(%actor, webhook = %id, url = %hook.url, events = ?hook.events.names(), "webhook added");
        Ok((hook, secret.reveal()))
    }

    fn set_enabled(
        self: &Arc<Self>,
        actor: &Actor,
        id: &WebhookId,
        enabled: bool,
        reason: Option<String>,
    ) -> Result<Webhook, ServiceError> {
        let core = &self.core;
        let _w = core.writer.lock().unwrap();
        let mut rec: HookRecord = core
            .store
            .get(Cf::Webhooks, &keys::webhook(id.as_str()))?
            .ok_or_else(|| ServiceError::NotFound {
                what: "webhook",
                name: id.to_string(),
            })?;
        let before = rec.hook.clone();
        rec.hook.enabled = enabled;
        rec.hook.disabled_reason = if enabled { None } else { reason };
        let mut running = self.running.lock().unwrap();
        let mut batch = Batch::default();
        batch.put(Cf::Webhooks, &keys::webhook(id.as_str()), &rec)?;
        if enabled && !before.enabled {
            let cursor = (*core.store.outbox_end().borrow()).saturating_sub(1);
            batch.put(Cf::Webhooks, &keys::webhook_cursor(id.as_str()), &cursor)?;
        }
        core.audit(
            &mut batch,
            actor,
            if enabled {
                "webhook.enable"
            } else {
                "webhook.disable"
            },
            format!("webhook:{id}"),
            to_json(&before),
            to_json(&rec.hook),
        )?;
        core.commit(batch)?;
        if enabled {
            if !running.contains_key(id) && self.runtime.is_some() {
                self.start_locked(&mut running, &rec)?;
            }
        } else if let Some(r) = running.remove(id) {
            r.cfg.send_replace(None);
        }
        tracing::info!(%actor, webhook = %id, enabled, reason = ?rec.hook.disabled_reason, "webhook enabled or disabled");
        Ok(rec.hook)
    }

    fn start(self: &Arc<Self>, rec: &HookRecord) -> Result<(), ServiceError> {
        let mut running = self.running.lock().unwrap();
        self.start_locked(&mut running, rec)
    }

    fn start_locked(
        self: &Arc<Self>,
        running: &mut HashMap<WebhookId, Running>,
        rec: &HookRecord,
    ) -> Result<(), ServiceError> {
        let Some(rt) = &self.runtime else {
            return Ok(());
        };
        let live = self.live(rec)?;
        let id = rec.hook.id.clone();
        let cursor: u64 = self
            .core
            .store
            .get(Cf::Webhooks, &keys::webhook_cursor(id.as_str()))?
            .unwrap_or(0);
        let cursor = Arc::new(AtomicU64::new(cursor));
        let (cfg, rx) = tokio::sync::watch::channel(Some(live));
        rt.spawn(worker::run(self.clone(), id.clone(), rx, cursor.clone()));
        running.insert(id, Running { cfg, cursor });
        Ok(())
    }

    fn reconfigure(&self, rec: &HookRecord) -> Result<(), ServiceError> {
        let live = self.live(rec)?;
        if let Some(r) = self.running.lock().unwrap().get(&rec.hook.id) {
            r.cfg.send_replace(Some(live));
        }
        Ok(())
    }

    fn stop_worker(&self, id: &WebhookId) {
        if let Some(r) = self.running.lock().unwrap().remove(id) {
            r.cfg.send_replace(None);
        }
    }
}

#[cfg(test)]
mod tests;
