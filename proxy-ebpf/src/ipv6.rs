//! The per-packet path for IPv6: a pod's request to an IPv6 ClusterIP in
//! the IPv6 service map is given a backend (the shared conntrack and
//! choice, see `lookup`) and rewritten on the pod's interface; the
//! backend's replies are rewritten back on the client's interface; a
//! Service without endpoints is refused at once. Fragments, malformed
//! packets and every other protocol (ICMPv6 and Neighbor Discovery among
//! them) pass as they came, counted where they are not plain traffic.

use aya_ebpf::programs::TcContext;
use proxy_common::{
    counters::{Counter, DropReason},
    ipv6::In6,
    maps::{Backend6, MASQUERADE_MARK, ServiceKey6, hook},
};

use crate::{
    Verdict, conntrack,
    counters::{DeviceEvent, count, count_device},
    ifindex,
    lookup::{self, Frontend, Lookup},
    maps::SERVICES6,
    parse6::{self, Packet6, Parsed6},
    refuse, translate,
};

/// The TCP or UDP packet, or what to do with anything else.
#[inline(always)]
fn see(ctx: &TcContext) -> Result<Packet6, Verdict> {
    match parse6::parse(ctx) {
        Parsed6::Flow(pkt) => Ok(pkt),
        Parsed6::Fragment => Err(count(Counter::PassedFragment, Verdict::Pass)),
        Parsed6::Malformed => Err(count(Counter::PassedMalformed, Verdict::Pass)),
        Parsed6::OtherProtocol => Err(Verdict::Pass),
    }
}

/// A BPF function of its own (never inlined), so its stack is not added
/// to the IPv4 path's frame; each step below is one too, so that only one
/// step's stack sits on this one's at a time (the verifier allows 512 bytes
/// for the whole chain).
#[inline(never)]
pub(crate) fn from_pod(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let pkt = match see(ctx) {
        Ok(pkt) => pkt,
        Err(verdict) => return Ok(verdict),
    };
    match request(&pkt)? {
        Lookup::ToBackend(backend, frontend, _) => forward(ctx, &pkt, &backend, frontend),
        Lookup::NoBackend => refuse::refuse6(ctx, &pkt),
        Lookup::NotService => Ok(Verdict::Pass),
    }
}

/// Where a pod's packet goes: to a backend when it is (or starts) a flow
/// to an IPv6 frontend.
#[inline(never)]
fn request(pkt: &Packet6) -> Result<Lookup<In6>, DropReason> {
    let key = ServiceKey6 { addr: pkt.dst, port: pkt.dst_port, proto: pkt.proto, _pad: 0 };
    let Some(svc) = SERVICES6.get_ptr(key).map(|s| unsafe { core::ptr::read(s) }) else {
        conntrack::forget_direct(pkt);
        return Ok(Lookup::NotService);
    };
    lookup::to_frontend(pkt, &svc)
}

/// Rewrites a request for its backend, counted.
#[inline(never)]
fn forward(ctx: &TcContext, pkt: &Packet6, backend: &Backend6, frontend: Frontend) -> Result<Verdict, DropReason> {
    translate::forward6(ctx, pkt, backend)?;
    if frontend.masquerade() {
        // The node's masquerade rule source-NATs it, as IPv4's.
        ctx.set_mark(unsafe { (*ctx.skb.skb).mark } | MASQUERADE_MARK);
    }
    count(Counter::Translated, ());
    count_device(ifindex(ctx), hook::TC_INGRESS, DeviceEvent::Translated, false);
    Ok(Verdict::Pass)
}

/// Never inlined, as [`from_pod`].
#[inline(never)]
pub(crate) fn to_pod(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let pkt = match see(ctx) {
        Ok(pkt) => pkt,
        Err(verdict) => return Ok(verdict),
    };
    let Some(frontend) = conntrack::reply(&pkt, conntrack::now()) else {
        return Ok(Verdict::Pass);
    };
    translate::reverse6(ctx, &pkt, &frontend)?;
    count(Counter::ReverseTranslated, ());
    count_device(ifindex(ctx), hook::TC_EGRESS, DeviceEvent::ReverseTranslated, false);
    Ok(Verdict::Pass)
}
