//! The kernel's UDP conntrack entries to Services, as kube-proxy cleans
//! them: UDP has no connection end, so an entry whose replies come from
//! anything but a serving endpoint of the frontend its client addressed
//! (an endpoint since removed, or no endpoint at all: the VIP itself,
//! when a client sent before the rules existed, the DNS blackhole) would
//! keep steering the client's datagrams there for as long as it sends.
//! One ctnetlink dump finds them and one batch of deletes removes them,
//! in each IP family apart (conntrack keys its entries by family). The
//! same dump finds the flows iptables rules translated when eBPF mode
//! takes over from them (see `ebpf::host_flows`).

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
};

use crate::frontend::Family;

use super::netlink::{
    self, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attr, messages, receive, send,
};

/// One flow as conntrack keys it: the client's original tuple and the
/// source its replies come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow<A = Ipv4Addr> {
    /// IP protocol number.
    pub proto: u8,
    /// TCP: conntrack's state of the connection (`TCP_CONNTRACK_*`); 0 otherwise.
    pub tcp_state: u8,
    pub client: (A, u16),
    /// Where the client sent (a VIP, node port or external address).
    pub addressed: (A, u16),
    /// Where replies come from: an endpoint after DNAT, else `addressed`.
    pub replier: (A, u16),
}

/// Frontend address and port -> the endpoints that may answer there.
pub type Serving<A = Ipv4Addr> = HashMap<(A, u16), HashSet<(A, u16)>>;

/// How ctnetlink writes one family's addresses.
pub trait CtFamily: Family {
    /// The address family of the messages (`AF_INET`, `AF_INET6`).
    const AF: u8;
    /// `CTA_IP_V4_SRC` / `CTA_IP_V6_SRC`; the destination is the next one.
    const SRC: u16;
    fn bytes(&self) -> Vec<u8>;
    fn from_bytes(b: &[u8]) -> Option<Self>;
}

impl CtFamily for Ipv4Addr {
    const AF: u8 = libc::AF_INET as u8;
    const SRC: u16 = 1;

    fn bytes(&self) -> Vec<u8> {
        self.octets().to_vec()
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        <[u8; 4]>::try_from(b).ok().map(Ipv4Addr::from)
    }
}

impl CtFamily for Ipv6Addr {
    const AF: u8 = libc::AF_INET6 as u8;
    const SRC: u16 = 3;

    fn bytes(&self) -> Vec<u8> {
        self.octets().to_vec()
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(b).ok().map(Ipv6Addr::from)
    }
}

/// The flows to a frontend of `serving` answered by something else.
pub fn stale<'a, A: Family>(flows: &'a [Flow<A>], serving: &'a Serving<A>) -> impl Iterator<Item = &'a Flow<A>> {
    flows.iter().filter(|f| serving.get(&f.addressed).is_some_and(|endpoints| !endpoints.contains(&f.replier)))
}

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const IPPROTO_UDP: u8 = 17;
/// Bytes of deletes sent in one write.
const BATCH: usize = 32 * 1024;

/// A ctnetlink message about family `A`.
fn message<A: CtFamily>(kind: u16, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let header = netlink::nfgenmsg(A::AF, 0);
    netlink::message((NFNL_SUBSYS_CTNETLINK << 8) | kind, flags, seq, &header, attrs)
}

fn nested(out: &mut Vec<u8>, kind: u16, inner: &[u8]) {
    attr(out, kind | NLA_F_NESTED, inner);
}

/// The original tuple of `flow`, as a delete names the entry.
fn delete_message<A: CtFamily>(flow: &Flow<A>, seq: u32) -> Vec<u8> {
    let mut ip = Vec::new();
    attr(&mut ip, A::SRC, &flow.client.0.bytes());
    attr(&mut ip, A::SRC + 1, &flow.addressed.0.bytes());
    let mut proto = Vec::new();
    attr(&mut proto, CTA_PROTO_NUM, &[flow.proto]);
    attr(&mut proto, CTA_PROTO_SRC_PORT, &flow.client.1.to_be_bytes());
    attr(&mut proto, CTA_PROTO_DST_PORT, &flow.addressed.1.to_be_bytes());
    let mut tuple = Vec::new();
    nested(&mut tuple, CTA_TUPLE_IP, &ip);
    nested(&mut tuple, CTA_TUPLE_PROTO, &proto);
    let mut attrs = Vec::new();
    nested(&mut attrs, CTA_TUPLE_ORIG, &tuple);
    message::<A>(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, &attrs)
}

/// The attributes in `data`: (type without flags, payload).
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((kind, payload))
    })
}

/// An address and port.
type Endpoint<A> = (A, u16);

/// A tuple's (source, destination, protocol), when of family `A`.
fn tuple<A: CtFamily>(data: &[u8]) -> Option<(Endpoint<A>, Endpoint<A>, u8)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for (kind, payload) in attrs(data) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, p) in attrs(payload) {
                    let addr = A::from_bytes(p);
                    if k == A::SRC {
                        src = addr;
                    } else if k == A::SRC + 1 {
                        dst = addr;
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, p) in attrs(payload) {
                    let port = <[u8; 2]>::try_from(p).ok().map(u16::from_be_bytes);
                    match k {
                        CTA_PROTO_NUM => proto = p.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = port,
                        CTA_PROTO_DST_PORT => dport = port,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(((src?, sport?), (dst?, dport?), proto?))
}

/// The flow one conntrack message (after its headers) describes.
fn flow<A: CtFamily>(data: &[u8]) -> Option<Flow<A>> {
    let (mut orig, mut reply, mut tcp_state) = (None, None, 0);
    for (kind, payload) in attrs(data) {
        match kind {
            CTA_TUPLE_ORIG => orig = tuple(payload),
            CTA_TUPLE_REPLY => reply = tuple(payload),
            CTA_PROTOINFO => {
                let tcp = attrs(payload).find(|(k, _)| *k == CTA_PROTOINFO_TCP);
                let state = tcp.and_then(|(_, info)| attrs(info).find(|(k, _)| *k == CTA_PROTOINFO_TCP_STATE));
                tcp_state = state.and_then(|(_, v)| v.first().copied()).unwrap_or(0);
            }
            _ => {}
        }
    }
    let ((client, addressed, proto), (replier, _, _)) = (orig?, reply?);
    Some(Flow { proto, tcp_state, client, addressed, replier })
}

fn open() -> std::io::Result<OwnedFd> {
    let fd = netlink::socket(NETLINK_NETFILTER)?;
    netlink::set_receive_timeout(&fd, std::time::Duration::from_secs(2))?;
    Ok(fd)
}

/// Every flow of family `A` the kernel tracks in this network namespace.
pub fn flows<A: CtFamily>() -> std::io::Result<Vec<Flow<A>>> {
    let fd = open()?;
    send(&fd, &message::<A>(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, &[]))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut flows = Vec::new();
    loop {
        let data = receive(&fd, &mut buf)?;
        for (kind, body) in messages(data) {
            match kind {
                NLMSG_DONE => return Ok(flows),
                NLMSG_ERROR => {
                    return Err(std::io::Error::from_raw_os_error(-netlink::error_status(body).unwrap_or(0)));
                }
                _ => flows.extend(body.get(4..).and_then(flow)),
            }
        }
    }
}

/// Deletes the entries of `flows`, many per write; returns how many went
/// (one already gone is not an error).
pub fn delete<A: CtFamily>(flows: &[Flow<A>]) -> std::io::Result<usize> {
    if flows.is_empty() {
        return Ok(0);
    }
    let fd = open()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut deleted = 0;
    for chunk in flows.chunks(BATCH / 80) {
        let batch: Vec<u8> = chunk.iter().enumerate().flat_map(|(i, f)| delete_message(f, i as u32 + 1)).collect();
        send(&fd, &batch)?;
        let mut acked = 0;
        while acked < chunk.len() {
            let data = receive(&fd, &mut buf)?;
            for (kind, body) in messages(data) {
                if kind != NLMSG_ERROR {
                    continue;
                }
                acked += 1;
                if netlink::error_status(body) == Some(0) {
                    deleted += 1;
                }
            }
        }
    }
    Ok(deleted)
}

/// Removes the stale UDP entries to the frontends of `serving`; returns how many.
pub fn clear_stale_udp<A: CtFamily>(serving: &Serving<A>) -> std::io::Result<usize> {
    if serving.is_empty() {
        return Ok(0);
    }
    let mut flows = flows::<A>()?;
    flows.retain(|f| f.proto == IPPROTO_UDP);
    let stale: Vec<Flow<A>> = stale(&flows, serving).copied().collect();
    delete(&stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow_of(client: [u8; 4], addressed: [u8; 4], replier: [u8; 4]) -> Flow {
        Flow {
            proto: IPPROTO_UDP,
            tcp_state: 0,
            client: (client.into(), 40000),
            addressed: (addressed.into(), 53),
            replier: (replier.into(), 5353),
        }
    }

    #[test]
    fn a_delete_names_the_original_tuple_and_parses_back() {
        let f = flow_of([10, 244, 0, 100], [10, 96, 0, 10], [10, 244, 0, 11]);
        let m = delete_message(&f, 7);
        let (kind, body) = messages(&m).next().unwrap();
        assert_eq!(kind, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize, m.len());
        let (orig_kind, orig) = attrs(&body[4..]).next().unwrap();
        assert_eq!(orig_kind, CTA_TUPLE_ORIG);
        let (client, addressed, proto) = tuple::<Ipv4Addr>(orig).unwrap();
        assert_eq!((client, addressed, proto), (f.client, f.addressed, IPPROTO_UDP));
    }

    #[test]
    fn a_dumped_entry_gives_its_client_frontend_and_replier() {
        let tuple_attrs = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            let mut ip = Vec::new();
            attr(&mut ip, <Ipv4Addr as CtFamily>::SRC, &src);
            attr(&mut ip, <Ipv4Addr as CtFamily>::SRC + 1, &dst);
            let mut proto = Vec::new();
            attr(&mut proto, CTA_PROTO_NUM, &[IPPROTO_UDP]);
            attr(&mut proto, CTA_PROTO_SRC_PORT, &sport.to_be_bytes());
            attr(&mut proto, CTA_PROTO_DST_PORT, &dport.to_be_bytes());
            let mut t = Vec::new();
            nested(&mut t, CTA_TUPLE_IP, &ip);
            nested(&mut t, CTA_TUPLE_PROTO, &proto);
            t
        };
        let mut body = Vec::new();
        nested(&mut body, CTA_TUPLE_ORIG, &tuple_attrs([10, 244, 0, 100], [10, 96, 0, 10], 40000, 53));
        nested(&mut body, CTA_TUPLE_REPLY, &tuple_attrs([10, 244, 0, 11], [10, 244, 0, 100], 5353, 40000));
        attr(&mut body, 3, &[0, 0, 0, 8]); // CTA_STATUS, ignored
        let f = flow(&body).unwrap();
        assert_eq!(f, flow_of([10, 244, 0, 100], [10, 96, 0, 10], [10, 244, 0, 11]));
        assert!(flow::<Ipv4Addr>(&body[..10]).is_none(), "a truncated message is skipped");
        assert!(flow::<Ipv6Addr>(&body).is_none(), "an IPv4 entry is not an IPv6 flow");
        let (mut info, mut tcp) = (Vec::new(), Vec::new());
        attr(&mut tcp, CTA_PROTOINFO_TCP_STATE, &[3]);
        nested(&mut info, CTA_PROTOINFO_TCP, &tcp);
        nested(&mut body, CTA_PROTOINFO, &info);
        assert_eq!(flow::<Ipv4Addr>(&body).unwrap().tcp_state, 3, "a TCP entry's state is read");
    }

    #[test]
    fn an_ipv6_delete_names_the_original_tuple_in_the_ipv6_attributes() {
        let ip = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let f = Flow {
            proto: IPPROTO_UDP,
            tcp_state: 0,
            client: (ip("fd00::64"), 40000),
            addressed: (ip("fd00:96::a"), 53),
            replier: (ip("fd00::b"), 53),
        };
        let m = delete_message(&f, 1);
        let (_, body) = messages(&m).next().unwrap();
        assert_eq!(body[0], libc::AF_INET6 as u8, "the nfgenmsg names the family");
        let (_, orig) = attrs(&body[4..]).next().unwrap();
        let (client, addressed, _) = tuple::<Ipv6Addr>(orig).unwrap();
        assert_eq!((client, addressed), (f.client, f.addressed));
    }

    #[test]
    fn stale_flows_are_answered_by_anything_but_a_serving_endpoint() {
        let serving: Serving = HashMap::from([(
            (Ipv4Addr::new(10, 96, 0, 10), 53),
            HashSet::from([(Ipv4Addr::new(10, 244, 0, 11), 5353)]),
        )]);
        let flows = [
            flow_of([10, 244, 0, 100], [10, 96, 0, 10], [10, 244, 0, 11]), // served: kept
            flow_of([10, 244, 0, 101], [10, 96, 0, 10], [10, 244, 0, 12]), // a removed endpoint
            flow_of([10, 244, 0, 102], [10, 96, 0, 10], [10, 96, 0, 10]),  // never translated
            flow_of([10, 244, 0, 103], [10, 96, 0, 99], [10, 96, 0, 99]),  // not a frontend here
        ];
        let stale: Vec<u8> = stale(&flows, &serving).map(|f| f.client.0.octets()[3]).collect();
        assert_eq!(stale, [101, 102]);
    }
}
