//! The `Templates` gRPC service (quota templates and configuration templates) and its client
//! calls, with the proto ↔ domain conversions. Input is validated here with the same parsers
//! as the CLI: `INVALID_ARGUMENT` naming the field before anything is changed.
//!
//! | scope | calls |
//! |---|---|
//! | read | `ListQuotaTemplates`, `GetQuotaTemplate`, `ListConfigTemplates`, `GetConfigTemplate`, `ExportConfigTemplate` |
//! | write | `CreateQuotaTemplate`, `DeleteQuotaTemplate`, `ApplyQuotaTemplate`, `SaveConfigTemplate`, `ApplyConfigTemplate`, `ImportConfigTemplate`, `DeleteConfigTemplate` |

use std::net::IpAddr;

use capybara_proto::v1::{self as pb, templates_client::TemplatesClient, templates_server};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, MAX_DOCUMENT_MESSAGE},
    handler::Api,
    lists::list_name,
    policy::{limits_from_proto, limits_to_proto},
    status::invalid,
};
use crate::service::{
    domain::{Scope, UserName, ValidationError},
    policy::model::{LimitsPatch, LimitsText, PolicyValueError, parse_field},
    templates::{
        ConfigTemplateView,
        model::{ConfigTemplate, Ports, QuotaTemplateView, Security, TemplateName},
    },
};

fn quota_to_proto(t: &QuotaTemplateView) -> pb::QuotaTemplate {
    pb::QuotaTemplate {
        name: t.name.to_string(),
        limits: Some(limits_to_proto(&t.limits)),
        users: t.users.iter().map(ToString::to_string).collect(),
    }
}

fn quota_from_proto(t: Option<pb::QuotaTemplate>) -> Result<QuotaTemplateView, AnswerError> {
    let t = t.ok_or(AnswerError::Missing { field: "template" })?;
    Ok(QuotaTemplateView {
        name: TemplateName::parse("template.name", &t.name)?,
        limits: limits_from_proto(t.limits)?,
        users: t
            .users
            .iter()
            .map(|u| UserName::parse("template.users", u))
            .collect::<Result<_, _>>()?,
    })
}

fn config_to_proto(v: &ConfigTemplateView) -> pb::ConfigTemplate {
    let t = &v.template;
    pb::ConfigTemplate {
        name: t.name.to_string(),
        builtin: v.builtin,
        overrides_builtin: v.overrides_builtin,
        description: t.description.clone(),
        blocklists: t.blocklists.iter().map(|l| l.as_str().to_owned()).collect(),
        listen_port: t.ports.listen_port.map(u32::from),
        dns: t.dns.as_ref().map(|d| pb::DnsServers {
            servers: d.iter().map(ToString::to_string).collect(),
        }),
        limits: Some(limits_to_proto(&t.limits)),
        mfa_required: t.security.mfa_required,
        key_rotation: t
            .security
            .key_rotation
            .map(|k| k.to_string())
            .unwrap_or_default(),
        log_level: t.log_level.map(|l| l.to_string()).unwrap_or_default(),
        notes: v.notes.clone(),
    }
}

/// A configuration template from its proto form; errors name the field.
fn config_from_proto(t: pb::ConfigTemplate) -> Result<ConfigTemplate, ValidationError> {
    let listen_port = t
        .listen_port
        .map(|p| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or(ValidationError::Policy {
                    field: "listen_port",
                    source: PolicyValueError::Count {
                        input: p.to_string(),
                        max: u32::from(u16::MAX),
                    },
                })
        })
        .transpose()?;
    let dns = t
        .dns
        .map(|d| {
            d.servers
                .iter()
                .map(|a| {
                    a.parse::<IpAddr>().map_err(|_| ValidationError::Policy {
                        field: "dns",
                        source: PolicyValueError::Address { input: a.clone() },
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(ConfigTemplate {
        name: TemplateName::parse("name", &t.name)?,
        description: t.description,
        blocklists: t
            .blocklists
            .iter()
            .map(|l| list_name("blocklists", l))
            .collect::<Result<_, _>>()?,
        ports: Ports { listen_port },
        dns,
        limits: limits_from_proto(t.limits)?,
        security: Security {
            mfa_required: t.mfa_required,
            key_rotation: (!t.key_rotation.is_empty())
                .then(|| parse_field("key_rotation", &t.key_rotation))
                .transpose()?,
        },
        log_level: (!t.log_level.is_empty())
            .then(|| parse_field("log_level", &t.log_level))
            .transpose()?,
    })
}

fn view_from_proto(t: Option<pb::ConfigTemplate>) -> Result<ConfigTemplateView, ClientError> {
    let t = t.ok_or(AnswerError::Missing { field: "template" })?;
    let (builtin, overrides_builtin, notes) = (t.builtin, t.overrides_builtin, t.notes.clone());
    Ok(ConfigTemplateView {
        template: config_from_proto(t).map_err(AnswerError::from)?,
        builtin,
        overrides_builtin,
        notes,
    })
}

fn name(field: &'static str, s: &str) -> Result<TemplateName, Status> {
    TemplateName::parse(field, s).map_err(invalid)
}

fn config_response(v: &ConfigTemplateView) -> Response<pb::ConfigTemplateResponse> {
    Response::new(pb::ConfigTemplateResponse {
        template: Some(config_to_proto(v)),
    })
}

#[tonic::async_trait]
impl templates_server::Templates for Api {
    async fn create_quota_template(
        &self,
        req: Request<pb::CreateQuotaTemplateRequest>,
    ) -> Result<Response<pb::QuotaTemplateResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let n = name("name", &r.name)?;
        let patch = LimitsPatch {
            set: limits_from_proto(r.limits).map_err(invalid)?,
            clear: Vec::new(),
        };
        let t = self
            .call(move |s| {
                s.templates
                    .create_quota_template(&actor, &n, &patch, r.replace)
            })
            .await?;
        Ok(Response::new(pb::QuotaTemplateResponse {
            template: Some(quota_to_proto(&t)),
        }))
    }

    async fn list_quota_templates(
        &self,
        req: Request<pb::ListQuotaTemplatesRequest>,
    ) -> Result<Response<pb::ListQuotaTemplatesResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.get_ref();
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let (ts, more) = self
            .call(move |s| {
                Ok(s.templates
                    .list_quota_templates_page(ask.after.as_deref(), ask.size))
            })
            .await?;
        let last = ts.last().filter(|_| more).map(|t| t.name.to_string());
        Ok(Response::new(pb::ListQuotaTemplatesResponse {
            templates: ts.iter().map(quota_to_proto).collect(),
            next_page_token: super::paging::next_token(last.as_deref()),
        }))
    }

    async fn get_quota_template(
        &self,
        req: Request<pb::QuotaTemplateRequest>,
    ) -> Result<Response<pb::QuotaTemplateResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let n = name("name", &req.get_ref().name)?;
        let t = self
            .call(move |s| s.templates.get_quota_template(&n))
            .await?;
        Ok(Response::new(pb::QuotaTemplateResponse {
            template: Some(quota_to_proto(&t)),
        }))
    }

    async fn delete_quota_template(
        &self,
        req: Request<pb::QuotaTemplateRequest>,
    ) -> Result<Response<pb::QuotaTemplateResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let n = name("name", &req.get_ref().name)?;
        let t = self
            .call(move |s| s.templates.delete_quota_template(&actor, &n))
            .await?;
        Ok(Response::new(pb::QuotaTemplateResponse {
            template: Some(quota_to_proto(&t)),
        }))
    }

    async fn apply_quota_template(
        &self,
        req: Request<pb::ApplyQuotaTemplateRequest>,
    ) -> Result<Response<pb::ApplyQuotaTemplateResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let n = (!r.name.is_empty())
            .then(|| name("name", &r.name))
            .transpose()?;
        let users: Vec<UserName> = r
            .users
            .iter()
            .map(|u| UserName::parse("users", u))
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        let done = self
            .call(move |s| s.templates.apply_quota_template(&actor, n.as_ref(), &users))
            .await?;
        Ok(Response::new(pb::ApplyQuotaTemplateResponse {
            users: done.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn save_config_template(
        &self,
        req: Request<pb::SaveConfigTemplateRequest>,
    ) -> Result<Response<pb::ConfigTemplateResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let n = name("name", &r.name)?;
        let v = self
            .call(move |s| s.templates.save_config_template(&actor, &n, r.replace))
            .await?;
        Ok(config_response(&v))
    }

    async fn list_config_templates(
        &self,
        req: Request<pb::ListConfigTemplatesRequest>,
    ) -> Result<Response<pb::ListConfigTemplatesResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.get_ref();
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let ts = self.call(|s| s.templates.list_config_templates()).await?;
        // Built-in names first (in their fixed order, a template saved over one in its place),
        // then the other saved ones by name.
        let (page, next) = ask.take(ts.iter().enumerate(), |(i, v)| {
            match v.builtin || v.overrides_builtin {
                true => format!("0/{i:04}"),
                false => format!("1/{}", v.template.name),
            }
        });
        Ok(Response::new(pb::ListConfigTemplatesResponse {
            templates: page.into_iter().map(|(_, v)| config_to_proto(v)).collect(),
            next_page_token: next,
        }))
    }

    async fn get_config_template(
        &self,
        req: Request<pb::ConfigTemplateRequest>,
    ) -> Result<Response<pb::ConfigTemplateResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let n = name("name", &req.get_ref().name)?;
        let v = self
            .call(move |s| s.templates.get_config_template(&n))
            .await?;
        Ok(config_response(&v))
    }

    async fn apply_config_template(
        &self,
        req: Request<pb::ConfigTemplateRequest>,
    ) -> Result<Response<pb::ConfigTemplateResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let n = name("name", &req.get_ref().name)?;
        let v = self
            .call(move |s| s.templates.apply_config_template(&actor, &n))
            .await?;
        Ok(config_response(&v))
    }

    async fn export_config_template(
        &self,
        req: Request<pb::ConfigTemplateRequest>,
    ) -> Result<Response<pb::ExportConfigTemplateResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let n = name("name", &req.get_ref().name)?;
        let v = self
            .call(move |s| s.templates.get_config_template(&n))
            .await?;
        Ok(Response::new(pb::ExportConfigTemplateResponse {
            yaml: v.template.to_yaml(),
        }))
    }

    async fn import_config_template(
        &self,
        req: Request<pb::ImportConfigTemplateRequest>,
    ) -> Result<Response<pb::ConfigTemplateResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        // Parsed on the blocking pool, like every service call (a large file takes a while).
        let v = self
            .call(move |s| {
                let t = ConfigTemplate::from_yaml(&r.yaml)?;
                s.templates.import_config_template(&actor, t, r.replace)
            })
            .await?;
        Ok(config_response(&v))
    }

    async fn delete_config_template(
        &self,
        req: Request<pb::ConfigTemplateRequest>,
    ) -> Result<Response<pb::ConfigTemplateResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let n = name("name", &req.get_ref().name)?;
        let v = self
            .call(move |s| s.templates.delete_config_template(&actor, &n))
            .await?;
        Ok(config_response(&v))
    }
}

/// The template calls of the client.
impl Client {
    fn templates(&self) -> TemplatesClient<tonic::transport::Channel> {
        TemplatesClient::new(self.channel())
            .max_decoding_message_size(MAX_DOCUMENT_MESSAGE)
            .max_encoding_message_size(MAX_DOCUMENT_MESSAGE)
    }

    /// Creates (or with `replace`, replaces) a quota template with the fields set in `text`.
    pub async fn create_quota_template(
        &self,
        name: &str,
        text: &LimitsText,
        replace: bool,
    ) -> Result<QuotaTemplateView, ClientError> {
        let r = self
            .templates()
            .create_quota_template(self.req(pb::CreateQuotaTemplateRequest {
                name: name.into(),
                limits: Some(super::policy::limits_text_to_proto(text)),
                replace,
            }))
            .await?
            .into_inner();
        Ok(quota_from_proto(r.template)?)
    }

    /// Every quota template.
    pub async fn list_quota_templates(&self) -> Result<Vec<QuotaTemplateView>, ClientError> {
        super::paging::walk(|t| {
            self.list_quota_templates_page(crate::service::core::MAX_PAGE_SIZE as u32, t)
        })
        .await
    }

    /// One page of quota templates by name (`page_size` 0 = the default) and the next page's
    /// token (empty on the last page).
    pub async fn list_quota_templates_page(
        &self,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<QuotaTemplateView>, String), ClientError> {
        let r = self
            .templates()
            .list_quota_templates(self.req(pb::ListQuotaTemplatesRequest {
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let templates = r
            .templates
            .into_iter()
            .map(|t| quota_from_proto(Some(t)))
            .collect::<Result<_, _>>()?;
        Ok((templates, r.next_page_token))
    }

    /// One quota template.
    pub async fn get_quota_template(&self, name: &str) -> Result<QuotaTemplateView, ClientError> {
        let r = self
            .templates()
            .get_quota_template(self.req(pb::QuotaTemplateRequest { name: name.into() }))
            .await?
            .into_inner();
        Ok(quota_from_proto(r.template)?)
    }

    /// Deletes a quota template.
    pub async fn delete_quota_template(
        &self,
        name: &str,
    ) -> Result<QuotaTemplateView, ClientError> {
        let r = self
            .templates()
            .delete_quota_template(self.req(pb::QuotaTemplateRequest { name: name.into() }))
            .await?
            .into_inner();
        Ok(quota_from_proto(r.template)?)
    }

    /// Applies a quota template to users (`name` empty: detaches theirs).
    pub async fn apply_quota_template(
        &self,
        name: &str,
        users: &[String],
    ) -> Result<Vec<String>, ClientError> {
        Ok(self
            .templates()
            .apply_quota_template(self.req(pb::ApplyQuotaTemplateRequest {
                name: name.into(),
                users: users.to_vec(),
            }))
            .await?
            .into_inner()
            .users)
    }

    /// `template save current NAME`.
    pub async fn save_config_template(
        &self,
        name: &str,
        replace: bool,
    ) -> Result<ConfigTemplateView, ClientError> {
        let r = self
            .templates()
            .save_config_template(self.req(pb::SaveConfigTemplateRequest {
                name: name.into(),
                replace,
            }))
            .await?
            .into_inner();
        view_from_proto(r.template)
    }

    /// Every configuration template.
    pub async fn list_config_templates(&self) -> Result<Vec<ConfigTemplateView>, ClientError> {
        super::paging::walk(|t| {
            self.list_config_templates_page(crate::service::core::MAX_PAGE_SIZE as u32, t)
        })
        .await
    }

    /// One page of configuration templates (the built-in ones first, then the saved ones by
    /// name; `page_size` 0 = the default) and the next page's token (empty on the last page).
    pub async fn list_config_templates_page(
        &self,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<ConfigTemplateView>, String), ClientError> {
        let r = self
            .templates()
            .list_config_templates(self.req(pb::ListConfigTemplatesRequest {
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let templates = r
            .templates
            .into_iter()
            .map(|t| view_from_proto(Some(t)))
            .collect::<Result<_, _>>()?;
        Ok((templates, r.next_page_token))
    }

    /// One configuration template (`current`: the live settings).
    pub async fn get_config_template(&self, name: &str) -> Result<ConfigTemplateView, ClientError> {
        let r = self
            .templates()
            .get_config_template(self.req(pb::ConfigTemplateRequest { name: name.into() }))
            .await?
            .into_inner();
        view_from_proto(r.template)
    }

    /// Applies a configuration template; answers the live settings after.
    pub async fn apply_config_template(
        &self,
        name: &str,
    ) -> Result<ConfigTemplateView, ClientError> {
        let r = self
            .templates()
            .apply_config_template(self.req(pb::ConfigTemplateRequest { name: name.into() }))
            .await?
            .into_inner();
        view_from_proto(r.template)
    }

    /// A configuration template as YAML.
    pub async fn export_config_template(&self, name: &str) -> Result<String, ClientError> {
        Ok(self
            .templates()
            .export_config_template(self.req(pb::ConfigTemplateRequest { name: name.into() }))
            .await?
            .into_inner()
            .yaml)
    }

    /// Stores a configuration template given as YAML.
    pub async fn import_config_template(
        &self,
        yaml: &str,
        replace: bool,
    ) -> Result<ConfigTemplateView, ClientError> {
        let r = self
            .templates()
            .import_config_template(self.req(pb::ImportConfigTemplateRequest {
                yaml: yaml.into(),
                replace,
            }))
            .await?
            .into_inner();
        view_from_proto(r.template)
    }

    /// Deletes a stored configuration template.
    pub async fn delete_config_template(
        &self,
        name: &str,
    ) -> Result<ConfigTemplateView, ClientError> {
        let r = self
            .templates()
            .delete_config_template(self.req(pb::ConfigTemplateRequest { name: name.into() }))
            .await?
            .into_inner();
        view_from_proto(r.template)
    }
}
