//! Backups: a consistent snapshot of the store (see `store::backup`) as the file the API hands
//! out. Restoring replaces a stopped agent's store (`store::backup`), so it is not a call of the
//! running service.

use std::{collections::BTreeMap, sync::Arc};

use super::{
    ServiceError,
    core::{Core, now},
};
use crate::store::StoreError;

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

    /// A consistent backup of the store as the file's bytes, with the records per family.
    pub fn create(&self) -> Result<(Vec<u8>, BTreeMap<String, u64>), ServiceError> {
        let file = self.core.store.backup(now())?;
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| StoreError::Encode {
            cf: "backup",
            key: String::new(),
            source,
        })?;
        Ok((bytes, file.counts()))
    }
}
