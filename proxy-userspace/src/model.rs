//! The desired state, validated once: Service frontends (VIP, port,
//! protocol) and the ready endpoints behind each. Invalid objects are
//! rejected here with a reason; nothing downstream re-validates.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    index::{Dirty, Index, ServiceRef},
    planner::Op,
};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to the proxy it names.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set on the EndpointSlices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Which Services this proxy serves and where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// Serve only Services whose service-proxy-name label names this proxy;
    /// without a name, only Services without the label (as kube-proxy does).
    pub service_proxy_name: Option<String>,
    /// This node, for topology and traffic policies.
    pub node_name: String,
}

impl ModelConfig {
    /// The label selector kube-proxy uses for Services and EndpointSlices,
    /// so the API server filters before anything reaches us.
    pub fn label_selector(&self) -> String {
        match &self.service_proxy_name {
            Some(name) => format!("{SERVICE_PROXY_NAME_LABEL}={name},!{HEADLESS_LABEL}"),
            None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
        }
    }

    fn serves(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let label = labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL));
        label == self.service_proxy_name.as_ref()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::maps::PROTO_TCP,
            Protocol::Udp => proxy_common::maps::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// The Service type; NodePort and LoadBalancer Services are reached through
/// their ClusterIP today, and carry their node port and ingress addresses
/// for the data paths that come later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// What the datapath matches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct FrontendKey {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.protocol)
    }
}

/// An endpoint address with the Service port's resolved target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// `namespace/name:port-name`, as kube-proxy names a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Frontend {
    pub service: ServicePortName,
    pub key: FrontendKey,
    pub service_type: ServiceType,
    /// The node port of a NodePort or LoadBalancer Service.
    pub node_port: Option<u16>,
    /// Ingress addresses of a LoadBalancer Service (IPv4 only).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// Ready endpoints, sorted and without duplicates: the ones traffic goes to.
    pub backends: Vec<Endpoint>,
    /// Endpoints shutting down but still serving; kept for traffic-policy
    /// fallbacks, not programmed.
    pub terminating: Vec<Endpoint>,
}

/// The desired state: every frontend, and which Service owns it.
#[derive(Default)]
pub struct Model {
    pub node_name: String,
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    services: HashMap<ServiceRef, ServiceState>,
    owner: HashMap<FrontendKey, ServiceRef>,
    /// Frontends whose deletion failed after their Service went away.
    orphans: HashSet<FrontendKey>,
    /// Services that lost a frontend to another one.
    conflicted: HashSet<ServiceRef>,
    rejection_count: usize,
    /// Ready endpoints over all frontends, kept as frontends come and go.
    backend_count: usize,
}

/// Why an object (or part of one) was skipped, as a stable metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    Unreadable,
    MissingName,
    MissingSpec,
    MissingClusterIp,
    InvalidClusterIp,
    UnsupportedProtocol,
    InvalidPort,
    FrontendConflict,
    MissingServiceLabel,
    InvalidAddressType,
    InvalidEndpointAddress,
}

impl RejectReason {
    pub const fn label(self) -> &'static str {
        match self {
            RejectReason::Unreadable => "unreadable",
            RejectReason::MissingName => "missing_name",
            RejectReason::MissingSpec => "missing_spec",
            RejectReason::MissingClusterIp => "missing_cluster_ip",
            RejectReason::InvalidClusterIp => "invalid_cluster_ip",
            RejectReason::UnsupportedProtocol => "unsupported_protocol",
            RejectReason::InvalidPort => "invalid_port",
            RejectReason::FrontendConflict => "frontend_conflict",
            RejectReason::MissingServiceLabel => "missing_service_label",
            RejectReason::InvalidAddressType => "invalid_address_type",
            RejectReason::InvalidEndpointAddress => "invalid_endpoint_address",
        }
    }
}

/// An object (or part of one) that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Where it came from: a file path, or the API server.
    pub origin: String,
    /// `Kind namespace/name`, or the document's position when it has no name.
    pub object: String,
    pub kind: RejectReason,
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.object, self.reason)
    }
}

/// A Kubernetes object and where it was read from.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub origin: Arc<str>,
    pub object: Arc<T>,
}

impl<T> Sourced<T> {
    pub fn new(origin: impl Into<Arc<str>>, object: T) -> Self {
        Self { origin: origin.into(), object: Arc::new(object) }
    }
}

/// Everything a source currently holds.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Sourced<Service>>,
    pub slices: Vec<Sourced<EndpointSlice>>,
    /// Objects the source itself could not read (e.g. YAML errors).
    pub rejected: Vec<Rejection>,
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".to_string())
}

/// One port of a Service, validated.
struct ServicePort {
    name: String,
    key: FrontendKey,
    node_port: Option<u16>,
}

/// The validated parts of a Service, or why it is not ours.
enum ServiceFrontends {
    Ports {
        service_type: ServiceType,
        load_balancer_ips: Vec<Ipv4Addr>,
        ports: Vec<ServicePort>,
    },
    /// Headless, ExternalName, IPv6: not ours to program, and not an error.
    Ignored(&'static str),
}

type Reject<'a> = &'a mut dyn FnMut(RejectReason, String);

fn service_frontends(svc: &Service, reject: Reject) -> ServiceFrontends {
    let none =
        ServiceFrontends::Ports { service_type: ServiceType::ClusterIP, load_balancer_ips: vec![], ports: vec![] };
    let Some(spec) = &svc.spec else {
        reject(RejectReason::MissingSpec, "has no spec".into());
        return none;
    };
    let service_type = match spec.type_.as_deref() {
        Some("ExternalName") => return ServiceFrontends::Ignored("ExternalName"),
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        _ => ServiceType::ClusterIP,
    };
    let vip = match spec.cluster_ip.as_deref() {
        Some("None") => return ServiceFrontends::Ignored("headless"),
        None | Some("") => {
            reject(RejectReason::MissingClusterIp, "has no spec.clusterIP".into());
            return none;
        }
        Some(ip) => match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => v4,
            // Dual-stack with IPv6 first: serve its IPv4 ClusterIP, if any.
            Ok(IpAddr::V6(_)) => match spec.cluster_ips.iter().flatten().find_map(|ip| ip.parse::<Ipv4Addr>().ok()) {
                Some(v4) => v4,
                None => return ServiceFrontends::Ignored("IPv6 (only IPv4 is programmed)"),
            },
            Err(_) => {
                reject(RejectReason::InvalidClusterIp, format!("spec.clusterIP {ip:?} is not an IP address"));
                return none;
            }
        },
    };
    let load_balancer_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok())
        .collect();
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        let label = if name.is_empty() { p.port.to_string() } else { name.clone() };
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                reject(
                    RejectReason::UnsupportedProtocol,
                    format!("port {label}: protocol {other} is not supported (TCP and UDP are)"),
                );
                continue;
            }
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            reject(RejectReason::InvalidPort, format!("port {label}: {} is not a port number (1-65535)", p.port));
            continue;
        };
        let node_port = p.node_port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0);
        ports.push(ServicePort { name, key: FrontendKey { vip, port, protocol }, node_port });
    }
    ServiceFrontends::Ports { service_type, load_balancer_ips, ports }
}

/// Endpoints of one slice for a Service port, split into ready and
/// terminating-but-serving, with the slice's port of the same name and protocol.
fn slice_endpoints(slice: &EndpointSlice, port: &ServicePort, reject: Reject) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let (mut ready, mut terminating) = (Vec::new(), Vec::new());
    let Some(target) = slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().unwrap_or("") == port.name
            && p.protocol.as_deref().unwrap_or("TCP") == port.key.protocol.to_string()
    }) else {
        return (ready, terminating);
    };
    let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
        reject(RejectReason::InvalidPort, format!("port {:?} has no valid port number", port.name));
        return (ready, terminating);
    };
    for ep in slice.endpoints.iter().flatten() {
        let conditions = ep.conditions.as_ref();
        // Unset conditions mean ready and serving (EndpointSlice API semantics).
        let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(is_ready);
        let is_terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        // Consumers use the first address (the others are deprecated copies).
        let Some(addr) = ep.addresses.first() else { continue };
        let ip = match addr.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => {
                reject(
                    RejectReason::InvalidEndpointAddress,
                    format!("endpoint address {addr:?} is not an IPv4 address"),
                );
                continue;
            }
        };
        let endpoint = Endpoint { ip, port: target_port };
        if is_ready {
            ready.push(endpoint);
        } else if serving && is_terminating {
            terminating.push(endpoint);
        }
    }
    (ready, terminating)
}

/// What one Service contributes to the model.
#[derive(Default)]
struct ServiceState {
    keys: Vec<FrontendKey>,
    rejections: Vec<Rejection>,
    /// Lost a frontend to another Service: retried when frontends are released.
    conflicted: bool,
}

/// The result of recomputing some Services.
#[derive(Debug, Default)]
pub struct Update {
    pub ops: Vec<Op>,
    /// Rejections raised now that were not raised before, for logging and counting.
    pub new_rejections: Vec<Rejection>,
    /// Each touched frontend as it was before, to put back what the dataplane could not apply.
    pub before: HashMap<FrontendKey, Option<Frontend>>,
}

impl Model {
    pub fn new(node_name: &str) -> Self {
        Self { node_name: node_name.into(), ..Default::default() }
    }

    /// Every current rejection of a Service or its slices.
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.services.values().flat_map(|s| s.rejections.iter())
    }

    /// How many rejections there are (without walking every Service).
    pub fn rejection_count(&self) -> usize {
        self.rejection_count
    }

    /// Ready endpoints over all frontends (without walking them).
    pub fn backend_count(&self) -> usize {
        self.backend_count
    }

    fn insert_frontend(&mut self, f: Frontend) {
        self.backend_count += f.backends.len();
        if let Some(old) = self.frontends.insert(f.key, f) {
            self.backend_count -= old.backends.len();
        }
    }

    fn remove_frontend(&mut self, key: &FrontendKey) -> Option<Frontend> {
        let old = self.frontends.remove(key)?;
        self.backend_count -= old.backends.len();
        Some(old)
    }

    /// Recomputes the `dirty` Services from `index`, keeping everything
    /// else as it is, and plans the operations that apply the difference.
    pub fn update(&mut self, index: &Index, dirty: Dirty, config: &ModelConfig) -> Update {
        let mut keys: Vec<ServiceRef> = match dirty {
            Dirty::None => vec![],
            Dirty::All => index.service_keys().chain(self.services.keys()).cloned().collect(),
            Dirty::Some(set) => set.into_iter().collect(),
        };
        keys.sort();
        keys.dedup();
        let mut update = Update::default();
        for key in std::mem::take(&mut self.orphans) {
            update.before.entry(key).or_insert_with(|| self.remove_frontend(&key));
        }
        let mut released = false;
        for key in &keys {
            released |= self.recompute(index, key, config, &mut update);
        }
        if released {
            // Frontends were freed: Services that lost a conflict may take them now.
            let retry: Vec<ServiceRef> =
                self.conflicted.iter().filter(|k| keys.binary_search(k).is_err()).cloned().collect();
            for key in &retry {
                self.recompute(index, key, config, &mut update);
            }
        }
        update.ops = crate::planner::plan(update.before.iter().map(|(k, b)| (*k, b.as_ref(), self.frontends.get(k))));
        update
    }

    /// Recomputes one Service; returns whether it released frontends.
    fn recompute(&mut self, index: &Index, key: &ServiceRef, config: &ModelConfig, update: &mut Update) -> bool {
        let old = self.services.remove(key).unwrap_or_default();
        self.rejection_count -= old.rejections.len();
        self.conflicted.remove(key);
        for k in &old.keys {
            let previous = self.remove_frontend(k);
            update.before.entry(*k).or_insert(previous);
            self.owner.remove(k);
        }
        let (frontends, mut rejections) = match index.service(key) {
            Some(svc) => compute_service(svc, index.slices_of(key), config),
            None => (vec![], vec![]),
        };
        let mut state = ServiceState::default();
        for f in frontends {
            if let Some(other) = self.owner.get(&f.key) {
                let owner = self
                    .frontends
                    .get(&f.key)
                    .map_or_else(|| format!("{}/{}", other.0, other.1), |o| o.service.to_string());
                rejections.push(Rejection {
                    origin: index.service(key).map_or_else(String::new, |s| s.origin.to_string()),
                    object: format!("Service {}/{}", key.0, key.1),
                    kind: RejectReason::FrontendConflict,
                    reason: format!("{} is already used by {owner}", f.key),
                });
                state.conflicted = true;
                continue;
            }
            update.before.entry(f.key).or_insert_with(|| self.frontends.get(&f.key).cloned());
            self.owner.insert(f.key, key.clone());
            state.keys.push(f.key);
            self.insert_frontend(f);
        }
        update.new_rejections.extend(rejections.iter().filter(|r| !old.rejections.contains(r)).cloned());
        state.rejections = rejections;
        if state.conflicted {
            self.conflicted.insert(key.clone());
        }
        if index.service(key).is_some() || !state.rejections.is_empty() {
            self.rejection_count += state.rejections.len();
            self.services.insert(key.clone(), state);
        }
        !old.keys.is_empty()
    }

    /// Puts back frontends the dataplane failed to apply, so the next
    /// update of their Services (marked in `index`) tries again.
    pub fn revert(
        &mut self,
        failed: &[FrontendKey],
        before: &HashMap<FrontendKey, Option<Frontend>>,
        index: &mut Index,
    ) {
        for key in failed {
            match before.get(key).cloned().flatten() {
                Some(old) => {
                    self.insert_frontend(old);
                }
                None => {
                    self.remove_frontend(key);
                }
            }
            match self.owner.get(key) {
                Some(owner) => index.mark(owner.clone()),
                // Its Service is gone: delete it on the next update.
                None => {
                    self.orphans.insert(*key);
                }
            }
        }
    }
}

/// The frontends and rejections of one Service and its slices.
fn compute_service<'a>(
    s: &Sourced<Service>,
    slices: impl Iterator<Item = &'a Sourced<EndpointSlice>>,
    config: &ModelConfig,
) -> (Vec<Frontend>, Vec<Rejection>) {
    let mut rejected = Vec::new();
    let mut frontends = Vec::new();
    let meta = &s.object.metadata;
    let namespace = namespace_of(meta);
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        rejected.push(Rejection {
            origin: s.origin.to_string(),
            object: "Service <unnamed>".into(),
            kind: RejectReason::MissingName,
            reason: "has no metadata.name".into(),
        });
        return (frontends, rejected);
    };
    if !config.serves(meta.labels.as_ref()) {
        tracing::debug!(service = %format!("{namespace}/{name}"), "belongs to another proxy (service-proxy-name label)");
        return (frontends, rejected);
    }
    let object = format!("Service {namespace}/{name}");
    let mut reasons = Vec::new();
    let (service_type, load_balancer_ips, ports) = match service_frontends(&s.object, &mut |k, r| reasons.push((k, r)))
    {
        ServiceFrontends::Ports { service_type, load_balancer_ips, ports } => (service_type, load_balancer_ips, ports),
        ServiceFrontends::Ignored(why) => {
            tracing::debug!(%object, why, "not proxied");
            (ServiceType::ClusterIP, vec![], vec![])
        }
    };
    // Slices this proxy uses: its own, IPv4.
    let mut usable = Vec::new();
    for slice in slices {
        let smeta = &slice.object.metadata;
        let labels = smeta.labels.as_ref();
        if !config.serves(labels) || labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
            continue;
        }
        let slice_object = format!("EndpointSlice {namespace}/{}", smeta.name.as_deref().unwrap_or("<unnamed>"));
        match slice.object.address_type.as_str() {
            "IPv4" => usable.push((slice, slice_object)),
            "IPv6" | "FQDN" => {
                tracing::debug!(object = %slice_object, address_type = %slice.object.address_type, "skipped: only IPv4 is programmed")
            }
            other => rejected.push(Rejection {
                origin: slice.origin.to_string(),
                object: slice_object,
                kind: RejectReason::InvalidAddressType,
                reason: format!("addressType {other:?} is not IPv4, IPv6 or FQDN"),
            }),
        }
    }
    for port in ports {
        let mut backends = BTreeSet::new();
        let mut terminating = BTreeSet::new();
        for (slice, slice_object) in &usable {
            let mut slice_reasons = Vec::new();
            let (ready, term) = slice_endpoints(&slice.object, &port, &mut |k, r| slice_reasons.push((k, r)));
            backends.extend(ready);
            terminating.extend(term);
            rejected.extend(slice_reasons.into_iter().map(|(kind, reason)| Rejection {
                origin: slice.origin.to_string(),
                object: slice_object.clone(),
                kind,
                reason,
            }));
        }
        // An address both ready (in one slice) and terminating (in another) is ready.
        let terminating = terminating.difference(&backends).copied().collect();
        frontends.push(Frontend {
            service: ServicePortName { namespace: namespace.clone(), name: name.clone(), port: port.name.clone() },
            key: port.key,
            service_type,
            node_port: port.node_port,
            load_balancer_ips: load_balancer_ips.clone(),
            backends: backends.into_iter().collect(),
            terminating,
        });
    }
    rejected.extend(reasons.into_iter().map(|(kind, reason)| Rejection {
        origin: s.origin.to_string(),
        object: object.clone(),
        kind,
        reason,
    }));
    (frontends, rejected)
}

/// Builds a model from a snapshot in one go; everything skipped is returned
/// with a reason. Services are taken in name order, so of two claiming one
/// frontend the first by namespace/name keeps it.
pub fn build(snapshot: &Snapshot, config: &ModelConfig) -> (Model, Vec<Rejection>) {
    let index = Index::from_snapshot(snapshot);
    let mut model = Model::new(&config.node_name);
    model.update(&index, Dirty::All, config);
    let rejected = index.loose_rejections().chain(model.rejections()).cloned().collect();
    (model, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(yaml: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            match v.get("kind").and_then(|k| k.as_str()) {
                Some("Service") => snap.services.push(Sourced::new("test", serde_yaml::from_value(v).unwrap())),
                Some("EndpointSlice") => snap.slices.push(Sourced::new("test", serde_yaml::from_value(v).unwrap())),
                _ => panic!("unexpected document"),
            }
        }
        snap
    }

    fn frontend(m: &Model, vip: [u8; 4], port: u16, protocol: Protocol) -> &Frontend {
        m.frontends
            .get(&FrontendKey { vip: vip.into(), port, protocol })
            .unwrap_or_else(|| panic!("no frontend {vip:?}:{port}; have {:?}", m.frontends.keys()))
    }

    fn ips(f: &Frontend) -> Vec<String> {
        f.backends.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()
    }

    const WEB: &str = "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web, protocol: TCP}
  - {name: metrics, port: 9090, targetPort: 9100}
  - {name: dns, port: 53, protocol: UDP}
";

    #[test]
    fn named_target_ports_resolve_through_the_slices() {
        let snap = objects(&format!(
            "{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: metrics, port: 9100}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
  conditions: {{ready: true}}
"
        ));
        let (m, rejected) = build(&snap, &ModelConfig::default());
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp)), ["10.244.0.11:8080", "10.244.0.12:8080"]);
        assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 9090, Protocol::Tcp)), ["10.244.0.11:9100", "10.244.0.12:9100"]);
        assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 53, Protocol::Udp)), ["10.244.0.11:5353", "10.244.0.12:5353"]);
        assert_eq!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).service.to_string(), "shop/web:http");
    }

    #[test]
    fn slices_are_merged_deduplicated_and_only_ready_endpoints_count() {
        let snap = objects(&format!(
            "{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.13]
  conditions: {{ready: false, terminating: true}}
---
kind: EndpointSlice
metadata: {{name: web-2, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
---
kind: EndpointSlice
metadata: {{name: other, namespace: elsewhere, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.0.99]
"
        ));
        let (m, _) = build(&snap, &ModelConfig::default());
        assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp)), ["10.244.0.11:8080", "10.244.0.12:8080"]);
        assert_eq!(m.backend_count(), 2, "counted as frontends are built");
    }

    #[test]
    fn headless_external_name_and_ipv6_are_ignored_quietly() {
        let snap = objects(
            "
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
---
kind: Service
metadata: {name: v6}
spec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: v6-1, labels: {kubernetes.io/service-name: v6}}
addressType: IPv6
endpoints: [{addresses: ['fd00::1']}]
",
        );
        let (m, rejected) = build(&snap, &ModelConfig::default());
        assert!(m.frontends.is_empty());
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    #[test]
    fn invalid_parts_are_rejected_with_reasons_and_the_rest_kept() {
        let snap = objects(
            "
kind: Service
metadata: {name: mixed}
spec:
  clusterIP: 10.96.0.5
  ports: [{name: a, port: 80}, {name: s, port: 80, protocol: SCTP}]
---
kind: Service
metadata: {name: noip}
spec: {ports: [{port: 80}]}
---
kind: Service
metadata: {name: badip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
kind: Service
metadata: {name: other}
spec: {clusterIP: 10.96.0.5, ports: [{name: a, port: 80}]}
---
kind: EndpointSlice
metadata: {name: nolabel}
addressType: IPv4
endpoints: []
---
kind: EndpointSlice
metadata: {name: mixed-1, labels: {kubernetes.io/service-name: mixed}}
addressType: IPv4
ports: [{name: a, port: 8080}]
endpoints: [{addresses: [not-an-ip]}, {addresses: [10.244.0.7]}]
",
        );
        let (m, rejected) = build(&snap, &ModelConfig::default());
        let reasons: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
        let has = |s: &str| reasons.iter().any(|r| r.contains(s));
        assert!(has("Service default/mixed: port s: protocol SCTP is not supported"), "{reasons:#?}");
        assert!(has("Service default/noip: has no spec.clusterIP"), "{reasons:#?}");
        assert!(has("Service default/badip: spec.clusterIP \"10.96.0.300\" is not an IP address"), "{reasons:#?}");
        assert!(has("Service default/other: 10.96.0.5:80/TCP is already used by default/mixed:a"), "{reasons:#?}");
        assert!(has("EndpointSlice default/nolabel: has no kubernetes.io/service-name label"), "{reasons:#?}");
        assert!(has("EndpointSlice default/mixed-1: endpoint address \"not-an-ip\""), "{reasons:#?}");
        assert_eq!(reasons.len(), 6, "{reasons:#?}");
        assert_eq!(ips(frontend(&m, [10, 96, 0, 5], 80, Protocol::Tcp)), ["10.244.0.7:8080"]);
        assert_eq!(m.frontends.len(), 1);
    }

    #[test]
    fn a_service_without_slices_has_no_backends() {
        let (m, _) = build(&objects(WEB), &ModelConfig::default());
        assert!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).backends.is_empty());
    }

    #[test]
    fn the_service_proxy_name_label_selects_the_proxy() {
        let yaml = "
kind: Service
metadata: {name: mine, labels: {service.kubernetes.io/service-proxy-name: kpr}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: theirs, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
kind: Service
metadata: {name: unlabelled}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
";
        let names = |cfg: &ModelConfig| -> Vec<String> {
            build(&objects(yaml), cfg).0.frontends.values().map(|f| f.service.name.clone()).collect()
        };
        assert_eq!(names(&ModelConfig::default()), ["unlabelled"]);
        assert_eq!(names(&ModelConfig { service_proxy_name: Some("kpr".into()), ..Default::default() }), ["mine"]);
        assert_eq!(
            ModelConfig::default().label_selector(),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
    }

    #[test]
    fn node_port_and_load_balancer_services_carry_their_extra_frontends() {
        let yaml = "
kind: Service
metadata: {name: np}
spec: {type: NodePort, clusterIP: 10.96.0.7, ports: [{port: 80, nodePort: 30080}]}
---
kind: Service
metadata: {name: lb}
spec: {type: LoadBalancer, clusterIP: 10.96.0.8, ports: [{port: 443, nodePort: 30443}]}
status: {loadBalancer: {ingress: [{ip: 192.0.2.10}, {hostname: lb.example.com}]}}
";
        let cfg = ModelConfig { node_name: "node-1".into(), ..Default::default() };
        let (m, rejected) = build(&objects(yaml), &cfg);
        assert!(rejected.is_empty());
        assert_eq!(m.node_name, "node-1");
        let np = frontend(&m, [10, 96, 0, 7], 80, Protocol::Tcp);
        assert_eq!((np.service_type, np.node_port), (ServiceType::NodePort, Some(30080)));
        let lb = frontend(&m, [10, 96, 0, 8], 443, Protocol::Tcp);
        assert_eq!(lb.service_type, ServiceType::LoadBalancer);
        assert_eq!(lb.load_balancer_ips, [Ipv4Addr::new(192, 0, 2, 10)]);
    }

    #[test]
    fn terminating_endpoints_are_kept_apart_from_ready_ones() {
        let snap = objects(&format!(
            "{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.0.11]
  conditions: {{ready: true}}
- addresses: [10.244.0.12]
  conditions: {{ready: false, serving: true, terminating: true}}
- addresses: [10.244.0.13]
  conditions: {{ready: false, serving: false, terminating: true}}
- addresses: [10.244.0.14]
  conditions: {{ready: false}}
"
        ));
        let (m, _) = build(&snap, &ModelConfig::default());
        let f = frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp);
        assert_eq!(ips(f), ["10.244.0.11:8080"]);
        assert_eq!(f.terminating, [Endpoint { ip: Ipv4Addr::new(10, 244, 0, 12), port: 8080 }]);
    }

    #[test]
    fn headless_slices_and_other_proxies_slices_are_ignored() {
        let snap = objects(&format!("{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web, service.kubernetes.io/headless: ''}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.0.11]}}]
"));
        let (m, rejected) = build(&snap, &ModelConfig::default());
        assert!(rejected.is_empty());
        assert!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).backends.is_empty());
    }

    #[test]
    fn rejections_carry_a_metric_reason() {
        let (_, rejected) = build(
            &objects(
                "
kind: Service
metadata: {name: s}
spec: {clusterIP: 10.96.0.9, ports: [{port: 9, protocol: SCTP}]}
",
            ),
            &ModelConfig::default(),
        );
        assert_eq!(rejected[0].kind.label(), "unsupported_protocol");
    }

    #[test]
    fn dual_stack_services_are_served_on_their_ipv4_cluster_ip() {
        let (m, _) = build(
            &objects(
                "
kind: Service
metadata: {name: ds}
spec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 10.96.0.44], ipFamilies: [IPv6, IPv4], ports: [{port: 80}]}
",
            ),
            &ModelConfig::default(),
        );
        assert!(m.frontends.contains_key(&FrontendKey {
            vip: [10, 96, 0, 44].into(),
            port: 80,
            protocol: Protocol::Tcp
        }));
    }
}
