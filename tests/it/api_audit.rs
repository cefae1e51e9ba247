//! `ListAudit` through the real gRPC API and the `capybara` CLI: pages of at most 1 000
//! records (a bigger `page_size` is clamped), every record exactly once across the pages, a
//! token the call did not hand out refused naming `page_token`, and `history audit --limit`
//! walking the pages (issue 19 item 8). 2 500 records are written straight into the store
//! (one synced batch) rather than through 2 500 calls.

use capybara_agent::{
    service::domain::AuditRecord,
    store::{Batch, Cf, keys},
};
use capybara_tests::agent_proc::agent_crate_binary;
use tonic::Code;

use crate::api_support::{Cli, TestApi, refused};

const RECORDS: u64 = 2_500;

#[test]
fn audit_pages_are_capped_and_cover_every_record_once() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let mut batch = Batch::default();
    for seq in 1..=RECORDS {
        let rec = AuditRecord {
            seq,
            at: 1_700_000_000 + seq,
            actor: "uid:0".into(),
            action: "user.add".into(),
            target: format!("user:u{seq}"),
            before: None,
            after: None,
        };
        batch.put(Cf::Audit, &keys::audit(seq), &rec).unwrap();
    }
    api.svc.core.store.commit(batch).unwrap();

    rt.block_on(async {
        let c = api.unix_client().await;
        let (page, next) = c.audit_page("", 5_000, "").await.unwrap();
        assert_eq!(page.len(), 1_000, "page_size 5000 is clamped to 1000");
        assert!(!next.is_empty());
        let (page, _) = c.audit_page("", 0, "").await.unwrap();
        assert_eq!(page.len(), 100, "page_size 0 is 100");
        let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (page, next) = c.audit_page("", 300, &token).await.unwrap();
            assert!(page.len() <= 300);
            seen.extend(page.iter().map(|r| r.seq));
            pages += 1;
            if next.is_empty() {
                break;
            }
            token = next;
        }
        let want: Vec<u64> = (1..=RECORDS).rev().collect();
        assert_eq!(seen, want, "every record once, newest first");
        assert_eq!(pages, 9);
        let (code, msg) = refused(c.audit_page("", 10, "junk").await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.contains("page_token"), "{msg}");
    });

    let cli = Cli::socket(&bin, &api.socket);
    let json = cli.json(&["history", "audit", "--limit", "1500"]);
    let seqs: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1_001..=RECORDS).rev().collect::<Vec<_>>());
    let table = cli.ok(&["history", "audit", "--limit", "1500"]);
    assert_eq!(table.lines().count(), 1 + 1_500, "a header and 1 500 rows");
    rt.block_on(api.stop());
}
