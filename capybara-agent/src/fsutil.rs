//! Secret files on disk: how the agent writes and reads them. Which files they are, where they
//! live and the rule at start for each (missing, corrupt, too open) are in [`crate::paths`].
//!
//! - **Writing** ([`write_secret`]) is atomic and durable, one helper for every secret file. The
//!   contents go to a temporary file in the target's directory ([`paths::temp_file`]), created
//!   exclusively (`O_CREAT | O_EXCL`, so a symlink planted there is not followed) with mode
//!   [`paths::KEY_FILE_MODE`] from the first instant, so no other user can read it even for a
//!   moment; it is written and fsynced, renamed over the target, and the directory is fsynced so
//!   that the rename itself survives a power cut. A crash at any point leaves the target as it
//!   was (the old file, or none) or complete, never empty or partial; at most a stale temporary
//!   file (mode 0600) stays, which the next write replaces.
//! - **Reading** ([`read_secret`]) checks the mode of the file it opened (`fstat` of the open
//!   file: no window between the check and the read) and refuses any permission for group or
//!   others (`mode & 0o077 != 0`), naming the file, the mode found and the fix
//!   (`chmod 600 FILE`). At most [`MAX_SECRET_FILE_LEN`] bytes are read.
//! - **Loading** ([`load_or_create_secret`]): a missing file is created with a new secret; a file
//!   that is empty (white space only) or does not parse is refused naming the file and what it
//!   must hold, and never replaced by a new secret, because a new secret silently loses what the
//!   old one protected (the clients' configs, the sealed client keys).

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::paths;

/// Permission bits of group and others: a secret file with any of them is refused.
const GROUP_OR_OTHERS: u32 = 0o077;

/// Longest secret file read (bytes): a key file is 45; a longer file is refused as garbled.
pub const MAX_SECRET_FILE_LEN: u64 = 4096;

/// What a secret file holds, for the errors that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretKind {
    /// What the file must hold, e.g. `a WireGuard private key (base64 of 32 bytes)`.
    pub holds: &'static str,
    /// What removing the file (so that a new secret is made at the next start) costs.
    pub if_removed: &'static str,
}

/// Why a secret file could not be read, checked or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// A file operation failed.
    #[error("secret file {}: cannot {action}", path.display())]
    Io {
        /// The file (the target, or its temporary file or directory).
        path: PathBuf,
        /// What was being done, e.g. `open`, `rename over the target`.
        action: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Group or others have a permission on the file.
    #[error(
        "secret file {} has mode {mode:04o}: group or others may read or write it; \
         run `chmod 600 {}` (and treat the secret as leaked if others could read it)",
        path.display(),
        path.display()
    )]
    InsecureMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is empty or holds only white space (a write cut short, e.g. by a crash of an
    /// agent older than the atomic write).
    #[error(
        "secret file {} is empty; it must hold {}. Restore it from a backup, or remove it to \
         have a new one made ({})",
        path.display(),
        kind.holds,
        kind.if_removed
    )]
    Empty {
        /// The file.
        path: PathBuf,
        /// What it must hold.
        kind: SecretKind,
    },
    /// The file does not hold what it must (too short, too long, not the expected encoding).
    #[error(
        "secret file {} does not hold {}. Restore it from a backup, or remove it to have a new \
         one made ({})",
        path.display(),
        kind.holds,
        kind.if_removed
    )]
    Garbled {
        /// The file.
        path: PathBuf,
        /// What it must hold.
        kind: SecretKind,
    },
}

impl SecretFileError {
    /// The error of `action` on `path`, for `map_err`.
    fn io<'a>(
        path: &'a Path,
        action: &'static str,
    ) -> impl FnOnce(io::Error) -> SecretFileError + 'a {
        move |source| SecretFileError::Io {
            path: path.to_owned(),
            action,
            source,
        }
    }
}

/// The directory that holds `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates or truncates `path` for writing with mode 0600 ([`paths::KEY_FILE_MODE`]): a new
/// file is created with that mode, an existing one (a stale temporary file) narrowed to it
/// before anything is written. For files that hold secrets written as a stream (backups).
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::paths::KEY_FILE_MODE)
        .open(path)?;
    if file.metadata()?.permissions().mode() & 0o777 != crate::paths::KEY_FILE_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(crate::paths::KEY_FILE_MODE))?;
    }
    Ok(file)
}

/// Replaces `path` with `contents`, atomically and durably, mode [`paths::KEY_FILE_MODE`]: a
/// temporary file in the same directory (created exclusively with that mode), write, fsync,
/// rename over `path`, fsync the directory. On an error the target is as it was.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    let tmp = paths::temp_file(path);
    // A stale temporary file is what a crash in an earlier write left: never a key in use.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(SecretFileError::io(&tmp, "remove the stale temporary file")(e));
        }
        _ => {}
    }
    let written = write_new(&tmp, contents).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(SecretFileError::io(path, "rename over the target"))
    });
    if written.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SecretFileError::io(dir, "fsync the directory"))
}

/// Creates `tmp` exclusively with mode [`paths::KEY_FILE_MODE`], writes `contents`, fsyncs.
fn write_new(tmp: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(paths::KEY_FILE_MODE)
        .open(tmp)
        .map_err(SecretFileError::io(tmp, "create the temporary file"))?;
    // The umask may have taken bits away (never added any): set the mode exactly.
    f.set_permissions(std::fs::Permissions::from_mode(paths::KEY_FILE_MODE))
        .map_err(SecretFileError::io(
            tmp,
            "set the mode of the temporary file",
        ))?;
    f.write_all(contents)
        .map_err(SecretFileError::io(tmp, "write the temporary file"))?;
    f.sync_all()
        .map_err(SecretFileError::io(tmp, "fsync the temporary file"))
}

/// The contents of the secret file `path` (at most [`MAX_SECRET_FILE_LEN`] + 1 bytes), or
/// `None` if it does not exist. Refused when group or others have any permission on it.
pub fn read_secret(path: &Path) -> Result<Option<Vec<u8>>, SecretFileError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SecretFileError::io(path, "open")(e)),
    };
    let mode = f
        .metadata()
        .map_err(SecretFileError::io(path, "stat"))?
        .permissions()
        .mode()
        & 0o777;
    if mode & GROUP_OR_OTHERS != 0 {
        return Err(SecretFileError::InsecureMode {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    f.take(MAX_SECRET_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(SecretFileError::io(path, "read"))?;
    Ok(Some(bytes))
}

/// Loads the secret in `path` with `parse` (given the text without surrounding white space),
/// or, if the file does not exist, makes one with `create` (the value and the file's text) and
/// writes it with [`write_secret`]. An empty or unparseable file is refused, never replaced.
pub fn load_or_create_secret<T>(
    path: &Path,
    kind: SecretKind,
    parse: impl FnOnce(&str) -> Option<T>,
    create: impl FnOnce() -> (T, String),
) -> Result<T, SecretFileError> {
    let Some(bytes) = read_secret(path)? else {
        let (value, text) = create();
        write_secret(path, text.as_bytes())?;
        return Ok(value);
    };
    let garbled = || SecretFileError::Garbled {
        path: path.to_owned(),
        kind,
    };
    if bytes.len() as u64 > MAX_SECRET_FILE_LEN {
        return Err(garbled());
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| garbled())?.trim();
    if text.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_owned(),
            kind,
        });
    }
    parse(text).ok_or_else(garbled)
}

/// What the secret-file tests share: a file's mode, and a real crash of a writer.
#[cfg(test)]
pub(crate) mod test_support {
    use std::{
        os::unix::{fs::PermissionsExt as _, process::ExitStatusExt as _},
        path::{Path, PathBuf},
    };

    /// The permission bits of `path`.
    pub(crate) fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Crashes a writer at its first write. In the test process: re-runs the test binary as the
    /// test named `test` (its full path) with a file-size limit of 0 on a new temp dir, so the
    /// kernel kills it (SIGXFSZ) after the file was created and before anything is in it;
    /// checks that it died that way, that no file was left at `target(dir)` (never an empty
    /// one) and that nothing it left is readable by others; returns the dir. In that child
    /// (`CAPY_CRASH_DIR` set): runs `write` on the file and returns `None`.
    pub(crate) fn crash_at_first_write(
        test: &str,
        target: impl Fn(&Path) -> PathBuf,
        write: impl FnOnce(&Path),
    ) -> Option<tempfile::TempDir> {
        if let Some(dir) = std::env::var_os("CAPY_CRASH_DIR") {
            write(&target(Path::new(&dir)));
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("sh")
            .args(["-c", r#"ulimit -f 0 && exec "$0" "$@""#])
            .arg(std::env::current_exe().unwrap())
            .args([test, "--exact", "--test-threads=1"])
            .env("CAPY_CRASH_DIR", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(
            status.signal(),
            Some(25),
            "the child died at its write (SIGXFSZ)"
        );
        let path = target(dir.path());
        assert!(
            !path.exists(),
            "a crash left {} behind ({} bytes)",
            path.display(),
            std::fs::metadata(&path).unwrap().len()
        );
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let p = entry.unwrap().path();
            assert_eq!(
                mode_of(&p) & 0o077,
                0,
                "{} is readable by others",
                p.display()
            );
        }
        // The write was cut short in the temporary file, which no one else could read.
        assert_eq!(mode_of(&crate::paths::temp_file(&path)), 0o600);
        Some(dir)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::{test_support::mode_of, *};

    #[test]
    fn a_write_replaces_the_target_by_rename_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.key");
        write_secret(&path, b"one\n").unwrap();
        assert_eq!(mode_of(&path), 0o600);
        // A hard link keeps the old inode: a rename replaces the entry and leaves it untouched,
        // an in-place rewrite would change it.
        let old = dir.path().join("old");
        std::fs::hard_link(&path, &old).unwrap();
        // A stale temporary file from a crashed write (even one others could read) is replaced.
        std::fs::write(paths::temp_file(&path), b"").unwrap();
        write_secret(&path, b"two\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two\n");
        assert_eq!(std::fs::read(&old).unwrap(), b"one\n");
        assert_ne!(
            std::fs::metadata(&path).unwrap().ino(),
            std::fs::metadata(&old).unwrap().ino()
        );
        assert_eq!(mode_of(&path), 0o600);
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["old", "s.key"]);
    }

    #[test]
    fn a_failed_write_leaves_the_target_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory, so the rename fails: the target stays as it was
        // and no temporary file is left.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"one\n").unwrap();
        assert!(matches!(
            write_secret(&blocked, b"two\n"),
            Err(SecretFileError::Io {
                action: "rename over the target",
                ..
            })
        ));
        assert!(!paths::temp_file(&blocked).exists());
        assert_eq!(std::fs::read(blocked.join("x")).unwrap(), b"one\n");
    }
}
