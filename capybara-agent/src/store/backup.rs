//! Backups of the store: every family read through **one RocksDB snapshot** (so the backup is
//! one consistent moment, whatever writes run meanwhile), written as one JSON document:
//!
//! ```json
//! {"format": "capybara-backup", "version": 1, "created_at": 1764300000,
//!  "schemas": {"users": 1, …},
//!  "families": {"users": {"alice": {…}}, "peers": {"alice/laptop": {…}}, …}}
//! ```
//!
//! Values stay the JSON they are stored as, so a backup is readable and diffable. The `meta`
//! family is not copied (its schema versions are the `schemas` field).
//!
//! **Restore** is offline: [`restore`] opens the store of a *stopped* agent's data directory
//! (RocksDB's lock refuses it while an agent holds it), checks the whole file first (format,
//! version, known families, schema versions not newer than this build's, every value JSON) and
//! then replaces every family's contents in **one write batch**, synced: the store holds either
//! the old state or the backup's, never a mix. The agent's next start programs the restored
//! devices into the tunnel and the dataplane and restores the blocklists, as after any restart.
//! This was chosen over an online restore because everything derived from the store (kernel
//! peers, tunnel peers, lists, in-memory indexes) is already rebuilt by start-up, so a restart
//! is the one path that is tested on every boot. Not in the backup: the server's private key
//! (`server.key`) and the key that seals kept client keys — secrets kept as files in the data
//! directory, to be copied (or not) on purpose.

use std::{collections::BTreeMap, path::Path};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

use super::{Cf, Store, StoreError};

/// `format` of a backup file.
pub const FORMAT: &str = "capybara-backup";
/// `version` of the backup file layout this build writes and reads.
pub const VERSION: u32 = 1;

/// A backup file.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackupFile {
    /// Always [`FORMAT`].
    pub format: String,
    /// The file layout version ([`VERSION`]).
    pub version: u32,
    /// When it was made, Unix seconds.
    pub created_at: u64,
    /// Schema version of each family.
    pub schemas: BTreeMap<String, u32>,
    /// Every family (but `meta`): key → stored value.
    pub families: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
}

impl BackupFile {
    /// Records per family.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.families
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect()
    }
}

/// Why a backup could not be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store failed (or is held by a running agent).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file is not a backup this build can read.
    #[error("not a capybara backup: {reason}")]
    Format {
        /// What is wrong.
        reason: String,
    },
    /// The file is a backup but names a family this build does not know.
    #[error("backup family {name:?} is unknown to this agent")]
    UnknownFamily {
        /// The family.
        name: String,
    },
    /// A family was written by a newer schema.
    #[error("backup family {name} has schema version {found}, this agent knows up to {known}")]
    SchemaTooNew {
        /// The family.
        name: String,
        /// Version in the backup.
        found: u32,
        /// This build's.
        known: u32,
    },
}

fn family(name: &str) -> Option<Cf> {
    Cf::ALL
        .into_iter()
        .find(|c| c.name() == name && *c != Cf::Meta)
}

impl Store {
    /// A consistent backup of every family (one read snapshot).
    pub fn backup(&self, created_at: u64) -> Result<BackupFile, StoreError> {
        let snap = self.db.snapshot();
        let mut families = BTreeMap::new();
        for cf in Cf::ALL.into_iter().filter(|c| *c != Cf::Meta) {
            let mut entries = BTreeMap::new();
            for item in snap.iterator_cf(self.handle(cf), IteratorMode::Start) {
                let (k, v) = item.map_err(|source| StoreError::Io {
                    op: "backup",
                    cf: cf.name(),
                    key: String::new(),
                    source,
                })?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let value = serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                    cf: cf.name(),
                    key: key.clone(),
                    source,
                })?;
                entries.insert(key, value);
            }
            families.insert(cf.name().to_owned(), entries);
        }
        Ok(BackupFile {
            format: FORMAT.into(),
            version: VERSION,
            created_at,
            schemas: Cf::ALL
                .into_iter()
                .filter(|c| *c != Cf::Meta)
                .map(|c| (c.name().to_owned(), c.schema_version()))
                .collect(),
            families,
        })
    }
}

/// Parses and checks a backup file (nothing is written).
pub fn parse(bytes: &[u8]) -> Result<BackupFile, BackupError> {
    let file: BackupFile = serde_json::from_slice(bytes).map_err(|e| BackupError::Format {
        reason: e.to_string(),
    })?;
    if file.format != FORMAT {
        return Err(BackupError::Format {
            reason: format!("format is {:?}, expected {FORMAT:?}", file.format),
        });
    }
    if file.version != VERSION {
        return Err(BackupError::Format {
            reason: format!("version {} (this agent reads {VERSION})", file.version),
        });
    }
    for name in file.families.keys().chain(file.schemas.keys()) {
        let cf = family(name).ok_or_else(|| BackupError::UnknownFamily { name: name.clone() })?;
        let found = file.schemas.get(name).copied().unwrap_or(0);
        if found > cf.schema_version() {
            return Err(BackupError::SchemaTooNew {
                name: name.clone(),
                found,
                known: cf.schema_version(),
            });
        }
    }
    Ok(file)
}

/// Replaces the store in `data_dir` (of a stopped agent) with the backup in `bytes`, in one
/// synced write batch. Returns the records restored per family.
pub fn restore(data_dir: &Path, bytes: &[u8]) -> Result<BTreeMap<String, u64>, BackupError> {
    let file = parse(bytes)?;
    let store = Store::open(data_dir)?;
    let mut wb = WriteBatch::default();
    for cf in Cf::ALL.into_iter().filter(|c| *c != Cf::Meta) {
        let h = store.handle(cf);
        for item in store.db.iterator_cf(h, IteratorMode::Start) {
            let (k, _) = item.map_err(|source| StoreError::Io {
                op: "restore",
                cf: cf.name(),
                key: String::new(),
                source,
            })?;
            wb.delete_cf(h, k);
        }
        for (k, v) in file.families.get(cf.name()).into_iter().flatten() {
            let bytes = serde_json::to_vec(v).map_err(|source| StoreError::Encode {
                cf: cf.name(),
                key: k.clone(),
                source,
            })?;
            wb.put_cf(h, k, bytes);
        }
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    store
        .db
        .write_opt(wb, &wo)
        .map_err(|source| StoreError::Io {
            op: "restore",
            cf: "batch",
            key: String::new(),
            source,
        })?;
    Ok(file.counts())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys;

    #[test]
    fn restore_brings_back_exactly_the_backup_and_refuses_bad_files_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = {
            let store = Store::open(dir.path()).unwrap();
            store.put(Cf::Users, &keys::user("alice"), &"a").unwrap();
            store
                .put(Cf::Peers, &keys::peer("alice", "x"), &1u32)
                .unwrap();
            let b = serde_json::to_vec(&store.backup(7).unwrap()).unwrap();
            // After the backup: alice removed, bob added.
            let mut batch = crate::store::Batch::default();
            batch.delete(Cf::Users, &keys::user("alice"));
            batch.put(Cf::Users, &keys::user("bob"), &"b").unwrap();
            store.commit(batch).unwrap();
            // The agent holds the store: restore is refused.
            assert!(matches!(
                restore(dir.path(), &b),
                Err(BackupError::Store(StoreError::Open { .. }))
            ));
            b
        };
        // Bad files change nothing.
        let mut bad: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        bad["schemas"]["users"] = 99.into();
        let e = restore(dir.path(), &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(matches!(e, BackupError::SchemaTooNew { .. }), "{e}");
        let mut bad: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        bad["families"]["nope"] = serde_json::json!({});
        assert!(matches!(
            restore(dir.path(), &serde_json::to_vec(&bad).unwrap()),
            Err(BackupError::UnknownFamily { .. })
        ));
        assert!(matches!(
            restore(dir.path(), b"{}"),
            Err(BackupError::Format { .. })
        ));
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.scan::<String>(Cf::Users, "").unwrap().len(), 1);
            assert!(store.get::<String>(Cf::Users, "bob").unwrap().is_some());
        }
        let counts = restore(dir.path(), &bytes).unwrap();
        assert_eq!(counts["users"], 1);
        assert_eq!(counts["peers"], 1);
        let store = Store::open(dir.path()).unwrap();
        let users: Vec<(String, String)> = store.scan(Cf::Users, "").unwrap();
        assert_eq!(users, [("alice".to_owned(), "a".to_owned())]);
        assert_eq!(
            store
                .get::<u32>(Cf::Peers, &keys::peer("alice", "x"))
                .unwrap(),
            Some(1)
        );
    }
}
