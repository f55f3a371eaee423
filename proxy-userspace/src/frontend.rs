//! What the dataplanes program: a Service frontend (VIP, port, protocol)
//! and the endpoints behind it. Plain data at the bottom of the crate:
//! everything above (model, planner, dataplanes, observers) speaks it.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use crate::name::ServicePortName;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    /// Served by iptables mode only (see `ModelConfig::sctp`).
    Sctp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::maps::PROTO_TCP,
            Protocol::Udp => proxy_common::maps::PROTO_UDP,
            Protocol::Sctp => proxy_common::maps::PROTO_SCTP,
        }
    }

    /// The Kubernetes spelling (`TCP`, `UDP`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The Service type: a NodePort Service is also reached on every node
/// address at its node port, a LoadBalancer Service also at its ingress
/// addresses (see [`External`]).
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

/// The DNS add-on standing in for the cluster DNS Service on this node
/// (`--dns-capture-service`): while it answers, that Service's port 53
/// (UDP and TCP) leads to it alone; when it does not, to the Service's
/// endpoints as usual.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsCapture {
    pub service: crate::name::ObjectName,
    /// The add-on's own address.
    pub to: Endpoint,
    pub answering: bool,
}

/// The port DNS clients use, which a capture takes.
pub const DNS_PORT: u16 = 53;

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Frontend {
    pub service: ServicePortName,
    pub key: FrontendKey,
    pub service_type: ServiceType,
    /// How the Service port is reached from outside the cluster, if it is;
    /// boxed, as most Services are ClusterIP only.
    pub external: Option<Box<External>>,
    /// The endpoints new connections go to, sorted and without duplicates:
    /// the ready ones, or when none is ready the serving-and-terminating
    /// ones (kube-proxy's fallback, KEP-1669).
    pub backends: Box<[Endpoint]>,
    /// Endpoints shutting down but still serving, when ready ones exist:
    /// not chosen for new flows; flows already on them carry on.
    pub terminating: Box<[Endpoint]>,
    /// `internalTrafficPolicy: Local`: pods and node processes reach only
    /// [`Frontend::local_backends`]; with none, their traffic is dropped.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`: a client's new connections go to the
    /// endpoint its last one went to, if within this many seconds
    /// (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub affinity_timeout: Option<u32>,
    /// What few frontends have; boxed, as the model holds every frontend
    /// (at 50,000 Services each byte here is 50 KB of the agent's memory).
    pub extras: Option<Box<Extras>>,
}

/// The parts of a [`Frontend`] most do not have.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Extras {
    /// When a traffic policy is Local: this node's ready endpoints, or when
    /// it has none its serving-and-terminating ones (kube-proxy's fallback).
    pub local_backends: Box<[Endpoint]>,
    /// The Service port's `appProtocol` (e.g. `kubernetes.io/h2c`), shown
    /// by inspection; routing does not depend on it, as in kube-proxy.
    pub app_protocol: Option<std::sync::Arc<str>>,
}

impl Extras {
    /// `None` when there is nothing to hold.
    pub fn of(local_backends: Box<[Endpoint]>, app_protocol: Option<std::sync::Arc<str>>) -> Option<Box<Self>> {
        (!local_backends.is_empty() || app_protocol.is_some()).then(|| Box::new(Self { local_backends, app_protocol }))
    }
}

impl Frontend {
    /// Where pods and node processes go: this node's endpoints under a
    /// Local internal policy, every one under Cluster.
    pub fn internal_backends(&self) -> &[Endpoint] {
        if self.internal_local { self.local_backends() } else { &self.backends }
    }

    /// When a traffic policy is Local: this node's ready endpoints, or when
    /// it has none its serving-and-terminating ones (kube-proxy's fallback).
    pub fn local_backends(&self) -> &[Endpoint] {
        self.extras.as_ref().map_or(&[], |e| &e.local_backends)
    }

    /// The Service port's `appProtocol`.
    pub fn app_protocol(&self) -> Option<&str> {
        self.extras.as_ref()?.app_protocol.as_deref()
    }
}

/// The ways into a Service port from outside the cluster, and the policy
/// for traffic that comes in by them (`externalTrafficPolicy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct External {
    /// The node port, reached on every node address of `--nodeport-addresses`.
    pub node_port: Option<u16>,
    /// `spec.externalIPs`, at the Service port.
    pub external_ips: Box<[Ipv4Addr]>,
    /// `status.loadBalancer.ingress[].ip` (except `ipMode: Proxy`), at the Service port.
    pub load_balancer_ips: Box<[Ipv4Addr]>,
    /// `spec.loadBalancerSourceRanges`: when set, only these clients reach
    /// the load balancer addresses; others are dropped.
    pub source_ranges: Box<[Cidr]>,
    /// `externalTrafficPolicy: Local`: traffic from outside goes only to
    /// endpoints on this node, with the client address kept.
    pub local_only: bool,
    /// `spec.healthCheckNodePort` of a Local policy Service: where load
    /// balancers ask whether this node has endpoints.
    pub health_check_node_port: Option<u16>,
}

impl External {
    /// Whether anything reaches the Service port from outside.
    pub fn is_empty(&self) -> bool {
        self.node_port.is_none() && self.external_ips.is_empty() && self.load_balancer_ips.is_empty()
    }

    /// Where external traffic goes: this node's endpoints under a Local
    /// policy, all ready ones under Cluster.
    pub fn backends<'a>(&'a self, frontend: &'a Frontend) -> &'a [Endpoint] {
        if self.local_only { frontend.local_backends() } else { &frontend.backends }
    }
}

/// An IPv4 prefix, as in `loadBalancerSourceRanges` and `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    fn mask(&self) -> u32 {
        if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `a.b.c.d/len`, or a bare address (a /32); the host bits are cleared.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok().filter(|l| *l <= 32).ok_or(format!("{s:?}: bad prefix length"))?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{s:?} is not an IPv4 prefix ({e})"))?;
        let cidr = Cidr { addr, len };
        Ok(Cidr { addr: Ipv4Addr::from(u32::from(addr) & cidr.mask()), len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A frontend that changed: as it was (`None` if it did not exist), and
/// whether it exists now (then the model holds it). Nothing is copied, so a
/// cold start of 50,000 frontends costs a few bytes per change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: FrontendKey,
    pub before: Option<Box<Frontend>>,
    pub exists: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model holds every frontend: at 50,000 Services each byte here is 50 KB.
    #[test]
    fn a_frontend_keeps_what_few_have_boxed() {
        assert!(std::mem::size_of::<Frontend>() <= 104, "{} bytes", std::mem::size_of::<Frontend>());
        assert!(Extras::of(Box::default(), None).is_none(), "nothing to hold: no allocation");
    }
}
