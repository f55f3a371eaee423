//! Wiring: source -> model -> planner -> dataplane, until Ctrl-C or SIGTERM.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, RwLockReadGuard},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    api::{self, Recent, SyncRecord},
    dashboard,
    dataplane::{
        Dataplane,
        ebpf::{EbpfDataplane, MapSizes},
        iptables::{IptablesDataplane, render::RenderConfig},
    },
    index::Index,
    metrics::{Metrics, ReasonLabels},
    model::{Model, ModelConfig, Rejection},
    source::{self, SharedIndex, Source, SourceSpec},
    status::{self, Status},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// eBPF where the kernel allows it, else iptables (says why).
    Auto,
    /// TC eBPF programs on the pod interfaces.
    Ebpf,
    /// kube-proxy's iptables rules.
    Iptables,
}

pub struct RunConfig {
    pub mode: Mode,
    /// Make the eBPF probe fail, to exercise the fallback.
    pub simulate_ebpf_unavailable: bool,
    pub iptables: RenderConfig,
    /// How often iptables mode rewrites every chain instead of only changed ones.
    pub iptables_full_sync_period: Duration,
    pub state_dir: PathBuf,
    pub source: SourceSpec,
    pub kubeconfig: Option<PathBuf>,
    pub interfaces: Vec<String>,
    pub map_sizes: MapSizes,
    pub model: ModelConfig,
    /// Syncs are at least this far apart; changes in between are coalesced.
    pub min_sync_interval: Duration,
    pub healthz_address: SocketAddr,
    pub metrics_address: SocketAddr,
    /// Where the dashboard is served, if anywhere.
    pub dashboard_address: Option<SocketAddr>,
    /// Where bpffs is mounted; maps are pinned in its `kpr` folder.
    pub bpf_root: PathBuf,
    /// How long the source may be cut off before /healthz says 503.
    pub healthz_threshold: Duration,
}

/// Keeps the dataplane equal to the model of the source's objects.
pub struct Syncer<D> {
    pub dataplane: D,
    config: ModelConfig,
    /// Shared with observers, which only read it.
    model: Arc<RwLock<Model>>,
    /// Rejections of objects no Service owns, last reported.
    reported_loose: Vec<Rejection>,
    metrics: Arc<Metrics>,
    recent: Arc<Mutex<Recent>>,
}

impl<D: Dataplane> Syncer<D> {
    pub fn new(dataplane: D, config: ModelConfig, metrics: Arc<Metrics>) -> Self {
        let model = Arc::new(RwLock::new(Model::new(&config.node_name)));
        Self { dataplane, config, model, reported_loose: Vec::new(), metrics, recent: Arc::default() }
    }

    pub fn programmed(&self) -> RwLockReadGuard<'_, Model> {
        self.model.read().unwrap()
    }

    /// The programmed model, for observers.
    pub fn shared_model(&self) -> Arc<RwLock<Model>> {
        self.model.clone()
    }

    /// Recent syncs and current rejections, for observers.
    pub fn recent(&self) -> Arc<Mutex<Recent>> {
        self.recent.clone()
    }

    fn report(&self, r: &Rejection) {
        tracing::warn!(origin = %r.origin, object = %r.object, reason = %r.reason, "skipped invalid object");
        self.metrics.rejected.get_or_create(&ReasonLabels { reason: r.kind.label().to_string() }).inc();
    }

    /// Applies what changed in `index` since the last sync; `arrivals` are
    /// when those changes came in. Returns false if some frontends could not
    /// be programmed (they are marked for the next sync).
    pub fn sync(&mut self, index: &mut Index, arrivals: &[Instant]) -> bool {
        let started = Instant::now();
        let model = self.model.clone();
        let mut model = model.write().unwrap();
        let dirty = index.take_dirty();
        let update = model.update(index, dirty, &self.config);
        for r in &update.new_rejections {
            self.report(r);
        }
        let loose: Vec<Rejection> = index.loose_rejections().cloned().collect();
        for r in loose.iter().filter(|r| !self.reported_loose.contains(r)) {
            self.report(r);
        }
        self.reported_loose = loose;

        let errors = self.dataplane.apply(&update.ops);
        for e in &errors {
            tracing::error!(frontend = %e.frontend, reason = %e.reason, "could not program frontend; it will be retried on the next change");
        }
        let failed: Vec<_> = errors.iter().map(|e| e.frontend).collect();
        model.revert(&failed, &update.before, index);

        let done = Instant::now();
        self.metrics.sync_duration.observe((done - started).as_secs_f64());
        for at in arrivals {
            self.metrics.programming_latency.observe((done - *at).as_secs_f64());
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.metrics.last_sync_timestamp.set(now.as_secs_f64());
        {
            let mut recent = self.recent.lock().unwrap();
            let duration_ms = (done - started).as_secs_f64() * 1e3;
            recent.record(SyncRecord { at: now.as_secs_f64(), duration_ms, changes: update.ops.len() });
            recent.rejections = model.rejections().chain(&self.reported_loose).cloned().collect();
        }
        tracing::info!(
            frontends = model.frontends.len(),
            changes = update.ops.len(),
            failed = errors.len(),
            rejected = model.rejection_count() + self.reported_loose.len(),
            coalesced = arrivals.len(),
            duration_ms = (done - started).as_secs_f64() * 1e3,
            "synced"
        );
        errors.is_empty()
    }
}

/// How long to wait before retrying frontends the dataplane refused.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Syncs whenever the source announces changes, at most once per
/// `min_interval` (a lone change is applied at once), until `stop` resolves.
#[allow(clippy::too_many_arguments)]
pub async fn sync_loop<D: Dataplane>(
    source: &dyn Source,
    index: &SharedIndex,
    changes: &mut mpsc::UnboundedReceiver<Instant>,
    syncer: &mut Syncer<D>,
    min_interval: Duration,
    stop: impl std::future::Future<Output = ()>,
    mut after_sync: impl FnMut(&mut Syncer<D>, &dyn Source),
) {
    let mut stop = std::pin::pin!(stop);
    let mut pending: Vec<Instant> = Vec::new();
    let mut last_sync: Option<tokio::time::Instant> = None;
    // Set after a sync the dataplane partly refused: try again then, even
    // without a new change.
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        let next_allowed = last_sync.map_or_else(tokio::time::Instant::now, |t| t + min_interval);
        let due = if pending.is_empty() { retry.map(|r| r.max(next_allowed)) } else { Some(next_allowed) };
        tokio::select! {
            Some(at) = changes.recv() => {
                pending.push(at);
                while let Ok(at) = changes.try_recv() {
                    pending.push(at);
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() && source.ready() => {
                let ok = syncer.sync(&mut index.lock().unwrap(), &pending);
                after_sync(syncer, source);
                pending.clear();
                last_sync = Some(tokio::time::Instant::now());
                retry = (!ok).then(|| tokio::time::Instant::now() + RETRY_AFTER);
            }
            _ = &mut stop => return,
        }
    }
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

/// The dataplane for `mode`; in auto mode, eBPF unless its probe (load,
/// verify, attach to every interface) fails. Returns why it fell back.
fn choose_dataplane(cfg: &RunConfig) -> anyhow::Result<(Box<dyn Dataplane>, Option<String>)> {
    let iptables = || -> anyhow::Result<Box<dyn Dataplane>> {
        Ok(Box::new(IptablesDataplane::new(cfg.iptables.clone(), cfg.iptables_full_sync_period)?))
    };
    let ebpf = || -> anyhow::Result<Box<dyn Dataplane>> {
        if cfg.simulate_ebpf_unavailable {
            anyhow::bail!("eBPF disabled by --simulate-ebpf-unavailable");
        }
        Ok(Box::new(EbpfDataplane::attach(&cfg.interfaces, cfg.map_sizes, &cfg.bpf_root)?))
    };
    match cfg.mode {
        Mode::Ebpf => Ok((ebpf()?, None)),
        Mode::Iptables => Ok((iptables()?, None)),
        Mode::Auto => match ebpf() {
            Ok(dp) => Ok((dp, None)),
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!("eBPF unavailable, falling back to iptables mode: {why}");
                Ok((iptables()?, Some(why)))
            }
        },
    }
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let stop = shutdown_signal().await?;
    let metrics = Arc::new(Metrics::default());
    let (dataplane, fallback_reason) = choose_dataplane(&cfg)?;
    tracing::info!(mode = dataplane.mode(), node = %cfg.model.node_name, selector = %cfg.model.label_selector(), "serving Services");
    let health = api::Health::new(cfg.healthz_threshold);
    let maps = dataplane.maps();
    let mut syncer = Syncer::new(dataplane, cfg.model.clone(), metrics.clone());
    let observed = api::Observed {
        mode: syncer.dataplane.mode(),
        metrics,
        health: health.clone(),
        maps: maps.clone(),
        model: syncer.shared_model(),
        recent: syncer.recent(),
    };
    let mut servers = vec![
        api::serve_health(cfg.healthz_address, health.clone()).await?,
        api::serve_metrics(cfg.metrics_address, observed.clone()).await?,
    ];
    if let Some(addr) = cfg.dashboard_address {
        servers.push(dashboard::serve(addr, observed).await?);
    }
    let mut status = Status {
        mode: syncer.dataplane.mode().into(),
        fallback_reason,
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

    let (tx, mut rx) = mpsc::unbounded_channel();
    let index = SharedIndex::default();
    let mut tasks = Vec::new();
    let source: Arc<dyn Source> = match &cfg.source {
        SourceSpec::Dir(dir) => {
            anyhow::ensure!(dir.is_dir(), "source folder {} does not exist or is not a folder", dir.display());
            tracing::info!(dir = %dir.display(), "watching manifests");
            let source = source::dir::DirSource::new(dir.clone(), index.clone());
            tasks.push(tokio::spawn(source.clone().watch(tx)));
            source
        }
        SourceSpec::Kube => {
            let client = source::kube::client(cfg.kubeconfig.as_deref()).await?;
            Arc::new(source::kube::KubeSource::start(client, &cfg.model.label_selector(), index.clone(), tx))
        }
    };

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
    let after_sync = |syncer: &mut Syncer<Box<dyn Dataplane>>, source: &dyn Source| {
        if !taken_over {
            // Only now that this dataplane serves, remove the other's leftovers.
            syncer.dataplane.take_over(&cfg.interfaces, &cfg.bpf_root);
            taken_over = true;
        }
        health.synced();
        status.last_sync_at = Some(status::now());
        status.source_connected = source.connected();
        status.frontends = syncer.programmed().frontends.len();
        status.backends = syncer.programmed().backend_count();
        let _ = status.write(&cfg.state_dir);
    };
    sync_loop(source.as_ref(), &index, &mut rx, &mut syncer, cfg.min_sync_interval, stop, after_sync).await;
    for t in tasks.into_iter().chain(servers) {
        t.abort();
    }
    if let Some(maps) = &maps {
        tracing::info!(counters = ?maps.counters(), "datapath counters at exit");
    }
    let mode = syncer.dataplane.mode();
    drop(syncer);
    match mode {
        "ebpf" => tracing::info!(
            pins = %crate::inspect::pin_dir(&cfg.bpf_root).display(),
            "detached from all interfaces; maps stay pinned for inspection until the next start or `kpr cleanup`; exiting"
        ),
        // As kube-proxy: rules stay in place so Services keep working until
        // the next start (or `kpr cleanup`).
        _ => tracing::info!("iptables rules left in place; exiting"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        dataplane::ApplyError,
        model::{FrontendKey, Protocol, Snapshot, Sourced},
        planner::Op,
    };

    /// Records what it was asked to apply; fails frontends on port 666.
    #[derive(Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<Op>>>>);

    impl Dataplane for Recorder {
        fn apply(&mut self, ops: &[Op]) -> Vec<ApplyError> {
            self.0.lock().unwrap().push(ops.to_vec());
            ops.iter()
                .filter_map(|op| match op {
                    Op::Upsert(f) if f.key.port == 666 => Some(ApplyError { frontend: f.key, reason: "full".into() }),
                    _ => None,
                })
                .collect()
        }
    }

    struct Ready;

    impl Source for Ready {
        fn ready(&self) -> bool {
            true
        }
        fn connected(&self) -> bool {
            true
        }
    }

    fn index(yaml: &str) -> Index {
        let mut snap = Snapshot::default();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            snap.services.push(Sourced::new("test", serde_yaml::from_value(v).unwrap()));
        }
        Index::from_snapshot(&snap)
    }

    const TWO: &str = "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
                       kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80, protocol: SCTP}]}\n";

    #[test]
    fn a_sync_records_latency_and_counts_rejections_once() {
        let metrics = Arc::new(Metrics::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut syncer = Syncer::new(Recorder(log.clone()), ModelConfig::default(), metrics.clone());
        let mut idx = index(TWO);
        let arrived = Instant::now();
        syncer.sync(&mut idx, &[arrived, arrived]);
        idx.touch_all();
        syncer.sync(&mut idx, &[arrived]);
        let text = metrics.encode();
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 3"),
            "one observation per change:\n{text}"
        );
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 2"), "{text}");
        assert!(text.contains("kpr_rejected_objects_total{reason=\"unsupported_protocol\"} 1"), "{text}");
        let log = log.lock().unwrap();
        assert_eq!(log[0].len(), 1, "the valid Service was programmed");
        assert!(log[1].is_empty(), "nothing changed, nothing applied");
    }

    #[test]
    fn a_failed_frontend_is_retried_on_the_next_sync() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut syncer = Syncer::new(Recorder(log.clone()), ModelConfig::default(), Arc::new(Metrics::default()));
        let mut idx = index("kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 666}]}\n");
        assert!(!syncer.sync(&mut idx, &[]), "reports the failure");
        let key = FrontendKey { vip: [10, 96, 0, 1].into(), port: 666, protocol: Protocol::Tcp };
        assert!(!syncer.programmed().frontends.contains_key(&key), "not counted as programmed");
        syncer.sync(&mut idx, &[]);
        assert_eq!(log.lock().unwrap()[1].len(), 1, "tried again without any new change");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_frontends_are_retried_without_a_new_change() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut syncer = Syncer::new(Recorder(log.clone()), ModelConfig::default(), Arc::new(Metrics::default()));
        let shared: SharedIndex = Arc::new(Mutex::new(index(
            "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 666}]}\n",
        )));
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(Instant::now()).unwrap();
        let stop = tokio::time::sleep(RETRY_AFTER * 2 + Duration::from_millis(500));
        sync_loop(&Ready, &shared, &mut rx, &mut syncer, Duration::ZERO, stop, |_, _| {}).await;
        assert_eq!(log.lock().unwrap().len(), 3, "the first attempt and one retry per interval");
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_are_coalesced_but_a_lone_change_is_not_delayed() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut syncer = Syncer::new(Recorder(log.clone()), ModelConfig::default(), Arc::new(Metrics::default()));
        let shared: SharedIndex = Arc::new(Mutex::new(index(TWO)));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = tokio::time::Instant::now();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let driver = async move {
            tx.send(Instant::now()).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            for _ in 0..5 {
                tx.send(Instant::now()).unwrap();
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            stop_tx.send(()).unwrap();
        };
        let syncs = Arc::new(Mutex::new(Vec::new()));
        let observed = syncs.clone();
        let watcher = async move {
            let mut seen = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let n = log.lock().unwrap().len();
                if n > seen {
                    observed.lock().unwrap().push(start.elapsed());
                    seen = n;
                }
            }
        };
        tokio::select! {
            _ = async {
                tokio::join!(driver, sync_loop(&Ready, &shared, &mut rx, &mut syncer, Duration::from_secs(1), async { let _ = stop_rx.await; }, |_, _| {}));
            } => {}
            _ = watcher => {}
        }
        let syncs = syncs.lock().unwrap();
        assert_eq!(syncs.len(), 2, "one sync for the lone change, one for the burst: {syncs:?}");
        assert!(syncs[0] < Duration::from_millis(10), "the first change was applied at once: {syncs:?}");
        assert!(syncs[1] >= Duration::from_secs(1), "the burst waited for the interval: {syncs:?}");
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::model::Sourced;

    /// One change among 50,000 Services is recomputed and applied alone. The
    /// time is printed for a look (`--nocapture`); speed is the benchmark's job.
    #[test]
    fn one_change_among_50k_services_touches_only_its_own() {
        let svc = |i: u32| -> Sourced<k8s_openapi::api::core::v1::Service> {
            Sourced::new("f", serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("s{i}"), "namespace": "bench"},
                "spec": {"clusterIP": std::net::Ipv4Addr::from(0x0a60_0001 + i).to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
            })).unwrap())
        };
        let slice = |i: u32, e: u32| -> Sourced<k8s_openapi::api::discovery::v1::EndpointSlice> {
            Sourced::new("f", serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("s{i}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": [std::net::Ipv4Addr::from(0x0af5_0001 + e).to_string()]}, {"addresses": [std::net::Ipv4Addr::from(0x0af5_0002 + e).to_string()]}]
            })).unwrap())
        };
        let mut index = Index::default();
        for i in 0..50_000u32 {
            index.apply_service(svc(i));
            index.apply_slice(slice(i, 3 * i));
        }
        let cfg = ModelConfig::default();
        let mut model = Model::new("n");
        let t = Instant::now();
        let dirty = index.take_dirty();
        let full = model.update(&index, dirty, &cfg);
        let cold = t.elapsed();
        index.apply_slice(slice(49_999, 7));
        let t = Instant::now();
        let dirty = index.take_dirty();
        let one = model.update(&index, dirty, &cfg);
        let change = t.elapsed();
        eprintln!("cold {cold:?} ({} ops), one change {change:?} ({} ops)", full.ops.len(), one.ops.len());
        assert_eq!(full.ops.len(), 50_000);
        assert_eq!(one.ops.len(), 1);
    }
}
