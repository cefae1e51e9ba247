use std::sync::Mutex;

use super::*;
use crate::store::keys;

/// A cluster in memory: answers the next revision after the newest, or refuses as told.
#[derive(Default)]
struct Cluster {
    calls: Mutex<Vec<(i64, Vec<SharedOp>)>>,
    revision: Mutex<i64>,
    refuse: Mutex<Option<SharedError>>,
}

impl Replicator for Cluster {
    fn replicate(&self, base: i64, ops: &[SharedOp]) -> Result<i64, SharedError> {
        self.calls.lock().unwrap().push((base, ops.to_vec()));
        if let Some(e) = self.refuse.lock().unwrap().clone() {
            return Err(e);
        }
        let mut rev = self.revision.lock().unwrap();
        if base != *rev {
            return Err(SharedError::Conflict {
                base,
                current: *rev,
            });
        }
        *rev += 1;
        Ok(*rev)
    }
}

fn open() -> (tempfile::TempDir, Store, Arc<Cluster>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let cluster = Arc::new(Cluster::default());
    assert!(store.replicate_through(cluster.clone()));
    (dir, store, cluster)
}

fn put(value: u32) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(&value).unwrap())
}

#[test]
fn shared_and_node_local_keys() {
    assert!(is_shared(Cf::Users, "alice"));
    assert!(is_shared(Cf::Peers, "alice/phone"));
    assert!(is_shared(Cf::Policy, &keys::policy_user("alice")));
    assert!(is_shared(Cf::Policy, "default"));
    assert!(is_shared(Cf::Policy, &keys::mfa_user("alice")));
    assert!(!is_shared(Cf::Policy, &keys::policy_bucket("user:alice")));
    assert!(!is_shared(Cf::Policy, &keys::policy_online("alice")));
    assert!(!is_shared(Cf::Policy, keys::API_ACCESS));
    assert!(is_shared(Cf::Schedules, &keys::schedule(3)));
    assert!(is_shared(Cf::Schedules, keys::SCHEDULE_NEXT_ID));
    assert!(!is_shared(Cf::Schedules, &keys::schedule_run(3, 1)));
    assert!(is_shared(Cf::Webhooks, &keys::webhook("wh_1")));
    assert!(!is_shared(Cf::Webhooks, &keys::webhook_cursor("wh_1")));
    assert!(!is_shared(Cf::Webhooks, &keys::webhook_delivery("wh_1", 4)));
    for cf in [
        Cf::Meta,
        Cf::Blocklists,
        Cf::Sessions,
        Cf::Audit,
        Cf::Usage,
        Cf::Outbox,
    ] {
        assert!(!is_shared(cf, "anything"), "{}", cf.name());
    }
    for cf in Cf::ALL {
        let listed = SHARED_FAMILIES.contains(&cf);
        let any = ["x", "task/1", "hook/x", "default", "next-id"]
            .iter()
            .any(|k| is_shared(cf, k));
        assert_eq!(
            listed,
            any,
            "{}: SHARED_FAMILIES and is_shared agree",
            cf.name()
        );
    }
}

#[test]
fn a_shared_write_reaches_the_cluster_first_and_keeps_its_revision() {
    let (dir, store, cluster) = open();
    let mut b = Batch::default();
    b.put(Cf::Users, "alice", &1u32).unwrap();
    b.put(Cf::Audit, &keys::audit(1), &"added").unwrap();
    b.put(Cf::Policy, &keys::policy_bucket("user:alice"), &7u32)
        .unwrap();
    store.commit(b).unwrap();
    let calls = cluster.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![(
            0,
            vec![SharedOp {
                cf: Cf::Users,
                key: "alice".into(),
                value: put(1)
            }]
        )],
        "only the shared key, after revision 0"
    );
    assert_eq!(store.shared_revision(), 1);
    // A node-local write is not replicated.
    store.put(Cf::Audit, &keys::audit(2), &"local").unwrap();
    assert_eq!(cluster.calls.lock().unwrap().len(), 1);
    // The revision survives a restart.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.shared_revision(), 1);
    assert_eq!(store.get::<u32>(Cf::Users, "alice").unwrap(), Some(1));
}

#[test]
fn a_refused_write_changes_nothing_here() {
    for refusal in [
        SharedError::Unavailable("no member answered".into()),
        SharedError::Refused("too many operations".into()),
    ] {
        let (_dir, store, cluster) = open();
        *cluster.refuse.lock().unwrap() = Some(refusal.clone());
        let mut b = Batch::default();
        b.put(Cf::Users, "bob", &1u32).unwrap();
        b.put(Cf::Audit, &keys::audit(1), &"added").unwrap();
        let err = store.commit(b).unwrap_err();
        assert!(
            matches!(&err, StoreError::Shared(e) if *e == refusal),
            "{err}"
        );
        assert!(err.to_string().contains("nothing was changed"), "{err}");
        assert_eq!(store.get::<u32>(Cf::Users, "bob").unwrap(), None);
        assert_eq!(
            store.get::<String>(Cf::Audit, &keys::audit(1)).unwrap(),
            None
        );
        assert_eq!(store.shared_revision(), 0);
    }
}

#[test]
fn another_nodes_change_first_is_a_conflict_until_applied() {
    let (_dir, store, cluster) = open();
    // Another node wrote revision 1.
    *cluster.revision.lock().unwrap() = 1;
    let mut b = Batch::default();
    b.put(Cf::Users, "carol", &1u32).unwrap();
    let err = store.commit(b).unwrap_err();
    assert!(err.to_string().contains("retry"), "{err}");
    // The watch applies it; then the same write goes through.
    let theirs = [SharedOp {
        cf: Cf::Users,
        key: "dave".into(),
        value: put(2),
    }];
    assert!(store.apply_shared(1, &theirs).unwrap());
    assert!(!store.apply_shared(1, &theirs).unwrap(), "applied once");
    let mut b = Batch::default();
    b.put(Cf::Users, "carol", &1u32).unwrap();
    store.commit(b).unwrap();
    assert_eq!(store.shared_revision(), 2);
    assert_eq!(store.get::<u32>(Cf::Users, "dave").unwrap(), Some(2));
    // This node's own change coming back through the watch is not applied again.
    let stale = [SharedOp {
        cf: Cf::Users,
        key: "carol".into(),
        value: None,
    }];
    assert!(!store.apply_shared(2, &stale).unwrap());
    assert_eq!(store.get::<u32>(Cf::Users, "carol").unwrap(), Some(1));
}

#[test]
fn replace_makes_the_shared_keys_exactly_the_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut b = Batch::default();
    b.put(Cf::Users, "gone", &1u32).unwrap();
    b.put(Cf::Users, "same", &1u32).unwrap();
    b.put(Cf::Groups, "changed", &1u32).unwrap();
    b.put(Cf::Policy, &keys::policy_bucket("user:same"), &9u32)
        .unwrap();
    b.put(Cf::Audit, &keys::audit(1), &"local").unwrap();
    store.commit(b).unwrap();
    let state = [
        SharedOp {
            cf: Cf::Users,
            key: "same".into(),
            value: put(1),
        },
        SharedOp {
            cf: Cf::Users,
            key: "new".into(),
            value: put(3),
        },
        SharedOp {
            cf: Cf::Groups,
            key: "changed".into(),
            value: put(2),
        },
    ];
    let touched = store.replace_shared(40, &state).unwrap();
    assert_eq!(touched, vec![Cf::Users, Cf::Groups]);
    assert_eq!(store.get::<u32>(Cf::Users, "gone").unwrap(), None);
    assert_eq!(store.get::<u32>(Cf::Users, "new").unwrap(), Some(3));
    assert_eq!(store.get::<u32>(Cf::Groups, "changed").unwrap(), Some(2));
    assert_eq!(
        store
            .get::<u32>(Cf::Policy, &keys::policy_bucket("user:same"))
            .unwrap(),
        Some(9),
        "node-local keys stay"
    );
    assert!(
        store
            .get::<String>(Cf::Audit, &keys::audit(1))
            .unwrap()
            .is_some()
    );
    assert_eq!(store.shared_revision(), 40);
    assert_eq!(
        store.replace_shared(41, &state).unwrap(),
        Vec::<Cf>::new(),
        "nothing to change"
    );
    let mut mine = store.shared_state().unwrap();
    mine.sort_by(|a, b| (a.cf.name(), &a.key).cmp(&(b.cf.name(), &b.key)));
    let mut want = state.to_vec();
    want.sort_by(|a, b| (a.cf.name(), &a.key).cmp(&(b.cf.name(), &b.key)));
    assert_eq!(mine, want);
}
