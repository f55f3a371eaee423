mod agent;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use agent::{RequestedMode, RunConfig};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_common::{conntrack::Lifetimes, maps as abi};
use proxy_userspace::{
    dataplane::{
        ebpf::MapSizes,
        iptables::render::{Chains, RenderConfig},
    },
    inspect::{self, Maps},
    name::ObjectName,
    source::SourceSpec,
    status::{self, Status},
    takeover as cleanup,
    validate::ModelConfig,
};

/// kpr: Service VIPs to pods, in the kernel.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    /// Log level filter (e.g. info, debug, kpr=debug); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `ADDR` or `ADDR:PORT` (IPv6 with a port in brackets); port 53 unless given.
fn parse_dns_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| std::net::SocketAddr::new(ip, 53)))
        .map_err(|e| format!("{s:?} is not an address (ADDR or ADDR:PORT): {e}"))
}

/// The DNS add-on's settings; upstreams default to the node's resolv.conf,
/// without the add-on's own address (which would forward to itself).
fn dns_config(
    listen: std::net::SocketAddr,
    domain: String,
    upstreams: Vec<std::net::SocketAddr>,
    ttl: u32,
    cache_size: usize,
) -> proxy_userspace::dns::DnsConfig {
    let upstreams = if upstreams.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        proxy_userspace::dns::forward::resolv_conf_servers(&text)
    } else {
        upstreams
    };
    let upstreams: Vec<_> = upstreams.into_iter().filter(|u| *u != listen).collect();
    if upstreams.is_empty() {
        tracing::warn!("the DNS add-on has no upstream server: names outside the cluster get SERVFAIL");
    }
    proxy_userspace::dns::DnsConfig {
        listen,
        domain,
        ttl,
        upstreams,
        cache_size,
        upstream_timeout: Duration::from_secs(2),
        capture: None,
    }
}

/// The first prefix of family `A` in a flag's list, as iptables writes it.
fn first_prefix<A: proxy_userspace::frontend::Family>(list: &[proxy_userspace::frontend::AnyCidr]) -> Option<String> {
    proxy_userspace::frontend::AnyCidr::of::<A>(list).first().map(ToString::to_string)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: program the dataplane and keep it in sync with the source.
    Run {
        #[arg(long, value_enum, default_value = "auto")]
        mode: RequestedMode,
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
        /// This node's labels, `KEY=VALUE` comma separated, for `--source
        /// dir` (the kube source reads them from the Node): its
        /// topology.kubernetes.io/zone places it for topology-aware routing.
        #[arg(long, value_delimiter = ',')]
        node_labels: Vec<String>,
        /// Minimum time between syncs; changes in between are applied together
        /// (e.g. 1s). A lone change is applied at once.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        min_sync_interval: Duration,
        /// Node-side pod interfaces to attach the per-packet path to, comma
        /// separated (eBPF mode). Without them, socket-level load balancing
        /// alone serves the node.
        #[arg(long, value_delimiter = ',')]
        interfaces: Vec<String>,
        /// The node's devices (names or patterns, comma separated), where
        /// the per-packet path and XDP translate traffic entering the node
        /// from outside (node ports, external and load balancer IPs), once
        /// a Service has such a frontend. Default: the interfaces holding
        /// the default routes (IPv4 and IPv6).
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// How traffic from outside is taken on --devices (eBPF mode): XDP in
        /// the driver (`native`), on the kernel's generic path (`generic`),
        /// or not at all (`off`: the TC programs alone). Each device falls
        /// back from native to generic to TC alone, said in the log and in
        /// the kpr_device_path metric.
        #[arg(long, value_enum, default_value_t = proxy_userspace::dataplane::ebpf::XdpMode::Native)]
        xdp: proxy_userspace::dataplane::ebpf::XdpMode,
        /// Where NodePorts answer, as kube-proxy's flag: prefixes of either
        /// family, comma separated, selecting among the node's addresses;
        /// `0.0.0.0/0` (`::/0`) is every address; a family no prefix is of
        /// answers on all its addresses. Default: the addresses of --devices
        /// (the node's primary addresses). Localhost never answers.
        #[arg(long, value_delimiter = ',')]
        nodeport_addresses: Vec<proxy_userspace::frontend::AnyCidr>,
        /// Socket-level load balancing (eBPF mode): connects and sends to a
        /// VIP from any process under --cgroup-root get a backend before any
        /// packet exists. Off: only the per-packet path on --interfaces.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        socket_lb: bool,
        /// The cgroup v2 directory whose processes socket-level load balancing
        /// serves (default: the cgroup v2 mount in /proc/self/mountinfo, e.g.
        /// /sys/fs/cgroup or /sys/fs/cgroup/unified).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Pod network (iptables rules): traffic to a VIP from outside it is
        /// masqueraded. One prefix per family, comma separated, on a
        /// dual-stack cluster.
        #[arg(long, value_delimiter = ',')]
        cluster_cidr: Vec<proxy_userspace::frontend::AnyCidr>,
        /// iptables mode rewrites every chain this often (other syncs rewrite only changed Services).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        iptables_full_sync_period: Duration,
        /// How often the dataplane is checked for drift and repaired, in either
        /// mode: a flushed iptables table, a map entry deleted by someone else.
        #[arg(long, alias = "iptables-sync-period", default_value = "30s", value_parser = humantime::parse_duration)]
        sync_period: Duration,
        /// Capacity of the service map (frontends plus one entry per VIP).
        #[arg(long, default_value_t = abi::DEFAULT_SERVICES_MAX)]
        max_services: u32,
        /// Capacity of the backend map (endpoints over all frontends).
        #[arg(long, default_value_t = abi::DEFAULT_BACKENDS_MAX)]
        max_backends: u32,
        /// Capacity of each connection-tracking map (LRU: oldest flows are evicted).
        #[arg(long, default_value_t = abi::DEFAULT_CONNTRACK_MAX)]
        max_flows: u32,
        /// eBPF mode: how long a TCP flow stays tracked after a FIN or RST,
        /// and so how long the node port it was source-NATed to stays taken
        /// (Cilium's --bpf-ct-timeout-regular-tcp-fin). Whole seconds, at
        /// least 1. In iptables mode the node's netfilter timeouts decide.
        #[arg(long, default_value = "10s", value_parser = parse_tcp_fin_timeout)]
        conntrack_tcp_timeout_fin: u32,
        /// Where the agent writes its status for `kpr status`.
        #[arg(long, default_value = status::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where /healthz and /livez are served.
        #[arg(long, default_value = "0.0.0.0:10256")]
        healthz_bind_address: std::net::SocketAddr,
        /// Where /metrics is served (Prometheus text format).
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_bind_address: std::net::SocketAddr,
        /// Serve the dashboard here (e.g. 127.0.0.1:10260); off unless given.
        #[arg(long)]
        dashboard_bind_address: Option<std::net::SocketAddr>,
        /// Where bpffs is mounted: maps are pinned in its kpr/ folder.
        #[arg(long, default_value = inspect::DEFAULT_BPF_ROOT)]
        bpf_root: PathBuf,
        /// /healthz answers 503 once the source has been cut off this long, and
        /// /healthz and /livez once a change has waited this long to be applied.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        healthz_threshold: Duration,
        /// Serve cluster DNS here (`ADDR` or `ADDR:PORT`, port 53 unless
        /// given), e.g. NodeLocal DNSCache's 169.254.20.10; off unless given.
        #[arg(long, value_parser = parse_dns_listen)]
        dns_listen: Option<std::net::SocketAddr>,
        /// The cluster's DNS domain.
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        /// Where names outside the cluster are forwarded (`ADDR[:PORT]`,
        /// comma separated). Default: the nameservers of /etc/resolv.conf.
        #[arg(long, value_delimiter = ',', value_parser = parse_dns_listen)]
        dns_upstream: Vec<std::net::SocketAddr>,
        /// TTL of the cluster's names, in seconds (CoreDNS's default).
        #[arg(long, default_value_t = 5)]
        dns_ttl: u32,
        /// Forwarded answers kept at most.
        #[arg(long, default_value_t = 10_000)]
        dns_cache_size: usize,
        /// `NAMESPACE/NAME` of the cluster DNS Service (e.g. kube-system/kube-dns)
        /// whose DNS ports this node's clients reach the node's own DNS
        /// through while it answers, and the Service's endpoints when it does not.
        #[arg(long, requires = "dns_listen")]
        dns_capture_service: Option<String>,
    },
    /// Show the agent's mode, attached programs, map fill, last sync and
    /// source connectivity.
    Status {
        #[arg(long, default_value = status::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long, default_value = inspect::DEFAULT_BPF_ROOT)]
        bpf_root: PathBuf,
        /// Print JSON (same as -o json).
        #[arg(long)]
        json: bool,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Programmed Services, read from the pinned maps.
    Service {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Tracked flows and their backends, read from the pinned maps.
    Conntrack {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Datapath counters, traffic per Service and backend, and map fill,
    /// read from the pinned maps.
    Stats {
        #[command(flatten)]
        maps: MapsArgs,
    },
    /// The slim kubelet: run this node's pods on a CRI runtime (containerd).
    #[command(args_conflicts_with_subcommands = true)]
    Kubelet {
        #[command(subcommand)]
        command: Option<KubeletCommand>,
        #[command(flatten)]
        args: KubeletArgs,
    },
    /// Remove everything kpr installed, in either mode: iptables chains and
    /// jumps (both backends), attached programs, pinned maps; and what
    /// kube-proxy left in any mode: its chains, its nftables tables, the
    /// ipsets and dummy device of IPVS mode.
    Cleanup {
        /// Interfaces to detach from (default: every interface).
        #[arg(long, value_delimiter = ',')]
        interfaces: Option<Vec<String>>,
        #[arg(long, default_value = inspect::DEFAULT_BPF_ROOT)]
        bpf_root: PathBuf,
    },
}

#[derive(clap::Args)]
struct KubeletArgs {
    /// The CRI runtime's socket.
    #[arg(long, default_value = "unix:///run/containerd/containerd.sock")]
    container_runtime_endpoint: String,
    /// Where pods come from: `kube` (those bound to --node-name) or
    /// `dir:PATH` (static pod manifests; status is written beside them).
    #[arg(long, default_value = "kube")]
    source: kubelet_cri::run::PodSourceSpec,
    /// Kubeconfig for `--source kube`; without it the in-cluster config is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[arg(long, default_value_t = hostname())]
    node_name: String,
    /// Pod volumes and container logs live here.
    #[arg(long, default_value = DEFAULT_KUBELET_ROOT)]
    root_dir: PathBuf,
    /// Under which every pod's cgroup is made, by QoS class
    /// (`/kubepods/burstable/pod<uid>`), as the kubelet's `kubepods`.
    #[arg(long, default_value = "/kubepods")]
    cgroup_parent: String,
    /// The runtime's cgroup driver (cgroupfs or systemd), used when the
    /// runtime does not say (CRI `RuntimeConfig` wins when it answers).
    #[arg(long, default_value = "cgroupfs")]
    cgroup_driver: kubelet_cri::cgroups::Driver,
    /// DNS servers for pods with dnsPolicy ClusterFirst (comma separated).
    #[arg(long, value_delimiter = ',')]
    cluster_dns: Vec<String>,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The first restart back-off of a crashing container; it doubles per
    /// restart up to 30 times this (the kubelet's 10s and 5m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    restart_backoff: Duration,
    /// How often pods are reconciled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    sync_frequency: Duration,
    /// Register the node with the API server (`--source kube`) and renew
    /// its lease in kube-node-lease.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    register_node: bool,
    /// Labels the node registers with, beside the well-known ones (`key=value`, comma separated).
    #[arg(long, value_delimiter = ',', value_parser = kubelet_cri::node::parse_label)]
    node_labels: Vec<(String, String)>,
    /// Taints the node registers with (`key[=value]:Effect`, comma separated).
    #[arg(long, value_delimiter = ',', value_parser = kubelet_cri::node::parse_taint)]
    register_with_taints: Vec<k8s_openapi::api::core::v1::Taint>,
    /// The node's address (default: the source address of its default route).
    #[arg(long)]
    node_ip: Option<std::net::IpAddr>,
    /// How long the node's lease lasts unrenewed; it is renewed every quarter of it.
    #[arg(long, default_value_t = 40)]
    node_lease_duration_seconds: u64,
    /// The deadline of every call to the runtime but image pulls: a runtime
    /// that hangs fails the call instead of stalling the kubelet.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    runtime_request_timeout: Duration,
    /// A running container's log is rotated once over this size (a quantity: `10Mi`).
    #[arg(long, default_value = "10Mi", value_parser = log_size)]
    container_log_max_size: u64,
    /// Log files kept per container instance, the live one included (at least 2).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..))]
    container_log_max_files: u16,
}

fn log_size(s: &str) -> Result<u64, String> {
    kubelet_cri::quantity::parse_memory(s)
        .map_err(|e| e.to_string())
        .and_then(|n| u64::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| format!("{s:?}: a size above zero")))
}

const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kpr-kubelet";

#[derive(Subcommand)]
enum KubeletCommand {
    /// Print a container's log (the latest instance), as `kubectl logs`.
    Logs {
        /// `NAME` or `NAMESPACE/NAME`.
        pod: String,
        /// The container (needed when the pod has several).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Keep printing as the container writes.
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(long, default_value = DEFAULT_KUBELET_ROOT)]
        root_dir: PathBuf,
    },
    /// Stop and remove every pod this kubelet created.
    Reset {
        #[arg(long, default_value = "unix:///run/containerd/containerd.sock")]
        container_runtime_endpoint: String,
    },
}

#[derive(Subcommand)]
enum ListCommand {
    /// List them.
    List {
        #[command(flatten)]
        maps: MapsArgs,
    },
}

#[derive(clap::Args)]
struct MapsArgs {
    /// Where bpffs is mounted (the agent's --bpf-root).
    #[arg(long, default_value = inspect::DEFAULT_BPF_ROOT)]
    bpf_root: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `--conntrack-tcp-timeout-fin`: a duration of whole seconds, at least one
/// (the conntrack's clock counts seconds).
fn parse_tcp_fin_timeout(s: &str) -> Result<u32, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.subsec_nanos() != 0 || d.as_secs() == 0 {
        return Err(format!("{s:?}: whole seconds, at least 1s"));
    }
    u32::try_from(d.as_secs()).map_err(|e| format!("{s:?}: too long ({e})"))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// What `kpr status` adds to the agent's status file: read from the kernel.
#[derive(serde::Serialize)]
struct StatusReport {
    #[serde(flatten)]
    agent: Status,
    agent_running: bool,
    /// Interface -> the programs attached on its ingress and egress.
    attached: std::collections::BTreeMap<String, Vec<String>>,
    maps: Vec<inspect::MapFill>,
}

fn print_status(state_dir: PathBuf, bpf_root: PathBuf, output: Output) -> anyhow::Result<()> {
    let s = Status::read(&state_dir)?;
    let attached = s.interfaces.iter().map(|i| (i.clone(), cleanup::attached_programs(i))).collect();
    let maps =
        if s.mode == "ebpf" { Maps::open_pinned(&bpf_root).map(|m| m.fill()).unwrap_or_default() } else { vec![] };
    let report = StatusReport { agent_running: s.running(), agent: s, attached, maps };
    if output == Output::Json {
        return print_json(&report);
    }
    let s = &report.agent;
    let age = |t: f64| format!("{:.1}s ago", (status::now() - t).max(0.0));
    println!("agent:      pid {} ({})", s.pid, if report.agent_running { "running" } else { "not running" });
    println!("mode:       {}", s.mode);
    if let Some(why) = &s.fallback_reason {
        println!("            (fell back from eBPF: {why})");
    }
    println!("source:     {} ({})", s.source, if s.source_connected { "connected" } else { "disconnected" });
    println!("last sync:  {}", s.last_sync_at.map_or("never".into(), age));
    println!("services:   {} frontends, {} backends", s.frontends, s.backends);
    println!("interfaces:");
    for (iface, programs) in &report.attached {
        let programs = if programs.is_empty() { "no program attached".to_string() } else { programs.join(", ") };
        println!("  {iface:<16} {programs}");
    }
    if !report.maps.is_empty() {
        println!("maps:");
        for m in &report.maps {
            println!("  {:<16} {:>8} / {:<8} {:>5.1}%", m.map, m.entries, m.max_entries, m.ratio * 100.0);
        }
    }
    Ok(())
}

fn print_services(maps: MapsArgs) -> anyhow::Result<()> {
    let services = Maps::open_pinned(&maps.bpf_root)?.services();
    if maps.output == Output::Json {
        return print_json(&services);
    }
    println!("{:<24} {:<16} {:>4}  {:<8} BACKENDS", "FRONTEND", "TYPE", "ID", "POLICY");
    for s in services {
        let backends: Vec<String> = s.backends.iter().map(|b| format!("{} ({})", b.address, b.state)).collect();
        let mut backends =
            if backends.is_empty() { "none: new flows refused".to_string() } else { backends.join(", ") };
        if !s.source_ranges.is_empty() {
            backends.push_str(&format!("; only from {}", s.source_ranges.join(", ")));
        }
        let policy = s.policy.as_deref().unwrap_or("-");
        println!("{:<24} {:<16} {:>4}  {policy:<8} {backends}", s.frontend, s.service_type, s.id);
    }
    Ok(())
}

fn print_flows(maps: MapsArgs) -> anyhow::Result<()> {
    let flows = Maps::open_pinned(&maps.bpf_root)?.flows();
    if maps.output == Output::Json {
        return print_json(&flows);
    }
    println!(
        "{:<6} {:<5} {:<26} {:<22} {:<22} {:<7} {:<11} EXPIRES",
        "PATH", "PROTO", "CLIENT", "FRONTEND", "BACKEND", "REPLY", "STATE"
    );
    for f in &flows {
        let reply = match (f.path.as_str(), f.reply_tracked) {
            ("socket", _) => "-",
            // The node's conntrack translates its replies.
            ("host", _) => "node",
            (_, true) => "tracked",
            (_, false) => "evicted",
        };
        let expires = f.expires_in.map_or("-".to_string(), |s| format!("{s}s"));
        println!(
            "{:<6} {:<5} {:<26} {:<22} {:<22} {reply:<7} {:<11} {expires}",
            f.path, f.protocol, f.client, f.frontend, f.backend, f.state
        );
    }
    println!("{} flow(s)", flows.len());
    Ok(())
}

fn print_stats(maps: MapsArgs) -> anyhow::Result<()> {
    let stats = Maps::open_pinned(&maps.bpf_root)?.stats();
    if maps.output == Output::Json {
        return print_json(&stats);
    }
    println!("datapath:");
    for (reason, n) in &stats.datapath {
        println!("  {reason:<28} {n:>12}");
    }
    println!("devices:");
    for d in &stats.devices {
        let path = d.path.as_deref().map(|p| format!(" (outside traffic: {p})")).unwrap_or_default();
        println!("  {}{path}", d.device);
        for (hook, c) in &d.hooks {
            println!(
                "    {hook:<12} {:>10} translated {:>10} reverse {:>10} forwarded {:>8} dropped",
                c.translated, c.reverse_translated, c.forwarded, c.dropped
            );
        }
    }
    println!("traffic:");
    let v4 = stats.services.iter().map(|s| (s.frontend.to_string(), &s.total, &s.backends));
    let v6 = stats.services6.iter().map(|s| (s.frontend.to_string(), &s.total, &s.backends));
    for (frontend, total, backends) in v4.chain(v6) {
        println!("  {frontend:<30} {:>10} packets {:>12} bytes", total.packets, total.bytes);
        for (backend, c) in backends {
            println!("    -> {backend:<25} {:>10} packets {:>12} bytes", c.packets, c.bytes);
        }
    }
    println!("maps:");
    for m in &stats.maps {
        println!("  {:<16} {:>8} / {:<8} {:>5.1}%", m.map, m.entries, m.max_entries, m.ratio * 100.0);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tune_malloc();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

/// Two glibc defaults cost memory at 50,000 Services (about 10 MiB
/// together, measured with `cargo xtask bench`): each thread that allocates
/// under contention gets its own arena, and memory freed in one arena is
/// not reused by another (the watchers, the syncer and the blocking pool
/// each build part of the state); and the mmap threshold rises to the size
/// of the largest block freed, so the hash tables of the index, regrown as
/// it fills, land in the heap and leave holes there. Two arenas keep
/// contention low for an agent that is mostly idle; a fixed threshold keeps
/// large tables in their own mappings, returned whole when freed.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets tunables; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Command::Run {
            mode,
            source,
            kubeconfig,
            service_proxy_name,
            node_name,
            node_labels,
            min_sync_interval,
            interfaces,
            devices,
            xdp,
            nodeport_addresses,
            socket_lb,
            cgroup_root,
            cluster_cidr,
            iptables_full_sync_period,
            sync_period,
            max_services,
            max_backends,
            max_flows,
            conntrack_tcp_timeout_fin,
            state_dir,
            healthz_bind_address,
            metrics_bind_address,
            dashboard_bind_address,
            bpf_root,
            healthz_threshold,
            dns_listen,
            cluster_domain,
            dns_upstream,
            dns_ttl,
            dns_cache_size,
            dns_capture_service,
        } => {
            let capture = dns_capture_service
                .map(|s| match s.split_once('/') {
                    Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok(ObjectName::new(ns, name)),
                    _ => Err(anyhow::anyhow!("--dns-capture-service {s:?}: expected NAMESPACE/NAME")),
                })
                .transpose()?;
            let dns = dns_listen.map(|listen| proxy_userspace::dns::DnsConfig {
                capture,
                ..dns_config(listen, cluster_domain, dns_upstream, dns_ttl, dns_cache_size)
            });
            let zone = node_labels
                .iter()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| *k == proxy_userspace::source::kube::ZONE_LABEL)
                .map(|(_, v)| v.to_string());
            agent::run(RunConfig {
                mode,
                node_zone: zone,
                iptables: RenderConfig { cluster_cidr: first_prefix::<Ipv4Addr>(&cluster_cidr), ..Default::default() },
                iptables6: RenderConfig { cluster_cidr: first_prefix::<Ipv6Addr>(&cluster_cidr), ..Default::default() },
                nodeport_addresses,
                iptables_full_sync_period,
                sync_period,
                state_dir,
                source,
                kubeconfig,
                // `--interfaces=` (as an empty ConfigMap value gives) lists none.
                interfaces: interfaces.into_iter().filter(|i| !i.is_empty()).collect(),
                devices: devices.map(|d| d.into_iter().filter(|i| !i.is_empty()).collect()),
                xdp,
                socket_lb,
                cgroup_root,
                map_sizes: MapSizes { services: max_services, backends: max_backends, flows: max_flows },
                conntrack_lifetimes: Lifetimes { tcp_closing: conntrack_tcp_timeout_fin },
                // `sctp` is set once the mode is known.
                model: ModelConfig { service_proxy_name, node_name, sctp: false, dns: dns.is_some() },
                dns,
                min_sync_interval,
                healthz_address: healthz_bind_address,
                metrics_address: metrics_bind_address,
                dashboard_address: dashboard_bind_address,
                bpf_root,
                healthz_threshold,
            })
            .await
        }
        Command::Status { state_dir, bpf_root, json, output } => {
            print_status(state_dir, bpf_root, if json { Output::Json } else { output })
        }
        Command::Service { command: ListCommand::List { maps } } => print_services(maps),
        Command::Conntrack { command: ListCommand::List { maps } } => print_flows(maps),
        Command::Stats { maps } => print_stats(maps),
        Command::Kubelet { command: Some(KubeletCommand::Logs { pod, container, follow, root_dir }), .. } => {
            Ok(kubelet_cri::run::print_logs(&root_dir, &pod, container.as_deref(), follow)?)
        }
        Command::Kubelet { command: Some(KubeletCommand::Reset { container_runtime_endpoint }), .. } => {
            let n = kubelet_cri::kubelet::reset(&container_runtime_endpoint).await?;
            println!("removed {n} pod sandbox(es)");
            Ok(())
        }
        Command::Kubelet { command: None, args } => {
            kubelet_cri::run::run(kubelet_cri::run::Config {
                endpoint: args.container_runtime_endpoint,
                client: match args.source {
                    kubelet_cri::run::PodSourceSpec::Kube => {
                        Some(proxy_userspace::source::kube::client(args.kubeconfig.as_deref()).await?)
                    }
                    kubelet_cri::run::PodSourceSpec::Dir(_) => None,
                },
                registration: (args.register_node && matches!(args.source, kubelet_cri::run::PodSourceSpec::Kube))
                    .then(|| kubelet_cri::node::Registration {
                        name: args.node_name.clone(),
                        labels: args.node_labels.into_iter().collect(),
                        taints: args.register_with_taints,
                        address: args.node_ip,
                        lease_duration: Duration::from_secs(args.node_lease_duration_seconds.max(1)),
                        root_dir: args.root_dir.clone(),
                    }),
                source: args.source,
                node_name: args.node_name.clone(),
                settings: kubelet_cri::spec::Settings {
                    root_dir: args.root_dir,
                    cgroup_parent: args.cgroup_parent,
                    cgroup_driver: args.cgroup_driver,
                    cluster_dns: args.cluster_dns,
                    cluster_domain: args.cluster_domain,
                    node_name: args.node_name.clone(),
                    node_ip: args.node_ip.or_else(kubelet_cri::node::default_address).map(|ip| ip.to_string()),
                    log_max_size: args.container_log_max_size,
                    log_max_files: args.container_log_max_files.into(),
                },
                backoff: args.restart_backoff,
                sync_period: args.sync_frequency,
                runtime_request_timeout: args.runtime_request_timeout,
            })
            .await?;
            Ok(())
        }
        Command::Cleanup { interfaces, bpf_root } => {
            let interfaces = interfaces.unwrap_or_else(cleanup::all_interfaces);
            let mut tables = 0;
            for chains in [Chains::KubeProxys, Chains::Own] {
                tables += cleanup::remove_iptables(chains).context("removing iptables rules")?;
            }
            let programs = cleanup::remove_ebpf(&interfaces, &bpf_root);
            let kube_proxy = proxy_userspace::dataplane::kube_proxy::remove();
            println!(
                "removed kpr's and kube-proxy's iptables rules from {tables} backend(s), {programs} eBPF attachment(s), \
                 {} of kube-proxy's nftables tables, {} of its ipsets and {} dummy device",
                kube_proxy.nftables_tables,
                kube_proxy.ipsets,
                usize::from(kube_proxy.dummy_device)
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_tcp_fin_timeout;

    #[test]
    fn the_fin_timeout_is_whole_seconds_and_at_least_one() {
        assert_eq!(parse_tcp_fin_timeout("10s"), Ok(10));
        assert_eq!(parse_tcp_fin_timeout("2m"), Ok(120));
        for bad in ["0s", "500ms", "1500ms", "soon"] {
            assert!(parse_tcp_fin_timeout(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_tcp_fin_timeout("0s").unwrap_err().contains("at least 1s"));
    }
}
