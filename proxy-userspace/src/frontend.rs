//! What the dataplanes program: a Service frontend (VIP, port, protocol)
//! and the endpoints behind it. Plain data at the bottom of the crate:
//! everything above (model, planner, dataplanes, observers) speaks it.

use std::{fmt, net::Ipv4Addr};

use crate::name::ServicePortName;

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

    /// The Kubernetes spelling (`TCP`, `UDP`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    /// The node port of a NodePort or LoadBalancer Service.
    pub node_port: Option<u16>,
    /// Ingress addresses of a LoadBalancer Service (IPv4 only).
    pub load_balancer_ips: Box<[Ipv4Addr]>,
    /// Ready endpoints, sorted and without duplicates: the ones traffic goes to.
    pub backends: Box<[Endpoint]>,
    /// Endpoints shutting down but still serving; kept for traffic-policy
    /// fallbacks, not chosen for new flows.
    pub terminating: Box<[Endpoint]>,
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
