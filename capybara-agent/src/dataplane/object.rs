//! The kernel object built from `capybara-ebpf` by the build script and embedded in the agent.

/// The eBPF ELF object (empty when built with `AYA_BUILD_SKIP=1`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capybara"));
