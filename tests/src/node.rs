//! A virtual Kubernetes node: a node namespace with a bridge (the pod
//! network's gateway) and one namespace per pod, joined by veth pairs whose
//! node-side ends are where kpr attaches. Everything lives in namespaces this
//! creates: nothing is added to the machine's root namespace.

use std::net::Ipv4Addr;

use anyhow::Context as _;

use crate::{
    cgroup::Cgroup,
    netns::{Netns, ip, unique_prefix},
};

pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// The ClusterIP most tests give their `web` Service.
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Two web pods and a client: the node most tests use.
pub const WEB_AND_CLIENT: [(&str, Ipv4Addr); 3] = [
    ("web-a", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-b", Ipv4Addr::new(10, 244, 0, 12)),
    ("client", Ipv4Addr::new(10, 244, 0, 100)),
];
pub const PREFIX_LEN: u8 = 24;
/// The node's own address, on its uplink (where the default route goes):
/// where its node ports answer.
pub const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 255, 1);
const BRIDGE: &str = "cbr0";

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The node-side end of the pod's veth pair.
    pub host_if: String,
    pub ns: Netns,
}

pub struct VirtualNode {
    // Pods first: dropping them removes their veths before the node goes.
    pub pods: Vec<Pod>,
    pub ns: Netns,
    /// The node's cgroup: kpr's socket hooks serve the processes placed in it.
    pub cgroup: Cgroup,
    /// Names this node's namespaces begin with.
    prefix: String,
    /// The node's own bpffs, where kpr pins its maps (as /sys/fs/bpf on a
    /// real node); unmounted last.
    bpffs: Bpffs,
    /// Pods added so far, removed ones too: the next one's `vethN`.
    added: usize,
}

/// A bpf filesystem mounted on a temporary folder; unmounted on drop.
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn mount() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("kpr-bpffs-").tempdir()?;
        crate::netns::run("mount", &["-t", "bpf", "bpf", dir.path().to_str().context("temp path")?])?;
        Ok(Self { dir })
    }
}

impl Bpffs {
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // Lazily: an agent still starting or stopping keeps its view until it exits.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

impl VirtualNode {
    /// A node with one pod per `(name, ip)`; IPs must lie in 10.244.0.0/24.
    pub fn new(pods: &[(&str, Ipv4Addr)]) -> anyhow::Result<Self> {
        let prefix = unique_prefix();
        let ns = Netns::new(&format!("{prefix}-node"))?;
        let n = ns.name().to_string();
        // A fixed MAC, as the CNI bridge plugin and Docker set one: otherwise
        // the bridge takes its lowest port's MAC, which changes as pods come
        // and go, and pods that cached the gateway's old MAC lose their way.
        ip(&["-n", &n, "link", "add", BRIDGE, "address", "02:00:0a:f4:00:01", "type", "bridge"])?;
        ip(&["-n", &n, "addr", "add", &format!("{GATEWAY}/{PREFIX_LEN}"), "dev", BRIDGE])?;
        ip(&["-n", &n, "link", "set", BRIDGE, "up"])?;
        // Like a real node, it has a default route (here into a veth whose
        // far end drops everything), so traffic to a VIP nobody serves is
        // forwarded into the filter rules rather than refused by routing.
        ip(&["-n", &n, "link", "add", "uplink", "type", "veth", "peer", "name", "upstream"])?;
        ip(&["-n", &n, "addr", "add", &format!("{NODE_ADDRESS}/24"), "dev", "uplink"])?;
        ip(&["-n", &n, "link", "set", "uplink", "up"])?;
        ip(&["-n", &n, "link", "set", "upstream", "up"])?;
        ip(&[
            "-n",
            &n,
            "neigh",
            "add",
            "192.168.255.254",
            "lladdr",
            "02:00:00:00:ff:fe",
            "dev",
            "uplink",
            "nud",
            "permanent",
        ])?;
        ip(&["-n", &n, "route", "add", "default", "via", "192.168.255.254"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // iptables mode refuses with REJECT (an ICMP error), which the kernel
        // rate-limits to about one a second per client: a test probing a
        // refused Service would wait a second per connection.
        ns.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        // Translated packets are routed back out of the bridge they came in
        // on; the redirects the kernel would send for that are noise.
        for dev in ["all", "default", BRIDGE] {
            ns.sysctl(&format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
        }
        let cgroup = Cgroup::new(&format!("{prefix}-node"))?;
        let mut node = Self { pods: Vec::new(), ns, cgroup, prefix, bpffs: Bpffs::mount()?, added: 0 };
        for (name, addr) in pods {
            node.add_pod(name, *addr).with_context(|| format!("creating pod {name}"))?;
        }
        Ok(node)
    }

    /// Adds pod `name` at `addr` (in 10.244.0.0/24), on the next `vethN`.
    pub fn add_pod(&mut self, name: &str, addr: Ipv4Addr) -> anyhow::Result<&Pod> {
        let ns = Netns::new(&format!("{}-{name}", self.prefix))?;
        let node = self.ns.name().to_string();
        let host_if = format!("veth{}", self.added);
        ip(&["-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
        ip(&["-n", &node, "link", "set", &host_if, "master", BRIDGE, "up"])?;
        // As the CNI bridge plugin's hairpinMode: a pod reaching its own
        // Service gets its packets back through the port they came from.
        ip(&["-n", &node, "link", "set", "dev", &host_if, "type", "bridge_slave", "hairpin", "on"])?;
        let p = ns.name().to_string();
        ip(&["-n", &p, "addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", "eth0"])?;
        ip(&["-n", &p, "link", "set", "eth0", "up"])?;
        ip(&["-n", &p, "route", "add", "default", "via", &GATEWAY.to_string()])?;
        self.pods.push(Pod { name: name.to_string(), ip: addr, host_if, ns });
        self.added += 1;
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Deletes pod `name`: its namespace, and with it its veth pair.
    pub fn remove_pod(&mut self, name: &str) {
        self.pods.retain(|p| p.name != name);
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Where the node's bpffs is mounted, for `--bpf-root`.
    pub fn bpf_root(&self) -> &std::path::Path {
        self.bpffs.dir.path()
    }

    /// The node-side interfaces of all pods, for `kpr run --interfaces`.
    pub fn interfaces(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.host_if.clone()).collect()
    }
}
