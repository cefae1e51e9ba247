//! The `Reputation` service over gRPC, REST and the CLI (`ip-intel score IP`, mounted by this
//! branch as `capybara ip-intel score`): a source blocked by the engine (on the in-memory
//! dataplane) is explained with its block and expiry, a source with a few failures with its
//! parts, and a bad address is refused naming the field `ip` (400 / INVALID_ARGUMENT / exit 2).

use std::{net::IpAddr, time::Duration};

use capybara_agent::{
    api::client::code,
    blocklist::{Direction, ListName},
    net::Cidr,
    service::reputation::{self, Part},
};
use capybara_tests::{agent_proc::agent_crate_binary, rest::Rest};
use tonic::Code;

use crate::api_support::{Cli, TestApi};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_and_list_auto_blocked_sources_and_refuse_bad_addresses() {
    let api = TestApi::start(false).await;
    let rep = api.svc.reputation.clone();
    rep.set_enabled(true);
    let _blocker = reputation::start(&rep).unwrap();
    let bad: IpAddr = "198.51.100.7".parse().unwrap();
    let few: IpAddr = "2001:db8::5".parse().unwrap();
    for _ in 0..20 {
        rep.on_event(bad, Part::BadMac);
    }
    for _ in 0..3 {
        rep.on_event(few, Part::UnknownKey);
    }
    rep.on_event(few, Part::GateDrop);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while rep.stats().blocks < 1 {
        assert!(std::time::Instant::now() < end, "not blocked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let auto = ListName::parse("auto").unwrap();
    assert_eq!(
        api.svc.core.plane.list_cidrs(Direction::Source, &auto),
        Some(vec![Cidr::host(bad)])
    );

    // gRPC.
    let c = api.unix_client().await;
    let v = c.explain_score("198.51.100.7").await.unwrap();
    let b = v.blocked.expect("blocked");
    assert_eq!(b.ip, bad);
    assert_eq!(
        b.until.duration_since(b.since).unwrap(),
        reputation::DEFAULT_TTL
    );
    assert_eq!((b.score, b.threshold), (200, 200));
    assert_eq!(b.parts[&Part::BadMac].count, 20);
    let v = c.explain_score("2001:db8::5").await.unwrap();
    assert!(v.blocked.is_none());
    assert_eq!((v.score, v.threshold), (3.2, 20.0));
    let unknown = v.parts.iter().find(|p| p.part == Part::UnknownKey).unwrap();
    assert_eq!((unknown.count, unknown.points), (3, 3.0));
    assert!(v.first_seen.is_some() && v.next_halving.is_some());
    let listed = c.auto_blocked().await.unwrap();
    assert_eq!(listed.iter().map(|b| b.ip).collect::<Vec<_>>(), vec![bad]);
    let e = c.explain_score("not-an-ip").await.unwrap_err();
    assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().starts_with("ip: "), "{e}");

    // REST.
    let token = api.token(capybara_agent::service::domain::Scope::Read);
    let rest = Rest::new(api.tcp, Some(&token));
    let a = rest
        .call("GET", "/api/v1/ip-intel/score/198.51.100.7", None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["ip"], "198.51.100.7");
    assert_eq!(a.json["blocked"]["score"], 20.0);
    assert_eq!(a.json["threshold"], 20.0);
    assert_eq!(a.json["halfLifeS"], "600");
    let a = rest
        .call("GET", "/api/v1/ip-intel/score/300.1.2.3", None)
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.text.contains("ip: "), "{}", a.text);
    let a = rest
        .call("GET", "/api/v1/ip-intel/auto-blocked", None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["blocks"][0]["ip"], "198.51.100.7");

    // The CLI.
    let cli = Cli::socket(&agent_crate_binary("capybara"), &api.socket);
    let out = cli.ok(&["ip-intel", "score", "198.51.100.7"]);
    assert!(out.contains("auto-blocked since"), "{out}");
    assert!(out.contains("bad-mac"), "{out}");
    let out = cli.ok(&["ip-intel", "score", "2001:db8::5"]);
    assert!(out.contains("score 3.2 of 20.0"), "{out}");
    assert!(out.contains("not blocked"), "{out}");
    let j = cli.json(&["ip-intel", "score", "2001:db8::5"]);
    assert_eq!(j["score"], 3.2);
    cli.fails(2, &["ip-intel", "score", "10.0.0.300"], "ip: ");
    api.stop().await;
}
