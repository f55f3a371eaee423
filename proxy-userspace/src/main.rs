use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use proxy_common::maps as abi;
use proxy_userspace::{
    agent::{self, RunConfig},
    dataplane::ebpf::MapSizes,
    model::ModelConfig,
    source::SourceSpec,
};

/// kpr: Service VIPs to pods, in the kernel.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// TC eBPF programs on the pod interfaces.
    Ebpf,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: program the dataplane and keep it in sync with the source.
    Run {
        #[arg(long, value_enum, default_value = "ebpf")]
        mode: Mode,
        /// Where Services and EndpointSlices come from: `kube` (the API
        /// server) or `dir:PATH` (a folder of manifests).
        #[arg(long, default_value = "kube")]
        source: SourceSpec,
        /// Kubeconfig for `--source kube`; without it the in-cluster config is used.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Serve only Services labelled service.kubernetes.io/service-proxy-name=NAME.
        #[arg(long)]
        service_proxy_name: Option<String>,
        /// This node's name (default: the hostname).
        #[arg(long, default_value_t = hostname())]
        node_name: String,
        /// Minimum time between syncs; changes in between are applied together
        /// (e.g. 1s). A lone change is applied at once.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        min_sync_interval: Duration,
        /// Node-side pod interfaces to attach to, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        interfaces: Vec<String>,
        /// Capacity of the service map (frontends plus one entry per VIP).
        #[arg(long, default_value_t = abi::DEFAULT_SERVICES_MAX)]
        max_services: u32,
        /// Capacity of the backend map (endpoints over all frontends).
        #[arg(long, default_value_t = abi::DEFAULT_BACKENDS_MAX)]
        max_backends: u32,
        /// Capacity of each connection-tracking map (LRU: oldest flows are evicted).
        #[arg(long, default_value_t = abi::DEFAULT_CONNTRACK_MAX)]
        max_flows: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            mode: Mode::Ebpf,
            source,
            kubeconfig,
            service_proxy_name,
            node_name,
            min_sync_interval,
            interfaces,
            max_services,
            max_backends,
            max_flows,
        } => {
            agent::run(RunConfig {
                source,
                kubeconfig,
                interfaces,
                map_sizes: MapSizes { services: max_services, backends: max_backends, flows: max_flows },
                model: ModelConfig { service_proxy_name, node_name },
                min_sync_interval,
            })
            .await
        }
    }
}
