//! IP intelligence on the uplink: the master switch (`ip-intel enable|disable`), the `tor` and
//! `vpn` source lists fed from a list file or a URL (`ip-intel block-tor|block-vpn`), reloaded
//! on a schedule and when their file changes, and the `allow` list (`ip-intel allow`), which
//! outranks every source list (`crate::blocklist`'s priority rule). The XDP guard enforces the
//! lists; this module decides what they hold.
//!
//! ## What is enforced
//! A category's kernel list (`tor`, `vpn`) holds the category's last good load when IP
//! intelligence is enabled **and** the category is on; otherwise it is empty (the list keeps
//! its id, so its hit counter continues). The last good load is kept in the store
//! ([`keys::intel_list`]) whatever the switch says, so `disable` → `enable` needs no download.
//! The switch is also read by the reputation engine ([`Intel::enabled`]). Once any `ip-intel`
//! change was made, IP intelligence owns the `tor` and `vpn` lists: entries added to them with
//! `blocklist add` are replaced by the next load. Before that (no settings stored) the agent
//! leaves them alone.
//!
//! ## Loads and swaps
//! A source is read and parsed ([`parse`]) **before** the writer lock is taken (a download may
//! take up to a minute and must not hold other changes back); a list that does not parse is
//! refused whole, naming its line, and the old list stays enforced. A good list replaces the
//! kernel list in one generation flip (`dataplane::lists`: readers see the old list or the new
//! one, never a mix), and is stored with the registry snapshot and its audit record in one
//! batch. A reload whose list equals the stored one writes only its time ([`keys::intel_meta`]).
//!
//! ## Schedule ([`runner`])
//! Each source is reloaded every `refresh` (default [`DEFAULT_REFRESH`], 60 s..7 d), jittered by
//! ±[`JITTER_PERCENT`] % so that many agents do not hit a feed at once; a failed reload keeps
//! the old list, is shown in `ip-intel list` (`last_error`) and counted
//! ([`Intel::refresh_failures`]), and is retried after [`RETRY_AFTER`] (or `refresh`, if
//! shorter). A list file is also checked every [`FILE_CHECK`] by its modification time, size and
//! inode (one `stat(2)`: measured 1.8 µs, release build, load average 8.5 on this 2-core
//! machine; so the check costs nothing whatever the list's size;
//! inotify was not used because a file replaced by rename, the usual way to update a feed
//! atomically, drops an inotify watch on the old inode and would need the directory watched
//! instead). A file that changed is reloaded at once; one that fails to parse is not re-read
//! until it changes again (or its refresh comes).
//!
//! Measured (`e2e_intel`, debug build of the agent, 2 cores under load ≈ 8): a changed 1M-entry
//! list file is live 12–14 s after its rename (parse, sort, compile, kernel write, store);
//! 37 204 datagrams from a blocked source streamed across two such swaps were all dropped and
//! counted under `tor`. The release figure of the kernel write alone is
//! `dataplane::lists`' `list_replace_1m_ms`.

pub mod fetch;
pub mod parse;
pub mod runner;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use self::{
    fetch::FetchError,
    parse::{ListParseError, parse_list},
};
use super::{
    ServiceError,
    core::{Core, now, to_json},
    domain::{Actor, ValidationError},
    lists::{EntriesOp, Lists},
    monitor::Traffic,
};
use crate::{
    blocklist::{Direction, ListName, registry::ListOp},
    net::Cidr,
    store::{Batch, Cf, keys},
};

/// How often a source is reloaded unless told otherwise.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);
/// The shortest refresh interval accepted (a feed is not a ping target).
pub const MIN_REFRESH: Duration = Duration::from_secs(60);
/// The longest refresh interval accepted.
pub const MAX_REFRESH: Duration = Duration::from_secs(7 * 24 * 3600);
/// How much a refresh is moved earlier or later at random, in percent of the interval.
pub const JITTER_PERCENT: u64 = 10;
/// How soon a failed reload is tried again (at most; `refresh` if shorter).
pub const RETRY_AFTER: Duration = Duration::from_secs(300);
/// How often a list file is checked for a change.
pub const FILE_CHECK: Duration = Duration::from_secs(2);

/// A category of IP intelligence with a list of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Tor exit relays.
    Tor,
    /// VPN and proxy exits.
    Vpn,
}

impl Category {
    /// Both categories.
    pub const ALL: [Category; 2] = [Category::Tor, Category::Vpn];

    /// `tor` or `vpn`: also the name of its source list.
    pub fn name(self) -> &'static str {
        match self {
            Category::Tor => "tor",
            Category::Vpn => "vpn",
        }
    }

    /// Its source list.
    pub fn list(self) -> ListName {
        ListName::parse(self.name()).expect("tor and vpn are list names")
    }

    /// The category named `s` (in `field`).
    pub fn parse(field: &'static str, s: &str) -> Result<Category, ValidationError> {
        Category::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| ValidationError::Value {
                field,
                reason: format!("{s:?}: expected tor or vpn"),
            })
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a category's list comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A file on the agent's machine (absolute path), watched for changes.
    File(PathBuf),
    /// An http(s) URL the agent fetches.
    Url(String),
}

impl Source {
    /// `file` or `url`: also the name of the field that gives it.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::File(_) => "file",
            Source::Url(_) => "url",
        }
    }

    /// The path or the URL.
    pub fn location(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Url(u) => u.clone(),
        }
    }

    /// Checks a file source's path (absolute, at most 4 096 bytes) or a URL's shape.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Source::File(p) if !p.is_absolute() || p.as_os_str().len() > 4096 => {
                Err(ValidationError::Value {
                    field: "file",
                    reason: format!(
                        "{:?}: give an absolute path (at most 4096 bytes) on the agent's machine",
                        p.display().to_string()
                    ),
                })
            }
            Source::File(_) => Ok(()),
            Source::Url(u) => super::webhooks::ssrf::parse_url(u).map(drop),
        }
    }
}

/// One category's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CategorySettings {
    /// The category is on (its list is enforced while IP intelligence is enabled).
    pub on: bool,
    /// Where its list comes from; `None` until one is given.
    pub source: Option<Source>,
    /// Seconds between reloads; 0 = [`DEFAULT_REFRESH`].
    pub refresh_secs: u64,
    /// The URL's host may resolve to a non-public address (`--allow-private`).
    #[serde(default)]
    pub allow_private: bool,
}

impl CategorySettings {
    /// The refresh interval.
    pub fn refresh(&self) -> Duration {
        if self.refresh_secs == 0 {
            DEFAULT_REFRESH
        } else {
            Duration::from_secs(self.refresh_secs)
        }
    }
}

/// IP intelligence's settings as stored ([`keys::INTEL_SETTINGS`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntelSettings {
    /// The master switch: off, no category list is enforced and reputation scoring stops.
    pub enabled: bool,
    /// The Tor category.
    pub tor: CategorySettings,
    /// The VPN category.
    pub vpn: CategorySettings,
}

impl IntelSettings {
    /// The settings of `c`.
    pub fn category(&self, c: Category) -> &CategorySettings {
        match c {
            Category::Tor => &self.tor,
            Category::Vpn => &self.vpn,
        }
    }

    fn category_mut(&mut self, c: Category) -> &mut CategorySettings {
        match c {
            Category::Tor => &mut self.tor,
            Category::Vpn => &mut self.vpn,
        }
    }

    /// Whether `c`'s list is in the kernel.
    pub fn enforced(&self, c: Category) -> bool {
        self.enabled && self.category(c).on
    }
}

/// A change of a category's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceChange {
    /// Turn the category on; with a source, load it first and keep it as the category's
    /// source; without, use the configured one (if any).
    On {
        /// A new source.
        source: Option<Source>,
        /// A new refresh interval.
        refresh: Option<Duration>,
        /// `--allow-private`.
        allow_private: bool,
    },
    /// Turn the category off (its source and last list are kept).
    Off,
}

/// The last good load of a category (its CIDRs are stored apart, [`keys::intel_list`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMeta {
    /// Unix seconds of the last good load; 0 = never.
    pub loaded_at: u64,
    /// CIDRs it held.
    pub entries: u64,
}

/// A file's identity and version as `stat(2)` tells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSig {
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Size in bytes.
    pub size: u64,
    /// Inode (a file replaced by rename has a new one).
    pub ino: u64,
}

impl FileSig {
    /// The signature of the file at `path`, if it can be read.
    pub fn of(path: &std::path::Path) -> Option<FileSig> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).ok()?;
        Some(FileSig {
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            size: m.size(),
            ino: m.ino(),
        })
    }
}

/// What the agent knows of a category between loads (not stored).
#[derive(Clone, Debug, Default)]
struct Runtime {
    /// The last failed load: (Unix seconds, why).
    last_error: Option<(u64, String)>,
    /// When the next scheduled reload is due.
    due: Option<Instant>,
    /// Unix seconds of `due`.
    due_unix: u64,
    /// The list file as last read (good or bad).
    file_sig: Option<FileSig>,
}

/// One list of IP intelligence as `ip-intel list` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntelListView {
    /// `tor`, `vpn`, `allow` or `auto`.
    pub name: String,
    /// The category is on (always true for `allow` and `auto`).
    pub on: bool,
    /// The list is in the kernel now.
    pub enforced: bool,
    /// `file`, `url` or empty.
    pub source_kind: String,
    /// The path or URL.
    pub source: String,
    /// Seconds between reloads (sources only).
    pub refresh_secs: u64,
    /// `--allow-private`.
    pub allow_private: bool,
    /// CIDRs in the list (the last good load).
    pub entries: u64,
    /// Unix seconds of the last good load; 0 = never.
    pub loaded_at: u64,
    /// Unix seconds of the next reload; 0 = none.
    pub next_refresh: u64,
    /// Why the last load failed; empty after a good one.
    pub last_error: String,
    /// Unix seconds of that failure; 0 = none.
    pub last_error_at: u64,
    /// Packets and bytes the kernel dropped because of the list.
    pub hits: Traffic,
}

/// IP intelligence as `ip-intel list` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntelStatus {
    /// The master switch.
    pub enabled: bool,
    /// `tor`, `vpn`, `allow`, and `auto` when the reputation engine made it.
    pub lists: Vec<IntelListView>,
}

/// Why a source did not give a list.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Parse(#[from] ListParseError),
}

impl LoadError {
    /// The service error naming `field` (the source's kind): the caller's input (a bad list, a
    /// refused URL, a missing file) is invalid; a feed that is down is unavailable.
    fn into_service(self, field: &'static str) -> ServiceError {
        match self {
            LoadError::Fetch(f) if !f.is_input() => ServiceError::SourceUnavailable {
                field,
                reason: f.to_string(),
            },
            e => ServiceError::Invalid(ValidationError::Value {
                field,
                reason: e.to_string(),
            }),
        }
    }
}

/// A loaded list: normalized (sorted, without duplicates), with the file's signature.
struct Loaded {
    cidrs: Vec<Cidr>,
    sig: Option<FileSig>,
}

/// Reads and parses `source` (blocking; a URL is fetched on the current tokio runtime, or on a
/// small one of its own outside any).
fn load(source: &Source, allow_private: bool) -> Result<Loaded, LoadError> {
    let (bytes, sig) = match source {
        Source::File(path) => {
            let sig = FileSig::of(path);
            (fetch::read_file(path)?, sig)
        }
        Source::Url(url) => {
            let fut = fetch::fetch_url(url, allow_private);
            let bytes = match tokio::runtime::Handle::try_current() {
                Ok(h) => h.block_on(fut)?,
                Err(_) => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| FetchError::Transfer(e.to_string()))?
                    .block_on(fut)?,
            };
            (bytes, None)
        }
    };
    let mut cidrs = parse_list(&bytes)?;
    cidrs.sort_unstable();
    cidrs.dedup();
    Ok(Loaded { cidrs, sig })
}

/// The `before`/`after` of an audit record: the settings and, where a list changed, its sizes.
#[derive(Debug, Serialize)]
struct AuditView<'a> {
    #[serde(flatten)]
    settings: &'a IntelSettings,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    entries: BTreeMap<&'static str, usize>,
}

/// The IP intelligence feature.
#[derive(Debug)]
pub struct Intel {
    core: Arc<Core>,
    lists: Arc<Lists>,
    /// The settings (a copy of the stored record; changed under the writer lock).
    settings: Mutex<IntelSettings>,
    /// `settings.enabled`, for readers on hot paths (the reputation engine).
    enabled: AtomicBool,
    /// Per category (by [`Category::index`]).
    runtime: Mutex<[Runtime; 2]>,
    /// Wakes the runner when the settings change.
    wake: Arc<tokio::sync::Notify>,
    /// Failed reloads since start.
    failures: AtomicU64,
}

impl Intel {
    /// The feature over the core and the blocklists, with its stored settings.
    pub fn new(core: Arc<Core>, lists: Arc<Lists>) -> Result<Intel, ServiceError> {
        let settings: IntelSettings = core
            .store
            .get(Cf::Blocklists, keys::INTEL_SETTINGS)?
            .unwrap_or_default();
        let mut runtime: [Runtime; 2] = Default::default();
        for c in Category::ALL {
            // The first reload after a start comes soon (the list may be an hour old), jittered.
            let r = &mut runtime[c.index()];
            schedule(r, Duration::from_secs(30));
            if let Some(Source::File(p)) = &settings.category(c).source {
                r.file_sig = FileSig::of(p);
            }
        }
        Ok(Intel {
            core,
            lists,
            enabled: AtomicBool::new(settings.enabled),
            settings: Mutex::new(settings),
            runtime: Mutex::new(runtime),
            wake: Arc::new(tokio::sync::Notify::new()),
            failures: AtomicU64::new(0),
        })
    }

    /// The master switch (read by the reputation engine: scoring stops while it is off).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The settings.
    pub fn settings(&self) -> IntelSettings {
        self.settings.lock().unwrap().clone()
    }

    /// Reloads that failed since the agent started (a metric).
    pub fn refresh_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Categories whose last reload failed, with why (for health).
    pub fn failing(&self) -> Vec<(Category, String)> {
        let rt = self.runtime.lock().unwrap();
        Category::ALL
            .into_iter()
            .filter_map(|c| Some((c, rt[c.index()].last_error.as_ref()?.1.clone())))
            .collect()
    }

    fn meta(&self, c: Category) -> Result<ListMeta, ServiceError> {
        Ok(self
            .core
            .store
            .get(Cf::Blocklists, &keys::intel_meta(c.name()))?
            .unwrap_or_default())
    }

    fn stored_list(&self, c: Category) -> Result<Vec<Cidr>, ServiceError> {
        Ok(self
            .core
            .store
            .get(Cf::Blocklists, &keys::intel_list(c.name()))?
            .unwrap_or_default())
    }

    /// The switch and every list with its source, size, age, next reload, last error and hits.
    pub fn status(&self) -> Result<IntelStatus, ServiceError> {
        let settings = self.settings();
        let hits: BTreeMap<String, (usize, Traffic)> = self
            .core
            .plane
            .lists()?
            .into_iter()
            .filter(|(s, _)| s.direction == Direction::Source)
            .map(|(s, h)| (s.name.as_str().to_owned(), (s.v4 + s.v6, h.into())))
            .collect();
        let rt = self.runtime.lock().unwrap().clone();
        let mut lists = Vec::new();
        for c in Category::ALL {
            let cs = settings.category(c);
            let meta = self.meta(c)?;
            let r = &rt[c.index()];
            let (last_error_at, last_error) = r.last_error.clone().unwrap_or_default();
            lists.push(IntelListView {
                name: c.name().into(),
                on: cs.on,
                enforced: settings.enforced(c),
                source_kind: cs.source.as_ref().map(Source::kind).unwrap_or("").into(),
                source: cs.source.as_ref().map(Source::location).unwrap_or_default(),
                refresh_secs: cs.refresh().as_secs(),
                allow_private: cs.allow_private,
                entries: meta.entries,
                loaded_at: meta.loaded_at,
                next_refresh: if settings.enforced(c) && cs.source.is_some() {
                    r.due_unix
                } else {
                    0
                },
                last_error,
                last_error_at,
                hits: hits.get(c.name()).map(|h| h.1).unwrap_or_default(),
            });
        }
        for (name, enforced) in [("allow", true), ("auto", settings.enabled)] {
            let Some((entries, traffic)) = hits.get(name) else {
                if name == "allow" {
                    lists.push(IntelListView {
                        name: name.into(),
                        on: true,
                        enforced: true,
                        ..IntelListView::default()
                    });
                }
                continue;
            };
            lists.push(IntelListView {
                name: name.into(),
                on: true,
                enforced,
                entries: *entries as u64,
                hits: *traffic,
                ..IntelListView::default()
            });
        }
        Ok(IntelStatus {
            enabled: settings.enabled,
            lists,
        })
    }

    /// Puts the kernel's `tor` and `vpn` lists in line with the stored settings and lists (at
    /// start; nothing is written when they match, and nothing at all before IP intelligence
    /// was first configured).
    pub fn reconcile(&self) -> Result<(), ServiceError> {
        if self
            .core
            .store
            .get::<IntelSettings>(Cf::Blocklists, keys::INTEL_SETTINGS)?
            .is_none()
        {
            return Ok(());
        }
        let _w = self.core.writer.lock().unwrap();
        let settings = self.settings();
        let mut changed = false;
        for c in Category::ALL {
            let want = if settings.enforced(c) {
                self.stored_list(c)?
            } else {
                Vec::new()
            };
            changed |= self.write_kernel(c, &want)?;
        }
        if changed {
            let mut batch = Batch::default();
            self.lists.stage_snapshot(&mut batch)?;
            let w = self.core.store.write(batch)?;
            self.core.store.sync(w)?;
        }
        Ok(())
    }

    /// Makes the kernel list of `c` hold `want` (sorted, unique); true if it was written.
    fn write_kernel(&self, c: Category, want: &[Cidr]) -> Result<bool, ServiceError> {
        let name = c.list();
        let mut have = self.core.plane.list_cidrs(Direction::Source, &name);
        if let Some(h) = &mut have {
            h.sort_unstable();
        }
        match have {
            None if want.is_empty() => Ok(false),
            Some(h) if h == want => Ok(false),
            _ => {
                self.core
                    .plane
                    .list_op(Direction::Source, &name, ListOp::Replace(want))?;
                Ok(true)
            }
        }
    }

    /// Turns IP intelligence on or off (see the module docs for what that enforces).
    pub fn set_enabled(&self, actor: &Actor, enabled: bool) -> Result<IntelStatus, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let mut new = self.settings();
        new.enabled = enabled;
        let action = if enabled {
            "ip-intel.enable"
        } else {
            "ip-intel.disable"
        };
        self.commit(actor, action, new, None)?;
        drop(_w);
        if enabled {
            // Lists may have aged while off: reload them soon.
            self.schedule_all_soon();
        }
        self.status()
    }

    /// Sets a category's source and turns it on, or turns it off. A new source is loaded
    /// first: a bad list (or an unreachable source) changes nothing.
    pub fn set_source(
        &self,
        actor: &Actor,
        c: Category,
        change: SourceChange,
    ) -> Result<IntelStatus, ServiceError> {
        let old = self.settings();
        let mut new = old.clone();
        let mut loaded = None;
        let mut error = None;
        match &change {
            SourceChange::Off => new.category_mut(c).on = false,
            SourceChange::On {
                source,
                refresh,
                allow_private,
            } => {
                if let Some(r) = refresh
                    && (*r < MIN_REFRESH || *r > MAX_REFRESH)
                {
                    return Err(ValidationError::Value {
                        field: "refresh",
                        reason: format!(
                            "{} s: must be between {} s and {} s",
                            r.as_secs(),
                            MIN_REFRESH.as_secs(),
                            MAX_REFRESH.as_secs()
                        ),
                    }
                    .into());
                }
                let cs = new.category_mut(c);
                cs.on = true;
                if let Some(r) = refresh {
                    cs.refresh_secs = r.as_secs();
                }
                if let Some(s) = source {
                    s.validate()?;
                    cs.source = Some(s.clone());
                    cs.allow_private = *allow_private;
                    loaded = Some(load(s, *allow_private).map_err(|e| e.into_service(s.kind()))?);
                } else if *allow_private {
                    cs.allow_private = true;
                }
                if source.is_none()
                    && new.enabled
                    && let Some(s) = new.category(c).source.clone()
                {
                    // Turning on with the configured source: load it now; if it cannot be
                    // read, the last good list (if any) is enforced and the error shown.
                    match load(&s, new.category(c).allow_private) {
                        Ok(l) => loaded = Some(l),
                        Err(e) if self.meta(c)?.loaded_at > 0 => {
                            error = Some(e.into_service(s.kind()).to_string());
                        }
                        Err(e) => return Err(e.into_service(s.kind())),
                    }
                }
            }
        }
        let _w = self.core.writer.lock().unwrap();
        if self.settings() != old {
            // Changed by another call while the source loaded: start over on the new state.
            drop(_w);
            return self.set_source(actor, c, change);
        }
        let action = match (&change, c) {
            (SourceChange::Off, Category::Tor) => "ip-intel.unblock-tor",
            (SourceChange::Off, Category::Vpn) => "ip-intel.unblock-vpn",
            (SourceChange::On { .. }, Category::Tor) => "ip-intel.block-tor",
            (SourceChange::On { .. }, Category::Vpn) => "ip-intel.block-vpn",
        };
        let sig = loaded.as_ref().and_then(|l| l.sig);
        let loaded_now = loaded.is_some();
        self.commit(actor, action, new.clone(), loaded.map(|l| (c, l.cidrs)))?;
        drop(_w);
        {
            let mut rt = self.runtime.lock().unwrap();
            let r = &mut rt[c.index()];
            if loaded_now {
                r.last_error = None;
                r.file_sig = sig;
            }
            if let Some(e) = error {
                r.last_error = Some((now(), e));
            }
            schedule(r, new.category(c).refresh());
        }
        self.wake.notify_one();
        self.status()
    }

    /// Reloads `c` from its source now: a list that does not parse (or a source that cannot be
    /// read) changes nothing, and the error is kept for `ip-intel list`.
    pub fn refresh(&self, actor: &Actor, c: Category) -> Result<IntelStatus, ServiceError> {
        let settings = self.settings();
        let cs = settings.category(c).clone();
        let Some(source) = cs.source.clone() else {
            return Err(ServiceError::SourceUnavailable {
                field: "category",
                reason: format!(
                    "{c} has no source: give one with ip-intel block-{c} --file or --url"
                ),
            });
        };
        let result = load(&source, cs.allow_private);
        let outcome = match result {
            Err(e) => {
                let err = e.into_service(source.kind());
                let mut rt = self.runtime.lock().unwrap();
                let r = &mut rt[c.index()];
                r.last_error = Some((now(), err.to_string()));
                if let Source::File(p) = &source {
                    r.file_sig = FileSig::of(p);
                }
                schedule(r, cs.refresh().min(RETRY_AFTER));
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(list = c.name(), error = %err, "IP intelligence list not reloaded; the old list stays");
                Err(err)
            }
            Ok(l) => {
                let _w = self.core.writer.lock().unwrap();
                if self.settings().category(c).source.as_ref() != Some(&source) {
                    // The source changed meanwhile; that change loaded its own list.
                    return self.status();
                }
                if l.cidrs == self.stored_list(c)? {
                    self.core.store.put(
                        Cf::Blocklists,
                        &keys::intel_meta(c.name()),
                        &ListMeta {
                            loaded_at: now(),
                            entries: l.cidrs.len() as u64,
                        },
                    )?;
                } else {
                    self.commit(
                        actor,
                        "ip-intel.refresh",
                        self.settings(),
                        Some((c, l.cidrs)),
                    )?;
                }
                drop(_w);
                let mut rt = self.runtime.lock().unwrap();
                let r = &mut rt[c.index()];
                r.last_error = None;
                r.file_sig = l.sig;
                schedule(r, cs.refresh());
                Ok(())
            }
        };
        outcome?;
        self.status()
    }

    /// Adds CIDRs to the `allow` source list, or removes them.
    pub fn allow(
        &self,
        actor: &Actor,
        cidrs: &[Cidr],
        remove: bool,
    ) -> Result<IntelStatus, ServiceError> {
        if cidrs.is_empty() {
            return Err(ValidationError::Missing { field: "cidrs" }.into());
        }
        let op = if remove {
            EntriesOp::Remove
        } else {
            EntriesOp::Add
        };
        let allow = ListName::parse("allow").expect("a list name");
        self.lists
            .change_entries(actor, Direction::Source, &allow, op, cidrs)?;
        self.status()
    }

    /// Writes `new` (and `c`'s newly loaded list) to the kernel, then the store with an audit
    /// record, in one batch; undoes the kernel on a failed commit. Under the writer lock.
    fn commit(
        &self,
        actor: &Actor,
        action: &str,
        new: IntelSettings,
        loaded: Option<(Category, Vec<Cidr>)>,
    ) -> Result<(), ServiceError> {
        let old = self.settings();
        let mut before_entries = BTreeMap::new();
        let mut after_entries = BTreeMap::new();
        let mut undo: Vec<(Category, Vec<Cidr>)> = Vec::new();
        let mut result = Ok(());
        for c in Category::ALL {
            let fresh = loaded.as_ref().filter(|(lc, _)| *lc == c).map(|(_, l)| l);
            if new.enforced(c) == old.enforced(c) && fresh.is_none() {
                continue;
            }
            let want = match (new.enforced(c), fresh) {
                (false, _) => Vec::new(),
                (true, Some(l)) => l.clone(),
                (true, None) => self.stored_list(c)?,
            };
            if let Some(l) = fresh {
                before_entries.insert(c.name(), self.meta(c)?.entries as usize);
                after_entries.insert(c.name(), l.len());
            }
            let had = self
                .core
                .plane
                .list_cidrs(Direction::Source, &c.list())
                .unwrap_or_default();
            match self.write_kernel(c, &want) {
                Ok(true) => undo.push((c, had)),
                Ok(false) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let written = result.and_then(|()| {
            let mut batch = Batch::default();
            batch.put(Cf::Blocklists, keys::INTEL_SETTINGS, &new)?;
            if let Some((c, l)) = &loaded {
                batch.put(Cf::Blocklists, &keys::intel_list(c.name()), l)?;
                batch.put(
                    Cf::Blocklists,
                    &keys::intel_meta(c.name()),
                    &ListMeta {
                        loaded_at: now(),
                        entries: l.len() as u64,
                    },
                )?;
            }
            self.lists.stage_snapshot(&mut batch)?;
            self.core.audit(
                &mut batch,
                actor,
                action,
                "ip-intel".into(),
                to_json(&AuditView {
                    settings: &old,
                    entries: before_entries,
                }),
                to_json(&AuditView {
                    settings: &new,
                    entries: after_entries,
                }),
            )?;
            self.core.commit(batch)
        });
        if let Err(e) = written {
            for (c, had) in undo {
                if let Err(u) =
                    self.core
                        .plane
                        .list_op(Direction::Source, &c.list(), ListOp::Replace(&had))
                {
                    tracing::error!(list = c.name(), error = %u, "cannot undo an IP intelligence list change after a failed commit");
                }
            }
            return Err(e);
        }
        self.enabled.store(new.enabled, Ordering::Relaxed);
        *self.settings.lock().unwrap() = new;
        Ok(())
    }

    fn schedule_all_soon(&self) {
        let mut rt = self.runtime.lock().unwrap();
        for r in rt.iter_mut() {
            schedule(r, Duration::from_secs(1));
        }
        drop(rt);
        self.wake.notify_one();
    }
}

/// `d` moved by up to ±[`JITTER_PERCENT`] % at random.
pub fn jittered(d: Duration) -> Duration {
    let span = d.as_millis() as u64 * JITTER_PERCENT / 100;
    if span == 0 {
        return d;
    }
    let off = rand::random_range(0..=2 * span);
    (d + Duration::from_millis(off)).saturating_sub(Duration::from_millis(span))
}

/// Sets `r`'s next reload `after` from now (jittered).
fn schedule(r: &mut Runtime, after: Duration) {
    let after = jittered(after);
    r.due = Some(Instant::now() + after);
    r.due_unix = now() + after.as_secs();
}

#[cfg(test)]
mod tests;
