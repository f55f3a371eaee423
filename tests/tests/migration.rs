//! Taking a node over from kube-proxy. kube-proxy's own rules for the
//! Services of its `TestOverallIPTablesRules` (kpr's golden copy, with the
//! differences that copy lists put back: localhost node ports and their
//! localnet guard, session affinity), its jumps and its canaries are loaded
//! into one iptables backend, addressed to this node's pods, so they serve.
//! Then kpr starts in either mode on the same Services while a pod asks a
//! ClusterIP every 10 ms: no request may fail, a later change must sync, and
//! in eBPF mode kube-proxy's chains are gone once kpr serves.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use kpr_tests::{
    client::{every_10ms, tcp_request},
    kpr::{Kpr, Mode},
    manifests::write,
    node::VirtualNode,
    root_or_skip,
    servers::{self, Server},
};

const GOLDEN: &str = include_str!("../../proxy-userspace/src/dataplane/iptables/golden/kube_proxy_overall.txt");
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
    // svc5's session affinity.
    text = put_back(
        &text,
        "--comment ns5/svc5:p80 -m tcp -p tcp -j DNAT",
        "--comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT",
    );
    let affine = "-A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment \"ns5/svc5:p80 -> 10.180.0.3:80\"";
    text = put_back(
        &text,
        &format!("{affine} -j KUBE-SEP-I77PXRDZVX7PMWMN\n"),
        &format!(
            "{affine} -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN\n\
             {affine} -j KUBE-SEP-I77PXRDZVX7PMWMN\n"
        ),
    );
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

/// What both iptables backends hold, every table.
fn saved(node: &VirtualNode) -> String {
    let tables = ["filter", "nat", "mangle"];
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .flat_map(|save| tables.map(|t| node.ns.output(&[save, "-t", t]).unwrap_or_default()))
        .collect()
}

fn takes_over(mode: Mode, backend: &str) {
    root_or_skip!();
    let mut pods: Vec<(String, Ipv4Addr)> = (1..=5).map(|n| (format!("p{n}"), pod_ip(n))).collect();
    pods.push(("client".into(), Ipv4Addr::new(10, 244, 0, 100)));
    let pods: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let node = VirtualNode::new(&pods).unwrap();
    let _servers: Vec<Server> = pods[..5].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 80, n).unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("kube-proxy.rules");
    std::fs::write(&rules, kube_proxy_rules()).unwrap();
    node.ns.exec(&["sh", "-c", &format!("iptables-{backend}-restore --noflush < {}", rules.display())]).unwrap();
    let client = node.pod("client").ns.name().to_string();
    let ask = move || kpr_tests::netns::run_in(&client, || tcp_request(SVC1, TIMEOUT)).unwrap();
    assert_eq!(ask().unwrap(), "p1", "kube-proxy's rules serve before kpr starts");

    let stop = Arc::new(AtomicBool::new(false));
    let asking = every_10ms(&node.pod("client").ns, SVC1, TIMEOUT, stop.clone());
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();
    write(&services, "services.yaml", &manifests(&[1])).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", services.display())];
    let mut kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    if mode == Mode::Ebpf {
        // Once eBPF serves, kube-proxy's rules go.
        kpr.wait_for_log("removed kpr's iptables rules", Duration::from_secs(10)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    // A later change syncs.
    write(&services, "services.yaml", &manifests(&[1, 2])).unwrap();
    kpr.wait_for_log_count("synced", 2, Duration::from_secs(10)).unwrap();
    let answers: std::collections::BTreeSet<String> = (0..30).filter_map(|_| ask().ok()).collect();
    assert_eq!(answers, ["p1", "p2"].map(String::from).into(), "the change is served:\n{}", kpr.log());
    stop.store(true, Ordering::Relaxed);
    let tally = asking.join().unwrap();
    let log = kpr.log();
    assert!(tally.ok > 50 && tally.failed == 0, "{tally:?}\n{log}");
    assert!(!log.contains("could not program"), "{log}");

    let left = saved(&node);
    if mode == Mode::Ebpf {
        for chain in
            ["KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-", "KUBE-NODEPORTS", "KUBE-PROXY-CANARY"]
        {
            assert!(!left.contains(chain), "kube-proxy's {chain} is gone:\n{left}");
        }
    } else {
        // kube-proxy's endpoint chains (named after its test addresses) were replaced by kpr's.
        assert!(!left.contains("KUBE-SEP-SXIVWICOYRO3J4NJ"), "{left}");
        assert!(left.contains("KUBE-SVC-XPGD46QRK7WJZT7O"), "the same Service chains, kpr's now:\n{left}");
    }
}

fn from_nft(mode: Mode) {
    takes_over(mode, "nft");
}

fn from_legacy(mode: Mode) {
    takes_over(mode, "legacy");
}

kpr_tests::in_both_modes!(from_nft, from_legacy);
