//! The service layer: operations that combine modules (geo + dataplane, store + dataplane +
//! tunnel), speaking domain types only. The API and the daemon call these; they never reach into
//! `dataplane` or `store` internals themselves.
//!
//! A small transaction core is handed to one module per feature; [`Service`] holds them all and
//! is what the API, the daemon and the tests are given. No feature adds methods to another's
//! type; the dependencies between them go one way (each line may use those above it):
//!
//! | module | owns |
//! |---|---|
//! | [`core`], [`error`], [`events`], [`notify`] | the store, the ports, the configuration, the writer lock, the audit trail, commit → publish (`config-changed`), webhook events handed to the outbox ([`Core::notify`](core::Core::notify)); the errors |
//! | [`directory`] | the devices in memory (by name, by key, ids and addresses in use), user records, allocation |
//! | [`policy`] | groups, quotas and limits: the effective policy per user and its kernel state, with its own cache and runtime state |
//! | [`devices`] | adding, removing and re-keying devices, client configs, programming the kernel and the tunnel |
//! | [`users`] | adding and removing users |
//! | [`tokens`] | API tokens and authentication |
//! | [`access`] | where the TCP API listens (`api enable/disable/status`) |
//! | [`live`] | the open session (its id) of each connected device: written by `history`, read by `monitor` |
//! | [`monitor`] | stats, connections, kick (of a user, or of one connection by its id) |
//! | [`watch`] | live monitoring: the shared once-a-second sampler, rates, each watcher's view |
//! | [`lists`], [`geo`] | named blocklists; geo policies as source lists |
//! | [`templates`] | quota templates and configuration templates |
//! | [`policy_file`] | the declarative policy file: apply, diff, export |
//! | [`history`], [`backup`], [`health`] | sessions and auth attempts with retention; store backups; component health |
//! | [`webhooks`] | webhook endpoints, the durable outbox's delivery workers and GC, signing, the SSRF check |
//! | [`telemetry`] | what the metrics read that no feature above answers (verdict counters, sessions online, handshakes, quota standing); the API's call timer port |
//! | [`reputation`] | a score per source address from failed handshakes and kernel events, automatic blocking in the `auto` source list for a TTL (the blocker thread) |
//! | [`alerts`] | webhook events from watching: quota thresholds, account expiries (a timer), suspicious activity (windows per source) |
//! | [`schedules`] | scheduled tasks: cron in a zone, the runner on an injectable clock, runs and their history (the commands run through the `Commands` port) |
//! | [`verification`] | the MFA verification page's and one-time-code channels' view of the service (traits) |
//! | [`usage`] | hourly and daily usage rollups per device (the writer's thread) and the usage report over them (`report generate`) |
//! | [`mfa`] | multi-factor authentication: enrolment, TOTP, backup and one-time codes, failed-code limits; implements [`verification::VerificationPort`]; its gate decision is folded into [`policy`]'s |
//! | [`cluster`] | this agent's node of an etcd cluster (issue 25): its status and health |
//! | [`proxies`] | proxy identities (Shadowsocks, VLESS): a credential and an id of the devices' id space per user and protocol, their kernel lines, client configs, the endpoints' `Credentials` |
//! | [`intel`] | IP intelligence: the master switch, the `tor`/`vpn` source lists from files or URLs on a reload schedule, the `allow` list (over [`lists`]) |
//!
//! Beside them: [`domain`] (validated domain types and their parsers), [`secrets`] (keys, token
//! hashes, sealing of kept client keys), [`ports`] (what the service needs from the dataplane and
//! the tunnel; adapters live beside what they adapt), and `testing` (in-memory ports, for tests
//! only: `cfg(test)` or the `test-support` feature).

pub mod access;
pub mod alerts;
pub mod backup;
pub mod cluster;
pub mod core;
pub mod devices;
pub mod directory;
pub mod domain;
pub mod error;
pub mod events;
pub mod geo;
pub mod health;
pub mod history;
pub mod intel;
pub mod lists;
pub mod live;
pub mod mfa;
pub mod monitor;
pub mod notify;
pub mod policy;
pub mod policy_file;
pub mod ports;
pub mod proxies;
pub mod reputation;
pub mod schedules;
pub mod secrets;
pub mod telemetry;
pub mod templates;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tokens;
pub mod usage;
pub mod users;
pub mod verification;
pub mod watch;
pub mod webhooks;

use std::sync::Arc;

use self::{
    core::Core,
    ports::{Plane, TunnelPort},
};
pub use self::{
    core::ServiceConfig,
    error::{AuthError, ServiceError},
    events::ServiceEvent,
    geo::GeoStatus,
    history::{AuthAttempt, EndReason, HistoryPage, HistoryQuery, Pruned, Session, SessionEvent},
    lists::{BlocklistView, EntriesOp},
    monitor::{Connection, PeerCounters, PeerStatsView, ProxyCounters, Stats, Traffic},
    templates::ConfigTemplateView,
    tokens::NewToken,
    users::{AddedUser, NewUser},
};
use crate::store::Store;

/// The control service: every feature over one core. One per agent, shared by every API
/// connection.
#[derive(Debug)]
pub struct Service {
    /// The transaction core (store, ports, writer lock, audit, events).
    pub core: Arc<Core>,
    /// The devices in memory and user records.
    pub directory: Arc<directory::Directory>,
    /// Groups, quotas and limits.
    pub policy: Arc<policy::Policy>,
    /// Devices.
    pub devices: Arc<devices::Devices>,
    /// Users.
    pub users: Arc<users::Users>,
    /// API tokens.
    pub tokens: Arc<tokens::Tokens>,
    /// Where the TCP API listens.
    pub access: Arc<access::Access>,
    /// Stats, connections, kick.
    pub monitor: Arc<monitor::Monitor>,
    /// Live monitoring (the shared sampler).
    pub watch: Arc<watch::Live>,
    /// Named blocklists.
    pub lists: Arc<lists::Lists>,
    /// Geo policies.
    pub geo: Arc<geo::Geo>,
    /// Quota and configuration templates.
    pub templates: Arc<templates::Templates>,
    /// Policy files.
    pub policy_files: Arc<policy_file::PolicyFiles>,
    /// Session history and auth attempts.
    pub history: Arc<history::History>,
    /// Store backups.
    pub backup: Arc<backup::Backup>,
    /// Component health.
    pub health: Arc<health::Health>,
    /// What the metrics read; the API's call timer.
    pub telemetry: Arc<telemetry::Telemetry>,
    /// Webhook events from watching: quota thresholds, account expiries, suspicious activity.
    pub alerts: Arc<alerts::Alerts>,
    /// Scheduled tasks.
    pub schedules: Arc<schedules::Schedules>,
    /// Usage rollups and reports.
    pub usage: Arc<usage::Usage>,
    /// Webhook endpoints and their delivery workers.
    pub webhooks: Arc<webhooks::Webhooks>,
    /// Multi-factor authentication (the verification page's port).
    pub mfa: Arc<mfa::Mfa>,
    /// IP intelligence: the switch, the tor/vpn lists and their reloads, the allow list.
    pub intel: Arc<intel::Intel>,
    /// Source reputation and automatic blocking.
    pub reputation: Arc<reputation::Reputation>,
    /// Proxy identities (Shadowsocks, VLESS); the endpoints' credentials.
    pub proxies: Arc<proxies::Proxies>,
    /// This agent's node of an etcd cluster, when it is one.
    pub cluster: Arc<cluster::Cluster>,
}

impl Service {
    /// Loads the users' devices and the policy from the store and reconciles the tunnel and
    /// the dataplane with them: every stored device is (re-)programmed and the policy applied;
    /// kernel peers the store does not know are left alone.
    pub fn open(
        store: Arc<Store>,
        plane: Arc<dyn Plane>,
        tunnel: Arc<dyn TunnelPort>,
        cfg: ServiceConfig,
    ) -> Result<Service, ServiceError> {
        let core = Arc::new(Core::new(store, plane, tunnel, cfg)?);
        let directory = Arc::new(directory::Directory::load(core.clone())?);
        let policy = Arc::new(policy::Policy::load(core.clone(), directory.clone())?);
        let devices = Arc::new(devices::Devices::new(
            core.clone(),
            directory.clone(),
            policy.clone(),
        ));
        let proxies = Arc::new(proxies::Proxies::new(
            core.clone(),
            directory.clone(),
            policy.clone(),
        ));
        let users = Arc::new(users::Users::new(
            core.clone(),
            directory.clone(),
            policy.clone(),
            devices.clone(),
            proxies.clone(),
        ));
        let lists = Arc::new(lists::Lists::new(core.clone()));
        let live = Arc::new(live::LiveSessions::default());
        let reputation = Arc::new(reputation::Reputation::new(
            core.clone(),
            directory.clone(),
            lists.clone(),
        )?);
        let svc = Service {
            tokens: Arc::new(tokens::Tokens::new(core.clone())),
            access: Arc::new(access::Access::new(core.clone())),
            monitor: Arc::new(monitor::Monitor::new(
                core.clone(),
                directory.clone(),
                policy.clone(),
                live.clone(),
            )),
            watch: Arc::new(watch::Live::new(core.clone(), directory.clone())),
            geo: Arc::new(geo::Geo::new(core.clone(), lists.clone())),
            templates: Arc::new(templates::Templates::new(
                core.clone(),
                directory.clone(),
                policy.clone(),
            )),
            policy_files: Arc::new(policy_file::PolicyFiles::new(
                core.clone(),
                policy.clone(),
                users.clone(),
                devices.clone(),
            )),
            usage: Arc::new(usage::Usage::new(
                core.clone(),
                directory.clone(),
                policy.clone(),
                live.clone(),
            )),
            history: Arc::new(history::History::new(core.clone(), directory.clone(), live)),
            backup: Arc::new(backup::Backup::new(core.clone())),
            health: Arc::new(health::Health::new(core.clone(), directory.clone())),
            telemetry: Arc::new(telemetry::Telemetry::new(core.clone(), policy.clone())),
            alerts: Arc::new(alerts::Alerts::new(
                core.clone(),
                directory.clone(),
                policy.clone(),
                reputation.clone(),
            )),
            schedules: Arc::new(schedules::Schedules::new(core.clone())),
            webhooks: Arc::new(webhooks::Webhooks::new(core.clone())?),
            mfa: Arc::new(mfa::Mfa::new(
                core.clone(),
                directory.clone(),
                policy.clone(),
            )?),
            intel: Arc::new(intel::Intel::new(
                core.clone(),
                lists.clone(),
                reputation.clone(),
            )?),
            reputation,
            proxies,
            cluster: Arc::default(),
            lists,
            users,
            devices,
            policy,
            directory,
            core,
        };
        svc.devices.reconcile()?;
        svc.proxies.reconcile()?;
        svc.policy.reapply()?;
        svc.policy_files.complete_journal()?;
        svc.templates.apply_log_level();
        svc.intel.reconcile()?;
        Ok(svc)
    }

    /// The store (for the daemon's own records).
    pub fn store(&self) -> &Arc<Store> {
        &self.core.store
    }

    /// Waits until the mutations this thread made are on disk ([`Core::settle`]).
    pub fn settle(&self) -> Result<(), ServiceError> {
        self.core.settle()
    }

    /// The service's event bus ([`Core::events`]).
    pub fn events(&self) -> tokio::sync::broadcast::Sender<ServiceEvent> {
        self.core.events()
    }
}

#[cfg(test)]
mod tests;
