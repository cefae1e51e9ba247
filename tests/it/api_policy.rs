//! The `Policy` gRPC service in-process (real server on 127.0.0.1:0 with tokens, real RocksDB,
//! the in-memory dataplane): bad input answered `INVALID_ARGUMENT` naming the field with nothing
//! changed, scopes, group fan-out to the kernel state before the reply, explain, quota report.

use capybara_agent::{
    api::client::Client,
    service::{domain::Scope, policy::model::LimitsText},
    units::Rate,
};
use tonic::Code;

use crate::api_support::{TestApi, refused};

fn text(f: impl FnOnce(&mut LimitsText)) -> LimitsText {
    let mut t = LimitsText::default();
    f(&mut t);
    t
}

async fn snapshot(api: &TestApi, c: &Client) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        c.list_groups().await.unwrap(),
        c.get_limits("alice").await.unwrap(),
        c.get_limits("").await.unwrap(),
        c.audit("", 1000).await.unwrap().len(),
        api.plane.state().policy.writes,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policy_input_names_the_field_and_changes_nothing() {
    let api = TestApi::start(false).await;
    let w = api.tcp_client(Some(&api.token(Scope::Write))).await;
    w.add_user("alice", "laptop", 0).await.unwrap();
    w.create_group("staff").await.unwrap();
    w.group_members("staff", &["alice".into()], true)
        .await
        .unwrap();
    let before = snapshot(&api, &w).await;
    for (t, field) in [
        (text(|t| t.bandwidth = Some("10Mbsp".into())), "bandwidth"),
        (
            text(|t| t.window = Some("Mon-Fri 25:00-18:00".into())),
            "window",
        ),
        (text(|t| t.limit = Some("100XB".into())), "limit"),
        (text(|t| t.tz = Some("Europe/Nowhere".into())), "tz"),
        (text(|t| t.grace = Some("120%".into())), "grace"),
        (text(|t| t.clear = vec!["speed".into()]), "clear"),
    ] {
        let (c, m) = refused(w.set_limits("alice", &t).await);
        assert_eq!(c, Code::InvalidArgument, "{m}");
        assert!(m.starts_with(&format!("{field}: ")), "{field}: {m}");
        let (c, m) = refused(w.set_group_policy("staff", &t, None).await);
        assert_eq!(c, Code::InvalidArgument, "{m}");
        assert!(m.starts_with(&format!("{field}: ")), "{field}: {m}");
    }
    let (c, m) = refused(
        w.set_group_policy("staff", &LimitsText::default(), Some("lots".into()))
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.starts_with("shared_limit: "), "{m}");
    let (c, _) = refused(
        w.set_group_policy("nobody", &LimitsText::default(), None)
            .await,
    );
    assert_eq!(c, Code::NotFound);
    let (c, _) = refused(w.group_members("staff", &["ghost".into()], true).await);
    assert_eq!(c, Code::NotFound);
    let (c, m) = refused(w.group_members("staff", &["Bad Name".into()], true).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.starts_with("users: "), "{m}");
    assert_eq!(snapshot(&api, &w).await, before, "nothing changed");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_policy_is_in_the_kernel_when_the_call_returns_and_explained() {
    let api = TestApi::start(false).await;
    let read = api.tcp_client(Some(&api.token(Scope::Read))).await;
    let w = api.tcp_client(Some(&api.token(Scope::Write))).await;
    for u in ["alice", "bob"] {
        w.add_user(u, "laptop", 0).await.unwrap();
    }
    w.add_peer("alice", "phone").await.unwrap();
    // Scopes: reads with read, changes need write.
    let (c, _) = refused(read.create_group("staff").await);
    assert_eq!(c, Code::PermissionDenied);
    let (c, _) = refused(
        read.set_limits("alice", &text(|t| t.flows = Some("3".into())))
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    w.create_group("staff").await.unwrap();
    w.group_members("staff", &["alice".into(), "bob".into()], true)
        .await
        .unwrap();
    let g = w
        .set_group_policy(
            "staff",
            &text(|t| {
                t.bandwidth = Some("10Mbps".into());
                t.connections = Some("3".into());
            }),
            Some("2TB".into()),
        )
        .await
        .unwrap();
    assert_eq!(g.members.len(), 2);
    let ten = Some(Rate::mbit(10).unwrap());
    let s = api.plane.state();
    assert_eq!(s.peers.len(), 3);
    for id in s.peers.keys() {
        assert_eq!(s.policy.rates[id].to_peer, ten, "peer {id}");
        assert_eq!(s.policy.rates[id].from_peer, ten);
    }
    let pools: std::collections::BTreeSet<u32> = s.policy.assigned.values().copied().collect();
    assert_eq!(pools.len(), 1, "one pool for the group");

    w.set_limits("alice", &text(|t| t.bandwidth = Some("unlimited".into())))
        .await
        .unwrap();
    let rows = read.explain_policy("alice").await.unwrap();
    let row = |f: &str| rows.iter().find(|r| r.field == f).unwrap().clone();
    assert_eq!(
        (
            row("bandwidth").value.as_str(),
            row("bandwidth").source.as_str()
        ),
        ("unlimited", "user")
    );
    assert_eq!(
        (
            row("connections").value.as_str(),
            row("connections").source.as_str()
        ),
        ("3", "group:staff")
    );
    assert_eq!(row("quota").source, "group:staff");
    let q = read.show_quota("", false).await.unwrap();
    assert_eq!(q.len(), 2);
    assert!(
        q.iter()
            .all(|q| q.plan == "pool:staff" && q.limit_bytes == 2_000_000_000_000)
    );
    assert!(read.show_quota("", true).await.unwrap().is_empty());
    let audit = w.audit("", 100).await.unwrap();
    for a in [
        "group.create",
        "group.add",
        "group.policy",
        "policy.user.set",
    ] {
        assert!(audit.iter().any(|r| r.action == a), "{a} audited");
    }
    api.stop().await;
}

const FILE: &str = "\
default:
  flows: 500
users:
  alice:
    devices: [laptop, phone]
    limits:
      bandwidth: 50mbit
  bob:
    devices: [laptop]
groups:
  staff:
    members: [alice, bob]
    limits:
      bandwidth: 10mbit
      connections: 3
      window: Mon-Fri 08:00-18:00
      tz: Europe/Berlin
    shared_limit: 2TB
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_applies_once_exports_the_same_and_a_bad_one_leaves_no_trace() {
    let api = TestApi::start(false).await;
    let w = api.tcp_client(Some(&api.token(Scope::Write))).await;
    // Dry run: the diff, nothing changed.
    let (diff, applied) = w.apply_policy_document(FILE, true).await.unwrap();
    assert!(!applied);
    assert!(
        diff.iter()
            .any(|l| l == "+ user alice (devices laptop,phone)"),
        "{diff:?}"
    );
    assert!(
        diff.iter().any(|l| l.starts_with("+ group staff")),
        "{diff:?}"
    );
    assert!(w.list_users().await.unwrap().is_empty());
    // Apply: users, devices, limits, the group, the default; the kernel holds them.
    let (diff2, applied) = w.apply_policy_document(FILE, false).await.unwrap();
    assert!(applied);
    assert_eq!(diff2, diff);
    let s = api.plane.state();
    assert_eq!(s.peers.len(), 3);
    let alice: Vec<u32> = w
        .get_user("alice")
        .await
        .unwrap()
        .peers
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(alice.len(), 2);
    for id in &alice {
        assert_eq!(s.policy.rates[id].to_peer, Some(Rate::mbit(50).unwrap()));
        assert_eq!(s.policy.flows[id], 500);
    }
    // Twice: nothing changes (no audit record either).
    let audits = w.audit("", 1000).await.unwrap().len();
    let (diff3, applied) = w.apply_policy_document(FILE, false).await.unwrap();
    assert!(diff3.is_empty() && !applied, "{diff3:?}");
    assert_eq!(w.audit("", 1000).await.unwrap().len(), audits);
    // Export → the same document; export → apply on an empty agent → the same export.
    let exported = w.export_policy_document().await.unwrap();
    let api2 = TestApi::start(false).await;
    let w2 = api2.tcp_client(Some(&api2.token(Scope::Write))).await;
    w2.apply_policy_document(&exported, false).await.unwrap();
    assert_eq!(w2.export_policy_document().await.unwrap(), exported);
    api2.stop().await;

    // A bad value names its line; a member nobody knows names the group; nothing changes.
    let before = snapshot(&api, &w).await;
    let bad = FILE.replace("bandwidth: 10mbit", "bandwidth: 10Mbsp");
    let (c, m) = refused(w.apply_policy_document(&bad, false).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(
        m.starts_with("file: line 14 column 7: groups.staff.limits"),
        "{m}"
    );
    assert!(m.contains("10Mbsp"), "{m}");
    let bad = FILE.replace("members: [alice, bob]", "members: [alice, ghost]");
    let (c, m) = refused(w.apply_policy_document(&bad, false).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("groups.members") && m.contains("ghost"), "{m}");
    let bad = "users:\n  carol: {}\ngroups:\n  x:\n    members: [nobody]\n";
    let (c, _) = refused(w.apply_policy_document(bad, false).await);
    assert_eq!(c, Code::InvalidArgument);
    assert_eq!(snapshot(&api, &w).await, before, "nothing changed");
    assert_eq!(
        w.list_users().await.unwrap().len(),
        2,
        "carol was not created"
    );
    api.stop().await;
}

/// A policy file as large as the agent accepts (16 MiB; one for 100 000 users is ≈ 7 MiB) goes
/// through the API: gRPC's default 4 MiB message limit does not cut it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_over_four_mebibytes_goes_through_the_api() {
    let api = TestApi::start(false).await;
    let w = api.tcp_client(Some(&api.token(Scope::Write))).await;
    // The file's size, not its contents, is what the message limit sees: a long comment.
    let big = format!("# {}\n{FILE}", "x".repeat(6 << 20));
    let (diff, applied) = w.apply_policy_document(&big, true).await.unwrap();
    assert!(!applied);
    assert!(
        diff.iter().any(|l| l.starts_with("+ group staff")),
        "{diff:?}"
    );
    api.stop().await;
}
