//! IP reputation: a score per source address from what it did wrong, and automatic blocking of
//! sources over a threshold in the `auto` source list (the XDP guard drops them before any
//! handshake work) for a TTL.
//!
//! ## The score
//! Per source **address** (not per /24: one bad neighbour does not block a whole network),
//! kept in [`table::ScoreTable`] (16 384 slots, fixed memory, O(1) per event, the lowest score
//! evicted; its docs have the numbers). Each event adds its part's weight, in bad handshakes:
//!
//! | part | from | weight |
//! |---|---|---|
//! | `bad-mac` | the tunnel (`wg-udp`): an initiation whose MAC does not match our key | 1 |
//! | `unknown-key` | an initiation from a key that is no peer | 1 |
//! | `undecryptable` | an initiation whose static key cannot be decrypted | 1 |
//! | `replay` | a peer's initiation its session refused (replayed timestamp, wrong preshared key) | 1 |
//! | `flow-limit` | the kernel's flow-limit event of a device whose endpoint is the source | 0.5 |
//! | `gate-drop` | the kernel's gate-drop event of a device whose endpoint is the source | 0.25 (0.2 after rounding to tenths) |
//! | `proxy-auth` | the Shadowsocks or VLESS endpoint: a connection no user's credential opens, or whose header is not the protocol's (not a held user's) | 1 |
//!
//! The kernel's events are rate-limited per device (one per event interval), so a held or
//! limited device adds at most a fraction of a point a second. The score **halves every 10
//! minutes** ([`table::HALF_LIFE`]) since the source's first event (lazily: `score = Σ weights`
//! within a period, halved once per period that passed), so 20 bad handshakes within 10
//! minutes of a source's first are exactly 20 bad handshakes' worth.
//!
//! ## Blocking
//! When a source's score reaches the threshold (`--reputation-threshold`, default
//! [`DEFAULT_THRESHOLD`] bad handshakes' worth), the thread that counted the event (`wg-udp`,
//! or this feature's own thread for kernel events) hands it to the **blocker thread** over a
//! bounded queue ([`QUEUE`] sources; full: the source crosses again at its next event, counted)
//! and goes on: it never waits for the list change. The blocker takes every source waiting (at
//! most [`MAX_BATCH`]) and makes **one** list change for all of them, at most one change per
//! [`MIN_GAP`] (so at most 4 changes and 4 096 sources a second, never one list rebuild per
//! packet): a source in `allow` is skipped (`allow` wins over `auto`, and is never
//! auto-blocked), one already in `auto` (added by hand) is left as it is, and the rest are
//! added to `auto` until [`MAX_BLOCKED`] sources are auto-blocked (past it new ones are counted,
//! not blocked). The list flip, the blocks' expiries (`reputation/auto/<ip>` in the
//! `blocklists` family), the registry snapshot, one audit record (actor `agent`, action
//! `reputation.block`) and one `suspicious-activity` webhook event per source (`data.kind`:
//! `auto-block`, the score, its parts, the threshold, the TTL and the expiry) are one store
//! batch: a block is stored with its event or not at all, so exactly one event per block.
//! Measured end to end (the 20th bad handshake sent → a later datagram dropped by the XDP
//! guard, seen through the CLI): 93 and 142 ms (`e2e_reputation`, debug build, loaded host).
//!
//! ## Expiry
//! A block lasts `--reputation-ttl` (default [`DEFAULT_TTL`]); the blocker thread sleeps until
//! the next expiry and removes every expired source from `auto` in one change
//! (`reputation.unblock`). Expiries are stored, so they survive a restart: at start the
//! sources whose block expired while the agent was down are removed at once, and the others
//! keep their expiry. Entries an admin added to `auto` by hand have no expiry and stay. A
//! source the admin removed by hand is simply forgotten at its expiry.
//!
//! ## Switch
//! The engine is **off** until [`Reputation::set_enabled`] (the daemon's `--reputation`, or
//! `ip-intel enable`): off, events are not scored (one atomic load per event) and no new block
//! is made; blocks already made stay until their TTL.

pub mod table;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use self::table::{Crossing, ScoreTable, UNIT};
pub use self::table::{Part, Tallies, Tally};
use super::{
    ServiceError, ServiceEvent,
    core::{Core, to_json},
    directory::Directory,
    domain::{Actor, ValidationError},
    lists::Lists,
    notify::{Notification, NotifyKind},
};
use crate::{
    blocklist::{Direction, ListName, registry::ListOp},
    net::Cidr,
    store::{Batch, Cf, keys},
};

/// The default threshold, in bad handshakes' worth.
pub const DEFAULT_THRESHOLD: u32 = 20;
/// The largest threshold accepted.
pub const MAX_THRESHOLD: u32 = 1_000_000;
/// The default block TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Sources waiting for the blocker at most.
pub const QUEUE: usize = 4096;
/// Sources in one list change at most.
pub const MAX_BATCH: usize = 1024;
/// The least time between two list changes of the blocker.
pub const MIN_GAP: Duration = Duration::from_millis(250);
/// Sources auto-blocked at once at most.
pub const MAX_BLOCKED: usize = 65_536;
/// The longest the blocker sleeps without an expiry due.
const IDLE: Duration = Duration::from_secs(60);

/// The `auto` list.
fn auto_list() -> ListName {
    ListName::parse("auto").unwrap_or_else(|_| unreachable!("a valid list name"))
}

fn allow_list() -> ListName {
    ListName::parse("allow").unwrap_or_else(|_| unreachable!("a valid list name"))
}

/// A block as the store keeps it (`reputation/auto/<ip>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The source.
    pub ip: IpAddr,
    /// When it was blocked.
    pub since: SystemTime,
    /// When the block ends.
    pub until: SystemTime,
    /// Its score then (tenths of a bad handshake).
    pub score: u32,
    /// The threshold then (tenths).
    pub threshold: u32,
    /// Its parts then, by part.
    pub parts: BTreeMap<Part, Tally>,
}

/// One part of an explained score.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PartView {
    /// The part.
    pub part: Part,
    /// Its weight, in bad handshakes.
    pub weight: f64,
    /// Events counted since the source was first seen (not decayed).
    pub count: u32,
    /// Its share of the score now, in bad handshakes (decayed).
    pub points: f64,
}

/// `ip-intel score IP`: a source's score and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScoreView {
    /// The source.
    pub ip: IpAddr,
    /// Whether the engine scores and blocks.
    pub enabled: bool,
    /// The score now, in bad handshakes.
    pub score: f64,
    /// The threshold, in bad handshakes.
    pub threshold: f64,
    /// Every part (zeros for a source not tracked).
    pub parts: Vec<PartView>,
    /// The decay: the score halves once per this period.
    pub half_life: Duration,
    /// The source's first and last event, and the next halving (a tracked source only).
    pub first_seen: Option<SystemTime>,
    /// The last event.
    pub last_seen: Option<SystemTime>,
    /// The next halving.
    pub next_halving: Option<SystemTime>,
    /// The TTL a block would get now.
    pub ttl: Duration,
    /// Auto-blocked now: the block (since, until, the score and parts then).
    pub blocked: Option<Block>,
    /// In `auto` without an expiry (added by hand).
    pub in_auto_by_hand: bool,
    /// In `allow`: never auto-blocked.
    pub allowed: bool,
}

/// What the engine counted, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReputationStats {
    /// Sources auto-blocked now.
    pub blocked: u64,
    /// Blocks made since the agent started.
    pub blocks: u64,
    /// Blocks ended (expired) since the agent started.
    pub unblocks: u64,
    /// Crossings the blocker's queue could not take (the source crosses again).
    pub queue_full: u64,
    /// Crossings of sources in `allow` (not blocked).
    pub allowed: u64,
    /// Crossings not blocked because [`MAX_BLOCKED`] sources were blocked.
    pub over_cap: u64,
    /// Sources tracked in the table.
    pub tracked: u64,
    /// Slots evicted for new sources.
    pub evicted: u64,
}

/// What the blocker thread is handed.
#[derive(Debug)]
enum Msg {
    /// A source crossed the threshold.
    Crossed(Crossing),
    /// A kernel event of a device: resolved to its endpoint on the blocker thread.
    Peer { peer: u32, part: Part },
}

/// The reputation engine. See the module docs.
pub struct Reputation {
    core: Arc<Core>,
    directory: Arc<Directory>,
    lists: Arc<Lists>,
    enabled: AtomicBool,
    /// Threshold in tenths of a bad handshake.
    threshold: AtomicU32,
    /// Block TTL in milliseconds.
    ttl_ms: AtomicU64,
    /// The table's clock starts here.
    origin: Instant,
    table: Mutex<ScoreTable>,
    tx: SyncSender<Msg>,
    rx: Mutex<Option<Receiver<Msg>>>,
    /// Auto-blocked sources (the stored expiries, in memory).
    blocked: Mutex<BTreeMap<IpAddr, Block>>,
    blocks: AtomicU64,
    unblocks: AtomicU64,
    queue_full: AtomicU64,
    allowed: AtomicU64,
    over_cap: AtomicU64,
}

impl std::fmt::Debug for Reputation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reputation")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// `ip` as a one-address `Cidr`.
fn host(ip: IpAddr) -> Cidr {
    Cidr::host(ip)
}

/// IPv4-mapped IPv6 addresses as IPv4 (how the tunnel and the guard see them).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Parses the `ip` field of a score request.
pub fn parse_ip(field: &'static str, s: &str) -> Result<IpAddr, ValidationError> {
    s.trim()
        .parse::<IpAddr>()
        .map(canonical)
        .map_err(|_| ValidationError::Value {
            field,
            reason: format!("{s:?} is not an IPv4 or IPv6 address"),
        })
}

/// Validates a threshold (bad handshakes' worth).
pub fn check_threshold(field: &'static str, n: u32) -> Result<u32, ValidationError> {
    if n == 0 || n > MAX_THRESHOLD {
        return Err(ValidationError::Value {
            field,
            reason: format!("{n} is not between 1 and {MAX_THRESHOLD}"),
        });
    }
    Ok(n)
}

fn points(units: u32) -> f64 {
    f64::from(units) / f64::from(UNIT)
}

fn parts_map(parts: &Tallies) -> BTreeMap<Part, Tally> {
    Part::ALL
        .iter()
        .zip(parts)
        .filter(|(_, t)| t.count > 0)
        .map(|(p, t)| (*p, *t))
        .collect()
}

impl Reputation {
    /// The engine over the core, off, with the default threshold and TTL; reads the stored
    /// blocks and ends those that expired while the agent was down.
    pub fn new(
        core: Arc<Core>,
        directory: Arc<Directory>,
        lists: Arc<Lists>,
    ) -> Result<Reputation, ServiceError> {
        let (tx, rx) = sync_channel(QUEUE);
        let stored: Vec<(String, Block)> = core
            .store
            .scan(Cf::Blocklists, keys::REPUTATION_BLOCKS_PREFIX)?;
        let rep = Reputation {
            core,
            directory,
            lists,
            enabled: AtomicBool::new(false),
            threshold: AtomicU32::new(DEFAULT_THRESHOLD * UNIT),
            ttl_ms: AtomicU64::new(DEFAULT_TTL.as_millis() as u64),
            origin: Instant::now(),
            table: Mutex::new(ScoreTable::new()),
            tx,
            rx: Mutex::new(Some(rx)),
            blocked: Mutex::new(stored.into_iter().map(|(_, b)| (b.ip, b)).collect()),
            blocks: AtomicU64::new(0),
            unblocks: AtomicU64::new(0),
            queue_full: AtomicU64::new(0),
            allowed: AtomicU64::new(0),
            over_cap: AtomicU64::new(0),
        };
        let n = rep.expire(SystemTime::now())?;
        if n > 0 {
            tracing::info!(
                n,
                "auto-blocks that expired while the agent was down were ended"
            );
        }
        Ok(rep)
    }

    /// Turns scoring and blocking on or off (blocks already made stay until their TTL).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
        tracing::info!(on, "reputation engine");
    }

    /// Whether the engine scores and blocks.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Sets the threshold (bad handshakes' worth) and the TTL of new blocks.
    pub fn configure(&self, threshold: u32, ttl: Duration) -> Result<(), ValidationError> {
        let t = check_threshold("reputation_threshold", threshold)?;
        if ttl.is_zero() {
            return Err(ValidationError::Value {
                field: "reputation_ttl",
                reason: "must be more than 0".into(),
            });
        }
        self.threshold.store(t * UNIT, Ordering::Relaxed);
        self.ttl_ms.store(
            ttl.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
        Ok(())
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// A table time as wall time (`wall_now` is the wall time of `now`).
    fn wall(at: Duration, now: Duration, wall_now: SystemTime) -> SystemTime {
        wall_now - now.saturating_sub(at)
    }

    /// One event of `part` from `ip`: O(1) (one lock, at most four slots looked at, a
    /// `try_send` when the source crosses); never waits for the blocker. Called by the tunnel's
    /// `wg-udp` thread per failed handshake.
    pub fn on_event(&self, ip: IpAddr, part: Part) {
        if !self.enabled() {
            return;
        }
        let ip = canonical(ip);
        let now = self.now();
        let threshold = self.threshold.load(Ordering::Relaxed);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = t.record(ip, part, now, threshold) {
            match self.tx.try_send(Msg::Crossed(c)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    t.unpend(ip);
                    self.queue_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => t.unpend(ip),
            }
        }
    }

    /// A kernel event of device `peer` (a flow-limit refusal or a gate drop): scored against
    /// its endpoint's address, resolved on the blocker thread (the caller never waits).
    pub fn on_peer_event(&self, peer: u32, part: Part) {
        if !self.enabled() {
            return;
        }
        if self.tx.try_send(Msg::Peer { peer, part }).is_err() {
            self.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The endpoint address of device `peer`, if the tunnel has seen one.
    fn endpoint_of(&self, peer: u32) -> Option<IpAddr> {
        let key = self.directory.peer_by_id(peer)?.public_key;
        self.core.tunnel.endpoint(&key).map(|e| canonical(e.ip()))
    }

    /// What the engine counted.
    pub fn stats(&self) -> ReputationStats {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner()).stats();
        ReputationStats {
            blocked: self.blocked.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            blocks: self.blocks.load(Ordering::Relaxed),
            unblocks: self.unblocks.load(Ordering::Relaxed),
            queue_full: self.queue_full.load(Ordering::Relaxed),
            allowed: self.allowed.load(Ordering::Relaxed),
            over_cap: self.over_cap.load(Ordering::Relaxed),
            tracked: t.tracked as u64,
            evicted: t.evicted,
        }
    }

    /// Explains `ip`'s score: its parts, their counts, the decay, the threshold, and whether
    /// (and until when) it is blocked.
    pub fn explain(&self, ip: IpAddr) -> Result<ScoreView, ServiceError> {
        let ip = canonical(ip);
        let (now, wall_now) = (self.now(), SystemTime::now());
        let s = self
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(ip, now);
        let blocked = self
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned();
        let in_list = |name: &ListName| {
            self.core
                .plane
                .list_cidrs(Direction::Source, name)
                .is_some_and(|c| c.iter().any(|c| c.contains(ip)))
        };
        let in_auto = in_list(&auto_list());
        let parts = Part::ALL
            .iter()
            .enumerate()
            .map(|(i, p)| PartView {
                part: *p,
                weight: points(p.weight()),
                count: s.map_or(0, |s| s.parts[i].count),
                points: points(s.map_or(0, |s| s.parts[i].score)),
            })
            .collect();
        Ok(ScoreView {
            ip,
            enabled: self.enabled(),
            score: points(s.map_or(0, |s| s.score)),
            threshold: points(self.threshold.load(Ordering::Relaxed)),
            parts,
            half_life: table::HALF_LIFE,
            first_seen: s.map(|s| Self::wall(s.first_seen, now, wall_now)),
            last_seen: s.map(|s| Self::wall(s.last_seen, now, wall_now)),
            next_halving: s.map(|s| wall_now + s.next_halving.saturating_sub(now)),
            ttl: self.ttl(),
            in_auto_by_hand: in_auto && blocked.is_none(),
            blocked,
            allowed: in_list(&allow_list()),
        })
    }

    /// Whether `ip` is auto-blocked now.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&ip)
    }

    /// Auto-blocked sources in address order: up to `size` after `after`, and whether more
    /// follow.
    pub fn blocked_page(&self, after: Option<IpAddr>, size: usize) -> (Vec<Block>, bool) {
        let b = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let mut it = b
            .range((
                after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
                std::ops::Bound::Unbounded,
            ))
            .map(|(_, b)| b.clone());
        let page: Vec<Block> = it.by_ref().take(size.max(1)).collect();
        (page, it.next().is_some())
    }

    /// The next expiry, if any block is stored.
    fn next_expiry(&self) -> Option<SystemTime> {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|b| b.until)
            .min()
    }

    /// Blocks the crossed sources in one list change (see the module docs); answers the
    /// sources blocked.
    pub fn block(
        &self,
        crossed: &[Crossing],
        wall_now: SystemTime,
    ) -> Result<Vec<IpAddr>, ServiceError> {
        let forget = |ips: &mut dyn Iterator<Item = IpAddr>| {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            for ip in ips {
                t.forget(ip);
            }
        };
        if !self.enabled() {
            forget(&mut crossed.iter().map(|c| c.ip));
            return Ok(Vec::new());
        }
        let (auto, allow) = (auto_list(), allow_list());
        let _w = self.core.writer.lock().unwrap_or_else(|p| p.into_inner());
        let allowed = self
            .core
            .plane
            .list_cidrs(Direction::Source, &allow)
            .unwrap_or_default();
        let in_auto = self
            .core
            .plane
            .list_cidrs(Direction::Source, &auto)
            .unwrap_or_default();
        let ttl = self.ttl();
        let until = wall_now + ttl;
        let threshold = self.threshold.load(Ordering::Relaxed);
        let mut new: BTreeMap<IpAddr, Block> = BTreeMap::new();
        {
            let blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
            for c in crossed {
                if allowed.iter().any(|a| a.contains(c.ip)) {
                    self.allowed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(ip = %c.ip, "over the reputation threshold, but in the allow list");
                    continue;
                }
                if blocked.contains_key(&c.ip) || in_auto.iter().any(|a| a.contains(c.ip)) {
                    continue;
                }
                if blocked.len() + new.len() >= MAX_BLOCKED {
                    self.over_cap.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                new.insert(
                    c.ip,
                    Block {
                        ip: c.ip,
                        since: wall_now,
                        until,
                        score: c.score,
                        threshold,
                        parts: parts_map(&c.parts),
                    },
                );
            }
        }
        if new.is_empty() {
            drop(_w);
            forget(&mut crossed.iter().map(|c| c.ip));
            return Ok(Vec::new());
        }
        let cidrs: Vec<Cidr> = new.keys().map(|ip| host(*ip)).collect();
        self.core
            .plane
            .list_op(Direction::Source, &auto, ListOp::Add(&cidrs))?;
        let staged = (|| -> Result<(), ServiceError> {
            let mut batch = Batch::default();
            for b in new.values() {
                batch.put(
                    Cf::Blocklists,
                    &keys::reputation_block(&b.ip.to_string()),
                    b,
                )?;
                self.core
                    .stage_notification(&mut batch, notification(b, ttl))?;
            }
            self.lists.stage_snapshot(&mut batch)?;
            self.core.audit(
                &mut batch,
                &Actor::Agent,
                "reputation.block",
                "blocklist:source/auto".into(),
                None,
                to_json(&serde_json::json!({
                    "added_count": new.len(),
                    "added": new.keys().take(super::lists::MAX_AUDIT_DIFF_ENTRIES).collect::<Vec<_>>(),
                    "ttl_s": ttl.as_secs(),
                })),
            )?;
            self.core.commit(batch)
        })();
        if let Err(e) = staged {
            if let Err(u) =
                self.core
                    .plane
                    .list_op(Direction::Source, &auto, ListOp::Remove(&cidrs))
            {
                tracing::error!(error = %u, "cannot undo an auto-block after a failed commit");
            }
            return Err(e);
        }
        drop(_w);
        for b in new.values() {
            let _ = self
                .core
                .events()
                .send(ServiceEvent::Notified(Box::new(notification(b, ttl))));
        }
        let ips: Vec<IpAddr> = new.keys().copied().collect();
        tracing::warn!(n = ips.len(), first = %ips[0], ttl_s = ttl.as_secs(), "sources auto-blocked");
        self.blocks.fetch_add(ips.len() as u64, Ordering::Relaxed);
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(new);
        forget(&mut crossed.iter().map(|c| c.ip));
        Ok(ips)
    }

    /// Ends the blocks expired at `wall_now` in one list change; answers how many.
    pub fn expire(&self, wall_now: SystemTime) -> Result<usize, ServiceError> {
        let due: Vec<IpAddr> = self
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|b| b.until <= wall_now)
            .map(|b| b.ip)
            .take(MAX_BLOCKED)
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let auto = auto_list();
        let cidrs: Vec<Cidr> = due.iter().map(|ip| host(*ip)).collect();
        let _w = self.core.writer.lock().unwrap_or_else(|p| p.into_inner());
        let exists = self
            .core
            .plane
            .list_cidrs(Direction::Source, &auto)
            .is_some();
        if exists {
            self.core
                .plane
                .list_op(Direction::Source, &auto, ListOp::Remove(&cidrs))?;
        }
        let mut batch = Batch::default();
        for ip in &due {
            batch.delete(Cf::Blocklists, &keys::reputation_block(&ip.to_string()));
        }
        self.lists.stage_snapshot(&mut batch)?;
        self.core.audit(
            &mut batch,
            &Actor::Agent,
            "reputation.unblock",
            "blocklist:source/auto".into(),
            None,
            to_json(&serde_json::json!({
                "removed_count": due.len(),
                "removed": due.iter().take(super::lists::MAX_AUDIT_DIFF_ENTRIES).collect::<Vec<_>>(),
            })),
        )?;
        if let Err(e) = self.core.commit(batch) {
            if exists
                && let Err(u) =
                    self.core
                        .plane
                        .list_op(Direction::Source, &auto, ListOp::Add(&cidrs))
            {
                tracing::error!(error = %u, "cannot undo an auto-unblock after a failed commit");
            }
            return Err(e);
        }
        drop(_w);
        {
            let mut b = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
            for ip in &due {
                b.remove(ip);
            }
        }
        self.unblocks.fetch_add(due.len() as u64, Ordering::Relaxed);
        tracing::info!(n = due.len(), first = %due[0], "auto-blocks expired");
        Ok(due.len())
    }
}

/// The `suspicious-activity` event of a block.
fn notification(b: &Block, ttl: Duration) -> Notification {
    let mut n = Notification::new(NotifyKind::SuspiciousActivity);
    n.at = b.since;
    n.ip = Some(b.ip);
    n.protocol = Some(super::domain::Protocol::Wireguard.as_str().to_owned());
    let until = chrono::DateTime::<chrono::Utc>::from(b.until)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    n.data = serde_json::json!({
        "kind": "auto-block",
        "source": b.ip.to_string(),
        "list": "auto",
        "score": points(b.score),
        "threshold": points(b.threshold),
        "parts": b.parts.iter().map(|(p, t)| (p.as_str().to_owned(), serde_json::json!({
            "count": t.count,
            "points": points(t.score),
        }))).collect::<serde_json::Map<_, _>>(),
        "ttl_s": ttl.as_secs(),
        "until": until,
    });
    n
}

/// Starts the blocker thread (`reputation`): it ends once the engine is dropped.
pub fn start(rep: &Arc<Reputation>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rx = rep.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
    let weak = Arc::downgrade(rep);
    std::thread::Builder::new()
        .name("reputation".into())
        .spawn(move || {
            if let Some(rx) = rx {
                run(&weak, &rx);
            }
        })
}

/// The blocker loop: waits for a crossing or the next expiry; takes every crossing waiting
/// (at most [`MAX_BATCH`]), no sooner than [`MIN_GAP`] after the last change, and makes one
/// change of them.
fn run(weak: &Weak<Reputation>, rx: &Receiver<Msg>) {
    let mut last_change: Option<Instant> = None;
    loop {
        let wait = match weak.upgrade() {
            Some(rep) => rep.next_expiry().map_or(IDLE, |t| {
                t.duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(IDLE)
            }),
            None => return,
        };
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(rep) = weak.upgrade() else { return };
        if let Some(first) = first {
            if let Some(t) = last_change
                && t.elapsed() < MIN_GAP
            {
                std::thread::sleep(MIN_GAP - t.elapsed());
            }
            let mut crossed = Vec::new();
            let take = |m: Msg, crossed: &mut Vec<Crossing>| match m {
                Msg::Crossed(c) => crossed.push(c),
                Msg::Peer { peer, part } => {
                    if let Some(ip) = rep.endpoint_of(peer) {
                        // A crossing of a device's endpoint goes back into the queue.
                        rep.on_event(ip, part);
                    }
                }
            };
            take(first, &mut crossed);
            while crossed.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut crossed),
                    Err(_) => break,
                }
            }
            if !crossed.is_empty() {
                match rep.block(&crossed, SystemTime::now()) {
                    Ok(_) => last_change = Some(Instant::now()),
                    Err(e) => {
                        tracing::error!(error = %e, n = crossed.len(), "cannot auto-block sources");
                        let mut t = rep.table.lock().unwrap_or_else(|p| p.into_inner());
                        for c in &crossed {
                            t.unpend(c.ip);
                        }
                    }
                }
            }
        }
        if let Err(e) = rep.expire(SystemTime::now()) {
            tracing::error!(error = %e, "cannot end expired auto-blocks; retrying in 1 s");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests;
