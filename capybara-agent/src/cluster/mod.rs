//! Cluster membership on etcd (issue 25, SPEC feature 16): an agent started with `--etcd` is a
//! **node**. It holds an etcd lease and, under the cluster's key prefix, publishes itself and
//! its load with that lease ([`Node`]); the nodes whose lease lives are the cluster
//! ([`Node::status`]). A single agent keeps working with no etcd at all.
//!
//! ## Keys (under the prefix, `/capybara` by default)
//! - `nodes/<name>`: a [`NodeRecord`] (JSON) put with the node's lease: it goes when the lease
//!   does, so a dead node leaves the list within its TTL without anyone deleting it.
//! - `data/…` and `head`: the shared state ([`state`]).
//!
//! ## The lease
//! A lease of [`ClusterConfig::ttl`] seconds (10 by default: a dead node is gone within 10 s, a
//! third of the 30 s the issue allows). It is renewed every third of the TTL, each renewal also
//! republishing the record (the load changes); a renewal that fails is retried at the next
//! period, so a node rides out one lost renewal and loses its lease only after a TTL without a
//! successful one. A lost lease (expired while etcd was unreachable, or revoked) is replaced by
//! a new one and the record put again as soon as etcd answers: the node rejoins by itself. What
//! a node that lost its lease must stop doing (fencing: admitting sessions, holding a failover
//! address) comes with failover.
//!
//! ## TLS
//! With `--etcd-ca` (and `--etcd-cert`/`--etcd-key` where the members require client
//! certificates) every client speaks TLS (rustls) to `https://` members, verifying their
//! certificates against that CA; a plain `http://` endpoint is then refused at start, so a
//! typo cannot silently downgrade the connection.
//!
//! ## What etcd is asked, and bounds
//! The node keeps **one client per member** and sends each call to one of them, the last that
//! answered; a call that times out ([`CALL_TIMEOUT`]) or finds its member unavailable is sent
//! to the next member, each member tried once, as etcd's own Go client pins an endpoint and
//! moves on failure. (etcd-client's balanced channel over all members kept sending calls to a
//! killed member until they timed out: `e2e_cluster` saw `status` fail with one member of
//! three down.) So a call fails only when no member answers, after at most one timeout per
//! member. `status` is one range read of `nodes/` plus one `LeaseTimeToLive` per node (the
//! lease's age); `health` asks each member's `Status` on its own client, so a dead member is
//! seen as such.

pub mod failover;
pub mod state;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, PutOptions, TlsOptions,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How long one call to etcd may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The lease's TTL unless configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// The key prefix unless configured.
pub const DEFAULT_PREFIX: &str = "/capybara";

/// How a node joins (`--etcd`, `--node-name`, `--etcd-prefix`, `--cluster-ttl`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The etcd members' client URLs.
    pub endpoints: Vec<String>,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// The cluster's key prefix.
    pub prefix: String,
    /// The lease's TTL (whole seconds, at least 2).
    pub ttl: Duration,
    /// TLS to the members (`https://` endpoints), when configured.
    pub tls: Option<EtcdTls>,
    /// This node's failover address, when it is in a failover group.
    pub failover: Option<failover::FailoverConfig>,
}

/// TLS to etcd's members (`--etcd-ca`, `--etcd-cert`, `--etcd-key`): the CA that signed their
/// certificates and, where the members require client certificates (`--client-cert-auth`),
/// this node's certificate and key. PEM, read at start.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// This node's certificate and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never in a log line.
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// What a node publishes about itself (`nodes/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its name.
    pub name: String,
    /// When its agent started, Unix seconds.
    pub started_at: u64,
    /// Its devices with a session now.
    pub peers_online: u32,
    /// The last shared revision it applied (`state`).
    #[serde(default)]
    pub applied_revision: i64,
}

/// A node as [`Node::status`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// What it published.
    pub record: NodeRecord,
    /// Its lease's TTL.
    pub lease_ttl_s: i64,
    /// Time since its lease was last renewed (the TTL less what is left), milliseconds.
    pub lease_age_ms: i64,
    /// Whether it is the node asked.
    pub this_node: bool,
    /// `primary` (the failover group's elected node) or `node`.
    pub role: String,
    /// Revisions of shared changes it has yet to apply (the head's revision less its applied
    /// revision, 0 when it is up to date).
    pub lag: i64,
}

/// The failover group as one node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverView {
    /// `cluster failover enable` is in force.
    pub enabled: bool,
    /// The elected primary, if any.
    pub primary: String,
    /// This node's service address (`--failover-address`), if it is in the group.
    pub address: String,
    /// This node's role: `none`, `standby`, `primary`, `fenced`.
    pub role: String,
}

/// The cluster as one node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Whether the agent is a node (started with `--etcd`).
    pub clustered: bool,
    /// This node's name.
    pub node: String,
    /// The key prefix.
    pub prefix: String,
    /// etcd's revision at the read.
    pub revision: i64,
    /// The nodes whose lease lives, by name.
    pub nodes: Vec<NodeView>,
    /// Failover.
    pub failover: FailoverView,
}

/// An etcd member as a node reaches it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberHealth {
    /// The client URL asked.
    pub endpoint: String,
    /// Whether it answered.
    pub reachable: bool,
    /// Its version.
    pub version: String,
    /// Whether it leads.
    pub leader: bool,
    /// Its database's size in bytes.
    pub db_size: i64,
    /// Why it did not answer.
    pub error: String,
}

/// etcd and the lease, as one node sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterHealth {
    /// Whether the agent is a node.
    pub clustered: bool,
    /// A quorum of members answers and the node holds its lease.
    pub healthy: bool,
    /// Each member.
    pub members: Vec<MemberHealth>,
    /// Whether the node holds a live lease.
    pub lease_held: bool,
    /// Seconds left on it.
    pub lease_ttl_left_s: i64,
}

/// Why a cluster call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd answered with an error or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// etcd did not answer within [`CALL_TIMEOUT`].
    #[error("etcd did not answer within {CALL_TIMEOUT:?}")]
    Timeout,
    /// A record under the prefix is not one this agent wrote.
    #[error("a record at {key} is not a node record: {source}")]
    Record {
        /// Its key.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// Runs `f` within [`CALL_TIMEOUT`].
async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClusterError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| ClusterError::Timeout)?
        .map_err(ClusterError::Etcd)
}

impl ClusterError {
    /// Whether another member may answer what this one did not: a timeout, a transport error,
    /// or a member that is unavailable (down, or cut off from its quorum).
    fn try_another(&self) -> bool {
        use etcd_client::Error as E;
        match self {
            ClusterError::Timeout => true,
            ClusterError::Etcd(E::TransportError(_) | E::IoError(_)) => true,
            ClusterError::Etcd(E::GRpcStatus(s)) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        }
    }
}

/// One client per member and the one calls go to first (see the module docs).
struct Members {
    clients: Vec<(String, Client)>,
    current: std::sync::atomic::AtomicUsize,
}

impl Members {
    async fn connect(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Members, ClusterError> {
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let client = Client::connect([e.as_str()], Some(options(tls))).await?;
            clients.push((e.clone(), client));
        }
        if clients.is_empty() {
            return Err(ClusterError::Etcd(etcd_client::Error::InvalidArgs(
                "no endpoints".into(),
            )));
        }
        Ok(Members {
            clients,
            current: Default::default(),
        })
    }

    /// Calls `f` on the member that answered last, then on each other in turn while the
    /// failure is one another member may not have.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.clients.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = ClusterError::Timeout;
        for k in 0..n {
            let i = (first + k) % n;
            match timed(f(self.clients[i].1.clone())).await {
                Ok(v) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if e.try_another() => {
                    tracing::debug!(member = %self.clients[i].0, error = %e, "cluster: trying the next member");
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

/// The options of every client: bounded connects and calls, HTTP/2 pings that find a dead
/// member's connection, and TLS when configured.
fn options(tls: Option<&EtcdTls>) -> ConnectOptions {
    let options = match tls {
        Some(t) => {
            let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(&t.ca_pem));
            if let Some((cert, key)) = &t.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            ConnectOptions::new().with_tls(config)
        }
        None => ConnectOptions::new(),
    };
    options
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        // etcd refuses pings more often than every 5 s (`--grpc-keepalive-min-time`) with a
        // GOAWAY.
        .with_keep_alive(Duration::from_secs(5), CALL_TIMEOUT)
}

/// The lease a node holds now.
#[derive(Clone, Copy, Debug)]
struct Held {
    id: i64,
    /// When it was last renewed (or granted), and for how long.
    renewed: Instant,
    ttl: Duration,
}

/// This agent as a node of the cluster.
pub struct Node {
    config: ClusterConfig,
    members: Members,
    started_at: u64,
    lease: Mutex<Option<Held>>,
    /// What the node publishes as its load, asked at each renewal.
    load: Box<dyn Fn() -> u32 + Send + Sync>,
    /// The last shared revision its store applied.
    applied: Box<dyn Fn() -> i64 + Send + Sync>,
    /// Its failover role (`failover::run` sets it).
    pub failover: Arc<failover::FailoverState>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node of the cluster at `config.endpoints`, not yet registered: [`Node::run`] holds its
    /// lease and publishes it. `peers_online` and `applied` (the last shared revision the store
    /// applied) are asked at each renewal. The client's channels
    /// connect lazily: an unreachable etcd is retried by `run`, it does not fail the agent's
    /// start; only malformed endpoints do.
    pub async fn connect(
        config: ClusterConfig,
        peers_online: Box<dyn Fn() -> u32 + Send + Sync>,
        applied: Box<dyn Fn() -> i64 + Send + Sync>,
    ) -> Result<Arc<Node>, ClusterError> {
        let members = Members::connect(&config.endpoints, config.tls.as_ref()).await?;
        Ok(Arc::new(Node {
            config,
            members,
            started_at: crate::service::domain::unix_secs(SystemTime::now()),
            lease: Mutex::new(None),
            load: peers_online,
            applied,
            failover: Arc::default(),
        }))
    }

    /// Its configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    fn key(&self, name: &str) -> String {
        format!("{}/nodes/{name}", self.config.prefix)
    }

    fn record(&self) -> NodeRecord {
        NodeRecord {
            name: self.config.node.clone(),
            started_at: self.started_at,
            peers_online: (self.load)(),
            applied_revision: (self.applied)(),
        }
    }

    /// Holds the lease and publishes the record until `stop` fires; then revokes the lease (the
    /// node leaves at once rather than a TTL later). See the module docs.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let period = self.config.ttl / 3;
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = every.tick() => {}
            }
            match self.renew().await {
                Ok(()) => {
                    if warned {
                        tracing::info!(node = %self.config.node, "cluster: lease held again");
                    }
                    warned = false;
                }
                Err(e) if !warned => {
                    tracing::warn!(node = %self.config.node, error = %e, "cluster: cannot renew the lease; retrying");
                    warned = true;
                }
                Err(_) => {}
            }
        }
        let held = *self.lease.lock().unwrap();
        if let Some(h) = held {
            let revoked = self
                .members
                .call(|mut c| async move { c.lease_revoke(h.id).await })
                .await;
            if let Err(e) = revoked {
                tracing::warn!(error = %e, "cluster: cannot revoke the lease at stop; it expires");
            }
        }
    }

    /// Renews the lease (granting a new one if there is none or it is gone) and puts the
    /// record with it.
    async fn renew(&self) -> Result<(), ClusterError> {
        let held = *self.lease.lock().unwrap();
        // The lease is judged from when the renewal was *sent*: etcd extends it when it
        // receives it, later, so this node's view never outlives etcd's (fencing relies on it).
        let sent = Instant::now();
        let renewed = match held {
            Some(h) => {
                let ttl = self
                    .members
                    .call(|mut c| async move {
                        let (mut keeper, mut stream) = c.lease_keep_alive(h.id).await?;
                        keeper.keep_alive().await?;
                        Ok(stream.message().await?.map_or(0, |r| r.ttl()))
                    })
                    .await?;
                // TTL 0: expired (etcd was out of reach longer than the TTL).
                (ttl > 0).then(|| Held {
                    renewed: sent,
                    ttl: Duration::from_secs(ttl as u64),
                    ..h
                })
            }
            None => None,
        };
        let held = match renewed {
            Some(h) => h,
            None => self.grant().await?,
        };
        *self.lease.lock().unwrap() = Some(held);
        let value = serde_json::to_vec(&self.record()).expect("a record serializes");
        let key = self.key(&self.config.node);
        self.members
            .call(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    c.put(key, value, Some(PutOptions::new().with_lease(held.id)))
                        .await
                }
            })
            .await?;
        Ok(())
    }

    async fn grant(&self) -> Result<Held, ClusterError> {
        let ttl = self.config.ttl.as_secs() as i64;
        let sent = Instant::now();
        let r = self
            .members
            .call(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?;
        tracing::info!(node = %self.config.node, lease = r.id(), ttl = r.ttl(), "cluster: lease granted");
        Ok(Held {
            id: r.id(),
            renewed: sent,
            ttl: Duration::from_secs(r.ttl() as u64),
        })
    }

    /// The nodes whose lease lives now (see the module docs).
    pub async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        let prefix = format!("{}/nodes/", self.config.prefix);
        let r = self
            .members
            .call(|mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = r.header().map_or(0, |h| h.revision());
        let head = self.head_key();
        let head = self
            .members
            .call(|mut c| {
                let head = head.clone();
                async move { c.get(head, None).await }
            })
            .await?
            .kvs()
            .first()
            .map_or(0, |kv| kv.mod_revision());
        let primary = if self.config.failover.is_some() {
            self.primary().await?.unwrap_or_default()
        } else {
            String::new()
        };
        let mut nodes = Vec::with_capacity(r.kvs().len());
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let mut record: NodeRecord = serde_json::from_slice(kv.value())
                .map_err(|source| ClusterError::Record { key, source })?;
            let this_node = record.name == self.config.node;
            if this_node {
                record.applied_revision = (self.applied)();
            }
            let id = kv.lease();
            let lease = self
                .members
                .call(|mut c| async move { c.lease_time_to_live(id, None).await })
                .await?;
            let (granted, left) = (lease.granted_ttl(), lease.ttl());
            nodes.push(NodeView {
                this_node,
                role: if !primary.is_empty() && record.name == primary {
                    "primary".into()
                } else {
                    "node".into()
                },
                lag: (head - record.applied_revision).max(0),
                lease_ttl_s: granted,
                // TimeToLive answers whole seconds: the age is as coarse.
                lease_age_ms: (granted - left.max(0)).max(0) * 1_000,
                record,
            });
        }
        nodes.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(ClusterStatus {
            clustered: true,
            node: self.config.node.clone(),
            prefix: self.config.prefix.clone(),
            revision,
            nodes,
            failover: FailoverView {
                enabled: self.failover_enabled().await?,
                primary,
                address: self
                    .config
                    .failover
                    .as_ref()
                    .map(|f| format!("{}/{}", f.address, f.prefix_len))
                    .unwrap_or_default(),
                role: self.failover.role().as_str().into(),
            },
        })
    }

    /// Each member's status on a client of its own (all asked at once: a dead member costs one
    /// timeout, not one per member), and this node's lease.
    pub async fn health(&self) -> ClusterHealth {
        let mut asked = tokio::task::JoinSet::new();
        for (i, (endpoint, client)) in self.members.clients.iter().enumerate() {
            let (endpoint, mut client) = (endpoint.clone(), client.clone());
            asked.spawn(async move {
                let answer = timed(client.status()).await.map(|s| {
                    let member = s.header().map_or(0, |h| h.member_id());
                    MemberHealth {
                        endpoint: endpoint.clone(),
                        reachable: true,
                        version: s.version().to_owned(),
                        leader: member != 0 && s.leader() == member,
                        db_size: s.db_size(),
                        error: String::new(),
                    }
                });
                let health = answer.unwrap_or_else(|e| MemberHealth {
                    endpoint,
                    error: e.to_string(),
                    ..MemberHealth::default()
                });
                (i, health)
            });
        }
        let mut members: Vec<(usize, MemberHealth)> = asked.join_all().await;
        members.sort_by_key(|(i, _)| *i);
        let members: Vec<MemberHealth> = members.into_iter().map(|(_, m)| m).collect();
        let left = self.lease_left();
        let reachable = members.iter().filter(|m| m.reachable).count();
        let quorum = reachable > members.len() / 2;
        ClusterHealth {
            clustered: true,
            healthy: quorum && left.is_some(),
            members,
            lease_held: left.is_some(),
            lease_ttl_left_s: left.map_or(0, |d| d.as_secs() as i64),
        }
    }

    /// The lease this node holds now, if any (its id).
    pub fn lease_id(&self) -> Option<i64> {
        self.lease.lock().unwrap().map(|h| h.id)
    }

    /// What is left of the lease by this node's own clock (from when its last renewal was
    /// sent), if any. A node that could not renew for a TTL judges its lease lost, though etcd
    /// may still hold it (a leader change extends leases): the side a node must err on before
    /// it may act alone.
    pub fn lease_left(&self) -> Option<Duration> {
        let held = (*self.lease.lock().unwrap())?;
        held.ttl.checked_sub(held.renewed.elapsed())
    }
}
