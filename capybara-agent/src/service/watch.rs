//! Live monitoring (`capybara top`, `capybara stats --watch`, the `WatchStats` RPC): rates each
//! way per user, device and proxy identity (a user's Shadowsocks or VLESS traffic, a row named
//! by its protocol), drops by reason, sessions online, once a second.
//!
//! - **One sampler for every watcher.** The first watcher starts a sampler task ([`Live::watch`]);
//!   it reads the counters once a second ([`TICK`]) and publishes the computed [`Tick`] on a
//!   `tokio::sync::watch` channel, which keeps only the latest: a slow watcher skips ticks, nothing
//!   queues up. When the last watcher has gone the sampler stops (within a tick); the next
//!   watcher starts a new one. [`Live::stop`] (the API's shutdown) ends every watch, so a watching
//!   client never holds up the agent's graceful shutdown.
//! - **Rates are computed here, from the kernel's per-peer counters** (IP bytes and packets, as
//!   `stats` shows them) between two readings, divided by the time between them (measured, not
//!   assumed). [`RateMeter`] is the deterministic core (readings in, ticks out): the first reading
//!   gives no tick (there is nothing to rate yet; the sampler reads at once, so the first tick
//!   comes one interval after the first watcher); a device is matched to its previous reading by
//!   id *and* public key; a counter lower than before (the device removed and re-added, its id
//!   reused, counters zeroed) and a device not in the previous reading count from zero, since
//!   the dataplane zeroes a peer's counters when it adds it.
//! - **Sessions online**: devices the tunnel reports connected (its liveness, as `connections`).
//! - **Bounded ticks.** Each watcher asks for `top` (default [`DEFAULT_TOP`] = 20, at most
//!   [`MAX_TOP`] = 1 000) and optionally one user; [`Tick::view`] picks its busiest users and
//!   devices (bytes per second both ways, then name) in O(n) and sums the rest, so a tick's size
//!   does not grow with the peers, only with `top`. Measured in protobuf with busy 64-bit
//!   counters (`api::live`'s `a_tick_is_bounded_by_top`, 100 000 devices): 475 bytes at `top`
//!   1, 4.9 KB at the default 20 (≈ 230 bytes per user row and device row: a device row carries
//!   its `Peer`, key and addresses), 231 KB at 1 000 — per second, per watcher.
//! - **Cost.** One reading, shared by all watchers, copies the device list (names and keys) and
//!   reads each device's counters: two per-CPU map lookups per device (the same calls `GetStats`
//!   makes), plus the global drops and the tunnel's peer list. The sampler keeps two readings
//!   (≈ 150 bytes a device each). Each watcher's view is a linear pass and a sort of its `top`
//!   rows. Nothing is read while nobody watches.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant, SystemTime},
};

use capybara_common::drop::DropReason;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    ServiceError,
    core::Core,
    directory::Directory,
    domain::{Peer, ProxyAccess, UserName},
    monitor::Traffic,
};

/// How often the sampler reads the counters.
pub const TICK: Duration = Duration::from_secs(1);
/// Rows of users and of devices a tick lists when the watcher does not say.
pub const DEFAULT_TOP: usize = 20;
/// The most rows of users and of devices a tick lists (a larger ask is clamped).
pub const MAX_TOP: usize = 1000;

/// Per-second rates of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    /// Bytes per second.
    pub bytes: u64,
    /// Packets per second.
    pub packets: u64,
}

/// Rates each way and the counters at the reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTraffic {
    /// From the peer(s), per second.
    pub rx: Rate,
    /// To the peer(s), per second.
    pub tx: Rate,
    /// From the peer(s), in all.
    pub rx_total: Traffic,
    /// To the peer(s), in all.
    pub tx_total: Traffic,
}

impl LiveTraffic {
    fn add(&mut self, o: &LiveTraffic) {
        let add = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        add(&mut self.rx.bytes, o.rx.bytes);
        add(&mut self.rx.packets, o.rx.packets);
        add(&mut self.tx.bytes, o.tx.bytes);
        add(&mut self.tx.packets, o.tx.packets);
        add(&mut self.rx_total.bytes, o.rx_total.bytes);
        add(&mut self.rx_total.packets, o.rx_total.packets);
        add(&mut self.tx_total.bytes, o.tx_total.bytes);
        add(&mut self.tx_total.packets, o.tx_total.packets);
    }

    /// Bytes per second both ways: what rows are sorted by.
    pub fn busy(&self) -> u64 {
        self.rx.bytes.saturating_add(self.tx.bytes)
    }
}

/// Drops of one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRate {
    /// The reason's name (`quota-exhausted`, …).
    pub reason: String,
    /// Packets per second.
    pub per_second: u64,
    /// Packets in all.
    pub packets: u64,
}

/// What a row of the live view is: a WireGuard device, or a user's proxy identity (its
/// Shadowsocks or VLESS traffic: the kernel line its proxied sockets are bound to). In JSON a
/// device row carries `peer`, a proxy row `proxy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Line {
    /// A device.
    Peer(Peer),
    /// A proxy identity.
    Proxy(ProxyAccess),
}

impl Line {
    /// Its kernel line's id.
    pub fn id(&self) -> capybara_common::peer::PeerId {
        match self {
            Line::Peer(p) => p.id,
            Line::Proxy(a) => a.id,
        }
    }

    /// Its user.
    pub fn user(&self) -> &UserName {
        match self {
            Line::Peer(p) => &p.user,
            Line::Proxy(a) => &a.user,
        }
    }

    /// Its name under the user: the device's, or the protocol's.
    pub fn name(&self) -> &str {
        match self {
            Line::Peer(p) => p.device.as_str(),
            Line::Proxy(a) => a.protocol.as_str(),
        }
    }

    /// Whether `other` is the same line: the same id, and the same key or the same protocol
    /// (an id reused by another device or identity counts from zero).
    fn same(&self, other: &Line) -> bool {
        match (self, other) {
            (Line::Peer(a), Line::Peer(b)) => a.id == b.id && a.public_key == b.public_key,
            (Line::Proxy(a), Line::Proxy(b)) => {
                a.id == b.id && a.protocol == b.protocol && a.user == b.user
            }
            _ => false,
        }
    }
}

/// One line's counters at a reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReading {
    /// The device or proxy identity.
    pub line: Line,
    /// Has a session now.
    pub online: bool,
    /// From it, passed.
    pub rx: Traffic,
    /// To it, passed.
    pub tx: Traffic,
    /// Its drops by reason (non-zero only).
    pub drops: Vec<(DropReason, u64)>,
}

/// One reading of the counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    /// When (monotonic: the rates' clock).
    pub at: Instant,
    /// When (wall clock, for display).
    pub wall: SystemTime,
    /// Every device and proxy identity, in `user/name` order.
    pub devices: Vec<DeviceReading>,
    /// Every drop of the dataplane by reason (non-zero only).
    pub drops: Vec<(DropReason, u64)>,
}

/// One device or proxy identity in a [`Tick`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTick {
    /// The device or proxy identity.
    pub line: Line,
    /// Has a session now.
    pub online: bool,
    /// Its rates and counters.
    pub traffic: LiveTraffic,
    /// Its drops by reason (non-zero totals only), with their rates.
    pub drops: Vec<(DropReason, u64, u64)>,
}

/// The rates of every device between two readings: what the sampler publishes to every watcher
/// ([`Tick::view`] cuts each watcher's share).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick {
    /// The newer reading's wall-clock time.
    pub at: SystemTime,
    /// The time between the readings.
    pub interval: Duration,
    /// Every device and proxy identity, in `user/name` order.
    pub devices: Vec<DeviceTick>,
    /// Every drop of the dataplane: (reason, per second, total), non-zero totals only.
    pub drops: Vec<(DropReason, u64, u64)>,
}

/// A per-second rate from two readings of a counter; a counter that went backwards (reset) or
/// has no earlier reading counts from zero.
pub fn per_second(before: Option<u64>, now: u64, interval: Duration) -> u64 {
    let delta = match before {
        Some(b) if now >= b => now - b,
        _ => now,
    };
    let secs = interval.as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    (delta as f64 / secs).round() as u64
}

fn drop_rates(
    before: Option<&[(DropReason, u64)]>,
    now: &[(DropReason, u64)],
    interval: Duration,
) -> Vec<(DropReason, u64, u64)> {
    now.iter()
        .map(|&(r, n)| {
            let b = before.map(|b| b.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n));
            (r, per_second(b, n, interval), n)
        })
        .collect()
}

/// The deterministic core of the sampler: readings in, ticks out.
#[derive(Debug, Default)]
pub struct RateMeter {
    last: Option<Reading>,
}

impl RateMeter {
    /// Takes a reading; returns the rates since the previous one (none for the first).
    pub fn push(&mut self, now: Reading) -> Option<Tick> {
        let tick = self.last.as_ref().map(|before| {
            let interval = now.at.saturating_duration_since(before.at);
            let by_id: HashMap<_, _> = before.devices.iter().map(|d| (d.line.id(), d)).collect();
            let devices = now
                .devices
                .iter()
                .map(|d| {
                    let b = by_id.get(&d.line.id()).filter(|b| b.line.same(&d.line));
                    let rate =
                        |f: fn(&DeviceReading) -> u64| per_second(b.map(|b| f(b)), f(d), interval);
                    DeviceTick {
                        line: d.line.clone(),
                        online: d.online,
                        traffic: LiveTraffic {
                            rx: Rate {
                                bytes: rate(|x| x.rx.bytes),
                                packets: rate(|x| x.rx.packets),
                            },
                            tx: Rate {
                                bytes: rate(|x| x.tx.bytes),
                                packets: rate(|x| x.tx.packets),
                            },
                            rx_total: d.rx,
                            tx_total: d.tx,
                        },
                        drops: drop_rates(b.map(|b| b.drops.as_slice()), &d.drops, interval),
                    }
                })
                .collect();
            Tick {
                at: now.wall,
                interval,
                devices,
                drops: drop_rates(Some(&before.drops), &now.drops, interval),
            }
        });
        self.last = Some(now);
        tick
    }
}

/// A user in a [`LiveView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    /// The user.
    pub user: String,
    /// Its devices and proxy identities.
    pub devices: u32,
    /// Those with a session now.
    pub sessions: u32,
    /// Their rates and counters, summed.
    pub traffic: LiveTraffic,
}

/// A device or proxy identity in a [`LiveView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRow {
    /// The device (`peer`) or proxy identity (`proxy`).
    #[serde(flatten)]
    pub line: Line,
    /// Has a session now.
    pub online: bool,
    /// Its rates and counters.
    pub traffic: LiveTraffic,
}

/// What a view does not list, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Others {
    /// How many.
    pub count: u32,
    /// Their rates and counters together.
    pub traffic: LiveTraffic,
}

/// One watcher's tick: totals, the busiest users and devices, the rest summed, drops.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveView {
    /// Milliseconds since the epoch of the reading.
    pub at_ms: u64,
    /// Milliseconds since the previous reading.
    pub interval_ms: u64,
    /// Users with devices (in scope).
    pub users: u32,
    /// Devices (in scope).
    pub devices: u32,
    /// Devices with a session now.
    pub sessions: u32,
    /// Every device in scope together.
    pub total: LiveTraffic,
    /// The busiest users, busiest first.
    pub top_users: Vec<UserRow>,
    /// The users not listed.
    pub other_users: Others,
    /// The busiest devices, busiest first.
    pub top_devices: Vec<DeviceRow>,
    /// The devices not listed.
    pub other_devices: Others,
    /// Drops by reason (non-zero totals): every drop of the dataplane, or the user's devices'.
    pub drops: Vec<DropRate>,
}

/// The `top` rows of `rows` by `busy` descending then `name`, in that order, and the rest.
fn split_top<T>(
    mut rows: Vec<T>,
    top: usize,
    key: impl Fn(&T) -> (std::cmp::Reverse<u64>, String),
) -> (Vec<T>, Vec<T>) {
    let cmp = |a: &T, b: &T| key(a).cmp(&key(b));
    if rows.len() > top && top > 0 {
        rows.select_nth_unstable_by(top - 1, cmp);
    }
    let rest = rows.split_off(top.min(rows.len()));
    rows.sort_by(cmp);
    (rows, rest)
}

impl Tick {
    /// The view of one watcher: `user`'s devices only, if given; at most `top` users and `top`
    /// devices (clamped to `1..=MAX_TOP`).
    pub fn view(&self, user: Option<&UserName>, top: usize) -> LiveView {
        let top = top.clamp(1, MAX_TOP);
        let devices: Vec<&DeviceTick> = self
            .devices
            .iter()
            .filter(|d| user.is_none_or(|u| d.line.user() == u))
            .collect();
        let mut total = LiveTraffic::default();
        let mut users: Vec<UserRow> = Vec::new();
        for d in &devices {
            total.add(&d.traffic);
            // Devices come in user order: a user's rows are consecutive.
            match users.last_mut() {
                Some(u) if u.user == d.line.user().as_str() => {}
                _ => users.push(UserRow {
                    user: d.line.user().to_string(),
                    devices: 0,
                    sessions: 0,
                    traffic: LiveTraffic::default(),
                }),
            }
            let u = users.last_mut().expect("pushed above");
            u.devices += 1;
            u.sessions += u32::from(d.online);
            u.traffic.add(&d.traffic);
        }
        let drops = match user {
            None => self.drops.clone(),
            Some(_) => {
                let mut sum: BTreeMap<DropReason, (u64, u64)> = BTreeMap::new();
                for d in &devices {
                    for &(r, rate, n) in &d.drops {
                        let e = sum.entry(r).or_default();
                        e.0 = e.0.saturating_add(rate);
                        e.1 = e.1.saturating_add(n);
                    }
                }
                sum.into_iter().map(|(r, (rate, n))| (r, rate, n)).collect()
            }
        };
        let n_users = users.len() as u32;
        let n_devices = devices.len() as u32;
        let sessions = devices.iter().filter(|d| d.online).count() as u32;
        let (top_users, rest_users) = split_top(users, top, |u| {
            (std::cmp::Reverse(u.traffic.busy()), u.user.clone())
        });
        let (top_devices, rest_devices) = split_top(devices, top, |d| {
            (
                std::cmp::Reverse(d.traffic.busy()),
                format!("{}\0{}", d.line.user(), d.line.name()),
            )
        });
        let others = |rest: &mut dyn Iterator<Item = LiveTraffic>| {
            let mut o = Others::default();
            for t in rest {
                o.count += 1;
                o.traffic.add(&t);
            }
            o
        };
        LiveView {
            at_ms: self
                .at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            interval_ms: self.interval.as_millis() as u64,
            users: n_users,
            devices: n_devices,
            sessions,
            total,
            other_users: others(&mut rest_users.iter().map(|u| u.traffic)),
            top_users,
            other_devices: others(&mut rest_devices.iter().map(|d| d.traffic)),
            top_devices: top_devices
                .into_iter()
                .map(|d| DeviceRow {
                    line: d.line.clone(),
                    online: d.online,
                    traffic: d.traffic,
                })
                .collect(),
            drops: drops
                .into_iter()
                .filter(|(_, _, n)| *n > 0)
                .map(|(r, rate, n)| DropRate {
                    reason: r.name().to_owned(),
                    per_second: rate,
                    packets: n,
                })
                .collect(),
        }
    }
}

/// What the sampler publishes: nothing yet, a tick, or why reading failed.
pub type Published = Option<Result<Arc<Tick>, Arc<str>>>;

/// A watcher's end of the sampler: wait with [`Watch::changed`], then read the latest.
#[derive(Debug)]
pub struct Watch {
    ticks: watch::Receiver<Published>,
    stop: watch::Receiver<bool>,
}

impl Watch {
    /// The next tick (or failure); `None` when the watch is over (the agent is stopping).
    pub async fn next(&mut self) -> Option<Result<Arc<Tick>, Arc<str>>> {
        loop {
            if *self.stop.borrow() {
                return None;
            }
            tokio::select! {
                r = self.ticks.changed() => r.ok()?,
                r = self.stop.changed() => { r.ok()?; continue; }
            }
            if *self.stop.borrow() {
                return None;
            }
            if let Some(p) = self.ticks.borrow_and_update().clone() {
                return Some(p);
            }
        }
    }
}

/// The live monitoring feature: the shared sampler.
#[derive(Debug)]
pub struct Live {
    core: Arc<Core>,
    dir: Arc<Directory>,
    /// The running sampler's channel (dead when none runs).
    sampler: Arc<Mutex<Weak<watch::Sender<Published>>>>,
    stop: watch::Sender<bool>,
}

impl Live {
    /// The feature over the shared core and directory.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>) -> Live {
        Live {
            core,
            dir,
            sampler: Arc::default(),
            stop: watch::channel(false).0,
        }
    }

    /// Reads every device's and proxy identity's counters, the global drops and who is online
    /// (a device with a tunnel session, an identity with a proxied connection open).
    pub fn read(&self) -> Result<Reading, ServiceError> {
        let online: HashSet<_> = self
            .core
            .tunnel
            .peers()
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| p.key)
            .collect();
        let mut lines: Vec<Line> = self
            .dir
            .with_records(|recs| recs.map(|r| Line::Peer(r.peer.clone())).collect());
        let proxies = self.dir.all_proxies();
        if !proxies.is_empty() {
            lines.extend(proxies.into_iter().map(|r| Line::Proxy(r.access)));
            // A user's rows together (the views sum them in one pass).
            lines.sort_by(|a, b| (a.user(), a.name()).cmp(&(b.user(), b.name())));
        }
        let at = Instant::now();
        let wall = SystemTime::now();
        let mut devices = Vec::with_capacity(lines.len());
        for line in lines {
            let k = self.core.plane.peer_stats(line.id())?;
            devices.push(DeviceReading {
                online: match &line {
                    Line::Peer(p) => online.contains(&p.public_key),
                    Line::Proxy(a) => self.core.proxies.open_count(a.id) > 0,
                },
                rx: Traffic {
                    packets: k.rx_packets,
                    bytes: k.rx_bytes,
                },
                tx: Traffic {
                    packets: k.tx_packets,
                    bytes: k.tx_bytes,
                },
                drops: DropReason::ALL
                    .iter()
                    .map(|r| (*r, k.drops[*r as usize]))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                line,
            });
        }
        let drops = self
            .core
            .plane
            .drops()?
            .into_iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(r, c)| (r, c.packets))
            .collect();
        Ok(Reading {
            at,
            wall,
            devices,
            drops,
        })
    }

    /// Starts watching (inside a tokio runtime): joins the running sampler or starts one.
    pub fn watch(self: &Arc<Self>) -> Watch {
        let mut slot = self.sampler.lock().unwrap();
        let ticks = match slot.upgrade() {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(None);
                let tx = Arc::new(tx);
                *slot = Arc::downgrade(&tx);
                tokio::spawn(sample(self.clone(), tx));
                rx
            }
        };
        Watch {
            ticks,
            stop: self.stop.subscribe(),
        }
    }

    /// Whether a sampler runs (someone watches, or the last watcher left less than a tick ago).
    pub fn sampling(&self) -> bool {
        self.sampler.lock().unwrap().strong_count() > 0
    }

    /// Ends every watch, now and later (the API is shutting down).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// The sampler: reads every [`TICK`] and publishes until nobody watches.
async fn sample(live: Arc<Live>, tx: Arc<watch::Sender<Published>>) {
    let mut meter = RateMeter::default();
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = tx.closed() => {
                // Gone unless a watcher joined meanwhile (they join under this lock).
                let mut slot = live.sampler.lock().unwrap();
                if tx.receiver_count() == 0 {
                    *slot = Weak::new();
                    return;
                }
                continue;
            }
        }
        let l = live.clone();
        let reading = tokio::task::spawn_blocking(move || l.read()).await;
        let published = match reading {
            Ok(Ok(r)) => match meter.push(r) {
                Some(t) => Ok(Arc::new(t)),
                None => continue,
            },
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "live monitoring: reading the counters failed");
                Err(Arc::from(e.to_string()))
            }
            Err(e) => Err(Arc::from(format!("the counters' reader failed: {e}"))),
        };
        tx.send_replace(Some(published));
        if *live.stop.borrow() {
            let mut slot = live.sampler.lock().unwrap();
            *slot = Weak::new();
            return;
        }
    }
}

#[cfg(test)]
mod tests;
