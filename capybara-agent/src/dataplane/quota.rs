//! Data quotas: byte budgets in `CAPY_QUOTA` buckets shared by peers (layout and kernel
//! behaviour: `capybara_common::quota`).
//!
//! - [`Dataplane::set_quota_limit`] creates a bucket or changes its budget;
//!   [`Dataplane::assign_quota`] charges a peer to a bucket (or to none) with one atomic store of
//!   its hot line's `quota_bucket`, so a packet sees the old or the new bucket, never a
//!   half-written assignment.
//! - [`Dataplane::top_up_quota`] raises the budget, keeping what was used: an atomic add on
//!   `limit_bytes` through the map's memory mapping, so bytes the kernel charges meanwhile all
//!   count. [`Dataplane::set_quota_limit`] on a configured bucket is an atomic store the same way.
//!   Warned bits of thresholds the new budget puts out of reach again are cleared with an atomic
//!   `and` (a threshold the kernel crosses in that instant may be reported once more: a duplicate
//!   warning, never a lost one).
//! - [`Dataplane::reset_quota`] starts a new period: one map update writes the whole bucket with
//!   `used_bytes = 0`, `warned = 0` and `epoch + 1`. The kernel's `fetch_add` of a packet in
//!   flight on another CPU lands before the copy (its bytes stay in the old period, which is
//!   over) or after it (charged to the new period): at most one packet per CPU crosses the
//!   boundary. A warned bit set across the reset is given back by the kernel (it re-checks the
//!   epoch), so the new period's warnings are never suppressed.
//! - Every write validates first (the bucket id is in `1..MAX_QUOTA_BUCKETS`, a limit is not 0,
//!   the peer exists): on error no map is touched.
//!

use capybara_common::{
    maps as names,
    peer::{MAX_PEERS, PeerId},
    quota::{BucketId, MAX_QUOTA_BUCKETS, QUOTA_THRESHOLDS, QuotaBucket, threshold_bytes},
};

use std::{os::fd::AsFd as _, sync::atomic::Ordering};

use aya::{
    Ebpf,
    maps::{Array, MapData},
};

use super::{Dataplane, DataplaneError, Owned, Result, map_err, sys, sys_err, take};

/// `u64` words per bucket in the mapping: limit, used, warned, epoch + reserved.
const WORDS: usize = size_of::<QuotaBucket>() / 8;

/// The bucket array and its memory mapping.
pub(super) struct QuotaMaps {
    map: Owned<Array<MapData, QuotaBucket>>,
    mmap: sys::MmapArray,
}

impl QuotaMaps {
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<QuotaMaps> {
        let map: Owned<Array<MapData, QuotaBucket>> = take(ebpf, names::QUOTA)?;
        let words = map.map.len() as usize * size_of::<QuotaBucket>() / 4;
        let mmap =
            sys::MmapArray::new(map.fd.as_fd(), words).map_err(sys_err(names::QUOTA, "mmap"))?;
        Ok(QuotaMaps { map, mmap })
    }

    /// Bucket `bucket`'s `limit_bytes` and `warned` words, as atomics shared with the kernel.
    fn words(
        &self,
        bucket: BucketId,
    ) -> (
        &std::sync::atomic::AtomicU64,
        &std::sync::atomic::AtomicU64,
        &std::sync::atomic::AtomicU64,
    ) {
        let w = &self.mmap.as_atomic_u64()[bucket as usize * WORDS..][..WORDS];
        (&w[0], &w[1], &w[2])
    }

    /// Changes a configured bucket's budget in place: `f(old limit)` stored atomically, then
    /// the warned bits of thresholds the usage is below again cleared. Returns the bucket after.
    fn change_limit(&self, bucket: BucketId, f: impl Fn(u64) -> u64) -> QuotaBucket {
        let (limit, used, warned) = self.words(bucket);
        let mut cur = limit.load(Ordering::Acquire);
        let new = loop {
            let new = f(cur);
            match limit.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break new,
                Err(now) => cur = now,
            }
        };
        let used_now = used.load(Ordering::Acquire);
        let mut clear = 0;
        for (percent, bit) in QUOTA_THRESHOLDS {
            if used_now < threshold_bytes(new, percent) {
                clear |= bit;
            }
        }
        warned.fetch_and(!clear, Ordering::AcqRel);
        QuotaBucket {
            limit_bytes: new,
            used_bytes: used_now,
            warned: warned.load(Ordering::Acquire),
            ..QuotaBucket::default()
        }
    }
}

/// A bucket as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaUsage {
    /// The budget in bytes (0: not configured).
    pub limit_bytes: u64,
    /// Bytes charged in this period (may exceed the limit by at most one packet per CPU).
    pub used_bytes: u64,
    /// The period counter (incremented by every reset).
    pub epoch: u32,
    /// Thresholds (percent) already reported in this period.
    pub warned: [bool; 3],
}

impl QuotaUsage {
    fn of(b: &QuotaBucket) -> QuotaUsage {
        let mut warned = [false; 3];
        for (w, (_, bit)) in warned.iter_mut().zip(QUOTA_THRESHOLDS) {
            *w = b.warned & bit != 0;
        }
        QuotaUsage {
            limit_bytes: b.limit_bytes,
            used_bytes: b.used_bytes,
            epoch: b.epoch,
            warned,
        }
    }

    /// Whether the kernel drops the bucket's traffic.
    pub fn exhausted(&self) -> bool {
        self.limit_bytes != 0 && self.used_bytes >= self.limit_bytes
    }
}

/// Checks a bucket id (`1..MAX_QUOTA_BUCKETS`).
pub fn check_bucket(bucket: BucketId) -> Result<()> {
    if bucket == 0 || bucket >= MAX_QUOTA_BUCKETS {
        return Err(DataplaneError::QuotaBucketOutOfRange {
            bucket,
            max: MAX_QUOTA_BUCKETS,
        });
    }
    Ok(())
}

fn check_limit(bucket: BucketId, limit_bytes: u64) -> Result<()> {
    if limit_bytes == 0 {
        return Err(DataplaneError::QuotaLimitZero { bucket });
    }
    Ok(())
}

/// `b` with limit `limit`: the warned bits of thresholds the usage is now below are cleared, so
/// they are reported again when reached under the new limit.
pub fn with_limit(mut b: QuotaBucket, limit: u64) -> QuotaBucket {
    b.limit_bytes = limit;
    for (percent, bit) in QUOTA_THRESHOLDS {
        if b.used_bytes < threshold_bytes(limit, percent) {
            b.warned &= !bit;
        }
    }
    b
}

/// The bucket of a new period: zero usage and warnings, the next epoch.
pub fn reset(b: QuotaBucket, limit: u64) -> QuotaBucket {
    QuotaBucket {
        limit_bytes: limit,
        used_bytes: 0,
        warned: 0,
        epoch: b.epoch.wrapping_add(1),
        _reserved: 0,
    }
}

impl Dataplane {
    fn read_bucket(&self, bucket: BucketId) -> Result<QuotaBucket> {
        self.quota
            .map
            .map
            .get(&bucket, 0)
            .map_err(map_err(names::QUOTA, "read"))
    }

    fn configured_bucket(&self, bucket: BucketId) -> Result<QuotaBucket> {
        check_bucket(bucket)?;
        let b = self.read_bucket(bucket)?;
        if b.limit_bytes == 0 {
            return Err(DataplaneError::UnknownQuotaBucket { bucket });
        }
        Ok(b)
    }

    fn write_bucket(&mut self, bucket: BucketId, b: QuotaBucket, op: &'static str) -> Result<()> {
        self.quota
            .map
            .map
            .set(bucket, b, 0)
            .map_err(map_err(names::QUOTA, op))
    }

    /// Creates bucket `bucket` with a budget of `limit_bytes`, or changes the budget of an
    /// existing one atomically (usage and epoch kept; warnings below the new thresholds
    /// re-armed).
    pub fn set_quota_limit(&mut self, bucket: BucketId, limit_bytes: u64) -> Result<QuotaUsage> {
        check_bucket(bucket)?;
        check_limit(bucket, limit_bytes)?;
        let old = self.read_bucket(bucket)?;
        let b = if old.limit_bytes == 0 {
            let b = with_limit(old, limit_bytes);
            self.write_bucket(bucket, b, "write limit")?;
            b
        } else {
            QuotaBucket {
                epoch: old.epoch,
                ..self.quota.change_limit(bucket, |_| limit_bytes)
            }
        };
        tracing::debug!(bucket, limit_bytes, "quota limit set");
        Ok(QuotaUsage::of(&b))
    }

    /// Charges active peer `id` to `bucket` (`None`: no quota) — one store into its hot line
    /// (gate and flags kept). The bucket need not be configured yet: an unconfigured bucket
    /// limits nothing.
    pub fn assign_quota(&mut self, id: PeerId, bucket: Option<BucketId>) -> Result<()> {
        if id >= MAX_PEERS {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: MAX_PEERS });
        }
        let b = match bucket {
            Some(b) => {
                check_bucket(b)?;
                b
            }
            None => 0,
        };
        let mut info = self.active_peer_info(id)?;
        info.quota_bucket = b;
        self.write_peer_info(id, info, "write quota bucket")?;
        tracing::debug!(id, ?bucket, "quota bucket assigned");
        Ok(())
    }

    /// The bucket peer `id` is charged to.
    pub fn quota_of(&self, id: PeerId) -> Result<Option<BucketId>> {
        let info = self.active_peer_info(id)?;
        Ok((info.quota_bucket != 0).then_some(info.quota_bucket))
    }

    /// Bucket `bucket` as the kernel holds it.
    pub fn quota_usage(&self, bucket: BucketId) -> Result<QuotaUsage> {
        check_bucket(bucket)?;
        Ok(QuotaUsage::of(&self.read_bucket(bucket)?))
    }

    /// Raises configured bucket `bucket`'s budget by `add_bytes` (saturating), keeping its
    /// usage: an exhausted bucket's traffic flows again at once.
    pub fn top_up_quota(&mut self, bucket: BucketId, add_bytes: u64) -> Result<QuotaUsage> {
        check_bucket(bucket)?;
        check_limit(bucket, add_bytes)?;
        let old = self.configured_bucket(bucket)?;
        let b = QuotaBucket {
            epoch: old.epoch,
            ..self
                .quota
                .change_limit(bucket, |l| l.saturating_add(add_bytes))
        };
        tracing::debug!(bucket, add_bytes, "quota topped up");
        Ok(QuotaUsage::of(&b))
    }

    /// Starts a new period of configured bucket `bucket` (see the module docs): one update,
    /// zero usage and warnings, the next epoch, and the budget `limit_bytes` (`None`: the same).
    pub fn reset_quota(
        &mut self,
        bucket: BucketId,
        limit_bytes: Option<u64>,
    ) -> Result<QuotaUsage> {
        check_bucket(bucket)?;
        if let Some(l) = limit_bytes {
            check_limit(bucket, l)?;
        }
        let old = self.configured_bucket(bucket)?;
        let b = reset(old, limit_bytes.unwrap_or(old.limit_bytes));
        self.write_bucket(bucket, b, "reset")?;
        tracing::debug!(bucket, epoch = b.epoch, "quota reset");
        Ok(QuotaUsage::of(&b))
    }

    /// Removes bucket `bucket`: its peers are no longer limited (they keep naming it until
    /// re-assigned; a bucket created again under the id applies to them).
    pub fn remove_quota(&mut self, bucket: BucketId) -> Result<()> {
        check_bucket(bucket)?;
        self.write_bucket(bucket, QuotaBucket::default(), "remove")?;
        tracing::debug!(bucket, "quota removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capybara_common::quota::{QUOTA_WARNED_80, QUOTA_WARNED_90, QUOTA_WARNED_100};

    #[test]
    fn bucket_ids_are_checked_naming_the_field() {
        for bad in [0, MAX_QUOTA_BUCKETS, u32::MAX] {
            let e = check_bucket(bad).unwrap_err();
            assert!(
                matches!(e, DataplaneError::QuotaBucketOutOfRange { bucket, .. } if bucket == bad)
            );
            assert!(e.to_string().contains("quota bucket"), "{e}");
        }
        check_bucket(1).unwrap();
        check_bucket(MAX_QUOTA_BUCKETS - 1).unwrap();
        let e = check_limit(3, 0).unwrap_err();
        assert!(e.to_string().contains("limit_bytes"), "{e}");
    }

    #[test]
    fn a_higher_limit_rearms_the_warnings_below_it() {
        let b = QuotaBucket {
            limit_bytes: 1000,
            used_bytes: 1000,
            warned: QUOTA_WARNED_80 | QUOTA_WARNED_90 | QUOTA_WARNED_100,
            epoch: 3,
            _reserved: 0,
        };
        // 1000 of 1200: 83 % — the 80 % warning stays given, 90 and 100 are armed again.
        let t = with_limit(b, 1200);
        assert_eq!((t.limit_bytes, t.used_bytes, t.epoch), (1200, 1000, 3));
        assert_eq!(t.warned, QUOTA_WARNED_80);
        assert!(!QuotaUsage::of(&t).exhausted());
        assert_eq!(QuotaUsage::of(&t).warned, [true, false, false]);
    }

    #[test]
    fn reset_zeroes_usage_and_warnings_and_advances_the_epoch() {
        let b = QuotaBucket {
            limit_bytes: 1000,
            used_bytes: 1500,
            warned: QUOTA_WARNED_80,
            epoch: u32::MAX,
            _reserved: 0,
        };
        assert_eq!(
            reset(b, 2000),
            QuotaBucket {
                limit_bytes: 2000,
                used_bytes: 0,
                warned: 0,
                epoch: 0,
                _reserved: 0
            }
        );
        assert!(QuotaUsage::of(&b).exhausted());
    }
}
