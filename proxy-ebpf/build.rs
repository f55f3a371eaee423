use which::which;

/// Rebuild when bpf-linker changes: building this crate for the BPF target
/// depends on it, and cargo cannot express that dependency (as aya-template does).
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
