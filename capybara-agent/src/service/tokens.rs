//! API tokens: created with a scope and an expiry, shown once, stored hashed (SHA-256 of the
//! secret), revoked but kept for the audit trail; [`Tokens::authenticate`] turns a bearer
//! string into the actor it stands for.
//!
//! A token may be restricted to one user ([`NewToken::user`]): it then acts on and sees only
//! that user (the API checks each call, `api::handler`); the restriction is stored with the
//! token, listed, and in the `token.create` audit record.
//!
//! A token created without an expiry expires after [`DEFAULT_TOKEN_LIFETIME`] (90 days): a
//! token copied into a script or a panel and forgotten stops working on its own. A longer-lived
//! token names its expiry; none lives forever.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    AuthError, ServiceError,
    core::{Core, now, to_json},
    domain::{Actor, Scope, Token, TokenId, UserName, ValidationError, expiry},
    secrets,
};
use crate::store::{Batch, Cf, keys};

/// How long a token created without an expiry works.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(90 * 86_400);

/// What the store holds for a token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct TokenRecord {
    /// The token.
    pub(super) token: Token,
    /// SHA-256 of the secret, hex.
    hash: String,
}

/// Input of [`Tokens::create_token`].
#[derive(Clone, Debug)]
pub struct NewToken {
    /// What it may do.
    pub scope: Scope,
    /// A label.
    pub name: String,
    /// When it stops working (`None`: after [`DEFAULT_TOKEN_LIFETIME`]).
    pub expires_at: Option<SystemTime>,
    /// The one user it may act on and see; `None`: every user.
    pub user: Option<UserName>,
}

/// The tokens feature.
#[derive(Debug)]
pub struct Tokens {
    core: Arc<Core>,
}

impl Tokens {
    /// The feature over the shared core.
    pub fn new(core: Arc<Core>) -> Tokens {
        Tokens { core }
    }

    /// Creates a token; the bearer string is returned this once and never stored.
    pub fn create_token(
        &self,
        actor: &Actor,
        new: NewToken,
    ) -> Result<(Token, String), ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        if new.name.len() > 64 || new.name.chars().any(char::is_control) {
            return Err(ValidationError::Name {
                field: "name",
                value: new.name,
                reason: "at most 64 printable characters",
            }
            .into());
        }
        let expires_at = expiry(
            "expires",
            Some(
                new.expires_at
                    .unwrap_or_else(|| SystemTime::now() + DEFAULT_TOKEN_LIFETIME),
            ),
        )?;
        if let Some(u) = &new.user
            && self
                .core
                .store
                .get::<serde_json::Value>(Cf::Users, &keys::user(u.as_str()))?
                .is_none()
        {
            return Err(ServiceError::NotFound {
                what: "user",
                name: u.to_string(),
            });
        }
        let id = TokenId::random();
        let secret = secrets::new_token_secret(&id);
        let token = Token {
            id: id.clone(),
            name: new.name,
            scope: new.scope,
            created_at: now(),
            expires_at,
            revoked_at: None,
            user: new.user,
        };
        let mut batch = Batch::default();
        batch.put(
            Cf::Tokens,
            &keys::token(id.as_str()),
            &TokenRecord {
                token: token.clone(),
                hash: secret.hash,
            },
        )?;
        self.core.audit(
            &mut batch,
            actor,
            "token.create",
            format!("token:{id}"),
            None,
            to_json(&token),
        )?;
        self.core.commit(batch)?;
        tracing::info!(%actor, token = %id, scope = %token.scope, "token created");
        Ok((token, secret.bearer))
    }

    /// Every token (revoked ones too), by id.
    pub fn list_tokens(&self) -> Result<Vec<Token>, ServiceError> {
        Ok(self
            .core
            .store
            .scan::<TokenRecord>(Cf::Tokens, "")?
            .into_iter()
            .map(|(_, r)| r.token)
            .collect())
    }

    /// One page of tokens by id: up to `size` after the id `after` (read from the store a page
    /// at a time), and whether more follow.
    pub fn list_tokens_page(
        &self,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<Token>, bool), ServiceError> {
        let page = self
            .core
            .store
            .page_forward::<TokenRecord>(Cf::Tokens, "", after, size)?;
        Ok((
            page.items.into_iter().map(|r| r.token).collect(),
            page.next.is_some(),
        ))
    }

    /// Revokes a token: it stops working at once; the record stays for the audit trail.
    pub fn revoke_token(&self, actor: &Actor, id: &TokenId) -> Result<Token, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let mut rec: TokenRecord = self
            .core
            .store
            .get(Cf::Tokens, &keys::token(id.as_str()))?
            .ok_or_else(|| ServiceError::NotFound {
                what: "token",
                name: id.to_string(),
            })?;
        if rec.token.revoked_at.is_some() {
            return Err(ServiceError::AlreadyRevoked { id: id.to_string() });
        }
        let before = rec.token.clone();
        rec.token.revoked_at = Some(now());
        let mut batch = Batch::default();
        batch.put(Cf::Tokens, &keys::token(id.as_str()), &rec)?;
        self.core.audit(
            &mut batch,
            actor,
            "token.revoke",
            format!("token:{id}"),
            to_json(&before),
            to_json(&rec.token),
        )?;
        self.core.commit(batch)?;
        Ok(rec.token)
    }

    /// The actor a bearer string stands for, if it is a valid token.
    pub fn authenticate(&self, bearer: &str) -> Result<Actor, AuthError> {
        self.authenticate_restricted(bearer).map(|(a, _)| a)
    }

    /// [`Tokens::authenticate`] with the one user the token is restricted to, if any.
    pub fn authenticate_restricted(
        &self,
        bearer: &str,
    ) -> Result<(Actor, Option<UserName>), AuthError> {
        let (id, hash) = secrets::parse_bearer(bearer).ok_or(AuthError::Invalid)?;
        let rec: TokenRecord = self
            .core
            .store
            .get(Cf::Tokens, &keys::token(id.as_str()))
            .map_err(|e| AuthError::Store(Arc::new(e)))?
            .ok_or(AuthError::Invalid)?;
        if !secrets::hashes_equal(&hash, &rec.hash) {
            return Err(AuthError::Invalid);
        }
        if rec.token.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        if rec.token.expires_at.is_some_and(|e| e <= now()) {
            return Err(AuthError::Expired);
        }
        Ok((
            Actor::Token {
                id,
                scope: rec.token.scope,
            },
            rec.token.user,
        ))
    }
}
