//! Where the benchmark's pods run: the clients and the Service's backends
//! on one virtual node, or the backends on a second node of a virtual
//! cluster (flannel host-gw shape: routed pod CIDRs over an underlay), so
//! every connection crosses from one node to the other, or a client outside
//! the cluster (on the underlay's router) reaching the backends through a
//! node port of the other node.

use std::{net::Ipv4Addr, path::Path};

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

/// What the benchmark needs of a node, from either harness.
pub trait BenchNode {
    fn ns(&self) -> &Netns;
    fn cgroup(&self) -> &Cgroup;
    fn bpf_root(&self) -> &Path;
    /// The node-side interfaces of its pods.
    fn interfaces(&self) -> Vec<String>;
    fn pod_ns(&self, name: &str) -> &Netns;
    fn pod_ip(&self, name: &str) -> Ipv4Addr;
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
    fn pod_ip(&self, name: &str) -> Ipv4Addr {
        self.pod(name).ip
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
    fn pod_ip(&self, name: &str) -> Ipv4Addr {
        self.pod(name).ip
    }
}

/// The benchmark's nodes.
pub enum Nodes {
    One(VirtualNode),
    Two(Cluster),
}

impl Nodes {
    /// `clients` and `servers` as (name, host part of the pod address),
    /// placed as `placement` says.
    pub fn new(placement: Placement, clients: &[(&str, u8)], servers: &[(&str, u8)]) -> anyhow::Result<Self> {
        Ok(match placement {
            Placement::SameNode => {
                let pods: Vec<(&str, Ipv4Addr)> =
                    servers.iter().chain(clients).map(|(n, host)| (*n, Ipv4Addr::new(10, 244, 0, *host))).collect();
                Nodes::One(VirtualNode::new(&pods)?)
            }
            Placement::OtherNode | Placement::Outside => {
                let mut cluster = Cluster::new(Shape::HostGw, 2)?;
                for (name, host) in servers {
                    cluster.add_pod(1, name, *host)?;
                }
                for (name, host) in clients {
                    cluster.add_pod(0, name, *host)?;
                }
                if placement.outside() {
                    // Direct traffic from outside goes straight to the pods' node.
                    cluster.route_from_outside_to_pods(1)?;
                }
                Nodes::Two(cluster)
            }
        })
    }

    /// The node the load comes from, whose agent is measured.
    pub fn client_node(&self) -> &dyn BenchNode {
        match self {
            Nodes::One(node) => node,
            Nodes::Two(cluster) => cluster.node(0),
        }
    }

    pub fn server_node(&self) -> &dyn BenchNode {
        match self {
            Nodes::One(node) => node,
            Nodes::Two(cluster) => cluster.node(1),
        }
    }

    /// Outside the cluster, where the load of [`Placement::Outside`] comes
    /// from, and the address of the node whose node port it uses.
    pub fn outside(&self) -> Option<(&Netns, Ipv4Addr)> {
        match self {
            Nodes::One(_) => None,
            Nodes::Two(cluster) => Some((cluster.outside(), cluster.node(0).address())),
        }
    }

    /// Every node, the client's first: kpr runs on each, as a DaemonSet would.
    pub fn all(&self) -> Vec<&dyn BenchNode> {
        match self {
            Nodes::One(node) => vec![node],
            Nodes::Two(cluster) => cluster.nodes.iter().map(|n| n as &dyn BenchNode).collect(),
        }
    }
}
