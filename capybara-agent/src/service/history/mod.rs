//! Session history and auth attempts: what the tunnel reported, recorded in the store's
//! `sessions` family, and the queries and retention over it.
//!
//! ## What a session is
//! A session starts when the tunnel reports a device **connected** (its first completed
//! handshake after being disconnected; rekeys every two minutes are not new sessions) and ends
//! when the tunnel reports it **disconnected**, with the reason:
//!
//! | reason | when |
//! |---|---|
//! | `idle` | no handshake and no authenticated packet for the disconnect timeout (`--disconnect-timeout`, default 180 s); the end is when the tunnel noticed |
//! | `kicked` | `capybara kick USER` ended it |
//! | `removed` | the device or its user was removed |
//! | `agent-stopped` | the agent stopped with the session open (closed at shutdown), or was killed (closed by the next start, see below) |
//!
//! Its endpoint is the source `ip:port` of the handshake; each later change (roaming, NAT
//! rebinding) is appended with its time.
//!
//! ## Bytes
//! Bytes and packets each way are the **kernel's per-peer counters** (the dataplane's
//! `PeerStats`, the same numbers `capybara stats` shows): the counters when the session opened
//! are kept in the record, and at the end the session's figures are the counters then minus
//! those. The kernel counts **IP bytes** — the TC programs on the tunnel device see each inner
//! IP packet (or GRO/GSO super-packet) whole, headers included, without WireGuard's
//! encapsulation — so a TCP transfer of N payload bytes in P packets counts about
//! N + P × 52 bytes (IPv4 20 + TCP 20 + timestamps 12). Packets the agent forwards between the
//! handshake and the moment it records the session's start (a few milliseconds) count towards
//! the time before the session; the counters are pinned and survive agent restarts.
//!
//! ## Restarts
//! An open session is written when it opens (and again at each endpoint change), so a record
//! survives SIGKILL. [`History::close_stale_sessions`] at start-up closes every session still
//! open with reason `agent-stopped`, its end the time of that start and its bytes those the
//! (pinned) kernel counters hold then, if the peer id still belongs to the same key (else the
//! bytes stay 0): while the agent is down there is no tunnel, so no traffic is missed. A clean
//! shutdown closes open sessions itself ([`Recorder::close_all`]).
//!
//! ## Auth attempts
//! A failed handshake (unknown key, bad MAC, undecryptable, refused by the session) is recorded
//! as an auth attempt with its source and the key it claimed when readable. The rate limit per
//! source is the tunnel's: at most one `AuthFailed` event per source IP per 10 s, over at most
//! 4096 remembered sources (`tunnel::liveness::SourceLimiter`), so a flood from one address
//! costs one record per 10 s.
//!
//! ## Keys and retention
//! Sessions are `session/<start ns>/<peer id>` and auth attempts `auth/<ns>/<n>` in the
//! `sessions` family (see `store::keys`): time-ordered, so pruning is a scan of the oldest.
//! [`History::prune_history`] deletes closed sessions that ended, and auth attempts made,
//! before a cut-off; the agent runs it at start and every [`PRUNE_INTERVAL`] with its retention
//! (`--history-retention`, default 90 days); `capybara history clear --older-than D` runs it
//! on demand (audited as `history.clear`). Open sessions are never pruned. Queries read the
//! family with one prefix scan (fine for the retained volume: ~200 bytes a record).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, mpsc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, now, to_json},
    directory::Directory,
    domain::{Actor, PublicKey, UserName, ValidationError},
    monitor::Traffic,
};
use crate::{
    net::Cidr,
    store::{Batch, Cf, keys},
};

/// How often the agent prunes the history to its retention.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Default retention of sessions and auth attempts.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 86_400);

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// No handshake and no traffic for the disconnect timeout.
    Idle,
    /// Kicked.
    Kicked,
    /// The device or its user was removed.
    Removed,
    /// The agent stopped or was killed with the session open.
    AgentStopped,
}

impl EndReason {
    /// The name people and exports see.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Idle => "idle",
            EndReason::Kicked => "kicked",
            EndReason::Removed => "removed",
            EndReason::AgentStopped => "agent-stopped",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An endpoint a session was seen from, and since when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSeen {
    /// Unix seconds.
    pub at: u64,
    /// `ip:port`.
    pub endpoint: SocketAddr,
}

/// Kernel counters at a moment: bytes and packets each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// From the device.
    pub rx: Traffic,
    /// To the device.
    pub tx: Traffic,
}

impl Counters {
    fn since(self, base: Counters) -> Counters {
        let d = |a: Traffic, b: Traffic| Traffic {
            packets: a.packets.saturating_sub(b.packets),
            bytes: a.bytes.saturating_sub(b.bytes),
        };
        Counters {
            rx: d(self.rx, base.rx),
            tx: d(self.tx, base.tx),
        }
    }
}

/// One recorded session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its key in the store (`session/<start ns>/<peer id>`).
    pub id: String,
    /// The user (a name: the user may since have been removed).
    pub user: String,
    /// The device.
    pub device: String,
    /// The dataplane peer id it had.
    pub peer_id: u32,
    /// The device's public key.
    pub public_key: PublicKey,
    /// The device's tunnel addresses.
    pub ipv4: Ipv4Addr,
    /// IPv6 tunnel address.
    pub ipv6: Ipv6Addr,
    /// Start, Unix seconds.
    pub start: u64,
    /// End, Unix seconds; `None` while open.
    pub end: Option<u64>,
    /// Where it came from, then each change.
    pub endpoints: Vec<EndpointSeen>,
    /// Bytes and packets during the session (0 while open).
    pub traffic: Counters,
    /// Why it ended; `None` while open.
    pub reason: Option<EndReason>,
}

/// A session as stored: with the kernel counters when it opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    /// The session.
    #[serde(flatten)]
    pub session: Session,
    /// The kernel counters when it opened.
    pub base: Counters,
}

/// One failed handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthAttempt {
    /// Unix seconds.
    pub at: u64,
    /// Where it came from.
    pub source: SocketAddr,
    /// The key it claimed, if readable.
    pub public_key: Option<PublicKey>,
    /// `unknown-key`, `bad-mac`, `undecryptable` or `rejected`.
    pub reason: String,
}

/// What the tunnel reported, in domain types (the daemon converts the tunnel's events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// A device completed a handshake after being disconnected.
    Connected {
        /// The device's key.
        key: PublicKey,
        /// Where from.
        endpoint: SocketAddr,
        /// When.
        at: SystemTime,
    },
    /// A connected device went away.
    Disconnected {
        /// The device's key.
        key: PublicKey,
        /// Why.
        reason: EndReason,
        /// When it was noticed.
        at: SystemTime,
    },
    /// A connected device's packets come from a new address.
    EndpointChanged {
        /// The device's key.
        key: PublicKey,
        /// The new endpoint.
        to: SocketAddr,
        /// When.
        at: SystemTime,
    },
    /// A handshake failed (already rate-limited per source by the tunnel).
    AuthFailed {
        /// Where it came from.
        source: SocketAddr,
        /// The key it claimed.
        key: Option<PublicKey>,
        /// Why, e.g. `unknown-key`.
        reason: &'static str,
        /// When.
        at: SystemTime,
    },
}

/// What to list.
#[derive(Clone, Debug, Default)]
pub struct HistoryQuery {
    /// Only this user's sessions.
    pub user: Option<UserName>,
    /// Only sessions with an endpoint or tunnel address inside, and auth attempts from it.
    pub ip: Option<Cidr>,
    /// At most this many of each, newest first; `None` = all.
    pub limit: Option<usize>,
    /// Also auth attempts (none when `user` is set: they belong to no user).
    pub include_auth: bool,
}

/// The answer to a [`HistoryQuery`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Sessions, newest first.
    pub sessions: Vec<Session>,
    /// Auth attempts, newest first.
    pub auth_attempts: Vec<AuthAttempt>,
}

/// What a prune removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    /// Closed sessions deleted.
    pub sessions: u64,
    /// Auth attempts deleted.
    pub auth_attempts: u64,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn secs(t: SystemTime) -> u64 {
    crate::service::domain::unix_secs(t)
}

impl Session {
    /// Whether an endpoint or a tunnel address of the session is inside `net`.
    pub fn touches(&self, net: &Cidr) -> bool {
        net.contains(IpAddr::V4(self.ipv4))
            || net.contains(IpAddr::V6(self.ipv6))
            || self.endpoints.iter().any(|e| net.contains(e.endpoint.ip()))
    }
}

/// The history feature.
#[derive(Debug)]
pub struct History {
    core: Arc<Core>,
    dir: Arc<Directory>,
}

impl History {
    /// The feature over the shared core and directory.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>) -> History {
        History { core, dir }
    }

    /// The kernel counters of peer `id`.
    fn counters(&self, id: u32) -> Result<Counters, ServiceError> {
        let s = self.core.plane.peer_stats(id)?;
        Ok(Counters {
            rx: Traffic {
                packets: s.rx_packets,
                bytes: s.rx_bytes,
            },
            tx: Traffic {
                packets: s.tx_packets,
                bytes: s.tx_bytes,
            },
        })
    }

    /// Opens a session of the device with `key` (ignored, `None`, for keys of no device).
    pub fn open_session(
        &self,
        key: &PublicKey,
        endpoint: SocketAddr,
        at: SystemTime,
    ) -> Result<Option<StoredSession>, ServiceError> {
        let Some(peer) = self.dir.peer_by_key(key) else {
            return Ok(None);
        };
        let base = self.counters(peer.id)?;
        let start = secs(at);
        let s = Session {
            id: keys::session(unix_nanos(at), peer.id),
            user: peer.user.to_string(),
            device: peer.device.to_string(),
            peer_id: peer.id,
            public_key: peer.public_key,
            ipv4: peer.ipv4,
            ipv6: peer.ipv6,
            start,
            end: None,
            endpoints: vec![EndpointSeen {
                at: start,
                endpoint,
            }],
            traffic: Counters::default(),
            reason: None,
        };
        let s = StoredSession { session: s, base };
        self.core.store.put(Cf::Sessions, &s.session.id, &s)?;
        Ok(Some(s))
    }

    /// Records an endpoint change of an open session.
    pub fn session_endpoint(
        &self,
        s: &mut StoredSession,
        to: SocketAddr,
        at: SystemTime,
    ) -> Result<(), ServiceError> {
        s.session.endpoints.push(EndpointSeen {
            at: secs(at),
            endpoint: to,
        });
        self.core.store.put(Cf::Sessions, &s.session.id, &*s)?;
        Ok(())
    }

    /// Closes a session: its bytes are the kernel counters now minus those at its start.
    pub fn close_session(
        &self,
        s: &mut StoredSession,
        reason: EndReason,
        at: SystemTime,
    ) -> Result<(), ServiceError> {
        let base = s.base;
        let s2 = &mut s.session;
        s2.traffic = self.counters(s2.peer_id)?.since(base);
        s2.end = Some(secs(at).max(s2.start));
        s2.reason = Some(reason);
        self.core.store.put(Cf::Sessions, &s.session.id, &*s)?;
        Ok(())
    }

    /// Records a failed handshake.
    pub fn record_auth_attempt(
        &self,
        source: SocketAddr,
        key: Option<PublicKey>,
        reason: &str,
        at: SystemTime,
    ) -> Result<(), ServiceError> {
        let ns = unix_nanos(at);
        let a = AuthAttempt {
            at: secs(at),
            source,
            public_key: key,
            reason: reason.to_owned(),
        };
        // Two attempts in the same nanosecond get distinct keys.
        let mut n = 0u32;
        let key = loop {
            let k = keys::auth_attempt(ns, n);
            if self
                .core
                .store
                .get::<AuthAttempt>(Cf::Sessions, &k)?
                .is_none()
            {
                break k;
            }
            n += 1;
        };
        self.core.store.put(Cf::Sessions, &key, &a)?;
        Ok(())
    }

    /// Sessions still open in the store (at start-up: left by an agent that did not stop
    /// cleanly).
    pub fn open_sessions(&self) -> Result<Vec<StoredSession>, ServiceError> {
        Ok(self
            .core
            .store
            .scan::<StoredSession>(Cf::Sessions, keys::SESSIONS_PREFIX)?
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.session.end.is_none())
            .collect())
    }

    /// Closes every session left open (see the module docs): reason `agent-stopped`, end
    /// `at`, bytes from the pinned counters if the peer id still belongs to the same key.
    pub fn close_stale_sessions(&self, at: SystemTime) -> Result<usize, ServiceError> {
        let stale = self.open_sessions()?;
        let same_key: HashMap<u32, PublicKey> = self
            .dir
            .with_records(|recs| recs.map(|r| (r.peer.id, r.peer.public_key)).collect());
        for mut s in stale.iter().cloned() {
            if same_key.get(&s.session.peer_id) == Some(&s.session.public_key) {
                self.close_session(&mut s, EndReason::AgentStopped, at)?;
            } else {
                let x = &mut s.session;
                x.end = Some(secs(at).max(x.start));
                x.reason = Some(EndReason::AgentStopped);
                self.core.store.put(Cf::Sessions, &s.session.id, &s)?;
            }
        }
        Ok(stale.len())
    }

    /// Sessions and auth attempts matching `q`, newest first.
    pub fn history(&self, q: &HistoryQuery) -> Result<HistoryPage, ServiceError> {
        let limit = q.limit.unwrap_or(usize::MAX);
        let user = q.user.as_ref().map(UserName::as_str);
        let sessions: Vec<Session> = self
            .core
            .store
            .scan::<StoredSession>(Cf::Sessions, keys::SESSIONS_PREFIX)?
            .into_iter()
            .rev()
            .map(|(_, s)| s.session)
            .filter(|s| user.is_none_or(|u| s.user == u))
            .filter(|s| q.ip.as_ref().is_none_or(|n| s.touches(n)))
            .take(limit)
            .collect();
        let auth_attempts = if q.include_auth && q.user.is_none() {
            self.core
                .store
                .scan::<AuthAttempt>(Cf::Sessions, keys::AUTH_PREFIX)?
                .into_iter()
                .rev()
                .map(|(_, a)| a)
                .filter(|a| q.ip.as_ref().is_none_or(|n| n.contains(a.source.ip())))
                .take(limit)
                .collect()
        } else {
            Vec::new()
        };
        Ok(HistoryPage {
            sessions,
            auth_attempts,
        })
    }

    /// Deletes closed sessions that ended, and auth attempts made, before `cutoff` (Unix
    /// seconds), in one batch.
    fn prune_batch(&self, cutoff: u64) -> Result<(Batch, Pruned), ServiceError> {
        let mut batch = Batch::default();
        let mut pruned = Pruned::default();
        for (k, s) in self
            .core
            .store
            .scan::<StoredSession>(Cf::Sessions, keys::SESSIONS_PREFIX)?
        {
            if s.session.end.is_some_and(|e| e < cutoff) {
                batch.delete(Cf::Sessions, &k);
                pruned.sessions += 1;
            }
        }
        for (k, a) in self
            .core
            .store
            .scan::<AuthAttempt>(Cf::Sessions, keys::AUTH_PREFIX)?
        {
            if a.at >= cutoff {
                break;
            }
            batch.delete(Cf::Sessions, &k);
            pruned.auth_attempts += 1;
        }
        Ok((batch, pruned))
    }

    /// Retention: deletes what ended more than `retention` ago (the agent's own pruning, not
    /// an API change, so not audited).
    pub fn prune_history(&self, retention: Duration) -> Result<Pruned, ServiceError> {
        let cutoff = now().saturating_sub(retention.as_secs());
        let (batch, pruned) = self.prune_batch(cutoff)?;
        self.core.store.commit(batch)?;
        Ok(pruned)
    }

    /// `history clear --older-than D`: like [`History::prune_history`], audited as
    /// `history.clear`, in the same batch.
    pub fn clear_history(
        &self,
        actor: &Actor,
        older_than: Duration,
    ) -> Result<Pruned, ServiceError> {
        if older_than.is_zero() {
            return Err(ValidationError::Missing {
                field: "older_than",
            }
            .into());
        }
        let _w = self.core.writer.lock().unwrap();
        let cutoff = now().saturating_sub(older_than.as_secs());
        let (mut batch, pruned) = self.prune_batch(cutoff)?;
        self.core.audit(
            &mut batch,
            actor,
            "history.clear",
            "history".into(),
            None,
            to_json(&serde_json::json!({
                "older_than_secs": older_than.as_secs(),
                "sessions_removed": pruned.sessions,
                "auth_attempts_removed": pruned.auth_attempts,
            })),
        )?;
        self.core.commit(batch)?;
        Ok(pruned)
    }
}

/// Turns tunnel events into session records. One per agent; its state is the open sessions by
/// device key.
pub struct Recorder {
    svc: Arc<History>,
    open: HashMap<PublicKey, StoredSession>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("open", &self.open.len())
            .finish()
    }
}

impl Recorder {
    /// A recorder; closes the sessions a previous agent left open (see the module docs).
    pub fn start(svc: Arc<History>, at: SystemTime) -> Result<Recorder, ServiceError> {
        let n = svc.close_stale_sessions(at)?;
        if n > 0 {
            tracing::info!(
                sessions = n,
                "sessions left open by the previous agent closed as agent-stopped"
            );
        }
        Ok(Recorder {
            svc,
            open: HashMap::new(),
        })
    }

    /// Records one event.
    pub fn on_event(&mut self, ev: SessionEvent) -> Result<(), ServiceError> {
        match ev {
            SessionEvent::Connected { key, endpoint, at } => {
                // A Connected while open (should not happen): the old one ended unseen.
                if let Some(mut old) = self.open.remove(&key) {
                    self.svc.close_session(&mut old, EndReason::Idle, at)?;
                }
                if let Some(s) = self.svc.open_session(&key, endpoint, at)? {
                    self.open.insert(key, s);
                }
            }
            SessionEvent::Disconnected { key, reason, at } => {
                if let Some(mut s) = self.open.remove(&key) {
                    self.svc.close_session(&mut s, reason, at)?;
                }
            }
            SessionEvent::EndpointChanged { key, to, at } => {
                if let Some(s) = self.open.get_mut(&key) {
                    self.svc.session_endpoint(s, to, at)?;
                }
            }
            SessionEvent::AuthFailed {
                source,
                key,
                reason,
                at,
            } => self.svc.record_auth_attempt(source, key, reason, at)?,
        }
        Ok(())
    }

    /// Closes every open session (at shutdown) with `reason`.
    pub fn close_all(&mut self, reason: EndReason, at: SystemTime) -> Result<(), ServiceError> {
        for (_, mut s) in self.open.drain() {
            self.svc.close_session(&mut s, reason, at)?;
        }
        Ok(())
    }

    /// Sessions open now.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

/// The recorder's thread: records each event from `events` (synced store writes, so not on
/// the reactor), prunes to `retention` at start and every [`PRUNE_INTERVAL`], and when the
/// sender hangs up (agent shutdown) closes the open sessions as `agent-stopped`.
pub fn run_recorder(svc: Arc<History>, events: mpsc::Receiver<SessionEvent>, retention: Duration) {
    let prune = |svc: &History| match svc.prune_history(retention) {
        Ok(p) if p.sessions + p.auth_attempts > 0 => {
            tracing::info!(?p, "history pruned to its retention")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "history pruning failed; retrying later"),
    };
    let mut rec = match Recorder::start(svc.clone(), SystemTime::now()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the session recorder; sessions are not recorded");
            return;
        }
    };
    prune(&svc);
    let mut next_prune = std::time::Instant::now() + PRUNE_INTERVAL;
    loop {
        let wait = next_prune.saturating_duration_since(std::time::Instant::now());
        match events.recv_timeout(wait) {
            Ok(ev) => {
                if let Err(e) = rec.on_event(ev.clone()) {
                    tracing::warn!(error = %e, ?ev, "cannot record a session event");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                prune(&svc);
                next_prune = std::time::Instant::now() + PRUNE_INTERVAL;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if let Err(e) = rec.close_all(EndReason::AgentStopped, SystemTime::now()) {
        tracing::warn!(error = %e, "cannot close the open sessions at shutdown");
    }
}

#[cfg(test)]
mod tests;
