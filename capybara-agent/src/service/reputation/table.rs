//! The per-source score table: fixed memory, O(1) work per failure, pure (time is an argument).
//!
//! [`ScoreTable`] is what the `wg-udp` thread touches per failed handshake (through the
//! engine's lock), so it never grows and never scans: [`SETS`] sets of [`WAYS`] slots
//! (16 384 slots of at most 136 bytes on x86-64, ≈ 2.1 MiB, allocated once). A source hashes
//! (SipHash with a per-process key, so an attacker cannot aim sources at one set) to a set and
//! looks at its four slots: a hit adds the part's weight; a miss takes an empty slot or evicts
//! the slot with the **lowest score** (ties: the least recently seen). A flood of forged
//! sources, each with one failure, thus evicts only sources with about one failure: a source
//! that keeps failing stays, whatever else the flood sends (`forged_flood_keeps_the_real_offender`).
//!
//! Scores are in tenths of a bad handshake (a failed handshake weighs [`UNIT`]) and decay by
//! halving once per [`HALF_LIFE`] since the slot's anchor, lazily when the slot is next touched
//! (or read): `score = Σ_part ⌊…⌊weight × count_in_period⌋ / 2⌋ … / 2⌋`, halved once per full
//! period that passed. Within one period nothing decays, so 20 bad handshakes within
//! [`HALF_LIFE`] of a source's first are exactly 20 bad handshakes' worth.

use std::{
    hash::{BuildHasher as _, RandomState},
    net::IpAddr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Slots per set.
pub const WAYS: usize = 4;
/// Sets (a power of two): 16 384 slots in all.
pub const SETS: usize = 4096;
/// One bad handshake's worth, in score units (tenths).
pub const UNIT: u32 = 10;
/// The score halves once per this period.
pub const HALF_LIFE: Duration = Duration::from_secs(600);

/// What counts against a source. Weights in score units ([`UNIT`] = one bad handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// A handshake whose MAC does not match our key (garbage, or the wrong server): 1.0.
    BadMac,
    /// A well-formed initiation from a key that is no peer: 1.0.
    UnknownKey,
    /// An initiation whose static key could not be decrypted: 1.0.
    Undecryptable,
    /// A peer's initiation its session refused (a replayed timestamp, a wrong preshared
    /// key): 1.0.
    Replay,
    /// A new flow of a device connecting from the source refused at its flow limit (the
    /// kernel's rate-limited event, at most one per device per event interval): 0.5.
    FlowLimit,
    /// A packet of a device connecting from the source dropped at the admission gate (held:
    /// MFA pending, kicked, expired, …; at most one event per device per interval): 0.25
    /// (rounded down to 2 units).
    GateDrop,
    /// A connection to the Shadowsocks or VLESS endpoint that no user's credential opens, or
    /// whose header is not the protocol's (a probe, a scanner, a wrong key): 1.0. It took a TCP
    /// handshake (and a TLS one for VLESS), so its source is not spoofed.
    ProxyAuth,
}

impl Part {
    /// Every part, in the order of [`Tallies`].
    pub const ALL: [Part; 7] = [
        Part::BadMac,
        Part::UnknownKey,
        Part::Undecryptable,
        Part::Replay,
        Part::FlowLimit,
        Part::GateDrop,
        Part::ProxyAuth,
    ];

    /// Its weight in score units.
    pub const fn weight(self) -> u32 {
        match self {
            Part::BadMac
            | Part::UnknownKey
            | Part::Undecryptable
            | Part::Replay
            | Part::ProxyAuth => UNIT,
            Part::FlowLimit => UNIT / 2,
            Part::GateDrop => UNIT / 4,
        }
    }

    /// The wire name (`bad-mac`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Part::BadMac => "bad-mac",
            Part::UnknownKey => "unknown-key",
            Part::Undecryptable => "undecryptable",
            Part::Replay => "replay",
            Part::FlowLimit => "flow-limit",
            Part::GateDrop => "gate-drop",
            Part::ProxyAuth => "proxy-auth",
        }
    }

    /// The part of a wire name.
    pub fn parse(s: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.as_str() == s)
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// One part of a source's score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Events counted since the source's slot was made (not decayed).
    pub count: u32,
    /// Its share of the score, decayed (score units).
    pub score: u32,
}

/// A source's parts, in the order of [`Part::ALL`].
pub type Tallies = [Tally; 7];

/// A source whose score reached the threshold ([`ScoreTable::record`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crossing {
    /// The source.
    pub ip: IpAddr,
    /// Its score (units) when it crossed.
    pub score: u32,
    /// Its parts then.
    pub parts: Tallies,
    /// When its slot was made (table time).
    pub first_seen: Duration,
}

/// A source's state as [`ScoreTable::get`] answers it (decayed to the time asked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceScore {
    /// Total score (units).
    pub score: u32,
    /// Its parts.
    pub parts: Tallies,
    /// When the slot was made, last touched, and will next halve (table time).
    pub first_seen: Duration,
    /// The last event.
    pub last_seen: Duration,
    /// The next halving.
    pub next_halving: Duration,
    /// Handed to the blocker and not yet handled.
    pub pending: bool,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    ip: IpAddr,
    parts: Tallies,
    /// Start of the current decay period.
    anchor: Duration,
    first_seen: Duration,
    last_seen: Duration,
    pending: bool,
}

impl Slot {
    fn decay(&mut self, now: Duration) {
        let periods = now.saturating_sub(self.anchor).as_secs() / HALF_LIFE.as_secs();
        if periods == 0 {
            return;
        }
        let shift = periods.min(31) as u32;
        for t in &mut self.parts {
            t.score >>= shift;
        }
        self.anchor += HALF_LIFE * periods as u32;
    }

    fn score(&self) -> u32 {
        self.parts.iter().map(|t| t.score).sum()
    }
}

/// What the table counted, for the metrics and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Events recorded.
    pub events: u64,
    /// Slots evicted for a new source.
    pub evicted: u64,
    /// Slots in use.
    pub tracked: usize,
}

/// The table. See the module docs.
pub struct ScoreTable {
    slots: Box<[Option<Slot>]>,
    hasher: RandomState,
    stats: TableStats,
}

impl std::fmt::Debug for ScoreTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScoreTable")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Default for ScoreTable {
    fn default() -> Self {
        ScoreTable::new()
    }
}

impl ScoreTable {
    /// An empty table.
    pub fn new() -> ScoreTable {
        ScoreTable {
            slots: vec![None; SETS * WAYS].into_boxed_slice(),
            hasher: RandomState::new(),
            stats: TableStats::default(),
        }
    }

    /// The slots (fixed: the table never grows).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// What the table counted.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    fn set_of(&self, ip: IpAddr) -> usize {
        (self.hasher.hash_one(ip) as usize & (SETS - 1)) * WAYS
    }

    fn find(&mut self, ip: IpAddr) -> Option<&mut Slot> {
        let base = self.set_of(ip);
        self.slots[base..base + WAYS]
            .iter_mut()
            .flatten()
            .find(|s| s.ip == ip)
    }

    /// Counts one event of `part` from `ip` at `now` (table time: any monotonic clock): O(1),
    /// at most [`WAYS`] slots looked at. Answers a [`Crossing`] when the source's score
    /// reaches `threshold` units and it is not already with the blocker (it is then marked
    /// pending until [`ScoreTable::forget`] or [`ScoreTable::unpend`]).
    pub fn record(
        &mut self,
        ip: IpAddr,
        part: Part,
        now: Duration,
        threshold: u32,
    ) -> Option<Crossing> {
        self.stats.events += 1;
        let base = self.set_of(ip);
        let set = &mut self.slots[base..base + WAYS];
        let i = match set.iter().position(|s| s.is_some_and(|s| s.ip == ip)) {
            Some(i) => i,
            None => {
                // An empty slot, else the lowest score (the least recently seen of equals).
                let victim = (0..WAYS)
                    .min_by_key(|&i| {
                        set[i].map(|mut s| {
                            s.decay(now);
                            (1, s.score(), s.last_seen)
                        })
                    })
                    .unwrap_or(0);
                if set[victim].is_some() {
                    self.stats.evicted += 1;
                } else {
                    self.stats.tracked += 1;
                }
                set[victim] = Some(Slot {
                    ip,
                    parts: Tallies::default(),
                    anchor: now,
                    first_seen: now,
                    last_seen: now,
                    pending: false,
                });
                victim
            }
        };
        let slot = set[i].as_mut()?;
        slot.decay(now);
        let t = &mut slot.parts[part.index()];
        t.count = t.count.saturating_add(1);
        t.score = t.score.saturating_add(part.weight());
        slot.last_seen = now;
        let score = slot.score();
        if score < threshold || slot.pending {
            return None;
        }
        slot.pending = true;
        Some(Crossing {
            ip,
            score,
            parts: slot.parts,
            first_seen: slot.first_seen,
        })
    }

    /// A source's score decayed to `now`, if it has a slot.
    pub fn get(&mut self, ip: IpAddr, now: Duration) -> Option<SourceScore> {
        let slot = self.find(ip)?;
        slot.decay(now);
        Some(SourceScore {
            score: slot.score(),
            parts: slot.parts,
            first_seen: slot.first_seen,
            last_seen: slot.last_seen,
            next_halving: slot.anchor + HALF_LIFE,
            pending: slot.pending,
        })
    }

    /// The blocker handled the source (blocked it, or found it allowed): it starts over.
    pub fn forget(&mut self, ip: IpAddr) {
        let base = self.set_of(ip);
        for s in &mut self.slots[base..base + WAYS] {
            if s.is_some_and(|s| s.ip == ip) {
                *s = None;
                self.stats.tracked -= 1;
            }
        }
    }

    /// The blocker could not take the source (its queue was full): its next event crosses
    /// again.
    pub fn unpend(&mut self, ip: IpAddr) {
        if let Some(s) = self.find(ip) {
            s.pending = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const T20: u32 = 20 * UNIT;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn twenty_bad_handshakes_cross_once_at_the_twentieth() {
        let mut t = ScoreTable::new();
        let a = ip(0xc000_0201);
        for i in 0..19 {
            assert_eq!(t.record(a, Part::BadMac, secs(i), T20), None, "#{}", i + 1);
        }
        let c = t
            .record(a, Part::UnknownKey, secs(19), T20)
            .expect("crossed");
        assert_eq!(c.score, 200);
        assert_eq!(
            c.parts[0],
            Tally {
                count: 19,
                score: 190
            }
        );
        assert_eq!(
            c.parts[1],
            Tally {
                count: 1,
                score: 10
            }
        );
        // Pending: more failures do not cross again until the blocker handled it.
        assert_eq!(t.record(a, Part::BadMac, secs(20), T20), None);
        t.forget(a);
        assert_eq!(t.get(a, secs(21)), None);
        assert_eq!(t.stats().tracked, 0);
    }

    #[test]
    fn weights_are_as_documented() {
        let mut t = ScoreTable::new();
        let a = ip(7);
        for p in Part::ALL {
            t.record(a, p, secs(0), u32::MAX);
        }
        let s = t.get(a, secs(0)).unwrap();
        assert_eq!(s.score, 10 + 10 + 10 + 10 + 5 + 2 + 10);
        assert_eq!(
            s.parts.map(|p| p.score),
            [10, 10, 10, 10, 5, 2, 10],
            "bad-mac, unknown-key, undecryptable, replay, flow-limit, gate-drop, proxy-auth"
        );
        // 40 flow-limit events are 20 bad handshakes' worth.
        let b = ip(8);
        let crossed = (0..40)
            .filter_map(|i| t.record(b, Part::FlowLimit, secs(i), T20))
            .count();
        assert_eq!(crossed, 1);
    }

    #[test]
    fn the_score_halves_once_per_half_life_and_counts_stay() {
        let mut t = ScoreTable::new();
        let a = ip(9);
        for _ in 0..16 {
            t.record(a, Part::BadMac, secs(0), T20);
        }
        assert_eq!(
            t.get(a, secs(599)).unwrap().score,
            160,
            "no decay within a period"
        );
        assert_eq!(t.get(a, secs(600)).unwrap().score, 80);
        let s = t.get(a, secs(1800)).unwrap();
        assert_eq!((s.score, s.parts[0].count), (20, 16));
        assert_eq!(s.next_halving, secs(2400));
        // Decayed to 2 failures' worth: 18 more are needed to cross.
        let crossed: Vec<_> = (0..18)
            .map(|i| t.record(a, Part::BadMac, secs(1800 + i), T20).is_some())
            .collect();
        assert_eq!(crossed.iter().filter(|c| **c).count(), 1);
        assert!(crossed[17]);
        // Long quiet: everything decayed away, without overflowing the shift.
        assert_eq!(t.get(a, secs(1_000_000)).unwrap().score, 0);
    }

    #[test]
    fn a_full_queue_lets_the_next_event_cross_again() {
        let mut t = ScoreTable::new();
        let a = ip(10);
        let c = (0..20).find_map(|i| t.record(a, Part::BadMac, secs(i), T20));
        assert!(c.is_some());
        t.unpend(a);
        assert!(t.record(a, Part::BadMac, secs(21), T20).is_some());
    }

    #[test]
    fn forged_flood_is_bounded_and_keeps_the_real_offender() {
        let mut t = ScoreTable::new();
        let cap = t.capacity();
        assert_eq!(cap, SETS * WAYS);
        let offender = ip(0xcb00_7101);
        let mut crossed = Vec::new();
        let mut n: u32 = 0x0100_0000;
        // Two failures from the offender per 10 000 forged sources (one failure each): a
        // million forged sources, 61 times the table's size.
        for round in 0..100u64 {
            for _ in 0..10_000 {
                n = n.wrapping_mul(2_654_435_761).wrapping_add(1);
                if let Some(c) = t.record(ip(n), Part::BadMac, secs(round), T20) {
                    crossed.push(c.ip);
                }
            }
            for _ in 0..2 {
                if let Some(c) = t.record(offender, Part::BadMac, secs(round), T20) {
                    crossed.push(c.ip);
                }
            }
        }
        assert_eq!(t.capacity(), cap, "the table never grows");
        let s = t.stats();
        assert!(s.tracked <= cap, "{s:?}");
        assert!(s.evicted > 900_000, "{s:?}");
        assert_eq!(crossed, vec![offender], "only the offender crossed");
    }

    #[test]
    fn the_table_costs_what_the_docs_say() {
        assert!(
            size_of::<Option<Slot>>() <= 136,
            "{}",
            size_of::<Option<Slot>>()
        );
        assert_eq!(ScoreTable::new().capacity(), 16_384);
    }

    #[test]
    fn ipv6_sources_are_scored_per_address() {
        let mut t = ScoreTable::new();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        for i in 0..19 {
            t.record(a, Part::BadMac, secs(i), T20);
            t.record(b, Part::BadMac, secs(i), T20);
        }
        assert_eq!(t.get(a, secs(20)).unwrap().score, 190);
        assert!(t.record(b, Part::Replay, secs(20), T20).is_some());
    }
}
