use clap::{Parser, Subcommand, ValueEnum};
use proxy_userspace::{
    agent::{self, RunConfig},
    dataplane::ebpf::MapSizes,
    source::SourceSpec,
};
use proxy_common::maps as abi;

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

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: program the dataplane and keep it in sync with the source.
    Run {
        #[arg(long, value_enum, default_value = "ebpf")]
        mode: Mode,
        /// Where Services and EndpointSlices come from: dir:PATH (a folder of manifests).
        #[arg(long)]
        source: SourceSpec,
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
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run { mode: Mode::Ebpf, source, interfaces, max_services, max_backends, max_flows } => {
            agent::run(RunConfig {
                source,
                interfaces,
                map_sizes: MapSizes { services: max_services, backends: max_backends, flows: max_flows },
            })
            .await
        }
    }
}
