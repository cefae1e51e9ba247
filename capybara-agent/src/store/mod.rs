//! The embedded store: the only code that touches RocksDB.
//!
//! Layout: one column family per kind of record ([`Cf`]), each with its own schema version kept
//! in the `meta` family under `schema/<cf>`. Values are JSON (serde), small and readable with
//! `ldb` when debugging, except the usage rollups (`usage`: fixed-size binary records, read by
//! the million for a report; [`Batch::put_raw`], [`Store::walk_raw`]), which backups leave out
//! (derived statistics, see [`backup`]); keys are UTF-8 strings built by the functions of [`keys`]. Column
//! families and key shapes are declared here and nowhere else.
//!
//! | family | key ([`keys`]) | value |
//! |---|---|---|
//! | `meta` | `schema/<cf>` | schema version (`u32`) |
//! | `blocklists` | `registry` | the blocklist registry snapshot |
//! | `blocklists` | `geo-policy` | the geo policy (mode and countries) |
//! | `users` | `<user>` | a user |
//! | `peers` | `<user>/<device>` | a device (WireGuard peer) of that user |
//! | `groups` | `<group>` | a group: members, policy, shared pool |
//! | `policy` | `user/<user>` | a user's own limits (`service::policy`) |
//! | `policy` | `default` | the server default limits |
//! | `policy` | `qtemplate/<name>` | a quota template (`service::policy::template`) |
//! | `policy` | `ctemplate/<name>` | a configuration template |
//! | `policy` | `settings` | the server settings the last configuration template set |
//! | `policy` | `bucket/<owner>` | a quota bucket's id and the period it was last reset for |
//! | `policy` | `online/<user>` | a user's online time on its current local day (`--time`) |
//! | `policy` | `server/api-access` | where the TCP API listens (`capybara api enable`; `service::access`) |
//! | `tokens` | `<token id>` | an API token: its SHA-256 hash, never the secret |
//! | `sessions` | `session/<start ns, 20 digits>/<peer id, 10 digits>` | a tunnel session |
//! | `sessions` | `auth/<ns, 20 digits>/<n, 6 digits>` | a failed handshake (auth attempt) |
//! | `audit` | `<sequence, 20 digits>` | an audit record; the zero-padded sequence sorts by time |
//! | `schedules` | `next-id` | the id the next scheduled task gets |
//! | `schedules` | `task/<id, 20 digits>` | a scheduled task (`service::schedules`) |
//! | `schedules` | `run/<task id, 20 digits>/<run, 20 digits>` | one run of a task: start, end, status, output (the newest `MAX_RUNS_KEPT` kept) |
//! | `usage` | `h/<hour, 10 digits>/<user>/<device>` | a device's usage in one UTC hour (binary, `service::usage`) |
//! | `usage` | `d/<day, 8 digits>/<user>/<device>` | a device's usage in one UTC day: the sum of its completed hours (binary) |
//! | `usage` | `c/<peer id, 10 digits>` | the usage writer's checkpoint of one device: its counters then (JSON) |
//! | `usage` | `m/checkpoint` | the hour of the writer's last checkpoint and its last completed hour (JSON) |
//! | `outbox` | `<sequence, 20 digits>` | a webhook event waiting for its endpoints (`service::webhooks`) |
//! | `webhooks` | `hook/<id>` | a webhook endpoint (its secret sealed when the store has a sealer) |
//! | `webhooks` | `cursor/<id>` | the outbox sequence an endpoint delivered or dead-lettered up to |
//! | `webhooks` | `dlv/<id>/<sequence, 20 digits>` | one event's delivery to one endpoint: attempts, status, error |
//! | `webhooks` | `dead/<id>/<sequence, 20 digits>` | a dead letter: the event itself, for `webhook retry` |
//! | `proxies` | `<user>/<protocol>` | a user's proxy identity (`shadowsocks`, `vless`): its id and credential (`service::proxies`) |
//!
//! The outbox's keys are assigned by the store when a batch holding outbox events
//! ([`Batch::append_outbox`]) is written, under one lock, so they become visible in sequence
//! order with no gap a reader could skip (see [`Store::write`]).
//!
//! A user and its devices share the key prefix `<user>` in two families, so "a user's devices"
//! is a prefix scan of `peers` with `<user>/` ([`keys::user_peers_prefix`]).
//!
//! Durability (group commit): a write is in the WAL — in the kernel's page cache, so it
//! survives the agent being killed — when [`Store::write`] returns, and on disk (surviving power
//! loss) once a WAL sync covers it. [`Store::commit`] waits for that; [`Store::write`] lets a
//! caller that holds a lock release it first and then [`Store::sync`]. Writers waiting at the
//! same time share one fsync: whoever finds no sync running syncs everything written so far
//! and wakes the others. Measured with the `api_load` benchmark (500 calls/s, 30 s, this
//! machine kind, fdatasync p50 2.5 ms / p99 10 ms): with one synced write per mutation behind
//! the service's writer lock, write calls queued behind each other's fsyncs (p99 of all calls
//! 2.9 s on a quiet machine); with group commit p99 383 ms while other builds loaded both cores
//! (load average 5). Multi-key
//! changes go through one [`Batch`], which RocksDB applies atomically.
//!
//! Backups ([`backup`]): every family through one read snapshot into one JSON file; restore
//! replaces a stopped agent's store in one batch.
//!
//! Timing: an observer set once with [`Store::observe_writes`] (the agent's metrics) is told how
//! long each batch write and each WAL sync took ([`WriteTimer`]); without one nothing is timed.
//!
//! RocksDB itself is Debian's librocksdb 7.8.3, linked through the `rocksdb` crate 0.20.1 (see
//! `.cargo/config.toml` for why: 27 s instead of 10 min for a clean build on 2 cores).

use std::{
    cell::Cell,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};
use serde::{Serialize, de::DeserializeOwned};

use crate::paths;

pub mod backup;
pub mod page;
pub mod shared;
mod walk;

pub use shared::{Replicator, SharedError, SharedOp};
pub use walk::Walk;

/// Column families. Adding one appends a variant and a schema version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cf {
    /// Store metadata: schema versions.
    Meta,
    /// Named blocklists (registry snapshot per direction).
    Blocklists,
    /// Users.
    Users,
    /// Devices (WireGuard peers), keyed under their user.
    Peers,
    /// Groups of users.
    Groups,
    /// API tokens (hashes only).
    Tokens,
    /// Tunnel sessions.
    Sessions,
    /// The audit trail of every mutation.
    Audit,
    /// Policy layers of users and the server, quota bucket assignments.
    Policy,
    /// Scheduled tasks and their runs (`service::schedules`).
    Schedules,
    /// Hourly and daily usage rollups per device (binary values).
    Usage,
    /// Webhook events waiting for delivery, keyed by their sequence number.
    Outbox,
    /// Webhook endpoints, their cursors, delivery records and dead letters.
    Webhooks,
    /// Proxy identities (Shadowsocks, VLESS), keyed under their user (`service::proxies`).
    Proxies,
}

impl Cf {
    /// Every family, in creation order.
    pub const ALL: [Cf; 14] = [
        Cf::Meta,
        Cf::Blocklists,
        Cf::Users,
        Cf::Peers,
        Cf::Groups,
        Cf::Tokens,
        Cf::Sessions,
        Cf::Audit,
        Cf::Policy,
        Cf::Schedules,
        Cf::Usage,
        Cf::Outbox,
        Cf::Webhooks,
        Cf::Proxies,
    ];

    /// The family's name in RocksDB.
    pub const fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Blocklists => "blocklists",
            Cf::Users => "users",
            Cf::Peers => "peers",
            Cf::Groups => "groups",
            Cf::Tokens => "tokens",
            Cf::Sessions => "sessions",
            Cf::Audit => "audit",
            Cf::Policy => "policy",
            Cf::Schedules => "schedules",
            Cf::Usage => "usage",
            Cf::Outbox => "outbox",
            Cf::Webhooks => "webhooks",
            Cf::Proxies => "proxies",
        }
    }

    /// The family named `name` in RocksDB.
    pub fn from_name(name: &str) -> Option<Cf> {
        Cf::ALL.into_iter().find(|cf| cf.name() == name)
    }

    /// Current schema version of the family's values.
    pub const fn schema_version(self) -> u32 {
        match self {
            Cf::Meta
            | Cf::Blocklists
            | Cf::Users
            | Cf::Peers
            | Cf::Groups
            | Cf::Tokens
            | Cf::Sessions
            | Cf::Audit
            | Cf::Policy
            | Cf::Schedules
            | Cf::Usage
            | Cf::Outbox
            | Cf::Webhooks
            | Cf::Proxies => 1,
        }
    }
}

/// Every key shape of every family (see the table in the module docs).
pub mod keys {
    /// Key of the blocklist registry snapshot in `blocklists`.
    pub const BLOCKLISTS: &str = "registry";

    /// Key of the geo policy in `blocklists`.
    pub const GEO_POLICY: &str = "geo-policy";

    /// Key of the country database `capybara geo update` loaded (its path), in `blocklists`.
    pub const GEO_DB: &str = "geo-db";

    /// Key of IP intelligence's settings (switch, each category's source) in `blocklists`.
    pub const INTEL_SETTINGS: &str = "intel/settings";

    /// Key of the last good load of IP intelligence category `cat` (`tor`, `vpn`) in
    /// `blocklists`: its CIDRs, kept while the category is not enforced.
    pub fn intel_list(cat: &str) -> String {
        format!("intel/list/{cat}")
    }

    /// Key of when category `cat`'s source last loaded well, in `blocklists`.
    pub fn intel_meta(cat: &str) -> String {
        format!("intel/meta/{cat}")
    }

    /// Prefix of the reputation engine's auto-blocks (their expiries) in `blocklists`.
    pub const REPUTATION_BLOCKS_PREFIX: &str = "reputation/auto/";

    /// Key of the auto-block of source `ip` in `blocklists`.
    pub fn reputation_block(ip: &str) -> String {
        format!("{REPUTATION_BLOCKS_PREFIX}{ip}")
    }

    /// Key of the TCP API's setting (`capybara api enable`) in `policy`.
    pub const API_ACCESS: &str = "server/api-access";

    /// Key of a user's MFA record in `policy` (`service::mfa`).
    pub fn mfa_user(name: &str) -> String {
        format!("{MFA_USERS}{name}")
    }

    /// Prefix of the MFA records in `policy`.
    pub const MFA_USERS: &str = "mfa/user/";

    /// Key of the MFA settings (`mfa require-all`) in `policy`.
    pub const MFA_SETTINGS: &str = "mfa/settings";

    /// Key of the next scheduled task id in `schedules`.
    pub const SCHEDULE_NEXT_ID: &str = "next-id";

    /// Key of scheduled task `id` in `schedules`.
    pub fn schedule(id: u64) -> String {
        format!("task/{id:020}")
    }

    /// Prefix of every scheduled task in `schedules`.
    pub const SCHEDULE_PREFIX: &str = "task/";

    /// Key of run `n` of scheduled task `id` in `schedules`.
    pub fn schedule_run(id: u64, n: u64) -> String {
        format!("run/{id:020}/{n:020}")
    }

    /// Prefix of every run of scheduled task `id` in `schedules`.
    pub fn schedule_runs_prefix(id: u64) -> String {
        format!("run/{id:020}/")
    }

    /// Key of user `name` in `users`.
    pub fn user(name: &str) -> String {
        name.to_owned()
    }

    /// Key of device `device` of user `user` in `peers`.
    pub fn peer(user: &str, device: &str) -> String {
        format!("{user}/{device}")
    }

    /// Prefix of every device of user `user` in `peers`.
    pub fn user_peers_prefix(user: &str) -> String {
        format!("{user}/")
    }

    /// Key of user `user`'s proxy identity for `protocol` in `proxies`.
    pub fn proxy(user: &str, protocol: &str) -> String {
        format!("{user}/{protocol}")
    }

    /// Prefix of every proxy identity of user `user` in `proxies`.
    pub fn user_proxies_prefix(user: &str) -> String {
        format!("{user}/")
    }

    /// Key of group `name` in `groups`.
    pub fn group(name: &str) -> String {
        name.to_owned()
    }

    /// Key of user `name`'s own limits in `policy`.
    pub fn policy_user(name: &str) -> String {
        format!("user/{name}")
    }

    /// Prefix of every user's limits in `policy`.
    pub const POLICY_USERS: &str = "user/";

    /// Key of the server default limits in `policy`.
    pub const POLICY_DEFAULT: &str = "default";

    /// Key of quota template `name` in `policy`.
    pub fn policy_quota_template(name: &str) -> String {
        format!("qtemplate/{name}")
    }

    /// Prefix of every quota template in `policy`.
    pub const POLICY_QUOTA_TEMPLATES: &str = "qtemplate/";

    /// Key of configuration template `name` in `policy`.
    pub fn policy_config_template(name: &str) -> String {
        format!("ctemplate/{name}")
    }

    /// Prefix of every configuration template in `policy`.
    pub const POLICY_CONFIG_TEMPLATES: &str = "ctemplate/";

    /// Key of the server settings in `policy`.
    pub const POLICY_SETTINGS: &str = "settings";

    /// Key of the quota bucket of `owner` (`user:<name>` or `group:<name>`) in `policy`.
    pub fn policy_bucket(owner: &str) -> String {
        format!("bucket/{owner}")
    }

    /// Prefix of every bucket record in `policy`.
    pub const POLICY_BUCKETS: &str = "bucket/";

    /// Key of user `name`'s online time of the day in `policy`.
    pub fn policy_online(name: &str) -> String {
        format!("online/{name}")
    }

    /// Prefix of every user's online time in `policy`.
    pub const POLICY_ONLINE: &str = "online/";

    /// Key of token `id` in `tokens`.
    pub fn token(id: &str) -> String {
        id.to_owned()
    }

    /// Prefix of every session in `sessions`.
    pub const SESSIONS_PREFIX: &str = "session/";

    /// Key of a session of peer `peer` started at `start_ns` (Unix nanoseconds) in `sessions`:
    /// sessions sort by start time.
    pub fn session(start_ns: u64, peer: u32) -> String {
        format!("session/{start_ns:020}/{peer:010}")
    }

    /// Prefix of every auth attempt in `sessions`.
    pub const AUTH_PREFIX: &str = "auth/";

    /// Key of the `n`-th auth attempt at `at_ns` (Unix nanoseconds) in `sessions`.
    pub fn auth_attempt(at_ns: u64, n: u32) -> String {
        format!("auth/{at_ns:020}/{n:06}")
    }

    /// Key of audit record `seq` in `audit`: zero-padded so keys sort by sequence.
    pub fn audit(seq: u64) -> String {
        format!("{seq:020}")
    }

    /// The sequence number of an audit key.
    pub fn audit_seq(key: &str) -> Option<u64> {
        key.parse().ok()
    }

    /// Prefix of every hourly usage record in `usage`.
    pub const USAGE_HOURS: &str = "h/";

    /// Prefix of the hourly usage records of UTC hour `hour` (Unix seconds / 3600).
    pub fn usage_hour_prefix(hour: u64) -> String {
        format!("h/{hour:010}/")
    }

    /// Key of device `device` of `user`'s usage in UTC hour `hour`: sorted by hour, then device.
    pub fn usage_hour(hour: u64, user: &str, device: &str) -> String {
        format!("h/{hour:010}/{user}/{device}")
    }

    /// Prefix of every daily usage record in `usage`.
    pub const USAGE_DAYS: &str = "d/";

    /// Prefix of the daily usage records of UTC day `day` (Unix seconds / 86 400).
    pub fn usage_day_prefix(day: u64) -> String {
        format!("d/{day:08}/")
    }

    /// Key of device `device` of `user`'s usage in UTC day `day`.
    pub fn usage_day(day: u64, user: &str, device: &str) -> String {
        format!("d/{day:08}/{user}/{device}")
    }

    /// Prefix of every usage checkpoint of a device in `usage`.
    pub const USAGE_CURSORS: &str = "c/";

    /// Key of the usage writer's checkpoint of peer `peer`.
    pub fn usage_cursor(peer: u32) -> String {
        format!("c/{peer:010}")
    }

    /// Key of the usage writer's own state in `usage`.
    pub const USAGE_META: &str = "m/checkpoint";
    /// Key of outbox event `seq` in `outbox`: zero-padded so keys sort by sequence.
    pub fn outbox(seq: u64) -> String {
        format!("{seq:020}")
    }

    /// The sequence number of an outbox key.
    pub fn outbox_seq(key: &str) -> Option<u64> {
        key.parse().ok()
    }

    /// Prefix of every webhook endpoint in `webhooks`.
    pub const WEBHOOKS: &str = "hook/";

    /// Key of webhook endpoint `id` in `webhooks`.
    pub fn webhook(id: &str) -> String {
        format!("hook/{id}")
    }

    /// Key of webhook `id`'s cursor in `webhooks`.
    pub fn webhook_cursor(id: &str) -> String {
        format!("cursor/{id}")
    }

    /// Prefix of webhook `id`'s delivery records in `webhooks`.
    pub fn webhook_deliveries(id: &str) -> String {
        format!("dlv/{id}/")
    }

    /// Key of the delivery of outbox event `seq` to webhook `id` in `webhooks`.
    pub fn webhook_delivery(id: &str, seq: u64) -> String {
        format!("dlv/{id}/{seq:020}")
    }

    /// Prefix of webhook `id`'s dead letters in `webhooks`.
    pub fn webhook_dead_letters(id: &str) -> String {
        format!("dead/{id}/")
    }

    /// Key of the dead letter of outbox event `seq` for webhook `id` in `webhooks`.
    pub fn webhook_dead(id: &str, seq: u64) -> String {
        format!("dead/{id}/{seq:020}")
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created or given its mode.
    #[error("cannot prepare data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// RocksDB failed to open the database.
    #[error("cannot open the store at {path}")]
    Open {
        /// The database directory.
        path: PathBuf,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// A family's data was written by a newer schema than this agent knows.
    #[error("column family {cf} has schema version {found}, this agent knows up to {known}")]
    SchemaTooNew {
        /// The family.
        cf: &'static str,
        /// Version on disk.
        found: u32,
        /// Version this build writes.
        known: u32,
    },
    /// A read or write failed.
    #[error("store {op} failed in {cf} for key {key:?}")]
    Io {
        /// `get`, `put`, `delete` or `commit`.
        op: &'static str,
        /// The family.
        cf: &'static str,
        /// The key (empty for a batch commit).
        key: String,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// A stored value did not decode.
    #[error("stored value in {cf} for key {key:?} is corrupt")]
    Decode {
        /// The family.
        cf: &'static str,
        /// The key.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A value did not encode (a bug: every stored type is serializable).
    #[error("cannot encode value for {cf} key {key:?}")]
    Encode {
        /// The family.
        cf: &'static str,
        /// The key.
        key: String,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The cluster refused a change of shared keys (`shared`); nothing was written.
    #[error(transparent)]
    Shared(#[from] SharedError),
}

/// The open store.
pub struct Store {
    db: DB,
    path: PathBuf,
    /// Group-commit bookkeeping (see the module docs).
    wal: Mutex<WalState>,
    /// Signalled when a WAL sync finishes.
    synced: Condvar,
    /// This store's id in the process (for [`LAST_WRITE`]).
    id: u64,
    /// Told how long writes and syncs take, once set ([`Store::observe_writes`]).
    timer: OnceLock<Arc<dyn WriteTimer>>,
    /// The next outbox sequence number; held while a batch with outbox events is written.
    outbox_next: Mutex<u64>,
    /// Every outbox key below this value is written (readers wait on it).
    outbox_end: tokio::sync::watch::Sender<u64>,
    /// Where writes of shared keys go first, once set (`shared`).
    replicator: OnceLock<Arc<dyn Replicator>>,
    /// The last shared revision applied; held across a shared write (`shared`).
    shared_rev: Mutex<i64>,
    /// The same, for readers that must not wait for that lock.
    shared_applied: std::sync::atomic::AtomicI64,
}

/// What a [`WriteTimer`] is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// One batch applied to RocksDB (memtable and WAL, no fsync): [`Store::write`].
    Write,
    /// One WAL fsync, shared by every writer waiting for it: [`Store::sync`].
    Sync,
}

impl StoreOp {
    /// `write` or `sync`.
    pub fn name(self) -> &'static str {
        match self {
            StoreOp::Write => "write",
            StoreOp::Sync => "sync",
        }
    }
}

/// Told how long each store write and WAL sync took. Called on the writer's thread, after the
/// store's own locks are released: it must be cheap (a histogram observation).
pub trait WriteTimer: Send + Sync {
    /// `op` took `elapsed`.
    fn observe(&self, op: StoreOp, elapsed: Duration);
}

/// Writes and syncs, counted. A sync that starts after write `n` returned covers it.
#[derive(Debug, Default)]
struct WalState {
    /// Writes that returned.
    written: u64,
    /// Every write up to this one is on disk.
    synced: u64,
    /// A sync is running.
    syncing: bool,
    /// WAL syncs done.
    syncs: u64,
}

/// What [`Store::write`] returns: the position to [`Store::sync`] through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a write is on disk only after a sync through it"]
pub struct Written(u64);

thread_local! {
    /// The last write this thread made through [`Store::write`]: the store's [`Store::id`] and
    /// the write's position (for [`Store::sync_mine`]).
    static LAST_WRITE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Hands every opened store its own id (a thread-local position means nothing to another
/// store: a stale one from a store opened earlier in the process made a sync wait for writes
/// that never come).
static NEXT_STORE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A set of changes applied atomically by [`Store::commit`].
#[derive(Default)]
pub struct Batch {
    ops: Vec<(Cf, String, Option<Vec<u8>>)>,
    /// Outbox events, keyed when the batch is written.
    outbox: Vec<Vec<u8>>,
}

impl Batch {
    /// Stages `value` under `key` in `cf`.
    pub fn put<T: Serialize>(&mut self, cf: Cf, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Encode {
            cf: cf.name(),
            key: key.to_owned(),
            source,
        })?;
        self.ops.push((cf, key.to_owned(), Some(bytes)));
        Ok(())
    }

    /// Stages `bytes` as they are under `key` in `cf` (binary records: the `usage` family).
    pub fn put_raw(&mut self, cf: Cf, key: &str, bytes: Vec<u8>) {
        self.ops.push((cf, key.to_owned(), Some(bytes)));
    }

    /// Changes staged.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Stages the removal of `key` in `cf`.
    pub fn delete(&mut self, cf: Cf, key: &str) {
        self.ops.push((cf, key.to_owned(), None));
    }

    /// Stages `value` as the next event of the `outbox` family: its key (the next outbox
    /// sequence number) is assigned when the batch is written ([`Store::write`]).
    pub fn append_outbox<T: Serialize>(&mut self, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Encode {
            cf: Cf::Outbox.name(),
            key: "(next)".to_owned(),
            source,
        })?;
        self.outbox.push(bytes);
        Ok(())
    }

    /// Outbox events staged in this batch.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir/store`; `data_dir` is made mode 0700.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        paths::ensure_data_dir(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(paths::STORE_SUBDIR);
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), Options::default()));
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let mut store = Store {
            db,
            path,
            wal: Mutex::new(WalState::default()),
            synced: Condvar::new(),
            id: NEXT_STORE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            timer: OnceLock::new(),
            outbox_next: Mutex::new(1),
            outbox_end: tokio::sync::watch::Sender::new(1),
            replicator: OnceLock::new(),
            shared_rev: Mutex::new(0),
            shared_applied: std::sync::atomic::AtomicI64::new(0),
        };
        store.check_schemas()?;
        let revision = store.stored_revision()?;
        *store
            .shared_rev
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = revision;
        *store.shared_applied.get_mut() = revision;
        let next = store
            .last_key(Cf::Outbox)?
            .and_then(|k| keys::outbox_seq(&k))
            .map_or(1, |s| s + 1);
        *store
            .outbox_next
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = next;
        store.outbox_end.send_replace(next);
        Ok(store)
    }

    /// Tells `timer` how long every later write and WAL sync takes. Only the first timer set is
    /// kept; answers whether this one was.
    pub fn observe_writes(&self, timer: Arc<dyn WriteTimer>) -> bool {
        self.timer.set(timer).is_ok()
    }

    /// The time since `started`, told to the timer if there is one.
    fn timed(&self, op: StoreOp, started: Option<Instant>) {
        if let (Some(t), Some(started)) = (self.timer.get(), started) {
            t.observe(op, started.elapsed());
        }
    }

    /// Records each family's schema version, refusing data written by a newer schema.
    fn check_schemas(&self) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for cf in Cf::ALL {
            let key = format!("schema/{}", cf.name());
            match self.get::<u32>(Cf::Meta, &key)? {
                Some(found) if found > cf.schema_version() => {
                    return Err(StoreError::SchemaTooNew {
                        cf: cf.name(),
                        found,
                        known: cf.schema_version(),
                    });
                }
                Some(found) if found == cf.schema_version() => {}
                _ => batch.put(Cf::Meta, &key, &cf.schema_version())?,
            }
        }
        self.commit(batch)
    }

    fn handle(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every family in `Cf::ALL` is created by `open`.
        self.db
            .cf_handle(cf.name())
            .expect("column family created at open")
    }

    /// Reads the value under `key` in `cf`.
    pub fn get<T: DeserializeOwned>(&self, cf: Cf, key: &str) -> Result<Option<T>, StoreError> {
        let raw = self
            .db
            .get_pinned_cf(self.handle(cf), key)
            .map_err(|source| StoreError::Io {
                op: "get",
                cf: cf.name(),
                key: key.to_owned(),
                source,
            })?;
        raw.map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode {
                cf: cf.name(),
                key: key.to_owned(),
                source,
            })
        })
        .transpose()
    }

    /// Writes `value` under `key` in `cf`, durably.
    pub fn put<T: Serialize>(&self, cf: Cf, key: &str, value: &T) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.put(cf, key, value)?;
        self.commit(batch)
    }

    /// Applies every change in `batch` atomically and durably (on disk when this returns).
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let written = self.write(batch)?;
        self.sync(written)
    }

    /// Applies every change in `batch` atomically; it survives the agent being killed when this
    /// returns and power loss after [`Store::sync`] through the returned position.
    ///
    /// A batch with outbox events ([`Batch::append_outbox`]) gets the next outbox sequence
    /// numbers as their keys, assigned and written under one lock: outbox keys become visible
    /// in order, so a reader that saw key `n` never later finds a key below `n` appear.
    pub fn write(&self, batch: Batch) -> Result<Written, StoreError> {
        self.write_appending(batch).map(|(w, _)| w)
    }

    /// [`Store::write`], answering also the outbox sequence numbers its events got (an empty
    /// range for none).
    pub fn write_appending(
        &self,
        batch: Batch,
    ) -> Result<(Written, std::ops::Range<u64>), StoreError> {
        if batch.ops.is_empty() && batch.outbox.is_empty() {
            return Ok((Written(0), 0..0));
        }
        let mut batch = batch;
        // A batch with shared keys goes to the cluster first (`shared`).
        let shared = self.replicate(&mut batch)?;
        let started = self.timer.get().map(|_| Instant::now());
        let mut wb = WriteBatch::default();
        for (cf, key, value) in &batch.ops {
            match value {
                Some(v) => wb.put_cf(self.handle(*cf), key, v),
                None => wb.delete_cf(self.handle(*cf), key),
            }
        }
        let write = |wb| {
            self.db
                .write_opt(wb, &WriteOptions::default())
                .map_err(|source| StoreError::Io {
                    op: "commit",
                    cf: "batch",
                    key: String::new(),
                    source,
                })
        };
        let mut appended = 0..0;
        if batch.outbox.is_empty() {
            write(wb)?;
        } else {
            let mut next = self.outbox_next.lock().unwrap_or_else(|e| e.into_inner());
            let first = *next;
            for (i, v) in batch.outbox.iter().enumerate() {
                wb.put_cf(self.handle(Cf::Outbox), keys::outbox(first + i as u64), v);
            }
            write(wb)?;
            *next = first + batch.outbox.len() as u64;
            appended = first..*next;
            self.outbox_end.send_replace(*next);
        }
        if let Some((mut applied, revision)) = shared {
            self.set_applied(&mut applied, revision);
        }
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        wal.written += 1;
        let n = wal.written;
        drop(wal);
        LAST_WRITE.with(|w| w.set((self.id, n)));
        self.timed(StoreOp::Write, started);
        Ok((Written(n), appended))
    }

    /// A receiver of the outbox's end: every outbox key below its value is written.
    pub fn outbox_end(&self) -> tokio::sync::watch::Receiver<u64> {
        self.outbox_end.subscribe()
    }

    /// Deletes every key of `cf` in `from..to` (a range tombstone: one write, whatever the
    /// number of keys).
    pub fn delete_range(&self, cf: Cf, from: &str, to: &str) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        wb.delete_range_cf(self.handle(cf), from, to);
        self.db
            .write_opt(wb, &WriteOptions::default())
            .map_err(|source| StoreError::Io {
                op: "delete range",
                cf: cf.name(),
                key: from.to_owned(),
                source,
            })
    }

    /// The first key of `cf` at or after `from` and its value, if any.
    pub fn first_from<T: DeserializeOwned>(
        &self,
        cf: Cf,
        from: &str,
    ) -> Result<Option<(String, T)>, StoreError> {
        Ok(self.range(cf, from, None, 1)?.into_iter().next())
    }

    /// Up to `limit` `(key, value)`s of `cf` from `from` (inclusive) to `to` (exclusive; `None`:
    /// the family's end), in key order.
    pub fn range<T: DeserializeOwned>(
        &self,
        cf: Cf,
        from: &str,
        to: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mode = rocksdb::IteratorMode::From(from.as_bytes(), rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.handle(cf), mode) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|source| StoreError::Io {
                op: "scan",
                cf: cf.name(),
                key: from.to_owned(),
                source,
            })?;
            if to.is_some_and(|to| &*k >= to.as_bytes()) {
                break;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            let value = serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                cf: cf.name(),
                key: key.clone(),
                source,
            })?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// The number of keys of `cf` in `from..to` (counted by iterating: for bounded ranges).
    pub fn count_range(&self, cf: Cf, from: &str, to: &str) -> Result<u64, StoreError> {
        let mode = rocksdb::IteratorMode::From(from.as_bytes(), rocksdb::Direction::Forward);
        let mut n = 0;
        for item in self.db.iterator_cf(self.handle(cf), mode) {
            let (k, _) = item.map_err(|source| StoreError::Io {
                op: "scan",
                cf: cf.name(),
                key: from.to_owned(),
                source,
            })?;
            if &*k >= to.as_bytes() {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Waits until every write up to `through` is on disk, syncing the WAL if no sync that
    /// covers it is running (one fsync for every writer waiting meanwhile).
    pub fn sync(&self, through: Written) -> Result<(), StoreError> {
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        // Nothing past what was written can be waited for.
        let through = through.0.min(wal.written);
        loop {
            if wal.synced >= through {
                return Ok(());
            }
            if wal.syncing {
                wal = self.synced.wait(wal).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            wal.syncing = true;
            let target = wal.written;
            drop(wal);
            let started = self.timer.get().map(|_| Instant::now());
            let result = self.db.flush_wal(true);
            self.timed(StoreOp::Sync, started);
            wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
            wal.syncing = false;
            if result.is_ok() {
                wal.synced = wal.synced.max(target);
                wal.syncs += 1;
            }
            self.synced.notify_all();
            result.map_err(|source| StoreError::Io {
                op: "sync WAL",
                cf: "batch",
                key: String::new(),
                source,
            })?;
        }
    }

    /// WAL syncs done since the store was opened.
    pub fn wal_syncs(&self) -> u64 {
        self.wal.lock().unwrap_or_else(|e| e.into_inner()).syncs
    }

    /// [`Store::sync`] through the last write this thread made with [`Store::write`].
    pub fn sync_mine(&self) -> Result<(), StoreError> {
        match LAST_WRITE.with(Cell::get) {
            (id, n) if id == self.id => self.sync(Written(n)),
            _ => Ok(()),
        }
    }

    /// Every `(key, value)` of `cf` whose key starts with `prefix`, in key order.
    ///
    /// The blocks a scan reads are not kept in RocksDB's block cache: a scan reads each once,
    /// and the agent's start-up scans of 100 000 users and devices filled the caches with
    /// 15 MiB of blocks nobody read again (heaptrack, `agent_load` benchmark). They stay in the
    /// kernel's page cache.
    pub fn scan<T: DeserializeOwned>(
        &self,
        cf: Cf,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mode = rocksdb::IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward);
        let mut read = rocksdb::ReadOptions::default();
        read.fill_cache(false);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(self.handle(cf), read, mode) {
            let (k, v) = item.map_err(|source| StoreError::Io {
                op: "scan",
                cf: cf.name(),
                key: prefix.to_owned(),
                source,
            })?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            let value = serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                cf: cf.name(),
                key: key.clone(),
                source,
            })?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Values of `cf` from the last key backwards that `keep` accepts, at most `limit` of them:
    /// the newest records first without reading the whole family.
    pub fn scan_back<T: DeserializeOwned>(
        &self,
        cf: Cf,
        limit: usize,
        mut keep: impl FnMut(&T) -> bool,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.handle(cf), rocksdb::IteratorMode::End)
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|source| StoreError::Io {
                op: "scan",
                cf: cf.name(),
                key: String::new(),
                source,
            })?;
            let value: T = serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                cf: cf.name(),
                key: String::from_utf8_lossy(&k).into_owned(),
                source,
            })?;
            if keep(&value) {
                out.push(value);
            }
        }
        Ok(out)
    }

    /// The last key of `cf` in key order, if any.
    pub fn last_key(&self, cf: Cf) -> Result<Option<String>, StoreError> {
        let mut it = self
            .db
            .iterator_cf(self.handle(cf), rocksdb::IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(Err(source)) => Err(StoreError::Io {
                op: "scan",
                cf: cf.name(),
                key: String::new(),
                source,
            }),
            Some(Ok((k, _))) => Ok(Some(String::from_utf8_lossy(&k).into_owned())),
        }
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(key: &str) -> Batch {
        let mut b = Batch::default();
        b.put(Cf::Blocklists, key, &1u32).unwrap();
        b
    }

    #[test]
    fn one_sync_covers_every_write_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let before = store.wal_syncs();
        let first = store.write(one("a")).unwrap();
        let _ = store.write(one("b")).unwrap();
        let last = store.write(one("c")).unwrap();
        assert!(first < last);
        store.sync(last).unwrap();
        assert_eq!(store.wal_syncs(), before + 1, "one fsync for three writes");
        store.sync(first).unwrap();
        store.sync_mine().unwrap();
        assert_eq!(
            store.wal_syncs(),
            before + 1,
            "already on disk: no second fsync"
        );
        let _ = store.write(one("d")).unwrap();
        store.sync_mine().unwrap();
        assert_eq!(
            store.wal_syncs(),
            before + 2,
            "this thread's newer write is synced"
        );
    }

    #[test]
    fn a_position_from_another_store_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            let _ = a.write(one(&i.to_string())).unwrap();
        }
        let b = Store::open(other.path()).unwrap();
        // This thread's last write was to `b` (its schema records at open); `a` is at position
        // 6 (its own schema records, then five). Neither call may wait for writes `b` never had.
        b.sync_mine().unwrap();
        b.sync(Written(5)).unwrap();
        let _ = a.write(one("again")).unwrap();
        a.sync_mine().unwrap();
        assert_eq!(a.wal.lock().unwrap().synced, 7);
    }

    #[test]
    fn concurrent_writers_all_end_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        store.commit(one(&format!("{t}/{i}"))).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let wal = store.wal.lock().unwrap();
        assert_eq!(wal.synced, wal.written);
        assert!(!wal.syncing);
        assert!(wal.syncs <= 160 + 1);
    }

    #[test]
    fn values_survive_reopen_and_batches_apply_together() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut b = Batch::default();
            b.put(Cf::Blocklists, "a", &vec![1u32, 2]).unwrap();
            b.put(Cf::Blocklists, "b", &"x").unwrap();
            store.commit(b).unwrap();
            let mut b = Batch::default();
            b.delete(Cf::Blocklists, "b");
            store.commit(b).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.get::<Vec<u32>>(Cf::Blocklists, "a").unwrap(),
            Some(vec![1, 2])
        );
        assert_eq!(store.get::<String>(Cf::Blocklists, "b").unwrap(), None);
    }

    #[test]
    fn every_family_exists_with_its_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for cf in Cf::ALL {
            let v: Option<u32> = store
                .get(Cf::Meta, &format!("schema/{}", cf.name()))
                .unwrap();
            assert_eq!(v, Some(cf.schema_version()), "{}", cf.name());
        }
    }

    #[test]
    fn scan_returns_exactly_the_prefix_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = Batch::default();
        for (u, d) in [
            ("al", "x"),
            ("alice", "phone"),
            ("alice", "laptop"),
            ("bob", "a"),
        ] {
            b.put(Cf::Peers, &keys::peer(u, d), &d).unwrap();
        }
        store.commit(b).unwrap();
        let got: Vec<(String, String)> = store
            .scan(Cf::Peers, &keys::user_peers_prefix("alice"))
            .unwrap();
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["alice/laptop", "alice/phone"]);
        assert_eq!(store.scan::<String>(Cf::Peers, "").unwrap().len(), 4);
        assert_eq!(store.scan::<String>(Cf::Users, "").unwrap().len(), 0);
    }

    #[test]
    fn audit_keys_sort_by_sequence_and_last_key_finds_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.last_key(Cf::Audit).unwrap(), None);
        for seq in [9u64, 10, 2, 100] {
            store.put(Cf::Audit, &keys::audit(seq), &seq).unwrap();
        }
        let last = store.last_key(Cf::Audit).unwrap().unwrap();
        assert_eq!(keys::audit_seq(&last), Some(100));
        assert_eq!(
            store.scan_back::<u64>(Cf::Audit, 2, |v| *v != 10).unwrap(),
            [100, 9]
        );
        let order: Vec<u64> = store
            .scan::<u64>(Cf::Audit, "")
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(order, [2, 9, 10, 100]);
    }

    #[test]
    fn newer_schema_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(Cf::Meta, "schema/blocklists", &99u32).unwrap();
        }
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(
            err,
            StoreError::SchemaTooNew {
                cf: "blocklists",
                found: 99,
                ..
            }
        ));
    }

    #[test]
    fn corrupt_value_is_reported_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put(Cf::Blocklists, "k", &"text").unwrap();
        let err = store.get::<u32>(Cf::Blocklists, "k").unwrap_err();
        assert!(err.to_string().contains("\"k\""), "{err}");
    }
}
