//! The agent restarted under traffic, as a DaemonSet's agent is: upgraded
//! from the previous release's build (both nodes start on it; one is
//! rolled to this build), killed (SIGKILL) and started again at once,
//! stopped (SIGTERM) for 10 s before starting again, and upgraded to a
//! build with another map layout. Clients keep making new connections every 10 ms
//! (from outside through a node port, and from a pod to the ClusterIP,
//! which the socket hooks serve in eBPF mode) and keep 4 connections open
//! through the node port, asking on each every 50 ms: none may fail.
//!
//! And the API server away while traffic flows: the programmed state
//! serves on, `/livez` stays 200 (a liveness probe must not restart every
//! agent of the cluster), and what changed meanwhile is programmed within
//! 2 s of its return.
//!
//! And someone else disturbing the dataplane (a flushed nat table, a map
//! entry deleted): repaired within the sync period. And a UDP client that
//! sent before kpr started: served once kpr is.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use kpr_tests::{
    apiserver::ApiServer,
    client::{Repeating, Tally, every_10ms, http_get, tcp_request},
    cluster::{Cluster, Shape, WEB_PAIR},
    kpr::{Kpr, Mode},
    manifests::write,
    netns::run_in,
    node::{self, VirtualNode},
    objects::{service, slice},
    root_or_skip,
    servers::{self, Server},
};

const PROBE: &str = env!("CARGO_BIN_EXE_kpr-probe");
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const NODE_PORT: u16 = 30090;
/// How long the agent stays stopped (a rollout pulling a new image).
const DOWN: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(2);

fn manifest(endpoints: &[Ipv4Addr]) -> String {
    let eps: String = endpoints.iter().map(|ip| format!("- addresses: [\"{ip}\"]\n")).collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: {CLUSTER_IP}
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{eps}"
    )
}

/// 4 connections kept open from `ns`, each asked every 50 ms until `stop`.
fn held(ns: &kpr_tests::netns::Netns, addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Tally> {
    let name = ns.name().to_string();
    std::thread::spawn(move || {
        kpr_tests::netns::run_in(&name, move || {
            let mut streams: Vec<TcpStream> = (0..4)
                .map(|_| {
                    let s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
                    s.set_read_timeout(Some(TIMEOUT)).unwrap();
                    s
                })
                .collect();
            let mut tally = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                for s in &mut streams {
                    let asked = s.write_all(b"hello\n").and_then(|()| {
                        let mut line = String::new();
                        BufReader::new(&*s).read_line(&mut line)?;
                        if line.is_empty() {
                            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
                        }
                        Ok(line)
                    });
                    tally.count(asked);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            tally
        })
        .unwrap()
    })
}

fn keeps_serving_while_the_agent_restarts(mode: Mode) {
    root_or_skip!();
    let cluster = Cluster::with_pods(Shape::HostGw, 2, &WEB_PAIR).unwrap();
    let _servers: Vec<Server> = [(0, "web-0"), (1, "web-1")]
        .into_iter()
        .map(|(node, pod)| servers::tcp_peer(&cluster.node(node).pod(pod).ns, 8080, pod).unwrap())
        .collect();
    let web = [cluster.node(0).pod("web-0").ip, cluster.node(1).pod("web-1").ip];
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    write(&manifests, "web.yaml", &manifest(&web)).unwrap();
    let args = [
        mode.arg().to_string(),
        format!("--source=dir:{}", manifests.display()),
        "--cluster-cidr=10.244.0.0/16".into(),
    ];
    let logs = |run: usize| {
        let logs = dir.path().join(format!("run{run}"));
        std::fs::create_dir_all(&logs).unwrap();
        logs
    };
    let start = |node: u8, run: usize| cluster.node(node).start_kpr(&[], &args, &logs(run)).unwrap();
    // The cluster runs the previous release.
    let previous = kpr_tests::kpr::previous_release().unwrap();
    let start_previous = |node: u8| cluster.node(node).start_kpr_build(&previous, &[], &args, &logs(0)).unwrap();
    let mut agents: Vec<Kpr> = (0..2u8).map(start_previous).collect();

    let node0 = cluster.node(0);
    let node_port = SocketAddr::from((node0.address(), NODE_PORT));
    // Both backends answer through the node port before the clients start.
    for _ in 0..20 {
        tcp_request(node_port, TIMEOUT).ok();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let outside_new = every_10ms(cluster.outside(), node_port, TIMEOUT, stop.clone());
    let outside_held = held(cluster.outside(), node_port, stop.clone());
    let pod = Repeating::start(
        std::path::Path::new(PROBE),
        &node0.pod("client").ns,
        &node0.cgroup,
        SocketAddr::from((CLUSTER_IP, 80)),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // Rolled to this build, as a DaemonSet update does it: stopped, then
    // this build started.
    let previous_log = agents[0].log();
    agents[0].stop(libc::SIGTERM).unwrap();
    agents[0] = start(0, 1);
    let upgraded_log = agents[0].log();
    std::thread::sleep(Duration::from_secs(1));
    // Killed, and straight back.
    agents[0].stop(libc::SIGKILL).unwrap();
    agents[0] = start(0, 2);
    std::thread::sleep(Duration::from_secs(1));
    // Stopped for a while, then back.
    agents[0].stop(libc::SIGTERM).unwrap();
    std::thread::sleep(DOWN);
    agents[0] = start(0, 3);
    std::thread::sleep(Duration::from_secs(1));
    // An upgrade that changes the map layout: the maps the stopped agent
    // left look like an older layout's, so the new one starts from fresh
    // maps and migrates them while the old programs serve.
    agents[0].stop(libc::SIGTERM).unwrap();
    if mode == Mode::Ebpf {
        let pins = node0.bpf_root().join("kpr");
        let layout = proxy_common::maps::LAYOUT;
        std::fs::rename(pins.join(format!("maps-v{layout}")), pins.join(format!("maps-v{}", layout - 1))).unwrap();
    }
    agents[0] = start(0, 4);
    std::thread::sleep(Duration::from_secs(1));

    stop.store(true, Ordering::Relaxed);
    let outcomes = [
        ("new connections from outside", outside_new.join().unwrap()),
        ("connections held from outside", outside_held.join().unwrap()),
        ("new connections from a pod", pod.finish().unwrap()),
    ];
    let log = agents[0].log();
    for (what, tally) in &outcomes {
        // Some 1,400 connections at one per 10 ms over the 15 s or so; a margin for slow machines.
        assert!(tally.ok > 300, "{what}: only {} answered ({tally:?})", tally.ok);
        assert_eq!(tally.failed, 0, "{what}: {tally:?}\nagent log:\n{log}");
    }
    if mode == Mode::Ebpf {
        // The upgrade from the previous release took its maps and links over.
        assert!(
            upgraded_log.contains("took over the frontends the maps hold") || upgraded_log.contains("migration done"),
            "the previous release's maps were taken over:\n{previous_log}\n{upgraded_log}"
        );
        assert!(log.contains("took over the frontends the maps hold"), "the maps were reused:\n{log}");
        assert!(log.contains("switched to this run's programs"), "the links were taken over:\n{log}");
        assert!(log.contains("migration done"), "the maps were migrated:\n{log}");
        // The flows were shared, not copied: a copy misses what the old
        // programs began just before the switch (such a reply was reset).
        let shared = log.lines().find(|l| l.contains("flow maps shared")).unwrap_or_default();
        for map in ["CT_TCP", "CT_ANY", "NAT_FORWARD", "NAT_REVERSE", "SOCK_REVERSE"] {
            assert!(shared.contains(&format!("\"{map}\"")), "{map} shared with the old programs:\n{log}");
        }
    }
}

/// How long the API server is away: 5 minutes on a real cluster; here long
/// enough that a watch backing off as client-go does (up to 30 s between
/// tries) would come back too late, with the health threshold scaled down.
const OUTAGE: Duration = Duration::from_secs(25);
const THRESHOLD: &str = "--healthz-threshold=2s";

/// GET `path` on the agent's healthz address in `node`.
fn health(node: &VirtualNode, path: &'static str) -> u16 {
    let addr: SocketAddr = "127.0.0.1:10256".parse().unwrap();
    node.ns.run(move || http_get(addr, path, TIMEOUT).map_or(0, |(status, _)| status)).unwrap()
}

/// The node most tests use: two web pods serving on 8080, and a client.
fn web_node() -> (VirtualNode, Vec<Server>) {
    let pods = node::WEB_AND_CLIENT;
    let node = VirtualNode::new(&pods).unwrap();
    let servers = pods[..2].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 8080, n).unwrap()).collect();
    (node, servers)
}

fn keeps_serving_through_an_api_server_outage(mode: Mode) {
    root_or_skip!();
    let pods = node::WEB_AND_CLIENT;
    let (node, _servers) = web_node();
    let ns = node.ns.name().to_string();
    let mut api = ApiServer::start(Arc::new(move |port| {
        run_in(&ns, move || std::net::TcpListener::bind(("127.0.0.1", port))).expect("netns")
    }))
    .unwrap();
    api.create(&service("web", node::WEB_VIP, &[])).unwrap();
    api.create(&slice("web-1", "web", &pods[..2])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let args = [
        mode.arg().to_string(),
        "--source=kube".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
        THRESHOLD.into(),
    ];
    let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let vip = SocketAddr::from((node::WEB_VIP, 80));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = every_10ms(&node.pod("client").ns, vip, TIMEOUT, stop.clone());

    api.stop();
    // Meanwhile web-a leaves the Service.
    api.apply(&slice("web-1", "web", &pods[1..2])).unwrap();
    let away = std::time::Instant::now();
    let mut livez = Vec::new();
    while away.elapsed() < OUTAGE {
        livez.push(health(&node, "/livez"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(livez.iter().all(|s| *s == 200), "/livez through the outage: {livez:?}\n{}", kpr.log());
    assert_eq!(health(&node, "/healthz"), 503, "/healthz reports that the state may be stale");

    api.resume().unwrap();
    let back = std::time::Instant::now();
    // Programmed once ten connections in a row reach web-b only.
    let client = node.pod("client").ns.name().to_string();
    let converged = run_in(&client, move || {
        let mut in_a_row = 0;
        while in_a_row < 10 && back.elapsed() < Duration::from_secs(10) {
            match tcp_request(vip, TIMEOUT).as_deref() {
                Ok("web-b") => in_a_row += 1,
                _ => in_a_row = 0,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        back.elapsed()
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let tally = traffic.join().unwrap();
    // The last ten connections took about 0.1 s of it.
    assert!(converged < Duration::from_millis(2100), "converged {converged:?} after the return:\n{}", kpr.log());
    assert!(tally.ok > 300, "only {} answered ({tally:?})", tally.ok);
    assert_eq!(tally.failed, 0, "{tally:?}\n{}", kpr.log());
}

/// Breaks the dataplane as someone else might: flushes the nat table, or
/// deletes the Service's entry from the pinned service map, clears the
/// port marks and adds a stray device.
fn disturb(node: &VirtualNode, mode: Mode) {
    match mode {
        Mode::Iptables => {
            let out = [("iptables-nft", "-F"), ("iptables-legacy", "-F")]
                .map(|(tool, flag)| node.ns.exec(&[tool, "-t", "nat", flag]));
            assert!(out.iter().any(Result::is_ok), "{out:?}");
        }
        Mode::Ebpf => {
            // Marks an interface index that is no device of the node as one
            // (first: the Service's entry gone is what the test waits for).
            let mut devices = devices_map(node);
            devices.insert(STRAY_DEVICE, proxy_common::maps::hook::TC_INGRESS, 0).unwrap();
            let pin = node.bpf_root().join(format!("kpr/maps-v{}/SERVICES", proxy_common::maps::LAYOUT));
            let map = aya::maps::MapData::from_pin(&pin).unwrap();
            let mut services: aya::maps::HashMap<_, proxy_common::maps::ServiceKey, proxy_common::maps::ServiceValue> =
                aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
            services.remove(&proxy_common::maps::ServiceKey::new(node::WEB_VIP.octets(), 80, 6)).unwrap();
            // And clears the marks of the ports frontends and backends use:
            // the entry written again alone would still not be served.
            for name in [proxy_common::maps::FRONTEND_PORTS, proxy_common::maps::BACKEND_PORTS] {
                let pin = node.bpf_root().join(format!("kpr/maps-v{}/{name}", proxy_common::maps::LAYOUT));
                let map = aya::maps::MapData::from_pin(&pin).unwrap();
                let mut marks: aya::maps::Array<_, u64> =
                    aya::maps::Array::try_from(aya::maps::Map::Array(map)).unwrap();
                for word in 0..proxy_common::maps::PORT_WORDS {
                    marks.set(word, 0, 0).unwrap();
                }
            }
        }
    }
}

/// An interface index no device has.
const STRAY_DEVICE: u32 = 9999;

/// The pinned map of the node's devices and the path their traffic takes.
fn devices_map(node: &VirtualNode) -> aya::maps::HashMap<aya::maps::MapData, u32, u8> {
    let pin = node.bpf_root().join(format!("kpr/maps-v{}/DEVICES", proxy_common::maps::LAYOUT));
    let map = aya::maps::MapData::from_pin(&pin).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap()
}

fn repairs_what_someone_else_breaks(mode: Mode) {
    root_or_skip!();
    let pods = node::WEB_AND_CLIENT;
    let (node, _servers) = web_node();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &kpr_tests::manifests::web_service("web", node::WEB_VIP, &pods[..2])).unwrap();
    let args = [mode.arg().to_string(), format!("--source=dir:{}", dir.path().display()), "--sync-period=1s".into()];
    let mut kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let vip = SocketAddr::from((node::WEB_VIP, 80));
    let ask = || node.pod("client").ns.run(move || tcp_request(vip, Duration::from_millis(500))).unwrap();
    assert!(ask().is_ok());

    disturb(&node, mode);
    // The repair count says the check found what the disturbance broke
    // (asking in between would race the check).
    kpr.wait_for_log("written again", Duration::from_secs(5)).unwrap();
    assert!(ask().is_ok(), "repaired:\n{}", kpr.log());
    let metrics: SocketAddr = "127.0.0.1:10249".parse().unwrap();
    let (_, text) = node.ns.run(move || http_get(metrics, "/metrics", TIMEOUT)).unwrap().unwrap();
    let repairs = kpr_tests::client::metric(&text, "kpr_dataplane_repairs_total").unwrap_or(0.0);
    assert!(repairs >= 1.0, "{text}");
    if mode == Mode::Ebpf {
        assert!(devices_map(&node).get(&STRAY_DEVICE, 0).is_err(), "the stray device path is removed");
    }
}

/// A UDP client that kept sending to a ClusterIP before kpr programmed it
/// (a node booting, kpr's pod starting late): its first datagrams left
/// untranslated, and in iptables mode the kernel's conntrack entry for them
/// would keep every later one untranslated too (the DNS blackhole) unless
/// kpr clears UDP entries that no endpoint answers, as kube-proxy does.
fn serves_a_udp_client_that_sent_before_kpr_started(mode: Mode) {
    root_or_skip!();
    let pods = node::WEB_AND_CLIENT;
    let (node, _servers) = web_node();
    let _udp: Vec<Server> = pods[..2].iter().map(|(n, _)| servers::udp(&node.pod(n).ns, 5353, n).unwrap()).collect();
    // A node has nat rules before kpr starts (here a CNI's masquerade rule),
    // so the kernel gives the early datagrams' conntrack entry its NAT
    // binding, an untranslated one, at once.
    let masquerade =
        ["-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/24", "!", "-d", "10.244.0.0/24", "-j", "MASQUERADE"];
    node.ns.exec(&[&["iptables-nft"][..], &masquerade[..]].concat()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &kpr_tests::manifests::web_service("web", node::WEB_VIP, &pods[..2])).unwrap();
    let vip = SocketAddr::from((node::WEB_VIP, 53));
    let stop = Arc::new(AtomicBool::new(false));
    let client = node.pod("client").ns.name().to_string();
    let asking = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            run_in(&client, move || {
                // One socket, one source port: the same conntrack entry throughout.
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.connect(vip).unwrap();
                socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                let mut answered = None;
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    socket.send(b"hello").ok();
                    if socket.recv(&mut buf).is_ok() && answered.is_none() {
                        answered = Some(std::time::Instant::now());
                    }
                }
                answered
            })
            .unwrap()
        })
    };
    // Datagrams go out untranslated for a while.
    std::thread::sleep(Duration::from_millis(500));
    let args = [mode.arg().to_string(), format!("--source=dir:{}", dir.path().display())];
    let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let synced = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let answered = asking.join().unwrap();
    let after = answered.map(|t| t.saturating_duration_since(synced));
    assert!(after.is_some_and(|d| d < Duration::from_secs(1)), "first answer {after:?} after the sync:\n{}", kpr.log());
}

kpr_tests::in_both_modes!(
    keeps_serving_while_the_agent_restarts,
    keeps_serving_through_an_api_server_outage,
    repairs_what_someone_else_breaks,
    serves_a_udp_client_that_sent_before_kpr_started
);
