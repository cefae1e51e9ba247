//! Peers: dense ids, their allowed IPs, and the maps that attribute an inner address to a peer.
//!
//! Host routes (`/32`, `/128`) go to the exact-match hashes `CAPY_PEER_V4` (key: host-order
//! `u32`) and `CAPY_PEER_V6` (key: octets); shorter prefixes to the LPM tries `CAPY_PEER_V4L` /
//! `CAPY_PEER_V6L` (network-order octets), and `CONFIG_F_PEER_V4_RANGES` / `_V6_RANGES` are set
//! exactly while some peer has such a range, so the common all-host-routes case costs the kernel
//! one hash lookup.
//!
//! The agent keeps a mirror of every peer's allowed IPs, rebuilt from the maps at open, so a
//! restarted agent knows what the kernel holds without being told. Rules:
//! - A peer id that is not active in `CAPY_PEER_HOT` gets its counters zeroed when added, so
//!   a re-used id starts at 0; re-setting an active peer (e.g. after an agent restart) keeps them.
//! - An update that changes allowed IPs inserts the new entries before removing the old ones: a
//!   packet of an address kept across the change is never unattributed.
//! - An allowed IP belongs to at most one peer ([`DataplaneError::AddressInUse`]).
//!
//! ## The hot lines
//! Each peer's policy and traffic counters are one 64-byte line of the mmapable array
//! `CAPY_PEER_HOT` (`capybara_common::peer::PeerHot`, whose docs state the concurrency rules).
//! The agent maps the whole array (8 MiB, resident from the `mmap` on) and reads and writes
//! the lines in place: reading a peer's gate, limits, classes or counters costs no syscall, a
//! policy change stores only the fields that changed (one atomic store each, in the order that
//! publishes an admission whole: [`HotLines::write_info`]), and unchanged fields are not
//! written at all. The start-up policy pass re-states every peer's gate and limits: at 100 000
//! peers that was 300 000 `bpf(2)` calls (read + write of the gate, read of the limits) before
//! the agent kept a copy of the table, and is none now, without the copy (4 MiB).
//!
//! ## Many peers at once
//! [`Dataplane::set_peers`] (the agent's start-up) writes new peers in the same order as
//! `set_peer`: counters zeroed (through the mapping), host routes and pool slots with
//! `BPF_MAP_UPDATE_BATCH` (one syscall per 65 536 entries instead of one per entry), then the
//! activation (through the mapping). The range
//! flags are kept from a count of range entries: recomputing them from every allowed IP after
//! each `set_peer` made 100 000 of them quadratic. Measured (`agent_load`, 100 000 peers with
//! one IPv4 and one IPv6 host route, a /14 pool): `set_peers` takes ≈ 0.45 s (`plane_ms` in the
//! agent's `devices restored from the store` log line: 441 ms), about two thirds of it in the
//! kernel's hash inserts (`perf`), and the agent's copy of the allowed IPs ≈ 25 MiB.
//!
//! ## The IPv4 address pool
//! [`Dataplane::set_peer_pool_v4`] names the tunnel's IPv4 address pool (up to a /12). Every
//! IPv4 host route inside it also gets its slot in the array `CAPY_PEER_POOL4` (peer id + 1), and
//! the kernel attributes addresses in the pool by that one read instead of a hash lookup: at
//! 100 000 peers a hash lookup is a jhash plus two cache misses into 14 MiB of buckets and
//! elements, the pool one read into 400 KiB (4 B per address, peers numbered densely). The hash
//! keeps every host route as well, so changing the pool never leaves a gap: the pool is switched
//! off in the config, its slots rewritten, then switched on again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
    os::fd::AsFd as _,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
};
use capybara_common::{
    config::{CONFIG_F_PEER_V4_RANGES, CONFIG_F_PEER_V6_RANGES},
    maps as names,
    peer::{
        GATE_ADMITTED, MAX_PEER_POOL_V4, MAX_PEERS, PEER_F_ACTIVE, PeerCounters, PeerHot, PeerId,
        PeerInfo, hot,
    },
};

use super::{
    Dataplane, DataplaneError, Owned, Result, map_err,
    stats::{zero_slot, zero_slots},
    sys, sys_err, take,
};

/// The `CAPY_PEER_HOT` array and the agent's mapping of it (see the module docs).
pub(super) struct HotLines {
    /// Kept open for the mapping's sake (and to read the array's size).
    _map: Owned<Array<MapData, PeerHot>>,
    mmap: sys::MmapArray,
}

/// `u32` words per hot line.
const LINE_WORDS: usize = size_of::<PeerHot>() / 4;

impl HotLines {
    pub(super) fn open(ebpf: &mut aya::Ebpf) -> Result<HotLines> {
        let map: Owned<Array<MapData, PeerHot>> = take(ebpf, names::PEER_HOT)?;
        let words = map.map.len() as usize * LINE_WORDS;
        let mmap =
            sys::MmapArray::new(map.fd.as_fd(), words).map_err(sys_err(names::PEER_HOT, "mmap"))?;
        Ok(HotLines { _map: map, mmap })
    }

    /// Number of lines (the array's capacity).
    pub(super) fn len(&self) -> u32 {
        (self.mmap.as_slice().len() / LINE_WORDS) as u32
    }

    fn word32(&self, id: PeerId, offset: usize) -> &AtomicU32 {
        &self.mmap.as_atomic_u32()[id as usize * LINE_WORDS + offset / 4]
    }

    fn word64(&self, id: PeerId, offset: usize) -> &AtomicU64 {
        &self.mmap.as_atomic_u64()[(id as usize * LINE_WORDS + offset / 4) / 2]
    }

    /// Peer `id`'s policy as the line holds it (`id` below [`HotLines::len`]).
    pub(super) fn info(&self, id: PeerId) -> PeerInfo {
        let w = |o| self.word32(id, o).load(Ordering::Acquire);
        PeerInfo {
            flags: w(hot::FLAGS),
            gate: w(hot::GATE),
            deadline_ns: self.word64(id, hot::DEADLINE_NS).load(Ordering::Acquire),
            quota_bucket: w(hot::QUOTA_BUCKET),
            flow_limit: w(hot::FLOW_LIMIT),
            shape_tx: w(hot::SHAPE_TX),
            shape_rx: w(hot::SHAPE_RX),
        }
    }

    /// Stores the fields of `new` that differ from what line `id` holds, one atomic store each,
    /// in the order `capybara_common::peer::PeerHot` states: the independent fields first;
    /// then, for a change that admits, flags and deadline before the gate, and for a change
    /// that holds, the gate before the flags, the deadline kept as it was (see `PeerHot`).
    /// Returns whether anything was stored.
    pub(super) fn write_info(&self, id: PeerId, mut new: PeerInfo) -> bool {
        let old = self.info(id);
        if new.gate != GATE_ADMITTED {
            new.deadline_ns = old.deadline_ns;
        }
        if old == new {
            return false;
        }
        let put = |o, v: u32, was: u32| {
            if v != was {
                self.word32(id, o).store(v, Ordering::Release);
            }
        };
        put(hot::QUOTA_BUCKET, new.quota_bucket, old.quota_bucket);
        put(hot::FLOW_LIMIT, new.flow_limit, old.flow_limit);
        put(hot::SHAPE_TX, new.shape_tx, old.shape_tx);
        put(hot::SHAPE_RX, new.shape_rx, old.shape_rx);
        if new.gate == GATE_ADMITTED {
            put(hot::FLAGS, new.flags, old.flags);
            if new.deadline_ns != old.deadline_ns {
                self.word64(id, hot::DEADLINE_NS)
                    .store(new.deadline_ns, Ordering::Release);
            }
            put(hot::GATE, new.gate, old.gate);
        } else {
            put(hot::GATE, new.gate, old.gate);
            put(hot::FLAGS, new.flags, old.flags);
        }
        true
    }

    /// Peer `id`'s traffic counters (each read atomically).
    pub(super) fn counters(&self, id: PeerId) -> PeerCounters {
        let c = |i: usize| {
            self.word64(id, hot::COUNTERS + 8 * i)
                .load(Ordering::Relaxed)
        };
        PeerCounters {
            rx_packets: c(0),
            rx_bytes: c(1),
            tx_packets: c(2),
            tx_bytes: c(3),
        }
    }

    /// Adds `c` to peer `id`'s traffic counters (atomic adds, as the kernel's).
    pub(super) fn add_counters(&self, id: PeerId, c: PeerCounters) {
        if id >= self.len() {
            return;
        }
        let values = [c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes];
        for (i, v) in values.into_iter().enumerate() {
            if v != 0 {
                self.word64(id, hot::COUNTERS + 8 * i)
                    .fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    /// Sets peer `id`'s traffic counters (zero for a re-used id; a migration's sums).
    pub(super) fn set_counters(&self, id: PeerId, c: PeerCounters) {
        let values = [c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes];
        for (i, v) in values.into_iter().enumerate() {
            self.word64(id, hot::COUNTERS + 8 * i)
                .store(v, Ordering::Relaxed);
        }
    }
}
use crate::net::Cidr;

/// The policy of a peer just added: active, no gate, limits or classes yet.
const ACTIVE: PeerInfo = PeerInfo {
    flags: PEER_F_ACTIVE,
    gate: 0,
    deadline_ns: 0,
    quota_bucket: 0,
    flow_limit: 0,
    shape_tx: 0,
    shape_rx: 0,
};

/// The peer maps and the mirror of their contents.
pub(super) struct PeerMaps {
    pub(super) hot: HotLines,
    v4: Owned<HashMap<MapData, u32, PeerId>>,
    v6: Owned<HashMap<MapData, [u8; 16], PeerId>>,
    v4_lpm: Owned<LpmTrie<MapData, [u8; 4], PeerId>>,
    v6_lpm: Owned<LpmTrie<MapData, [u8; 16], PeerId>>,
    pool_v4: Owned<Array<MapData, u32>>,
    /// The pool as the config says: (first address, length); length 0 = none.
    pub(super) pool: (u32, u32),
    /// Active peers and their allowed IPs.
    pub(super) mirror: BTreeMap<PeerId, BTreeSet<Cidr>>,
    /// Allowed IP → owner.
    owner: StdHashMap<Cidr, PeerId>,
    /// How many entries of `owner` are ranges (not host routes): IPv4, IPv6. Kept so that the
    /// range flags are known without a scan of `owner` (a scan per `set_peer` made loading
    /// 100 000 peers quadratic).
    ranges: [usize; 2],
}

impl PeerMaps {
    /// Opens the peer maps; `migrated` lines (from pins of an older layout) are written into
    /// the hot lines first.
    pub(super) fn open(ebpf: &mut Ebpf, migrated: &[(PeerId, PeerHot)]) -> Result<PeerMaps> {
        let hot = HotLines::open(ebpf)?;
        for &(id, line) in migrated.iter().filter(|(id, _)| *id < hot.len()) {
            hot.write_info(id, line.info);
            hot.set_counters(id, line.counters);
        }
        let mut p = PeerMaps {
            hot,
            v4: take(ebpf, names::PEER_V4)?,
            v6: take(ebpf, names::PEER_V6)?,
            v4_lpm: take(ebpf, names::PEER_V4_LPM)?,
            v6_lpm: take(ebpf, names::PEER_V6_LPM)?,
            pool_v4: take(ebpf, names::PEER_POOL_V4)?,
            pool: (0, 0),
            mirror: BTreeMap::new(),
            owner: StdHashMap::new(),
            ranges: [0, 0],
        };
        p.rebuild()?;
        Ok(p)
    }

    /// Rebuilds the mirror from the kernel maps.
    fn rebuild(&mut self) -> Result<()> {
        for id in 0..self.hot.len() {
            if self.hot.info(id).flags & PEER_F_ACTIVE != 0 {
                self.mirror.insert(id, BTreeSet::new());
            }
        }
        let mut found: Vec<(Cidr, PeerId)> = Vec::new();
        let v4: Vec<(u32, PeerId)> =
            sys::dump_hash(self.v4.fd.as_fd()).map_err(sys_err(names::PEER_V4, "batch lookup"))?;
        found.extend(
            v4.into_iter()
                .map(|(a, id)| (Cidr::host(IpAddr::V4(a.into())), id)),
        );
        let v6: Vec<([u8; 16], PeerId)> =
            sys::dump_hash(self.v6.fd.as_fd()).map_err(sys_err(names::PEER_V6, "batch lookup"))?;
        found.extend(
            v6.into_iter()
                .map(|(a, id)| (Cidr::host(IpAddr::V6(a.into())), id)),
        );
        for k in self.v4_lpm.map.keys() {
            let k = k.map_err(map_err(names::PEER_V4_LPM, "iterate"))?;
            let id = self
                .v4_lpm
                .map
                .get(&k, 0)
                .map_err(map_err(names::PEER_V4_LPM, "read"))?;
            if let Ok(net) = ipnet::Ipv4Net::new(k.data().into(), k.prefix_len() as u8) {
                found.push((Cidr::from(net), id));
            }
        }
        for k in self.v6_lpm.map.keys() {
            let k = k.map_err(map_err(names::PEER_V6_LPM, "iterate"))?;
            let id = self
                .v6_lpm
                .map
                .get(&k, 0)
                .map_err(map_err(names::PEER_V6_LPM, "read"))?;
            if let Ok(net) = ipnet::Ipv6Net::new(k.data().into(), k.prefix_len() as u8) {
                found.push((Cidr::from(net), id));
            }
        }
        for (c, id) in found {
            self.mirror.entry(id).or_default().insert(c);
            self.own(c, id);
        }
        Ok(())
    }

    /// Peer `id`'s policy as its hot line holds it (`id` below `MAX_PEERS`).
    pub(super) fn info(&self, id: PeerId) -> PeerInfo {
        self.hot.info(id)
    }

    /// Records `c` as `id`'s in `owner`.
    fn own(&mut self, c: Cidr, id: PeerId) {
        if self.owner.insert(c, id).is_none() && !c.is_host() {
            self.ranges[usize::from(!c.is_ipv4())] += 1;
        }
    }

    /// Forgets the owner of `c`.
    fn disown(&mut self, c: &Cidr) {
        if self.owner.remove(c).is_some() && !c.is_host() {
            self.ranges[usize::from(!c.is_ipv4())] -= 1;
        }
    }

    /// Number of active peers.
    pub(super) fn count(&self) -> usize {
        self.mirror.len()
    }

    /// The pool slot of IPv4 host address `a`, if the pool holds it.
    fn pool_slot(&self, a: u32) -> Option<u32> {
        let off = a.wrapping_sub(self.pool.0);
        (off < self.pool.1).then_some(off)
    }

    /// Writes pool slot `off` (`None`: empty).
    fn write_slot(&mut self, off: u32, id: Option<PeerId>) -> Result<()> {
        self.pool_v4
            .map
            .set(off, id.map_or(0, |i| i + 1), 0)
            .map_err(map_err(names::PEER_POOL_V4, "write"))
    }

    fn insert(&mut self, c: Cidr, id: PeerId) -> Result<()> {
        match (c.addr(), c.is_host()) {
            (IpAddr::V4(a), true) => {
                self.v4
                    .map
                    .insert(u32::from(a), id, 0)
                    .map_err(map_err(names::PEER_V4, "insert"))?;
                match self.pool_slot(u32::from(a)) {
                    Some(off) => self.write_slot(off, Some(id)),
                    None => Ok(()),
                }
            }
            (IpAddr::V6(a), true) => self
                .v6
                .map
                .insert(a.octets(), id, 0)
                .map_err(map_err(names::PEER_V6, "insert")),
            (IpAddr::V4(a), false) => self
                .v4_lpm
                .map
                .insert(&Key::new(c.prefix_len().into(), a.octets()), id, 0)
                .map_err(map_err(names::PEER_V4_LPM, "insert")),
            (IpAddr::V6(a), false) => self
                .v6_lpm
                .map
                .insert(&Key::new(c.prefix_len().into(), a.octets()), id, 0)
                .map_err(map_err(names::PEER_V6_LPM, "insert")),
        }
    }

    fn remove(&mut self, c: Cidr) -> Result<()> {
        let r = match (c.addr(), c.is_host()) {
            (IpAddr::V4(a), true) => {
                if let Some(off) = self.pool_slot(u32::from(a)) {
                    self.write_slot(off, None)?;
                }
                self.v4
                    .map
                    .remove(&u32::from(a))
                    .map_err(map_err(names::PEER_V4, "remove"))
            }
            (IpAddr::V6(a), true) => self
                .v6
                .map
                .remove(&a.octets())
                .map_err(map_err(names::PEER_V6, "remove")),
            (IpAddr::V4(a), false) => self
                .v4_lpm
                .map
                .remove(&Key::new(c.prefix_len().into(), a.octets()))
                .map_err(map_err(names::PEER_V4_LPM, "remove")),
            (IpAddr::V6(a), false) => self
                .v6_lpm
                .map
                .remove(&Key::new(c.prefix_len().into(), a.octets()))
                .map_err(map_err(names::PEER_V6_LPM, "remove")),
        };
        // Already gone is what we wanted.
        match r {
            Err(DataplaneError::Map { source, .. })
                if matches!(*source, aya::maps::MapError::KeyNotFound) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    fn range_flags(&self) -> u32 {
        let mut f = 0;
        if self.ranges[0] > 0 {
            f |= CONFIG_F_PEER_V4_RANGES;
        }
        if self.ranges[1] > 0 {
            f |= CONFIG_F_PEER_V6_RANGES;
        }
        f
    }
}

/// What [`Dataplane::set_peer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSet {
    /// The id was not active: its counters were zeroed and it was activated.
    Added,
    /// The id was active: allowed IPs updated, counters kept.
    Updated,
}

const RANGE_FLAGS: u32 = CONFIG_F_PEER_V4_RANGES | CONFIG_F_PEER_V6_RANGES;

impl Dataplane {
    /// Active peer ids and their allowed IPs (as the kernel maps hold them).
    pub fn peers(&self) -> BTreeMap<PeerId, Vec<Cidr>> {
        self.peers
            .mirror
            .iter()
            .map(|(id, s)| (*id, s.iter().copied().collect()))
            .collect()
    }

    /// Adds peer `id` with `allowed` IPs; fails if the id is active.
    pub fn add_peer(&mut self, id: PeerId, allowed: &[Cidr]) -> Result<()> {
        if self.peers.mirror.contains_key(&id) {
            return Err(DataplaneError::PeerExists { id });
        }
        self.set_peer(id, allowed).map(|_| ())
    }

    /// Replaces the allowed IPs of active peer `id` (counters kept).
    pub fn update_peer(&mut self, id: PeerId, allowed: &[Cidr]) -> Result<()> {
        if !self.peers.mirror.contains_key(&id) {
            return Err(DataplaneError::UnknownPeer { id });
        }
        self.set_peer(id, allowed).map(|_| ())
    }

    /// Adds or updates peer `id` so that its allowed IPs are exactly `allowed`. Validates first
    /// (id range, no allowed IP owned by another peer): on error nothing is written.
    pub fn set_peer(&mut self, id: PeerId, allowed: &[Cidr]) -> Result<PeerSet> {
        if id >= MAX_PEERS {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: MAX_PEERS });
        }
        let new: BTreeSet<Cidr> = allowed.iter().copied().collect();
        if let Some((&cidr, &owner)) = new
            .iter()
            .find_map(|c| self.peers.owner.get_key_value(c))
            .filter(|(_, o)| **o != id)
        {
            return Err(DataplaneError::AddressInUse { cidr, id, owner });
        }
        let is_new = !self.peers.mirror.contains_key(&id);
        let old = self.peers.mirror.get(&id).cloned().unwrap_or_default();
        if is_new {
            self.peers.hot.set_counters(id, PeerCounters::default());
            zero_slot(&mut self.stats.peer_drops.map, names::PEER_DROPS, id)?;
        }
        // Flags on before any range entry exists.
        let needed = new.iter().filter(|c| !c.is_host()).fold(0, |f, c| {
            f | if c.is_ipv4() {
                CONFIG_F_PEER_V4_RANGES
            } else {
                CONFIG_F_PEER_V6_RANGES
            }
        });
        if self.cfg.flags & needed != needed {
            let mut c = self.cfg;
            c.flags |= needed;
            self.write_config(c)?;
        }
        // New entries first.
        let added: Vec<Cidr> = new.difference(&old).copied().collect();
        for (i, &c) in added.iter().enumerate() {
            if let Err(e) = self.peers.insert(c, id) {
                for &undo in &added[..i] {
                    let _ = self.peers.remove(undo);
                    self.peers.disown(&undo);
                }
                self.sync_range_flags()?;
                return Err(e);
            }
            self.peers.own(c, id);
        }
        if is_new {
            self.write_peer_info(id, ACTIVE, "activate")?;
        }
        self.peers.mirror.insert(id, new.clone());
        // Then the old ones.
        for &c in old.difference(&new) {
            self.peers.remove(c)?;
            self.peers.disown(&c);
        }
        self.sync_range_flags()?;
        tracing::debug!(id, allowed = ?new, added = is_new, "peer set");
        Ok(if is_new {
            PeerSet::Added
        } else {
            PeerSet::Updated
        })
    }

    /// [`Dataplane::set_peer`] for many peers (agent start). Peers that are new (id not active,
    /// not earlier in the batch) and have only host routes that nobody owns — every peer of a
    /// fresh start — are written with batch syscalls, in `set_peer`'s order: counters zeroed,
    /// addresses, then activation; the others (updates, ranges, conflicts, bad ids) go through
    /// `set_peer` one by one afterwards, which validates them. If a batch write fails, the
    /// batch's entries are removed again and the error returned. Re-setting an active peer
    /// with the allowed IPs it has writes nothing.
    pub fn set_peers(&mut self, peers: &[(PeerId, Vec<Cidr>)]) -> Result<()> {
        let mut batch: Vec<(PeerId, BTreeSet<Cidr>)> = Vec::with_capacity(peers.len());
        let mut rest: Vec<&(PeerId, Vec<Cidr>)> = Vec::new();
        self.peers
            .owner
            .reserve(peers.iter().map(|(_, a)| a.len()).sum());
        for p in peers {
            let (id, allowed) = p;
            let new: BTreeSet<Cidr> = allowed.iter().copied().collect();
            let fresh = *id < MAX_PEERS
                && !self.peers.mirror.contains_key(id)
                && new
                    .iter()
                    .all(|c| c.is_host() && !self.peers.owner.contains_key(c));
            if fresh {
                // Claimed now, so later entries of the batch see the id and addresses taken.
                for &c in &new {
                    self.peers.own(c, *id);
                }
                self.peers.mirror.insert(*id, BTreeSet::new());
                batch.push((*id, new));
            } else {
                rest.push(p);
            }
        }
        if let Err(e) = self.write_new_peers(&batch) {
            for (id, cidrs) in &batch {
                for c in cidrs {
                    let _ = self.peers.remove(*c);
                    self.peers.disown(c);
                }
                let _ = self.write_peer_info(*id, PeerInfo::default(), "deactivate");
                self.peers.mirror.remove(id);
            }
            return Err(e);
        }
        let added = batch.len();
        for (id, cidrs) in batch {
            self.peers.mirror.insert(id, cidrs);
        }
        for (id, allowed) in rest {
            self.set_peer(*id, allowed)?;
        }
        tracing::debug!(added, others = peers.len() - added, "peers set");
        Ok(())
    }

    /// The kernel writes of [`Dataplane::set_peers`]' batch (ids claimed, not active yet).
    fn write_new_peers(&mut self, batch: &[(PeerId, BTreeSet<Cidr>)]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let ids: Vec<PeerId> = batch.iter().map(|(id, _)| *id).collect();
        for &id in &ids {
            self.peers.hot.set_counters(id, PeerCounters::default());
        }
        zero_slots(&mut self.stats.peer_drops, names::PEER_DROPS, &ids)?;
        let (mut v4, mut v6, mut pool) = (Vec::new(), Vec::new(), Vec::new());
        for (id, cidrs) in batch {
            for c in cidrs {
                match c.addr() {
                    IpAddr::V4(a) => {
                        let a = u32::from(a);
                        v4.push((a, *id));
                        if let Some(off) = self.peers.pool_slot(a) {
                            pool.push((off, *id + 1));
                        }
                    }
                    IpAddr::V6(a) => v6.push((a.octets(), *id)),
                }
            }
        }
        fn write<K: Copy, V: Copy>(
            fd: std::os::fd::BorrowedFd<'_>,
            name: &'static str,
            entries: &[(K, V)],
        ) -> Result<()> {
            let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
            sys::update_batch(fd, &keys, &values).map_err(|(_, e)| sys_err(name, "batch update")(e))
        }
        write(self.peers.v4.fd.as_fd(), names::PEER_V4, &v4)?;
        write(self.peers.pool_v4.fd.as_fd(), names::PEER_POOL_V4, &pool)?;
        write(self.peers.v6.fd.as_fd(), names::PEER_V6, &v6)?;
        for &id in &ids {
            self.peers.hot.write_info(id, ACTIVE);
        }
        Ok(())
    }

    /// Writes peer `id`'s policy into its hot line (`id` below `MAX_PEERS`): the changed
    /// fields only, in the order that publishes an admission whole ([`HotLines::write_info`]).
    /// Stores into the mapping cannot fail; `op` names the change in the debug log.
    pub(super) fn write_peer_info(
        &mut self,
        id: PeerId,
        info: PeerInfo,
        op: &'static str,
    ) -> Result<()> {
        if self.peers.hot.write_info(id, info) {
            tracing::trace!(id, op, "peer policy written");
        }
        Ok(())
    }

    /// Removes peer `id`: its allowed IPs, then its active flag. Its counters stay readable until
    /// the id is re-used.
    pub fn remove_peer(&mut self, id: PeerId) -> Result<()> {
        let Some(old) = self.peers.mirror.get(&id).cloned() else {
            return Err(DataplaneError::UnknownPeer { id });
        };
        for c in old {
            self.peers.remove(c)?;
            self.peers.disown(&c);
        }
        self.write_peer_info(id, PeerInfo::default(), "deactivate")?;
        self.peers.mirror.remove(&id);
        self.sync_range_flags()?;
        self.forget_rates(id)?;
        tracing::debug!(id, "peer removed");
        Ok(())
    }

    /// Makes the range flags say exactly whether some peer has a range.
    fn sync_range_flags(&mut self) -> Result<()> {
        let want = self.peers.range_flags();
        if self.cfg.flags & RANGE_FLAGS != want {
            let mut c = self.cfg;
            c.flags = (c.flags & !RANGE_FLAGS) | want;
            self.write_config(c)?;
        }
        Ok(())
    }
}

impl Dataplane {
    /// Makes `pool` (an IPv4 network of at most `MAX_PEER_POOL_V4` addresses, e.g. the tunnel's
    /// subnet) the IPv4 address pool the kernel attributes by array (see the module docs);
    /// `None` removes it. Existing peers' addresses move with it; attribution never lapses.
    pub fn set_peer_pool_v4(&mut self, pool: Option<ipnet::Ipv4Net>) -> Result<()> {
        let want = match pool {
            None => (0, 0),
            Some(net) => {
                let len = 1u64 << (32 - u32::from(net.prefix_len()));
                if len > u64::from(MAX_PEER_POOL_V4) {
                    return Err(DataplaneError::PeerPoolTooLarge {
                        pool: net,
                        max: MAX_PEER_POOL_V4,
                    });
                }
                (u32::from(net.network()), len as u32)
            }
        };
        if want == self.peers.pool {
            return Ok(());
        }
        let hosts: Vec<(u32, PeerId)> = self
            .peers
            .owner
            .iter()
            .filter_map(|(c, id)| match c.addr() {
                IpAddr::V4(a) if c.is_host() => Some((u32::from(a), *id)),
                _ => None,
            })
            .collect();
        // 1. Pool off: the hash (which holds every host route) decides meanwhile.
        if self.peers.pool.1 != 0 {
            let mut c = self.cfg;
            (c.peer_pool_v4_base, c.peer_pool_v4_len) = (0, 0);
            self.write_config(c)?;
            for &(a, _) in &hosts {
                if let Some(off) = self.peers.pool_slot(a) {
                    self.peers.write_slot(off, None)?;
                }
            }
        }
        // 2. The new slots, then the pool on.
        self.peers.pool = want;
        for &(a, id) in &hosts {
            if let Some(off) = self.peers.pool_slot(a) {
                self.peers.write_slot(off, Some(id))?;
            }
        }
        let mut c = self.cfg;
        (c.peer_pool_v4_base, c.peer_pool_v4_len) = want;
        self.write_config(c)?;
        tracing::debug!(?pool, "IPv4 peer pool set");
        Ok(())
    }
}
