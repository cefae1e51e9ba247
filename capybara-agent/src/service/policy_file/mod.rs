//! Policy files: the declarative desired state (users with their devices and own limits, groups,
//! quota templates, the server default) applied all or nothing, diffed and exported. [`doc`] is
//! the file's format and the plan of a change; this module the service calls.

pub mod doc;

use std::sync::Arc;

use super::{
    ServiceError,
    core::{Core, to_json},
    devices::Devices,
    domain::{Actor, DeviceName, UserName},
    policy::Policy,
    users::{NewUser, Users},
};

/// The policy-files feature.
#[derive(Debug)]
pub struct PolicyFiles {
    core: Arc<Core>,
    policy: Arc<Policy>,
    users: Arc<Users>,
    devices: Arc<Devices>,
}

impl PolicyFiles {
    /// The feature over the policy and the features that create users and devices.
    pub fn new(
        core: Arc<Core>,
        policy: Arc<Policy>,
        users: Arc<Users>,
        devices: Arc<Devices>,
    ) -> PolicyFiles {
        PolicyFiles {
            core,
            policy,
            users,
            devices,
        }
    }

    /// The current policy as a document (users with their devices and own limits, groups,
    /// default).
    pub fn export_document(&self) -> Result<doc::PolicyDoc, ServiceError> {
        let users = self.users.list_users()?;
        let c = self.policy.read();
        Ok(doc::PolicyDoc {
            default: c.default.clone(),
            users: users
                .into_iter()
                .map(|d| {
                    let p = c.users.get(&d.user.name).cloned().unwrap_or_default();
                    let devices = d.peers.into_iter().map(|p| p.device).collect();
                    (
                        d.user.name,
                        doc::UserDoc {
                            devices,
                            limits: p.limits,
                            template: p.template,
                        },
                    )
                })
                .collect(),
            groups: c
                .groups
                .values()
                .map(|g| {
                    (
                        g.name.clone(),
                        doc::GroupDoc {
                            members: g.members.clone(),
                            limits: g.limits.clone(),
                            shared_limit: g.shared_limit,
                        },
                    )
                })
                .collect(),
            templates: c.templates.clone(),
        })
    }

    fn plan_document(&self, d: &doc::PolicyDoc) -> Result<doc::Plan, ServiceError> {
        let users = self
            .users
            .list_users()?
            .into_iter()
            .map(|d| (d.user.name, d.peers.into_iter().map(|p| p.device).collect()))
            .collect();
        let c = self.policy.read();
        Ok(doc::plan(
            d,
            &doc::Current {
                users,
                limits: &c.users,
                groups: &c.groups,
                default: &c.default,
                templates: &c.templates,
            },
        )?)
    }

    /// Applies a policy document (see [`doc`]): returns the diff; with `dry_run`, or when the
    /// diff is empty, nothing is changed.
    pub fn apply_document(
        &self,
        actor: &Actor,
        d: &doc::PolicyDoc,
        dry_run: bool,
    ) -> Result<Vec<String>, ServiceError> {
        let plan = self.plan_document(d)?;
        if dry_run || plan.diff.is_empty() {
            return Ok(plan.diff);
        }
        // Users and devices first (each its own synced write); undone if the rest fails.
        let mut created: Vec<UserName> = Vec::new();
        let mut added: Vec<(UserName, DeviceName)> = Vec::new();
        let undo = |created: &[UserName], added: &[(UserName, DeviceName)]| {
            for u in created {
                if let Err(e) = self.users.remove_user(actor, u) {
                    tracing::error!(error = %e, user = %u, "cannot undo a user created by a failed apply");
                }
            }
            for (u, dev) in added {
                if let Err(e) = self.devices.remove_device(actor, u, dev) {
                    tracing::error!(error = %e, user = %u, "cannot undo a device added by a failed apply");
                }
            }
        };
        let mut step = || -> Result<(), ServiceError> {
            for (u, devices) in &plan.new_users {
                self.users.add_user(
                    actor,
                    NewUser {
                        name: u.clone(),
                        device: devices[0].clone(),
                        expires_at: None,
                    },
                )?;
                created.push(u.clone());
                for dev in &devices[1..] {
                    self.devices.add_device(actor, u, dev)?;
                }
            }
            for (u, dev) in &plan.new_devices {
                self.devices.add_device(actor, u, dev)?;
                added.push((u.clone(), dev.clone()));
            }
            let _w = self.core.writer.lock().unwrap();
            let p = self.plan_document(d)?;
            if p.changes.is_empty() {
                return Ok(());
            }
            self.policy.change(
                actor,
                "policy.apply",
                "policy:document".into(),
                None,
                to_json(&plan.diff),
                p.changes,
                p.affected.into_iter().collect(),
            )
        };
        if let Err(e) = step() {
            undo(&created, &added);
            return Err(e);
        }
        Ok(plan.diff)
    }
}
