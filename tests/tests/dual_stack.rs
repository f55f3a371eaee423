//! Dual-stack Services on a dual-stack cluster (two nodes, flannel host-gw
//! in both families), in both modes:
//! - a Service with an IPv4 and an IPv6 ClusterIP is reached over each
//!   family, from a pod and from a node process, by TCP (in eBPF mode
//!   through the socket hooks, which `kpr service list` shows) and UDP, at
//!   backends on the client's node and on the other;
//! - an IPv6-only Service is reached too, and one without endpoints is
//!   refused at once;
//! - the dual-stack Service's node port answers over IPv6 from outside the
//!   cluster, also on a node whose only default route is IPv6;
//! - a connected IPv6 UDP socket is given its backend by the socket hooks
//!   in eBPF mode and sees the VIP as its peer; held on a backend that
//!   leaves, it is never left with it: ended at once in eBPF mode, moved to
//!   the other backend in iptables mode (its stale conntrack entry cleared,
//!   as kube-proxy does in each family);
//! - unconnected IPv6 UDP sockets sending to the VIP (through the socket
//!   hooks in eBPF mode) keep their backend and see the VIP as the source
//!   of replies; when one's backend leaves its next request goes to the
//!   other, while the other's keeps its own;
//! - on an IPv6-only cluster (no IPv4 address or route on nodes and pods),
//!   an IPv6 Service is reached by TCP and UDP from a pod and a node
//!   process, its node port from outside on each node, and one without
//!   endpoints is refused; in eBPF mode neither a ClusterIP-only Service
//!   nor a NodePort one has an ip6tables rule (the maps serve them), nor
//!   are kube-proxy's chains there until a Service with session affinity
//!   needs them (its clients kept on one backend in both modes), and new
//!   connections to it are answered while the agent restarts.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use proxy_common::maps::{ServiceKey6, ServiceValue};

use kpr_tests::{
    client::{Held, Repeating, probe, probe_answer},
    cluster::{Cluster, ClusterNode, pod_ip6, underlay_ip6},
    in_both_modes,
    kpr::{self, Kpr, Mode},
    manifests::{dual_stack_service, web_node_port_service, web_service, write},
    netns::Netns,
    root_or_skip,
    servers::{self, Server},
};

const PROBE: &str = env!("CARGO_BIN_EXE_kpr-probe");
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
/// An IPv6-only Service without endpoints.
const EMPTY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x21);
/// An IPv6-only Service whose one endpoint runs on node 1.
const SIX_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x22);
/// An IPv6-only ClusterIP Service on an IPv6-only cluster.
const LONE_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x23);
/// One with session affinity.
const STICKY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x24);
const NODE_PORT: u16 = 30080;
const ECONNREFUSED: i32 = 111;

/// The dual-stack NodePort Service `web` with `v4` and `v6` endpoints, an
/// IPv6-only Service `six` on web-1, and an IPv6-only Service without endpoints.
fn services(v4: &[(&str, IpAddr)], v6: &[(&str, IpAddr)]) -> String {
    let web = dual_stack_service("web", (VIP4, VIP6), Some(NODE_PORT), v4, v6);
    let six = web_service("six", SIX_VIP6, &[("web-1", pod_ip6(1, 11))]);
    let empty = web_service("empty", EMPTY_VIP6, &[]);
    format!("{web}---\n{six}---\n{empty}")
}

/// The backends and the client addresses they saw, over `tries` TCP
/// requests to `addr` from `ns` (a process in node 0's cgroup).
fn answers(node: &ClusterNode, ns: &Netns, addr: SocketAddr, tries: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut seen = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..tries {
        let answer = probe_answer(Path::new(PROBE), ns, &node.cgroup, "tcp", addr).unwrap();
        let (backend, peer) = answer.split_once(' ').unwrap_or_else(|| panic!("{answer:?}"));
        seen.0.insert(backend.to_string());
        seen.1.insert(peer.to_string());
    }
    seen
}

/// How many connections and sends node `node`'s socket hooks translated
/// (eBPF mode; iptables mode has none).
fn socket_translated(mode: Mode, node: &ClusterNode) -> Option<u64> {
    let stats = (mode == Mode::Ebpf).then(|| kpr::datapath_stats(&node.ns, node.bpf_root()).unwrap())?;
    stats["socket_translated"].as_u64()
}

fn serves_both_families(mode: Mode) {
    root_or_skip!();
    let mut cluster = Cluster::new_dual_stack(2).unwrap();
    cluster.add_pod(0, "client", 100).unwrap();
    cluster.add_pod(0, "web-0", 11).unwrap();
    cluster.add_pod(1, "web-1", 11).unwrap();
    let mut servers: Vec<Server> = Vec::new();
    for (node, pod) in [(0, "web-0"), (1, "web-1")] {
        let ns = &cluster.node(node).pod(pod).ns;
        servers.push(servers::tcp_dual_stack(ns, 8080, pod).unwrap());
        servers.push(servers::udp_dual_stack(ns, 5353, pod).unwrap());
    }
    let pods = [(0, "web-0"), (1, "web-1")];
    let v4: Vec<(&str, IpAddr)> = pods.iter().map(|(n, p)| (*p, cluster.node(*n).pod(p).ip.into())).collect();
    let v6: Vec<(&str, IpAddr)> = pods.iter().map(|(n, p)| (*p, pod_ip6(*n, 11).into())).collect();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "web.yaml", &services(&v4, &v6)).unwrap();
    let source = format!("--source=dir:{}", manifests.display());
    let mut agents: Vec<Kpr> = cluster.start_kpr_everywhere(&[mode.arg().to_string(), source], dir.path()).unwrap();

    let node0 = cluster.node(0);
    let client = &node0.pod("client").ns;
    let both: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();
    for ns in [client, &node0.ns] {
        // The Service over each family, from a pod and from a node process:
        // the backend on the client's node and the one on the other node.
        for vip in [IpAddr::V6(VIP6), IpAddr::V4(VIP4)] {
            let addr = SocketAddr::new(vip, 80);
            let translated = || socket_translated(mode, node0);
            let before = translated();
            let (reached, peers) = answers(node0, ns, addr, 30);
            assert_eq!(reached, both, "TCP to {addr} from {}", ns.name());
            // eBPF mode: the socket hooks gave each connection its backend
            // (over IPv6 too), and getpeername showed the VIP (`answers` checks).
            if let (Some(before), Some(after)) = (before, translated()) {
                assert!(after >= before + 30, "TCP to {addr} through the socket hooks: {before} -> {after}");
            }
            if ns.name() == client.name() {
                // A pod's address is kept (no source NAT inside the cluster).
                let own = if vip.is_ipv6() { pod_ip6(0, 100).to_string() } else { node0.pod("client").ip.to_string() };
                assert_eq!(peers, [own].into(), "TCP to {addr}");
            }
            // UDP: the reply comes from the VIP, as the client addressed it.
            let udp = probe(Path::new(PROBE), ns, &node0.cgroup, "udp", SocketAddr::new(vip, 53)).unwrap();
            assert!(udp.reply.as_deref().is_some_and(|r| both.contains(r)), "UDP to {vip}: {udp:?}");
            assert_eq!(udp.peer, Some(SocketAddr::new(vip, 53).to_string()), "UDP to {vip}: {udp:?}");
        }
    }
    if mode == Mode::Ebpf {
        // Inspection lists the socket hooks' IPv6 frontend with its backends.
        let root = format!("--bpf-root={}", node0.bpf_root().display());
        let list = kpr::command(&node0.ns, &["service", "list", "-o", "json", &root]).unwrap();
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        let web6 = list.as_array().unwrap().iter().find(|s| s["frontend"] == format!("[{VIP6}]:80/TCP"));
        let web6 = web6.unwrap_or_else(|| panic!("no IPv6 frontend in {list:#}"));
        let backends: BTreeSet<&str> =
            web6["backends"].as_array().unwrap().iter().filter_map(|b| b["address"].as_str()).collect();
        let wanted = [pod_ip6(0, 11), pod_ip6(1, 11)].map(|ip| format!("[{ip}]:8080"));
        assert_eq!(backends, wanted.iter().map(String::as_str).collect(), "{web6:#}");
    }
    // An IPv6-only Service, TCP and UDP, its one backend on the other node.
    let six = |port| SocketAddr::new(SIX_VIP6.into(), port);
    assert_eq!(answers(node0, client, six(80), 5).0, ["web-1".to_string()].into());
    assert_eq!(probe_answer(Path::new(PROBE), client, &node0.cgroup, "udp", six(53)).unwrap(), "web-1");
    // An IPv6 Service without endpoints is refused at once, as kube-proxy's REJECT.
    let refused =
        probe(Path::new(PROBE), client, &node0.cgroup, "tcp", SocketAddr::new(EMPTY_VIP6.into(), 80)).unwrap();
    assert_eq!(refused.errno, Some(ECONNREFUSED), "{refused:?}");
    // The node port over IPv6 from outside the cluster, on node 0's address.
    let outside = cluster.outside();
    let node_port = SocketAddr::new(underlay_ip6(0).into(), NODE_PORT);
    let from_outside: BTreeSet<String> = (0..30)
        .map(|_| {
            let answer =
                outside.run(move || kpr_tests::client::tcp_request(node_port, std::time::Duration::from_secs(2)));
            answer.unwrap().unwrap_or_else(|e| panic!("node port {node_port} from outside: {e}"))
        })
        .collect();
    // The Cluster policy: any node's backend. The one on the other node sees
    // the client's address hidden behind node 0's (toward it); node 0's own
    // sees node 0's pod-network address in iptables mode (kube-proxy
    // masquerades it too), the client's own in eBPF mode (as Cilium).
    let reached: BTreeSet<&str> = from_outside.iter().filter_map(|a| a.split_whitespace().next()).collect();
    assert_eq!(reached, ["web-0", "web-1"].into(), "{from_outside:?}");
    let near = if mode == Mode::Ebpf { Cluster::OUTSIDE6 } else { pod_ip6(0, 1) };
    let expected: BTreeSet<String> = [format!("web-0 {near}"), format!("web-1 {}", underlay_ip6(0))].into();
    assert_eq!(from_outside, expected, "source NAT to node 0 for the other node's backend");

    // A connected IPv6 UDP socket: in eBPF mode the socket hooks give it
    // its backend, and it sees the VIP as its peer.
    let dns6 = SocketAddr::new(VIP6.into(), 53);
    let before = socket_translated(mode, node0);
    let connected = probe(Path::new(PROBE), client, &node0.cgroup, "udp-connected", dns6).unwrap();
    assert!(connected.reply.as_deref().is_some_and(|r| both.contains(r)), "{connected:?}");
    assert_eq!(connected.peer, Some(dns6.to_string()), "{connected:?}");
    if let (Some(before), Some(after)) = (before, socket_translated(mode, node0)) {
        assert!(after > before, "connected IPv6 UDP through the socket hooks: {before} -> {after}");
    }

    // A connected UDP client stays on its IPv6 backend until that backend
    // leaves; then it is never left with it, nor with silence: its next
    // request fails at once (eBPF mode ends the socket) or reaches the
    // other backend (iptables mode forgets the conntrack entry).
    let (mut held, first) = Held::start(Path::new(PROBE), client, &node0.cgroup, "udp-held", dns6).unwrap();
    let gone = first.reply.clone().unwrap_or_else(|| panic!("no first answer: {first:?}"));
    assert_eq!(held.ask().unwrap().reply.as_deref(), Some(gone.as_str()), "the flow keeps its backend");
    // Unconnected UDP clients (each request sent to the VIP, as resolvers
    // send), one held on each backend: each keeps its backend and sees the
    // VIP as the source of replies; in eBPF mode the hooks translate.
    let before = socket_translated(mode, node0);
    let mut loose: BTreeMap<String, Held> = BTreeMap::new();
    for _ in 0..40 {
        if loose.len() == 2 {
            break;
        }
        let (sender, first) = Held::start(Path::new(PROBE), client, &node0.cgroup, "udp-sendto-held", dns6).unwrap();
        assert_eq!(first.peer, Some(dns6.to_string()), "an unconnected client's reply: {first:?}");
        loose.entry(first.reply.clone().unwrap_or_else(|| panic!("{first:?}"))).or_insert(sender);
    }
    assert_eq!(loose.keys().cloned().collect::<BTreeSet<_>>(), both, "unconnected clients on both backends");
    for (backend, sender) in &mut loose {
        for _ in 0..3 {
            let again = sender.ask().unwrap();
            assert_eq!(again.reply.as_ref(), Some(backend), "an unconnected client keeps its backend: {again:?}");
        }
    }
    if let (Some(before), Some(after)) = (before, socket_translated(mode, node0)) {
        assert!(after >= before + 8, "unconnected IPv6 UDP through the socket hooks: {before} -> {after}");
    }
    let kept: Vec<_> = v6.iter().copied().filter(|(pod, _)| *pod != gone).collect();
    let syncs = agents[0].log().matches("synced").count();
    write(&manifests, "web.yaml", &services(&v4, &kept)).unwrap();
    agents[0].wait_for_log_count("synced", syncs + 1, std::time::Duration::from_secs(10)).unwrap();
    let next = held.ask().unwrap();
    match (&next.reply, next.errno) {
        (Some(reply), _) => assert!(reply != &gone && both.contains(reply), "after {gone} left: {next:?}"),
        (None, Some(errno)) if mode == Mode::Ebpf => assert!(
            [libc::ECONNABORTED, libc::EDESTADDRREQ].contains(&errno),
            "an error at once, not a timeout: {next:?}"
        ),
        _ => panic!("after {gone} left: {next:?}"),
    }
    // A new client is served by the remaining backend.
    let again = probe(Path::new(PROBE), client, &node0.cgroup, "udp-connected", dns6).unwrap();
    assert!(again.reply.as_deref().is_some_and(|r| r != gone && both.contains(r)), "{again:?}");
    // The unconnected client of the backend that left goes to the other;
    // the other's keeps its own (the set changed, its backend is in it).
    let remaining = both.iter().find(|b| **b != gone).unwrap();
    for (backend, sender) in &mut loose {
        let next = sender.ask().unwrap();
        let wanted = if *backend == gone { remaining } else { backend };
        assert_eq!(next.reply.as_ref(), Some(wanted), "the unconnected client of {backend}, {gone} gone: {next:?}");
        assert_eq!(next.peer, Some(dns6.to_string()), "{next:?}");
    }
}

/// A node whose uplink has only an IPv6 default route: its device is found
/// from that route, so its node ports answer on the device's IPv6 address.
fn node_ports_answer_where_the_only_default_route_is_ipv6(mode: Mode) {
    root_or_skip!();
    let mut cluster = Cluster::new_dual_stack(2).unwrap();
    cluster.add_pod(1, "web-1", 11).unwrap();
    let ns = &cluster.node(1).pod("web-1").ns;
    let _server = servers::tcp_dual_stack(ns, 8080, "web-1").unwrap();
    let node0 = cluster.node(0);
    node0.ns.exec(&["ip", "route", "del", "default"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let v4 = [("web-1", IpAddr::V4(cluster.node(1).pod("web-1").ip))];
    let v6 = [("web-1", IpAddr::V6(pod_ip6(1, 11)))];
    write(&manifests, "web.yaml", &services(&v4, &v6)).unwrap();
    let source = format!("--source=dir:{}", manifests.display());
    let agents = cluster.start_kpr_everywhere(&[mode.arg().to_string(), source], dir.path()).unwrap();
    let found = format!("IPv6 node ports answer on addresses=Only([{}])", underlay_ip6(0));
    assert!(agents[0].log().contains(&found), "node 0's device is its IPv6 uplink:\n{}", agents[0].log());
    let node_port = SocketAddr::new(underlay_ip6(0).into(), NODE_PORT);
    let answer = cluster
        .outside()
        .run(move || kpr_tests::client::tcp_request(node_port, std::time::Duration::from_secs(2)))
        .unwrap()
        .unwrap_or_else(|e| panic!("node port {node_port} from outside: {e}"));
    assert!(answer.starts_with("web-1 "), "{answer}");
}

/// The web pods: (node, name).
const WEB_PODS: [(u8, &str); 2] = [(0, "web-0"), (1, "web-1")];

/// An IPv6-only cluster of two nodes: a client pod on node 0, and the web
/// pods answering TCP on 8080 and UDP on 5353 with their names.
fn ipv6_only_cluster() -> (Cluster, Vec<Server>) {
    let mut cluster = Cluster::new_ipv6_only(2).unwrap();
    cluster.add_pod(0, "client", 100).unwrap();
    let mut servers: Vec<Server> = Vec::new();
    for (node, pod) in WEB_PODS {
        cluster.add_pod(node, pod, 11).unwrap();
        let ns = &cluster.node(node).pod(pod).ns;
        servers.push(servers::tcp_dual_stack(ns, 8080, pod).unwrap());
        servers.push(servers::udp_dual_stack(ns, 5353, pod).unwrap());
    }
    (cluster, servers)
}

fn serves_an_ipv6_only_cluster(mode: Mode) {
    root_or_skip!();
    let (cluster, _servers) = ipv6_only_cluster();
    let endpoints: Vec<(&str, Ipv6Addr)> = WEB_PODS.iter().map(|(n, p)| (*p, pod_ip6(*n, 11))).collect();
    let six = web_node_port_service("six", SIX_VIP6, Some(NODE_PORT), &endpoints);
    let lone = web_service("lone", LONE_VIP6, &endpoints);
    let empty = web_service("empty", EMPTY_VIP6, &[]);
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "six.yaml", &format!("{six}---\n{lone}---\n{empty}")).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display())];
    let mut agents = cluster.start_kpr_everywhere(&args, dir.path()).unwrap();

    let node0 = cluster.node(0);
    let client = &node0.pod("client").ns;
    for ns in [client, &node0.ns] {
        let v4 = ns.output(&["ip", "-4", "addr", "show", "scope", "global"]).unwrap();
        assert!(v4.trim().is_empty(), "{} has no IPv4 address: {v4}", ns.name());
    }
    // The device is found from the IPv6 default route, the only one.
    let found = format!("IPv6 node ports answer on addresses=Only([{}])", underlay_ip6(0));
    assert!(agents[0].log().contains(&found), "node 0's device is its IPv6 uplink:\n{}", agents[0].log());
    let both: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();
    let vip = |port| SocketAddr::new(SIX_VIP6.into(), port);
    for ns in [client, &node0.ns] {
        let before = socket_translated(mode, node0);
        assert_eq!(answers(node0, ns, vip(80), 20).0, both, "TCP to {} from {}", vip(80), ns.name());
        if let (Some(before), Some(after)) = (before, socket_translated(mode, node0)) {
            assert!(after >= before + 20, "TCP through the socket hooks: {before} -> {after}");
        }
        let udp = probe(Path::new(PROBE), ns, &node0.cgroup, "udp", vip(53)).unwrap();
        assert!(udp.reply.as_deref().is_some_and(|r| both.contains(r)), "UDP from {}: {udp:?}", ns.name());
        assert_eq!(udp.peer, Some(vip(53).to_string()), "UDP from {}: {udp:?}", ns.name());
    }
    let refused =
        probe(Path::new(PROBE), client, &node0.cgroup, "tcp", SocketAddr::new(EMPTY_VIP6.into(), 80)).unwrap();
    assert_eq!(refused.errno, Some(ECONNREFUSED), "{refused:?}");
    // The node port from outside, on each node's IPv6 address.
    for node in [0, 1] {
        let node_port = SocketAddr::new(underlay_ip6(node).into(), NODE_PORT);
        let reached: BTreeSet<String> = (0..20)
            .map(|_| {
                let answer = cluster
                    .outside()
                    .run(move || kpr_tests::client::tcp_request(node_port, std::time::Duration::from_secs(2)));
                let answer = answer.unwrap().unwrap_or_else(|e| panic!("node port {node_port} from outside: {e}"));
                answer.split_whitespace().next().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(reached, both, "node port {node_port} from outside");
    }

    // In eBPF mode the maps serve both Services, the node port too: no rule
    // of their own in the nat table, which every new IPv6 connection on
    // the node walks. iptables mode has them all.
    let lone = SocketAddr::new(LONE_VIP6.into(), 80);
    assert_eq!(answers(node0, client, lone, 10).0, both, "TCP to {lone}");
    for (vip, proto) in [(LONE_VIP6, "tcp"), (LONE_VIP6, "udp"), (SIX_VIP6, "tcp")] {
        assert_eq!(nat_rule(node0, vip, proto), mode == Mode::Iptables, "{vip} {proto} rule in {mode:?} mode");
    }
    // Nor are kube-proxy's chains there in eBPF mode while no Service
    // needs them: their conntrack matches would track every IPv6 packet.
    assert_eq!(kube_chains6(node0).is_empty(), mode == Mode::Ebpf, "{:?}", kube_chains6(node0));
    // A Service with session affinity is served by rules in both modes
    // (written for it in eBPF mode), its clients kept on one backend; once
    // it goes, eBPF mode's chains go too.
    let sticky =
        web_service("sticky", STICKY_VIP6, &endpoints).replacen("spec:\n", "spec:\n  sessionAffinity: ClientIP\n", 1);
    let syncs = agents[0].log().matches("synced").count();
    write(&manifests, "sticky.yaml", &sticky).unwrap();
    agents[0].wait_for_log_count("synced", syncs + 1, std::time::Duration::from_secs(10)).unwrap();
    let sticky = SocketAddr::new(STICKY_VIP6.into(), 80);
    let (reached, _) = answers(node0, client, sticky, 10);
    assert_eq!(reached.len(), 1, "one backend for every connection to {sticky}: {reached:?}");
    assert!(nat_rule(node0, STICKY_VIP6, "tcp"), "{sticky} has a rule in {mode:?} mode");
    let syncs = agents[0].log().matches("synced").count();
    std::fs::remove_file(manifests.join("sticky.yaml")).unwrap();
    agents[0].wait_for_log_count("synced", syncs + 1, std::time::Duration::from_secs(10)).unwrap();
    assert!(!nat_rule(node0, STICKY_VIP6, "tcp"), "{sticky}'s rule went with it");
    assert_eq!(kube_chains6(node0).is_empty(), mode == Mode::Ebpf, "{:?}", kube_chains6(node0));

    // New connections to it are answered while node 0's agent restarts:
    // in eBPF mode the restarted agent takes the maps' IPv6 frontends over.
    let repeating = Repeating::start(Path::new(PROBE), client, &node0.cgroup, lone).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let first_run = agents[0].log();
    agents[0].stop(libc::SIGTERM).unwrap();
    let restarted = dir.path().join("restarted");
    std::fs::create_dir(&restarted).unwrap();
    agents[0] = node0.start_kpr(&node0.interfaces(), &args, &restarted).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let tally = repeating.finish().unwrap();
    assert!(tally.ok > 20 && tally.failed == 0, "new connections to {lone} across the restart: {tally:?}");
    if mode == Mode::Ebpf {
        let log = agents[0].log();
        assert!(log.contains("took over the IPv6 frontends the maps hold"), "{log}");
    }
    for (i, log) in agents.iter().map(Kpr::log).chain([first_run]).enumerate() {
        assert!(!log.contains(" ERROR "), "node {i} logged an error on an IPv6-only node:\n{log}");
    }
}

/// How many packets node `node`'s per-packet path translated (eBPF mode).
fn packets_translated(mode: Mode, node: &ClusterNode) -> Option<u64> {
    let stats = (mode == Mode::Ebpf).then(|| kpr::datapath_stats(&node.ns, node.bpf_root()).unwrap())?;
    stats["translated"].as_u64()
}

/// The IPv6 VIPs node `node`'s agent marked in its IPv6 service map (eBPF mode).
fn marked_vips(node: &ClusterNode) -> BTreeSet<Ipv6Addr> {
    let pin =
        node.bpf_root().join(format!("kpr/maps-v{}/{}", proxy_common::maps::LAYOUT, proxy_common::maps::SERVICES6));
    let map = aya::maps::MapData::from_pin(&pin).unwrap();
    let services: aya::maps::HashMap<_, ServiceKey6, ServiceValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
    services.keys().filter_map(Result::ok).filter(ServiceKey6::is_vip_marker).map(|k| k.addr.into()).collect()
}

/// The traffic `kpr stats` shows for IPv6 frontend `frontend` on node `node`.
fn traffic6(node: &ClusterNode, frontend: &str) -> serde_json::Value {
    let stats = kpr::stats(&node.ns, node.bpf_root()).unwrap();
    let found = stats["services6"].as_array().and_then(|s| s.iter().find(|t| t["frontend"] == frontend)).cloned();
    found.unwrap_or_else(|| panic!("no {frontend} in {stats:#}"))
}

/// The chains of kube-proxy's names in node `node`'s ip6tables (either backend).
fn kube_chains6(node: &ClusterNode) -> Vec<String> {
    let saved = ["ip6tables-legacy-save", "ip6tables-nft-save"].map(|save| node.ns.output(&[save]).unwrap_or_default());
    saved.iter().flat_map(|s| s.lines()).filter(|l| l.starts_with(":KUBE-")).map(String::from).collect()
}

/// Whether node `node`'s nat table has a KUBE-SERVICES rule for `vip` and `proto`.
fn nat_rule(node: &ClusterNode, vip: Ipv6Addr, proto: &str) -> bool {
    let nat = ["ip6tables-legacy-save", "ip6tables-nft-save"]
        .map(|save| node.ns.output(&[save, "-t", "nat"]).unwrap_or_default())
        .concat();
    nat.lines().any(|l| l.starts_with("-A KUBE-SERVICES ") && l.contains(&format!("-d {vip}/128 -p {proto} ")))
}

/// With the socket hooks off (`--socket-lb=false`), on an IPv6-only
/// cluster: in eBPF mode the per-packet path on the pods' interfaces
/// translates a pod's TCP and UDP to an IPv6 ClusterIP (backends on its
/// node and the other, the pod itself among them: hairpin), with no
/// ip6tables rule for it, refuses one without
/// endpoints at once, tracks the flows (`kpr conntrack list`), counts
/// each frontend's traffic through each backend (`kpr stats`), moves a UDP
/// flow off a backend that leaves (and counts it no more), and translates
/// the backend's ICMPv6 port unreachable back to the VIP; iptables mode
/// does all of it with its rules.
fn serves_ipv6_per_packet(mode: Mode) {
    root_or_skip!();
    let (cluster, servers) = ipv6_only_cluster();
    let endpoints: Vec<(&str, Ipv6Addr)> = WEB_PODS.iter().map(|(n, p)| (*p, pod_ip6(*n, 11))).collect();
    let manifest = |endpoints: &[(&str, Ipv6Addr)]| {
        let lone = web_service("lone", LONE_VIP6, endpoints);
        format!("{lone}---\n{}", web_service("empty", EMPTY_VIP6, &[]))
    };
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "lone.yaml", &manifest(&endpoints)).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display()), "--socket-lb=false".into()];
    let mut agents = cluster.start_kpr_everywhere(&args, dir.path()).unwrap();

    let node0 = cluster.node(0);
    let client = &node0.pod("client").ns;
    let both: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();
    let lone = |port| SocketAddr::new(LONE_VIP6.into(), port);
    let before = packets_translated(mode, node0);
    let (reached, peers) = answers(node0, client, lone(80), 20);
    assert_eq!(reached, both, "TCP to {}", lone(80));
    assert_eq!(peers, [pod_ip6(0, 100).to_string()].into(), "the pod's address is kept");
    let udp = probe(Path::new(PROBE), client, &node0.cgroup, "udp", lone(53)).unwrap();
    assert!(udp.reply.as_deref().is_some_and(|r| both.contains(r)), "UDP: {udp:?}");
    assert_eq!(udp.peer, Some(lone(53).to_string()), "the reply comes from the VIP: {udp:?}");
    if let (Some(before), Some(after)) = (before, packets_translated(mode, node0)) {
        // Each connection's packets, at least the SYN, the ACK and the request.
        assert!(after >= before + 60, "TCP and UDP through the per-packet path: {before} -> {after}");
        assert_eq!(socket_translated(mode, node0), Some(0), "the socket hooks are off");
    }
    if mode == Mode::Ebpf {
        // No netfilter NAT on the node at all (asked before `nat_rule`,
        // which makes the legacy table): looking for rules to remove made
        // no legacy nat table, whose hooks every packet would pass.
        for names in ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"] {
            let tables = node0.ns.output(&["cat", names]).unwrap_or_default();
            assert!(!tables.lines().any(|t| t == "nat"), "{names}: {tables}");
        }
    }
    for proto in ["tcp", "udp"] {
        assert_eq!(nat_rule(node0, LONE_VIP6, proto), mode == Mode::Iptables, "{proto} rule in {mode:?} mode");
    }
    if mode == Mode::Ebpf {
        // Each VIP is marked, so what cannot be translated to it is dropped.
        assert_eq!(marked_vips(node0), [LONE_VIP6, EMPTY_VIP6].into());
        // `kpr stats` counts the frontend's traffic, through each backend.
        let traffic = traffic6(node0, &format!("[{LONE_VIP6}]:80/TCP"));
        assert!(traffic["packets"].as_u64().is_some_and(|p| p >= 60), "{traffic:#}");
        let through: BTreeSet<String> = traffic["backends"].as_object().unwrap().keys().cloned().collect();
        let want: BTreeSet<String> = WEB_PODS.iter().map(|(n, _)| format!("[{}]:8080", pod_ip6(*n, 11))).collect();
        assert_eq!(through, want, "{traffic:#}");
    }
    // Hairpin: a backend reaching its own Service is answered by itself too.
    let web0 = &node0.pod("web-0").ns;
    assert_eq!(answers(node0, web0, lone(80), 20).0, both, "web-0 to its own Service");
    let empty = SocketAddr::new(EMPTY_VIP6.into(), 80);
    let refused = probe(Path::new(PROBE), client, &node0.cgroup, "tcp", empty).unwrap();
    assert_eq!(refused.errno, Some(ECONNREFUSED), "{refused:?}");
    let refused =
        probe(Path::new(PROBE), client, &node0.cgroup, "udp-connected", SocketAddr::new(EMPTY_VIP6.into(), 53));
    assert_eq!(refused.unwrap().errno, Some(ECONNREFUSED), "ICMPv6 port unreachable for UDP");

    // A connected UDP client keeps its backend until that backend leaves,
    // then reaches the other.
    let (mut held, first) = Held::start(Path::new(PROBE), client, &node0.cgroup, "udp-held", lone(53)).unwrap();
    let gone = first.reply.clone().unwrap_or_else(|| panic!("no first answer: {first:?}"));
    assert_eq!(held.ask().unwrap().reply.as_deref(), Some(gone.as_str()), "the flow keeps its backend");
    if mode == Mode::Ebpf {
        // Inspection lists the per-packet IPv6 flows.
        let root = format!("--bpf-root={}", node0.bpf_root().display());
        let list = kpr::command(&node0.ns, &["conntrack", "list", "-o", "json", &root]).unwrap();
        let flows: serde_json::Value = serde_json::from_str(&list).unwrap();
        let udp_flow =
            flows.as_array().unwrap().iter().find(|f| {
                f["path"] == "packet" && f["protocol"] == "UDP" && f["frontend"] == format!("[{LONE_VIP6}]:53")
            });
        let udp_flow = udp_flow.unwrap_or_else(|| panic!("no IPv6 UDP flow in {flows:#}"));
        assert!(udp_flow["backend"].as_str().is_some_and(|b| b.ends_with("]:5353")), "{udp_flow:#}");
        assert_eq!(udp_flow["reply_tracked"], true, "{udp_flow:#}");
    }
    let kept: Vec<_> = endpoints.iter().copied().filter(|(pod, _)| *pod != gone).collect();
    let left = endpoints.iter().find(|(pod, _)| *pod == gone).map(|(_, ip)| format!("[{ip}]:5353")).unwrap();
    let udp_counted = |node| traffic6(node, &format!("[{LONE_VIP6}]:53/UDP"))["backends"].get(&left).is_some();
    if mode == Mode::Ebpf {
        assert!(udp_counted(node0), "the UDP flow's backend {left} is counted");
    }
    let syncs = agents[0].log().matches("synced").count();
    write(&manifests, "lone.yaml", &manifest(&kept)).unwrap();
    agents[0].wait_for_log_count("synced", syncs + 1, std::time::Duration::from_secs(10)).unwrap();
    let next = held.ask().unwrap();
    assert!(next.reply.as_deref().is_some_and(|r| r != gone && both.contains(r)), "after {gone} left: {next:?}");
    if mode == Mode::Ebpf {
        assert!(!udp_counted(node0), "the backend that left, {left}, is counted no more");
    }
    // With no server left, the backend's ICMPv6 port unreachable reaches
    // the client as an error on its socket: its quote shows the VIP the
    // client sent to (translated back in eBPF mode), not the backend.
    if mode == Mode::Ebpf {
        // A VIP whose Service is gone is no longer marked.
        let syncs = agents[0].log().matches("synced").count();
        let lone_alone = web_service("lone", LONE_VIP6, &kept);
        write(&manifests, "lone.yaml", &lone_alone).unwrap();
        agents[0].wait_for_log_count("synced", syncs + 1, std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(marked_vips(node0), [LONE_VIP6].into());
    }
    drop(servers);
    let unreachable = probe(Path::new(PROBE), client, &node0.cgroup, "udp-connected", lone(53)).unwrap();
    assert_eq!(unreachable.errno, Some(ECONNREFUSED), "the backend's port unreachable: {unreachable:?}");
    for (i, log) in agents.iter().map(Kpr::log).enumerate() {
        assert!(!log.contains(" ERROR "), "node {i} logged an error:\n{log}");
    }
}

/// A TCP connection to an IPv6 ClusterIP that ip6tables rules translated
/// before kpr started (kube-proxy's way: `KUBE-SERVICES` from PREROUTING
/// and OUTPUT) answers on the same socket once kpr serves, on the
/// per-packet path in eBPF mode (the node's conntrack goes on translating it).
fn an_ipv6_connection_the_rules_translated_before_kpr_lives_on(mode: Mode) {
    root_or_skip!();
    let (cluster, _servers) = ipv6_only_cluster();
    let node0 = cluster.node(0);
    let to_web0 = format!("[{}]:8080", pod_ip6(0, 11));
    let nat = |rule: &str| {
        let args: Vec<&str> = ["ip6tables", "-w", "-t", "nat"].into_iter().chain(rule.split(' ')).collect();
        node0.ns.exec(&args).unwrap();
    };
    nat("-N KUBE-SERVICES");
    nat("-A PREROUTING -j KUBE-SERVICES");
    nat("-A OUTPUT -j KUBE-SERVICES");
    nat(&format!("-A KUBE-SERVICES -d {LONE_VIP6}/128 -p tcp --dport 80 -j DNAT --to-destination {to_web0}"));
    let client = &node0.pod("client").ns;
    let lone = SocketAddr::new(LONE_VIP6.into(), 80);
    let (mut held, first) = Held::start(Path::new(PROBE), client, &node0.cgroup, "tcp-held", lone).unwrap();
    // Answers name the backend and the client address it saw.
    let from_web0 = |reply: &Option<String>| reply.as_deref().is_some_and(|r| r.starts_with("web-0 "));
    assert!(from_web0(&first.reply), "the rules serve before kpr starts: {first:?}");

    let endpoints: Vec<(&str, Ipv6Addr)> = WEB_PODS.iter().map(|(n, p)| (*p, pod_ip6(*n, 11))).collect();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "lone.yaml", &web_service("lone", LONE_VIP6, &endpoints)).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display()), "--socket-lb=false".into()];
    let agents = cluster.start_kpr_everywhere(&args, dir.path()).unwrap();
    let both: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();
    assert_eq!(answers(node0, client, lone, 20).0, both, "kpr serves new connections");
    let log = agents[0].log();
    let again = held.ask().unwrap();
    assert!(from_web0(&again.reply), "the connection lives on: {again:?}\n{log}");
    if mode == Mode::Ebpf {
        let adopted = |l: &&str| l.contains("go on through the node's conntrack") && l.contains("family=\"IPv6\"");
        assert!(log.lines().any(|l| adopted(&l)), "{log}");
        // Its rules went; a rule of kpr's keeps conntrack on while the flow lives.
        let nat = node0.ns.output(&["ip6tables-save", "-t", "nat"]).unwrap();
        assert!(!nat.contains("KUBE-SERVICES") && nat.contains("keeps conntrack on"), "{nat}");
    }
}

in_both_modes!(
    serves_both_families,
    serves_ipv6_per_packet,
    an_ipv6_connection_the_rules_translated_before_kpr_lives_on,
    node_ports_answer_where_the_only_default_route_is_ipv6,
    serves_an_ipv6_only_cluster
);
