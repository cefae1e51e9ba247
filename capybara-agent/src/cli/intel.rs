//! `capybara ip-intel enable|disable|block-tor|block-vpn|unblock-tor|unblock-vpn|refresh|allow|
//! list`: IP intelligence on the uplink. Every command prints the switch and the lists (size,
//! source, age, next reload, last error, hits); `--json` prints them as JSON.

use std::path::PathBuf;

use capybara_proto::v1 as pb;
use clap::{Args, Subcommand};

use super::{
    Cli, CliError, connect,
    output::{out, outln, print_json, time},
    table::Table,
};
use crate::{
    blocklist::parse_cidrs,
    service::{
        core::now,
        domain::{ValidationError, parse_duration},
        intel::{Category, IntelStatus, MAX_REFRESH, MIN_REFRESH},
    },
};

/// `capybara ip-intel …`.
#[derive(Debug, Subcommand)]
pub(super) enum IntelCmd {
    /// Turn IP intelligence on: the tor and vpn lists that are on are enforced, and sources are
    /// scored by reputation.
    Enable,
    /// Turn IP intelligence off: the tor and vpn lists leave the kernel (they are kept) and
    /// reputation scoring stops.
    Disable,
    /// Block Tor exit relays: set the tor list's source (a file or a URL) and turn it on.
    BlockTor(BlockArgs),
    /// Block known VPN and proxy exits: set the vpn list's source and turn it on.
    BlockVpn(BlockArgs),
    /// Stop blocking Tor exits (the source and list are kept).
    UnblockTor,
    /// Stop blocking VPN exits (the source and list are kept).
    UnblockVpn,
    /// Reload a list from its source now.
    Refresh {
        /// `tor` or `vpn`.
        category: String,
    },
    /// Let these sources through every source list (tor, vpn, auto, geo, manual, …).
    Allow {
        /// CIDRs or addresses.
        #[arg(required = true)]
        cidrs: Vec<String>,
        /// Remove them from the allow list instead.
        #[arg(long)]
        remove: bool,
    },
    /// The switch and each list's size, source, age, next reload, last error and hits.
    List,
}

/// The options of `block-tor` and `block-vpn`.
#[derive(Debug, Args)]
pub(super) struct BlockArgs {
    /// A list file on the agent's machine (one IP or CIDR a line, `#`/`;` comments, the Tor
    /// bulk exit list or exit-addresses format); reloaded when it changes.
    #[arg(long, conflicts_with = "url")]
    file: Option<PathBuf>,
    /// An http(s) URL the agent fetches (e.g. https://check.torproject.org/torbulkexitlist).
    #[arg(long)]
    url: Option<String>,
    /// How often the source is reloaded (e.g. 1h, 30m; 1m..7d; default 1h).
    #[arg(long, value_name = "DURATION")]
    refresh: Option<String>,
    /// Let the URL resolve to a loopback or private address (a feed on the local network).
    #[arg(long)]
    allow_private: bool,
    /// Turn the category off instead (as unblock-tor / unblock-vpn).
    #[arg(long, conflicts_with_all = ["file", "url", "refresh", "allow_private"])]
    off: bool,
}

/// The `SetIntelSource` request of `block-…` for `category`.
fn block_request(category: Category, a: &BlockArgs) -> Result<pb::SetIntelSourceRequest, CliError> {
    let refresh_seconds = match &a.refresh {
        None => 0,
        Some(r) => {
            let d = parse_duration("refresh", r)?;
            if d < MIN_REFRESH || d > MAX_REFRESH {
                return Err(ValidationError::Value {
                    field: "refresh",
                    reason: format!("{r:?}: must be between 1m and 7d"),
                }
                .into());
            }
            u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
        }
    };
    let file = match &a.file {
        // The agent reads the file: a relative path is made absolute here.
        Some(f) => std::path::absolute(f)
            .map_err(CliError::file(f))?
            .display()
            .to_string(),
        None => String::new(),
    };
    Ok(pb::SetIntelSourceRequest {
        category: category.name().into(),
        on: !a.off,
        file,
        url: a.url.clone().unwrap_or_default(),
        refresh_seconds,
        allow_private: a.allow_private,
    })
}

fn off_request(category: Category) -> pb::SetIntelSourceRequest {
    pb::SetIntelSourceRequest {
        category: category.name().into(),
        on: false,
        ..Default::default()
    }
}

/// Runs `capybara ip-intel …`.
pub(super) async fn run(cli: &Cli, cmd: &IntelCmd) -> Result<(), CliError> {
    let status = match cmd {
        IntelCmd::List => connect(cli).await?.intel().await?,
        IntelCmd::Enable => connect(cli).await?.set_intel_enabled(true).await?,
        IntelCmd::Disable => connect(cli).await?.set_intel_enabled(false).await?,
        IntelCmd::BlockTor(a) => {
            let req = block_request(Category::Tor, a)?;
            connect(cli).await?.set_intel_source(req).await?
        }
        IntelCmd::BlockVpn(a) => {
            let req = block_request(Category::Vpn, a)?;
            connect(cli).await?.set_intel_source(req).await?
        }
        IntelCmd::UnblockTor => {
            connect(cli)
                .await?
                .set_intel_source(off_request(Category::Tor))
                .await?
        }
        IntelCmd::UnblockVpn => {
            connect(cli)
                .await?
                .set_intel_source(off_request(Category::Vpn))
                .await?
        }
        IntelCmd::Refresh { category } => {
            Category::parse("category", category)?;
            connect(cli).await?.refresh_intel_list(category).await?
        }
        IntelCmd::Allow { cidrs, remove } => {
            parse_cidrs(cidrs).map_err(|source| ValidationError::Blocklist {
                field: "cidrs",
                source,
            })?;
            connect(cli)
                .await?
                .change_intel_allow(cidrs.clone(), *remove)
                .await?
        }
    };
    if cli.json {
        print_json(&status)?;
        return Ok(());
    }
    print(&status)
}

/// `3m`, `2h`, `5d`: how long ago (or until) `secs` is from `now`.
fn span(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn print(s: &IntelStatus) -> Result<(), CliError> {
    let now = now();
    outln!(
        "ip-intel {}",
        if s.enabled { "enabled" } else { "disabled" }
    )?;
    let mut t = Table::new(&[
        "LIST",
        "STATE",
        "ENTRIES",
        "SOURCE",
        "AGE",
        "NEXT REFRESH",
        "HIT PKTS",
        "HIT BYTES",
        "LAST ERROR",
    ]);
    for l in &s.lists {
        let state = match (l.on, l.enforced) {
            (_, true) => "enforced",
            (true, false) => "on (ip-intel disabled)",
            (false, false) => "off",
        };
        let source = if l.source_kind.is_empty() {
            "-".to_owned()
        } else {
            format!("{} {}", l.source_kind, l.source)
        };
        t.row(vec![
            l.name.clone(),
            state.into(),
            l.entries.to_string(),
            source,
            if l.loaded_at == 0 {
                "-".into()
            } else {
                format!("{} ago", span(now.saturating_sub(l.loaded_at)))
            },
            if l.next_refresh == 0 {
                "-".into()
            } else {
                format!("in {}", span(l.next_refresh.saturating_sub(now)))
            },
            l.hits.packets.to_string(),
            l.hits.bytes.to_string(),
            if l.last_error.is_empty() {
                "-".into()
            } else {
                format!("{} ({})", l.last_error, time(l.last_error_at))
            },
        ]);
    }
    out!("{t}")?;
    for l in &s.lists {
        if l.on && l.source_kind.is_empty() && (l.name == "tor" || l.name == "vpn") {
            outln!(
                "note: the {0} list is empty until a source is given: ip-intel block-{0} --file FILE or --url URL",
                l.name
            )?;
        }
    }
    if !s.enabled && s.lists.iter().any(|l| l.on && !l.source_kind.is_empty()) {
        outln!(
            "note: IP intelligence is disabled: no list above is enforced until ip-intel enable"
        )?;
    }
    Ok(())
}
