//! Failed handshakes, counted per source prefix with a fixed memory and O(1) work per packet.
//!
//! Any handshake-sized datagram with a bad MAC, from any (spoofed) address, is a failed
//! handshake, so what the agent keeps and reports about them must not grow with the sources
//! an attacker can forge. [`AuthTable`] is what the `wg-udp` thread does per failure, and what
//! the `wg-timers` thread turns into [`AuthReport`]s every [`INTERVAL`]:
//!
//! - **Prefixes, not addresses**: failures are counted per (/24 for IPv4, /64 for IPv6, the
//!   reason) with first/last seen, a sample source and the last key claimed.
//! - **Fixed memory**: [`SETS`] sets of [`WAYS`] slots (4 096 slots, about
//!   `4 096 × size_of::<Slot>()` ≈ 0.6 MiB, allocated once). A failure hashes its prefix
//!   (SipHash with a per-process key, so an attacker cannot aim many prefixes at one set) to a
//!   set and looks at its four slots: a hit adds one, a miss replaces the empty or least
//!   recently seen slot. The count of an evicted slot is not lost: it goes to the "other"
//!   tally of its family and reason (reported as `0.0.0.0/0` or `::/0`). No step scans the
//!   table per packet.
//! - **Bounded reports**: the first failure of a prefix is reported at once (count 1, so an
//!   admin sees a misconfigured client immediately), at most [`IMMEDIATE`] per interval. Every
//!   [`INTERVAL`] the flush reports the [`FLUSHED`] slots with the most failures not yet
//!   reported (a slot is reported at most once per interval), folds the remaining counts into
//!   the "other" tallies and reports those (at most 8: 2 families × 4 reasons, in practice 1
//!   or 2). So at most `IMMEDIATE + FLUSHED + 8` = 24 reports per 10 s, whatever the flood,
//!   and the counts of all reports add up to every failure seen.
//! - **One log line**: the flush logs a summary (failures, prefixes, the top one) at most once
//!   per [`LOG_EVERY`], never a line per packet.

use std::{
    hash::{BuildHasher as _, RandomState},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use super::{events::AuthFailure, keys::PublicKey};
use crate::net::Cidr;

/// Slots per set.
pub const WAYS: usize = 4;
/// Sets (a power of two): 4 096 slots in all.
pub const SETS: usize = 1024;
/// The flush period, and the least time between two reports of one prefix.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Prefixes reported at their first failure per interval.
pub const IMMEDIATE: usize = 8;
/// Prefixes reported by each flush (those with the most failures).
pub const FLUSHED: usize = 8;
/// At most one summary log line per this period.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// What one report says: failures of one prefix (or of the "other" prefixes) and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthReport {
    /// The /24 or /64 of the sources; `0.0.0.0/0` or `::/0` for the tally of prefixes that
    /// were evicted or not among the most frequent.
    pub prefix: Cidr,
    /// The last source seen (`ip:port`).
    pub sample: SocketAddr,
    /// The last key claimed, when one could be read.
    pub public_key: Option<PublicKey>,
    /// Why the handshakes failed.
    pub reason: AuthFailure,
    /// How many failed since the prefix's previous report.
    pub count: u64,
    /// The first of them.
    pub first_seen: SystemTime,
    /// The last of them.
    pub last_seen: SystemTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    /// The prefix's network bits (IPv4 in the low 32 bits).
    net: u128,
    v6: bool,
    reason: AuthFailure,
}

impl Key {
    fn of(ip: IpAddr, reason: AuthFailure) -> Key {
        match ip {
            IpAddr::V4(a) => Key {
                net: u128::from(u32::from(a) & 0xffff_ff00),
                v6: false,
                reason,
            },
            IpAddr::V6(a) => Key {
                net: u128::from(a) & !((1u128 << 64) - 1),
                v6: true,
                reason,
            },
        }
    }

    fn prefix(self) -> Cidr {
        let (net, len) = if self.v6 {
            (IpAddr::V6(Ipv6Addr::from(self.net)), 64)
        } else {
            (IpAddr::V4(Ipv4Addr::from(self.net as u32)), 24)
        };
        // The host bits are zero by construction.
        match net {
            IpAddr::V4(a) => Cidr::v4(a, len),
            IpAddr::V6(a) => Cidr::v6(a, len),
        }
        .unwrap_or_else(|_| Cidr::host(net))
    }

    /// The index of its "other" tally.
    fn other(self) -> usize {
        usize::from(self.v6) * 4 + reason_index(self.reason)
    }
}

fn reason_index(r: AuthFailure) -> usize {
    match r {
        AuthFailure::UnknownKey => 0,
        AuthFailure::BadMac => 1,
        AuthFailure::Undecryptable => 2,
        AuthFailure::Rejected => 3,
    }
}

const REASONS: [AuthFailure; 4] = [
    AuthFailure::UnknownKey,
    AuthFailure::BadMac,
    AuthFailure::Undecryptable,
    AuthFailure::Rejected,
];

/// Failures not yet reported.
#[derive(Clone, Copy, Debug)]
struct Tally {
    count: u64,
    first: SystemTime,
    last: SystemTime,
    sample: SocketAddr,
    public_key: Option<PublicKey>,
}

impl Tally {
    fn one(src: SocketAddr, public_key: Option<PublicKey>, at: SystemTime) -> Tally {
        Tally {
            count: 1,
            first: at,
            last: at,
            sample: src,
            public_key,
        }
    }

    fn add(&mut self, src: SocketAddr, public_key: Option<PublicKey>, at: SystemTime) {
        if self.count == 0 {
            self.first = at;
        }
        self.count += 1;
        self.last = at;
        self.sample = src;
        if public_key.is_some() {
            self.public_key = public_key;
        }
    }

    fn merge(&mut self, other: &Tally) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count += other.count;
        self.first = self.first.min(other.first);
        if other.last >= self.last {
            self.last = other.last;
            self.sample = other.sample;
            self.public_key = other.public_key.or(self.public_key);
        }
    }
}

/// One prefix and reason's failures.
#[derive(Clone, Copy, Debug)]
struct Slot {
    key: Key,
    tally: Tally,
    last_seen: Instant,
    last_report: Option<Instant>,
}

/// The table. See the module docs.
pub struct AuthTable {
    slots: Box<[Option<Slot>]>,
    hasher: RandomState,
    other: [Option<Tally>; 8],
    /// Immediate reports left in this interval.
    budget: usize,
    next_flush: Instant,
    /// Since the last summary line: failures, and when it was.
    logged_failures: u64,
    last_log: Instant,
    /// Failures seen, ever.
    failures: u64,
}

impl std::fmt::Debug for AuthTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthTable")
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl AuthTable {
    /// An empty table whose first flush is due at `now + INTERVAL`.
    pub fn new(now: Instant) -> AuthTable {
        AuthTable {
            slots: vec![None; SETS * WAYS].into_boxed_slice(),
            hasher: RandomState::new(),
            other: [None; 8],
            budget: IMMEDIATE,
            next_flush: now + INTERVAL,
            logged_failures: 0,
            last_log: now,
            failures: 0,
        }
    }

    /// The slots (fixed: the table never grows).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Failures counted since the table was made.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Counts one failed handshake from `src`: O(1), at most [`WAYS`] slots looked at. Returns
    /// a report to send at once for the first failure of a prefix while this interval's
    /// budget lasts.
    pub fn record(
        &mut self,
        src: SocketAddr,
        public_key: Option<PublicKey>,
        reason: AuthFailure,
        now: Instant,
        at: SystemTime,
    ) -> Option<AuthReport> {
        self.failures += 1;
        self.logged_failures += 1;
        let key = Key::of(src.ip(), reason);
        let base = (self.hasher.hash_one(key) as usize & (SETS - 1)) * WAYS;
        let set = &mut self.slots[base..base + WAYS];
        if let Some(slot) = set.iter_mut().flatten().find(|s| s.key == key) {
            slot.tally.add(src, public_key, at);
            slot.last_seen = now;
            return None;
        }
        // An empty slot, else the least recently seen.
        let victim = (0..WAYS)
            .min_by_key(|&i| set[i].map(|s| (1, s.last_seen)))
            .unwrap_or(0);
        let mut slot = Slot {
            key,
            tally: Tally::one(src, public_key, at),
            last_seen: now,
            last_report: None,
        };
        let mut report = None;
        if self.budget > 0 {
            self.budget -= 1;
            report = Some(report_of(key.prefix(), key.reason, &slot.tally));
            slot.tally.count = 0;
            slot.last_report = Some(now);
        }
        if let Some(old) = set[victim].replace(slot) {
            self.fold(old.key, &old.tally);
        }
        report
    }

    fn fold(&mut self, key: Key, tally: &Tally) {
        if tally.count == 0 {
            return;
        }
        match &mut self.other[key.other()] {
            Some(t) => t.merge(tally),
            o @ None => *o = Some(*tally),
        }
    }

    /// Whether [`AuthTable::flush`] is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_flush
    }

    /// The interval's reports (see the module docs): the [`FLUSHED`] prefixes with the most
    /// failures not reported in the last [`INTERVAL`], then the "other" tallies. Scans the
    /// table once: call it every [`INTERVAL`] ([`AuthTable::due`]), not per packet.
    pub fn flush(&mut self, now: Instant) -> Vec<AuthReport> {
        let mut eligible: Vec<(u64, usize)> = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(slot) = s else { continue };
            let quiet = slot
                .last_report
                .is_none_or(|t| now.saturating_duration_since(t) >= INTERVAL);
            if slot.tally.count > 0 && quiet {
                eligible.push((slot.tally.count, i));
            } else if slot.tally.count == 0
                && now.saturating_duration_since(slot.last_seen) >= INTERVAL
            {
                // Nothing to report and quiet: free the slot.
                *s = None;
            }
        }
        eligible.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        let mut out = Vec::new();
        for (n, &(_, i)) in eligible.iter().enumerate() {
            let Some(slot) = self.slots[i].as_mut() else {
                continue;
            };
            let (key, tally) = (slot.key, slot.tally);
            slot.tally.count = 0;
            if n < FLUSHED {
                slot.last_report = Some(now);
                out.push(report_of(key.prefix(), key.reason, &tally));
            } else {
                self.fold(key, &tally);
            }
        }
        for (i, o) in self.other.iter_mut().enumerate() {
            if let Some(t) = o.take() {
                let any = if i < 4 {
                    Cidr::v4(Ipv4Addr::UNSPECIFIED, 0)
                } else {
                    Cidr::v6(Ipv6Addr::UNSPECIFIED, 0)
                };
                if let Ok(any) = any {
                    out.push(report_of(any, REASONS[i % 4], &t));
                }
            }
        }
        self.budget = IMMEDIATE;
        self.next_flush = now + INTERVAL;
        if self.logged_failures > 0 && now.saturating_duration_since(self.last_log) >= LOG_EVERY {
            let top = out.iter().max_by_key(|r| r.count);
            tracing::info!(
                failures = self.logged_failures,
                seconds = now.saturating_duration_since(self.last_log).as_secs(),
                top_prefix = top.map(|r| r.prefix.to_string()),
                top_count = top.map(|r| r.count),
                "failed handshakes (summary; each prefix is in the history)"
            );
            self.logged_failures = 0;
            self.last_log = now;
        }
        out
    }
}

fn report_of(prefix: Cidr, reason: AuthFailure, t: &Tally) -> AuthReport {
    AuthReport {
        prefix,
        sample: t.sample,
        public_key: t.public_key,
        reason,
        count: t.count,
        first_seen: t.first,
        last_seen: t.last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u32, port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(a), port))
    }

    fn total(reports: &[AuthReport]) -> u64 {
        reports.iter().map(|r| r.count).sum()
    }

    #[test]
    fn one_prefix_is_reported_at_once_then_counted_and_flushed_once_per_interval() {
        let t0 = Instant::now();
        let at = SystemTime::now();
        let mut t = AuthTable::new(t0);
        let first = t
            .record(v4(0x0a00_0001, 1), None, AuthFailure::BadMac, t0, at)
            .expect("the first failure of a prefix is reported at once");
        assert_eq!(first.prefix.to_string(), "10.0.0.0/24");
        assert_eq!(first.count, 1);
        // The rest of the /24 (other hosts, other ports) is the same prefix: counted, silent.
        for i in 0..999u32 {
            assert!(
                t.record(
                    v4(0x0a00_0000 | (i % 256), 2),
                    None,
                    AuthFailure::BadMac,
                    t0,
                    at
                )
                .is_none()
            );
        }
        assert!(!t.due(t0 + INTERVAL / 2));
        assert!(t.due(t0 + INTERVAL));
        let r = t.flush(t0 + INTERVAL);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0].prefix.to_string(), r[0].count),
            ("10.0.0.0/24".into(), 999)
        );
        assert_eq!(r[0].reason, AuthFailure::BadMac);
        // Nothing new: nothing reported.
        assert!(t.flush(t0 + 2 * INTERVAL).is_empty());
        assert_eq!(t.failures(), 1000);
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_and_reasons_apart() {
        let t0 = Instant::now();
        let at = SystemTime::now();
        let mut t = AuthTable::new(t0);
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        let r1 = t.record((a, 1).into(), None, AuthFailure::BadMac, t0, at);
        assert_eq!(r1.unwrap().prefix.to_string(), "2001:db8:1:2::/64");
        assert!(
            t.record((b, 1).into(), None, AuthFailure::BadMac, t0, at)
                .is_none()
        );
        // Another reason is another tally.
        let r2 = t.record((b, 1).into(), None, AuthFailure::UnknownKey, t0, at);
        assert_eq!(r2.unwrap().reason, AuthFailure::UnknownKey);
    }

    #[test]
    fn a_flood_of_random_sources_keeps_memory_and_reports_bounded_and_counts_exact() {
        let t0 = Instant::now();
        let at = SystemTime::now();
        let mut t = AuthTable::new(t0);
        let cap = t.capacity();
        assert_eq!(cap, SETS * WAYS);
        let mut reports = Vec::new();
        let mut x: u32 = 0x1234_5678;
        let n = 1_000_000u64;
        for i in 0..n {
            // xorshift: a million sources from all over the address space.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let now = t0 + Duration::from_micros(i * 10);
            reports.extend(t.record(v4(x, 9), None, AuthFailure::BadMac, now, at));
            if t.due(now) {
                let r = t.flush(now);
                assert!(r.len() <= FLUSHED + 8, "{} reports in one flush", r.len());
                reports.extend(r);
            }
            assert_eq!(t.capacity(), cap, "the table grew");
        }
        let end = t0 + Duration::from_micros(n * 10) + INTERVAL;
        reports.extend(t.flush(end));
        // 10 s of flood = one interval: 8 at once, then 8 flushed prefixes and one "other".
        let intervals = 1 + (n * 10 / 1_000_000 / INTERVAL.as_secs()) as usize + 1;
        assert!(
            reports.len() <= intervals * (IMMEDIATE + FLUSHED + 8),
            "{} reports for {intervals} intervals",
            reports.len()
        );
        assert_eq!(total(&reports), n, "every failure is in some report");
        assert!(
            reports
                .iter()
                .any(|r| r.prefix.to_string() == "0.0.0.0/0" && r.count > n / 2),
            "the evicted prefixes are in the other tally"
        );
    }

    #[test]
    fn eviction_is_lru_within_a_set_and_keeps_the_count() {
        let t0 = Instant::now();
        let at = SystemTime::now();
        let mut t = AuthTable::new(t0);
        t.budget = 0;
        // Fill one set with WAYS + 1 prefixes: find prefixes hashing to the same set.
        let set_of = |t: &AuthTable, ip: u32| {
            t.hasher
                .hash_one(Key::of(IpAddr::V4(Ipv4Addr::from(ip)), AuthFailure::BadMac))
                as usize
                & (SETS - 1)
        };
        let target = set_of(&t, 0x0101_0100);
        let same: Vec<u32> = (0u32..)
            .map(|i| 0x0101_0100u32.wrapping_add(i << 8))
            .filter(|&ip| set_of(&t, ip) == target)
            .take(WAYS + 1)
            .collect();
        for (i, &ip) in same.iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            // Two failures each, so each slot holds a count.
            t.record(v4(ip, 1), None, AuthFailure::BadMac, now, at);
            t.record(v4(ip, 1), None, AuthFailure::BadMac, now, at);
        }
        let r = t.flush(t0 + INTERVAL);
        let prefixes: Vec<String> = r.iter().map(|r| r.prefix.to_string()).collect();
        let oldest = Key::of(IpAddr::V4(Ipv4Addr::from(same[0])), AuthFailure::BadMac).prefix();
        assert!(
            !prefixes.contains(&oldest.to_string()),
            "the least recently seen was evicted: {prefixes:?}"
        );
        let other = r
            .iter()
            .find(|r| r.prefix.to_string() == "0.0.0.0/0")
            .unwrap();
        assert_eq!(other.count, 2, "its count went to the other tally");
        assert_eq!(total(&r), 2 * (WAYS as u64 + 1));
    }

    #[test]
    fn immediate_reports_are_capped_per_interval() {
        let t0 = Instant::now();
        let at = SystemTime::now();
        let mut t = AuthTable::new(t0);
        let immediate = (0..100u32)
            .filter_map(|i| t.record(v4(i << 8, 1), None, AuthFailure::BadMac, t0, at))
            .count();
        assert_eq!(immediate, IMMEDIATE);
        let r = t.flush(t0 + INTERVAL);
        assert!(r.len() <= FLUSHED + 1, "{r:?}");
        assert_eq!(total(&r), 100 - IMMEDIATE as u64);
    }
}
