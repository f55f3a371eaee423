//! kube-proxy's Service semantics, as clients see them, in both modes:
//! Services and EndpointSlices written as a user (or the EndpointSlice
//! controller) writes them, and which backends answer. Pods ask through
//! the per-packet path (a thread in the pod's namespace) and through the
//! socket hooks (a process in the node's cgroup) alike.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use kpr_tests::{
    client::{Repeating, every_10ms, probe, probe_answer, tcp_request},
    cluster::{Cluster, Shape, WEB_PAIR},
    kpr::{Kpr, Mode},
    manifests::write,
    node::VirtualNode,
    root_or_skip,
    servers::{self, Server},
};

const PROBE: &str = env!("CARGO_BIN_EXE_kpr-probe");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const TIMEOUT: Duration = Duration::from_secs(2);

/// One endpoint as a slice lists it: its pod, address and conditions.
struct Ep<'a> {
    pod: &'a str,
    ip: Ipv4Addr,
    conditions: &'a str,
}

const READY: &str = "{ready: true, serving: true, terminating: false}";
const STARTING: &str = "{ready: false, serving: false, terminating: false}";
const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";

/// Service `web` at [`VIP`]:80 -> 8080 and its one slice.
fn web(endpoints: &[Ep<'_>]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|e| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
                e.ip, e.conditions, e.pod
            )
        })
        .collect();
    let eps = if eps.is_empty() { "[]\n".to_string() } else { format!("\n{eps}") };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  \
         ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\n\
         kind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: {eps}"
    )
}

/// Asks `addr` from `client` until the set of pods answering is `want`
/// (every one of them seen, no other) or 5 s pass; returns what answered.
fn answering(node: &VirtualNode, client: &str, addr: SocketAddr, want: &[&str]) -> BTreeSet<String> {
    let ns = node.pod(client).ns.name().to_string();
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    kpr_tests::netns::run_in(&ns, move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut recent = BTreeSet::new();
        while Instant::now() < deadline {
            // Twenty answers in a row make one look.
            recent = (0..20).filter_map(|_| tcp_request(addr, TIMEOUT).ok()).collect();
            if recent == want {
                break;
            }
        }
        recent
    })
    .unwrap()
}

/// A single-replica Deployment rolled, step by step as the EndpointSlice
/// controller shows it: the old pod ready; the new pod created, not ready;
/// the old pod terminating but still serving while the new one is not
/// ready (kube-proxy then sends new connections to the terminating pod
/// rather than refusing them); the new pod ready; the old one gone. A
/// client connecting every 10 ms over both paths is never refused.
fn rolling_update_never_refuses(mode: Mode) {
    root_or_skip!();
    let pods = [
        ("old", Ipv4Addr::new(10, 244, 0, 11)),
        ("new", Ipv4Addr::new(10, 244, 0, 12)),
        ("client", Ipv4Addr::new(10, 244, 0, 100)),
        // The socket hooks' client has a pod of its own: a connection it
        // makes straight to a backend from the same address and port as a
        // per-packet flow to the VIP would be the same packets on the wire.
        ("socket-client", Ipv4Addr::new(10, 244, 0, 101)),
    ];
    let node = VirtualNode::new(&pods).unwrap();
    let _servers: Vec<Server> =
        pods[..2].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 8080, n).unwrap()).collect();
    let (old, new) = (pods[0].1, pods[1].1);
    let steps: [(&str, Vec<Ep<'_>>, &[&str]); 5] = [
        ("old ready", vec![Ep { pod: "old", ip: old, conditions: READY }], &["old"]),
        (
            "new pod created",
            vec![Ep { pod: "old", ip: old, conditions: READY }, Ep { pod: "new", ip: new, conditions: STARTING }],
            &["old"],
        ),
        (
            "old terminating, new not ready",
            vec![Ep { pod: "old", ip: old, conditions: TERMINATING }, Ep { pod: "new", ip: new, conditions: STARTING }],
            &["old"],
        ),
        (
            "new ready",
            vec![Ep { pod: "old", ip: old, conditions: TERMINATING }, Ep { pod: "new", ip: new, conditions: READY }],
            &["new"],
        ),
        ("old gone", vec![Ep { pod: "new", ip: new, conditions: READY }], &["new"]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "web.yaml", &web(&steps[0].1)).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display())];
    let mut kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let addr = SocketAddr::from((VIP, 80));
    let stop = Arc::new(AtomicBool::new(false));
    let packets = every_10ms(&node.pod("client").ns, addr, TIMEOUT, stop.clone());
    let sockets =
        Repeating::start(std::path::Path::new(PROBE), &node.pod("socket-client").ns, &node.cgroup, addr).unwrap();
    for (i, (step, endpoints, want)) in steps.iter().enumerate() {
        if i > 0 {
            // Programmed once a sync follows the write (and the moment
            // after it, for the rename's own event).
            let synced = kpr.log().matches(" synced ").count();
            write(&manifests, "web.yaml", &web(endpoints)).unwrap();
            kpr.wait_for_log_count(" synced ", synced + 1, Duration::from_secs(5)).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
        let seen = answering(&node, "client", addr, want);
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(seen, want, "{step}: who answers\n{}", kpr.log());
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    for (path, tally) in [("per-packet path", packets.join().unwrap()), ("socket hooks", sockets.finish().unwrap())] {
        assert!(tally.ok > 100, "{path}: only {} answered ({tally:?})", tally.ok);
        assert_eq!(tally.failed, 0, "{path}: no connection refused or lost at any step: {tally:?}\n{}", kpr.log());
    }
    if mode == Mode::Ebpf {
        // eBPF mode writes no rule: a nat rule would turn on conntrack for
        // every packet through the node.
        let rules = ["iptables-nft-save", "iptables-legacy-save"].map(|s| node.ns.output(&[s]).unwrap());
        assert!(!rules.concat().contains("-A "), "eBPF mode wrote rules:\n{}", rules.concat());
        // Nor the socket path's egress fence: it would run for every packet
        // the node's sockets send.
        let egress = node.cgroup.programs_at(kpr_tests::cgroup::INET_EGRESS).unwrap();
        assert_eq!(egress, 0, "no frontend needs the socket path's egress fence");
    }
}

/// A Service `name` at `vip`:80 -> 8080 with `spec` lines, its endpoints
/// `(ip, node)`.
fn service_on_nodes(name: &str, vip: &str, spec: &str, endpoints: &[(Ipv4Addr, &str)]) -> String {
    let eps: String =
        endpoints.iter().map(|(ip, node)| format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n\
         {spec}  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}"
    )
}

/// `internalTrafficPolicy: Local`, on two nodes with one endpoint each: a
/// pod reaches only its own node's endpoint, over both paths; a Service
/// whose only endpoint is on the other node drops its traffic (the client
/// times out, as with kube-proxy's DROP, rather than being refused); a
/// Cluster policy Service beside them spreads over both nodes.
fn internal_local_policy_keeps_pods_on_their_node(mode: Mode) {
    root_or_skip!();
    let cluster = Cluster::with_pods(Shape::HostGw, 2, &WEB_PAIR).unwrap();
    let _servers: Vec<Server> = [(0, "web-0"), (1, "web-1")]
        .into_iter()
        .map(|(node, pod)| servers::tcp(&cluster.node(node).pod(pod).ns, 8080, pod).unwrap())
        .collect();
    let (node0, node1) = (cluster.node(0), cluster.node(1));
    let (web0, web1) = ((node0.pod("web-0").ip, node0.name.as_str()), (node1.pod("web-1").ip, node1.name.as_str()));
    let local = "  internalTrafficPolicy: Local\n";
    let manifests = [
        service_on_nodes("near", "10.96.0.61", local, &[web0, web1]),
        service_on_nodes("far", "10.96.0.62", local, &[web1]),
        service_on_nodes("any", "10.96.0.63", "", &[web0, web1]),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("manifests");
    std::fs::create_dir(&source).unwrap();
    write(&source, "services.yaml", &manifests).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", source.display())];
    // On the pods' interfaces too: the per-packet path serves the test's own threads.
    let start = |n: u8| cluster.node(n).start_kpr(&cluster.node(n).interfaces(), &args, dir.path()).unwrap();
    let _agents: Vec<Kpr> = (0..2u8).map(start).collect();

    let client = node0.pod("client");
    let addr = |last: u8| SocketAddr::from((Ipv4Addr::new(10, 96, 0, last), 80));
    let per_packet = |last: u8| -> BTreeSet<String> {
        let target = addr(last);
        client.ns.run(move || (0..20).filter_map(|_| tcp_request(target, TIMEOUT).ok()).collect()).unwrap()
    };
    let sockets = |last: u8| -> BTreeSet<String> {
        (0..10)
            .map(|_| probe_answer(std::path::Path::new(PROBE), &client.ns, &node0.cgroup, "tcp", addr(last)).unwrap())
            .collect()
    };
    let only_here: BTreeSet<String> = ["web-0".to_string()].into();
    assert_eq!(per_packet(61), only_here, "per-packet path: this node's endpoint only");
    assert_eq!(sockets(61), only_here, "socket hooks: this node's endpoint only");
    let both: BTreeSet<String> = ["web-0".to_string(), "web-1".to_string()].into();
    assert_eq!(per_packet(63), both, "a Cluster policy Service spreads over both nodes");

    // No endpoint here: dropped, not refused, on both paths.
    let far = addr(62);
    let err = client.ns.run(move || tcp_request(far, Duration::from_millis(800))).unwrap().unwrap_err();
    assert!(
        matches!(err.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock),
        "per-packet path: dropped, not refused: {err:?}"
    );
    let p = probe(std::path::Path::new(PROBE), &client.ns, &node0.cgroup, "tcp", far).unwrap();
    const EAGAIN: i32 = 11;
    assert!(p.reply.is_none() && matches!(p.errno, None | Some(EAGAIN)), "socket hooks: dropped, not refused: {p:?}");
    if mode == Mode::Ebpf {
        // The drop is the egress fence's, attached for `far` alone.
        assert_eq!(node0.cgroup.programs_at(kpr_tests::cgroup::INET_EGRESS).unwrap(), 1, "the socket path's fence");
    }
}

/// Two Services over the same three pods with `sessionAffinity: ClientIP`:
/// `sticky` (60 s) and `brief` (1 s).
fn affine(sticky: &[(&str, Ipv4Addr)], brief: &[(&str, Ipv4Addr)]) -> String {
    let svc = |name: &str, vip: &str, timeout: u32, eps: &[(&str, Ipv4Addr)]| {
        let eps: String = eps.iter().map(|(_, ip)| format!("- addresses: [\"{ip}\"]\n")).collect();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
             clusterIP: {vip}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: \
             {timeout}}}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}"
        )
    };
    svc("sticky", "10.96.0.64", 60, sticky) + &svc("brief", "10.96.0.65", 1, brief)
}

/// `sessionAffinity: ClientIP`, as kube-proxy's `-m recent` rules behave:
/// a client's connections land on one backend (50 in a row, over the
/// per-packet path from one pod and the socket hooks from another); when
/// its backend leaves, its next connection goes elsewhere and sticks
/// there; once the timeout passes without a connection, the choice is made
/// afresh (seen to change within a few rounds of 3 backends).
fn session_affinity_keeps_a_client_on_its_backend(mode: Mode) {
    root_or_skip!();
    let pods = [
        ("web-a", Ipv4Addr::new(10, 244, 0, 11)),
        ("web-b", Ipv4Addr::new(10, 244, 0, 12)),
        ("web-c", Ipv4Addr::new(10, 244, 0, 13)),
        ("packets", Ipv4Addr::new(10, 244, 0, 100)),
        ("sockets", Ipv4Addr::new(10, 244, 0, 101)),
    ];
    let node = VirtualNode::new(&pods).unwrap();
    let _servers: Vec<Server> =
        pods[..3].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 8080, n).unwrap()).collect();
    let web = &pods[..3];
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "web.yaml", &affine(web, web)).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display())];
    let mut kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let (sticky, brief) = (SocketAddr::from(([10, 96, 0, 64], 80)), SocketAddr::from(([10, 96, 0, 65], 80)));
    // One answer from each client: the pod whose thread asks (per-packet
    // path), and a process of the node's cgroup in the other pod (socket hooks).
    let ask = |client: &str, addr: SocketAddr| -> String {
        if client == "packets" {
            node.pod(client).ns.run(move || tcp_request(addr, TIMEOUT)).unwrap().unwrap()
        } else {
            probe_answer(std::path::Path::new(PROBE), &node.pod(client).ns, &node.cgroup, "tcp", addr).unwrap()
        }
    };
    let clients = ["packets", "sockets"];
    let stuck: Vec<String> = clients
        .iter()
        .map(|client| {
            let seen: BTreeSet<String> = (0..50).map(|_| ask(client, sticky)).collect();
            assert_eq!(seen.len(), 1, "{client}: 50 connections, one backend: {seen:?}\n{}", kpr.log());
            seen.into_iter().next().unwrap()
        })
        .collect();

    // The sticky backends leave: each client moves at once, and sticks again.
    let left: Vec<(&str, Ipv4Addr)> = web.iter().filter(|(n, _)| !stuck.iter().any(|s| s == n)).copied().collect();
    let synced = kpr.log().matches(" synced ").count();
    write(&manifests, "web.yaml", &affine(&left, web)).unwrap();
    kpr.wait_for_log_count(" synced ", synced + 1, Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for (client, gone) in clients.iter().zip(&stuck) {
        let seen: BTreeSet<String> = (0..30).map(|_| ask(client, sticky)).collect();
        assert_eq!(seen.len(), 1, "{client}: sticks to its new backend: {seen:?}");
        assert!(!seen.contains(gone), "{client}: moved off {gone}, which left: {seen:?}");
    }

    // Past the timeout, chosen afresh: three backends, so within eight
    // rounds some other one answers (all the same by chance: 1 in 2,187).
    for client in clients {
        let first = ask(client, brief);
        let changed = (0..8).any(|_| {
            std::thread::sleep(Duration::from_millis(2100));
            ask(client, brief) != first
        });
        assert!(changed, "{client}: after the timeout the choice is made again\n{}", kpr.log());
    }
}

/// SCTP ports: iptables mode writes kube-proxy's rules for them (`-m sctp
/// -p sctp`; this kernel has no SCTP sockets to send traffic with, so the
/// rules are checked as the kernel holds them); eBPF mode refuses the port
/// with a reason in its log and rejection count. Either way the Service's
/// TCP port is served.
fn sctp_ports_are_served_by_iptables_and_refused_with_a_reason_by_ebpf(mode: Mode) {
    root_or_skip!();
    let pods = [("web", Ipv4Addr::new(10, 244, 0, 11)), ("client", Ipv4Addr::new(10, 244, 0, 100))];
    let node = VirtualNode::new(&pods).unwrap();
    let _server = servers::tcp(&node.pod("web").ns, 8080, "web").unwrap();
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: diameter, namespace: default}\nspec:\n  \
                clusterIP: 10.96.0.66\n  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n  \
                - {name: sig, port: 3868, protocol: SCTP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                metadata: {name: diameter-1, namespace: default, labels: {kubernetes.io/service-name: diameter}}\n\
                addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}, {name: sig, port: 3868, protocol: SCTP}]\n\
                endpoints: [{addresses: [10.244.0.11]}]\n";
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "diameter.yaml", yaml).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display())];
    let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let http = SocketAddr::from(([10, 96, 0, 66], 80));
    let answer = node.pod("client").ns.run(move || tcp_request(http, TIMEOUT)).unwrap();
    assert_eq!(answer.unwrap(), "web", "the TCP port is served");
    let log = kpr.log();
    let nat = node.ns.output(&["iptables-nft-save", "-t", "nat"]).unwrap_or_default();
    match mode {
        Mode::Iptables => {
            assert!(!log.contains("SCTP"), "nothing refused:\n{log}");
            let dispatch = "-d 10.96.0.66/32 -p sctp -m comment --comment \"default/diameter:sig cluster IP\" -m sctp --dport 3868";
            assert!(nat.contains(dispatch), "kube-proxy's SCTP dispatch rule:\n{nat}");
            assert!(nat.contains("-p sctp -m comment --comment \"default/diameter:sig\" -m sctp -j DNAT --to-destination 10.244.0.11:3868"), "{nat}");
        }
        Mode::Ebpf => {
            assert!(log.contains("port sig: SCTP is served in iptables mode only"), "refused with a reason:\n{log}");
            assert!(log.contains("rejected=1"), "counted:\n{log}");
        }
    }
}

kpr_tests::in_both_modes!(
    rolling_update_never_refuses,
    internal_local_policy_keeps_pods_on_their_node,
    session_affinity_keeps_a_client_on_its_backend,
    sctp_ports_are_served_by_iptables_and_refused_with_a_reason_by_ebpf
);
