//! Reading a list's source: a file on the agent's machine, or a URL the agent fetches.
//!
//! A URL goes through the webhooks' server-side request forgery check
//! (`service::webhooks::ssrf`, reused, not copied): `http://` or `https://` only, the host
//! resolved and every address checked (loopback, private, link-local, … refused unless the
//! source was given with `--allow-private`), the connection made to the vetted address. Unlike a
//! webhook, a feed may redirect (mirrors, CDNs): at most [`MAX_REDIRECTS`] hops, each a new URL
//! that is parsed and vetted again, so a redirect cannot reach an address the first URL could
//! not. Bounds: [`CONNECT_TIMEOUT`](crate::service::webhooks::http::CONNECT_TIMEOUT) per
//! connect, [`FETCH_TIMEOUT`] for the whole download, [`MAX_LIST_BYTES`] of body (a longer
//! answer is refused, not cut: a cut list would be a different list).

use std::{path::Path, time::Duration};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;

use super::parse::MAX_LIST_BYTES;
use crate::service::webhooks::{
    http::{AttemptError, connect, tls_config},
    ssrf::{self, Refused, WebhookUrl},
};

/// The most redirects followed.
pub const MAX_REDIRECTS: usize = 5;
/// How long a whole download may take, redirects included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The URL (or a redirect's) is not an acceptable http(s) URL.
    #[error("{0}")]
    Url(String),
    /// The host resolves to an address the agent may not fetch from.
    #[error(
        "{host} resolves to {ip}, a {class} address: refused (server-side request forgery) \
         unless the source is given with --allow-private"
    )]
    Forbidden {
        /// The host.
        host: String,
        /// The address.
        ip: std::net::IpAddr,
        /// Its class.
        class: &'static str,
    },
    /// No connection, TLS or HTTP failure, or no answer in time.
    #[error("{0}")]
    Transfer(String),
    /// The server answered something other than 200.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The file or the answer is larger than [`MAX_LIST_BYTES`].
    #[error("the list is larger than {} MiB", MAX_LIST_BYTES >> 20)]
    TooLarge,
}

impl FetchError {
    /// True for errors of the source as given (a bad URL, a refused address, a missing file):
    /// the caller's input, not the network's weather.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            FetchError::File { .. } | FetchError::Url(_) | FetchError::Forbidden { .. }
        )
    }
}

impl From<AttemptError> for FetchError {
    fn from(e: AttemptError) -> FetchError {
        match e {
            AttemptError::Refused(Refused::Forbidden { host, ip, class }) => {
                FetchError::Forbidden { host, ip, class }
            }
            e => FetchError::Transfer(e.to_string()),
        }
    }
}

/// Reads a list file (at most [`MAX_LIST_BYTES`]).
pub fn read_file(path: &Path) -> Result<Vec<u8>, FetchError> {
    use std::io::Read as _;
    let err = |source| FetchError::File {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut out = Vec::new();
    f.take(MAX_LIST_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(err)?;
    if out.len() > MAX_LIST_BYTES {
        return Err(FetchError::TooLarge);
    }
    Ok(out)
}

/// Fetches `url` (see the module docs), within [`FETCH_TIMEOUT`].
pub async fn fetch_url(url: &str, allow_private: bool) -> Result<Vec<u8>, FetchError> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_follow(url, allow_private)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Transfer(format!(
            "{url}: no complete answer within {} s",
            FETCH_TIMEOUT.as_secs()
        ))),
    }
}

async fn fetch_follow(url: &str, allow_private: bool) -> Result<Vec<u8>, FetchError> {
    let mut current = parse(url)?;
    for _ in 0..=MAX_REDIRECTS {
        match get(&current, allow_private).await? {
            Answer::Body(b) => return Ok(b),
            Answer::Redirect(location) => current = parse(&resolve(&current, &location))?,
        }
    }
    Err(FetchError::Transfer(format!(
        "{url}: more than {MAX_REDIRECTS} redirects"
    )))
}

fn parse(url: &str) -> Result<WebhookUrl, FetchError> {
    ssrf::parse_url(url).map_err(|e| {
        // The message names the webhooks' field; say what it is here.
        let msg = e.to_string();
        FetchError::Url(msg.strip_prefix("url: ").unwrap_or(&msg).to_owned())
    })
}

/// A redirect's `Location` against the URL that answered it.
fn resolve(base: &WebhookUrl, location: &str) -> String {
    if location.contains("://") {
        location.to_owned()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{}://{rest}", if base.tls { "https" } else { "http" })
    } else if location.starts_with('/') {
        format!(
            "{}://{}{location}",
            if base.tls { "https" } else { "http" },
            base.authority
        )
    } else {
        let dir = base.path.rsplit_once('/').map_or("", |(d, _)| d);
        format!(
            "{}://{}{dir}/{location}",
            if base.tls { "https" } else { "http" },
            base.authority
        )
    }
}

enum Answer {
    Body(Vec<u8>),
    Redirect(String),
}

async fn get(url: &WebhookUrl, allow_private: bool) -> Result<Answer, FetchError> {
    let vetted = ssrf::resolve(url, allow_private)
        .await
        .map_err(AttemptError::from)?;
    let tcp = connect(&vetted.addrs).await?;
    let transfer = |e: &dyn std::fmt::Display| FetchError::Transfer(format!("{}: {e}", url.url));
    let req = Request::get(url.path.as_str())
        .header(hyper::header::HOST, url.authority.as_str())
        .header(
            hyper::header::USER_AGENT,
            concat!("capybara-ip-intel/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| transfer(&e))?;
    let res = if url.tls {
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| transfer(&e))?;
        let tls = tokio::time::timeout(
            crate::service::webhooks::http::CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(tls_config()).connect(name, tcp),
        )
        .await
        .map_err(|_| transfer(&"TLS handshake timed out"))?
        .map_err(|e| transfer(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| transfer(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender.send_request(req).await.map_err(|e| transfer(&e))?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| transfer(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender.send_request(req).await.map_err(|e| transfer(&e))?
    };
    let status = res.status();
    if status.is_redirection()
        && let Some(loc) = res
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|l| l.to_str().ok())
    {
        return Ok(Answer::Redirect(loc.to_owned()));
    }
    if status != hyper::StatusCode::OK {
        return Err(FetchError::Status {
            url: url.url.clone(),
            status: status.as_u16(),
        });
    }
    if res
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|l| l.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|l| l > MAX_LIST_BYTES as u64)
    {
        return Err(FetchError::TooLarge);
    }
    match Limited::new(res.into_body(), MAX_LIST_BYTES)
        .collect()
        .await
    {
        Ok(b) => Ok(Answer::Body(b.to_bytes().to_vec())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(FetchError::TooLarge)
        }
        Err(e) => Err(transfer(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_url_that_answered() {
        let base = parse("https://feeds.example:8443/lists/tor.txt?x=1").unwrap();
        assert_eq!(resolve(&base, "http://b.example/x"), "http://b.example/x");
        assert_eq!(resolve(&base, "//c.example/y"), "https://c.example/y");
        assert_eq!(resolve(&base, "/z.txt"), "https://feeds.example:8443/z.txt");
        assert_eq!(
            resolve(&base, "other.txt"),
            "https://feeds.example:8443/lists/other.txt"
        );
    }

    #[test]
    fn only_http_urls_and_no_private_addresses_without_the_flag() {
        assert!(matches!(parse("ftp://x/"), Err(FetchError::Url(_))));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(fetch_url("http://127.0.0.1:9/list", false))
            .unwrap_err();
        assert!(matches!(e, FetchError::Forbidden { .. }), "{e}");
        assert!(e.is_input());
        assert!(e.to_string().contains("--allow-private"), "{e}");
    }

    /// A loopback server: a redirect, then the list; a second one past the size bound.
    #[test]
    fn follows_a_redirect_and_refuses_an_oversized_answer() {
        use std::io::{Read as _, Write as _};
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 302 Found\r\nLocation: /real\r\nContent-Length: 0\r\n\r\n".to_owned(),
                "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n1.2.3.4\n".to_owned(),
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    MAX_LIST_BYTES + 1
                ),
            ] {
                let (mut s, _) = server.accept().unwrap();
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).unwrap();
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}/list");
        assert_eq!(rt.block_on(fetch_url(&url, true)).unwrap(), b"1.2.3.4\n");
        assert!(matches!(
            rt.block_on(fetch_url(&url, true)),
            Err(FetchError::TooLarge)
        ));
        t.join().unwrap();
    }
}
