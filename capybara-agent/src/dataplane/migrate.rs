//! Migration of pins made by layout 7 (peer table `CAPY_PEERS` and per-CPU traffic counters
//! `CAPY_PEER_STATS` apart) to layout 8 (both in one hot line per peer, `CAPY_PEER_HOT`; see
//! `capybara_common::peer::PeerHot`). Every other pinned map is the same in both layouts.
//!
//! [`Dataplane::open`](super::Dataplane::open) on a directory of layout 7:
//! 1. reads the old table and the old counters (summed over CPUs) before the object is loaded;
//! 2. loads the object, which creates and pins `CAPY_PEER_HOT`, and writes every peer's policy
//!    and counters into its line (before the peer mirror is rebuilt from the lines);
//! 3. writes layout version 8 into `CAPY_CONFIG` and unpins the two old maps. The programs of
//!    the previous agent, still attached through their pinned links, keep the old maps alive
//!    and keep enforcing and counting into them until this agent attaches its own;
//! 4. [`Dataplane::attach_tc`](super::Dataplane::attach_tc), once the new programs replaced
//!    the old ones, reads the old counters a second time and adds what the old programs
//!    counted since step 1: no packet is lost from the counters.
//!
//! A crash between 2 and 3 leaves version 7 and the old pins: the next start migrates again
//! from the old maps (the policy and counters it wrote are overwritten with the same values
//! plus what was counted meanwhile). Any other older layout is refused
//! ([`DataplaneError::LayoutMismatch`]).

use std::{os::fd::AsFd as _, path::Path};

use aya::maps::{Map, MapData, PerCpuArray};
use capybara_common::{
    maps as names,
    peer::{PeerCounters, PeerHot, PeerId, PeerInfo},
};

use super::{Dataplane, DataplaneError, Result, map_err, sys, sys_err};
use crate::paths;

/// The one older layout this agent migrates.
pub const FROM_LAYOUT: u32 = 7;

/// Layout 7's per-peer state, read before the object is loaded.
pub(super) struct Layout7 {
    /// Every id with a policy or counters: its line as layout 8 holds it.
    pub(super) lines: Vec<(PeerId, PeerHot)>,
    /// The old counters, kept open for the catch-up after the programs are replaced.
    stats: PerCpuArray<MapData, PeerCounters>,
}

/// What is left to do after the hot lines were written: the catch-up of step 4.
pub(super) struct Pending {
    stats: PerCpuArray<MapData, PeerCounters>,
    /// The counters as step 1 read them.
    read: Vec<(PeerId, PeerCounters)>,
}

fn open_pin(dir: &Path, name: &'static str, value_size: u32) -> Result<MapData> {
    let data =
        MapData::from_pin(paths::map_pin(dir, name)).map_err(map_err(name, "open layout-7 pin"))?;
    let info = data.info().map_err(map_err(name, "read map info"))?;
    if info.value_size() != value_size {
        return Err(DataplaneError::LayoutMismatch {
            dir: dir.to_path_buf(),
            found: FROM_LAYOUT,
            expected: capybara_common::LAYOUT_VERSION,
        });
    }
    Ok(data)
}

fn summed(stats: &PerCpuArray<MapData, PeerCounters>, id: PeerId) -> Result<PeerCounters> {
    let v = stats
        .get(&id, 0)
        .map_err(map_err(names::OLD_PEER_STATS, "read"))?;
    let mut sum = PeerCounters::default();
    for c in v.iter() {
        sum.rx_packets = sum.rx_packets.wrapping_add(c.rx_packets);
        sum.rx_bytes = sum.rx_bytes.wrapping_add(c.rx_bytes);
        sum.tx_packets = sum.tx_packets.wrapping_add(c.tx_packets);
        sum.tx_bytes = sum.tx_bytes.wrapping_add(c.tx_bytes);
    }
    Ok(sum)
}

/// Step 1: reads layout 7's peer table and counters pinned in `dir`.
pub(super) fn read(dir: &Path) -> Result<Layout7> {
    let size = |t| u32::try_from(t).unwrap_or(u32::MAX);
    let peers = open_pin(dir, names::OLD_PEERS, size(size_of::<PeerInfo>()))?;
    let infos: Vec<(u32, PeerInfo)> =
        sys::dump_hash(peers.fd().as_fd()).map_err(sys_err(names::OLD_PEERS, "batch lookup"))?;
    let stats = open_pin(dir, names::OLD_PEER_STATS, size(size_of::<PeerCounters>()))?;
    let stats: PerCpuArray<MapData, PeerCounters> = PerCpuArray::try_from(Map::PerCpuArray(stats))
        .map_err(map_err(names::OLD_PEER_STATS, "open layout-7 pin"))?;
    let mut lines = Vec::new();
    for (id, info) in infos {
        let counters = summed(&stats, id)?;
        if info != PeerInfo::default() || counters != PeerCounters::default() {
            lines.push((id, PeerHot { info, counters }));
        }
    }
    Ok(Layout7 { lines, stats })
}

/// Step 3's unpinning: the old maps' pins are removed (the maps live on while the old
/// programs or `old` hold them). Returns the catch-up of step 4.
pub(super) fn unpin(dir: &Path, old: Layout7) -> Result<Pending> {
    for name in [names::OLD_PEERS, names::OLD_PEER_STATS] {
        let pin = paths::map_pin(dir, name);
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(sys_err(name, "unpin layout-7 map")(e)),
        }
    }
    let read = old
        .lines
        .iter()
        .map(|(id, line)| (*id, line.counters))
        .collect();
    tracing::info!(
        dir = %dir.display(),
        peers = old.lines.len(),
        "pins of layout {FROM_LAYOUT} migrated: peer table and counters now in CAPY_PEER_HOT"
    );
    Ok(Pending {
        stats: old.stats,
        read,
    })
}

impl Dataplane {
    /// Step 4 (after the TC programs were replaced): adds what the old programs counted into
    /// the old counters since they were read. Nothing to do unless `open` migrated.
    pub(super) fn finish_migration(&mut self) -> Result<()> {
        let Some(p) = self.migration.take() else {
            return Ok(());
        };
        // Programs that started before the swap may still be running: wait them out.
        sys::rcu_grace_period();
        let read: std::collections::HashMap<PeerId, PeerCounters> = p.read.into_iter().collect();
        for id in 0..p.stats.len() {
            let now = summed(&p.stats, id)?;
            let was = read.get(&id).copied().unwrap_or_default();
            self.peers.hot.add_counters(
                id,
                PeerCounters {
                    rx_packets: now.rx_packets.wrapping_sub(was.rx_packets),
                    rx_bytes: now.rx_bytes.wrapping_sub(was.rx_bytes),
                    tx_packets: now.tx_packets.wrapping_sub(was.tx_packets),
                    tx_bytes: now.tx_bytes.wrapping_sub(was.tx_bytes),
                },
            );
        }
        Ok(())
    }
}
