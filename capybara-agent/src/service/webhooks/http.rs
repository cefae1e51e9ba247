//! One webhook POST over HTTP/1.1 (hyper) or HTTPS (rustls with the webpki roots), to vetted
//! addresses only (`ssrf`), with a timeout on the connect and on the whole request.
//!
//! A connection is kept per endpoint and reused while the receiver keeps it open (HTTP/1.1
//! keep-alive), so a busy endpoint costs no handshake per event; a new connection resolves and
//! vets the host again. The answer's body is read up to [`MAX_ANSWER`] bytes (for the delivery
//! record's error text) and the rest dropped with the connection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, body::Bytes, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;

use super::ssrf::{self, WebhookUrl};

/// How long a TCP connect (and a TLS handshake) may take, over every vetted address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole attempt may take: connect, request, the answer's status and head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of an answer's body kept for the delivery record.
pub const MAX_ANSWER: usize = 256;

/// Why an attempt got no HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The host may not be sent to, or does not resolve.
    #[error(transparent)]
    Refused(#[from] ssrf::Refused),
    /// No connection within [`CONNECT_TIMEOUT`] to any address.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The last address tried.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed.
    #[error("TLS with {host}: {reason}")]
    Tls {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The request failed after the connection was made.
    #[error("HTTP: {0}")]
    Http(String),
    /// No answer within [`REQUEST_TIMEOUT`].
    #[error("no answer within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The start of the body (lossy UTF-8, at most [`MAX_ANSWER`] bytes).
    pub body: String,
}

/// The TLS client configuration every https webhook shares.
pub(crate) fn tls_config() -> Arc<tokio_rustls::rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<tokio_rustls::rustls::ClientConfig>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = tokio_rustls::rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            Arc::new(
                tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        })
        .clone()
}

/// One endpoint's connection, reused between events.
#[derive(Default)]
pub struct Conn {
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("open", &self.sender.is_some())
            .finish()
    }
}

pub(crate) async fn connect(addrs: &[SocketAddr]) -> Result<tokio::net::TcpStream, AttemptError> {
    let mut last = AttemptError::Connect {
        addr: String::new(),
        reason: "no address".into(),
    };
    for a in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => {
                last = AttemptError::Connect {
                    addr: a.to_string(),
                    reason: e.to_string(),
                }
            }
            Err(_) => {
                last = AttemptError::Connect {
                    addr: a.to_string(),
                    reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                }
            }
        }
    }
    Err(last)
}

impl Conn {
    /// A ready sender: the kept one, or a new connection to a vetted address of `url`.
    async fn ready(
        &mut self,
        url: &WebhookUrl,
        allow_private: bool,
    ) -> Result<&mut SendRequest<Full<Bytes>>, AttemptError> {
        if let Some(s) = &mut self.sender {
            if s.ready().await.is_ok() {
                return Ok(self.sender.as_mut().expect("just checked"));
            }
            self.sender = None;
        }
        let vetted = ssrf::resolve(url, allow_private).await?;
        let tcp = connect(&vetted.addrs).await?;
        let http_err = |e: hyper::Error| AttemptError::Http(e.to_string());
        let sender = if url.tls {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| AttemptError::Tls {
                    host: url.host.clone(),
                    reason: e.to_string(),
                })?;
            let tls = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_rustls::TlsConnector::from(tls_config()).connect(name, tcp),
            )
            .await
            .map_err(|_| AttemptError::Tls {
                host: url.host.clone(),
                reason: "handshake timed out".into(),
            })?
            .map_err(|e| AttemptError::Tls {
                host: url.host.clone(),
                reason: e.to_string(),
            })?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(http_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(http_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender
        };
        Ok(self.sender.insert(sender))
    }

    /// POSTs `body` to `url` with `headers`, within [`REQUEST_TIMEOUT`]; the answer's status
    /// whatever it is (redirects are not followed).
    pub async fn post(
        &mut self,
        url: &WebhookUrl,
        allow_private: bool,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<Answer, AttemptError> {
        let attempt = async {
            let sender = self.ready(url, allow_private).await?;
            let mut req = Request::post(url.path.as_str())
                .header(hyper::header::HOST, url.authority.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(
                    hyper::header::USER_AGENT,
                    concat!("capybara-webhooks/", env!("CARGO_PKG_VERSION")),
                );
            for (k, v) in headers {
                req = req.header(*k, v.as_str());
            }
            let req = req
                .body(Full::new(body))
                .map_err(|e| AttemptError::Http(e.to_string()))?;
            let res = sender
                .send_request(req)
                .await
                .map_err(|e| AttemptError::Http(e.to_string()))?;
            let status = res.status().as_u16();
            let body = match Limited::new(res.into_body(), 64 * 1024).collect().await {
                Ok(b) => {
                    let b = b.to_bytes();
                    String::from_utf8_lossy(&b[..b.len().min(MAX_ANSWER)]).into_owned()
                }
                Err(_) => String::new(),
            };
            Ok(Answer { status, body })
        };
        let out = match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(AttemptError::Timeout),
        };
        if out.is_err() {
            // A half-used connection is never reused.
            self.sender = None;
        }
        out
    }
}
