//! The store's **shared keys**: what a cluster's nodes hold in common (issue 25;
//! `crate::cluster::state` replicates them through etcd), and the one place where a write of
//! them is sent to the cluster before it is written here.
//!
//! | family | shared keys | node-local keys |
//! |---|---|---|
//! | `users`, `peers`, `groups`, `tokens`, `proxies` | all | none |
//! | `policy` | limits, templates, settings, MFA records | `bucket/` (kernel bucket ids), `online/` (online time), `server/api-access` (where this node's API listens) |
//! | `schedules` | `next-id`, `task/` | `run/` (runs are the node's) |
//! | `webhooks` | `hook/` (endpoints) | cursors, deliveries, dead letters (of the node's own outbox) |
//! | `meta`, `blocklists`, `sessions`, `audit`, `usage`, `outbox` | none | all |
//!
//! Blocklists stay node-local for now: their registry is one snapshot mixing the manual lists
//! with the `auto` list each node's reputation engine fills.
//!
//! ## Order of a shared write
//! [`Store::write`] of a batch that holds shared keys first hands them to the [`Replicator`]
//! (the cluster) as the change following the last revision this store applied; only once the
//! cluster accepted it is the batch written here, with the change's revision in `meta`
//! (`cluster/revision`), under one lock. A refusal (the cluster unreachable, or another node's
//! change came first) writes nothing here either: the caller's error says so. A batch written
//! here after the cluster accepted it, but failing locally, comes back through the cluster's
//! watch ([`Store::apply_shared`]), since the stored revision did not move.

use std::sync::{Arc, MutexGuard};

use rocksdb::WriteBatch;

use super::{Batch, Cf, Store, StoreError};

/// The key of the last applied shared revision, in `meta`.
pub const REVISION_KEY: &str = "cluster/revision";

/// Whether `key` of `cf` is shared by a cluster's nodes (the table in the module docs).
pub fn is_shared(cf: Cf, key: &str) -> bool {
    match cf {
        Cf::Users | Cf::Peers | Cf::Groups | Cf::Tokens | Cf::Proxies => true,
        Cf::Policy => {
            !(key.starts_with("bucket/")
                || key.starts_with("online/")
                || key == super::keys::API_ACCESS)
        }
        Cf::Schedules => key == super::keys::SCHEDULE_NEXT_ID || key.starts_with("task/"),
        Cf::Webhooks => key.starts_with(super::keys::WEBHOOKS),
        Cf::Meta | Cf::Blocklists | Cf::Sessions | Cf::Audit | Cf::Usage | Cf::Outbox => false,
    }
}

/// The families holding shared keys.
pub const SHARED_FAMILIES: [Cf; 8] = [
    Cf::Users,
    Cf::Peers,
    Cf::Groups,
    Cf::Tokens,
    Cf::Proxies,
    Cf::Policy,
    Cf::Schedules,
    Cf::Webhooks,
];

/// One change of a shared key: its new value, or `None` for a removal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedOp {
    /// The family.
    pub cf: Cf,
    /// The key.
    pub key: String,
    /// The value's bytes (as stored), or `None` when the key is removed.
    pub value: Option<Vec<u8>>,
}

/// Why the cluster refused a change; nothing was changed, here or there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SharedError {
    /// No etcd member answered, or the members have no quorum.
    #[error(
        "the cluster is unavailable ({0}); nothing was changed on this node (a change etcd \
         received before it failed would still reach every node through the cluster)"
    )]
    Unavailable(String),
    /// Another node's change reached the cluster after the last one this node applied.
    #[error(
        "another node changed the cluster's state at the same time (the cluster is at revision \
         {current}, this node had applied {base}); nothing was changed: retry"
    )]
    Conflict {
        /// The revision this node had applied.
        base: i64,
        /// The cluster's.
        current: i64,
    },
    /// etcd refused the change itself (too many keys for its `--max-txn-ops`, too large for
    /// its `--max-request-bytes`, …).
    #[error("the cluster refused the change: {0}; nothing was changed")]
    Refused(String),
}

/// Where a write of shared keys goes before it is written here: the cluster.
pub trait Replicator: Send + Sync {
    /// Makes `ops` the cluster's next change after revision `base` (the last one this store
    /// applied); answers the change's revision.
    fn replicate(&self, base: i64, ops: &[SharedOp]) -> Result<i64, SharedError>;
}

impl Batch {
    /// The shared keys this batch changes.
    pub fn shared_ops(&self) -> Vec<SharedOp> {
        self.ops
            .iter()
            .filter(|(cf, key, _)| is_shared(*cf, key))
            .map(|(cf, key, value)| SharedOp {
                cf: *cf,
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }
}

impl Store {
    /// Sends every later write of shared keys to `replicator` first (see the module docs).
    /// Only the first one set is kept; answers whether this one was.
    pub fn replicate_through(&self, replicator: Arc<dyn Replicator>) -> bool {
        self.replicator.set(replicator).is_ok()
    }

    /// The last shared revision this store applied (0: none). Never waits: the lock is held
    /// across a change's round trip to etcd, and a reader on the runtime (the node's lease
    /// renewal publishes it) must not block a worker for that long.
    pub fn shared_revision(&self) -> i64 {
        self.shared_applied
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records `revision` as applied (under the shared lock).
    pub(super) fn set_applied(&self, guard: &mut MutexGuard<'_, i64>, revision: i64) {
        **guard = revision;
        self.shared_applied
            .store(revision, std::sync::atomic::Ordering::Release);
    }

    fn shared_lock(&self) -> MutexGuard<'_, i64> {
        self.shared_rev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The revision stored in `meta` (at open).
    pub(super) fn stored_revision(&self) -> Result<i64, StoreError> {
        Ok(self.get::<i64>(Cf::Meta, REVISION_KEY)?.unwrap_or(0))
    }

    /// Replicates `batch`'s shared keys, if it has any and a replicator is set, and adds the
    /// accepted revision to it; the guard is held until the batch is written (then
    /// [`Store::written_shared`]).
    pub(super) fn replicate(
        &self,
        batch: &mut Batch,
    ) -> Result<Option<(MutexGuard<'_, i64>, i64)>, StoreError> {
        let Some(r) = self.replicator.get() else {
            return Ok(None);
        };
        let ops = batch.shared_ops();
        if ops.is_empty() {
            return Ok(None);
        }
        let guard = self.shared_lock();
        let rev = r.replicate(*guard, &ops)?;
        batch.put(Cf::Meta, REVISION_KEY, &rev)?;
        Ok(Some((guard, rev)))
    }

    /// Applies the cluster's change at `revision` (another node's, or one of this node's
    /// whose local write failed): `ops` are written here with the revision, unless this store
    /// applied that revision already. Answers whether it wrote them.
    pub fn apply_shared(&self, revision: i64, ops: &[SharedOp]) -> Result<bool, StoreError> {
        let mut applied = self.shared_lock();
        if revision <= *applied {
            return Ok(false);
        }
        let mut batch = Batch::default();
        for op in ops {
            if is_shared(op.cf, &op.key) {
                batch.ops.push((op.cf, op.key.clone(), op.value.clone()));
            } else {
                tracing::warn!(cf = op.cf.name(), key = %op.key, "cluster: a change of a node-local key is ignored");
            }
        }
        batch.put(Cf::Meta, REVISION_KEY, &revision)?;
        self.write_local(batch)?;
        self.set_applied(&mut applied, revision);
        Ok(true)
    }

    /// Makes the shared keys exactly `state` as of the cluster's `revision` (a node's first
    /// join, or a watch that fell behind a compaction): keys not in `state` are removed.
    /// Answers the families whose keys changed.
    pub fn replace_shared(&self, revision: i64, state: &[SharedOp]) -> Result<Vec<Cf>, StoreError> {
        let mut applied = self.shared_lock();
        let mut wanted: std::collections::BTreeMap<(&'static str, &str), &[u8]> =
            std::collections::BTreeMap::new();
        for op in state {
            if let Some(v) = &op.value {
                wanted.insert((op.cf.name(), op.key.as_str()), v);
            }
        }
        let mut batch = Batch::default();
        let mut touched = Vec::new();
        for cf in SHARED_FAMILIES {
            let before = batch.ops.len();
            let mut have = std::collections::BTreeSet::new();
            for (key, value) in self.raw_pairs(cf)? {
                if !is_shared(cf, &key) {
                    continue;
                }
                match wanted.get(&(cf.name(), key.as_str())) {
                    Some(v) if *v == value.as_slice() => {}
                    Some(v) => batch.ops.push((cf, key.clone(), Some(v.to_vec()))),
                    None => batch.ops.push((cf, key.clone(), None)),
                }
                have.insert(key);
            }
            for op in state.iter().filter(|o| o.cf == cf && o.value.is_some()) {
                if is_shared(cf, &op.key) && !have.contains(&op.key) {
                    batch.ops.push((cf, op.key.clone(), op.value.clone()));
                }
            }
            if batch.ops.len() > before {
                touched.push(cf);
            }
        }
        batch.put(Cf::Meta, REVISION_KEY, &revision)?;
        self.write_local(batch)?;
        self.set_applied(&mut applied, revision);
        Ok(touched)
    }

    /// Every shared key and its value (a first node seeding the cluster with its state).
    pub fn shared_state(&self) -> Result<Vec<SharedOp>, StoreError> {
        let mut out = Vec::new();
        for cf in SHARED_FAMILIES {
            for (key, value) in self.raw_pairs(cf)? {
                if is_shared(cf, &key) {
                    out.push(SharedOp {
                        cf,
                        key,
                        value: Some(value),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Every key of `cf` and its raw value.
    fn raw_pairs(&self, cf: Cf) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.handle(cf), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(|source| StoreError::Io {
                op: "scan",
                cf: cf.name(),
                key: String::new(),
                source,
            })?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.into_vec()));
        }
        Ok(out)
    }

    /// Writes `batch` here only (no replication, no outbox), synced.
    fn write_local(&self, batch: Batch) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        for (cf, key, value) in &batch.ops {
            match value {
                Some(v) => wb.put_cf(self.handle(*cf), key, v),
                None => wb.delete_cf(self.handle(*cf), key),
            }
        }
        self.db
            .write_opt(wb, &rocksdb::WriteOptions::default())
            .map_err(|source| StoreError::Io {
                op: "commit",
                cf: "batch",
                key: String::new(),
                source,
            })?;
        self.db.flush_wal(true).map_err(|source| StoreError::Io {
            op: "sync",
            cf: "batch",
            key: String::new(),
            source,
        })
    }
}

#[cfg(test)]
mod tests;
