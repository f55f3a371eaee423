//! The dashboard (`--dashboard-bind-address`): one page, its script and
//! style embedded in the binary (no CDN), polling `/api/state` once a second.
//! It shows the mode and health, every Service with its backends and their
//! traffic, recent sync durations and the objects that were skipped.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use axum::{Json, Router, extract::State, response::IntoResponse, routing::get};
use serde::Serialize;

use crate::{
    api::{Observed, SyncRecord},
    dns::{DnsMetrics, zone::Zone},
    frontend::{Endpoint, Family, Frontend},
    inspect::FrontendTraffic,
    model::Model,
    rejection::Rejection,
    validate::DnsTarget,
};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// The page lists at most this many Services (by name); the total is shown.
pub const MAX_SERVICES: usize = 500;

#[derive(Debug, Serialize)]
pub struct DashboardState {
    pub mode: &'static str,
    pub healthy: bool,
    /// Whether traffic counters exist (they do in eBPF mode).
    pub counters: bool,
    pub services_total: usize,
    pub services: Vec<ServiceView>,
    pub syncs: Vec<SyncRecord>,
    pub rejected: Vec<RejectedView>,
    /// Datapath packets by what was done with them.
    pub datapath: BTreeMap<String, u64>,
    /// The DNS add-on's names and counts, when it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsView>,
}

#[derive(Debug, Serialize)]
pub struct DnsView {
    pub names_total: usize,
    /// The first [`MAX_SERVICES`] names, in order.
    pub names: Vec<DnsName>,
    pub queries: u64,
    pub cache_hits: u64,
}

#[derive(Debug, Serialize)]
pub struct DnsName {
    pub name: String,
    pub kind: &'static str,
    pub answers: Vec<String>,
}

/// The zone's names as the page lists them, with the add-on's counts.
fn dns_view(zone: &Zone, metrics: &DnsMetrics) -> DnsView {
    let names = zone
        .listing(MAX_SERVICES)
        .into_iter()
        .map(|(name, records)| {
            let (kind, answers) = match &records.target {
                DnsTarget::ClusterIps(ips) => ("ClusterIP", ips.iter().map(ToString::to_string).collect()),
                DnsTarget::Headless => ("headless", records.endpoints.iter().map(|e| e.ip.to_string()).collect()),
                DnsTarget::ExternalName(target) => ("ExternalName", vec![target.to_string()]),
            };
            DnsName { name, kind, answers }
        })
        .collect();
    let queries = metrics.requests_total();
    DnsView { names_total: zone.len(), names, queries, cache_hits: metrics.cache_hits.get() }
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub name: String,
    pub frontend: String,
    #[serde(rename = "type")]
    pub service_type: String,
    /// The port's `appProtocol`, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub address: String,
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct RejectedView {
    pub object: String,
    pub origin: String,
    pub reason: String,
}

/// One frontend as the page shows it, with its traffic if counted.
fn view<A: Family>(f: &Frontend<A>, t: Option<&FrontendTraffic<A>>) -> ServiceView {
    let backend = |e: &Endpoint<A>, state: &'static str| {
        let address = e.to_string();
        let c = t.and_then(|t| t.backends.get(&address)).copied().unwrap_or_default();
        BackendView { address, state, packets: c.packets, bytes: c.bytes }
    };
    let total = t.map(|t| t.total).unwrap_or_default();
    ServiceView {
        name: f.service.to_string(),
        frontend: f.key.to_string(),
        service_type: format!("{:?}", f.service_type),
        app_protocol: f.app_protocol().map(String::from),
        packets: total.packets,
        bytes: total.bytes,
        backends: f
            .backends
            .iter()
            .map(|e| backend(e, "active"))
            .chain(f.terminating.iter().map(|e| backend(e, "terminating")))
            .collect(),
    }
}

/// A frontend of either family, as the page lists them.
enum AnyFrontend<'a> {
    V4(&'a Frontend),
    V6(&'a Frontend<Ipv6Addr>),
}

impl AnyFrontend<'_> {
    fn order(&self) -> (&crate::name::ServicePortName, IpAddr, u16, crate::frontend::Protocol) {
        match self {
            AnyFrontend::V4(f) => (&f.service, f.key.vip.into(), f.key.port, f.key.protocol),
            AnyFrontend::V6(f) => (&f.service, f.key.vip.into(), f.key.port, f.key.protocol),
        }
    }
}

/// Joins the models (names, types, backends; IPv4 and, where served,
/// IPv6) with the datapath's traffic.
pub fn state(
    o: &Observed,
    model: &Model,
    model6: Option<&Model<Ipv6Addr>>,
    traffic: &[FrontendTraffic],
    traffic6: &[FrontendTraffic<Ipv6Addr>],
    datapath: Vec<(&'static str, u64)>,
) -> DashboardState {
    let traffic: BTreeMap<_, _> = traffic.iter().map(|t| (t.frontend, t)).collect();
    let traffic6: BTreeMap<_, _> = traffic6.iter().map(|t| (t.frontend, t)).collect();
    let mut frontends: Vec<AnyFrontend<'_>> = model.frontends.values().map(AnyFrontend::V4).collect();
    frontends.extend(model6.into_iter().flat_map(|m| m.frontends.values()).map(AnyFrontend::V6));
    // By Service, a dual-stack Service's two frontends side by side.
    frontends.sort_by(|a, b| a.order().cmp(&b.order()));
    let services = frontends
        .iter()
        .take(MAX_SERVICES)
        .map(|f| match f {
            AnyFrontend::V4(f) => view(f, traffic.get(&f.key).copied()),
            AnyFrontend::V6(f) => view(f, traffic6.get(&f.key).copied()),
        })
        .collect();
    let recent = o.recent.lock().unwrap();
    DashboardState {
        mode: o.mode.as_str(),
        healthy: o.health.healthy(),
        counters: o.datapath.is_some(),
        services_total: frontends.len(),
        services,
        syncs: recent.syncs.iter().cloned().collect(),
        rejected: recent.rejections.iter().map(rejected).collect(),
        datapath: datapath.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        dns: o.zone.as_ref().map(|zone| dns_view(&zone.read().unwrap(), &o.metrics.dns)),
    }
}

fn rejected(r: &Rejection) -> RejectedView {
    RejectedView { object: r.object.clone(), origin: r.origin.clone(), reason: r.reason.clone() }
}

async fn api_state(State(o): State<Observed>) -> impl IntoResponse {
    // Reading the maps is a few syscalls per entry: off the async threads.
    let view = tokio::task::spawn_blocking(move || {
        let (traffic, traffic6, datapath) = match &o.datapath {
            Some(d) => (d.traffic(), d.traffic6(), d.counters()),
            None => (Vec::new(), Vec::new(), Vec::new()),
        };
        let model = o.model.read().unwrap();
        let model6 = o.model6.as_ref().map(|m| m.read().unwrap());
        state(&o, &model, model6.as_deref(), &traffic, &traffic6, datapath)
    })
    .await;
    match view {
        Ok(v) => Json(v).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn asset(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    ([("content-type", content_type), ("cache-control", "no-cache")], body)
}

/// Serves the dashboard on `addr`.
pub async fn serve(addr: SocketAddr, observed: Observed) -> Result<tokio::task::JoinHandle<()>, crate::api::BindError> {
    let app = Router::new()
        .route("/", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/style.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
        .route("/api/state", get(api_state))
        .with_state(observed);
    crate::api::serve(addr, app, "dashboard").await
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, RwLock};

    use super::*;
    use crate::{
        api::{Health, Recent},
        dataplane::Mode,
        frontend::{FrontendKey, Protocol},
        inspect::Counts,
        metrics::Metrics,
    };

    #[test]
    fn state_joins_names_backends_and_traffic() {
        let (model, _) = crate::model::build(crate::testing::objects(
            "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080, appProtocol: kubernetes.io/h2c}]}\n---\n\
             kind: EndpointSlice\nmetadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\n\
             ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.0.2]}, {addresses: [10.244.0.3], conditions: {ready: false, serving: true, terminating: true}}]\n",
        ));
        let key = FrontendKey { vip: [10, 96, 0, 10].into(), port: 80, protocol: Protocol::Tcp };
        let traffic = [FrontendTraffic {
            frontend: key,
            total: Counts { packets: 5, bytes: 500 },
            backends: [("10.244.0.2:8080".to_string(), Counts { packets: 5, bytes: 500 })].into(),
        }];
        let o = Observed {
            mode: Mode::Ebpf,
            metrics: Arc::new(Metrics::default()),
            health: Health::new(std::time::Duration::from_secs(1)),
            datapath: None,
            model: Arc::new(RwLock::new(Model::default())),
            model6: None,
            recent: Arc::new(std::sync::Mutex::new(Recent::default())),
            zone: None,
        };
        let (model6, _) = crate::model::build::<Ipv6Addr>(crate::testing::objects(
            "kind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
             kind: EndpointSlice\nmetadata: {name: web-6, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\n\
             ports: [{name: http, port: 8080}]\nendpoints: [{addresses: ['fd00::2']}]\n",
        ));
        let key6 = FrontendKey { vip: "fd00::10".parse().unwrap(), port: 80, protocol: Protocol::Tcp };
        let traffic6 = [FrontendTraffic {
            frontend: key6,
            total: Counts { packets: 7, bytes: 700 },
            backends: [("[fd00::2]:8080".to_string(), Counts { packets: 7, bytes: 700 })].into(),
        }];
        let s = state(&o, &model, Some(&model6), &traffic, &traffic6, vec![("translated", 5)]);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["services"][0]["name"], "default/web:http");
        assert_eq!(v["services"][0]["frontend"], "10.96.0.10:80/TCP");
        assert_eq!(v["services"][0]["type"], "ClusterIP");
        assert_eq!(v["services"][0]["app_protocol"], "kubernetes.io/h2c");
        assert_eq!(v["services"][0]["packets"], 5);
        assert_eq!(
            v["services"][0]["backends"][0],
            serde_json::json!({"address": "10.244.0.2:8080", "state": "active", "packets": 5, "bytes": 500})
        );
        assert_eq!(v["services"][0]["backends"][1]["state"], "terminating");
        // The Service's IPv6 frontend beside it, with its own traffic.
        assert_eq!(v["services"][1]["frontend"], "[fd00::10]:80/TCP");
        assert_eq!(v["services"][1]["packets"], 7);
        assert_eq!(
            v["services"][1]["backends"][0],
            serde_json::json!({"address": "[fd00::2]:8080", "state": "active", "packets": 7, "bytes": 700})
        );
        assert_eq!(v["services_total"], 2);
        assert_eq!(v["datapath"]["translated"], 5);
    }

    #[test]
    fn the_page_uses_no_external_assets() {
        for asset in [INDEX, SCRIPT, STYLE] {
            // The SVG namespace is a name, not something fetched.
            let asset = asset.replace("http://www.w3.org/2000/svg", "");
            assert!(!asset.contains("http://") && !asset.contains("https://"), "external reference in an asset");
        }
    }
}
