//! `--interfaces` patterns: pods created after kpr started are served on
//! the per-packet path (socket hooks off), as clients and as backends, in
//! both modes. In eBPF mode their interfaces are attached as they appear.
//! Starting kpr on a node whose pods are busy loses none of their packets.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use kpr_tests::{
    client::tcp_request,
    kpr::{self, Kpr, Mode},
    manifests::{web_service, write},
    node::VirtualNode,
    root_or_skip, servers, wait,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PODS: [(&str, Ipv4Addr); 2] =
    [("web-a", Ipv4Addr::new(10, 244, 0, 11)), ("client", Ipv4Addr::new(10, 244, 0, 100))];
const LATE_WEB: (&str, Ipv4Addr) = ("late-web", Ipv4Addr::new(10, 244, 0, 13));
const LATE_CLIENT: (&str, Ipv4Addr) = ("late-client", Ipv4Addr::new(10, 244, 0, 101));

/// The manifests folder under `dir`, holding the web Service (backend
/// web-a), and kpr's arguments for `mode` on the per-packet path reading it.
fn web_manifests(dir: &Path, mode: Mode) -> (PathBuf, [String; 3]) {
    let manifests = dir.join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "web.yaml", &web_service("web", VIP, &PODS[..1])).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", manifests.display()), "--socket-lb=false".into()];
    (manifests, args)
}

/// kpr on `node`'s pod interfaces with `args`, once it has synced.
fn start_kpr(node: &VirtualNode, args: &[String], log: &Path) -> Kpr {
    let mut kpr = Kpr::spawn_on(&node.ns, node.bpf_root(), &node.cgroup, &["veth*".into()], args, log).unwrap();
    kpr.wait_for_log("synced", Duration::from_secs(20)).unwrap();
    kpr
}

fn pods_created_after_kpr_started_are_served(mode: Mode) {
    root_or_skip!();
    let mut node = VirtualNode::new(&PODS).unwrap();
    let mut running = vec![servers::tcp(&node.pod("web-a").ns, 8080, "web-a").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let (manifests, args) = web_manifests(dir.path(), mode);
    let kpr = start_kpr(&node, &args, &dir.path().join("kpr.log"));
    let vip = SocketAddr::from((VIP, 80));
    let ask = |node: &VirtualNode, pod: &str| {
        node.pod(pod).ns.run(move || tcp_request(vip, Duration::from_secs(1)).ok()).unwrap()
    };
    assert_eq!(ask(&node, "client").as_deref(), Some("web-a"), "served before anything changes");

    node.add_pod(LATE_WEB.0, LATE_WEB.1).unwrap();
    running.push(servers::tcp(&node.pod(LATE_WEB.0).ns, 8080, LATE_WEB.0).unwrap());
    node.add_pod(LATE_CLIENT.0, LATE_CLIENT.1).unwrap();
    write(&manifests, "web.yaml", &web_service("web", VIP, &[LATE_WEB])).unwrap();
    let answer = wait::until(
        "the new client reaching the new backend through the VIP",
        Duration::from_secs(10),
        || ask(&node, LATE_CLIENT.0),
        |a| a.as_deref() == Some(LATE_WEB.0),
    );
    answer.unwrap_or_else(|e| panic!("{e:#}\nkpr log:\n{}", kpr.log()));
    assert_eq!(ask(&node, "client").as_deref(), Some(LATE_WEB.0), "and the first client too");
    if mode == Mode::Ebpf {
        let log = kpr.log();
        for iface in ["veth2", "veth3"] {
            assert!(
                log.contains(&format!("datapath attached on ingress and egress iface={iface}")),
                "{iface} attached:\n{log}"
            );
        }
        // The late client's interface is counted, and its counts go with its pod.
        let late = node.pod(LATE_CLIENT.0).host_if.clone();
        let devices = |node: &VirtualNode| {
            let stats = kpr::stats(&node.ns, node.bpf_root()).unwrap();
            stats["devices"].as_array().cloned().unwrap_or_default()
        };
        let counted = devices(&node).into_iter().find(|d| d["device"] == late.as_str());
        let counted = counted.unwrap_or_else(|| panic!("{late} counted: {:#?}", devices(&node)));
        assert!(counted["hooks"]["tc_ingress"]["translated"].as_u64() >= Some(1), "{counted:#}");
        let ifindex = counted["ifindex"].clone();
        node.remove_pod(LATE_CLIENT.0);
        let left = wait::until(
            "the deleted pod's interface no longer counted",
            Duration::from_secs(10),
            || devices(&node),
            |d| !d.iter().any(|d| d["ifindex"] == ifindex),
        );
        left.unwrap_or_else(|e| panic!("{e:#}\nkpr log:\n{}", kpr.log()));
        let first_client = node.pod("client").host_if.clone();
        assert!(devices(&node).iter().any(|d| d["device"] == first_client.as_str()), "the first client's still is");
    }
    drop(running);
}

/// Datagrams a pod sends another across the node's bridge, and the ones the
/// receiver's socket turned away (a full buffer is the receiver's doing).
struct Stream {
    sent: u64,
    received: u64,
    refused: u64,
}

/// UDP `RcvbufErrors` of the namespace the calling thread is in
/// (`/proc/net` would show the main thread's).
fn receive_buffer_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors").unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Streams datagrams from pod `from` to pod `to` (every 50 µs) while `during`
/// runs, and for 300 ms before and after.
fn stream_while(node: &VirtualNode, from: &str, to: &str, during: impl FnOnce()) -> Stream {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let stop_sending = Arc::new(AtomicBool::new(false));
    let stop_receiving = Arc::new(AtomicBool::new(false));
    let stop = stop_receiving.clone();
    let to_ip = node.pod(to).ip;
    let receiver = node
        .pod(to)
        .ns
        .spawn(move || {
            let socket = std::net::UdpSocket::bind((to_ip, 9000)).unwrap();
            socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let refused_before = receive_buffer_errors();
            let (mut received, mut buf) = (0u64, [0u8; 64]);
            while !stop.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    received += 1;
                }
            }
            while socket.recv(&mut buf).is_ok() {
                received += 1;
            }
            (received, receive_buffer_errors() - refused_before)
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let stop = stop_sending.clone();
    let sender = node
        .pod(from)
        .ns
        .spawn(move || {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            let (mut sent, mut next) = (0u64, std::time::Instant::now());
            while !stop.load(Ordering::Relaxed) {
                sent += u64::from(socket.send_to(b"datagram", (to_ip, 9000)).is_ok());
                next += Duration::from_micros(50);
                std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
            }
            sent
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    during();
    std::thread::sleep(Duration::from_millis(300));
    stop_sending.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    stop_receiving.store(true, Ordering::Relaxed);
    let (received, refused) = receiver.join().unwrap();
    Stream { sent, received, refused }
}

/// Starting kpr on a node whose pods are busy loses none of their packets:
/// attaching to an interface that carries traffic must not interrupt it
/// (a clsact qdisc added to a device that is up deactivates its transmit
/// queues for a moment; on TCX kernels none is needed).
fn starting_on_a_busy_node_loses_no_packet(mode: Mode) {
    root_or_skip!();
    let node = VirtualNode::new(&PODS).unwrap();
    let _web = servers::tcp(&node.pod("web-a").ns, 8080, "web-a").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_manifests, args) = web_manifests(dir.path(), mode);
    let mut kpr = None;
    let stream = stream_while(&node, "client", "web-a", || {
        kpr = Some(start_kpr(&node, &args, &dir.path().join("kpr.log")));
    });
    let kpr = kpr.unwrap();
    assert!(stream.sent > 5_000, "the stream ran: {} datagrams sent", stream.sent);
    let lost = stream.sent - stream.received - stream.refused;
    assert_eq!(
        lost,
        0,
        "{lost} of {} datagrams lost on the way ({} turned away by a full receive buffer)\nkpr log:\n{}",
        stream.sent,
        stream.refused,
        kpr.log()
    );
}

kpr_tests::in_both_modes!(pods_created_after_kpr_started_are_served, starting_on_a_busy_node_loses_no_packet);
