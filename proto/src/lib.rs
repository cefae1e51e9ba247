//! The Capybara API, generated at build time from `proto/capybara/v1/*.proto` — the one source of
//! every API shape. Only the agent's `api` module converts between these and domain types.

/// `capybara.v1`.
pub mod v1 {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::allow_attributes_without_reason,
        reason = "generated code: its shape is prost's, not ours"
    )]
    tonic::include_proto!("capybara.v1");
}

/// The encoded `FileDescriptorSet` of every `capybara.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("capybara_descriptor");
