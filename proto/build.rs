//! Generates the API types and tonic services from `capybara/v1/*.proto` (the one way the
//! generated code is produced; nothing generated is committed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new("capybara/v1");
    let mut protos: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    protos.sort();
    println!("cargo:rerun-if-changed=capybara");
    // The descriptor set feeds server reflection (grpcurl lists and calls every service).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("capybara_descriptor.bin"))
        .compile_protos(&protos, &[std::path::PathBuf::from(".")])?;
    Ok(())
}
