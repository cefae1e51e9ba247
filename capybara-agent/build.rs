//! Builds `capybara-ebpf` for bpfel-unknown-none with the nightly toolchain (aya-build), so a
//! plain `cargo build` yields an agent with the kernel object embedded (`$OUT_DIR/capybara`,
//! see `dataplane::object`). `AYA_BUILD_SKIP=1` skips it for host-only checks (fmt, clippy,
//! unit tests): an empty object is written instead and loading it fails with a clear error.
use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        std::fs::write(out_dir.join("capybara"), b"").context("write empty object")?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir
        .join("../capybara-ebpf")
        .canonicalize()
        .context("capybara-ebpf dir")?;
    let root_dir = root_dir.to_str().context("non-UTF-8 path")?;
    let ebpf = Package {
        name: "capybara-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
