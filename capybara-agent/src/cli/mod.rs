//! The `capybara` CLI: clap commands that talk gRPC to the agent, and the only code that prints
//! tables.
//!
//! - Talks to the control socket by default (root on the box needs no token); `--endpoint
//!   http://host:port --token capy_…` (or `CAPYBARA_TOKEN`) goes over TCP. A token goes over
//!   plain `http://` only to a loopback host (127.0.0.0/8, ::1, `localhost`): anywhere else it
//!   needs `https://` (`api::client`).
//! - Tables for people; `--json` prints the domain values as JSON for scripts.
//! - Exit codes: 0 success; **2** bad input (a clap usage error, a value that does not parse
//!   here, or the agent's `INVALID_ARGUMENT`), with a one-line reason on stderr; 1 anything
//!   else (agent unreachable, not found, permission denied…), also one line: the message and a
//!   hint, the gRPC code only with `--verbose` (`error`); 141 and nothing printed when standard
//!   output is a pipe whose reader has gone (`| head`; `output`).
//!
//! Input is parsed here into the same validated domain types the agent uses, so most bad input
//! is refused before a connection is made and with the same message the agent would give.
//!
//! Layout: this file holds the top-level parser, the dispatch to each command family and the
//! connection; each family has one file with its clap enum, its handler and its printing
//! (`user`, `device`, `api`, `stats`, `top`, `connections` with `kick`, `health`, `history`,
//! `backup`, `blocklist`, `geo`, `quota` with `quota template`, `group`, `policy`, `template`,
//! `diagnose`, `schedule`, `report`, `webhook`, `mfa`, `intel` (`ip-intel`); the hidden `generate` writes the man pages and completions
//! `cargo xtask install` installs). `scheduled` runs a command line in the agent for a scheduled
//! task (the same code, in-process, its output captured). What several families share is in
//! modules no family owns, so no family imports
//! another:
//! `error` (`CliError`, exit codes, the error line), `input` (checks of shared values), `output`
//! (standard output, `--json`, times, files written 0600), `table`, `limits` (the limit options
//! and a limits cell), `client_config` (a device's config with its QR code), `qr` and `live`
//! (the live views of `top` and `stats --watch`: terminal, frames, Ctrl-C).

mod api;
mod backup;
mod blocklist;
mod client_config;
mod cluster;
mod connections;
mod device;
mod diagnose;
mod error;
mod generate;
mod geo;
mod group;
mod health;
mod history;
mod input;
mod intel;
mod limits;
mod live;
mod mfa;
mod output;
mod policy;
mod qr;
mod quota;
mod report;
mod schedule;
pub mod scheduled;
mod stats;
mod table;
mod template;
mod top;
mod user;
mod webhook;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{
    api::client::{Client, Endpoint},
    paths,
};
use error::CliError;

/// Manage a Capybara WireGuard server.
#[derive(Debug, Parser)]
#[command(name = "capybara", version)]
pub struct Cli {
    /// The agent's control socket (used unless --endpoint is given).
    #[arg(long, global = true, default_value = paths::SOCKET_PATH, env = "CAPYBARA_SOCKET")]
    socket: PathBuf,
    /// The agent's TCP API, e.g. http://10.0.0.1:7443 (needs --token).
    #[arg(long, global = true, env = "CAPYBARA_ENDPOINT")]
    endpoint: Option<String>,
    /// CA certificate (PEM) to check an https:// endpoint with.
    #[arg(long, global = true, env = "CAPYBARA_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Bearer token for --endpoint.
    #[arg(long, global = true, env = "CAPYBARA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Name the gRPC code of a failed call in the error line.
    #[arg(long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Users and their devices.
    #[command(subcommand)]
    User(user::UserCmd),
    /// Devices (WireGuard peers) of a user.
    #[command(subcommand)]
    Device(device::DeviceCmd),
    /// API tokens.
    #[command(subcommand)]
    Api(api::ApiCmd),
    /// Bytes and packets each way and drops by reason, per device and user (--watch: live).
    Stats(stats::StatsArgs),
    /// A live view of the busiest users and devices, refreshed every second (Ctrl-C quits).
    Top(top::TopArgs),
    /// Devices the tunnel knows, with their connection id, endpoint and latest handshake.
    Connections(connections::ConnectionsArgs),
    /// End a user's sessions now, or one connection's (held at the gate until the next
    /// handshake).
    Kick(connections::KickArgs),
    /// Is the agent serving?
    Health,
    /// Session history, failed handshakes and the audit trail.
    #[command(subcommand)]
    History(history::HistoryCmd),
    /// Backups of the agent's store.
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// Named blocklists.
    #[command(subcommand)]
    Blocklist(blocklist::BlocklistCmd),
    /// Geo restrictions on who reaches the WireGuard port.
    #[command(subcommand)]
    Geo(geo::GeoCmd),
    /// Data quotas and limits of users (and the server default).
    #[command(subcommand)]
    Quota(quota::QuotaCmd),
    /// Groups of users and their policies.
    #[command(subcommand)]
    Group(group::GroupCmd),
    /// The effective policy of users.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Configuration templates: named server settings (built-ins strict, open, corporate,
    /// remote-worker, guest).
    #[command(subcommand)]
    Template(template::TemplateCmd),
    /// What an admin checks by hand: kernel features, the agent and its programs, the tunnel,
    /// the listen port, forwarding and NAT, MTU, clock, store and disk; one line each with a
    /// fix hint; exit 1 if any fails.
    Diagnose(diagnose::DiagnoseArgs),
    /// Write the man pages, shell completions and default agent.toml (for `cargo xtask
    /// install`).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
    /// Scheduled tasks: capybara commands the agent runs on a cron schedule.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCmd),
    /// Usage reports (text, JSON, CSV, html) from the agent's hourly usage rollups.
    #[command(subcommand)]
    Report(report::ReportCmd),
    /// Webhooks: endpoints that receive the agent's events, signed.
    #[command(subcommand)]
    Webhook(webhook::WebhookCmd),
    /// Multi-factor authentication of users (held at the kernel gate until a code admits the
    /// device).
    #[command(subcommand)]
    Mfa(mfa::MfaCmd),
    /// IP intelligence on the uplink: the switch, Tor and VPN lists from files or feeds, the
    /// allow list.
    #[command(name = "ip-intel", subcommand)]
    IpIntel(intel::IntelCmd),
    /// The etcd cluster this agent is a node of: its nodes, etcd's health.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
}

/// Runs the CLI with the process arguments.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // A usage error: its first line (clap adds usage and tips below), exit 2.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_closed_pipe() => ExitCode::from(e.exit_code()),
        Err(e) => {
            eprintln!("error: {}", e.one_line(&cli));
            ExitCode::from(e.exit_code())
        }
    }
}

/// A client for the agent the global options name (in a scheduled task's run: the agent's own
/// API, in-process; `scheduled`).
async fn connect(cli: &Cli) -> Result<Client, CliError> {
    if let Some(client) = scheduled::in_agent_client().await {
        return Ok(client?);
    }
    let endpoint = match &cli.endpoint {
        Some(url) => Endpoint::Tcp {
            url: url.clone(),
            token: cli.token.clone(),
            ca_cert: match &cli.ca_cert {
                Some(path) => Some(std::fs::read(path).map_err(CliError::file(path))?),
                None => None,
            },
        },
        None => Endpoint::Unix(cli.socket.clone()),
    };
    Ok(Client::connect(&endpoint).await?)
}

/// Runs the command's family.
async fn run(cli: &Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::User(cmd) => user::run(cli, cmd).await,
        Command::Device(cmd) => device::run(cli, cmd).await,
        Command::Api(cmd) => api::run(cli, cmd).await,
        Command::Stats(args) => stats::run(cli, args).await,
        Command::Top(args) => top::run(cli, args).await,
        Command::Connections(args) => connections::run(cli, args).await,
        Command::Kick(args) => connections::kick(cli, args).await,
        Command::Health => health::run(cli).await,
        Command::History(cmd) => history::run(cli, cmd).await,
        Command::Backup(cmd) => backup::run(cli, cmd).await,
        Command::Blocklist(cmd) => blocklist::run(cli, cmd).await,
        Command::Geo(cmd) => geo::run(cli, cmd).await,
        Command::Quota(cmd) => quota::run(cli, cmd).await,
        Command::Group(cmd) => group::run(cli, cmd).await,
        Command::Policy(cmd) => policy::run(cli, cmd).await,
        Command::Template(cmd) => template::run(cli, cmd).await,
        Command::Diagnose(args) => diagnose::run(cli, args).await,
        Command::Generate(args) => generate::run(args),
        Command::Schedule(cmd) => schedule::run(cli, cmd).await,
        Command::Report(cmd) => report::run(cli, cmd).await,
        Command::Webhook(cmd) => webhook::run(cli, cmd).await,
        Command::Mfa(cmd) => mfa::run(cli, cmd).await,
        Command::IpIntel(cmd) => intel::run(cli, cmd).await,
        Command::Cluster(cmd) => cluster::run(cli, cmd).await,
    }
}
