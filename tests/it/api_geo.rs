//! Geo policies over the API and the CLI: a MaxMind fixture (written here), `SetGeo` replacing
//! the `geo:*` source lists in one step with the policy stored and audited, bad country codes
//! refused naming the field with nothing changed, and FAILED_PRECONDITION without a database.

use std::sync::Arc;

use capybara_agent::{
    api::client::code,
    geo::{GeoDb, mmdb_writer::MmdbWriter},
};
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::TestApi;

fn db() -> Arc<GeoDb> {
    let mut w = MmdbWriter::new(6);
    for (net, cc) in [
        ("1.0.0.0/24", "CN"),
        ("1.0.1.0/24", "CN"),
        ("2.0.0.0/16", "RU"),
        ("3.0.0.0/8", "US"),
        ("2001:db8:1::/48", "CN"),
    ] {
        w.insert(net.parse().unwrap(), cc).unwrap();
    }
    Arc::new(GeoDb::from_bytes(w.to_bytes(), std::path::Path::new("fixture.mmdb")).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_geo_replaces_the_lists_and_is_stored_and_audited() {
    let api = TestApi::start_with(false, Some(db())).await;
    let c = api.unix_client().await;
    assert_eq!(c.geo().await.unwrap().mode, "off");

    let g = c
        .set_geo("block", vec!["CN".into(), "RU".into()])
        .await
        .unwrap();
    assert_eq!(g.mode, "block");
    let names: Vec<&str> = g.lists.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["geo:CN", "geo:RU"]);
    let cn = &g.lists[0];
    assert_eq!(cn.cidrs.len(), 2, "{:?}", cn.cidrs); // 1.0.0.0/23 merged, and the IPv6 net
    let g = c.set_geo("block", vec!["RU".into()]).await.unwrap();
    let names: Vec<&str> = g.lists.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["geo:RU"],
        "the stale geo:CN list is gone in the same step"
    );

    // Bad input: the field is named and nothing changes.
    let before = c.geo().await.unwrap();
    for (mode, cs, field) in [
        ("block", vec!["C1".to_owned()], "countries: "),
        ("block", vec![], "countries: "),
        ("sideways", vec!["CN".to_owned()], "mode: "),
    ] {
        let e = c.set_geo(mode, cs).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().starts_with(field), "{e}");
    }
    assert_eq!(c.geo().await.unwrap(), before);

    let g = c.set_geo("off", vec![]).await.unwrap();
    assert!(g.lists.is_empty());
    let actions: Vec<String> = c
        .audit("", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert_eq!(actions, ["geo.set", "geo.set", "geo.set"]);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_database_geo_is_a_failed_precondition() {
    let api = TestApi::start(false).await;
    let c = api.unix_client().await;
    let e = c.set_geo("block", vec!["CN".into()]).await.unwrap_err();
    assert_eq!(code(&e), Some(Code::FailedPrecondition));
    assert!(e.to_string().contains("--geoip-db"), "{e}");
    api.stop().await;
}

#[test]
fn geo_from_the_cli() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start_with(false, Some(db())));
    let run = |args: &[&str]| {
        std::process::Command::new(&bin)
            .arg("--socket")
            .arg(&api.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["geo", "allow", "US"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("geo allow US\n"), "{out}");
    assert!(out.contains("geo:outside"), "{out}");
    let o = run(&["geo", "block", "XYZ"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("countries: \"XYZ\" is not an ISO 3166-1"),
        "{err}"
    );
    let o = run(&["--json", "geo", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "allow");
    assert_eq!(v["countries"][0], "US");
}
