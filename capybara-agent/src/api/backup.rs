//! The `Backup` service (a consistent store backup, admin scope: it holds token hashes) and its
//! client call.

use std::collections::BTreeMap;

use capybara_proto::v1::{self as pb, backup_client::BackupClient, backup_server::Backup};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    handler::Api,
};
use crate::service::domain::Scope;

#[tonic::async_trait]
impl Backup for Api {
    async fn create_backup(
        &self,
        req: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::CreateBackupResponse>, Status> {
        self.auth(&req, Scope::Admin)?;
        let (data, records) = self.call(|s| s.backup.create()).await?;
        Ok(Response::new(pb::CreateBackupResponse {
            data,
            records: records.into_iter().collect(),
        }))
    }
}

impl Client {
    /// A backup file of the agent's store, and its records per family.
    pub async fn create_backup(&self) -> Result<(Vec<u8>, BTreeMap<String, u64>), ClientError> {
        let r = BackupClient::new(self.channel.clone())
            .create_backup(self.req(pb::CreateBackupRequest {}))
            .await?
            .into_inner();
        Ok((r.data, r.records.into_iter().collect()))
    }
}
