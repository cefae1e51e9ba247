//! The `Audit` service (the audit trail of every change), its conversions and client call.

use capybara_proto::v1::{self as pb, audit_client::AuditClient, audit_server::Audit};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, opt_user},
    handler::Api,
    status::invalid,
};
use crate::service::domain::{AuditRecord, Scope};

#[tonic::async_trait]
impl Audit for Api {
    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let user = opt_user("user", &req.get_ref().user).map_err(invalid)?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n => n as usize,
        };
        let recs = self
            .call(move |s| s.core.audit_records(user.as_ref(), limit))
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            records: recs.iter().map(Into::into).collect(),
        }))
    }
}

impl From<&AuditRecord> for pb::AuditRecord {
    fn from(r: &AuditRecord) -> pb::AuditRecord {
        let json =
            |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        pb::AuditRecord {
            seq: r.seq,
            at: r.at as i64,
            actor: r.actor.clone(),
            action: r.action.clone(),
            target: r.target.clone(),
            before: json(&r.before),
            after: json(&r.after),
        }
    }
}

impl TryFrom<pb::AuditRecord> for AuditRecord {
    type Error = AnswerError;
    fn try_from(r: pb::AuditRecord) -> Result<AuditRecord, AnswerError> {
        let json = |field, s: String| -> Result<Option<serde_json::Value>, AnswerError> {
            if s.is_empty() {
                return Ok(None);
            }
            serde_json::from_str(&s)
                .map(Some)
                .map_err(|_| AnswerError::Invalid { field })
        };
        Ok(AuditRecord {
            seq: r.seq,
            at: r.at.max(0) as u64,
            actor: r.actor,
            action: r.action,
            target: r.target,
            before: json("audit.before", r.before)?,
            after: json("audit.after", r.after)?,
        })
    }
}

impl Client {
    /// Audit records.
    pub async fn audit(&self, user: &str, limit: u32) -> Result<Vec<AuditRecord>, ClientError> {
        let r = AuditClient::new(self.channel.clone())
            .list_audit(self.req(pb::ListAuditRequest {
                user: user.into(),
                limit,
            }))
            .await?
            .into_inner();
        Ok(r.records
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }
}
