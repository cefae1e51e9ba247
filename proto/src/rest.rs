//! The REST mirror's routes, generated from each RPC's `google.api.http` rule: [`ROUTES`] says
//! where each RPC is and what its request is made of, and [`call`] runs one on the tonic
//! service implementation (the same code, tokens, scopes and audit as gRPC) with its request and
//! answer in proto3 JSON. The HTTP server around them (bodies, errors, limits) is the agent's.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;

include!(concat!(env!("OUT_DIR"), "/rest_routes.rs"));

/// One RPC's REST route.
#[derive(Debug)]
pub struct Route {
    /// `capybara.v1.Users/AddUser`.
    pub rpc: &'static str,
    /// `GET`, `POST`, `PUT`, `DELETE` or `PATCH`.
    pub method: &'static str,
    /// The path as the .proto and the OpenAPI document give it: `/api/v1/users/{name}`.
    pub template: &'static str,
    /// The same path with the router's parameter names: `/api/v1/users/{p3}` (routes binding
    /// different fields at one position share the name, as the router requires).
    pub axum_path: &'static str,
    /// (router parameter, JSON field name) of each field the path binds.
    pub path_fields: &'static [(&'static str, &'static str)],
    /// The request is the JSON body (path fields bound on top); otherwise the fields come from
    /// the query string ([`Route::query`]).
    pub body: bool,
    /// The fields a query string may set (routes without a body).
    pub query: &'static [QueryField],
    /// The body is one JSON message per line (a client-streaming RPC).
    pub client_streaming: bool,
    /// The answer is one JSON message per line (a server-streaming RPC).
    pub server_streaming: bool,
}

/// A request field a query string sets (`?pageSize=10` or `?page_size=10`).
#[derive(Debug)]
pub struct QueryField {
    /// The field's .proto name (`page_size`).
    pub name: &'static str,
    /// Its JSON name (`pageSize`).
    pub json_name: &'static str,
    /// How its text becomes JSON.
    pub kind: QueryKind,
    /// May be given more than once.
    pub repeated: bool,
}

/// What JSON a query value becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryKind {
    /// `true` or `false`.
    Bool,
    /// A number (kept as text: proto3 JSON reads numbers from strings, and range errors name
    /// the field).
    Number,
    /// A string, an enum name or base64 bytes.
    String,
}

/// A call's request: one JSON message, or the messages of a client stream.
#[derive(Debug)]
pub enum Input {
    /// One message.
    One(serde_json::Value),
    /// A client stream's messages, in order.
    Many(Vec<serde_json::Value>),
}

/// A stream of answers, each a JSON message.
pub type JsonStream = Pin<Box<dyn Stream<Item = Result<serde_json::Value, Status>> + Send>>;

/// A call's answer.
pub enum Output {
    /// One message.
    One(serde_json::Value),
    /// A server stream's messages.
    Stream(JsonStream),
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::One(v) => f.debug_tuple("One").field(v).finish(),
            Output::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// `T` from JSON, or `INVALID_ARGUMENT` naming the field at fault (`pageSize: invalid value …`).
pub fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, Status> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        Status::invalid_argument(format!("{field}: {}", e.into_inner()))
    })
}

fn encode<T: serde::Serialize>(msg: &T) -> Result<serde_json::Value, Status> {
    serde_json::to_value(msg)
        .map_err(|e| Status::internal(format!("cannot encode the answer: {e}")))
}

impl Input {
    /// The one message.
    pub fn one<T: serde::de::DeserializeOwned>(self) -> Result<T, Status> {
        match self {
            Input::One(v) => decode(v),
            Input::Many(_) => Err(Status::invalid_argument("body: one JSON message expected")),
        }
    }

    /// The messages as the stream a client-streaming RPC reads (each checked first: a bad one
    /// is named by its line, `line 3: cidrs[0]: …`).
    pub fn stream<T>(self) -> Result<tonic::Streaming<T>, Status>
    where
        T: serde::de::DeserializeOwned + prost::Message + Default + Send + 'static,
    {
        let values = match self {
            Input::One(v) => vec![v],
            Input::Many(v) => v,
        };
        let mut frames = Vec::new();
        for (i, v) in values.into_iter().enumerate() {
            let msg: T = decode(v).map_err(|s| {
                Status::invalid_argument(format!("line {}: {}", i + 1, s.message()))
            })?;
            let bytes = msg.encode_to_vec();
            // gRPC framing: uncompressed flag, big-endian length, the message.
            frames.push(0u8);
            frames.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            frames.extend_from_slice(&bytes);
        }
        let body = http_body_util::Full::new(bytes::Bytes::from(frames));
        Ok(tonic::Streaming::new_request(
            tonic_prost::ProstDecoder::<T>::default(),
            body,
            None,
            None,
        ))
    }
}

impl Output {
    /// One answer.
    pub fn one<T: serde::Serialize>(msg: &T) -> Result<Output, Status> {
        encode(msg).map(Output::One)
    }

    /// A server stream's answers.
    pub fn stream<T, S>(s: S) -> Output
    where
        T: serde::Serialize,
        S: Stream<Item = Result<T, Status>> + Send + 'static,
    {
        Output::Stream(Box::pin(s.map(|r| r.and_then(|m| encode(&m)))))
    }
}
