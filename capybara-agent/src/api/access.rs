//! The `ApiAccess` service (`capybara api enable|disable|status`), the live TCP listener it
//! controls ([`TcpControl`]), and its client calls.
//!
//! Enabling binds the new address and builds its server (TLS files read and checked) first;
//! only then is the setting stored (`service::access`) and the old listener stopped (its calls
//! in flight finish, this one included when it came over it). So a refused enable (address in
//! use, unreadable certificate, a plain network address without `insecure`) changes nothing.
//! `GetApiAccess` needs read, `EnableApi` and `DisableApi` admin.

use std::{net::SocketAddr, path::PathBuf};

use capybara_proto::v1::{self as pb, api_access_client::ApiAccessClient, api_access_server};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    handler::Api,
    server::{TlsIdentity, router},
    status::invalid,
};
use crate::service::{
    access::{ApiAccess, DEFAULT_RATE_LIMIT},
    domain::{Scope, ValidationError},
};

/// The default address of `capybara api enable`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

/// Where a running TCP listener's setting came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `capybara api enable` (stored).
    Store,
    /// `--api-listen` at start.
    Flag,
}

#[derive(Debug)]
struct RunningTcp {
    access: ApiAccess,
    bound: SocketAddr,
    source: Source,
    stop: tokio::sync::watch::Sender<bool>,
}

/// The TCP listener, swapped while the agent runs.
#[derive(Debug, Default)]
pub struct TcpControl {
    running: tokio::sync::Mutex<Option<RunningTcp>>,
}

/// A TCP server built and ready to start: its listener bound, its TLS files read and checked.
pub struct Prepared {
    listener: tokio::net::TcpListener,
    server: super::server::TimedRouter,
    access: ApiAccess,
    bound: SocketAddr,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

/// Builds the server `access` describes on `listener` (nothing is started or stopped).
pub async fn prepare(
    api: &Api,
    listener: tokio::net::TcpListener,
    access: ApiAccess,
) -> Result<Prepared, Status> {
    prepare_with(api, listener, access, None).await
}

/// [`prepare`] with the TLS identity already read (`--api-tls-cert/--api-tls-key` at start);
/// without one, the files `access` names are read.
pub async fn prepare_with(
    api: &Api,
    listener: tokio::net::TcpListener,
    access: ApiAccess,
    identity: Option<TlsIdentity>,
) -> Result<Prepared, Status> {
    let tls_field = |e: &super::ApiError| match e {
        super::ApiError::TlsFile { what: "key", .. } => "tls_key",
        _ => "tls_cert",
    };
    let tls = match identity {
        Some(id) => Some(id),
        None => access
            .tls
            .as_ref()
            .map(|(cert, key)| {
                TlsIdentity::from_files(cert, key).map_err(|e| {
                    invalid(ValidationError::Value {
                        field: tls_field(&e),
                        reason: super::status::error_chain(&e),
                    })
                })
            })
            .transpose()?,
    };
    let server = router(api, tls.as_ref()).await.map_err(|e| {
        invalid(ValidationError::Value {
            field: "tls_cert",
            reason: format!(
                "not a usable certificate and key: {}",
                super::status::error_chain(&e)
            ),
        })
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| Status::internal(format!("listener: {e}")))?;
    Ok(Prepared {
        listener,
        server,
        access,
        bound,
    })
}

impl TcpControl {
    /// Starts `p`, then stops the listener that ran before (its calls in flight finish).
    pub async fn start(&self, api: &Api, p: Prepared, source: Source) -> SocketAddr {
        let Prepared {
            listener,
            server,
            access,
            bound,
        } = p;
        api.limits().set_per_token(access.rate_limit);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tracing::info!(addr = %bound, tls = access.tls.is_some(), "API listening on TCP (gRPC and REST, bearer tokens)");
        if access.is_insecure() {
            tracing::warn!(
                addr = %bound,
                "the API listens on {bound} WITHOUT TLS: bearer tokens, and the keys some calls \
                 return, cross the network in clear text"
            );
        }
        tokio::spawn(async move {
            let signal = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = server.serve_with_incoming_shutdown(incoming, signal).await {
                tracing::error!(addr = %bound, error = %e, "the TCP API failed");
            }
        });
        let old = self.running.lock().await.replace(RunningTcp {
            access,
            bound,
            source,
            stop,
        });
        if let Some(old) = old {
            let _ = old.stop.send(true);
        }
        bound
    }

    /// Stops the TCP listener (its calls in flight finish).
    pub async fn stop(&self) {
        if let Some(old) = self.running.lock().await.take() {
            let _ = old.stop.send(true);
        }
    }

    async fn status(&self) -> pb::ApiAccessStatus {
        let running = self.running.lock().await;
        let Some(r) = running.as_ref() else {
            return pb::ApiAccessStatus::default();
        };
        let (cert, key) = r.access.tls.clone().unwrap_or_default();
        pb::ApiAccessStatus {
            enabled: true,
            listen: r.bound.to_string(),
            tls: r.access.tls.is_some(),
            tls_cert: cert.display().to_string(),
            tls_key: key.display().to_string(),
            insecure: r.access.insecure,
            rate_limit: r.access.rate_limit,
            source: match r.source {
                Source::Store => "store",
                Source::Flag => "flag",
            }
            .into(),
        }
    }
}

/// The setting an `EnableApiRequest` asks for (checked: the error names the field).
fn access_of(r: &pb::EnableApiRequest) -> Result<ApiAccess, ValidationError> {
    let listen = if r.listen.is_empty() {
        DEFAULT_LISTEN
    } else {
        &r.listen
    };
    let listen: SocketAddr = listen.parse().map_err(|_| ValidationError::Value {
        field: "listen",
        reason: format!("{listen:?} is not host:port (e.g. 127.0.0.1:7443, [::1]:7443)"),
    })?;
    let tls = match (r.tls_cert.is_empty(), r.tls_key.is_empty()) {
        (true, true) => None,
        (false, false) => Some((PathBuf::from(&r.tls_cert), PathBuf::from(&r.tls_key))),
        (true, false) => return Err(ValidationError::Missing { field: "tls_cert" }),
        (false, true) => return Err(ValidationError::Missing { field: "tls_key" }),
    };
    let access = ApiAccess {
        listen,
        tls,
        insecure: r.insecure,
        rate_limit: r.rate_limit.unwrap_or(DEFAULT_RATE_LIMIT),
    };
    access.check()?;
    Ok(access)
}

#[tonic::async_trait]
impl api_access_server::ApiAccess for Api {
    async fn get_api_access(
        &self,
        req: Request<pb::GetApiAccessRequest>,
    ) -> Result<Response<pb::ApiAccessStatus>, Status> {
        self.auth(&req, Scope::Read)?;
        Ok(Response::new(self.tcp().status().await))
    }

    async fn enable_api(
        &self,
        req: Request<pb::EnableApiRequest>,
    ) -> Result<Response<pb::ApiAccessStatus>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        let access = access_of(req.get_ref()).map_err(invalid)?;
        let listener = tokio::net::TcpListener::bind(access.listen)
            .await
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "listen: cannot listen on {}: {e}",
                    access.listen
                ))
            })?;
        let prepared = prepare(self, listener, access.clone()).await?;
        // Stored as asked (port 0 stays 0: a free port at each start).
        self.call(move |s| s.access.set(&actor, Some(&access)))
            .await?;
        self.tcp().start(self, prepared, Source::Store).await;
        Ok(Response::new(self.tcp().status().await))
    }

    async fn disable_api(
        &self,
        req: Request<pb::DisableApiRequest>,
    ) -> Result<Response<pb::ApiAccessStatus>, Status> {
        let actor = self.auth(&req, Scope::Admin)?;
        self.call(move |s| s.access.set(&actor, None)).await?;
        self.tcp().stop().await;
        Ok(Response::new(self.tcp().status().await))
    }
}

/// The TCP API's state as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AccessStatus {
    /// Serving.
    pub enabled: bool,
    /// The bound address.
    pub listen: Option<String>,
    /// TLS certificate and key files.
    pub tls: Option<(String, String)>,
    /// A plain network address was allowed.
    pub insecure: bool,
    /// Calls per second per token; 0 = unlimited.
    pub rate_limit: u32,
    /// `store` or `flag`.
    pub source: Option<String>,
}

impl From<pb::ApiAccessStatus> for AccessStatus {
    fn from(s: pb::ApiAccessStatus) -> AccessStatus {
        let some = |v: String| (!v.is_empty()).then_some(v);
        AccessStatus {
            enabled: s.enabled,
            listen: some(s.listen),
            tls: s.tls.then_some((s.tls_cert, s.tls_key)),
            insecure: s.insecure,
            rate_limit: s.rate_limit,
            source: some(s.source),
        }
    }
}

/// What `capybara api enable` asks for.
#[derive(Clone, Debug, Default)]
pub struct EnableApi {
    /// host:port; `None` = [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// TLS certificate and key files on the agent's host.
    pub tls: Option<(String, String)>,
    /// Allow a plain network address.
    pub insecure: bool,
    /// Calls per second per token; `None` = the default, 0 = unlimited.
    pub rate_limit: Option<u32>,
}

impl Client {
    /// The TCP API's state.
    pub async fn api_access(&self) -> Result<AccessStatus, ClientError> {
        let r = ApiAccessClient::new(self.channel.clone())
            .get_api_access(self.req(pb::GetApiAccessRequest {}))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Serves the TCP API as `e` says.
    pub async fn enable_api(&self, e: EnableApi) -> Result<AccessStatus, ClientError> {
        let (tls_cert, tls_key) = e.tls.unwrap_or_default();
        let r = ApiAccessClient::new(self.channel.clone())
            .enable_api(self.req(pb::EnableApiRequest {
                listen: e.listen.unwrap_or_default(),
                tls_cert,
                tls_key,
                insecure: e.insecure,
                rate_limit: e.rate_limit,
            }))
            .await?;
        Ok(r.into_inner().into())
    }

    /// Stops the TCP API.
    pub async fn disable_api(&self) -> Result<AccessStatus, ClientError> {
        let r = ApiAccessClient::new(self.channel.clone())
            .disable_api(self.req(pb::DisableApiRequest {}))
            .await?;
        Ok(r.into_inner().into())
    }
}
