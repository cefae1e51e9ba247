//! `capybara template save|list|show|apply|export|import|delete`: configuration templates,
//! named server settings (the default limits, DNS, destination blocklists, listen port,
//! security, log level); the built-ins `strict`, `open`, `corporate`, `remote-worker` and
//! `guest` can be saved over (the saved one is used until deleted). Names and YAML files are validated here with the agent's own parsers
//! (exit 2 naming the field or line) before a connection is made.

use std::path::PathBuf;

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    input::read_text,
    limits::limits_line,
    output::{out, outln, print_json},
    table::Table,
};
use crate::service::{
    domain::ValidationError,
    templates::{
        ConfigTemplateView,
        model::{CURRENT, ConfigTemplate, TemplateName, check_writable},
    },
};

/// `capybara template …`.
#[derive(Debug, Subcommand)]
pub(super) enum TemplateCmd {
    /// Store the live settings as a template: `template save current NAME`.
    Save {
        /// What to save: `current` (the live settings).
        source: String,
        /// The template's name.
        name: String,
        /// Overwrite a stored template of that name.
        #[arg(long)]
        replace: bool,
    },
    /// Every configuration template (built-ins first).
    List,
    /// One template with what it does not enforce yet; `current` for the live settings.
    Show {
        /// The template.
        name: String,
    },
    /// Set the server settings from a template (all or nothing).
    Apply {
        /// The template.
        name: String,
    },
    /// Write a template as YAML.
    Export {
        /// The template.
        name: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Store a template from a YAML file.
    Import {
        /// The YAML file.
        #[arg(long)]
        file: PathBuf,
        /// Overwrite a stored template of that name.
        #[arg(long)]
        replace: bool,
    },
    /// Delete a stored template (one saved over a built-in brings the built-in back).
    Delete {
        /// The template.
        name: String,
    },
}

fn print_config(cli: &Cli, v: &ConfigTemplateView) -> Result<(), CliError> {
    if cli.json {
        print_json(v)?;
        return Ok(());
    }
    let t = &v.template;
    outln!(
        "template {}{}",
        t.name,
        if v.builtin {
            " (built in)"
        } else if v.overrides_builtin {
            " (saved over the built-in; `template delete` brings the built-in back)"
        } else {
            ""
        }
    )?;
    if !t.description.is_empty() {
        outln!("  {}", t.description)?;
    }
    let mut tab = Table::new(&["SETTING", "VALUE"]);
    tab.row(vec![
        "limits (server default)".into(),
        limits_line(&t.limits),
    ]);
    tab.row(vec![
        "dns".into(),
        t.dns.as_ref().map_or_else(
            || "(the agent's --dns)".to_owned(),
            |d| {
                if d.is_empty() {
                    "(none)".to_owned()
                } else {
                    d.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            },
        ),
    ]);
    tab.row(vec![
        "blocklists (destination)".into(),
        if t.blocklists.is_empty() {
            "-".into()
        } else {
            t.blocklists
                .iter()
                .map(|l| l.as_str().to_owned())
                .collect::<Vec<_>>()
                .join(",")
        },
    ]);
    tab.row(vec![
        "ports.listen_port".into(),
        t.ports
            .listen_port
            .map_or_else(|| "-".into(), |p| p.to_string()),
    ]);
    tab.row(vec![
        "security.mfa_required".into(),
        t.security.mfa_required.to_string(),
    ]);
    tab.row(vec![
        "security.key_rotation".into(),
        t.security
            .key_rotation
            .map_or_else(|| "-".into(), |k| k.to_string()),
    ]);
    tab.row(vec![
        "log_level".into(),
        t.log_level.map_or_else(|| "-".into(), |l| l.to_string()),
    ]);
    out!("{tab}")?;
    if !v.notes.is_empty() {
        outln!("notes (what the agent does not enforce, or not fully):")?;
        for n in &v.notes {
            outln!("  - {n}")?;
        }
    }
    Ok(())
}

/// Runs `capybara template …`.
pub(super) async fn run(cli: &Cli, cmd: &TemplateCmd) -> Result<(), CliError> {
    match cmd {
        TemplateCmd::Save {
            source,
            name,
            replace,
        } => {
            if source != CURRENT {
                return Err(ValidationError::Name {
                    field: "source",
                    value: source.clone(),
                    reason: "only the live settings can be saved: template save current NAME",
                }
                .into());
            }
            check_writable("name", &TemplateName::parse("name", name)?)?;
            let v = connect(cli)
                .await?
                .save_config_template(name, *replace)
                .await?;
            print_config(cli, &v)?;
        }
        TemplateCmd::List => {
            let ts = connect(cli).await?.list_config_templates().await?;
            if cli.json {
                print_json(&ts)?;
                return Ok(());
            }
            let mut t = Table::new(&["TEMPLATE", "KIND", "DEFAULT LIMITS", "DESCRIPTION"]);
            for v in &ts {
                t.row(vec![
                    v.template.name.to_string(),
                    match (v.builtin, v.overrides_builtin) {
                        (true, _) => "built-in",
                        (false, true) => "stored (over built-in)",
                        (false, false) => "stored",
                    }
                    .into(),
                    limits_line(&v.template.limits),
                    v.template.description.clone(),
                ]);
            }
            out!("{t}")?;
        }
        TemplateCmd::Show { name } => {
            TemplateName::parse("name", name)?;
            let v = connect(cli).await?.get_config_template(name).await?;
            print_config(cli, &v)?;
        }
        TemplateCmd::Apply { name } => {
            TemplateName::parse("name", name)?;
            let v = connect(cli).await?.apply_config_template(name).await?;
            if !cli.json {
                outln!("applied template {name}; the live settings now:")?;
            }
            print_config(cli, &v)?;
        }
        TemplateCmd::Export { name, file } => {
            TemplateName::parse("name", name)?;
            let yaml = connect(cli).await?.export_config_template(name).await?;
            match file {
                Some(path) => {
                    std::fs::write(path, yaml).map_err(CliError::file(path))?;
                }
                None => out!("{yaml}")?,
            }
        }
        TemplateCmd::Import { file, replace } => {
            let yaml = read_text(file)?;
            // Validated here first: a bad file is exit 2 with its line before any connection.
            let t = ConfigTemplate::from_yaml(&yaml)?;
            check_writable("name", &t.name)?;
            let v = connect(cli)
                .await?
                .import_config_template(&yaml, *replace)
                .await?;
            print_config(cli, &v)?;
        }
        TemplateCmd::Delete { name } => {
            check_writable("name", &TemplateName::parse("name", name)?)?;
            let v = connect(cli).await?.delete_config_template(name).await?;
            if cli.json {
                print_json(&v)?;
            } else {
                outln!("deleted template {}", v.template.name)?;
            }
        }
    }
    Ok(())
}
