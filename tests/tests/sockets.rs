//! Node processes, hostNetwork pods and pods under the node's cgroup reach
//! ClusterIPs, in both modes: each client is a process of its own (hooks
//! act on processes) placed in the node's cgroup. In eBPF mode the socket
//! hooks give it a backend at connect or send time; in iptables mode the
//! nat OUTPUT jump does. Either way the application sees the VIP as its
//! peer, a Service without endpoints is refused at once, and a backend pod
//! reaching its own Service (hairpin) gets an answer.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use kpr_tests::{
    client::{Held, Probe, probe, probe_answer},
    kpr::{self, Kpr, Mode},
    manifests::{web_service, write},
    netns::Netns,
    node::VirtualNode,
    root_or_skip, servers,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A Service with no endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const PODS: [(&str, Ipv4Addr); 3] = [
    ("web-a", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-b", Ipv4Addr::new(10, 244, 0, 12)),
    ("client", Ipv4Addr::new(10, 244, 0, 100)),
];
const PROBE: &str = env!("CARGO_BIN_EXE_kpr-probe");

fn run(node: &VirtualNode, ns: &Netns, kind: &str, addr: SocketAddr) -> Probe {
    probe(Path::new(PROBE), ns, &node.cgroup, kind, addr).unwrap()
}

fn answer(node: &VirtualNode, ns: &Netns, kind: &str, addr: SocketAddr) -> String {
    probe_answer(Path::new(PROBE), ns, &node.cgroup, kind, addr).unwrap()
}

fn web(port: u16) -> SocketAddr {
    SocketAddr::from((VIP, port))
}

/// A node whose two web pods serve TCP 8080 and UDP 5353, with kpr running
/// on Services `web` (both pods) and `empty` (none).
struct Setup {
    kpr: Kpr,
    manifests: std::path::PathBuf,
    _servers: Vec<servers::Server>,
    node: VirtualNode,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new(mode: Mode) -> Self {
        let node = VirtualNode::new(&PODS).unwrap();
        let servers = PODS[..2]
            .iter()
            .flat_map(|(n, _)| {
                let ns = &node.pod(n).ns;
                [servers::tcp(ns, 8080, n).unwrap(), servers::udp(ns, 5353, n).unwrap()]
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        write(&manifests, "web.yaml", &web_service("web", VIP, &PODS[..2])).unwrap();
        write(&manifests, "empty.yaml", &web_service("empty", EMPTY_VIP, &[])).unwrap();
        let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display())];
        let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
        Self { kpr, manifests, _servers: servers, node, _dir: dir }
    }
}

fn node_processes_and_pods_under_the_cgroup_reach_cluster_ips(mode: Mode) {
    root_or_skip!();
    let setup = Setup::new(mode);
    let node = &setup.node;
    let backends = ["web-a", "web-b"];
    // A node process (as a hostNetwork pod is): TCP, unconnected and connected UDP.
    for kind in ["tcp", "udp", "udp-connected"] {
        let port = if kind == "tcp" { 80 } else { 53 };
        let reply = answer(node, &node.ns, kind, web(port));
        assert!(backends.contains(&reply.as_str()), "{kind}: {reply}");
    }
    // A dual-stack (IPv6) socket addressing the Service's IPv4-mapped address.
    for (kind, port) in [("tcp", 80), ("udp", 53), ("udp-connected", 53)] {
        let mapped = SocketAddr::from((VIP.to_ipv6_mapped(), port));
        let reply = answer(node, &node.ns, kind, mapped);
        assert!(backends.contains(&reply.as_str()), "{kind} over IPv6: {reply}");
    }
    // Every backend is reached from the node.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(answer(node, &node.ns, "tcp", web(80)));
    }
    assert_eq!(seen.len(), 2, "both backends answer node processes: {seen:?}");
    // A pod, and a backend reaching its own Service (hairpin).
    for pod in ["client", "web-a"] {
        let reply = answer(node, &node.pod(pod).ns, "tcp", web(80));
        assert!(backends.contains(&reply.as_str()), "{pod}: {reply}");
    }
    // No endpoints: refused at once, from the node and from a pod.
    for ns in [&node.ns, &node.pod("client").ns] {
        let started = std::time::Instant::now();
        let p = run(node, ns, "tcp", SocketAddr::from((EMPTY_VIP, 80)));
        assert_eq!(p.errno, Some(libc::ECONNREFUSED), "{p:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "refused at once: {:?}", started.elapsed());
    }
    if mode == Mode::Ebpf {
        // The socket hooks did it, not the per-packet path.
        let stats = kpr::datapath_stats(&node.ns, node.bpf_root()).unwrap();
        assert!(stats["socket_translated"].as_u64().unwrap() >= 45, "{stats:#}");
        assert!(stats["socket_reverse_translated"].as_u64().unwrap() >= 2, "recvmsg and getpeername: {stats:#}");
        assert_eq!(stats["socket_refused_no_backend"], 2, "{stats:#}");
        assert_eq!(stats["translated"], 0, "no packet needed translating: {stats:#}");
        // Every TCP client has closed its socket: their entries went with them.
        let tcp_sockets = socket_flows(node, "TCP");
        assert!(tcp_sockets.is_empty(), "released with their sockets: {tcp_sockets:#?}");
    }
}

/// The socket-level entries `kpr conntrack list` shows for `protocol`.
fn socket_flows(node: &VirtualNode, protocol: &str) -> Vec<serde_json::Value> {
    let root = format!("--bpf-root={}", node.bpf_root().display());
    let out = kpr::command(&node.ns, &["conntrack", "list", "-o", "json", &root]).unwrap();
    let flows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    flows.into_iter().filter(|f| f["path"] == "socket" && f["protocol"] == protocol).collect()
}

/// A connected UDP client whose backend leaves the Service is never left
/// talking to it, nor to silence: its next request fails at once (eBPF mode
/// ends the socket) or reaches the remaining backend (iptables mode forgets
/// the conntrack entry, as kube-proxy does).
fn a_connected_udp_client_of_a_removed_backend_is_not_left_with_it(mode: Mode) {
    root_or_skip!();
    let mut setup = Setup::new(mode);
    let node = &setup.node;
    answer(node, &node.ns, "udp-connected", web(53));
    let (mut held, first) = Held::start(Path::new(PROBE), &node.ns, &node.cgroup, "udp-held", web(53)).unwrap();
    let talking_to = first.reply.clone().unwrap_or_else(|| panic!("the held client got no first answer: {first:?}"));
    if mode == Mode::Ebpf {
        // `kpr conntrack list` shows the held socket and the backend it was given.
        let held_socket: Vec<_> = socket_flows(node, "UDP")
            .into_iter()
            .filter(|f| f["frontend"] == "10.96.0.10:53" && f["backend"].as_str().unwrap().starts_with("10.244.0.1"))
            .collect();
        assert!(!held_socket.is_empty(), "the held socket is listed");
    }
    let remaining: Vec<_> = PODS[..2].iter().copied().filter(|(n, _)| *n != talking_to).collect();
    let synced = setup.kpr.log().matches("synced").count();
    write(&setup.manifests, "web.yaml", &web_service("web", VIP, &remaining)).unwrap();
    setup.kpr.wait_for_log_count("synced", synced + 1, Duration::from_secs(10)).unwrap();

    let again = held.ask().unwrap();
    match (&again.reply, again.errno) {
        (Some(reply), _) => assert_eq!(reply, remaining[0].0, "never the removed backend: {again:?}"),
        // An ended socket is disconnected: a client waiting in recv gets
        // ECONNABORTED, one that sends next gets EDESTADDRREQ.
        (None, Some(errno)) => assert!(
            [libc::ECONNABORTED, libc::EDESTADDRREQ].contains(&errno),
            "an error at once, not a timeout: {again:?}"
        ),
        _ => panic!("{again:?}"),
    }
    // A new client is served by the remaining backend.
    assert_eq!(answer(node, &node.ns, "udp-connected", web(53)), remaining[0].0);
}

kpr_tests::in_both_modes!(
    node_processes_and_pods_under_the_cgroup_reach_cluster_ips,
    a_connected_udp_client_of_a_removed_backend_is_not_left_with_it,
);
