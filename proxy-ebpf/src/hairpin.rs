//! A pod reaching its own Service on the per-packet path (hairpin). When
//! the backend chosen for a pod's request is the pod itself, translating
//! the destination alone would make its answer loop inside the pod,
//! never passing here to be translated back. So the request also gets
//! [`HAIRPIN_SOURCE`] as its source (kube-proxy masquerades these for the
//! same reason, Cilium uses the same address), and the pod's answer to
//! that address, which leaves by its default route, is translated back to
//! frontend -> pod. Both go straight back out of the interface they came
//! in on, their MAC addresses swapped: the node's stack never sees them,
//! so no routing or reverse-path filter there has to know the address.
//! The pod's ICMP errors about either direction are translated the same
//! way, quote included. IPv6 flows do the same with `HAIRPIN_SOURCE6` (see
//! `ipv6`), their ICMPv6 errors excepted.

use aya_ebpf::programs::TcContext;
use proxy_common::{
    conntrack::{CtEntry, FlowKey},
    counters::DropReason,
    ipv4::Fragment,
    maps::HAIRPIN_SOURCE,
};

use crate::{
    Verdict, conntrack, fragments, lookup,
    parse::{IcmpError, Packet},
    skb, translate,
};

/// Whether the backend chosen for `pkt`, which came in on `ifindex`, is
/// its own sender: a pod's. (A client outside the node whose address a
/// backend shares is the node masquerade's business.)
#[inline(always)]
pub(crate) fn is_hairpin<A: PartialEq>(pkt: &Packet<A>, backend: A, ifindex: u32) -> bool {
    pkt.src == backend && lookup::is_pod_interface(ifindex)
}

/// A request already translated to its sender: sent back to it from [`HAIRPIN_SOURCE`].
#[inline(always)]
pub(crate) fn request(ctx: &TcContext, pkt: &Packet) -> Result<Verdict, DropReason> {
    translate::source_address(ctx, pkt, HAIRPIN_SOURCE)?;
    reflect(ctx)
}

/// If `pkt` is a pod's answer to a hairpin request: translated back to
/// frontend -> pod and sent back to it, with the frontend it answers for.
/// `None` for every other packet.
#[inline(always)]
pub(crate) fn reply(ctx: &TcContext, pkt: &Packet) -> Option<Result<(Verdict, CtEntry), DropReason>> {
    if pkt.dst != HAIRPIN_SOURCE {
        return None;
    }
    // The flow was tracked with the pod as its client.
    let seen = Packet { dst: pkt.src, ..*pkt };
    // Not a flow of ours: the node decides what becomes of it.
    let frontend = conntrack::reply(&seen)?;
    Some(translate_reply(ctx, pkt, &frontend).map(|verdict| (verdict, frontend)))
}

#[inline(always)]
fn translate_reply(ctx: &TcContext, pkt: &Packet, frontend: &CtEntry) -> Result<Verdict, DropReason> {
    if pkt.fragment == Fragment::First {
        fragments::remember(pkt);
    }
    translate::reverse(ctx, pkt, frontend)?;
    translate::destination_address(ctx, pkt, pkt.src)?;
    reflect(ctx)
}

/// If `err`, which came in on `ifindex`, is a pod's error about a hairpin
/// request it got (a closed port, say): translated to the error its client
/// socket must see, the frontend's about what it sent there, and sent back
/// to it. `None` for every other error.
#[inline(always)]
pub(crate) fn icmp_error_about_request(
    ctx: &TcContext,
    err: &IcmpError,
    ifindex: u32,
) -> Option<Result<Verdict, DropReason>> {
    let q = &err.quoted;
    let pod = err.src;
    if err.dst != HAIRPIN_SOURCE || q.src != HAIRPIN_SOURCE || q.dst != pod || !lookup::is_pod_interface(ifindex) {
        return None;
    }
    let reply = FlowKey::reply_tuple(pod, q.dst_port, pod, q.src_port, q.proto);
    let frontend = conntrack::frontend_of(&reply, conntrack::now())?;
    Some(
        translate::icmp_to_client(ctx, err, &frontend)
            .and_then(|()| translate::icmp_hairpin_request(ctx, err, pod))
            .and_then(|()| reflect(ctx)),
    )
}

/// Whether a client's error about a frontend's reply, which `backend`
/// sent, is about a hairpin flow: the pod erring is that backend.
#[inline(always)]
pub(crate) fn is_own_reply(err: &IcmpError, backend: &CtEntry, ifindex: u32) -> bool {
    backend.addr == err.src && lookup::is_pod_interface(ifindex)
}

/// Such an error (see [`is_own_reply`]), translated to the error the pod's
/// serving socket must see, the hairpin address's about the reply it sent
/// there, and sent back to it.
#[inline(always)]
pub(crate) fn icmp_error_about_reply(
    ctx: &TcContext,
    err: &IcmpError,
    backend: &CtEntry,
) -> Result<Verdict, DropReason> {
    translate::icmp_to_backend(ctx, err, backend)?;
    translate::icmp_hairpin_reply(ctx, err, HAIRPIN_SOURCE)?;
    reflect(ctx)
}

/// Sent back out of the interface it came in on, to the pod that sent it.
#[inline(always)]
pub(crate) fn reflect(ctx: &TcContext) -> Result<Verdict, DropReason> {
    skb::swap_macs(ctx)?;
    Ok(Verdict::Reflect)
}
