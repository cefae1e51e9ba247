//! The `capybara` CLI: clap commands that talk gRPC to the agent, and the only code that prints
//! tables.
//!
//! - Talks to the control socket by default (root on the box needs no token); `--endpoint
//!   http://host:port --token capy_…` (or `CAPYBARA_TOKEN`) goes over TCP.
//! - Tables for people; `--json` prints the domain values as JSON for scripts.
//! - Exit codes: 0 success; **2** bad input (a clap usage error, a value that does not parse
//!   here, or the agent's `INVALID_ARGUMENT`), with a one-line reason on stderr; 1 anything
//!   else (agent unreachable, not found, permission denied…), also one line.
//!
//! Input is parsed here into the same validated domain types the agent uses, so most bad input
//! is refused before a connection is made and with the same message the agent would give.

mod history;
mod policy;
mod qr;
mod table;
mod templates;

use std::{path::PathBuf, process::ExitCode, time::SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::{
    api::client::{Client, ClientError, Endpoint, is_bad_input},
    blocklist::Direction,
    paths,
    service::domain::{
        ClientConfig, DeviceName, Scope, TokenId, UserName, ValidationError, parse_duration,
        unix_secs,
    },
};
use history::{BackupCmd, HistoryCmd};
use table::Table;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Users and their devices.
    #[command(subcommand)]
    User(UserCmd),
    /// Devices (WireGuard peers) of a user.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// API tokens.
    #[command(subcommand)]
    Api(ApiCmd),
    /// Bytes and packets each way and drops by reason, per device and user.
    Stats {
        /// Only this user.
        user: Option<String>,
    },
    /// Devices the tunnel knows, with endpoint and latest handshake.
    Connections,
    /// End a user's sessions now (held at the gate until the next handshake).
    Kick {
        /// The user.
        user: String,
    },
    /// Is the agent serving?
    Health,
    /// Session history, failed handshakes and the audit trail.
    #[command(subcommand)]
    History(HistoryCmd),
    /// Backups of the agent's store.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Named blocklists.
    #[command(subcommand)]
    Blocklist(BlocklistCmd),
    /// Geo restrictions on who reaches the WireGuard port.
    #[command(subcommand)]
    Geo(GeoCmd),
    /// Data quotas and limits of users (and the server default).
    #[command(subcommand)]
    Quota(policy::QuotaCmd),
    /// Groups of users and their policies.
    #[command(subcommand)]
    Group(policy::GroupCmd),
    /// The effective policy of users.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Configuration templates: named server settings (built-ins strict, open, corporate,
    /// remote-worker, guest).
    #[command(subcommand)]
    Template(templates::TemplateCmd),
}

#[derive(Debug, Subcommand)]
enum GeoCmd {
    /// Drop sources in these countries.
    Block {
        /// ISO 3166-1 alpha-2 codes, e.g. CN RU.
        #[arg(required = true)]
        countries: Vec<String>,
    },
    /// Drop sources outside these countries.
    Allow {
        /// ISO 3166-1 alpha-2 codes, e.g. US CA GB.
        #[arg(required = true)]
        countries: Vec<String>,
    },
    /// No geo restrictions.
    Off,
    /// The policy and its lists with their hits.
    List,
}

#[derive(Debug, Subcommand)]
enum UserCmd {
    /// Create a user with its first device; prints the device's config and QR code (shown once).
    Add {
        /// The user name: a-z, 0-9, '.', '_', '-'.
        name: String,
        /// Name of the first device.
        #[arg(long, default_value = "default")]
        device: String,
        /// Account expiry from now, e.g. 30d.
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        out: ConfigOut,
    },
    /// Every user.
    List,
    /// One user with its devices.
    Show {
        /// The user.
        name: String,
    },
    /// Remove a user and every device.
    Remove {
        /// The user.
        name: String,
    },
    /// A device's wg-quick config and QR code.
    Config {
        /// The user.
        name: String,
        /// The device (needed when the user has several).
        #[arg(long)]
        device: Option<String>,
        /// Make a new key pair for the device (the old one stops working).
        #[arg(long)]
        rotate: bool,
        #[command(flatten)]
        out: ConfigOut,
    },
}

#[derive(Debug, Args)]
struct ConfigOut {
    /// Also write the QR code as a PNG image.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// Do not print the QR code on the terminal.
    #[arg(long)]
    no_qr: bool,
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Add a device to a user; prints its config and QR code (shown once).
    Add {
        /// The user.
        user: String,
        /// The device name.
        device: String,
        #[command(flatten)]
        out: ConfigOut,
    },
    /// Remove a device.
    Remove {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
}

#[derive(Debug, Subcommand)]
enum ApiCmd {
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        /// read, write or admin.
        #[arg(long)]
        scope: String,
        /// Expiry from now, e.g. 30d.
        #[arg(long)]
        expires: Option<String>,
        /// A label.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Every token (never their secrets).
    List,
    /// Revoke a token.
    Revoke {
        /// The token id.
        id: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Dir {
    /// Sources reaching the WireGuard port (XDP guard).
    Source,
    /// Destinations of tunnel traffic.
    Destination,
}

impl From<Dir> for Direction {
    fn from(d: Dir) -> Direction {
        match d {
            Dir::Source => Direction::Source,
            Dir::Destination => Direction::Destination,
        }
    }
}

#[derive(Debug, Subcommand)]
enum BlocklistCmd {
    /// Every list with its size and hits.
    List,
    /// Add CIDRs to a list (creating it).
    Add {
        /// The list.
        name: String,
        /// CIDRs or addresses.
        #[arg(required = true)]
        cidrs: Vec<String>,
        /// Where the list applies.
        #[arg(long, value_enum, default_value = "source")]
        direction: Dir,
    },
    /// Remove CIDRs from a list.
    Remove {
        /// The list.
        name: String,
        /// CIDRs or addresses.
        #[arg(required = true)]
        cidrs: Vec<String>,
        /// Where the list applies.
        #[arg(long, value_enum, default_value = "source")]
        direction: Dir,
    },
    /// Delete a list.
    Delete {
        /// The list.
        name: String,
        /// Where the list applies.
        #[arg(long, value_enum, default_value = "source")]
        direction: Dir,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// Bad input caught here.
    #[error(transparent)]
    Input(#[from] ValidationError),
    /// The call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local file could not be written.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The QR code could not be made.
    #[error("QR code: {0}")]
    Qr(#[from] qrcode::types::QrError),
    /// A backup could not be restored.
    #[error(transparent)]
    Backup(#[from] crate::store::backup::BackupError),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Client(e) if is_bad_input(e) => 2,
            CliError::Backup(e) if !matches!(e, crate::store::backup::BackupError::Store(_)) => 2,
            _ => 1,
        }
    }
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &CliError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s.replace('\n', " ")
}

fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("domain values serialise")
    );
}

fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(crate::service::domain::from_unix_secs(secs)).to_string()
}

fn opt_time(secs: Option<u64>) -> String {
    secs.map_or_else(|| "-".to_owned(), time)
}

fn expiry(field: &'static str, s: Option<&str>) -> Result<Option<u64>, ValidationError> {
    s.map(|s| parse_duration(field, s).map(|d| d.as_secs()))
        .transpose()
}

async fn connect(cli: &Cli) -> Result<Client, CliError> {
    let endpoint = match &cli.endpoint {
        Some(url) => Endpoint::Tcp {
            url: url.clone(),
            token: cli.token.clone(),
            ca_cert: match &cli.ca_cert {
                Some(path) => Some(std::fs::read(path).map_err(|source| CliError::File {
                    path: path.clone(),
                    source,
                })?),
                None => None,
            },
        },
        None => Endpoint::Unix(cli.socket.clone()),
    };
    Ok(Client::connect(&endpoint).await?)
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::User(cmd) => user(&cli, cmd).await,
        Command::Device(cmd) => device(&cli, cmd).await,
        Command::Api(ApiCmd::Token(cmd)) => token(&cli, cmd).await,
        Command::Quota(cmd) => policy::quota(&cli, cmd).await,
        Command::Group(cmd) => policy::group(&cli, cmd).await,
        Command::Policy(cmd) => policy::policy(&cli, cmd).await,
        Command::Template(cmd) => templates::template(&cli, cmd).await,
        Command::Stats { user } => {
            if let Some(u) = user {
                UserName::parse("user", u)?;
            }
            let st = connect(&cli)
                .await?
                .stats(user.as_deref().unwrap_or(""))
                .await?;
            if cli.json {
                print_json(&st);
                return Ok(());
            }
            let mut t = Table::new(&[
                "USER", "DEVICE", "RX BYTES", "RX PKTS", "TX BYTES", "TX PKTS", "DROPS",
            ]);
            for p in &st.peers {
                let drops: Vec<String> = p
                    .stats
                    .drops
                    .iter()
                    .map(|(r, n)| format!("{r}={n}"))
                    .collect();
                t.row(vec![
                    p.peer.user.to_string(),
                    p.peer.device.to_string(),
                    p.stats.rx.bytes.to_string(),
                    p.stats.rx.packets.to_string(),
                    p.stats.tx.bytes.to_string(),
                    p.stats.tx.packets.to_string(),
                    if drops.is_empty() {
                        "-".into()
                    } else {
                        drops.join(",")
                    },
                ]);
            }
            print!("{t}");
            if !st.drops.is_empty() {
                println!();
                let mut d = Table::new(&["DROP REASON", "PACKETS"]);
                for (r, n) in &st.drops {
                    d.row(vec![r.clone(), n.to_string()]);
                }
                print!("{d}");
            }
            Ok(())
        }
        Command::Connections => {
            let c = connect(&cli).await?.connections().await?;
            if cli.json {
                print_json(&c);
                return Ok(());
            }
            let mut t = Table::new(&[
                "USER",
                "DEVICE",
                "ADDRESS",
                "ENDPOINT",
                "HANDSHAKE",
                "RX",
                "TX",
            ]);
            for c in &c {
                t.row(vec![
                    c.peer.user.to_string(),
                    c.peer.device.to_string(),
                    c.peer.ipv4.to_string(),
                    c.endpoint.clone().unwrap_or_else(|| "-".into()),
                    opt_time(c.last_handshake),
                    c.rx_bytes.to_string(),
                    c.tx_bytes.to_string(),
                ]);
            }
            print!("{t}");
            Ok(())
        }
        Command::Kick { user } => {
            UserName::parse("user", user)?;
            let peers = connect(&cli).await?.kick(user).await?;
            if cli.json {
                print_json(&peers);
            } else {
                println!("kicked {user}: {} device(s)", peers.len());
            }
            Ok(())
        }
        Command::Health => history::health(&cli).await,
        Command::History(cmd) => history::history(&cli, cmd).await,
        Command::Backup(cmd) => history::backup(&cli, cmd).await,
        Command::Blocklist(cmd) => blocklist(&cli, cmd).await,
        Command::Geo(cmd) => geo(&cli, cmd).await,
    }
}

async fn geo(cli: &Cli, cmd: &GeoCmd) -> Result<(), CliError> {
    let status = match cmd {
        GeoCmd::List => connect(cli).await?.geo().await?,
        GeoCmd::Off => connect(cli).await?.set_geo("off", Vec::new()).await?,
        GeoCmd::Block { countries } | GeoCmd::Allow { countries } => {
            for c in countries {
                crate::service::domain::country("countries", c)?;
            }
            let mode = if matches!(cmd, GeoCmd::Block { .. }) {
                "block"
            } else {
                "allow"
            };
            connect(cli).await?.set_geo(mode, countries.clone()).await?
        }
    };
    if cli.json {
        print_json(&status);
        return Ok(());
    }
    println!("geo {} {}", status.mode, status.countries.join(" "));
    let mut t = Table::new(&["LIST", "ENTRIES", "HIT PKTS", "HIT BYTES"]);
    for l in &status.lists {
        t.row(vec![
            l.name.clone(),
            l.cidrs.len().to_string(),
            l.hits.packets.to_string(),
            l.hits.bytes.to_string(),
        ]);
    }
    print!("{t}");
    Ok(())
}

async fn user(cli: &Cli, cmd: &UserCmd) -> Result<(), CliError> {
    match cmd {
        UserCmd::Add {
            name,
            device,
            expires,
            out,
        } => {
            UserName::parse("name", name)?;
            DeviceName::parse("device", device)?;
            let expires_at = expiry("expires", expires.as_deref())?
                .map_or(0, |d| (unix_secs(SystemTime::now()) + d) as i64);
            let (_, cfg) = connect(cli)
                .await?
                .add_user(name, device, expires_at)
                .await?;
            show_config(cli, &cfg, out)
        }
        UserCmd::List => {
            let users = connect(cli).await?.list_users().await?;
            if cli.json {
                print_json(&users);
                return Ok(());
            }
            let mut t = Table::new(&["USER", "DEVICES", "CREATED", "EXPIRES"]);
            for u in &users {
                t.row(vec![
                    u.user.name.to_string(),
                    u.peers.len().to_string(),
                    time(u.user.created_at),
                    opt_time(u.user.expires_at),
                ]);
            }
            print!("{t}");
            Ok(())
        }
        UserCmd::Show { name } => {
            UserName::parse("name", name)?;
            let u = connect(cli).await?.get_user(name).await?;
            if cli.json {
                print_json(&u);
                return Ok(());
            }
            println!("user     {}", u.user.name);
            println!("created  {}", time(u.user.created_at));
            println!("expires  {}", opt_time(u.user.expires_at));
            println!();
            let mut t = Table::new(&["ID", "DEVICE", "IPV4", "IPV6", "PUBLIC KEY", "KEY KEPT"]);
            for p in &u.peers {
                t.row(vec![
                    p.id.to_string(),
                    p.device.to_string(),
                    p.ipv4.to_string(),
                    p.ipv6.to_string(),
                    p.public_key.to_string(),
                    if p.key_kept { "yes" } else { "no" }.into(),
                ]);
            }
            print!("{t}");
            Ok(())
        }
        UserCmd::Remove { name } => {
            UserName::parse("name", name)?;
            let u = connect(cli).await?.remove_user(name).await?;
            if cli.json {
                print_json(&u);
            } else {
                println!("removed {} and {} device(s)", u.user.name, u.peers.len());
            }
            Ok(())
        }
        UserCmd::Config {
            name,
            device,
            rotate,
            out,
        } => {
            UserName::parse("name", name)?;
            if let Some(d) = device {
                DeviceName::parse("device", d)?;
            }
            let cfg = connect(cli)
                .await?
                .user_config(name, device.as_deref().unwrap_or(""), *rotate)
                .await?;
            show_config(cli, &cfg, out)
        }
    }
}

async fn device(cli: &Cli, cmd: &DeviceCmd) -> Result<(), CliError> {
    match cmd {
        DeviceCmd::Add { user, device, out } => {
            UserName::parse("user", user)?;
            DeviceName::parse("device", device)?;
            let cfg = connect(cli).await?.add_peer(user, device).await?;
            show_config(cli, &cfg, out)
        }
        DeviceCmd::Remove { user, device } => {
            UserName::parse("user", user)?;
            DeviceName::parse("device", device)?;
            let p = connect(cli).await?.remove_peer(user, device).await?;
            if cli.json {
                print_json(&p);
            } else {
                println!("removed {}/{}", p.user, p.device);
            }
            Ok(())
        }
    }
}

/// Prints a config (and its QR code) and writes the PNG if asked.
fn show_config(cli: &Cli, cfg: &ClientConfig, out: &ConfigOut) -> Result<(), CliError> {
    if let Some(path) = &out.png {
        qr::write_png(&cfg.wg_quick, path).map_err(|e| match e {
            qr::QrFileError::Qr(q) => CliError::Qr(q),
            qr::QrFileError::Io(source) => CliError::File {
                path: path.clone(),
                source,
            },
        })?;
    }
    if cli.json {
        print_json(cfg);
        return Ok(());
    }
    print!("{}", cfg.wg_quick);
    if !out.no_qr {
        println!();
        print!("{}", qr::terminal(&cfg.wg_quick)?);
    }
    if cfg.private_key.is_some() && !cfg.peer.key_kept {
        eprintln!(
            "note: the private key is shown this once and not kept by the agent; save the config now"
        );
    }
    if let Some(p) = &out.png {
        eprintln!("QR code written to {}", p.display());
    }
    Ok(())
}

async fn token(cli: &Cli, cmd: &TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create {
            scope,
            expires,
            name,
        } => {
            let scope = Scope::parse("scope", scope)?;
            let expires = expiry("expires", expires.as_deref())?.unwrap_or(0);
            let (t, secret) = connect(cli)
                .await?
                .create_token(scope, name, expires)
                .await?;
            if cli.json {
                print_json(&serde_json::json!({ "token": t, "secret": secret }));
            } else {
                println!("{secret}");
                eprintln!(
                    "token {} (scope {}, expires {}): the secret above is shown once",
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
                print_json(&tokens);
                return Ok(());
            }
            let mut t = Table::new(&["ID", "NAME", "SCOPE", "CREATED", "EXPIRES", "REVOKED"]);
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
                ]);
            }
            print!("{t}");
            Ok(())
        }
        TokenCmd::Revoke { id } => {
            TokenId::parse("id", id)?;
            let t = connect(cli).await?.revoke_token(id).await?;
            if cli.json {
                print_json(&t);
            } else {
                println!("revoked {}", t.id);
            }
            Ok(())
        }
    }
}

async fn blocklist(cli: &Cli, cmd: &BlocklistCmd) -> Result<(), CliError> {
    match cmd {
        BlocklistCmd::List => {
            let lists = connect(cli).await?.blocklists().await?;
            if cli.json {
                print_json(&lists);
                return Ok(());
            }
            let mut t = Table::new(&["DIRECTION", "NAME", "ENTRIES", "HIT PKTS", "HIT BYTES"]);
            for l in &lists {
                t.row(vec![
                    l.direction.to_string(),
                    l.name.clone(),
                    l.cidrs.len().to_string(),
                    l.hits.packets.to_string(),
                    l.hits.bytes.to_string(),
                ]);
            }
            print!("{t}");
            Ok(())
        }
        BlocklistCmd::Add {
            name,
            cidrs,
            direction,
        }
        | BlocklistCmd::Remove {
            name,
            cidrs,
            direction,
        } => {
            let add = matches!(cmd, BlocklistCmd::Add { .. });
            crate::api::lists::cidrs("cidrs", cidrs)?;
            crate::api::lists::list_name("name", name)?;
            let l = connect(cli)
                .await?
                .change_entries((*direction).into(), name, cidrs.clone(), add)
                .await?;
            if cli.json {
                print_json(&l);
            } else {
                println!("{} {}: {} entries", l.direction, l.name, l.cidrs.len());
            }
            Ok(())
        }
        BlocklistCmd::Delete { name, direction } => {
            crate::api::lists::list_name("name", name)?;
            connect(cli)
                .await?
                .delete_blocklist((*direction).into(), name)
                .await?;
            if !cli.json {
                println!("deleted {name}");
            }
            Ok(())
        }
    }
}
