//! Blocklist entries are bounded per answer (issue 19 item 8): `ListBlocklists`, `AddEntries`
//! and `RemoveEntries` answer each list's entry count, not its CIDRs; `GetBlocklist` pages the
//! entries in address order (IPv4 before IPv6, then address, then prefix length) with the
//! paging conventions of the other list calls; a list too big for one 4 MiB message is uploaded
//! through the streaming calls as one change; and the `capybara` CLI still prints every entry
//! (it fetches them page by page). The lists are built by code: 250 000 entries for the API,
//! 1 000 000 for the CLI's `--file` upload.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use capybara_agent::{
    blocklist::Direction,
    net::Cidr,
    service::{domain::Scope, lists::entry_key},
};
use capybara_proto::v1 as pb;
use capybara_tests::agent_proc::agent_crate_binary;
use prost::Message;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

/// Entries of the API test's list.
const BIG: usize = 250_000;
/// Of which IPv6.
const BIG_V6: usize = 10_000;

/// Entry `i` of a list of `n` (`v6` of them IPv6), all distinct.
fn entry(i: usize, n: usize, v6: usize) -> Cidr {
    if i < n - v6 {
        let a = 0x0a00_0000u32 + u32::try_from(i).unwrap();
        Cidr::v4(Ipv4Addr::from(a), 32).unwrap()
    } else {
        let a = 0x2001_0db8_u128 << 96 | (i as u128) << 16;
        Cidr::v6(Ipv6Addr::from(a), 112).unwrap()
    }
}

/// The `n` entries in a scrambled order (not address order), as text.
fn scrambled(n: usize, v6: usize) -> Vec<String> {
    // 7919 is prime and does not divide n: i * 7919 mod n visits every index once.
    (0..n)
        .map(|i| entry(i * 7919 % n, n, v6).to_string())
        .collect()
}

/// The `n` entries in address order, as text.
fn sorted(n: usize, v6: usize) -> Vec<String> {
    let mut all: Vec<Cidr> = (0..n).map(|i| entry(i, n, v6)).collect();
    all.sort_by_key(entry_key);
    all.iter().map(ToString::to_string).collect()
}

#[test]
fn big_lists_answer_counts_and_page_their_entries() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bin = agent_crate_binary("capybara");
    let api = rt.block_on(TestApi::start(false));
    let want = sorted(BIG, BIG_V6);
    rt.block_on(async {
        let c = api.unix_client().await;
        // 250 000 entries are about 4.4 MB of text: more than one message may carry.
        let started = Instant::now();
        let l = c
            .change_entries(Direction::Source, "threats", scrambled(BIG, BIG_V6), true)
            .await
            .unwrap();
        eprintln!("upload of {BIG} entries: {:?}", started.elapsed());
        assert_eq!(l.entries, BIG);
        assert!(l.cidrs.is_empty(), "AddEntries answers the count only");
        c.change_entries(
            Direction::Destination,
            "small",
            vec!["192.0.2.0/24".into()],
            true,
        )
        .await
        .unwrap();

        // ListBlocklists answers counts: small whatever the lists hold.
        let mut raw = pb::blocklists_client::BlocklistsClient::new(
            tonic::transport::Channel::from_shared(api.url())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let token = api.token(Scope::Read);
        let ask = |m| {
            let mut r = tonic::Request::new(m);
            r.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            r
        };
        let lists = raw
            .list_blocklists(ask(pb::ListBlocklistsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let size = lists.encoded_len();
        eprintln!("ListBlocklists of a {BIG}-entry list and a 1-entry list: {size} bytes");
        assert!(size < 1024, "ListBlocklists answered {size} bytes");
        // What it answered before (every CIDR of every list): ~4.1 MB, nearly the 4 MiB
        // message limit already at 250 000 entries.
        let mut whole = lists.clone();
        whole.lists[0].cidrs.clone_from(&want);
        eprintln!(
            "the same answer with every CIDR: {} bytes",
            whole.encoded_len()
        );
        assert!(whole.encoded_len() > 4_000_000);
        // One unary request too big for a message (500 000 entries, ~8 MB) is refused as such
        // and changes nothing (the client streams instead).
        let mut add = tonic::Request::new(pb::ChangeEntriesRequest {
            direction: pb::Direction::Source as i32,
            name: "threats".into(),
            cidrs: [want.clone(), want.clone()].concat(),
        });
        add.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", api.token(Scope::Write))
                .parse()
                .unwrap(),
        );
        let e = raw.add_entries(add).await.unwrap_err();
        eprintln!(
            "unary AddEntries of 2 x {BIG} entries: {:?} {}",
            e.code(),
            e.message()
        );
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(e.message().contains("message length too large"), "{e:?}");
        let counts: Vec<(String, u64, usize)> = lists
            .lists
            .iter()
            .map(|l| (l.name.clone(), l.entry_count, l.cidrs.len()))
            .collect();
        assert_eq!(
            counts,
            [("threats".into(), BIG as u64, 0), ("small".into(), 1, 0)]
        );

        // GetBlocklist pages the entries: every one exactly once, in address order.
        let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (p, next) = c
                .blocklist_page(Direction::Source, "threats", 1_000, token)
                .await
                .unwrap();
            pages += 1;
            assert_eq!(p.entries, BIG);
            assert!(p.cidrs.len() == 1_000 || next.is_empty(), "page {pages}");
            seen.extend(p.cidrs.iter().map(ToString::to_string));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(pages, BIG / 1_000);
        assert!(seen == want, "every entry once, in address order");
        // page_size 0 = 100, more than 1 000 clamped to 1 000.
        let (p, next) = c
            .blocklist_page(Direction::Source, "threats", 0, String::new())
            .await
            .unwrap();
        assert_eq!(p.cidrs.len(), 100);
        let (p2, _) = c
            .blocklist_page(Direction::Source, "threats", 5_000, String::new())
            .await
            .unwrap();
        assert_eq!(p2.cidrs.len(), 1_000);
        // A token whose entry was removed since continues after it.
        let last = p.cidrs.last().unwrap().to_string();
        let l = c
            .change_entries(Direction::Source, "threats", vec![last], false)
            .await
            .unwrap();
        assert_eq!((l.entries, l.cidrs.len()), (BIG - 1, 0));
        let (p3, _) = c
            .blocklist_page(Direction::Source, "threats", 10, next)
            .await
            .unwrap();
        let p3: Vec<String> = p3.cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(p3, want[100..110]);
        c.change_entries(Direction::Source, "threats", vec![want[99].clone()], true)
            .await
            .unwrap();
        // Foreign tokens (a ListBlocklists token among them) are refused naming page_token.
        let (_, list_token) = c.blocklists_page(1, String::new()).await.unwrap();
        assert!(!list_token.is_empty());
        for bad in ["junk".to_string(), "n0".into(), list_token] {
            let (code, msg) = refused(
                c.blocklist_page(Direction::Source, "threats", 10, bad.clone())
                    .await,
            );
            assert_eq!(code, Code::InvalidArgument, "{bad}");
            assert!(msg.contains("page_token"), "{bad}: {msg}");
        }
        // The client's whole list is every entry.
        let whole = c.blocklist(Direction::Source, "threats").await.unwrap();
        assert_eq!((whole.entries, whole.cidrs.len()), (BIG, BIG));
    });

    // The CLI prints every entry: `show` one per line, `list --json` whole as before.
    let cli = Cli::socket(&bin, &api.socket);
    let shown = cli.ok(&["blocklist", "show", "threats"]);
    assert!(shown.lines().eq(want.iter().map(String::as_str)));
    let json = cli.json(&["blocklist", "list"]);
    let threats = json
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "threats")
        .unwrap();
    assert_eq!(threats["cidrs"].as_array().unwrap().len(), BIG);
    let table = cli.ok(&["blocklist", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("threats") && l.contains(&BIG.to_string())),
        "{table}"
    );
    rt.block_on(api.stop());
}

#[test]
fn a_million_entry_list_is_uploaded_from_a_file() {
    const MILLION: usize = 1_000_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bin = agent_crate_binary("capybara");
    let api = rt.block_on(TestApi::start(false));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("threats.txt");
    let mut text = String::from("# a threat feed\n\n");
    for e in scrambled(MILLION, 0) {
        text.push_str(&e);
        text.push('\n');
    }
    std::fs::write(&file, &text).unwrap();
    let cli = Cli::socket(&bin, &api.socket);
    let started = Instant::now();
    let out = cli.ok(&["blocklist", "add", "feed", "--file", file.to_str().unwrap()]);
    eprintln!(
        "capybara blocklist add --file of {MILLION} entries ({} bytes): {:?}",
        text.len(),
        started.elapsed()
    );
    assert_eq!(out.trim(), format!("source feed: {MILLION} entries"));
    // One change: one audit record.
    rt.block_on(async {
        let c = api.unix_client().await;
        let adds = c
            .audit("", 1000)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.action == "blocklist.add")
            .count();
        assert_eq!(adds, 1);
    });
    // A bad line is refused naming the file's entry, and changes nothing.
    std::fs::write(&file, "192.0.2.0/24\n10.0.0.1/8\n").unwrap();
    cli.fails(
        2,
        &["blocklist", "add", "feed", "--file", file.to_str().unwrap()],
        "file: list entry #1",
    );
    let table = cli.ok(&["blocklist", "list"]);
    assert!(table.contains(&MILLION.to_string()), "{table}");
    rt.block_on(api.stop());
}
