//! Every list call that grows with the users, devices, tokens, groups, templates or lists is
//! paged like `ListAudit` (issue 19 item 8): in name (key) order, `page_size` 0 = 100, more than
//! 1 000 clamped to 1 000, every item exactly once across the pages, a token the call did not
//! hand out refused naming `page_token`; and the `capybara` CLI walks every page, so its lists
//! are whole. The 1 100 users of the clamp and CLI test are written straight into the store (one
//! synced batch) rather than through 1 100 calls; so are those of the `ShowQuota` test (quota
//! usage of every user, paged by user name).

use std::future::Future;

use capybara_agent::{
    api::client::ClientError,
    blocklist::Direction,
    service::{
        domain::{Scope, User, UserName},
        policy::model::LimitsText,
    },
    store::{Batch, Cf, keys},
};
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

/// Items made for the paging tests: more than two default pages.
const ITEMS: usize = 250;

/// Walks every page of size `size` with `page` and checks each page's size: every item's key,
/// in the order returned, and the number of pages.
async fn walk<T, F, Fut>(size: u32, key: impl Fn(&T) -> String, mut page: F) -> (Vec<String>, usize)
where
    F: FnMut(u32, String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), ClientError>>,
{
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let (items, next) = page(size, token).await.unwrap();
        pages += 1;
        assert!(
            items.len() <= size as usize,
            "page {pages} holds {}",
            items.len()
        );
        if !next.is_empty() {
            assert_eq!(items.len(), size as usize, "a page before the last is full");
        }
        seen.extend(items.iter().map(&key));
        if next.is_empty() {
            return (seen, pages);
        }
        token = next;
    }
}

/// Checks a paged call over `want` (its keys in order): pages of 100, `page_size` 0 = 100, and
/// foreign tokens refused naming `page_token`.
async fn check<T: std::fmt::Debug, F, Fut>(
    what: &str,
    want: &[String],
    key: impl Fn(&T) -> String + Copy,
    mut page: F,
) where
    F: FnMut(u32, String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), ClientError>>,
{
    let (seen, pages) = walk(100, key, &mut page).await;
    assert_eq!(seen, want, "{what}: every item once, in order");
    assert_eq!(pages, want.len().div_ceil(100), "{what}: pages of 100");
    let (first, next) = page(0, String::new()).await.unwrap();
    assert_eq!(
        first.len(),
        want.len().min(100),
        "{what}: page_size 0 is 100"
    );
    assert_eq!(next.is_empty(), want.len() <= 100, "{what}");
    for bad in ["junk", "a12", "n0"] {
        let (code, msg) = refused(page(10, bad.into()).await);
        assert_eq!(code, Code::InvalidArgument, "{what} {bad}");
        assert!(msg.contains("page_token"), "{what} {bad}: {msg}");
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn users_devices_and_connections_are_paged_by_name() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    rt.block_on(async {
        let c = api.unix_client().await;
        // Made in reverse to show the order is by name, not by creation.
        for i in (0..ITEMS).rev() {
            c.add_user(&format!("u{i:03}"), "laptop", 0).await.unwrap();
        }
        for d in ["phone", "tablet", "desk"] {
            c.add_peer("u007", d).await.unwrap();
        }
        // A name that sorts before `u007/` as a device key but after `u007` as a name.
        c.add_user("u007-x", "laptop", 0).await.unwrap();
        let mut names: Vec<String> = (0..ITEMS).map(|i| format!("u{i:03}")).collect();
        names.insert(8, "u007-x".into());
        check(
            "users",
            &names,
            |u: &capybara_agent::service::domain::UserDetail| u.user.name.to_string(),
            |s, t| c.list_users_page(s, t),
        )
        .await;
        let mut devices = Vec::new();
        for n in &names {
            let mut ds = vec!["laptop"];
            if n == "u007" {
                ds = vec!["desk", "laptop", "phone", "tablet"];
            }
            devices.extend(ds.iter().map(|d| format!("{n}/{d}")));
        }
        // Connections come by (user, device); devices and stats by `user/device` key.
        let by_user = devices.clone();
        devices.sort();
        assert_ne!(
            by_user, devices,
            "the two orders differ for u007 and u007-x"
        );
        let peer_key =
            |p: &capybara_agent::service::domain::Peer| format!("{}/{}", p.user, p.device);
        check("peers", &devices, peer_key, |s, t| {
            c.list_peers_page("", s, t)
        })
        .await;
        let (seen, pages) = walk(3, peer_key, |s, t| c.list_peers_page("u007", s, t)).await;
        assert_eq!(
            seen,
            ["u007/desk", "u007/laptop", "u007/phone", "u007/tablet"]
        );
        assert_eq!(pages, 2);
        let (code, msg) = refused(c.list_peers_page("nobody", 10, String::new()).await);
        assert_eq!(code, Code::NotFound, "{msg}");
        // Stats of every user: pages of whole users (each with all its devices).
        let (mut users, mut devs, mut token, mut pages) =
            (Vec::new(), Vec::new(), String::new(), 0);
        loop {
            let (st, next) = c.stats_page("", 100, token).await.unwrap();
            pages += 1;
            assert!(st.users.len() <= 100);
            users.extend(st.users.keys().cloned());
            devs.extend(st.peers.iter().map(|p| peer_key(&p.peer)));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(
            (users, pages),
            (names.clone(), 3),
            "stats: every user once, by name"
        );
        assert_eq!(devs, devices, "stats: every device once, in order");
        let (code, msg) = refused(c.stats_page("", 10, "junk".into()).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.contains("page_token"), "{msg}");
        let one = c.stats("u007").await.unwrap();
        assert_eq!(one.peers.len(), 4);
        let all = c.stats("").await.unwrap();
        assert_eq!(
            (all.users.len(), all.peers.len()),
            (names.len(), devices.len())
        );
        // The client's whole lists walk every page.
        assert_eq!(c.list_users().await.unwrap().len(), names.len());
        let conns = c.connections().await.unwrap();
        let keys: Vec<String> = conns
            .iter()
            .map(|x| peer_key(x.peer.as_ref().unwrap()))
            .collect();
        assert_eq!(keys, by_user, "connections: every device once, in order");
    });
    rt.block_on(api.stop());
}

#[test]
fn a_big_page_is_clamped_and_the_cli_lists_every_page() {
    const USERS: usize = 1_100;
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let mut batch = Batch::default();
    for i in 0..USERS {
        let name = format!("bulk{i:04}");
        let user = User {
            name: UserName::parse("name", &name).unwrap(),
            created_at: 1_700_000_000,
            expires_at: None,
        };
        batch.put(Cf::Users, &keys::user(&name), &user).unwrap();
    }
    api.svc.core.store.commit(batch).unwrap();
    rt.block_on(async {
        let c = api.unix_client().await;
        let (page, next) = c.list_users_page(5_000, String::new()).await.unwrap();
        assert_eq!(page.len(), 1_000, "page_size 5000 is clamped to 1000");
        assert!(!next.is_empty());
        let (rest, next) = c.list_users_page(5_000, next).await.unwrap();
        assert_eq!((rest.len(), next.as_str()), (USERS - 1_000, ""));
    });
    let cli = Cli::socket(&bin, &api.socket);
    let json = cli.json(&["user", "list"]);
    let names: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"]["name"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..USERS).map(|i| format!("bulk{i:04}")).collect();
    assert_eq!(
        names, want,
        "user list --json: every user of both pages once"
    );
    let table = cli.ok(&["user", "list"]);
    assert_eq!(table.lines().count(), 1 + USERS, "a header and 1 100 rows");
    rt.block_on(api.stop());
}

#[test]
fn tokens_groups_templates_and_blocklists_are_paged_by_name() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    rt.block_on(async {
        let c = api.unix_client().await;
        let mut ids = Vec::new();
        for i in (0..ITEMS).rev() {
            let (t, _) = c
                .create_token(Scope::Read, &format!("t{i:03}"), 3_600)
                .await
                .unwrap();
            ids.push(t.id.to_string());
            c.create_group(&format!("g{i:03}")).await.unwrap();
            c.save_config_template(&format!("c{i:03}"), false)
                .await
                .unwrap();
            c.create_quota_template(&format!("q{i:03}"), &LimitsText::default(), false)
                .await
                .unwrap();
            let dir = if i % 2 == 0 {
                Direction::Source
            } else {
                Direction::Destination
            };
            let cidr = format!("10.{}.{}.0/24", i / 250, i % 250);
            c.change_entries(dir, &format!("l{i:03}"), vec![cidr], true)
                .await
                .unwrap();
        }
        let all = c.list_tokens().await.unwrap();
        let want = sorted(all.iter().map(|t| t.id.to_string()).collect());
        assert!(
            ids.iter().all(|i| want.contains(i)),
            "every token made is listed"
        );
        assert!(want.len() >= ITEMS);
        check(
            "tokens",
            &want,
            |t: &capybara_agent::service::domain::Token| t.id.to_string(),
            |s, t| c.list_tokens_page(s, t),
        )
        .await;
        let names = |p: char| (0..ITEMS).map(|i| format!("{p}{i:03}")).collect::<Vec<_>>();
        check(
            "groups",
            &names('g'),
            |g: &capybara_agent::service::policy::GroupView| g.name.to_string(),
            |s, t| c.list_groups_page(s, t),
        )
        .await;
        check(
            "quota templates",
            &names('q'),
            |q: &capybara_agent::service::templates::model::QuotaTemplateView| q.name.to_string(),
            |s, t| c.list_quota_templates_page(s, t),
        )
        .await;
        // The built-in configuration templates first, then the saved ones by name.
        let builtins: Vec<String> = c
            .list_config_templates_page(1_000, String::new())
            .await
            .unwrap()
            .0
            .iter()
            .filter(|v| v.builtin)
            .map(|v| v.template.name.to_string())
            .collect();
        assert!(!builtins.is_empty());
        let configs: Vec<String> = builtins.iter().cloned().chain(names('c')).collect();
        check(
            "config templates",
            &configs,
            |v: &capybara_agent::service::templates::ConfigTemplateView| {
                v.template.name.to_string()
            },
            |s, t| c.list_config_templates_page(s, t),
        )
        .await;
        // Sources first, then destinations, each by name.
        let lists: Vec<String> = (0..ITEMS)
            .filter(|i| i % 2 == 0)
            .chain((0..ITEMS).filter(|i| i % 2 == 1))
            .map(|i| format!("l{i:03}"))
            .collect();
        check(
            "blocklists",
            &lists,
            |l: &capybara_agent::service::lists::BlocklistView| l.name.clone(),
            |s, t| c.blocklists_page(s, t),
        )
        .await;
    });
    // The CLI's lists are whole (its client walks the pages).
    let cli = Cli::socket(&bin, &api.socket);
    assert_eq!(
        cli.json(&["group", "list"]).as_array().unwrap().len(),
        ITEMS
    );
    assert_eq!(
        cli.json(&["blocklist", "list"]).as_array().unwrap().len(),
        ITEMS
    );
    rt.block_on(api.stop());
}

#[test]
fn quota_usage_of_every_user_is_paged_by_name_and_the_cli_walks_the_pages() {
    const USERS: usize = 1_100;
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let mut batch = Batch::default();
    // Written in reverse to show the order is by name, not by writing.
    for i in (0..USERS).rev() {
        let name = format!("q{i:04}");
        let user = User {
            name: UserName::parse("name", &name).unwrap(),
            created_at: 1_700_000_000,
            expires_at: None,
        };
        batch.put(Cf::Users, &keys::user(&name), &user).unwrap();
    }
    api.svc.core.store.commit(batch).unwrap();
    let want: Vec<String> = (0..USERS).map(|i| format!("q{i:04}")).collect();
    rt.block_on(async {
        let c = api.unix_client().await;
        let user = |q: &capybara_agent::service::policy::QuotaStatus| q.user.clone();
        check("quota", &want, user, |s, t| {
            c.show_quota_page("", false, s, t)
        })
        .await;
        let (page, next) = c
            .show_quota_page("", false, 5_000, String::new())
            .await
            .unwrap();
        assert_eq!(page.len(), 1_000, "page_size 5000 is clamped to 1000");
        let (rest, next) = c.show_quota_page("", false, 5_000, next).await.unwrap();
        assert_eq!((rest.len(), next.as_str()), (USERS - 1_000, ""));
        // Nobody is over budget: the filtered walk reads every user and answers one empty page.
        let (over, next) = c
            .show_quota_page("", true, 10, String::new())
            .await
            .unwrap();
        assert_eq!((over.len(), next.as_str()), (0, ""));
        // One user: one answer, no token; a foreign token is refused there too.
        let (one, next) = c
            .show_quota_page("q0007", false, 0, String::new())
            .await
            .unwrap();
        assert_eq!(
            (user(&one[0]), one.len(), next.as_str()),
            ("q0007".into(), 1, "")
        );
        let (code, msg) = refused(c.show_quota_page("q0007", false, 0, "junk".into()).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.contains("page_token"), "{msg}");
        let all: Vec<String> = c
            .show_quota("", false)
            .await
            .unwrap()
            .iter()
            .map(user)
            .collect();
        assert_eq!(all, want, "the client walks every page");
    });
    let cli = Cli::socket(&bin, &api.socket);
    let json = cli.json(&["quota", "report"]);
    let names: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["user"].as_str().unwrap())
        .collect();
    assert_eq!(
        names, want,
        "quota report --json: every user of both pages once"
    );
    let table = cli.ok(&["quota", "report"]);
    assert_eq!(table.lines().count(), 1 + USERS, "a header and 1 100 rows");
    rt.block_on(api.stop());
}
