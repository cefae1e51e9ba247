//! `capybara api …`: the agent's TCP API (gRPC and its REST mirror) and its tokens.
//!
//! - `api enable [--listen ADDR:PORT] [--tls-cert F --tls-key F] [--insecure] [--rate-limit N]`
//!   serves it now and at every start (default `127.0.0.1:7443`); `api disable` stops it;
//!   `api status` says where it listens.
//! - `api test` calls `GET /api/v1/health` over the TCP API, as an integration would, and prints
//!   the round trip; with no `--token` it makes a read token for the call (expiring in a
//!   minute) and revokes it after.
//! - `api docs` prints the OpenAPI 3 document the agent serves (`GET /api/v1/openapi.json`).
//! - `api token create|list|revoke`: a token's secret is printed once, on standard output, and
//!   never listed.
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
use crate::{
    api::{
        access::{AccessStatus, EnableApi},
        client::{Client, Endpoint},
    },
    service::{
        domain::{Scope, TokenId},
        tokens::DEFAULT_TOKEN_LIFETIME,
    },
};

/// `capybara api …`.
#[derive(Debug, Subcommand)]
pub(super) enum ApiCmd {
    /// Serve the TCP API (gRPC and REST) now and at every start.
    Enable {
        /// Address and port (default 127.0.0.1:7443). Without TLS only a loopback address,
        /// unless --insecure.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// TLS certificate chain (PEM file on the agent's host).
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<String>,
        /// TLS private key (PEM file on the agent's host).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<String>,
        /// Allow a non-loopback address without TLS (tokens cross the network in clear text).
        #[arg(long)]
        insecure: bool,
        /// Calls per second per token (a burst of twice that); 0 = unlimited. Default 100.
        #[arg(long, value_name = "N")]
        rate_limit: Option<u32>,
    },
    /// Stop the TCP API.
    Disable,
    /// Whether the TCP API is on, and where.
    Status,
    /// Call GET /api/v1/health over the TCP API with a token and print the round trip.
    Test,
    /// Print the OpenAPI 3 document of the REST API.
    Docs,
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
        ApiCmd::Enable {
            listen,
            tls_cert,
            tls_key,
            insecure,
            rate_limit,
        } => {
            let s = connect(cli)
                .await?
                .enable_api(EnableApi {
                    listen: listen.clone(),
                    tls: tls_cert.clone().zip(tls_key.clone()),
                    insecure: *insecure,
                    rate_limit: *rate_limit,
                })
                .await?;
            print_status(cli, &s)
        }
        ApiCmd::Disable => {
            let s = connect(cli).await?.disable_api().await?;
            print_status(cli, &s)
        }
        ApiCmd::Status => {
            let s = connect(cli).await?.api_access().await?;
            print_status(cli, &s)
        }
        ApiCmd::Test => test(cli).await,
        ApiCmd::Docs => {
            let (status, body) = connect(cli).await?.http_get("/api/v1/openapi.json").await?;
            if status != 200 {
                return Err(CliError::Agent(format!(
                    "GET /api/v1/openapi.json answered {status}"
                )));
            }
            out!("{}", String::from_utf8_lossy(&body))?;
            if !body.ends_with(b"\n") {
                outln!()?;
            }
            Ok(())
        }
    }
}

fn print_status(cli: &Cli, s: &AccessStatus) -> Result<(), CliError> {
    if cli.json {
        print_json(s)?;
    } else if let Some(listen) = s.listen.as_ref().filter(|_| s.enabled) {
        let scheme = if s.tls.is_some() { "https" } else { "http" };
        let from = match s.source.as_deref() {
            Some("flag") => " (--api-listen)",
            _ => "",
        };
        let limit = if s.rate_limit == 0 {
            "no rate limit".to_owned()
        } else {
            format!("{} calls/s per token", s.rate_limit)
        };
        outln!("API enabled{from}: {scheme}://{listen} (gRPC and REST under /api/v1/; {limit})")?;
        if s.tls.is_none() && s.insecure {
            outln!("warning: no TLS on a network address: tokens cross the network in clear text")?;
        }
    } else {
        outln!("API disabled (capybara api enable serves it)")?;
    }
    Ok(())
}

/// `capybara api test`: `GET /api/v1/health` over the TCP API, timed.
async fn test(cli: &Cli) -> Result<(), CliError> {
    let local = connect(cli).await?;
    let status = local.api_access().await?;
    let Some(listen) = status.listen.as_ref().filter(|_| status.enabled) else {
        return Err(CliError::Agent(
            "the TCP API is disabled; enable it with `capybara api enable`".into(),
        ));
    };
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| CliError::Agent(format!("the agent reports an odd address {listen:?}")))?;
    // A wildcard address is reached on loopback from here.
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let scheme = if status.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{host}:{}", addr.port());
    let (token, temporary) = match &cli.token {
        Some(t) => (t.clone(), None),
        None => {
            let (t, secret) = local
                .create_token(Scope::Read, "capybara api test", 60)
                .await?;
            (secret, Some(t.id))
        }
    };
    let ca_cert = match &cli.ca_cert {
        Some(path) => Some(std::fs::read(path).map_err(CliError::file(path))?),
        None => None,
    };
    let result = async {
        let remote = Client::connect(&Endpoint::Tcp {
            url: url.clone(),
            token: Some(token),
            ca_cert,
        })
        .await?;
        let started = std::time::Instant::now();
        let (code, body) = remote.http_get("/api/v1/health").await?;
        Ok::<_, CliError>((code, body, started.elapsed()))
    }
    .await;
    if let Some(id) = temporary {
        local.revoke_token(id.as_str()).await?;
    }
    let (code, body, took) = result?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if cli.json {
        print_json(&serde_json::json!({
            "url": format!("{url}/api/v1/health"),
            "status": code,
            "millis": took.as_secs_f64() * 1e3,
            "body": json,
        }))?;
    } else {
        let components: Vec<String> = json["components"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|c| {
                        format!(
                            "{} {}",
                            c["name"].as_str().unwrap_or("?"),
                            if c["ok"].as_bool() == Some(true) {
                                "ok"
                            } else {
                                "FAILING"
                            }
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        outln!(
            "GET {url}/api/v1/health: {code} in {:.1} ms{}",
            took.as_secs_f64() * 1e3,
            if components.is_empty() {
                String::new()
            } else {
                format!(" ({})", components.join(", "))
            }
        )?;
    }
    if code != 200 {
        return Err(CliError::Agent(format!(
            "GET /api/v1/health answered {code}: {}",
            json["message"].as_str().unwrap_or("")
        )));
    }
    Ok(())
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
