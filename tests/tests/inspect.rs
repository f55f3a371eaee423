//! The inspection commands read the pinned maps: `kpr service list` equals
//! the model the test programmed, `kpr conntrack list` shows the flows the
//! test made, `kpr stats` their traffic, `kpr status` the attached programs
//! and map fill, and all of them still work once the agent has stopped.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use kpr_tests::{
    client::tcp_request,
    kpr::{self, Kpr, Mode},
    manifests::{web_service, write},
    node::{self, VirtualNode},
    root_or_skip,
    servers::{self, Server},
};
use proxy_userspace::{
    frontend::{Endpoint, FrontendKey},
    index::Snapshot,
    inspect::{BackendEntry, ServiceEntry},
    model,
    source::dir::parse_file,
    validate::ModelConfig,
};
use serde_json::Value;

const WEB_VIP: Ipv4Addr = node::WEB_VIP;
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const PODS: [(&str, Ipv4Addr); 3] = node::WEB_AND_CLIENT;
const T: Duration = Duration::from_secs(3);

/// A NodePort Service with one ready and one terminating endpoint: the
/// maps must carry the type and both states.
const API: &str = "apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 8000, targetPort: 8080, nodePort: 30080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: default, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.11]
  conditions: {ready: true}
- addresses: [10.244.0.12]
  conditions: {ready: false, serving: true, terminating: true}
";

/// What `kpr service list` must show for the manifests in `dir`, worked
/// out from the model the agent builds from them: each ClusterIP frontend,
/// and each node port on the node's address.
fn expected(dir: &Path) -> Vec<(String, String, Vec<BackendEntry>)> {
    let mut snap = Snapshot::default();
    for file in ["web.yaml", "api.yaml"] {
        let path = dir.join(file);
        let parsed = parse_file(&path, &std::fs::read(&path).unwrap(), &ModelConfig::default());
        snap.objects.extend(parsed.objects);
        snap.unreadable.extend(parsed.unreadable);
    }
    let (model, rejected) = model::build(snap);
    assert!(rejected.is_empty(), "{rejected:?}");
    model
        .frontends
        .values()
        .flat_map(|f| {
            let entry = |e: &Endpoint, state: &str| BackendEntry {
                address: format!("{}:{}", e.ip, e.port),
                state: state.into(),
            };
            let backends: Vec<BackendEntry> = f
                .backends
                .iter()
                .map(|e| entry(e, "active"))
                .chain(f.terminating.iter().map(|e| entry(e, "terminating")))
                .collect();
            let node_port = f.external.as_deref().and_then(|e| e.node_port).map(|port| {
                let key = FrontendKey { vip: node::NODE_ADDRESS, port, protocol: f.key.protocol };
                (key.to_string(), "node-port".to_string(), backends.clone())
            });
            std::iter::once((f.key.to_string(), format!("{:?}", f.service_type), backends)).chain(node_port)
        })
        .collect()
}

fn json(node: &VirtualNode, args: &[&str]) -> Value {
    let root = format!("--bpf-root={}", node.bpf_root().display());
    let mut all = args.to_vec();
    all.extend(["-o", "json", &root]);
    let out = kpr::command(&node.ns, &all).unwrap_or_else(|e| panic!("kpr {args:?}: {e:#}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kpr {args:?} printed no JSON ({e}):\n{out}"))
}

fn services(node: &VirtualNode) -> Vec<(String, String, Vec<BackendEntry>)> {
    let list: Vec<ServiceEntry> = serde_json::from_value(json(node, &["service", "list"])).unwrap();
    list.into_iter().map(|s| (s.frontend, s.service_type, s.backends)).collect()
}

#[test]
fn inspection_reads_the_pinned_maps_with_the_agent_up_and_down() {
    root_or_skip!();
    let node = VirtualNode::new(&PODS).unwrap();
    let _servers: Vec<Server> =
        PODS[..2].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 8080, n).unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.yaml", &web_service("web", WEB_VIP, &PODS[..2])).unwrap();
    write(dir.path(), "api.yaml", API).unwrap();
    let log = dir.path().join("kpr.log");
    let mut agent = Kpr::start(&node, Mode::Ebpf, dir.path(), &log).unwrap();

    let want = expected(dir.path());
    assert_eq!(want.len(), 4, "web http + dns, api http and its node port");
    assert_eq!(services(&node), want, "kpr service list equals the model");

    // Ten connections to web, five to api (its only active backend serves).
    let connections = node
        .pod("client")
        .ns
        .run(|| {
            (0..10).for_each(|_| drop(tcp_request(SocketAddr::from((WEB_VIP, 80)), T).unwrap()));
            (0..5).for_each(|_| drop(tcp_request(SocketAddr::from((API_VIP, 8000)), T).unwrap()));
            15
        })
        .unwrap();

    let flows = json(&node, &["conntrack", "list"]);
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), connections, "one tracked flow per connection: {flows:#?}");
    for f in flows {
        assert_eq!(f["protocol"], "TCP");
        assert!(f["client"].as_str().unwrap().starts_with("10.244.0.100:"), "{f}");
        assert_eq!(f["reply_tracked"], true, "{f}");
        // Closed connections linger for seconds, not the hours of an established one.
        assert_eq!(f["state"], "closing", "{f}");
        assert!(f["expires_in"].as_u64().unwrap() <= 10, "{f}");
        match f["frontend"].as_str().unwrap() {
            "10.96.0.10:80" => {
                assert!(["10.244.0.11:8080", "10.244.0.12:8080"].contains(&f["backend"].as_str().unwrap()))
            }
            "10.96.0.30:8000" => assert_eq!(f["backend"], "10.244.0.11:8080", "never the terminating endpoint"),
            other => panic!("unexpected frontend {other}"),
        }
    }

    let stats = json(&node, &["stats"]);
    assert!(stats["datapath"]["translated"].as_u64().unwrap() >= 4 * connections as u64, "{stats:#}");
    let web = stats["services"].as_array().unwrap().iter().find(|s| s["frontend"] == "10.96.0.10:80/TCP").unwrap();
    let web_packets = web["packets"].as_u64().unwrap();
    assert!(web_packets >= 7 * 10, "SYN, ACK, request, FIN, ACK out, SYN-ACK, reply back per connection: {web}");
    let by_backend: u64 = web["backends"].as_object().unwrap().values().map(|c| c["packets"].as_u64().unwrap()).sum();
    // The maps are read one after the other: a late closing packet may land in between.
    assert!(web_packets.abs_diff(by_backend) <= 2, "backend shares add up to the Service: {web}");
    let fill = |name: &str| stats["maps"].as_array().unwrap().iter().find(|m| m["map"] == name).cloned().unwrap();
    assert_eq!(fill("SERVICES")["entries"], 6, "3 ClusterIP frontends, 2 VIP markers and api's node port");
    assert_eq!(fill("BACKENDS")["entries"], 6, "2 + 2 for web, 1 active + 1 terminating for api");
    assert_eq!(fill("CT_TCP")["entries"], 2 * connections, "a service and a reply entry per connection");
    assert_eq!(fill("CT_TCP")["max_entries"], 2 * proxy_common::maps::DEFAULT_CONNTRACK_MAX);
    assert_eq!(fill("CT_ANY")["entries"], 0);

    let state = format!("--state-dir={}", kpr::state_dir(&log).display());
    let status = json(&node, &["status", &state]);
    assert_eq!(status["mode"], "ebpf");
    assert_eq!(status["agent_running"], true);
    for iface in node.interfaces() {
        let programs = status["attached"][&iface].as_array().unwrap_or_else(|| panic!("{status:#}"));
        for program in ["kpr_from_pod", "kpr_to_pod"] {
            assert!(programs.iter().any(|p| p.as_str().unwrap().starts_with(program)), "{iface}: {status:#}");
        }
    }
    assert!(status["maps"].as_array().unwrap().iter().any(|m| m["map"] == "SERVICES" && m["entries"] == 6));
    let text = kpr::command(&node.ns, &["status", &state, &format!("--bpf-root={}", node.bpf_root().display())]);
    assert!(text.unwrap().contains("kpr_from_pod"));

    // With the agent down, the maps still say what was programmed.
    agent.interrupt().unwrap();
    assert_eq!(services(&node), want, "kpr service list with the agent stopped");
    assert_eq!(json(&node, &["conntrack", "list"]).as_array().unwrap().len(), connections);
    let status = json(&node, &["status", &state]);
    assert_eq!(status["agent_running"], false);
    // Its programs stay attached (pinned links), so Services keep working
    // until the next start takes them over, or `kpr cleanup`.
    let attached = status["attached"][&node.interfaces()[0]].as_array().unwrap().len();
    assert_eq!(attached, 2, "still attached: {status:#}");

    // `kpr cleanup` removes the pins from the node's bpffs; the commands then say what is wrong.
    let pins = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(node.bpf_root().join("kpr").join(dir))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    let maps_dir = format!("maps-v{}", proxy_common::maps::LAYOUT);
    let mut all_maps = proxy_common::maps::ALL_MAPS.map(String::from).to_vec();
    all_maps.extend(proxy_common::maps::SOCKET_STORAGE.map(String::from));
    all_maps.sort();
    assert_eq!(pins(&maps_dir), all_maps, "every map pinned while the agent is down");
    let links = pins("links");
    for iface in node.interfaces() {
        for hook in ["ingress", "egress"] {
            let pinned = links.iter().any(|l| l.starts_with("tc-") && l.ends_with(&format!("-{iface}-{hook}")));
            assert!(pinned, "{iface} {hook}: {links:?}");
        }
    }
    // Eight address hooks and the release hook; the egress fence waits
    // for a frontend that needs it, and these Services have none.
    assert_eq!(links.iter().filter(|l| l.starts_with("cgroup-")).count(), 9, "the socket hooks: {links:?}");
    assert!(!links.iter().any(|l| l.ends_with("kpr_sock_egress")), "no egress fence: {links:?}");
    let root = format!("--bpf-root={}", node.bpf_root().display());
    kpr::command(&node.ns, &["cleanup", &root]).unwrap();
    assert!(!node.bpf_root().join("kpr").exists(), "the pin folder is gone: {:?}", pins(""));
    let err = kpr::command(&node.ns, &["service", "list", &root]).unwrap_err();
    assert!(format!("{err:#}").contains("no pinned kpr maps"), "{err:#}");
}
