//! The `Cluster` service (issue 25: the nodes, etcd's members as this node reaches them), its
//! conversions and client calls.

use capybara_proto::v1::{self as pb, cluster_client::ClusterClient, cluster_server};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    handler::Api,
};
use crate::{
    cluster::{
        ClusterError, ClusterHealth, ClusterStatus, FailoverView, MemberHealth, NodeRecord,
        NodeView,
    },
    service::domain::Scope,
};

fn unavailable(e: ClusterError) -> Status {
    Status::unavailable(format!("cluster: {e}"))
}

#[tonic::async_trait]
impl cluster_server::Cluster for Api {
    async fn get_cluster_status(
        &self,
        req: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.auth(&req, Scope::Read)?;
        let s = self.service().cluster.status().await.map_err(unavailable)?;
        Ok(Response::new((&s).into()))
    }

    async fn get_cluster_health(
        &self,
        req: Request<pb::GetClusterHealthRequest>,
    ) -> Result<Response<pb::ClusterHealth>, Status> {
        self.auth(&req, Scope::Read)?;
        let h = self.service().cluster.health().await;
        Ok(Response::new((&h).into()))
    }

    async fn set_cluster_failover(
        &self,
        req: Request<pb::SetClusterFailoverRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let enabled = req.get_ref().enabled;
        let cluster = &self.service().cluster;
        let Some(node) = cluster.node() else {
            return Err(Status::failed_precondition(
                "not clustered: the agent was started without --etcd",
            ));
        };
        node.set_failover(enabled).await.map_err(unavailable)?;
        tracing::info!(%actor, enabled, "cluster failover set");
        let s = cluster.status().await.map_err(unavailable)?;
        Ok(Response::new((&s).into()))
    }
}

impl From<&ClusterStatus> for pb::ClusterStatus {
    fn from(s: &ClusterStatus) -> pb::ClusterStatus {
        pb::ClusterStatus {
            clustered: s.clustered,
            node: s.node.clone(),
            prefix: s.prefix.clone(),
            revision: s.revision,
            nodes: s
                .nodes
                .iter()
                .map(|n| pb::ClusterNode {
                    name: n.record.name.clone(),
                    role: n.role.clone(),
                    applied_revision: n.record.applied_revision,
                    lag: n.lag,
                    started_at: i64::try_from(n.record.started_at).unwrap_or(i64::MAX),
                    lease_age_ms: n.lease_age_ms,
                    lease_ttl_s: n.lease_ttl_s,
                    peers_online: n.record.peers_online,
                    this_node: n.this_node,
                })
                .collect(),
            failover: Some(pb::Failover {
                enabled: s.failover.enabled,
                primary: s.failover.primary.clone(),
                address: s.failover.address.clone(),
                role: s.failover.role.clone(),
            }),
        }
    }
}

impl From<pb::ClusterStatus> for ClusterStatus {
    fn from(s: pb::ClusterStatus) -> ClusterStatus {
        ClusterStatus {
            clustered: s.clustered,
            node: s.node,
            prefix: s.prefix,
            revision: s.revision,
            nodes: s
                .nodes
                .into_iter()
                .map(|n| NodeView {
                    record: NodeRecord {
                        name: n.name,
                        started_at: u64::try_from(n.started_at).unwrap_or(0),
                        peers_online: n.peers_online,
                        applied_revision: n.applied_revision,
                    },
                    lease_ttl_s: n.lease_ttl_s,
                    lease_age_ms: n.lease_age_ms,
                    this_node: n.this_node,
                    role: n.role,
                    lag: n.lag,
                })
                .collect(),
            failover: s
                .failover
                .map(|f| FailoverView {
                    enabled: f.enabled,
                    primary: f.primary,
                    address: f.address,
                    role: f.role,
                })
                .unwrap_or_default(),
        }
    }
}

impl From<&ClusterHealth> for pb::ClusterHealth {
    fn from(h: &ClusterHealth) -> pb::ClusterHealth {
        pb::ClusterHealth {
            clustered: h.clustered,
            healthy: h.healthy,
            members: h
                .members
                .iter()
                .map(|m| pb::EtcdMember {
                    endpoint: m.endpoint.clone(),
                    reachable: m.reachable,
                    version: m.version.clone(),
                    leader: m.leader,
                    db_size: m.db_size,
                    error: m.error.clone(),
                })
                .collect(),
            lease_held: h.lease_held,
            lease_ttl_left_s: h.lease_ttl_left_s,
        }
    }
}

impl From<pb::ClusterHealth> for ClusterHealth {
    fn from(h: pb::ClusterHealth) -> ClusterHealth {
        ClusterHealth {
            clustered: h.clustered,
            healthy: h.healthy,
            members: h
                .members
                .into_iter()
                .map(|m| MemberHealth {
                    endpoint: m.endpoint,
                    reachable: m.reachable,
                    version: m.version,
                    leader: m.leader,
                    db_size: m.db_size,
                    error: m.error,
                })
                .collect(),
            lease_held: h.lease_held,
            lease_ttl_left_s: h.lease_ttl_left_s,
        }
    }
}

impl Client {
    /// The cluster's nodes as the agent's node sees them (`GetClusterStatus`).
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        let r = ClusterClient::new(self.channel())
            .get_cluster_status(self.req(pb::GetClusterStatusRequest {}))
            .await?
            .into_inner();
        Ok(r.into())
    }

    /// Enables or disables failover (`SetClusterFailover`); the status after.
    pub async fn set_cluster_failover(&self, enabled: bool) -> Result<ClusterStatus, ClientError> {
        let r = ClusterClient::new(self.channel())
            .set_cluster_failover(self.req(pb::SetClusterFailoverRequest { enabled }))
            .await?
            .into_inner();
        Ok(r.into())
    }

    /// etcd's members and the node's lease (`GetClusterHealth`).
    pub async fn cluster_health(&self) -> Result<ClusterHealth, ClientError> {
        let r = ClusterClient::new(self.channel())
            .get_cluster_health(self.req(pb::GetClusterHealthRequest {}))
            .await?
            .into_inner();
        Ok(r.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_health_round_trip() {
        let s = ClusterStatus {
            clustered: true,
            node: "a".into(),
            prefix: "/capybara".into(),
            revision: 42,
            nodes: vec![NodeView {
                record: NodeRecord {
                    name: "a".into(),
                    started_at: 1_700_000_000,
                    peers_online: 3,
                    applied_revision: 40,
                },
                lease_ttl_s: 10,
                lease_age_ms: 2_000,
                this_node: true,
                role: "primary".into(),
                lag: 2,
            }],
            failover: FailoverView {
                enabled: true,
                primary: "a".into(),
                address: "10.0.0.100/24".into(),
                role: "primary".into(),
            },
        };
        assert_eq!(ClusterStatus::from(pb::ClusterStatus::from(&s)), s);
        let h = ClusterHealth {
            clustered: true,
            healthy: false,
            members: vec![MemberHealth {
                endpoint: "http://10.0.0.1:2379".into(),
                error: "etcd did not answer".into(),
                ..MemberHealth::default()
            }],
            lease_held: true,
            lease_ttl_left_s: 7,
        };
        assert_eq!(ClusterHealth::from(pb::ClusterHealth::from(&h)), h);
    }
}
