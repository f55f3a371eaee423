//! Taking a node over from kube-proxy, in each of its modes:
//! - iptables: its own rules for the Services of its
//!   `TestOverallIPTablesRules` (kpr's golden copy, with the differences
//!   that copy lists put back: localhost node ports and their localnet
//!   guard), its jumps and its canaries, loaded into one
//!   iptables backend;
//! - nftables: its `TestOverallNFTablesRules` ruleset, loaded with `nft`;
//! - IPVS: what its IPVS mode leaves (this kernel has no IPVS to serve
//!   with): its iptables chains and jumps, ipsets, and the device holding
//!   the Service addresses (a veth, as this kernel has no dummy driver).
//!
//! All addressed to this node's pods, so the first two serve. Beside
//! kube-proxy (`--service-proxy-name`), kpr serves only the Services
//! labelled for it and leaves every one of kube-proxy's rules as it was.
//! Then kpr
//! starts in either mode on the same Services while a pod asks a ClusterIP
//! every 10 ms: no request may fail, a later change must sync, and once kpr
//! serves kube-proxy's leftovers are gone (in iptables mode, the chains it
//! shares with kube-proxy's iptables mode are kpr's own).

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use kpr_tests::{
    client::{every_10ms, request_on, tcp_request},
    kpr::{Kpr, Mode},
    manifests::write,
    node::VirtualNode,
    root_or_skip,
    servers::{self, Server},
};

const GOLDEN: &str = include_str!("../../proxy-userspace/src/dataplane/iptables/golden/kube_proxy_overall.txt");
const GOLDEN_NFTABLES: &str = include_str!("golden/kube_proxy_overall.nft");
const TIMEOUT: Duration = Duration::from_secs(2);
const SVC1: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(172, 30, 0, 41)), 80);

/// This node's stand-in for kube-proxy's endpoint 10.180.0.`n`.
fn pod_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + n)
}

/// `text` with `from` replaced by `to`, which must be there.
fn put_back(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the golden rules any more");
    text.replace(from, to)
}

/// kube-proxy's rules as it writes them, with its jumps from the built-in
/// chains and its canaries, for `iptables-restore --noflush`.
fn kube_proxy_rules() -> String {
    let mut text: String = GOLDEN.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    // Localhost node ports (kube-proxy's default) and their localnet guard.
    text = put_back(&text, ":KUBE-FORWARD - [0:0]\n", ":KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n");
    text = put_back(
        &text,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 \
         -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    );
    text = put_back(&text, " ! -d 127.0.0.0/8 -j KUBE-NODEPORTS", " -j KUBE-NODEPORTS");
    for (svc, port, chain) in [
        ("ns2/svc2:p80", 3001, "KUBE-EXT-GNZBNJ2PO5MGZ6GT"),
        ("ns3/svc3:p80", 3003, "KUBE-EXT-X27LE4BHSL4DOUIK"),
        ("ns5/svc5:p80", 3002, "KUBE-EXT-NUKIZ6OKUXPJNT4C"),
    ] {
        let rule = format!("-A KUBE-NODEPORTS -m comment --comment {svc} -m tcp -p tcp --dport {port} -j {chain}\n");
        let local = format!(
            "-A KUBE-NODEPORTS -m comment --comment {svc} -m tcp -p tcp -d 127.0.0.0/8 --dport {port} -j {chain}\n"
        );
        text = put_back(&text, &rule, &format!("{local}{rule}"));
    }
    // Its jumps from the built-in chains, and its canaries.
    let new = "-m conntrack --ctstate NEW -m comment --comment";
    let filter_jumps = [
        format!("-A INPUT {new} \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS".to_string(),
        format!("-A INPUT {new} \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"),
        "-A INPUT -j KUBE-FIREWALL".to_string(),
        format!("-A FORWARD {new} \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD".to_string(),
        format!("-A FORWARD {new} \"kubernetes service portals\" -j KUBE-SERVICES"),
        format!("-A FORWARD {new} \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"),
        format!("-A OUTPUT {new} \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
        format!("-A OUTPUT {new} \"kubernetes service portals\" -j KUBE-SERVICES"),
        "-A OUTPUT -j KUBE-FIREWALL".to_string(),
    ];
    let nat_jumps = [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ];
    let (filter, nat) = text.split_once("*nat\n").expect("a nat table");
    let filter = put_back(filter, "*filter\n", "*filter\n:KUBE-PROXY-CANARY - [0:0]\n");
    let filter = put_back(&filter, "COMMIT\n", &format!("{}\nCOMMIT\n", filter_jumps.join("\n")));
    let nat = format!(":KUBE-PROXY-CANARY - [0:0]\n{nat}");
    let nat = put_back(&nat, "COMMIT\n", &format!("{}\nCOMMIT\n", nat_jumps.join("\n")));
    text = format!("{filter}*nat\n{nat}*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n");
    // This node's pods instead of kube-proxy's test addresses.
    for n in 1..=5 {
        text = text.replace(&format!("10.180.0.{n}/32"), &format!("{}/32", pod_ip(n)));
        text = text.replace(&format!("10.180.0.{n}:"), &format!("{}:", pod_ip(n)));
    }
    assert!(!text.contains("10.180.0."), "every test address replaced:\n{text}");
    text
}

/// The same Services as kpr reads them (svc4 as a ClusterIP Service with its
/// external IP: kube-proxy's test gives its NodePort type no node port).
fn manifests(svc1_endpoints: &[u8]) -> String {
    let slice = |ns: &str, name: &str, endpoints: &[u8]| {
        let eps: String = endpoints.iter().map(|n| format!("- addresses: [\"{}\"]\n", pod_ip(*n))).collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {ns}, \
             labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p80, port: 80, protocol: TCP}}]\n\
             endpoints:\n{eps}"
        )
    };
    let service = |ns: &str, name: &str, spec: &str, status: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}{status}"
        )
    };
    [
        service("ns1", "svc1", "  clusterIP: 172.30.0.41\n  ports: [{name: p80, port: 80, protocol: TCP}]\n", ""),
        slice("ns1", "svc1", svc1_endpoints),
        service(
            "ns2",
            "svc2",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  clusterIP: 172.30.0.42\n  externalIPs: [192.168.99.22]\n  \
             healthCheckNodePort: 30000\n  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]\n",
            "status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}\n",
        ),
        slice("ns2", "svc2", &[2]),
        service(
            "ns3",
            "svc3",
            "  type: NodePort\n  clusterIP: 172.30.0.43\n  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3003}]\n",
            "",
        ),
        slice("ns3", "svc3", &[3]),
        service(
            "ns4",
            "svc4",
            "  clusterIP: 172.30.0.44\n  externalIPs: [192.168.99.33]\n  ports: [{name: p80, port: 80, protocol: TCP, targetPort: 80}]\n",
            "",
        ),
        slice("ns4", "svc4", &[4, 5]),
        service(
            "ns5",
            "svc5",
            "  type: LoadBalancer\n  clusterIP: 172.30.0.45\n  loadBalancerSourceRanges: [203.0.113.0/25]\n  \
             sessionAffinity: ClientIP\n  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3002}]\n",
            "status: {loadBalancer: {ingress: [{ip: 5.6.7.8}]}}\n",
        ),
        slice("ns5", "svc5", &[3]),
        service("ns6", "svc6", "  clusterIP: 172.30.0.46\n  ports: [{name: p80, port: 80, protocol: TCP, targetPort: 80}]\n", ""),
    ]
    .concat()
}

/// kube-proxy's nftables ruleset for `nft -f`: its test's dump lists some
/// rules before the chains they jump to, which one `nft -f` transaction
/// refuses, so declarations go first.
fn kube_proxy_nftables() -> String {
    let lines: Vec<&str> = GOLDEN_NFTABLES.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let declares = |l: &&str| ["add table", "add chain", "add set", "add map"].iter().any(|p| l.starts_with(p));
    let (declarations, rules): (Vec<&str>, Vec<&str>) = lines.into_iter().partition(declares);
    let mut text: String = declarations.iter().chain(&rules).map(|l| format!("{l}\n")).collect();
    for n in 1..=5 {
        text = text.replace(&format!("10.180.0.{n}"), &pod_ip(n).to_string());
    }
    assert!(!text.contains("10.180.0."), "every test address replaced:\n{text}");
    text
}

/// What kube-proxy's IPVS mode leaves in iptables (its proxier's
/// `writeIptablesRules` for these Services: the ipsets carry the addresses).
fn kube_proxy_ipvs_rules() -> String {
    let nat = [
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-NODE-PORT - [0:0]",
        ":KUBE-LOAD-BALANCER - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" \
         -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ",
        "-A KUBE-POSTROUTING -m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin \
         purpose\" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        "-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" \
         -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m comment --comment \"Kubernetes service lb portal\" -m set --match-set KUBE-LOAD-BALANCER \
         dst,dst -j KUBE-LOAD-BALANCER",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
    ];
    let filter = [
        ":KUBE-FORWARD - [0:0]",
        ":KUBE-NODE-PORT - [0:0]",
        ":KUBE-PROXY-FIREWALL - [0:0]",
        ":KUBE-SOURCE-RANGES-FIREWALL - [0:0]",
        ":KUBE-IPVS-FILTER - [0:0]",
        ":KUBE-IPVS-OUT-FILTER - [0:0]",
        "-A INPUT -m comment --comment \"kubernetes health check rules\" -j KUBE-NODE-PORT",
        "-A INPUT -m comment --comment \"kube-proxy firewall rules\" -j KUBE-PROXY-FIREWALL",
        "-A INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER",
        "-A FORWARD -m comment --comment \"kube-proxy firewall rules\" -j KUBE-PROXY-FIREWALL",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
        "-A OUTPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-OUT-FILTER",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate \
         RELATED,ESTABLISHED -j ACCEPT",
        "-A KUBE-NODE-PORT -m comment --comment \"Kubernetes health check node port\" -m set --match-set \
         KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT",
        "-A KUBE-PROXY-FIREWALL -m comment --comment \"Kubernetes service load balancer ip + port for load balancer \
         with sourceRange\" -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL",
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT \
         --reject-with icmp-port-unreachable",
        "-A KUBE-IPVS-OUT-FILTER -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst -j DROP",
    ];
    format!("*nat\n{}\nCOMMIT\n*filter\n{}\nCOMMIT\n", nat.join("\n"), filter.join("\n"))
}

/// The ipsets of kube-proxy's IPVS mode for these Services, as `ipset restore` input.
fn kube_proxy_ipsets() -> String {
    let mut sets = vec![
        "create KUBE-CLUSTER-IP hash:ip,port family inet".to_string(),
        "create KUBE-LOAD-BALANCER hash:ip,port family inet".to_string(),
        "create KUBE-LOAD-BALANCER-FW hash:ip,port family inet".to_string(),
        "create KUBE-LOOP-BACK hash:ip,port,ip family inet".to_string(),
        "create KUBE-IPVS-IPS hash:ip family inet".to_string(),
        "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535".to_string(),
        "create KUBE-HEALTH-CHECK-NODE-PORT bitmap:port range 0-65535".to_string(),
    ];
    for vip in 41..=46 {
        sets.push(format!("add KUBE-CLUSTER-IP 172.30.0.{vip},tcp:80"));
        sets.push(format!("add KUBE-IPVS-IPS 172.30.0.{vip}"));
    }
    for n in 1..=5 {
        sets.push(format!("add KUBE-LOOP-BACK {0},tcp:80,{0}", pod_ip(n)));
    }
    sets.extend(
        ["add KUBE-LOAD-BALANCER 5.6.7.8,tcp:80", "add KUBE-LOAD-BALANCER-FW 5.6.7.8,tcp:80"].map(String::from),
    );
    sets.extend(
        ["add KUBE-NODE-PORT-TCP 3001", "add KUBE-NODE-PORT-TCP 3002", "add KUBE-HEALTH-CHECK-NODE-PORT 30000"]
            .map(String::from),
    );
    sets.join("\n") + "\n"
}

/// Which of kube-proxy's modes ran on the node before kpr.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KubeProxy {
    Iptables(&'static str),
    Nftables,
    Ipvs,
}

impl KubeProxy {
    /// Leaves on `node` what this mode of kube-proxy writes.
    fn load(self, node: &VirtualNode, dir: &std::path::Path) {
        let file = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        match self {
            KubeProxy::Iptables(backend) => {
                let rules = file("kube-proxy.rules", kube_proxy_rules());
                node.ns.exec(&["sh", "-c", &format!("iptables-{backend}-restore --noflush < {rules}")]).unwrap();
            }
            KubeProxy::Nftables => {
                node.ns.exec(&["nft", "-f", &file("kube-proxy.nft", kube_proxy_nftables())]).unwrap();
            }
            KubeProxy::Ipvs => {
                node.ns.exec(&["ipset", "restore", "-f", &file("kube-proxy.ipsets", kube_proxy_ipsets())]).unwrap();
                let rules = file("kube-proxy.rules", kube_proxy_ipvs_rules());
                node.ns.exec(&["sh", "-c", &format!("iptables-nft-restore --noflush < {rules}")]).unwrap();
                // This kernel has no dummy driver: a veth stands in (kpr, like
                // kube-proxy's cleanup, removes the device by name).
                node.ns
                    .exec(&["ip", "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "kube-ipvs0-peer"])
                    .unwrap();
                for vip in 41..=46 {
                    node.ns.exec(&["ip", "addr", "add", &format!("172.30.0.{vip}/32"), "dev", "kube-ipvs0"]).unwrap();
                }
            }
        }
    }

    /// What of this mode's leftovers is still on `node`.
    fn left(self, node: &VirtualNode) -> String {
        let tables = node.ns.output(&["nft", "list", "tables"]).unwrap_or_default();
        let sets = node.ns.output(&["ipset", "list", "-n"]).unwrap_or_default();
        let dummy = node.ns.output(&["ip", "-o", "link", "show", "kube-ipvs0"]).unwrap_or_default();
        let mut left: Vec<String> = tables.lines().filter(|l| l.contains("kube-proxy")).map(String::from).collect();
        left.extend(sets.lines().filter(|l| l.starts_with("KUBE-")).map(|s| format!("ipset {s}")));
        left.extend(dummy.lines().map(|l| format!("link {l}")));
        left.join("\n")
    }
}

/// What both iptables backends hold, every table.
fn saved(node: &VirtualNode) -> String {
    let tables = ["filter", "nat", "mangle"];
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .flat_map(|save| tables.map(|t| node.ns.output(&[save, "-t", t]).unwrap_or_default()))
        .collect()
}

/// A node with kube-proxy's five test endpoints as pods p1-p5 (each
/// answering its name on port 80) and a client pod.
fn node_with_pods() -> (VirtualNode, Vec<Server>) {
    let mut pods: Vec<(String, Ipv4Addr)> = (1..=5).map(|n| (format!("p{n}"), pod_ip(n))).collect();
    pods.push(("client".into(), Ipv4Addr::new(10, 244, 0, 100)));
    let pods: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let node = VirtualNode::new(&pods).unwrap();
    let servers = pods[..5].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 80, n).unwrap()).collect();
    (node, servers)
}

fn takes_over(mode: Mode, from: KubeProxy) {
    root_or_skip!();
    let (node, _servers) = node_with_pods();
    let dir = tempfile::tempdir().unwrap();
    from.load(&node, dir.path());
    if from != KubeProxy::Iptables("nft") && from != KubeProxy::Iptables("legacy") {
        assert!(!from.left(&node).is_empty(), "kube-proxy's leftovers are in place before kpr starts");
    }
    let client = node.pod("client").ns.name().to_string();
    let ask = move || kpr_tests::netns::run_in(&client, || tcp_request(SVC1, TIMEOUT)).unwrap();
    // IPVS mode cannot serve on a kernel without IPVS: asked once kpr serves.
    let serves_before = from != KubeProxy::Ipvs;
    // A connection kube-proxy's rules translated, still open when kpr takes over.
    let mut held = None;
    if serves_before {
        assert_eq!(ask().unwrap(), "p1", "kube-proxy's rules serve before kpr starts");
        let client = node.pod("client").ns.name().to_string();
        let mut stream =
            kpr_tests::netns::run_in(&client, || TcpStream::connect_timeout(&SVC1, TIMEOUT)).unwrap().unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        assert_eq!(request_on(&mut stream).unwrap(), "p1");
        held = Some(stream);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut asking = serves_before.then(|| every_10ms(&node.pod("client").ns, SVC1, TIMEOUT, stop.clone()));
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();
    write(&services, "services.yaml", &manifests(&[1])).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", services.display())];
    let mut kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    if asking.is_none() {
        asking = Some(every_10ms(&node.pod("client").ns, SVC1, TIMEOUT, stop.clone()));
    }
    match from {
        // Once eBPF serves, kube-proxy's rules go (in iptables mode they are kpr's now).
        // IPv4's backend (IPv6's rules, which no Service needs, may go during the first sync).
        KubeProxy::Iptables(backend) if mode == Mode::Ebpf => {
            let name = if backend == "nft" { "nf_tables" } else { backend };
            let removed = format!("removed kpr's iptables rules backend=\"{name}\"");
            kpr.wait_for_log(&removed, Duration::from_secs(10)).unwrap()
        }
        KubeProxy::Iptables(_) => {}
        KubeProxy::Nftables | KubeProxy::Ipvs => {
            kpr.wait_for_log("removed kube-proxy's nftables and IPVS leftovers", Duration::from_secs(10)).unwrap()
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    // A later change syncs.
    write(&services, "services.yaml", &manifests(&[1, 2])).unwrap();
    let mut answers = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while answers.len() < 2 && std::time::Instant::now() < deadline {
        answers.extend(ask().ok());
    }
    assert_eq!(answers, ["p1", "p2"].map(String::from).into(), "the change is served:\n{}", kpr.log());
    stop.store(true, Ordering::Relaxed);
    let tally = asking.unwrap().join().unwrap();
    let log = kpr.log();
    // Asked throughout the takeover (fewer answers on a loaded machine), none failed.
    assert!(tally.ok > 10 && tally.failed == 0, "{tally:?}\n{log}");
    assert!(!log.contains("could not program") && !log.contains("could not remove"), "{log}");
    if let Some(mut stream) = held {
        // Its packets go on through the node's conntrack, which translated it.
        if mode == Mode::Ebpf {
            assert!(log.contains("go on through the node's conntrack"), "{log}");
            // Conntrack stays on for it, whatever else the node's rules need.
            assert!(saved(&node).contains("keeps conntrack on"), "{}", saved(&node));
        }
        let answer = request_on(&mut stream);
        assert_eq!(
            answer.as_deref().ok(),
            Some("p1"),
            "the connection kube-proxy translated lives on: {answer:?}\n{log}"
        );
    }

    let left = saved(&node);
    if mode == Mode::Ebpf {
        for chain in
            ["KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-", "KUBE-NODEPORTS", "KUBE-PROXY-CANARY"]
        {
            assert!(!left.contains(chain), "kube-proxy's {chain} is gone:\n{left}");
        }
    } else if matches!(from, KubeProxy::Iptables(_)) {
        // kube-proxy's endpoint chains (named after its test addresses) were replaced by kpr's.
        assert!(!left.contains("KUBE-SEP-SXIVWICOYRO3J4NJ"), "{left}");
        assert!(left.contains("KUBE-SVC-XPGD46QRK7WJZT7O"), "the same Service chains, kpr's now:\n{left}");
    }
    for chain in ["KUBE-NODE-PORT ", "KUBE-LOAD-BALANCER", "KUBE-IPVS-", "KUBE-SOURCE-RANGES-FIREWALL"] {
        assert!(!left.contains(chain), "kube-proxy's IPVS-mode {chain} is gone:\n{left}");
    }
    let leftovers = from.left(&node);
    assert!(leftovers.is_empty(), "kube-proxy's leftovers are gone:\n{leftovers}\n{log}");
}

fn from_nft(mode: Mode) {
    takes_over(mode, KubeProxy::Iptables("nft"));
}

fn from_legacy(mode: Mode) {
    takes_over(mode, KubeProxy::Iptables("legacy"));
}

fn from_nftables_mode(mode: Mode) {
    takes_over(mode, KubeProxy::Nftables);
}

fn from_ipvs_mode(mode: Mode) {
    takes_over(mode, KubeProxy::Ipvs);
}

/// kube-proxy's rules, as one sorted list of lines.
fn kube_proxy_lines(node: &VirtualNode) -> Vec<String> {
    let mut lines: Vec<String> = saved(node).lines().filter(|l| l.contains("KUBE-")).map(String::from).collect();
    lines.sort();
    lines
}

fn beside_kube_proxy(mode: Mode) {
    root_or_skip!();
    let (node, _servers) = node_with_pods();
    let dir = tempfile::tempdir().unwrap();
    KubeProxy::Iptables("nft").load(&node, dir.path());
    let before = kube_proxy_lines(&node);

    // kube-proxy's Services, and one labelled for kpr.
    let label = "labels: {service.kubernetes.io/service-proxy-name: kpr";
    let mine = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: mine, namespace: ns7, {label}}}}}\nspec:\n  clusterIP: \
         172.30.0.47\n  ports: [{{name: p80, port: 80, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\n\
         kind: EndpointSlice\nmetadata: {{name: mine-1, namespace: ns7, {label}, kubernetes.io/service-name: mine}}}}\n\
         addressType: IPv4\nports: [{{name: p80, port: 80, protocol: TCP}}]\nendpoints:\n- addresses: [\"{}\"]\n",
        pod_ip(3)
    );
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();
    write(&services, "services.yaml", &(manifests(&[1]) + &mine)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let asking = every_10ms(&node.pod("client").ns, SVC1, TIMEOUT, stop.clone());
    let args = [
        mode.arg().to_string(),
        format!("--source=dir:{}", services.display()),
        "--service-proxy-name=kpr".to_string(),
    ];
    let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let client = node.pod("client").ns.name().to_string();
    let mine_vip = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(172, 30, 0, 47)), 80);
    let answer = kpr_tests::netns::run_in(&client, move || tcp_request(mine_vip, TIMEOUT)).unwrap();
    assert_eq!(answer.unwrap(), "p3", "kpr serves the Service labelled for it:\n{}", kpr.log());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let tally = asking.join().unwrap();
    assert!(tally.ok > 10 && tally.failed == 0, "kube-proxy's Services are still served: {tally:?}");

    let after = kube_proxy_lines(&node);
    assert_eq!(before, after, "kube-proxy's rules are untouched:\n{}", kpr.log());
    if mode == Mode::Iptables {
        let rules = saved(&node);
        assert!(rules.contains(":KPR-SERVICES") && rules.contains("-j KPR-SERVICES"), "kpr's own chains:\n{rules}");
    }
}

kpr_tests::in_both_modes!(from_nft, from_legacy, from_nftables_mode, from_ipvs_mode, beside_kube_proxy);
