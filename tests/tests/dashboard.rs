//! The dashboard in Debian's headless Chromium, on the demo's Services: it
//! loads without console errors, shows every Service and its backends, the
//! mode, health, sync chart and rejected objects, and its counters rise while
//! traffic flows, without a reload.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use kpr_tests::{
    browser::Browser,
    client::tcp_request,
    kpr::Kpr,
    manifests::write,
    node::VirtualNode,
    root_or_skip,
    servers::{self, Server},
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The pods manifests/demo names, and a client.
const PODS: [(&str, Ipv4Addr); 6] = [
    ("web-1", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-2", Ipv4Addr::new(10, 244, 0, 12)),
    ("web-3", Ipv4Addr::new(10, 244, 0, 13)),
    ("dns-1", Ipv4Addr::new(10, 244, 0, 21)),
    ("dns-2", Ipv4Addr::new(10, 244, 0, 22)),
    ("client", Ipv4Addr::new(10, 244, 0, 200)),
];
const DASHBOARD: &str = "127.0.0.1:10260";
const WEB: &str = "10.96.0.10:80/TCP";
const T: Duration = Duration::from_secs(3);

/// An SCTP Service: skipped, and listed with its reason.
const UNSUPPORTED: &str = "apiVersion: v1
kind: Service
metadata: {name: telco, namespace: default}
spec: {clusterIP: 10.96.0.40, ports: [{name: sig, port: 3868, protocol: SCTP}]}
";

fn packets(row: &str) -> String {
    format!("return Number(document.querySelector('{row} td.packets')?.textContent ?? -1);")
}

#[test]
fn the_dashboard_shows_services_and_live_counters_in_chromium() {
    root_or_skip!();
    let node = VirtualNode::new(&PODS).unwrap();
    let _servers: Vec<Server> =
        PODS[..3].iter().map(|(n, _)| servers::tcp(&node.pod(n).ns, 8080, n).unwrap()).collect();
    // The demo's manifests, and one object kpr must skip.
    let dir = tempfile::tempdir().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/demo");
    for file in ["web.yaml", "dns.yaml", "maintenance.yaml"] {
        std::fs::copy(demo.join(file), dir.path().join(file)).unwrap();
    }
    write(dir.path(), "telco.yaml", UNSUPPORTED).unwrap();
    let args = [
        "--mode=ebpf".to_string(),
        format!("--source=dir:{}", dir.path().display()),
        format!("--dashboard-bind-address={DASHBOARD}"),
        // The DNS add-on, whose names the page lists too.
        "--dns-listen=127.0.0.1:5300".into(),
        "--dns-upstream=127.0.0.1:5301".into(),
    ];
    let _kpr = Kpr::start_with(&node, &args, &dir.path().join("kpr.log"), "synced").unwrap();

    let browser = Browser::start(&node.ns).expect("Chromium starts");
    browser.goto(&format!("http://{DASHBOARD}/")).unwrap();
    let web_row = format!("tr.service[data-frontend=\"{WEB}\"]");
    browser
        .wait_for(&format!("return !!document.querySelector('{web_row}');"), T, |v| v == true)
        .expect("the web Service is listed");
    // Marks this page load: if the page reloaded, the mark would be gone.
    browser.eval("window.loadedOnce = true; return null;").unwrap();

    let rows = browser
        .eval("return [...document.querySelectorAll('tr.service')].map(r => r.cells[0].textContent + ' ' + r.dataset.frontend);")
        .unwrap();
    assert_eq!(
        rows,
        serde_json::json!([
            "default/maintenance:http 10.96.0.99:80/TCP",
            "default/web:http 10.96.0.10:80/TCP",
            "kube-system/dns:dns 10.96.0.53:53/UDP",
        ]),
        "every Service of the demo, by name"
    );
    let backends = |frontend: &str| {
        browser
            .eval(&format!(
                "return [...document.querySelectorAll('tr.backend[data-frontend=\"{frontend}\"]')].map(r => r.dataset.backend + ' ' + r.cells[4].textContent);"
            ))
            .unwrap()
    };
    assert_eq!(
        backends(WEB),
        serde_json::json!(["10.244.0.11:8080 active", "10.244.0.12:8080 active", "10.244.0.13:8080 active"])
    );
    assert_eq!(
        backends("10.96.0.53:53/UDP"),
        serde_json::json!(["10.244.0.21:5353 active", "10.244.0.22:5353 active"])
    );
    assert_eq!(backends("10.96.0.99:80/TCP"), serde_json::json!([]), "maintenance has no endpoints");
    let text = |id: &str| browser.eval(&format!("return document.getElementById('{id}').textContent;")).unwrap();
    assert_eq!(text("mode"), "mode: ebpf");
    assert_eq!(text("health"), "healthy");
    let rejected = text("rejected");
    assert!(rejected.as_str().unwrap().contains("telco"), "rejected objects are listed: {rejected}");
    assert!(rejected.as_str().unwrap().contains("SCTP"), "with their reason: {rejected}");
    let names = browser
        .eval("return [...document.querySelectorAll('#dns tbody tr')].map(r => [...r.cells].map(c => c.textContent).join(' '));")
        .unwrap();
    assert_eq!(
        names,
        serde_json::json!([
            "maintenance.default.svc.cluster.local ClusterIP 10.96.0.99",
            // Not proxied in eBPF mode (SCTP), named all the same.
            "telco.default.svc.cluster.local ClusterIP 10.96.0.40",
            "web.default.svc.cluster.local ClusterIP 10.96.0.10",
            "dns.kube-system.svc.cluster.local ClusterIP 10.96.0.53",
        ]),
        "the DNS add-on's names"
    );
    let bars = browser.eval("return document.querySelectorAll('#syncs rect').length;").unwrap();
    assert!(bars.as_u64().unwrap() >= 1, "the sync chart has a bar per sync");

    let before = browser.eval(&packets(&web_row)).unwrap().as_f64().unwrap();
    assert_eq!(before, 0.0, "no traffic yet");
    let connections = 20;
    node.pod("client")
        .ns
        .run(move || (0..connections).for_each(|_| drop(tcp_request(SocketAddr::from((VIP, 80)), T).unwrap())))
        .unwrap();
    // Seven packets per connection at least (see the metrics test).
    let after = browser
        .wait_for(&packets(&web_row), T, |v| v.as_f64().unwrap_or(0.0) >= 7.0 * connections as f64)
        .expect("the Service's counter rises");
    for (_, ip) in &PODS[..3] {
        let row = format!("tr.backend[data-backend=\"{ip}:8080\"][data-frontend=\"{WEB}\"]");
        browser.wait_for(&packets(&row), T, |v| v.as_f64().unwrap_or(0.0) > 0.0).expect("each backend's counter rises");
    }
    assert_eq!(browser.eval("return window.loadedOnce === true;").unwrap(), Value::Bool(true), "no reload");
    eprintln!("web packets: {before} -> {after}");

    let errors = browser.console_errors().unwrap();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}
