//! The `Tokens` service (API tokens with scopes and expiry), its conversions and client calls.

use std::time::{Duration, SystemTime};

use capybara_proto::v1::{self as pb, tokens_client::TokensClient, tokens_server::Tokens};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, need, opt_secs, opt_user, secs_opt},
    handler::Api,
    status::invalid,
};
use crate::service::{
    NewToken,
    domain::{MAX_EXPIRY_AHEAD, Scope, Token, TokenId, ValidationError},
};

#[tonic::async_trait]
impl Tokens for Api {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let new = NewToken::try_from(req.into_inner()).map_err(invalid)?;
        let (token, secret) = self
            .call(move |s| s.tokens.create_token(&actor, new))
            .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some((&token).into()),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.auth(&req, Scope::Admin)?;
        let r = req.get_ref();
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let (tokens, more) = self
            .call(move |s| s.tokens.list_tokens_page(ask.after.as_deref(), ask.size))
            .await?;
        let last = tokens.last().filter(|_| more).map(|t| t.id.to_string());
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(Into::into).collect(),
            next_page_token: super::paging::next_token(last.as_deref()),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let id = TokenId::parse("id", &req.get_ref().id).map_err(invalid)?;
        let t = self
            .call(move |s| s.tokens.revoke_token(&actor, &id))
            .await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            token: Some((&t).into()),
        }))
    }
}

/// The scope of a proto enum value in `field`.
pub fn scope_from_proto(field: &'static str, v: i32) -> Result<Scope, ValidationError> {
    match pb::Scope::try_from(v) {
        Ok(pb::Scope::Read) => Ok(Scope::Read),
        Ok(pb::Scope::Write) => Ok(Scope::Write),
        Ok(pb::Scope::Admin) => Ok(Scope::Admin),
        Ok(pb::Scope::Unspecified) => Err(ValidationError::Missing { field }),
        Err(_) => Err(ValidationError::Scope {
            field,
            value: v.to_string(),
        }),
    }
}

/// The proto value of a scope.
pub fn scope_to_proto(s: Scope) -> pb::Scope {
    match s {
        Scope::Read => pb::Scope::Read,
        Scope::Write => pb::Scope::Write,
        Scope::Admin => pb::Scope::Admin,
    }
}

impl TryFrom<pb::CreateTokenRequest> for NewToken {
    type Error = ValidationError;
    fn try_from(r: pb::CreateTokenRequest) -> Result<NewToken, ValidationError> {
        let expires_at = match r.expires_in_secs {
            0 => None,
            s => Some(
                SystemTime::now()
                    .checked_add(Duration::from_secs(s))
                    .filter(|_| s <= MAX_EXPIRY_AHEAD.as_secs())
                    .ok_or(ValidationError::Time {
                        field: "expires_in_secs",
                        reason: "too far in the future",
                    })?,
            ),
        };
        Ok(NewToken {
            scope: scope_from_proto("scope", r.scope)?,
            name: r.name,
            expires_at,
            user: opt_user("user", &r.user)?,
        })
    }
}

impl From<&Token> for pb::Token {
    fn from(t: &Token) -> pb::Token {
        pb::Token {
            id: t.id.to_string(),
            name: t.name.clone(),
            scope: scope_to_proto(t.scope) as i32,
            created_at: t.created_at as i64,
            expires_at: opt_secs(t.expires_at),
            revoked_at: opt_secs(t.revoked_at),
            user: t.user.as_ref().map(ToString::to_string).unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::Token> for Token {
    type Error = AnswerError;
    fn try_from(t: pb::Token) -> Result<Token, AnswerError> {
        Ok(Token {
            id: TokenId::parse("token.id", &t.id)?,
            name: t.name,
            scope: scope_from_proto("token.scope", t.scope)?,
            created_at: t.created_at.max(0) as u64,
            expires_at: secs_opt(t.expires_at),
            revoked_at: secs_opt(t.revoked_at),
            user: opt_user("token.user", &t.user)?,
        })
    }
}

impl Client {
    /// Creates a token; returns it with its secret.
    pub async fn create_token(
        &self,
        scope: Scope,
        name: &str,
        expires_in_secs: u64,
    ) -> Result<(Token, String), ClientError> {
        self.create_user_token(scope, name, expires_in_secs, "")
            .await
    }

    /// Creates a token restricted to `user` (`""`: every user); returns it with its secret.
    pub async fn create_user_token(
        &self,
        scope: Scope,
        name: &str,
        expires_in_secs: u64,
        user: &str,
    ) -> Result<(Token, String), ClientError> {
        let r = TokensClient::new(self.channel.clone())
            .create_token(self.req(pb::CreateTokenRequest {
                scope: scope_to_proto(scope) as i32,
                name: name.into(),
                expires_in_secs,
                user: user.into(),
            }))
            .await?
            .into_inner();
        Ok((need("token", r.token)?.try_into()?, r.secret))
    }

    /// Every token.
    pub async fn list_tokens(&self) -> Result<Vec<Token>, ClientError> {
        super::paging::walk(|t| {
            self.list_tokens_page(crate::service::core::MAX_PAGE_SIZE as u32, t)
        })
        .await
    }

    /// One page of tokens by id (`page_size` 0 = the default) and the next page's token
    /// (empty on the last page).
    pub async fn list_tokens_page(
        &self,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<Token>, String), ClientError> {
        let r = TokensClient::new(self.channel.clone())
            .list_tokens(self.req(pb::ListTokensRequest {
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let tokens = r
            .tokens
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?;
        Ok((tokens, r.next_page_token))
    }

    /// Revokes a token.
    pub async fn revoke_token(&self, id: &str) -> Result<Token, ClientError> {
        let r = TokensClient::new(self.channel.clone())
            .revoke_token(self.req(pb::RevokeTokenRequest { id: id.into() }))
            .await?
            .into_inner();
        Ok(need("token", r.token)?.try_into()?)
    }
}
