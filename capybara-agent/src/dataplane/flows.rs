//! Per-peer concurrent flow limits (layout and kernel behaviour: `capybara_common::flow`).
//!
//! - [`Dataplane::set_flow_limit`] / [`Dataplane::clear_flow_limit`]: one store of the peer's
//!   `flow_limit` in its hot line (gate, deadline and quota bucket kept), validated first (the peer exists, the
//!   limit is in `1..=MAX_FLOWS`): on error no map is touched.
//!   `MAX_FLOWS` is the table's capacity, the bound here; the policy caps what it sets at
//!   `capybara_common::flow::MAX_FLOWS_PER_PEER` (a quarter of the table: one peer cannot fill
//!   it; a new flow over the limit, or with the table full, is dropped — that module's docs).
//! - [`Dataplane::flow_count`]: the peer's live flows as the kernel counts them.
//! - [`Dataplane::set_flow_timeouts`]: the idle timeouts, in `CAPY_CONFIG`.
//! - [`Dataplane::expire_flows`] (the daemon calls it every [`SWEEP_INTERVAL`]) and [`sweep`]:
//!   delete the entries idle past their timeout and decrement their peers' counts. **The
//!   decrement belongs to whoever's delete succeeded** — here the agent's, for expiry; the
//!   kernel's for TCP FIN/RST — so a flow is uncounted exactly once. The counts are a
//!   `BPF_F_MMAPABLE` array mapped into the agent: it decrements with `AtomicU64::fetch_sub` on
//!   the same memory the kernel's atomic instructions change (a map update of the value would
//!   lose concurrent kernel increments).
//!
//! The sweeper reads the table (one lookup per key) and re-reads each expired entry right
//! before deleting it, so a flow that a packet refreshed in between is kept; a refresh that
//! lands between that re-read and the delete loses the entry (its next packet is a new flow),
//! never the count.

use std::{
    borrow::BorrowMut,
    os::fd::AsFd as _,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, MapData, MapError},
};
use capybara_common::{
    config::Config,
    flow::{FlowKey, FlowState, MAX_FLOWS, flow_expired},
    maps as names,
    peer::{MAX_PEERS, PeerId},
};

use super::{Dataplane, DataplaneError, Owned, Result, map_err, sys, sys_err, take};

/// How often the daemon sweeps expired flows.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The flow maps.
pub(super) struct FlowMaps {
    flows: Owned<HashMap<MapData, FlowKey, FlowState>>,
    /// Kept open for the mapping's lifetime.
    _counts: Owned<Array<MapData, u64>>,
    counts: sys::MmapArray,
}

impl FlowMaps {
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<FlowMaps> {
        let flows = take(ebpf, names::FLOWS)?;
        let counts_map: Owned<Array<MapData, u64>> = take(ebpf, names::FLOW_COUNT)?;
        let entries = counts_map.map.len() as usize;
        let counts = sys::MmapArray::new(counts_map.fd.as_fd(), entries * 2)
            .map_err(sys_err(names::FLOW_COUNT, "mmap"))?;
        Ok(FlowMaps {
            flows,
            _counts: counts_map,
            counts,
        })
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowSweep {
    /// Entries looked at.
    pub scanned: u64,
    /// Entries deleted (each decremented its peer's count once).
    pub expired: u64,
}

/// Idle timeouts of flows (see `capybara_common::flow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// UDP, ICMP and other protocols (default 60 s).
    pub udp: Duration,
    /// Established TCP (default 2 h).
    pub tcp: Duration,
    /// TCP with an unanswered SYN (default 10 s).
    pub tcp_close: Duration,
}

fn whole_secs(field: &'static str, d: Duration) -> Result<u32> {
    let secs = d.as_secs();
    match u32::try_from(secs) {
        Ok(s) if s != 0 => Ok(s),
        _ => Err(DataplaneError::FlowTimeout { field, secs }),
    }
}

fn is_enoent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Deletes the entries of `flows` idle past their timeout under `cfg` at `now_ns`
/// (CLOCK_BOOTTIME) and decrements their peers' counts in `counts` (indexed by peer id) once
/// per successful delete. Used by [`Dataplane::expire_flows`]; public so tests can run it on
/// maps of their own.
pub fn sweep<T: BorrowMut<MapData>>(
    flows: &mut HashMap<T, FlowKey, FlowState>,
    counts: &[AtomicU64],
    cfg: &Config,
    now_ns: u64,
) -> Result<FlowSweep> {
    delete_where(flows, counts, |k, st| {
        flow_expired(cfg, k.proto, st, now_ns)
    })
}

/// Deletes every entry of peer `peer` (whatever its age) and decrements the count once per
/// successful delete: what clearing a limit does, so a limit set again later starts from the
/// peer's real flows. Public for the same reason as [`sweep`].
pub fn forget_peer<T: BorrowMut<MapData>>(
    flows: &mut HashMap<T, FlowKey, FlowState>,
    counts: &[AtomicU64],
    peer: PeerId,
) -> Result<FlowSweep> {
    delete_where(flows, counts, |k, _| k.peer == peer)
}

/// Deletes the entries for which `doomed(key, state)` holds (re-checked on a fresh read right
/// before each delete), decrementing their peers' counts once per successful delete.
fn delete_where<T: BorrowMut<MapData>>(
    flows: &mut HashMap<T, FlowKey, FlowState>,
    counts: &[AtomicU64],
    doomed: impl Fn(&FlowKey, &FlowState) -> bool,
) -> Result<FlowSweep> {
    // One batched read of the whole table (a few syscalls for any size), then a fresh read and
    // a delete for the doomed entries only: a full table of 262 144 flows costs ≈ 32 batch
    // calls instead of ≈ 524 000 single-entry ones.
    let fd = flows.map().fd().as_fd();
    let entries: Vec<(FlowKey, FlowState)> =
        sys::dump_hash(fd).map_err(sys_err(names::FLOWS, "batch lookup"))?;
    let mut out = FlowSweep::default();
    for (key, st) in entries {
        out.scanned += 1;
        if !doomed(&key, &st) {
            continue;
        }
        // The kernel may have refreshed it since the batch read.
        let st = match flows.get(&key, 0) {
            Ok(st) => st,
            Err(e) if is_enoent(&e) => continue,
            Err(e) => return Err(map_err(names::FLOWS, "read")(e)),
        };
        if !doomed(&key, &st) {
            continue;
        }
        match flows.remove(&key) {
            Ok(()) => {
                if let Some(c) = counts.get(key.peer as usize) {
                    c.fetch_sub(1, Ordering::AcqRel);
                }
                out.expired += 1;
            }
            // The kernel deleted it first (FIN/RST) and decremented.
            Err(e) if is_enoent(&e) => {}
            Err(e) => return Err(map_err(names::FLOWS, "delete")(e)),
        }
    }
    Ok(out)
}

impl Dataplane {
    /// Limits active peer `id` to `limit` concurrent flows (`1..=MAX_FLOWS`): one store into its
    /// hot line (`flow_limit`), everything else kept. Takes effect for the peer's next new
    /// flow; flows it already has are counted from their next packet.
    pub fn set_flow_limit(&mut self, id: PeerId, limit: u32) -> Result<()> {
        if id >= MAX_PEERS {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: MAX_PEERS });
        }
        if limit == 0 {
            return Err(DataplaneError::FlowLimitZero { peer: id });
        }
        if limit > MAX_FLOWS {
            return Err(DataplaneError::FlowLimitTooLarge {
                peer: id,
                limit,
                max: MAX_FLOWS,
            });
        }
        self.write_flow_limit(id, limit)
    }

    /// Removes active peer `id`'s flow limit: its flows are no longer tracked, and its entries
    /// are deleted (count decremented per delete), so a FIN the kernel no longer looks for
    /// cannot leave a closed flow counted until it expires.
    pub fn clear_flow_limit(&mut self, id: PeerId) -> Result<()> {
        self.write_flow_limit(id, 0)?;
        let counts = self.flows.counts.as_atomic_u64();
        let out = forget_peer(&mut self.flows.flows.map, counts, id)?;
        tracing::debug!(id, forgotten = out.expired, "flow limit cleared");
        Ok(())
    }

    fn write_flow_limit(&mut self, id: PeerId, limit: u32) -> Result<()> {
        let mut info = self.active_peer_info(id)?;
        info.flow_limit = limit;
        self.write_peer_info(id, info, "write flow limit")?;
        tracing::debug!(id, limit, "flow limit set");
        Ok(())
    }

    /// Active peer `id`'s flow limit (`None`: unlimited).
    pub fn flow_limit(&self, id: PeerId) -> Result<Option<u32>> {
        let info = self.active_peer_info(id)?;
        Ok((info.flow_limit != 0).then_some(info.flow_limit))
    }

    /// Peer `id`'s live flows as the kernel counts them.
    pub fn flow_count(&self, id: PeerId) -> Result<u64> {
        if id >= MAX_PEERS {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: MAX_PEERS });
        }
        let counts = self.flows.counts.as_atomic_u64();
        Ok(counts
            .get(id as usize)
            .map_or(0, |c| c.load(Ordering::Acquire)))
    }

    /// Sets the flows' idle timeouts (each at least 1 s, whole seconds): one `CAPY_CONFIG`
    /// write. Validates all three first.
    pub fn set_flow_timeouts(&mut self, t: FlowTimeouts) -> Result<()> {
        let udp = whole_secs("udp", t.udp)?;
        let tcp = whole_secs("tcp", t.tcp)?;
        let tcp_close = whole_secs("tcp_close", t.tcp_close)?;
        let mut c = self.cfg;
        c.flow_timeout_udp_s = udp;
        c.flow_timeout_tcp_s = tcp;
        c.flow_timeout_tcp_close_s = tcp_close;
        self.write_config(c)
    }

    /// Deletes the flows idle past their timeout at `now` (CLOCK_BOOTTIME, as
    /// [`sys::boottime_now`] reads it) and decrements their peers' counts (see the module docs).
    pub fn expire_flows(&mut self, now: Duration) -> Result<FlowSweep> {
        let now_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let cfg = self.cfg;
        let counts = self.flows.counts.as_atomic_u64();
        let out = sweep(&mut self.flows.flows.map, counts, &cfg, now_ns)?;
        if out.expired != 0 {
            tracing::debug!(?out, "flows expired");
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capybara_common::flow::{
        DEFAULT_FLOW_TIMEOUT_UDP_S, FLOW_S_OPEN, FLOW_S_TCP_SYN, PROTO_TCP, PROTO_UDP,
    };

    #[test]
    fn timeouts_must_be_whole_nonzero_seconds_naming_the_field() {
        let e = whole_secs("tcp_close", Duration::from_millis(500)).unwrap_err();
        assert!(e.to_string().contains("tcp_close"), "{e}");
        let e = whole_secs("udp", Duration::from_secs(u64::from(u32::MAX) + 1)).unwrap_err();
        assert!(e.to_string().contains("udp"), "{e}");
        assert_eq!(whole_secs("tcp", Duration::from_secs(7200)).unwrap(), 7200);
    }

    #[test]
    fn expiry_follows_protocol_and_state() {
        let cfg = Config::default();
        let s = |state, last_ns| FlowState {
            last_ns,
            state,
            flags: 0,
        };
        let sec = 1_000_000_000u64;
        let now = 10_000 * sec;
        let udp_t = u64::from(DEFAULT_FLOW_TIMEOUT_UDP_S) * sec;
        assert!(!flow_expired(
            &cfg,
            PROTO_UDP,
            &s(FLOW_S_OPEN, now - udp_t),
            now
        ));
        assert!(flow_expired(
            &cfg,
            PROTO_UDP,
            &s(FLOW_S_OPEN, now - udp_t - 1),
            now
        ));
        // Established TCP lives 2 h, an unanswered SYN 10 s.
        assert!(!flow_expired(
            &cfg,
            PROTO_TCP,
            &s(FLOW_S_OPEN, now - 3600 * sec),
            now
        ));
        assert!(flow_expired(
            &cfg,
            PROTO_TCP,
            &s(FLOW_S_TCP_SYN, now - 11 * sec),
            now
        ));
        // A refresh newer than `now` (another CPU) is fresh.
        assert!(!flow_expired(
            &cfg,
            PROTO_UDP,
            &s(FLOW_S_OPEN, now + 5),
            now
        ));
        let cfg = Config {
            flow_timeout_udp_s: 2,
            ..Config::default()
        };
        assert!(flow_expired(
            &cfg,
            PROTO_UDP,
            &s(FLOW_S_OPEN, now - 3 * sec),
            now
        ));
    }
}
