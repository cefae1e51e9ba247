//! Service-level events: what the service did, as typed values on a broadcast bus, for webhooks
//! (`config-changed`) and anything else that listens (`Service::events`).
//!
//! ## `config-changed`
//! Every mutation writes one audit record in the batch that commits it (see `core`);
//! the core's commit step is the one place that publishes [`ServiceEvent::ConfigChanged`] for
//! it, after the batch is written: the change is visible to reads and survives a SIGKILL of the
//! agent (power loss too once the API's `settle` returned, before its reply). A change that is
//! undone afterwards (the kernel or the tunnel refused it, so its audit record is deleted again)
//! publishes nothing; neither does a refused call (bad input, not found: nothing was written).
//! So there is exactly one event per audit record that stays, in audit order.
//!
//! The bus is a `tokio::sync::broadcast` channel of [`EVENT_BUS_CAPACITY`] events: publishing
//! never blocks the writer, and a subscriber that falls behind loses the oldest events (its
//! receiver reports how many), like the daemon's kernel event bus.

use std::time::SystemTime;

/// Events buffered per subscriber before the slowest loses the oldest.
pub const EVENT_BUS_CAPACITY: usize = 4096;

/// Something the service did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceEvent {
    /// A mutation took effect (`config-changed`): one per audit record.
    ConfigChanged {
        /// The audit record's sequence number.
        seq: u64,
        /// Who (the actor's display form, as in the audit record: `uid:0`, `token:<id>`).
        actor: String,
        /// What, e.g. `user.add`, `group.policy` (the audit record's action).
        action: String,
        /// On what, e.g. `user:alice` (the audit record's target).
        target: String,
        /// When (the audit record's time, whole seconds).
        at: SystemTime,
    },
    /// A webhook event was written to the outbox (`service::notify`): published after the
    /// write, so a listener sees only events that will be delivered.
    Notified(Box<super::notify::Notification>),
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::broadcast::{Receiver, error::TryRecvError};

    use super::*;
    use crate::service::{
        NewToken, NewUser, Service, ServiceConfig, ServiceError,
        domain::{Actor, DeviceName, Scope, UserName},
        policy::{
            LimitsTarget,
            model::{Cap, GroupName, LimitsText},
        },
        testing::{MemoryPlane, open_service},
    };

    fn open(dir: &std::path::Path, plane: Arc<MemoryPlane>) -> Service {
        open_service(
            dir,
            plane,
            ServiceConfig::for_tests("10.97.0.1/24", "fd97::1/64", "vpn.example.com:51820"),
        )
    }

    fn user(name: &str, device: &str) -> NewUser {
        NewUser {
            name: UserName::parse("user", name).unwrap(),
            device: DeviceName::parse("device", device).unwrap(),
            expires_at: None,
        }
    }

    fn patch(f: impl FnOnce(&mut LimitsText)) -> crate::service::policy::model::LimitsPatch {
        let mut t = LimitsText::default();
        f(&mut t);
        t.parse().unwrap()
    }

    /// The one event `rx` holds: its (actor, action, target); nothing else may follow.
    fn one(rx: &mut Receiver<ServiceEvent>, what: &str) -> (String, String, String) {
        let ev = rx
            .try_recv()
            .unwrap_or_else(|e| panic!("no config-changed event for {what}: {e}"));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty), "after {what}");
        let ServiceEvent::ConfigChanged {
            actor,
            action,
            target,
            at,
            ..
        } = ev
        else {
            panic!("{what}: not a config-changed event: {ev:?}");
        };
        assert!(at <= SystemTime::now() && at > SystemTime::UNIX_EPOCH);
        (actor, action, target)
    }

    fn none(rx: &mut Receiver<ServiceEvent>, what: &str) {
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty), "{what}");
    }

    #[test]
    fn each_mutation_raises_one_config_changed_and_a_refused_one_none() {
        let dir = tempfile::tempdir().unwrap();
        let plane = Arc::new(MemoryPlane::default());
        let svc = open(dir.path(), plane.clone());
        let mut rx = svc.events().subscribe();
        let root = Actor::Local { uid: 0 };
        let ev = |a: &str, t: &str| ("uid:0".to_owned(), a.to_owned(), t.to_owned());

        svc.users.add_user(&root, user("alice", "laptop")).unwrap();
        assert_eq!(one(&mut rx, "user add"), ev("user.add", "user:alice"));
        let alice = UserName::parse("user", "alice").unwrap();
        svc.policy
            .set_limits(
                &root,
                &LimitsTarget::User(alice.clone()),
                &patch(|t| t.limit = Some("10GB".into())),
            )
            .unwrap();
        assert_eq!(
            one(&mut rx, "quota set"),
            ev("policy.user.set", "user:alice")
        );
        let staff = GroupName::parse("group", "staff").unwrap();
        svc.policy.create_group(&root, &staff).unwrap();
        assert_eq!(
            one(&mut rx, "group create"),
            ev("group.create", "group:staff")
        );
        svc.policy
            .set_group_policy(
                &root,
                &staff,
                &patch(|t| t.flows = Some("50".into())),
                Some(Cap::Limit(crate::service::policy::model::ByteSize(
                    5_000_000,
                ))),
            )
            .unwrap();
        assert_eq!(
            one(&mut rx, "group policy"),
            ev("group.policy", "group:staff")
        );
        let (token, _) = svc
            .tokens
            .create_token(
                &root,
                NewToken {
                    scope: Scope::Write,
                    name: "billing".into(),
                    expires_at: None,
                    user: None,
                },
            )
            .unwrap();
        assert_eq!(
            one(&mut rx, "token create"),
            ev("token.create", &format!("token:{}", token.id))
        );
        // A policy document that changes limits only: one change, one event.
        let mut doc = svc.policy_files.export_document().unwrap();
        doc.users.get_mut(&alice).unwrap().limits = svc
            .policy
            .get_limits(&LimitsTarget::User(alice.clone()))
            .unwrap()
            .patched(&patch(|t| t.flows = Some("7".into())));
        assert!(
            !svc.policy_files
                .apply_document(&root, &doc, false)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            one(&mut rx, "policy apply"),
            ev("policy.apply", "policy:document")
        );
        // A token's actor is the token.
        let by_token = Actor::Token {
            id: token.id.clone(),
            scope: Scope::Write,
        };
        svc.monitor.kick(&by_token, &alice).unwrap();
        let (actor, action, _) = one(&mut rx, "kick");
        assert_eq!(
            (actor, action),
            (format!("token:{}", token.id), "connection.kick".to_owned())
        );

        // Refused: bad input, unknown names, duplicates, a device the dataplane refused.
        assert!(svc.users.add_user(&root, user("alice", "laptop")).is_err());
        none(&mut rx, "a duplicate user");
        let ghost = GroupName::parse("group", "ghost").unwrap();
        assert!(matches!(
            svc.policy
                .set_group_policy(&root, &ghost, &patch(|_| {}), None),
            Err(ServiceError::NotFound { .. })
        ));
        none(&mut rx, "an unknown group");
        assert!(
            svc.tokens
                .create_token(
                    &root,
                    NewToken {
                        scope: Scope::Read,
                        name: "bad\nname".into(),
                        expires_at: None,
                        user: None,
                    },
                )
                .is_err()
        );
        none(&mut rx, "a token with a bad name");
        plane.with(|s| s.fail_next_set_peer = true);
        assert!(svc.users.add_user(&root, user("bob", "laptop")).is_err());
        none(&mut rx, "a user the dataplane refused (undone)");
        // The next change gets the next audit record and its event.
        svc.users.add_user(&root, user("bob", "laptop")).unwrap();
        assert_eq!(one(&mut rx, "user add"), ev("user.add", "user:bob"));
        let seqs: Vec<u64> = svc
            .core
            .audit_records(None, 100)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs.len(), 8, "{seqs:?}");
    }
}
