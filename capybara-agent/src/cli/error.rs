//! Why a command failed, its exit code and its one-line message: **2** for bad input (a value
//! that does not parse here, the agent's `INVALID_ARGUMENT`, a backup that cannot be restored),
//! 1 for anything else.

use std::path::{Path, PathBuf};

use crate::{
    api::client::{ClientError, is_bad_input},
    service::domain::ValidationError,
    store::backup::BackupError,
};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CliError {
    /// Bad input caught here.
    #[error(transparent)]
    Input(#[from] ValidationError),
    /// The call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The QR code could not be made.
    #[error("QR code: {0}")]
    Qr(#[from] qrcode::types::QrError),
    /// A backup could not be restored.
    #[error(transparent)]
    Backup(#[from] BackupError),
}

impl CliError {
    /// The process exit code for this error.
    pub(super) fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Client(e) if is_bad_input(e) => 2,
            CliError::Backup(e) if !matches!(e, BackupError::Store(_)) => 2,
            _ => 1,
        }
    }

    /// For `map_err`: an I/O error on the local file `path`.
    pub(super) fn file(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
        move |source| CliError::File {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The error and its causes on one line.
    pub(super) fn one_line(&self) -> String {
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(c) = src {
            let m = c.to_string();
            if !s.contains(&m) {
                s.push_str(": ");
                s.push_str(&m);
            }
            src = c.source();
        }
        s.replace('\n', " ")
    }
}
