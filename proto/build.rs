//! Generates everything the API is made of from `capybara/v1/*.proto`, the one source of every
//! API shape (nothing generated is committed):
//! - the prost types and tonic services (`tonic-prost-build`), and the encoded descriptor set
//!   (server reflection);
//! - proto3 JSON for every type (`pbjson-build`: the REST mirror's bodies);
//! - the REST routes (`rest_routes.rs`: each RPC's `google.api.http` rule, and the dispatch that
//!   calls the tonic service implementation) and the OpenAPI 3 document (`openapi.json`), both
//!   from the same descriptors ([`rest`]). A method without an http rule fails the build.

#[path = "build/descriptors.rs"]
mod descriptors;
#[path = "build/openapi.rs"]
mod openapi;
#[path = "build/rest.rs"]
mod rest;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new("capybara/v1");
    let mut protos: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    protos.sort();
    println!("cargo:rerun-if-changed=capybara");
    println!("cargo:rerun-if-changed=google");
    println!("cargo:rerun-if-changed=build");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("capybara_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .compile_protos(&protos, &[std::path::PathBuf::from(".")])?;
    let descriptor = std::fs::read(&descriptor_path)?;
    // Proto3 JSON, with every field in answers (a client need not know proto3's defaults).
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor)?
        .emit_fields()
        .build(&[".capybara.v1"])?;
    let api = descriptors::Api::decode(&descriptor, "capybara.v1")?;
    std::fs::write(out.join("rest_routes.rs"), rest::generate(&api)?)?;
    std::fs::write(
        out.join("openapi.json"),
        openapi::generate(&api, env!("CARGO_PKG_VERSION"))?,
    )?;
    Ok(())
}
