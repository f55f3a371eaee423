//! Kubernetes objects in, validated and reduced to what the proxy uses.
//!
//! Every check on a Service or EndpointSlice happens here, once, when the
//! object arrives; what fails is a [`Rejection`] carried beside the object's
//! usable rest. Nothing downstream re-validates, and nothing downstream
//! holds the full Kubernetes object (50,000 Services of k8s-openapi structs
//! cost hundreds of MiB; their useful part costs a few).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::Service,
    discovery::v1::{EndpointHints, EndpointSlice},
};
use smallvec::SmallVec;

use crate::{
    frontend::{Cidr, External, Family, Protocol, ServiceType},
    name::{self, ObjectName},
    rejection::{RejectReason, Rejection, Rejections},
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
    /// Whether SCTP ports are served: iptables mode serves them as
    /// kube-proxy does; eBPF mode refuses them with a reason.
    pub sctp: bool,
    /// Whether the DNS add-on runs: every Service and slice is then
    /// watched (headless ones and other proxies' too, which DNS names as
    /// well) and carries what DNS answers with.
    pub dns: bool,
}

impl ModelConfig {
    /// The label selector kube-proxy uses for Services and EndpointSlices,
    /// so the API server filters before anything reaches us.
    /// With DNS on, nothing is filtered: DNS names every Service.
    pub fn label_selector(&self) -> String {
        if self.dns {
            return String::new();
        }
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

/// One port of a Service, validated: at each ClusterIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name; empty when unnamed.
    pub name: Arc<str>,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<u16>,
    /// `appProtocol`, carried to inspection (not used for routing, as in kube-proxy).
    pub app_protocol: Option<Arc<str>>,
}

/// A Service as the proxy sees it. Services it does not program (headless,
/// ExternalName, another proxy's) are held with no ports, so a re-list can
/// still tell they exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: ObjectName,
    /// Where it came from: a file path, or the API server.
    pub origin: Arc<str>,
    /// `metadata.resourceVersion`, to skip unchanged objects in a re-list.
    pub version: Option<Box<str>>,
    /// `metadata.creationTimestamp` in seconds (its precision): of two
    /// Services claiming one frontend, the older keeps it.
    pub created: Option<i64>,
    pub service_type: ServiceType,
    /// The IPv4 ClusterIP (of `spec.clusterIPs`), if it has one.
    pub vip: Option<Ipv4Addr>,
    /// IPv4 external addresses, source ranges and traffic policy, for all
    /// ports (each port's node port is in its [`ServicePort`]); `None` for
    /// the many Services without any.
    pub external: Option<Box<External>>,
    /// The same for IPv6, if the Service has an IPv6 ClusterIP; boxed, as
    /// most Services are single-stack IPv4.
    pub v6: Option<Box<ServiceAddresses<Ipv6Addr>>>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// Most Services have one port: held inline, without an allocation.
    pub ports: SmallVec<[ServicePort; 1]>,
    /// What DNS answers for it; kept only when the DNS add-on runs.
    pub dns: Option<Box<DnsService>>,
    pub rejections: Rejections,
}

/// A Service's ClusterIP of one family and how it is reached from outside over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAddresses<A> {
    pub vip: A,
    pub external: Option<Box<External<A>>>,
}

/// What each family's model takes from the validated objects: a Service's
/// ClusterIP of the family (kube-proxy's per-family proxiers filter
/// `spec.clusterIPs` alike), and the EndpointSlices of its `addressType`.
pub trait Served: Family {
    /// The Service's ClusterIP of this family and its external addresses.
    fn addresses(info: &ServiceInfo) -> Option<(Self, Option<&External<Self>>)>;
    /// The slice's endpoints if it is of this family, else none.
    fn endpoints(slice: &SliceInfo) -> &[SliceEndpoint<Self>];
}

impl Served for Ipv4Addr {
    fn addresses(info: &ServiceInfo) -> Option<(Self, Option<&External<Self>>)> {
        Some((info.vip?, info.external.as_deref()))
    }

    fn endpoints(slice: &SliceInfo) -> &[SliceEndpoint<Self>] {
        &slice.endpoints
    }
}

impl Served for Ipv6Addr {
    fn addresses(info: &ServiceInfo) -> Option<(Self, Option<&External<Self>>)> {
        let v6 = info.v6.as_deref()?;
        Some((v6.vip, v6.external.as_deref()))
    }

    fn endpoints(slice: &SliceInfo) -> &[SliceEndpoint<Self>] {
        slice.rare.as_deref().map_or(&[], |r| &r.endpoints6)
    }
}

/// What the DNS add-on answers for a Service, under its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsService {
    pub target: DnsTarget,
    /// Every port, for SRV records (SCTP included: DNS names it whatever the mode).
    pub ports: Box<[DnsPort]>,
}

/// What a Service's name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsTarget {
    /// Its ClusterIPs, of both families.
    ClusterIps(Box<[IpAddr]>),
    /// `clusterIP: None`: its ready endpoints.
    Headless,
    /// `type: ExternalName`: a CNAME to this name (lower case, no final dot).
    ExternalName(Arc<str>),
}

/// A named port, as SRV records name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPort {
    /// Empty for the unnamed port, which has no SRV record.
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// What the DNS add-on takes from an EndpointSlice (IPv4 and IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSlice {
    pub ports: Box<[DnsPort]>,
    pub endpoints: Box<[DnsEndpoint]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsEndpoint {
    pub ip: IpAddr,
    /// `conditions.ready` (unset: true): only ready endpoints are named.
    pub ready: bool,
    /// `hostname`, which names it under a headless Service.
    pub hostname: Option<Arc<str>>,
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Matches the Service port of the same name (empty: the unnamed port).
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// An endpoint of an EndpointSlice, its conditions resolved (unset `ready`
/// and `serving` mean true, unset `terminating` false).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint<A = Ipv4Addr> {
    pub ip: A,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName` is `--node-name`).
    pub local: bool,
    /// Topology hints; boxed, as most endpoints have none (every Service
    /// holds its endpoints, so their size is the agent's at scale).
    pub hints: Option<Box<Hints>>,
}

/// An endpoint's `hints`, as topology-aware routing reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `forZones`: the zones it is meant for (`None`: no zone hints).
    pub zones: Option<Box<[Arc<str>]>>,
    /// `forNodes`: whether this node is one it is meant for (`None`: no node hints).
    pub for_this_node: Option<bool>,
}

impl SliceInfo {
    /// What DNS answers with, when the add-on runs.
    pub fn dns(&self) -> Option<&DnsSlice> {
        self.rare.as_ref()?.dns.as_ref()
    }
}

impl<A> SliceEndpoint<A> {
    /// `hints.forZones` (`None`: no zone hints).
    pub fn zones(&self) -> Option<&[Arc<str>]> {
        self.hints.as_ref()?.zones.as_deref()
    }

    /// Whether `hints.forNodes` names this node (`None`: no node hints).
    pub fn for_this_node(&self) -> Option<bool> {
        self.hints.as_ref()?.for_this_node
    }
}

/// What few slices carry, boxed apart: every slice is held for the
/// agent's lifetime, so each field in [`SliceInfo`] costs 400 KB at 50,000.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceRare {
    /// The endpoints of an `addressType: IPv6` slice.
    pub endpoints6: Box<[SliceEndpoint<Ipv6Addr>]>,
    /// What DNS answers with; kept only when the DNS add-on runs.
    pub dns: Option<DnsSlice>,
}

/// An EndpointSlice as the proxy sees it. Slices it does not use (FQDN,
/// headless, another proxy's) are held with no ports or endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub name: ObjectName,
    pub origin: Arc<str>,
    pub version: Option<Box<str>>,
    /// The Service it belongs to; `None` without a service-name label.
    pub service: Option<ObjectName>,
    pub ports: SmallVec<[SlicePort; 1]>,
    /// The endpoints of an `addressType: IPv4` slice (an IPv6 slice's are in [`SliceRare`]).
    pub endpoints: Box<[SliceEndpoint]>,
    pub rare: Option<Box<SliceRare>>,
    pub rejections: Rejections,
}

/// One object read from a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Service(ServiceInfo),
    Slice(SliceInfo),
}

fn rejection(origin: &str, object: &str, kind: RejectReason, reason: String) -> Rejection {
    Rejection { origin: origin.to_string(), object: object.to_string(), kind, reason }
}

/// Validates a Service.
pub fn service(svc: &Service, origin: &Arc<str>, config: &ModelConfig) -> ServiceInfo {
    let meta = &svc.metadata;
    let mut info = ServiceInfo {
        name: ObjectName::of(meta),
        origin: origin.clone(),
        version: meta.resource_version.as_deref().map(Box::from),
        created: meta.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        service_type: ServiceType::ClusterIP,
        vip: None,
        external: None,
        v6: None,
        internal_local: false,
        affinity_timeout: None,
        ports: SmallVec::new(),
        dns: None,
        rejections: Rejections::default(),
    };
    if info.name.name().is_empty() {
        let object = format!("Service {}/<unnamed>", info.name.namespace());
        info.rejections.push(rejection(origin, &object, RejectReason::MissingName, "has no metadata.name".into()));
        return info;
    }
    if config.dns {
        info.dns = dns_service(svc).map(Box::new);
    }
    if !config.serves(meta.labels.as_ref()) {
        tracing::debug!(service = %info.name, "belongs to another proxy (service-proxy-name label)");
        return info;
    }
    let object = format!("Service {}", info.name);
    let mut reject = |kind, reason: String| info.rejections.push(rejection(origin, &object, kind, reason));
    let Some(spec) = &svc.spec else {
        reject(RejectReason::MissingSpec, "has no spec".into());
        return info;
    };
    let service_type = match spec.type_.as_deref() {
        Some("ExternalName") => return ignored(info, "ExternalName"),
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        _ => ServiceType::ClusterIP,
    };
    let primary = match spec.cluster_ip.as_deref() {
        Some("None") => return ignored(info, "headless"),
        // As kube-proxy: nothing to program, and nothing wrong (the API
        // server allocates one to every Service but ExternalName ones).
        None | Some("") => return ignored(info, "no spec.clusterIP"),
        Some(ip) => ip,
    };
    // `spec.clusterIPs` holds one ClusterIP per family of `ipFamilies`,
    // `spec.clusterIP` first; each family's model serves its own.
    let (mut vip4, mut vip6) = (None, None);
    for (i, ip) in std::iter::once(primary).chain(spec.cluster_ips.iter().flatten().map(String::as_str)).enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(ip) => {
                vip4 = vip4.or(Ipv4Addr::of(ip));
                vip6 = vip6.or(Ipv6Addr::of(ip));
            }
            Err(_) if i == 0 => {
                reject(RejectReason::InvalidClusterIp, format!("spec.clusterIP {ip:?} is not an IP address"));
                return info;
            }
            Err(_) => {
                reject(RejectReason::InvalidClusterIp, format!("spec.clusterIPs: {ip:?} is not an IP address; skipped"))
            }
        }
    }
    let mut ports = SmallVec::new();
    for p in spec.ports.iter().flatten() {
        let name = name::port_name(p.name.as_deref().unwrap_or_default());
        let label = if name.is_empty() { p.port.to_string() } else { name.to_string() };
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" if config.sctp => Protocol::Sctp,
            "SCTP" => {
                reject(
                    RejectReason::UnsupportedProtocol,
                    format!("port {label}: SCTP is served in iptables mode only (eBPF mode serves TCP and UDP)"),
                );
                continue;
            }
            other => {
                reject(
                    RejectReason::UnsupportedProtocol,
                    format!("port {label}: protocol {other} is not supported (TCP, UDP and SCTP are)"),
                );
                continue;
            }
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            reject(RejectReason::InvalidPort, format!("port {label}: {} is not a port number (1-65535)", p.port));
            continue;
        };
        // A ClusterIP Service has no node port, whatever the object says.
        let node_port = p
            .node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0 && service_type != ServiceType::ClusterIP);
        let app_protocol = p.app_protocol.as_deref().map(Arc::from);
        ports.push(ServicePort { name, port, protocol, node_port, app_protocol });
    }
    let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
    let (mut external4, mut external6) = (
        External::<Ipv4Addr> { local_only, ..External::default() },
        External::<Ipv6Addr> { local_only, ..External::default() },
    );
    (external4.external_ips, external6.external_ips) =
        addresses(spec.external_ips.iter().flatten().map(String::as_str), "spec.externalIPs", &mut reject);
    if service_type == ServiceType::LoadBalancer {
        // `ipMode: Proxy`: the load balancer proxies to the node itself; kube-proxy programs nothing for it.
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        let ips = ingress.into_iter().flatten().filter(|i| i.ip_mode.as_deref() != Some("Proxy"));
        (external4.load_balancer_ips, external6.load_balancer_ips) =
            addresses(ips.filter_map(|i| i.ip.as_deref()), "status.loadBalancer.ingress", &mut reject);
        let (mut ranges4, mut ranges6) = (Vec::new(), Vec::new());
        for range in spec.load_balancer_source_ranges.iter().flatten() {
            // Each range concerns the clients of its own family.
            let parsed = if range.contains(':') {
                range.parse::<Cidr<Ipv6Addr>>().map(|c| ranges6.push(c))
            } else {
                range.parse::<Cidr>().map(|c| ranges4.push(c))
            };
            if let Err(e) = parsed {
                reject(RejectReason::InvalidSourceRange, format!("loadBalancerSourceRanges: {e}; skipped"));
            }
        }
        (external4.source_ranges, external6.source_ranges) = (ranges4.into(), ranges6.into());
    }
    if local_only && service_type != ServiceType::ClusterIP {
        let health = spec.health_check_node_port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0);
        external4.health_check_node_port = health;
        external6.health_check_node_port = health;
    }
    let node_ports = ports.iter().any(|p: &ServicePort| p.node_port.is_some());
    info.vip = vip4;
    if vip4.is_some() && (node_ports || !external4.is_empty()) {
        info.external = Some(Box::new(external4));
    }
    info.v6 = vip6.map(|vip| {
        let external = (node_ports || !external6.is_empty()).then(|| Box::new(external6));
        Box::new(ServiceAddresses { vip, external })
    });
    info.service_type = service_type;
    info.internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let configured = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()?.timeout_seconds);
        // The API server's default, and its bounds (1 s to a day).
        info.affinity_timeout = Some(configured.filter(|t| (1..=86_400).contains(t)).unwrap_or(10_800) as u32);
    }
    ports.shrink_to_fit();
    info.ports = ports;
    info
}

/// The addresses of `field`, by family; anything else is rejected and skipped.
fn addresses<'a>(
    ips: impl Iterator<Item = &'a str>,
    field: &str,
    reject: &mut impl FnMut(RejectReason, String),
) -> (Box<[Ipv4Addr]>, Box<[Ipv6Addr]>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for ip in ips {
        match ip.parse::<IpAddr>() {
            Ok(ip) => {
                v4.extend(Ipv4Addr::of(ip));
                v6.extend(Ipv6Addr::of(ip));
            }
            Err(_) => {
                reject(RejectReason::InvalidExternalAddress, format!("{field}: {ip:?} is not an IP address; skipped"))
            }
        }
    }
    (v4.into(), v6.into())
}

/// The protocol of a port as the API spells it (unset: TCP); `None` for unknown ones.
fn protocol_of(protocol: Option<&str>) -> Option<Protocol> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// A Service's or slice's port as DNS names it; `None` for an unknown
/// protocol or a number that is no port.
fn dns_port(name: Option<&str>, protocol: Option<&str>, port: Option<i32>) -> Option<DnsPort> {
    Some(DnsPort {
        name: name::port_name(name.unwrap_or_default()),
        protocol: protocol_of(protocol)?,
        port: port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)?,
    })
}

/// What DNS names for a Service: its ClusterIPs (both families), its ready
/// endpoints if headless, or its external name. `None` when there is
/// nothing to name (no usable address, no external name): the name is
/// then unknown to DNS, as to CoreDNS.
fn dns_service(svc: &Service) -> Option<DnsService> {
    let spec = svc.spec.as_ref()?;
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| dns_port(p.name.as_deref(), p.protocol.as_deref(), Some(p.port)))
        .collect();
    let target = if spec.type_.as_deref() == Some("ExternalName") {
        let name = spec.external_name.as_deref()?.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return None;
        }
        DnsTarget::ExternalName(name.into())
    } else if spec.cluster_ip.as_deref() == Some("None") {
        DnsTarget::Headless
    } else {
        let listed = spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter());
        let mut ips: Vec<IpAddr> = listed.filter_map(|ip| ip.parse().ok()).collect();
        ips.sort();
        ips.dedup();
        if ips.is_empty() {
            return None;
        }
        DnsTarget::ClusterIps(ips.into())
    };
    Some(DnsService { target, ports })
}

/// What DNS takes from a slice: its IPv4 or IPv6 endpoints with their
/// readiness and hostnames, and its ports (FQDN slices name nothing).
fn dns_slice(slice: &EndpointSlice) -> Option<DnsSlice> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return None;
    }
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| dns_port(p.name.as_deref(), p.protocol.as_deref(), p.port))
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|ep| {
            Some(DnsEndpoint {
                ip: ep.addresses.first()?.parse().ok()?,
                ready: ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                hostname: ep.hostname.as_deref().filter(|h| !h.is_empty()).map(|h| h.to_ascii_lowercase().into()),
            })
        })
        .collect();
    Some(DnsSlice { ports, endpoints })
}

/// Not ours to program, and not an error.
fn ignored(info: ServiceInfo, why: &str) -> ServiceInfo {
    tracing::debug!(service = %info.name, why, "not proxied");
    info
}

/// Validates an EndpointSlice.
pub fn slice(slice: &EndpointSlice, origin: &Arc<str>, config: &ModelConfig) -> SliceInfo {
    let meta = &slice.metadata;
    let name = ObjectName::of(meta);
    let object =
        format!("EndpointSlice {}", if name.name().is_empty() { "<unnamed>".into() } else { name.to_string() });
    let labels = meta.labels.as_ref();
    let service = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)).map(|s| name.sibling(s));
    let mut info = SliceInfo {
        name,
        origin: origin.clone(),
        version: meta.resource_version.as_deref().map(Box::from),
        service,
        ports: SmallVec::new(),
        endpoints: Box::default(),
        rare: None,
        rejections: Rejections::default(),
    };
    let mut reject = |kind, reason: String| info.rejections.push(rejection(origin, &object, kind, reason));
    if info.service.is_none() {
        reject(RejectReason::MissingServiceLabel, format!("has no {SERVICE_NAME_LABEL} label"));
        return info;
    }
    if config.dns {
        let dns = dns_slice(slice);
        info.rare = dns.is_some().then(|| Box::new(SliceRare { dns, ..SliceRare::default() }));
    }
    if !config.serves(labels) || labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return info;
    }
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => {
            tracing::debug!(%object, "skipped: FQDN slices are not programmed (as in kube-proxy)");
            return info;
        }
        other => {
            reject(RejectReason::InvalidAddressType, format!("addressType {other:?} is not IPv4, IPv6 or FQDN"));
            return info;
        }
    };
    let mut ports = SmallVec::new();
    for p in slice.ports.iter().flatten() {
        let name = name::port_name(p.name.as_deref().unwrap_or_default());
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" if config.sctp => Protocol::Sctp,
            // No Service port of another protocol is programmed to match it.
            _ => continue,
        };
        let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            reject(RejectReason::InvalidPort, format!("port {name:?} has no valid port number"));
            continue;
        };
        ports.push(SlicePort { name, protocol, port });
    }
    ports.shrink_to_fit();
    info.ports = ports;
    if v6 {
        let endpoints6 = endpoints(slice, config, &mut reject);
        info.rare.get_or_insert_default().endpoints6 = endpoints6;
    } else {
        info.endpoints = endpoints(slice, config, &mut reject);
    }
    info
}

/// A slice's endpoints of family `A` (its `addressType`); an address of
/// another family or none is rejected and skipped.
fn endpoints<A: Family>(
    slice: &EndpointSlice,
    config: &ModelConfig,
    reject: &mut impl FnMut(RejectReason, String),
) -> Box<[SliceEndpoint<A>]> {
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        // Consumers use the first address (the others are deprecated copies).
        let Some(addr) = ep.addresses.first() else { continue };
        let Some(ip) = addr.parse::<IpAddr>().ok().and_then(A::of) else {
            let family = A::NAME;
            reject(
                RejectReason::InvalidEndpointAddress,
                format!("endpoint address {addr:?} is not an {family} address"),
            );
            continue;
        };
        let conditions = ep.conditions.as_ref();
        // Unset ready and serving count as true, as in kube-proxy's
        // EndpointSlice cache (the API's consumers' reading).
        endpoints.push(SliceEndpoint {
            ip,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            local: !config.node_name.is_empty() && ep.node_name.as_deref() == Some(config.node_name.as_str()),
            hints: hints(ep.hints.as_ref(), &config.node_name),
        });
    }
    endpoints.into_boxed_slice()
}

/// An endpoint's hints, if it has any (an empty list is none).
fn hints(hints: Option<&EndpointHints>, node_name: &str) -> Option<Box<Hints>> {
    let hints = hints?;
    let zones: Option<Box<[Arc<str>]>> = hints
        .for_zones
        .as_ref()
        .filter(|z| !z.is_empty())
        .map(|z| z.iter().map(|z| Arc::from(z.name.as_str())).collect());
    let for_this_node =
        hints.for_nodes.as_ref().filter(|n| !n.is_empty()).map(|n| n.iter().any(|n| n.name == node_name));
    (zones.is_some() || for_this_node.is_some()).then(|| Box::new(Hints { zones, for_this_node }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Service's endpoints are held for the agent's lifetime: at
    /// 50,000 Services of three endpoints, each byte here is 150 KB.
    #[test]
    fn an_endpoint_stays_small_and_keeps_its_hints_boxed() {
        assert!(std::mem::size_of::<SliceEndpoint>() <= 16, "{} bytes", std::mem::size_of::<SliceEndpoint>());
        assert_eq!(std::mem::size_of::<Rejections>(), 8, "no rejection, no room taken");
        // IPv6 endpoints and DNS share one box: an IPv4 slice pays 8 bytes for both.
        assert!(std::mem::size_of::<SliceInfo>() <= 128, "{} bytes", std::mem::size_of::<SliceInfo>());
    }
}
