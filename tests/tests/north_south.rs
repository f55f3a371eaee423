//! Traffic from outside the cluster: NodePort, externalIPs and load
//! balancer IPs on a two-node cluster, with a client on the underlay's
//! router (outside every node), kpr running on both nodes; over IPv4, and
//! over IPv6 on an IPv6-only cluster. Backends answer
//! with their name and the client address they saw, so the tests tell
//! which node served and whether the client's address was kept.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use kpr_tests::{
    client::{
        connected_udp_error, http_get, path_mtu_after_datagram, probe, probe_answer, request_on, tcp_connect_from_port,
        tcp_request, tcp_request_from_port, udp_request,
    },
    cluster::{Cluster, ClusterNode, Shape, pod_ip, pod_ip6, underlay_ip6},
    kpr::{self, Kpr, Mode},
    manifests::write,
    netns::Netns,
    root_or_skip,
    servers::{self, Server},
    wait,
};

const PROBE: &str = env!("CARGO_BIN_EXE_kpr-probe");
const ANSWER: Duration = Duration::from_secs(2);
/// How long a request that must be dropped is given.
const DROPPED: Duration = Duration::from_millis(800);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const LB_OPEN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const LB_FENCED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 8);
/// A load balancer IP open to node 1's pods only.
const LB_NODE1_PODS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const ECONNREFUSED: i32 = 111;

/// A Service of `kind` whose endpoints are `(ip, node)`, with the extra
/// spec fields given, ports 80/TCP -> 8080 (node port `np`) and 53/UDP ->
/// 5353 (`np` - 1000); of the family of `vip`.
fn service<A: std::fmt::Display>(
    name: &str,
    vip: &str,
    np: u16,
    spec: &str,
    status: &str,
    endpoints: &[(A, &str)],
) -> String {
    let eps: String =
        endpoints.iter().map(|(ip, node)| format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}\n")).collect();
    let family = if vip.contains(':') { "IPv6" } else { "IPv4" };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: \"{vip}\"
  ipFamilies: [{family}]
{spec}  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {np}, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 5353, nodePort: {}, protocol: UDP}}
{status}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: {family}
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
{eps}",
        np - 1000
    )
}

fn ask(ns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    ns.run(move || tcp_request(addr, ANSWER)).unwrap()
}

/// A TCP request from a process of `node` (a pod's or the node's own, in
/// the node's cgroup as every process there is).
fn ask_on(node: &ClusterNode, ns: &Netns, addr: SocketAddr) -> String {
    probe_answer(std::path::Path::new(PROBE), ns, &node.cgroup, "tcp", addr).unwrap()
}

/// Whether a `kind` request (see `kpr-probe`) from a process of `node` goes
/// unanswered: timed out, neither refused nor failed at once.
fn dropped_on(node: &ClusterNode, ns: &Netns, kind: &str, addr: SocketAddr) -> bool {
    const EAGAIN: i32 = 11;
    let p = probe(std::path::Path::new(PROBE), ns, &node.cgroup, kind, addr).unwrap();
    p.reply.is_none() && matches!(p.errno, None | Some(EAGAIN))
}

fn dropped(ns: &Netns, addr: SocketAddr) -> bool {
    ns.run(move || tcp_request(addr, DROPPED)).unwrap().is_err()
}

fn health(ns: &Netns, addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = ns.run(move || http_get(addr, "/healthz", ANSWER)).unwrap().unwrap();
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}")))
}

fn serves_traffic_from_outside(mode: Mode) {
    // Node 0 forwards in native XDP, node 1 in generic XDP.
    from_outside(mode, ["native", "generic"]);
}

/// eBPF mode with XDP off: the TC programs on the devices serve alone.
#[test]
fn tc_programs_alone_serve_traffic_from_outside() {
    from_outside(Mode::Ebpf, ["off", "off"]);
}

/// Where the datapath on `node` took traffic from outside (`kpr stats`):
/// its path on eth0, and how many requests XDP forwarded there.
fn outside_path(node: &ClusterNode) -> (String, u64) {
    let stats = kpr::stats(&node.ns, node.bpf_root()).unwrap();
    let eth0 = stats["devices"].as_array().unwrap().iter().find(|d| d["device"] == "eth0").cloned();
    let eth0 = eth0.unwrap_or_else(|| panic!("{}: no eth0 in {stats:#}", node.name));
    let path = eth0["path"].as_str().unwrap_or_default().to_string();
    let count = |what: &str| eth0["hooks"][&path][what].as_u64().unwrap_or(0);
    // XDP counts only what it translates and sends on itself, both ways.
    let (requests, replies) = (count("translated"), count("reverse_translated"));
    assert_eq!(count("forwarded"), requests + replies, "{}: {stats:#}", node.name);
    assert_eq!(stats["datapath"]["xdp_forwarded"].as_u64(), Some(requests), "{}: {stats:#}", node.name);
    (path, requests)
}

/// What both families' tests ask of node ports from outside (`outside_ip`,
/// the outside client's address), `nodes` the two nodes' addresses of the
/// family, web-0 on node 0 and web-1 on node 1:
/// - Cluster policy (node port 30080 to web-1, 30085 to web-0): either
///   node forwards to a backend on the other, the client source-NATed to
///   the node it came in by (its address toward the backend), so replies go
///   back that way; UDP (29080) with the reply from the node port; a pod
///   and the node itself reach it too;
/// - Local policy (30081 to both, 30082 to web-1): each node serves with
///   its own backend, the client's address kept; with no backend on node 0,
///   dropped there and served on node 1; pods and the node's own processes
///   are served by every endpoint, as with kube-proxy.
fn both_policies(cluster: &Cluster, nodes: [std::net::IpAddr; 2], outside_ip: std::net::IpAddr) {
    let outside = cluster.outside();
    let [node0, node1] = nodes;
    let at = |addr: std::net::IpAddr, port: u16| SocketAddr::new(addr, port);
    assert_eq!(ask(outside, at(node0, 30080)).unwrap(), format!("web-1 {node0}"));
    assert!(ask(outside, at(node1, 30080)).unwrap().starts_with("web-1 "));
    let (reply, from) = outside.run(move || udp_request(at(node0, 29080), ANSWER)).unwrap().unwrap();
    assert_eq!((reply.as_str(), from), ("web-1", at(node0, 29080)));
    // Twice: the first flow may find no neighbour entry yet, and take the stack.
    for _ in 0..2 {
        assert_eq!(ask(outside, at(node1, 30085)).unwrap(), format!("web-0 {node1}"));
    }
    let on0 = cluster.node(0);
    let client = &on0.pod("client").ns;
    assert!(ask_on(on0, client, at(node1, 30080)).starts_with("web-1 "));
    assert!(ask_on(on0, &on0.ns, at(node0, 30080)).starts_with("web-1 "));

    assert_eq!(ask(outside, at(node0, 30081)).unwrap(), format!("web-0 {outside_ip}"));
    assert_eq!(ask(outside, at(node1, 30081)).unwrap(), format!("web-1 {outside_ip}"));
    assert!(dropped(outside, at(node0, 30082)), "a Local policy Service with no endpoint here is dropped");
    assert_eq!(ask(outside, at(node1, 30082)).unwrap(), format!("web-1 {outside_ip}"));
    assert!(ask_on(on0, client, at(node0, 30082)).starts_with("web-1 "), "a pod reaching a Local node port");
    assert!(ask_on(on0, &on0.ns, at(node0, 30082)).starts_with("web-1 "), "the node reaching a Local node port");
}

fn from_outside(mode: Mode, xdp: [&str; 2]) {
    root_or_skip!();
    let mut cluster = Cluster::new(Shape::HostGw, 2).unwrap();
    cluster.add_pod(0, "web-0", 11).unwrap();
    cluster.add_pod(1, "web-1", 11).unwrap();
    cluster.add_pod(0, "client", 100).unwrap();
    cluster.add_pod(1, "client", 100).unwrap();
    // A backend with no server: its ports are closed.
    cluster.add_pod(1, "mute", 12).unwrap();
    cluster.add_pod(1, "web-1b", 13).unwrap();
    let mut servers: Vec<Server> = Vec::new();
    for (node, pod) in [(0, "web-0"), (1, "web-1"), (1, "web-1b")] {
        let ns = &cluster.node(node).pod(pod).ns;
        servers.push(servers::tcp_peer(ns, 8080, pod).unwrap());
        servers.push(servers::udp(ns, 5353, pod).unwrap());
    }
    let web0 = (cluster.node(0).pod("web-0").ip, "node0");
    let web1 = (cluster.node(1).pod("web-1").ip, "node1");
    let mute = (cluster.node(1).pod("mute").ip, "node1");
    let web1b = (cluster.node(1).pod("web-1b").ip, "node1");
    for addr in [EXTERNAL_IP, LB_OPEN, LB_FENCED] {
        cluster.route_from_outside(addr, 0).unwrap();
    }
    // The outside's network and the pods' (source ranges apply to pods too).
    let open_ranges = format!("{}/24, 10.244.0.0/16", Cluster::OUTSIDE);
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let files = [
        // externalTrafficPolicy Cluster, the only backend on node 1.
        ("cluster.yaml", service("cluster", "10.96.0.20", 30080, "  type: NodePort\n", "", &[web1])),
        // Local, a backend on each node.
        (
            "local.yaml",
            service(
                "local",
                "10.96.0.21",
                30081,
                "  type: NodePort\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32081\n",
                "",
                &[web0, web1],
            ),
        ),
        // Local, a backend on node 1 only.
        (
            "lonely.yaml",
            service(
                "lonely",
                "10.96.0.22",
                30082,
                "  type: NodePort\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32082\n",
                "",
                &[web1],
            ),
        ),
        // Cluster policy, the only backend on node 0.
        ("cluster0.yaml", service("cluster0", "10.96.0.25", 30085, "  type: NodePort\n", "", &[web0])),
        // Cluster policy, the only backend on node 1, which answers nothing.
        ("mute.yaml", service("mute", "10.96.0.27", 30087, "  type: NodePort\n", "", &[mute])),
        // Cluster policy, two backends on node 1.
        ("pair.yaml", service("pair", "10.96.0.28", 30088, "  type: NodePort\n", "", &[web1, web1b])),
        // An external IP and a load balancer IP open to the outside's range.
        (
            "open.yaml",
            service(
                "open",
                "10.96.0.23",
                30083,
                &format!(
                    "  type: LoadBalancer\n  externalIPs: [{EXTERNAL_IP}]\n  loadBalancerSourceRanges: [{open_ranges}]\n"
                ),
                &format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_OPEN}}}]}}}}\n"),
                &[web1],
            ),
        ),
        // A load balancer IP for the pod network only.
        (
            "fenced.yaml",
            service(
                "fenced",
                "10.96.0.24",
                30084,
                "  type: LoadBalancer\n  loadBalancerSourceRanges: [10.244.0.0/16]\n",
                &format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_FENCED}}}]}}}}\n"),
                &[web1],
            ),
        ),
        // One open to node 1's pods only.
        (
            "node1-pods.yaml",
            service(
                "node1-pods",
                "10.96.0.26",
                30086,
                "  type: LoadBalancer\n  loadBalancerSourceRanges: [10.244.1.0/24]\n",
                &format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_NODE1_PODS}}}]}}}}\n"),
                &[web1],
            ),
        ),
    ];
    for (file, text) in &files {
        write(&manifests, file, text).unwrap();
    }
    let source = format!("--source=dir:{}", manifests.display());
    let agents: Vec<Kpr> = cluster
        .nodes
        .iter()
        .map(|node| {
            let mut args = vec![mode.arg().to_string(), source.clone(), "--cluster-cidr=10.244.0.0/16".to_string()];
            if mode == Mode::Ebpf {
                args.push(format!("--xdp={}", xdp[node.index as usize]));
            }
            node.start_kpr(&[], &args, dir.path()).unwrap()
        })
        .collect();

    let outside = cluster.outside();
    let (node0, node1) = (cluster.node(0).address(), cluster.node(1).address());
    let at = |addr: Ipv4Addr, port: u16| SocketAddr::from((addr, port));
    both_policies(&cluster, [node0.into(), node1.into()], Cluster::OUTSIDE.into());
    // Node 1's own backend: kube-proxy's rules masquerade that request too
    // (to node 1's address on the pod network); eBPF mode keeps the
    // client's address, as Cilium does, for the replies leave through this
    // node anyway.
    let seen = if mode == Mode::Ebpf { Cluster::OUTSIDE.to_string() } else { pod_ip(1, 1).to_string() };
    assert_eq!(ask(outside, at(node1, 30080)).unwrap(), format!("web-1 {seen}"));
    // A backend on the other node with its port closed: its ICMP port
    // unreachable, about the source-NATed request, reaches the client.
    let refusal = outside.run(move || connected_udp_error(at(node0, 29087))).unwrap();
    assert_eq!(refusal, Some(ECONNREFUSED), "the backend's refusal reached the client");
    // One client port taken again and again (each connection reset, so the
    // next has it at once): each new flow is source-NATed for the backend
    // it gets, whichever of the two on the other node that is.
    let pair = std::net::SocketAddrV4::new(node0, 30088);
    let answers: Vec<String> = outside
        .run(move || (0..16).map(|_| tcp_request_from_port(45000, pair, ANSWER)).collect::<std::io::Result<_>>())
        .unwrap()
        .unwrap();
    let reached: std::collections::BTreeSet<&str> = answers.iter().filter_map(|a| a.split(' ').next()).collect();
    assert_eq!(reached, ["web-1", "web-1b"].into(), "{answers:?}");
    let on0 = cluster.node(0);
    let client = &on0.pod("client").ns;
    let outside_ip = Cluster::OUTSIDE;
    // A connection of node 0's own to web-1 (the `cluster` Service's one
    // backend, on node 1) holds its port: a client from outside on the same
    // port, reaching web-1 through node 0's node port, is source-NATed to
    // another one (reusing it would make the two one flow at web-1), and
    // both live.
    let web1_direct = std::net::SocketAddrV4::new(cluster.node(1).pod("web-1").ip, 8080);
    let mut held = on0.ns.run(move || tcp_connect_from_port(45001, web1_direct, ANSWER)).unwrap().unwrap();
    let cluster_port = std::net::SocketAddrV4::new(node0, 30080);
    let answer = outside.run(move || tcp_request_from_port(45001, cluster_port, ANSWER)).unwrap();
    assert_eq!(answer.unwrap(), format!("web-1 {node0}"), "the client from outside on the node's port");
    assert_eq!(request_on(&mut held).unwrap(), format!("web-1 {node0}"), "the node's own connection");
    drop(held);
    // Load balancers ask each node whether it has endpoints.
    let (status, body) = health(outside, at(node0, 32081));
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "default", "name": "local"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    let (status, body) = health(outside, at(node0, 32082));
    assert_eq!((status, &body["localEndpoints"]), (503, &serde_json::json!(0)));
    assert_eq!(health(outside, at(node1, 32082)).0, 200);

    // An external IP and a load balancer IP, from outside and from a pod.
    assert!(ask(outside, at(EXTERNAL_IP, 80)).unwrap().starts_with("web-1 "));
    assert!(ask(outside, at(LB_OPEN, 80)).unwrap().starts_with("web-1 "));
    assert!(ask_on(on0, client, at(EXTERNAL_IP, 80)).starts_with("web-1 "));
    assert!(ask_on(on0, client, at(LB_OPEN, 80)).starts_with("web-1 "));
    // Source ranges: the outside is not in the fenced Service's range.
    assert!(dropped(outside, at(LB_FENCED, 80)), "a client outside loadBalancerSourceRanges is dropped");
    // They hold for pods and the node's own processes too (in eBPF mode the
    // socket hooks choose before the source is known, and the check waits
    // for the packets): the pod network may reach the fenced Service, the
    // node's address may not, and a pod outside a range is dropped, over
    // TCP and UDP.
    assert!(ask_on(on0, client, at(LB_FENCED, 80)).starts_with("web-1 "), "a pod inside the range");
    assert!(dropped_on(on0, &on0.ns, "tcp", at(LB_FENCED, 80)), "the node, outside the range");
    for (kind, port) in [("tcp", 80), ("udp", 53)] {
        assert!(dropped_on(on0, client, kind, at(LB_NODE1_PODS, port)), "a pod outside the range, {kind}");
    }
    let on1 = cluster.node(1);
    assert!(ask_on(on1, &on1.pod("client").ns, at(LB_NODE1_PODS, 80)).starts_with("web-1 "), "a pod inside it");

    // The backend on node 0 leaves the Local Service: node 0 drops, and says so.
    write(
        &manifests,
        "local.yaml",
        &files[1].1.replace(&format!("- {{addresses: [\"{}\"], nodeName: node0}}\n", web0.0), ""),
    )
    .unwrap();
    wait::until(
        "node 0 reporting no local endpoint",
        Duration::from_secs(5),
        || health(outside, at(node0, 32081)).0,
        |s| *s == 503,
    )
    .unwrap();
    assert!(dropped(outside, at(node0, 30081)));
    assert_eq!(ask(outside, at(node1, 30081)).unwrap(), format!("web-1 {outside_ip}"));
    if mode == Mode::Ebpf {
        // Each node took traffic from outside by the path asked for, and
        // forwarded requests to the other node in XDP unless it was off.
        for (node, asked) in cluster.nodes.iter().zip(xdp) {
            let (path, forwarded) = outside_path(node);
            let expected = if asked == "off" { "tc".to_string() } else { format!("xdp_{asked}") };
            assert_eq!(path, expected, "{}", node.name);
            assert_eq!(forwarded > 0, asked != "off", "{}: {forwarded} requests forwarded in XDP", node.name);
        }
    }
    drop(agents);

    // `kpr cleanup` leaves no rule of either mode behind, in either
    // iptables backend. eBPF mode wrote none: it source-NATs in its
    // programs, so no netfilter conntrack ran on the nodes (any nat rule
    // would have run it for every packet through them).
    let saved = |node: &ClusterNode| -> String {
        ["iptables-nft-save", "iptables-legacy-save"].map(|save| node.ns.output(&[save]).unwrap_or_default()).concat()
    };
    for node in &cluster.nodes {
        let before = saved(node);
        if mode == Mode::Ebpf {
            assert!(!before.contains("-A "), "{}: eBPF mode wrote rules:\n{before}", node.name);
            assert_eq!(host_conntrack_entries(node), 0, "{}: netfilter tracked connections", node.name);
        } else {
            assert!(before.contains("KUBE-NODEPORTS"), "{}: the agent left its rules in place:\n{before}", node.name);
        }
        kpr::command(&node.ns, &["cleanup", &format!("--bpf-root={}", node.bpf_root().display())]).unwrap();
        let after = saved(node);
        assert!(!after.contains("KUBE-") && !after.contains("kpr"), "{} after cleanup:\n{after}", node.name);
    }
}

/// A two-node cluster of `shape` running kpr in a mode, with one backend
/// on node 1 (`web-1`, ports 8080/TCP and 5353/UDP) behind node ports
/// 30080/TCP and 29080/UDP (`externalTrafficPolicy: Cluster`).
struct RemoteBackend {
    _agents: Vec<Kpr>,
    _servers: [Server; 2],
    _dir: tempfile::TempDir,
    backend: Ipv4Addr,
    cluster: Cluster,
}

impl RemoteBackend {
    fn on(shape: Shape, mode: Mode) -> Self {
        let mut cluster = Cluster::new(shape, 2).unwrap();
        cluster.add_pod(1, "web-1", 11).unwrap();
        let web1 = cluster.node(1).pod("web-1");
        let backend = web1.ip;
        let servers =
            [servers::tcp_peer(&web1.ns, 8080, "web-1").unwrap(), servers::udp(&web1.ns, 5353, "web-1").unwrap()];
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        let text = service("cluster", "10.96.0.20", 30080, "  type: NodePort\n", "", &[(backend, "node1")]);
        write(&manifests, "cluster.yaml", &text).unwrap();
        let args = [
            mode.arg().to_string(),
            format!("--source=dir:{}", manifests.display()),
            "--cluster-cidr=10.244.0.0/16".into(),
        ];
        let agents = cluster.nodes.iter().map(|node| node.start_kpr(&[], &args, dir.path()).unwrap()).collect();
        Self { _agents: agents, _servers: servers, _dir: dir, backend, cluster }
    }
}

/// Node 0 reaches node 1's pods through a VXLAN overlay of MTU 1450 (flannel
/// vxlan), while the outside reaches node 0 at 1500. A datagram from
/// outside that fits the one but not the other, "don't fragment" set, to a
/// node port whose backend is on node 1: the client is told
/// "fragmentation needed" with the overlay's MTU, about the datagram it
/// sent, as the node's own forwarding tells it (no answer would leave its
/// path MTU discovery waiting forever); what fits is answered.
fn tells_outside_clients_what_fits_the_path(mode: Mode) {
    root_or_skip!();
    let setup = RemoteBackend::on(Shape::Vxlan, mode);
    let cluster = &setup.cluster;

    let target = SocketAddr::from((cluster.node(0).address(), 29080));
    let outside = cluster.outside();
    // Answered first: the flow is set up before the datagram that does not fit.
    assert_eq!(outside.run(move || udp_request(target, ANSWER)).unwrap().unwrap().0, "web-1");
    // 1472 bytes of payload: an IPv4 packet of 1500.
    let mtu = outside.run(move || path_mtu_after_datagram(target, 1472)).unwrap().unwrap();
    assert_eq!(mtu, 1450, "the client learned the overlay's MTU");
    assert_eq!(outside.run(move || udp_request(target, ANSWER)).unwrap().unwrap().0, "web-1");
}

/// Node 0's own UDP sockets, each connected to the backend from one of
/// `count` ports spread over the source NAT's range (a quarter of its
/// ports: the NAT hands out odd ones alone).
fn node_sockets_to(node: &ClusterNode, backend: SocketAddr, count: u16) -> Vec<std::net::UdpSocket> {
    let from = node.address();
    let ports = (0..count).map(move |i| 32769 + i * (32768 / count));
    node.ns
        .run(move || {
            ports
                .map(|port| {
                    let socket = std::net::UdpSocket::bind((from, port))?;
                    socket.connect(backend)?;
                    socket.set_nonblocking(true)?;
                    Ok(socket)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .unwrap()
        .unwrap()
}

/// Raises this process's open-file limit to `files`, within its hard limit.
fn allow_open_files(files: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a plain struct for the call to fill and read back.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_cur.max(files.min(limit.rlim_max));
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// Requests from outside under the Cluster policy, from client ports below
/// the source NAT's range (so each flow gets a random port of it), while
/// the node holds connected sockets of its own to the same backend on a
/// quarter of the ports it hands out: no flow is given one of their ports,
/// so every one of those sockets still gets the backend's answers. (With
/// the ports unchecked, 40 flows would take one of them with odds of
/// 99.999%, and its answers would go to that flow's client.)
fn leaves_the_nodes_own_connections_their_ports(mode: Mode) {
    root_or_skip!();
    const HELD: u16 = 4096;
    allow_open_files(HELD as u64 + 1024);
    let setup = RemoteBackend::on(Shape::HostGw, mode);
    let (cluster, web1) = (&setup.cluster, setup.backend);
    let held = node_sockets_to(cluster.node(0), SocketAddr::from((web1, 5353)), HELD);

    let target = SocketAddr::from((cluster.node(0).address(), 29080));
    let answers = cluster
        .outside()
        .run(move || {
            (20_000..20_040u16)
                .map(|port| {
                    let socket = std::net::UdpSocket::bind((Cluster::OUTSIDE, port))?;
                    socket.set_read_timeout(Some(ANSWER))?;
                    socket.send_to(b"hello", target)?;
                    let mut buf = [0u8; 64];
                    let n = socket.recv(&mut buf)?;
                    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
                })
                .collect::<std::io::Result<Vec<String>>>()
        })
        .unwrap()
        .unwrap();
    assert!(answers.iter().all(|a| a == "web-1"), "{answers:?}");
    // In rounds the backend's receive buffer holds.
    let mut unanswered: Vec<u16> = Vec::new();
    for round in held.chunks(64) {
        for socket in round {
            socket.send(b"mine?").unwrap();
        }
        let deadline = std::time::Instant::now() + ANSWER;
        for socket in round {
            let mut buf = [0u8; 64];
            loop {
                match socket.recv(&mut buf) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => {
                        unanswered.push(socket.local_addr().unwrap().port());
                        break;
                    }
                }
            }
        }
    }
    assert!(
        unanswered.is_empty(),
        "the node's sockets on ports {unanswered:?} lost their answers to a flow from outside"
    );
}

/// A node process's new connection to the backend, made after a flow from
/// outside to the same backend was source-NATed: node 0's ports for
/// connections narrowed to 45002 and 45003, the client outside connecting
/// from 45002. Linux connects from the even one (odd ones are for `bind`
/// to port 0), so the flow from outside must not have been given it, as
/// it would be by keeping the client's port: the two would be one flow at
/// the backend, the node's connection would get no answer and the
/// client's would get the node's. Both connections live.
fn gives_the_nodes_new_connections_ports_no_flow_from_outside_holds(mode: Mode) {
    root_or_skip!();
    let setup = RemoteBackend::on(Shape::HostGw, mode);
    let (cluster, web1) = (&setup.cluster, setup.backend);
    let node0 = cluster.node(0);
    node0.ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=45002 45003"]).unwrap();
    let node_address = node0.address();
    let node_port = std::net::SocketAddrV4::new(node_address, 30080);
    let mut from_outside =
        cluster.outside().run(move || tcp_connect_from_port(45002, node_port, ANSWER)).unwrap().unwrap();
    assert_eq!(request_on(&mut from_outside).unwrap(), format!("web-1 {node_address}"), "the client outside");

    let backend = SocketAddr::from((web1, 8080));
    let (port, answer) = node0
        .ns
        .run(move || {
            let mut own = std::net::TcpStream::connect_timeout(&backend, ANSWER)?;
            own.set_read_timeout(Some(ANSWER))?;
            Ok::<_, std::io::Error>((own.local_addr()?.port(), request_on(&mut own)))
        })
        .unwrap()
        .unwrap();
    assert_eq!(port, 45002, "the node connects from its even port");
    assert_eq!(answer.unwrap(), format!("web-1 {node_address}"), "the node's own connection");
    assert_eq!(request_on(&mut from_outside).unwrap(), format!("web-1 {node_address}"), "the client outside, after");
}

/// A node process's UDP socket bound to a port a flow from outside to the
/// same backend was source-NATed to (the client outside on 45003, an odd
/// port, which the NAT keeps): the socket gets the backend's answers, and
/// the client outside still gets its own, from another port.
fn gives_the_nodes_new_udp_sockets_their_ports(mode: Mode) {
    root_or_skip!();
    let setup = RemoteBackend::on(Shape::HostGw, mode);
    let (cluster, node0) = (&setup.cluster, setup.cluster.node(0));
    let backend = SocketAddr::from((setup.backend, 5353));
    let node_port = SocketAddr::from((node0.address(), 29080));
    node_socket_keeps_its_port(cluster.outside(), Cluster::OUTSIDE.into(), node_port, node0, backend);
    if mode == Mode::Ebpf {
        let stats = kpr::datapath_stats(&node0.ns, node0.bpf_root()).unwrap();
        assert_eq!(stats["nat_yielded_to_node"], 1, "{stats:#}");
    }
}

/// The body of [`gives_the_nodes_new_udp_sockets_their_ports`], for either
/// family: a client `outside` at `outside_ip` asks `node_port` (on `node`,
/// the Cluster policy, `backend` on another node) from port 45003; then
/// a socket of `node`'s own on that port asks `backend` twice; then the
/// client asks again. Each is answered by `web-1`.
fn node_socket_keeps_its_port(
    outside: &Netns,
    outside_ip: IpAddr,
    node_port: SocketAddr,
    node: &ClusterNode,
    backend: SocketAddr,
) {
    const PORT: u16 = 45003;
    let ask = |socket: &std::net::UdpSocket| {
        socket.set_read_timeout(Some(ANSWER))?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf)?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let from_outside = move || {
        let socket = std::net::UdpSocket::bind((outside_ip, PORT))?;
        socket.send_to(b"hello", node_port)?;
        ask(&socket)
    };
    assert_eq!(outside.run(from_outside).unwrap().unwrap(), "web-1", "the client outside");
    let node_ip = node_port.ip();
    let answers = node
        .ns
        .run(move || {
            let socket = std::net::UdpSocket::bind((node_ip, PORT))?;
            socket.connect(backend)?;
            (0..2).map(|_| socket.send(b"mine?").and_then(|_| ask(&socket))).collect::<std::io::Result<Vec<_>>>()
        })
        .unwrap();
    assert_eq!(answers.unwrap(), ["web-1", "web-1"], "the node's own socket");
    assert_eq!(outside.run(from_outside).unwrap().unwrap(), "web-1", "the client outside, after");
}

/// How many connections netfilter tracks in `node`'s namespace (none
/// where conntrack never ran there, or is not loaded at all).
fn host_conntrack_entries(node: &ClusterNode) -> u64 {
    let count = node.ns.output(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).unwrap_or_default();
    count.trim().parse().unwrap_or(0)
}

kpr_tests::in_both_modes!(
    serves_traffic_from_outside,
    serves_ipv6_traffic_from_outside,
    tells_outside_clients_what_fits_the_path,
    leaves_the_nodes_own_connections_their_ports,
    gives_the_nodes_new_connections_ports_no_flow_from_outside_holds,
    gives_the_nodes_new_udp_sockets_their_ports,
);

/// A device whose driver has no native XDP (a bridge) falls back to generic
/// XDP, one that has it (a veth) takes it, and both say so in the log,
/// `kpr stats` and the `kpr_device_path` metric.
#[test]
fn xdp_falls_back_to_generic_where_the_driver_has_no_native_xdp() {
    root_or_skip!();
    let node = kpr_tests::node::VirtualNode::new(&[("web", Ipv4Addr::new(10, 244, 0, 11))]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let web = [(Ipv4Addr::new(10, 244, 0, 11), "node")];
    write(&manifests, "web.yaml", &service("web", "10.96.0.30", 30090, "  type: NodePort\n", "", &web)).unwrap();
    let args = [
        Mode::Ebpf.arg().to_string(),
        format!("--source=dir:{}", manifests.display()),
        "--devices=cbr0,uplink".into(),
        "--metrics-bind-address=127.0.0.1:10249".into(),
    ];
    let log = dir.path().join("kpr.log");
    let mut agent = Kpr::spawn_on(&node.ns, node.bpf_root(), &node.cgroup, &["veth*".into()], &args, &log).unwrap();
    agent.wait_for_log("synced", Duration::from_secs(20)).unwrap();

    let log = agent.log();
    let refused = log.lines().find(|l| l.contains("XDP refused; trying the next path") && l.contains("device=cbr0"));
    assert!(refused.is_some_and(|l| l.contains("xdp_native")), "{log}");
    let stats = kpr::stats(&node.ns, node.bpf_root()).unwrap();
    let path_of = |device: &str| {
        let found = stats["devices"].as_array().unwrap().iter().find(|d| d["device"] == device).cloned();
        found.and_then(|d| d["path"].as_str().map(str::to_string))
    };
    assert_eq!(path_of("cbr0").as_deref(), Some("xdp_generic"), "{stats:#}");
    assert_eq!(path_of("uplink").as_deref(), Some("xdp_native"), "{stats:#}");
    let metrics = SocketAddr::from(([127, 0, 0, 1], 10249));
    let (_, text) = node.ns.run(move || http_get(metrics, "/metrics", ANSWER)).unwrap().unwrap();
    for line in [
        "kpr_device_path{device=\"cbr0\",path=\"xdp_generic\"} 1",
        "kpr_device_path{device=\"uplink\",path=\"xdp_native\"} 1",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
}

/// An external IP and a load balancer IP of the IPv6 Service `open6`.
const EXTERNAL_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0xe, 0, 0, 0, 0, 0, 7);
const LB_OPEN6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0xe, 0, 0, 0, 0, 0, 8);

/// Whether node `node`'s ip6tables nat table has a rule for port `port`.
fn ip6tables_rule_for(node: &ClusterNode, port: u16) -> bool {
    let nat = ["ip6tables-legacy-save", "ip6tables-nft-save"]
        .map(|save| node.ns.output(&[save, "-t", "nat"]).unwrap_or_default())
        .concat();
    nat.lines().any(|l| l.starts_with("-A ") && l.contains(&format!("--dport {port} ")))
}

/// The same from outside over IPv6, on an IPv6-only cluster: a node port
/// under each traffic policy (UDP too), an external IP and a load balancer
/// IP, from outside, from a pod and from the node; a node port kept while
/// its Service port is renumbered. In eBPF mode the maps serve them all
/// (no ip6tables rule for them), XDP forwards to the other node unless it
/// is off, and `kpr service list` shows each way in.
fn serves_ipv6_from_outside(mode: Mode, xdp: [&str; 2]) {
    root_or_skip!();
    let mut cluster = Cluster::new_ipv6_only(2).unwrap();
    let mut servers: Vec<Server> = Vec::new();
    for (node, pod) in [(0, "web-0"), (1, "web-1")] {
        cluster.add_pod(node, pod, 11).unwrap();
        let ns = &cluster.node(node).pod(pod).ns;
        servers.push(servers::tcp_dual_stack(ns, 8080, pod).unwrap());
        servers.push(servers::udp_dual_stack(ns, 5353, pod).unwrap());
    }
    cluster.add_pod(0, "client", 100).unwrap();
    // A backend with no server: its ports are closed.
    cluster.add_pod(1, "mute", 12).unwrap();
    let web0 = (pod_ip6(0, 11), "node0");
    let web1 = (pod_ip6(1, 11), "node1");
    let mute = (pod_ip6(1, 12), "node1");
    for addr in [EXTERNAL_IP6, LB_OPEN6] {
        cluster.route_from_outside(addr, 0).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let files = [
        ("cluster.yaml", service("cluster", "fd00:96::20", 30080, "  type: NodePort\n", "", &[web1])),
        ("cluster0.yaml", service("cluster0", "fd00:96::25", 30085, "  type: NodePort\n", "", &[web0])),
        ("mute.yaml", service("mute", "fd00:96::27", 30087, "  type: NodePort\n", "", &[mute])),
        (
            "local.yaml",
            service(
                "local",
                "fd00:96::21",
                30081,
                "  type: NodePort\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32081\n",
                "",
                &[web0, web1],
            ),
        ),
        (
            "lonely.yaml",
            service("lonely", "fd00:96::22", 30082, "  type: NodePort\n  externalTrafficPolicy: Local\n", "", &[web1]),
        ),
        (
            "open.yaml",
            service(
                "open",
                "fd00:96::23",
                30083,
                &format!("  type: LoadBalancer\n  externalIPs: [\"{EXTERNAL_IP6}\"]\n"),
                &format!("status: {{loadBalancer: {{ingress: [{{ip: \"{LB_OPEN6}\"}}]}}}}\n"),
                &[web1],
            ),
        ),
    ];
    for (file, text) in &files {
        write(&manifests, file, text).unwrap();
    }
    let source = format!("--source=dir:{}", manifests.display());
    let mut agents: Vec<Kpr> = cluster
        .nodes
        .iter()
        .map(|node| {
            let mut args = vec![mode.arg().to_string(), source.clone(), "--cluster-cidr=fd00:244::/32".to_string()];
            if mode == Mode::Ebpf {
                args.push(format!("--xdp={}", xdp[node.index as usize]));
            }
            node.start_kpr(&[], &args, dir.path()).unwrap()
        })
        .collect();

    let outside = cluster.outside();
    let (node0, node1) = (underlay_ip6(0), underlay_ip6(1));
    let at = |addr: std::net::Ipv6Addr, port: u16| SocketAddr::from((addr, port));
    both_policies(&cluster, [node0.into(), node1.into()], Cluster::OUTSIDE6.into());
    let on0 = cluster.node(0);
    let client = &on0.pod("client").ns;
    let (status, body) = health(outside, at(node0, 32081));
    assert_eq!((status, &body["localEndpoints"]), (200, &serde_json::json!(1)), "{body}");
    // A backend on the other node with its port closed: its ICMPv6 port
    // unreachable, about the source-NATed request, reaches the client.
    let refusal = outside.run(move || connected_udp_error(at(node0, 29087))).unwrap();
    assert_eq!(refusal, Some(ECONNREFUSED), "the backend's refusal reached the client");
    // A node socket on the port of a flow from outside to the same backend.
    node_socket_keeps_its_port(outside, Cluster::OUTSIDE6.into(), at(node0, 29080), on0, at(web1.0, 5353));

    // An external IP and a load balancer IP, from outside and from a pod.
    for addr in [EXTERNAL_IP6, LB_OPEN6] {
        assert!(ask(outside, at(addr, 80)).unwrap().starts_with("web-1 "), "{addr} from outside");
        assert!(ask_on(on0, client, at(addr, 80)).starts_with("web-1 "), "{addr} from a pod");
    }
    // A Service port renumbered with its node port kept: one sync removes
    // the old frontend and adds the new one, and the node port, passed from
    // one to the other, answers all along.
    let syncs: Vec<usize> = agents.iter().map(|a| a.log().matches("synced").count()).collect();
    write(&manifests, files[0].0, &files[0].1.replace("port: 80,", "port: 81,")).unwrap();
    for (agent, syncs) in agents.iter_mut().zip(syncs) {
        agent.wait_for_log_count("synced", syncs + 1, Duration::from_secs(10)).unwrap();
    }
    assert_eq!(ask(outside, at(node0, 30080)).unwrap(), format!("web-1 {node0}"), "the node port after the change");

    for node in &cluster.nodes {
        // eBPF mode serves them all from its maps; iptables mode by its rules.
        for port in [30080, 30081] {
            assert_eq!(ip6tables_rule_for(node, port), mode == Mode::Iptables, "{}: {port}", node.name);
        }
        if mode == Mode::Ebpf {
            // It source-NATs in its programs: netfilter tracked nothing.
            assert_eq!(host_conntrack_entries(node), 0, "{}: netfilter tracked connections", node.name);
        }
    }
    if mode == Mode::Ebpf {
        for (node, asked) in cluster.nodes.iter().zip(xdp) {
            let (path, forwarded) = outside_path(node);
            let expected = if asked == "off" { "tc".to_string() } else { format!("xdp_{asked}") };
            assert_eq!(path, expected, "{}", node.name);
            assert_eq!(forwarded > 0, asked != "off", "{}: {forwarded} requests forwarded in XDP", node.name);
        }
        // Each way in is listed with its policy.
        let root = format!("--bpf-root={}", on0.bpf_root().display());
        let list = kpr::command(&on0.ns, &["service", "list", "-o", "json", &root]).unwrap();
        let entries: serde_json::Value = serde_json::from_str(&list).unwrap();
        let policy = |frontend: String| {
            let entry = entries.as_array().unwrap().iter().find(|e| e["frontend"] == frontend).cloned();
            entry.unwrap_or_else(|| panic!("no {frontend} in {entries:#}"))["policy"].clone()
        };
        assert_eq!(policy(format!("[{node0}]:30080/TCP")), "Cluster");
        assert_eq!(policy(format!("[{node0}]:30081/TCP")), "Local");
        assert_eq!(policy(format!("[{EXTERNAL_IP6}]:80/TCP")), "Cluster");
    }
    for (i, log) in agents.iter().map(Kpr::log).enumerate() {
        assert!(!log.contains(" ERROR "), "node {i} logged an error:\n{log}");
    }
    drop(agents);
    // `kpr cleanup` leaves no rule of either family behind.
    for node in &cluster.nodes {
        kpr::command(&node.ns, &["cleanup", &format!("--bpf-root={}", node.bpf_root().display())]).unwrap();
        let after = ["ip6tables-nft-save", "ip6tables-legacy-save"]
            .map(|save| node.ns.output(&[save]).unwrap_or_default())
            .concat();
        assert!(!after.contains("KUBE-") && !after.contains("kpr"), "{} after cleanup:\n{after}", node.name);
    }
    drop(servers);
}

fn serves_ipv6_traffic_from_outside(mode: Mode) {
    serves_ipv6_from_outside(mode, ["native", "generic"]);
}

/// eBPF mode with XDP off: the TC programs on the devices serve IPv6 alone.
#[test]
fn tc_programs_alone_serve_ipv6_from_outside() {
    serves_ipv6_from_outside(Mode::Ebpf, ["off", "off"]);
}
