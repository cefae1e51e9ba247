//! The cluster feature (issue 25): this agent's node of an etcd cluster, when it is one
//! (`crate::cluster::Node`, set by the daemon at start); status and health for the API.

use std::sync::{Arc, OnceLock};

use crate::cluster::{ClusterError, ClusterHealth, ClusterStatus, Node};

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
