use std::sync::RwLock;

use hickory_proto::rr::Name;

use super::*;
use crate::{
    dns::zone::Zone,
    index::{Dirty, Index},
    testing::objects_with,
    validate::ModelConfig,
};

/// No upstream: forwarded names end in SERVFAIL at once.
fn dns_config() -> DnsConfig {
    DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        domain: "cluster.local".into(),
        ttl: 5,
        upstreams: Vec::new(),
        cache_size: 100,
        upstream_timeout: Duration::from_millis(100),
        capture: None,
    }
}

/// A headless Service with 60 endpoints: its A answer needs more than 512 bytes.
fn server() -> DnsServer {
    let mut yaml = String::from(
        "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
         kind: Service\nmetadata: {name: many}\nspec: {clusterIP: None}\n---\n\
         kind: EndpointSlice\nmetadata: {name: many-1, labels: {kubernetes.io/service-name: many}}\n\
         addressType: IPv4\nendpoints:\n",
    );
    for i in 1..=60 {
        yaml.push_str(&format!("- {{addresses: [10.244.0.{i}]}}\n"));
    }
    let config = ModelConfig { dns: true, ..ModelConfig::default() };
    let index = Index::from_snapshot(objects_with(&yaml, &config));
    let mut zone = Zone::new("cluster.local");
    zone.update(&index, &Dirty::All);
    let config = dns_config();
    DnsServer::new(&config, Arc::new(RwLock::new(zone)), Arc::default())
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn respond(server: &DnsServer, bytes: &[u8], udp: bool) -> Option<Message> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(server.respond(bytes, udp)).map(|b| Message::from_vec(&b).unwrap())
}

#[test]
fn cluster_names_are_answered_authoritatively_and_misses_carry_the_soa() {
    let server = server();
    let q = query("web.default.svc.cluster.local.", RecordType::A, None);
    let r = respond(&server, &q, true).unwrap();
    assert_eq!(r.metadata.id, Message::from_vec(&q).unwrap().metadata.id);
    assert!(r.metadata.authoritative && r.metadata.recursion_desired && r.metadata.recursion_available);
    assert_eq!(r.answers.len(), 1);
    let nx = respond(&server, &query("nope.default.svc.cluster.local.", RecordType::A, None), true).unwrap();
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(nx.authorities.len(), 1, "the SOA, for negative caching");
}

#[test]
fn a_large_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let server = server();
    let q = query("many.default.svc.cluster.local.", RecordType::A, None);
    let udp = respond(&server, &q, true).unwrap();
    assert!(udp.metadata.truncation && udp.answers.is_empty(), "TC: ask again over TCP");
    let tcp = respond(&server, &q, false).unwrap();
    assert_eq!((tcp.metadata.truncation, tcp.answers.len()), (false, 60));
    // A client announcing a larger payload gets it all over UDP.
    let big = respond(&server, &query("many.default.svc.cluster.local.", RecordType::A, Some(4096)), true).unwrap();
    assert_eq!((big.metadata.truncation, big.answers.len()), (false, 60));
    assert_eq!(big.edns.map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
}

#[test]
fn what_is_not_a_plain_query_gets_an_error_or_nothing() {
    let server = server();
    // A header and garbage: FORMERR with the same id.
    let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xff; 7]);
    let r = respond(&server, &garbage, true).unwrap();
    assert_eq!((r.metadata.id, r.metadata.response_code), (0x1234, ResponseCode::FormErr));
    // Too short for a header: dropped.
    assert!(respond(&server, &[1, 2, 3], true).is_none());
    // Two questions: FORMERR. A NOTIFY: NOTIMP. A response: dropped.
    let mut two = Message::from_vec(&query("a.cluster.local.", RecordType::A, None)).unwrap();
    two.add_query(Query::query(Name::from_ascii("b.cluster.local.").unwrap(), RecordType::A));
    let r = respond(&server, &two.to_vec().unwrap(), true).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    let mut notify = Message::from_vec(&query("a.cluster.local.", RecordType::A, None)).unwrap();
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(respond(&server, &notify.to_vec().unwrap(), true).unwrap().metadata.response_code, ResponseCode::NotImp);
    let mut response = Message::from_vec(&query("a.cluster.local.", RecordType::A, None)).unwrap();
    response.metadata.message_type = MessageType::Response;
    assert!(respond(&server, &response.to_vec().unwrap(), true).is_none());
    assert_eq!(server.metrics.malformed.get(), 4, "garbage, too short, two questions, a response");
}

#[test]
fn no_mutation_of_a_query_makes_the_server_panic() {
    let server = server();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let seeds = [
        query("web.default.svc.cluster.local.", RecordType::A, Some(1232)),
        query("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV, None),
        query("10.0.96.10.in-addr.arpa.", RecordType::PTR, None),
    ];
    // A small xorshift: the same mutations every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..20_000 {
        let mut bytes = seeds[i % seeds.len()].clone();
        for _ in 0..=(next() % 4) {
            let at = (next() as usize) % bytes.len();
            match next() % 3 {
                0 => bytes[at] = next() as u8,
                1 => bytes.truncate(at.max(1)),
                _ => bytes.insert(at, next() as u8),
            }
        }
        // Forwarding has no upstream here: such queries end in SERVFAIL at once.
        let _ = runtime.block_on(server.respond(&bytes, i % 2 == 0));
    }
}

#[test]
fn responses_are_counted_by_rcode_mnemonic() {
    let server = server();
    respond(&server, &query("nope.default.svc.cluster.local.", RecordType::A, None), true).unwrap();
    let text = {
        let mut registry = prometheus_client::registry::Registry::default();
        server.metrics.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    };
    assert!(text.contains("kpr_dns_responses_total{rcode=\"NXDOMAIN\"} 1"), "{text}");
    assert!(text.contains("kpr_dns_requests_total"), "{text}");
}

#[test]
fn cluster_names_are_not_denied_before_the_first_complete_list() {
    let config = dns_config();
    let zone = Arc::new(RwLock::new(Zone::new("cluster.local")));
    let server = DnsServer::new(&config, zone.clone(), Arc::default());
    let q = query("web.default.svc.cluster.local.", RecordType::A, None);
    assert_eq!(respond(&server, &q, true).unwrap().metadata.response_code, ResponseCode::ServFail);
    zone.write().unwrap().update(&Index::default(), &Dirty::All);
    assert_eq!(respond(&server, &q, true).unwrap().metadata.response_code, ResponseCode::NXDomain);
}
