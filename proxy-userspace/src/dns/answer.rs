//! Answers from the zone, per the Kubernetes DNS specification
//! (kubernetes/dns docs/specification.md, schema 1.1.0): a pure function
//! of the zone and the question, so every record kind is tested without a
//! socket. Names outside the cluster domain, and reverse names of
//! addresses the zone does not hold, are not answered here: the server
//! forwards them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::{
    op::ResponseCode,
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT},
    },
};

use crate::{
    dns::zone::{ServiceRecords, Zone},
    frontend::Protocol,
    validate::DnsTarget,
};

/// The schema version `dns-version.<domain>` announces.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// What the zone says about a question.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    /// NOERROR (with or without records: NODATA) or NXDOMAIN.
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
    /// An ExternalName Service's target when the question asks for more
    /// than its CNAME: the server resolves it and adds what it finds.
    pub chase: Option<Name>,
}

impl Answer {
    fn records(answers: Vec<Record>) -> Self {
        Self { answers, ..Self::default() }
    }

    fn nodata() -> Self {
        Self::default()
    }

    fn nxdomain() -> Self {
        Self { rcode: ResponseCode::NXDomain, ..Self::default() }
    }
}

/// A name as the zone compares it: lower case, without the final dot.
pub fn plain(name: &Name) -> String {
    let mut s = name.to_ascii();
    s.make_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

fn fqdn(name: &str) -> Option<Name> {
    let mut n = Name::from_ascii(name).ok()?;
    n.set_fqdn(true);
    Some(n)
}

/// The SOA of the zone `qname` is in (the cluster domain, or the reverse
/// zone of its family), in the authority section of negative answers (its
/// minimum is the TTL resolvers cache them for).
pub fn soa_for(zone: &Zone, qname: &Name, ttl: u32) -> Option<Record> {
    let name = plain(qname);
    let apex = if name.ends_with("in-addr.arpa") {
        "in-addr.arpa"
    } else if name.ends_with("ip6.arpa") {
        "ip6.arpa"
    } else {
        zone.domain()
    };
    soa_at(zone, apex, ttl)
}

/// The cluster domain's SOA.
pub fn soa(zone: &Zone, ttl: u32) -> Option<Record> {
    soa_at(zone, zone.domain(), ttl)
}

fn soa_at(zone: &Zone, apex: &str, ttl: u32) -> Option<Record> {
    let apex = fqdn(apex)?;
    let mname = fqdn(&format!("ns.dns.{}", zone.domain()))?;
    let rname = fqdn(&format!("hostmaster.{}", zone.domain()))?;
    let soa = SOA::new(mname, rname, zone.serial(), 7200, 1800, 86400, ttl);
    Some(Record::from_rdata(apex, ttl, RData::SOA(soa)))
}

/// ExternalName Services pointing at one another are followed this deep.
const MAX_CHAIN: u8 = 8;

/// The answer to `qname`/`qtype` if the zone is authoritative for it.
pub fn answer(zone: &Zone, qname: &Name, qtype: RecordType, ttl: u32) -> Option<Answer> {
    answer_at(zone, qname, qtype, ttl, 0)
}

fn answer_at(zone: &Zone, qname: &Name, qtype: RecordType, ttl: u32, depth: u8) -> Option<Answer> {
    let name = plain(qname);
    if let Some(ip) = reverse_address(&name) {
        let names = zone.names_of(&ip);
        if names.is_empty() {
            return None;
        }
        if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
            return Some(Answer::nodata());
        }
        let records = names.iter().filter_map(|n| fqdn(n)).map(|n| record(qname, ttl, RData::PTR(PTR(n)))).collect();
        return Some(Answer::records(records));
    }
    let domain = zone.domain();
    let rest = if name == domain {
        ""
    } else {
        name.strip_suffix(domain).and_then(|r| r.strip_suffix('.')).filter(|r| !r.is_empty())?
    };
    // Labels from the domain outwards: `web.default.svc` -> svc, default, web.
    let labels: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.rsplit('.').collect() };
    Some(match labels.as_slice() {
        [] if qtype == RecordType::SOA => Answer::records(soa(zone, ttl).into_iter().collect()),
        [] | ["svc"] | ["pod"] => Answer::nodata(),
        ["dns-version"] => match qtype {
            RecordType::TXT | RecordType::ANY => {
                Answer::records(vec![record(qname, ttl, RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])))])
            }
            _ => Answer::nodata(),
        },
        ["svc", ns] if zone.has_namespace(ns) => Answer::nodata(),
        ["svc", ns, service] => match zone.service(ns, service) {
            Some(records) => service_answer(zone, records, qname, qtype, ttl, depth),
            None => Answer::nxdomain(),
        },
        ["svc", ns, service, label] => match zone.service(ns, service) {
            Some(records) => endpoint_answer(records, label, qname, qtype, ttl),
            None => Answer::nxdomain(),
        },
        ["svc", ns, service, proto, port] => match zone.service(ns, service) {
            Some(records) => srv_answer(zone, records, (ns, service), port, proto, qname, qtype, ttl),
            None => Answer::nxdomain(),
        },
        // `a-b-c-d.<namespace>.pod.<domain>`, as CoreDNS's `pods insecure`
        // (kubeadm's default): the address the name spells.
        ["pod", _ns, dashed] => match undashed(dashed) {
            Some(ip) => address_answer(&[ip], qname, qtype, ttl),
            None => Answer::nxdomain(),
        },
        _ => Answer::nxdomain(),
    })
}

fn record(name: &Name, ttl: u32, data: RData) -> Record {
    Record::from_rdata(name.clone(), ttl, data)
}

/// A and AAAA records of `ips` as `qtype` asks (NODATA for other types).
fn address_answer(ips: &[IpAddr], qname: &Name, qtype: RecordType, ttl: u32) -> Answer {
    Answer::records(address_records(ips, qname, qtype, ttl))
}

fn address_records(ips: &[IpAddr], owner: &Name, qtype: RecordType, ttl: u32) -> Vec<Record> {
    ips.iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|data| record(owner, ttl, data))
        .collect()
}

fn service_answer(zone: &Zone, svc: &ServiceRecords, qname: &Name, qtype: RecordType, ttl: u32, depth: u8) -> Answer {
    match &svc.target {
        DnsTarget::ClusterIps(ips) => address_answer(ips, qname, qtype, ttl),
        DnsTarget::Headless => {
            let ips: Vec<IpAddr> = svc.endpoints.iter().map(|e| e.ip).collect();
            address_answer(&ips, qname, qtype, ttl)
        }
        DnsTarget::ExternalName(target) => {
            let Some(target) = fqdn(target) else { return Answer::nodata() };
            let cname = record(qname, ttl, RData::CNAME(CNAME(target.clone())));
            if qtype == RecordType::CNAME || depth >= MAX_CHAIN {
                return Answer::records(vec![cname]);
            }
            // A target inside the zone is answered here; any other is the server's to resolve.
            let inside = plain(&target).ends_with(zone.domain());
            if let Some(inner) = answer_at(zone, &target, qtype, ttl, depth + 1).filter(|_| inside) {
                // The target's own answer: its records, its rcode, and what it leaves to chase.
                let mut answers = vec![cname];
                answers.extend(inner.answers);
                return Answer { rcode: inner.rcode, answers, additionals: inner.additionals, chase: inner.chase };
            }
            Answer { answers: vec![cname], chase: Some(target), ..Answer::default() }
        }
    }
}

/// `<label>.<service>...`: a headless Service's endpoint by hostname (or dashed address).
fn endpoint_answer(svc: &ServiceRecords, label: &str, qname: &Name, qtype: RecordType, ttl: u32) -> Answer {
    // `_tcp.<service>...` holds the SRV names below it: it exists, without records.
    if label.starts_with('_') && declared_ports(svc).any(|p| protocol_label(p.protocol) == label) {
        return Answer::nodata();
    }
    if svc.target != DnsTarget::Headless {
        return Answer::nxdomain();
    }
    let ips: Vec<IpAddr> = svc.endpoints.iter().filter(|e| &*e.label == label).map(|e| e.ip).collect();
    if ips.is_empty() {
        return Answer::nxdomain();
    }
    address_answer(&ips, qname, qtype, ttl)
}

/// Every port the Service or its endpoints declare.
fn declared_ports(svc: &ServiceRecords) -> impl Iterator<Item = &crate::validate::DnsPort> {
    svc.ports.iter().chain(svc.endpoints.iter().flat_map(|e| e.ports.iter()))
}

fn protocol_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

/// `_<port>._<proto>.<service>...`: SRV records of a named port. For a
/// ClusterIP Service, one pointing at the Service's name and port; for a
/// headless one, one per ready endpoint, pointing at its own name and
/// port, with equal weights. Their addresses go in the additional section.
#[expect(clippy::too_many_arguments, reason = "the question's parts, as answer() splits them")]
fn srv_answer(
    zone: &Zone,
    svc: &ServiceRecords,
    (ns, service): (&str, &str),
    port: &str,
    proto: &str,
    qname: &Name,
    qtype: RecordType,
    ttl: u32,
) -> Answer {
    let Some(port_name) = port.strip_prefix('_').filter(|p| !p.is_empty()) else { return Answer::nxdomain() };
    let named = |p: &crate::validate::DnsPort| &*p.name == port_name && protocol_label(p.protocol) == proto;
    let service_name = format!("{service}.{ns}.svc.{}", zone.domain());
    let mut targets: Vec<(u16, String, Vec<IpAddr>)> = match &svc.target {
        DnsTarget::ClusterIps(ips) => {
            svc.ports.iter().filter(|p| named(p)).map(|p| (p.port, service_name.clone(), ips.to_vec())).collect()
        }
        DnsTarget::Headless => svc
            .endpoints
            .iter()
            .filter_map(|e| {
                let p = e.ports.iter().find(|p| named(p))?;
                Some((p.port, format!("{}.{service_name}", e.label), vec![e.ip]))
            })
            .collect(),
        DnsTarget::ExternalName(_) => Vec::new(),
    };
    if targets.is_empty() {
        // A port the Service declares, with no ready endpoint behind it: the name exists.
        return if declared_ports(svc).any(named) { Answer::nodata() } else { Answer::nxdomain() };
    }
    if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
        return Answer::nodata();
    }
    // A pod in an IPv4 and an IPv6 slice is one target.
    targets.sort_by(|a, b| (a.1.as_str(), a.0).cmp(&(b.1.as_str(), b.0)));
    targets.dedup_by(|a, b| {
        let same = a.0 == b.0 && a.1 == b.1;
        if same {
            b.2.append(&mut a.2);
        }
        same
    });
    let weight = (100 / targets.len()).max(1) as u16;
    let mut answer = Answer::default();
    for (port, target, ips) in targets {
        let Some(target) = fqdn(&target) else { continue };
        answer.answers.push(record(qname, ttl, RData::SRV(SRV::new(0, weight, port, target.clone()))));
        answer.additionals.extend(address_records(&ips, &target, RecordType::ANY, ttl));
    }
    answer
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa`, or 32 nibbles of
/// `ip6.arpa`) spells, if it spells a whole one.
fn reverse_address(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let octets: Vec<u8> = rest.rsplit('.').map(|o| o.parse().ok()).collect::<Option<_>>()?;
        let octets: [u8; 4] = octets.try_into().ok()?;
        return Some(IpAddr::V4(Ipv4Addr::from(octets)));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .rsplit('.')
        .map(|n| (n.len() == 1).then(|| u8::from_str_radix(n, 16).ok()).flatten())
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.chunks(2).enumerate() {
        bytes[i] = pair[0] << 4 | pair[1];
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// `10-244-1-5` -> 10.244.1.5 (and dashed IPv6 addresses).
fn undashed(label: &str) -> Option<IpAddr> {
    label.replace('-', ".").parse::<Ipv4Addr>().map(IpAddr::V4).ok().or_else(|| label.replace('-', ":").parse().ok())
}

#[cfg(test)]
mod tests;
