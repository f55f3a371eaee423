//! The agent's HTTP endpoints, kube-proxy compatible: `/healthz` and
//! `/livez` on the healthz address, `/metrics` (Prometheus text) on the
//! metrics address. Observers only read.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{
    dataplane::{DatapathStats, Mode},
    frontend::Family,
    inspect::{Counts, FrontendTraffic, MapFill},
    metrics::Metrics,
    model::Model,
    rejection::Rejection,
};

/// How many syncs the dashboard's chart shows.
pub const RECENT_SYNCS: usize = 60;

/// One sync, for the dashboard's chart.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SyncRecord {
    /// Unix time, seconds.
    pub at: f64,
    pub duration_ms: f64,
    pub changes: usize,
}

/// What the sync loop publishes for observers besides the model.
#[derive(Default)]
pub struct Recent {
    pub syncs: VecDeque<SyncRecord>,
    /// Every object currently skipped, with its reason.
    pub rejections: Vec<Rejection>,
}

impl Recent {
    pub fn record(&mut self, sync: SyncRecord) {
        if self.syncs.len() == RECENT_SYNCS {
            self.syncs.pop_front();
        }
        self.syncs.push_back(sync);
    }
}

/// What the agent shares with its HTTP servers. Observers only read.
#[derive(Clone)]
pub struct Observed {
    pub mode: Mode,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The datapath's counters, where the dataplane keeps any.
    pub datapath: Option<Arc<dyn DatapathStats>>,
    /// What is programmed (names, types and backends of every frontend).
    pub model: Arc<RwLock<Model>>,
    /// The same for IPv6, when the node serves it.
    pub model6: Option<Arc<RwLock<Model<std::net::Ipv6Addr>>>>,
    pub recent: Arc<Mutex<Recent>>,
    /// The DNS add-on's names, when it runs.
    pub zone: Option<crate::dns::zone::SharedZone>,
}

/// Whether the dataplane can be trusted to reflect the cluster.
pub struct Health {
    /// Unix time of the last sync in milliseconds; 0 before the first.
    last_sync_ms: AtomicU64,
    /// Since when the source has been cut off, if it is.
    down_since: Mutex<Option<Instant>>,
    /// The oldest change not applied yet (the start counts as one, until
    /// the first sync).
    oldest_pending: Mutex<Option<Instant>>,
    threshold: Duration,
}

impl Health {
    pub fn new(threshold: Duration) -> Arc<Self> {
        Arc::new(Self {
            last_sync_ms: AtomicU64::new(0),
            down_since: Mutex::new(None),
            oldest_pending: Mutex::new(Some(Instant::now())),
            threshold,
        })
    }

    /// A change arrived at `at`, to be applied by a coming sync.
    pub fn queued(&self, at: Instant) {
        self.oldest_pending.lock().unwrap().get_or_insert(at);
    }

    /// A sync applied every change queued before it.
    pub fn synced(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_sync_ms.store(now.as_millis() as u64, Ordering::Relaxed);
        *self.oldest_pending.lock().unwrap() = None;
    }

    /// As kube-proxy's `/livez`: alive unless a change has waited longer than
    /// the threshold to be applied (the agent cannot apply what it has). An
    /// API server away is not the agent's fault: what is programmed keeps
    /// serving, and restarting the agent would not bring the server back.
    pub fn alive(&self) -> bool {
        !self.oldest_pending.lock().unwrap().is_some_and(|t| t.elapsed() > self.threshold)
    }

    pub fn source_connected(&self, connected: bool) {
        let mut down = self.down_since.lock().unwrap();
        match (connected, *down) {
            (true, _) => *down = None,
            (false, None) => *down = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// Healthy once synced and alive, unless the source has been cut off
    /// longer than the threshold (then what is programmed may be stale,
    /// which `/healthz` reports; `/livez` does not).
    pub fn healthy(&self) -> bool {
        let synced = self.last_sync_ms.load(Ordering::Relaxed) > 0;
        let cut_off = self.down_since.lock().unwrap().is_some_and(|t| t.elapsed() > self.threshold);
        synced && self.alive() && !cut_off
    }

    fn body(&self) -> String {
        let last = self.last_sync_ms.load(Ordering::Relaxed);
        let last = if last == 0 {
            String::new()
        } else {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(last)).to_string()
        };
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        serde_json::json!({"lastUpdated": last, "currentTime": now}).to_string()
    }
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let code = if health.healthy() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [("content-type", "application/json")], health.body())
}

async fn livez(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let code = if health.alive() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [("content-type", "application/json")], health.body())
}

/// One Service frontend's traffic (of either family) with the Service's name.
pub struct NamedTraffic<'a> {
    pub service: String,
    /// `VIP:port/PROTOCOL`.
    pub frontend: String,
    pub total: Counts,
    pub backends: &'a BTreeMap<String, Counts>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
}

/// The families read from the datapath at scrape time: counters by reason,
/// traffic per Service frontend and backend, conntrack entries and map fill.
pub fn datapath_families(counters: &[(&str, u64)], traffic: &[NamedTraffic], fill: &[MapFill]) -> String {
    let mut out = String::new();
    family(&mut out, "kpr_datapath_packets", "counter", "Packets the datapath handled, by what it did with them.");
    for (reason, n) in counters {
        out.push_str(&format!("kpr_datapath_packets_total{{reason=\"{reason}\"}} {n}\n"));
    }
    for (name, what, bytes) in [("kpr_service_packets", "Packets", false), ("kpr_service_bytes", "Bytes", true)] {
        family(&mut out, name, "counter", &format!("{what} to and from each Service frontend."));
        for t in traffic {
            let v = if bytes { t.total.bytes } else { t.total.packets };
            out.push_str(&format!("{name}_total{{service=\"{}\",frontend=\"{}\"}} {v}\n", t.service, t.frontend));
        }
    }
    for (name, what, bytes) in [("kpr_backend_packets", "Packets", false), ("kpr_backend_bytes", "Bytes", true)] {
        family(&mut out, name, "counter", &format!("{what} to and from each backend of a Service frontend."));
        for t in traffic {
            for (backend, c) in t.backends {
                let v = if bytes { c.bytes } else { c.packets };
                out.push_str(&format!(
                    "{name}_total{{service=\"{}\",frontend=\"{}\",backend=\"{backend}\"}} {v}\n",
                    t.service, t.frontend
                ));
            }
        }
    }
    family(
        &mut out,
        "kpr_conntrack_entries",
        "gauge",
        "Entries in the per-packet path's conntrack tables (one per direction of a flow).",
    );
    for (map, table) in [(proxy_common::maps::CT_TCP, "tcp"), (proxy_common::maps::CT_ANY, "any")] {
        if let Some(f) = fill.iter().find(|f| f.map == map) {
            out.push_str(&format!("kpr_conntrack_entries{{table=\"{table}\"}} {}\n", f.entries));
        }
    }
    for (name, help, value) in [
        (
            "kpr_bpf_map_entries",
            "Entries in each datapath map.",
            (|f: &MapFill| f.entries as f64) as fn(&MapFill) -> f64,
        ),
        ("kpr_bpf_map_capacity", "Capacity of each datapath map.", |f: &MapFill| f.max_entries as f64),
        ("kpr_bpf_map_fill_ratio", "Entries over capacity of each datapath map.", |f: &MapFill| f.ratio),
    ] {
        family(&mut out, name, "gauge", help);
        for f in fill {
            out.push_str(&format!("{name}{{map=\"{}\"}} {}\n", f.map, value(f)));
        }
    }
    out
}

/// Which path each device takes traffic from outside by (XDP native or
/// generic, or TC when XDP is off or refused), and what each hook did there.
pub fn device_families(devices: &[crate::inspect::DeviceStats]) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "kpr_device_path",
        "gauge",
        "The path traffic from outside takes on each of the node's devices: xdp_native, xdp_generic or tc.",
    );
    for d in devices {
        if let Some(path) = &d.path {
            out.push_str(&format!("kpr_device_path{{device=\"{}\",path=\"{path}\"}} 1\n", d.device));
        }
    }
    family(&mut out, "kpr_device_packets", "counter", "Packets each hook acted on, per interface, by what it did.");
    for d in devices {
        for (hook, c) in &d.hooks {
            for (action, n) in [
                ("translated", c.translated),
                ("reverse_translated", c.reverse_translated),
                ("forwarded", c.forwarded),
                ("dropped", c.dropped),
            ] {
                out.push_str(&format!(
                    "kpr_device_packets_total{{device=\"{}\",hook=\"{hook}\",action=\"{action}\"}} {n}\n",
                    d.device
                ));
            }
        }
    }
    out
}

/// Traffic per frontend of one family, named after the Services the model says own them.
pub fn named<'a, A: Family>(model: &Model<A>, traffic: &'a [FrontendTraffic<A>]) -> Vec<NamedTraffic<'a>> {
    traffic
        .iter()
        .map(|t| NamedTraffic {
            service: model.frontends.get(&t.frontend).map(|f| f.service.to_string()).unwrap_or_default(),
            frontend: t.frontend.to_string(),
            total: t.total,
            backends: &t.backends,
        })
        .collect()
}

/// The registry's metrics plus the active mode and what the datapath's
/// maps hold, read at scrape time.
fn exposition(o: &Observed) -> String {
    let text = o.metrics.encode();
    let mut extra = String::new();
    family(&mut extra, "kpr_mode", "gauge", "The active dataplane.");
    extra.push_str(&format!("kpr_mode{{mode=\"{}\"}} 1\n", o.mode));
    family(&mut extra, "kpr_frontends", "gauge", "Service frontends in the desired state, by IP family.");
    extra.push_str(&format!("kpr_frontends{{family=\"IPv4\"}} {}\n", o.model.read().unwrap().frontends.len()));
    if let Some(model6) = &o.model6 {
        extra.push_str(&format!("kpr_frontends{{family=\"IPv6\"}} {}\n", model6.read().unwrap().frontends.len()));
    }
    if let Some(datapath) = &o.datapath {
        let (traffic, traffic6) = (datapath.traffic(), datapath.traffic6());
        let mut named = named(&o.model.read().unwrap(), &traffic);
        if let Some(model6) = &o.model6 {
            named.extend(self::named(&model6.read().unwrap(), &traffic6));
        }
        extra.push_str(&datapath_families(&datapath.counters(), &named, &datapath.fill()));
        extra.push_str(&device_families(&datapath.devices()));
    }
    // OpenMetrics ends with "# EOF"; the extra families go before it.
    match text.rfind("# EOF") {
        Some(at) => format!("{}{extra}{}", &text[..at], &text[at..]),
        None => format!("{text}{extra}"),
    }
}

async fn metrics(State(o): State<Observed>) -> impl IntoResponse {
    // Reading the maps is a few syscalls per entry: off the async threads.
    let text = tokio::task::spawn_blocking(move || exposition(&o)).await.unwrap_or_default();
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

/// Serves `/healthz` and `/livez` on `addr`.
/// A server could not bind its address.
#[derive(Debug, thiserror::Error)]
#[error("binding the {what} address {addr}: {source} (is another kpr or kube-proxy running?)")]
pub struct BindError {
    what: &'static str,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

pub async fn serve_health(addr: SocketAddr, health: Arc<Health>) -> Result<tokio::task::JoinHandle<()>, BindError> {
    let app = Router::new().route("/healthz", get(healthz)).route("/livez", get(livez)).with_state(health);
    serve(addr, app, "healthz").await
}

/// Serves `/metrics` on `addr`.
pub async fn serve_metrics(addr: SocketAddr, observed: Observed) -> Result<tokio::task::JoinHandle<()>, BindError> {
    let app = Router::new().route("/metrics", get(self::metrics)).with_state(observed);
    serve(addr, app, "metrics").await
}

pub(crate) async fn serve(
    addr: SocketAddr,
    app: Router,
    what: &'static str,
) -> Result<tokio::task::JoinHandle<()>, BindError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| BindError { what, addr, source })?;
    tracing::info!(%addr, "serving {what}");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "a server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_after_a_sync_until_the_source_is_cut_off_too_long() {
        let h = Health::new(Duration::from_millis(50));
        assert!(!h.healthy(), "not before the first sync");
        h.synced();
        assert!(h.healthy());
        h.source_connected(false);
        assert!(h.healthy(), "a short outage is fine");
        std::thread::sleep(Duration::from_millis(80));
        assert!(!h.healthy());
        h.source_connected(true);
        assert!(h.healthy());
        assert!(h.body().contains("lastUpdated") && h.body().contains("currentTime"));
    }

    #[test]
    fn alive_unless_a_change_waits_too_long_to_be_applied() {
        let h = Health::new(Duration::from_millis(50));
        assert!(h.alive(), "starting");
        std::thread::sleep(Duration::from_millis(80));
        assert!(!h.alive(), "no first sync within the threshold");
        h.synced();
        assert!(h.alive());
        h.source_connected(false);
        std::thread::sleep(Duration::from_millis(80));
        assert!(h.alive() && !h.healthy(), "the source away: stale, not dead");
        h.queued(Instant::now());
        assert!(h.alive(), "a change just queued");
        std::thread::sleep(Duration::from_millis(80));
        assert!(!h.alive(), "a change not applied within the threshold");
        h.synced();
        assert!(h.alive());
    }

    #[test]
    fn datapath_families_carry_traffic_conntrack_and_fill() {
        use crate::frontend::{FrontendKey, Protocol};
        let traffic: FrontendTraffic = FrontendTraffic {
            frontend: FrontendKey { vip: [10, 96, 0, 10].into(), port: 80, protocol: Protocol::Tcp },
            total: Counts { packets: 3, bytes: 180 },
            backends: [("10.244.0.2:8080".to_string(), Counts { packets: 3, bytes: 180 })].into(),
        };
        let fill = [MapFill { map: "CT_TCP".into(), entries: 2, max_entries: 8, ratio: 0.25 }];
        let text = datapath_families(
            &[("translated", 7)],
            &[NamedTraffic {
                service: "default/web:http".into(),
                frontend: traffic.frontend.to_string(),
                total: traffic.total,
                backends: &traffic.backends,
            }],
            &fill,
        );
        for line in [
            "kpr_datapath_packets_total{reason=\"translated\"} 7",
            "kpr_service_bytes_total{service=\"default/web:http\",frontend=\"10.96.0.10:80/TCP\"} 180",
            "kpr_backend_packets_total{service=\"default/web:http\",frontend=\"10.96.0.10:80/TCP\",backend=\"10.244.0.2:8080\"} 3",
            "kpr_conntrack_entries{table=\"tcp\"} 2",
            "kpr_bpf_map_fill_ratio{map=\"CT_TCP\"} 0.25",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn exposition_adds_the_mode_before_eof() {
        let o = Observed {
            mode: Mode::Iptables,
            metrics: Arc::new(Metrics::default()),
            health: Health::new(Duration::from_secs(1)),
            datapath: None,
            model: Arc::default(),
            model6: Some(Arc::default()),
            recent: Arc::default(),
            zone: None,
        };
        let text = exposition(&o);
        assert!(text.contains("kpr_mode{mode=\"iptables\"} 1"), "{text}");
        assert!(text.contains("kpr_frontends{family=\"IPv4\"} 0"), "{text}");
        assert!(text.contains("kpr_frontends{family=\"IPv6\"} 0"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
