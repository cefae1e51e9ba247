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
//!
//! ## Replacing the database (`capybara geo update --file X.mmdb`)
//! [`Geo::update`] compiles the new file first (outside the writer lock: a GeoLite2 file takes
//! seconds), then recompiles the policy's geo lists from it and writes them as **one**
//! generation, exactly like a policy change: a packet sees the lists of the old database or of
//! the new one, never neither, so a blocked country never passes during the swap. A file that
//! is not a valid country database is refused whole (naming `file`); the old database and its
//! lists stay. The path is stored ([`keys::GEO_DB`]); from then on the agent uses that file
//! (also after a restart, over `--geoip-db`) and watches it ([`spawn_watch`]: its modification
//! time, size and inode every [`WATCH_INTERVAL`], one `stat(2)`), reloading it the same way when
//! it changes; a changed file that does not load is reported in `geo list` (`last_error`) and
//! not read again until it changes again.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, to_json},
    domain::{Actor, ValidationError},
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
    /// The country database in use (not stored with the policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<GeoDbInfo>,
}

/// The country database in use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeoDbInfo {
    /// Where it was read from; empty for the database given at start.
    pub path: String,
    /// `database_type` of its metadata.
    pub database_type: String,
    /// `build_epoch` of its metadata (Unix seconds).
    pub build_epoch: u64,
    /// Countries with at least one network.
    pub countries: u32,
    /// Unix seconds it was loaded; 0 = at start.
    pub loaded_at: u64,
    /// Why the last reload of the watched file failed (this database stays); empty if none.
    pub last_error: String,
}

/// How often the watched database file is checked for a change.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The stored record of an updated database ([`keys::GEO_DB`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct GeoDbRecord {
    path: PathBuf,
}

/// A file's version as `stat(2)` tells it: modification time (ns), size, inode.
type FileVersion = (i128, u64, u64);

fn file_version(path: &Path) -> Option<FileVersion> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        m.size(),
        m.ino(),
    ))
}

/// The database in use and what the watcher knows of its file.
#[derive(Debug, Default)]
struct CurrentDb {
    db: Option<Arc<GeoDb>>,
    info: GeoDbInfo,
    /// The watched file (after an update).
    path: Option<PathBuf>,
    /// Its version when last read (well or not).
    version: Option<FileVersion>,
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

/// The policy of a stored record (codes that no longer parse are skipped).
fn policy_of(status: &GeoStatus) -> GeoPolicy {
    let codes: Vec<CountryCode> = status
        .countries
        .iter()
        .filter_map(|c| CountryCode::parse(c).ok())
        .collect();
    match status.mode {
        GeoMode::Off => GeoPolicy::Off,
        GeoMode::Block => GeoPolicy::Block(codes),
        GeoMode::Allow => GeoPolicy::Allow(codes),
    }
}

fn db_info(db: &GeoDb, path: Option<&Path>, loaded_at: u64) -> GeoDbInfo {
    GeoDbInfo {
        path: path.map(|p| p.display().to_string()).unwrap_or_default(),
        database_type: db.database_type.clone(),
        build_epoch: db.build_epoch,
        countries: u32::try_from(db.per_country.len()).unwrap_or(u32::MAX),
        loaded_at,
        last_error: String::new(),
    }
}

/// The geo feature.
#[derive(Debug)]
pub struct Geo {
    core: Arc<Core>,
    lists: Arc<Lists>,
    /// The database in use: `--geoip-db`'s until `geo update` replaces it.
    current: RwLock<CurrentDb>,
}

impl Geo {
    /// The feature over the shared core and the blocklists.
    pub fn new(core: Arc<Core>, lists: Arc<Lists>) -> Geo {
        let current = CurrentDb {
            info: core
                .cfg
                .geo_db
                .as_deref()
                .map(|db| db_info(db, None, 0))
                .unwrap_or_default(),
            db: core.cfg.geo_db.clone(),
            path: None,
            version: None,
        };
        Geo {
            core,
            lists,
            current: RwLock::new(current),
        }
    }

    /// The database in use.
    pub fn db(&self) -> Option<Arc<GeoDb>> {
        self.current.read().unwrap().db.clone()
    }

    /// Loads the country database at `path` and swaps it in without a gap (module docs); the
    /// agent then watches the file. A file that does not load changes nothing.
    pub fn update(&self, actor: &Actor, path: &Path) -> Result<GeoStatus, ServiceError> {
        if !path.is_absolute() {
            return Err(ValidationError::Value {
                field: "file",
                reason: format!(
                    "{:?}: give an absolute path on the agent's machine",
                    path.display().to_string()
                ),
            }
            .into());
        }
        let version = file_version(path);
        let db = GeoDb::open(path).map_err(|e| ValidationError::Value {
            field: "file",
            reason: error_chain(&e),
        })?;
        self.swap(actor, "geo.update", path, Arc::new(db), version)
    }

    /// Writes the policy's lists compiled from `db` in one generation, stores the path, the
    /// registry and an audit record in one batch, and makes `db` the one in use.
    fn swap(
        &self,
        actor: &Actor,
        action: &str,
        path: &Path,
        db: Arc<GeoDb>,
        version: Option<FileVersion>,
    ) -> Result<GeoStatus, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let stored: GeoStatus = self
            .core
            .store
            .get(Cf::Blocklists, keys::GEO_POLICY)?
            .unwrap_or_default();
        let policy = policy_of(&stored);
        let (plan, undo) = self.plans(&db, &policy)?;
        let before = self.current.read().unwrap().info.clone();
        let info = db_info(&db, Some(path), super::core::now());
        if policy != GeoPolicy::Off {
            self.core.plane.list_batch(Direction::Source, &plan.ops())?;
        }
        let mut batch = Batch::default();
        batch.put(
            Cf::Blocklists,
            keys::GEO_DB,
            &GeoDbRecord {
                path: path.to_owned(),
            },
        )?;
        self.lists.stage_snapshot(&mut batch)?;
        self.core.audit(
            &mut batch,
            actor,
            action,
            "geo".into(),
            to_json(&before),
            to_json(&info),
        )?;
        if let Err(e) = self.core.commit(batch) {
            if policy != GeoPolicy::Off {
                self.restore(&undo);
            }
            return Err(e);
        }
        *self.current.write().unwrap() = CurrentDb {
            db: Some(db),
            info,
            path: Some(path.to_owned()),
            version,
        };
        drop(_w);
        self.status()
    }

    /// The watched file's path, if it changed since it was last read.
    fn changed(&self) -> Option<PathBuf> {
        let cur = self.current.read().unwrap();
        let path = cur.path.as_ref()?;
        (file_version(path) != cur.version).then(|| path.clone())
    }

    /// Reloads the watched file if it changed; a file that does not load is reported in the
    /// status and not read again until it changes again.
    pub fn reload_if_changed(&self) {
        let Some(path) = self.changed() else { return };
        let version = file_version(&path);
        match GeoDb::open(&path) {
            Ok(db) => match self.swap(&Actor::Agent, "geo.reload", &path, Arc::new(db), version) {
                Ok(_) => tracing::info!(path = %path.display(), "country database reloaded"),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "country database not swapped");
                    self.current.write().unwrap().info.last_error = e.to_string();
                }
            },
            Err(e) => {
                let msg = error_chain(&e);
                tracing::warn!(path = %path.display(), error = %msg, "changed country database refused; the old one stays");
                let mut cur = self.current.write().unwrap();
                cur.version = version;
                cur.info.last_error = msg;
            }
        }
    }

    /// At start: the database `geo update` stored, if any, replaces `--geoip-db`'s and is
    /// watched from then on.
    pub fn resume(&self) -> Result<(), ServiceError> {
        let Some(rec) = self
            .core
            .store
            .get::<GeoDbRecord>(Cf::Blocklists, keys::GEO_DB)?
        else {
            return Ok(());
        };
        let mut cur = self.current.write().unwrap();
        if cur.path.as_ref() == Some(&rec.path) {
            return Ok(());
        }
        cur.path = Some(rec.path);
        // Unknown version: the watcher's first look loads it.
        cur.version = Some((-1, 0, 0));
        Ok(())
    }

    /// The plan from the source lists the kernel holds now to `policy` over `db`, and the plan
    /// that puts today's `geo:*` lists back in one generation (for a commit that fails after
    /// the change).
    fn plans(&self, db: &GeoDb, policy: &GeoPolicy) -> Result<(GeoPlan, GeoPlan), ServiceError> {
        let current: Vec<ListName> = self
            .core
            .plane
            .lists()?
            .into_iter()
            .filter(|(l, _)| l.direction == Direction::Source)
            .map(|(l, _)| l.name)
            .collect();
        let plan = GeoPlan::new(db, policy, &current);
        let old: Vec<(ListName, Vec<Cidr>)> = current
            .iter()
            .filter(|n| n.as_str().starts_with("geo:"))
            .filter_map(|n| Some((n.clone(), self.core.plane.list_cidrs(Direction::Source, n)?)))
            .collect();
        let undo = GeoPlan {
            delete: plan
                .replace
                .iter()
                .map(|(n, _)| n.clone())
                .filter(|n| !old.iter().any(|(o, _)| o == n))
                .collect(),
            replace: old,
        };
        Ok((plan, undo))
    }

    /// Applies `undo` (from [`Geo::plans`]); a failure is logged: the commit's error is what the
    /// caller answers.
    fn restore(&self, undo: &GeoPlan) {
        if let Err(u) = self.core.plane.list_batch(Direction::Source, &undo.ops()) {
            tracing::error!(error = %u, "cannot restore the geo lists after a failed commit");
        }
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
        status.database = {
            let cur = self.current.read().unwrap();
            cur.db.is_some().then(|| cur.info.clone())
        };
        Ok(status)
    }

    /// Replaces the geo lists with those of `policy` in one generation, and stores the policy,
    /// the registry and an audit record in one batch.
    pub fn set(&self, actor: &Actor, policy: &GeoPolicy) -> Result<GeoStatus, ServiceError> {
        let db = self.db().ok_or(ServiceError::NoGeoDb)?;
        let _w = self.core.writer.lock().unwrap();
        let before = self.status()?;
        let (plan, undo) = self.plans(&db, policy)?;
        self.core.plane.list_batch(Direction::Source, &plan.ops())?;
        let (mode, countries) = geo_record(policy);
        let record = GeoStatus {
            mode,
            countries,
            lists: Vec::new(),
            database: None,
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
                database: None,
                ..before
            }),
            to_json(&record),
        )?;
        if let Err(e) = self.core.commit(batch) {
            self.restore(&undo);
            return Err(e);
        }
        drop(_w);
        self.status()
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut s = e.source();
    while let Some(x) = s {
        out.push_str(": ");
        out.push_str(&x.to_string());
        s = x.source();
    }
    out
}

/// Watches the database file `geo update` named (every [`WATCH_INTERVAL`]) and reloads it when
/// it changes, until the feature is dropped (the task holds it only while it works) or the
/// runtime ends.
pub fn spawn_watch(geo: &Arc<Geo>) -> tokio::task::JoinHandle<()> {
    if let Err(e) = geo.resume() {
        tracing::error!(error = %e, "cannot read the stored country database's path");
    }
    let weak = Arc::downgrade(geo);
    tokio::spawn(async move {
        loop {
            let Some(geo) = weak.upgrade() else { return };
            if geo.changed().is_some() {
                let _ = tokio::task::spawn_blocking(move || {
                    geo.reload_if_changed();
                    let _ = geo.core.settle();
                })
                .await;
            } else {
                drop(geo);
            }
            tokio::time::sleep(WATCH_INTERVAL).await;
        }
    })
}
