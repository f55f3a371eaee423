//! Mode selection: the fallback from eBPF to iptables, switching modes on
//! one node (exactly one dataplane each time, foreign rules untouched), the
//! iptables backend choice, and `kpr cleanup`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use kpr_tests::{
    client::tcp_request,
    kpr::{self, Kpr},
    manifests::{web_service, write},
    node::VirtualNode,
    root_or_skip,
    servers::{self, Server},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PODS: [(&str, Ipv4Addr); 3] = [
    ("web-a", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-b", Ipv4Addr::new(10, 244, 0, 12)),
    ("client", Ipv4Addr::new(10, 244, 0, 100)),
];

struct Node {
    dir: tempfile::TempDir,
    _servers: Vec<Server>,
    node: VirtualNode,
}

impl Node {
    fn new() -> Self {
        let node = VirtualNode::new(&PODS).unwrap();
        let servers = PODS[..2].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 8080, n).unwrap()).collect();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        write(&dir.path().join("manifests"), "web.yaml", &web_service("web", VIP, &PODS[..2])).unwrap();
        Self { dir, _servers: servers, node }
    }

    fn kpr(&self, args: &[&str]) -> Kpr {
        let mut all = vec![format!("--source=dir:{}", self.dir.path().join("manifests").display())];
        all.extend(args.iter().map(|a| a.to_string()));
        Kpr::start_with(&self.node, &all, &self.dir.path().join("kpr.log"), "synced").unwrap()
    }

    fn answers(&self) -> bool {
        self.node
            .pod("client")
            .ns
            .run(|| (0..10).all(|_| tcp_request(SocketAddr::from((VIP, 80)), Duration::from_secs(2)).is_ok()))
            .unwrap()
    }

    /// Programs attached on ingress of the pod interfaces.
    fn programs(&self) -> usize {
        let ifaces = self.node.interfaces();
        self.node
            .ns
            .run(move || {
                ifaces.iter().map(|i| SchedClassifier::query_tcx(i, TcAttachType::Ingress).unwrap().1.len()).sum()
            })
            .unwrap()
    }

    fn save(&self, backend: &str) -> String {
        ["nat", "filter"]
            .iter()
            .map(|t| self.node.ns.output(&[&format!("iptables-{backend}-save"), "-t", t]).unwrap())
            .collect()
    }

    /// kpr's chains in either backend.
    fn kpr_chains(&self) -> usize {
        ["nft", "legacy"].iter().map(|b| self.save(b).lines().filter(|l| l.starts_with(":KUBE-")).count()).sum()
    }

    fn status(&self) -> String {
        let state = kpr::state_dir(&self.dir.path().join("kpr.log"));
        kpr::command(&self.node.ns, &["status", &format!("--state-dir={}", state.display())]).unwrap()
    }
}

#[test]
fn auto_mode_uses_ebpf_where_it_can() {
    root_or_skip!();
    let n = Node::new();
    let mut kpr = n.kpr(&["--mode=auto"]);
    assert!(n.answers());
    assert_eq!(n.programs(), PODS.len());
    assert_eq!(n.kpr_chains(), 0);
    assert!(n.status().contains("mode:       ebpf"), "{}", n.status());
    kpr.interrupt().unwrap();
    assert!(n.status().contains("not running"));
}

#[test]
fn auto_mode_falls_back_to_iptables_and_says_why() {
    root_or_skip!();
    let n = Node::new();
    let kpr = n.kpr(&["--mode=auto", "--simulate-ebpf-unavailable"]);
    assert!(n.answers(), "Services work through iptables:\n{}", kpr.log());
    assert_eq!(n.programs(), 0, "no eBPF program attached");
    assert!(n.save("nft").contains(":KUBE-SERVICES"));
    let log = kpr.log();
    assert_eq!(log.matches("eBPF unavailable, falling back to iptables mode").count(), 1, "one clear line:\n{log}");
    assert!(log.contains("mode=\"iptables\"") || log.contains("mode=iptables"), "{log}");
    let status = n.status();
    assert!(status.contains("mode:       iptables") && status.contains("fell back from eBPF"), "{status}");
}

#[test]
fn switching_modes_leaves_exactly_one_dataplane_and_cleanup_leaves_none() {
    root_or_skip!();
    let n = Node::new();
    // Rules that are not kpr's must survive everything below.
    n.node.ns.exec(&["iptables-nft", "-N", "SITE-POLICY"]).unwrap();
    n.node.ns.exec(&["iptables-nft", "-A", "SITE-POLICY", "-s", "192.0.2.0/24", "-j", "DROP"]).unwrap();
    n.node.ns.exec(&["iptables-nft", "-A", "FORWARD", "-j", "SITE-POLICY"]).unwrap();
    let foreign = |n: &Node| {
        let s = n.save("nft");
        s.contains("-A SITE-POLICY -s 192.0.2.0/24 -j DROP") && s.contains("-A FORWARD -j SITE-POLICY")
    };

    let pins = n.node.bpf_root().join("kpr");
    let mut kpr = n.kpr(&["--mode=ebpf"]);
    assert!(n.answers());
    assert_eq!((n.programs(), n.kpr_chains()), (PODS.len(), 0), "ebpf only");
    kpr.interrupt().unwrap();
    assert!(pins.join("SERVICES").exists(), "maps stay pinned for inspection after eBPF mode exits");

    let mut kpr = n.kpr(&["--mode=iptables"]);
    assert!(n.answers());
    assert_eq!(n.programs(), 0, "iptables only");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pins.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pins.exists(), "iptables mode removed eBPF mode's pinned maps");
    assert!(n.kpr_chains() > 0);
    kpr.interrupt().unwrap();
    // As with kube-proxy, iptables rules outlive the agent and keep serving.
    assert!(n.answers(), "rules stay in place after iptables mode exits");

    let mut kpr = n.kpr(&["--mode=ebpf"]);
    assert!(n.answers());
    // The take-over happens once eBPF serves, right after its first sync.
    kpr.wait_for_log("removed kpr's iptables rules", Duration::from_secs(10)).unwrap();
    assert_eq!(
        (n.programs(), n.kpr_chains()),
        (PODS.len(), 0),
        "taking over removed iptables mode's rules:\n{}",
        kpr.log()
    );
    assert!(foreign(&n), "other rules untouched:\n{}", n.save("nft"));

    let out = kpr::command(&n.node.ns, &["cleanup"]).unwrap();
    assert!(out.contains("removed"), "{out}");
    kpr.interrupt().unwrap();
    let mut kpr = n.kpr(&["--mode=iptables"]);
    kpr.interrupt().unwrap();
    assert!(n.kpr_chains() > 0);
    kpr::command(&n.node.ns, &["cleanup"]).unwrap();
    assert_eq!((n.programs(), n.kpr_chains()), (0, 0), "cleanup leaves nothing:\n{}", n.save("nft"));
    assert!(foreign(&n), "other rules untouched:\n{}", n.save("nft"));
    assert!(!n.answers(), "nothing proxies any more");
}

#[test]
fn iptables_mode_uses_the_backend_that_already_has_rules() {
    root_or_skip!();
    let n = Node::new();
    n.node.ns.exec(&["iptables-legacy", "-A", "INPUT", "-s", "192.0.2.1/32", "-j", "ACCEPT"]).unwrap();
    let kpr = n.kpr(&["--mode=iptables"]);
    assert!(n.answers());
    assert!(n.save("legacy").contains(":KUBE-SERVICES"), "{}", n.save("legacy"));
    assert!(!n.save("nft").contains(":KUBE-SERVICES"));
    assert!(kpr.log().contains("backend=\"legacy\"") || kpr.log().contains("backend=legacy"), "{}", kpr.log());
}
