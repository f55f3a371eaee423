//! The agent's HTTP endpoints, kube-proxy compatible: `/healthz` and
//! `/livez` on the healthz address, `/metrics` (Prometheus text) on the
//! metrics address. Observers only read.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::metrics::Metrics;

/// Reads the datapath's counters by name, if the dataplane keeps any.
pub type CounterReader = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// Packets and bytes to and from one Service frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub service: String,
    pub frontend: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Reads per-Service traffic, if the dataplane counts it.
pub type TrafficReader = Arc<dyn Fn() -> Vec<ServiceTraffic> + Send + Sync>;

/// Whether the dataplane can be trusted to reflect the cluster.
pub struct Health {
    /// Unix time of the last sync in milliseconds; 0 before the first.
    last_sync_ms: AtomicU64,
    /// Since when the source has been cut off, if it is.
    down_since: Mutex<Option<Instant>>,
    threshold: Duration,
}

impl Health {
    pub fn new(threshold: Duration) -> Arc<Self> {
        Arc::new(Self { last_sync_ms: AtomicU64::new(0), down_since: Mutex::new(None), threshold })
    }

    pub fn synced(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_sync_ms.store(now.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn source_connected(&self, connected: bool) {
        let mut down = self.down_since.lock().unwrap();
        match (connected, *down) {
            (true, _) => *down = None,
            (false, None) => *down = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// Healthy once synced, unless the source has been cut off longer than
    /// the threshold (then what is programmed may be stale).
    pub fn healthy(&self) -> bool {
        let synced = self.last_sync_ms.load(Ordering::Relaxed) > 0;
        let cut_off = self.down_since.lock().unwrap().is_some_and(|t| t.elapsed() > self.threshold);
        synced && !cut_off
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

#[derive(Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    mode: &'static str,
    counters: Option<CounterReader>,
    traffic: Option<TrafficReader>,
}

/// The registry's metrics plus the active mode and the datapath counters,
/// which live in the kernel and are read at scrape time.
fn exposition(s: &MetricsState) -> String {
    let text = s.metrics.encode();
    let mut extra = String::new();
    extra.push_str("# HELP kpr_mode The active dataplane.\n# TYPE kpr_mode gauge\n");
    extra.push_str(&format!("kpr_mode{{mode=\"{}\"}} 1\n", s.mode));
    if let Some(read) = &s.counters {
        extra.push_str("# HELP kpr_datapath_packets Packets the datapath handled, by what it did with them.\n");
        extra.push_str("# TYPE kpr_datapath_packets counter\n");
        for (reason, n) in read() {
            extra.push_str(&format!("kpr_datapath_packets_total{{reason=\"{reason}\"}} {n}\n"));
        }
    }
    if let Some(read) = &s.traffic {
        let services = read();
        for (name, what, value) in [
            ("kpr_service_packets", "Packets", (|t: &ServiceTraffic| t.packets) as fn(&ServiceTraffic) -> u64),
            ("kpr_service_bytes", "Bytes", |t: &ServiceTraffic| t.bytes),
        ] {
            extra
                .push_str(&format!("# HELP {name} {what} to and from each Service frontend.\n# TYPE {name} counter\n"));
            for t in &services {
                extra.push_str(&format!(
                    "{name}_total{{service=\"{}\",frontend=\"{}\"}} {}\n",
                    t.service,
                    t.frontend,
                    value(t)
                ));
            }
        }
    }
    // OpenMetrics ends with "# EOF"; the extra families go before it.
    match text.rfind("# EOF") {
        Some(at) => format!("{}{extra}{}", &text[..at], &text[at..]),
        None => format!("{text}{extra}"),
    }
}

async fn metrics(State(s): State<MetricsState>) -> impl IntoResponse {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], exposition(&s))
}

/// Serves `/healthz` and `/livez` on `addr`.
pub async fn serve_health(addr: SocketAddr, health: Arc<Health>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let app = Router::new().route("/healthz", get(healthz)).route("/livez", get(healthz)).with_state(health);
    serve(addr, app, "healthz").await
}

/// Serves `/metrics` on `addr`.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    mode: &'static str,
    counters: Option<CounterReader>,
    traffic: Option<TrafficReader>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let state = MetricsState { metrics, mode, counters, traffic };
    let app = Router::new().route("/metrics", get(self::metrics)).with_state(state);
    serve(addr, app, "metrics").await
}

async fn serve(addr: SocketAddr, app: Router, what: &str) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the {what} address {addr}: {e}"))?;
    tracing::info!(%addr, "serving {what}");
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
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
    fn exposition_adds_mode_and_datapath_counters_before_eof() {
        let s = MetricsState {
            metrics: Arc::new(Metrics::default()),
            mode: "ebpf",
            counters: Some(Arc::new(|| vec![("translated", 7)])),
            traffic: Some(Arc::new(|| {
                vec![ServiceTraffic {
                    service: "default/web:http".into(),
                    frontend: "10.96.0.10:80/TCP".into(),
                    packets: 3,
                    bytes: 180,
                }]
            })),
        };
        let text = exposition(&s);
        assert!(text.contains("kpr_mode{mode=\"ebpf\"} 1"));
        assert!(text.contains("kpr_datapath_packets_total{reason=\"translated\"} 7"));
        assert!(
            text.contains("kpr_service_bytes_total{service=\"default/web:http\",frontend=\"10.96.0.10:80/TCP\"} 180"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
