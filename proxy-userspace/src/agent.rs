//! Wiring, at the binary's edge: source -> index -> model -> planner ->
//! dataplane, until Ctrl-C or SIGTERM. The steps live in the library; this
//! module only builds them from the command line and connects them, so it
//! alone (with main) reports errors through anyhow.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use proxy_userspace::{
    api::{self},
    dashboard,
    dataplane::{
        Dataplane, DataplaneError, Mode,
        ebpf::{
            EbpfDataplane, MapSizes, Targets, XdpMode, cgroup,
            ipv6::{EbpfIpv6, Ipv6Maps},
            links,
        },
        iptables::{
            IptablesDataplane,
            render::{Chains, RenderConfig},
        },
        node_addresses,
    },
    dns::{
        self, DnsConfig,
        server::DnsServer,
        zone::{SharedZone, Zone},
    },
    frontend::{AnyCidr, DnsCapture, Endpoint},
    healthcheck::HealthServers,
    index::Dirty,
    metrics::{Metrics, ReasonLabels},
    name::ObjectName,
    source::{self, SharedIndex, Source, SourceSpec},
    status::{self, Status},
    sync::{Syncer, sync_loop},
    takeover,
    validate::ModelConfig,
};

/// The mode asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RequestedMode {
    /// eBPF where the kernel allows it, else iptables (says why).
    Auto,
    /// Socket hooks on the cgroup, TC programs on the pod interfaces.
    Ebpf,
    /// kube-proxy's iptables rules.
    Iptables,
}

pub(crate) struct RunConfig {
    /// This node's zone from `--node-labels` (the kube source follows the Node's own).
    pub(crate) node_zone: Option<String>,
    pub(crate) mode: RequestedMode,
    pub(crate) iptables: RenderConfig,
    /// The IPv6 family's rules, in either mode (see `ipv6_dataplane`).
    pub(crate) iptables6: RenderConfig<Ipv6Addr>,
    /// How often iptables mode rewrites every chain instead of only changed ones.
    pub(crate) iptables_full_sync_period: Duration,
    /// How often the dataplane is checked for drift.
    pub(crate) sync_period: Duration,
    pub(crate) state_dir: PathBuf,
    pub(crate) source: SourceSpec,
    pub(crate) kubeconfig: Option<PathBuf>,
    pub(crate) interfaces: Vec<String>,
    /// Where traffic from outside enters (node ports, external and load
    /// balancer IPs) and their replies leave; `None`: the interfaces of the
    /// default routes.
    pub(crate) devices: Option<Vec<String>>,
    /// `--xdp`: how traffic from outside is taken on the node's devices.
    pub(crate) xdp: XdpMode,
    /// `--nodeport-addresses`: prefixes selecting the node addresses NodePorts answer on.
    pub(crate) nodeport_addresses: Vec<AnyCidr>,
    /// Socket-level load balancing in eBPF mode, on `cgroup_root`.
    pub(crate) socket_lb: bool,
    /// Where the socket hooks attach; found from the mounts when unset.
    pub(crate) cgroup_root: Option<PathBuf>,
    pub(crate) map_sizes: MapSizes,
    /// `--conntrack-tcp-timeout-fin`: eBPF mode's conntrack lifetimes.
    pub(crate) conntrack_lifetimes: proxy_common::conntrack::Lifetimes,
    pub(crate) model: ModelConfig,
    /// Syncs are at least this far apart; changes in between are coalesced.
    pub(crate) min_sync_interval: Duration,
    pub(crate) healthz_address: SocketAddr,
    pub(crate) metrics_address: SocketAddr,
    /// Where the dashboard is served, if anywhere.
    pub(crate) dashboard_address: Option<SocketAddr>,
    /// Where bpffs is mounted; maps are pinned in its `kpr` folder.
    pub(crate) bpf_root: PathBuf,
    /// How long the source may be cut off before /healthz says 503.
    pub(crate) healthz_threshold: Duration,
    /// The DNS add-on, if it runs.
    pub(crate) dns: Option<DnsConfig>,
}

/// Keeps the DNS add-on's zone current: rebuilds what changed whenever a
/// change arrives (and at least every second), independently of the
/// dataplane's syncs, so a name follows its Service within a second even
/// while a large sync is being applied.
fn follow_changes_in_dns(
    zone: SharedZone,
    index: SharedIndex,
    source: Arc<dyn Source>,
    changes: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = changes.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            // Asked before the index is locked: a source takes its own lock,
            // then the index's. Before a complete list the zone waits.
            if !source.ready() {
                continue;
            }
            let mut index = index.lock().unwrap();
            // The write lock holds queries up: taken only when something changed.
            let dirty = index.take_dns_dirty();
            if !matches!(dirty, Dirty::None) {
                zone.write().unwrap().update(&index, &dirty);
            }
        }
    })
}

/// Probes the DNS add-on every second and leads the cluster DNS Service
/// `service` to it while it answers (see [`DnsCapture`]), announcing each
/// switch as a change to sync. It is let go after a few probes in a row
/// go unanswered, so one slow answer (the zone being rebuilt) does not flap it.
fn watch_dns_capture(
    dns: &DnsConfig,
    service: ObjectName,
    index: SharedIndex,
    changes: mpsc::UnboundedSender<std::time::Instant>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    const MISSES_TO_RELEASE: u32 = 3;
    let ip = match dns.listen.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() && !ip.is_loopback() => ip,
        other => anyhow::bail!(
            "--dns-capture-service needs --dns-listen on an IPv4 address of the node that pods can reach (not {other})"
        ),
    };
    let to = Endpoint { ip, port: dns.listen.port() };
    let (listen, domain) = (dns.listen, dns.domain.clone());
    Ok(tokio::spawn(async move {
        let (mut answering, mut misses) = (None, 0);
        loop {
            let answered = dns::server::probe(listen, &domain, Duration::from_millis(500)).await.is_some();
            misses = if answered { 0 } else { misses + 1 };
            let now = match answering {
                Some(true) if !answered => misses < MISSES_TO_RELEASE,
                _ => answered,
            };
            if answering != Some(now) {
                answering = Some(now);
                if now {
                    tracing::info!(%service, to = %to, "DNS capture: this node's clients of the Service reach the add-on");
                } else {
                    tracing::warn!(%service, "DNS capture: the add-on does not answer; the Service leads to its endpoints");
                }
                let capture = DnsCapture { service: service.clone(), to, answering: now };
                index.lock().unwrap().set_dns_capture(Some(capture));
                if changes.send(std::time::Instant::now()).is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }))
}

async fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Where eBPF mode attaches: the socket hooks on the cgroup unless turned
/// off (without a cgroup v2 mount they are off, said in the log), the
/// per-packet path on the interfaces given and the node's devices.
fn ebpf_targets(cfg: &RunConfig) -> Targets {
    let cgroup = match (&cfg.cgroup_root, cfg.socket_lb) {
        (_, false) => None,
        (Some(root), true) => Some(root.clone()),
        (None, true) => {
            let found = cgroup::find_root();
            if found.is_none() {
                tracing::warn!("socket-level load balancing is off: no cgroup v2 mount found (pass --cgroup-root)");
            }
            found
        }
    };
    // The per-packet path also sits on the node's devices, where traffic from
    // outside enters, once a Service is reached from outside. Pods' flows to
    // ClusterIPs need nothing there: their replies, from whichever node, are
    // translated back on the client's own interface.
    let interfaces = cfg.interfaces.clone();
    let node_devices = devices(cfg);
    let devices: Vec<String> = node_devices.iter().filter(|d| !interfaces.contains(d)).cloned().collect();
    Targets { interfaces, devices, cgroup, node_devices, xdp: cfg.xdp }
}

/// `--devices`, or the interfaces of the default routes of either family.
fn devices(cfg: &RunConfig) -> Vec<String> {
    cfg.devices.clone().unwrap_or_else(|| {
        let mut devices =
            links::default_route_interfaces(&std::fs::read_to_string("/proc/net/route").unwrap_or_default());
        let v6 = links::default_route_interfaces6(&std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default());
        devices.extend(v6.into_iter().filter(|d| !devices.contains(d)).collect::<Vec<_>>());
        devices
    })
}

/// The IPv4 dataplane, why auto mode fell back from eBPF if it did, and
/// the socket hooks' IPv6 maps in eBPF mode.
type Chosen = (Box<dyn Dataplane>, Option<DataplaneError>, Option<Ipv6Maps>);

/// The dataplane for `mode`; in auto mode, eBPF unless its probe (load,
/// verify, attach to every interface) fails.
fn choose_dataplane(cfg: &RunConfig) -> Result<Chosen, DataplaneError> {
    let prefixes = AnyCidr::of::<Ipv4Addr>(&cfg.nodeport_addresses);
    let node_port_addresses = node_addresses::resolve(&prefixes, !cfg.nodeport_addresses.is_empty(), &devices(cfg));
    tracing::info!(addresses = ?node_port_addresses, "node ports answer on");
    let iptables = || -> Result<Box<dyn Dataplane>, DataplaneError> {
        let render = RenderConfig {
            node_port_addresses: node_port_addresses.clone(),
            chains: chains(cfg),
            ..cfg.iptables.clone()
        };
        Ok(Box::new(IptablesDataplane::new(render, cfg.iptables_full_sync_period)?))
    };
    let ebpf = || -> Result<(Box<dyn Dataplane>, Option<Ipv6Maps>), DataplaneError> {
        let mut dataplane =
            EbpfDataplane::attach(&ebpf_targets(cfg), cfg.map_sizes, cfg.conntrack_lifetimes, &cfg.bpf_root)?;
        let ipv6 = dataplane.take_ipv6_maps();
        Ok((Box::new(dataplane.with_node_addresses(node_port_addresses.addresses())), ipv6))
    };
    match cfg.mode {
        RequestedMode::Ebpf => ebpf().map(|(dp, ipv6)| (dp, None, ipv6)),
        RequestedMode::Iptables => Ok((iptables()?, None, None)),
        RequestedMode::Auto => match ebpf() {
            Ok((dp, ipv6)) => Ok((dp, None, ipv6)),
            Err(e) => {
                tracing::warn!(reason = e.label(), "eBPF unavailable, falling back to iptables mode: {e}");
                Ok((iptables()?, Some(e), None))
            }
        },
    }
}

/// Beside kube-proxy, kube-proxy's chain names stay its own.
fn chains(cfg: &RunConfig) -> Chains {
    if cfg.model.service_proxy_name.is_some() { Chains::Own } else { Chains::KubeProxys }
}

/// The IPv6 family's dataplane, on a node with IPv6: kube-proxy's rules
/// through ip6tables, in either mode, and in eBPF mode the IPv6 maps
/// (`maps`, read by the socket hooks and the per-packet path) beside them. `None`, said in the log, where the node
/// has no IPv6.
fn ipv6_dataplane(cfg: &RunConfig, maps: Option<Ipv6Maps>) -> Option<Box<dyn Dataplane<Ipv6Addr>>> {
    if !std::path::Path::new("/proc/net/if_inet6").exists() {
        tracing::info!("IPv6 is off on this node: IPv4 Services only");
        return None;
    }
    let prefixes = AnyCidr::of::<Ipv6Addr>(&cfg.nodeport_addresses);
    let node_port_addresses = node_addresses::resolve(&prefixes, !cfg.nodeport_addresses.is_empty(), &devices(cfg));
    tracing::info!(addresses = ?node_port_addresses, "IPv6 node ports answer on");
    let render =
        RenderConfig { node_port_addresses: node_port_addresses.clone(), chains: chains(cfg), ..cfg.iptables6.clone() };
    if let Some(maps) = maps {
        let path = if maps.cgroup.is_some() { "the socket hooks" } else { "the per-packet path" };
        tracing::info!(
            "IPv6 Services: TCP and UDP frontends through {path} (and the devices' programs from outside), \
             the rest by ip6tables rules, written only while a Service needs them"
        );
        let addresses = node_port_addresses.addresses();
        return Some(Box::new(
            EbpfIpv6::new(render, cfg.iptables_full_sync_period, maps).with_node_addresses(addresses),
        ));
    }
    match IptablesDataplane::new(render, cfg.iptables_full_sync_period) {
        Ok(rules) => Some(Box::new(rules)),
        Err(e) => {
            tracing::warn!(error = %e, "ip6tables cannot hold rules here: IPv4 Services only");
            None
        }
    }
}

/// Hands back to the system what loading the programs used and freed:
/// parsing and relocating the eBPF object (its BTF, every program's
/// functions and line info) leaves megabytes of freed blocks in the heap,
/// which glibc keeps for later allocations the agent never makes.
fn release_load_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub(crate) async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let stop = shutdown_signal().await?;
    let metrics = Arc::new(Metrics::default());
    // Loading programs and running iptables block: tell the runtime.
    let (dataplane, fallback, ipv6_maps) =
        tokio::task::block_in_place(|| choose_dataplane(&cfg)).context("starting the dataplane")?;
    if let Some(e) = &fallback {
        metrics.ebpf_fallback.get_or_create(&ReasonLabels { reason: e.label().to_string() }).set(1);
    }
    let mode = dataplane.mode();
    tracing::info!(mode = %mode, node = %cfg.model.node_name, selector = %cfg.model.label_selector(), "serving Services");
    let health = api::Health::new(cfg.healthz_threshold);
    let datapath = dataplane.stats();
    let ipv6 = tokio::task::block_in_place(|| ipv6_dataplane(&cfg, ipv6_maps));
    release_load_memory();
    let serves_ipv6 = ipv6.is_some();
    let mut syncer = Syncer::new(dataplane, metrics.clone()).with_repairs_every(cfg.sync_period);
    if let Some(ipv6) = ipv6 {
        syncer = syncer.with_ipv6(ipv6);
    }
    let zone = cfg.dns.as_ref().map(|dns| Arc::new(std::sync::RwLock::new(Zone::new(&dns.domain))));
    // Told of every change, as the sync loop is, to keep the zone current on its own.
    let dns_changes = Arc::new(tokio::sync::Notify::new());
    let observed = api::Observed {
        mode,
        metrics: metrics.clone(),
        health: health.clone(),
        datapath: datapath.clone(),
        model: syncer.shared_model(),
        model6: syncer.shared_model6(),
        recent: syncer.recent(),
        zone: zone.clone(),
    };
    let mut servers = vec![
        api::serve_health(cfg.healthz_address, health.clone()).await?,
        api::serve_metrics(cfg.metrics_address, observed.clone()).await?,
    ];
    if let Some(addr) = cfg.dashboard_address {
        servers.push(dashboard::serve(addr, observed).await?);
    }
    if let (Some(dns), Some(zone)) = (&cfg.dns, &zone) {
        let server = Arc::new(DnsServer::new(dns, zone.clone(), metrics.dns.clone()));
        let tasks = server.serve(dns.listen).await.with_context(|| format!("serving DNS on {}", dns.listen))?;
        servers.extend(tasks);
    }
    let mut status = Status {
        mode: mode.as_str().into(),
        fallback_reason: fallback.map(|e| e.to_string()),
        pid: std::process::id(),
        interfaces: cfg.interfaces.clone(),
        source: match &cfg.source {
            SourceSpec::Dir(d) => format!("dir:{}", d.display()),
            SourceSpec::Kube => "kube".into(),
        },
        started_at: status::now(),
        ..Default::default()
    };
    if let Err(e) = status.write(&cfg.state_dir) {
        tracing::warn!(error = %format!("{e:#}"), "cannot write the status file; kpr status will not see this agent");
    }

    let (tx, mut arrivals) = mpsc::unbounded_channel::<std::time::Instant>();
    let (forward, mut rx) = mpsc::unbounded_channel();
    {
        // Every change is pending for /livez until a sync applies it.
        let health = health.clone();
        let dns_changes = dns_changes.clone();
        servers.push(tokio::spawn(async move {
            while let Some(at) = arrivals.recv().await {
                health.queued(at);
                dns_changes.notify_one();
                if forward.send(at).is_err() {
                    break;
                }
            }
        }));
    }
    if mode == Mode::Ebpf && !cfg.interfaces.is_empty() {
        // A link appearing or going is a change to program, as an object is.
        if let Err(e) = links::watch(tx.clone()) {
            tracing::warn!(error = %e, "no link events: interfaces that appear later are not attached");
        }
    }
    // SCTP: iptables mode serves it; eBPF mode refuses its ports with a reason.
    let model = ModelConfig { sctp: mode == Mode::Iptables, ..cfg.model.clone() };
    let index = SharedIndex::default();
    index.lock().unwrap().set_zone(cfg.node_zone.as_deref());
    if zone.is_some() {
        index.lock().unwrap().track_dns();
    }
    if let Some((dns, service)) = cfg.dns.as_ref().and_then(|d| Some((d, d.capture.clone()?))) {
        servers.push(watch_dns_capture(dns, service, index.clone(), tx.clone())?);
    }
    let mut tasks = Vec::new();
    let source: Arc<dyn Source> = match &cfg.source {
        SourceSpec::Dir(dir) => {
            anyhow::ensure!(dir.is_dir(), "source folder {} does not exist or is not a folder", dir.display());
            tracing::info!(dir = %dir.display(), "watching manifests");
            let source = source::dir::DirSource::new(dir.clone(), model.clone(), index.clone());
            tasks.push(tokio::spawn(source.clone().watch(tx)));
            source
        }
        SourceSpec::Kube => {
            let client = source::kube::client(cfg.kubeconfig.as_deref()).await?;
            Arc::new(source::kube::KubeSource::start(client, &model, index.clone(), tx))
        }
    };

    if let Some(zone) = zone.clone() {
        servers.push(follow_changes_in_dns(zone, index.clone(), source.clone(), dns_changes));
    }
    {
        // The source's connectivity feeds /healthz even while nothing syncs.
        let (source, health) = (source.clone(), health.clone());
        servers.push(tokio::spawn(async move {
            loop {
                health.source_connected(source.connected());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }
    let mut taken_over = false;
    let mut health_servers = HealthServers::default();
    let (bpf_root, state_dir) = (cfg.bpf_root.clone(), cfg.state_dir.clone());
    let beside_kube_proxy = cfg.model.service_proxy_name.is_some();
    let after_sync = move |syncer: &mut Syncer<Box<dyn Dataplane>>, connected: bool| {
        if !taken_over {
            // Only now that this dataplane serves, remove the other's leftovers
            // and swap in this run's programs where the previous run's serve.
            syncer.dataplane.serving();
            takeover::take_over(mode, &bpf_root, beside_kube_proxy, serves_ipv6);
            taken_over = true;
        }
        health.synced();
        status.last_sync_at = Some(status::now());
        status.source_connected = connected;
        status.frontends = syncer.programmed();
        let model = syncer.model();
        let model6 = syncer.shared_model6();
        let model6 = model6.as_ref().map(|m| m.read().unwrap());
        status.backends = model.backend_count() + model6.as_ref().map_or(0, |m| m.backend_count());
        health_servers.sync(&model, model6.as_deref());
        drop((model, model6));
        if let Err(e) = status.write(&state_dir) {
            tracing::debug!(error = %format!("{e:#}"), "status file not updated");
        }
    };
    let mut syncer = sync_loop(source.as_ref(), &index, &mut rx, syncer, cfg.min_sync_interval, stop, after_sync).await;
    for t in tasks.into_iter().chain(servers) {
        t.abort();
    }
    // The DNS add-on stops answering with the agent: its clients go back
    // to the cluster DNS Service's endpoints before it exits.
    let released = index.lock().unwrap().set_dns_capture(None);
    if released {
        tracing::info!("DNS capture released: the cluster DNS Service leads to its endpoints again");
        tokio::task::block_in_place(|| syncer.sync(&mut index.lock().unwrap(), &[]));
    }
    if let Some(datapath) = &datapath {
        tracing::info!(counters = ?datapath.counters(), "datapath counters at exit");
    }
    drop(syncer);
    match mode {
        Mode::Ebpf => tracing::info!(
            pins = %proxy_userspace::inspect::pin_dir(&cfg.bpf_root).display(),
            "programs stay attached and maps pinned, so Services keep working until the next start (which takes \
             them over) or `kpr cleanup`; exiting"
        ),
        // As kube-proxy: rules stay in place so Services keep working until
        // the next start (or `kpr cleanup`).
        Mode::Iptables => tracing::info!("iptables rules left in place; exiting"),
    }
    Ok(())
}
