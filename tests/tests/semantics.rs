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
    client::{Repeating, every_10ms, tcp_request},
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
    let sockets = Repeating::start(std::path::Path::new(PROBE), &node.pod("client").ns, &node.cgroup, addr).unwrap();
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
}

kpr_tests::in_both_modes!(rolling_update_never_refuses);
