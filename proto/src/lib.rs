//! The Capybara API, generated at build time from `proto/capybara/v1/*.proto` — the one source of
//! every API shape: the prost types and tonic services, their proto3 JSON (pbjson), the REST
//! routes ([`rest`]) and the OpenAPI document ([`OPENAPI_JSON`]). Only the agent's `api` module
//! converts between these and domain types.

pub mod rest;

/// `capybara.v1`.
pub mod v1 {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::allow_attributes_without_reason,
        reason = "generated code: its shape is prost's, not ours"
    )]
    tonic::include_proto!("capybara.v1");
    include!(concat!(env!("OUT_DIR"), "/capybara.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of every `capybara.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("capybara_descriptor");

/// The OpenAPI 3 document of the REST mirror (`GET /api/v1/openapi.json`, `capybara api docs`).
pub const OPENAPI_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/openapi.json"));
