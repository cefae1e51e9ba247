//! An apply killed between its steps (a failpoint leaves the store as a kill would) is complete
//! after a restart: the journal is replayed when the service opens.

use std::sync::Arc;

use super::{JOURNAL_KEY, doc::PolicyDoc, failpoint};
use crate::{
    service::{
        NewUser, Service, ServiceConfig,
        domain::{Actor, DeviceName, UserName},
        testing::{MemoryPlane, MemoryTunnel},
    },
    store::{Cf, Store},
};

const DOC: &str = "\
default:
  bandwidth: 100mbit
users:
  alice:
    devices: [laptop, phone]
    limits: { limit: 100GB, period: monthly }
    template: guest
  bob:
    devices: [laptop]
  zoe:
    devices: [default, tablet]
groups:
  staff:
    members: [alice, zoe]
    limits: { bandwidth: 10mbit, connections: 3 }
    shared_limit: 2TB
templates:
  guest: { bandwidth: 5mbit, limit: 2GB, period: daily }
";

struct Agent {
    dir: tempfile::TempDir,
    plane: Arc<MemoryPlane>,
    tunnel: Arc<MemoryTunnel>,
    svc: Service,
}

fn open(dir: tempfile::TempDir, plane: Arc<MemoryPlane>, tunnel: Arc<MemoryTunnel>) -> Agent {
    let svc = Service::open(
        Arc::new(Store::open(dir.path()).unwrap()),
        plane.clone(),
        tunnel.clone(),
        ServiceConfig::for_tests("10.99.0.1/24", "fd99::1/64", "vpn.example.com:51820"),
    )
    .unwrap();
    Agent {
        dir,
        plane,
        tunnel,
        svc,
    }
}

/// An agent with one user, `zoe` (default device), before the apply.
fn agent() -> Agent {
    let a = open(
        tempfile::tempdir().unwrap(),
        Arc::new(MemoryPlane::default()),
        Arc::new(MemoryTunnel::default()),
    );
    a.svc
        .users
        .add_user(
            &root(),
            NewUser {
                name: UserName::parse("name", "zoe").unwrap(),
                device: DeviceName::default_device(),
                expires_at: None,
            },
        )
        .unwrap();
    a
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn restart(a: Agent) -> Agent {
    let Agent {
        dir,
        plane,
        tunnel,
        svc,
    } = a;
    drop(svc);
    open(dir, plane, tunnel)
}

fn applies(a: &Agent) -> usize {
    a.svc
        .core
        .audit_records(None, 1000)
        .unwrap()
        .iter()
        .filter(|r| r.action == "policy.apply")
        .count()
}

#[test]
fn an_apply_killed_between_its_steps_is_complete_after_a_restart() {
    let doc = PolicyDoc::from_yaml(DOC).unwrap();
    // What the whole apply leaves, uninterrupted.
    let whole = agent();
    whole
        .svc
        .policy_files
        .apply_document(&root(), &doc, false)
        .unwrap();
    let want = whole.svc.policy_files.export_document().unwrap();
    assert_eq!(want.users.len(), 3);
    assert!(
        whole
            .svc
            .core
            .store
            .get::<serde_json::Value>(Cf::Meta, JOURNAL_KEY)
            .unwrap()
            .is_none(),
        "a finished apply leaves no journal"
    );

    for kill in [
        failpoint::Kill::Journalled,
        failpoint::Kill::DevicesAdded,
        failpoint::Kill::PolicyWritten,
    ] {
        let a = agent();
        let before = a.svc.policy_files.export_document().unwrap();
        failpoint::arm(kill);
        let e = a
            .svc
            .policy_files
            .apply_document(&root(), &doc, false)
            .unwrap_err();
        assert!(super::is_killed(&e), "{kill:?}: {e}");
        // The failpoint did stop it there: the store holds the journal and, after the
        // devices, half of the apply.
        let half = a.svc.policy_files.export_document().unwrap();
        match kill {
            failpoint::Kill::Journalled => assert_eq!(half, before, "{kill:?}"),
            failpoint::Kill::DevicesAdded => {
                assert_eq!(half.users.len(), 3, "{kill:?}");
                assert!(
                    half.groups.is_empty() && half.templates.is_empty(),
                    "{kill:?}"
                );
            }
            failpoint::Kill::PolicyWritten => assert_eq!(half, want, "{kill:?}"),
        }

        let a = restart(a);
        assert_eq!(
            a.svc.policy_files.export_document().unwrap(),
            want,
            "{kill:?}: all of the apply after the restart"
        );
        assert!(
            a.svc
                .core
                .store
                .get::<serde_json::Value>(Cf::Meta, JOURNAL_KEY)
                .unwrap()
                .is_none(),
            "{kill:?}: the journal is gone"
        );
        // Every device is in the tunnel (zoe's two, alice's two, bob's one), and the policy
        // change is audited once.
        assert_eq!(a.tunnel.state().len(), 5, "{kill:?}");
        assert_eq!(applies(&a), 1, "{kill:?}");
        // Nothing is left to redo: another restart and the same file change nothing.
        let a = restart(a);
        assert!(
            a.svc
                .policy_files
                .apply_document(&root(), &doc, true)
                .unwrap()
                .is_empty(),
            "{kill:?}"
        );
        assert_eq!(applies(&a), 1, "{kill:?}");
    }
}
