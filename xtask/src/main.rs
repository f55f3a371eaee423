//! Developer and CI entry points: `cargo xtask setup | demo | test`.

mod previous;
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
    Setup {
        /// Only what building needs (rust-src, bpf-linker), not the Debian
        /// packages the tests and demo run: for image builds.
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Run kpr on a virtual node with the Services of manifests/demo and send real traffic.
    Demo {
        /// Folder of Services and EndpointSlices to serve.
        #[arg(long, default_value = "manifests/demo")]
        manifests: PathBuf,
    },
    /// Benchmark eBPF mode against iptables mode and the pod IP directly,
    /// at 1 to 50,000 Services; writes target/bench/ (report.md, report.json, plots).
    Bench {
        /// A reduced set (N in 1, 1000; short runs), for a quick look or a smoke test.
        #[arg(long)]
        quick: bool,
        /// Where the report goes.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Do not measure: redo the report, plots and docs/benchmarks.md from OUT/report.json.
        #[arg(long)]
        republish: bool,
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

/// Runs the benchmark with the release build of kpr.
fn bench(quick: bool, out: &Path) -> anyhow::Result<()> {
    let release = workspace_root().join("target/release/kpr");
    // SAFETY: set before any thread is spawned.
    unsafe { std::env::set_var("KPR_BIN", &release) };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::Relaxed))?;
    let cfg = if quick {
        kpr_tests::bench::Config::quick(out.to_path_buf())
    } else {
        kpr_tests::bench::Config::full(out.to_path_buf())
    };
    let command = if quick { "cargo xtask bench --quick" } else { "cargo xtask bench" };
    let report = kpr_tests::bench::run(&cfg, command, stop.clone())?;
    println!("{}", kpr_tests::bench::report::table(&report));
    println!("report: {}", out.join("report.md").display());
    // A run stopped early measured only some rows: the published figures stay those of the last whole run.
    if stop.load(std::sync::atomic::Ordering::Relaxed) {
        println!("stopped before the end: docs/benchmarks.md is left as it was");
    } else if !quick {
        publish(&report, out)?;
    }
    for file in ["report.json", "report.md", "conn_rate.svg"] {
        anyhow::ensure!(out.join(file).exists(), "the benchmark did not write {file}");
    }
    Ok(())
}

/// What docs/benchmarks.md says before the figures: the setup, so the
/// numbers can be read and reproduced.
const BENCH_INTRO: &str = "# Benchmarks

kpr's eBPF mode, on its two paths, against kpr's iptables mode (kube-proxy's rules) and against no proxy at all \
(the pod IPs dialled directly): `ebpf-socket` is socket-level load balancing alone (the socket hooks on the \
node's cgroup, with the load generator in it, and no per-packet program), `ebpf` the per-packet path alone (TC \
on the pod interfaces' ingress and egress, `--socket-lb=false`). Each N is measured twice: with the backends \
on the clients' node (`same node`: one virtual node in network namespaces) and on another node (`other node`: \
two virtual nodes with routed pod CIDRs over an underlay bridge, flannel host-gw style, kpr running on both as \
a DaemonSet would, the client node's agent measured), and a third time (`from outside`) with a client outside \
the cluster, on the underlay's router, reaching the backends on one node through a node port of the other (the \
measured Service is then a NodePort Service under the Cluster policy, so the client is source-NATed), against \
the same client dialling the pods directly; socket-level load balancing has nothing to do there. From \
outside, `direct via node` dials the pods from a second client outside the cluster whose traffic the node \
port's node routes both ways, with no agent running: what the node port path's extra hop through that node \
costs without any proxy (IPv4). Client pods, three server pods behind the measured \
Service (a fourth takes over in the one-change test), and N-1 other Services with 2-4 endpoints each. The \
measured Service's VIP sorts last, where iptables mode reaches it at the end of KUBE-SERVICES. Services come \
from `--source dir:` (JSON manifests; the measured Service in its own file). Client threads run on CPU 0, \
servers on CPU 1; VIP traffic, direct traffic and socket-level traffic (which dials the pod IPs) come from \
three client pods so none trips over another's TIME_WAIT state. IPv6 rows repeat the three measurements (at 1 \
and 10,000 Services) on an IPv6-only cluster: the same pods and Services with IPv6 addresses alone, the same \
node shape, every mode (iptables mode with ip6tables rules).

- Connection rate: connect, one request and reply, server closes, client closes (TCP_CRR-like), from 4 \
  concurrent connections; `× direct` is the ratio to the direct rate at the same N and placement in the runs \
  just before and just after the row's agent ran (none running then: the `direct` row's runs before the first \
  mode, and after each mode as many direct runs again), so that the machine's slow drift over the minutes \
  between the `direct` row and a mode's does not show as a difference between them.
- Socket-level rows, taken in turn: while the row's agent runs, pairs of short runs (1 s), one with the load \
  generator in the node's cgroup (the hooks serve it) and one out of it dialling the pods directly, in \
  alternating order; each pair gives a ratio. No program is on the interfaces in that mode, so this is the \
  hooks' cost alone, and a drift over minutes falls within no pair.
- Request latency: one established connection, request and reply in a loop (TCP_RR-like), p50 and p99.
- Cold programming: from starting the agent to the measured Service answering a probe connection.
- One change: from rewriting the measured Service's EndpointSlice to a probe connection reaching the new \
  endpoint (and back again), as seen from the client.
- Connection errors: the share of connection attempts that failed (refused, reset, timed out, no reply), over \
  all connection-rate runs of a row. An attempt counts when it starts inside the measured window, so hanging \
  connections are counted too.
- Cost: agent resident memory once programmed (VmRSS) and its peak over the whole measurement (VmHWM), what \
  the kernel charges for the agent's BPF maps (the `memlock` of each map it holds, each map id once), \
  iptables rules on the node, and the agent's CPU time (with iptables-restore children) from start to \
  programmed.
- Generator check: is the direct line limited by the load generator? Direct traffic from one generator on CPU \
  0 and from two at once, the second on a CPU of its own if the machine has one, else on CPU 1 beside the \
  servers, in interleaved runs, with each CPU's busy share. On two CPUs a second generator can only take time \
  from the servers, so when the first generator's CPU is busy and the rate does not rise the check says it \
  cannot conclude, and what would settle it.

`cargo xtask bench --quick` (run by `cargo xtask test`) fails when a mode does not answer, when a change is not \
followed, or when over 1% of a connection-rate run's attempts fail; the full run lists such problems in the \
report and goes on.

Each node shortens conntrack's TIME_WAIT to 1 s: a run opens hundreds of thousands of connections, and a full \
conntrack table would drop SYNs and measure the benchmark's own history. eBPF mode's own conntrack likewise \
keeps closed flows for 1 s (`--conntrack-tcp-timeout-fin=1s`; 10 s by default): a node port a closed flow \
from outside was source-NATed to comes round again within seconds at this rate. The server pods keep no TIME_WAIT \
sockets (`net.ipv4.tcp_max_tw_buckets=0`, every mode alike): they close first, and a source-NATed client \
reaches them from ports whose sequence numbers do not rise from one connection on a tuple to the next, so its \
SYNs would land on TIME_WAITs, be refused and retried a second later. iptables mode runs on the legacy \
backend: iptables-nft-restore 1.8.9 took 177 s to load 10,000 Services here (legacy: 2.5 s) and does not \
finish 50,000 within the run; one legacy rule on the node (in iptables and in ip6tables) makes kpr choose \
legacy, as kube-proxy chooses the backend that already has rules.

";

/// A full run becomes docs/benchmarks.md, with its plots in docs/bench/.
fn publish(report: &kpr_tests::bench::Report, out: &Path) -> anyhow::Result<()> {
    let docs = workspace_root().join("docs");
    let plots = docs.join("bench");
    std::fs::create_dir_all(&plots)?;
    for entry in std::fs::read_dir(out)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "svg") {
            std::fs::copy(&path, plots.join(path.file_name().unwrap()))?;
        }
    }
    let body = kpr_tests::bench::report::markdown(report, "bench/");
    let intro = BENCH_INTRO;
    std::fs::write(docs.join("benchmarks.md"), format!("{intro}{body}"))?;
    println!("published: {}", docs.join("benchmarks.md").display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup { toolchain_only: true } => setup::toolchain(),
        Task::Setup { toolchain_only: false } => setup::run(),
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
        Task::Bench { out, republish: true, .. } => {
            let out = workspace_root().join(out);
            let report: kpr_tests::bench::Report = serde_json::from_slice(&std::fs::read(out.join("report.json"))?)?;
            kpr_tests::bench::report::write(&report, &out)?;
            publish(&report, &out)
        }
        Task::Bench { quick, out, .. } => {
            if !is_root() {
                bail!("the benchmark creates network namespaces and loads eBPF programs: run it as root");
            }
            setup::run()?;
            cargo(&["build", "--release", "--bins"])?;
            bench(quick, &workspace_root().join(out))
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
            previous::build(&workspace_root())?;
            if args.is_empty() {
                // The workspace's lint table, with warnings denied.
                cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            }
            let mut test_args = vec!["test"];
            test_args.extend(args.iter().map(String::as_str));
            cargo(&test_args)?;
            if args.is_empty() && is_root() {
                // Smoke test of the benchmark harness: it must run end to
                // end; no speed is checked.
                eprintln!("xtask: smoke-testing the benchmark (cargo xtask bench --quick)");
                cargo(&["build", "--release", "--bins"])?;
                bench(true, &workspace_root().join("target/bench-smoke"))?;
            }
            Ok(())
        }
    }
}
