//! Backups of the store: every family read through **one RocksDB snapshot** (so the backup is
//! one consistent moment, whatever writes run meanwhile), written as one JSON document, a
//! record at a time as it is read ([`Store::write_backup`]: memory does not grow with the
//! store; the API streams it to the client in 1 MiB chunks):
//!
//! ```json
//! {"format": "capybara-backup", "version": 1, "created_at": 1764300000,
//!  "schemas": {"users": 1, …},
//!  "families": {"users": {"alice": {…}}, "peers": {"alice/laptop": {…}}, …}}
//! ```
//!
//! Values are the JSON they are stored as, byte for byte, so a backup is readable and diffable
//! and a restore puts back exactly the bytes it read. The `meta` family is not copied (its
//! schema versions are the `schemas` field), nor is `usage` (the binary usage rollups: statistics
//! derived from the kernel's counters, not configuration; a restore leaves them as they are).
//!
//! **Restore** is offline: [`restore_from`] reads the file a record at a time (never whole in
//! memory) and checks all of it first (format, version, known families, schema versions not
//! newer than this build's, every value JSON), then opens the store of a *stopped* agent's data
//! directory (RocksDB's lock refuses it while an agent holds it) and replaces every family's
//! contents in **one write batch**, synced, built while the file is read a second time: the
//! store holds either the old state or the backup's, never a mix, and a bad or cut-short file
//! changes nothing. It stays offline rather than a client-streaming call of the running agent
//! for the reason below. The agent's next start programs the restored
//! devices into the tunnel and the dataplane and restores the blocklists, as after any restart.
//! This was chosen over an online restore because everything derived from the store (kernel
//! peers, tunnel peers, lists, in-memory indexes) is already rebuilt by start-up, so a restart
//! is the one path that is tested on every boot. Not in the backup: the server's private key
//! (`server.key`) and the key that seals kept client keys — secrets kept as files in the data
//! directory, to be copied (or not) on purpose.

use std::{
    collections::BTreeMap,
    fmt,
    io::{Read, Seek, Write},
    path::Path,
};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor},
};
use serde_json::value::RawValue;

use super::{Cf, Store, StoreError};

/// `format` of a backup file.
pub const FORMAT: &str = "capybara-backup";
/// `version` of the backup file layout this build writes and reads.
pub const VERSION: u32 = 1;

/// A backup file held in memory (tests, small stores; the agent streams, see
/// [`Store::write_backup`] and [`restore_from`]).
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
    /// The file is not a backup this build can read (or it is cut short).
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
    /// The backup could not be written out (the reader went away, the disk is full).
    #[error("cannot write the backup")]
    Write(#[source] std::io::Error),
    /// The backup file could not be read.
    #[error("cannot read the backup")]
    Read(#[source] std::io::Error),
}

fn family(name: &str) -> Option<Cf> {
    backed_up().find(|c| c.name() == name)
}

/// The families a backup holds: all but `meta` and `usage` (binary rollups derived from the
/// kernel's counters: statistics, not configuration; a restore leaves the target's as they
/// are).
fn backed_up() -> impl Iterator<Item = Cf> {
    Cf::ALL
        .into_iter()
        .filter(|c| !matches!(c, Cf::Meta | Cf::Usage))
}

impl Store {
    /// Writes a consistent backup of every family (one read snapshot) to `out` as it reads:
    /// one record at a time, the stored values as they are (each checked to be JSON), so
    /// memory does not grow with the store. Returns the records per family.
    pub fn write_backup(
        &self,
        created_at: u64,
        out: &mut dyn Write,
    ) -> Result<BTreeMap<String, u64>, BackupError> {
        let snap = self.db.snapshot();
        let w = |out: &mut dyn Write, b: &[u8]| out.write_all(b).map_err(BackupError::Write);
        let schemas: BTreeMap<&str, u32> = backed_up()
            .map(|c| (c.name(), c.schema_version()))
            .collect();
        w(
            out,
            format!(
                "{{\"format\":{},\"version\":{VERSION},\"created_at\":{created_at},\"schemas\":{},\"families\":{{",
                json(FORMAT),
                json(&schemas)
            )
            .as_bytes(),
        )?;
        let mut counts = BTreeMap::new();
        for (i, cf) in backed_up().enumerate() {
            if i > 0 {
                w(out, b",")?;
            }
            w(out, format!("{}:{{", json(cf.name())).as_bytes())?;
            let mut read = rocksdb::ReadOptions::default();
            read.fill_cache(false);
            let mut n = 0u64;
            for item in snap.iterator_cf_opt(self.handle(cf), read, IteratorMode::Start) {
                let (k, v) = item.map_err(|source| StoreError::Io {
                    op: "backup",
                    cf: cf.name(),
                    key: String::new(),
                    source,
                })?;
                let key = String::from_utf8_lossy(&k);
                serde_json::from_slice::<IgnoredAny>(&v).map_err(|source| StoreError::Decode {
                    cf: cf.name(),
                    key: key.clone().into_owned(),
                    source,
                })?;
                if n > 0 {
                    w(out, b",")?;
                }
                w(out, json(key.as_ref()).as_bytes())?;
                w(out, b":")?;
                w(out, &v)?;
                n += 1;
            }
            w(out, b"}")?;
            counts.insert(cf.name().to_owned(), n);
        }
        w(out, b"}}")?;
        out.flush().map_err(BackupError::Write)?;
        Ok(counts)
    }

    /// A consistent backup of every family in memory (tests and small stores).
    pub fn backup(&self, created_at: u64) -> Result<BackupFile, BackupError> {
        let mut bytes = Vec::new();
        self.write_backup(created_at, &mut bytes)?;
        parse(&bytes)
    }
}

/// JSON text of a key or a header value (strings, the schema map): they cannot fail to encode.
fn json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("strings and maps of numbers encode")
}

/// Parses and checks a backup file held in memory (nothing is written).
pub fn parse(bytes: &[u8]) -> Result<BackupFile, BackupError> {
    let file: BackupFile = serde_json::from_slice(bytes).map_err(|e| BackupError::Format {
        reason: e.to_string(),
    })?;
    check_header(&file.format, file.version, &file.schemas)?;
    for name in file.families.keys() {
        family(name).ok_or_else(|| BackupError::UnknownFamily { name: name.clone() })?;
    }
    Ok(file)
}

/// Checks the format, the version and every family's schema version.
fn check_header(
    format: &str,
    version: u32,
    schemas: &BTreeMap<String, u32>,
) -> Result<(), BackupError> {
    if format != FORMAT {
        return Err(BackupError::Format {
            reason: format!("format is {format:?}, expected {FORMAT:?}"),
        });
    }
    if version != VERSION {
        return Err(BackupError::Format {
            reason: format!("version {version} (this agent reads {VERSION})"),
        });
    }
    for (name, &found) in schemas {
        let cf = family(name).ok_or_else(|| BackupError::UnknownFamily { name: name.clone() })?;
        if found > cf.schema_version() {
            return Err(BackupError::SchemaTooNew {
                name: name.clone(),
                found,
                known: cf.schema_version(),
            });
        }
    }
    Ok(())
}

/// Replaces the store in `data_dir` (of a stopped agent) with the backup in `bytes`, in one
/// synced write batch. Returns the records restored per family.
pub fn restore(data_dir: &Path, bytes: &[u8]) -> Result<BTreeMap<String, u64>, BackupError> {
    restore_from(data_dir, std::io::Cursor::new(bytes))
}

/// Replaces the store in `data_dir` (of a stopped agent) with the backup read from `input`.
/// The file is read twice, a record at a time, never whole in memory: first it is checked
/// all through (JSON, format, version, families, schema versions) without touching the store,
/// then the store is opened and one synced write batch is built while the file is read again
/// and written only once that pass, too, read it all. A bad or cut-short file changes nothing.
/// Returns the records restored per family.
pub fn restore_from(
    data_dir: &Path,
    mut input: impl Read + Seek,
) -> Result<BTreeMap<String, u64>, BackupError> {
    read_file(&mut input, None)?;
    input.rewind().map_err(BackupError::Read)?;
    let store = Store::open(data_dir)?;
    let mut wb = WriteBatch::default();
    for cf in backed_up() {
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
    }
    let counts = read_file(&mut input, Some((&store, &mut wb)))?;
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
    Ok(counts)
}

/// Where [`read_file`] puts the records: nowhere (a check), or a batch for a store.
type Sink<'a> = Option<(&'a Store, &'a mut WriteBatch)>;

/// Reads and checks a whole backup file, putting each record into `sink` as it is read.
/// Returns the records per family.
fn read_file(input: impl Read, sink: Sink<'_>) -> Result<BTreeMap<String, u64>, BackupError> {
    let mut counts = BTreeMap::new();
    let mut failure = None;
    let seed = FileSeed {
        sink,
        counts: &mut counts,
        failure: &mut failure,
    };
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(input));
    let parsed = seed.deserialize(&mut de).and_then(|h| de.end().map(|()| h));
    let header = match (parsed, failure) {
        (_, Some(e)) => return Err(e),
        (Err(e), None) if e.is_io() => return Err(BackupError::Read(std::io::Error::other(e))),
        (Err(e), None) => {
            return Err(BackupError::Format {
                reason: e.to_string(),
            });
        }
        (Ok(h), None) => h,
    };
    let missing = |field: &str| BackupError::Format {
        reason: format!("missing field `{field}`"),
    };
    let format = header.format.ok_or_else(|| missing("format"))?;
    check_header(&format, VERSION, &BTreeMap::new())?;
    let version = header.version.ok_or_else(|| missing("version"))?;
    header.created_at.ok_or_else(|| missing("created_at"))?;
    let schemas = header.schemas.ok_or_else(|| missing("schemas"))?;
    if !header.families {
        return Err(missing("families"));
    }
    check_header(&format, version, &schemas)?;
    Ok(counts)
}

/// The top-level fields of a backup file, read by [`FileSeed`] (`families` goes straight
/// into the write batch).
#[derive(Default)]
struct Header {
    format: Option<String>,
    version: Option<u32>,
    created_at: Option<u64>,
    schemas: Option<BTreeMap<String, u32>>,
    families: bool,
}

/// Reads a backup file, putting each record into the batch as it is read.
struct FileSeed<'a> {
    sink: Sink<'a>,
    counts: &'a mut BTreeMap<String, u64>,
    /// A backup error met inside the parse (serde errors carry only text).
    failure: &'a mut Option<BackupError>,
}

impl<'de> DeserializeSeed<'de> for FileSeed<'_> {
    type Value = Header;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Header, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FileSeed<'_> {
    type Value = Header;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a capybara backup object")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Header, A::Error> {
        let mut h = Header::default();
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "format" => h.format = Some(map.next_value()?),
                "version" => h.version = Some(map.next_value()?),
                "created_at" => h.created_at = Some(map.next_value()?),
                "schemas" => h.schemas = Some(map.next_value()?),
                "families" => {
                    map.next_value_seed(FamiliesSeed {
                        sink: self.sink.take(),
                        counts: &mut *self.counts,
                        failure: &mut *self.failure,
                    })?;
                    h.families = true;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(h)
    }
}

/// The `families` object: family name → records.
struct FamiliesSeed<'a> {
    sink: Sink<'a>,
    counts: &'a mut BTreeMap<String, u64>,
    failure: &'a mut Option<BackupError>,
}

impl<'de> DeserializeSeed<'de> for FamiliesSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FamiliesSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of families")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<String>()? {
            let Some(cf) = family(&name) else {
                *self.failure = Some(BackupError::UnknownFamily { name });
                return Err(serde::de::Error::custom("unknown family"));
            };
            let n = map.next_value_seed(RecordsSeed {
                sink: self
                    .sink
                    .as_mut()
                    .map(|(store, wb)| (store.handle(cf), &mut **wb)),
            })?;
            *self.counts.entry(name).or_default() += n;
        }
        Ok(())
    }
}

/// One family's records: key → stored value, put into the batch as they are read.
struct RecordsSeed<'a> {
    sink: Option<(&'a rocksdb::ColumnFamily, &'a mut WriteBatch)>,
}

impl<'de> DeserializeSeed<'de> for RecordsSeed<'_> {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed<'_> {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of records")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<u64, A::Error> {
        let mut n = 0;
        while let Some(key) = map.next_key::<String>()? {
            let value: Box<RawValue> = map.next_value()?;
            if let Some((h, wb)) = self.sink.as_mut() {
                wb.put_cf(*h, key, value.get());
            }
            n += 1;
        }
        Ok(n)
    }
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
