//! Health: the standard `grpc.health.v1` service reports every `capybara.v1` service serving
//! and each component of the agent (`service::health`) as `capybara.<component>`, refreshed
//! every `HEALTH_INTERVAL`; and the client call that asks it. The standard service carries no
//! detail, so the `Components` service (`ListComponents`, read scope) answers each component's
//! status with what was found, as `service::health` checked it at the call.

use std::sync::Arc;

use capybara_proto::v1::{
    self as pb, components_client::ComponentsClient, components_server::Components,
};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    handler::Api,
};
use crate::service::{
    Service,
    domain::Scope,
    health::{ComponentHealth, HEALTH_INTERVAL},
};

impl From<ComponentHealth> for pb::ComponentHealth {
    fn from(c: ComponentHealth) -> pb::ComponentHealth {
        pb::ComponentHealth {
            name: c.name,
            ok: c.ok,
            detail: c.detail,
        }
    }
}

impl From<pb::ComponentHealth> for ComponentHealth {
    fn from(c: pb::ComponentHealth) -> ComponentHealth {
        ComponentHealth {
            name: c.name,
            ok: c.ok,
            detail: c.detail,
        }
    }
}

#[tonic::async_trait]
impl Components for Api {
    async fn list_components(
        &self,
        req: Request<pb::ListComponentsRequest>,
    ) -> Result<Response<pb::ListComponentsResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        // A transition seen here is reported (`server-down` / `server-up`), once.
        let components = self.call(|s| Ok(s.health.check_and_report())).await?;
        Ok(Response::new(pb::ListComponentsResponse {
            components: components.into_iter().map(Into::into).collect(),
        }))
    }
}

/// Publishes the components' health (`capybara.store`, `capybara.dataplane`, `capybara.tunnel`, `capybara.history`, `capybara.uplink`; `""` serving only
/// when all are)
/// now and every `HEALTH_INTERVAL` while the service lives (the task holds it only weakly).
pub(super) async fn publish(reporter: &tonic_health::server::HealthReporter, svc: &Arc<Service>) {
    publish_health(reporter, svc.clone()).await;
    let (reporter, weak) = (reporter.clone(), Arc::downgrade(svc));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(svc) = weak.upgrade() else { break };
            publish_health(&reporter, svc).await;
        }
    });
}

async fn publish_health(reporter: &tonic_health::server::HealthReporter, svc: Arc<Service>) {
    use tonic_health::ServingStatus;
    let Ok(components) = tokio::task::spawn_blocking(move || svc.health.check_and_report()).await
    else {
        return;
    };
    let status = |ok| {
        if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    for c in &components {
        if !c.ok {
            tracing::warn!(component = %c.name, detail = %c.detail, "unhealthy");
        }
        reporter
            .set_service_status(format!("capybara.{}", c.name), status(c.ok))
            .await;
    }
    reporter
        .set_service_status("", status(components.iter().all(|c| c.ok)))
        .await;
}

impl Client {
    /// The standard health check of `service` (`""` = the whole agent): `true` when serving.
    pub async fn health(&self, service: &str) -> Result<bool, ClientError> {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let r = HealthClient::new(self.channel.clone())
            .check(self.req(HealthCheckRequest {
                service: service.into(),
            }))
            .await?
            .into_inner();
        Ok(r.status == ServingStatus::Serving as i32)
    }

    /// Each component's health with its detail, checked now (`ListComponents`).
    pub async fn components(&self) -> Result<Vec<ComponentHealth>, ClientError> {
        let r = ComponentsClient::new(self.channel.clone())
            .list_components(self.req(pb::ListComponentsRequest {}))
            .await?
            .into_inner();
        Ok(r.components.into_iter().map(Into::into).collect())
    }
}
