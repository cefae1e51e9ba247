//! `capybara api …`: the agent's API; today its tokens (`api token create|list|revoke`). A
//! token's secret is printed once, on standard output, and never listed.
//!
//! `api token create` with no options (as the design writes it) makes a `read` token that
//! expires after the agent's default lifetime (90 days), and says both on standard error. Read
//! is the least a typical integration (a dashboard, a monitoring probe, a report) needs; one
//! that changes things asks for `--scope write` (or `admin`) by name, so a forgotten token
//! copied into a panel can at worst read.

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    input::{expiry, opt_user},
    output::{opt_time, out, outln, print_json, time},
    table::Table,
};
use crate::service::{
    domain::{Scope, TokenId},
    tokens::DEFAULT_TOKEN_LIFETIME,
};

/// `capybara api …`.
#[derive(Debug, Subcommand)]
pub(super) enum ApiCmd {
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

/// `capybara api token …`.
#[derive(Debug, Subcommand)]
pub(super) enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        /// read, write or admin. Default read: the least a typical integration (dashboard,
        /// monitoring, reports) needs; ask for write or admin by name.
        #[arg(long, default_value = "read")]
        scope: String,
        /// Expiry from now, e.g. 30d (default 90d, the agent's default lifetime).
        #[arg(long)]
        expires: Option<String>,
        /// A label.
        #[arg(long, default_value = "")]
        name: String,
        /// Restrict the token to this user: it may act on and see only that user (its record,
        /// devices and configs, within its scope); every other call is refused.
        #[arg(long)]
        user: Option<String>,
    },
    /// Every token (never their secrets).
    List,
    /// Revoke a token.
    Revoke {
        /// The token id.
        id: String,
    },
}

/// Runs `capybara api …`.
pub(super) async fn run(cli: &Cli, cmd: &ApiCmd) -> Result<(), CliError> {
    match cmd {
        ApiCmd::Token(cmd) => token(cli, cmd).await,
    }
}

/// Runs `capybara api token …`.
async fn token(cli: &Cli, cmd: &TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create {
            scope,
            expires,
            name,
            user,
        } => {
            let scope = Scope::parse("scope", scope)?;
            let user = opt_user(user.as_ref())?;
            let defaulted = expires.is_none();
            let expires = expiry("expires", expires.as_deref())?.unwrap_or(0);
            let (t, secret) = connect(cli)
                .await?
                .create_user_token(scope, name, expires, user)
                .await?;
            if cli.json {
                print_json(&serde_json::json!({ "token": t, "secret": secret }))?;
            } else {
                outln!("{secret}")?;
                let default = if defaulted {
                    format!(
                        ", the default {}d",
                        DEFAULT_TOKEN_LIFETIME.as_secs() / 86_400
                    )
                } else {
                    String::new()
                };
                let only = t
                    .user
                    .as_ref()
                    .map_or_else(String::new, |u| format!(", only user {u}"));
                eprintln!(
                    "token {} (scope {}{only}, expires {}{default}): the secret above is shown once",
                    t.id,
                    t.scope,
                    opt_time(t.expires_at)
                );
            }
            Ok(())
        }
        TokenCmd::List => {
            let tokens = connect(cli).await?.list_tokens().await?;
            if cli.json {
                print_json(&tokens)?;
                return Ok(());
            }
            let mut t = Table::new(&[
                "ID", "NAME", "SCOPE", "CREATED", "EXPIRES", "REVOKED", "USER",
            ]);
            for k in &tokens {
                t.row(vec![
                    k.id.to_string(),
                    if k.name.is_empty() {
                        "-".into()
                    } else {
                        k.name.clone()
                    },
                    k.scope.to_string(),
                    time(k.created_at),
                    opt_time(k.expires_at),
                    opt_time(k.revoked_at),
                    k.user
                        .as_ref()
                        .map_or_else(|| "-".into(), ToString::to_string),
                ]);
            }
            out!("{t}")?;
            Ok(())
        }
        TokenCmd::Revoke { id } => {
            TokenId::parse("id", id)?;
            let t = connect(cli).await?.revoke_token(id).await?;
            if cli.json {
                print_json(&t)?;
            } else {
                outln!("revoked {}", t.id)?;
            }
            Ok(())
        }
    }
}
