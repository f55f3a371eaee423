//! Builds the eBPF programs for the BPF target and leaves the object in
//! OUT_DIR, where `src/dataplane/ebpf.rs` embeds it (as aya-template does).

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf");
    let package = aya_build::Package { name: "proxy-ebpf", root_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
