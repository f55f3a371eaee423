//! The desired state, validated once: Service frontends (VIP, port,
//! protocol) and the ready endpoints behind each. Invalid objects are
//! rejected here with a reason; nothing downstream re-validates.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
    /// Ready endpoints, sorted and without duplicates.
    pub backends: Vec<Endpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// An object (or part of one) that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Where it came from: a file path, or the API server.
    pub origin: String,
    /// `Kind namespace/name`, or the document's position when it has no name.
    pub object: String,
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
    pub origin: String,
    pub object: T,
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
}

/// The frontends of one Service, or why it has none.
enum ServiceFrontends {
    Ports(Vec<ServicePort>),
    /// Headless, ExternalName, IPv6: not ours to program, and not an error.
    Ignored(&'static str),
}

fn service_frontends(svc: &Service, reject: &mut dyn FnMut(String)) -> ServiceFrontends {
    let Some(spec) = &svc.spec else {
        reject("has no spec".into());
        return ServiceFrontends::Ports(vec![]);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return ServiceFrontends::Ignored("ExternalName");
    }
    let vip = match spec.cluster_ip.as_deref() {
        Some("None") => return ServiceFrontends::Ignored("headless"),
        None | Some("") => {
            reject("has no spec.clusterIP".into());
            return ServiceFrontends::Ports(vec![]);
        }
        Some(ip) => match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => v4,
            Ok(std::net::IpAddr::V6(_)) => return ServiceFrontends::Ignored("IPv6"),
            Err(_) => {
                reject(format!("spec.clusterIP {ip:?} is not an IP address"));
                return ServiceFrontends::Ports(vec![]);
            }
        },
    };
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        let label = if name.is_empty() { p.port.to_string() } else { name.clone() };
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                reject(format!("port {label}: protocol {other} is not supported (TCP and UDP are)"));
                continue;
            }
        };
        let Ok(port) = u16::try_from(p.port).map_err(|_| ()).and_then(|p| if p == 0 { Err(()) } else { Ok(p) }) else {
            reject(format!("port {label}: {} is not a port number (1-65535)", p.port));
            continue;
        };
        ports.push(ServicePort { name, key: FrontendKey { vip, port, protocol } });
    }
    ServiceFrontends::Ports(ports)
}

/// Endpoints of one slice for a Service port: ready addresses with the
/// slice's port of the same name and protocol.
fn slice_endpoints(
    slice: &EndpointSlice,
    port: &ServicePort,
    reject: &mut dyn FnMut(String),
) -> Vec<Endpoint> {
    let Some(target) = slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().unwrap_or("") == port.name
            && p.protocol.as_deref().unwrap_or("TCP") == port.key.protocol.to_string()
    }) else {
        return vec![];
    };
    let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
    else {
        reject(format!("port {:?} has no valid port number", port.name));
        return vec![];
    };
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        // An unset ready condition means ready (EndpointSlice API semantics).
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        if !ready {
            continue;
        }
        // Consumers use the first address (the others are deprecated fungible copies).
        let Some(addr) = ep.addresses.first() else { continue };
        match addr.parse::<Ipv4Addr>() {
            Ok(ip) => out.push(Endpoint { ip, port: target_port }),
            Err(_) => reject(format!("endpoint address {addr:?} is not an IPv4 address")),
        }
    }
    out
}

/// Builds the model from a snapshot; everything skipped is returned with a reason.
pub fn build(snapshot: &Snapshot) -> (Model, Vec<Rejection>) {
    let mut rejected = snapshot.rejected.clone();
    let mut model = Model::default();

    // Slices by (namespace, service name).
    let mut slices: BTreeMap<(String, String), Vec<&Sourced<EndpointSlice>>> = BTreeMap::new();
    for s in &snapshot.slices {
        let meta = &s.object.metadata;
        let object = format!(
            "EndpointSlice {}/{}",
            namespace_of(meta),
            meta.name.as_deref().unwrap_or("<unnamed>")
        );
        let service = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        let Some(service) = service else {
            rejected.push(Rejection {
                origin: s.origin.clone(),
                object,
                reason: format!("has no {SERVICE_NAME_LABEL} label"),
            });
            continue;
        };
        match s.object.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => {
                tracing::debug!(%object, address_type = %s.object.address_type, "skipped");
                continue;
            }
            other => {
                rejected.push(Rejection {
                    origin: s.origin.clone(),
                    object,
                    reason: format!("addressType {other:?} is not IPv4, IPv6 or FQDN"),
                });
                continue;
            }
        }
        slices.entry((namespace_of(meta), service.clone())).or_default().push(s);
    }

    for s in &snapshot.services {
        let meta = &s.object.metadata;
        let namespace = namespace_of(meta);
        let Some(name) = meta.name.clone() else {
            rejected.push(Rejection {
                origin: s.origin.clone(),
                object: "Service <unnamed>".into(),
                reason: "has no metadata.name".into(),
            });
            continue;
        };
        let object = format!("Service {namespace}/{name}");
        let mut reasons = Vec::new();
        let ports = match service_frontends(&s.object, &mut |r| reasons.push(r)) {
            ServiceFrontends::Ports(p) => p,
            ServiceFrontends::Ignored(why) => {
                tracing::debug!(%object, why, "not proxied");
                vec![]
            }
        };
        let my_slices = slices.get(&(namespace.clone(), name.clone()));
        for port in ports {
            let mut backends = BTreeSet::new();
            for slice in my_slices.into_iter().flatten() {
                let slice_object = format!(
                    "EndpointSlice {namespace}/{}",
                    slice.object.metadata.name.as_deref().unwrap_or("<unnamed>")
                );
                let mut slice_reasons = Vec::new();
                backends.extend(slice_endpoints(&slice.object, &port, &mut |r| slice_reasons.push(r)));
                rejected.extend(slice_reasons.into_iter().map(|reason| Rejection {
                    origin: slice.origin.clone(),
                    object: slice_object.clone(),
                    reason,
                }));
            }
            let frontend = Frontend {
                service: ServicePortName {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port: port.name.clone(),
                },
                key: port.key,
                backends: backends.into_iter().collect(),
            };
            if let Some(existing) = model.frontends.get(&port.key) {
                reasons.push(format!("{} is already used by {}", port.key, existing.service));
                continue;
            }
            model.frontends.insert(port.key, frontend);
        }
        rejected.extend(reasons.into_iter().map(|reason| Rejection {
            origin: s.origin.clone(),
            object: object.clone(),
            reason,
        }));
    }
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
                Some("Service") => snap.services.push(Sourced { origin: "test".into(), object: serde_yaml::from_value(v).unwrap() }),
                Some("EndpointSlice") => snap.slices.push(Sourced { origin: "test".into(), object: serde_yaml::from_value(v).unwrap() }),
                _ => panic!("unexpected document"),
            }
        }
        snap
    }

    fn frontend<'m>(m: &'m Model, vip: [u8; 4], port: u16, protocol: Protocol) -> &'m Frontend {
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
        let snap = objects(&format!("{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: metrics, port: 9100}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
  conditions: {{ready: true}}
"));
        let (m, rejected) = build(&snap);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp)), ["10.244.0.11:8080", "10.244.0.12:8080"]);
        assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 9090, Protocol::Tcp)), ["10.244.0.11:9100", "10.244.0.12:9100"]);
        assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 53, Protocol::Udp)), ["10.244.0.11:5353", "10.244.0.12:5353"]);
        assert_eq!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).service.to_string(), "shop/web:http");
    }

    #[test]
    fn slices_are_merged_deduplicated_and_only_ready_endpoints_count() {
        let snap = objects(&format!("{WEB}---
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
"));
        let (m, _) = build(&snap);
        assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp)), ["10.244.0.11:8080", "10.244.0.12:8080"]);
    }

    #[test]
    fn headless_external_name_and_ipv6_are_ignored_quietly() {
        let snap = objects("
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
spec: {clusterIP: 'fd00::10', ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: v6-1, labels: {kubernetes.io/service-name: v6}}
addressType: IPv6
endpoints: [{addresses: ['fd00::1']}]
");
        let (m, rejected) = build(&snap);
        assert!(m.frontends.is_empty());
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    #[test]
    fn invalid_parts_are_rejected_with_reasons_and_the_rest_kept() {
        let snap = objects("
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
metadata: {name: clash}
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
");
        let (m, rejected) = build(&snap);
        let reasons: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
        let has = |s: &str| reasons.iter().any(|r| r.contains(s));
        assert!(has("Service default/mixed: port s: protocol SCTP is not supported"), "{reasons:#?}");
        assert!(has("Service default/noip: has no spec.clusterIP"), "{reasons:#?}");
        assert!(has("Service default/badip: spec.clusterIP \"10.96.0.300\" is not an IP address"), "{reasons:#?}");
        assert!(has("Service default/clash: 10.96.0.5:80/TCP is already used by default/mixed:a"), "{reasons:#?}");
        assert!(has("EndpointSlice default/nolabel: has no kubernetes.io/service-name label"), "{reasons:#?}");
        assert!(has("EndpointSlice default/mixed-1: endpoint address \"not-an-ip\""), "{reasons:#?}");
        assert_eq!(reasons.len(), 6, "{reasons:#?}");
        assert_eq!(ips(frontend(&m, [10, 96, 0, 5], 80, Protocol::Tcp)), ["10.244.0.7:8080"]);
        assert_eq!(m.frontends.len(), 1);
    }

    #[test]
    fn a_service_without_slices_has_no_backends() {
        let (m, _) = build(&objects(WEB));
        assert!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).backends.is_empty());
    }
}
