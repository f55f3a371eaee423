//! Developer and CI entry points: `cargo xtask setup | demo | test`.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "kpr's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready: nightly rust-src, bpf-linker, Debian packages.
    Setup,
    /// Run kpr on a virtual node with the Services of manifests/demo and send real traffic.
    Demo {
        /// Folder of Services and EndpointSlices to serve.
        #[arg(long, default_value = "manifests/demo")]
        manifests: PathBuf,
    },
    /// Run every test, unit and integration (integration tests need root).
    Test {
        /// Passed on to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs cargo with `args` in the workspace; fails on a non-zero exit.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Builds every binary with the same feature set `cargo test --workspace`
/// uses (the default members; the eBPF crate is built
/// for its own target by aya-build), so the eBPF object is compiled once and `target/debug/kpr` exists.
fn build_all() -> anyhow::Result<()> {
    cargo(&["build", "--bins"])
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Demo { manifests } => {
            if !is_root() {
                bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
            }
            setup::run()?;
            build_all()?;
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::Relaxed))?;
            let dir = workspace_root().join(manifests);
            kpr_tests::demo::run(&dir, stop)
        }
        Task::Test { args } => {
            if !is_root() {
                if std::env::var_os("CI").is_some() {
                    bail!("CI is set but this is not root: the kernel and namespace tests need root");
                }
                eprintln!("note: not root, so kernel and network-namespace tests will be skipped");
            }
            setup::run()?;
            build_all()?;
            let mut test_args = vec!["test"];
            test_args.extend(args.iter().map(String::as_str));
            cargo(&test_args)
        }
    }
}
