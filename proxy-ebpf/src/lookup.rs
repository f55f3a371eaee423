//! Service and conntrack lookups: which way a packet goes.
//!
//! As in Cilium's lb/conntrack split: the forward entry remembers the chosen
//! backend so every packet of a flow goes the same way, and replies are
//! recognised by their own tuple in the reverse map.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    counters::DropReason,
    maps::{Backend, BackendKey, FlowKey, ForwardEntry, PROTO_TCP, ReverseEntry, ServiceKey, ServiceValue, reply_key},
    reject::{TCP_ACK, TCP_SYN},
    select,
};

use crate::{
    maps::{BACKENDS, CT_FORWARD, CT_REVERSE, SERVICES},
    parse::Packet,
};

pub(crate) enum Lookup {
    /// A backend's reply in a translated flow: put the VIP back.
    Reply(ReverseEntry),
    /// To a Service (by id), with the backend the flow is (now) pinned to.
    ToBackend(Backend, u32),
    /// A new flow to a Service with no ready endpoints.
    NoBackend,
    NotService,
}

#[inline(always)]
pub(crate) fn is_vip(addr: [u8; 4]) -> bool {
    SERVICES.get_ptr(ServiceKey::vip_marker(addr)).is_some()
}

/// The frontend `key` names, if it is a Service.
#[inline(always)]
pub(crate) fn service(key: &ServiceKey) -> Option<ServiceValue> {
    SERVICES.get_ptr(*key).map(|svc| unsafe { core::ptr::read(svc) })
}

/// A ready backend of `svc` (which has some) for a new flow, uniformly at random.
#[inline(always)]
pub(crate) fn choose(svc: &ServiceValue) -> Result<Backend, DropReason> {
    let slot = select::slot(unsafe { bpf_get_prandom_u32() }, svc.backend_count);
    // A set is written whole before it is published, but a program that
    // read the frontend just before a newer set replaced it may find the
    // old set's slots already freed: the flow is refused, counted, and
    // the client retries.
    match BACKENDS.get_ptr(BackendKey { set: svc.backend_set, slot }) {
        Some(backend) => Ok(unsafe { core::ptr::read(backend) }),
        None => Err(DropReason::BackendMissing),
    }
}

#[inline(always)]
pub(crate) fn lookup(pkt: &Packet) -> Result<Lookup, DropReason> {
    let flow = FlowKey::new(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto);

    if let Some(rev) = CT_REVERSE.get_ptr(flow) {
        return Ok(Lookup::Reply(unsafe { core::ptr::read(rev) }));
    }

    let key = ServiceKey { addr: pkt.dst, port: pkt.dst_port, proto: pkt.proto, _pad: 0 };
    let Some(svc) = service(&key) else {
        return Ok(Lookup::NotService);
    };

    // A SYN opens a new connection even if an old one left the same tuple
    // behind: choose afresh so a removed endpoint is never reused.
    let new_connection = pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !new_connection && let Some(fwd) = CT_FORWARD.get_ptr(flow) {
        let fwd = unsafe { core::ptr::read(fwd) };
        if fwd.service_id == svc.id {
            return Ok(Lookup::ToBackend(fwd.backend, svc.id));
        }
    }

    if svc.backend_count == 0 {
        return Ok(Lookup::NoBackend);
    }
    let backend = choose(&svc)?;

    let fwd = ForwardEntry { backend, service_id: svc.id };
    let rev = ReverseEntry { vip: pkt.dst, vip_port: pkt.dst_port, _pad: [0; 2], service_id: svc.id };
    // Without its entries the flow's next packet would choose again (another
    // backend, mid-connection) or its replies would go untranslated, so a
    // failed insert drops this packet and the client retransmits, as with
    // Cilium's DROP_CT_CREATE_FAILED. The reply entry goes first: alone it is
    // harmless, while a forward entry alone would be found and trusted.
    if CT_REVERSE.insert(reply_key(&flow, &backend), rev, 0).is_err() {
        return Err(DropReason::ConntrackFailed);
    }
    if CT_FORWARD.insert(flow, fwd, 0).is_err() {
        return Err(DropReason::ConntrackFailed);
    }
    Ok(Lookup::ToBackend(backend, svc.id))
}
