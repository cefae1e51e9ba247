//! Data quotas: byte budgets in `CAPY_QUOTA` buckets, shared by any number of peers.
//!
//! A peer is charged to the bucket `PeerInfo::quota_bucket` names (0 = no quota; bucket 0 is
//! never used, so a zeroed `PeerInfo` means "unlimited"). One user's devices or a group's pool
//! share a bucket by naming the same id. **Both directions count against the same budget**: a
//! quota is a data allowance ("10 GB a month"), not a rate, and users are billed for what they
//! download as much as what they upload.
//!
//! ## The kernel step (after the gate and the destination blocklists, before accounting)
//! For a known peer with a bucket whose `limit_bytes != 0`:
//! 1. `used = used_bytes` (plain load). If `used >= limit_bytes` the bucket was exhausted
//!    *before* this packet: drop, counted as `DropReason::QuotaExhausted` (its bytes are not
//!    charged: the budget measures what was delivered).
//! 2. Otherwise `old = atomic fetch_add(used_bytes, len)`; the packet passes. Several CPUs can
//!    pass step 1 at the same moment, so the overshoot is at most one packet per CPU. A
//!    "packet" is one skb: with the tunnel's offloads a super-packet of up to 64 KiB, charged
//!    its segments' bytes and passed or dropped whole (`capybara-ebpf/src/quota.rs`).
//! 3. For each threshold (80 %, 90 %, 100 %) that `old + len` reaches and whose `warned` bit is
//!    not yet set: atomic `fetch_or` of the bit; the one CPU that saw the bit clear emits an
//!    `EVENT_QUOTA` record. So each warning is emitted exactly once per bucket epoch (a full
//!    ring buffer loses it, counted in `EVENTS_LOST`).
//!
//! ## Resets and top-ups
//! A reset writes the whole bucket in one map update: `used_bytes = 0`, `warned = 0` and
//! `epoch + 1`. An array update is a copy, not a swap, so a kernel `fetch_add` in flight on
//! another CPU lands either before the copy (overwritten: the bytes stay in the old period) or
//! after it (charged to the new period): at most one packet per CPU moves across the period
//! boundary, the same bound as the overshoot. A top-up (or a new budget) touches `used_bytes`
//! not at all: the map is mmapable and the agent changes `limit_bytes` with an atomic
//! compare-exchange, then clears the warned bits of the thresholds the new limit puts out of
//! reach again with an atomic `and` — no charged byte is ever forgiven.
//! A `fetch_or` of a warned bit racing a reset could set a bit of the *new* epoch for a crossing
//! of the old one; the kernel re-reads `epoch` after the `fetch_or` and, if it changed, clears the
//! bit again and emits nothing (the next packet over the threshold in the new epoch warns). The
//! epoch is carried in the event so the agent can tell periods apart.

use crate::pod;

/// Bucket ids are `1..MAX_QUOTA_BUCKETS` (0 = no quota).
pub type BucketId = u32;

/// Capacity of `CAPY_QUOTA` (bucket 0 is reserved for "none").
pub const MAX_QUOTA_BUCKETS: u32 = 131_072;

/// `QuotaBucket::warned` bit: 80 % reached.
pub const QUOTA_WARNED_80: u64 = 1 << 0;
/// `QuotaBucket::warned` bit: 90 % reached.
pub const QUOTA_WARNED_90: u64 = 1 << 1;
/// `QuotaBucket::warned` bit: 100 % reached (the bucket is exhausted: later packets drop).
pub const QUOTA_WARNED_100: u64 = 1 << 2;

/// The thresholds, in percent, with their `warned` bits, in rising order.
pub const QUOTA_THRESHOLDS: [(u32, u64); 3] = [
    (80, QUOTA_WARNED_80),
    (90, QUOTA_WARNED_90),
    (100, QUOTA_WARNED_100),
];

/// `limit * percent / 100` without overflow (for `percent <= 100`), as the kernel and the agent
/// both compute it.
pub const fn threshold_bytes(limit: u64, percent: u32) -> u64 {
    let p = percent as u64;
    (limit / 100) * p + (limit % 100) * p / 100
}

/// One entry of `CAPY_QUOTA`, indexed by [`BucketId`]. 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaBucket {
    /// The budget in bytes; 0 = the bucket is not configured (its peers are not limited).
    pub limit_bytes: u64,
    /// Bytes charged in this epoch (atomic adds by the kernel, on every CPU).
    pub used_bytes: u64,
    /// `QUOTA_WARNED_*` bits already emitted in this epoch (atomic `fetch_or` by the kernel; a
    /// `u64` because the eBPF target's atomics are 64-bit only).
    pub warned: u64,
    /// Period counter, incremented by the agent at every reset.
    pub epoch: u32,
    /// Zero.
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<QuotaBucket>() == 32);
const _: () = assert!(core::mem::offset_of!(QuotaBucket, used_bytes) == 8);
const _: () = assert!(core::mem::offset_of!(QuotaBucket, warned) == 16);

pod!(QuotaBucket);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_exact_and_do_not_overflow() {
        assert_eq!(threshold_bytes(10_000_000, 80), 8_000_000);
        assert_eq!(threshold_bytes(10_000_000, 100), 10_000_000);
        assert_eq!(threshold_bytes(999, 90), 899);
        assert_eq!(threshold_bytes(u64::MAX, 100), u64::MAX);
        assert!(threshold_bytes(u64::MAX, 90) < u64::MAX);
    }
}
