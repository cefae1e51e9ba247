//! What the policy needs from the dataplane ([`PolicyPlane`]): rates, flow limits and quota
//! buckets of peers. A supertrait of [`Plane`](crate::service::ports::Plane), implemented for
//! the real dataplane and for the in-memory one of the host tests.
//!
//! Each write is skipped when the kernel already holds the value (rates and flow limits are read
//! back first), so re-applying an unchanged policy to many peers costs reads, not class
//! changes or flow-table sweeps.

use std::{collections::BTreeMap, sync::Mutex};

use capybara_common::{peer::PeerId, quota::BucketId};

use crate::{
    dataplane::{Dataplane, DataplaneError, PeerRates, QuotaUsage},
    service::ports::MemoryPlane,
};

/// The per-peer policy operations of the dataplane.
pub trait PolicyPlane {
    /// Sets a peer's rates (both `None`: unshaped).
    fn policy_rates(&self, id: PeerId, rates: PeerRates) -> Result<(), DataplaneError>;
    /// Sets (or with `None` removes) a peer's flow limit.
    fn policy_flows(&self, id: PeerId, limit: Option<u32>) -> Result<(), DataplaneError>;
    /// Creates bucket `bucket` or changes its budget (usage kept).
    fn policy_bucket(&self, bucket: BucketId, limit_bytes: u64) -> Result<(), DataplaneError>;
    /// Charges a peer to a bucket, or to none.
    fn policy_assign(&self, id: PeerId, bucket: Option<BucketId>) -> Result<(), DataplaneError>;
    /// Sets a peer's flow limit and quota bucket together (one kernel update when they
    /// differ). The default does it with the two calls above.
    fn policy_limits(
        &self,
        id: PeerId,
        flows: Option<u32>,
        bucket: Option<BucketId>,
    ) -> Result<(), DataplaneError> {
        self.policy_flows(id, flows)?;
        self.policy_assign(id, bucket)
    }
    /// Starts a new period of a bucket.
    fn policy_reset(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError>;
    /// A bucket's usage.
    fn policy_usage(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError>;
}

impl PolicyPlane for Mutex<Dataplane> {
    fn policy_rates(&self, id: PeerId, rates: PeerRates) -> Result<(), DataplaneError> {
        let mut dp = self.lock().unwrap();
        if dp.rates(id)? == rates {
            return Ok(());
        }
        dp.set_rates(id, rates)
    }
    fn policy_flows(&self, id: PeerId, limit: Option<u32>) -> Result<(), DataplaneError> {
        let mut dp = self.lock().unwrap();
        if dp.flow_limit(id)? == limit {
            return Ok(());
        }
        match limit {
            Some(l) => dp.set_flow_limit(id, l),
            None => dp.clear_flow_limit(id),
        }
    }
    fn policy_bucket(&self, bucket: BucketId, limit_bytes: u64) -> Result<(), DataplaneError> {
        let mut dp = self.lock().unwrap();
        if dp.quota_usage(bucket)?.limit_bytes == limit_bytes {
            return Ok(());
        }
        dp.set_quota_limit(bucket, limit_bytes).map(|_| ())
    }
    fn policy_assign(&self, id: PeerId, bucket: Option<BucketId>) -> Result<(), DataplaneError> {
        let mut dp = self.lock().unwrap();
        if dp.quota_of(id)? == bucket {
            return Ok(());
        }
        dp.assign_quota(id, bucket)
    }
    fn policy_limits(
        &self,
        id: PeerId,
        flows: Option<u32>,
        bucket: Option<BucketId>,
    ) -> Result<(), DataplaneError> {
        self.lock()
            .unwrap()
            .set_peer_limits(id, flows, bucket)
            .map(|_| ())
    }
    fn policy_reset(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError> {
        self.lock().unwrap().reset_quota(bucket, None)
    }
    fn policy_usage(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError> {
        self.lock().unwrap().quota_usage(bucket)
    }
}

/// The policy state of a [`MemoryPlane`].
#[derive(Debug, Default, Clone)]
pub struct MemoryPolicy {
    /// Rates per peer (absent: unshaped).
    pub rates: BTreeMap<PeerId, PeerRates>,
    /// Flow limits per peer.
    pub flows: BTreeMap<PeerId, u32>,
    /// Buckets.
    pub buckets: BTreeMap<BucketId, QuotaUsage>,
    /// Bucket per peer.
    pub assigned: BTreeMap<PeerId, BucketId>,
    /// Writes done (tests check that re-applying an unchanged policy writes nothing).
    pub writes: u64,
}

fn known(p: &MemoryPlane, id: PeerId) -> Result<(), DataplaneError> {
    if p.with(|s| s.peers.contains_key(&id)) {
        Ok(())
    } else {
        Err(DataplaneError::UnknownPeer { id })
    }
}

impl PolicyPlane for MemoryPlane {
    fn policy_rates(&self, id: PeerId, rates: PeerRates) -> Result<(), DataplaneError> {
        known(self, id)?;
        self.with(|s| {
            let p = &mut s.policy;
            if p.rates.get(&id).copied().unwrap_or_default() != rates {
                p.writes += 1;
                if rates == PeerRates::default() {
                    p.rates.remove(&id);
                } else {
                    p.rates.insert(id, rates);
                }
            }
        });
        Ok(())
    }
    fn policy_flows(&self, id: PeerId, limit: Option<u32>) -> Result<(), DataplaneError> {
        known(self, id)?;
        self.with(|s| {
            let p = &mut s.policy;
            if p.flows.get(&id).copied() != limit {
                p.writes += 1;
                match limit {
                    Some(l) => p.flows.insert(id, l),
                    None => p.flows.remove(&id),
                };
            }
        });
        Ok(())
    }
    fn policy_bucket(&self, bucket: BucketId, limit_bytes: u64) -> Result<(), DataplaneError> {
        crate::dataplane::quota::check_bucket(bucket)?;
        self.with(|s| {
            let p = &mut s.policy;
            let b = p.buckets.entry(bucket).or_insert(QuotaUsage {
                limit_bytes: 0,
                used_bytes: 0,
                epoch: 0,
                warned: [false; 3],
            });
            if b.limit_bytes != limit_bytes {
                b.limit_bytes = limit_bytes;
                p.writes += 1;
            }
        });
        Ok(())
    }
    fn policy_assign(&self, id: PeerId, bucket: Option<BucketId>) -> Result<(), DataplaneError> {
        known(self, id)?;
        self.with(|s| {
            let p = &mut s.policy;
            if p.assigned.get(&id).copied() != bucket {
                p.writes += 1;
                match bucket {
                    Some(b) => p.assigned.insert(id, b),
                    None => p.assigned.remove(&id),
                };
            }
        });
        Ok(())
    }
    fn policy_reset(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError> {
        self.with(|s| {
            let b = s
                .policy
                .buckets
                .get_mut(&bucket)
                .ok_or(DataplaneError::UnknownQuotaBucket { bucket })?;
            b.used_bytes = 0;
            b.warned = [false; 3];
            b.epoch = b.epoch.wrapping_add(1);
            Ok(*b)
        })
    }
    fn policy_usage(&self, bucket: BucketId) -> Result<QuotaUsage, DataplaneError> {
        crate::dataplane::quota::check_bucket(bucket)?;
        Ok(self.with(|s| {
            s.policy
                .buckets
                .get(&bucket)
                .copied()
                .unwrap_or(QuotaUsage {
                    limit_bytes: 0,
                    used_bytes: 0,
                    epoch: 0,
                    warned: [false; 3],
                })
        }))
    }
}
