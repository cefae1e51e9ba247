//! Backups: a consistent snapshot of the store (see `store::backup`) written out as the API
//! streams it, never whole in memory. Restoring replaces a stopped agent's store
//! (`store::backup`), so it is not a call of the running service.
//!
//! Backups the agent keeps itself (`backup create` without `--output`, what a scheduled
//! `backup create --keep 7` does) go into its backup directory (`--backup-dir`, default
//! `<data dir>/backups`, created mode 0700) as `backup-<UTC time>.capy`
//! (`backup-20261207T020000Z.capy`; `-2`, `-3`… before `.capy` for further ones in the same
//! second, always one more than the highest there, so a name is never taken again within its
//! second), each mode 0600, written to a temporary file, fsynced and renamed (a crash leaves
//! no partial backup under that name). With `keep` N, all but the newest N files **of that
//! name pattern** are deleted after the new one is in place; no other file in the directory is
//! ever touched.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use super::core::{Core, now};
use crate::{paths, store::backup::BackupError};

/// A backup the agent wrote into its directory.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackupFile {
    /// The file.
    pub path: PathBuf,
    /// Records per family.
    pub records: BTreeMap<String, u64>,
    /// Older backups the rotation deleted.
    pub deleted: Vec<PathBuf>,
}

/// The backup feature.
#[derive(Debug)]
pub struct Backup {
    core: Arc<Core>,
    /// `--backup-dir` (set once at start); default [`paths::backup_dir`] of the data directory.
    dir: OnceLock<PathBuf>,
}

impl Backup {
    /// The feature over the shared core.
    pub fn new(core: Arc<Core>) -> Backup {
        Backup {
            core,
            dir: OnceLock::new(),
        }
    }

    /// Writes a consistent backup of the store to `out` as it is read (one read snapshot);
    /// returns the records per family.
    pub fn create(&self, out: &mut dyn Write) -> Result<BTreeMap<String, u64>, BackupError> {
        self.core.store.write_backup(now(), out)
    }

    /// Sets the backup directory (`--backup-dir`; once, at start).
    pub fn set_dir(&self, dir: PathBuf) {
        let _ = self.dir.set(dir);
    }

    /// The backup directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.get().cloned().unwrap_or_else(|| {
            let data = self.core.store.path().parent().unwrap_or(Path::new("."));
            paths::backup_dir(data)
        })
    }

    /// Writes a backup into the backup directory and keeps the newest `keep` (module docs).
    pub fn create_file(&self, keep: Option<u32>) -> Result<BackupFile, BackupError> {
        let dir = self.dir();
        let io = |e: std::io::Error| {
            BackupError::Write(std::io::Error::new(
                e.kind(),
                format!("backup directory {}: {e}", dir.display()),
            ))
        };
        paths::ensure_backup_dir(&dir).map_err(io)?;
        let stamp = chrono::DateTime::from_timestamp(now() as i64, 0)
            .unwrap_or_default()
            .format("%Y%m%dT%H%M%SZ")
            .to_string();
        // A second backup in the same second sorts after every earlier one of that second,
        // even after the rotation deleted some: one more than the highest number there.
        let mut last = None;
        for e in std::fs::read_dir(&dir).map_err(io)? {
            let name = e.map_err(io)?.file_name();
            if let Some((s, n)) = name.to_str().and_then(backup_name_key)
                && s == stamp
            {
                last = last.max(Some(n));
            }
        }
        let path = match last {
            None => dir.join(format!("{BACKUP_PREFIX}{stamp}{BACKUP_EXT}")),
            Some(n) => dir.join(format!("{BACKUP_PREFIX}{stamp}-{}{BACKUP_EXT}", n + 1)),
        };
        let tmp = paths::temp_file(&path);
        let written = (|| {
            let mut file = crate::fsutil::create_private(&tmp).map_err(io)?;
            let records = {
                let mut w = std::io::BufWriter::new(&mut file);
                let records = self.create(&mut w)?;
                w.flush().map_err(io)?;
                records
            };
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            Ok(records)
        })();
        let records = match written {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let deleted = match keep {
            Some(k) => rotate(&dir, k as usize).map_err(io)?,
            None => Vec::new(),
        };
        tracing::info!(path = %path.display(), deleted = deleted.len(), "backup written");
        Ok(BackupFile {
            path,
            records,
            deleted,
        })
    }
}

/// The name of a backup the agent writes: [`BACKUP_PREFIX`], the time, [`BACKUP_EXT`].
pub const BACKUP_PREFIX: &str = "backup-";
/// See [`BACKUP_PREFIX`].
pub const BACKUP_EXT: &str = ".capy";

/// The sort key of a file name of the agent's backup pattern (`backup-YYYYMMDDTHHMMSSZ.capy` or
/// `backup-YYYYMMDDTHHMMSSZ-N.capy`); `None` for any other name.
pub fn backup_name_key(name: &str) -> Option<(String, u32)> {
    let stem = name.strip_prefix(BACKUP_PREFIX)?.strip_suffix(BACKUP_EXT)?;
    let (stamp, n) = match stem.split_once('-') {
        Some((s, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (s, n.parse().ok()?)
        }
        Some(_) => return None,
        None => (stem, 1),
    };
    let b = stamp.as_bytes();
    let ok = b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
    ok.then(|| (stamp.to_owned(), n))
}

/// Deletes all but the newest `keep` files of the backup name pattern in `dir`; the deleted.
fn rotate(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut ours = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let name = e.file_name();
        if let Some(key) = name.to_str().and_then(backup_name_key) {
            ours.push((key, e.path()));
        }
    }
    ours.sort();
    let excess = ours.len().saturating_sub(keep.max(1));
    let mut deleted = Vec::new();
    for (_, p) in ours.into_iter().take(excess) {
        std::fs::remove_file(&p)?;
        deleted.push(p);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_backup_pattern_is_ours() {
        assert_eq!(
            backup_name_key("backup-20261207T020000Z.capy"),
            Some(("20261207T020000Z".into(), 1))
        );
        assert_eq!(
            backup_name_key("backup-20261207T020000Z-3.capy"),
            Some(("20261207T020000Z".into(), 3))
        );
        for other in [
            "backup-20261207T020000Z.capy.bak",
            "backup-2026120T020000Z.capy",
            "backup-20261207T020000Z-.capy",
            "backup-20261207T020000Z-x.capy",
            "my-backup-20261207T020000Z.capy",
            ".backup-20261207T020000Z.capy.tmp",
            "backup-latest.capy",
            "notes.txt",
        ] {
            assert_eq!(backup_name_key(other), None, "{other}");
        }
    }

    #[test]
    fn rotation_keeps_the_newest_and_touches_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "backup-20261201T020000Z.capy",
            "backup-20261202T020000Z.capy",
            "backup-20261203T020000Z.capy",
            "backup-20261203T020000Z-2.capy",
            "keep-me.capy",
            "backup-20261130T020000Z.capy.old",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let deleted = rotate(dir.path(), 2).unwrap();
        let names = |v: Vec<PathBuf>| {
            let mut v: Vec<String> = v
                .into_iter()
                .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names(deleted),
            [
                "backup-20261201T020000Z.capy",
                "backup-20261202T020000Z.capy"
            ]
        );
        let left = names(
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect(),
        );
        assert_eq!(
            left,
            [
                "backup-20261130T020000Z.capy.old",
                "backup-20261203T020000Z-2.capy",
                "backup-20261203T020000Z.capy",
                "keep-me.capy"
            ]
        );
    }
}
