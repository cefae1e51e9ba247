//! The `IpIntel` service (the master switch, the tor/vpn lists' sources, the allow list), its
//! conversions and client calls.
//!
//! Scopes: `GetIntel` read; `SetIntelEnabled` and `ChangeIntelAllow` write; `SetIntelSource`
//! and `RefreshIntelList` admin (the agent reads a file or fetches a URL of the caller's
//! choosing, and a refused list's error quotes one of its lines).

use std::time::Duration;

use capybara_proto::v1::{self as pb, ip_intel_client::IpIntelClient, ip_intel_server::IpIntel};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    handler::Api,
    status::invalid,
};
use crate::{
    blocklist::parse_cidrs,
    service::{
        domain::{Scope, ValidationError},
        intel::{Category, IntelListView, IntelStatus, Source, SourceChange},
        monitor::Traffic,
    },
};

#[tonic::async_trait]
impl IpIntel for Api {
    async fn get_intel(
        &self,
        req: Request<pb::GetIntelRequest>,
    ) -> Result<Response<pb::IntelStatus>, Status> {
        self.auth(&req, Scope::Read)?;
        let s = self.call(|s| s.intel.status()).await?;
        Ok(Response::new((&s).into()))
    }

    async fn set_intel_enabled(
        &self,
        req: Request<pb::SetIntelEnabledRequest>,
    ) -> Result<Response<pb::IntelStatus>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let enabled = req.into_inner().enabled;
        let s = self
            .call(move |s| s.intel.set_enabled(&actor, enabled))
            .await?;
        Ok(Response::new((&s).into()))
    }

    async fn set_intel_source(
        &self,
        req: Request<pb::SetIntelSourceRequest>,
    ) -> Result<Response<pb::IntelStatus>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let (category, change) = source_change(req.into_inner()).map_err(invalid)?;
        let s = self
            .call(move |s| s.intel.set_source(&actor, category, change))
            .await?;
        Ok(Response::new((&s).into()))
    }

    async fn refresh_intel_list(
        &self,
        req: Request<pb::RefreshIntelListRequest>,
    ) -> Result<Response<pb::IntelStatus>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let category = Category::parse("category", &req.into_inner().category).map_err(invalid)?;
        let s = self
            .call(move |s| s.intel.refresh(&actor, category))
            .await?;
        Ok(Response::new((&s).into()))
    }

    async fn change_intel_allow(
        &self,
        req: Request<pb::ChangeIntelAllowRequest>,
    ) -> Result<Response<pb::IntelStatus>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let cidrs = parse_cidrs(&r.cidrs)
            .map_err(|source| ValidationError::Blocklist {
                field: "cidrs",
                source,
            })
            .map_err(invalid)?;
        let s = self
            .call(move |s| s.intel.allow(&actor, &cidrs, r.remove))
            .await?;
        Ok(Response::new((&s).into()))
    }
}

/// The category and change of a `SetIntelSource` request.
fn source_change(
    r: pb::SetIntelSourceRequest,
) -> Result<(Category, SourceChange), ValidationError> {
    let category = Category::parse("category", &r.category)?;
    if !r.on {
        for (field, given) in [
            ("file", !r.file.is_empty()),
            ("url", !r.url.is_empty()),
            ("refresh_seconds", r.refresh_seconds != 0),
            ("allow_private", r.allow_private),
        ] {
            if given {
                return Err(ValidationError::Value {
                    field,
                    reason: "must be empty when turning a category off (on: false)".into(),
                });
            }
        }
        return Ok((category, SourceChange::Off));
    }
    let source = match (r.file.is_empty(), r.url.is_empty()) {
        (false, false) => {
            return Err(ValidationError::Conflict {
                field: "file",
                other: "url",
            });
        }
        (false, true) => Some(Source::File(r.file.into())),
        (true, false) => Some(Source::Url(r.url)),
        (true, true) => None,
    };
    if let Some(s) = &source {
        s.validate()?;
    }
    Ok((
        category,
        SourceChange::On {
            source,
            refresh: (r.refresh_seconds != 0)
                .then(|| Duration::from_secs(u64::from(r.refresh_seconds))),
            allow_private: r.allow_private,
        },
    ))
}

impl From<&IntelListView> for pb::IntelList {
    fn from(l: &IntelListView) -> pb::IntelList {
        pb::IntelList {
            name: l.name.clone(),
            on: l.on,
            enforced: l.enforced,
            source_kind: l.source_kind.clone(),
            source: l.source.clone(),
            refresh_seconds: u32::try_from(l.refresh_secs).unwrap_or(u32::MAX),
            allow_private: l.allow_private,
            entry_count: l.entries,
            loaded_at: l.loaded_at,
            next_refresh: l.next_refresh,
            last_error: l.last_error.clone(),
            last_error_at: l.last_error_at,
            hit_packets: l.hits.packets,
            hit_bytes: l.hits.bytes,
        }
    }
}

impl From<&IntelStatus> for pb::IntelStatus {
    fn from(s: &IntelStatus) -> pb::IntelStatus {
        pb::IntelStatus {
            enabled: s.enabled,
            lists: s.lists.iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::IntelStatus> for IntelStatus {
    fn from(s: pb::IntelStatus) -> IntelStatus {
        IntelStatus {
            enabled: s.enabled,
            lists: s
                .lists
                .into_iter()
                .map(|l| IntelListView {
                    name: l.name,
                    on: l.on,
                    enforced: l.enforced,
                    source_kind: l.source_kind,
                    source: l.source,
                    refresh_secs: u64::from(l.refresh_seconds),
                    allow_private: l.allow_private,
                    entries: l.entry_count,
                    loaded_at: l.loaded_at,
                    next_refresh: l.next_refresh,
                    last_error: l.last_error,
                    last_error_at: l.last_error_at,
                    hits: Traffic {
                        packets: l.hit_packets,
                        bytes: l.hit_bytes,
                    },
                })
                .collect(),
        }
    }
}

impl Client {
    fn intel_client(&self) -> IpIntelClient<tonic::transport::Channel> {
        IpIntelClient::new(self.channel.clone())
    }

    /// IP intelligence's switch and lists.
    pub async fn intel(&self) -> Result<IntelStatus, ClientError> {
        let r = self
            .intel_client()
            .get_intel(self.req(pb::GetIntelRequest {}))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Turns IP intelligence on or off.
    pub async fn set_intel_enabled(&self, enabled: bool) -> Result<IntelStatus, ClientError> {
        let r = self
            .intel_client()
            .set_intel_enabled(self.req(pb::SetIntelEnabledRequest { enabled }))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Sets a category's source and turns it on (`on`), or turns it off.
    pub async fn set_intel_source(
        &self,
        req: pb::SetIntelSourceRequest,
    ) -> Result<IntelStatus, ClientError> {
        let r = self.intel_client().set_intel_source(self.req(req)).await?;
        Ok(r.into_inner().into())
    }

    /// Reloads a category's list from its source now.
    pub async fn refresh_intel_list(&self, category: &str) -> Result<IntelStatus, ClientError> {
        let r = self
            .intel_client()
            .refresh_intel_list(self.req(pb::RefreshIntelListRequest {
                category: category.to_owned(),
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Adds CIDRs to the allow list, or removes them.
    pub async fn change_intel_allow(
        &self,
        cidrs: Vec<String>,
        remove: bool,
    ) -> Result<IntelStatus, ClientError> {
        let r = self
            .intel_client()
            .change_intel_allow(self.req(pb::ChangeIntelAllowRequest { cidrs, remove }))
            .await?;
        Ok(r.into_inner().into())
    }
}
