//! A device's client config on the terminal, as `user add`, `user config` and `device add`
//! print it: the wg-quick text, its QR code (unless `--no-qr`), optionally a PNG of the code
//! (`--png FILE`), and a note when the private key is shown only this once.
//!
//! A proxy identity's (`user add --protocol`, `user protocol add`, `user config --protocol`):
//! the URI clients import (`ss://`, `vless://`), then the JSON config (`ss-local`'s, v2ray's),
//! the QR code of the URI, optionally its PNG. When `user add` prints several configs, the
//! PNG of each but the first is written beside FILE with the protocol in its name
//! (`alice.png`, `alice-shadowsocks.png`).

use std::path::PathBuf;

use clap::Args;

use super::{
    Cli, CliError,
    output::{out, outln, print_json},
    qr,
};
use crate::service::{domain::ClientConfig, proxies::ProxyClientConfig};

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

/// Writes the QR code of `text` as a PNG to `path`.
fn png(text: &str, path: &std::path::Path) -> Result<(), CliError> {
    qr::write_png(text, path).map_err(|e| match e {
        qr::QrFileError::Qr(q) => CliError::Qr(q),
        qr::QrFileError::Io(source) => CliError::File {
            path: path.to_owned(),
            source,
        },
    })
}

/// `path` with `-<suffix>` before its extension.
pub(super) fn beside(path: &std::path::Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{suffix}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{suffix}"),
    };
    path.with_file_name(name)
}

impl ConfigOut {
    /// The same output with the PNG beside this one's, named for `suffix` (empty: the same
    /// PNG).
    pub(super) fn beside(&self, suffix: &str) -> ConfigOut {
        ConfigOut {
            png: self.png.as_deref().map(|p| {
                if suffix.is_empty() {
                    p.to_owned()
                } else {
                    beside(p, suffix)
                }
            }),
            no_qr: self.no_qr,
        }
    }
}

/// Prints a proxy identity's config (the URI, the JSON, the URI's QR code) and writes the PNG
/// if asked.
pub(super) fn show_proxy(
    cli: &Cli,
    cfg: &ProxyClientConfig,
    out: &ConfigOut,
) -> Result<(), CliError> {
    if let Some(path) = &out.png {
        png(&cfg.uri, path)?;
    }
    if cli.json {
        print_json(cfg)?;
        return Ok(());
    }
    outln!("{}", cfg.uri)?;
    outln!()?;
    outln!("{}", cfg.json)?;
    if !out.no_qr {
        outln!()?;
        out!("{}", qr::terminal(&cfg.uri)?)?;
    }
    if let Some(p) = &out.png {
        eprintln!("QR code written to {}", p.display());
    }
    Ok(())
}

/// Prints a config (and its QR code) and writes the PNG if asked.
pub(super) fn show(cli: &Cli, cfg: &ClientConfig, out: &ConfigOut) -> Result<(), CliError> {
    if let Some(path) = &out.png {
        png(&cfg.wg_quick, path)?;
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
