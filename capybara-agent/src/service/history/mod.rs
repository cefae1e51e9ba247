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
//! | `kicked` | `capybara kick USER` (every device of the user) or `capybara kick --connection ID` (that device) ended it |
//! | `removed` | the device or its user was removed |
//! | `agent-stopped` | the agent stopped with the session open (closed at shutdown), or was killed (closed by the next start, see below) |
//!
//! Its endpoint is the source `ip:port` of the handshake; each later change (roaming, NAT
//! rebinding) is appended with its time.
//!
//! ## Proxy sessions (Shadowsocks, VLESS)
//! A proxy client opens a TCP connection per destination, often many short ones, so a session
//! is not a connection: a user's session by a proxy protocol opens with its first connection
//! (when it has none open and no session) and ends [`PROXY_SESSION_IDLE`] after its last
//! connection closed (`idle`, the end being that last close; a policy hold cuts the connections
//! and the session then goes idle, as a held device's does), at once on `kick` (`kicked`, also
//! while it has no connection open) or the identity's removal (`removed`): the connection
//! registry reports those cuts ([`SessionEvent::ProxyEnded`]) before the connections end. Its device is the
//! protocol's name, it has no key and no tunnel address, its endpoints are the client addresses
//! seen (each new one appended), and its bytes are the kernel counters of the identity's line
//! (the upstream sockets' IP bytes: `crate::proxy`), read the same way as a device's.
//!
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
//! Anyone can send a handshake with a bad MAC from any (spoofed) address, so failed
//! handshakes are **counted per source prefix**, never recorded one by one. The tunnel counts
//! them per /24 (IPv4) or /64 (IPv6) and reason in a fixed table (`tunnel::auth_table`:
//! 4 096 slots, O(1) per packet) and reports the first failure of a prefix at once (at most 8
//! per 10 s) and every 10 s the counts since (the 8 prefixes with most failures, the rest
//! summed under `0.0.0.0/0` / `::/0`): at most 24 reports per 10 s whatever the flood. Each
//! report is one [`AuthAttempt`]: `prefix`, `count`, `first_seen`, `at` (the last failure),
//! `source` (the last source, a sample), the last key claimed, the reason. Records written
//! before counting existed read as `count` 1 with no prefix.
//!
//! The daemon hands them to the recorder over a **bounded** queue of [`AUTH_QUEUE`] reports
//! ([`recorder_channel`]); a report that finds it full is dropped and counted
//! ([`RecorderSender::auth_dropped`], logged at most once a minute by the recorder and shown in
//! `capybara health` as the `history` component's detail, without making it unhealthy). The
//! recorder writes the reports it finds queued as **one batch, not synced**: they survive the
//! agent being killed (the write is in RocksDB's WAL in the page cache) and are on disk with the
//! next synced write of anything (every acknowledged change syncs) or when RocksDB flushes;
//! a power loss can lose the last seconds of auth attempts, never an acknowledged change or a
//! session. Sessions come from authenticated peers only and keep their own unbounded queue and
//! synced writes.
//!
//! Store growth under a flood is therefore at most 24 records per 10 s (about 250 bytes each
//! as JSON: ≈ 36 KB a minute, ≈ 52 MB a day, before RocksDB's compression), measured by
//! `cargo xtask bench` (`auth_flood_store_bytes_per_min`).
//!
//! ## Ids
//! A session's id ([`SessionId`]) is its store key in URL-safe form: `<start ns as 16 hex
//! digits>-<peer id as 8>`, one to one with the key and converted in O(1) either way (no table
//! to keep in step). While the session is open it is its **connection's id**: the recorder
//! enters it in the shared table of open sessions ([`LiveSessions`]) when it writes the opening
//! record and takes it out when it writes the close, and `capybara connections` /
//! `ListConnections` show it, `Kick` takes it. The same id is in `history show`, `search` and
//! `export` (`Session.id` in the API). Records written before ids existed hold the key in `id`;
//! they read back as the same id.
//!
//! ## Keys and retention
//! Sessions are `session/<start ns>/<peer id>` and auth attempts `auth/<ns>/<n>` in the
//! `sessions` family (see `store::keys`): time-ordered, so pruning is a scan of the oldest.
//! [`History::prune_history`] deletes closed sessions that ended, and auth attempts made,
//! before a cut-off; the agent runs it at start and every [`PRUNE_INTERVAL`] with its retention
//! (`--history-retention`, default 90 days); `capybara history clear --older-than D` runs it
//! on demand (audited as `history.clear`). Open sessions are never pruned. Pruning **streams**:
//! it walks the keys older than the cut-off with an iterator and deletes them in batches of
//! [`PRUNE_BATCH`], so its memory does not grow with the history (`history.clear`'s audit
//! record goes with its last batch).
//!
//! ## Pages
//! Queries are **paged** ([`History::history_page`]): at most `page_size` sessions and
//! `page_size` auth attempts per page (0 = [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`]),
//! newest first, and a token for the next page ([`HistoryCursor`]: where each list stopped),
//! empty on the last. A page walks the store from the token with an iterator; with a filter
//! it looks at no more than [`MAX_SCANNED`] records per list before it returns (perhaps a short
//! page, with a token), so one call's time and memory are bounded whatever the history holds.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use capybara_common::peer::PeerId;
use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, now, to_json},
    directory::Directory,
    domain::{Actor, Protocol, PublicKey, SessionId, UserName, ValidationError},
    live::LiveSessions,
    monitor::Traffic,
};
use crate::{
    net::Cidr,
    store::{Batch, Cf, Walk, keys},
};

/// How often the agent prunes the history to its retention.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Default retention of sessions and auth attempts.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 86_400);

/// Records deleted per batch when pruning.
pub const PRUNE_BATCH: usize = 1000;

/// A page's size when the caller gives none (0).
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// The largest page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Records a page looks at per list, matching the filter or not, before it returns.
pub const MAX_SCANNED: usize = 100_000;

/// A proxy session ends this long after its user's last connection by that protocol closed
/// (see the module docs): a client between two page loads keeps its session.
pub const PROXY_SESSION_IDLE: Duration = Duration::from_secs(60);

/// Auth reports queued for the recorder before new ones are dropped (and counted).
pub const AUTH_QUEUE: usize = 1024;

/// The recorder writes queued auth reports at least this often.
const AUTH_DRAIN: Duration = Duration::from_secs(1);

/// At most one log line about dropped auth reports per this period.
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);

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
    /// Its id (the connection id `capybara connections` showed while it was open); its store
    /// key is [`SessionId::key`].
    pub id: SessionId,
    /// The user (a name: the user may since have been removed).
    pub user: String,
    /// The device; for a proxy protocol's session, the protocol's name.
    pub device: String,
    /// The dataplane peer id it had (a proxy identity's id for a proxy protocol).
    pub peer_id: u32,
    /// How it connected.
    #[serde(default)]
    pub protocol: Protocol,
    /// The device's public key; `None` for a proxy protocol.
    pub public_key: Option<PublicKey>,
    /// The device's tunnel addresses; `None` for a proxy protocol.
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 tunnel address; `None` for a proxy protocol.
    pub ipv6: Option<Ipv6Addr>,
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

#[cfg(test)]
impl Session {
    /// A test session: alice's laptop (peer 2, key `[7; 32]`), from `start` to `end`, from
    /// 192.0.2.1:5, no traffic, ended as `reason`.
    pub(crate) fn sample(start: u64, end: u64, reason: EndReason) -> Session {
        Session {
            id: crate::service::domain::SessionId {
                start_ns: 1,
                peer: 2,
            },
            user: "alice".into(),
            device: "laptop".into(),
            peer_id: 2,
            protocol: Protocol::Wireguard,
            public_key: Some(crate::service::domain::PublicKey([7; 32])),
            ipv4: Some("10.99.0.2".parse().unwrap()),
            ipv6: Some("fd99::2".parse().unwrap()),
            start,
            end: Some(end),
            endpoints: vec![EndpointSeen {
                at: start,
                endpoint: "192.0.2.1:5".parse().unwrap(),
            }],
            traffic: Counters::default(),
            reason: Some(reason),
        }
    }
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

/// Failed handshakes from one source prefix, counted (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthAttempt {
    /// The last of them, Unix seconds.
    pub at: u64,
    /// Where the last came from (a sample of the prefix).
    pub source: SocketAddr,
    /// The last key claimed, if readable (WireGuard only).
    pub public_key: Option<PublicKey>,
    /// The protocol of the endpoint that refused it.
    #[serde(default)]
    pub protocol: Protocol,
    /// `unknown-key`, `bad-mac`, `undecryptable` or `rejected`.
    pub reason: String,
    /// How many (1 for records written before counting).
    #[serde(default = "one")]
    pub count: u64,
    /// The sources' /24 or /64; `0.0.0.0/0` or `::/0` for the prefixes not reported one by
    /// one; `None` for records written before counting.
    #[serde(default)]
    pub prefix: Option<Cidr>,
    /// The first of them, Unix seconds (`at` for records written before counting).
    #[serde(default)]
    pub first_seen: u64,
}

fn one() -> u64 {
    1
}

impl AuthAttempt {
    /// Whether the record is about addresses in `net`: its sample source is, or its prefix
    /// (not the catch-all `/0`) overlaps `net`.
    pub fn touches(&self, net: &Cidr) -> bool {
        net.contains(self.source.ip())
            || self.prefix.is_some_and(|p| {
                p.prefix_len() > 0
                    && p.is_ipv4() == net.is_ipv4()
                    && (p.contains(net.addr()) || net.contains(p.addr()))
            })
    }
}

/// The /24 or /64 of `ip`.
pub fn prefix_of(ip: IpAddr) -> Option<Cidr> {
    match ip {
        IpAddr::V4(a) => Cidr::v4(Ipv4Addr::from(u32::from(a) & 0xffff_ff00), 24).ok(),
        IpAddr::V6(a) => Cidr::v6(Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1)), 64).ok(),
    }
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
    /// A proxy endpoint authenticated a connection of a user's identity.
    ProxyOpened {
        /// The identity's id.
        id: PeerId,
        /// Its user.
        user: String,
        /// Its protocol.
        protocol: Protocol,
        /// The client's address.
        source: SocketAddr,
        /// The identity's kernel counters as the connection was authenticated, before it
        /// carried a byte: a session it opens counts from these. Read by the endpoint's event
        /// sink as it reports (the recorder runs later, after traffic may have passed).
        base: Counters,
        /// When.
        at: SystemTime,
    },
    /// A proxied connection ended (closed, or cut: the cut's cause comes as
    /// [`SessionEvent::ProxyEnded`] before it).
    ProxyClosed {
        /// The identity's id.
        id: PeerId,
        /// When.
        at: SystemTime,
    },
    /// A proxy identity's session ends now, with its connections if any are open: `kick`
    /// (`kicked`) or the identity's removal (`removed`).
    ProxyEnded {
        /// The identity's id.
        id: PeerId,
        /// Why.
        reason: EndReason,
        /// When.
        at: SystemTime,
    },
    /// A proxy endpoint refused a connection (wrong credential, malformed header, a held
    /// user). Each is recorded, as a count of 1 for its source's prefix: unlike a handshake,
    /// it took a TCP connection (and a TLS handshake for VLESS), so the source is not spoofed.
    ProxyAuthFailed {
        /// The endpoint's protocol.
        protocol: Protocol,
        /// Where it came from.
        source: SocketAddr,
        /// Why, e.g. `unknown-credential`.
        reason: &'static str,
        /// When.
        at: SystemTime,
    },
    /// The first failed handshake of a source prefix in an interval (rate-limited by the
    /// tunnel): one record, count 1, its prefix the source's /24 or /64.
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
    /// Failed handshakes of one prefix counted since its last report.
    AuthFailures {
        /// The /24 or /64 (`/0` for the rest).
        prefix: Cidr,
        /// The last source.
        sample: SocketAddr,
        /// The last key claimed.
        key: Option<PublicKey>,
        /// Why, e.g. `bad-mac`.
        reason: &'static str,
        /// How many.
        count: u64,
        /// The first.
        first: SystemTime,
        /// The last.
        last: SystemTime,
    },
}

impl SessionEvent {
    /// The auth record of an auth event; `None` for session events.
    pub fn auth_attempt(&self) -> Option<AuthAttempt> {
        match self {
            SessionEvent::AuthFailed {
                source,
                key,
                reason,
                at,
            } => Some(AuthAttempt {
                at: secs(*at),
                source: *source,
                public_key: *key,
                protocol: Protocol::Wireguard,
                reason: (*reason).to_owned(),
                count: 1,
                prefix: prefix_of(source.ip()),
                first_seen: secs(*at),
            }),
            SessionEvent::AuthFailures {
                prefix,
                sample,
                key,
                reason,
                count,
                first,
                last,
            } => Some(AuthAttempt {
                at: secs(*last),
                source: *sample,
                public_key: *key,
                protocol: Protocol::Wireguard,
                reason: (*reason).to_owned(),
                count: *count,
                prefix: Some(*prefix),
                first_seen: secs(*first),
            }),
            SessionEvent::ProxyAuthFailed {
                protocol,
                source,
                reason,
                at,
            } => Some(AuthAttempt {
                at: secs(*at),
                source: *source,
                public_key: None,
                protocol: *protocol,
                reason: (*reason).to_owned(),
                count: 1,
                prefix: prefix_of(source.ip()),
                first_seen: secs(*at),
            }),
            _ => None,
        }
    }

    /// When an auth event happened (its last failure); `None` for session events.
    fn auth_at(&self) -> Option<SystemTime> {
        match self {
            SessionEvent::AuthFailed { at, .. } | SessionEvent::ProxyAuthFailed { at, .. } => {
                Some(*at)
            }
            SessionEvent::AuthFailures { last, .. } => Some(*last),
            _ => None,
        }
    }
}

/// What to list.
#[derive(Clone, Debug, Default)]
pub struct HistoryQuery {
    /// Only this user's sessions.
    pub user: Option<UserName>,
    /// Only sessions with an endpoint or tunnel address inside, and auth attempts from it.
    pub ip: Option<Cidr>,
    /// At most this many of each in a page, newest first; `None` (or 0) =
    /// [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`].
    pub limit: Option<usize>,
    /// Also auth attempts (none when `user` is set: they belong to no user).
    pub include_auth: bool,
    /// Only auth attempts (no sessions); implies `include_auth`.
    pub auth_only: bool,
    /// Where the previous page stopped; `None` = the first page.
    pub page_token: Option<HistoryCursor>,
}

/// Where a page of each list stopped: the next page starts after it. Its text form is the
/// API's opaque `page_token`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryCursor {
    /// Sessions.
    pub sessions: Pos,
    /// Auth attempts.
    pub auth: Pos,
}

/// A position in one list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Pos {
    /// Not started.
    #[default]
    Start,
    /// After this key (newest first: older keys come next).
    After(String),
    /// Nothing more.
    Done,
}

impl HistoryCursor {
    /// Whether both lists are done (no next page).
    pub fn is_done(&self) -> bool {
        self.sessions == Pos::Done && self.auth == Pos::Done
    }

    /// The token's text: `h1;<sessions>;<auth>`, each empty (start), `-` (done) or a key.
    pub fn to_token(&self) -> String {
        let p = |p: &Pos| match p {
            Pos::Start => String::new(),
            Pos::After(k) => k.clone(),
            Pos::Done => "-".into(),
        };
        format!("h1;{};{}", p(&self.sessions), p(&self.auth))
    }

    /// Reads a token made by [`HistoryCursor::to_token`]; `None` if it is not one.
    pub fn from_token(token: &str) -> Option<HistoryCursor> {
        let mut parts = token.strip_prefix("h1;")?.split(';');
        let p = |s: &str, prefix: &str| match s {
            "" => Some(Pos::Start),
            "-" => Some(Pos::Done),
            k if k.starts_with(prefix)
                && k.len() <= 64
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'/') =>
            {
                Some(Pos::After(k.to_owned()))
            }
            _ => None,
        };
        let sessions = p(parts.next()?, keys::SESSIONS_PREFIX)?;
        let auth = p(parts.next()?, keys::AUTH_PREFIX)?;
        if parts.next().is_some() {
            return None;
        }
        Some(HistoryCursor { sessions, auth })
    }
}

/// The page size for a requested one: 0 or `None` is the default, anything over the cap is
/// the cap.
pub fn page_size(requested: Option<usize>) -> usize {
    match requested {
        None | Some(0) => DEFAULT_PAGE_SIZE,
        Some(n) => n.min(MAX_PAGE_SIZE),
    }
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
        self.ipv4.is_some_and(|a| net.contains(IpAddr::V4(a)))
            || self.ipv6.is_some_and(|a| net.contains(IpAddr::V6(a)))
            || self.endpoints.iter().any(|e| net.contains(e.endpoint.ip()))
    }
}

/// The history feature.
#[derive(Debug)]
pub struct History {
    core: Arc<Core>,
    dir: Arc<Directory>,
    live: Arc<LiveSessions>,
}

impl History {
    /// The feature over the shared core and directory; it keeps `live` (each device's open
    /// session) up to date as sessions open and close.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>, live: Arc<LiveSessions>) -> History {
        History { core, dir, live }
    }

    /// The kernel counters of peer `id` (a device or a proxy identity).
    pub fn counters(&self, id: u32) -> Result<Counters, ServiceError> {
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
            id: SessionId {
                start_ns: unix_nanos(at),
                peer: peer.id,
            },
            user: peer.user.to_string(),
            device: peer.device.to_string(),
            peer_id: peer.id,
            protocol: Protocol::Wireguard,
            public_key: Some(peer.public_key),
            ipv4: Some(peer.ipv4),
            ipv6: Some(peer.ipv6),
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
        self.core.store.put(Cf::Sessions, &s.session.id.key(), &s)?;
        self.live.opened(s.session.id, Some(peer.public_key));
        self.notify_session(&s.session, at);
        Ok(Some(s))
    }

    /// Opens the session of proxy identity `id` of `user` by `protocol` (see the module docs).
    pub fn open_proxy_session(
        &self,
        id: PeerId,
        user: &str,
        protocol: Protocol,
        source: SocketAddr,
        base: Counters,
        at: SystemTime,
    ) -> Result<StoredSession, ServiceError> {
        let start = secs(at);
        let s = Session {
            id: SessionId {
                start_ns: unix_nanos(at),
                peer: id,
            },
            user: user.to_owned(),
            device: protocol.as_str().to_owned(),
            peer_id: id,
            protocol,
            public_key: None,
            ipv4: None,
            ipv6: None,
            start,
            end: None,
            endpoints: vec![EndpointSeen {
                at: start,
                endpoint: source,
            }],
            traffic: Counters::default(),
            reason: None,
        };
        let s = StoredSession { session: s, base };
        self.core.store.put(Cf::Sessions, &s.session.id.key(), &s)?;
        self.live.opened(s.session.id, None);
        // Sessions started, for the usage rollups (which name an identity by this key).
        if let Ok(name) = UserName::parse("user", user) {
            self.live
                .count_started(super::proxies::usage_key(&name, protocol));
        }
        self.notify_session(&s.session, at);
        Ok(s)
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
        self.core
            .store
            .put(Cf::Sessions, &s.session.id.key(), &*s)?;
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
        self.core
            .store
            .put(Cf::Sessions, &s.session.id.key(), &*s)?;
        self.live.closed(s.session.id);
        self.notify_session(&s.session, at);
        Ok(())
    }

    /// Hands `user-connect` (an open session) or `user-disconnect` (a closed one) to the
    /// outbox, once its record is written (see the module docs). A failure is logged: the
    /// session record stands.
    fn notify_session(&self, s: &Session, at: SystemTime) {
        use super::notify::{Notification, NotifyKind};
        let endpoint = s.endpoints.last().map(|e| e.endpoint);
        let mut data = serde_json::json!({
            "device": s.device,
            "session": s.id.to_string(),
            "endpoint": endpoint,
            "vpn_ipv6": s.ipv6,
        });
        let kind = match s.reason {
            None => NotifyKind::UserConnect,
            Some(reason) => {
                let extra = serde_json::json!({
                    "reason": reason.as_str(),
                    "bytes_in": s.traffic.rx.bytes,
                    "bytes_out": s.traffic.tx.bytes,
                    "packets_in": s.traffic.rx.packets,
                    "packets_out": s.traffic.tx.packets,
                    "started_at": s.start,
                    "duration_s": s.end.unwrap_or(s.start).saturating_sub(s.start),
                });
                if let (Some(d), serde_json::Value::Object(e)) = (data.as_object_mut(), extra) {
                    d.extend(e);
                }
                NotifyKind::UserDisconnect
            }
        };
        let n = Notification::device(
            kind,
            at,
            &s.user,
            endpoint.map(|e| e.ip()),
            s.ipv4.map(IpAddr::V4),
            s.protocol,
            data,
        );
        if let Err(e) = self.core.notify(n) {
            tracing::warn!(error = %e, session = %s.id, event = %kind, "cannot hand a session event to the webhook outbox");
        }
    }

    /// Records a failed handshake (one record, synced: see [`History::record_auth_attempts`]
    /// for the recorder's path).
    pub fn record_auth_attempt(
        &self,
        source: SocketAddr,
        key: Option<PublicKey>,
        reason: &str,
        at: SystemTime,
    ) -> Result<(), ServiceError> {
        let a = AuthAttempt {
            protocol: Default::default(),
            at: secs(at),
            source,
            public_key: key,
            reason: reason.to_owned(),
            count: 1,
            prefix: prefix_of(source.ip()),
            first_seen: secs(at),
        };
        let written = self.record_auth_attempts(&[(unix_nanos(at), a)])?;
        self.core.store.sync(written)?;
        Ok(())
    }

    /// Writes auth records (each with its time in Unix nanoseconds, for its key) in one batch,
    /// **not synced** (see the module docs); returns the position to sync through.
    pub fn record_auth_attempts(
        &self,
        records: &[(u64, AuthAttempt)],
    ) -> Result<crate::store::Written, ServiceError> {
        let mut batch = Batch::default();
        let mut last: Option<(u64, u32)> = None;
        for (ns, a) in records {
            // Two records in the same nanosecond get distinct keys.
            let mut n = match last {
                Some((l, n)) if l == *ns => n + 1,
                _ => 0,
            };
            let key = loop {
                let k = keys::auth_attempt(*ns, n);
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
            last = Some((*ns, n));
            batch.put(Cf::Sessions, &key, a)?;
        }
        Ok(self.core.store.write(batch)?)
    }

    /// Sessions still open in the store (at start-up: left by an agent that did not stop
    /// cleanly). Walks the sessions; keeps only the open ones in memory.
    pub fn open_sessions(&self) -> Result<Vec<StoredSession>, ServiceError> {
        let mut open = Vec::new();
        self.core.store.walk::<StoredSession>(
            Cf::Sessions,
            keys::SESSIONS_PREFIX,
            Walk::Forward,
            None,
            |_, s| {
                if s.session.end.is_none() {
                    open.push(s);
                }
                true
            },
        )?;
        Ok(open)
    }

    /// Closes every session left open (see the module docs): reason `agent-stopped`, end
    /// `at`, bytes from the pinned counters if the peer id still belongs to the same key.
    pub fn close_stale_sessions(&self, at: SystemTime) -> Result<usize, ServiceError> {
        let stale = self.open_sessions()?;
        let same_key: HashMap<u32, PublicKey> = self
            .dir
            .with_records(|recs| recs.map(|r| (r.peer.id, r.peer.public_key)).collect());
        for mut s in stale.iter().cloned() {
            let still_same = match s.session.protocol {
                Protocol::Wireguard => {
                    s.session.public_key.as_ref() == same_key.get(&s.session.peer_id)
                }
                // A proxy identity's id is handed out again only after its removal, which
                // closes its session first (as `removed`): an open one is still its own.
                _ => true,
            };
            if still_same {
                self.close_session(&mut s, EndReason::AgentStopped, at)?;
            } else {
                let x = &mut s.session;
                x.end = Some(secs(at).max(x.start));
                x.reason = Some(EndReason::AgentStopped);
                self.core.store.put(Cf::Sessions, &s.session.id.key(), &s)?;
                self.live.closed(s.session.id);
                self.notify_session(&s.session, at);
            }
        }
        Ok(stale.len())
    }

    /// The first page of sessions and auth attempts matching `q`, newest first (see
    /// [`History::history_page`] for the next ones).
    pub fn history(&self, q: &HistoryQuery) -> Result<HistoryPage, ServiceError> {
        Ok(self.history_page(q)?.0)
    }

    /// One page of sessions and auth attempts matching `q`, newest first, from
    /// `q.page_token`, and where the next page starts (`None` on the last page). See the module
    /// docs.
    pub fn history_page(
        &self,
        q: &HistoryQuery,
    ) -> Result<(HistoryPage, Option<HistoryCursor>), ServiceError> {
        let size = page_size(q.limit);
        let start = q.page_token.clone().unwrap_or_default();
        let user = q.user.as_ref().map(UserName::as_str);
        let (sessions, s_pos) = if q.auth_only {
            (Vec::new(), Pos::Done)
        } else {
            self.page_of::<StoredSession, Session>(
                keys::SESSIONS_PREFIX,
                &start.sessions,
                size,
                |s| {
                    let s = s.session;
                    (user.is_none_or(|u| s.user == u) && q.ip.as_ref().is_none_or(|n| s.touches(n)))
                        .then_some(s)
                },
            )?
        };
        let (auth_attempts, a_pos) = if (q.include_auth || q.auth_only) && q.user.is_none() {
            self.page_of::<AuthAttempt, AuthAttempt>(keys::AUTH_PREFIX, &start.auth, size, |a| {
                q.ip.as_ref().is_none_or(|n| a.touches(n)).then_some(a)
            })?
        } else {
            (Vec::new(), Pos::Done)
        };
        let next = HistoryCursor {
            sessions: s_pos,
            auth: a_pos,
        };
        Ok((
            HistoryPage {
                sessions,
                auth_attempts,
            },
            (!next.is_done()).then_some(next),
        ))
    }

    /// Up to `size` records of one list newest first from `from`, those `keep` maps to
    /// `Some`, looking at no more than [`MAX_SCANNED`]; and where the list stopped.
    fn page_of<T: serde::de::DeserializeOwned, U>(
        &self,
        prefix: &str,
        from: &Pos,
        size: usize,
        mut keep: impl FnMut(T) -> Option<U>,
    ) -> Result<(Vec<U>, Pos), ServiceError> {
        let after = match from {
            Pos::Done => return Ok((Vec::new(), Pos::Done)),
            Pos::Start => None,
            Pos::After(k) => Some(k.as_str()),
        };
        let mut out = Vec::new();
        let mut scanned = 0usize;
        let mut last: Option<String> = None;
        // Set once a record past the page was seen: the list goes on.
        let mut more = false;
        self.core
            .store
            .walk::<T>(Cf::Sessions, prefix, Walk::Backward, after, |k, v| {
                if out.len() >= size || scanned >= MAX_SCANNED {
                    more = true;
                    return false;
                }
                scanned += 1;
                last = Some(k.to_owned());
                if let Some(u) = keep(v) {
                    out.push(u);
                }
                true
            })?;
        let pos = match (more, last) {
            (true, Some(k)) => Pos::After(k),
            _ => Pos::Done,
        };
        Ok((out, pos))
    }

    /// Streams through the history older than `cutoff` (Unix seconds), deleting closed sessions
    /// that ended before it and auth attempts made before it, [`PRUNE_BATCH`] keys a batch.
    /// Full batches are written as they fill; `finish` gets the last one (perhaps empty) and
    /// the totals, to add to and commit.
    fn prune_streaming(
        &self,
        cutoff: u64,
        finish: impl FnOnce(Batch, Pruned) -> Result<(), ServiceError>,
    ) -> Result<Pruned, ServiceError> {
        let cutoff_ns = cutoff.saturating_mul(1_000_000_000);
        let mut pruned = Pruned::default();
        // Sessions that ended before the cut-off started before it: keys sort by start.
        let session_end = keys::session(cutoff_ns, 0);
        let auth_end = keys::auth_attempt(cutoff_ns, 0);
        let mut batch = Batch::default();
        let mut in_batch = 0usize;
        for (prefix, end, sessions) in [
            (keys::SESSIONS_PREFIX, &session_end, true),
            (keys::AUTH_PREFIX, &auth_end, false),
        ] {
            let mut after: Option<String> = None;
            loop {
                let mut full = false;
                let mut last_key = None;
                self.core.store.walk::<serde_json::Value>(
                    Cf::Sessions,
                    prefix,
                    Walk::Forward,
                    after.as_deref(),
                    |k, v| {
                        if k >= end.as_str() {
                            return false;
                        }
                        last_key = Some(k.to_owned());
                        let old = if sessions {
                            v.get("end")
                                .and_then(serde_json::Value::as_u64)
                                .is_some_and(|e| e < cutoff)
                        } else {
                            true
                        };
                        if old {
                            batch.delete(Cf::Sessions, k);
                            in_batch += 1;
                            if sessions {
                                pruned.sessions += 1;
                            } else {
                                pruned.auth_attempts += 1;
                            }
                        }
                        if in_batch >= PRUNE_BATCH {
                            full = true;
                            return false;
                        }
                        true
                    },
                )?;
                if !full {
                    break;
                }
                // Deletes need no sync of their own: the last batch's commit syncs them all.
                let _ = self.core.store.write(std::mem::take(&mut batch))?;
                in_batch = 0;
                after = last_key;
            }
        }
        finish(batch, pruned)?;
        Ok(pruned)
    }

    /// Retention: deletes what ended more than `retention` ago (the agent's own pruning, not
    /// an API change, so not audited).
    pub fn prune_history(&self, retention: Duration) -> Result<Pruned, ServiceError> {
        let cutoff = now().saturating_sub(retention.as_secs());
        self.prune_streaming(cutoff, |batch, _| Ok(self.core.store.commit(batch)?))
    }

    /// `history clear --older-than D`: like [`History::prune_history`], audited as
    /// `history.clear` in its last batch.
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
        self.prune_streaming(cutoff, |mut batch, pruned| {
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
            self.core.commit(batch)
        })
    }
}

/// Turns tunnel and proxy events into session records. One per agent; its state is the open
/// sessions by device key and by proxy identity.
pub struct Recorder {
    svc: Arc<History>,
    open: HashMap<PublicKey, StoredSession>,
    proxies: HashMap<PeerId, ProxyOpen>,
}

/// A proxy identity's open session: its connections open now, and since when it has none.
#[derive(Debug)]
struct ProxyOpen {
    session: StoredSession,
    conns: usize,
    idle_since: Option<SystemTime>,
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
            proxies: HashMap::new(),
        })
    }

    /// Records one event.
    pub fn on_event(&mut self, ev: SessionEvent) -> Result<(), ServiceError> {
        match ev.clone() {
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
            SessionEvent::ProxyOpened {
                id,
                user,
                protocol,
                source,
                base,
                at,
            } => match self.proxies.get_mut(&id) {
                Some(p) => {
                    p.conns += 1;
                    p.idle_since = None;
                    if p.session
                        .session
                        .endpoints
                        .iter()
                        .all(|e| e.endpoint.ip() != source.ip())
                    {
                        self.svc.session_endpoint(&mut p.session, source, at)?;
                    }
                }
                None => {
                    let session = self
                        .svc
                        .open_proxy_session(id, &user, protocol, source, base, at)?;
                    self.proxies.insert(
                        id,
                        ProxyOpen {
                            session,
                            conns: 1,
                            idle_since: None,
                        },
                    );
                }
            },
            SessionEvent::ProxyClosed { id, at } => {
                // None: the session already ended (a kick or removal, reported before its
                // connections' ends).
                let Some(p) = self.proxies.get_mut(&id) else {
                    return Ok(());
                };
                p.conns = p.conns.saturating_sub(1);
                if p.conns == 0 {
                    p.idle_since = Some(at);
                }
            }
            SessionEvent::ProxyEnded { id, reason, at } => {
                if let Some(mut p) = self.proxies.remove(&id) {
                    self.svc.close_session(&mut p.session, reason, at)?;
                }
            }
            SessionEvent::AuthFailed { .. }
            | SessionEvent::AuthFailures { .. }
            | SessionEvent::ProxyAuthFailed { .. } => {
                self.on_auth(std::slice::from_ref(&ev))?;
            }
        }
        Ok(())
    }

    /// Closes the proxy sessions whose last connection closed [`PROXY_SESSION_IDLE`] before
    /// `now`, as `idle`, ending when that connection closed.
    pub fn expire_proxy_sessions(&mut self, now: SystemTime) -> Result<(), ServiceError> {
        let idle: Vec<PeerId> = self
            .proxies
            .iter()
            .filter(|(_, p)| {
                p.idle_since.is_some_and(|t| {
                    now.duration_since(t).unwrap_or_default() >= PROXY_SESSION_IDLE
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            let mut p = self.proxies.remove(&id).expect("present");
            let end = p.idle_since.unwrap_or(now);
            self.svc
                .close_session(&mut p.session, EndReason::Idle, end)?;
        }
        Ok(())
    }

    /// Records auth events in one batch, not synced (see the module docs).
    pub fn on_auth(&mut self, evs: &[SessionEvent]) -> Result<(), ServiceError> {
        let recs: Vec<(u64, AuthAttempt)> = evs
            .iter()
            .filter_map(|e| Some((unix_nanos(e.auth_at()?), e.auth_attempt()?)))
            .collect();
        let _ = self.svc.record_auth_attempts(&recs)?;
        Ok(())
    }

    /// Closes every open session (at shutdown) with `reason`.
    pub fn close_all(&mut self, reason: EndReason, at: SystemTime) -> Result<(), ServiceError> {
        for (_, mut s) in self.open.drain() {
            self.svc.close_session(&mut s, reason, at)?;
        }
        for (_, mut p) in self.proxies.drain() {
            self.svc.close_session(&mut p.session, reason, at)?;
        }
        Ok(())
    }

    /// Sessions open now.
    pub fn open_count(&self) -> usize {
        self.open.len() + self.proxies.len()
    }
}

/// The daemon's end of the recorder's queues: session events (from authenticated peers only)
/// on an unbounded queue, auth events on one of [`AUTH_QUEUE`] that drops and counts what does
/// not fit. Made by [`recorder_channel`].
#[derive(Clone, Debug)]
pub struct RecorderSender {
    sessions: mpsc::Sender<SessionEvent>,
    auth: mpsc::SyncSender<SessionEvent>,
    dropped: Arc<AtomicU64>,
}

impl RecorderSender {
    /// Queues `ev`; an auth event that finds its queue full is dropped and counted. False once
    /// the recorder is gone.
    pub fn send(&self, ev: SessionEvent) -> bool {
        if ev.auth_attempt().is_some() {
            match self.auth.try_send(ev) {
                Ok(()) => true,
                Err(mpsc::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::TrySendError::Disconnected(_)) => false,
            }
        } else {
            self.sessions.send(ev).is_ok()
        }
    }

    /// Auth reports dropped because the recorder's queue was full, since start.
    pub fn auth_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The counter behind [`RecorderSender::auth_dropped`], shared (the daemon hands it to the
    /// health feature, which shows it in `capybara health`).
    pub fn auth_drop_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

/// The recorder's end of the queues (for [`run_recorder`]).
#[derive(Debug)]
pub struct RecorderReceiver {
    sessions: mpsc::Receiver<SessionEvent>,
    auth: mpsc::Receiver<SessionEvent>,
    dropped: Arc<AtomicU64>,
}

/// The queues between the daemon and the recorder, with an auth queue of `auth_capacity`
/// ([`AUTH_QUEUE`] in the agent).
pub fn recorder_channel(auth_capacity: usize) -> (RecorderSender, RecorderReceiver) {
    let (stx, srx) = mpsc::channel();
    let (atx, arx) = mpsc::sync_channel(auth_capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    (
        RecorderSender {
            sessions: stx,
            auth: atx,
            dropped: dropped.clone(),
        },
        RecorderReceiver {
            sessions: srx,
            auth: arx,
            dropped,
        },
    )
}

/// The recorder's thread: records each session event (synced store writes, so not on the
/// reactor), the queued auth events at least every second in one unsynced batch, prunes to
/// `retention` at start and every [`PRUNE_INTERVAL`], logs dropped auth reports at most once a
/// minute, and when the sender hangs up (agent shutdown) closes the open sessions as
/// `agent-stopped`.
pub fn run_recorder(svc: Arc<History>, events: RecorderReceiver, retention: Duration) {
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
    let mut next_prune = Instant::now() + PRUNE_INTERVAL;
    let (mut logged_drops, mut last_drop_log) = (0u64, Instant::now());
    let mut drain = |rec: &mut Recorder| {
        let evs: Vec<SessionEvent> = events.auth.try_iter().take(AUTH_QUEUE).collect();
        if !evs.is_empty()
            && let Err(e) = rec.on_auth(&evs)
        {
            tracing::warn!(error = %e, n = evs.len(), "cannot record auth attempts");
        }
        let dropped = events.dropped.load(Ordering::Relaxed);
        if dropped > logged_drops && last_drop_log.elapsed() >= DROP_LOG_EVERY {
            tracing::warn!(
                dropped = dropped - logged_drops,
                total = dropped,
                "auth reports dropped: the recorder's queue was full"
            );
            (logged_drops, last_drop_log) = (dropped, Instant::now());
        }
    };
    loop {
        let wait = next_prune
            .saturating_duration_since(Instant::now())
            .min(AUTH_DRAIN);
        if let Err(e) = rec.expire_proxy_sessions(SystemTime::now()) {
            tracing::warn!(error = %e, "cannot close idle proxy sessions");
        }
        match events.sessions.recv_timeout(wait) {
            Ok(ev) => {
                if let Err(e) = rec.on_event(ev.clone()) {
                    tracing::warn!(error = %e, ?ev, "cannot record a session event");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        drain(&mut rec);
        if Instant::now() >= next_prune {
            prune(&svc);
            next_prune = Instant::now() + PRUNE_INTERVAL;
        }
    }
    drain(&mut rec);
    if let Err(e) = rec.close_all(EndReason::AgentStopped, SystemTime::now()) {
        tracing::warn!(error = %e, "cannot close the open sessions at shutdown");
    }
}

#[cfg(test)]
mod tests;
