//! The `Mfa` service (`capybara mfa …`), its conversions and client calls. `GetMfaStatus`
//! needs read, `ConfirmMfa` write; `EnableMfa` and `ResetMfa` (they answer a secret),
//! `DisableMfa` and `RequireMfa` (they lift a second factor) need admin. A token restricted to a
//! user may ask about that user only.

use capybara_proto::v1::{self as pb, mfa_client::MfaClient, mfa_server};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::AnswerError,
    handler::Api,
};
use crate::service::{
    domain::Scope,
    mfa::{AdmittedDevice, Enrolment, MfaOverview, MfaStatus},
};

fn opt_str(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

#[tonic::async_trait]
impl mfa_server::Mfa for Api {
    async fn enable_mfa(
        &self,
        req: Request<pb::EnableMfaRequest>,
    ) -> Result<Response<pb::MfaEnrolment>, Status> {
        let (actor, user) = self.auth_user(&req, Scope::Admin, "user", &req.get_ref().user)?;
        let r = req.into_inner();
        let e = self
            .call(move |s| {
                s.mfa
                    .enable(&actor, &user, opt_str(&r.email), opt_str(&r.sms))
            })
            .await?;
        Ok(Response::new(e.into()))
    }

    async fn confirm_mfa(
        &self,
        req: Request<pb::ConfirmMfaRequest>,
    ) -> Result<Response<pb::MfaUserStatus>, Status> {
        let (actor, user) = self.auth_user(&req, Scope::Write, "user", &req.get_ref().user)?;
        let code = req.into_inner().code;
        let st = self
            .call(move |s| s.mfa.confirm(&actor, &user, &code))
            .await?;
        Ok(Response::new(st.into()))
    }

    async fn disable_mfa(
        &self,
        req: Request<pb::DisableMfaRequest>,
    ) -> Result<Response<pb::MfaUserStatus>, Status> {
        let (actor, user) = self.auth_user(&req, Scope::Admin, "user", &req.get_ref().user)?;
        let st = self.call(move |s| s.mfa.disable(&actor, &user)).await?;
        Ok(Response::new(st.into()))
    }

    async fn reset_mfa(
        &self,
        req: Request<pb::ResetMfaRequest>,
    ) -> Result<Response<pb::MfaEnrolment>, Status> {
        let (actor, user) = self.auth_user(&req, Scope::Admin, "user", &req.get_ref().user)?;
        let e = self.call(move |s| s.mfa.reset(&actor, &user)).await?;
        Ok(Response::new(e.into()))
    }

    async fn get_mfa_status(
        &self,
        req: Request<pb::GetMfaStatusRequest>,
    ) -> Result<Response<pb::MfaStatus>, Status> {
        let (_, user) = self.auth_opt_user(&req, Scope::Read, "user", &req.get_ref().user)?;
        let o = self.call(move |s| s.mfa.status(user.as_ref())).await?;
        Ok(Response::new(o.into()))
    }

    async fn require_mfa(
        &self,
        req: Request<pb::RequireMfaRequest>,
    ) -> Result<Response<pb::MfaStatus>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let on = req.into_inner().on;
        let o = self.call(move |s| s.mfa.require_all(&actor, on)).await?;
        Ok(Response::new(o.into()))
    }
}

impl From<Enrolment> for pb::MfaEnrolment {
    fn from(e: Enrolment) -> pb::MfaEnrolment {
        pb::MfaEnrolment {
            user: e.user,
            uri: e.uri,
            backup_codes: e.backup_codes,
        }
    }
}

impl From<pb::MfaEnrolment> for Enrolment {
    fn from(e: pb::MfaEnrolment) -> Enrolment {
        Enrolment {
            user: e.user,
            uri: e.uri,
            backup_codes: e.backup_codes,
        }
    }
}

fn secs(v: Option<u64>) -> i64 {
    v.map_or(0, |s| s as i64)
}

fn opt_secs(v: i64) -> Option<u64> {
    (v > 0).then_some(v as u64)
}

fn opt_text(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<MfaStatus> for pb::MfaUserStatus {
    fn from(s: MfaStatus) -> pb::MfaUserStatus {
        pb::MfaUserStatus {
            user: s.user,
            state: s.state,
            required: s.required,
            created_at: secs(s.created_at),
            enrolled_at: secs(s.enrolled_at),
            last_verified: secs(s.last_verified),
            backup_codes_left: s.backup_codes_left,
            email: s.email.unwrap_or_default(),
            sms: s.sms.unwrap_or_default(),
            devices: s
                .devices
                .into_iter()
                .map(|d| pb::MfaAdmittedDevice {
                    device: d.device,
                    until: d.until as i64,
                })
                .collect(),
            error: s.error.unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::MfaUserStatus> for MfaStatus {
    type Error = AnswerError;
    fn try_from(s: pb::MfaUserStatus) -> Result<MfaStatus, AnswerError> {
        if !matches!(s.state.as_str(), "enrolled" | "pending" | "none") {
            return Err(AnswerError::Invalid { field: "state" });
        }
        Ok(MfaStatus {
            user: s.user,
            state: s.state,
            required: s.required,
            created_at: opt_secs(s.created_at),
            enrolled_at: opt_secs(s.enrolled_at),
            last_verified: opt_secs(s.last_verified),
            backup_codes_left: s.backup_codes_left,
            email: opt_text(s.email),
            sms: opt_text(s.sms),
            devices: s
                .devices
                .into_iter()
                .map(|d| AdmittedDevice {
                    device: d.device,
                    until: d.until.max(0) as u64,
                })
                .collect(),
            error: opt_text(s.error),
        })
    }
}

impl From<MfaOverview> for pb::MfaStatus {
    fn from(o: MfaOverview) -> pb::MfaStatus {
        pb::MfaStatus {
            require_all: o.require_all,
            users: o.users.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::MfaStatus> for MfaOverview {
    type Error = AnswerError;
    fn try_from(o: pb::MfaStatus) -> Result<MfaOverview, AnswerError> {
        Ok(MfaOverview {
            require_all: o.require_all,
            users: o
                .users
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl Client {
    fn mfa(&self) -> MfaClient<tonic::transport::Channel> {
        MfaClient::new(self.channel.clone())
    }

    /// `mfa enable USER [--email] [--sms]`.
    pub async fn mfa_enable(
        &self,
        user: &str,
        email: Option<String>,
        sms: Option<String>,
    ) -> Result<Enrolment, ClientError> {
        let r = self
            .mfa()
            .enable_mfa(self.req(pb::EnableMfaRequest {
                user: user.to_owned(),
                email,
                sms,
            }))
            .await?
            .into_inner();
        Ok(r.into())
    }

    /// `mfa confirm USER CODE`.
    pub async fn mfa_confirm(&self, user: &str, code: &str) -> Result<MfaStatus, ClientError> {
        let r = self
            .mfa()
            .confirm_mfa(self.req(pb::ConfirmMfaRequest {
                user: user.to_owned(),
                code: code.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// `mfa disable USER`.
    pub async fn mfa_disable(&self, user: &str) -> Result<MfaStatus, ClientError> {
        let r = self
            .mfa()
            .disable_mfa(self.req(pb::DisableMfaRequest {
                user: user.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// `mfa reset USER`.
    pub async fn mfa_reset(&self, user: &str) -> Result<Enrolment, ClientError> {
        let r = self
            .mfa()
            .reset_mfa(self.req(pb::ResetMfaRequest {
                user: user.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(r.into())
    }

    /// `mfa status [USER]` (empty: every user with MFA).
    pub async fn mfa_status(&self, user: &str) -> Result<MfaOverview, ClientError> {
        let r = self
            .mfa()
            .get_mfa_status(self.req(pb::GetMfaStatusRequest {
                user: user.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// `mfa require-all [--off]`.
    pub async fn mfa_require_all(&self, on: bool) -> Result<MfaOverview, ClientError> {
        let r = self
            .mfa()
            .require_mfa(self.req(pb::RequireMfaRequest { on }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }
}
