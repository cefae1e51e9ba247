//! Groups, quotas and limits: where an admin's intent becomes kernel state.
//!
//! [`Policy`] holds its own state: the records in memory (`cache`, kept from the store's
//! `records`), the quota buckets (`buckets`) and what is known only while running (`runtime`:
//! devices online, gates decided, online time); its methods are the changes (each one store
//! batch with its audit record, then the kernel), the kernel apply, and the tick.
//!
//! - [`model`]: the validated values (`10Mbps`, `100GB`, `Mon-Fri 08:00-18:00`, …) and a
//!   policy layer ([`Limits`]).
//! - [`resolve`]: the effective policy of a user from its layers (user, groups, template,
//!   server default), each field with its source — the one place that decides; the rule for
//!   users in several groups is documented there (most permissive wins).
//! - [`engine`]: period boundaries and gate decisions (window, daily time, device limit) as
//!   pure functions of the time.
//! - `records`, `cache`, `buckets`, `runtime`: the state above.
//!
//! The dataplane operations the policy needs are `service::ports::PolicyPlane`; policy files
//! are `service::policy_file`, quota and configuration templates `service::templates`: both
//! are built on this module's changes.
//!
//! ## From a change to the kernel
//! Every change (user limits, server default, a group's policy or members, a quota template or
//! who has it, a configuration template applied) runs under the service's writer lock:
//! validate (a typed error naming the field, nothing changed) → one
//! synced store batch with the records **and the audit record** → update the in-memory cache →
//! [`Policy::apply`] for every affected user, which is the one place that writes the
//! kernel: for each kernel line of the user (its devices and its proxy identities,
//! `service::proxies`, alike; `directory::Directory::user_lines`), its rates (the bandwidth, both directions), its flow
//! limit, its quota bucket (own or the group's pool, budget plus grace) and its gate. The reply
//! is sent after the kernel holds the new policy. If the kernel refuses, the old records are
//! committed back (with the audit record removed) and the old policy re-applied.
//!
//! The policy is applied again to every device when the agent starts (rates live in qdiscs,
//! which do not survive a restart; the rest is re-written idempotently) and to a device when it
//! is added. At start every gate is reconciled with the one the kernel kept (pinned maps), never
//! written blindly: a device held by someone else before the restart (kicked, MFA pending)
//! stays held; see [`engine::gate_write`]. The user's account expiry is part of the gate
//! decision ([`engine::decide`]: the admission's deadline, or held as `expired` once passed),
//! kept in memory from the store's user records (`runtime`) and set by `service::users`.
//!
//! ## Quota buckets and periods
//! A bucket id is allocated the first time an owner (`user:NAME` or `group:NAME` for a pool)
//! needs one and is kept (stored under `bucket/<owner>`, with the start of the period it was last
//! reset for). [`Policy::tick`] (every second from the daemon, or with any clock from a
//! test) resets buckets whose period has started since — including a reset missed while the
//! agent was down, which happens at the first tick after start.
//!
//! ## Gates
//! Devices online are learned from the tunnel (`on_connect` / `on_disconnect`); the
//! tick accumulates each user's online time per local day and re-evaluates the gates of users with
//! a window, a daily time or a device limit, and once those of a user whose expiry has passed (the
//! kernel cut its devices at the deadline already; the tick makes the hold `expired`). A gate is written only when the policy's decision
//! changes, and then only as [`engine::gate_write`] allows: the kernel's gate is read first and a
//! hold of another owner (a kick until the device's next handshake, MFA) is left alone. An
//! owner ending its hold makes the policy decide afresh by forgetting the device's decision (as
//! `forget_online` and a handshake do). Removing a device frees its slot of the device
//! limit (its user's devices are decided again); a new device starts offline and undecided.
//! A proxy identity is a line like a device's: online from its first authenticated connection
//! to the end of its last ([`Policy::on_proxy_open`], [`Policy::on_proxy_close`], the first
//! ending a kick's hold as a handshake does), one device for the device limit however many
//! connections it has, and never held for MFA (`service::proxies` says why); the endpoints ask
//! [`Policy::admitted`] (the decision, not the kernel's gate) before connecting anywhere.
//!
//! ## MFA
//! `service::mfa` keeps which users need an MFA admission and which devices' sessions a good
//! code admitted, here in the runtime state ([`Policy::set_mfa`], [`Policy::mfa_admit`]), so the
//! gate stays decided in this one place ([`engine::decide_mfa`], its precedence in `engine`). An
//! admission ends with the device's session (`on_disconnect`, a kick: `forget_online`), once
//! its lifetime passed (the kernel holds the device by itself at the deadline; the tick then
//! forgets the admission), or when MFA is turned off. Admissions are not stored: an agent
//! restart ends every session, so every device of an MFA user is held again at start.
//!
//! ## Online time across restarts
//! The day's online time of a user with a daily `time` is stored (`online/<user>`: the local day
//! and the seconds) and restored at start, so a restart does not hand out a fresh day. The tick
//! writes it in one batch for every user whose time grew by [`ONLINE_SAVE_EVERY`] (60 s) since the
//! last write, or reached the limit (so a user out of time is out of time after a restart too); the
//! write is not synced (it survives a SIGKILL, not a power loss). A restart thus forgets at most
//! the last minute of a user's time, in the user's favour; at 10k users online that comes to about
//! 170 small puts per second (10 000 / 60, computed), one batch per tick. A record of an earlier
//! day counts nothing (the tick starts the new day at zero). Recomputing the time from the stored
//! session history instead was rejected: sessions also cover time a device spent held at the gate
//! (connected before the window opened, or after the time ran out) and, after a SIGKILL, the
//! downtime up to the next start, and the devices' overlapping sessions would have to be merged.

mod buckets;
mod cache;
pub mod engine;
pub mod model;
mod records;
pub mod resolve;
mod runtime;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, RwLock, RwLockReadGuard},
    time::SystemTime,
};

use capybara_common::peer::PeerId;
use serde::{Deserialize, Serialize};

pub use self::records::{GroupRecord, GroupView, ONLINE_SAVE_EVERY, UserPolicy};
use self::{
    buckets::{BucketState, Buckets},
    engine::{Device, MfaGate},
    model::{ByteSize, Cap, GroupName, Limits, LimitsPatch, Period, Zone},
    records::{BucketRecord, DAY_FORMAT, OnlineRecord, owner_group, owner_user, stage},
    resolve::{Effective, QuotaPlan},
    runtime::Runtime,
};
pub(in crate::service) use self::{cache::Cache, records::Change};
use super::{
    ServiceError,
    core::{Core, to_json},
    directory::{Directory, Line},
    domain::{Actor, Peer, PublicKey, UserName, ValidationError, from_unix_secs},
    error::not_found,
};
use crate::{
    dataplane::{Gate, PeerRates},
    proxy::registry::CutCause,
    store::{Batch, Cf, keys},
};

/// Which layer a limits call is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitsTarget {
    /// A user's own limits.
    User(UserName),
    /// The server default.
    Default,
}

/// A user's quota as `quota show` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaStatus {
    /// The user.
    pub user: String,
    /// `none`, `own` or `pool:GROUP`.
    pub plan: String,
    /// The bucket (0 = none).
    pub bucket: u32,
    /// The budget per period (0 = none).
    pub limit_bytes: u64,
    /// Where the kernel stops traffic: budget plus grace.
    pub cutoff_bytes: u64,
    /// Used in this period.
    pub used_bytes: u64,
    /// The period.
    pub period: String,
    /// When this period started (Unix seconds; `None` for `none`).
    pub period_start: Option<i64>,
    /// At or over the budget.
    pub exceeding: bool,
}

/// The policy feature, with its own state: the cached records, the quota buckets and what is
/// known only while running.
#[derive(Debug)]
pub struct Policy {
    core: Arc<Core>,
    dir: Arc<Directory>,
    cache: RwLock<Cache>,
    buckets: Mutex<Buckets>,
    runtime: Mutex<Runtime>,
}

impl Policy {
    /// Loads the policy records (and the users' expiries) from the store.
    pub fn load(core: Arc<Core>, dir: Arc<Directory>) -> Result<Policy, ServiceError> {
        let store = &core.store;
        let (cache, buckets, mut runtime) = (
            Cache::load(store)?,
            Buckets::load(store)?,
            Runtime::load(store)?,
        );
        runtime.expires = dir
            .users()?
            .into_iter()
            .filter_map(|u| Some((u.name, from_unix_secs(u.expires_at?))))
            .collect();
        Ok(Policy {
            core,
            dir,
            cache: RwLock::new(cache),
            buckets: Mutex::new(buckets),
            runtime: Mutex::new(runtime),
        })
    }
}

/// What removing a user does to the policy records (see `Policy::forget_user`).
#[derive(Debug)]
pub struct ForgetUser {
    user: UserName,
    changes: Vec<Change>,
}

/// `limit` plus `grace` percent, in bytes.
fn cutoff(limit: ByteSize, grace: model::Percent) -> u64 {
    limit.0.saturating_add(
        limit.0 / 100 * u64::from(grace.0) + limit.0 % 100 * u64::from(grace.0) / 100,
    )
}

/// What the kernel should hold for one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PeerKernel {
    rates: PeerRates,
    flows: Option<u32>,
    bucket: Option<u32>,
}

impl Policy {
    /// Reads the records and the users' expiries again after the store changed under them (a
    /// cluster's change applied: `service::cluster`); the caller applies the policy after.
    pub fn reload(&self) -> Result<(), ServiceError> {
        let cache = Cache::load(&self.core.store)?;
        let expires = self
            .dir
            .users()?
            .into_iter()
            .filter_map(|u| Some((u.name, from_unix_secs(u.expires_at?))))
            .collect();
        *self.cache.write().unwrap() = cache;
        self.runtime.lock().unwrap().expires = expires;
        Ok(())
    }

    /// Reads the policy records and the expiries of `users` again (a cluster's change of
    /// their records applied: `service::cluster`): cheaper than [`Policy::reload`] when only
    /// users' own records changed. The caller applies the policy after.
    pub fn reload_users(&self, users: &BTreeSet<UserName>) -> Result<(), ServiceError> {
        for u in users {
            let own: Option<(UserName, UserPolicy)> = self
                .core
                .store
                .get(Cf::Policy, &keys::policy_user(u.as_str()))?;
            let expiry = match self.dir.user(u) {
                Ok(user) => user.expires_at.map(from_unix_secs),
                Err(ServiceError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            {
                let mut c = self.cache.write().unwrap();
                match own {
                    Some((_, p)) => c.users.insert(u.clone(), p),
                    None => c.users.remove(u),
                };
            }
            let mut rt = self.runtime.lock().unwrap();
            match expiry {
                Some(t) => rt.expires.insert(u.clone(), t),
                None => rt.expires.remove(u),
            };
        }
        Ok(())
    }

    // ---- reads ------------------------------------------------------------------------------

    /// The cached records, for the features built on the policy (templates, policy files).
    pub(in crate::service) fn read(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap()
    }

    /// The DNS servers written into client configs: the last configuration template's, else
    /// the agent's `--dns`.
    pub fn client_dns(&self) -> Vec<String> {
        match &self.cache.read().unwrap().settings.dns {
            Some(d) => d.iter().map(ToString::to_string).collect(),
            None => self.core.cfg.dns.clone(),
        }
    }

    /// The limits set on a user itself, or the server default.
    pub fn get_limits(&self, target: &LimitsTarget) -> Result<Limits, ServiceError> {
        let c = self.cache.read().unwrap();
        match target {
            LimitsTarget::Default => Ok(c.default.clone()),
            LimitsTarget::User(u) => {
                drop(c);
                self.dir.user(u)?;
                let c = self.cache.read().unwrap();
                Ok(c.users.get(u).map(|p| p.limits.clone()).unwrap_or_default())
            }
        }
    }

    /// A user's account expiry as the gates use it (`None` = never).
    pub fn expiry(&self, user: &UserName) -> Option<SystemTime> {
        self.runtime.lock().unwrap().expires.get(user).copied()
    }

    /// Every user's account expiry (users without one are absent), for the expiry timer of
    /// `service::alerts`.
    pub fn expiries(&self) -> Vec<(UserName, SystemTime)> {
        let rt = self.runtime.lock().unwrap();
        rt.expires.iter().map(|(u, t)| (u.clone(), *t)).collect()
    }

    /// The owner of quota bucket `id` (`user:NAME` or `group:NAME`) and the period it follows
    /// (`daily`, `weekly`, `monthly`, `none`), if the bucket is allocated.
    pub fn bucket_owner(&self, id: u32) -> Option<(String, String)> {
        self.buckets.lock().unwrap().owner_of(id)
    }

    /// Sets (or with `None` clears) a user's account expiry as the gates use it; the caller
    /// stores it and then applies the user's policy ([`Policy::apply`]) to reach the kernel.
    pub(in crate::service) fn set_expiry(&self, user: &UserName, at: Option<SystemTime>) {
        let mut rt = self.runtime.lock().unwrap();
        match at {
            Some(t) => rt.expires.insert(user.clone(), t),
            None => rt.expires.remove(user),
        };
        rt.expired_seen.remove(user);
    }

    /// The gate a device of `user` is programmed with before its policy is applied: admitted
    /// until the user's expiry, or held as expired (`engine::decide` with no rule holding it).
    pub(in crate::service) fn first_gate(&self, user: &UserName) -> Gate {
        let rt = self.runtime.lock().unwrap();
        let mfa = if rt.mfa_on(user) {
            MfaGate::Pending
        } else {
            MfaGate::Off
        };
        engine::decide_mfa(None, rt.expires.get(user).copied(), mfa, SystemTime::now())
    }

    // ---- MFA (kept by `service::mfa`, see the module docs) ------------------------------------

    /// The users that need an MFA admission and whether every user does (`mfa require-all`),
    /// at start (before the policy is applied).
    pub(in crate::service) fn init_mfa(
        &self,
        users: impl IntoIterator<Item = UserName>,
        all: bool,
    ) {
        let mut rt = self.runtime.lock().unwrap();
        rt.mfa_users = users.into_iter().collect();
        rt.mfa_all = all;
    }

    /// Whether `user`'s devices need an MFA admission.
    pub fn mfa_required(&self, user: &UserName) -> bool {
        self.runtime.lock().unwrap().mfa_on(user)
    }

    /// Sets whether every user's devices need an MFA admission (`mfa require-all`) and decides
    /// every user's gates again.
    pub(in crate::service) fn set_mfa_all(&self, all: bool) -> Result<(), ServiceError> {
        {
            let mut rt = self.runtime.lock().unwrap();
            if rt.mfa_all == all {
                return Ok(());
            }
            rt.mfa_all = all;
        }
        let now = SystemTime::now();
        for u in self.dir.user_names()? {
            self.regate(&u, now, None)?;
        }
        Ok(())
    }

    /// Sets whether `user`'s devices need an MFA admission and decides their gates again; turned
    /// off, its devices' admissions are forgotten (turned on again, they verify again).
    pub(in crate::service) fn set_mfa(
        &self,
        user: &UserName,
        on: bool,
    ) -> Result<(), ServiceError> {
        {
            let mut rt = self.runtime.lock().unwrap();
            let changed = if on {
                rt.mfa_users.insert(user.clone())
            } else {
                rt.mfa_users.remove(user)
            };
            if !changed {
                return Ok(());
            }
            for p in self.dir.user_peers(user) {
                rt.mfa_admitted.remove(&p.id);
            }
        }
        self.regate(user, SystemTime::now(), None)
    }

    /// Ends the MFA admissions of `user`'s devices (its secret was reset: a session admitted by
    /// an old code must not outlive it) and decides their gates again.
    pub(in crate::service) fn mfa_end_admissions(
        &self,
        user: &UserName,
    ) -> Result<(), ServiceError> {
        {
            let mut rt = self.runtime.lock().unwrap();
            for p in self.dir.user_peers(user) {
                rt.mfa_admitted.remove(&p.id);
            }
        }
        self.regate(user, SystemTime::now(), None)
    }

    /// A good code admitted `peer`'s current session until `until`: its gate is decided again
    /// (and written before this returns).
    pub(in crate::service) fn mfa_admit(
        &self,
        peer: &Peer,
        until: SystemTime,
    ) -> Result<(), ServiceError> {
        self.runtime
            .lock()
            .unwrap()
            .mfa_admitted
            .insert(peer.id, until);
        self.regate(&peer.user, SystemTime::now(), None)
    }

    /// Until when `id`'s current session is admitted by MFA (a time passed is still answered
    /// until the tick forgets it).
    pub fn mfa_admission(&self, id: PeerId) -> Option<SystemTime> {
        self.runtime.lock().unwrap().mfa_admitted.get(&id).copied()
    }

    /// Every MFA admission of `user`'s devices.
    pub fn mfa_admissions(&self, user: &UserName) -> Vec<(Peer, SystemTime)> {
        let rt = self.runtime.lock().unwrap();
        self.dir
            .user_peers(user)
            .into_iter()
            .filter_map(|p| rt.mfa_admitted.get(&p.id).map(|t| (p, *t)))
            .collect()
    }

    /// `policy explain`: the effective policy of a user field by field with its layer, and last
    /// the account expiry (`expires`, from the user itself) with what it does to the gate now.
    pub fn explain_rows(&self, user: &UserName) -> Result<Vec<resolve::ExplainRow>, ServiceError> {
        let mut rows = self.explain(user)?.explain();
        let value = match self.expiry(user) {
            None => "never".to_owned(),
            Some(t) if t <= SystemTime::now() => format!(
                "{} (expired: its devices are held at the gate, reason expired)",
                humantime::format_rfc3339_seconds(t)
            ),
            Some(t) => format!(
                "{} (admitted until then: the kernel cuts its devices at that time)",
                humantime::format_rfc3339_seconds(t)
            ),
        };
        rows.push(resolve::ExplainRow {
            field: "expires".to_owned(),
            value,
            source: "user".to_owned(),
        });
        Ok(rows)
    }

    /// The effective policy of a user with the layer of each field.
    pub fn explain(&self, user: &UserName) -> Result<Effective, ServiceError> {
        self.dir.user(user)?;
        Ok(self.cache.read().unwrap().effective(user))
    }

    /// Every group.
    pub fn list_groups(&self) -> Vec<GroupView> {
        self.cache
            .read()
            .unwrap()
            .groups
            .values()
            .cloned()
            .collect()
    }

    /// One page of groups by name: up to `size` after the name `after` (read from the cache's
    /// ordered map without copying the rest), and whether more follow.
    pub fn list_groups_page(&self, after: Option<&str>, size: usize) -> (Vec<GroupView>, bool) {
        let cache = self.cache.read().unwrap();
        let mut it = cache
            .groups
            .iter()
            .filter(|(n, _)| after.is_none_or(|a| n.as_str() > a));
        let page = it.by_ref().take(size).map(|(_, g)| g.clone()).collect();
        (page, it.next().is_some())
    }

    /// One group.
    pub fn get_group(&self, name: &GroupName) -> Result<GroupView, ServiceError> {
        self.cache
            .read()
            .unwrap()
            .groups
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("group", name))
    }

    /// Quota usage of one user or every user; with `exceeding`, only those at or over budget.
    pub fn show_quota(
        &self,
        user: Option<&UserName>,
        exceeding: bool,
    ) -> Result<Vec<QuotaStatus>, ServiceError> {
        let users: Vec<UserName> = match user {
            Some(u) => {
                self.dir.user(u)?;
                vec![u.clone()]
            }
            None => self.dir.user_names()?,
        };
        self.quota_of(&users, exceeding)
    }

    /// One page of every user's quota usage in name order: up to `size` users after the name
    /// `after` (with `exceeding`, only those at or over budget; the users are read from the
    /// store a page at a time, never all at once), and the name the next page continues after
    /// (`None` on the last page).
    pub fn show_quota_page(
        &self,
        after: Option<&str>,
        size: usize,
        exceeding: bool,
    ) -> Result<(Vec<QuotaStatus>, Option<String>), ServiceError> {
        let size = size.max(1);
        let mut after = after.map(str::to_owned);
        let mut out = Vec::new();
        loop {
            let (names, more) = self.dir.user_names_page(after.as_deref(), size)?;
            for (i, st) in self.quota_of(&names, false)?.into_iter().enumerate() {
                if !exceeding || st.exceeding {
                    out.push(st);
                }
                if out.len() == size {
                    let rest = i + 1 < names.len() || more;
                    return Ok((out, rest.then(|| names[i].to_string())));
                }
            }
            if !more {
                return Ok((out, None));
            }
            after = names.last().map(ToString::to_string);
        }
    }

    /// The quota status of each of `users` (which exist), in their order; with `exceeding`,
    /// only those at or over budget.
    fn quota_of(
        &self,
        users: &[UserName],
        exceeding: bool,
    ) -> Result<Vec<QuotaStatus>, ServiceError> {
        let cache = self.cache.read().unwrap();
        let buckets = self.buckets.lock().unwrap();
        let mut out = Vec::new();
        for u in users {
            let eff = cache.effective(u);
            let (plan, owner, limit, grace, period) = match &eff.quota.value {
                QuotaPlan::None => ("none".to_owned(), None, None, model::Percent(0), None),
                QuotaPlan::Personal { limit } => (
                    "own".to_owned(),
                    Some(owner_user(u)),
                    Some(*limit),
                    eff.grace.value,
                    Some(eff.period.value),
                ),
                QuotaPlan::Pool { group, limit } => {
                    let gl = cache.groups.get(group).map(|g| &g.limits);
                    (
                        format!("pool:{group}"),
                        Some(owner_group(group)),
                        Some(*limit),
                        gl.and_then(|l| l.grace).unwrap_or_default(),
                        Some(gl.and_then(|l| l.period).unwrap_or_default()),
                    )
                }
            };
            let b = owner.as_ref().and_then(|o| buckets.get(o)).copied();
            let used = match b {
                Some(b) => self.core.plane.policy_usage(b.rec.id)?.used_bytes,
                None => 0,
            };
            let limit_bytes = limit.map_or(0, |l| l.0);
            let st = QuotaStatus {
                user: u.to_string(),
                plan,
                bucket: b.map_or(0, |b| b.rec.id),
                limit_bytes,
                cutoff_bytes: limit.map_or(0, |l| cutoff(l, grace)),
                used_bytes: used,
                period: period.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                period_start: b.and_then(|b| b.rec.period_start),
                exceeding: limit_bytes > 0 && used >= limit_bytes,
            };
            if !exceeding || st.exceeding {
                out.push(st);
            }
        }
        Ok(out)
    }

    // ---- changes ----------------------------------------------------------------------------

    /// Changes a user's own limits or the server default; every affected device is updated in
    /// the kernel before this returns.
    pub fn set_limits(
        &self,
        actor: &Actor,
        target: &LimitsTarget,
        patch: &LimitsPatch,
    ) -> Result<Limits, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        match target {
            LimitsTarget::User(u) => {
                self.dir.user(u)?;
                let before = self.get_limits(target)?;
                let after = before.patched(patch);
                let template = self
                    .cache
                    .read()
                    .unwrap()
                    .users
                    .get(u)
                    .and_then(|p| p.template.clone());
                let rec = UserPolicy {
                    limits: after.clone(),
                    template,
                };
                let rec = (!rec.is_empty()).then_some(rec);
                self.change(
                    actor,
                    "policy.user.set",
                    format!("user:{u}"),
                    to_json(&before),
                    to_json(&after),
                    vec![Change::User(u.clone(), rec)],
                    vec![u.clone()],
                )?;
                Ok(after)
            }
            LimitsTarget::Default => {
                let before = self.get_limits(target)?;
                let after = before.patched(patch);
                let users = self.dir.user_names()?;
                self.change(
                    actor,
                    "policy.default.set",
                    "policy:default".into(),
                    to_json(&before),
                    to_json(&after),
                    vec![Change::Default(after.clone())],
                    users,
                )?;
                Ok(after)
            }
        }
    }

    /// Creates an empty group.
    pub fn create_group(&self, actor: &Actor, name: &GroupName) -> Result<GroupView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        if self.cache.read().unwrap().groups.contains_key(name) {
            return Err(ServiceError::AlreadyExists {
                what: "group",
                name: name.to_string(),
            });
        }
        let g = GroupRecord {
            name: name.clone(),
            members: BTreeSet::new(),
            limits: Limits::default(),
            shared_limit: None,
        };
        self.change(
            actor,
            "group.create",
            format!("group:{name}"),
            None,
            to_json(&g),
            vec![Change::Group(name.clone(), Some(g.clone()))],
            vec![],
        )?;
        Ok(g)
    }

    /// Deletes a group; its members lose its policy.
    pub fn delete_group(&self, actor: &Actor, name: &GroupName) -> Result<GroupView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let g = self.get_group(name)?;
        self.change(
            actor,
            "group.delete",
            format!("group:{name}"),
            to_json(&g),
            None,
            vec![Change::Group(name.clone(), None)],
            g.members.iter().cloned().collect(),
        )?;
        Ok(g)
    }

    /// Adds (`add`) or removes users of a group. Every user must exist (to add) or be a member
    /// (to remove); otherwise nothing changes.
    pub fn change_members(
        &self,
        actor: &Actor,
        name: &GroupName,
        users: &[UserName],
        add: bool,
    ) -> Result<GroupView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let before = self.get_group(name)?;
        if users.is_empty() {
            return Err(ValidationError::Missing { field: "users" }.into());
        }
        let mut after = before.clone();
        for u in users {
            if add {
                self.dir.user(u)?;
                after.members.insert(u.clone());
            } else if !after.members.remove(u) {
                return Err(not_found("member", format!("{name}/{u}")));
            }
        }
        self.change(
            actor,
            if add { "group.add" } else { "group.remove" },
            format!("group:{name}"),
            to_json(&before),
            to_json(&after),
            vec![Change::Group(name.clone(), Some(after.clone()))],
            users.to_vec(),
        )?;
        Ok(after)
    }

    /// Changes a group's policy (and, with `shared_limit`, its pool: `Cap::Unlimited` removes
    /// it); every member's devices are updated in the kernel before this returns.
    pub fn set_group_policy(
        &self,
        actor: &Actor,
        name: &GroupName,
        patch: &LimitsPatch,
        shared_limit: Option<Cap<ByteSize>>,
    ) -> Result<GroupView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let before = self.get_group(name)?;
        let mut after = before.clone();
        after.limits = before.limits.patched(patch);
        if let Some(s) = shared_limit {
            after.shared_limit = s.limit();
        }
        // The audit record holds what this call changes, not the membership (10 000 names twice
        // would make the record, and the synced write the caller waits for, 300 kB).
        let policy_of = |g: &GroupRecord| {
            to_json(&serde_json::json!({ "limits": g.limits, "shared_limit": g.shared_limit }))
        };
        self.change(
            actor,
            "group.policy",
            format!("group:{name}"),
            policy_of(&before),
            policy_of(&after),
            vec![Change::Group(name.clone(), Some(after.clone()))],
            after.members.iter().cloned().collect(),
        )?;
        Ok(after)
    }

    /// Starts a new period now for a user's own bucket (`Ok(user)`) or a group's pool.
    pub fn reset_quota(
        &self,
        actor: &Actor,
        owner: Result<&UserName, &GroupName>,
    ) -> Result<(), ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let (key, target) = match owner {
            Ok(u) => {
                self.dir.user(u)?;
                (owner_user(u), format!("user:{u}"))
            }
            Err(g) => {
                self.get_group(g)?;
                (owner_group(g), format!("group:{g}"))
            }
        };
        let bucket = self
            .buckets
            .lock()
            .unwrap()
            .get(&key)
            .map(|b| b.rec.id)
            .ok_or_else(|| not_found("quota bucket", &key))?;
        let usage = self.core.plane.policy_reset(bucket)?;
        let mut batch = Batch::default();
        self.core.audit(
            &mut batch,
            actor,
            "quota.reset",
            target,
            None,
            to_json(&serde_json::json!({ "bucket": bucket, "epoch": usage.epoch })),
        )?;
        self.core.commit(batch)
    }

    /// Starts a new period now for every bucket: each user's own and each group's pool (what a
    /// monthly `quota reset --all` wants), one audit record per bucket (`quota.reset`, as one
    /// reset by name). Their owners (`user:<name>`, `group:<name>`).
    pub fn reset_all_quotas(&self, actor: &Actor) -> Result<Vec<String>, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let all = self.buckets.lock().unwrap().all();
        let mut done = Vec::with_capacity(all.len());
        for (owner, bucket) in all {
            let usage = self.core.plane.policy_reset(bucket)?;
            let mut batch = Batch::default();
            self.core.audit(
                &mut batch,
                actor,
                "quota.reset",
                owner.clone(),
                None,
                to_json(&serde_json::json!({ "bucket": bucket, "epoch": usage.epoch })),
            )?;
            self.core.commit(batch)?;
            done.push(owner);
        }
        Ok(done)
    }

    /// Commits `changes` with an audit record, updates the cache and applies the policy of
    /// `affected` users to the kernel; on a kernel failure everything is put back.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call shape for every policy change"
    )]
    pub(in crate::service) fn change(
        &self,
        actor: &Actor,
        action: &str,
        target: String,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
        changes: Vec<Change>,
        affected: Vec<UserName>,
    ) -> Result<(), ServiceError> {
        let old = self.cache.read().unwrap().current(&changes);
        let mut batch = Batch::default();
        stage(&mut batch, &changes)?;
        let seq = self.core.next_audit_seq();
        self.core
            .audit(&mut batch, actor, action, target, before, after)?;
        let event = self.core.commit_unpublished(batch)?;
        self.cache_put(&changes);
        if let Err(e) = self.apply(&affected, false) {
            tracing::error!(error = %e, action, "the kernel refused a policy change; undoing it");
            let mut undo = Batch::default();
            stage(&mut undo, &old)?;
            undo.delete(Cf::Audit, &keys::audit(seq));
            self.core.store.commit(undo)?;
            self.core.rewind_audit(seq);
            self.cache_put(&old);
            if let Err(r) = self.apply(&affected, false) {
                tracing::error!(error = %r, "cannot re-apply the old policy");
            }
            return Err(e);
        }
        self.core.publish(event);
        tracing::info!(%actor, action, users = affected.len(), "policy changed");
        Ok(())
    }

    fn cache_put(&self, changes: &[Change]) {
        self.cache.write().unwrap().put(changes);
    }

    /// Stages the removal of a user's own limits and memberships into `batch` (the user is
    /// being removed); [`Policy::forgotten`] updates the cache once it is committed.
    pub(in crate::service) fn forget_user(
        &self,
        batch: &mut Batch,
        user: &UserName,
    ) -> Result<ForgetUser, ServiceError> {
        let c = self.cache.read().unwrap();
        let mut changes = Vec::new();
        if c.users.contains_key(user) {
            changes.push(Change::User(user.clone(), None));
        }
        for g in c.member_of.get(user).into_iter().flatten() {
            if let Some(rec) = c.groups.get(g) {
                let mut rec = rec.clone();
                rec.members.remove(user);
                changes.push(Change::Group(g.clone(), Some(rec)));
            }
        }
        stage(batch, &changes)?;
        batch.delete(Cf::Policy, &keys::policy_online(user.as_str()));
        Ok(ForgetUser {
            user: user.clone(),
            changes,
        })
    }

    /// The cache after a removed user's policy records were committed.
    pub(in crate::service) fn forgotten(&self, f: ForgetUser) {
        self.cache_put(&f.changes);
        self.cache.write().unwrap().effective.remove(&f.user);
        self.runtime.lock().unwrap().forget_user(&f.user);
    }

    // ---- the kernel -------------------------------------------------------------------------

    /// Applies the effective policy of every user (agent start).
    pub fn reapply(&self) -> Result<(), ServiceError> {
        let t = std::time::Instant::now();
        let users = self.dir.user_names()?;
        self.apply(&users, true)?;
        tracing::info!(
            users = users.len(),
            ms = t.elapsed().as_millis(),
            "policy applied to the kernel"
        );
        Ok(())
    }

    /// Writes the effective policy of `users` to the kernel: for each of their devices the
    /// rates, the flow limit, the quota bucket (created or resized once per bucket) and the gate.
    /// With `force_gates` every gate is reconciled with the kernel's (read back), otherwise only
    /// those whose decision changed; either way a hold of another owner is kept
    /// ([`engine::gate_write`]).
    pub fn apply(&self, users: &[UserName], force_gates: bool) -> Result<(), ServiceError> {
        let now = SystemTime::now();
        let mut effs = Vec::with_capacity(users.len());
        {
            let mut c = self.cache.write().unwrap();
            for u in users {
                let e = c.effective(u);
                if e.is_timed() {
                    c.effective.insert(u.clone(), e.clone());
                } else {
                    c.effective.remove(u);
                }
                effs.push((u, e));
            }
        }
        // Buckets: one limit write per bucket, whatever the number of users sharing it.
        let mut bucket_of: HashMap<&UserName, Option<u32>> = HashMap::new();
        let mut limits: BTreeMap<u32, u64> = BTreeMap::new();
        for (u, e) in &effs {
            let b = match &e.quota.value {
                QuotaPlan::None => None,
                QuotaPlan::Personal { limit } => {
                    let id = self.bucket_for(&owner_user(u), e.period.value, e.tz.value, now)?;
                    limits.insert(id, cutoff(*limit, e.grace.value));
                    Some(id)
                }
                QuotaPlan::Pool { group, limit } => {
                    let gl = self
                        .cache
                        .read()
                        .unwrap()
                        .groups
                        .get(group)
                        .map(|g| g.limits.clone())
                        .unwrap_or_default();
                    let id = self.bucket_for(
                        &owner_group(group),
                        gl.period.unwrap_or_default(),
                        gl.tz.unwrap_or_default(),
                        now,
                    )?;
                    limits.insert(id, cutoff(*limit, gl.grace.unwrap_or_default()));
                    Some(id)
                }
            };
            bucket_of.insert(*u, b);
        }
        for (id, limit) in &limits {
            self.core.plane.policy_bucket(*id, *limit)?;
        }
        for (u, e) in &effs {
            let k = PeerKernel {
                rates: PeerRates {
                    to_peer: e.bandwidth.value.map(|b| b.0),
                    from_peer: e.bandwidth.value.map(|b| b.0),
                },
                flows: e.flows.value,
                bucket: bucket_of.get(u).copied().flatten(),
            };
            // Every kernel line of the user: its devices' and its proxy identities'
            // (`service::proxies`), programmed alike.
            let lines = self.dir.user_lines(u);
            for l in &lines {
                self.core.plane.policy_rates(l.id, k.rates)?;
                self.core.plane.policy_limits(l.id, k.flows, k.bucket)?;
            }
            if force_gates {
                let mut rt = self.runtime.lock().unwrap();
                for l in &lines {
                    rt.written.remove(&l.id);
                }
            }
            self.apply_gates(u, e, &lines, now, None)?;
        }
        Ok(())
    }

    /// The bucket of `owner`, allocated and stored on first use; its period is remembered for
    /// the tick.
    fn bucket_for(
        &self,
        owner: &str,
        period: Period,
        zone: Zone,
        now: SystemTime,
    ) -> Result<u32, ServiceError> {
        let mut buckets = self.buckets.lock().unwrap();
        if let Some(id) = buckets.follow(owner, period, zone) {
            return Ok(id);
        }
        let id = buckets.free_id().ok_or_else(|| ServiceError::Exhausted {
            what: "quota bucket".into(),
        })?;
        let rec = BucketRecord {
            id,
            period_start: engine::period_start(period, zone, now),
        };
        self.core
            .store
            .put(Cf::Policy, &keys::policy_bucket(owner), &rec)?;
        buckets.insert(owner, BucketState { rec, period, zone });
        Ok(id)
    }

    /// Decides the gates of one user's lines (devices and proxy identities, each counting as
    /// one device) and writes those that changed, as [`engine::gate_write`] allows.
    /// `handshake`: the device that just completed a handshake, or the proxy identity whose
    /// connection was just authenticated (which ends its kick). MFA gates devices only (see
    /// `service::proxies`).
    fn apply_gates(
        &self,
        user: &UserName,
        eff: &Effective,
        lines: &[Line],
        now: SystemTime,
        handshake: Option<PeerId>,
    ) -> Result<(), ServiceError> {
        let mut rt = self.runtime.lock().unwrap();
        let devices: Vec<Device> = lines
            .iter()
            .map(|l| Device {
                id: l.id,
                online_since: rt.online.get(&l.id).copied(),
            })
            .collect();
        let used = rt.used(user, engine::local_day(eff.tz.value, now));
        let expires = rt.expires.get(user).copied();
        let mfa_on = rt.mfa_on(user);
        for (id, held) in engine::gates(eff, &devices, used, now) {
            let proxy = lines.iter().any(|l| l.id == id && l.proxy);
            let mfa = match (mfa_on && !proxy, rt.mfa_admitted.get(&id)) {
                (false, _) => MfaGate::Off,
                (true, None) => MfaGate::Pending,
                (true, Some(&until)) => MfaGate::Admitted { until },
            };
            let want = engine::decide_mfa(held, expires, mfa, now);
            let shook = handshake == Some(id);
            if !shook && rt.written.get(&id) == Some(&want) {
                continue;
            }
            let kernel = self.core.plane.gate(id)?;
            if let Some(gate) = engine::gate_write(kernel, want, shook) {
                self.core.plane.set_gate(id, gate)?;
                tracing::info!(user = %user, peer = id, gate = ?gate, "policy gate");
                // A held proxy identity's connections end now, not at the client's timeout:
                // the endpoints abort them (`proxy::relay::abort`). A device's tunnel session
                // stays; its packets are dropped until the gate opens.
                if proxy && matches!(gate, Gate::Held(_)) {
                    let cut = self.core.proxies.cut(id, CutCause::Hold);
                    if cut > 0 {
                        tracing::info!(user = %user, peer = id, connections = cut, "held: proxied connections cut");
                    }
                }
            }
            rt.written.insert(id, want);
        }
        Ok(())
    }

    // ---- time and the tunnel ----------------------------------------------------------------

    /// A device completed a handshake at `now`: it is online; its user's gates are decided
    /// again (the device may be over the device limit or outside the window).
    pub fn on_connect(&self, key: &PublicKey, now: SystemTime) -> Result<(), ServiceError> {
        let Some(peer) = self.dir.peer_by_key(key) else {
            return Ok(());
        };
        self.runtime
            .lock()
            .unwrap()
            .online
            .entry(peer.id)
            .or_insert(now);
        // A kick held it; the handshake ends that hold, the policy decides afresh.
        self.regate(&peer.user, now, Some(peer.id))
    }

    /// A device went offline at `now` (disconnected or kicked): a device waiting for a free
    /// slot of its user is admitted.
    pub fn on_disconnect(&self, key: &PublicKey, now: SystemTime) -> Result<(), ServiceError> {
        let Some(peer) = self.dir.peer_by_key(key) else {
            return Ok(());
        };
        let (was_online, was_admitted) = {
            let mut rt = self.runtime.lock().unwrap();
            // The session ended: so did its MFA admission.
            (rt.online.remove(&peer.id), rt.mfa_admitted.remove(&peer.id))
        };
        if was_online.is_some() || was_admitted.is_some() {
            self.regate(&peer.user, now, None)?;
        }
        Ok(())
    }

    // ---- proxy identities (`service::proxies`) ------------------------------------------------

    /// The gate a proxy identity of `user` is programmed with before its policy is applied:
    /// admitted until the user's expiry, or held as expired (MFA does not gate proxy
    /// identities, see `service::proxies`).
    pub(in crate::service) fn first_proxy_gate(&self, user: &UserName) -> Gate {
        let rt = self.runtime.lock().unwrap();
        engine::decide(None, rt.expires.get(user).copied(), SystemTime::now())
    }

    /// Forgets what the policy knew of lines `ids` (online, the gate written, an MFA
    /// admission): a new or removed proxy identity, whatever had its id before.
    pub(in crate::service) fn forget_ids(&self, ids: &[PeerId]) {
        let mut rt = self.runtime.lock().unwrap();
        for id in ids {
            rt.online.remove(id);
            rt.written.remove(id);
            rt.mfa_admitted.remove(id);
        }
    }

    /// Whether the policy admits line `id` at `now`: its last decided gate is open (admitted,
    /// with no deadline or one ahead). A line not decided yet is not admitted. This is the
    /// policy's decision, not the kernel's gate: a kick's hold is not in it (see
    /// `service::proxies`).
    pub fn admitted(&self, id: PeerId, now: SystemTime) -> bool {
        match self.runtime.lock().unwrap().written.get(&id) {
            Some(Gate::Admitted { until }) => until.is_none_or(|t| t > now),
            Some(Gate::MfaAdmitted { until }) => *until > now,
            Some(Gate::Held(_)) | None => false,
        }
    }

    /// A connection of proxy identity `id` was authenticated at `now`: the identity is online
    /// (it counts as one device of its user from its first connection), and its gate is
    /// decided again as after a device's handshake (which ends a kick's hold). The endpoints'
    /// event sink calls it for every authenticated connection, before the connection's sockets
    /// are bound; then [`Policy::admitted`] tells whether the identity is still admitted (it may
    /// just have gone over the device limit). Unknown ids are ignored.
    pub fn on_proxy_open(&self, id: PeerId, now: SystemTime) -> Result<(), ServiceError> {
        let Some(access) = self.dir.proxy_by_id(id) else {
            return Ok(());
        };
        self.runtime.lock().unwrap().online.entry(id).or_insert(now);
        self.regate(&access.user, now, Some(id))
    }

    /// The last open connection of proxy identity `id` ended at `now`: the identity is offline
    /// (an identity or device waiting for a free slot of its user is admitted). Unknown ids are
    /// ignored.
    pub fn on_proxy_close(&self, id: PeerId, now: SystemTime) -> Result<(), ServiceError> {
        let Some(access) = self.dir.proxy_by_id(id) else {
            return Ok(());
        };
        let was_online = self.runtime.lock().unwrap().online.remove(&id);
        if was_online.is_some() {
            self.regate(&access.user, now, None)?;
        }
        Ok(())
    }

    /// Forgets that the devices of `peers` are online (they were kicked) without touching their
    /// gates.
    pub fn forget_online(&self, peers: &[Peer]) {
        let mut rt = self.runtime.lock().unwrap();
        for p in peers {
            rt.online.remove(&p.id);
            rt.written.remove(&p.id);
            // A kick ends the session, and with it its MFA admission.
            rt.mfa_admitted.remove(&p.id);
        }
    }

    fn regate(
        &self,
        user: &UserName,
        now: SystemTime,
        handshake: Option<PeerId>,
    ) -> Result<(), ServiceError> {
        let eff = {
            let c = self.cache.read().unwrap();
            c.effective
                .get(user)
                .cloned()
                .unwrap_or_else(|| c.effective(user))
        };
        let lines = self.dir.user_lines(user);
        self.apply_gates(user, &eff, &lines, now, handshake)
    }

    /// The clock moved to `now`: resets buckets whose period started since their last reset,
    /// counts online time, and re-decides the gates of users with a window, a daily time or a
    /// device limit. The daemon calls it every second; tests call it with their own clock.
    pub fn tick(&self, now: SystemTime) -> Result<(), ServiceError> {
        // Periods.
        let due = self.buckets.lock().unwrap().due(now);
        for (owner, id, start) in due {
            match self.core.plane.policy_reset(id) {
                Ok(_) | Err(crate::dataplane::DataplaneError::UnknownQuotaBucket { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let rec = BucketRecord {
                id,
                period_start: Some(start),
            };
            self.core
                .store
                .put(Cf::Policy, &keys::policy_bucket(&owner), &rec)?;
            self.buckets.lock().unwrap().reset(&owner, rec);
            tracing::info!(owner, bucket = id, "quota period started");
        }
        // Online time and gates.
        let timed: Vec<(UserName, Effective)> = self
            .cache
            .read()
            .unwrap()
            .effective
            .iter()
            .filter(|(_, e)| e.is_timed())
            .map(|(u, e)| (u.clone(), e.clone()))
            .collect();
        let elapsed = self.runtime.lock().unwrap().advance(now);
        for (u, e) in &timed {
            let lines = self.dir.user_lines(u);
            let today = engine::local_day(e.tz.value, now);
            self.runtime
                .lock()
                .unwrap()
                .count(u, &lines, today, elapsed);
            self.apply_gates(u, e, &lines, now, None)?;
        }
        // Expiries: the kernel cut the devices at the deadline by itself; once after it, their
        // gates are decided again, so they are held under the reason `expired` (and a deadline
        // off by a step of the wall clock is corrected before it, at each change).
        let expired: Vec<UserName> = {
            let rt = self.runtime.lock().unwrap();
            rt.expires
                .iter()
                .filter(|(u, t)| **t <= now && !rt.expired_seen.contains(*u))
                .map(|(u, _)| u.clone())
                .collect()
        };
        for u in expired {
            if !timed.iter().any(|(t, _)| *t == u) {
                self.regate(&u, now, None)?;
            }
            self.runtime.lock().unwrap().expired_seen.insert(u);
        }
        // MFA admissions whose lifetime passed: the kernel holds those devices by itself
        // (`PEER_F_DEADLINE_MFA`); the admission is forgotten and the gate written as held.
        let lapsed: Vec<PeerId> = {
            let mut rt = self.runtime.lock().unwrap();
            let ids: Vec<PeerId> = rt
                .mfa_admitted
                .iter()
                .filter(|(_, t)| **t <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                rt.mfa_admitted.remove(id);
            }
            ids
        };
        let mut users: BTreeSet<UserName> = BTreeSet::new();
        if !lapsed.is_empty() {
            self.dir.with_records(|it| {
                for r in it {
                    if lapsed.contains(&r.peer.id) {
                        users.insert(r.peer.user.clone());
                    }
                }
            });
        }
        for u in users {
            self.regate(&u, now, None)?;
        }
        self.save_online_time(&timed)
    }

    /// Writes the online time of the users in `timed` with a daily time whose time grew by
    /// [`ONLINE_SAVE_EVERY`] since it was last written, or reached the limit; one unsynced
    /// batch (see the module docs).
    fn save_online_time(&self, timed: &[(UserName, Effective)]) -> Result<(), ServiceError> {
        let due = self.runtime.lock().unwrap().due_saves(timed);
        if due.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for (u, (day, d)) in &due {
            let rec = OnlineRecord {
                user: u.clone(),
                day: day.format(DAY_FORMAT).to_string(),
                secs: d.as_secs(),
            };
            batch.put(Cf::Policy, &keys::policy_online(u.as_str()), &rec)?;
        }
        // Not synced: it survives a SIGKILL; a power loss forgets the day's time (module docs).
        let _ = self.core.store.write(batch)?;
        self.runtime.lock().unwrap().saved.extend(due);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
