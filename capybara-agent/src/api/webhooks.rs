//! The `Webhooks` service (endpoints, deliveries, retries), its conversions and client calls.
//!
//! Scopes: read for `ListWebhooks`, `GetWebhook`, `ListDeliveries`; admin for `AddWebhook` and
//! `RotateWebhookSecret` (they answer a signing secret, as `CreateToken` does, and choose where
//! the agent sends its users' names and addresses); write for `DeleteWebhook`,
//! `EnableWebhook`, `DisableWebhook`, `TestWebhook`, `RetryDelivery`. Every change is audited
//! (`webhook.add`, …), never with the secret.

use capybara_proto::v1::{self as pb, webhooks_client::WebhooksClient, webhooks_server};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::{AnswerError, need, opt_secs, secs_opt},
    handler::Api,
    status::invalid,
};
use crate::service::{
    domain::{Scope, ValidationError},
    notify::NotifyKind,
    webhooks::{
        Delivery, DeliveryId, DeliveryStatus, EventSet, NewWebhook, Webhook, WebhookId,
        sign::Secret, ssrf,
    },
};

/// The most deliveries one `ListDeliveries` answers.
pub const MAX_DELIVERIES: usize = 1000;

fn opt_secret(field: &'static str, s: &str) -> Result<Option<Secret>, ValidationError> {
    if s.is_empty() {
        Ok(None)
    } else {
        Secret::parse(field, s).map(Some)
    }
}

#[tonic::async_trait]
impl webhooks_server::Webhooks for Api {
    async fn add_webhook(
        &self,
        req: Request<pb::AddWebhookRequest>,
    ) -> Result<Response<pb::AddWebhookResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let r = req.into_inner();
        let url = ssrf::parse_url(&r.url).map_err(invalid)?;
        let events = EventSet::parse(&r.events, r.all).map_err(invalid)?;
        let secret = opt_secret("secret", &r.secret).map_err(invalid)?;
        let svc = self.service();
        svc.webhooks
            .check_url(&url, r.allow_private)
            .await
            .map_err(super::status::status_of)?;
        let new = NewWebhook {
            url,
            events,
            secret,
            allow_private: r.allow_private,
        };
        let (hook, secret) = self.call(move |s| s.webhooks.add(&actor, new)).await?;
        Ok(Response::new(pb::AddWebhookResponse {
            webhook: Some((&hook).into()),
            secret,
        }))
    }

    async fn list_webhooks(
        &self,
        req: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let hooks = self.call(|s| s.webhooks.list()).await?;
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: hooks.iter().map(Into::into).collect(),
        }))
    }

    async fn get_webhook(
        &self,
        req: Request<pb::GetWebhookRequest>,
    ) -> Result<Response<pb::GetWebhookResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let id = WebhookId::parse("id", &req.get_ref().id).map_err(invalid)?;
        let hook = self.call(move |s| s.webhooks.get(&id)).await?;
        Ok(Response::new(pb::GetWebhookResponse {
            webhook: Some((&hook).into()),
        }))
    }

    async fn test_webhook(
        &self,
        req: Request<pb::TestWebhookRequest>,
    ) -> Result<Response<pb::TestWebhookResponse>, Status> {
        self.auth(&req, Scope::Write)?;
        let id = WebhookId::parse("id", &req.get_ref().id).map_err(invalid)?;
        let dlv = self.call(move |s| s.webhooks.test(&id)).await?;
        let svc = self.service();
        let got = svc
            .webhooks
            .wait_first_attempt(&dlv)
            .await
            .map_err(super::status::status_of)?;
        let queued = got.is_none();
        let delivery = got.unwrap_or_else(|| Delivery {
            id: dlv.to_string(),
            event_id: String::new(),
            event: NotifyKind::WebhookTest,
            status: DeliveryStatus::Retrying,
            attempts: 0,
            status_code: None,
            error: None,
            last_attempt_ms: 0,
            next_attempt_ms: None,
        });
        Ok(Response::new(pb::TestWebhookResponse {
            delivery: Some((&delivery).into()),
            queued,
        }))
    }

    async fn delete_webhook(
        &self,
        req: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let id = WebhookId::parse("id", &req.get_ref().id).map_err(invalid)?;
        let hook = self.call(move |s| s.webhooks.delete(&actor, &id)).await?;
        Ok(Response::new(pb::DeleteWebhookResponse {
            webhook: Some((&hook).into()),
        }))
    }

    async fn enable_webhook(
        &self,
        req: Request<pb::EnableWebhookRequest>,
    ) -> Result<Response<pb::EnableWebhookResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let id = WebhookId::parse("id", &req.get_ref().id).map_err(invalid)?;
        let hook = self
            .call(move |s| s.webhooks.set_enabled(&actor, &id, true))
            .await?;
        Ok(Response::new(pb::EnableWebhookResponse {
            webhook: Some((&hook).into()),
        }))
    }

    async fn disable_webhook(
        &self,
        req: Request<pb::DisableWebhookRequest>,
    ) -> Result<Response<pb::DisableWebhookResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let id = WebhookId::parse("id", &req.get_ref().id).map_err(invalid)?;
        let hook = self
            .call(move |s| s.webhooks.set_enabled(&actor, &id, false))
            .await?;
        Ok(Response::new(pb::DisableWebhookResponse {
            webhook: Some((&hook).into()),
        }))
    }

    async fn rotate_webhook_secret(
        &self,
        req: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let r = req.into_inner();
        let id = WebhookId::parse("id", &r.id).map_err(invalid)?;
        let secret = opt_secret("secret", &r.secret).map_err(invalid)?;
        let (hook, secret) = self
            .call(move |s| s.webhooks.rotate_secret(&actor, &id, secret))
            .await?;
        Ok(Response::new(pb::RotateWebhookSecretResponse {
            webhook: Some((&hook).into()),
            secret,
        }))
    }

    async fn list_deliveries(
        &self,
        req: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.into_inner();
        let id = WebhookId::parse("id", &r.id).map_err(invalid)?;
        let limit = match r.limit {
            0 => 100,
            n => (n as usize).min(MAX_DELIVERIES),
        };
        let list = self
            .call(move |s| s.webhooks.deliveries(&id, r.failed, limit))
            .await?;
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries: list.iter().map(Into::into).collect(),
        }))
    }

    async fn retry_delivery(
        &self,
        req: Request<pb::RetryDeliveryRequest>,
    ) -> Result<Response<pb::RetryDeliveryResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let id = DeliveryId::parse("id", &req.get_ref().id).map_err(invalid)?;
        let new = self.call(move |s| s.webhooks.retry(&actor, &id)).await?;
        Ok(Response::new(pb::RetryDeliveryResponse {
            delivery: new.to_string(),
        }))
    }
}

impl From<&Webhook> for pb::Webhook {
    fn from(w: &Webhook) -> pb::Webhook {
        pb::Webhook {
            id: w.id.to_string(),
            url: w.url.clone(),
            events: w.events.names(),
            allow_private: w.allow_private,
            enabled: w.enabled,
            disabled_reason: w.disabled_reason.clone().unwrap_or_default(),
            created_at: w.created_at as i64,
            secret_fingerprint: w.secret_fingerprint.clone(),
            previous_secret_until: opt_secs(w.previous_secret_until),
        }
    }
}

impl TryFrom<pb::Webhook> for Webhook {
    type Error = AnswerError;
    fn try_from(w: pb::Webhook) -> Result<Webhook, AnswerError> {
        let events = if w.events == ["*"] {
            EventSet::All
        } else {
            EventSet::parse(&w.events, false)?
        };
        Ok(Webhook {
            id: WebhookId::parse("webhook.id", &w.id)?,
            url: w.url,
            events,
            allow_private: w.allow_private,
            enabled: w.enabled,
            disabled_reason: (!w.disabled_reason.is_empty()).then_some(w.disabled_reason),
            created_at: w.created_at.max(0) as u64,
            secret_fingerprint: w.secret_fingerprint,
            previous_secret_until: secs_opt(w.previous_secret_until),
        })
    }
}

impl From<&Delivery> for pb::Delivery {
    fn from(d: &Delivery) -> pb::Delivery {
        pb::Delivery {
            id: d.id.clone(),
            event_id: d.event_id.clone(),
            event: d.event.as_str().to_owned(),
            status: d.status.as_str().to_owned(),
            attempts: d.attempts,
            status_code: d.status_code.map_or(0, u32::from),
            error: d.error.clone().unwrap_or_default(),
            last_attempt_ms: d.last_attempt_ms as i64,
            next_attempt_ms: d.next_attempt_ms.map_or(0, |t| t as i64),
        }
    }
}

impl TryFrom<pb::Delivery> for Delivery {
    type Error = AnswerError;
    fn try_from(d: pb::Delivery) -> Result<Delivery, AnswerError> {
        let status = [
            DeliveryStatus::Retrying,
            DeliveryStatus::Delivered,
            DeliveryStatus::Dead,
            DeliveryStatus::Retried,
            DeliveryStatus::Gone,
        ]
        .into_iter()
        .find(|s| s.as_str() == d.status)
        .ok_or(AnswerError::Invalid {
            field: "delivery.status",
        })?;
        let event = if d.event == NotifyKind::WebhookTest.as_str() {
            NotifyKind::WebhookTest
        } else {
            NotifyKind::parse("delivery.event", &d.event)?
        };
        Ok(Delivery {
            id: d.id,
            event_id: d.event_id,
            event,
            status,
            attempts: d.attempts,
            status_code: (d.status_code != 0).then_some(d.status_code as u16),
            error: (!d.error.is_empty()).then_some(d.error),
            last_attempt_ms: d.last_attempt_ms.max(0) as u64,
            next_attempt_ms: (d.next_attempt_ms > 0).then_some(d.next_attempt_ms as u64),
        })
    }
}

impl Client {
    fn webhooks(&self) -> WebhooksClient<tonic::transport::Channel> {
        WebhooksClient::new(self.channel.clone())
    }

    /// Adds a webhook; answers it and its secret (shown once).
    pub async fn add_webhook(
        &self,
        req: pb::AddWebhookRequest,
    ) -> Result<(Webhook, String), ClientError> {
        let r = self
            .webhooks()
            .add_webhook(self.req(req))
            .await?
            .into_inner();
        Ok((need("webhook", r.webhook)?.try_into()?, r.secret))
    }

    /// Every webhook.
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, ClientError> {
        let r = self
            .webhooks()
            .list_webhooks(self.req(pb::ListWebhooksRequest {}))
            .await?
            .into_inner();
        Ok(r.webhooks
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// One webhook.
    pub async fn get_webhook(&self, id: &str) -> Result<Webhook, ClientError> {
        let r = self
            .webhooks()
            .get_webhook(self.req(pb::GetWebhookRequest { id: id.into() }))
            .await?
            .into_inner();
        Ok(need("webhook", r.webhook)?.try_into()?)
    }

    /// Sends a test event; answers its delivery after the first attempt and whether it is
    /// still queued behind other events.
    pub async fn test_webhook(&self, id: &str) -> Result<(Delivery, bool), ClientError> {
        let r = self
            .webhooks()
            .test_webhook(self.req(pb::TestWebhookRequest { id: id.into() }))
            .await?
            .into_inner();
        Ok((need("delivery", r.delivery)?.try_into()?, r.queued))
    }

    /// Deletes a webhook.
    pub async fn delete_webhook(&self, id: &str) -> Result<Webhook, ClientError> {
        let r = self
            .webhooks()
            .delete_webhook(self.req(pb::DeleteWebhookRequest { id: id.into() }))
            .await?
            .into_inner();
        Ok(need("webhook", r.webhook)?.try_into()?)
    }

    /// Enables or disables a webhook.
    pub async fn set_webhook_enabled(&self, id: &str, on: bool) -> Result<Webhook, ClientError> {
        let w = if on {
            self.webhooks()
                .enable_webhook(self.req(pb::EnableWebhookRequest { id: id.into() }))
                .await?
                .into_inner()
                .webhook
        } else {
            self.webhooks()
                .disable_webhook(self.req(pb::DisableWebhookRequest { id: id.into() }))
                .await?
                .into_inner()
                .webhook
        };
        Ok(need("webhook", w)?.try_into()?)
    }

    /// Rotates a webhook's secret; answers it and the new secret (shown once).
    pub async fn rotate_webhook_secret(
        &self,
        id: &str,
        secret: &str,
    ) -> Result<(Webhook, String), ClientError> {
        let r = self
            .webhooks()
            .rotate_webhook_secret(self.req(pb::RotateWebhookSecretRequest {
                id: id.into(),
                secret: secret.into(),
            }))
            .await?
            .into_inner();
        Ok((need("webhook", r.webhook)?.try_into()?, r.secret))
    }

    /// A webhook's newest deliveries (`failed`: dead letters and retrying ones).
    pub async fn list_deliveries(
        &self,
        id: &str,
        failed: bool,
        limit: u32,
    ) -> Result<Vec<Delivery>, ClientError> {
        let r = self
            .webhooks()
            .list_deliveries(self.req(pb::ListDeliveriesRequest {
                id: id.into(),
                failed,
                limit,
            }))
            .await?
            .into_inner();
        Ok(r.deliveries
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?)
    }

    /// Sends a dead letter again; answers the new delivery's id.
    pub async fn retry_delivery(&self, id: &str) -> Result<String, ClientError> {
        Ok(self
            .webhooks()
            .retry_delivery(self.req(pb::RetryDeliveryRequest { id: id.into() }))
            .await?
            .into_inner()
            .delivery)
    }
}
