//! Named blocklists (source lists on the uplink, destination lists on the tunnel): their
//! contents and hits, changes to their entries, and the registry snapshot the store keeps
//! (written with every change, read back at start by [`stored_snapshot`]).
//!
//! A change's audit record holds a diff, not the list before and after: `before` is
//! `{"entries": N}` (absent for a new list), `after` the entries added and removed with their
//! counts (`ListDiff`; at most [`MAX_AUDIT_DIFF_ENTRIES`] named each side, the counts exact), so
//! adding one entry to a list of a million writes a record of a few hundred bytes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, to_json},
    domain::Actor,
    monitor::Traffic,
};
use crate::{
    blocklist::{
        Direction, ListName,
        registry::{ListOp, RegistrySnapshot},
    },
    net::Cidr,
    store::{Batch, Cf, Store, StoreError, keys},
};

/// The most entries the audit record of a list change names on each side (added, removed):
/// its counts are always exact, so the record's size does not grow with the list's.
pub const MAX_AUDIT_DIFF_ENTRIES: usize = 100;

/// The `before` of a list change's audit record: how many entries the list held.
#[derive(Debug, Serialize)]
struct ListSize {
    entries: usize,
}

/// The `after` of a list change's audit record: what changed, not the whole list (a list can
/// hold millions of entries; a change of one entry records one).
#[derive(Debug, Serialize)]
struct ListDiff {
    /// Entries the list holds after the change (0 once deleted).
    entries: usize,
    /// The list is gone.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    /// How many entries were added.
    added_count: usize,
    /// How many entries were removed.
    removed_count: usize,
    /// The added entries, the first [`MAX_AUDIT_DIFF_ENTRIES`] in address order.
    added: Vec<Cidr>,
    /// The removed entries, the first [`MAX_AUDIT_DIFF_ENTRIES`] in address order.
    removed: Vec<Cidr>,
    /// `added` or `removed` was cut to [`MAX_AUDIT_DIFF_ENTRIES`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

impl ListDiff {
    fn between(before: Option<&[Cidr]>, after: Option<&[Cidr]>) -> ListDiff {
        let set = |l: Option<&[Cidr]>| -> std::collections::BTreeSet<Cidr> {
            l.into_iter().flatten().copied().collect()
        };
        let (b, a) = (set(before), set(after));
        let added_count = a.difference(&b).count();
        let removed_count = b.difference(&a).count();
        ListDiff {
            entries: a.len(),
            deleted: before.is_some() && after.is_none(),
            added_count,
            removed_count,
            added: a
                .difference(&b)
                .take(MAX_AUDIT_DIFF_ENTRIES)
                .copied()
                .collect(),
            removed: b
                .difference(&a)
                .take(MAX_AUDIT_DIFF_ENTRIES)
                .copied()
                .collect(),
            truncated: added_count.max(removed_count) > MAX_AUDIT_DIFF_ENTRIES,
        }
    }
}

/// A blocklist with its contents and hits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocklistView {
    /// Where it is enforced.
    pub direction: Direction,
    /// Its name.
    pub name: String,
    /// Its CIDRs.
    pub cidrs: Vec<Cidr>,
    /// Packets and bytes dropped because of it.
    pub hits: Traffic,
}

/// Change to a list's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntriesOp {
    /// Add (creating the list).
    Add,
    /// Remove (the list must exist).
    Remove,
}

/// The registry snapshot the store holds (empty on a new store): what the daemon restores
/// into the dataplane before anything else runs.
pub fn stored_snapshot(store: &Store) -> Result<RegistrySnapshot, StoreError> {
    Ok(store
        .get(Cf::Blocklists, keys::BLOCKLISTS)?
        .unwrap_or_default())
}

/// The blocklists feature.
#[derive(Debug)]
pub struct Lists {
    core: Arc<Core>,
}

impl Lists {
    /// The feature over the shared core.
    pub fn new(core: Arc<Core>) -> Lists {
        Lists { core }
    }

    /// Stages the kernel's registry snapshot into `batch`, for a change of the lists.
    pub(super) fn stage_snapshot(&self, batch: &mut Batch) -> Result<(), StoreError> {
        batch.put(
            Cf::Blocklists,
            keys::BLOCKLISTS,
            &self.core.plane.list_snapshot(),
        )
    }

    /// Every list with its contents and hits.
    pub fn blocklists(&self) -> Result<Vec<BlocklistView>, ServiceError> {
        let lists = self.core.plane.lists()?;
        Ok(lists
            .into_iter()
            .map(|(s, hits)| BlocklistView {
                cidrs: self
                    .core
                    .plane
                    .list_cidrs(s.direction, &s.name)
                    .unwrap_or_default(),
                direction: s.direction,
                name: s.name.as_str().to_owned(),
                hits: hits.into(),
            })
            .collect())
    }

    /// One page of lists in (direction, name) order: up to `size` after `after` (the list's
    /// page key, [`blocklist_key`]), each with its CIDRs (read only for the page's lists), and
    /// whether more follow.
    pub fn blocklists_page(
        &self,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<BlocklistView>, bool), ServiceError> {
        // The registry answers its lists in (direction, name) order, the order of the keys.
        let lists = self.core.plane.lists()?;
        let mut it = lists.into_iter().filter(|(s, _)| {
            after.is_none_or(|a| blocklist_key(s.direction, s.name.as_str()).as_str() > a)
        });
        let page = it
            .by_ref()
            .take(size)
            .map(|(s, hits)| BlocklistView {
                cidrs: self
                    .core
                    .plane
                    .list_cidrs(s.direction, &s.name)
                    .unwrap_or_default(),
                direction: s.direction,
                name: s.name.as_str().to_owned(),
                hits: hits.into(),
            })
            .collect();
        Ok((page, it.next().is_some()))
    }

    /// One list.
    pub fn blocklist(
        &self,
        direction: Direction,
        name: &ListName,
    ) -> Result<BlocklistView, ServiceError> {
        self.blocklists()?
            .into_iter()
            .find(|l| l.direction == direction && l.name == name.as_str())
            .ok_or_else(|| ServiceError::NotFound {
                what: "list",
                name: format!("{direction}/{}", name.as_str()),
            })
    }

    /// Adds or removes entries, persisting the registry and an audit record in one batch.
    pub fn change_entries(
        &self,
        actor: &Actor,
        direction: Direction,
        name: &ListName,
        op: EntriesOp,
        cidrs: &[Cidr],
    ) -> Result<BlocklistView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let before = self.core.plane.list_cidrs(direction, name);
        if op == EntriesOp::Remove && before.is_none() {
            return Err(ServiceError::NotFound {
                what: "list",
                name: format!("{direction}/{}", name.as_str()),
            });
        }
        let list_op = match op {
            EntriesOp::Add => ListOp::Add(cidrs),
            EntriesOp::Remove => ListOp::Remove(cidrs),
        };
        let action = match op {
            EntriesOp::Add => "blocklist.add",
            EntriesOp::Remove => "blocklist.remove",
        };
        self.list_change(actor, direction, name, list_op, action, before)?;
        drop(_w);
        self.blocklist(direction, name)
    }

    /// Deletes a list.
    pub fn delete_blocklist(
        &self,
        actor: &Actor,
        direction: Direction,
        name: &ListName,
    ) -> Result<(), ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let before = self.core.plane.list_cidrs(direction, name);
        if before.is_none() {
            return Err(ServiceError::NotFound {
                what: "list",
                name: format!("{direction}/{}", name.as_str()),
            });
        }
        self.list_change(
            actor,
            direction,
            name,
            ListOp::Delete,
            "blocklist.delete",
            before,
        )
    }

    fn list_change(
        &self,
        actor: &Actor,
        direction: Direction,
        name: &ListName,
        op: ListOp<'_>,
        action: &str,
        before: Option<Vec<Cidr>>,
    ) -> Result<(), ServiceError> {
        let old_snapshot: RegistrySnapshot = self.core.plane.list_snapshot();
        self.core.plane.list_op(direction, name, op)?;
        let after = self.core.plane.list_cidrs(direction, name);
        let diff = ListDiff::between(before.as_deref(), after.as_deref());
        let mut batch = Batch::default();
        self.stage_snapshot(&mut batch)?;
        self.core.audit(
            &mut batch,
            actor,
            action,
            format!("blocklist:{direction}/{}", name.as_str()),
            before
                .as_ref()
                .and_then(|b| to_json(&ListSize { entries: b.len() })),
            to_json(&diff),
        )?;
        if let Err(e) = self.core.commit(batch) {
            // Put the old contents back so the kernel matches the store.
            let restore = match &before {
                Some(c) => self.core.plane.list_op(direction, name, ListOp::Replace(c)),
                None => self.core.plane.list_op(direction, name, ListOp::Delete),
            };
            if let Err(r) = restore {
                tracing::error!(error = %r, snapshot = old_snapshot.lists.len(), "cannot undo a list change after a failed commit");
            }
            return Err(e);
        }
        Ok(())
    }
}

/// The page key of list `name` of `direction`: sources before destinations, then by name (the
/// registry's order).
pub fn blocklist_key(direction: Direction, name: &str) -> String {
    let d = match direction {
        Direction::Source => 0,
        Direction::Destination => 1,
    };
    format!("{d}/{name}")
}
