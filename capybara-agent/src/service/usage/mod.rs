//! Usage rollups and reports: each device's usage per UTC hour and per UTC day, written by the
//! agent from the kernel's per-peer counters, and the report over them (`capybara report
//! generate`, the `Reports` RPC; [`report`] builds it, [`render`] writes it as text, JSON, CSV
//! or one self-contained html file).
//!
//! ## What a rollup holds
//! One [`UsageRecord`] per device and hour (and per device and day), fixed-size binary
//! ([`RECORD_BYTES`] = 176 bytes, little-endian `u64`s): bytes and packets each way (IP bytes,
//! the counters `capybara stats` shows), online time (ms), sessions started, the peak rate each
//! way (bytes per second) and drops by reason (the kernel counts drops per peer, every reason;
//! nothing was added to the kernel for this). Keys (`store::keys::usage_hour`,
//! `usage_day`) sort by hour (day), then `user/device`: a period is one forward range read.
//! A record is named by user and device, not peer id, so a device removed keeps its history and
//! a reused peer id never mixes two devices. A user's proxy identity (Shadowsocks, VLESS) is recorded as a
//! device named by its protocol (no device may take such a name), its counters those of its
//! kernel line (the socket programs' count of its proxied traffic), online while it has a
//! connection open. Hours with no traffic and no online time write
//! nothing.
//!
//! ## How it is written
//! [`run_writer`], one blocking thread, samples every [`SAMPLE`] (10 s, aligned to the wall
//! clock, so an hour boundary is always a sample): every device's kernel counters (two per-CPU
//! map reads, as `GetStats`), whether the tunnel has it connected, and the sessions it opened
//! (counted by `service::live` as the history records them). [`Rollup`] (the deterministic core,
//! samples in, store writes out) adds each device's counters since the last sample to the
//! current hour:
//! - **counter resets**: a kernel counter lower than before (the device removed and re-added,
//!   its id reused by another key, the pins removed) counts from zero, as the dataplane zeroes a
//!   peer's counters when it adds it; a device seen for the first time after the writer's first
//!   checkpoint counts from zero too (it was added since), before that from its first sample;
//! - **online time**: the sample interval, when the tunnel reports the device connected at the
//!   sample (resolution: one sample, 10 s);
//! - **peak rate**: the highest average rate over one sample interval (resolution 10 s; a
//!   interval shorter than [`PEAK_MIN_INTERVAL`], as after a report's flush, is not rated). The
//!   live view's once-a-second sampler runs only while someone watches, so it is not used;
//! - **hour boundary**: an interval is added to the hour it ended in (one second before its
//!   end: a sample at 11:00:00 closes 10:00–11:00); the sample that crosses the boundary
//!   **completes** the hour: its records are written final, added to the day's records, and
//!   synced.
//!
//! Every [`CHECKPOINT`] (60 s) the hour so far and each changed device's counters (its cursor,
//! `c/<peer id>`, JSON) are written in one batch (not synced: they survive the agent being
//! killed; power loss can lose the last minute). The store therefore always holds records of
//! the current hour that are exactly the usage up to the cursors' counters, and a completion
//! writes its records, the day's, the cursors and the writer's state in one batch.
//!
//! ## Restarts, crashes, removals
//! The kernel counters are pinned and survive the agent; the tunnel does not (no traffic while
//! the agent is down). At start the writer reads its cursors and the current hour's records
//! back, and its first sample adds each device's counters since its cursor to the hour of the
//! checkpoint, so **bytes, packets and drops are exact across a restart or a SIGKILL**. What a
//! crash loses is what only the agent's memory held since the last checkpoint (≤ 60 s): online
//! time, the peak rate and sessions started in that minute. A clean shutdown writes a last
//! checkpoint. A device removed between two samples loses its traffic since the last sample
//! (≤ 10 s: its counters go with it); what it used before is kept and written with its hour.
//!
//! ## Retention
//! Hourly records are kept [`HOURLY_RETENTION_DAYS`] (93 days), daily records
//! [`DAILY_RETENTION_DAYS`] (400 days, 13 months); pruned at start and after every completed
//! hour, a forward range from the oldest key, deleted in batches. A report reads whole days that
//! are complete from the daily records and the rest (the current day, the edges of a rolling
//! period) from the hourly ones: a month over 10 000 users is ≈ 300 000 daily records plus at
//! most 48 hours of hourly ones (`report_month_10k_users_ms` in BENCHMARKS.md).
//!
//! Size: 176 bytes a value plus a key of ≈ 30 bytes; 10 000 devices online all month ≈ 7.2 M
//! hourly records (≈ 1.5 GB before RocksDB's compression) and 300 000 daily ones.

pub mod render;
pub mod report;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use capybara_common::{
    drop::{DROP_REASON_COUNT, DropReason},
    peer::{PeerId, PeerStats},
};
use serde::{Deserialize, Serialize};

use super::{
    ServiceError, core::Core, directory::Directory, domain::PublicKey, live::LiveSessions,
    policy::Policy,
};
use crate::store::{Batch, Cf, Store, StoreError, keys};

/// How often the writer samples the counters.
pub const SAMPLE: Duration = Duration::from_secs(10);
/// How often the writer writes the hour so far and the devices' cursors.
pub const CHECKPOINT: Duration = Duration::from_secs(60);
/// Intervals shorter than this give no peak rate (too short to mean a rate).
pub const PEAK_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Intervals longer than this add no online time and no peak (the writer was stalled).
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Days hourly records are kept.
pub const HOURLY_RETENTION_DAYS: u64 = 93;
/// Days daily records are kept (13 months).
pub const DAILY_RETENTION_DAYS: u64 = 400;
/// Keys deleted per batch when pruning.
const PRUNE_BATCH: usize = 10_000;

/// Milliseconds in an hour.
pub const HOUR_MS: u64 = 3_600_000;

/// `u64` fields of a record: 8 named ones, then one per drop reason.
const FIELDS: usize = 8 + DROP_REASON_COUNT;
/// Bytes of an encoded [`UsageRecord`].
pub const RECORD_BYTES: usize = FIELDS * 8;

/// One device's usage in one hour or day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Bytes from the device.
    pub rx_bytes: u64,
    /// Packets from the device.
    pub rx_packets: u64,
    /// Bytes to the device.
    pub tx_bytes: u64,
    /// Packets to the device.
    pub tx_packets: u64,
    /// Time connected, milliseconds.
    pub online_ms: u64,
    /// Sessions started.
    pub sessions: u64,
    /// Highest rate from the device over one sample interval, bytes per second.
    pub peak_rx: u64,
    /// Highest rate to the device over one sample interval, bytes per second.
    pub peak_tx: u64,
    /// Dropped packets by reason (`DropReason as usize`).
    pub drops: [u64; DROP_REASON_COUNT],
}

impl UsageRecord {
    /// The fixed-size binary form: [`FIELDS`] little-endian `u64`s.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_BYTES);
        for v in [
            self.rx_bytes,
            self.rx_packets,
            self.tx_bytes,
            self.tx_packets,
            self.online_ms,
            self.sessions,
            self.peak_rx,
            self.peak_tx,
        ]
        .iter()
        .chain(self.drops.iter())
        {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Reads [`UsageRecord::encode`]'s form; a shorter value (fewer drop reasons: an older
    /// layout) reads its missing reasons as 0, a longer one's extra reasons are ignored. `None`
    /// when it is not whole `u64`s or has fewer than the 8 named fields.
    pub fn decode(b: &[u8]) -> Option<UsageRecord> {
        if !b.len().is_multiple_of(8) || b.len() < 64 {
            return None;
        }
        let mut v = [0u64; FIELDS];
        for (slot, chunk) in v.iter_mut().zip(b.chunks_exact(8)) {
            *slot = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        let mut drops = [0u64; DROP_REASON_COUNT];
        drops.copy_from_slice(&v[8..]);
        Some(UsageRecord {
            rx_bytes: v[0],
            rx_packets: v[1],
            tx_bytes: v[2],
            tx_packets: v[3],
            online_ms: v[4],
            sessions: v[5],
            peak_rx: v[6],
            peak_tx: v[7],
            drops,
        })
    }

    /// Adds `o`: sums (saturating), peaks as the higher.
    pub fn add(&mut self, o: &UsageRecord) {
        let add = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        add(&mut self.rx_bytes, o.rx_bytes);
        add(&mut self.rx_packets, o.rx_packets);
        add(&mut self.tx_bytes, o.tx_bytes);
        add(&mut self.tx_packets, o.tx_packets);
        add(&mut self.online_ms, o.online_ms);
        add(&mut self.sessions, o.sessions);
        self.peak_rx = self.peak_rx.max(o.peak_rx);
        self.peak_tx = self.peak_tx.max(o.peak_tx);
        for (a, b) in self.drops.iter_mut().zip(o.drops) {
            add(a, b);
        }
    }

    /// Whether it records nothing.
    pub fn is_empty(&self) -> bool {
        *self == UsageRecord::default()
    }

    /// Bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.rx_bytes.saturating_add(self.tx_bytes)
    }

    /// Drops by reason name, non-zero only.
    pub fn drops_by_name(&self) -> BTreeMap<String, u64> {
        DropReason::ALL
            .iter()
            .zip(self.drops)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect()
    }
}

/// A device's counters at a sample: the kernel's, and the sessions it opened since the agent
/// started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Bytes from it.
    pub rx_bytes: u64,
    /// Packets from it.
    pub rx_packets: u64,
    /// Bytes to it.
    pub tx_bytes: u64,
    /// Packets to it.
    pub tx_packets: u64,
    /// Drops by reason.
    pub drops: [u64; DROP_REASON_COUNT],
    /// Sessions opened since the agent started (`service::live`).
    pub sessions: u64,
}

impl Counters {
    /// From the kernel's counters and the sessions count.
    pub fn from_kernel(s: &PeerStats, sessions: u64) -> Counters {
        let mut drops = [0u64; DROP_REASON_COUNT];
        drops.copy_from_slice(&s.drops[..DROP_REASON_COUNT]);
        Counters {
            rx_bytes: s.rx_bytes,
            rx_packets: s.rx_packets,
            tx_bytes: s.tx_bytes,
            tx_packets: s.tx_packets,
            drops,
            sessions,
        }
    }

    /// What was counted since `base` (see the module docs): the kernel's counters as a whole
    /// count from zero when any of them went backwards (they are zeroed together), each drop
    /// reason and the sessions count from zero when they did.
    pub fn since(&self, base: &Counters) -> UsageRecord {
        let reset = self.rx_bytes < base.rx_bytes
            || self.rx_packets < base.rx_packets
            || self.tx_bytes < base.tx_bytes
            || self.tx_packets < base.tx_packets;
        let d = |now: u64, was: u64| if reset || now < was { now } else { now - was };
        let mut drops = [0u64; DROP_REASON_COUNT];
        for (i, slot) in drops.iter_mut().enumerate() {
            *slot = d(self.drops[i], base.drops[i]);
        }
        UsageRecord {
            rx_bytes: d(self.rx_bytes, base.rx_bytes),
            rx_packets: d(self.rx_packets, base.rx_packets),
            tx_bytes: d(self.tx_bytes, base.tx_bytes),
            tx_packets: d(self.tx_packets, base.tx_packets),
            sessions: if self.sessions < base.sessions {
                self.sessions
            } else {
                self.sessions - base.sessions
            },
            drops,
            ..UsageRecord::default()
        }
    }
}

/// One device at a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSample {
    /// Its dataplane id.
    pub id: PeerId,
    /// Its key (with the id: which device it is).
    pub key: PublicKey,
    /// Its user.
    pub user: String,
    /// Its name.
    pub device: String,
    /// Its counters now.
    pub counters: Counters,
    /// Whether the tunnel has it connected now.
    pub online: bool,
}

/// A device's counters at the last sample, as checkpointed (`c/<peer id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Its key.
    pub key: PublicKey,
    /// Its user.
    pub user: String,
    /// Its name.
    pub device: String,
    /// Its counters then.
    pub counters: Counters,
}

/// The writer's own state (`m/checkpoint`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The hour the stored records of the current hour are for.
    pub hour: u64,
    /// The last hour completed (its records final, added to its day's).
    pub completed: Option<u64>,
}

/// A store change the rollup asks for (in the `usage` family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Put these bytes.
    Put(String, Vec<u8>),
    /// Delete the key.
    Delete(String),
}

/// Changes to write in one batch; `sync`: an hour was completed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Write {
    /// The changes.
    pub ops: Vec<Op>,
    /// Sync them (a completed hour).
    pub sync: bool,
}

type Name = (String, String);

/// The deterministic core of the writer: samples in, store changes out (see the module docs).
#[derive(Debug, Default)]
pub struct Rollup {
    /// The hour being accumulated.
    hour: u64,
    /// The last completed hour.
    completed: Option<u64>,
    /// When the last sample was taken (Unix ms); `None` before the first (after a restart too).
    last_at: Option<u64>,
    /// Each device's counters at the last sample.
    cursors: HashMap<PeerId, Cursor>,
    /// Cursors changed (or gone: `None`) since the last write.
    dirty_cursors: BTreeSet<PeerId>,
    /// The current hour, by user and device.
    hour_acc: BTreeMap<Name, UsageRecord>,
    /// Hour records changed since the last write.
    dirty: BTreeSet<Name>,
    /// The completed hours of `day`, by user and device.
    day_acc: BTreeMap<Name, UsageRecord>,
    /// The day `day_acc` is for.
    day: u64,
    /// Devices without a cursor count from zero (a checkpoint exists, so they were added since).
    zero_based: bool,
}

/// The UTC hour of Unix milliseconds `ms`.
pub fn hour_of(ms: u64) -> u64 {
    ms / HOUR_MS
}

fn name_of(user: &str, device: &str) -> Name {
    (user.to_owned(), device.to_owned())
}

impl Rollup {
    /// A rollup that has written nothing yet, at `at` (Unix ms).
    pub fn new(at: u64) -> Rollup {
        let hour = hour_of(at);
        Rollup {
            hour,
            day: hour / 24,
            ..Rollup::default()
        }
    }

    /// A rollup continuing from what the store holds: the writer's state, the cursors, the
    /// records of the checkpoint's hour and of its day (completed hours).
    pub fn restore(
        meta: Meta,
        cursors: HashMap<PeerId, Cursor>,
        hour_records: BTreeMap<Name, UsageRecord>,
        day_records: BTreeMap<Name, UsageRecord>,
    ) -> Rollup {
        Rollup {
            hour: meta.hour,
            completed: meta.completed,
            last_at: None,
            cursors,
            dirty_cursors: BTreeSet::new(),
            hour_acc: hour_records,
            dirty: BTreeSet::new(),
            day_acc: day_records,
            day: meta.hour / 24,
            zero_based: true,
        }
    }

    /// The hour being accumulated.
    pub fn hour(&self) -> u64 {
        self.hour
    }

    /// The current hour's usage so far, by user and device.
    pub fn current(&self) -> &BTreeMap<Name, UsageRecord> {
        &self.hour_acc
    }

    /// Takes a sample at `at` (Unix ms) of every device there is; returns what to write: a
    /// completed hour (synced), or nothing until [`Rollup::checkpoint`].
    pub fn sample(&mut self, at: u64, devices: &[DeviceSample]) -> Option<Write> {
        let mut out: Option<Write> = None;
        let interval = self.last_at.map(|l| at.saturating_sub(l));
        // The interval goes to the hour it ended in; the first after a restart to the
        // checkpoint's hour (its traffic was before the agent stopped).
        let target = match interval {
            Some(_) => hour_of(at.saturating_sub(1)),
            None => self.hour,
        };
        if target > self.hour {
            out = Some(self.complete(target));
        }
        let mut seen = HashSet::with_capacity(devices.len());
        for d in devices {
            seen.insert(d.id);
            let prev = self.cursors.get(&d.id).filter(|c| c.key == d.key);
            let had_cursor = prev.is_some();
            let base = match prev {
                Some(c) => Some(c.counters),
                None if self.zero_based => Some(Counters::default()),
                None => None,
            };
            let unchanged = prev.is_some_and(|c| c.counters == d.counters);
            if let Some(base) = base {
                let mut rec = d.counters.since(&base);
                if let Some(iv) = interval.filter(|iv| *iv <= MAX_INTERVAL.as_millis() as u64) {
                    if d.online {
                        rec.online_ms = iv;
                    }
                    if had_cursor && iv >= PEAK_MIN_INTERVAL.as_millis() as u64 {
                        rec.peak_rx = rec.rx_bytes.saturating_mul(1000) / iv;
                        rec.peak_tx = rec.tx_bytes.saturating_mul(1000) / iv;
                    }
                }
                if !rec.is_empty() {
                    let name = name_of(&d.user, &d.device);
                    let acc = self.hour_acc.entry(name.clone()).or_default();
                    acc.add(&rec);
                    acc.online_ms = acc.online_ms.min(HOUR_MS);
                    self.dirty.insert(name);
                }
            }
            if !unchanged {
                self.cursors.insert(
                    d.id,
                    Cursor {
                        key: d.key,
                        user: d.user.clone(),
                        device: d.device.clone(),
                        counters: d.counters,
                    },
                );
                self.dirty_cursors.insert(d.id);
            }
        }
        let gone: Vec<PeerId> = self
            .cursors
            .keys()
            .filter(|id| !seen.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.cursors.remove(&id);
            self.dirty_cursors.insert(id);
        }
        self.last_at = Some(at);
        self.zero_based = true;
        let now_hour = hour_of(at);
        if now_hour > self.hour {
            let w = self.complete(now_hour);
            match &mut out {
                Some(o) => o.ops.extend(w.ops),
                None => out = Some(w),
            }
        }
        out
    }

    /// Completes the current hour and starts `next`: its records final, added to its day's,
    /// with the cursors and the writer's state, synced.
    fn complete(&mut self, next: u64) -> Write {
        let hour = self.hour;
        let day = hour / 24;
        if day != self.day {
            self.day_acc.clear();
            self.day = day;
        }
        let mut ops = Vec::new();
        for ((user, device), rec) in std::mem::take(&mut self.hour_acc) {
            ops.push(Op::Put(
                keys::usage_hour(hour, &user, &device),
                rec.encode(),
            ));
            let d = self
                .day_acc
                .entry((user.clone(), device.clone()))
                .or_default();
            d.add(&rec);
            ops.push(Op::Put(keys::usage_day(day, &user, &device), d.encode()));
        }
        self.dirty.clear();
        self.completed = Some(hour);
        self.hour = next;
        ops.extend(self.cursor_ops());
        ops.push(self.meta_op());
        Write { ops, sync: true }
    }

    fn cursor_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.dirty_cursors)
            .into_iter()
            .map(|id| match self.cursors.get(&id) {
                Some(c) => Op::Put(
                    keys::usage_cursor(id),
                    serde_json::to_vec(c).expect("cursors encode"),
                ),
                None => Op::Delete(keys::usage_cursor(id)),
            })
            .collect()
    }

    fn meta_op(&self) -> Op {
        let meta = Meta {
            hour: self.hour,
            completed: self.completed,
        };
        Op::Put(
            keys::USAGE_META.to_owned(),
            serde_json::to_vec(&meta).expect("meta encodes"),
        )
    }

    /// The current hour so far (the records changed since the last write) and the changed
    /// cursors, not synced (see the module docs).
    pub fn checkpoint(&mut self) -> Write {
        let mut ops: Vec<Op> = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|n| {
                let rec = self.hour_acc.get(&n)?;
                Some(Op::Put(
                    keys::usage_hour(self.hour, &n.0, &n.1),
                    rec.encode(),
                ))
            })
            .collect();
        ops.extend(self.cursor_ops());
        ops.push(self.meta_op());
        Write { ops, sync: false }
    }
}

/// The writer: a [`Rollup`] over the store.
#[derive(Debug)]
pub struct UsageWriter {
    store: Arc<Store>,
    rollup: Rollup,
}

fn store_err(e: StoreError) -> ServiceError {
    ServiceError::Store(e)
}

impl UsageWriter {
    /// Opens the writer over `store` at `at` (Unix ms): continues from its checkpoint if there
    /// is one.
    pub fn open(store: Arc<Store>, at: u64) -> Result<UsageWriter, ServiceError> {
        let meta: Option<Meta> = store
            .get_raw(Cf::Usage, keys::USAGE_META)?
            .and_then(|b| serde_json::from_slice(&b).ok());
        let rollup = match meta {
            None => Rollup::new(at),
            Some(meta) => {
                let mut cursors = HashMap::new();
                store.walk_raw(Cf::Usage, keys::USAGE_CURSORS, |k, v| {
                    let Some(id) = k.strip_prefix(keys::USAGE_CURSORS) else {
                        return false;
                    };
                    if let (Ok(id), Ok(c)) = (id.parse::<u32>(), serde_json::from_slice(v)) {
                        cursors.insert(id, c);
                    }
                    true
                })?;
                let read = |prefix: String| -> Result<BTreeMap<Name, UsageRecord>, StoreError> {
                    let mut out = BTreeMap::new();
                    store.walk_raw(Cf::Usage, &prefix, |k, v| {
                        let Some(rest) = k.strip_prefix(prefix.as_str()) else {
                            return false;
                        };
                        if let (Some((u, d)), Some(r)) =
                            (rest.split_once('/'), UsageRecord::decode(v))
                        {
                            out.insert(name_of(u, d), r);
                        }
                        true
                    })?;
                    Ok(out)
                };
                let hours = read(keys::usage_hour_prefix(meta.hour))?;
                let days = read(keys::usage_day_prefix(meta.hour / 24))?;
                Rollup::restore(meta, cursors, hours, days)
            }
        };
        Ok(UsageWriter { store, rollup })
    }

    /// The rollup.
    pub fn rollup(&self) -> &Rollup {
        &self.rollup
    }

    fn apply(&self, w: Write) -> Result<(), ServiceError> {
        let mut batch = Batch::default();
        for op in w.ops {
            match op {
                Op::Put(k, v) => batch.put_raw(Cf::Usage, &k, v),
                Op::Delete(k) => batch.delete(Cf::Usage, &k),
            }
        }
        if w.sync {
            self.store.commit(batch).map_err(store_err)
        } else {
            let _ = self.store.write(batch).map_err(store_err)?;
            Ok(())
        }
    }

    /// Takes a sample (see [`Rollup::sample`]) and writes a completed hour; answers whether
    /// one was.
    pub fn sample(&mut self, at: u64, devices: &[DeviceSample]) -> Result<bool, ServiceError> {
        match self.rollup.sample(at, devices) {
            Some(w) => {
                self.apply(w)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Writes the hour so far and the changed cursors (see [`Rollup::checkpoint`]); `sync`:
    /// on disk when this returns (the last one at shutdown).
    pub fn checkpoint(&mut self, sync: bool) -> Result<(), ServiceError> {
        let mut w = self.rollup.checkpoint();
        w.sync = sync;
        self.apply(w)
    }

    /// Deletes hourly records older than `hourly_days` and daily ones older than `daily_days`
    /// before `now` (Unix ms), in batches; the keys deleted.
    pub fn prune(&self, now: u64, hourly_days: u64, daily_days: u64) -> Result<u64, ServiceError> {
        let hour_cut = hour_of(now).saturating_sub(hourly_days * 24);
        let day_cut = (hour_of(now) / 24).saturating_sub(daily_days);
        let mut n = 0u64;
        for (prefix, end) in [
            (keys::USAGE_HOURS, keys::usage_hour_prefix(hour_cut)),
            (keys::USAGE_DAYS, keys::usage_day_prefix(day_cut)),
        ] {
            loop {
                let mut batch = Batch::default();
                self.store.walk_raw(Cf::Usage, prefix, |k, _| {
                    if k >= end.as_str() || !k.starts_with(prefix) || batch.len() >= PRUNE_BATCH {
                        return false;
                    }
                    batch.delete(Cf::Usage, k);
                    true
                })?;
                if batch.is_empty() {
                    break;
                }
                n += batch.len() as u64;
                self.store.commit(batch).map_err(store_err)?;
            }
        }
        Ok(n)
    }
}

/// What the writer's thread is asked.
#[derive(Debug)]
pub enum WriterCmd {
    /// Sample and checkpoint now, then answer (a report wants the usage up to now).
    Flush(mpsc::Sender<()>),
    /// Take a last sample, write a synced checkpoint and end (the agent's shutdown).
    Stop,
}

/// The usage feature: the device samples the writer takes and the reports.
pub struct Usage {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
    live: Arc<LiveSessions>,
    writer: Mutex<Option<mpsc::Sender<WriterCmd>>>,
}

impl std::fmt::Debug for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage").finish_non_exhaustive()
    }
}

/// Unix milliseconds of `t`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long the report waits for the writer's flush before reading what is stored.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

impl Usage {
    /// The feature over the shared core, directory, policy and open sessions.
    pub fn new(
        core: Arc<Core>,
        dir: Arc<Directory>,
        policy: Arc<Policy>,
        live: Arc<LiveSessions>,
    ) -> Usage {
        Usage {
            core,
            dir,
            policy,
            live,
            writer: Mutex::new(None),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.core.store
    }

    /// Every device and proxy identity now: counters, connected, sessions opened.
    pub fn read_devices(&self) -> Result<Vec<DeviceSample>, ServiceError> {
        let online: HashSet<PublicKey> = self
            .core
            .tunnel
            .peers()
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| p.key)
            .collect();
        let started = self.live.started();
        let peers: Vec<super::domain::Peer> = self
            .dir
            .with_records(|recs| recs.map(|r| r.peer.clone()).collect());
        let proxies = self.dir.all_proxies();
        let mut out = Vec::with_capacity(peers.len() + proxies.len());
        // A proxy identity is a device of its user named by its protocol (a device may not take
        // that name), keyed by its usage key; online while it has a connection open.
        for rec in proxies {
            let a = rec.access;
            let key = super::proxies::usage_key(&a.user, a.protocol);
            let k = self.core.plane.peer_stats(a.id)?;
            out.push(DeviceSample {
                id: a.id,
                key,
                user: a.user.to_string(),
                device: a.protocol.as_str().to_owned(),
                counters: Counters::from_kernel(&k, started.get(&key).copied().unwrap_or(0)),
                online: self.core.proxies.open_count(a.id) > 0,
            });
        }
        for p in peers {
            let k = self.core.plane.peer_stats(p.id)?;
            out.push(DeviceSample {
                id: p.id,
                key: p.public_key,
                user: p.user.to_string(),
                device: p.device.to_string(),
                counters: Counters::from_kernel(
                    &k,
                    started.get(&p.public_key).copied().unwrap_or(0),
                ),
                online: online.contains(&p.public_key),
            });
        }
        Ok(out)
    }

    /// Asks the running writer (if any) to sample and checkpoint now, and waits (at most
    /// [`FLUSH_WAIT`]) until it has.
    pub fn flush(&self) {
        let tx = self.writer.lock().unwrap().clone();
        if let Some(tx) = tx {
            let (done, wait) = mpsc::channel();
            if tx.send(WriterCmd::Flush(done)).is_ok() {
                let _ = wait.recv_timeout(FLUSH_WAIT);
            }
        }
    }

    /// Stops the writer started by [`start_writer`] (it writes a last, synced checkpoint; join
    /// its thread to wait for it).
    pub fn stop_writer(&self) {
        if let Some(tx) = self.writer.lock().unwrap().take() {
            let _ = tx.send(WriterCmd::Stop);
        }
    }

    /// The policy (quota standing, groups) for reports.
    pub(crate) fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }
}

/// Opens the writer and takes its first sample at once (the baseline of a first start, so
/// devices added from now on count from zero; after a restart, what the devices counted since
/// the checkpoint), before the API serves; then starts the writer's thread (see the module
/// docs), which runs until [`Usage::stop_writer`] and then takes a last sample and writes a
/// synced checkpoint.
pub fn start_writer(usage: Arc<Usage>) -> Result<std::thread::JoinHandle<()>, WriterError> {
    let mut w = UsageWriter::open(usage.store().clone(), unix_ms(SystemTime::now()))
        .map_err(WriterError::Open)?;
    if let Err(e) = usage.sample_into(&mut w).and_then(|_| w.checkpoint(false)) {
        tracing::warn!(error = %e, "usage sample failed; retrying at the next");
    }
    let (tx, rx) = mpsc::channel();
    *usage.writer.lock().unwrap() = Some(tx);
    std::thread::Builder::new()
        .name("usage".into())
        .spawn(move || run_writer(&usage, w, &rx))
        .map_err(WriterError::Spawn)
}

/// Why the writer could not start.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// Its state could not be read from the store.
    #[error("cannot read the usage rollups' checkpoint")]
    Open(#[source] ServiceError),
    /// Its thread could not be started.
    #[error("cannot start the usage writer's thread")]
    Spawn(#[source] std::io::Error),
}

/// Milliseconds until the next multiple of [`SAMPLE`] after `now` (Unix ms).
fn until_next_sample(now: u64) -> Duration {
    let s = SAMPLE.as_millis() as u64;
    Duration::from_millis(s - now % s)
}

impl Usage {
    /// Reads every device and hands the sample to `w`; whether it completed an hour.
    fn sample_into(&self, w: &mut UsageWriter) -> Result<bool, ServiceError> {
        let devices = self.read_devices()?;
        w.sample(unix_ms(SystemTime::now()), &devices)
    }
}

/// The writer's loop (see the module docs).
fn run_writer(usage: &Usage, mut w: UsageWriter, rx: &mpsc::Receiver<WriterCmd>) {
    let now = || unix_ms(SystemTime::now());
    let prune = |w: &UsageWriter| match w.prune(now(), HOURLY_RETENTION_DAYS, DAILY_RETENTION_DAYS)
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(records = n, "usage rollups pruned to their retention"),
        Err(e) => tracing::warn!(error = %e, "usage pruning failed; retrying in an hour"),
    };
    prune(&w);
    let mut last_checkpoint = std::time::Instant::now();
    let mut stop = false;
    while !stop {
        let mut flush: Vec<mpsc::Sender<()>> = Vec::new();
        match rx.recv_timeout(until_next_sample(now())) {
            Ok(WriterCmd::Flush(done)) => flush.push(done),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(WriterCmd::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => stop = true,
        }
        match usage.sample_into(&mut w) {
            Ok(true) => prune(&w),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "usage sample failed; retrying at the next"),
        }
        if stop || !flush.is_empty() || last_checkpoint.elapsed() >= CHECKPOINT {
            if let Err(e) = w.checkpoint(stop) {
                tracing::warn!(error = %e, "usage checkpoint failed; retrying at the next");
            }
            last_checkpoint = std::time::Instant::now();
        }
        for done in flush {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests;
