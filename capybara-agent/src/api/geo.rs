//! The `Geo` service (country block and allow policies), its conversions and client calls.

use capybara_proto::v1::{self as pb, geo_client::GeoClient, geo_server::Geo};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::AnswerError,
    handler::Api,
    status::invalid,
};
use crate::service::{
    GeoStatus,
    domain::{Scope, ValidationError},
    geo::{GeoDbInfo, GeoMode, GeoPolicy},
};

#[tonic::async_trait]
impl Geo for Api {
    async fn get_geo(
        &self,
        req: Request<pb::GetGeoRequest>,
    ) -> Result<Response<pb::GeoStatus>, Status> {
        self.auth(&req, Scope::Read)?;
        let g = self.call(|s| s.geo.status()).await?;
        Ok(Response::new((&g).into()))
    }

    async fn set_geo(
        &self,
        req: Request<pb::SetGeoRequest>,
    ) -> Result<Response<pb::GeoStatus>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let policy = GeoPolicy::try_from(req.into_inner()).map_err(invalid)?;
        let g = self.call(move |s| s.geo.set(&actor, &policy)).await?;
        Ok(Response::new((&g).into()))
    }

    async fn update_geo_db(
        &self,
        req: Request<pb::UpdateGeoDbRequest>,
    ) -> Result<Response<pb::GeoStatus>, Status> {
        // Admin: the agent reads a file of the caller's choosing.
        let actor = self.auth(&req, Scope::Admin)?;
        let file = req.into_inner().file;
        if file.is_empty() {
            return Err(invalid(ValidationError::Missing { field: "file" }));
        }
        let g = self
            .call(move |s| s.geo.update(&actor, std::path::Path::new(&file)))
            .await?;
        Ok(Response::new((&g).into()))
    }
}

/// The geo policy of a `SetGeo` request.
impl TryFrom<pb::SetGeoRequest> for GeoPolicy {
    type Error = ValidationError;
    fn try_from(r: pb::SetGeoRequest) -> Result<GeoPolicy, ValidationError> {
        let countries = r
            .countries
            .iter()
            .map(|c| crate::service::domain::country("countries", c))
            .collect::<Result<Vec<_>, _>>()?;
        match pb::GeoMode::try_from(r.mode) {
            Ok(pb::GeoMode::Off) if countries.is_empty() => Ok(GeoPolicy::Off),
            Ok(pb::GeoMode::Off) => Err(ValidationError::Time {
                field: "countries",
                reason: "must be empty with mode off",
            }),
            Ok(pb::GeoMode::Block) if !countries.is_empty() => Ok(GeoPolicy::Block(countries)),
            Ok(pb::GeoMode::Allow) if !countries.is_empty() => Ok(GeoPolicy::Allow(countries)),
            Ok(pb::GeoMode::Block | pb::GeoMode::Allow) => {
                Err(ValidationError::Missing { field: "countries" })
            }
            _ => Err(ValidationError::Missing { field: "mode" }),
        }
    }
}

fn geo_mode_to_proto(mode: GeoMode) -> pb::GeoMode {
    match mode {
        GeoMode::Off => pb::GeoMode::Off,
        GeoMode::Block => pb::GeoMode::Block,
        GeoMode::Allow => pb::GeoMode::Allow,
    }
}

impl From<&GeoStatus> for pb::GeoStatus {
    fn from(g: &GeoStatus) -> pb::GeoStatus {
        pb::GeoStatus {
            mode: geo_mode_to_proto(g.mode) as i32,
            countries: g.countries.clone(),
            lists: g.lists.iter().map(Into::into).collect(),
            database: g.database.as_ref().map(|d| pb::GeoDatabase {
                path: d.path.clone(),
                database_type: d.database_type.clone(),
                build_epoch: d.build_epoch,
                countries: d.countries,
                loaded_at: d.loaded_at,
                last_error: d.last_error.clone(),
            }),
        }
    }
}

impl TryFrom<pb::GeoStatus> for GeoStatus {
    type Error = AnswerError;
    fn try_from(g: pb::GeoStatus) -> Result<GeoStatus, AnswerError> {
        Ok(GeoStatus {
            mode: match pb::GeoMode::try_from(g.mode) {
                Ok(pb::GeoMode::Block) => GeoMode::Block,
                Ok(pb::GeoMode::Allow) => GeoMode::Allow,
                Ok(pb::GeoMode::Off) => GeoMode::Off,
                _ => return Err(AnswerError::Invalid { field: "geo.mode" }),
            },
            countries: g.countries,
            lists: g
                .lists
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            database: g.database.map(|d| GeoDbInfo {
                path: d.path,
                database_type: d.database_type,
                build_epoch: d.build_epoch,
                countries: d.countries,
                loaded_at: d.loaded_at,
                last_error: d.last_error,
            }),
        })
    }
}

impl Client {
    /// The geo policy.
    pub async fn geo(&self) -> Result<GeoStatus, ClientError> {
        let r = GeoClient::new(self.channel.clone())
            .get_geo(self.req(pb::GetGeoRequest {}))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// Sets the geo policy: `mode` is a [`GeoMode`] by name (another name reaches the agent as
    /// no mode, which refuses it naming the field); the agent checks the countries.
    pub async fn set_geo(
        &self,
        mode: &str,
        countries: Vec<String>,
    ) -> Result<GeoStatus, ClientError> {
        let mode = mode
            .parse()
            .map_or(pb::GeoMode::Unspecified, geo_mode_to_proto);
        let r = GeoClient::new(self.channel.clone())
            .set_geo(self.req(pb::SetGeoRequest {
                mode: mode as i32,
                countries,
            }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// Loads a new country database from `file` (a path on the agent's machine).
    pub async fn update_geo_db(&self, file: String) -> Result<GeoStatus, ClientError> {
        let r = GeoClient::new(self.channel.clone())
            .update_geo_db(self.req(pb::UpdateGeoDbRequest { file }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }
}
