//! Data quotas: byte budgets in `CAPY_QUOTA` buckets shared by peers (layout and kernel
//! behaviour: `capybara_common::quota`).
//!
//! - [`Dataplane::set_quota_limit`] creates a bucket or changes its budget;
//!   [`Dataplane::assign_quota`] charges a peer to a bucket (or to none) with one write of its
//!   `PeerInfo`, so a packet sees the old or the new bucket, never a half-written assignment.
//! - [`Dataplane::top_up_quota`] raises the budget, keeping what was used.
//! - [`Dataplane::reset_quota`] starts a new period: one map update writes the whole bucket with
//!   `used_bytes = 0`, `warned = 0` and `epoch + 1`. The kernel's `fetch_add` of a packet in
//!   flight on another CPU lands before the copy (its bytes stay in the old period, which is
//!   over) or after it (charged to the new period): at most one packet per CPU crosses the
//!   boundary. A warned bit set across the reset is given back by the kernel (it re-checks the
//!   epoch), so the new period's warnings are never suppressed.
//! - Every write validates first (the bucket id is in `1..MAX_QUOTA_BUCKETS`, a limit is not 0,
//!   the peer exists): on error no map is touched.
//!
//! Limit changes and top-ups read the bucket and write it back with the usage they read: bytes
//! the kernel charges between that read and the write (one syscall apart, a few microseconds)
//! are forgiven. That is the price of an array map whose values are written whole; a reset has
//! no such window because it zeroes the usage on purpose.

use capybara_common::{
    maps as names,
    peer::{MAX_PEERS, PeerId},
    quota::{BucketId, MAX_QUOTA_BUCKETS, QUOTA_THRESHOLDS, QuotaBucket, threshold_bytes},
};

use super::{Dataplane, DataplaneError, Result, map_err};

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
            .set(bucket, b, 0)
            .map_err(map_err(names::QUOTA, op))
    }

    /// Creates bucket `bucket` with a budget of `limit_bytes`, or changes the budget of an
    /// existing one (usage and epoch kept; warnings below the new thresholds re-armed).
    pub fn set_quota_limit(&mut self, bucket: BucketId, limit_bytes: u64) -> Result<QuotaUsage> {
        check_bucket(bucket)?;
        check_limit(bucket, limit_bytes)?;
        let b = with_limit(self.read_bucket(bucket)?, limit_bytes);
        self.write_bucket(bucket, b, "write limit")?;
        tracing::debug!(bucket, limit_bytes, "quota limit set");
        Ok(QuotaUsage::of(&b))
    }

    /// Charges active peer `id` to `bucket` (`None`: no quota) — one update of its `PeerInfo`
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
        self.peers
            .peers
            .map
            .set(id, info, 0)
            .map_err(map_err(names::PEERS, "write quota bucket"))?;
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
        let b = self.configured_bucket(bucket)?;
        let b = with_limit(b, b.limit_bytes.saturating_add(add_bytes));
        self.write_bucket(bucket, b, "top up")?;
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
