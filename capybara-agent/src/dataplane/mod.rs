//! The dataplane: the only code that touches aya and bpf(2).
pub mod object;
