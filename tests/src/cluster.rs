//! A virtual cluster: several node namespaces joined by an underlay (a
//! bridge in a namespace of its own), each node with its own pod CIDR
//! (10.244.N.0/24), pods, bpffs and cgroup, wired in one of the common CNI
//! shapes so a Service's backends can sit on any node. A dual-stack cluster
//! (host-gw shape) also has IPv6 everywhere: the underlay fd00:100::/64,
//! pod CIDRs fd00:244:N::/64. Everything lives in namespaces this creates;
//! all of it goes on drop.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    cgroup::Cgroup,
    kpr::Kpr,
    netns::{Netns, Offload, ip, unique_prefix},
    node::{Bpffs, Pod},
};

/// How pods are connected, after the CNIs that wire them so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A bridge per node; pod CIDRs routed over the underlay (flannel host-gw).
    HostGw,
    /// A bridge per node; pod CIDRs reached through a VXLAN overlay (flannel vxlan).
    Vxlan,
    /// No bridge: a veth per pod with a /32 route to it, proxy ARP for its
    /// gateway (Calico, kindnet); pod CIDRs routed over the underlay.
    Routed,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::HostGw, Shape::Vxlan, Shape::Routed];
}

const UNDERLAY_PREFIX: [u8; 3] = [192, 168, 100];
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
/// The client of [`Cluster::outside_client_routed_by`].
const ROUTED_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 250);
const BRIDGE: &str = "cbr0";
/// The gateway pods of the routed shape use; answered by proxy ARP.
const ROUTED_GATEWAY: &str = "169.254.1.1";

/// A web pod on each of two nodes, and a client beside the first, for
/// [`Cluster::with_pods`].
pub const WEB_PAIR: [(u8, &str, u8); 3] = [(0, "web-0", 11), (1, "web-1", 11), (0, "client", 100)];

pub struct ClusterNode {
    // Pods first: dropping them removes their veths before the node goes.
    pub pods: Vec<Pod>,
    pub name: String,
    pub index: u8,
    pub ns: Netns,
    pub cgroup: Cgroup,
    bpffs: Bpffs,
    /// The pass program on the underlay's side of the node's wire (see `xdp_pass`).
    _wire_xdp: std::os::fd::OwnedFd,
}

impl ClusterNode {
    /// What the underlay's side of the node's wire does with the frames
    /// the node sends: passes them on (the default) or drops them.
    pub fn set_wire(&self, verdict: crate::xdp_pass::Verdict) -> anyhow::Result<()> {
        crate::xdp_pass::set(&self._wire_xdp, verdict)
    }

    /// The node's address on the underlay.
    pub fn address(&self) -> Ipv4Addr {
        underlay_ip(self.index)
    }

    pub fn bpf_root(&self) -> &std::path::Path {
        self.bpffs.path()
    }

    /// The node-side interfaces of its pods.
    pub fn interfaces(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.host_if.clone()).collect()
    }

    /// Starts kpr on this node with `args` and `--node-name`, the
    /// per-packet path on `interfaces`, logging to `logs/kpr-NODE.log`;
    /// returns once it has synced.
    pub fn start_kpr(&self, interfaces: &[String], args: &[String], logs: &Path) -> anyhow::Result<Kpr> {
        self.start_kpr_build(&crate::kpr::binary()?, interfaces, args, logs)
    }

    /// [`ClusterNode::start_kpr`] with the `kpr` binary at `bin` (another build).
    pub fn start_kpr_build(
        &self,
        bin: &Path,
        interfaces: &[String],
        args: &[String],
        logs: &Path,
    ) -> anyhow::Result<Kpr> {
        let mut args = args.to_vec();
        args.push(format!("--node-name={}", self.name));
        let log = logs.join(format!("kpr-{}.log", self.name));
        let mut kpr = Kpr::spawn_build(bin, &self.ns, self.bpf_root(), &self.cgroup, interfaces, &args, &log)?;
        kpr.wait_for_log("synced", Duration::from_secs(20))?;
        Ok(kpr)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name} on {}", self.name))
    }
}

/// Which address families a cluster's nodes and pods have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Families {
    Ipv4,
    Dual,
    Ipv6,
}

pub struct Cluster {
    pub shape: Shape,
    pub nodes: Vec<ClusterNode>,
    /// The address families of nodes and pods.
    families: Families,
    prefix: String,
    // Dropped last: the nodes' uplinks end there.
    underlay: Netns,
}

fn underlay_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY_PREFIX[0], UNDERLAY_PREFIX[1], UNDERLAY_PREFIX[2], 10 + index)
}

/// The address of pod `host` on node `index`.
pub fn pod_ip(index: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index, host)
}

/// The IPv6 address of pod `host` on node `index`, in a dual-stack cluster.
pub fn pod_ip6(index: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, u16::from(index), 0, 0, 0, 0, u16::from(host))
}

/// Node `index`'s IPv6 address on the underlay, in a dual-stack cluster.
pub fn underlay_ip6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 10 + u16::from(index))
}

/// The underlay router's IPv6 address.
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

/// Adds `addr/len` to `dev` in namespace `ns`, usable at once (no duplicate
/// address detection: every address here is unique by construction).
fn add_ip6(ns: &str, addr: Ipv6Addr, len: u8, dev: &str) -> anyhow::Result<()> {
    ip(&["-n", ns, "-6", "addr", "add", &format!("{addr}/{len}"), "dev", dev, "nodad"])
}

/// Waits until no address of `ns` is tentative: the link-local addresses
/// the kernel gives every interface go through duplicate address detection
/// first, and Neighbor Discovery over a link waits for them.
fn settle_ipv6(ns: &Netns) -> anyhow::Result<()> {
    crate::wait::until(
        &format!("IPv6 addresses of {} past duplicate address detection", ns.name()),
        Duration::from_secs(10),
        || ns.output(&["ip", "-6", "addr", "show", "tentative"]).unwrap_or_else(|e| e.to_string()),
        |tentative| tentative.trim().is_empty(),
    )
    .map(drop)
}

fn vtep_mac(index: u8) -> String {
    format!("02:00:00:00:01:{:02x}", index + 1)
}

impl Cluster {
    /// `nodes` nodes wired as `shape`, without pods.
    pub fn new(shape: Shape, nodes: u8) -> anyhow::Result<Self> {
        let prefix = unique_prefix();
        let underlay = Netns::new(&format!("{prefix}-ul"))?;
        let ul = underlay.name().to_string();
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        // The underlay's router: the nodes' default gateway, and where
        // traffic from outside the cluster comes from.
        ip(&["-n", &ul, "addr", "add", &format!("{ROUTER}/24"), "dev", "br0"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        let mut cluster = Self { shape, nodes: Vec::new(), families: Families::Ipv4, prefix, underlay };
        for index in 0..nodes {
            let node = cluster.add_node(index, &ul).with_context(|| format!("creating node {index}"))?;
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            cluster.route_pod_cidrs(node)?;
        }
        Ok(cluster)
    }

    fn add_node(&self, index: u8, ul: &str) -> anyhow::Result<ClusterNode> {
        let name = format!("node{index}");
        let ns = Netns::new(&format!("{}-{name}", self.prefix))?;
        let n = ns.name().to_string();
        let port = format!("ul{index}");
        ip(&["-n", ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n])?;
        ip(&["-n", ul, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &n, "addr", "add", &format!("{}/24", underlay_ip(index)), "dev", "eth0"])?;
        ip(&["-n", &n, "link", "set", "eth0", "up"])?;
        // A wire carries complete checksums both ways, and the underlay's
        // side takes frames a node's XDP program sends back out (XDP_TX).
        ns.set_offload("eth0", Offload::TxChecksum, false)?;
        self.underlay.set_offload(&port, Offload::TxChecksum, false)?;
        let wire = port.clone();
        let link = self.underlay.run(move || {
            let index = unsafe { libc::if_nametoindex(std::ffi::CString::new(wire).unwrap().as_ptr()) };
            crate::xdp_pass::attach(index)
        })??;
        // Like a real node, a default route: traffic to a VIP is routed
        // (and so translated) rather than refused as unreachable.
        ip(&["-n", &n, "route", "add", "default", "via", &ROUTER.to_string()])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // iptables mode refuses with ICMP errors, which are rate-limited by default.
        ns.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        let gateway = pod_ip(index, 1);
        match self.shape {
            Shape::HostGw | Shape::Vxlan => {
                // A fixed MAC, as the CNI bridge plugin sets one (see VirtualNode).
                let mac = format!("02:00:0a:f4:{index:02x}:01");
                ip(&["-n", &n, "link", "add", BRIDGE, "address", &mac, "type", "bridge"])?;
                ip(&["-n", &n, "addr", "add", &format!("{gateway}/24"), "dev", BRIDGE])?;
                ip(&["-n", &n, "link", "set", BRIDGE, "up"])?;
                for dev in ["all", "default", BRIDGE] {
                    ns.sysctl(&format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
                }
            }
            Shape::Routed => {}
        }
        if self.shape == Shape::Vxlan {
            let local = underlay_ip(index).to_string();
            ip(&["-n", &n, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", &local, "dev", "eth0"])?;
            ip(&["-n", &n, "link", "set", "flannel.1", "address", &vtep_mac(index)])?;
            // The overlay takes 50 bytes of the underlay's MTU.
            ip(&["-n", &n, "link", "set", "flannel.1", "mtu", "1450", "up"])?;
            ip(&["-n", &n, "addr", "add", &format!("{}/32", pod_ip(index, 0)), "dev", "flannel.1"])?;
        }
        let cgroup = Cgroup::new(&format!("{}-{name}", self.prefix))?;
        Ok(ClusterNode { pods: Vec::new(), name, index, ns, cgroup, bpffs: Bpffs::mount()?, _wire_xdp: link })
    }

    /// Routes from `node` to every other node's pod CIDR.
    fn route_pod_cidrs(&self, node: &ClusterNode) -> anyhow::Result<()> {
        let n = node.ns.name();
        for other in self.nodes.iter().filter(|o| o.index != node.index) {
            let cidr = format!("10.244.{}.0/24", other.index);
            match self.shape {
                Shape::HostGw | Shape::Routed => {
                    ip(&["-n", n, "route", "add", &cidr, "via", &other.address().to_string()])?;
                }
                Shape::Vxlan => {
                    let vtep = pod_ip(other.index, 0).to_string();
                    let mac = vtep_mac(other.index);
                    ip(&["-n", n, "route", "add", &cidr, "via", &vtep, "dev", "flannel.1", "onlink"])?;
                    ip(&["-n", n, "neigh", "add", &vtep, "lladdr", &mac, "dev", "flannel.1", "nud", "permanent"])?;
                    crate::netns::run(
                        "bridge",
                        &["-n", n, "fdb", "append", &mac, "dev", "flannel.1", "dst", &other.address().to_string()],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// `nodes` nodes wired as flannel host-gw in both families: IPv4 as in
    /// [`Cluster::new`], and IPv6 addresses and routes beside them.
    pub fn new_dual_stack(nodes: u8) -> anyhow::Result<Self> {
        let mut cluster = Self::new(Shape::HostGw, nodes)?;
        cluster.families = Families::Dual;
        let ul = cluster.underlay.name().to_string();
        add_ip6(&ul, ROUTER6, 64, "br0")?;
        for node in &cluster.nodes {
            let n = node.ns.name();
            node.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            // Pods' interfaces created from now on skip duplicate address detection.
            node.ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            add_ip6(n, underlay_ip6(node.index), 64, "eth0")?;
            ip(&["-n", n, "-6", "route", "add", "default", "via", &ROUTER6.to_string()])?;
            add_ip6(n, pod_ip6(node.index, 1), 64, BRIDGE)?;
            for other in cluster.nodes.iter().filter(|o| o.index != node.index) {
                let cidr = format!("{}/64", pod_ip6(other.index, 0));
                ip(&["-n", n, "-6", "route", "add", &cidr, "via", &underlay_ip6(other.index).to_string()])?;
            }
        }
        for ns in cluster.nodes.iter().map(|n| &n.ns).chain([&cluster.underlay]) {
            settle_ipv6(ns)?;
        }
        Ok(cluster)
    }

    /// `nodes` nodes wired as flannel host-gw over IPv6 alone: the nodes
    /// and their pods have no IPv4 address or route (a pod's [`Pod::ip`]
    /// is not assigned). The underlay's router keeps both families.
    pub fn new_ipv6_only(nodes: u8) -> anyhow::Result<Self> {
        let mut cluster = Self::new_dual_stack(nodes)?;
        cluster.families = Families::Ipv6;
        for node in &cluster.nodes {
            let n = node.ns.name();
            for dev in ["eth0", BRIDGE] {
                ip(&["-n", n, "-4", "addr", "flush", "dev", dev])?;
            }
            ip(&["-n", n, "-4", "route", "flush", "table", "main"])?;
        }
        Ok(cluster)
    }

    /// Outside the cluster: the underlay's router, whose address
    /// ([`Cluster::OUTSIDE`]) is where outside clients come from.
    pub fn outside(&self) -> &Netns {
        &self.underlay
    }

    pub const OUTSIDE: Ipv4Addr = ROUTER;
    /// [`Cluster::OUTSIDE`]'s IPv6 address (dual-stack and IPv6-only clusters).
    pub const OUTSIDE6: Ipv6Addr = ROUTER6;

    /// Routes `addr` (an external or load balancer IP, of either family)
    /// from outside to node `index`, as a load balancer or router announcing
    /// it would.
    pub fn route_from_outside(&self, addr: impl Into<std::net::IpAddr>, index: u8) -> anyhow::Result<()> {
        let (prefix, via) = match addr.into() {
            std::net::IpAddr::V4(a) => (format!("{a}/32"), self.node(index).address().to_string()),
            std::net::IpAddr::V6(a) => (format!("{a}/128"), underlay_ip6(index).to_string()),
        };
        ip(&["-n", self.underlay.name(), "route", "add", &prefix, "via", &via])
    }

    /// Routes node `index`'s pod CIDRs (of each family the cluster has)
    /// from outside to that node, so an outside client can reach its pods
    /// directly (a routed pod network).
    pub fn route_from_outside_to_pods(&self, index: u8) -> anyhow::Result<()> {
        let ul = self.underlay.name();
        if self.families != Families::Ipv6 {
            let via = self.node(index).address().to_string();
            ip(&["-n", ul, "route", "add", &format!("10.244.{index}.0/24"), "via", &via])?;
        }
        if self.families != Families::Ipv4 {
            let (cidr, via) = (format!("{}/64", pod_ip6(index, 0)), underlay_ip6(index).to_string());
            ip(&["-n", ul, "route", "add", &cidr, "via", &via])?;
        }
        Ok(())
    }

    /// Another client outside the cluster, on the underlay beside the
    /// router, whose traffic to node `to`'s pods is routed by node `via`
    /// both ways, with no proxy on the way: the path traffic through a node
    /// port of `via` takes, without the proxy (IPv4 clusters).
    pub fn outside_client_routed_by(&self, via: u8, to: u8) -> anyhow::Result<Netns> {
        let client = Netns::new(&format!("{}-routed", self.prefix))?;
        let (c, ul) = (client.name(), self.underlay.name());
        ip(&["-n", ul, "link", "add", "routed", "type", "veth", "peer", "name", "eth0", "netns", c])?;
        ip(&["-n", ul, "link", "set", "routed", "master", "br0", "up"])?;
        ip(&["-n", c, "addr", "add", &format!("{ROUTED_CLIENT}/24"), "dev", "eth0"])?;
        ip(&["-n", c, "link", "set", "eth0", "up"])?;
        ip(&["-n", c, "link", "set", "lo", "up"])?;
        let via_addr = self.node(via).address().to_string();
        ip(&["-n", c, "route", "add", "default", "via", &via_addr])?;
        ip(&["-n", self.node(to).ns.name(), "route", "add", &format!("{ROUTED_CLIENT}/32"), "via", &via_addr])?;
        // Both next hops are on the wire the packet came in from: a redirect
        // would teach the client to skip the node.
        for dev in ["all", "eth0"] {
            self.node(via).ns.sysctl(&format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
        }
        Ok(client)
    }

    pub fn node(&self, index: u8) -> &ClusterNode {
        &self.nodes[index as usize]
    }

    /// Starts kpr on every node, as a DaemonSet would: `args`, the
    /// per-packet path on the node's pod interfaces; returns once each synced.
    pub fn start_kpr_everywhere(&self, args: &[String], logs: &Path) -> anyhow::Result<Vec<Kpr>> {
        self.nodes.iter().map(|node| node.start_kpr(&node.interfaces(), args, logs)).collect()
    }

    /// A cluster of `nodes` nodes holding `pods`: (node, name, host) each.
    pub fn with_pods(shape: Shape, nodes: u8, pods: &[(u8, &str, u8)]) -> anyhow::Result<Self> {
        let mut cluster = Self::new(shape, nodes)?;
        for (node, name, host) in pods {
            cluster.add_pod(*node, name, *host)?;
        }
        Ok(cluster)
    }

    /// Adds pod `name` with address 10.244.NODE.HOST to node `node`.
    pub fn add_pod(&mut self, node: u8, name: &str, host: u8) -> anyhow::Result<&Pod> {
        let shape = self.shape;
        let prefix = self.prefix.clone();
        let node = &mut self.nodes[node as usize];
        let ns = Netns::new(&format!("{prefix}-{}-{name}", node.index))?;
        let n = node.ns.name().to_string();
        let host_if = format!("veth{}", node.pods.len());
        let addr = pod_ip(node.index, host);
        let p = ns.name().to_string();
        let (ipv4, ipv6) = (self.families != Families::Ipv6, self.families != Families::Ipv4);
        if ipv6 {
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        ip(&["-n", &n, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &p])?;
        ip(&["-n", &p, "link", "set", "eth0", "up"])?;
        match shape {
            Shape::HostGw | Shape::Vxlan => {
                if ipv6 {
                    add_ip6(&p, pod_ip6(node.index, host), 64, "eth0")?;
                    ip(&["-n", &p, "-6", "route", "add", "default", "via", &pod_ip6(node.index, 1).to_string()])?;
                }
                ip(&["-n", &n, "link", "set", &host_if, "master", BRIDGE, "up"])?;
                // As flannel's and the bridge plugin's hairpinMode (see VirtualNode).
                ip(&["-n", &n, "link", "set", "dev", &host_if, "type", "bridge_slave", "hairpin", "on"])?;
                if shape == Shape::Vxlan {
                    ip(&["-n", &p, "link", "set", "eth0", "mtu", "1450"])?;
                }
                if ipv4 {
                    ip(&["-n", &p, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
                    ip(&["-n", &p, "route", "add", "default", "via", &pod_ip(node.index, 1).to_string()])?;
                }
            }
            Shape::Routed => {
                ip(&["-n", &n, "link", "set", &host_if, "up"])?;
                // The node answers ARP for the pod's gateway (it routes
                // everywhere else), at once.
                node.ns.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
                node.ns.sysctl(&format!("net.ipv4.neigh.{host_if}.proxy_delay"), "0")?;
                ip(&["-n", &n, "route", "add", &format!("{addr}/32"), "dev", &host_if])?;
                ip(&["-n", &p, "addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
                ip(&["-n", &p, "route", "add", ROUTED_GATEWAY, "dev", "eth0", "scope", "link"])?;
                ip(&["-n", &p, "route", "add", "default", "via", ROUTED_GATEWAY, "dev", "eth0"])?;
            }
        }
        if ipv6 {
            settle_ipv6(&ns)?;
            settle_ipv6(&node.ns)?;
        }
        node.pods.push(Pod { name: name.to_string(), ip: addr, host_if, ns });
        Ok(node.pods.last().expect("just pushed"))
    }
}
