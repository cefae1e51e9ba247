//! `capybara quota template …` (quota templates) and `capybara template …` (configuration
//! templates). Names, limits and YAML files are validated here with the agent's own parsers
//! (exit 2 naming the field or line) before a connection is made.

use std::path::PathBuf;

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    policy::{LimitArgs, limits_line},
    print_json,
    table::Table,
};
use crate::service::{
    domain::{UserName, ValidationError},
    templates::{
        ConfigTemplateView,
        model::{CURRENT, ConfigTemplate, QuotaTemplateView, TemplateName, check_writable},
    },
};

/// `capybara quota template …`.
#[derive(Debug, Subcommand)]
pub enum QuotaTemplateCmd {
    /// Create a quota template (the same limit options as `quota set`).
    Create {
        /// The template.
        name: String,
        #[command(flatten)]
        limits: Box<LimitArgs>,
        /// Replace the limits of an existing template (its users are updated).
        #[arg(long)]
        replace: bool,
    },
    /// Every quota template with its users.
    List,
    /// One quota template.
    Show {
        /// The template.
        name: String,
    },
    /// Delete a quota template (refused while users have it: detach them first).
    Delete {
        /// The template.
        name: String,
    },
    /// Make the template the users' template layer (a user has at most one).
    Apply {
        /// The template.
        name: String,
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Detach the users' template (they fall back to their groups and the default).
    Detach {
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
}

/// `capybara template …`.
#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
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
    /// Delete a stored template (built-ins are read-only).
    Delete {
        /// The template.
        name: String,
    },
}

fn users_line(u: &[UserName]) -> String {
    if u.is_empty() {
        "-".into()
    } else {
        u.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn print_quota_template(cli: &Cli, t: &QuotaTemplateView) {
    if cli.json {
        print_json(t);
    } else {
        println!(
            "quota template {}: {}; users {}",
            t.name,
            limits_line(&t.limits),
            users_line(&t.users)
        );
    }
}

/// Runs `capybara quota template …`.
pub async fn quota_template(cli: &Cli, cmd: &QuotaTemplateCmd) -> Result<(), CliError> {
    let check_users = |users: &[String]| -> Result<(), CliError> {
        for u in users {
            UserName::parse("users", u)?;
        }
        Ok(())
    };
    match cmd {
        QuotaTemplateCmd::Create {
            name,
            limits,
            replace,
        } => {
            TemplateName::parse("name", name)?;
            let text = limits.text();
            let patch = text.parse()?;
            if !patch.clear.is_empty() {
                return Err(ValidationError::Name {
                    field: "clear",
                    value: patch.clear.join(","),
                    reason: "a template is created whole: leave the field out instead",
                }
                .into());
            }
            let t = connect(cli)
                .await?
                .create_quota_template(name, &text, *replace)
                .await?;
            print_quota_template(cli, &t);
        }
        QuotaTemplateCmd::List => {
            let ts = connect(cli).await?.list_quota_templates().await?;
            if cli.json {
                print_json(&ts);
                return Ok(());
            }
            let mut t = Table::new(&["TEMPLATE", "LIMITS", "USERS"]);
            for q in &ts {
                t.row(vec![
                    q.name.to_string(),
                    limits_line(&q.limits),
                    users_line(&q.users),
                ]);
            }
            print!("{t}");
        }
        QuotaTemplateCmd::Show { name } => {
            TemplateName::parse("name", name)?;
            let t = connect(cli).await?.get_quota_template(name).await?;
            if cli.json {
                print_json(&t);
                return Ok(());
            }
            let mut tab = Table::new(&["FIELD", "VALUE"]);
            let v = serde_json::to_value(&t.limits).unwrap_or_default();
            for (k, v) in v.as_object().into_iter().flatten() {
                tab.row(vec![k.clone(), v.as_str().unwrap_or_default().to_owned()]);
            }
            println!(
                "quota template {} (users {}):",
                t.name,
                users_line(&t.users)
            );
            print!("{tab}");
        }
        QuotaTemplateCmd::Delete { name } => {
            TemplateName::parse("name", name)?;
            let t = connect(cli).await?.delete_quota_template(name).await?;
            if cli.json {
                print_json(&t);
            } else {
                println!("deleted quota template {}", t.name);
            }
        }
        QuotaTemplateCmd::Apply { name, users } => {
            TemplateName::parse("name", name)?;
            check_users(users)?;
            let done = connect(cli)
                .await?
                .apply_quota_template(name, users)
                .await?;
            if cli.json {
                print_json(&serde_json::json!({ "template": name, "users": done }));
            } else {
                println!("applied quota template {name} to {}", done.join(","));
            }
        }
        QuotaTemplateCmd::Detach { users } => {
            check_users(users)?;
            let done = connect(cli).await?.apply_quota_template("", users).await?;
            if cli.json {
                print_json(&serde_json::json!({ "template": null, "users": done }));
            } else {
                println!("detached the quota template of {}", done.join(","));
            }
        }
    }
    Ok(())
}

fn print_config(cli: &Cli, v: &ConfigTemplateView) {
    if cli.json {
        print_json(v);
        return;
    }
    let t = &v.template;
    println!(
        "template {}{}",
        t.name,
        if v.builtin {
            " (built in, read-only)"
        } else {
            ""
        }
    );
    if !t.description.is_empty() {
        println!("  {}", t.description);
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
    print!("{tab}");
    if !v.notes.is_empty() {
        println!("notes (what the agent does not enforce, or not fully):");
        for n in &v.notes {
            println!("  - {n}");
        }
    }
}

fn read_file(path: &PathBuf) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|source| CliError::File {
        path: path.clone(),
        source,
    })
}

/// Runs `capybara template …`.
pub async fn template(cli: &Cli, cmd: &TemplateCmd) -> Result<(), CliError> {
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
            print_config(cli, &v);
        }
        TemplateCmd::List => {
            let ts = connect(cli).await?.list_config_templates().await?;
            if cli.json {
                print_json(&ts);
                return Ok(());
            }
            let mut t = Table::new(&["TEMPLATE", "KIND", "DEFAULT LIMITS", "DESCRIPTION"]);
            for v in &ts {
                t.row(vec![
                    v.template.name.to_string(),
                    if v.builtin { "built-in" } else { "stored" }.into(),
                    limits_line(&v.template.limits),
                    v.template.description.clone(),
                ]);
            }
            print!("{t}");
        }
        TemplateCmd::Show { name } => {
            TemplateName::parse("name", name)?;
            let v = connect(cli).await?.get_config_template(name).await?;
            print_config(cli, &v);
        }
        TemplateCmd::Apply { name } => {
            TemplateName::parse("name", name)?;
            let v = connect(cli).await?.apply_config_template(name).await?;
            if !cli.json {
                println!("applied template {name}; the live settings now:");
            }
            print_config(cli, &v);
        }
        TemplateCmd::Export { name, file } => {
            TemplateName::parse("name", name)?;
            let yaml = connect(cli).await?.export_config_template(name).await?;
            match file {
                Some(path) => {
                    std::fs::write(path, yaml).map_err(|source| CliError::File {
                        path: path.clone(),
                        source,
                    })?;
                }
                None => print!("{yaml}"),
            }
        }
        TemplateCmd::Import { file, replace } => {
            let yaml = read_file(file)?;
            // Validated here first: a bad file is exit 2 with its line before any connection.
            let t = ConfigTemplate::from_yaml(&yaml)?;
            check_writable("name", &t.name)?;
            let v = connect(cli)
                .await?
                .import_config_template(&yaml, *replace)
                .await?;
            print_config(cli, &v);
        }
        TemplateCmd::Delete { name } => {
            check_writable("name", &TemplateName::parse("name", name)?)?;
            let v = connect(cli).await?.delete_config_template(name).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!("deleted template {}", v.template.name);
            }
        }
    }
    Ok(())
}
