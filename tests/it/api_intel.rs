//! IP intelligence and `geo update` over the real gRPC API, the REST mirror and the `capybara`
//! binary, against an in-process agent (real server and store, in-memory dataplane): every
//! `IpIntel` RPC and `UpdateGeoDb`; a list fetched from a feed on loopback (`allow_private`);
//! a list that does not parse refused naming its line, with the old list still enforced and
//! listed; bad input naming its field with nothing changed; the scopes; the reload schedule
//! picking up a changed list file; a watched country database reloaded when its file changes.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use capybara_agent::{
    api::client::code,
    blocklist::{Direction, ListName},
    geo::{GeoDb, mmdb_writer::MmdbWriter},
    service::{domain::Scope, ports::Plane as _},
};
use capybara_proto::v1 as pb;
use capybara_tests::{agent_proc::agent_crate_binary, rest::Rest};
use tonic::Code;

use crate::api_support::{Cli, TestApi};

/// A feed on loopback: answers `GET` with its current status and body (one request a
/// connection).
struct Feed {
    port: u16,
    answer: Arc<Mutex<(u16, String)>>,
    requests: Arc<Mutex<u64>>,
}

impl Feed {
    fn start(body: &str) -> Feed {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new((200, body.to_owned())));
        let requests = Arc::new(Mutex::new(0));
        let (a, n) = (answer.clone(), requests.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                *n.lock().unwrap() += 1;
                let (status, body) = a.lock().unwrap().clone();
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Feed {
            port,
            answer,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/torbulkexitlist", self.port)
    }

    fn set(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_owned());
    }
}

fn kernel(api: &TestApi, name: &str) -> Option<Vec<String>> {
    api.plane
        .list_cidrs(Direction::Source, &ListName::parse(name).unwrap())
        .map(|l| l.iter().map(ToString::to_string).collect())
}

fn source(category: &str) -> pb::SetIntelSourceRequest {
    pb::SetIntelSourceRequest {
        category: category.into(),
        on: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_with_a_feed_on_loopback_and_a_bad_list_refused_naming_its_line() {
    let api = TestApi::start(false).await;
    let c = api.unix_client().await;
    let s = c.intel().await.unwrap();
    assert!(!s.enabled);
    let names: Vec<&str> = s.lists.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["tor", "vpn", "allow"]);
    assert!(c.set_intel_enabled(true).await.unwrap().enabled);

    // A feed on loopback: refused without allow_private (nothing changes), taken with it.
    let feed = Feed::start("# Tor exits\n185.220.101.1\n185.220.101.2\n");
    let e = c
        .set_intel_source(pb::SetIntelSourceRequest {
            url: feed.url(),
            ..source("tor")
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
    assert!(
        e.to_string()
            .starts_with("url: 127.0.0.1 resolves to 127.0.0.1, a loopback address"),
        "{e}"
    );
    assert!(e.to_string().contains("--allow-private"), "{e}");
    assert_eq!(*feed.requests.lock().unwrap(), 0, "nothing was fetched");
    assert_eq!(kernel(&api, "tor"), None);

    let s = c
        .set_intel_source(pb::SetIntelSourceRequest {
            url: feed.url(),
            allow_private: true,
            refresh_seconds: 600,
            ..source("tor")
        })
        .await
        .unwrap();
    let tor = &s.lists[0];
    assert_eq!(
        (tor.on, tor.enforced, tor.entries, tor.source_kind.as_str()),
        (true, true, 2, "url")
    );
    assert_eq!(tor.source, feed.url());
    assert_eq!(tor.refresh_secs, 600);
    assert!(
        tor.loaded_at > 0 && tor.next_refresh > tor.loaded_at,
        "{tor:?}"
    );
    assert_eq!(
        kernel(&api, "tor").unwrap(),
        ["185.220.101.1/32", "185.220.101.2/32"]
    );

    // The feed turns bad: the refresh is refused naming the line; the old list stays
    // enforced and listed, with the error.
    feed.set(200, "185.220.101.1\n<html>oops</html>\n");
    let e = c.refresh_intel_list("tor").await.unwrap_err();
    assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
    assert!(
        e.to_string()
            .starts_with("url: line 2: \"<html>oops</html>\": "),
        "{e}"
    );
    assert_eq!(kernel(&api, "tor").unwrap().len(), 2);
    let tor = c.intel().await.unwrap().lists.remove(0);
    assert_eq!(tor.entries, 2);
    assert!(tor.last_error.starts_with("url: line 2"), "{tor:?}");
    assert!(tor.last_error_at > 0);
    // A feed that is down is not the caller's fault.
    feed.set(503, "");
    let e = c.refresh_intel_list("tor").await.unwrap_err();
    assert_eq!(code(&e), Some(Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains("answered HTTP 503"), "{e}");
    feed.set(200, "185.220.101.3\n");
    let s = c.refresh_intel_list("tor").await.unwrap();
    assert!(s.lists[0].last_error.is_empty());
    assert_eq!(kernel(&api, "tor").unwrap(), ["185.220.101.3/32"]);

    // A list file (the exit-addresses format) for vpn; a bad one is refused naming its line.
    let dir = api.dir.path();
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "10.0.0.0/8\n; ok\n10.1.2.3/8\n").unwrap();
    let e = c
        .set_intel_source(pb::SetIntelSourceRequest {
            file: bad.display().to_string(),
            ..source("vpn")
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
    assert!(
        e.to_string()
            .starts_with("file: line 3: \"10.1.2.3/8\": host bits are set"),
        "{e}"
    );
    assert!(!c.intel().await.unwrap().lists[1].on, "vpn stays off");
    let good = dir.join("exits.txt");
    std::fs::write(
        &good,
        "ExitNode AB\nPublished 2024-05-01 10:00:00\nExitAddress 198.51.100.7 2024-05-01 11:00:00\n",
    )
    .unwrap();
    c.set_intel_source(pb::SetIntelSourceRequest {
        file: good.display().to_string(),
        ..source("vpn")
    })
    .await
    .unwrap();
    assert_eq!(kernel(&api, "vpn").unwrap(), ["198.51.100.7/32"]);

    // Bad input: the field is named, nothing changes.
    let before = c.intel().await.unwrap();
    for (req, field) in [
        (source("onion"), "category: "),
        (
            pb::SetIntelSourceRequest {
                file: "/x".into(),
                url: "http://x/".into(),
                ..source("tor")
            },
            "file: give either file or url",
        ),
        (
            pb::SetIntelSourceRequest {
                file: "relative.txt".into(),
                ..source("tor")
            },
            "file: ",
        ),
        (
            pb::SetIntelSourceRequest {
                url: "gopher://x/".into(),
                ..source("tor")
            },
            "url: ",
        ),
        (
            pb::SetIntelSourceRequest {
                on: false,
                url: "http://x/".into(),
                ..source("tor")
            },
            "url: must be empty",
        ),
        (
            pb::SetIntelSourceRequest {
                refresh_seconds: 5,
                ..source("tor")
            },
            "refresh: ",
        ),
    ] {
        let e = c.set_intel_source(req).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().starts_with(field), "{field}: {e}");
    }
    let e = c.refresh_intel_list("").await.unwrap_err();
    assert!(e.to_string().starts_with("category: "), "{e}");
    let e = c
        .change_intel_allow(vec!["1.2.3.4".into(), "1.2.3.4/33".into()], false)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().starts_with("cidrs: list entry #1"), "{e}");
    let e = c.change_intel_allow(vec![], false).await.unwrap_err();
    assert!(e.to_string().starts_with("cidrs: required"), "{e}");
    let mut after = c.intel().await.unwrap();
    // Only the ages moved on.
    for (a, b) in after.lists.iter_mut().zip(&before.lists) {
        a.next_refresh = b.next_refresh;
    }
    assert_eq!(after, before);

    // The allow list and the switch.
    let s = c
        .change_intel_allow(vec!["198.51.100.7".into()], false)
        .await
        .unwrap();
    assert_eq!(s.lists[2].entries, 1);
    assert_eq!(kernel(&api, "allow").unwrap(), ["198.51.100.7/32"]);
    c.change_intel_allow(vec!["198.51.100.7".into()], true)
        .await
        .unwrap();
    assert_eq!(kernel(&api, "allow").unwrap(), Vec::<String>::new());
    let s = c.set_intel_enabled(false).await.unwrap();
    assert!(s.lists.iter().take(2).all(|l| l.on && !l.enforced));
    assert_eq!(kernel(&api, "tor").unwrap(), Vec::<String>::new());
    assert_eq!(kernel(&api, "vpn").unwrap(), Vec::<String>::new());
    assert_eq!(s.lists[0].entries, 1, "kept in the store");
    c.set_intel_enabled(true).await.unwrap();
    assert_eq!(kernel(&api, "tor").unwrap(), ["185.220.101.3/32"]);

    // Every change is audited.
    let actions: Vec<String> = c
        .audit("", 20)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .rev()
        .collect();
    assert_eq!(
        actions,
        [
            "ip-intel.enable",
            "ip-intel.block-tor",
            "ip-intel.refresh",
            "ip-intel.block-vpn",
            "blocklist.add",
            "blocklist.remove",
            "ip-intel.disable",
            "ip-intel.enable"
        ]
    );

    // Scopes, and the REST mirror.
    let read = api.token(Scope::Read);
    let write = api.token(Scope::Write);
    let e = api
        .tcp_client(Some(&read))
        .await
        .set_intel_enabled(false)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
    let e = api
        .tcp_client(Some(&write))
        .await
        .refresh_intel_list("tor")
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::PermissionDenied), "{e}");
    let rest = Rest::new(api.tcp, Some(&read));
    let a = rest.call("GET", "/api/v1/ip-intel", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["enabled"], true);
    assert_eq!(a.json["lists"][0]["name"], "tor");
    assert_eq!(a.json["lists"][0]["entryCount"], "1");
    let a = rest
        .with_token(Some(&write))
        .call(
            "PUT",
            "/api/v1/ip-intel/enabled",
            Some(r#"{"enabled":false}"#),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["enabled"], false);
    let a = rest
        .with_token(Some(&write))
        .call(
            "POST",
            "/api/v1/ip-intel/allow",
            Some(r#"{"cidrs":["nope"]}"#),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.text);
    api.stop().await;
}

#[test]
fn the_cli_runs_the_design_lines_and_names_bad_input() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let cli = Cli::socket(&agent_crate_binary("capybara"), &api.socket);
    let out = cli.ok(&["ip-intel", "enable"]);
    assert!(out.starts_with("ip-intel enabled\n"), "{out}");
    let out = cli.ok(&["ip-intel", "block-vpn"]);
    assert!(
        out.contains("note: the vpn list is empty until a source is given"),
        "{out}"
    );
    let list = api.dir.path().join("tor.txt");
    std::fs::write(&list, "203.0.113.9\n203.0.113.10\n").unwrap();
    // A relative path is the caller's: the CLI makes it absolute.
    let o = cli.run_in(
        api.dir.path(),
        &[
            "ip-intel",
            "block-tor",
            "--file",
            "tor.txt",
            "--refresh",
            "30m",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let tor = o.stdout.lines().find(|l| l.starts_with("tor ")).unwrap();
    assert!(tor.contains("enforced") && tor.contains(" 2 "), "{tor}");
    assert!(tor.contains(&format!("file {}", list.display())), "{tor}");
    let j = cli.json(&["ip-intel", "list"]);
    assert_eq!(j["lists"][0]["entries"], 2);
    assert_eq!(j["lists"][0]["refresh_secs"], 1800);
    cli.ok(&["ip-intel", "allow", "203.0.113.9"]);
    assert_eq!(kernel(&api, "allow").unwrap(), ["203.0.113.9/32"]);
    cli.ok(&["ip-intel", "allow", "--remove", "203.0.113.9"]);
    cli.fails(2, &["ip-intel", "allow", "203.0.113.999"], "cidrs: ");
    cli.fails(
        2,
        &["ip-intel", "block-tor", "--refresh", "10s"],
        "refresh: ",
    );
    cli.fails(2, &["ip-intel", "refresh", "onion"], "category: ");
    std::fs::write(&list, "203.0.113.9\nbad entry here\n").unwrap();
    cli.fails(
        2,
        &["ip-intel", "refresh", "tor"],
        "line 2: \"bad entry here\"",
    );
    assert_eq!(kernel(&api, "tor").unwrap().len(), 2, "the old list stays");
    let out = cli.ok(&["ip-intel", "unblock-tor"]);
    let tor = out.lines().find(|l| l.starts_with("tor ")).unwrap();
    assert!(tor.contains("off"), "{tor}");
    let out = cli.ok(&["ip-intel", "disable"]);
    assert!(out.starts_with("ip-intel disabled\n"), "{out}");
    rt.block_on(api.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_reloads_a_changed_list_file() {
    let api = TestApi::start(false).await;
    let _runner = capybara_agent::service::intel::runner::spawn(&api.svc.intel);
    let c = api.unix_client().await;
    c.set_intel_enabled(true).await.unwrap();
    let file = api.dir.path().join("tor.txt");
    std::fs::write(&file, "192.0.2.1\n").unwrap();
    c.set_intel_source(pb::SetIntelSourceRequest {
        file: file.display().to_string(),
        ..source("tor")
    })
    .await
    .unwrap();
    // Replaced the way feeds are (write aside, rename over).
    let tmp = api.dir.path().join("tor.new");
    std::fs::write(&tmp, "192.0.2.1\n192.0.2.2\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let t = Instant::now();
    while kernel(&api, "tor").unwrap().len() != 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the changed file was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A bad version is refused (the error shown), the good one stays; fixed, it loads.
    std::fs::write(&file, "192.0.2.3\nnot-an-ip\n").unwrap();
    let t = Instant::now();
    while c.intel().await.unwrap().lists[0].last_error.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "no error shown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        kernel(&api, "tor").unwrap(),
        ["192.0.2.1/32", "192.0.2.2/32"]
    );
    std::fs::write(&file, "192.0.2.3\n").unwrap();
    let t = Instant::now();
    while kernel(&api, "tor").unwrap() != ["192.0.2.3/32"] {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the fixed file was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.intel().await.unwrap().lists[0].last_error.is_empty());
    api.stop().await;
}

fn mmdb(nets: &[(&str, &str)], path: &Path) -> Arc<GeoDb> {
    let mut w = MmdbWriter::new(6);
    for (net, cc) in nets {
        w.insert(net.parse().unwrap(), cc).unwrap();
    }
    let bytes = w.to_bytes();
    std::fs::write(path, &bytes).unwrap();
    Arc::new(GeoDb::from_bytes(bytes, path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_update_swaps_the_database_refuses_a_bad_file_and_watches_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = mmdb(&[("1.0.0.0/24", "CN")], &dir.path().join("first.mmdb"));
    let api = TestApi::start_with(false, Some(first)).await;
    let c = api.unix_client().await;
    c.set_geo("block", vec!["CN".into()]).await.unwrap();
    assert_eq!(kernel(&api, "geo:CN").unwrap(), ["1.0.0.0/24"]);
    let g = c.geo().await.unwrap();
    assert_eq!(
        g.database.as_ref().unwrap().path,
        "",
        "the one given at start"
    );

    let second = dir.path().join("second.mmdb");
    mmdb(&[("1.0.0.0/24", "CN"), ("7.0.0.0/8", "CN")], &second);
    let g = c.update_geo_db(second.display().to_string()).await.unwrap();
    assert_eq!(kernel(&api, "geo:CN").unwrap(), ["1.0.0.0/24", "7.0.0.0/8"]);
    let d = g.database.unwrap();
    assert_eq!(d.path, second.display().to_string());
    assert!(d.loaded_at > 0 && d.countries == 1, "{d:?}");

    // A bad file is refused whole; the database and its lists stay.
    let bad = dir.path().join("bad.mmdb");
    std::fs::write(&bad, b"not a database").unwrap();
    for (file, field) in [
        (bad.display().to_string(), "file: "),
        ("relative.mmdb".into(), "file: "),
        (String::new(), "file: required"),
    ] {
        let e = c.update_geo_db(file).await.unwrap_err();
        assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().starts_with(field), "{e}");
    }
    assert!(
        c.update_geo_db(bad.display().to_string())
            .await
            .unwrap_err()
            .to_string()
            .contains("not a valid MaxMind DB")
    );
    assert_eq!(kernel(&api, "geo:CN").unwrap().len(), 2);
    let write = api.token(Scope::Write);
    let e = api
        .tcp_client(Some(&write))
        .await
        .update_geo_db(second.display().to_string())
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(Code::PermissionDenied), "admin only: {e}");

    // Watched: a new version of the file is loaded; a broken one is reported and left.
    let _watch = capybara_agent::service::geo::spawn_watch(&api.svc.geo);
    let tmp = dir.path().join("third.mmdb");
    mmdb(&[("8.0.0.0/8", "CN")], &tmp);
    std::fs::rename(&tmp, &second).unwrap();
    let t = Instant::now();
    while kernel(&api, "geo:CN").unwrap() != ["8.0.0.0/8"] {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the new file was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&second, b"garbage").unwrap();
    let t = Instant::now();
    while c
        .geo()
        .await
        .unwrap()
        .database
        .unwrap()
        .last_error
        .is_empty()
    {
        assert!(t.elapsed() < Duration::from_secs(10), "no error shown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kernel(&api, "geo:CN").unwrap(), ["8.0.0.0/8"]);
    let actions: Vec<String> = c
        .audit("", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .filter(|a| a.starts_with("geo."))
        .collect();
    assert_eq!(actions, ["geo.reload", "geo.update", "geo.set"]);

    // The CLI.
    let cli = Cli::socket(&agent_crate_binary("capybara"), &api.socket);
    let out = cli.ok(&[
        "geo",
        "update",
        "--file",
        &dir.path().join("first.mmdb").display().to_string(),
    ]);
    assert!(out.starts_with("database "), "{out}");
    assert_eq!(kernel(&api, "geo:CN").unwrap(), ["1.0.0.0/24"]);
    cli.fails(
        2,
        &["geo", "update", "--file", &bad.display().to_string()],
        "file: ",
    );
    api.stop().await;
}
