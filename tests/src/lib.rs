//! Test support (skeleton).

pub mod netns;
pub mod traffic;
pub mod tunwire;

// BPF_PROG_TEST_RUN fixtures (packet builders and the loaded-object fixture).
pub mod bpf;
pub mod packets;

// Benchmarks run by the `capybara-bench` binary (`cargo xtask bench`).
pub mod bench;
