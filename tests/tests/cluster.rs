//! The multi-node suite: three nodes on an underlay, in each CNI shape and
//! both modes, kpr running on every node. Clients on node 0 (a pod and a
//! node process, each a process in the node's cgroup) reach Services whose
//! backends run on other nodes or on a mix of nodes, over TCP and UDP, and
//! see the VIP as their peer; pods created after kpr started are served as
//! clients and as backends.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use kpr_tests::{
    client::{Held, Probe, connected_udp_error, probe, probe_answer, tcp_request, udp_request},
    cluster::{Cluster, ClusterNode, Shape},
    kpr::{self, Kpr, Mode},
    manifests::{web_service, write},
    netns::Netns,
    packet::{Ip, udp_datagram},
    root_or_skip,
    servers::{self, Server},
    wait,
};

const PROBE: &str = env!("CARGO_BIN_EXE_kpr-probe");
/// Backends all on node 1.
const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Backends on every node.
const SPREAD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// One backend, on node 1, that listens on no port: its kernel refuses.
const MUTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const ECONNREFUSED: i32 = 111;
/// One backend, on node 1, echoing large UDP datagrams.
const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// A backend beside the client on node 0, and web-1 on node 1.
const NEAR_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);

fn run(node: &ClusterNode, ns: &Netns, kind: &str, addr: SocketAddr) -> Probe {
    probe(Path::new(PROBE), ns, &node.cgroup, kind, addr).unwrap()
}

fn answer(node: &ClusterNode, ns: &Netns, kind: &str, addr: SocketAddr) -> String {
    probe_answer(Path::new(PROBE), ns, &node.cgroup, kind, addr).unwrap()
}

/// Serves TCP 8080 and UDP 5353 in `ns`, answering `name`.
fn serve(ns: &Netns, name: &str) -> [Server; 2] {
    [servers::tcp(ns, 8080, name).unwrap(), servers::udp(ns, 5353, name).unwrap()]
}

fn serves_services_across_nodes(mode: Mode, shape: Shape) {
    root_or_skip!();
    let mut cluster = Cluster::new(shape, 3).unwrap();
    cluster.add_pod(0, "client", 100).unwrap();
    cluster.add_pod(0, "web-0", 11).unwrap();
    cluster.add_pod(1, "web-1", 11).unwrap();
    cluster.add_pod(2, "web-2", 11).unwrap();
    cluster.add_pod(1, "mute", 13).unwrap();
    let mut servers: Vec<Server> = Vec::new();
    for (node, pod) in [(0, "web-0"), (1, "web-1"), (2, "web-2")] {
        servers.extend(serve(&cluster.node(node).pod(pod).ns, pod));
    }
    let endpoints = |pods: &[(u8, &'static str)]| -> Vec<(&'static str, Ipv4Addr)> {
        pods.iter().map(|(n, p)| (*p, cluster.node(*n).pod(p).ip)).collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "remote.yaml", &web_service("remote", REMOTE_VIP, &endpoints(&[(1, "web-1")]))).unwrap();
    let spread = [(0, "web-0"), (1, "web-1"), (2, "web-2")];
    write(&manifests, "spread.yaml", &web_service("spread", SPREAD_VIP, &endpoints(&spread))).unwrap();
    write(&manifests, "mute.yaml", &web_service("mute", MUTE_VIP, &endpoints(&[(1, "mute")]))).unwrap();

    let source = format!("--source=dir:{}", manifests.display());
    let agents: Vec<Kpr> = cluster.start_kpr_everywhere(&[mode.arg().to_string(), source], dir.path()).unwrap();

    let node0 = cluster.node(0);
    let client = &node0.pod("client").ns;
    // Backends all on another node: TCP, unconnected and connected UDP, from a pod and from the node.
    for ns in [client, &node0.ns] {
        assert_eq!(answer(node0, ns, "tcp", SocketAddr::from((REMOTE_VIP, 80))), "web-1");
        assert_eq!(answer(node0, ns, "udp", SocketAddr::from((REMOTE_VIP, 53))), "web-1");
        assert_eq!(answer(node0, ns, "udp-connected", SocketAddr::from((REMOTE_VIP, 53))), "web-1");
    }
    // A backend whose port is closed: its kernel's refusal reaches the client.
    for kind in ["tcp", "udp-connected"] {
        let refused = run(node0, client, kind, SocketAddr::from((MUTE_VIP, if kind == "tcp" { 80 } else { 53 })));
        assert_eq!(refused.errno, Some(ECONNREFUSED), "{kind}: {refused:?}");
    }
    // Backends on every node: each is reached, from a client pod and from
    // one of the backends itself (hairpin: it gets answers from itself too).
    for from in [client, &node0.pod("web-0").ns] {
        let reached: BTreeSet<String> =
            (0..40).map(|_| answer(node0, from, "tcp", SocketAddr::from((SPREAD_VIP, 80)))).collect();
        assert_eq!(reached, ["web-0", "web-1", "web-2"].map(String::from).into(), "every backend answers");
    }
    if mode == Mode::Ebpf {
        // The socket hooks did it: the per-packet path on the client's
        // interface never saw a packet to a VIP.
        let stats = &kpr::datapath_stats(&node0.ns, node0.bpf_root()).unwrap();
        assert!(stats["socket_translated"].as_u64().unwrap() >= 86, "{stats:#}");
        assert_eq!(stats["translated"], 0, "{stats:#}");
    }

    // A backend leaves: within a second no new connection reaches it, while
    // an established connection to another backend goes on.
    let spread_addr = SocketAddr::from((SPREAD_VIP, 80));
    let (mut held, first) = Held::start(Path::new(PROBE), client, &node0.cgroup, "tcp-held", spread_addr).unwrap();
    let kept = first.reply.clone().unwrap_or_else(|| panic!("no first answer: {first:?}"));
    let removed = spread.iter().map(|(_, p)| *p).find(|p| *p != kept).unwrap();
    let remaining: Vec<_> = spread.iter().copied().filter(|(_, p)| *p != removed).collect();
    // Within the second: node 0's agent has synced the change (six answers
    // missing the removed backend by chance, 9% of the time with three,
    // would not show it gone), and six new connections in a row miss it.
    let syncs = agents[0].log().matches("synced").count();
    write(&manifests, "spread.yaml", &web_service("spread", SPREAD_VIP, &endpoints(&remaining))).unwrap();
    wait::until(
        &format!("no new connection reaching {removed}"),
        Duration::from_secs(1),
        || {
            let synced = agents[0].log().matches("synced").count() > syncs;
            (synced, (0..6).map(|_| run(node0, client, "tcp", spread_addr).reply).collect::<Vec<_>>())
        },
        |(synced, replies)| *synced && replies.iter().all(|r| r.as_deref().is_some_and(|r| r != removed)),
    )
    .unwrap();
    for _ in 0..10 {
        assert_ne!(answer(node0, client, "tcp", spread_addr), removed, "the removed backend stays out");
    }
    assert_eq!(held.ask().unwrap().reply.as_deref(), Some(kept.as_str()), "the established connection lives");
    drop(held);

    // A pod created after kpr started, as a backend (node 2) and as a client (node 1).
    cluster.add_pod(2, "late", 12).unwrap();
    servers.extend(serve(&cluster.node(2).pod("late").ns, "late"));
    write(&manifests, "remote.yaml", &web_service("remote", REMOTE_VIP, &[("late", cluster.node(2).pod("late").ip)]))
        .unwrap();
    cluster.add_pod(1, "late-client", 100).unwrap();
    let node1 = cluster.node(1);
    let late_client = &node1.pod("late-client").ns;
    wait::until(
        "the new backend serving the new client",
        Duration::from_secs(10),
        || run(node1, late_client, "tcp", SocketAddr::from((REMOTE_VIP, 80))).reply,
        |r| r.as_deref() == Some("late"),
    )
    .unwrap();
    assert_eq!(answer(node1, late_client, "udp", SocketAddr::from((REMOTE_VIP, 53))), "late");
    drop(agents);
}

/// The per-packet path alone (socket hooks off, clients outside the
/// cgroup): requests are translated on the client's pod interface, and
/// replies from the other node on the same interface, on their way to the
/// client. The devices carry nothing: no Service is reached from outside.
fn serves_across_nodes_per_packet(mode: Mode, shape: Shape) {
    root_or_skip!();
    let mut cluster = Cluster::new(shape, 2).unwrap();
    cluster.add_pod(0, "client", 100).unwrap();
    cluster.add_pod(1, "web-1", 11).unwrap();
    cluster.add_pod(1, "web-2", 12).unwrap();
    cluster.add_pod(1, "mute", 13).unwrap();
    cluster.add_pod(1, "echo", 14).unwrap();
    cluster.add_pod(0, "intruder", 101).unwrap();
    cluster.add_pod(0, "near", 15).unwrap();
    let mut servers: Vec<Server> = Vec::new();
    for pod in ["web-1", "web-2"] {
        servers.extend(serve(&cluster.node(1).pod(pod).ns, pod));
    }
    servers.push(servers::udp_echo(&cluster.node(1).pod("echo").ns, 5353, "echo:").unwrap());
    servers.extend(serve(&cluster.node(0).pod("near").ns, "near"));
    let endpoints: Vec<_> = ["web-1", "web-2"].map(|p| (p, cluster.node(1).pod(p).ip)).into();
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "remote.yaml", &web_service("remote", REMOTE_VIP, &endpoints)).unwrap();
    let mute = [("mute", cluster.node(1).pod("mute").ip)];
    write(&manifests, "mute.yaml", &web_service("mute", MUTE_VIP, &mute)).unwrap();
    let echo = [("echo", cluster.node(1).pod("echo").ip)];
    write(&manifests, "echo.yaml", &web_service("echo", ECHO_VIP, &echo)).unwrap();
    let near = [("near", cluster.node(0).pod("near").ip), ("web-1", cluster.node(1).pod("web-1").ip)];
    write(&manifests, "near.yaml", &web_service("near", NEAR_VIP, &near)).unwrap();
    // The node's devices as a DaemonSet would name them (the overlay's too):
    // they get no program, as no Service here is reached from outside.
    let devices = if shape == Shape::Vxlan { "--devices=eth0,flannel.1" } else { "--devices=eth0" };
    let mut agents: Vec<Kpr> = cluster
        .nodes
        .iter()
        .map(|node| {
            let args = [
                mode.arg().to_string(),
                format!("--source=dir:{}", manifests.display()),
                "--socket-lb=false".into(),
                devices.into(),
                // Settings the agent follows are looked at again this often.
                "--sync-period=1s".into(),
            ];
            node.start_kpr(&["veth*".into()], &args, dir.path()).unwrap()
        })
        .collect();
    let client = &cluster.node(0).pod("client").ns;
    let (tcp, udp) = (SocketAddr::from((REMOTE_VIP, 80)), SocketAddr::from((REMOTE_VIP, 53)));
    let reached: BTreeSet<String> =
        client.run(move || (0..30).filter_map(|_| tcp_request(tcp, Duration::from_secs(2)).ok()).collect()).unwrap();
    assert_eq!(reached, ["web-1", "web-2"].map(String::from).into(), "both backends on the other node answer");
    let (reply, from) = client.run(move || udp_request(udp, Duration::from_secs(2))).unwrap().unwrap();
    assert!(["web-1", "web-2"].contains(&reply.as_str()) && from == udp, "{reply} from {from}");

    // The backend's port is closed: its ICMP port unreachable, translated
    // quote and all on the client's interface, reaches its connected socket.
    let mute = SocketAddr::from((MUTE_VIP, 53));
    let refusal = client.run(move || connected_udp_error(mute)).unwrap();
    assert_eq!(refusal, Some(ECONNREFUSED), "the refusal reached the client");

    // A datagram larger than the MTU travels in fragments both ways.
    let echo = SocketAddr::from((ECHO_VIP, 53));
    let big: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let sent = big.clone();
    let (answer, from) = client.run(move || connected_udp_exchange(echo, &sent)).unwrap().unwrap();
    // A connected socket takes datagrams from its peer (the VIP) alone.
    assert_eq!(from, echo);
    assert_eq!(answer, [&b"echo:"[..], &big].concat(), "the whole datagram, both ways");

    // A pod sending with the client's address diverts none of the client's traffic.
    let client_ip = cluster.node(0).pod("client").ip;
    send_spoofed(&cluster.node(0).pod("intruder").ns, (client_ip, 40000), (REMOTE_VIP, 53));
    let (reply, _) = client.run(move || udp_request(udp, Duration::from_secs(2))).unwrap().unwrap();
    assert!(["web-1", "web-2"].contains(&reply.as_str()), "{reply}");
    assert!(client.run(move || tcp_request(tcp, Duration::from_secs(2))).unwrap().is_ok());

    // A backend reaching its own Service (hairpin) is answered by itself
    // too, and every answer comes from the VIP.
    let near = &cluster.node(0).pod("near").ns;
    let (tcp, udp) = (SocketAddr::from((NEAR_VIP, 80)), SocketAddr::from((NEAR_VIP, 53)));
    let reached: BTreeSet<String> = near
        .run(move || (0..30).map(|_| tcp_request(tcp, Duration::from_secs(2))).collect::<Result<_, _>>())
        .unwrap()
        .expect("every TCP request answered");
    assert_eq!(reached, ["near", "web-1"].map(String::from).into(), "TCP: itself and the other backend answer");
    let answers: Vec<(String, SocketAddr)> = near
        .run(move || (0..30).map(|_| udp_request(udp, Duration::from_secs(2))).collect::<Result<_, _>>())
        .unwrap()
        .expect("every UDP request answered");
    assert!(answers.iter().all(|(_, from)| *from == udp), "UDP answers from the VIP: {answers:?}");
    let reached: BTreeSet<&str> = answers.iter().map(|(reply, _)| reply.as_str()).collect();
    assert_eq!(reached, ["near", "web-1"].into(), "UDP: itself and the other backend answer");

    // A NetworkPolicy-like rule in the node's FORWARD chain applies to
    // Service traffic, to a backend on the client's own node too (the reset
    // reaches the client in eBPF mode; kube-proxy's rules leave it
    // untranslated, so there the connection times out). In eBPF mode on a
    // bridge, such traffic is switched there, not routed: the node's
    // br_netfilter hands it to the FORWARD chain all the same.
    let bridge = shape != Shape::Routed;
    let node0 = &cluster.node(0).ns;
    let bridged = forward_rule_applies(node0, client, cluster.node(0).pod("near").ip);
    if mode == Mode::Ebpf {
        assert_eq!(bridged > 0, bridge, "switched on the bridge: {bridged} packets");
    }
    if mode == Mode::Ebpf && bridge {
        // Without br_netfilter handing switched traffic to iptables, the
        // agent has it routed again, so the rule still sees it.
        node0.exec(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"]).unwrap();
        let agent = &mut agents[0];
        agent.wait_for_log("Service traffic to pods on the same bridge is routed", Duration::from_secs(10)).unwrap();
        let bridged = forward_rule_applies(node0, client, cluster.node(0).pod("near").ip);
        assert_eq!(bridged, 0, "routed once bridged traffic skips iptables");
        node0.exec(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]).unwrap();
    }
    if mode == Mode::Ebpf {
        let node0 = cluster.node(0);
        let stats = kpr::datapath_stats(&node0.ns, node0.bpf_root()).unwrap();
        assert!(stats["icmp_error_translated"].as_u64().unwrap() >= 1, "{stats:#}");
        // All of it without a program on the devices.
        for node in &cluster.nodes {
            let stats = kpr::stats(&node.ns, node.bpf_root()).unwrap();
            let devices = stats["devices"].as_array().cloned().unwrap_or_default();
            let on_device = devices.iter().find(|d| d["device"] == "eth0" || d["device"] == "flannel.1");
            assert!(on_device.is_none(), "{}: a device carries the datapath: {stats:#}", node.name);
        }
    }
}

/// Runs connections from `client` to NEAR_VIP (backends `near`, the
/// client's node-mate, and web-1) with a rule in `node`'s FORWARD chain
/// resetting those to `near`, and checks that it applies: every
/// connection that chose `near` fails, the others are answered by web-1.
/// Returns how many of the packets to `near` were switched on a bridge.
fn forward_rule_applies(node: &Netns, client: &Netns, near: Ipv4Addr) -> u64 {
    let near = near.to_string();
    let reject = ["FORWARD", "-d", &near, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"];
    // No target: it only counts, and the packet goes on to the rule above.
    let bridged = ["FORWARD", "-m", "physdev", "--physdev-is-bridged", "-d", &near, "-p", "tcp"];
    node.exec(&[&["iptables", "-I"][..], &reject].concat()).unwrap();
    node.exec(&[&["iptables", "-I"][..], &bridged].concat()).unwrap();
    let tcp = SocketAddr::from((NEAR_VIP, 80));
    let outcomes: Vec<Result<String, String>> = client
        .run(move || (0..20).map(|_| tcp_request(tcp, Duration::from_millis(500)).map_err(|e| e.to_string())).collect())
        .unwrap();
    let listing = node.output(&["iptables", "-L", "FORWARD", "-v", "-n", "-x"]).unwrap();
    node.exec(&[&["iptables", "-D"][..], &bridged].concat()).unwrap();
    node.exec(&[&["iptables", "-D"][..], &reject].concat()).unwrap();
    assert!(outcomes.iter().all(|o| o.is_err() || o.as_deref() == Ok("web-1")), "{outcomes:?}");
    assert!(outcomes.iter().any(Result::is_err), "the rule saw connections to near: {outcomes:?}");
    let counted = listing.lines().find(|l| l.contains("physdev-is-bridged"));
    counted.and_then(|l| l.split_whitespace().next()?.parse().ok()).expect("the counting rule's packets")
}

/// Sends, from `ns`, a UDP datagram claiming to come from `claimed`
/// (a raw socket writes whatever source address it likes).
fn send_spoofed(ns: &Netns, claimed: (Ipv4Addr, u16), to: (Ipv4Addr, u16)) {
    let ip = Ip::new(claimed.0, to.0, 17);
    let packet = ip.packet(&udp_datagram(&ip, claimed.1, to.1, b"not from the client", true));
    let sent = ns
        .run(move || {
            // SAFETY: plain socket calls on a buffer and an address that outlive them.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
                assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.0.octets()) },
                    sin_zero: [0; 8],
                };
                let n = libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                libc::close(fd);
                n
            }
        })
        .unwrap();
    assert!(sent > 0, "sendto: {}", std::io::Error::last_os_error());
}

/// One request and its answer on a UDP socket connected to `addr`.
fn connected_udp_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.connect(addr)?;
    socket.send(request)?;
    let mut buf = vec![0u8; 65536];
    let n = socket.recv(&mut buf)?;
    buf.truncate(n);
    Ok((buf, socket.peer_addr()?))
}

fn host_gw(mode: Mode) {
    serves_services_across_nodes(mode, Shape::HostGw);
}

fn vxlan(mode: Mode) {
    serves_services_across_nodes(mode, Shape::Vxlan);
}

fn routed(mode: Mode) {
    serves_services_across_nodes(mode, Shape::Routed);
}

fn host_gw_per_packet(mode: Mode) {
    serves_across_nodes_per_packet(mode, Shape::HostGw);
}

fn vxlan_per_packet(mode: Mode) {
    serves_across_nodes_per_packet(mode, Shape::Vxlan);
}

fn routed_per_packet(mode: Mode) {
    serves_across_nodes_per_packet(mode, Shape::Routed);
}

kpr_tests::in_both_modes!(host_gw, vxlan, routed, host_gw_per_packet, vxlan_per_packet, routed_per_packet);
