use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use crate::{
    frontend::{Protocol, ServiceType},
    testing::{objects, objects_with},
    validate::ModelConfig,
};

fn frontend(m: &Model, vip: [u8; 4], port: u16, protocol: Protocol) -> &Frontend {
    m.frontends
        .get(&FrontendKey { vip: vip.into(), port, protocol })
        .unwrap_or_else(|| panic!("no frontend {vip:?}:{port}; have {:?}", m.frontends.keys()))
}

fn ips<A: Served>(f: &Frontend<A>) -> Vec<String> {
    f.backends.iter().map(|e| e.to_string()).collect()
}

const WEB: &str = "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web, protocol: TCP}
  - {name: metrics, port: 9090, targetPort: 9100}
  - {name: dns, port: 53, protocol: UDP}
";

#[test]
fn named_target_ports_resolve_through_the_slices() {
    let snap = objects(&format!(
        "{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: metrics, port: 9100}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
  conditions: {{ready: true}}
"
    ));
    let (m, rejected) = build(snap);
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp)), ["10.244.0.11:8080", "10.244.0.12:8080"]);
    assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 9090, Protocol::Tcp)), ["10.244.0.11:9100", "10.244.0.12:9100"]);
    assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 53, Protocol::Udp)), ["10.244.0.11:5353", "10.244.0.12:5353"]);
    assert_eq!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).service.to_string(), "shop/web:http");
}

#[test]
fn slices_are_merged_deduplicated_and_only_ready_endpoints_count() {
    let snap = objects(&format!(
        "{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.13]
  conditions: {{ready: false, terminating: true}}
---
kind: EndpointSlice
metadata: {{name: web-2, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
---
kind: EndpointSlice
metadata: {{name: other, namespace: elsewhere, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.0.99]
"
    ));
    let (m, _) = build(snap);
    assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp)), ["10.244.0.11:8080", "10.244.0.12:8080"]);
    assert_eq!(m.backend_count(), 2, "counted as frontends are built");
}

#[test]
fn headless_and_external_name_services_are_ignored_quietly_and_ipv6_ones_go_to_their_family() {
    let snap = objects(
        "
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
---
kind: Service
metadata: {name: v6}
spec: {clusterIP: 'fd00::10', clusterIPs: ['fd00::10'], ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: v6-1, labels: {kubernetes.io/service-name: v6}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00::1']}]
",
    );
    let (m, rejected): (Model, _) = build(snap.clone());
    assert!(m.frontends.is_empty());
    assert!(rejected.is_empty(), "{rejected:?}");
    let (v6, _): (Model<Ipv6Addr>, _) = build(snap);
    let keys: Vec<String> = v6.frontends.values().map(|f| format!("{} -> {:?}", f.key, ips(f))).collect();
    assert_eq!(keys, ["[fd00::10]:80/TCP -> [\"[fd00::1]:8080\"]"]);
}

#[test]
fn invalid_parts_are_rejected_with_reasons_and_the_rest_kept() {
    let snap = objects(
        "
kind: Service
metadata: {name: mixed}
spec:
  clusterIP: 10.96.0.5
  ports: [{name: a, port: 80}, {name: s, port: 80, protocol: SCTP}]
---
kind: Service
metadata: {name: noip}
spec: {ports: [{port: 80}]}
---
kind: Service
metadata: {name: badip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
kind: Service
metadata: {name: other}
spec: {clusterIP: 10.96.0.5, ports: [{name: a, port: 80}]}
---
kind: EndpointSlice
metadata: {name: nolabel}
addressType: IPv4
endpoints: []
---
kind: EndpointSlice
metadata: {name: mixed-1, labels: {kubernetes.io/service-name: mixed}}
addressType: IPv4
ports: [{name: a, port: 8080}]
endpoints: [{addresses: [not-an-ip]}, {addresses: [10.244.0.7]}]
",
    );
    let (m, rejected) = build(snap);
    let reasons: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
    let has = |s: &str| reasons.iter().any(|r| r.contains(s));
    assert!(has("Service default/mixed: port s: SCTP is served in iptables mode only"), "{reasons:#?}");
    // Skipped quietly, as kube-proxy does.
    assert!(!has("default/noip"), "{reasons:#?}");
    assert!(has("Service default/badip: spec.clusterIP \"10.96.0.300\" is not an IP address"), "{reasons:#?}");
    assert!(
        has("Service default/other: 10.96.0.5:80/TCP is already used by default/mixed:a, an older Service"),
        "{reasons:#?}"
    );
    assert!(has("EndpointSlice default/nolabel: has no kubernetes.io/service-name label"), "{reasons:#?}");
    assert!(has("EndpointSlice default/mixed-1: endpoint address \"not-an-ip\""), "{reasons:#?}");
    assert_eq!(reasons.len(), 5, "{reasons:#?}");
    assert_eq!(ips(frontend(&m, [10, 96, 0, 5], 80, Protocol::Tcp)), ["10.244.0.7:8080"]);
    assert_eq!(m.frontends.len(), 1);
}

#[test]
fn a_service_without_slices_has_no_backends() {
    let (m, _) = build(objects(WEB));
    assert!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).backends.is_empty());
}

#[test]
fn the_service_proxy_name_label_selects_the_proxy() {
    let yaml = "
kind: Service
metadata: {name: mine, labels: {service.kubernetes.io/service-proxy-name: kpr}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
kind: Service
metadata: {name: theirs, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
kind: Service
metadata: {name: unlabelled}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
";
    let names = |cfg: &ModelConfig| -> Vec<String> {
        build::<Ipv4Addr>(objects_with(yaml, cfg))
            .0
            .frontends
            .values()
            .map(|f| f.service.service.name().to_string())
            .collect()
    };
    assert_eq!(names(&ModelConfig::default()), ["unlabelled"]);
    assert_eq!(names(&ModelConfig { service_proxy_name: Some("kpr".into()), ..Default::default() }), ["mine"]);
    assert_eq!(
        ModelConfig::default().label_selector(),
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    );
}

#[test]
fn node_port_and_load_balancer_services_carry_their_extra_frontends() {
    let yaml = "
kind: Service
metadata: {name: np}
spec: {type: NodePort, clusterIP: 10.96.0.7, ports: [{port: 80, nodePort: 30080}]}
---
kind: Service
metadata: {name: lb}
spec: {type: LoadBalancer, clusterIP: 10.96.0.8, ports: [{port: 443, nodePort: 30443}]}
status: {loadBalancer: {ingress: [{ip: 192.0.2.10}, {hostname: lb.example.com}]}}
";
    let (m, rejected) = build(objects(yaml));
    assert!(rejected.is_empty());
    let np = frontend(&m, [10, 96, 0, 7], 80, Protocol::Tcp);
    let ext = np.external.as_deref().unwrap();
    assert_eq!((np.service_type, ext.node_port, ext.local_only), (ServiceType::NodePort, Some(30080), false));
    let lb = frontend(&m, [10, 96, 0, 8], 443, Protocol::Tcp);
    assert_eq!(lb.service_type, ServiceType::LoadBalancer);
    assert_eq!(*lb.external.as_deref().unwrap().load_balancer_ips, [Ipv4Addr::new(192, 0, 2, 10)]);
}

#[test]
fn external_traffic_policy_local_keeps_this_nodes_endpoints() {
    let yaml = "
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.8
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  externalIPs: [198.51.100.7, not-an-ip, 2001:db8::7]
  loadBalancerSourceRanges: [203.0.113.0/25, ' 192.0.2.0/24', 300.0.0.0/8]
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.10}, {ip: 192.0.2.11, ipMode: Proxy}]}}
---
kind: EndpointSlice
metadata: {name: lb-1, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.0.11], nodeName: node-a}
- {addresses: [10.244.1.11], nodeName: node-b}
- {addresses: [10.244.0.12], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
";
    let config = ModelConfig { node_name: "node-a".into(), ..Default::default() };
    let (m, rejected) = build(objects_with(yaml, &config));
    let reasons: Vec<_> = rejected.iter().map(|r| r.kind).collect();
    assert_eq!(reasons, [RejectReason::InvalidExternalAddress, RejectReason::InvalidSourceRange], "{rejected:?}");
    let f = frontend(&m, [10, 96, 0, 8], 80, Protocol::Tcp);
    let ext = f.external.as_deref().unwrap();
    assert!(ext.local_only);
    assert_eq!((ext.node_port, ext.health_check_node_port), (Some(30080), Some(32000)));
    assert_eq!(*ext.external_ips, [Ipv4Addr::new(198, 51, 100, 7)]);
    // ipMode Proxy: the load balancer proxies to the node; nothing is programmed for it.
    assert_eq!(*ext.load_balancer_ips, [Ipv4Addr::new(192, 0, 2, 10)]);
    assert_eq!(ext.source_ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>(), ["203.0.113.0/25", "192.0.2.0/24"]);
    assert_eq!(ips(f), ["10.244.0.11:8080", "10.244.1.11:8080"]);
    let local: Vec<String> = f.local_backends().iter().map(|e| e.to_string()).collect();
    assert_eq!(local, ["10.244.0.11:8080"], "only this node's ready endpoint");

    // The ready local endpoint leaves: the terminating one still serving stands in.
    let (m, _) = build(objects_with(&yaml.replace("- {addresses: [10.244.0.11], nodeName: node-a}\n", ""), &config));
    let f = frontend(&m, [10, 96, 0, 8], 80, Protocol::Tcp);
    assert_eq!(f.local_backends().iter().map(|e| e.to_string()).collect::<Vec<_>>(), ["10.244.0.12:8080"]);
}

#[test]
fn terminating_endpoints_are_kept_apart_from_ready_ones() {
    let snap = objects(&format!(
        "{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.244.0.11]
  conditions: {{ready: true}}
- addresses: [10.244.0.12]
  conditions: {{ready: false, serving: true, terminating: true}}
- addresses: [10.244.0.13]
  conditions: {{ready: false, serving: false, terminating: true}}
- addresses: [10.244.0.14]
  conditions: {{ready: false}}
"
    ));
    let (m, _) = build(snap);
    let f = frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp);
    assert_eq!(ips(f), ["10.244.0.11:8080"]);
    assert_eq!(*f.terminating, [Endpoint { ip: Ipv4Addr::new(10, 244, 0, 12), port: 8080 }]);
}

#[test]
fn headless_slices_and_other_proxies_slices_are_ignored() {
    let snap = objects(&format!("{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web, service.kubernetes.io/headless: ''}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.244.0.11]}}]
"));
    let (m, rejected) = build(snap);
    assert!(rejected.is_empty());
    assert!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).backends.is_empty());
}

#[test]
fn rejections_carry_a_metric_reason() {
    let (_, rejected) = build::<Ipv4Addr>(objects(
        "
kind: Service
metadata: {name: s}
spec: {clusterIP: 10.96.0.9, ports: [{port: 9, protocol: SCTP}]}
",
    ));
    assert_eq!(rejected[0].kind.label(), "unsupported_protocol");
}

/// kube-proxy's dual-stack proxier: each family's proxier takes the
/// ClusterIP of its family and the EndpointSlices of its address type.
#[test]
fn a_dual_stack_service_is_served_in_each_family_from_that_familys_slices() {
    let snap = objects(
        "
kind: Service
metadata: {name: ds, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 'fd00::10'
  clusterIPs: ['fd00::10', 10.96.0.44]
  ipFamilies: [IPv6, IPv4]
  ipFamilyPolicy: RequireDualStack
  externalIPs: [192.0.2.7, '2001:db8::7']
  loadBalancerSourceRanges: [198.51.100.0/24, '2001:db8:1::/48']
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: '2001:db8::9'}, {ip: 192.0.2.9}]}}
---
kind: EndpointSlice
metadata: {name: ds-v4, namespace: shop, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.5]}]
---
kind: EndpointSlice
metadata: {name: ds-v6, namespace: shop, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00:244::5']}, {addresses: ['fd00:244::6']}]
",
    );
    let (v4, rejected): (Model, _) = build(snap.clone());
    assert!(rejected.is_empty(), "{rejected:?}");
    let f = frontend(&v4, [10, 96, 0, 44], 80, Protocol::Tcp);
    assert_eq!(ips(f), ["10.244.0.5:8080"]);
    let ext = f.external.as_deref().unwrap();
    assert_eq!(
        (&*ext.external_ips, &*ext.load_balancer_ips),
        (&[[192, 0, 2, 7].into()][..], &[[192, 0, 2, 9].into()][..])
    );
    assert_eq!(ext.source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(), ["198.51.100.0/24"]);
    assert_eq!(ext.node_port, Some(30080));

    let (v6, _): (Model<Ipv6Addr>, _) = build(snap);
    let vip: Ipv6Addr = "fd00::10".parse().unwrap();
    let f = &v6.frontends[&FrontendKey { vip, port: 80, protocol: Protocol::Tcp }];
    assert_eq!(ips(f), ["[fd00:244::5]:8080", "[fd00:244::6]:8080"]);
    let ext = f.external.as_deref().unwrap();
    let text = |ips: &[Ipv6Addr]| ips.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(
        (text(&ext.external_ips), text(&ext.load_balancer_ips)),
        (vec!["2001:db8::7".to_string()], vec!["2001:db8::9".to_string()])
    );
    assert_eq!(ext.source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(), ["2001:db8:1::/48"]);
    assert_eq!(ext.node_port, Some(30080), "the node port is the same in both families");
    assert_eq!(v6.frontends.len(), 1);
}

#[test]
fn an_endpoint_of_the_other_family_in_a_slice_is_rejected_and_the_rest_kept() {
    let (v6, rejected): (Model<Ipv6Addr>, _) = build(objects(
        "
kind: Service
metadata: {name: v6}
spec: {clusterIP: 'fd00::10', ports: [{port: 80}]}
---
kind: EndpointSlice
metadata: {name: v6-1, labels: {kubernetes.io/service-name: v6}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.1]}, {addresses: ['fd00::1']}]
",
    ));
    let reasons: Vec<&str> = rejected.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons, ["endpoint address \"10.244.0.1\" is not an IPv6 address"]);
    assert_eq!(ips(v6.frontends.values().next().unwrap()), ["[fd00::1]:80"]);
}

const CLASH: &str = "
kind: Service
metadata: {name: a-young, creationTimestamp: '2026-02-01T00:00:00Z'}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80}, {name: other, port: 81}]}
---
kind: Service
metadata: {name: z-old, creationTimestamp: '2026-01-01T00:00:00Z'}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}
";

fn owners(m: &Model) -> Vec<String> {
    m.frontends.values().map(|f| format!("{} {}", f.key, f.service)).collect()
}

#[test]
fn the_older_service_keeps_a_clashing_frontend_in_any_arrival_order() {
    let (cold, rejected) = build(objects(CLASH));
    assert_eq!(owners(&cold), ["10.96.0.5:80/TCP default/z-old", "10.96.0.5:81/TCP default/a-young:other"]);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].to_string().contains("Service default/a-young: 10.96.0.5:80/TCP is already used by default/z-old")
    );
    for order in [[0, 1], [1, 0]] {
        let docs = objects(CLASH).objects;
        let (mut index, mut model) = (Index::default(), Model::default());
        for i in order {
            index.apply(docs[i].clone());
            let dirty = index.take_dirty();
            model.update(&index, dirty);
        }
        assert_eq!(owners(&model), owners(&cold), "arrival order {order:?}");
        assert_eq!(model.rejection_count(), 1);
    }
}

#[test]
fn a_lost_frontend_is_taken_over_when_its_owner_goes() {
    let snapshot = objects(CLASH);
    let mut index = Index::from_snapshot(snapshot);
    let mut model = Model::default();
    step(&mut model, &mut index);
    index.delete_service(&ObjectName::new("default", "z-old"));
    let update = step(&mut model, &mut index);
    assert_eq!(owners(&model), ["10.96.0.5:80/TCP default/a-young", "10.96.0.5:81/TCP default/a-young:other"]);
    assert_eq!(update.changes.len(), 1, "the frontend changed hands: {:?}", update.changes);
    let change = &update.changes[0];
    assert_eq!(change.before.as_ref().unwrap().service.to_string(), "default/z-old");
    assert!(change.exists);
    assert_eq!(model.frontends[&change.key].service.to_string(), "default/a-young");
    assert_eq!(model.rejection_count(), 0);
}

/// Recomputes what changed in `index`.
fn step(model: &mut Model, index: &mut Index) -> Update {
    let dirty = index.take_dirty();
    model.update(index, dirty)
}

#[test]
fn an_update_returns_only_what_changed() {
    let mut index = Index::from_snapshot(objects(WEB));
    let mut model = Model::default();
    let first = step(&mut model, &mut index);
    assert_eq!(first.changes.len(), 3);
    assert!(first.changes.iter().all(|c| c.before.is_none() && c.exists));
    for o in objects(WEB).objects {
        index.apply(o);
    }
    assert!(step(&mut model, &mut index).changes.is_empty(), "the same object again changes nothing");
    index.delete_service(&ObjectName::new("shop", "web"));
    let gone = step(&mut model, &mut index);
    assert_eq!(gone.changes.len(), 3);
    assert!(gone.changes.iter().all(|c| !c.exists));
    assert!(model.frontends.is_empty());
    assert_eq!(model.backend_count(), 0);
}

#[test]
fn a_port_listed_twice_in_one_service_is_one_frontend_of_its_first_port() {
    let snap = objects(
        "
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: a, port: 80}
  - {name: b, port: 80}
",
    );
    let (m, rejected) = build(snap);
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(m.frontends.len(), 1);
    assert_eq!(frontend(&m, [10, 96, 0, 10], 80, Protocol::Tcp).service.to_string(), "shop/web:a");
}

#[test]
fn an_external_address_freed_by_the_older_service_goes_to_the_younger() {
    let yaml = "
kind: Service
metadata: {name: young, creationTimestamp: '2026-02-01T00:00:00Z'}
spec: {type: NodePort, clusterIP: 10.96.0.6, externalIPs: [198.51.100.9], ports: [{port: 80, nodePort: 30009}]}
---
kind: Service
metadata: {name: old, creationTimestamp: '2026-01-01T00:00:00Z'}
spec: {type: NodePort, clusterIP: 10.96.0.7, externalIPs: [198.51.100.9], ports: [{port: 80, nodePort: 30009}]}
";
    let docs = objects(yaml).objects;
    let (mut index, mut model) = (Index::default(), Model::default());
    for doc in &docs {
        index.apply(doc.clone());
    }
    let dirty = index.take_dirty();
    let update = model.update(&index, dirty);
    let external = |m: &Model, vip: [u8; 4]| frontend(m, vip, 80, Protocol::Tcp).external.clone();
    assert!(external(&model, [10, 96, 0, 6]).is_none(), "the younger loses its external IP and node port");
    let old = external(&model, [10, 96, 0, 7]).unwrap();
    assert_eq!((old.node_port, &*old.external_ips), (Some(30009), &[Ipv4Addr::new(198, 51, 100, 9)][..]));
    assert_eq!(update.new_rejections.len(), 1, "{:?}", update.new_rejections);
    let reason = &update.new_rejections[0].reason;
    assert!(
        reason.contains("198.51.100.9:80/TCP, node port 30009/TCP of default/young: already used by default/old"),
        "{reason}"
    );

    // The older Service goes: the younger takes the addresses over, reported no more.
    index.delete_service(&ObjectName::new("default", "old"));
    let dirty = index.take_dirty();
    model.update(&index, dirty);
    let young = external(&model, [10, 96, 0, 6]).unwrap();
    assert_eq!((young.node_port, &*young.external_ips), (Some(30009), &[Ipv4Addr::new(198, 51, 100, 9)][..]));
    assert_eq!(model.rejection_count(), 0);
}

#[test]
fn a_dns_capture_leads_the_dns_port_to_the_add_on_while_it_answers() {
    let snap = objects(&format!(
        "{WEB}---
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: dns, port: 5353, protocol: UDP}}, {{name: metrics, port: 9100}}]
endpoints:
- addresses: [10.244.0.11]
"
    ));
    let mut index = Index::from_snapshot(snap);
    let mut m = Model::default();
    let dirty = index.take_dirty();
    m.update(&index, dirty);
    let capture = |answering| DnsCapture {
        service: ObjectName::new("shop", "web"),
        to: Endpoint { ip: Ipv4Addr::new(169, 254, 20, 10), port: 53 },
        answering,
    };
    assert!(index.set_dns_capture(Some(capture(true))));
    let dirty = index.take_dirty();
    let update = m.update(&index, dirty);
    assert_eq!(update.changes.len(), 1, "the DNS port alone: {:?}", update.changes);
    assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 53, Protocol::Udp)), ["169.254.20.10:53"]);
    assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 9090, Protocol::Tcp)), ["10.244.0.11:9100"], "other ports as before");
    // The add-on stops answering: the Service's endpoints again.
    assert!(index.set_dns_capture(Some(capture(false))));
    let dirty = index.take_dirty();
    m.update(&index, dirty);
    assert_eq!(ips(frontend(&m, [10, 96, 0, 10], 53, Protocol::Udp)), ["10.244.0.11:5353"]);
    assert!(!index.set_dns_capture(Some(capture(false))), "no change, nothing to recompute");
}
