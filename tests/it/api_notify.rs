//! `capybara health` (the `Components` RPC) raises `server-down` / `server-up` for the
//! transitions it sees (issue 21: a scheduled `health` task relies on it), once each, against an
//! in-process API over the in-memory dataplane and tunnel; the events are read from the
//! service's bus.

use capybara_agent::service::{ServiceEvent, notify::NotifyKind};
use capybara_tests::agent_proc::agent_crate_binary;

use crate::api_support::{Cli, TestApi};

fn health_events(
    rx: &mut tokio::sync::broadcast::Receiver<ServiceEvent>,
) -> Vec<(NotifyKind, String, String)> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let ServiceEvent::Notified(n) = ev
            && matches!(n.kind, NotifyKind::ServerDown | NotifyKind::ServerUp)
        {
            out.push((
                n.kind,
                n.data["component"].as_str().unwrap_or_default().to_owned(),
                n.data["detail"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

#[test]
fn capybara_health_reports_a_component_going_down_and_back_up_once() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let cli = Cli::socket(&bin, &api.socket);
    let mut bus = api.svc.events().subscribe();
    cli.ok(&["health"]);
    assert_eq!(health_events(&mut bus), []);

    // A tunnel thread dies: the next `capybara health` reports it (its exit code follows the
    // published statuses, refreshed every 5 s, so it is not looked at here).
    api.tunnel.dead.lock().unwrap().push("wg-timers".into());
    let out = cli.run(&["health"]);
    assert!(
        out.stdout.contains("tunnel threads dead: wg-timers"),
        "{}",
        out.stdout
    );
    cli.run(&["health"]);
    assert_eq!(
        health_events(&mut bus),
        [(
            NotifyKind::ServerDown,
            "tunnel".to_owned(),
            "tunnel threads dead: wg-timers".to_owned()
        )],
        "once, however often it is asked"
    );

    api.tunnel.dead.lock().unwrap().clear();
    cli.run(&["health"]);
    cli.run(&["health"]);
    let up = health_events(&mut bus);
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(
        (up[0].0, up[0].1.as_str()),
        (NotifyKind::ServerUp, "tunnel")
    );
}
