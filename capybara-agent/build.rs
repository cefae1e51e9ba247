//! Builds `capybara-ebpf` for bpfel-unknown-none with the nightly toolchain (aya-build), so a
//! plain `cargo build` yields an agent with the kernel object embedded (`include_bytes_aligned!`
//! of `$OUT_DIR/capybara`). `AYA_BUILD_SKIP=1` skips it for host-only checks (fmt, clippy).
use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root_dir = manifest_dir.join("../capybara-ebpf").canonicalize().context("capybara-ebpf dir")?;
    let root_dir = root_dir.to_str().context("non-UTF-8 path")?;
    let ebpf = Package { name: "capybara-ebpf", root_dir, ..Default::default() };
    aya_build::build_ebpf([ebpf], Toolchain::default())
}
