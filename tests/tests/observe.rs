//! Operating kpr: Prometheus metrics that match the traffic sent, /healthz
//! following the source's connectivity, JSON logs.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    sync::Arc,
    time::{Duration, Instant},
};

use kpr_tests::{
    apiserver::ApiServer,
    client::{http_get, metric, tcp_request},
    kpr::Kpr,
    manifests::{web_service, write},
    netns::run_in,
    node::{self, VirtualNode},
    objects::{service, slice},
    root_or_skip,
    servers::{self, Server},
};

const VIP: Ipv4Addr = node::WEB_VIP;
const PODS: [(&str, Ipv4Addr); 3] = node::WEB_AND_CLIENT;
const METRICS: &str = "127.0.0.1:10249";
const HEALTHZ: &str = "127.0.0.1:10256";
const T: Duration = Duration::from_secs(2);

fn node() -> (VirtualNode, Vec<Server>) {
    let node = VirtualNode::new(&PODS).unwrap();
    let servers = PODS[..2].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 8080, n).unwrap()).collect();
    (node, servers)
}

/// GET `path` at `addr` inside the node namespace.
fn get(node: &VirtualNode, addr: &str, path: &str) -> (u16, String) {
    let (addr, path): (SocketAddr, String) = (addr.parse().unwrap(), path.into());
    node.ns.run(move || http_get(addr, &path, T).unwrap_or((0, String::new()))).unwrap()
}

#[test]
fn metrics_count_the_traffic_sent() {
    root_or_skip!();
    let (node, _servers) = node();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &web_service("web", VIP, &PODS[..2])).unwrap();
    let args = ["--mode=ebpf".to_string(), format!("--source=dir:{}", dir.path().display())];
    let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();

    let before = get(&node, METRICS, "/metrics").1;
    let translated_before = metric(&before, "kpr_datapath_packets_total{reason=\"translated\"}").unwrap();
    let connections = 40;
    node.pod("client")
        .ns
        .run(move || (0..connections).for_each(|_| drop(tcp_request(SocketAddr::from((VIP, 80)), T).unwrap())))
        .unwrap();

    let (status, text) = get(&node, METRICS, "/metrics");
    assert_eq!(status, 200, "{text}");
    // Each connection: SYN, ACK, request, FIN and ACK at least towards the
    // Service, and SYN-ACK, reply and FIN back; no other traffic runs here.
    let translated = metric(&text, "kpr_datapath_packets_total{reason=\"translated\"}").unwrap() - translated_before;
    assert!(
        (4.0 * connections as f64..=12.0 * connections as f64).contains(&translated),
        "translated {translated}:\n{text}"
    );
    let replies = metric(&text, "kpr_datapath_packets_total{reason=\"reverse_translated\"}").unwrap();
    assert!(replies >= 3.0 * connections as f64, "reverse_translated {replies}");
    assert_eq!(metric(&text, "kpr_datapath_packets_total{reason=\"refused_no_backend\"}"), Some(0.0));
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap() >= 1.0, "{text}");
    assert!(metric(&text, "kubeproxy_network_programming_duration_seconds_count").unwrap() >= 1.0, "{text}");
    assert!(metric(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds").unwrap() > 1.7e9);
    assert_eq!(metric(&text, "kpr_mode{mode=\"ebpf\"}"), Some(1.0));
    // Per Service: both directions of the same connections.
    let series = "kpr_service_packets_total{service=\"default/web:http\",frontend=\"10.96.0.10:80/TCP\"}";
    let packets = metric(&text, series).unwrap_or_else(|| panic!("no {series}:\n{text}"));
    assert!(packets >= translated + replies - 1.0 && packets <= translated + translated_before + replies, "{packets}");
    let bytes =
        metric(&text, "kpr_service_bytes_total{service=\"default/web:http\",frontend=\"10.96.0.10:80/TCP\"}").unwrap();
    assert!(bytes >= packets * 54.0, "at least a minimal frame per packet: {bytes}");
    assert!(
        metric(&text, "kpr_service_packets_total{service=\"default/web:dns\"").is_some(),
        "every frontend is listed"
    );
    // Per backend: both pods served, and their shares add up to the Service
    // (the maps are read one after the other: a late closing packet may land in between).
    let via: Vec<f64> = PODS[..2]
        .iter()
        .map(|(_, ip)| {
            let series = format!(
                "kpr_backend_packets_total{{service=\"default/web:http\",frontend=\"10.96.0.10:80/TCP\",backend=\"{ip}:8080\"}}"
            );
            metric(&text, &series).unwrap_or_else(|| panic!("no {series}:\n{text}"))
        })
        .collect();
    assert!(via.iter().all(|v| *v > 0.0) && (packets - via.iter().sum::<f64>()).abs() <= 2.0, "{via:?} of {packets}");
    // One tracked flow per connection, an entry each way; the maps report their fill.
    assert_eq!(metric(&text, "kpr_conntrack_entries{table=\"tcp\"}"), Some(2.0 * connections as f64), "{text}");
    assert_eq!(metric(&text, "kpr_conntrack_entries{table=\"any\"}"), Some(0.0));
    assert_eq!(metric(&text, "kpr_bpf_map_entries{map=\"SERVICES\"}"), Some(3.0), "2 frontends and the VIP marker");
    assert_eq!(metric(&text, "kpr_bpf_map_capacity{map=\"SERVICES\"}"), Some(131_072.0));
    let ratio = metric(&text, "kpr_bpf_map_fill_ratio{map=\"CT_TCP\"}").unwrap();
    assert!((ratio - 2.0 * connections as f64 / 524_288.0).abs() < 1e-9, "{ratio}");
    drop(kpr);
}

#[test]
fn healthz_turns_503_while_the_source_is_cut_off_and_200_after_while_livez_stays_200() {
    root_or_skip!();
    let (node, _servers) = node();
    let ns = node.ns.name().to_string();
    let mut api = ApiServer::start(Arc::new(move |port| {
        run_in(&ns, move || TcpListener::bind(("127.0.0.1", port))).expect("netns")
    }))
    .unwrap();
    api.create(&service("web", VIP, &[])).unwrap();
    api.create(&slice("web-1", "web", &PODS[..2])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let args = [
        "--mode=ebpf".to_string(),
        "--source=kube".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--healthz-threshold=2s".into(),
    ];
    let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let wait_for = |want: u16, limit: Duration| {
        let deadline = Instant::now() + limit;
        loop {
            let (status, body) = get(&node, HEALTHZ, "/healthz");
            if status == want {
                return body;
            }
            assert!(Instant::now() < deadline, "/healthz stayed {status}, wanted {want}:\n{}", kpr.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let body = wait_for(200, Duration::from_secs(5));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        json["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')) && json["currentTime"].is_string(),
        "{body}"
    );

    api.stop();
    wait_for(503, Duration::from_secs(15));
    // Alive all the same, as kube-proxy: what is programmed keeps serving,
    // and a restart would not bring the API server back.
    assert_eq!(get(&node, HEALTHZ, "/livez").0, 200);
    api.resume().unwrap();
    wait_for(200, Duration::from_secs(40));
}

#[test]
fn logs_can_be_json() {
    root_or_skip!();
    let (node, _servers) = node();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &web_service("web", VIP, &PODS[..2])).unwrap();
    let args =
        ["--mode=ebpf".to_string(), format!("--source=dir:{}", dir.path().display()), "--log-format=json".into()];
    let kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();
    let log = kpr.log();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(log.lines().any(|l| l.contains("\"message\":\"synced\"")), "{log}");
}
