//! The cluster feature (issue 25): this agent's node of an etcd cluster, when it is one
//! (`crate::cluster::Node`, set by the daemon at start); status and health for the API; the
//! cluster's changes applied here ([`Service::apply_shared`]: the store, then each feature's
//! records read again and the kernel and the tunnel reprogrammed).

use std::{
    collections::BTreeSet,
    sync::{Arc, OnceLock},
};

use super::{Service, ServiceError, domain::UserName};
use crate::{
    cluster::{ClusterError, ClusterHealth, ClusterStatus, Node, state::Applier},
    store::{Cf, SharedOp},
};

/// This agent's node, if it is one.
#[derive(Debug, Default)]
pub struct Cluster {
    node: OnceLock<Arc<Node>>,
}

impl Cluster {
    /// Makes the agent a node of the cluster `node` belongs to (once; the daemon at start).
    pub fn set_node(&self, node: Arc<Node>) {
        let _ = self.node.set(node);
    }

    /// The node, if the agent is one.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.get().cloned()
    }

    /// The cluster's nodes; a status saying "not clustered" when the agent is not a node.
    pub async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        match self.node() {
            Some(n) => n.status().await,
            None => Ok(ClusterStatus::default()),
        }
    }

    /// etcd's members and the lease as this node sees them; "not clustered" when it is none.
    pub async fn health(&self) -> ClusterHealth {
        match self.node() {
            Some(n) => n.health().await,
            None => ClusterHealth::default(),
        }
    }
}

impl Service {
    /// Applies the cluster's change at `revision` (`crate::cluster::state`) under the writer
    /// lock: the store first, then every feature whose records it touched reads them again and
    /// reprograms the kernel and the tunnel. A revision applied already is skipped.
    pub fn apply_shared(&self, revision: i64, ops: &[SharedOp]) -> Result<bool, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        if !self.core.store.apply_shared(revision, ops)? {
            return Ok(false);
        }
        let families: BTreeSet<&'static str> = ops.iter().map(|o| o.cf.name()).collect();
        self.reload_shared(&families)?;
        Ok(true)
    }

    /// Makes the shared records exactly the cluster's `state` at `revision` (a first join, or
    /// after a compaction), then reloads what changed.
    pub fn replace_shared(&self, revision: i64, state: &[SharedOp]) -> Result<(), ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let touched = self.core.store.replace_shared(revision, state)?;
        let families: BTreeSet<&'static str> = touched.iter().map(|cf| cf.name()).collect();
        self.reload_shared(&families)
    }

    /// Every feature holding records of `families` in memory reads them again.
    fn reload_shared(&self, families: &BTreeSet<&'static str>) -> Result<(), ServiceError> {
        let has = |cf: Cf| families.contains(cf.name());
        if [Cf::Users, Cf::Peers, Cf::Proxies, Cf::Policy, Cf::Groups]
            .into_iter()
            .any(has)
        {
            let t = std::time::Instant::now();
            self.devices.resync()?;
            self.proxies.resync()?;
            self.policy.reload()?;
            self.mfa.reload()?;
            // Every user: a group's or the default's change reaches users through their
            // effective policy (one pass; `policy::apply` batches the kernel writes).
            let users: Vec<UserName> = self.directory.user_names()?;
            self.policy.apply(&users, false)?;
            tracing::debug!(
                users = users.len(),
                ms = t.elapsed().as_millis(),
                "cluster: devices and policy reloaded"
            );
        }
        if has(Cf::Schedules) {
            self.schedules.reload();
        }
        if has(Cf::Webhooks) {
            self.webhooks.resync()?;
        }
        Ok(())
    }
}

impl Applier for Service {
    fn revision(&self) -> i64 {
        self.core.store.shared_revision()
    }

    fn local_state(&self) -> Result<Vec<SharedOp>, String> {
        self.core.store.shared_state().map_err(|e| e.to_string())
    }

    fn apply(&self, revision: i64, ops: &[SharedOp]) -> Result<(), String> {
        self.apply_shared(revision, ops)
            .map(drop)
            .map_err(|e| chain(&e))
    }

    fn replace(&self, revision: i64, state: &[SharedOp]) -> Result<(), String> {
        self.replace_shared(revision, state).map_err(|e| chain(&e))
    }
}

/// `e` with its sources, `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(x) = source {
        s.push_str(": ");
        s.push_str(&x.to_string());
        source = x.source();
    }
    s
}
