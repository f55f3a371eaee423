//! End to end on a virtual node: pods in network namespaces on a bridge,
//! real TCP and UDP servers, the real `kpr` binary attached to the pod
//! interfaces, and a client pod sending real traffic to ClusterIPs.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use kpr_tests::{
    client::{request_on, tcp_request, udp_request},
    kpr::{self, Kpr, Mode},
    manifests::{web_service, write},
    node::VirtualNode,
    root_or_skip,
    servers::{self, Server},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const TIMEOUT: Duration = Duration::from_secs(3);

const PODS: [(&str, Ipv4Addr); 4] = [
    ("web-a", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-b", Ipv4Addr::new(10, 244, 0, 12)),
    ("web-c", Ipv4Addr::new(10, 244, 0, 13)),
    ("client", Ipv4Addr::new(10, 244, 0, 100)),
];

struct Cluster {
    kpr: Kpr,
    dir: tempfile::TempDir,
    _servers: Vec<Server>,
    node: VirtualNode,
}

impl Cluster {
    /// The node, servers on web-a/b/c, the `web` Service over all three,
    /// the `empty` Service with none, and kpr running in `mode`.
    fn start(mode: Mode) -> Self {
        let node = VirtualNode::new(&PODS).expect("virtual node");
        let mut servers = Vec::new();
        for (name, _) in &PODS[..3] {
            let ns = &node.pod(name).ns;
            servers.push(servers::tcp(ns, 8080, name).unwrap());
            servers.push(servers::udp(ns, 5353, name).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.yaml", &web_service("web", WEB_VIP, &PODS[..3])).unwrap();
        write(dir.path(), "empty.yaml", &web_service("empty", EMPTY_VIP, &[])).unwrap();
        let log = dir.path().join("kpr.log.txt");
        let kpr = Kpr::start(&node, mode, dir.path(), &log).expect("kpr starts");
        Self { kpr, dir, _servers: servers, node }
    }

    /// Runs `f` in the client pod.
    fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.node.pod("client").ns.run(f).unwrap()
    }
}

fn web(port: u16) -> SocketAddr {
    SocketAddr::from((WEB_VIP, port))
}

kpr_tests::in_both_modes!(
    clusterip_reaches_every_pod_over_tcp_and_udp,
    removing_an_endpoint_stops_new_connections_within_a_second,
    a_service_without_endpoints_is_refused_at_once,
    invalid_objects_are_reported_and_skipped,
);

fn clusterip_reaches_every_pod_over_tcp_and_udp(mode: Mode) {
    root_or_skip!();
    let c = Cluster::start(mode);

    let tcp: BTreeMap<String, u32> = c.in_client(|| {
        let mut hits = BTreeMap::new();
        for i in 0..300 {
            let who = tcp_request(web(80), TIMEOUT).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            *hits.entry(who).or_default() += 1;
        }
        hits
    });
    assert_eq!(tcp.values().sum::<u32>(), 300, "{tcp:?}");
    for (pod, _) in &PODS[..3] {
        // Uniform choice gives 100 each; 50 is six standard deviations away.
        assert!(tcp.get(*pod).copied().unwrap_or(0) >= 50, "300 connections over 3 pods: {tcp:?}");
    }

    let udp = c.in_client(|| (0..30).map(|_| udp_request(web(53), TIMEOUT).expect("UDP reply")).collect::<Vec<_>>());
    for (who, from) in &udp {
        assert_eq!(*from, web(53), "the client sees the VIP as the reply source");
        assert!(PODS[..3].iter().any(|(p, _)| p == who), "reply from {who}");
    }
    let seen: std::collections::BTreeSet<_> = udp.iter().map(|(w, _)| w.clone()).collect();
    assert_eq!(seen.len(), 3, "30 UDP requests reach all pods: {seen:?}");

    // A TCP connection's peer is the VIP too.
    let peer = c.in_client(|| TcpStream::connect_timeout(&web(80), TIMEOUT).unwrap().peer_addr().unwrap());
    assert_eq!(peer, web(80));
}

fn removing_an_endpoint_stops_new_connections_within_a_second(mode: Mode) {
    root_or_skip!();
    let mut c = Cluster::start(mode);

    // Long-lived connections, some to each pod.
    let mut established: Vec<(TcpStream, String)> = c.in_client(|| {
        (0..30)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&web(80), TIMEOUT).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                let who = request_on(&mut s).unwrap();
                (s, who)
            })
            .collect()
    });
    assert!(established.iter().any(|(_, w)| w == "web-c"), "some connection reached web-c");

    write(c.dir.path(), "web.yaml", &web_service("web", WEB_VIP, &PODS[..2])).unwrap();
    // The agent logs a sync once the dataplane holds the change.
    c.kpr.wait_for_log_count("synced", 2, Duration::from_secs(1)).unwrap();

    let after: Vec<String> = c.in_client(|| (0..100).map(|_| tcp_request(web(80), TIMEOUT).unwrap()).collect());
    assert!(!after.iter().any(|w| w == "web-c"), "a removed endpoint got new connections: {after:?}");
    assert!(after.iter().any(|w| w == "web-a") && after.iter().any(|w| w == "web-b"));

    for (stream, who) in established.iter_mut().filter(|(_, w)| w != "web-c") {
        assert_eq!(&request_on(stream).expect("established connection keeps working"), who);
    }
    // UDP follows too: the next datagrams avoid web-c.
    let udp: Vec<String> = c.in_client(|| (0..20).map(|_| udp_request(web(53), TIMEOUT).unwrap().0).collect());
    assert!(!udp.iter().any(|w| w == "web-c"), "{udp:?}");
}

fn a_service_without_endpoints_is_refused_at_once(mode: Mode) {
    root_or_skip!();
    let c = Cluster::start(mode);
    // The Service beside it answers: the agent serves what it was given.
    assert!(c.in_client(|| tcp_request(web(80), TIMEOUT)).unwrap().starts_with("web-"));
    let (tcp, udp) = c.in_client(|| {
        let tcp = TcpStream::connect_timeout(&SocketAddr::from((EMPTY_VIP, 80)), Duration::from_secs(5));
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        socket.connect((EMPTY_VIP, 53)).unwrap();
        socket.send(b"anyone?").unwrap();
        let udp = socket.recv(&mut [0u8; 64]);
        (tcp.map(|_| ()), udp.map(|_| ()))
    });
    assert_eq!(tcp.unwrap_err().kind(), ErrorKind::ConnectionRefused, "TCP gets a reset, not a timeout");
    assert_eq!(udp.unwrap_err().kind(), ErrorKind::ConnectionRefused, "UDP gets port unreachable, not a timeout");
}

fn invalid_objects_are_reported_and_skipped(mode: Mode) {
    root_or_skip!();
    let mut c = Cluster::start(mode);
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: quic-svc}\nspec:\n  clusterIP: 10.96.0.30\n  ports: [{port: 9, protocol: QUIC}]\n---\n\
               apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: \"not a list\"}\n";
    write(c.dir.path(), "bad.yaml", bad).unwrap();
    c.kpr.wait_for_log("Service broken", TIMEOUT).unwrap();
    let log = c.kpr.log();
    assert!(log.contains("bad.yaml"), "names the file:\n{log}");
    assert!(log.contains("Service default/quic-svc") && log.contains("protocol QUIC is not supported"), "{log}");
    // Everything else keeps working.
    let who = c.in_client(|| tcp_request(web(80), TIMEOUT).unwrap());
    assert!(who.starts_with("web-"));
}

#[test]
fn ctrl_c_leaves_the_programs_serving_until_cleanup() {
    root_or_skip!();
    let mut c = Cluster::start(Mode::Ebpf);
    let attached = |c: &Cluster| -> usize {
        let ifaces = c.node.interfaces();
        c.node
            .ns
            .run(move || {
                ifaces.iter().map(|i| SchedClassifier::query_tcx(i, TcAttachType::Ingress).unwrap().1.len()).sum()
            })
            .unwrap()
    };
    assert_eq!(attached(&c), PODS.len(), "one program per pod interface while running");
    let status = c.kpr.interrupt().unwrap();
    assert!(status.success(), "clean exit on SIGINT: {status}\n{}", c.kpr.log());
    // As kube-proxy's rules do, the datapath outlives the agent.
    assert_eq!(attached(&c), PODS.len(), "still attached after Ctrl-C");
    assert!(c.kpr.log().contains("programs stay attached"), "{}", c.kpr.log());
    assert!(c.in_client(|| tcp_request(web(80), TIMEOUT).unwrap()).starts_with("web-"), "still served");
    let root = format!("--bpf-root={}", c.node.bpf_root().display());
    kpr::command(&c.node.ns, &["cleanup", &root]).unwrap();
    assert_eq!(attached(&c), 0, "nothing left attached after `kpr cleanup`");
}
