//! Rebuild the object when bpf-linker changes (aya-template does the same).
fn main() {
    let bpf_linker = which::which("bpf-linker").unwrap_or_default();
    println!("cargo:rerun-if-changed={}", bpf_linker.to_string_lossy());
}
