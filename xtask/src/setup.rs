//! `cargo xtask setup`: idempotent; each step checks before it installs.
//!
//! - nightly's rust-src (aya-build compiles the programs with -Z build-std=core);
//! - bpf-linker 0.13, linked against nightly's own libLLVM because no system
//!   LLVM of the right version exists here (see shared/TOOLCHAIN.md);
//! - the Debian packages the tests and demo run.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Debian packages: `ip` (iproute2) and `sysctl` (procps) build the
/// virtual node; iptables mode needs iptables (both backends) and conntrack;
/// the migration tests load kube-proxy's nftables rules and IPVS-mode ipsets
/// with nft and ipset;
/// the dashboard test drives Chromium; the kubelet tests run containerd with
/// runc and the CNI plugins, busybox-static for images, a local registry and
/// openssl (a TLS server);
/// protoc compiles the CRI protos.
const PACKAGES: &[&str] = &[
    "iproute2",
    "procps",
    "iptables",
    "conntrack",
    "nftables",
    "ipset",
    "chromium",
    "chromium-driver",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "docker-registry",
    "protobuf-compiler",
    // A TLS server for the kubelet's HTTPS probe tests.
    "openssl",
    // The DNS add-on's tests and benchmark: dig, an upstream server, dnsperf.
    "bind9-dnsutils",
    "dnsmasq-base",
    "dnsperf",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub(crate) fn run() -> anyhow::Result<()> {
    toolchain()?;
    debian_packages()
}

/// What building the workspace needs beyond protoc: nightly's rust-src and
/// bpf-linker.
pub(crate) fn toolchain() -> anyhow::Result<()> {
    add_cargo_bin_to_path();
    rust_src()?;
    clippy()?;
    bpf_linker()
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"))
}

/// `cargo install` puts bpf-linker in $CARGO_HOME/bin, which rustc must find
/// on PATH when aya-build links the programs.
fn add_cargo_bin_to_path() {
    let bin = cargo_home().join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|p| p == bin) {
        let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path))).unwrap();
        // SAFETY: called at start-up, before any thread is spawned.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

fn rust_src() -> anyhow::Result<()> {
    if output("rustup", &["toolchain", "list"]).is_none_or(|l| !l.lines().any(|l| l.starts_with("nightly"))) {
        eprintln!("setup: installing the nightly toolchain");
        run_cmd(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed =
        output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"]).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// `cargo xtask test` lints with clippy (the workspace's lint table).
fn clippy() -> anyhow::Result<()> {
    if output("cargo", &["clippy", "--version"]).is_none() {
        eprintln!("setup: adding clippy");
        run_cmd(Command::new("rustup").args(["component", "add", "clippy"]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    // Running it also proves its libLLVM link resolves.
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's libLLVM (about a minute)");
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"]).context("rustc +nightly --print sysroot")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let so = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // libLLVM.so.22.1-rust-... -> 22
    let major = so.trim_start_matches("libLLVM.so.").split(['.', '-']).next().unwrap_or("").to_string();
    let prefix =
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".local/share/kpr-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    // What the link step looks for, and what the binary's rpath loads at run time.
    for name in ["libLLVM.so", so.as_str()] {
        let link = prefix_lib.join(name);
        std::fs::remove_file(&link).ok();
        std::os::unix::fs::symlink(lib.join(&so), &link)?;
    }
    run_cmd(
        Command::new("cargo")
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p]).is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "Debian packages missing: {}; install them as root (apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    // containerd and docker-registry ship services; the tests start their
    // own, so none may start on install (Debian's policy-rc.d convention).
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(policy, "#!/bin/sh\n# kpr setup: no service starts while packages install\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result =
        run_cmd(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive")).and_then(|()| {
            run_cmd(
                Command::new("apt-get")
                    .args(["install", "-y", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        });
    if own_policy {
        std::fs::remove_file(policy).ok();
    }
    result
}
