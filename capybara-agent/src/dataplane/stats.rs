//! Counters: global verdict counters (`CAPY_COUNTERS`, indexed by `capybara_common::counters`
//! constants), per-list hits (`CAPY_LIST_HITS`, indexed by list id) and per-peer drops by
//! reason (`CAPY_PEER_DROPS`) are per-CPU arrays: the kernel increments its CPU's slot without
//! atomics, the agent sums the CPUs when it reads (exact). A peer's traffic counters are in its
//! hot line (`CAPY_PEER_HOT`, see [`super::peers`]): one slot shared by the CPUs, which add to
//! it atomically; the agent reads it through its mapping (exact too).

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use capybara_common::{
    blocklist::{ListId, MAX_LISTS},
    counters::{COUNTER_NAMES, COUNTER_SLOTS, Counter},
    maps as names,
    peer::{MAX_PEERS, PeerDrops, PeerId, PeerStats},
};

use super::{Dataplane, DataplaneError, Owned, Result, map_err, sys, sys_err, take};

/// The counter maps.
pub(super) struct StatMaps {
    pub(super) counters: Owned<PerCpuArray<MapData, Counter>>,
    pub(super) list_hits: Owned<PerCpuArray<MapData, Counter>>,
    pub(super) peer_drops: Owned<PerCpuArray<MapData, PeerDrops>>,
}

impl StatMaps {
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<StatMaps> {
        Ok(StatMaps {
            counters: take(ebpf, names::COUNTERS)?,
            list_hits: take(ebpf, names::LIST_HITS)?,
            peer_drops: take(ebpf, names::PEER_DROPS)?,
        })
    }
}

/// Number of possible CPUs (the length of a per-CPU value).
fn ncpus(map: &'static str) -> Result<usize> {
    nr_cpus().map_err(|(_, source)| DataplaneError::Syscall {
        map,
        op: "count possible CPUs",
        source,
    })
}

/// Zeroes slot `index` of a per-CPU array on every CPU.
pub(super) fn zero_slot<V: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    name: &'static str,
    index: u32,
) -> Result<()> {
    let zeros = PerCpuValues::try_from(vec![V::default(); ncpus(name)?]).map_err(|e| {
        DataplaneError::Syscall {
            map: name,
            op: "build per-CPU zeros",
            source: e,
        }
    })?;
    map.set(index, zeros, 0).map_err(map_err(name, "zero slot"))
}

/// Zeroes slots `ids` of a per-CPU array on every CPU, with batch updates (one syscall per
/// 4096 slots instead of one per slot); one by one where the kernel has no batch update.
pub(super) fn zero_slots<V: aya::Pod + Default>(
    map: &mut Owned<PerCpuArray<MapData, V>>,
    name: &'static str,
    ids: &[u32],
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    // The kernel's per-CPU value: each CPU's copy rounded up to 8 bytes.
    let zeros = vec![0u8; std::mem::size_of::<V>().next_multiple_of(8) * ncpus(name)?];
    match sys::update_batch_same(map.fd.as_fd(), ids, &zeros) {
        Ok(()) => Ok(()),
        Err((0, e)) if sys::is_unsupported(&e) => ids
            .iter()
            .try_for_each(|&id| zero_slot(&mut map.map, name, id)),
        Err((_, e)) => Err(sys_err(name, "batch zero")(e)),
    }
}

/// Sums of the global verdict counters, one per slot (`COUNTER_SLOTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalCounters {
    /// Indexed by the `capybara_common::counters` constants (drops by reason at
    /// `DROPS_BASE + reason`).
    pub slots: Vec<Counter>,
}

impl GlobalCounters {
    /// The counter at `slot` (zero if out of range).
    pub fn get(&self, slot: u32) -> Counter {
        self.slots.get(slot as usize).copied().unwrap_or_default()
    }

    /// Named verdict counters, for metrics and the CLI.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, Counter)> + '_ {
        COUNTER_NAMES
            .iter()
            .map(|&(slot, name)| (name, self.get(slot)))
    }
}

impl Dataplane {
    /// The global verdict counters, summed over CPUs.
    pub fn counters(&self) -> Result<GlobalCounters> {
        let m = &self.stats.counters.map;
        let slots = (0..COUNTER_SLOTS)
            .map(|i| {
                let v = m.get(&i, 0).map_err(map_err(names::COUNTERS, "read"))?;
                let mut sum = Counter::default();
                v.iter().for_each(|c| sum.add(c));
                Ok(sum)
            })
            .collect::<Result<_>>()?;
        Ok(GlobalCounters { slots })
    }

    /// Hits of list `id` (packets and bytes dropped because of it), summed over CPUs.
    pub fn list_hits(&self, id: ListId) -> Result<Counter> {
        if id >= MAX_LISTS {
            return Ok(Counter::default());
        }
        let v = self
            .stats
            .list_hits
            .map
            .get(&id, 0)
            .map_err(map_err(names::LIST_HITS, "read"))?;
        let mut sum = Counter::default();
        v.iter().for_each(|c| sum.add(c));
        Ok(sum)
    }

    /// Counters of peer `id` (its hot line) and its drops, summed over CPUs. `drops[RateLimit]` are the packets its shaping
    /// classes dropped (their queue was full), read from the qdiscs.
    pub fn peer_stats(&self, id: PeerId) -> Result<PeerStats> {
        if id >= MAX_PEERS {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: MAX_PEERS });
        }
        let d = self
            .stats
            .peer_drops
            .map
            .get(&id, 0)
            .map_err(map_err(names::PEER_DROPS, "read"))?;
        let mut sum = PeerStats::default();
        sum.add_counters(&self.peers.hot.counters(id));
        d.iter().for_each(|d| sum.add_drops(d));
        if let Some(shaper) = &self.shaper {
            let slot = &mut sum.drops[capybara_common::drop::DropReason::RateLimit as usize];
            *slot = slot.wrapping_add(shaper.peer_drops(id)?);
        }
        Ok(sum)
    }
}
