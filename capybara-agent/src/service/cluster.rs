//! The cluster feature (issue 25): this agent's node of an etcd cluster, when it is one
//! (`crate::cluster::Node`, set by the daemon at start); status and health for the API; the
//! cluster's changes applied here ([`Service::apply_shared`]: the store, then each feature's
//! records read again and the kernel and the tunnel reprogrammed).

use std::{
    collections::BTreeSet,
    sync::{Arc, OnceLock},
};

use super::{Service, ServiceError, domain::UserName};
use crate::{
    cluster::{ClusterError, ClusterHealth, ClusterStatus, Node, state::Applier},
    store::{Cf, SharedOp, keys},
};

/// This agent's node, if it is one.
#[derive(Debug, Default)]
pub struct Cluster {
    node: OnceLock<Arc<Node>>,
}

impl Cluster {
    /// Makes the agent a node of the cluster `node` belongs to (once; the daemon at start).
    pub fn set_node(&self, node: Arc<Node>) {
        let _ = self.node.set(node);
    }

    /// The node, if the agent is one.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.get().cloned()
    }

    /// The cluster's nodes; a status saying "not clustered" when the agent is not a node.
    pub async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        match self.node() {
            Some(n) => n.status().await,
            None => Ok(ClusterStatus::default()),
        }
    }

    /// etcd's members and the lease as this node sees them; "not clustered" when it is none.
    pub async fn health(&self) -> ClusterHealth {
        match self.node() {
            Some(n) => n.health().await,
            None => ClusterHealth::default(),
        }
    }
}

impl Service {
    /// Applies the cluster's change at `revision` (`crate::cluster::state`) under the writer
    /// lock: the store first, then the features whose records it touched read them again and
    /// reprogram the kernel and the tunnel ([`Touched`]). A revision applied already is skipped.
    pub fn apply_shared(&self, revision: i64, ops: &[SharedOp]) -> Result<bool, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        if !self.core.store.apply_shared(revision, ops)? {
            return Ok(false);
        }
        self.reload_shared(&Touched::of(ops))?;
        Ok(true)
    }

    /// Makes the shared records exactly the cluster's `state` at `revision` (a first join, or
    /// after a compaction), then reloads what changed (every user of a touched family).
    pub fn replace_shared(&self, revision: i64, state: &[SharedOp]) -> Result<(), ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let families = self.core.store.replace_shared(revision, state)?;
        self.reload_shared(&Touched::everyone(&families))
    }

    /// The features holding touched records in memory read them again; the policy is applied
    /// to the users concerned.
    fn reload_shared(&self, t: &Touched) -> Result<(), ServiceError> {
        let started = std::time::Instant::now();
        let users = (!t.everyone).then_some(&t.users);
        if t.devices {
            self.devices.resync(users)?;
            self.proxies.resync(users)?;
        }
        if t.policy_all {
            self.policy.reload()?;
        } else if !t.users.is_empty() {
            self.policy.reload_users(&t.users)?;
        }
        if t.mfa {
            self.mfa.reload()?;
        }
        if t.devices || t.policy_all || t.mfa || !t.users.is_empty() {
            let users: Vec<UserName> = if t.everyone {
                self.directory.user_names()?
            } else {
                t.users.iter().cloned().collect()
            };
            self.policy.apply(&users, false)?;
            tracing::debug!(
                users = users.len(),
                ms = started.elapsed().as_millis(),
                "cluster: devices and policy reloaded"
            );
        }
        if t.schedules {
            self.schedules.reload();
        }
        if t.webhooks {
            self.webhooks.resync()?;
        }
        Ok(())
    }
}

/// What one cluster change touches, and so what is read again: the users named by its keys
/// (a user, its devices, proxy identities, own limits, MFA record) or everyone (a group, the
/// default limits, a template, the settings: they reach users through their effective
/// policy).
#[derive(Debug, Default)]
struct Touched {
    users: BTreeSet<UserName>,
    everyone: bool,
    /// Users, devices or proxy identities.
    devices: bool,
    /// Policy records other than users' own, or groups: the whole cache is read again.
    policy_all: bool,
    mfa: bool,
    schedules: bool,
    webhooks: bool,
}

impl Touched {
    fn of(ops: &[SharedOp]) -> Touched {
        let mut t = Touched::default();
        let user = |s: &str| UserName::parse("user", s).ok();
        for op in ops {
            let first = op.key.split('/').next().unwrap_or("");
            match op.cf {
                Cf::Users | Cf::Peers | Cf::Proxies => {
                    t.devices = true;
                    t.users.extend(user(first));
                }
                Cf::Tokens => {}
                Cf::Policy => {
                    if let Some(name) = op.key.strip_prefix(keys::POLICY_USERS) {
                        t.users.extend(user(name));
                    } else if let Some(name) = op.key.strip_prefix(keys::MFA_USERS) {
                        t.mfa = true;
                        t.users.extend(user(name));
                    } else if op.key == keys::MFA_SETTINGS {
                        t.mfa = true;
                        t.everyone = true;
                    } else {
                        t.policy_all = true;
                        t.everyone = true;
                    }
                }
                Cf::Groups => {
                    t.policy_all = true;
                    t.everyone = true;
                }
                Cf::Schedules => t.schedules = true,
                Cf::Webhooks => t.webhooks = true,
                _ => {}
            }
        }
        t
    }

    /// Every user of each family in `families`.
    fn everyone(families: &[Cf]) -> Touched {
        let has = |cf: Cf| families.contains(&cf);
        Touched {
            users: BTreeSet::new(),
            everyone: true,
            devices: has(Cf::Users) || has(Cf::Peers) || has(Cf::Proxies),
            policy_all: has(Cf::Policy) || has(Cf::Groups),
            mfa: has(Cf::Policy),
            schedules: has(Cf::Schedules),
            webhooks: has(Cf::Webhooks),
        }
    }
}

impl Applier for Service {
    fn revision(&self) -> i64 {
        self.core.store.shared_revision()
    }

    fn local_state(&self) -> Result<Vec<SharedOp>, String> {
        self.core.store.shared_state().map_err(|e| e.to_string())
    }

    fn apply(&self, revision: i64, ops: &[SharedOp]) -> Result<(), String> {
        self.apply_shared(revision, ops)
            .map(drop)
            .map_err(|e| chain(&e))
    }

    fn replace(&self, revision: i64, state: &[SharedOp]) -> Result<(), String> {
        self.replace_shared(revision, state).map_err(|e| chain(&e))
    }
}

/// `e` with its sources, `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(x) = source {
        s.push_str(": ");
        s.push_str(&x.to_string());
        source = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(cf: Cf, key: &str) -> SharedOp {
        SharedOp {
            cf,
            key: key.into(),
            value: Some(b"{}".to_vec()),
        }
    }

    fn names(t: &Touched) -> Vec<&str> {
        t.users.iter().map(UserName::as_str).collect()
    }

    #[test]
    fn a_change_touches_the_users_its_keys_name() {
        let t = Touched::of(&[
            op(Cf::Users, "alice"),
            op(Cf::Peers, "alice/phone"),
            op(Cf::Proxies, "bob/vless"),
            op(Cf::Policy, &keys::policy_user("carol")),
            op(Cf::Tokens, "tok1"),
        ]);
        assert_eq!(names(&t), ["alice", "bob", "carol"]);
        assert!(t.devices && !t.everyone && !t.policy_all && !t.mfa);
        let t = Touched::of(&[op(Cf::Policy, &keys::mfa_user("dave"))]);
        assert_eq!(names(&t), ["dave"]);
        assert!(t.mfa && !t.everyone && !t.devices);
        let t = Touched::of(&[op(Cf::Tokens, "tok1")]);
        assert!(t.users.is_empty() && !t.devices && !t.everyone);
    }

    #[test]
    fn a_group_default_template_or_setting_touches_everyone() {
        for o in [
            op(Cf::Groups, "staff"),
            op(Cf::Policy, keys::POLICY_DEFAULT),
            op(Cf::Policy, &keys::policy_quota_template("basic")),
            op(Cf::Policy, keys::POLICY_SETTINGS),
        ] {
            let t = Touched::of(std::slice::from_ref(&o));
            assert!(t.everyone && t.policy_all, "{o:?}");
        }
        let t = Touched::of(&[op(Cf::Policy, keys::MFA_SETTINGS)]);
        assert!(t.everyone && t.mfa && !t.policy_all);
        let t = Touched::of(&[op(Cf::Schedules, "task/1"), op(Cf::Webhooks, "hook/a")]);
        assert!(t.schedules && t.webhooks && !t.everyone && !t.devices);
    }
}
