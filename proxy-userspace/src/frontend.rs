//! What the dataplanes program: a Service frontend (VIP, port, protocol)
//! and the endpoints behind it. Plain data at the bottom of the crate:
//! everything above (model, planner, dataplanes, observers) speaks it.

use std::{
    fmt,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

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

/// An IP family's address type. The model, the planner and the iptables
/// dataplane are written once for both families; each keeps its own
/// addresses, so an IPv4 frontend costs what it did before IPv6 was served.
pub trait Family:
    Copy + Ord + Hash + fmt::Debug + fmt::Display + FromStr + Into<IpAddr> + Send + Sync + serde::Serialize + 'static
{
    /// As Kubernetes names it (`ipFamilies`, EndpointSlice `addressType`).
    const NAME: &'static str;
    const BITS: u8;
    const UNSPECIFIED: Self;
    /// The loopback prefix, as iptables writes it.
    const LOOPBACK_NET: &'static str;
    fn is_loopback(&self) -> bool;
    /// `ip` if it is of this family.
    fn of(ip: IpAddr) -> Option<Self>;
    /// The first `len` bits of `self`, the rest cleared.
    fn masked(self, len: u8) -> Self;
}

impl Family for Ipv4Addr {
    const NAME: &'static str = "IPv4";
    const BITS: u8 = 32;
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;
    const LOOPBACK_NET: &'static str = "127.0.0.0/8";

    fn is_loopback(&self) -> bool {
        Ipv4Addr::is_loopback(self)
    }

    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }

    fn masked(self, len: u8) -> Self {
        let mask = u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0);
        Ipv4Addr::from(u32::from(self) & mask)
    }
}

impl Family for Ipv6Addr {
    const NAME: &'static str = "IPv6";
    const BITS: u8 = 128;
    const UNSPECIFIED: Self = Ipv6Addr::UNSPECIFIED;
    const LOOPBACK_NET: &'static str = "::1/128";

    fn is_loopback(&self) -> bool {
        Ipv6Addr::is_loopback(self)
    }

    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            // An IPv4-mapped address is an IPv4 client: not this family's.
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => Some(v6),
            _ => None,
        }
    }

    fn masked(self, len: u8) -> Self {
        let mask = u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0);
        Ipv6Addr::from(u128::from(self) & mask)
    }
}

/// What the datapath matches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct FrontendKey<A = Ipv4Addr> {
    pub vip: A,
    pub port: u16,
    pub protocol: Protocol,
}

impl<A: Family> fmt::Display for FrontendKey<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", std::net::SocketAddr::new(self.vip.into(), self.port), self.protocol)
    }
}

/// An endpoint address with the Service port's resolved target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Endpoint<A = Ipv4Addr> {
    pub ip: A,
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

impl<A: Family> fmt::Display for Endpoint<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        std::net::SocketAddr::new(self.ip.into(), self.port).fmt(f)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(bound(serialize = "A: Family"))]
pub struct Frontend<A = Ipv4Addr> {
    pub service: ServicePortName,
    pub key: FrontendKey<A>,
    pub service_type: ServiceType,
    /// How the Service port is reached from outside the cluster, if it is;
    /// boxed, as most Services are ClusterIP only.
    pub external: Option<Box<External<A>>>,
    /// The endpoints new connections go to, sorted and without duplicates:
    /// the ready ones, or when none is ready the serving-and-terminating
    /// ones (kube-proxy's fallback, KEP-1669).
    pub backends: Box<[Endpoint<A>]>,
    /// Endpoints shutting down but still serving, when ready ones exist:
    /// not chosen for new flows; flows already on them carry on.
    pub terminating: Box<[Endpoint<A>]>,
    /// `internalTrafficPolicy: Local`: pods and node processes reach only
    /// [`Frontend::local_backends`]; with none, their traffic is dropped.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`: a client's new connections go to the
    /// endpoint its last one went to, if within this many seconds
    /// (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub affinity_timeout: Option<u32>,
    /// What few frontends have; boxed, as the model holds every frontend
    /// (at 50,000 Services each byte here is 50 KB of the agent's memory).
    pub extras: Option<Box<Extras<A>>>,
}

/// The parts of a [`Frontend`] most do not have.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extras<A = Ipv4Addr> {
    /// When a traffic policy is Local: this node's ready endpoints, or when
    /// it has none its serving-and-terminating ones (kube-proxy's fallback).
    pub local_backends: Box<[Endpoint<A>]>,
    /// The Service port's `appProtocol` (e.g. `kubernetes.io/h2c`), shown
    /// by inspection; routing does not depend on it, as in kube-proxy.
    pub app_protocol: Option<std::sync::Arc<str>>,
}

impl<A> Extras<A> {
    /// `None` when there is nothing to hold.
    pub fn of(local_backends: Box<[Endpoint<A>]>, app_protocol: Option<std::sync::Arc<str>>) -> Option<Box<Self>> {
        (!local_backends.is_empty() || app_protocol.is_some()).then(|| Box::new(Self { local_backends, app_protocol }))
    }
}

impl<A> Frontend<A> {
    /// Where pods and node processes go: this node's endpoints under a
    /// Local internal policy, every one under Cluster.
    pub fn internal_backends(&self) -> &[Endpoint<A>] {
        if self.internal_local { self.local_backends() } else { &self.backends }
    }

    /// When a traffic policy is Local: this node's ready endpoints, or when
    /// it has none its serving-and-terminating ones (kube-proxy's fallback).
    pub fn local_backends(&self) -> &[Endpoint<A>] {
        self.extras.as_ref().map_or(&[], |e| &e.local_backends)
    }

    /// The Service port's `appProtocol`.
    pub fn app_protocol(&self) -> Option<&str> {
        self.extras.as_ref()?.app_protocol.as_deref()
    }
}

/// The ways into a Service port from outside the cluster, and the policy
/// for traffic that comes in by them (`externalTrafficPolicy`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(bound(serialize = "A: Family"))]
pub struct External<A = Ipv4Addr> {
    /// The node port, reached on every node address of `--nodeport-addresses`.
    pub node_port: Option<u16>,
    /// `spec.externalIPs`, at the Service port.
    pub external_ips: Box<[A]>,
    /// `status.loadBalancer.ingress[].ip` (except `ipMode: Proxy`), at the Service port.
    pub load_balancer_ips: Box<[A]>,
    /// `spec.loadBalancerSourceRanges` of this family: when set, only these
    /// clients reach the load balancer addresses; others are dropped.
    pub source_ranges: Box<[Cidr<A>]>,
    /// `externalTrafficPolicy: Local`: traffic from outside goes only to
    /// endpoints on this node, with the client address kept.
    pub local_only: bool,
    /// `spec.healthCheckNodePort` of a Local policy Service: where load
    /// balancers ask whether this node has endpoints.
    pub health_check_node_port: Option<u16>,
}

impl<A> Default for External<A> {
    fn default() -> Self {
        Self {
            node_port: None,
            external_ips: Box::default(),
            load_balancer_ips: Box::default(),
            source_ranges: Box::default(),
            local_only: false,
            health_check_node_port: None,
        }
    }
}

impl<A> External<A> {
    /// Whether anything reaches the Service port from outside.
    pub fn is_empty(&self) -> bool {
        self.node_port.is_none() && self.external_ips.is_empty() && self.load_balancer_ips.is_empty()
    }

    /// Where external traffic goes: this node's endpoints under a Local
    /// policy, all ready ones under Cluster.
    pub fn backends<'a>(&'a self, frontend: &'a Frontend<A>) -> &'a [Endpoint<A>] {
        if self.local_only { frontend.local_backends() } else { &frontend.backends }
    }
}

/// An address prefix of one family, as in `loadBalancerSourceRanges` and
/// `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr<A = Ipv4Addr> {
    pub addr: A,
    pub len: u8,
}

impl<A: Family> Cidr<A> {
    pub fn contains(&self, ip: A) -> bool {
        ip.masked(self.len) == self.addr.masked(self.len)
    }
}

impl<A: Family> FromStr for Cidr<A> {
    type Err = String;

    /// `address/len`, or a bare address (all bits); the host bits are cleared.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => {
                (a, l.parse::<u8>().ok().filter(|l| *l <= A::BITS).ok_or(format!("{s:?}: bad prefix length"))?)
            }
            None => (s, A::BITS),
        };
        let not_prefix = || format!("{s:?} is not an {} prefix", A::NAME);
        let addr = addr.parse::<IpAddr>().ok().and_then(A::of).ok_or_else(not_prefix)?;
        Ok(Cidr { addr: addr.masked(len), len })
    }
}

impl<A: Family> fmt::Display for Cidr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<A: Family> serde::Serialize for Cidr<A> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A prefix of either family, as flags take them (`--nodeport-addresses`,
/// `--cluster-cidr`: comma-separated, both families on a dual-stack node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnyCidr {
    V4(Cidr),
    V6(Cidr<Ipv6Addr>),
}

impl AnyCidr {
    /// The prefixes of `list` of family `A`.
    pub fn of<A: Family>(list: &[AnyCidr]) -> Vec<Cidr<A>> {
        let split = |c: &AnyCidr| match *c {
            AnyCidr::V4(c) => (IpAddr::V4(c.addr), c.len),
            AnyCidr::V6(c) => (IpAddr::V6(c.addr), c.len),
        };
        list.iter()
            .filter_map(|c| Some(split(c)).and_then(|(addr, len)| Some(Cidr { addr: A::of(addr)?, len })))
            .collect()
    }
}

impl FromStr for AnyCidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') { s.parse().map(AnyCidr::V6) } else { s.parse().map(AnyCidr::V4) }
    }
}

/// A frontend that changed: as it was (`None` if it did not exist), and
/// whether it exists now (then the model holds it). Nothing is copied, so a
/// cold start of 50,000 frontends costs a few bytes per change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change<A = Ipv4Addr> {
    pub key: FrontendKey<A>,
    pub before: Option<Box<Frontend<A>>>,
    pub exists: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model holds every frontend: at 50,000 Services each byte here is 50 KB.
    #[test]
    fn a_frontend_keeps_what_few_have_boxed() {
        assert!(std::mem::size_of::<Frontend>() <= 104, "{} bytes", std::mem::size_of::<Frontend>());
        assert!(Extras::<Ipv4Addr>::of(Box::default(), None).is_none(), "nothing to hold: no allocation");
    }
}
