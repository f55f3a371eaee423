//! Where the benchmark's pods run: the clients and the Service's backends
//! on one virtual node, or the backends on a second node of a virtual
//! cluster (flannel host-gw shape: routed pod CIDRs over an underlay), so
//! every connection crosses from one node to the other, or a client outside
//! the cluster (on the underlay's router) reaching the backends through a
//! node port of the other node. IPv6 rows run on an IPv6-only cluster, its
//! one or two nodes in the same host-gw shape, the outside client (on the
//! underlay's router) included.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup::Cgroup,
    cluster::{Cluster, ClusterNode, Shape},
    netns::Netns,
    node::VirtualNode,
};

/// Where the backends run, seen from the clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    #[default]
    #[serde(rename = "same node")]
    SameNode,
    #[serde(rename = "other node")]
    OtherNode,
    /// From outside the cluster through a node port of node 0, the backends on node 1.
    #[serde(rename = "from outside")]
    Outside,
}

impl Placement {
    pub const fn as_str(self) -> &'static str {
        match self {
            Placement::SameNode => "same node",
            Placement::OtherNode => "other node",
            Placement::Outside => "from outside",
        }
    }

    /// Whether the load comes from outside the cluster, through a node port.
    pub const fn outside(self) -> bool {
        matches!(self, Placement::Outside)
    }
}

/// The address family of a row's Service, pods and traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    #[default]
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

impl Family {
    pub const fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        }
    }
}

/// What the benchmark needs of a node, from either harness.
pub trait BenchNode {
    fn ns(&self) -> &Netns;
    fn cgroup(&self) -> &Cgroup;
    fn bpf_root(&self) -> &Path;
    /// The node-side interfaces of its pods.
    fn interfaces(&self) -> Vec<String>;
    fn pod_ns(&self, name: &str) -> &Netns;
    /// The pod's address in `family`.
    fn pod_ip(&self, name: &str, family: Family) -> IpAddr;
}

impl BenchNode for VirtualNode {
    fn ns(&self) -> &Netns {
        &self.ns
    }
    fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }
    fn bpf_root(&self) -> &Path {
        VirtualNode::bpf_root(self)
    }
    fn interfaces(&self) -> Vec<String> {
        VirtualNode::interfaces(self)
    }
    fn pod_ns(&self, name: &str) -> &Netns {
        &self.pod(name).ns
    }
    fn pod_ip(&self, name: &str, family: Family) -> IpAddr {
        assert_eq!(family, Family::Ipv4, "a virtual node's pods have IPv4 addresses only");
        self.pod(name).ip.into()
    }
}

impl BenchNode for ClusterNode {
    fn ns(&self) -> &Netns {
        &self.ns
    }
    fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }
    fn bpf_root(&self) -> &Path {
        ClusterNode::bpf_root(self)
    }
    fn interfaces(&self) -> Vec<String> {
        ClusterNode::interfaces(self)
    }
    fn pod_ns(&self, name: &str) -> &Netns {
        &self.pod(name).ns
    }
    fn pod_ip(&self, name: &str, family: Family) -> IpAddr {
        let ip = self.pod(name).ip;
        match family {
            Family::Ipv4 => ip.into(),
            Family::Ipv6 => crate::cluster::pod_ip6(self.index, ip.octets()[3]).into(),
        }
    }
}

/// The benchmark's nodes.
pub enum Nodes {
    /// One node for IPv4 (the same-node placement).
    Virtual(VirtualNode),
    /// Clients on the first node, servers on the last (one node for IPv6's same-node placement).
    Cluster(Cluster),
}

impl Nodes {
    /// `clients` and `servers` as (name, host part of the pod address),
    /// placed as `placement` says, with addresses of `family`.
    pub fn new(
        placement: Placement,
        family: Family,
        clients: &[(&str, u8)],
        servers: &[(&str, u8)],
    ) -> anyhow::Result<Self> {
        Ok(match (placement, family) {
            (Placement::SameNode, Family::Ipv4) => {
                let pods: Vec<(&str, Ipv4Addr)> =
                    servers.iter().chain(clients).map(|(n, host)| (*n, Ipv4Addr::new(10, 244, 0, *host))).collect();
                Nodes::Virtual(VirtualNode::new(&pods)?)
            }
            _ => {
                let nodes = if placement == Placement::SameNode { 1 } else { 2 };
                let mut cluster = match family {
                    Family::Ipv4 => Cluster::new(Shape::HostGw, nodes)?,
                    Family::Ipv6 => Cluster::new_ipv6_only(nodes)?,
                };
                for (name, host) in servers {
                    cluster.add_pod(nodes - 1, name, *host)?;
                }
                for (name, host) in clients {
                    cluster.add_pod(0, name, *host)?;
                }
                if placement.outside() {
                    // Direct traffic from outside goes straight to the pods' node.
                    cluster.route_from_outside_to_pods(1)?;
                }
                Nodes::Cluster(cluster)
            }
        })
    }

    /// The node the load comes from, whose agent is measured.
    pub fn client_node(&self) -> &dyn BenchNode {
        match self {
            Nodes::Virtual(node) => node,
            Nodes::Cluster(cluster) => cluster.node(0),
        }
    }

    pub fn server_node(&self) -> &dyn BenchNode {
        match self {
            Nodes::Virtual(node) => node,
            Nodes::Cluster(cluster) => cluster.nodes.last().expect("a cluster has nodes"),
        }
    }

    /// Outside the cluster, where the load of [`Placement::Outside`] comes
    /// from, and the address (of `family`) of the node whose node port it uses.
    pub fn outside(&self, family: Family) -> Option<(&Netns, IpAddr)> {
        match self {
            Nodes::Virtual(_) => None,
            Nodes::Cluster(cluster) => {
                let node: IpAddr = match family {
                    Family::Ipv4 => cluster.node(0).address().into(),
                    Family::Ipv6 => crate::cluster::underlay_ip6(0).into(),
                };
                Some((cluster.outside(), node))
            }
        }
    }

    /// A client outside the cluster whose traffic to the server node's pods
    /// node 0 routes both ways, with no proxy: the path of the node port
    /// load without the proxy (IPv4 clusters of two nodes; else none).
    pub fn outside_routed_by_client_node(&self, family: Family) -> anyhow::Result<Option<Netns>> {
        match self {
            Nodes::Cluster(cluster) if family == Family::Ipv4 && cluster.nodes.len() == 2 => {
                Ok(Some(cluster.outside_client_routed_by(0, 1)?))
            }
            _ => Ok(None),
        }
    }

    /// Every node, the client's first: kpr runs on each, as a DaemonSet would.
    pub fn all(&self) -> Vec<&dyn BenchNode> {
        match self {
            Nodes::Virtual(node) => vec![node],
            Nodes::Cluster(cluster) => cluster.nodes.iter().map(|n| n as &dyn BenchNode).collect(),
        }
    }
}
