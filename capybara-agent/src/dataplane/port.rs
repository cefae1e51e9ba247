//! The dataplane as the service's port: [`Plane`] and [`PolicyPlane`] for `Mutex<Dataplane>`
//! (the daemon shares one dataplane between the service and its own loops).

use std::{collections::BTreeMap, sync::Mutex};

use capybara_common::{
    counters::{Counter, DROPS_BASE},
    drop::DropReason,
    peer::{PeerId, PeerStats},
    quota::BucketId,
};

use super::{Dataplane, DataplaneError, Gate, PeerRates, QuotaUsage};
use crate::{
    blocklist::{
        Direction, ListName,
        registry::{ListOp, ListSummary, RegistrySnapshot},
    },
    net::Cidr,
    service::ports::{Plane, PolicyPlane},
};

impl Plane for Mutex<Dataplane> {
    fn set_peer(&self, id: PeerId, allowed: &[Cidr]) -> Result<(), DataplaneError> {
        self.lock().unwrap().set_peer(id, allowed).map(|_| ())
    }
    fn set_peers(&self, peers: &[(PeerId, Vec<Cidr>)]) -> Result<(), DataplaneError> {
        self.lock().unwrap().set_peers(peers)
    }
    fn remove_peer(&self, id: PeerId) -> Result<(), DataplaneError> {
        self.lock().unwrap().remove_peer(id)
    }
    fn peers(&self) -> BTreeMap<PeerId, Vec<Cidr>> {
        self.lock().unwrap().peers()
    }
    fn set_gate(&self, id: PeerId, gate: Gate) -> Result<(), DataplaneError> {
        self.lock().unwrap().set_gate(id, gate)
    }
    fn gate(&self, id: PeerId) -> Result<Gate, DataplaneError> {
        self.lock().unwrap().gate(id)
    }
    fn peer_stats(&self, id: PeerId) -> Result<PeerStats, DataplaneError> {
        self.lock().unwrap().peer_stats(id)
    }
    fn attached(&self) -> Result<Option<Vec<String>>, DataplaneError> {
        let links = self.lock().unwrap().pinned_links()?;
        Ok(Some(
            links
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
        ))
    }
    fn drops(&self) -> Result<Vec<(DropReason, Counter)>, DataplaneError> {
        let c = self.lock().unwrap().counters()?;
        Ok(DropReason::ALL
            .iter()
            .map(|r| (*r, c.get(DROPS_BASE + *r as u32)))
            .collect())
    }
    fn list_op(
        &self,
        direction: Direction,
        name: &ListName,
        op: ListOp<'_>,
    ) -> Result<(), DataplaneError> {
        let mut dp = self.lock().unwrap();
        match op {
            ListOp::Add(c) => dp.list_add(direction, name, c),
            ListOp::Remove(c) => dp.list_remove(direction, name, c),
            ListOp::Replace(c) => dp.list_replace(direction, name, c),
            ListOp::Delete => dp.list_delete(direction, name),
        }
        .map(|_| ())
    }
    fn list_batch(
        &self,
        direction: Direction,
        ops: &[(ListName, ListOp<'_>)],
    ) -> Result<(), DataplaneError> {
        self.lock().unwrap().list_batch(direction, ops).map(|_| ())
    }
    fn verdicts(&self) -> Result<Vec<(&'static str, Counter)>, DataplaneError> {
        let c = self.lock().unwrap().counters()?;
        Ok(c.named().collect())
    }
    fn lists(&self) -> Result<Vec<(ListSummary, Counter)>, DataplaneError> {
        self.lock().unwrap().list_hits_all()
    }
    fn list_cidrs(&self, direction: Direction, name: &ListName) -> Option<Vec<Cidr>> {
        self.lock().unwrap().list_cidrs(direction, name)
    }
    fn list_snapshot(&self) -> RegistrySnapshot {
        self.lock().unwrap().list_snapshot()
    }
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
