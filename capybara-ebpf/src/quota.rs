//! Data quotas: charge a known peer's packet to its bucket, drop once the bucket is exhausted,
//! and emit each warning threshold once per bucket epoch. The design (order of the steps, the
//! overshoot bound, resets racing in-flight adds) is documented in `capybara_common::quota`.
//!
//! Super-packets (GSO skbs, see `crate::pipeline`): the step decides per skb. A super-packet
//! passes whole, and is charged all its segments' bytes, when its bucket was not exhausted
//! before it — even if the limit falls inside it — and is dropped whole, every segment counted
//! as a quota drop, once the bucket is. So a quota is overrun by at most one super-packet
//! (≤ 64 KiB) per CPU, the same bound as one packet per CPU without offloads, scaled; cutting
//! the skb at the boundary would cost a helper call per packet for under 64 KiB of a budget
//! counted in megabytes. Tested in `prog_test_run::quota_boundary_inside_a_super_packet_*` and
//! end to end in `e2e_wg_dataplane`.
//!
//! Atomics: `used_bytes` and `warned` live in a shared (not per-CPU) array element, so they are
//! changed with [`crate::atomic`]'s helpers. Loads are volatile aligned 64-bit loads (one
//! instruction, never torn).

use capybara_common::{
    event::{EVENT_F_EGRESS, EVENT_QUOTA, EventRecord},
    peer::{PeerId, PeerInfo},
    quota::{QUOTA_THRESHOLDS, QuotaBucket, threshold_bytes},
};

use crate::{
    atomic::{fetch_add, fetch_and, fetch_or},
    events,
    maps::QUOTA,
};

/// The outcome of the quota step.
pub enum Quota {
    /// No quota applies or the bucket still had budget: the packet passes (and was charged).
    Pass,
    /// The bucket was exhausted before this packet: drop it.
    Exhausted,
}

/// The bucket of the peer whose table entry is `info`, if it has a configured one.
#[inline(always)]
fn bucket_of(info: *const PeerInfo) -> Option<(u32, *mut QuotaBucket)> {
    // SAFETY: `info` is the policy in the peer's `PEER_HOT` line the pipeline looked up, valid for this run.
    let bucket = unsafe { (*info).quota_bucket };
    if bucket == 0 {
        return None;
    }
    let b = QUOTA.get_ptr_mut(bucket)?;
    Some((bucket, b))
}

/// Charges `bytes` of peer `id`'s packet to its bucket; emits threshold events.
#[inline(always)]
pub fn charge(id: PeerId, info: *const PeerInfo, bytes: u64, egress: bool, now_ns: u64) -> Quota {
    let Some((bucket, b)) = bucket_of(info) else {
        return Quota::Pass;
    };
    // SAFETY: `b` points at the `QuotaBucket` array element of a successful lookup, valid (and
    // 8-byte aligned: array values are) for this program run. Other CPUs and the agent access
    // the same memory concurrently: `used_bytes` and `warned` only through atomics here, the
    // other fields are plain reads of values the agent writes whole (a racing read sees the old
    // or the new value of each field; see the module docs).
    unsafe {
        let limit = core::ptr::read_volatile(&raw const (*b).limit_bytes);
        if limit == 0 {
            return Quota::Pass;
        }
        let used_ptr = &raw mut (*b).used_bytes;
        if core::ptr::read_volatile(used_ptr) >= limit {
            return Quota::Exhausted;
        }
        let epoch = core::ptr::read_volatile(&raw const (*b).epoch);
        let now = fetch_add(used_ptr, bytes).wrapping_add(bytes);
        let warned = &raw mut (*b).warned;
        for (percent, bit) in QUOTA_THRESHOLDS {
            if now < threshold_bytes(limit, percent) || core::ptr::read_volatile(warned) & bit != 0
            {
                continue;
            }
            if fetch_or(warned, bit) & bit != 0 {
                continue; // Another CPU emitted it.
            }
            if core::ptr::read_volatile(&raw const (*b).epoch) != epoch {
                // A reset landed between our add and our fetch_or: the bit belongs to the new
                // epoch, which has not crossed anything yet. Give it back, emit nothing.
                fetch_and(warned, !bit);
                continue;
            }
            let rec = EventRecord {
                kind: EVENT_QUOTA,
                peer: id,
                reason: percent,
                flags: if egress { EVENT_F_EGRESS } else { 0 },
                time_ns: now_ns,
                args: [u64::from(bucket), now, limit, u64::from(epoch)],
            };
            events::emit(&rec);
        }
    }
    Quota::Pass
}
