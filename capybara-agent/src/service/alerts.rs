//! Alerts: the webhook events ([`Notification`]s) that come from watching the kernel, the
//! tunnel and the clock rather than from one write: quota thresholds, account expiries and
//! suspicious activity. Sessions notify from the recorder (`service::history`), component
//! health from `service::health`, configuration changes from the core.
//!
//! The daemon feeds one **alerts thread** ([`run_alerts`]) over a bounded queue of
//! [`ALERT_QUEUE`] inputs ([`AlertInput`]): kernel events from the event bus, the tunnel's auth
//! reports, and a nudge after every configuration change (at most one queued: a bulk change is
//! one look at the expiries). Feeding it never blocks (a full queue drops the input and counts
//! it, [`AlertSender::dropped`]), so neither the kernel event
//! reader nor the tunnel waits for a store write; the thread hands each notification to
//! [`Core::notify`] (the durable outbox) in the order its inputs came.
//!
//! ## `quota-warning`, `quota-exceeded`
//! The kernel emits one event per bucket and threshold (80, 90, 100 %) and period; the thread
//! maps the bucket to its owner (`user:NAME`, or `group:NAME` for a shared pool: then `user` is
//! the user whose packet reached the threshold and `data.group` the group) and the device whose
//! packet it was (`ip` its endpoint, `vpn_ip` its tunnel address). `data`: `percent` (80 or 90
//! for `quota-warning`, 100 for `quota-exceeded`), `used` and `limit` (bytes, the kernel's),
//! `period` (`daily`, `weekly`, `monthly`, `none`), `epoch` (the kernel's period number),
//! `device`, and `kernel_time_ns` (the kernel's time of the packet, Unix nanoseconds) beside the
//! notification's own `timestamp` (the same instant, to the millisecond), so the latency from
//! the packet to the receiver can be measured. Latency to [`Core::notify`]: the ring buffer's
//! wake-up plus one queue hop, well under a millisecond on an idle agent.
//!
//! ## `account-expired`
//! A timer, not a poll: the thread sleeps until the earliest future expiry of any user (or the
//! next configuration change, which may move it) and reports each expiry that passed, at its
//! moment (the kernel gate holds the user's devices at the same deadline by itself).
//! `data`: `expires_at` (RFC 3339), `late_s` (how long after the deadline it was reported: 0
//! unless the agent was down then), `devices` (the user's device count).
//!
//! Exactly once per expiry, **down time included**: with the event's outbox record the thread
//! writes a marker `alerts/expired/<user>` in the store's `meta` family holding the expiry it
//! reported (Unix seconds), in the same synced batch ([`Core::stage_notification`]): an agent
//! killed at any moment has written both or neither, so the expiry is in the outbox once. At
//! start (and at every check) an expiry in the past whose marker differs is reported, so an
//! expiry that passed while the agent was down is reported at the next start, with `late_s`
//! saying so. A renewed expiry is a new value, so it is reported again when it passes; markers
//! of users without an expiry (cleared, or removed) are deleted.
//!
//! ## `suspicious-activity`
//! Two detectors, each a sliding window per source with the agent's thresholds
//! ([`AlertConfig`], options `--suspicious-auth-threshold`, `--suspicious-auth-window`,
//! `--suspicious-flow-threshold`, `--suspicious-flow-window`):
//!
//! - `data.kind = "auth-failures"`: failed handshakes (unknown keys, bad MACs, …) from one
//!   source prefix, from the tunnel's reports (already counted per /24 or /64, see
//!   `tunnel::auth_table`; `0.0.0.0/0` / `::/0` is the tally of many prefixes, i.e. a
//!   distributed flood). Default: [`DEFAULT_AUTH_THRESHOLD`] failures in
//!   [`DEFAULT_AUTH_WINDOW`]. `data`: `prefix`, `source` (the last address seen), `reason`,
//!   `count` (in the window), `window_s`, `threshold`. `ip` is the source's address. Latency:
//!   the tunnel reports a prefix's first failure at once and the rest every 10 s, so a flood is
//!   reported at most 10 s after it crossed the threshold. A prefix whose last source seen
//!   is auto-blocked by the reputation engine (`service::reputation`) is not reported: the
//!   block's own `auto-block` event already named that source, so one attacker makes one event.
//! - `data.kind = "flow-limit-storm"`: the kernel refusing new flows of one device (its
//!   `FlowLimit` events, at most one per device per second by the kernel's own rate limit, so
//!   the count is of seconds with refusals). Default: [`DEFAULT_FLOW_THRESHOLD`] in
//!   [`DEFAULT_FLOW_WINDOW`]. `data`: `source` (`user/device`), `device`, `limit`, `count`,
//!   `window_s`, `threshold`; `user`, `ip`, `vpn_ip` are the device's.
//!
//! Bounded whatever the flood: one source is reported at most once per window (while it stays
//! over the threshold it is reported again one window later), and at most
//! [`MAX_SUSPICIOUS_PER_WINDOW`] `suspicious-activity` events go out per auth window in all;
//! those held back are counted and the next event carries the count as `data.suppressed`. The
//! detectors keep at most [`MAX_TRACKED`] sources each (sources with nothing in their window
//! are forgotten first).

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime},
};

use super::{
    ServiceError, ServiceEvent,
    core::Core,
    directory::Directory,
    domain::{Peer, UserName, ValidationError, unix_secs},
    notify::{Notification, NotifyKind},
    policy::Policy,
    reputation::Reputation,
};
use crate::{
    net::Cidr,
    store::{Batch, Cf},
};

/// Inputs queued for the alerts thread before new ones are dropped (and counted).
pub const ALERT_QUEUE: usize = 4096;
/// Default: failed handshakes from one prefix in [`DEFAULT_AUTH_WINDOW`] that are suspicious.
pub const DEFAULT_AUTH_THRESHOLD: u64 = 20;
/// Default window of the failed-handshake detector.
pub const DEFAULT_AUTH_WINDOW: Duration = Duration::from_secs(60);
/// Default: seconds with refused flows of one device in [`DEFAULT_FLOW_WINDOW`] that make a
/// storm.
pub const DEFAULT_FLOW_THRESHOLD: u64 = 10;
/// Default window of the flow-limit detector.
pub const DEFAULT_FLOW_WINDOW: Duration = Duration::from_secs(60);
/// At most this many `suspicious-activity` events per auth window, all sources together.
pub const MAX_SUSPICIOUS_PER_WINDOW: usize = 10;
/// Sources each detector keeps at most.
pub const MAX_TRACKED: usize = 4096;
/// The longest window an option may set.
pub const MAX_WINDOW: Duration = Duration::from_secs(86_400);
/// The expiry timer looks again at least this often (a wall clock step is noticed then).
const EXPIRY_RECHECK: Duration = Duration::from_secs(60);
/// Store key prefix (family `meta`) of the account-expired markers.
const EXPIRED_MARKERS: &str = "alerts/expired/";

/// The detectors' thresholds (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlertConfig {
    /// Failed handshakes of one prefix in `auth_window` that are suspicious.
    pub auth_threshold: u64,
    /// The failed-handshake window.
    pub auth_window: Duration,
    /// Seconds with refused flows of one device in `flow_window` that make a storm.
    pub flow_threshold: u64,
    /// The flow-limit window.
    pub flow_window: Duration,
}

impl Default for AlertConfig {
    fn default() -> AlertConfig {
        AlertConfig {
            auth_threshold: DEFAULT_AUTH_THRESHOLD,
            auth_window: DEFAULT_AUTH_WINDOW,
            flow_threshold: DEFAULT_FLOW_THRESHOLD,
            flow_window: DEFAULT_FLOW_WINDOW,
        }
    }
}

impl AlertConfig {
    /// Checks every field: thresholds at least 1, windows from 1 s to [`MAX_WINDOW`].
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (field, v) in [
            ("suspicious_auth_threshold", self.auth_threshold),
            ("suspicious_flow_threshold", self.flow_threshold),
        ] {
            if v == 0 {
                return Err(ValidationError::Value {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        for (field, w) in [
            ("suspicious_auth_window", self.auth_window),
            ("suspicious_flow_window", self.flow_window),
        ] {
            if w < Duration::from_secs(1) || w > MAX_WINDOW {
                return Err(ValidationError::Value {
                    field,
                    reason: format!("{w:?} is outside 1s..=24h"),
                });
            }
        }
        Ok(())
    }
}

/// A quota threshold the kernel reached (`dataplane::Event::Quota` in domain terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaReached {
    /// The bucket.
    pub bucket: u32,
    /// 80, 90 or 100.
    pub percent: u32,
    /// Bytes used, the packet that reached the threshold included.
    pub used: u64,
    /// The budget.
    pub limit: u64,
    /// The bucket's period number in the kernel.
    pub epoch: u32,
    /// The peer whose packet reached it.
    pub peer: u32,
    /// When (the kernel's time of the packet).
    pub at: SystemTime,
}

/// What the alerts thread is fed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertInput {
    /// The kernel: a quota threshold reached.
    Quota(QuotaReached),
    /// The kernel refused a new flow of a peer (one event per peer per second at most).
    FlowLimit {
        /// The peer.
        peer: u32,
        /// Its flow limit.
        limit: u32,
        /// When.
        at: SystemTime,
    },
    /// The tunnel: failed handshakes of one source prefix counted since its last report.
    AuthFailures {
        /// The /24 or /64 (`/0` for the tally of the rest).
        prefix: Cidr,
        /// The last source.
        sample: SocketAddr,
        /// Why (`unknown-key`, `bad-mac`, …).
        reason: &'static str,
        /// How many.
        count: u64,
        /// The last of them.
        at: SystemTime,
    },
    /// Something changed (a user's expiry perhaps): look at the expiries again.
    Recheck,
}

/// The feeding end of the alerts thread's queue (cheap to clone). Made by [`alert_channel`].
#[derive(Clone, Debug)]
pub struct AlertSender {
    tx: mpsc::SyncSender<AlertInput>,
    dropped: Arc<AtomicU64>,
    /// A [`AlertInput::Recheck`] is queued: more are coalesced into it (a bulk change of 10 000
    /// users asks for one look at the expiries, not 10 000).
    recheck: Arc<std::sync::atomic::AtomicBool>,
}

impl AlertSender {
    /// Queues `input` without waiting; a full queue drops it and counts it. False once the
    /// thread is gone.
    pub fn send(&self, input: AlertInput) -> bool {
        let recheck = input == AlertInput::Recheck;
        if recheck && self.recheck.swap(true, Ordering::AcqRel) {
            return true;
        }
        match self.tx.try_send(input) {
            Ok(()) => true,
            Err(mpsc::TrySendError::Full(_)) => {
                if recheck {
                    self.recheck.store(false, Ordering::Release);
                }
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::TrySendError::Disconnected(_)) => false,
        }
    }

    /// Inputs dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The alerts thread's end of the queue (for [`run_alerts`]).
#[derive(Debug)]
pub struct AlertReceiver {
    rx: mpsc::Receiver<AlertInput>,
    recheck: Arc<std::sync::atomic::AtomicBool>,
}

/// The alerts thread's queue: [`ALERT_QUEUE`] inputs.
pub fn alert_channel() -> (AlertSender, AlertReceiver) {
    let (tx, rx) = mpsc::sync_channel(ALERT_QUEUE);
    let recheck = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (
        AlertSender {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            recheck: recheck.clone(),
        },
        AlertReceiver { rx, recheck },
    )
}

/// Counts per source over a sliding window; says when a source crosses the threshold.
#[derive(Debug)]
struct Windows<K> {
    sources: HashMap<K, Window>,
}

#[derive(Debug, Default)]
struct Window {
    hits: VecDeque<(SystemTime, u64)>,
    last_alert: Option<SystemTime>,
}

impl Window {
    fn expire(&mut self, now: SystemTime, window: Duration) {
        while let Some((t, _)) = self.hits.front() {
            if now.duration_since(*t).unwrap_or_default() >= window {
                self.hits.pop_front();
            } else {
                break;
            }
        }
    }
    fn total(&self) -> u64 {
        self.hits.iter().map(|(_, n)| n).sum()
    }
}

impl<K: Hash + Eq + Clone> Windows<K> {
    fn new() -> Windows<K> {
        Windows {
            sources: HashMap::new(),
        }
    }

    /// Adds `n` at `at` to `key`; the count in the window if the source is over `threshold`
    /// and was not reported in the last `window`.
    fn hit(
        &mut self,
        key: &K,
        n: u64,
        at: SystemTime,
        threshold: u64,
        window: Duration,
    ) -> Option<u64> {
        if !self.sources.contains_key(key) && self.sources.len() >= MAX_TRACKED {
            self.sources.retain(|_, w| {
                w.expire(at, window);
                !w.hits.is_empty()
                    || w.last_alert
                        .is_some_and(|t| at.duration_since(t).unwrap_or_default() < window)
            });
            if self.sources.len() >= MAX_TRACKED {
                return None;
            }
        }
        let w = self.sources.entry(key.clone()).or_default();
        w.hits.push_back((at, n));
        w.expire(at, window);
        let total = w.total();
        let quiet = w
            .last_alert
            .is_none_or(|t| at.duration_since(t).unwrap_or_default() >= window);
        (total >= threshold && quiet).then_some(total)
    }

    fn reported(&mut self, key: &K, at: SystemTime) {
        if let Some(w) = self.sources.get_mut(key) {
            w.last_alert = Some(at);
        }
    }
}

#[derive(Debug)]
struct State {
    cfg: AlertConfig,
    auth: Windows<Cidr>,
    flows: Windows<u32>,
    /// When the last `suspicious-activity` events went out (at most
    /// [`MAX_SUSPICIOUS_PER_WINDOW`]).
    sent: VecDeque<SystemTime>,
    /// Held back since the last one that went out.
    suppressed: u64,
}

/// The alerts feature (see the module docs).
#[derive(Debug)]
pub struct Alerts {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
    reputation: Arc<Reputation>,
    state: Mutex<State>,
}

impl Alerts {
    /// The feature over the shared core, directory, policy and reputation engine, with the
    /// default thresholds.
    pub fn new(
        core: Arc<Core>,
        dir: Arc<Directory>,
        policy: Arc<Policy>,
        reputation: Arc<Reputation>,
    ) -> Alerts {
        Alerts {
            core,
            dir,
            policy,
            reputation,
            state: Mutex::new(State {
                cfg: AlertConfig::default(),
                auth: Windows::new(),
                flows: Windows::new(),
                sent: VecDeque::new(),
                suppressed: 0,
            }),
        }
    }

    /// Sets the detectors' thresholds (the agent's options); a bad one names its field and
    /// changes nothing.
    pub fn configure(&self, cfg: AlertConfig) -> Result<(), ValidationError> {
        cfg.validate()?;
        self.state.lock().unwrap().cfg = cfg;
        Ok(())
    }

    /// The thresholds in use.
    pub fn config(&self) -> AlertConfig {
        self.state.lock().unwrap().cfg
    }

    /// Handles one input (the alerts thread's step).
    pub fn on_input(&self, input: AlertInput) -> Result<(), ServiceError> {
        match input {
            AlertInput::Quota(q) => self.on_quota(&q),
            AlertInput::FlowLimit { peer, limit, at } => self.on_flow_limit(peer, limit, at),
            AlertInput::AuthFailures {
                prefix,
                sample,
                reason,
                count,
                at,
            } => self.on_auth_failures(prefix, sample, reason, count, at),
            AlertInput::Recheck => self.check_expiries(SystemTime::now()).map(|_| ()),
        }
    }

    /// The device with dataplane id `id`, if any.
    fn peer(&self, id: u32) -> Option<Peer> {
        self.dir.peer_by_id(id)
    }

    /// The public endpoint address of the device with `key`, if the tunnel has seen one.
    fn endpoint(&self, peer: &Peer) -> Option<SocketAddr> {
        self.core.tunnel.endpoint(&peer.public_key)
    }

    /// `quota-warning` (80, 90 %) or `quota-exceeded` (100 %), see the module docs.
    pub fn on_quota(&self, q: &QuotaReached) -> Result<(), ServiceError> {
        let kind = if q.percent >= 100 {
            NotifyKind::QuotaExceeded
        } else {
            NotifyKind::QuotaWarning
        };
        let owner = self.policy.bucket_owner(q.bucket);
        let peer = self.peer(q.peer);
        let mut data = serde_json::json!({
            "percent": q.percent,
            "used": q.used,
            "limit": q.limit,
            "epoch": q.epoch,
            "period": owner.as_ref().map(|(_, p)| p.clone()),
            "kernel_time_ns": q.at.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            "device": peer.as_ref().map(|p| p.device.to_string()),
        });
        let user = match owner.as_ref().map(|(o, _)| o.split_once(':')) {
            Some(Some(("user", u))) => Some(u.to_owned()),
            Some(Some(("group", g))) => {
                data["group"] = g.into();
                peer.as_ref().map(|p| p.user.to_string())
            }
            _ => peer.as_ref().map(|p| p.user.to_string()),
        };
        let mut n = Notification::new(kind);
        n.at = q.at;
        n.user = user;
        if let Some(p) = &peer {
            n.ip = self.endpoint(p).map(|e| e.ip());
            n.vpn_ip = Some(IpAddr::V4(p.ipv4));
            n.protocol = Some(super::domain::Protocol::Wireguard.as_str().to_owned());
        }
        n.data = data;
        tracing::info!(event = %kind, user = ?n.user, percent = q.percent, bucket = q.bucket, "quota threshold");
        self.core.notify(n)
    }

    /// A flow refused by the kernel: counts towards the device's storm (see the module docs).
    pub fn on_flow_limit(&self, id: u32, limit: u32, at: SystemTime) -> Result<(), ServiceError> {
        let mut st = self.state.lock().unwrap();
        let (threshold, window) = (st.cfg.flow_threshold, st.cfg.flow_window);
        let Some(count) = st.flows.hit(&id, 1, at, threshold, window) else {
            return Ok(());
        };
        let Some(suppressed) = self.admit(&mut st, at) else {
            return Ok(());
        };
        st.flows.reported(&id, at);
        drop(st);
        let peer = self.peer(id);
        let mut n = Notification::new(NotifyKind::SuspiciousActivity);
        n.at = at;
        if let Some(p) = &peer {
            n.user = Some(p.user.to_string());
            n.ip = self.endpoint(p).map(|e| e.ip());
            n.vpn_ip = Some(IpAddr::V4(p.ipv4));
            n.protocol = Some(super::domain::Protocol::Wireguard.as_str().to_owned());
        }
        n.data = serde_json::json!({
            "kind": "flow-limit-storm",
            "source": peer.as_ref().map(|p| format!("{}/{}", p.user, p.device)),
            "device": peer.as_ref().map(|p| p.device.to_string()),
            "peer_id": id,
            "limit": limit,
            "count": count,
            "window_s": window.as_secs(),
            "threshold": threshold,
            "suppressed": suppressed,
        });
        tracing::warn!(peer = id, count, "flow-limit storm");
        self.core.notify(n)
    }

    /// Failed handshakes of a prefix: count towards its detector (see the module docs).
    pub fn on_auth_failures(
        &self,
        prefix: Cidr,
        sample: SocketAddr,
        reason: &str,
        count: u64,
        at: SystemTime,
    ) -> Result<(), ServiceError> {
        if self.reputation.is_blocked(sample.ip()) {
            return Ok(());
        }
        let mut st = self.state.lock().unwrap();
        let (threshold, window) = (st.cfg.auth_threshold, st.cfg.auth_window);
        let Some(total) = st.auth.hit(&prefix, count, at, threshold, window) else {
            return Ok(());
        };
        let Some(suppressed) = self.admit(&mut st, at) else {
            return Ok(());
        };
        st.auth.reported(&prefix, at);
        drop(st);
        let mut n = Notification::new(NotifyKind::SuspiciousActivity);
        n.at = at;
        n.ip = Some(sample.ip());
        n.protocol = Some(super::domain::Protocol::Wireguard.as_str().to_owned());
        n.data = serde_json::json!({
            "kind": "auth-failures",
            "prefix": prefix.to_string(),
            "source": sample.to_string(),
            "reason": reason,
            "count": total,
            "window_s": window.as_secs(),
            "threshold": threshold,
            "suppressed": suppressed,
        });
        tracing::warn!(%prefix, count = total, reason, "failed handshakes over the threshold");
        self.core.notify(n)
    }

    /// The global bound: whether one more `suspicious-activity` may go out at `at` (with the
    /// count held back since the last), or `None` (held back, counted).
    fn admit(&self, st: &mut State, at: SystemTime) -> Option<u64> {
        let window = st.cfg.auth_window;
        while let Some(t) = st.sent.front() {
            if at.duration_since(*t).unwrap_or_default() >= window {
                st.sent.pop_front();
            } else {
                break;
            }
        }
        if st.sent.len() >= MAX_SUSPICIOUS_PER_WINDOW {
            st.suppressed += 1;
            return None;
        }
        st.sent.push_back(at);
        Some(std::mem::take(&mut st.suppressed))
    }

    /// Reports every account expiry passed by `now` and not reported yet (see the module
    /// docs), deletes the markers of users without an expiry, and returns the next expiry
    /// still to come.
    pub fn check_expiries(&self, now: SystemTime) -> Result<Option<SystemTime>, ServiceError> {
        let expiries: HashMap<UserName, SystemTime> = self.policy.expiries().into_iter().collect();
        let store = &self.core.store;
        let markers: Vec<(String, u64)> = store.scan(Cf::Meta, EXPIRED_MARKERS)?;
        let mut stale = Batch::default();
        let mut reported: HashMap<String, u64> = HashMap::new();
        for (key, at) in markers {
            let user = &key[EXPIRED_MARKERS.len()..];
            if expiries.keys().any(|u| u.as_str() == user) {
                reported.insert(user.to_owned(), at);
            } else {
                stale.delete(Cf::Meta, &key);
            }
        }
        store.commit(stale)?;
        let mut next: Option<SystemTime> = None;
        let mut due: Vec<(&UserName, SystemTime)> = Vec::new();
        for (u, t) in &expiries {
            if *t > now {
                next = Some(next.map_or(*t, |n| n.min(*t)));
            } else if reported.get(u.as_str()) != Some(&unix_secs(*t)) {
                due.push((u, *t));
            }
        }
        due.sort_by_key(|(u, t)| (*t, (*u).clone()));
        for (u, t) in due {
            let late = now.duration_since(t).unwrap_or_default();
            let mut n = Notification::new(NotifyKind::AccountExpired);
            n.at = t;
            n.user = Some(u.to_string());
            n.data = serde_json::json!({
                "expires_at": chrono::DateTime::<chrono::Utc>::from(t)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "late_s": late.as_secs(),
                "devices": self.dir.user_peers(u).len(),
            });
            // The outbox record and the marker in one synced batch: both or neither.
            let mut batch = Batch::default();
            self.core.stage_notification(&mut batch, n.clone())?;
            batch.put(Cf::Meta, &format!("{EXPIRED_MARKERS}{u}"), &unix_secs(t))?;
            store.commit(batch)?;
            let _ = self.core.events().send(ServiceEvent::Notified(Box::new(n)));
            tracing::info!(user = %u, late_s = late.as_secs(), "account expired");
        }
        Ok(next)
    }
}

/// The alerts thread: handles each input in order; between inputs, sleeps until the next
/// account expiry (at most [`EXPIRY_RECHECK`]) and reports it at its moment. Checks the
/// expiries once at start (those passed while the agent was down). Ends when every sender is
/// gone.
pub fn run_alerts(alerts: Arc<Alerts>, inputs: AlertReceiver) {
    let check = |alerts: &Alerts| match alerts.check_expiries(SystemTime::now()) {
        Ok(next) => next,
        Err(e) => {
            tracing::warn!(error = %e, "cannot check account expiries; retrying");
            None
        }
    };
    let mut next = check(&alerts);
    loop {
        let wait = next
            .map_or(EXPIRY_RECHECK, |t| {
                t.duration_since(SystemTime::now()).unwrap_or_default()
            })
            .min(EXPIRY_RECHECK);
        match inputs.rx.recv_timeout(wait) {
            Ok(AlertInput::Recheck) => {
                // Cleared first: a change after this look asks for another.
                inputs.recheck.store(false, Ordering::Release);
                next = check(&alerts);
            }
            Ok(input) => {
                if let Err(e) = alerts.on_input(input) {
                    tracing::warn!(error = %e, "cannot hand an alert to the webhook outbox");
                }
                if next.is_some_and(|t| t <= SystemTime::now()) {
                    next = check(&alerts);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => next = check(&alerts),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
}

#[cfg(test)]
mod tests;
