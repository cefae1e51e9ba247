//! The cluster's **shared state** in etcd: every node's shared store keys
//! (`crate::store::shared`: users, devices, groups, policy, templates, tokens, MFA records,
//! proxy identities, scheduled tasks, webhook endpoints) mirrored under one prefix, each
//! change one etcd transaction with its own revision.
//!
//! ## Keys (under the cluster prefix)
//! - `data/<family>/<key>`: the value of one shared store key, bytes as the store holds them.
//! - `head`: put by every change (value: the node that made it), so its `mod_revision` is the
//!   revision of the newest change.
//!
//! ## A change ([`Node`] as the store's `Replicator`)
//! One transaction: *if `head`'s mod_revision is at most the revision this node applied last
//! (no change since), put and delete the change's keys and put `head`*. (At most, not equal:
//! a node that read everything at revision R applied every change up to R, and R is etcd's
//! revision then, which the nodes' lease records move too.) A node that has not applied a change another node
//! made meanwhile is refused (`SharedError::Conflict`: nothing changed, the caller retries), so
//! ids and addresses allocated from the shared state never collide and no change is lost to a
//! concurrent one; one etcd round trip per change. A change etcd does not answer within
//! [`CALL_TIMEOUT`] per member is refused as `Unavailable` — e.g. without quorum — and nothing
//! changed on this node either (the store writes only after etcd accepted). A change is one
//! transaction, so etcd's `--max-txn-ops` (128 by default) bounds the keys one change may write:
//! the agents' etcd runs with a larger one (see ARCHITECTURE.md); etcd's refusal names it.
//!
//! ## Following the others ([`follow`])
//! Each node watches `data/` from the revision after the last it applied (kept in its store, so
//! a restart resumes there) and applies each revision's events as one change, under the
//! service's writer lock, skipping its own. A node whose store never joined (revision 0) reads
//! the whole prefix at one revision and makes its shared keys exactly that; so does a node
//! whose watch start was compacted away. The very first node of an empty prefix seeds it with
//! its own shared keys.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use etcd_client::{Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::{CALL_TIMEOUT, ClusterError, Node};
use crate::store::{Cf, Replicator, SharedError, SharedOp};

/// Keys per transaction when a first node seeds the prefix (below etcd's default
/// `--max-txn-ops` of 128).
const SEED_CHUNK: usize = 100;
/// Keys per page when a node reads the whole prefix.
const PAGE: i64 = 1000;
/// How long a node waits before it tries again after etcd failed it.
const RETRY: Duration = Duration::from_secs(1);

/// What the node applies the cluster's changes to: the agent's service.
pub trait Applier: Send + Sync + 'static {
    /// The last revision applied (0: never joined).
    fn revision(&self) -> i64;
    /// Every shared key held here (a first node's seed).
    fn local_state(&self) -> Result<Vec<SharedOp>, String>;
    /// Applies one change (skipped when applied already).
    fn apply(&self, revision: i64, ops: &[SharedOp]) -> Result<(), String>;
    /// Makes the shared keys exactly `state` at `revision`.
    fn replace(&self, revision: i64, state: &[SharedOp]) -> Result<(), String>;
}

impl Node {
    pub(super) fn head_key(&self) -> String {
        format!("{}/head", self.config.prefix)
    }

    fn data_prefix(&self) -> String {
        format!("{}/data/", self.config.prefix)
    }

    fn data_key(&self, op: &SharedOp) -> String {
        format!("{}{}/{}", self.data_prefix(), op.cf.name(), op.key)
    }

    /// The store key an etcd key under `data/` stands for.
    fn parse_data_key(&self, key: &[u8]) -> Option<(Cf, String)> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.data_prefix())?;
        let (cf, key) = rest.split_once('/')?;
        Some((Cf::from_name(cf)?, key.to_owned()))
    }

    /// The transaction of one change after revision `base` (see the module docs).
    fn change_txn(&self, base: i64, ops: &[SharedOp]) -> Txn {
        let mut then: Vec<TxnOp> = ops
            .iter()
            .map(|op| match &op.value {
                Some(v) => TxnOp::put(self.data_key(op), v.clone(), None),
                None => TxnOp::delete(self.data_key(op), None),
            })
            .collect();
        then.push(TxnOp::put(self.head_key(), self.config.node.clone(), None));
        Txn::new()
            .when([Compare::mod_revision(
                self.head_key(),
                CompareOp::Less,
                base + 1,
            )])
            .and_then(then)
            .or_else([TxnOp::get(self.head_key(), None)])
    }

    /// Sends one change; answers its revision.
    async fn send_change(&self, base: i64, ops: &[SharedOp]) -> Result<i64, SharedError> {
        let txn = self.change_txn(base, ops);
        let resp = self
            .members
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .map_err(refusal)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok(revision);
        }
        let current = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
                _ => None,
            })
            .unwrap_or(0);
        Err(SharedError::Conflict { base, current })
    }

    /// Reads every key under `data/` at one revision: the state and that revision.
    async fn read_all(&self) -> Result<(i64, Vec<SharedOp>), ClusterError> {
        let prefix = self.data_prefix();
        let end = prefix_end(&prefix);
        let mut from = prefix.clone().into_bytes();
        let mut at = 0;
        let mut state = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if at > 0 {
                opts = opts.with_revision(at);
            }
            let key = from.clone();
            let resp = self
                .members
                .call(|mut c| {
                    let (key, opts) = (key.clone(), opts.clone());
                    async move { c.get(key, Some(opts)).await }
                })
                .await?;
            if at == 0 {
                at = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                if let Some((cf, key)) = self.parse_data_key(kv.key()) {
                    state.push(SharedOp {
                        cf,
                        key,
                        value: Some(kv.value().to_vec()),
                    });
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((at, state)),
            }
        }
    }

    /// Seeds an empty prefix with this node's shared keys; answers the seed's revision, or
    /// `None` when another node seeded it first.
    async fn seed(&self, local: &[SharedOp]) -> Result<Option<i64>, ClusterError> {
        for chunk in local.chunks(SEED_CHUNK) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .filter_map(|op| {
                    op.value
                        .as_ref()
                        .map(|v| TxnOp::put(self.data_key(op), v.clone(), None))
                })
                .collect();
            let txn = Txn::new()
                .when([Compare::create_revision(
                    self.head_key(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(ops);
            let resp = self
                .members
                .call(|mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if !resp.succeeded() {
                return Ok(None);
            }
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.head_key(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(self.head_key(), self.config.node.clone(), None)]);
        let resp = self
            .members
            .call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// Brings this node's store in line with the cluster; answers the revision to watch from.
    async fn catch_up(&self, applier: &Arc<dyn Applier>, force: bool) -> Result<i64, String> {
        let head = self.head_key();
        let resp = self
            .members
            .call(|mut c| {
                let head = head.clone();
                async move { c.get(head, None).await }
            })
            .await
            .map_err(|e| e.to_string())?;
        let now = resp.header().map_or(0, |h| h.revision());
        let applied = applier.revision();
        if resp.kvs().is_empty() {
            let a = applier.clone();
            let local = blocking(move || a.local_state()).await?;
            if let Some(rev) = self.seed(&local).await.map_err(|e| e.to_string())? {
                let (a, keys) = (applier.clone(), local.len());
                // Its own keys, as they are: only the revision is new.
                blocking(move || a.replace(rev, &local)).await?;
                tracing::info!(
                    keys,
                    revision = rev,
                    "cluster: this node seeded the shared state"
                );
                return Ok(rev + 1);
            }
        } else if !force && applied > 0 && applied <= now {
            return Ok(applied + 1);
        }
        let (rev, state) = self.read_all().await.map_err(|e| e.to_string())?;
        let keys = state.len();
        let a = applier.clone();
        blocking(move || a.replace(rev, &state)).await?;
        tracing::info!(keys, revision = rev, "cluster: shared state read in full");
        Ok(rev + 1)
    }

    /// Watches `data/` from `from`, applying each revision's events; returns when the watch
    /// ends: `Ok(true)` when its start was compacted away (read everything again).
    async fn watch_from(
        &self,
        applier: &Arc<dyn Applier>,
        from: i64,
        stop: &CancellationToken,
    ) -> Result<bool, String> {
        let prefix = self.data_prefix();
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = self
            .members
            .call(|mut c| {
                let (prefix, opts) = (prefix.clone(), opts.clone());
                async move { c.watch(prefix, Some(opts)).await }
            })
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                m = stream.message() => m,
            };
            let Some(resp) = msg.map_err(|e| e.to_string())? else {
                return Err("the watch ended".into());
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    from,
                    compacted = resp.compact_revision(),
                    "cluster: the watch's start was compacted; reading the shared state in full"
                );
                return Ok(true);
            }
            if resp.canceled() {
                return Err(format!("the watch was cancelled: {}", resp.cancel_reason()));
            }
            let mut changes: BTreeMap<i64, Vec<SharedOp>> = BTreeMap::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some((cf, key)) = self.parse_data_key(kv.key()) else {
                    continue;
                };
                let value = match ev.event_type() {
                    EventType::Put => Some(kv.value().to_vec()),
                    EventType::Delete => None,
                };
                changes
                    .entry(kv.mod_revision())
                    .or_default()
                    .push(SharedOp { cf, key, value });
            }
            for (rev, ops) in changes {
                let a = applier.clone();
                blocking(move || a.apply(rev, &ops)).await?;
            }
        }
    }
}

/// Follows the cluster's changes until `stop` fires (see the module docs): catches up, then
/// watches; any failure is logged and retried after [`RETRY`].
pub async fn follow(node: Arc<Node>, applier: Arc<dyn Applier>, stop: CancellationToken) {
    let mut force = false;
    while !stop.is_cancelled() {
        let step = async {
            let from = node.catch_up(&applier, force).await?;
            node.watch_from(&applier, from, &stop).await
        };
        match step.await {
            Ok(compacted) => force = compacted,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: following the shared state failed; retrying");
                force = false;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// Runs `f` on the blocking pool (the store and the kernel are synchronous).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("apply task: {e}"))?
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What a failed etcd call means for a change.
fn refusal(e: ClusterError) -> SharedError {
    use etcd_client::Error as E;
    match &e {
        ClusterError::Etcd(E::GRpcStatus(s))
            if matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::OutOfRange
            ) =>
        {
            SharedError::Refused(s.message().to_owned())
        }
        _ => SharedError::Unavailable(e.to_string()),
    }
}

/// The node's store sends its shared writes here (`crate::store::shared`): the change runs on
/// the agent's runtime while the writer (a blocking thread) waits for it.
pub struct Replication {
    node: Arc<Node>,
    runtime: tokio::runtime::Handle,
}

impl Replication {
    /// Replication through `node`, its calls run on `runtime`.
    pub fn new(node: Arc<Node>, runtime: tokio::runtime::Handle) -> Replication {
        Replication { node, runtime }
    }
}

impl Replicator for Replication {
    fn replicate(&self, base: i64, ops: &[SharedOp]) -> Result<i64, SharedError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let node = self.node.clone();
        let ops = ops.to_vec();
        self.runtime.spawn(async move {
            let _ = tx.send(node.send_change(base, &ops).await);
        });
        // Every member tried once, and a margin.
        let bound = CALL_TIMEOUT * (self.node.members.clients.len() as u32 + 1);
        rx.recv_timeout(bound).unwrap_or_else(|_| {
            Err(SharedError::Unavailable(format!(
                "etcd did not answer within {bound:?}"
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/capybara/data/"), b"/capybara/data0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
