//! The `Policy` gRPC service (groups, quotas, limits, explain) and its client calls, with the
//! proto ↔ domain conversions. Values travel as text (`10Mbps`, `Mon-Fri 08:00-18:00`) and are
//! validated by the same parsers as the CLI; an invalid value is `INVALID_ARGUMENT` naming the
//! field, before anything is changed.
//!
//! | scope | calls |
//! |---|---|
//! | read | `GetLimits`, `ExplainPolicy`, `ShowQuota` (of every user: paged by user name, `api::paging`), `ListGroups` |
//! | read | `ExportPolicyDocument` |
//! | write | `ApplyPolicyDocument` (also with `dry_run`), `SetLimits`, `ResetQuota`, `ResetAllQuotas`, `CreateGroup`, `DeleteGroup`, `AddGroupMembers`, `RemoveGroupMembers`, `SetGroupPolicy` |

use capybara_proto::v1::{self as pb, policy_client::PolicyClient, policy_server};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, MAX_DOCUMENT_MESSAGE, opt_user},
    handler::Api,
    status::invalid,
};
use crate::service::{
    domain::{Scope, UserName, ValidationError},
    policy::{
        GroupView, LimitsTarget, QuotaStatus,
        model::{ByteSize, Cap, GroupName, Limits, LimitsPatch, LimitsText, parse_field},
        resolve::ExplainRow,
    },
    policy_file::doc::PolicyDoc,
};

fn text_of(l: Option<pb::PolicyLimits>, clear: Vec<String>) -> LimitsText {
    let l = l.unwrap_or_default();
    LimitsText {
        bandwidth: l.bandwidth,
        limit: l.limit,
        period: l.period,
        grace: l.grace,
        connections: l.connections,
        flows: l.flows,
        time: l.time,
        window: l.window,
        tz: l.tz,
        clear,
    }
}

/// The proto form of a layer (text of each set field).
pub fn limits_to_proto(l: &Limits) -> pb::PolicyLimits {
    fn t<T: ToString>(v: &Option<T>) -> Option<String> {
        v.as_ref().map(ToString::to_string)
    }
    pb::PolicyLimits {
        bandwidth: t(&l.bandwidth),
        limit: t(&l.limit),
        period: t(&l.period),
        grace: t(&l.grace),
        connections: t(&l.connections),
        flows: t(&l.flows),
        time: t(&l.time),
        window: t(&l.window),
        tz: t(&l.tz),
    }
}

pub(super) fn limits_from_proto(l: Option<pb::PolicyLimits>) -> Result<Limits, ValidationError> {
    Ok(text_of(l, Vec::new()).parse()?.set)
}

fn group_to_proto(g: &GroupView) -> pb::PolicyGroup {
    pb::PolicyGroup {
        name: g.name.to_string(),
        members: g.members.iter().map(ToString::to_string).collect(),
        limits: Some(limits_to_proto(&g.limits)),
        shared_limit: g.shared_limit.map(|s| s.to_string()).unwrap_or_default(),
    }
}

fn group_from_proto(g: pb::PolicyGroup) -> Result<GroupView, AnswerError> {
    Ok(GroupView {
        name: GroupName::parse("group.name", &g.name)?,
        members: g
            .members
            .iter()
            .map(|m| UserName::parse("group.members", m))
            .collect::<Result<_, _>>()?,
        limits: limits_from_proto(g.limits)?,
        shared_limit: (!g.shared_limit.is_empty())
            .then(|| parse_field::<ByteSize>("group.shared_limit", &g.shared_limit))
            .transpose()?,
    })
}

fn quota_to_proto(q: &QuotaStatus) -> pb::QuotaStatus {
    pb::QuotaStatus {
        user: q.user.clone(),
        plan: q.plan.clone(),
        bucket: q.bucket,
        limit_bytes: q.limit_bytes,
        cutoff_bytes: q.cutoff_bytes,
        used_bytes: q.used_bytes,
        period: q.period.clone(),
        period_start: q.period_start.unwrap_or(0),
        exceeding: q.exceeding,
    }
}

fn quota_from_proto(q: pb::QuotaStatus) -> QuotaStatus {
    QuotaStatus {
        user: q.user,
        plan: q.plan,
        bucket: q.bucket,
        limit_bytes: q.limit_bytes,
        cutoff_bytes: q.cutoff_bytes,
        used_bytes: q.used_bytes,
        period: q.period,
        period_start: (q.period_start != 0).then_some(q.period_start),
        exceeding: q.exceeding,
    }
}

fn target(field: &'static str, user: &str) -> Result<LimitsTarget, ValidationError> {
    Ok(match opt_user(field, user)? {
        Some(u) => LimitsTarget::User(u),
        None => LimitsTarget::Default,
    })
}

fn target_name(t: &LimitsTarget) -> String {
    match t {
        LimitsTarget::User(u) => u.to_string(),
        LimitsTarget::Default => String::new(),
    }
}

fn users(field: &'static str, v: &[String]) -> Result<Vec<UserName>, ValidationError> {
    v.iter().map(|u| UserName::parse(field, u)).collect()
}

#[tonic::async_trait]
impl policy_server::Policy for Api {
    async fn set_limits(
        &self,
        req: Request<pb::SetLimitsRequest>,
    ) -> Result<Response<pb::LimitsResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let t = target("user", &r.user).map_err(invalid)?;
        let patch = text_of(r.set, r.clear).parse().map_err(invalid)?;
        let name = target_name(&t);
        let l = self
            .call(move |s| s.policy.set_limits(&actor, &t, &patch))
            .await?;
        Ok(Response::new(pb::LimitsResponse {
            user: name,
            limits: Some(limits_to_proto(&l)),
        }))
    }

    async fn get_limits(
        &self,
        req: Request<pb::GetLimitsRequest>,
    ) -> Result<Response<pb::LimitsResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let t = target("user", &req.get_ref().user).map_err(invalid)?;
        let name = target_name(&t);
        let l = self.call(move |s| s.policy.get_limits(&t)).await?;
        Ok(Response::new(pb::LimitsResponse {
            user: name,
            limits: Some(limits_to_proto(&l)),
        }))
    }

    async fn explain_policy(
        &self,
        req: Request<pb::ExplainPolicyRequest>,
    ) -> Result<Response<pb::ExplainPolicyResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let user = UserName::parse("user", &req.get_ref().user).map_err(invalid)?;
        let name = user.to_string();
        let rows = self.call(move |s| s.policy.explain_rows(&user)).await?;
        Ok(Response::new(pb::ExplainPolicyResponse {
            user: name,
            fields: rows
                .into_iter()
                .map(|r| pb::PolicyField {
                    field: r.field,
                    value: r.value,
                    source: r.source,
                })
                .collect(),
        }))
    }

    async fn show_quota(
        &self,
        req: Request<pb::ShowQuotaRequest>,
    ) -> Result<Response<pb::ShowQuotaResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.into_inner();
        let user = opt_user("user", &r.user).map_err(invalid)?;
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let (q, last) = self
            .call(move |s| match &user {
                Some(u) => Ok((s.policy.show_quota(Some(u), r.exceeding)?, None)),
                None => s
                    .policy
                    .show_quota_page(ask.after.as_deref(), ask.size, r.exceeding),
            })
            .await?;
        Ok(Response::new(pb::ShowQuotaResponse {
            quotas: q.iter().map(quota_to_proto).collect(),
            next_page_token: super::paging::next_token(last.as_deref()),
        }))
    }

    async fn reset_quota(
        &self,
        req: Request<pb::ResetQuotaRequest>,
    ) -> Result<Response<pb::ShowQuotaResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let owner = match (r.user.is_empty(), r.group.is_empty()) {
            (false, true) => Ok(UserName::parse("user", &r.user).map_err(invalid)?),
            (true, false) => Err(GroupName::parse("group", &r.group).map_err(invalid)?),
            _ => {
                return Err(invalid(ValidationError::Missing {
                    field: "user or group (exactly one)",
                }));
            }
        };
        let q = self
            .call(move |s| {
                s.policy.reset_quota(&actor, owner.as_ref())?;
                match &owner {
                    Ok(u) => s.policy.show_quota(Some(u), false),
                    Err(g) => {
                        let members: Vec<UserName> =
                            s.policy.get_group(g)?.members.into_iter().collect();
                        let mut out = Vec::new();
                        for m in &members {
                            out.extend(s.policy.show_quota(Some(m), false)?);
                        }
                        Ok(out)
                    }
                }
            })
            .await?;
        // One user, or the members of one group (bounded like `PolicyGroup.members`): one answer.
        Ok(Response::new(pb::ShowQuotaResponse {
            quotas: q.iter().map(quota_to_proto).collect(),
            next_page_token: String::new(),
        }))
    }

    async fn reset_all_quotas(
        &self,
        req: Request<pb::ResetAllQuotasRequest>,
    ) -> Result<Response<pb::ResetAllQuotasResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let reset = self
            .call(move |s| s.policy.reset_all_quotas(&actor))
            .await?;
        Ok(Response::new(pb::ResetAllQuotasResponse { reset }))
    }

    async fn create_group(
        &self,
        req: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::GroupResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let name = GroupName::parse("name", &req.get_ref().name).map_err(invalid)?;
        let g = self
            .call(move |s| s.policy.create_group(&actor, &name))
            .await?;
        Ok(Response::new(pb::GroupResponse {
            group: Some(group_to_proto(&g)),
        }))
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::GroupResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let name = GroupName::parse("name", &req.get_ref().name).map_err(invalid)?;
        let g = self
            .call(move |s| s.policy.delete_group(&actor, &name))
            .await?;
        Ok(Response::new(pb::GroupResponse {
            group: Some(group_to_proto(&g)),
        }))
    }

    async fn add_group_members(
        &self,
        req: Request<pb::GroupMembersRequest>,
    ) -> Result<Response<pb::GroupResponse>, Status> {
        self.members(req, true).await
    }

    async fn remove_group_members(
        &self,
        req: Request<pb::GroupMembersRequest>,
    ) -> Result<Response<pb::GroupResponse>, Status> {
        self.members(req, false).await
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.get_ref();
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let (gs, more) = self
            .call(move |s| Ok(s.policy.list_groups_page(ask.after.as_deref(), ask.size)))
            .await?;
        let last = gs.last().filter(|_| more).map(|g| g.name.to_string());
        Ok(Response::new(pb::ListGroupsResponse {
            groups: gs.iter().map(group_to_proto).collect(),
            next_page_token: super::paging::next_token(last.as_deref()),
        }))
    }

    async fn apply_policy_document(
        &self,
        req: Request<pb::ApplyPolicyDocumentRequest>,
    ) -> Result<Response<pb::ApplyPolicyDocumentResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let dry = r.dry_run;
        // Parsing a large file takes seconds: on the blocking pool, not a reactor thread.
        let changes = self
            .call(move |s| {
                let doc = PolicyDoc::from_yaml(&r.yaml)?;
                s.policy_files.apply_document(&actor, &doc, dry)
            })
            .await?;
        Ok(Response::new(pb::ApplyPolicyDocumentResponse {
            applied: !dry && !changes.is_empty(),
            changes,
        }))
    }

    async fn export_policy_document(
        &self,
        req: Request<pb::ExportPolicyDocumentRequest>,
    ) -> Result<Response<pb::ExportPolicyDocumentResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let d = self.call(|s| s.policy_files.export_document()).await?;
        Ok(Response::new(pb::ExportPolicyDocumentResponse {
            yaml: d.to_yaml(),
        }))
    }

    async fn set_group_policy(
        &self,
        req: Request<pb::SetGroupPolicyRequest>,
    ) -> Result<Response<pb::GroupResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let name = GroupName::parse("name", &r.name).map_err(invalid)?;
        let patch: LimitsPatch = text_of(r.set, r.clear).parse().map_err(invalid)?;
        let shared: Option<Cap<ByteSize>> = r
            .shared_limit
            .as_deref()
            .map(|s| parse_field("shared_limit", s))
            .transpose()
            .map_err(invalid)?;
        let g = self
            .call(move |s| s.policy.set_group_policy(&actor, &name, &patch, shared))
            .await?;
        Ok(Response::new(pb::GroupResponse {
            group: Some(group_to_proto(&g)),
        }))
    }
}

impl Api {
    async fn members(
        &self,
        req: Request<pb::GroupMembersRequest>,
        add: bool,
    ) -> Result<Response<pb::GroupResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let name = GroupName::parse("group", &r.group).map_err(invalid)?;
        let users = users("users", &r.users).map_err(invalid)?;
        let g = self
            .call(move |s| s.policy.change_members(&actor, &name, &users, add))
            .await?;
        Ok(Response::new(pb::GroupResponse {
            group: Some(group_to_proto(&g)),
        }))
    }
}

fn need_group(g: Option<pb::PolicyGroup>) -> Result<GroupView, ClientError> {
    Ok(group_from_proto(
        g.ok_or(AnswerError::Missing { field: "group" })?,
    )?)
}

/// The policy calls of the client; `user` empty = the server default where that applies.
impl Client {
    fn policy(&self) -> PolicyClient<tonic::transport::Channel> {
        PolicyClient::new(self.channel())
            .max_decoding_message_size(MAX_DOCUMENT_MESSAGE)
            .max_encoding_message_size(MAX_DOCUMENT_MESSAGE)
    }

    /// Changes a user's (or the default's) limits; answers the layer after the change.
    pub async fn set_limits(&self, user: &str, text: &LimitsText) -> Result<Limits, ClientError> {
        let set = limits_text_to_proto(text);
        let r = self
            .policy()
            .set_limits(self.req(pb::SetLimitsRequest {
                user: user.into(),
                set: Some(set),
                clear: text.clear.clone(),
            }))
            .await?
            .into_inner();
        Ok(limits_from_proto(r.limits).map_err(AnswerError::from)?)
    }

    /// A user's (or the default's) own limits.
    pub async fn get_limits(&self, user: &str) -> Result<Limits, ClientError> {
        let r = self
            .policy()
            .get_limits(self.req(pb::GetLimitsRequest { user: user.into() }))
            .await?
            .into_inner();
        Ok(limits_from_proto(r.limits).map_err(AnswerError::from)?)
    }

    /// The effective policy of a user, field by field with its source.
    pub async fn explain_policy(&self, user: &str) -> Result<Vec<ExplainRow>, ClientError> {
        let r = self
            .policy()
            .explain_policy(self.req(pb::ExplainPolicyRequest { user: user.into() }))
            .await?
            .into_inner();
        Ok(r.fields
            .into_iter()
            .map(|f| ExplainRow {
                field: f.field,
                value: f.value,
                source: f.source,
            })
            .collect())
    }

    /// Quota usage of `user`, or (empty) of every user, walking every page.
    pub async fn show_quota(
        &self,
        user: &str,
        exceeding: bool,
    ) -> Result<Vec<QuotaStatus>, ClientError> {
        super::paging::walk(|token| {
            self.show_quota_page(
                user,
                exceeding,
                crate::service::core::MAX_PAGE_SIZE as u32,
                token,
            )
        })
        .await
    }

    /// One page of quota usage (see `ShowQuotaRequest`) and the next page's token (empty on
    /// the last page).
    pub async fn show_quota_page(
        &self,
        user: &str,
        exceeding: bool,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<QuotaStatus>, String), ClientError> {
        let r = self
            .policy()
            .show_quota(self.req(pb::ShowQuotaRequest {
                user: user.into(),
                exceeding,
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        Ok((
            r.quotas.into_iter().map(quota_from_proto).collect(),
            r.next_page_token,
        ))
    }

    /// Starts a new period for a user's bucket or a group's pool.
    pub async fn reset_quota(
        &self,
        user: &str,
        group: &str,
    ) -> Result<Vec<QuotaStatus>, ClientError> {
        let r = self
            .policy()
            .reset_quota(self.req(pb::ResetQuotaRequest {
                user: user.into(),
                group: group.into(),
            }))
            .await?
            .into_inner();
        Ok(r.quotas.into_iter().map(quota_from_proto).collect())
    }

    /// Starts a new period for every bucket and pool; their owners (`user:…`, `group:…`).
    pub async fn reset_all_quotas(&self) -> Result<Vec<String>, ClientError> {
        let r = self
            .policy()
            .reset_all_quotas(self.req(pb::ResetAllQuotasRequest {}))
            .await?
            .into_inner();
        Ok(r.reset)
    }

    /// Creates a group.
    pub async fn create_group(&self, name: &str) -> Result<GroupView, ClientError> {
        let r = self
            .policy()
            .create_group(self.req(pb::CreateGroupRequest { name: name.into() }))
            .await?
            .into_inner();
        need_group(r.group)
    }

    /// Deletes a group.
    pub async fn delete_group(&self, name: &str) -> Result<GroupView, ClientError> {
        let r = self
            .policy()
            .delete_group(self.req(pb::DeleteGroupRequest { name: name.into() }))
            .await?
            .into_inner();
        need_group(r.group)
    }

    /// Adds (`add`) or removes members.
    pub async fn group_members(
        &self,
        group: &str,
        users: &[String],
        add: bool,
    ) -> Result<GroupView, ClientError> {
        let req = self.req(pb::GroupMembersRequest {
            group: group.into(),
            users: users.to_vec(),
        });
        let r = if add {
            self.policy().add_group_members(req).await?
        } else {
            self.policy().remove_group_members(req).await?
        }
        .into_inner();
        need_group(r.group)
    }

    /// Every group.
    pub async fn list_groups(&self) -> Result<Vec<GroupView>, ClientError> {
        super::paging::walk(|t| {
            self.list_groups_page(crate::service::core::MAX_PAGE_SIZE as u32, t)
        })
        .await
    }

    /// One page of groups by name (`page_size` 0 = the default) and the next page's token
    /// (empty on the last page).
    pub async fn list_groups_page(
        &self,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<GroupView>, String), ClientError> {
        let r = self
            .policy()
            .list_groups(self.req(pb::ListGroupsRequest {
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let groups = r
            .groups
            .into_iter()
            .map(group_from_proto)
            .collect::<Result<_, _>>()?;
        Ok((groups, r.next_page_token))
    }

    /// Changes a group's policy and pool (`shared_limit`: a size, `none`, or `None` = keep).
    pub async fn set_group_policy(
        &self,
        name: &str,
        text: &LimitsText,
        shared_limit: Option<String>,
    ) -> Result<GroupView, ClientError> {
        let set = limits_text_to_proto(text);
        let r = self
            .policy()
            .set_group_policy(self.req(pb::SetGroupPolicyRequest {
                name: name.into(),
                set: Some(set),
                clear: text.clear.clone(),
                shared_limit,
            }))
            .await?
            .into_inner();
        need_group(r.group)
    }
}

impl Client {
    /// Applies a policy document (YAML text); answers the diff and whether anything changed.
    pub async fn apply_policy_document(
        &self,
        yaml: &str,
        dry_run: bool,
    ) -> Result<(Vec<String>, bool), ClientError> {
        let r = self
            .policy()
            .apply_policy_document(self.req(pb::ApplyPolicyDocumentRequest {
                yaml: yaml.into(),
                dry_run,
            }))
            .await?
            .into_inner();
        Ok((r.changes, r.applied))
    }

    /// The current state as a policy document (YAML text).
    pub async fn export_policy_document(&self) -> Result<String, ClientError> {
        Ok(self
            .policy()
            .export_policy_document(self.req(pb::ExportPolicyDocumentRequest {}))
            .await?
            .into_inner()
            .yaml)
    }
}

/// The proto form of raw limits text.
pub fn limits_text_to_proto(text: &LimitsText) -> pb::PolicyLimits {
    pb::PolicyLimits {
        bandwidth: text.bandwidth.clone(),
        limit: text.limit.clone(),
        period: text.period.clone(),
        grace: text.grace.clone(),
        connections: text.connections.clone(),
        flows: text.flows.clone(),
        time: text.time.clone(),
        window: text.window.clone(),
        tz: text.tz.clone(),
    }
}
