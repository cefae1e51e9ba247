//! A device's client config on the terminal, as `user add`, `user config` and `device add`
//! print it: the wg-quick text, its QR code (unless `--no-qr`), optionally a PNG of the code
//! (`--png FILE`), and a note when the private key is shown only this once.

use std::path::PathBuf;

use clap::Args;

use super::{
    Cli, CliError,
    output::{out, outln, print_json},
    qr,
};
use crate::service::domain::ClientConfig;

/// Where a client config goes besides standard output.
#[derive(Debug, Args)]
pub(super) struct ConfigOut {
    /// Also write the QR code as a PNG image.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// Do not print the QR code on the terminal.
    #[arg(long)]
    no_qr: bool,
}

/// Prints a config (and its QR code) and writes the PNG if asked.
pub(super) fn show(cli: &Cli, cfg: &ClientConfig, out: &ConfigOut) -> Result<(), CliError> {
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
        print_json(cfg)?;
        return Ok(());
    }
    out!("{}", cfg.wg_quick)?;
    if !out.no_qr {
        outln!()?;
        out!("{}", qr::terminal(&cfg.wg_quick)?)?;
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
