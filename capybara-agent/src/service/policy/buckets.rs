//! Quota buckets: one per owner (`user:NAME`, or `group:NAME` for a pool), allocated the
//! first time the owner needs one and kept (stored under `bucket/<owner>` with the start of the
//! period it was last reset for); the period each follows is remembered from the last apply,
//! for the tick.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use capybara_common::quota::MAX_QUOTA_BUCKETS;

use super::{
    engine,
    model::{Period, Zone},
    records::BucketRecord,
};
use crate::store::{Cf, Store, StoreError, keys};

/// A bucket in memory: the record and the period it follows (from the last apply).
#[derive(Clone, Copy, Debug)]
pub(super) struct BucketState {
    /// The stored record.
    pub(super) rec: BucketRecord,
    /// The period it follows.
    pub(super) period: Period,
    /// The zone of its period.
    pub(super) zone: Zone,
}

/// Every bucket by owner.
#[derive(Debug, Default)]
pub(super) struct Buckets(BTreeMap<String, BucketState>);

impl Buckets {
    /// The buckets kept in the store (their periods are set by the first apply).
    pub(super) fn load(store: &Store) -> Result<Buckets, StoreError> {
        let mut buckets = BTreeMap::new();
        for (key, rec) in store.scan::<BucketRecord>(Cf::Policy, keys::POLICY_BUCKETS)? {
            let owner = key[keys::POLICY_BUCKETS.len()..].to_owned();
            buckets.insert(
                owner,
                BucketState {
                    rec,
                    period: Period::None,
                    zone: Zone::default(),
                },
            );
        }
        Ok(Buckets(buckets))
    }

    /// The bucket of `owner`.
    pub(super) fn get(&self, owner: &str) -> Option<&BucketState> {
        self.0.get(owner)
    }

    /// The owner of bucket `id` and the period it follows.
    pub(super) fn owner_of(&self, id: u32) -> Option<(String, String)> {
        self.0
            .iter()
            .find(|(_, b)| b.rec.id == id)
            .map(|(o, b)| (o.clone(), b.period.to_string()))
    }

    /// The id of `owner`'s bucket, which from now on follows `period` in `zone`.
    pub(super) fn follow(&mut self, owner: &str, period: Period, zone: Zone) -> Option<u32> {
        let b = self.0.get_mut(owner)?;
        b.period = period;
        b.zone = zone;
        Some(b.rec.id)
    }

    /// A new bucket of `owner`.
    pub(super) fn insert(&mut self, owner: &str, state: BucketState) {
        self.0.insert(owner.to_owned(), state);
    }

    /// The buckets whose period started since their last reset: owner, id, the new start.
    pub(super) fn due(&self, now: SystemTime) -> Vec<(String, u32, i64)> {
        self.0
            .iter()
            .filter_map(|(o, b)| {
                engine::reset_due(b.period, b.zone, b.rec.period_start, now)
                    .map(|s| (o.clone(), b.rec.id, s))
            })
            .collect()
    }

    /// `owner`'s bucket was reset for the period `rec` names.
    pub(super) fn reset(&mut self, owner: &str, rec: BucketRecord) {
        if let Some(b) = self.0.get_mut(owner) {
            b.rec = rec;
        }
    }

    /// Every bucket: owner and id, by owner.
    pub(super) fn all(&self) -> Vec<(String, u32)> {
        self.0.iter().map(|(o, b)| (o.clone(), b.rec.id)).collect()
    }

    /// The lowest bucket id no owner has, if any is left.
    pub(super) fn free_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.0.values().map(|b| b.rec.id).collect();
        (1..MAX_QUOTA_BUCKETS).find(|i| !used.contains(i))
    }
}
