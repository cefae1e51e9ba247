//! Templates: quota templates (a named policy layer applied to users) and configuration
//! templates (named server settings, with built-ins). [`model`] says what they are and the
//! rules; this module has their service calls. Every change runs under the writer lock and writes its
//! records and its audit record in one batch; changes that touch users' policy go through
//! `policy_change`, which updates the kernel of every affected user before it returns.

pub mod model;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, OnceLock},
};

use self::model::{
    CURRENT, ConfigTemplate, Ports, QuotaTemplateView, ServerSettings, TemplateName,
};
use super::{
    ServiceError,
    core::{Core, to_json},
    directory::Directory,
    domain::{Actor, UserName, ValidationError},
    error::not_found,
    policy::{
        Change, Policy, UserPolicy,
        model::{Limits, LimitsPatch},
    },
};
use crate::{
    blocklist::{Direction, ListName},
    store::{Batch, Cf, keys},
};

/// A configuration template as `template list/show` answer it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigTemplateView {
    /// The template.
    pub template: ConfigTemplate,
    /// Built in (the agent's own, unchanged).
    pub builtin: bool,
    /// Saved over the built-in of the same name (deleting it brings the built-in back).
    #[serde(default)]
    pub overrides_builtin: bool,
    /// What it holds that the agent does not enforce (or not fully), one line each.
    pub notes: Vec<String>,
}

/// The templates feature.
#[derive(Debug)]
pub struct Templates {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
    /// The WireGuard port the agent listens on (told by the daemon; shown by templates).
    listen_port: OnceLock<u16>,
}

impl Templates {
    /// The feature over the shared core, directory and policy.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>, policy: Arc<Policy>) -> Templates {
        Templates {
            core,
            dir,
            policy,
            listen_port: OnceLock::new(),
        }
    }

    /// Tells the service the WireGuard port the agent listens on (shown by templates).
    pub fn set_listen_port(&self, port: u16) {
        let _ = self.listen_port.set(port);
    }

    /// Sets the agent's log filter to the level of the configuration template applied last
    /// (without one: `RUST_LOG`, else `info`); at start and after `template apply`.
    pub fn apply_log_level(&self) {
        let level = self.policy.read().settings.log_level.map(|l| l.to_string());
        match crate::logging::set_level(level.as_deref()) {
            Ok(true) if level.is_some() => {
                tracing::info!(level = ?level, "log level set by the configuration template");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot set the template's log level"),
        }
    }

    // ---- quota templates ----------------------------------------------------------------

    fn quota_template_view(&self, name: &TemplateName) -> Option<QuotaTemplateView> {
        let c = self.policy.read();
        let limits = c.templates.get(name)?.clone();
        let users = c
            .users
            .iter()
            .filter(|(_, p)| p.template.as_ref() == Some(name))
            .map(|(u, _)| u.clone())
            .collect();
        Some(QuotaTemplateView {
            name: name.clone(),
            limits,
            users,
        })
    }

    /// Every quota template with its users.
    pub fn list_quota_templates(&self) -> Vec<QuotaTemplateView> {
        let names: Vec<TemplateName> = self.policy.read().templates.keys().cloned().collect();
        names
            .iter()
            .filter_map(|n| self.quota_template_view(n))
            .collect()
    }

    /// One page of quota templates by name: up to `size` after the name `after`, and whether
    /// more follow.
    pub fn list_quota_templates_page(
        &self,
        after: Option<&str>,
        size: usize,
    ) -> (Vec<QuotaTemplateView>, bool) {
        let names: Vec<TemplateName> = self
            .policy
            .read()
            .templates
            .keys()
            .filter(|n| after.is_none_or(|a| n.as_str() > a))
            .take(size + 1)
            .cloned()
            .collect();
        let more = names.len() > size;
        let page = names
            .iter()
            .take(size)
            .filter_map(|n| self.quota_template_view(n))
            .collect();
        (page, more)
    }

    /// One quota template.
    pub fn get_quota_template(
        &self,
        name: &TemplateName,
    ) -> Result<QuotaTemplateView, ServiceError> {
        self.quota_template_view(name)
            .ok_or_else(|| not_found("quota template", name))
    }

    /// Creates a quota template with the fields of `patch` (`replace`: or replaces the fields of
    /// an existing one; its users' kernel state is updated before this returns). A `patch` that
    /// sets nothing makes an empty template (the design's `quota template create corporate`): it
    /// decides no field until a `replace` gives it limits.
    pub fn create_quota_template(
        &self,
        actor: &Actor,
        name: &TemplateName,
        patch: &LimitsPatch,
        replace: bool,
    ) -> Result<QuotaTemplateView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let before = self.quota_template_view(name);
        if before.is_some() && !replace {
            return Err(ServiceError::AlreadyExists {
                what: "quota template",
                name: name.to_string(),
            });
        }
        let after = Limits::default().patched(&LimitsPatch {
            set: patch.set.clone(),
            clear: Vec::new(),
        });
        let users = before.as_ref().map(|b| b.users.clone()).unwrap_or_default();
        self.policy.change(
            actor,
            if before.is_some() {
                "quota-template.replace"
            } else {
                "quota-template.create"
            },
            format!("quota-template:{name}"),
            before.as_ref().and_then(|b| to_json(&b.limits)),
            to_json(&after),
            vec![Change::QuotaTemplate(name.clone(), Some(after))],
            users,
        )?;
        self.get_quota_template(name)
    }

    /// Deletes a quota template; refused while it is applied to users (they are named).
    pub fn delete_quota_template(
        &self,
        actor: &Actor,
        name: &TemplateName,
    ) -> Result<QuotaTemplateView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let t = self.get_quota_template(name)?;
        if !t.users.is_empty() {
            return Err(ServiceError::InUse {
                what: "quota template",
                name: name.to_string(),
                users: t
                    .users
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            });
        }
        self.policy.change(
            actor,
            "quota-template.delete",
            format!("quota-template:{name}"),
            to_json(&t.limits),
            None,
            vec![Change::QuotaTemplate(name.clone(), None)],
            Vec::new(),
        )?;
        Ok(t)
    }

    /// Makes `name` the template layer of `users` (`None`: detaches their template). Every user
    /// must exist; the kernel state of each is updated before this returns.
    pub fn apply_quota_template(
        &self,
        actor: &Actor,
        name: Option<&TemplateName>,
        users: &[UserName],
    ) -> Result<Vec<UserName>, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        if users.is_empty() {
            return Err(ValidationError::Missing { field: "users" }.into());
        }
        if let Some(n) = name {
            self.get_quota_template(n)?;
        }
        for u in users {
            self.dir.user(u)?;
        }
        let (changes, before): (Vec<Change>, Vec<(String, Option<String>)>) = {
            let c = self.policy.read();
            users
                .iter()
                .map(|u| {
                    let have = c.users.get(u).cloned().unwrap_or_default();
                    let before = (u.to_string(), have.template.as_ref().map(|t| t.to_string()));
                    let want = UserPolicy {
                        limits: have.limits,
                        template: name.cloned(),
                    };
                    (
                        Change::User(u.clone(), (!want.is_empty()).then_some(want)),
                        before,
                    )
                })
                .unzip()
        };
        self.policy.change(
            actor,
            if name.is_some() {
                "quota-template.apply"
            } else {
                "quota-template.detach"
            },
            name.map_or_else(
                || "quota-template:-".to_owned(),
                |n| format!("quota-template:{n}"),
            ),
            to_json(&before),
            to_json(&serde_json::json!({
                "template": name.map(|n| n.to_string()),
                "users": users.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })),
            changes,
            users.to_vec(),
        )?;
        Ok(users.to_vec())
    }

    // ---- configuration templates --------------------------------------------------------

    fn view(&self, t: ConfigTemplate, builtin: bool) -> ConfigTemplateView {
        ConfigTemplateView {
            notes: t.notes(self.listen_port.get().copied()),
            overrides_builtin: !builtin && model::is_builtin(t.name.as_str()),
            template: t,
            builtin,
        }
    }

    fn destination_lists(&self) -> Result<BTreeSet<ListName>, ServiceError> {
        Ok(self
            .core
            .plane
            .lists()?
            .into_iter()
            .filter(|(l, _)| l.direction == Direction::Destination)
            .map(|(l, _)| l.name)
            .collect())
    }

    /// The live settings as a template named `name`.
    fn snapshot(&self, name: TemplateName) -> Result<ConfigTemplate, ServiceError> {
        let blocklists = self.destination_lists()?;
        let c = self.policy.read();
        let st = &c.settings;
        let dns = match &st.dns {
            Some(d) => Some(d.clone()),
            None if self.core.cfg.dns.is_empty() => None,
            None => Some(
                self.core
                    .cfg
                    .dns
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .collect(),
            ),
        };
        Ok(ConfigTemplate {
            name,
            description: match &st.template {
                Some(t) => format!("the live settings (last template applied: {t})"),
                None => "the live settings".to_owned(),
            },
            blocklists,
            ports: Ports {
                listen_port: self.listen_port.get().copied().or(st.ports.listen_port),
            },
            dns,
            limits: c.default.clone(),
            security: st.security.clone(),
            log_level: st.log_level,
        })
    }

    fn stored_config_template(
        &self,
        name: &TemplateName,
    ) -> Result<Option<ConfigTemplate>, ServiceError> {
        Ok(self
            .core
            .store
            .get(Cf::Policy, &keys::policy_config_template(name.as_str()))?)
    }

    /// Every configuration template: the built-ins (each replaced by a template saved over
    /// it), then the other stored ones, by name.
    pub fn list_config_templates(&self) -> Result<Vec<ConfigTemplateView>, ServiceError> {
        let mut stored: BTreeMap<TemplateName, ConfigTemplate> = self
            .core
            .store
            .scan::<ConfigTemplate>(Cf::Policy, keys::POLICY_CONFIG_TEMPLATES)?
            .into_iter()
            .map(|(_, t)| (t.name.clone(), t))
            .collect();
        let mut out: Vec<ConfigTemplateView> = model::builtins()
            .into_iter()
            .map(|b| match stored.remove(&b.name) {
                Some(t) => self.view(t, false),
                None => self.view(b, true),
            })
            .collect();
        out.extend(stored.into_values().map(|t| self.view(t, false)));
        Ok(out)
    }

    /// One configuration template; `current` is the live settings.
    pub fn get_config_template(
        &self,
        name: &TemplateName,
    ) -> Result<ConfigTemplateView, ServiceError> {
        if name.as_str() == CURRENT {
            let t = self.snapshot(name.clone())?;
            return Ok(self.view(t, false));
        }
        if let Some(t) = self.stored_config_template(name)? {
            return Ok(self.view(t, false));
        }
        let t = model::builtins()
            .into_iter()
            .find(|t| t.name == *name)
            .ok_or_else(|| not_found("template", name))?;
        Ok(self.view(t, true))
    }

    /// Stores `t` (a snapshot or an import); an existing name is refused unless `replace`. A
    /// built-in's name is free until a template is saved over it (the design's `template save
    /// current remote-worker`): the saved one is used instead of the built-in until deleted.
    fn put_config_template(
        &self,
        actor: &Actor,
        action: &str,
        t: ConfigTemplate,
        replace: bool,
    ) -> Result<ConfigTemplateView, ServiceError> {
        model::check_writable("name", &t.name)?;
        let before = self.stored_config_template(&t.name)?;
        if before.is_some() && !replace {
            return Err(ServiceError::AlreadyExists {
                what: "template",
                name: t.name.to_string(),
            });
        }
        let mut batch = Batch::default();
        batch.put(
            Cf::Policy,
            &keys::policy_config_template(t.name.as_str()),
            &t,
        )?;
        self.core.audit(
            &mut batch,
            actor,
            action,
            format!("template:{}", t.name),
            before.as_ref().and_then(to_json),
            to_json(&t),
        )?;
        self.core.commit(batch)?;
        tracing::info!(%actor, template = %t.name, action, "configuration template stored");
        Ok(self.view(t, false))
    }

    /// `template save current NAME`: stores the live settings as template `name`.
    pub fn save_config_template(
        &self,
        actor: &Actor,
        name: &TemplateName,
        replace: bool,
    ) -> Result<ConfigTemplateView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        model::check_writable("name", name)?;
        let t = self.snapshot(name.clone())?;
        self.put_config_template(actor, "template.save", t, replace)
    }

    /// `template import`: stores a template read from YAML (validated by the caller).
    pub fn import_config_template(
        &self,
        actor: &Actor,
        t: ConfigTemplate,
        replace: bool,
    ) -> Result<ConfigTemplateView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        self.put_config_template(actor, "template.import", t, replace)
    }

    /// Deletes a stored configuration template; one saved over a built-in brings the built-in
    /// back. A built-in itself cannot be deleted.
    pub fn delete_config_template(
        &self,
        actor: &Actor,
        name: &TemplateName,
    ) -> Result<ConfigTemplateView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        model::check_writable("name", name)?;
        let t = match self.stored_config_template(name)? {
            Some(t) => t,
            None if model::is_builtin(name.as_str()) => {
                return Err(ValidationError::Name {
                    field: "name",
                    value: name.to_string(),
                    reason: "a built-in template cannot be deleted (only a template saved over it)",
                }
                .into());
            }
            None => return Err(not_found("template", name)),
        };
        let mut batch = Batch::default();
        batch.delete(Cf::Policy, &keys::policy_config_template(name.as_str()));
        self.core.audit(
            &mut batch,
            actor,
            "template.delete",
            format!("template:{name}"),
            to_json(&t),
            None,
        )?;
        self.core.commit(batch)?;
        Ok(self.view(t, false))
    }

    /// Applies a configuration template atomically: the server default limits (re-applied to
    /// the kernel for every user), the DNS for new client configs and the stored settings, with
    /// one audit record. A destination list it names that does not exist refuses the whole
    /// apply. Answers the live settings afterwards.
    pub fn apply_config_template(
        &self,
        actor: &Actor,
        name: &TemplateName,
    ) -> Result<ConfigTemplateView, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        if name.as_str() == CURRENT {
            return Err(ValidationError::Name {
                field: "name",
                value: name.to_string(),
                reason: "\"current\" is the live settings already",
            }
            .into());
        }
        let t = self.get_config_template(name)?.template;
        let lists = self.destination_lists()?;
        if let Some(missing) = t.blocklists.iter().find(|l| !lists.contains(*l)) {
            return Err(not_found("blocklists: destination list", missing.as_str()));
        }
        let before = self.snapshot(TemplateName::parse("name", CURRENT)?)?;
        let users = self.dir.user_names()?;
        self.policy.change(
            actor,
            "template.apply",
            format!("template:{name}"),
            to_json(&before),
            to_json(&t),
            vec![
                Change::Default(t.limits.clone()),
                Change::Settings(ServerSettings::from_template(&t)),
            ],
            users,
        )?;
        self.apply_log_level();
        let now = self.snapshot(TemplateName::parse("name", CURRENT)?)?;
        Ok(self.view(now, false))
    }
}
