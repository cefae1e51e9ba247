//! A client of the agent's REST mirror for the tests and the benchmarks: plain HTTP/1.1 over
//! TCP (hyper), a bearer token, JSON in and out.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// One answer: status, JSON body (`Null` when empty or not JSON), headers.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body as JSON.
    pub json: serde_json::Value,
    /// The body as text.
    pub text: String,
    /// The headers.
    pub headers: http::HeaderMap,
}

/// A REST client of one agent.
#[derive(Clone, Debug)]
pub struct Rest {
    base: String,
    token: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Rest {
    /// A client of `http://addr` sending `token`.
    pub fn new(addr: std::net::SocketAddr, token: Option<&str>) -> Rest {
        Rest {
            base: format!("http://{addr}"),
            token: token.map(str::to_owned),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The same client with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Rest {
        Rest {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// `METHOD path` with `body` (JSON text, or none), sending `Authorization: Bearer <token>`.
    pub async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        self.raw(method, path, body.map(|b| b.as_bytes().to_vec()), &[])
            .await
    }

    /// [`Rest::call`] with raw bytes and extra headers.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        let resp = self.client.request(req).await.expect("REST call");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("REST body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Answer {
            status,
            json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            text,
            headers,
        }
    }
}
