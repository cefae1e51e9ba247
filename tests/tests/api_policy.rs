//! The `Policy` gRPC service in-process (real server on 127.0.0.1:0 with tokens, real RocksDB,
//! the in-memory dataplane): bad input answered `INVALID_ARGUMENT` naming the field with nothing
//! changed, scopes, group fan-out to the kernel state before the reply, explain, quota report.

mod api_support;

use api_support::TestApi;
use capybara_agent::{
    api::client::{Client, ClientError},
    service::{domain::Scope, policy::model::LimitsText},
    units::Rate,
};
use tonic::Code;

fn text(f: impl FnOnce(&mut LimitsText)) -> LimitsText {
    let mut t = LimitsText::default();
    f(&mut t);
    t
}

fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(ClientError::Status(s)) => (s.code(), s.message().to_owned()),
        Err(e) => panic!("not a status: {e}"),
    }
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
