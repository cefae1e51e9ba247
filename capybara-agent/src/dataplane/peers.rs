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
//! - A peer id that is not active in `CAPY_PEERS` gets its per-CPU counters zeroed when added, so
//!   a re-used id starts at 0; re-setting an active peer (e.g. after an agent restart) keeps them.
//! - An update that changes allowed IPs inserts the new entries before removing the old ones: a
//!   packet of an address kept across the change is never unattributed.
//! - An allowed IP belongs to at most one peer ([`DataplaneError::AddressInUse`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
    os::fd::AsFd as _,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
};
use capybara_common::{
    config::{CONFIG_F_PEER_V4_RANGES, CONFIG_F_PEER_V6_RANGES},
    maps as names,
    peer::{MAX_PEERS, PEER_F_ACTIVE, PeerId, PeerInfo},
};

use super::{
    Dataplane, DataplaneError, Owned, Result, map_err, stats::zero_slot, sys, sys_err, take,
};
use crate::net::Cidr;

/// The peer maps and the mirror of their contents.
pub(super) struct PeerMaps {
    pub(super) peers: Owned<Array<MapData, PeerInfo>>,
    v4: Owned<HashMap<MapData, u32, PeerId>>,
    v6: Owned<HashMap<MapData, [u8; 16], PeerId>>,
    v4_lpm: Owned<LpmTrie<MapData, [u8; 4], PeerId>>,
    v6_lpm: Owned<LpmTrie<MapData, [u8; 16], PeerId>>,
    /// Active peers and their allowed IPs.
    pub(super) mirror: BTreeMap<PeerId, BTreeSet<Cidr>>,
    /// Allowed IP → owner.
    owner: StdHashMap<Cidr, PeerId>,
}

impl PeerMaps {
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<PeerMaps> {
        let mut p = PeerMaps {
            peers: take(ebpf, names::PEERS)?,
            v4: take(ebpf, names::PEER_V4)?,
            v6: take(ebpf, names::PEER_V6)?,
            v4_lpm: take(ebpf, names::PEER_V4_LPM)?,
            v6_lpm: take(ebpf, names::PEER_V6_LPM)?,
            mirror: BTreeMap::new(),
            owner: StdHashMap::new(),
        };
        p.rebuild()?;
        Ok(p)
    }

    /// Rebuilds the mirror from the kernel maps.
    fn rebuild(&mut self) -> Result<()> {
        let infos: Vec<(u32, PeerInfo)> =
            sys::dump_hash(self.peers.fd.as_fd()).map_err(sys_err(names::PEERS, "batch lookup"))?;
        for (id, info) in infos {
            if info.flags & PEER_F_ACTIVE != 0 {
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
            self.owner.insert(c, id);
        }
        Ok(())
    }

    /// Number of active peers.
    pub(super) fn count(&self) -> usize {
        self.mirror.len()
    }

    fn insert(&mut self, c: Cidr, id: PeerId) -> Result<()> {
        match (c.addr(), c.is_host()) {
            (IpAddr::V4(a), true) => self
                .v4
                .map
                .insert(u32::from(a), id, 0)
                .map_err(map_err(names::PEER_V4, "insert")),
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
            (IpAddr::V4(a), true) => self
                .v4
                .map
                .remove(&u32::from(a))
                .map_err(map_err(names::PEER_V4, "remove")),
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
        for c in self.owner.keys().filter(|c| !c.is_host()) {
            f |= if c.is_ipv4() {
                CONFIG_F_PEER_V4_RANGES
            } else {
                CONFIG_F_PEER_V6_RANGES
            };
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
            zero_slot(&mut self.stats.peer_stats.map, names::PEER_STATS, id)?;
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
                    self.peers.owner.remove(&undo);
                }
                self.sync_range_flags()?;
                return Err(e);
            }
            self.peers.owner.insert(c, id);
        }
        if is_new {
            self.peers
                .peers
                .map
                .set(
                    id,
                    PeerInfo {
                        flags: PEER_F_ACTIVE,
                        ..PeerInfo::default()
                    },
                    0,
                )
                .map_err(map_err(names::PEERS, "activate"))?;
        }
        self.peers.mirror.insert(id, new.clone());
        // Then the old ones.
        for &c in old.difference(&new) {
            self.peers.remove(c)?;
            self.peers.owner.remove(&c);
        }
        self.sync_range_flags()?;
        tracing::debug!(id, allowed = ?new, added = is_new, "peer set");
        Ok(if is_new {
            PeerSet::Added
        } else {
            PeerSet::Updated
        })
    }

    /// Removes peer `id`: its allowed IPs, then its active flag. Its counters stay readable until
    /// the id is re-used.
    pub fn remove_peer(&mut self, id: PeerId) -> Result<()> {
        let Some(old) = self.peers.mirror.get(&id).cloned() else {
            return Err(DataplaneError::UnknownPeer { id });
        };
        for c in old {
            self.peers.remove(c)?;
            self.peers.owner.remove(&c);
        }
        self.peers
            .peers
            .map
            .set(id, PeerInfo::default(), 0)
            .map_err(map_err(names::PEERS, "deactivate"))?;
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
