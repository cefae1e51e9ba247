//! The gRPC client the CLI uses: connects over the control socket (root, no token) or TCP with a
//! bearer token, and answers in domain types. Each feature's calls are in its own file.

use std::path::PathBuf;

use tonic::{Request, Status, metadata::MetadataValue, transport::Channel};

use super::convert::AnswerError;

/// Where the agent is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// The control socket.
    Unix(PathBuf),
    /// `http://host:port` or `https://host:port` with a bearer token.
    Tcp {
        /// The URL.
        url: String,
        /// The bearer token (`capy_…`).
        token: Option<String>,
        /// PEM of the CA that signed the agent's certificate (needed for `https://`).
        ca_cert: Option<Vec<u8>>,
    },
}

/// Errors of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("cannot connect to the agent at {endpoint}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The endpoint URL is not valid.
    #[error("invalid endpoint {endpoint:?}")]
    Endpoint {
        /// The URL.
        endpoint: String,
    },
    /// An `https://` endpoint without the CA certificate to check it with.
    #[error("an https:// endpoint needs --ca-cert FILE (the CA of the agent's certificate)")]
    NoCa,
    /// The token cannot be sent as a header.
    #[error("the token contains characters that cannot be sent in a header")]
    Token,
    /// The agent answered with an error.
    #[error("{}", .0.message())]
    Status(#[from] Status),
    /// The agent's answer does not make sense.
    #[error(transparent)]
    Answer(#[from] AnswerError),
}

/// A connected client.
#[derive(Clone, Debug)]
pub struct Client {
    pub(super) channel: Channel,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// Connects to the agent.
    pub async fn connect(endpoint: &Endpoint) -> Result<Client, ClientError> {
        match endpoint {
            Endpoint::Unix(path) => {
                let path = path.clone();
                let shown = path.display().to_string();
                // The URI is required by the API but not used: the connector dials the socket.
                let channel = tonic::transport::Endpoint::from_static("http://capybara.local")
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
                    .map_err(|source| ClientError::Connect {
                        endpoint: shown,
                        source,
                    })?;
                Ok(Client {
                    channel,
                    auth: None,
                })
            }
            Endpoint::Tcp {
                url,
                token,
                ca_cert,
            } => {
                let bad = || ClientError::Endpoint {
                    endpoint: url.clone(),
                };
                let mut ep =
                    tonic::transport::Endpoint::from_shared(url.clone()).map_err(|_| bad())?;
                if url.starts_with("https://") {
                    let ca = ca_cert.as_ref().ok_or(ClientError::NoCa)?;
                    ep = ep
                        .tls_config(
                            tonic::transport::ClientTlsConfig::new()
                                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                        )
                        .map_err(|source| ClientError::Connect {
                            endpoint: url.clone(),
                            source,
                        })?;
                }
                let channel = ep.connect().await.map_err(|source| ClientError::Connect {
                    endpoint: url.clone(),
                    source,
                })?;
                let auth = token
                    .as_ref()
                    .map(|t| {
                        format!("Bearer {t}")
                            .parse()
                            .map_err(|_| ClientError::Token)
                    })
                    .transpose()?;
                Ok(Client { channel, auth })
            }
        }
    }

    /// The connection (for the calls of sibling modules).
    pub(super) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub(super) fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(a) = &self.auth {
            r.metadata_mut().insert("authorization", a.clone());
        }
        r
    }
}

/// Whether a client error is the caller's bad input (the CLI exits 2 for these).
pub fn is_bad_input(e: &ClientError) -> bool {
    matches!(e, ClientError::Status(s) if s.code() == tonic::Code::InvalidArgument)
}

/// The gRPC code of a failed call, if the agent answered.
pub fn code(e: &ClientError) -> Option<tonic::Code> {
    match e {
        ClientError::Status(s) => Some(s.code()),
        _ => None,
    }
}
