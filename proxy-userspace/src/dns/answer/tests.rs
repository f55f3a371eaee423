use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::rr::{Name, RData, RecordType};

use super::*;
use crate::{
    dns::zone::Zone,
    index::{Dirty, Index},
    testing::objects_with,
    validate::ModelConfig,
};

const CLUSTER: &str = "
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, fd00::10]
  ports: [{name: http, port: 80, protocol: TCP}, {name: dns, port: 53, protocol: UDP}, {port: 9000}]
---
kind: Service
metadata: {name: db, namespace: data}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
kind: EndpointSlice
metadata: {name: db-1, namespace: data, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.5], hostname: db-0, conditions: {ready: true}}
- {addresses: [10.244.2.6], conditions: {ready: true}}
- {addresses: [10.244.2.7], hostname: db-2, conditions: {ready: false}}
---
kind: Service
metadata: {name: search, namespace: default}
spec: {type: ExternalName, externalName: search.example.com.}
---
kind: Service
metadata: {name: alias, namespace: default}
spec: {type: ExternalName, externalName: web.default.svc.cluster.local}
---
kind: Service
metadata: {name: loop, namespace: default}
spec: {type: ExternalName, externalName: loop.default.svc.cluster.local}
---
kind: Service
metadata: {name: chain, namespace: default}
spec: {type: ExternalName, externalName: search.default.svc.cluster.local}
";

fn zone() -> Zone {
    let config = ModelConfig { dns: true, ..ModelConfig::default() };
    let index = Index::from_snapshot(objects_with(CLUSTER, &config));
    let mut zone = Zone::new("cluster.local.");
    zone.update(&index, &Dirty::All);
    zone
}

fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Option<Answer> {
    answer(zone, &Name::from_ascii(name).unwrap(), qtype, 5)
}

fn data(a: &Answer) -> Vec<String> {
    let mut out: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
    out.sort();
    out
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_cluster_ip_service_has_a_and_aaaa_records() {
    let zone = zone();
    let a = ask(&zone, "web.default.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!((a.rcode, data(&a)), (ResponseCode::NoError, vec!["10.96.0.10".to_string()]));
    assert_eq!(a.answers[0].ttl, 5);
    let aaaa = ask(&zone, "WEB.Default.svc.cluster.local.", RecordType::AAAA).unwrap();
    assert_eq!(data(&aaaa), ["fd00::10"], "names are compared without case");
    let mx = ask(&zone, "web.default.svc.cluster.local.", RecordType::MX).unwrap();
    assert_eq!((mx.rcode, mx.answers.len()), (ResponseCode::NoError, 0), "NODATA: the name exists");
}

#[test]
fn unknown_names_in_the_zone_are_nxdomain_and_others_are_not_answered() {
    let zone = zone();
    for name in [
        "nope.default.svc.cluster.local.",
        "web.default.svc.default.svc.cluster.local.",
        "web.default.svc.svc.cluster.local.",
        "web.nowhere.svc.cluster.local.",
        "x.web.default.svc.cluster.local.",
        "other.cluster.local.",
    ] {
        assert_eq!(ask(&zone, name, RecordType::A).unwrap().rcode, ResponseCode::NXDomain, "{name}");
    }
    // Names that exist without records: NODATA.
    for name in ["cluster.local.", "svc.cluster.local.", "default.svc.cluster.local.", "data.svc.cluster.local."] {
        let a = ask(&zone, name, RecordType::A).unwrap();
        assert_eq!((a.rcode, a.answers.len()), (ResponseCode::NoError, 0), "{name}");
    }
    assert!(ask(&zone, "example.com.", RecordType::A).is_none(), "forwarded");
    assert!(ask(&zone, "5.0.0.10.in-addr.arpa.", RecordType::PTR).is_none(), "an address the zone does not hold");
}

#[test]
fn a_headless_service_names_its_ready_endpoints() {
    let zone = zone();
    let a = ask(&zone, "db.data.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!(data(&a), ["10.244.1.5", "10.244.2.6"], "the unready endpoint is left out");
    let host = ask(&zone, "db-0.db.data.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!(data(&host), ["10.244.1.5"]);
    let dashed = ask(&zone, "10-244-2-6.db.data.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!(data(&dashed), ["10.244.2.6"], "an endpoint without hostname by its dashed address");
    let unready = ask(&zone, "db-2.db.data.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!(unready.rcode, ResponseCode::NXDomain);
}

#[test]
fn srv_records_name_the_service_or_each_endpoint() {
    let zone = zone();
    let srv = ask(&zone, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV).unwrap();
    assert_eq!(data(&srv), ["0 100 80 web.default.svc.cluster.local."]);
    let extra: Vec<String> = srv.additionals.iter().map(|r| format!("{} {}", r.name, r.data)).collect();
    assert_eq!(extra, ["web.default.svc.cluster.local. 10.96.0.10", "web.default.svc.cluster.local. fd00::10"]);
    let udp = ask(&zone, "_dns._udp.web.default.svc.cluster.local.", RecordType::SRV).unwrap();
    assert_eq!(data(&udp), ["0 100 53 web.default.svc.cluster.local."]);
    let wrong = ask(&zone, "_http._udp.web.default.svc.cluster.local.", RecordType::SRV).unwrap();
    assert_eq!(wrong.rcode, ResponseCode::NXDomain, "the port is TCP");
    // The name between the Service and its SRV records exists (RFC 8020: not NXDOMAIN).
    let between = ask(&zone, "_tcp.web.default.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!((between.rcode, between.answers.len()), (ResponseCode::NoError, 0));
    assert_eq!(
        ask(&zone, "_sctp.web.default.svc.cluster.local.", RecordType::A).unwrap().rcode,
        ResponseCode::NXDomain
    );

    let headless = ask(&zone, "_pg._tcp.db.data.svc.cluster.local.", RecordType::SRV).unwrap();
    assert_eq!(
        data(&headless),
        ["0 50 5432 10-244-2-6.db.data.svc.cluster.local.", "0 50 5432 db-0.db.data.svc.cluster.local."]
    );
    assert_eq!(headless.additionals.len(), 2);
}

#[test]
fn ptr_records_name_cluster_ips_and_headless_endpoints() {
    let zone = zone();
    let ptr = ask(&zone, "10.0.96.10.in-addr.arpa.", RecordType::PTR).unwrap();
    assert_eq!(data(&ptr), ["web.default.svc.cluster.local."]);
    let v6 = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
    assert_eq!(data(&ask(&zone, v6, RecordType::PTR).unwrap()), ["web.default.svc.cluster.local."]);
    let ep = ask(&zone, "5.1.244.10.in-addr.arpa.", RecordType::PTR).unwrap();
    assert_eq!(data(&ep), ["db-0.db.data.svc.cluster.local."]);
    // A negative answer about a reverse name carries the reverse zone's SOA.
    let soa = soa_for(&zone, &Name::from_ascii("10.0.96.10.in-addr.arpa.").unwrap(), 5).unwrap();
    assert_eq!(soa.name.to_string(), "in-addr.arpa.");
}

#[test]
fn external_names_are_cnames_chased_inside_the_zone() {
    let zone = zone();
    let outside = ask(&zone, "search.default.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!(data(&outside), ["search.example.com."]);
    assert_eq!(outside.chase, Some(Name::from_ascii("search.example.com.").unwrap()), "the server resolves it");
    let inside = ask(&zone, "alias.default.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!(data(&inside), ["10.96.0.10", "web.default.svc.cluster.local."]);
    assert_eq!(inside.chase, None);
    // ExternalName to ExternalName: both CNAMEs, and the last target left to chase.
    let chain = ask(&zone, "chain.default.svc.cluster.local.", RecordType::A).unwrap();
    assert_eq!(data(&chain), ["search.default.svc.cluster.local.", "search.example.com."]);
    assert_eq!(chain.chase, Some(Name::from_ascii("search.example.com.").unwrap()));
    // A Service naming itself ends after a few steps.
    let looped = ask(&zone, "loop.default.svc.cluster.local.", RecordType::A).unwrap();
    assert!(looped.answers.iter().all(|r| matches!(r.data, RData::CNAME(_))));
}

#[test]
fn the_schema_version_and_pod_names_are_answered() {
    let zone = zone();
    let txt = ask(&zone, "dns-version.cluster.local.", RecordType::TXT).unwrap();
    assert_eq!(data(&txt), ["1.1.0"]);
    let pod = ask(&zone, "10-244-1-9.default.pod.cluster.local.", RecordType::A).unwrap();
    assert_eq!(data(&pod), ["10.244.1.9"]);
    let soa = ask(&zone, "cluster.local.", RecordType::SOA).unwrap();
    assert_eq!(soa.answers.len(), 1);
}

#[test]
fn names_follow_their_service_in_and_out() {
    let config = ModelConfig { dns: true, ..ModelConfig::default() };
    let mut index = Index::default();
    let mut zone = Zone::new("cluster.local");
    let web = objects_with(CLUSTER, &config).objects.remove(0);
    index.apply(web);
    let dirty = index.take_dirty();
    zone.update(&index, &dirty);
    assert!(ask(&zone, "web.default.svc.cluster.local.", RecordType::A).unwrap().answers.len() == 1);
    let name = crate::name::ObjectName::new("default", "web");
    index.delete_service(&name);
    let dirty = index.take_dirty();
    zone.update(&index, &dirty);
    assert_eq!(ask(&zone, "web.default.svc.cluster.local.", RecordType::A).unwrap().rcode, ResponseCode::NXDomain);
    assert!(zone.names_of(&ip("10.96.0.10")).is_empty(), "its PTR goes with it");
    assert!(zone.names_of(&IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))).is_empty());
}
