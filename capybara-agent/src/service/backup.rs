//! Backups: a consistent snapshot of the store (see `store::backup`) written out as the API
//! streams it, never whole in memory. Restoring replaces a stopped agent's store
//! (`store::backup`), so it is not a call of the running service.

use std::{collections::BTreeMap, io::Write, sync::Arc};

use super::core::{Core, now};
use crate::store::backup::BackupError;

/// The backup feature.
#[derive(Debug)]
pub struct Backup {
    core: Arc<Core>,
}

impl Backup {
    /// The feature over the shared core.
    pub fn new(core: Arc<Core>) -> Backup {
        Backup { core }
    }

    /// Writes a consistent backup of the store to `out` as it is read (one read snapshot);
    /// returns the records per family.
    pub fn create(&self, out: &mut dyn Write) -> Result<BTreeMap<String, u64>, BackupError> {
        self.core.store.write_backup(now(), out)
    }
}
