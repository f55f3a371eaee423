//! `kpr run --source kube` end to end: the real kpr binary with the
//! unmodified kube client, talking over HTTP to the test API server inside
//! the node's network namespace, and real traffic from a client pod.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kpr_tests::{
    apiserver::{ApiServer, store::Kind},
    client::{tcp_request, udp_request},
    kpr::{Kpr, Mode},
    netns::run_in,
    node::VirtualNode,
    objects::{service, slice},
    root_or_skip,
    servers::{self, Server},
    wait,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const PODS: [(&str, Ipv4Addr); 4] = [
    ("web-a", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-b", Ipv4Addr::new(10, 244, 0, 12)),
    ("web-c", Ipv4Addr::new(10, 244, 0, 13)),
    ("client", Ipv4Addr::new(10, 244, 0, 100)),
];
const A: (&str, Ipv4Addr) = PODS[0];
const B: (&str, Ipv4Addr) = PODS[1];
const C: (&str, Ipv4Addr) = PODS[2];

struct Cluster {
    kpr: Kpr,
    api: ApiServer,
    _dir: tempfile::TempDir,
    _servers: Vec<Server>,
    node: VirtualNode,
}

impl Cluster {
    fn start(mode: Mode, extra_args: &[&str]) -> Self {
        let node = VirtualNode::new(&PODS).expect("virtual node");
        let mut servers = Vec::new();
        for (name, _) in &PODS[..3] {
            servers.push(servers::tcp(&node.pod(name).ns, 8080, name).unwrap());
            servers.push(servers::udp(&node.pod(name).ns, 5353, name).unwrap());
        }
        // The API server listens on the node namespace's loopback, where kpr runs.
        let ns = node.ns.name().to_string();
        let api = ApiServer::start(Arc::new(move |port| {
            run_in(&ns, move || TcpListener::bind(("127.0.0.1", port))).expect("netns")
        }))
        .expect("test API server");
        api.set_bookmark_interval(Duration::from_millis(500));
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let mut args = vec![
            mode.arg().to_string(),
            "--source=kube".to_string(),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--node-name=node-1".into(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "serving Services").expect("kpr starts");
        Self { kpr, api, _dir: dir, _servers: servers, node }
    }

    /// Which pods answer `n` fresh TCP connections to `vip`:80 (errors as "error: ...").
    fn who_answers(&self, vip: Ipv4Addr, n: usize) -> BTreeSet<String> {
        self.who_answers_within(vip, n, Duration::from_secs(2))
    }

    fn who_answers_within(&self, vip: Ipv4Addr, n: usize, timeout: Duration) -> BTreeSet<String> {
        self.node
            .pod("client")
            .ns
            .run(move || {
                (0..n)
                    .map(|_| match tcp_request(SocketAddr::from((vip, 80)), timeout) {
                        Ok(w) => w,
                        Err(e) => format!("error: {}", e.kind()),
                    })
                    .collect()
            })
            .unwrap()
    }

    /// Waits until `n` connections are answered by exactly `pods`.
    fn converges_to(&self, vip: Ipv4Addr, pods: &[&str], timeout: Duration) -> Result<(), String> {
        let want: BTreeSet<String> = pods.iter().map(|p| p.to_string()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.who_answers(vip, 30);
            if got == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                // What the kernel held, for a failure that does not reproduce.
                let rules = self.node.ns.output(&["iptables-save"]).unwrap_or_default();
                let flows = self.node.ns.output(&["conntrack", "-L"]).unwrap_or_default();
                return Err(format!(
                    "after {timeout:?}: {got:?}, wanted {want:?}\n{}\n{rules}\n{flows}",
                    self.kpr.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// No pod answers: refused (no endpoints) or unrouted (no Service).
    /// Only meaningful once another Service was seen answering: then kpr is
    /// serving what it has, and silence means it does not serve `vip`.
    fn refused(&self, vip: Ipv4Addr) -> bool {
        self.who_answers_within(vip, 3, Duration::from_millis(500)).iter().all(|w| w.starts_with("error"))
    }

    /// Waits until `vip` is no longer answered.
    fn stops_answering(&self, vip: Ipv4Addr, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("{vip} no longer answered");
        wait::until(
            &what,
            timeout,
            || self.who_answers_within(vip, 3, Duration::from_millis(500)),
            |got| got.iter().all(|w| w.starts_with("error")),
        )
        .map(drop)
        .map_err(|e| e.context(self.kpr.log()))
    }

    /// Waits until the API server has been asked for EndpointSlices after
    /// its `seen` first requests: kpr's slice watch ended and it asked again.
    fn asks_for_slices_after(&self, seen: usize, timeout: Duration) {
        let since = || {
            let all = self.api.requests();
            all[seen.min(all.len())..].to_vec()
        };
        wait::until("kpr asking for EndpointSlices again", timeout, since, |new| {
            new.iter().any(|r| r.contains("endpointslices"))
        })
        .unwrap();
    }
}

kpr_tests::in_both_modes!(
    services_and_slices_from_the_api_server_drive_the_dataplane,
    an_api_server_restart_while_endpoints_change_converges_without_stale_backends,
    dropped_watches_and_server_errors_are_survived,
    a_malformed_service_beside_a_good_one_leaves_the_good_one_working,
    services_of_another_proxy_are_left_alone,
    topology_follows_this_nodes_zone,
    dns_names_every_service_the_api_server_holds,
);

const SETTLE: Duration = Duration::from_secs(10);

fn services_and_slices_from_the_api_server_drive_the_dataplane(mode: Mode) {
    root_or_skip!();
    let c = Cluster::start(mode, &[]);
    // Another Service answers first: kpr has listed and serves what it sees.
    c.api.create(&service("other", OTHER_VIP, &[])).unwrap();
    c.api.create(&slice("other-1", "other", &[C])).unwrap();
    c.converges_to(OTHER_VIP, &["web-c"], SETTLE).unwrap();
    assert!(c.refused(VIP), "nothing is served before the Service exists");

    c.api.create(&service("web", VIP, &[])).unwrap();
    c.api.create(&slice("web-1", "web", &[A, B])).unwrap();
    c.converges_to(VIP, &["web-a", "web-b"], SETTLE).unwrap();
    let (reply, from) = c
        .node
        .pod("client")
        .ns
        .run(|| udp_request(SocketAddr::from((VIP, 53)), Duration::from_secs(2)).unwrap())
        .unwrap();
    assert!(reply.starts_with("web-") && from == SocketAddr::from((VIP, 53)));

    // Scale up through a second slice of the same Service, then down.
    c.api.create(&slice("web-2", "web", &[C, A])).unwrap();
    c.converges_to(VIP, &["web-a", "web-b", "web-c"], SETTLE).unwrap();
    c.api.apply(&slice("web-1", "web", &[])).unwrap();
    c.api.delete::<EndpointSlice>("default", "web-2").unwrap();
    c.converges_to(VIP, &["error: connection refused"], SETTLE).unwrap();
    c.api.apply(&slice("web-1", "web", &[C])).unwrap();
    c.converges_to(VIP, &["web-c"], SETTLE).unwrap();

    c.api.delete::<Service>("default", "web").unwrap();
    c.stops_answering(VIP, SETTLE).expect("a deleted Service stops answering");
    c.converges_to(OTHER_VIP, &["web-c"], SETTLE).expect("the other Service still answers");
    // One list per kind, then watches, all within what the ClusterRole grants.
    let requests = c.api.requests();
    for r in &requests {
        let path = r.split_whitespace().nth(1).unwrap().split('?').next().unwrap();
        if path == "/version" {
            // The reachability probe: readable by every client (system:public-info-viewer).
            continue;
        }
        let resource = path.rsplit('/').next().unwrap();
        let group = if path.starts_with("/apis/") { path.split('/').nth(2).unwrap() } else { "" };
        let verb = if r.contains("watch=true") { "watch" } else { "list" };
        assert!(r.starts_with("GET "), "kpr only reads: {r}");
        assert!(
            proxy_userspace::source::kube::PERMISSIONS
                .iter()
                .any(|(g, res, verbs)| *g == group && *res == resource && verbs.contains(&verb)),
            "{r} is not covered by the ClusterRole"
        );
    }
    assert!(requests.iter().any(|r| r.contains("/api/v1/services?") && r.contains("labelSelector")), "{requests:#?}");
    assert!(requests.iter().any(|r| r.contains("endpointslices?") && r.contains("watch=true")), "{requests:#?}");
}

fn an_api_server_restart_while_endpoints_change_converges_without_stale_backends(mode: Mode) {
    root_or_skip!();
    let mut c = Cluster::start(mode, &[]);
    c.api.create(&service("web", VIP, &[])).unwrap();
    c.api.create(&slice("web-1", "web", &[A, B])).unwrap();
    c.api.create(&service("other", OTHER_VIP, &[])).unwrap();
    c.api.create(&slice("other-1", "other", &[C])).unwrap();
    c.converges_to(VIP, &["web-a", "web-b"], SETTLE).unwrap();
    c.converges_to(OTHER_VIP, &["web-c"], SETTLE).unwrap();

    let failures = c.kpr.log().matches("watch failed").count();
    c.api.stop();
    // While the API server is down: endpoints move, a Service goes away.
    c.api.apply(&slice("web-1", "web", &[C])).unwrap();
    c.api.delete::<Service>("default", "other").unwrap();
    c.api.delete::<EndpointSlice>("default", "other-1").unwrap();
    // Both watches (Services, EndpointSlices) have failed to reconnect...
    c.kpr.wait_for_log_count("watch failed", failures + 2, SETTLE).unwrap();
    // ...and what is programmed keeps serving meanwhile.
    assert_eq!(c.who_answers(VIP, 30), BTreeSet::from(["web-a".into(), "web-b".into()]), "{}", c.kpr.log());
    assert_eq!(c.who_answers(OTHER_VIP, 10), BTreeSet::from(["web-c".into()]));

    // The restarted server has no watch history: kpr's watches get 410 Gone and re-list.
    c.api.restart().unwrap();
    c.converges_to(VIP, &["web-c"], Duration::from_secs(40)).unwrap();
    c.stops_answering(OTHER_VIP, SETTLE).expect("a Service deleted during the outage stops answering");
}

fn dropped_watches_and_server_errors_are_survived(mode: Mode) {
    root_or_skip!();
    let c = Cluster::start(mode, &[]);
    c.api.create(&service("web", VIP, &[])).unwrap();
    c.api.create(&slice("web-1", "web", &[A])).unwrap();
    c.converges_to(VIP, &["web-a"], SETTLE).unwrap();

    c.api.drop_watches();
    c.api.apply(&slice("web-1", "web", &[B])).unwrap();
    c.converges_to(VIP, &["web-b"], SETTLE).unwrap();

    c.api.fail_requests(true);
    let seen = c.api.requests().len();
    c.api.drop_watches();
    // Once kpr asks for slices again its old stream has ended (ending it
    // races with new events), so the change below can only arrive once
    // requests succeed again.
    c.asks_for_slices_after(seen, SETTLE);
    let seen = c.api.requests().len();
    c.api.apply(&slice("web-1", "web", &[C])).unwrap();
    // kpr asked after the change and was refused: it keeps what it serves.
    c.asks_for_slices_after(seen, SETTLE);
    assert_eq!(c.who_answers(VIP, 30), BTreeSet::from(["web-b".into()]), "{}", c.kpr.log());
    c.api.fail_requests(false);
    c.converges_to(VIP, &["web-c"], Duration::from_secs(40)).unwrap();
}

fn a_malformed_service_beside_a_good_one_leaves_the_good_one_working(mode: Mode) {
    root_or_skip!();
    let mut c = Cluster::start(mode, &[]);
    c.api
        .apply_json(
            Kind::Service,
            serde_json::json!({
                "metadata": {"name": "bad", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.300", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
            }),
        )
        .unwrap();
    c.api
        .apply_json(
            Kind::Service,
            serde_json::json!({
                "metadata": {"name": "quic", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.12", "ports": [{"name": "s", "port": 9, "protocol": "QUIC"}]}
            }),
        )
        .unwrap();
    c.api.create(&service("web", VIP, &[])).unwrap();
    c.api.create(&slice("web-1", "web", &[A, B])).unwrap();
    c.converges_to(VIP, &["web-a", "web-b"], SETTLE).unwrap();
    c.kpr.wait_for_log("Service default/quic", SETTLE).unwrap();
    let log = c.kpr.log();
    assert!(log.contains("Service default/bad") && log.contains("is not an IP address"), "{log}");
    assert_eq!(log.matches("protocol QUIC is not supported").count(), 1, "reported once:\n{log}");
}

fn services_of_another_proxy_are_left_alone(mode: Mode) {
    root_or_skip!();
    let c = Cluster::start(mode, &["--service-proxy-name=kpr"]);
    let label = [("service.kubernetes.io/service-proxy-name", "kpr")];
    let other = [("service.kubernetes.io/service-proxy-name", "someone-else")];
    // Theirs first: had kpr taken it, it would be programmed by the time
    // the later Service of its own answers.
    c.api.create(&service("theirs", OTHER_VIP, &other)).unwrap();
    let mut s = slice("theirs-1", "theirs", &[B]);
    s.metadata.labels.as_mut().unwrap().insert(other[0].0.into(), other[0].1.into());
    c.api.create(&s).unwrap();
    c.api.create(&service("mine", VIP, &label)).unwrap();
    let mut s = slice("mine-1", "mine", &[A]);
    s.metadata.labels.as_mut().unwrap().insert(label[0].0.into(), label[0].1.into());
    c.api.create(&s).unwrap();
    c.converges_to(VIP, &["web-a"], SETTLE).unwrap();
    assert!(c.refused(OTHER_VIP), "another proxy's Service is not served");
}

/// This node's Node, in `zone` (`None`: without the zone label).
fn node_in(zone: Option<&str>) -> serde_json::Value {
    let labels = match zone {
        Some(z) => serde_json::json!({"kubernetes.io/hostname": "node-1", "topology.kubernetes.io/zone": z}),
        None => serde_json::json!({"kubernetes.io/hostname": "node-1"}),
    };
    serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": labels}})
}

/// `trafficDistribution: PreferClose`: with its endpoints hinted for zones
/// (as the EndpointSlice controller writes them), this node is served by
/// the endpoint of its own zone, which kpr reads from its Node: when the
/// Node's zone label changes, the choice follows; without one, every
/// endpoint serves.
fn topology_follows_this_nodes_zone(mode: Mode) {
    root_or_skip!();
    let c = Cluster::start(mode, &[]);
    c.api.apply_json(Kind::Node, node_in(Some("zone-a"))).unwrap();
    let mut web = service("web", VIP, &[]);
    web.spec.as_mut().unwrap().traffic_distribution = Some("PreferClose".into());
    c.api.create(&web).unwrap();
    let mut hinted = slice("web-1", "web", &[A, B]);
    for (endpoint, zone) in hinted.endpoints.iter_mut().flatten().zip(["zone-a", "zone-b"]) {
        endpoint.hints = Some(k8s_openapi::api::discovery::v1::EndpointHints {
            for_zones: Some(vec![k8s_openapi::api::discovery::v1::ForZone { name: zone.into() }]),
            ..Default::default()
        });
    }
    c.api.create(&hinted).unwrap();
    c.converges_to(VIP, &["web-a"], SETTLE).unwrap();
    c.api.apply_json(Kind::Node, node_in(Some("zone-b"))).unwrap();
    c.converges_to(VIP, &["web-b"], SETTLE).unwrap();
    c.api.apply_json(Kind::Node, node_in(None)).unwrap();
    c.converges_to(VIP, &["web-a", "web-b"], SETTLE).unwrap();
}

/// `dig +short` at the DNS add-on on the node's loopback.
fn dig(c: &Cluster, args: &[&str]) -> Vec<String> {
    let out =
        c.node.ns.output(&[&["dig", "@127.0.0.1", "-p", "5300", "+short", "+time=2", "+tries=1"][..], args].concat());
    let mut lines: Vec<String> = out.unwrap_or_default().lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn dns_names_every_service_the_api_server_holds(mode: Mode) {
    root_or_skip!();
    // Proxied beside another proxy: DNS still names every Service.
    let c = Cluster::start(mode, &["--service-proxy-name=kpr", "--dns-listen=127.0.0.1:5300"]);
    let other = [("service.kubernetes.io/service-proxy-name", "someone-else")];
    c.api.create(&service("theirs", OTHER_VIP, &other)).unwrap();
    // A headless Service: its slices carry the headless label the proxy's own watch leaves out.
    let mut headless = service("db", VIP, &[]);
    let spec = headless.spec.as_mut().unwrap();
    (spec.cluster_ip, spec.cluster_ips) = (Some("None".into()), Some(vec!["None".into()]));
    c.api.create(&headless).unwrap();
    let mut s = slice("db-1", "db", &[A, B]);
    s.metadata.labels.as_mut().unwrap().insert("service.kubernetes.io/headless".into(), String::new());
    s.endpoints.as_mut().unwrap()[0].hostname = Some("db-0".into());
    c.api.create(&s).unwrap();
    let wanted = [OTHER_VIP.to_string()];
    wait::until("theirs named", SETTLE, || dig(&c, &["theirs.default.svc.cluster.local"]), |a| a == &wanted).unwrap();
    // Services and slices come by watches of their own: the slice may follow "theirs".
    let endpoints = [A.1.to_string(), B.1.to_string()];
    wait::until("db named", SETTLE, || dig(&c, &["db.default.svc.cluster.local"]), |a| a == &endpoints).unwrap();
    assert_eq!(dig(&c, &["db-0.db.default.svc.cluster.local"]), [A.1.to_string()]);
    // Deleted in the API server: gone from DNS within a second.
    c.api.delete::<Service>("default", "theirs").unwrap();
    wait::until(
        "theirs gone",
        Duration::from_secs(1),
        || dig(&c, &["theirs.default.svc.cluster.local"]),
        |a| a.is_empty(),
    )
    .unwrap();
}
