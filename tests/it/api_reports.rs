//! Usage reports through the real gRPC API, the REST mirror and the `capybara` binary, over an
//! in-process agent API (real server and store, in-memory dataplane and tunnel) with the usage
//! writer running as the agent runs it: counters set on the dataplane are in the next report
//! (the report makes the writer sample first).
//! - every format (text, json, csv, html) says the same numbers; `--output F` writes the file;
//! - a read token may ask; bad input is `INVALID_ARGUMENT` (exit 2) naming the field, an unknown
//!   group `NOT_FOUND`;
//! - `GET /api/v1/reports?format=csv&group=staff` answers the structured report and the
//!   document.

use capybara_agent::{
    api::{client::code, reports::ReportRequest},
    service::{
        NewUser, Service,
        domain::{Actor, DeviceName, Scope, UserName},
        policy::model::GroupName,
        usage,
    },
};
use capybara_common::peer::PeerStats;
use capybara_tests::{agent_proc::agent_crate_binary, rest::Rest};
use tonic::Code;

use crate::api_support::{Cli, TestApi};

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn add_user(svc: &Service, name: &str) -> u32 {
    svc.users
        .add_user(
            &root(),
            NewUser {
                name: UserName::parse("name", name).unwrap(),
                device: DeviceName::default_device(),
                expires_at: None,
            },
        )
        .expect("add user")
        .1
        .peer
        .id
}

fn req(format: &str, period: &str, group: &str) -> ReportRequest {
    ReportRequest {
        format: format.into(),
        period: period.into(),
        group: group.into(),
        ..ReportRequest::default()
    }
}

#[test]
fn reports_in_every_format_through_grpc_rest_and_the_cli() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let alice = add_user(&api.svc, "alice");
    let _bob = add_user(&api.svc, "bob");
    let staff = GroupName::parse("group", "staff").unwrap();
    api.svc.policy.create_group(&root(), &staff).unwrap();
    api.svc
        .policy
        .change_members(
            &root(),
            &staff,
            &[UserName::parse("u", "alice").unwrap()],
            true,
        )
        .unwrap();
    // The writer starts (its first sample is its baseline), then alice's counters move.
    let writer = usage::start_writer(api.svc.usage.clone()).unwrap();
    api.svc.usage.flush();
    api.plane.with(|s| {
        s.stats.insert(
            alice,
            PeerStats {
                rx_bytes: 123_456,
                rx_packets: 321,
                tx_bytes: 7_890,
                tx_packets: 12,
                ..PeerStats::default()
            },
        );
    });
    let read = api.token(Scope::Read);
    rt.block_on(async {
        let c = api.tcp_client(Some(&read)).await;
        let (json, ct) = c.generate_report(req("json", "day", "")).await.unwrap();
        assert_eq!(ct, "application/json");
        let r: serde_json::Value = serde_json::from_str(&json).unwrap();
        let a = &r["users"][0];
        assert_eq!(a["user"], "alice", "busiest first: {r:#}");
        assert_eq!(a["usage"]["rx_bytes"], 123_456);
        assert_eq!(a["usage"]["tx_packets"], 12);
        assert_eq!(a["groups"][0], "staff");
        assert_eq!(r["users"][1]["user"], "bob");
        assert_eq!(r["top_users"], serde_json::json!(["alice"]));
        assert_eq!(r["totals"]["rx_bytes"], 123_456);
        assert_eq!(r["series"].as_array().unwrap().len(), 24);

        let (csv, ct) = c.generate_report(req("csv", "week", "")).await.unwrap();
        assert_eq!(ct, "text/csv; charset=utf-8");
        assert!(
            csv.contains("\r\nuser,alice,staff,123456,7890,321,12,"),
            "{csv}"
        );
        assert!(csv.contains("\r\ngroup,staff,,123456,"), "{csv}");
        let (text, _) = c.generate_report(req("", "", "")).await.unwrap();
        assert!(text.starts_with("Usage report: "), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("alice ") && l.contains("123.5 kB")),
            "{text}"
        );
        let (html, ct) = c
            .generate_report(req("html", "month", "staff"))
            .await
            .unwrap();
        assert_eq!(ct, "text/html; charset=utf-8");
        assert!(html.contains(", group staff</title>") && html.contains(">alice</th>"));
        assert!(!html.contains(">bob</th>"), "bob is not in staff");

        // Bad input names the field; an unknown group is not found.
        for (r, field) in [
            (req("pdf", "", ""), "format:"),
            (req("", "year", ""), "period:"),
            (req("", "", "No Such"), "group:"),
            (
                ReportRequest {
                    from: "2026-02-30".into(),
                    ..ReportRequest::default()
                },
                "from:",
            ),
            (
                ReportRequest {
                    from: "2026-12-02".into(),
                    to: "2026-12-01".into(),
                    ..ReportRequest::default()
                },
                "to:",
            ),
            (
                ReportRequest {
                    period: "day".into(),
                    from: "2026-12-01".into(),
                    ..ReportRequest::default()
                },
                "period:",
            ),
        ] {
            let e = c.generate_report(r).await.unwrap_err();
            assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
            assert!(e.to_string().contains(field), "{field} in {e}");
        }
        let e = c.generate_report(req("", "", "nobody")).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::NotFound), "{e}");

        // The REST mirror.
        let rest = Rest::new(api.tcp, Some(&read));
        let a = rest
            .call(
                "GET",
                "/api/v1/reports?format=csv&period=week&group=staff",
                None,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json["report"]["users"][0]["usage"]["rxBytes"], "123456");
        assert_eq!(a.json["contentType"], "text/csv; charset=utf-8");
        assert!(
            a.json["document"]
                .as_str()
                .unwrap()
                .contains("\r\nuser,alice,staff,123456,")
        );
        let a = rest
            .call("GET", "/api/v1/reports?period=fortnight", None)
            .await;
        assert_eq!(a.status, 400, "{}", a.text);
        assert!(a.text.contains("period:"), "{}", a.text);
    });

    // The CLI: standard output, --json, --output, exit 2 naming the field.
    let cli = Cli::tcp(&agent_crate_binary("capybara"), &api, &read);
    let out = cli.ok(&["report", "generate", "--format", "csv", "--group", "staff"]);
    assert!(out.contains("\r\nuser,alice,staff,123456,7890,"), "{out}");
    let j = cli.json(&["report", "generate", "--period", "week"]);
    assert_eq!(j["users"][0]["usage"]["rx_bytes"], 123_456);
    let file = api.dir.path().join("r.html");
    let said = cli.ok(&[
        "report",
        "generate",
        "--format",
        "html",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(said.starts_with("report written to "), "{said}");
    let html = std::fs::read_to_string(&file).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains(">alice</th>"));
    cli.fails(2, &["report", "generate", "--period", "year"], "period:");
    cli.fails(2, &["report", "generate", "--from", "2026-1-1"], "from:");
    cli.fails(2, &["report", "generate", "--format", "xml"], "format:");
    cli.fails(1, &["report", "generate", "--group", "nobody"], "nobody");

    api.svc.usage.stop_writer();
    writer.join().unwrap();
    rt.block_on(api.stop());
}
