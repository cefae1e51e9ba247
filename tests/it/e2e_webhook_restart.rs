//! Webhook events survive a SIGKILL of the agent: the real `capybara-agent` runs in a
//! namespace with a webhook whose receiver (the Python `standardwebhooks` receiver, in the same
//! namespace's loopback) is down; 20 user creations over the API each raise `config-changed`,
//! written to the outbox with their audit records. The agent is SIGKILLed with every event
//! undelivered, the outbox is read from the store as the kill left it, the receiver comes up,
//! the agent starts again on the same data directory, and the receiver gets every event, in
//! order, with the ids they had before the kill, each signature verified.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use capybara_agent::{
    api::client::{Client, Endpoint},
    service::notify::OutboxEvent,
    store::{Cf, Store},
};
use capybara_proto::v1 as pb;
use capybara_tests::{
    agent_proc::{self, agent_crate_binary},
    netns::{BpffsDir, NetNs, unique_name},
    receivers::{PyReceiver, random_secret},
};
use nix::sys::signal::Signal;

fn start_agent(bin: &Path, ns: &NetNs, tunnel: &str, data: &Path, pins: &Path, run: u32) -> u32 {
    let log = data.parent().unwrap().join(format!("agent-{run}.log"));
    let mut cmd = Command::new(bin);
    cmd.args(["--netns", ns.name(), "--tunnel", tunnel])
        .args([
            "--tunnel-ipv4",
            "10.84.0.1/24",
            "--tunnel-ipv6",
            "fd00:84::1/64",
        ])
        .args(["--listen-port", "51820"])
        .arg("--data-dir")
        .arg(data)
        .arg("--bpffs")
        .arg(pins)
        .arg("--api-socket")
        .arg(data.parent().unwrap().join("run/agent.sock"))
        .args(["--public-endpoint", "192.0.2.1:51820"]);
    agent_proc::start_agent(ns, cmd, &log, Duration::from_secs(30))
}

#[test]
fn events_undelivered_at_a_sigkill_are_delivered_after_the_restart_with_the_same_ids() {
    let bin = agent_crate_binary("capybara-agent");
    let pins = BpffsDir::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let socket = tmp.path().join("run/agent.sock");
    let ns = NetNs::new("wh");
    let tunnel = unique_name("wh");
    let secret = random_secret();
    // The receiver's port, then down while the events are raised.
    let mut rx = PyReceiver::start_in(Some(ns.name()), &secret, 0, tmp.path().join("rx.jsonl"));
    rx.stop();

    let pid = start_agent(&bin, &ns, &tunnel, &data, pins.path(), 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::connect(&Endpoint::Unix(socket.clone()))
            .await
            .expect("connect to the agent");
        c.add_webhook(pb::AddWebhookRequest {
            url: rx.url(),
            events: vec!["config-changed".into()],
            secret: secret.clone(),
            allow_private: true,
            ..Default::default()
        })
        .await
        .expect("add the webhook");
        for i in 0..20 {
            c.add_user(&format!("user{i:02}"), "", 0)
                .await
                .expect("add a user");
        }
    });
    ns.kill(pid, Signal::SIGKILL);

    // What the kill left in the outbox: the 20 user.add events (and the webhook's own add).
    let before: Vec<OutboxEvent> = {
        let store = Store::open(&data).expect("open the killed agent's store");
        store
            .scan::<OutboxEvent>(Cf::Outbox, "")
            .expect("read the outbox")
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.event.data["action"] == "user.add")
            .collect()
    };
    assert_eq!(before.len(), 20, "every event is in the outbox: {before:?}");

    rx.restart();
    let _pid = start_agent(&bin, &ns, &tunnel, &data, pins.path(), 2);
    let end = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let got: Vec<_> = rx
            .records()
            .into_iter()
            .filter(|r| r.body["data"]["action"] == "user.add")
            .collect();
        if got.len() >= 20 {
            break got;
        }
        assert!(
            Instant::now() < end,
            "only {} of 20 events after the restart: {got:#?}",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(got.iter().all(|r| r.verified), "{got:#?}");
    let ids: Vec<&str> = got.iter().map(|r| r.body["id"].as_str().unwrap()).collect();
    let want: Vec<&str> = before.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids, want,
        "the same events, the same ids, in order, once each"
    );
    let users: Vec<&str> = got
        .iter()
        .map(|r| r.body["user"].as_str().unwrap())
        .collect();
    let want_users: Vec<String> = (0..20).map(|i| format!("user{i:02}")).collect();
    assert_eq!(users, want_users);
}
