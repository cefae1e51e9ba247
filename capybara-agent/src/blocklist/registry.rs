//! The list registry: names → stable ids and contents, per direction. Every operation is first
//! *planned* ([`Registry::plan`]: validated, nothing changed), then compiled and written by the
//! dataplane, and only then *committed* ([`Registry::commit`]) — so a refused or failed write
//! leaves the registry as it was.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    BlocklistError, Direction, ListClass, ListId, ListName, MAX_LISTS,
    compile::{Input, V4Packed, V6Prefix, pack_v4, unpack_v4},
};
use crate::net::Cidr;

/// One list's id and contents (sorted, without duplicates).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListData {
    /// Stable id (`1..MAX_LISTS`), the slot of the list's hit counter.
    pub id: ListId,
    /// IPv4 prefixes, packed ([`pack_v4`]), sorted, unique.
    pub v4: Vec<V4Packed>,
    /// IPv6 prefixes, sorted, unique.
    pub v6: Vec<V6Prefix>,
}

impl ListData {
    /// Number of CIDRs in the list.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when the list holds no CIDR.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The list's CIDRs (IPv4 first, each sorted).
    pub fn cidrs(&self) -> Vec<Cidr> {
        let v4 = self.v4.iter().map(|&p| {
            let (a, l) = unpack_v4(p);
            Cidr::from(ipnet::Ipv4Net::new(a.into(), l).expect("valid length"))
        });
        let v6 = self
            .v6
            .iter()
            .map(|&(a, l)| Cidr::from(ipnet::Ipv6Net::new(a.into(), l).expect("valid length")));
        v4.chain(v6).collect()
    }

    fn from_cidrs(id: ListId, cidrs: &[Cidr]) -> ListData {
        let (v4, v6) = split(cidrs);
        ListData { id, v4, v6 }
    }
}

/// Splits CIDRs into sorted, unique packed IPv4 and IPv6 prefixes.
fn split(cidrs: &[Cidr]) -> (Vec<V4Packed>, Vec<V6Prefix>) {
    let mut v4 = Vec::with_capacity(cidrs.len());
    let mut v6 = Vec::new();
    for c in cidrs {
        match (c.as_v4(), c.as_v6()) {
            (Some(n), _) => v4.push(pack_v4(n.network().into(), n.prefix_len())),
            (_, Some(n)) => v6.push((n.network().into(), n.prefix_len())),
            _ => unreachable!("a CIDR is IPv4 or IPv6"),
        }
    }
    v4.sort_unstable();
    v4.dedup();
    v6.sort_unstable();
    v6.dedup();
    (v4, v6)
}

/// Sorted-set union of two sorted, unique vectors.
fn union<T: Ord + Copy>(a: &[T], b: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// Sorted-set difference `a \ b` of two sorted, unique vectors.
fn difference<T: Ord + Copy>(a: &[T], b: &[T]) -> Vec<T> {
    let mut j = 0;
    a.iter()
        .copied()
        .filter(|x| {
            while j < b.len() && b[j] < *x {
                j += 1;
            }
            !(j < b.len() && b[j] == *x)
        })
        .collect()
}

/// A list operation.
#[derive(Debug, Clone, Copy)]
pub enum ListOp<'a> {
    /// Add CIDRs (creating the list if needed).
    Add(&'a [Cidr]),
    /// Remove CIDRs (absent ones are ignored).
    Remove(&'a [Cidr]),
    /// Replace the whole contents (creating the list if needed).
    Replace(&'a [Cidr]),
    /// Delete the list.
    Delete,
}

/// A validated change to one list, not yet applied.
#[derive(Debug, Clone)]
pub struct ListChange {
    /// The list's direction.
    pub direction: Direction,
    /// The list's name.
    pub name: ListName,
    /// The list's id (kept or newly assigned).
    pub id: ListId,
    /// The list's new contents; `None` when the list is deleted.
    pub new: Option<ListData>,
    /// True when the operation creates the list (its hit counter must start at 0).
    pub created: bool,
}

/// Serializable state of the registry: what the store persists to recover lists after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct RegistrySnapshot {
    /// Every list.
    pub lists: Vec<ListSnapshot>,
}

/// One list in a [`RegistrySnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListSnapshot {
    /// Where the list is enforced.
    pub direction: Direction,
    /// The list's name.
    pub name: ListName,
    /// The list's stable id.
    pub id: ListId,
    /// The list's CIDRs.
    pub cidrs: Vec<Cidr>,
}

/// Summary of one list, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSummary {
    /// Where the list is enforced.
    pub direction: Direction,
    /// The list's name.
    pub name: ListName,
    /// The list's stable id.
    pub id: ListId,
    /// Number of IPv4 CIDRs.
    pub v4: usize,
    /// Number of IPv6 CIDRs.
    pub v6: usize,
}

/// Named lists of both directions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    lists: BTreeMap<(Direction, ListName), ListData>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The list `name` of `direction`.
    pub fn get(&self, direction: Direction, name: &ListName) -> Option<&ListData> {
        self.lists.get(&(direction, name.clone()))
    }

    /// Every list, by direction then name.
    pub fn summaries(&self) -> Vec<ListSummary> {
        self.lists
            .iter()
            .map(|((d, n), l)| ListSummary {
                direction: *d,
                name: n.clone(),
                id: l.id,
                v4: l.v4.len(),
                v6: l.v6.len(),
            })
            .collect()
    }

    fn free_id(&self) -> Result<ListId, BlocklistError> {
        let used: BTreeSet<ListId> = self.lists.values().map(|l| l.id).collect();
        (1..MAX_LISTS)
            .find(|i| !used.contains(i))
            .ok_or(BlocklistError::TooManyLists { max: MAX_LISTS - 1 })
    }

    /// Validates `op` on list `name` of `direction` and computes the list's new contents.
    pub fn plan(
        &self,
        direction: Direction,
        name: &ListName,
        op: ListOp<'_>,
    ) -> Result<ListChange, BlocklistError> {
        let existing = self.get(direction, name);
        let unknown = || BlocklistError::UnknownList {
            direction,
            name: name.as_str().to_owned(),
        };
        let (id, created) = match (existing, op) {
            (Some(l), _) => (l.id, false),
            (None, ListOp::Add(_) | ListOp::Replace(_)) => (self.free_id()?, true),
            (None, ListOp::Remove(_) | ListOp::Delete) => return Err(unknown()),
        };
        let new = match op {
            ListOp::Replace(cidrs) => Some(ListData::from_cidrs(id, cidrs)),
            ListOp::Add(cidrs) => {
                let (v4, v6) = split(cidrs);
                Some(match existing {
                    Some(l) => ListData {
                        id,
                        v4: union(&l.v4, &v4),
                        v6: union(&l.v6, &v6),
                    },
                    None => ListData { id, v4, v6 },
                })
            }
            ListOp::Remove(cidrs) => {
                let (v4, v6) = split(cidrs);
                let l = existing.ok_or_else(unknown)?;
                Some(ListData {
                    id,
                    v4: difference(&l.v4, &v4),
                    v6: difference(&l.v6, &v6),
                })
            }
            ListOp::Delete => None,
        };
        Ok(ListChange {
            direction,
            name: name.clone(),
            id,
            new,
            created,
        })
    }

    /// Compiler inputs for `direction` in priority order, with `change` (if any) applied.
    pub fn inputs<'a>(
        &'a self,
        direction: Direction,
        change: Option<&'a ListChange>,
    ) -> Vec<Input<'a>> {
        let mut lists: Vec<(&ListName, &ListData)> = self
            .lists
            .iter()
            .filter(|((d, n), _)| {
                *d == direction && !change.is_some_and(|c| c.direction == direction && &c.name == n)
            })
            .map(|((_, n), l)| (n, l))
            .collect();
        if let Some(c) = change.filter(|c| c.direction == direction)
            && let Some(new) = &c.new
        {
            lists.push((&c.name, new));
        }
        lists.sort_by_key(|(n, l)| (n.class(), l.id));
        lists
            .into_iter()
            .map(|(n, l)| Input {
                id: if n.class() == ListClass::Allow {
                    0
                } else {
                    l.id
                },
                v4: &l.v4,
                v6: &l.v6,
            })
            .collect()
    }

    /// Applies a planned change.
    pub fn commit(&mut self, change: ListChange) {
        let key = (change.direction, change.name);
        match change.new {
            Some(l) => {
                self.lists.insert(key, l);
            }
            None => {
                self.lists.remove(&key);
            }
        }
    }

    /// The registry's state, for the store.
    pub fn snapshot(&self) -> RegistrySnapshot {
        RegistrySnapshot {
            lists: self
                .lists
                .iter()
                .map(|((d, n), l)| ListSnapshot {
                    direction: *d,
                    name: n.clone(),
                    id: l.id,
                    cidrs: l.cidrs(),
                })
                .collect(),
        }
    }

    /// Rebuilds a registry from a snapshot, checking ids are in range and unique.
    pub fn from_snapshot(snapshot: &RegistrySnapshot) -> Result<Registry, BlocklistError> {
        let mut lists = BTreeMap::new();
        let mut ids = BTreeSet::new();
        for l in &snapshot.lists {
            let bad = |what| BlocklistError::InvalidSnapshot {
                what,
                list: format!("{} {}", l.direction, l.name),
            };
            if !(1..MAX_LISTS).contains(&l.id) {
                return Err(bad("list id out of range"));
            }
            if !ids.insert(l.id) {
                return Err(bad("duplicate list id"));
            }
            let data = ListData::from_cidrs(l.id, &l.cidrs);
            if lists.insert((l.direction, l.name.clone()), data).is_some() {
                return Err(bad("duplicate list"));
            }
        }
        Ok(Registry { lists })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &[&str]) -> Vec<Cidr> {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    fn name(s: &str) -> ListName {
        ListName::parse(s).unwrap()
    }

    fn apply(r: &mut Registry, d: Direction, n: &str, op: ListOp<'_>) -> ListChange {
        let ch = r.plan(d, &name(n), op).unwrap();
        r.commit(ch.clone());
        ch
    }

    #[test]
    fn ids_are_stable_unique_and_reused_after_delete() {
        let mut r = Registry::new();
        let a = apply(
            &mut r,
            Direction::Source,
            "manual",
            ListOp::Add(&c(&["1.0.0.0/8"])),
        );
        let b = apply(
            &mut r,
            Direction::Destination,
            "manual",
            ListOp::Add(&c(&["2.0.0.0/8"])),
        );
        assert!(a.created && b.created);
        assert_eq!((a.id, b.id), (1, 2));
        let a2 = apply(
            &mut r,
            Direction::Source,
            "manual",
            ListOp::Add(&c(&["3.0.0.0/8"])),
        );
        assert_eq!(a2.id, 1);
        assert!(!a2.created);
        apply(&mut r, Direction::Source, "manual", ListOp::Delete);
        let t = apply(&mut r, Direction::Source, "tor", ListOp::Replace(&[]));
        assert_eq!(t.id, 1);
        assert!(t.created);
    }

    #[test]
    fn add_remove_replace_are_set_operations() {
        let mut r = Registry::new();
        let d = Direction::Source;
        apply(
            &mut r,
            d,
            "x",
            ListOp::Add(&c(&["1.0.0.0/8", "1.0.0.0/8", "::/0"])),
        );
        apply(&mut r, d, "x", ListOp::Add(&c(&["2.0.0.0/8"])));
        assert_eq!(r.get(d, &name("x")).unwrap().len(), 3);
        apply(
            &mut r,
            d,
            "x",
            ListOp::Remove(&c(&["1.0.0.0/8", "9.0.0.0/8"])),
        );
        assert_eq!(
            r.get(d, &name("x")).unwrap().cidrs(),
            c(&["2.0.0.0/8", "::/0"])
        );
        apply(&mut r, d, "x", ListOp::Replace(&c(&["3.3.3.3/32"])));
        assert_eq!(r.get(d, &name("x")).unwrap().cidrs(), c(&["3.3.3.3/32"]));
    }

    #[test]
    fn unknown_lists_are_refused_for_remove_and_delete() {
        let r = Registry::new();
        for op in [ListOp::Remove(&[]), ListOp::Delete] {
            let e = r.plan(Direction::Source, &name("nope"), op).unwrap_err();
            assert!(matches!(e, BlocklistError::UnknownList { .. }), "{e}");
        }
    }

    #[test]
    fn inputs_follow_the_priority_rule_and_allow_compiles_to_zero() {
        let mut r = Registry::new();
        let d = Direction::Source;
        for n in [
            "geo:CN", "zzz", "vpn", "tor", "auto", "manual", "allow", "aaa",
        ] {
            apply(&mut r, d, n, ListOp::Add(&c(&["1.1.1.1"])));
        }
        let ids: Vec<ListId> = r.inputs(d, None).iter().map(|i| i.id).collect();
        // ids by creation: geo:CN 1, zzz 2, vpn 3, tor 4, auto 5, manual 6, allow 7, aaa 8.
        assert_eq!(ids, vec![0, 6, 5, 4, 3, 2, 8, 1]);
    }

    #[test]
    fn a_planned_change_is_seen_by_inputs_before_commit() {
        let mut r = Registry::new();
        let d = Direction::Destination;
        apply(&mut r, d, "a", ListOp::Add(&c(&["1.1.1.1"])));
        let ch = r.plan(d, &name("a"), ListOp::Delete).unwrap();
        assert!(r.inputs(d, Some(&ch)).is_empty());
        assert_eq!(r.inputs(d, None).len(), 1);
        assert_eq!(r.inputs(Direction::Source, Some(&ch)).len(), 0);
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let mut r = Registry::new();
        apply(
            &mut r,
            Direction::Source,
            "geo:CN",
            ListOp::Add(&c(&["1.0.0.0/8", "2001:db8::/32"])),
        );
        apply(
            &mut r,
            Direction::Destination,
            "ads",
            ListOp::Add(&c(&["9.9.9.9"])),
        );
        let s = r.snapshot();
        let j = serde_json::to_string(&s).unwrap();
        let back: RegistrySnapshot = serde_json::from_str(&j).unwrap();
        assert_eq!(Registry::from_snapshot(&back).unwrap(), r);
        let mut dup = s.clone();
        dup.lists[1].id = dup.lists[0].id;
        assert!(matches!(
            Registry::from_snapshot(&dup),
            Err(BlocklistError::InvalidSnapshot {
                what: "duplicate list id",
                ..
            })
        ));
        assert!(
            serde_json::from_str::<RegistrySnapshot>(&j.replace("geo:CN", "Bad Name")).is_err()
        );
    }
}
