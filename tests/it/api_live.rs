//! `WatchStats` over the real gRPC server with the in-memory dataplane (whose counters the test
//! sets): rates from counter deltas, sessions from the tunnel, the scope and user rules of
//! tokens, the sampler stopping once nobody watches, and a watch ending when the agent stops.

use std::time::Duration;

use capybara_agent::{
    api::client::ClientError,
    service::domain::{Scope, UserName},
};
use capybara_common::peer::PeerStats;
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    match r {
        Err(ClientError::Status(s)) => s.code(),
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[test]
fn a_watch_streams_rates_from_counter_deltas_and_keeps_to_the_tokens_user() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let local = Cli::socket(&bin, &api.socket);
    local.ok(&["user", "add", "alice", "--no-qr"]);
    local.ok(&["user", "add", "bob", "--no-qr"]);
    let alice = &api
        .svc
        .directory
        .user_peers(&UserName::parse("user", "alice").unwrap())[0];
    let set = |rx_bytes: u64, rx_packets: u64| {
        api.plane.with(|s| {
            s.stats.insert(
                alice.id,
                PeerStats {
                    rx_bytes,
                    rx_packets,
                    tx_bytes: 7,
                    tx_packets: 1,
                    ..PeerStats::default()
                },
            )
        });
    };
    set(5_000_000, 5_000);
    api.tunnel
        .with_peer(&alice.public_key, |p| p.status.connected = true);

    let c = rt.block_on(api.unix_client());
    let mut w = rt.block_on(c.watch_stats("", 0)).unwrap();
    assert!(api.svc.watch.sampling());
    let first = rt.block_on(w.next()).unwrap().unwrap();
    assert_eq!((first.users, first.devices, first.sessions), (2, 2, 1));
    // The counters' history is not a rate.
    assert_eq!(first.total.rx.bytes, 0);
    assert_eq!(first.total.rx_total.bytes, 5_000_000);
    set(6_000_000, 6_000);
    let next = rt.block_on(w.next()).unwrap().unwrap();
    let row = &next.top_users[0];
    assert_eq!(row.user, "alice", "the busiest first: {next:?}");
    let moved = row.traffic.rx.bytes as f64 * next.interval_ms as f64 / 1000.0;
    assert!(
        (moved - 1_000_000.0).abs() < 2_000.0,
        "{} B/s over {} ms",
        row.traffic.rx.bytes,
        next.interval_ms
    );
    assert_eq!(row.traffic.rx_total.bytes, 6_000_000);
    assert_eq!(next.top_devices[0].line.name(), "default");
    assert!(next.top_devices[0].online);

    // A token restricted to alice watches alice only.
    let secret = local.json(&[
        "api", "token", "create", "--scope", "read", "--user", "alice",
    ])["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let restricted = rt.block_on(api.tcp_client(Some(&secret)));
    let mut mine = rt.block_on(restricted.watch_stats("alice", 5)).unwrap();
    let v = rt.block_on(mine.next()).unwrap().unwrap();
    assert_eq!((v.users, v.devices), (1, 1));
    assert_eq!(v.top_users[0].user, "alice");
    assert_eq!(
        code(rt.block_on(restricted.watch_stats("bob", 0))),
        Code::PermissionDenied
    );
    assert_eq!(
        code(rt.block_on(restricted.watch_stats("", 0))),
        Code::PermissionDenied
    );
    // Bad input and unknown users, before any stream.
    assert_eq!(
        code(rt.block_on(c.watch_stats("Not A Name", 0))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(rt.block_on(c.watch_stats("nobody", 0))),
        Code::NotFound
    );
    let nobody = rt.block_on(api.tcp_client(None));
    assert_eq!(
        code(rt.block_on(nobody.watch_stats("", 0))),
        Code::Unauthenticated
    );
    let _ = api.token(Scope::Read);

    // Both watchers gone: the sampler stops within a tick or two.
    drop((w, mine));
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while api.svc.watch.sampling() {
        assert!(
            std::time::Instant::now() < end,
            "the sampler outlived its watchers"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.block_on(api.stop());
}

#[test]
fn stopping_the_agent_ends_a_watch_at_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let c = rt.block_on(api.unix_client());
    let mut w = rt.block_on(c.watch_stats("", 0)).unwrap();
    rt.block_on(w.next()).unwrap().unwrap();
    // A watcher must not hold up the graceful shutdown.
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), api.stop())
            .await
            .expect("the agent stopped with a watch open")
    });
    let end = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), w.next()).await });
    assert!(
        matches!(end, Ok(None) | Ok(Some(Err(_)))),
        "the watch went on: {end:?}"
    );
}
