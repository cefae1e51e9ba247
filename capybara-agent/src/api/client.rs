//! The gRPC client the CLI uses: connects over the control socket (root, no token) or TCP with a
//! bearer token, and answers in domain types. Each feature's calls are in its own file.
//!
//! A token goes over plain `http://` only to a loopback host (127.0.0.0/8, ::1, `localhost`):
//! anywhere else it would cross the network in clear text, so [`Client::connect`] refuses
//! before it connects ([`ClientError::PlainToken`]) and nothing is sent; `https://` is the way.

use std::{net::IpAddr, path::PathBuf};

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
    /// A token for a plain `http://` endpoint whose host is not loopback: refused before any
    /// connection.
    #[error(
        "--endpoint {endpoint}: refusing to send the token over plain http:// to a host other \
         than this machine; use https:// (with --ca-cert), or a loopback address"
    )]
    PlainToken {
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
    /// An HTTP call (the REST mirror) failed below HTTP.
    #[error("HTTP call failed: {0}")]
    Http(String),
    /// A streamed answer could not be written where it goes (a file).
    #[error("cannot write the agent's answer")]
    Output(#[source] std::io::Error),
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
                let https = ep.uri().scheme_str() == Some("https");
                if token.is_some() && !https && !ep.uri().host().is_some_and(is_loopback_host) {
                    return Err(ClientError::PlainToken {
                        endpoint: url.clone(),
                    });
                }
                if https {
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

    /// A client on `channel`, with no token (an in-process connection, `api::inproc`).
    pub(super) fn from_channel(channel: Channel) -> Client {
        Client {
            channel,
            auth: None,
        }
    }

    /// The connection (for the calls of sibling modules).
    pub(super) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// `GET path` of the REST mirror over this connection (HTTP/2, the same TLS and token):
    /// the status and the body.
    pub async fn http_get(&self, path: &str) -> Result<(u16, Vec<u8>), ClientError> {
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;
        let mut req = http::Request::get(path)
            .body(tonic::body::Body::empty())
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if let Some(a) = &self.auth {
            let v = http::HeaderValue::from_bytes(a.as_bytes()).map_err(|_| ClientError::Token)?;
            req.headers_mut().insert(http::header::AUTHORIZATION, v);
        }
        let resp = self
            .channel
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body.to_vec()))
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
    match e {
        ClientError::Status(s) => s.code() == tonic::Code::InvalidArgument,
        ClientError::PlainToken { .. } => true,
        _ => false,
    }
}

/// Whether a URL's host is this machine by loopback: 127.0.0.0/8, ::1 (also as
/// `::ffff:127.x.y.z`) or `localhost`.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The gRPC code of a failed call, if the agent answered.
pub fn code(e: &ClientError) -> Option<tonic::Code> {
    match e {
        ClientError::Status(s) => Some(s.code()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1",
            "127.1.2.3",
            "[::1]",
            "::1",
            "localhost",
            "LocalHost",
            "[::ffff:127.0.0.1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "192.0.2.1",
            "10.0.0.1",
            "[2001:db8::1]",
            "0.0.0.0",
            "[::]",
            "example.com",
            "localhost.example.com",
            "128.0.0.1",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[tokio::test]
    async fn a_token_over_plain_http_off_the_machine_is_refused_before_connecting() {
        let tcp = |url: &str, token: Option<&str>| Endpoint::Tcp {
            url: url.into(),
            token: token.map(str::to_owned),
            ca_cert: None,
        };
        // TEST-NET addresses: a connection attempt would hang or fail with `Connect`.
        for url in ["http://192.0.2.1:7443", "http://[2001:db8::1]:7443"] {
            let e = Client::connect(&tcp(url, Some("capy_x")))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, ClientError::PlainToken { endpoint } if endpoint == url),
                "{e}"
            );
            assert!(is_bad_input(&e));
        }
    }
}
