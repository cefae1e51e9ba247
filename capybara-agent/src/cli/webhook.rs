//! `capybara webhook …`: endpoints that receive the agent's events, signed the Standard
//! Webhooks way, and their deliveries.
//!
//! - `webhook add URL --event E [--event E…|--all] [--secret S] [--allow-private]`: the
//!   secret (`whsec_…`, made by the agent without `--secret`) is printed once; receivers
//!   verify each request's `webhook-signature` with it.
//! - `webhook list`, `show ID` (never the secret: its fingerprint), `delete ID`,
//!   `enable|disable ID`, `rotate-secret ID [--secret S]` (the old secret still signs for 24 h).
//! - `webhook test ID`: a `webhook.test` event through the outbox to that endpoint; prints its
//!   first attempt's result and exits 1 if it failed.
//! - `webhook deliveries ID [--failed]`: the newest deliveries (attempts, status code, error);
//!   with `--failed` the dead letters and those still retrying. `webhook retry DELIVERY` sends a
//!   dead letter again (same event id).
//!
//! URLs, events and secrets are checked here first, with the agent's own parsers.

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    output::{opt_time, outln, print_json, time},
    table::Table,
};
use crate::service::webhooks::{
    Delivery, DeliveryId, EventSet, Webhook, WebhookId, sign::Secret, ssrf,
};
use capybara_proto::v1 as pb;

/// `capybara webhook …`.
#[derive(Debug, Subcommand)]
pub(super) enum WebhookCmd {
    /// Add an endpoint; its signing secret is printed once.
    Add {
        /// Where events are POSTed (http:// or https://).
        url: String,
        /// An event to send (user-connect, user-disconnect, quota-warning, quota-exceeded,
        /// account-expired, server-down, server-up, suspicious-activity, config-changed);
        /// repeatable.
        #[arg(long = "event", value_name = "EVENT")]
        events: Vec<String>,
        /// Every event, present and future.
        #[arg(long, conflicts_with = "events")]
        all: bool,
        /// The signing secret (whsec_<base64 of 24-64 bytes>); default: a new one.
        #[arg(long)]
        secret: Option<String>,
        /// Allow loopback, private and link-local addresses (refused by default: SSRF).
        #[arg(long)]
        allow_private: bool,
    },
    /// Every endpoint.
    List,
    /// One endpoint (its secret's fingerprint, never the secret).
    Show {
        /// The webhook id.
        id: String,
    },
    /// Send a test event to an endpoint and print the result.
    Test {
        /// The webhook id.
        id: String,
    },
    /// Delete an endpoint and its deliveries.
    Delete {
        /// The webhook id.
        id: String,
    },
    /// Send events to an endpoint again (those raised from now on).
    Enable {
        /// The webhook id.
        id: String,
    },
    /// Stop sending events to an endpoint.
    Disable {
        /// The webhook id.
        id: String,
    },
    /// An endpoint's newest deliveries.
    Deliveries {
        /// The webhook id.
        id: String,
        /// Only dead letters and deliveries still retrying.
        #[arg(long)]
        failed: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Send a dead letter again (same event id).
    Retry {
        /// The delivery id (<webhook id>-<number>, from `webhook deliveries --failed`).
        delivery: String,
    },
    /// Replace an endpoint's signing secret (the old one still signs for 24 hours).
    RotateSecret {
        /// The webhook id.
        id: String,
        /// The new secret; default: a new one.
        #[arg(long)]
        secret: Option<String>,
    },
}

fn status(w: &Webhook) -> String {
    if w.enabled {
        "enabled".into()
    } else {
        format!(
            "disabled ({})",
            w.disabled_reason.as_deref().unwrap_or("no reason given")
        )
    }
}

fn ms_time(ms: u64) -> String {
    if ms == 0 { "-".into() } else { time(ms / 1000) }
}

fn print_hook(w: &Webhook) -> Result<(), CliError> {
    outln!("id          {}", w.id)?;
    outln!("url         {}", w.url)?;
    outln!("events      {}", w.events.names().join(","))?;
    outln!("status      {}", status(w))?;
    outln!(
        "private     {}",
        if w.allow_private {
            "allowed (--allow-private)"
        } else {
            "refused"
        }
    )?;
    outln!("created     {}", time(w.created_at))?;
    outln!("secret      {}", w.secret_fingerprint)?;
    if let Some(until) = w.previous_secret_until {
        outln!("previous    still signs until {}", time(until))?;
    }
    Ok(())
}

fn delivery_line(d: &Delivery) -> String {
    let code = d
        .status_code
        .map_or_else(String::new, |c| format!(", HTTP {c}"));
    let err = d
        .error
        .as_deref()
        .map_or_else(String::new, |e| format!(": {e}"));
    format!(
        "delivery {} ({} {}): {} after {} attempt{}{code}{err}",
        d.id,
        d.event,
        d.event_id,
        d.status.as_str(),
        d.attempts,
        if d.attempts == 1 { "" } else { "s" }
    )
}

/// Runs `capybara webhook …`.
pub(super) async fn run(cli: &Cli, cmd: &WebhookCmd) -> Result<(), CliError> {
    match cmd {
        WebhookCmd::Add {
            url,
            events,
            all,
            secret,
            allow_private,
        } => {
            ssrf::parse_url(url)?;
            EventSet::parse(events, *all)?;
            if let Some(s) = secret {
                Secret::parse("secret", s)?;
            }
            let (w, secret) = connect(cli)
                .await?
                .add_webhook(pb::AddWebhookRequest {
                    url: url.clone(),
                    events: events.clone(),
                    all: *all,
                    secret: secret.clone().unwrap_or_default(),
                    allow_private: *allow_private,
                })
                .await?;
            if cli.json {
                print_json(&serde_json::json!({ "webhook": w, "secret": secret }))?;
            } else {
                outln!(
                    "webhook {} added: {} on {}",
                    w.id,
                    w.url,
                    w.events.names().join(",")
                )?;
                outln!("secret {secret} (shown once: receivers verify signatures with it)")?;
            }
            Ok(())
        }
        WebhookCmd::List => {
            let hooks = connect(cli).await?.list_webhooks().await?;
            if cli.json {
                return print_json(&hooks);
            }
            let mut t = Table::new(&["ID", "URL", "EVENTS", "STATUS", "CREATED"]);
            for w in &hooks {
                t.row(vec![
                    w.id.to_string(),
                    w.url.clone(),
                    w.events.names().join(","),
                    status(w),
                    time(w.created_at),
                ]);
            }
            super::output::out!("{t}")?;
            Ok(())
        }
        WebhookCmd::Show { id } => {
            WebhookId::parse("id", id)?;
            let w = connect(cli).await?.get_webhook(id).await?;
            if cli.json {
                return print_json(&w);
            }
            print_hook(&w)
        }
        WebhookCmd::Test { id } => {
            WebhookId::parse("id", id)?;
            let (d, queued) = connect(cli).await?.test_webhook(id).await?;
            if cli.json {
                print_json(&serde_json::json!({ "delivery": d, "queued": queued }))?;
            } else if queued {
                outln!(
                    "delivery {} queued: events ahead of it are still being delivered (see webhook deliveries {id})",
                    d.id
                )?;
            } else {
                outln!("{}", delivery_line(&d))?;
            }
            match d.status {
                crate::service::webhooks::DeliveryStatus::Delivered => Ok(()),
                _ if queued => Ok(()),
                _ => Err(CliError::Agent(format!(
                    "the test event was not delivered (the agent retries it: webhook deliveries {id})"
                ))),
            }
        }
        WebhookCmd::Delete { id } => {
            WebhookId::parse("id", id)?;
            let w = connect(cli).await?.delete_webhook(id).await?;
            if cli.json {
                return print_json(&w);
            }
            outln!("deleted webhook {} ({})", w.id, w.url)
        }
        WebhookCmd::Enable { id } | WebhookCmd::Disable { id } => {
            WebhookId::parse("id", id)?;
            let on = matches!(cmd, WebhookCmd::Enable { .. });
            let w = connect(cli).await?.set_webhook_enabled(id, on).await?;
            if cli.json {
                return print_json(&w);
            }
            outln!("webhook {}: {}", w.id, status(&w))
        }
        WebhookCmd::Deliveries { id, failed, limit } => {
            WebhookId::parse("id", id)?;
            let list = connect(cli)
                .await?
                .list_deliveries(id, *failed, *limit)
                .await?;
            if cli.json {
                return print_json(&list);
            }
            let mut t = Table::new(&[
                "DELIVERY", "EVENT", "EVENT ID", "STATUS", "ATTEMPTS", "CODE", "LAST", "NEXT",
                "ERROR",
            ]);
            for d in &list {
                t.row(vec![
                    d.id.clone(),
                    d.event.to_string(),
                    d.event_id.clone(),
                    d.status.as_str().into(),
                    d.attempts.to_string(),
                    d.status_code.map_or_else(|| "-".into(), |c| c.to_string()),
                    ms_time(d.last_attempt_ms),
                    opt_time(d.next_attempt_ms.map(|m| m / 1000)),
                    d.error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            super::output::out!("{t}")?;
            Ok(())
        }
        WebhookCmd::Retry { delivery } => {
            DeliveryId::parse("delivery", delivery)?;
            let new = connect(cli).await?.retry_delivery(delivery).await?;
            if cli.json {
                return print_json(&serde_json::json!({ "delivery": new }));
            }
            outln!("delivery {delivery} sent again as {new}")
        }
        WebhookCmd::RotateSecret { id, secret } => {
            WebhookId::parse("id", id)?;
            if let Some(s) = secret {
                Secret::parse("secret", s)?;
            }
            let (w, secret) = connect(cli)
                .await?
                .rotate_webhook_secret(id, secret.as_deref().unwrap_or(""))
                .await?;
            if cli.json {
                return print_json(&serde_json::json!({ "webhook": w, "secret": secret }));
            }
            outln!(
                "webhook {}: new secret {} (shown once); the previous one still signs until {}",
                w.id,
                secret,
                opt_time(w.previous_secret_until)
            )
        }
    }
}
