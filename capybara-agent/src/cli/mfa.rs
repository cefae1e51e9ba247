//! `capybara mfa enable|confirm|disable|reset|status|require-all`: multi-factor authentication
//! of users. `enable` and `reset` show the secret once (the `otpauth://` URI, a terminal QR code,
//! `--png FILE`) and ten single-use backup codes; the agent keeps neither in clear.

use std::path::PathBuf;

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    output::{out, outln, print_json, time},
    qr,
    table::Table,
};
use crate::service::{
    domain::UserName,
    mfa::{Enrolment, MfaOverview, MfaStatus},
};

/// Where the secret goes besides the terminal.
#[derive(Debug, clap::Args)]
pub(super) struct SecretOut {
    /// Also write the QR code as a PNG image.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// Do not print the QR code on the terminal.
    #[arg(long)]
    no_qr: bool,
}

/// `capybara mfa …`.
#[derive(Debug, Subcommand)]
pub(super) enum MfaCmd {
    /// Start a user's enrolment: shows the authenticator secret (URI and QR code) and ten
    /// backup codes once. MFA is on once a code confirms it (`mfa confirm`, or the page).
    Enable {
        /// The user.
        user: String,
        /// Where one-time codes by e-mail go.
        #[arg(long, value_name = "ADDR")]
        email: Option<String>,
        /// Where one-time codes by SMS go (E.164, e.g. +4915112345678).
        #[arg(long, value_name = "NUMBER")]
        sms: Option<String>,
        #[command(flatten)]
        out: SecretOut,
    },
    /// Confirm a pending enrolment with the 6 digits the app shows.
    Confirm {
        /// The user.
        user: String,
        /// The code.
        code: String,
    },
    /// Remove a user's MFA (secret and backup codes).
    Disable {
        /// The user.
        user: String,
    },
    /// A new secret and new backup codes (the old ones stop working); pending until confirmed.
    Reset {
        /// The user.
        user: String,
        #[command(flatten)]
        out: SecretOut,
    },
    /// Users with MFA: enrolled or pending, last verified, backup codes left, devices admitted.
    Status {
        /// Only this user.
        user: Option<String>,
    },
    /// Every user must use MFA: users without it are held until they enrol on the page.
    RequireAll {
        /// Only enrolled users need MFA again.
        #[arg(long)]
        off: bool,
    },
}

/// Runs `capybara mfa …`.
pub(super) async fn run(cli: &Cli, cmd: &MfaCmd) -> Result<(), CliError> {
    let user = |u: &str| UserName::parse("user", u).map(|u| u.to_string());
    match cmd {
        MfaCmd::Enable {
            user: u,
            email,
            sms,
            out,
        } => {
            let u = user(u)?;
            let e = connect(cli)
                .await?
                .mfa_enable(&u, email.clone(), sms.clone())
                .await?;
            show_secret(cli, &e, out)
        }
        MfaCmd::Reset { user: u, out } => {
            let u = user(u)?;
            let e = connect(cli).await?.mfa_reset(&u).await?;
            show_secret(cli, &e, out)
        }
        MfaCmd::Confirm { user: u, code } => {
            let u = user(u)?;
            let s = connect(cli).await?.mfa_confirm(&u, code).await?;
            show_user(cli, &s)
        }
        MfaCmd::Disable { user: u } => {
            let u = user(u)?;
            let s = connect(cli).await?.mfa_disable(&u).await?;
            show_user(cli, &s)
        }
        MfaCmd::Status { user: u } => {
            let u = u.as_deref().map(user).transpose()?.unwrap_or_default();
            let o = connect(cli).await?.mfa_status(&u).await?;
            show_overview(cli, &o)
        }
        MfaCmd::RequireAll { off } => {
            let o = connect(cli).await?.mfa_require_all(!off).await?;
            show_overview(cli, &o)
        }
    }
}

fn show_secret(cli: &Cli, e: &Enrolment, out: &SecretOut) -> Result<(), CliError> {
    if let Some(path) = &out.png {
        qr::write_png(&e.uri, path).map_err(|err| match err {
            qr::QrFileError::Qr(q) => CliError::Qr(q),
            qr::QrFileError::Io(source) => CliError::File {
                path: path.clone(),
                source,
            },
        })?;
    }
    if cli.json {
        print_json(&serde_json::json!({
            "user": e.user,
            "state": "pending",
            "uri": e.uri,
            "backup_codes": e.backup_codes,
        }))?;
        return Ok(());
    }
    outln!(
        "mfa {}: enrolment pending; MFA is on once a code confirms it (`capybara mfa confirm {} CODE`, or the verification page)",
        e.user,
        e.user
    )?;
    outln!("{}", e.uri)?;
    if !out.no_qr {
        out!("{}", qr::terminal(&e.uri)?)?;
    }
    outln!("backup codes (each works once):")?;
    for c in &e.backup_codes {
        outln!("  {c}")?;
    }
    eprintln!(
        "note: the secret and the backup codes are shown this once; the agent keeps neither in clear"
    );
    Ok(())
}

fn when(t: Option<u64>) -> String {
    t.map_or_else(|| "-".to_owned(), time)
}

fn show_user(cli: &Cli, s: &MfaStatus) -> Result<(), CliError> {
    if cli.json {
        print_json(s)?;
        return Ok(());
    }
    outln!(
        "mfa {}: {}{}",
        s.user,
        s.state,
        if s.required {
            " (devices held until a code admits them)"
        } else {
            ""
        }
    )?;
    Ok(())
}

fn show_overview(cli: &Cli, o: &MfaOverview) -> Result<(), CliError> {
    if cli.json {
        print_json(o)?;
        return Ok(());
    }
    outln!(
        "mfa require-all: {}",
        if o.require_all { "on" } else { "off" }
    )?;
    let mut t = Table::new(&[
        "USER",
        "STATE",
        "HELD",
        "LAST VERIFIED",
        "BACKUP CODES",
        "ADMITTED (UNTIL)",
    ]);
    for s in &o.users {
        let devices = s
            .devices
            .iter()
            .map(|d| format!("{} ({})", d.device, time(d.until)))
            .collect::<Vec<_>>()
            .join(", ");
        let state = match &s.error {
            Some(_) => format!("{} (secret does not open)", s.state),
            None => s.state.clone(),
        };
        t.row(vec![
            s.user.clone(),
            state,
            if s.required { "yes" } else { "no" }.to_owned(),
            when(s.last_verified),
            s.backup_codes_left.to_string(),
            if devices.is_empty() {
                "-".to_owned()
            } else {
                devices
            },
        ]);
    }
    out!("{t}")?;
    for s in &o.users {
        if let Some(e) = &s.error {
            eprintln!("{}: {e}", s.user);
        }
    }
    Ok(())
}
