//! The `Backup` service (a consistent store backup, admin scope: it holds token hashes) and its
//! client call.
//!
//! `CreateBackup` streams: the store is read through one snapshot on the blocking pool and cut
//! into messages of [`CHUNK_BYTES`] (1 MiB, well under gRPC's 4 MiB message limit), sent
//! through a channel of [`CHUNKS_IN_FLIGHT`] messages, so a backup of any size passes and the
//! agent holds at most about 5 MiB of it at a time whatever the store's size; a slow client
//! slows the reading. The last message carries the records per family. A failure mid-way ends
//! the stream with an error status, and the client keeps nothing of it (the CLI writes to a
//! temporary file and renames it only once the stream ended well).
//!
//! `CreateBackupFile` has the agent write the backup into its own backup directory and rotate
//! it (`service::backup`): what `backup create` without `--output` and a scheduled backup do.

use std::{collections::BTreeMap, io::Write};

use capybara_proto::v1::{self as pb, backup_client::BackupClient, backup_server::Backup};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::AnswerError,
    handler::Api,
    status::status_of,
};
use crate::{
    service::{ServiceError, domain::Scope},
    store::backup::BackupError,
};

/// Bytes of backup per message.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Messages queued between the reading thread and the client.
pub const CHUNKS_IN_FLIGHT: usize = 4;

type Chunk = Result<pb::CreateBackupResponse, Status>;

/// Cuts what is written into [`CHUNK_BYTES`] messages on the channel (blocking while it is
/// full); fails once the client has gone.
struct ChunkWriter {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self, msg: pb::CreateBackupResponse) -> std::io::Result<()> {
        self.tx
            .blocking_send(Ok(msg))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    fn send_buf(&mut self) -> std::io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.send(pb::CreateBackupResponse {
            data,
            records: Default::default(),
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tonic::async_trait]
impl Backup for Api {
    type CreateBackupStream = ReceiverStream<Chunk>;

    async fn create_backup(
        &self,
        req: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<Self::CreateBackupStream>, Status> {
        self.auth(&req, Scope::Admin)?;
        let svc = self.service();
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK_BYTES),
            };
            let end = svc.backup.create(&mut w).and_then(|records| {
                // The rest of the file and the counts, in the last message.
                let data = std::mem::take(&mut w.buf);
                w.send(pb::CreateBackupResponse {
                    data,
                    records: records.into_iter().collect(),
                })
                .map_err(BackupError::Write)
            });
            match end {
                Ok(()) | Err(BackupError::Write(_)) => {} // done, or the client has gone
                Err(BackupError::Store(e)) => {
                    let _ = tx.blocking_send(Err(status_of(ServiceError::Store(e))));
                }
                Err(e) => {
                    tracing::error!(error = %e, "backup failed");
                    let _ = tx
                        .blocking_send(Err(Status::internal(format!("{e}; see the agent's log"))));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn create_backup_file(
        &self,
        req: Request<pb::CreateBackupFileRequest>,
    ) -> Result<Response<pb::CreateBackupFileResponse>, Status> {
        self.auth(&req, Scope::Admin)?;
        let keep = req.into_inner().keep;
        if keep == Some(0) {
            return Err(super::status::invalid(
                crate::service::domain::ValidationError::Value {
                    field: "keep",
                    reason: "0 would delete the backup just written; keep at least 1".into(),
                },
            ));
        }
        let svc = self.service();
        let file = tokio::task::spawn_blocking(move || svc.backup.create_file(keep))
            .await
            .map_err(|e| Status::internal(format!("backup aborted: {e}")))?
            .map_err(|e| match e {
                BackupError::Store(e) => status_of(ServiceError::Store(e)),
                e => {
                    tracing::error!(error = %e, "backup failed");
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(c) = src {
                        msg.push_str(": ");
                        msg.push_str(&c.to_string());
                        src = c.source();
                    }
                    Status::internal(msg)
                }
            })?;
        Ok(Response::new(pb::CreateBackupFileResponse {
            path: file.path.display().to_string(),
            records: file.records.into_iter().collect(),
            deleted: file
                .deleted
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        }))
    }
}

/// A backup the agent wrote into its directory, as the client sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackupFileAnswer {
    /// The file (on the agent's machine).
    pub path: String,
    /// Records per family.
    pub records: BTreeMap<String, u64>,
    /// Older backups the rotation deleted.
    pub deleted: Vec<String>,
}

impl Client {
    /// Has the agent write a backup into its backup directory, keeping the newest `keep`.
    pub async fn create_backup_file(
        &self,
        keep: Option<u32>,
    ) -> Result<BackupFileAnswer, ClientError> {
        let r = BackupClient::new(self.channel.clone())
            .create_backup_file(self.req(pb::CreateBackupFileRequest { keep }))
            .await?
            .into_inner();
        Ok(BackupFileAnswer {
            path: r.path,
            records: r.records.into_iter().collect(),
            deleted: r.deleted,
        })
    }

    /// Writes a backup of the agent's store to `out` as it arrives; returns its records per
    /// family. On an error, part of the backup may have been written.
    pub async fn create_backup(
        &self,
        out: &mut (dyn Write + Send),
    ) -> Result<BTreeMap<String, u64>, ClientError> {
        let mut stream = BackupClient::new(self.channel.clone())
            .create_backup(self.req(pb::CreateBackupRequest {}))
            .await?
            .into_inner();
        let mut records = None;
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            out.write_all(&msg.data).map_err(ClientError::Output)?;
            if !msg.records.is_empty() {
                records = Some(msg.records.into_iter().collect());
            }
        }
        // A stream that ends without its last message was cut short.
        Ok(records.ok_or(AnswerError::Missing {
            field: "backup.records",
        })?)
    }
}
