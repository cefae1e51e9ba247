//! Geo restrictions applied to the XDP guard's source lists.
//!
//! A [`GeoPolicy`] becomes named source lists, written as **one** generation
//! (`Dataplane::list_batch`): every `geo:*` list of the previous policy that the new one does not
//! have is deleted, the new ones are replaced — so switching from `block CN RU` to `allow US`
//! never shows a moment with both or neither.
//!
//! - Block mode: `geo:CN`, `geo:RU`, … one list per country, so hits are counted per country.
//! - Allow mode: one list, [`OUTSIDE_LIST`], holding every address outside the allowed countries
//!   and outside the private/reserved ranges (`geo::RESERVED_V4`/`RESERVED_V6`). Explicit allows
//!   are the `allow` list, which outranks every other list when the lists are compiled, so they
//!   need no special case here.
//!
//! Everything is validated before the kernel is touched: the database is compiled by
//! [`GeoDb::open`] (an unreadable or corrupt file fails there) and country codes are parsed by
//! [`CountryCode::parse`]; a failed write leaves the previous generation live.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, to_json},
    domain::Actor,
    lists::{BlocklistView, Lists},
};
use crate::{
    blocklist::{Direction, ListName, registry::ListOp},
    dataplane::{Dataplane, DataplaneError, ListUpdate},
    geo::{CountryCode, GeoDb, allow_mode_block, block_lists},
    net::Cidr,
    store::{Batch, Cf, keys},
};

/// The list allow mode drops from: every source outside the allowed countries.
pub const OUTSIDE_LIST: &str = "geo:outside";

/// What the guard does with countries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GeoPolicy {
    /// No geo lists.
    Off,
    /// Drop sources in these countries.
    Block(Vec<CountryCode>),
    /// Drop sources outside these countries (private/reserved ranges and the `allow` list are
    /// never dropped).
    Allow(Vec<CountryCode>),
}

/// Errors applying a geo policy.
#[derive(Debug, thiserror::Error)]
pub enum GeoApplyError {
    /// Writing the lists failed; the previous lists stay live.
    #[error("cannot write the geo lists")]
    Dataplane(#[from] DataplaneError),
}

/// The geo lists `policy` needs, as `(name, CIDRs)`.
fn lists_for(db: &GeoDb, policy: &GeoPolicy) -> Vec<(ListName, Vec<Cidr>)> {
    let to_cidrs = |v4: Vec<ipnet::Ipv4Net>, v6: Vec<ipnet::Ipv6Net>| -> Vec<Cidr> {
        v4.into_iter()
            .map(Cidr::from)
            .chain(v6.into_iter().map(Cidr::from))
            .collect()
    };
    let name = |s: &str| ListName::parse(s).expect("geo list names are valid list names");
    match policy {
        GeoPolicy::Off => Vec::new(),
        GeoPolicy::Block(countries) => block_lists(db, countries)
            .into_iter()
            .map(|(n, v4, v6)| (name(&n), to_cidrs(v4, v6)))
            .collect(),
        GeoPolicy::Allow(countries) => {
            let (v4, v6) = allow_mode_block(db, countries, &[]);
            vec![(name(OUTSIDE_LIST), to_cidrs(v4, v6))]
        }
    }
}

/// The list operations that turn the current source lists into those of a policy.
#[derive(Debug, Clone)]
pub struct GeoPlan {
    /// Lists the policy needs, with their contents.
    pub replace: Vec<(ListName, Vec<Cidr>)>,
    /// `geo:*` lists of an earlier policy that the new one does not have.
    pub delete: Vec<ListName>,
}

impl GeoPlan {
    /// The plan from the names of the source lists that exist now to `policy`.
    pub fn new<'a>(
        db: &GeoDb,
        policy: &GeoPolicy,
        current_sources: impl IntoIterator<Item = &'a ListName>,
    ) -> GeoPlan {
        let replace = lists_for(db, policy);
        let delete = current_sources
            .into_iter()
            .filter(|n| n.as_str().starts_with("geo:") && !replace.iter().any(|(m, _)| m == *n))
            .cloned()
            .collect();
        GeoPlan { replace, delete }
    }

    /// The operations, replaces first, deletes last (see [`apply`] for why).
    pub fn ops(&self) -> Vec<(ListName, ListOp<'_>)> {
        let mut ops: Vec<(ListName, ListOp<'_>)> = self
            .replace
            .iter()
            .map(|(n, cidrs)| (n.clone(), ListOp::Replace(cidrs)))
            .collect();
        ops.extend(self.delete.iter().map(|n| (n.clone(), ListOp::Delete)));
        ops
    }
}

/// Replaces the source lists named `geo:*` with those of `policy`, in one generation.
pub fn apply(
    dataplane: &mut Dataplane,
    db: &GeoDb,
    policy: &GeoPolicy,
) -> Result<ListUpdate, GeoApplyError> {
    let current: Vec<ListName> = dataplane
        .lists()
        .into_iter()
        .filter(|l| l.direction == Direction::Source)
        .map(|l| l.name)
        .collect();
    let plan = GeoPlan::new(db, policy, &current);
    // Replaces first, deletes last: a list created here is planned while the stale lists still
    // hold their ids, so it never re-uses the id of a list deleted in this same flip. (Ids are
    // handed out lowest-free-first and a created list's hit counter is zeroed before the flip:
    // with the deletes first, `block CN` → `block RU` gave geo:RU geo:CN's id, and every CN
    // packet the still-live old generation dropped until the flip was counted as a geo:RU hit.)
    Ok(dataplane.list_batch(Direction::Source, &plan.ops())?)
}

/// What the guard does with the countries of a policy; stored and shown as `off`, `block` or
/// `allow`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GeoMode {
    /// No geo lists.
    #[default]
    Off,
    /// Drop sources in the countries.
    Block,
    /// Drop sources outside the countries.
    Allow,
}

/// A mode from its name.
impl std::str::FromStr for GeoMode {
    type Err = ();
    fn from_str(s: &str) -> Result<GeoMode, ()> {
        [GeoMode::Off, GeoMode::Block, GeoMode::Allow]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or(())
    }
}

/// A mode equals its name (`GeoMode::Off == "off"`).
impl PartialEq<&str> for GeoMode {
    fn eq(&self, s: &&str) -> bool {
        self.name() == *s
    }
}

impl GeoMode {
    /// `off`, `block` or `allow`.
    pub fn name(self) -> &'static str {
        match self {
            GeoMode::Off => "off",
            GeoMode::Block => "block",
            GeoMode::Allow => "allow",
        }
    }
}

impl std::fmt::Display for GeoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The geo policy as stored (`blocklists` family, [`keys::GEO_POLICY`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeoStatus {
    /// What the guard does with the countries.
    pub mode: GeoMode,
    /// The countries of the policy, ISO codes.
    pub countries: Vec<String>,
    /// The geo lists in the kernel with their sizes and hits.
    pub lists: Vec<BlocklistView>,
}

/// The stored form of a policy.
fn geo_record(policy: &GeoPolicy) -> (GeoMode, Vec<String>) {
    let codes = |c: &[CountryCode]| c.iter().map(|c| c.as_str().to_owned()).collect();
    match policy {
        GeoPolicy::Off => (GeoMode::Off, Vec::new()),
        GeoPolicy::Block(c) => (GeoMode::Block, codes(c)),
        GeoPolicy::Allow(c) => (GeoMode::Allow, codes(c)),
    }
}

/// The geo feature.
#[derive(Debug)]
pub struct Geo {
    core: Arc<Core>,
    lists: Arc<Lists>,
}

impl Geo {
    /// The feature over the shared core and the blocklists.
    pub fn new(core: Arc<Core>, lists: Arc<Lists>) -> Geo {
        Geo { core, lists }
    }

    /// The geo policy and its lists.
    pub fn status(&self) -> Result<GeoStatus, ServiceError> {
        let mut status: GeoStatus = self
            .core
            .store
            .get(Cf::Blocklists, keys::GEO_POLICY)?
            .unwrap_or_default();
        status.lists = self
            .lists
            .blocklists()?
            .into_iter()
            .filter(|l| l.direction == Direction::Source && l.name.starts_with("geo:"))
            .collect();
        Ok(status)
    }

    /// Replaces the geo lists with those of `policy` in one generation, and stores the policy,
    /// the registry and an audit record in one batch.
    pub fn set(&self, actor: &Actor, policy: &GeoPolicy) -> Result<GeoStatus, ServiceError> {
        let db = self.core.cfg.geo_db.clone().ok_or(ServiceError::NoGeoDb)?;
        let _w = self.core.writer.lock().unwrap();
        let before = self.status()?;
        let current: Vec<ListName> = self
            .core
            .plane
            .lists()?
            .into_iter()
            .filter(|(l, _)| l.direction == Direction::Source)
            .map(|(l, _)| l.name)
            .collect();
        let plan = GeoPlan::new(&db, policy, &current);
        let old: Vec<(ListName, Vec<Cidr>)> = current
            .iter()
            .filter(|n| n.as_str().starts_with("geo:"))
            .filter_map(|n| Some((n.clone(), self.core.plane.list_cidrs(Direction::Source, n)?)))
            .collect();
        self.core.plane.list_batch(Direction::Source, &plan.ops())?;
        let (mode, countries) = geo_record(policy);
        let record = GeoStatus {
            mode,
            countries,
            lists: Vec::new(),
        };
        let mut batch = Batch::default();
        batch.put(Cf::Blocklists, keys::GEO_POLICY, &record)?;
        self.lists.stage_snapshot(&mut batch)?;
        self.core.audit(
            &mut batch,
            actor,
            "geo.set",
            "geo".into(),
            to_json(&GeoStatus {
                lists: Vec::new(),
                ..before
            }),
            to_json(&record),
        )?;
        if let Err(e) = self.core.commit(batch) {
            // Back to the old geo lists, in one generation again.
            let undo = GeoPlan {
                delete: plan
                    .replace
                    .iter()
                    .map(|(n, _)| n.clone())
                    .filter(|n| !old.iter().any(|(o, _)| o == n))
                    .collect(),
                replace: old,
            };
            if let Err(u) = self.core.plane.list_batch(Direction::Source, &undo.ops()) {
                tracing::error!(error = %u, "cannot restore the geo lists after a failed commit");
            }
            return Err(e);
        }
        drop(_w);
        self.status()
    }
}
