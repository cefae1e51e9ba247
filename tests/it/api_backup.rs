//! Backups of a store over 64 MiB through the real `capybara` CLI and the gRPC API: before
//! `CreateBackup` streamed, one message over tonic's 4 MiB limit failed the CLI (issue 19).
//!
//! The store is made big by direct store writes (a long audit trail: 72 000 records of about
//! 1 KiB each, in synced batches of 6 000), which takes a few seconds instead of the minutes
//! 72 000 API calls would. The backup is 84 MB; `backup create` took 1.6 s of it, the whole test
//! about 2 min in a debug build on this 2-core machine under load (filling the store, the
//! restore reading the file twice, and three in-memory backups to compare stores): it is slow
//! because the store must be that big.

use std::os::unix::fs::PermissionsExt;

use capybara_agent::{
    service::domain::AuditRecord,
    store::{Batch, Cf, Store, keys},
};
use capybara_tests::agent_proc::agent_crate_binary;

use crate::api_support::{Cli, TestApi};

/// Records written, and the bytes of each record's `after` document.
const RECORDS: u64 = 72_000;
const DOC_BYTES: usize = 1000;

/// Fills `store` with about `RECORDS * DOC_BYTES` bytes of audit records.
fn fill(store: &Store) {
    let doc = "x".repeat(DOC_BYTES);
    let mut batch = Batch::default();
    for i in 0..RECORDS {
        let seq = 10_000_000 + i;
        let rec = AuditRecord {
            seq,
            at: 1_700_000_000 + i,
            actor: "uid:0".into(),
            action: "policy.set".into(),
            target: format!("user:bulk{i}"),
            before: None,
            after: Some(serde_json::json!({ "doc": doc, "i": i })),
        };
        batch.put(Cf::Audit, &keys::audit(seq), &rec).unwrap();
        if (i + 1) % 6_000 == 0 {
            store.commit(std::mem::take(&mut batch)).unwrap();
        }
    }
    store.commit(batch).unwrap();
}

/// The `created_at` of a backup file (its header, in the first bytes).
fn created_at(file: &[u8]) -> u64 {
    let head = String::from_utf8_lossy(&file[..200.min(file.len())]).into_owned();
    let at = head.split("\"created_at\":").nth(1).expect("created_at");
    at[..at.find(',').unwrap()].parse().unwrap()
}

/// A backup of `store` made at `at`, in memory.
fn backup_bytes(store: &Store, at: u64) -> Vec<u8> {
    let mut out = Vec::new();
    store.write_backup(at, &mut out).unwrap();
    out
}

#[test]
fn a_store_over_64_mib_round_trips_through_the_cli() {
    let bin = agent_crate_binary("capybara");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApi::start(false));
    let cli = Cli::socket(&bin, &api.socket);
    cli.ok(&["user", "add", "alice", "--no-qr"]);
    fill(&api.svc.core.store);

    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("big.backup");
    let t = std::time::Instant::now();
    let out = cli.ok(&["backup", "create", "--output", file.to_str().unwrap()]);
    let took = t.elapsed();
    let bytes = std::fs::read(&file).unwrap();
    assert!(
        bytes.len() > 64 << 20,
        "the backup is over 64 MiB: {} bytes",
        bytes.len()
    );
    eprintln!("backup create: {} bytes in {took:?}", bytes.len());
    assert!(out.starts_with("backup written to"), "{out}");
    let total: u64 = out
        .rsplit('(')
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(total > RECORDS, "the bulk records and alice's: {out}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        !out_dir.path().join(".big.backup.tmp").exists(),
        "the temporary file was renamed"
    );
    // The file is the store as it is (nothing changed it since).
    let at = created_at(&bytes);
    assert!(
        backup_bytes(&api.svc.core.store, at) == bytes,
        "the backup is the store"
    );

    // Restored into a stopped agent's (here: a fresh) data directory.
    let data = out_dir.path().join("data");
    let out = cli.ok(&[
        "backup",
        "restore",
        "--input",
        file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.starts_with(&format!("restored {total} records")),
        "{out}"
    );
    {
        let restored = Store::open(&data).unwrap();
        assert!(
            backup_bytes(&restored, at) == bytes,
            "the restored store is the original"
        );
    }

    // A cut-short file is refused and changes nothing.
    let cut = out_dir.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut other = Vec::new();
    {
        let restored = Store::open(&data).unwrap();
        restored
            .put(
                Cf::Users,
                &keys::user("zed"),
                &serde_json::json!({"name": "zed"}),
            )
            .unwrap();
        other.extend(backup_bytes(&restored, at));
    }
    cli.fails(
        2,
        &[
            "backup",
            "restore",
            "--input",
            cut.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        "not a capybara backup",
    );
    let restored = Store::open(&data).unwrap();
    assert!(
        backup_bytes(&restored, at) == other,
        "a cut-short restore changed nothing"
    );
    drop(restored);
    rt.block_on(api.stop());
}
