//! Policy files: the declarative desired state (users with their devices and own limits, groups,
//! quota templates, the server default) applied all or nothing, diffed and exported. [`doc`] is
//! the file's format and the plan of a change; this module the service calls.
//!
//! ## All or nothing, even across a kill: a journal completed at start
//! An apply is several store batches, not one: each new user and device goes through
//! `users`/`devices` (address and peer id allocation, key generation, tunnel and kernel
//! programming, each its own batch that those modules undo on a refusal), then the policy
//! changes are one batch of their own. One batch for all of it would mean a second copy of the
//! user and device creation inside this module, so the apply is journalled instead: before its
//! first write, the document and the actor are written to [`JOURNAL_KEY`] (`meta` family; a
//! write survives a kill of the agent once it returned), and the journal is deleted after the
//! last step, or after a failed step's undo. A journal found when the service opens means the
//! agent was killed mid-apply: the document is applied again ([`PolicyFiles::complete_journal`],
//! after the devices and the policy were reconciled) — apply is declarative, so what the killed
//! run already did is not in the new plan and only the rest is done — and the journal deleted.
//! So after a restart either all of the apply is there (a journal existed), or none of it (the
//! agent died before the journal was written). If the completion itself fails (the store or
//! the address pool refuses), its own steps are undone, the error is logged and the journal
//! deleted: the users and devices the killed run created stay, and the log says so.

pub mod doc;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, to_json},
    devices::Devices,
    domain::{Actor, DeviceName, UserName},
    policy::Policy,
    users::{NewUser, Users},
};
use crate::store::{Batch, Cf};

/// The key (in `Cf::Meta`) of the journal of an apply in progress ([`Journal`]).
pub const JOURNAL_KEY: &str = "journal/policy-apply";

/// An apply in progress: what to complete if the agent is killed before it ends.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    actor: Actor,
    doc: doc::PolicyDoc,
}

/// The points between an apply's steps where a test can make it stop as if the agent had been
/// killed there (no undo, the journal left in place).
#[cfg(test)]
pub(crate) mod failpoint {
    use std::cell::Cell;

    /// Where to stop.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Kill {
        /// After the journal is written, before any user.
        Journalled,
        /// After the users and devices, before the policy changes.
        DevicesAdded,
        /// After the policy changes, before the journal is deleted.
        PolicyWritten,
    }

    thread_local! {
        static AT: Cell<Option<Kill>> = const { Cell::new(None) };
    }

    /// Stops this thread's next apply at `at`.
    pub(crate) fn arm(at: Kill) {
        AT.with(|c| c.set(Some(at)));
    }

    /// Whether to stop here (disarms).
    pub(super) fn hit(here: Kill) -> bool {
        AT.with(|c| {
            let hit = c.get() == Some(here);
            if hit {
                c.set(None);
            }
            hit
        })
    }
}

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
        self.core.store.put(
            Cf::Meta,
            JOURNAL_KEY,
            &Journal {
                actor: actor.clone(),
                doc: d.clone(),
            },
        )?;
        #[cfg(test)]
        if failpoint::hit(failpoint::Kill::Journalled) {
            return Err(killed());
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
            #[cfg(test)]
            if failpoint::hit(failpoint::Kill::DevicesAdded) {
                return Err(killed());
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
        let done = step();
        #[cfg(test)]
        if matches!(&done, Err(e) if is_killed(e))
            || (done.is_ok() && failpoint::hit(failpoint::Kill::PolicyWritten))
        {
            return Err(killed());
        }
        if let Err(e) = &done {
            undo(&created, &added);
            tracing::warn!(error = %e, "policy apply failed; its users and devices were removed");
        }
        let mut b = Batch::default();
        b.delete(Cf::Meta, JOURNAL_KEY);
        let _ = self.core.store.write(b)?;
        done.map(|()| plan.diff)
    }

    /// Completes an apply the agent was killed in (see the module docs): applies the journalled
    /// document again and deletes the journal. Called once when the service opens; a failure
    /// is logged, never keeps the agent from starting.
    pub fn complete_journal(&self) -> Result<(), ServiceError> {
        let Some(j) = self.core.store.get::<Journal>(Cf::Meta, JOURNAL_KEY)? else {
            return Ok(());
        };
        tracing::warn!("a policy apply was interrupted; completing it");
        match self.apply_document(&j.actor, &j.doc, false) {
            Ok(diff) => tracing::info!(changes = diff.len(), "interrupted policy apply completed"),
            Err(e) => tracing::error!(
                error = %e,
                "cannot complete the interrupted policy apply; users and devices it created before \
                 the agent stopped remain"
            ),
        }
        let mut b = Batch::default();
        b.delete(Cf::Meta, JOURNAL_KEY);
        let _ = self.core.store.write(b)?;
        Ok(())
    }
}

/// What a failpoint stops an apply with (the caller sees an error, the store is left as a kill
/// would leave it).
#[cfg(test)]
fn killed() -> ServiceError {
    ServiceError::Exhausted {
        what: KILLED.into(),
    }
}

#[cfg(test)]
const KILLED: &str = "failpoint: agent killed";

#[cfg(test)]
fn is_killed(e: &ServiceError) -> bool {
    matches!(e, ServiceError::Exhausted { what } if what == KILLED)
}

#[cfg(test)]
mod tests;
