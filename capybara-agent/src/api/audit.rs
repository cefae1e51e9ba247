//! The `Audit` service (the audit trail of every change), its conversions and client call.

use capybara_proto::v1::{self as pb, audit_client::AuditClient, audit_server::Audit};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, opt_user},
    handler::Api,
    status::invalid,
};
use crate::service::{
    core::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE},
    domain::{AuditRecord, Scope},
};

#[tonic::async_trait]
impl Audit for Api {
    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.get_ref();
        let user = opt_user("user", &r.user).map_err(invalid)?;
        let size = page_size(if r.page_size == 0 {
            r.limit
        } else {
            r.page_size
        });
        let before = page_token(&r.page_token)?;
        let page = self
            .call(move |s| s.core.audit_page(user.as_ref(), before, size))
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            records: page.items.iter().map(Into::into).collect(),
            next_page_token: page
                .items
                .last()
                .filter(|_| page.next.is_some())
                .map(|r| format!("{TOKEN_PREFIX}{}", r.seq))
                .unwrap_or_default(),
        }))
    }
}

/// The page size of a list request: 0 = [`DEFAULT_PAGE_SIZE`], more than [`MAX_PAGE_SIZE`]
/// clamped to it.
pub(super) fn page_size(n: u32) -> usize {
    match n as usize {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// What an audit page token starts with (the rest is the sequence number to continue below).
const TOKEN_PREFIX: &str = "a";

/// The sequence number an audit page token continues below; empty = the first page.
fn page_token(t: &str) -> Result<Option<u64>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    t.strip_prefix(TOKEN_PREFIX)
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "page_token: {t:?} is not a token this call returned"
            ))
        })
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
    /// The newest `limit` audit records (all of them with `u32::MAX`), newest first: the pages
    /// walked until `limit` records or the last page.
    pub async fn audit(&self, user: &str, limit: u32) -> Result<Vec<AuditRecord>, ClientError> {
        let mut out = Vec::new();
        let mut token = String::new();
        while out.len() < limit as usize {
            let want = (limit as usize - out.len()).min(MAX_PAGE_SIZE) as u32;
            let (page, next) = self.audit_page(user, want, &token).await?;
            out.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        Ok(out)
    }

    /// One page of audit records and the next page's token (empty on the last page).
    pub async fn audit_page(
        &self,
        user: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<AuditRecord>, String), ClientError> {
        let r = AuditClient::new(self.channel.clone())
            .list_audit(self.req(pb::ListAuditRequest {
                user: user.into(),
                limit: 0,
                page_size,
                page_token: page_token.into(),
            }))
            .await?
            .into_inner();
        let records = r
            .records
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?;
        Ok((records, r.next_page_token))
    }
}
