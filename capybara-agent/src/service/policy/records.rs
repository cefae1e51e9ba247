//! What the policy keeps in the store: groups, users' own layers, quota buckets and online
//! time as records, and [`Change`], one record a policy change writes, with [`stage`], its
//! batch writes.

use std::{collections::BTreeSet, time::Duration};

use serde::{Deserialize, Serialize};

use super::model::{ByteSize, GroupName, Limits};
use crate::{
    service::{
        domain::UserName,
        templates::model::{QuotaTemplate, ServerSettings, TemplateName},
    },
    store::{Batch, Cf, StoreError, keys},
};

/// A group as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Its name.
    pub name: GroupName,
    /// Its members.
    pub members: BTreeSet<UserName>,
    /// Its policy.
    pub limits: Limits,
    /// One budget per period for all members.
    pub shared_limit: Option<ByteSize>,
}

/// A user's own policy layer as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPolicy {
    /// The overrides.
    pub limits: Limits,
    /// The quota template applied to the user (its template layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateName>,
}

impl UserPolicy {
    /// Whether the record says nothing (and need not be stored).
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty() && self.template.is_none()
    }
}

/// A group with its members and policy.
pub type GroupView = GroupRecord;

/// A bucket as stored: its id and the period start it was last reset for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct BucketRecord {
    /// The bucket id in the kernel.
    pub(super) id: u32,
    /// The start of the period it was last reset for (Unix seconds).
    pub(super) period_start: Option<i64>,
}

/// How much a user's online time grows before the tick writes it again (see the module docs).
pub const ONLINE_SAVE_EVERY: Duration = Duration::from_secs(60);

/// A user's online time on one local day as stored (`online/<user>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct OnlineRecord {
    /// The user.
    pub(super) user: UserName,
    /// The local day in the user's zone, `YYYY-MM-DD`.
    pub(super) day: String,
    /// Seconds online that day.
    pub(super) secs: u64,
}

/// The store's format of a local day.
pub(super) const DAY_FORMAT: &str = "%Y-%m-%d";

/// One record a policy change writes.
#[derive(Clone, Debug)]
pub(in crate::service) enum Change {
    User(UserName, Option<UserPolicy>),
    Group(GroupName, Option<GroupRecord>),
    Default(Limits),
    QuotaTemplate(TemplateName, Option<Limits>),
    Settings(ServerSettings),
}

/// The bucket owner of a user's own quota.
pub(super) fn owner_user(u: &UserName) -> String {
    format!("user:{u}")
}

/// The bucket owner of a group's pool.
pub(super) fn owner_group(g: &GroupName) -> String {
    format!("group:{g}")
}

/// Stages the store writes of `changes`.
pub(super) fn stage(batch: &mut Batch, changes: &[Change]) -> Result<(), StoreError> {
    for ch in changes {
        match ch {
            Change::User(u, Some(p)) => {
                batch.put(Cf::Policy, &keys::policy_user(u.as_str()), &(u, p))?;
            }
            Change::User(u, None) => batch.delete(Cf::Policy, &keys::policy_user(u.as_str())),
            Change::Group(g, Some(r)) => batch.put(Cf::Groups, &keys::group(g.as_str()), r)?,
            Change::Group(g, None) => batch.delete(Cf::Groups, &keys::group(g.as_str())),
            Change::Default(l) => batch.put(Cf::Policy, keys::POLICY_DEFAULT, l)?,
            Change::QuotaTemplate(t, Some(l)) => batch.put(
                Cf::Policy,
                &keys::policy_quota_template(t.as_str()),
                &QuotaTemplate {
                    name: t.clone(),
                    limits: l.clone(),
                },
            )?,
            Change::QuotaTemplate(t, None) => {
                batch.delete(Cf::Policy, &keys::policy_quota_template(t.as_str()));
            }
            Change::Settings(st) => batch.put(Cf::Policy, keys::POLICY_SETTINGS, st)?,
        }
    }
    Ok(())
}
