//! Service lookups and backend choice: which way a packet goes.
//!
//! As in Cilium's lb/conntrack split: a tracked flow keeps its backend (see
//! `conntrack`), and only a new flow to a frontend chooses one.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    conntrack::{CtEntry, FlowKey, is_syn},
    counters::DropReason,
    ipv4::Fragment,
    maps::{AffinityKey, Backend, PROTO_TCP, ServiceKey, ServiceValue, flags},
    select,
};

pub(crate) use crate::family::backend_at;
use crate::{
    affinity::{affine_slot, remember},
    conntrack::{self, Pinned},
    family::Family,
    maps::{DEVICES, SERVICES},
    parse::{IcmpError, Packet},
};

/// `repr(u8)`: the tag first, as the kernel's BTF check wants of a type in
/// a BPF function's signature (see `parse6::Parsed6`).
#[repr(u8)]
pub(crate) enum Lookup<A = [u8; 4]> {
    /// To a Service frontend, with the backend the flow is (now) pinned to
    /// and whether this packet started the flow.
    ToBackend(Backend<A>, Frontend, Start),
    /// A new flow to a Service with no ready endpoints.
    NoBackend,
    NotService,
}

/// Whether a packet started its flow (a backend was chosen for it) or
/// belongs to one tracked already.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    New,
    Tracked,
}

/// What the datapath needs of the frontend a flow goes to.
#[derive(Clone, Copy)]
pub(crate) struct Frontend {
    pub(crate) id: u32,
    /// [`flags`] of the frontend.
    pub(crate) flags: u8,
}

impl Frontend {
    fn of(svc: &ServiceValue) -> Self {
        Self { id: svc.id, flags: svc.flags }
    }

    /// Whether the node must source-NAT the request (see [`flags::MASQUERADE`]).
    pub(crate) fn masquerade(&self) -> bool {
        self.flags & flags::MASQUERADE != 0
    }
}

/// Whether `client` may reach the frontend `svc`: always, unless it has
/// source ranges and none holds the client.
#[inline(always)]
fn source_allowed<A: Family>(svc: &ServiceValue, client: A) -> bool {
    svc.flags & flags::SOURCE_RANGES == 0 || A::in_source_ranges(svc.id, client)
}

/// Backends tried for a new flow whose first choice would collide with a
/// live flow to another frontend (see [`conntrack::claimed`]).
const CHOICES: u32 = 4;

#[inline(always)]
pub(crate) fn is_vip(addr: [u8; 4]) -> bool {
    SERVICES.get_ptr(ServiceKey::vip_marker(addr)).is_some()
}

/// The frontend `key` names, if it is a Service.
#[inline(always)]
pub(crate) fn service(key: &ServiceKey) -> Option<ServiceValue> {
    <[u8; 4]>::service(key.addr, key.port, key.proto)
}

/// The frontend `key` names as a pod or a process of this node sees it
/// (see [`in_cluster`]).
#[inline(always)]
pub(crate) fn service_in_cluster(key: &ServiceKey) -> Option<ServiceValue> {
    service(key).map(in_cluster::<[u8; 4]>)
}

/// `svc` (a frontend of family `A`) as a pod or a process of this node
/// sees it: a Local policy's frontend serves them from every endpoint
/// (kube-proxy's "pod traffic" and "LOCAL traffic" rules), outside clients
/// from this node's alone.
#[inline(always)]
pub(crate) fn in_cluster<A: Family>(svc: ServiceValue) -> ServiceValue {
    if svc.flags & flags::LOCAL == 0 {
        return svc;
    }
    let Some(cluster) = A::cluster_scope(svc.id) else { return svc };
    // The frontend keeps its own id and kind: only the backends change.
    ServiceValue {
        backend_set: cluster.backend_set,
        backend_count: cluster.backend_count,
        terminating_count: cluster.terminating_count,
        flags: svc.flags & !flags::DROP_WITHOUT_BACKEND,
        ..svc
    }
}

/// A ready slot of `svc` (which has some), uniformly at random.
#[inline(always)]
fn random_slot(svc: &ServiceValue) -> u32 {
    select::slot(unsafe { bpf_get_prandom_u32() }, svc.backend_count)
}

/// The backend in a slot a new flow chose. A set is written whole before it
/// is published, but a program that read the frontend just before a newer
/// set replaced it may find the old set's slots already freed: the flow is
/// refused, counted, and the client retries.
#[inline(always)]
fn chosen<A: Family>(svc: &ServiceValue, slot: u32) -> Result<Backend<A>, DropReason> {
    backend_at(svc, slot).ok_or(DropReason::BackendMissing)
}

/// A ready backend of `svc` (which has some) for a new flow, uniformly at random.
#[inline(always)]
pub(crate) fn choose(svc: &ServiceValue) -> Result<Backend, DropReason> {
    chosen(svc, random_slot(svc))
}

/// A ready backend of `svc` (which has some) for a new flow of `client`:
/// its sticky one under session affinity, else one at random.
#[inline(always)]
pub(crate) fn choose_for(svc: &ServiceValue, client: &AffinityKey) -> Result<Backend, DropReason> {
    if svc.flags & flags::AFFINITY == 0 {
        return choose(svc);
    }
    let now = conntrack::now();
    let slot = affine_slot(svc, client, now).unwrap_or_else(|| random_slot(svc));
    let backend = chosen(svc, slot)?;
    remember(client, &backend, slot, now);
    Ok(backend)
}

/// The frontend an ICMP error about a packet the client sent to a backend
/// must show: the quote (client -> backend) is the flow's reply tuple, reversed.
#[inline(always)]
pub(crate) fn icmp_to_client<A: Family>(err: &IcmpError<A>) -> Option<CtEntry<A>> {
    let q = &err.quoted;
    let reply = FlowKey::reply_tuple(q.dst, q.dst_port, q.src, q.src_port, q.proto);
    conntrack::frontend_of(&reply, conntrack::now())
}

/// The backend an ICMP error about a reply the client got from a frontend
/// goes to: the quote (frontend -> client) is the flow's service tuple,
/// reversed, and the error is addressed to the frontend.
#[inline(always)]
pub(crate) fn icmp_to_backend<A: Family>(err: &IcmpError<A>) -> Option<CtEntry<A>> {
    let q = &err.quoted;
    if err.dst != q.src {
        return None;
    }
    conntrack::backend_of(&FlowKey::service(q.dst, q.dst_port, q.src, q.src_port, q.proto), conntrack::now())
}

/// Where a packet that came in on interface `ifindex` goes: to a backend
/// when it is (or starts) a flow to a Service frontend.
#[inline(never)]
pub(crate) fn request(pkt: &Packet, ifindex: u32) -> Result<Lookup, DropReason> {
    let key = ServiceKey { addr: pkt.dst, port: pkt.dst_port, proto: pkt.proto, _pad: 0 };
    let Some(mut svc) = service(&key) else {
        if pkt.fragment != Fragment::Later {
            conntrack::forget_direct(pkt);
        }
        return Ok(Lookup::NotService);
    };
    if svc.flags & flags::LOCAL != 0 && is_pod_interface(ifindex) {
        svc = in_cluster::<[u8; 4]>(svc);
    }
    to_frontend(pkt, &svc)
}

/// Every interface but the node's devices is a pod's.
#[inline(always)]
pub(crate) fn is_pod_interface(ifindex: u32) -> bool {
    unsafe { DEVICES.get(&ifindex) }.is_none()
}

/// Where a packet to the frontend `svc` goes: its flow's backend, or one
/// chosen for a new flow.
#[inline(always)]
pub(crate) fn to_frontend<A: Family>(pkt: &Packet<A>, svc: &ServiceValue) -> Result<Lookup<A>, DropReason> {
    let later_fragment = pkt.fragment == Fragment::Later;
    let svc = *svc;
    if !source_allowed(&svc, pkt.src) {
        return Err(DropReason::SourceRange);
    }
    let frontend = Frontend::of(&svc);

    // Read only once the packet is to a Service: most packets a pod sends are not.
    let now = conntrack::now();
    let flow = FlowKey::service(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto);
    match conntrack::pinned(&flow, &svc, pkt.tcp_flags, now)? {
        Pinned::To(backend) => return Ok(Lookup::ToBackend(backend, frontend, Start::Tracked)),
        Pinned::Host => return Ok(Lookup::NotService),
        Pinned::No => {}
    }
    // The rest of a datagram whose flow is gone: nothing to answer with, nothing to start.
    if later_fragment {
        return Err(DropReason::Fragment);
    }
    // iptables mode took over: new flows are its rules' to translate.
    if svc.flags & flags::DRAINING != 0 {
        return Ok(Lookup::NotService);
    }
    // Taking over from the node's rules: anything but a SYN may belong to a
    // flow they translated, which the node's conntrack goes on translating.
    if svc.flags & flags::ADOPTING != 0 && !(pkt.proto == PROTO_TCP && is_syn(pkt.tcp_flags)) {
        return Ok(Lookup::NotService);
    }

    if svc.backend_count == 0 {
        if svc.flags & flags::DROP_WITHOUT_BACKEND != 0 {
            return Err(DropReason::NoLocalBackend);
        }
        return Ok(Lookup::NoBackend);
    }
    // Session affinity: the client's sticky backend first.
    let client = if svc.flags & flags::AFFINITY != 0 { A::affinity_key(svc.id, pkt.src) } else { None };
    let first = client.and_then(|c| affine_slot(&svc, &c, now)).unwrap_or_else(|| random_slot(&svc));
    // Two frontends sharing a backend: the same client port to both would
    // give two flows one reply tuple. Another backend avoids it; with none
    // left the packet is dropped, counted, and the client retries.
    for i in 0..CHOICES {
        if i >= svc.backend_count {
            break;
        }
        let slot = if first + i >= svc.backend_count { first + i - svc.backend_count } else { first + i };
        let backend = chosen(&svc, slot)?;
        if !conntrack::claimed(&flow, &backend, now) {
            conntrack::create(&flow, svc.id, slot, &backend, pkt.tcp_flags, now)?;
            if let Some(client) = client {
                A::remember(&client, &backend, slot, now);
            }
            return Ok(Lookup::ToBackend(backend, frontend, Start::New));
        }
    }
    Err(DropReason::ConntrackCollision)
}
