//! The policy's records in memory: every user's own layer, the groups (and who is in which),
//! the server default, the quota templates and the server settings, read from the store at
//! start and changed only after a change is committed; and the effective policy of a user
//! computed from them ([`Cache::effective`], the one place that resolves the layers).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    model::{GroupName, Limits},
    records::{Change, GroupRecord, UserPolicy},
    resolve::{Effective, GroupLayer, Layers, resolve},
};
use crate::{
    service::{
        domain::UserName,
        templates::model::{QuotaTemplate, ServerSettings, TemplateName},
    },
    store::{Cf, Store, StoreError, keys},
};

/// What is cached from the store.
#[derive(Debug, Default)]
pub(in crate::service) struct Cache {
    pub(in crate::service) users: BTreeMap<UserName, UserPolicy>,
    pub(in crate::service) groups: BTreeMap<GroupName, GroupRecord>,
    pub(in crate::service) default: Limits,
    /// Quota templates.
    pub(in crate::service) templates: BTreeMap<TemplateName, Limits>,
    /// The server settings set by the last configuration template applied.
    pub(in crate::service) settings: ServerSettings,
    /// User → its groups.
    pub(in crate::service) member_of: BTreeMap<UserName, BTreeSet<GroupName>>,
    /// The last effective policy applied, of the users the tick must look at
    /// ([`Effective::is_timed`]); the others' is computed when needed. Keeping it for every
    /// user cost 60 MiB at 100 000 users (an `Effective` is ≈ 450 B), for nothing the tick reads.
    pub(in crate::service) effective: HashMap<UserName, Effective>,
}

impl Cache {
    /// Reads the records from the store.
    pub(super) fn load(store: &Store) -> Result<Cache, StoreError> {
        let mut cache = Cache {
            default: store
                .get(Cf::Policy, keys::POLICY_DEFAULT)?
                .unwrap_or_default(),
            ..Cache::default()
        };
        for (_, u) in store.scan::<(UserName, UserPolicy)>(Cf::Policy, keys::POLICY_USERS)? {
            cache.users.insert(u.0, u.1);
        }
        for (_, t) in store.scan::<QuotaTemplate>(Cf::Policy, keys::POLICY_QUOTA_TEMPLATES)? {
            cache.templates.insert(t.name, t.limits);
        }
        cache.settings = store
            .get(Cf::Policy, keys::POLICY_SETTINGS)?
            .unwrap_or_default();
        for (_, g) in store.scan::<GroupRecord>(Cf::Groups, "")? {
            cache.groups.insert(g.name.clone(), g);
        }
        cache.index();
        Ok(cache)
    }

    /// What `changes` would replace: the same records as they are now (to undo them).
    pub(super) fn current(&self, changes: &[Change]) -> Vec<Change> {
        changes
            .iter()
            .map(|ch| match ch {
                Change::User(u, _) => Change::User(u.clone(), self.users.get(u).cloned()),
                Change::Group(g, _) => Change::Group(g.clone(), self.groups.get(g).cloned()),
                Change::Default(_) => Change::Default(self.default.clone()),
                Change::QuotaTemplate(t, _) => {
                    Change::QuotaTemplate(t.clone(), self.templates.get(t).cloned())
                }
                Change::Settings(_) => Change::Settings(self.settings.clone()),
            })
            .collect()
    }

    /// Applies committed `changes`.
    pub(super) fn put(&mut self, changes: &[Change]) {
        for ch in changes {
            match ch.clone() {
                Change::User(u, Some(p)) => {
                    self.users.insert(u, p);
                }
                Change::User(u, None) => {
                    self.users.remove(&u);
                }
                Change::Group(g, Some(r)) => {
                    self.groups.insert(g, r);
                }
                Change::Group(g, None) => {
                    self.groups.remove(&g);
                }
                Change::Default(l) => self.default = l,
                Change::QuotaTemplate(t, Some(l)) => {
                    self.templates.insert(t, l);
                }
                Change::QuotaTemplate(t, None) => {
                    self.templates.remove(&t);
                }
                Change::Settings(st) => self.settings = st,
            }
        }
        self.index();
    }

    fn index(&mut self) {
        self.member_of.clear();
        for g in self.groups.values() {
            for m in &g.members {
                self.member_of
                    .entry(m.clone())
                    .or_default()
                    .insert(g.name.clone());
            }
        }
    }

    pub(in crate::service) fn effective(&self, user: &UserName) -> Effective {
        let groups = self
            .member_of
            .get(user)
            .into_iter()
            .flatten()
            .filter_map(|g| self.groups.get(g))
            .map(|g| GroupLayer {
                name: &g.name,
                limits: &g.limits,
                shared_limit: g.shared_limit,
            })
            .collect();
        let template = self
            .users
            .get(user)
            .and_then(|u| u.template.as_ref())
            .and_then(|t| self.templates.get_key_value(t))
            .map(|(n, l)| (n.as_str(), l));
        resolve(&Layers {
            user: self.users.get(user).map(|u| &u.limits),
            groups,
            template,
            default: &self.default,
        })
    }
}
