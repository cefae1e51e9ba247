//! Named blocklists (source lists on the uplink, destination lists on the tunnel): their
//! contents and hits, changes to their entries, and the registry snapshot the store keeps
//! (written with every change, read back at start by [`stored_snapshot`]).
//!
//! Answers are bounded whatever a list holds: pages of lists carry entry counts, a list's
//! entries come a page at a time in address order ([`entry_key`]), and a change answers the
//! count.
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
    /// Its CIDRs: all of them, one page of them (`GetBlocklist`), or none where only the count
    /// is answered (`ListBlocklists`, `AddEntries`, `RemoveEntries`).
    pub cidrs: Vec<Cidr>,
    /// How many CIDRs the list holds (not in the CLI's JSON, which prints `cidrs` whole).
    #[serde(skip)]
    pub entries: usize,
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

    /// Every list with its contents and hits (the geo status; the API pages instead).
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
                entries: s.v4 + s.v6,
                direction: s.direction,
                name: s.name.as_str().to_owned(),
                hits: hits.into(),
            })
            .collect())
    }

    /// One page of lists in (direction, name) order: up to `size` after `after` (the list's
    /// page key, [`blocklist_key`]), each with its entry count but no CIDRs (a list can hold
    /// millions: [`Lists::blocklist_entries_page`] pages them), and whether more follow.
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
                cidrs: Vec::new(),
                entries: s.v4 + s.v6,
                direction: s.direction,
                name: s.name.as_str().to_owned(),
                hits: hits.into(),
            })
            .collect();
        Ok((page, it.next().is_some()))
    }

    /// One list with its entry count and hits, without its CIDRs.
    pub fn blocklist(
        &self,
        direction: Direction,
        name: &ListName,
    ) -> Result<BlocklistView, ServiceError> {
        self.core
            .plane
            .lists()?
            .into_iter()
            .find(|(s, _)| s.direction == direction && s.name == *name)
            .map(|(s, hits)| BlocklistView {
                cidrs: Vec::new(),
                entries: s.v4 + s.v6,
                direction: s.direction,
                name: s.name.as_str().to_owned(),
                hits: hits.into(),
            })
            .ok_or_else(|| ServiceError::NotFound {
                what: "list",
                name: format!("{direction}/{}", name.as_str()),
            })
    }

    /// One list with one page of its CIDRs in address order ([`entry_key`]: IPv4 before IPv6,
    /// then by network address, then by prefix length): up to `size` entries after `after`
    /// (an entry's key; one since removed simply continues after it), and whether more follow.
    pub fn blocklist_entries_page(
        &self,
        direction: Direction,
        name: &ListName,
        after: Option<EntryKey>,
        size: usize,
    ) -> Result<(BlocklistView, bool), ServiceError> {
        let mut view = self.blocklist(direction, name)?;
        let mut all = self
            .core
            .plane
            .list_cidrs(direction, name)
            .unwrap_or_default();
        all.sort_unstable_by_key(entry_key);
        let start = after.map_or(0, |a| all.partition_point(|c| entry_key(c) <= a));
        let end = start.saturating_add(size).min(all.len());
        view.entries = all.len();
        view.cidrs = all.get(start..end).unwrap_or_default().to_vec();
        Ok((view, end < all.len()))
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
        // The answer is the list's count, not its entries (a list can hold millions).
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

/// The page key of a list entry: the family (4 before 6), the network address, the prefix
/// length; the order of [`Lists::blocklist_entries_page`].
pub type EntryKey = (u8, u128, u8);

/// The page key of `c`.
pub fn entry_key(c: &Cidr) -> EntryKey {
    match c.addr() {
        std::net::IpAddr::V4(a) => (4, u128::from(u32::from(a)), c.prefix_len()),
        std::net::IpAddr::V6(a) => (6, u128::from(a), c.prefix_len()),
    }
}

/// `k` as the text a page token carries: `4-` or `6-`, the address in hex (8 or 32 digits),
/// `/`, the prefix length.
pub fn entry_key_text(k: EntryKey) -> String {
    let (f, a, l) = k;
    if f == 4 {
        format!("4-{a:08x}/{l}")
    } else {
        format!("6-{a:032x}/{l}")
    }
}

/// The key [`entry_key_text`] wrote; `None` for any other text.
pub fn parse_entry_key(s: &str) -> Option<EntryKey> {
    let (f, rest) = s.split_once('-')?;
    let (a, l) = rest.split_once('/')?;
    let (family, digits, max) = match f {
        "4" => (4, 8, 32),
        "6" => (6, 32, 128),
        _ => return None,
    };
    if a.len() != digits || !a.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let addr = u128::from_str_radix(a, 16).ok()?;
    let len: u8 = l.parse().ok()?;
    (len <= max && l == len.to_string()).then_some((family, addr, len))
}
