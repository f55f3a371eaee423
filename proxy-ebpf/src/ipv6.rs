//! The per-packet path for IPv6: a pod's request to an IPv6 frontend in
//! the IPv6 service map is given a backend (the shared conntrack and
//! choice, see `lookup`) and rewritten on the pod's interface; the
//! backend's replies are rewritten back on the client's interface. On the
//! node's devices the same steps serve traffic from outside to node ports,
//! external and load balancer IPs (what XDP passes on, see `nodeport`):
//! under the Cluster policy a request to a backend on another node is
//! source-NATed to the node and sent on, as its replies are back (see
//! `masquerade`); under a Local one only this node's endpoints serve it, while pods reach
//! it through every endpoint (`lookup::in_cluster`). A
//! Service without endpoints is refused at once; a pod that is its own
//! backend is answered through `HAIRPIN_SOURCE6` (see `hairpin`); an
//! ICMPv6 error about a tracked flow (a backend's port unreachable, a
//! router's packet too big) is rewritten to match what its receiver sent
//! or was sent. A fragmented datagram is translated whole, its first
//! fragment's ports remembered for the rest (see `fragments`). What cannot
//! be translated (a stray later fragment, a packet cut short) is dropped
//! when it is to a VIP and passes otherwise, counted either way; every
//! other protocol (the rest of ICMPv6 and Neighbor Discovery among them)
//! passes as it came.

use aya_ebpf::programs::TcContext;
use proxy_common::{
    counters::{Counter, DropReason},
    ipv4::Fragment,
    ipv6::In6,
    maps::{Backend6, HAIRPIN_SOURCE6, ServiceKey6, flags, hook},
};

use crate::{
    Verdict, conntrack,
    counters::{DeviceEvent, count, count_device, count_traffic6},
    family::Family,
    fragments, hairpin, ifindex,
    lookup::{self, Frontend, Lookup},
    maps::SERVICES6,
    masquerade::{self, Masqueraded},
    nat,
    parse6::{self, IcmpError6, Packet6, Parsed6},
    refuse, translate,
};

/// What becomes of a packet neither a flow nor an ICMPv6 error: one that
/// cannot be translated is dropped if it is to a VIP (as IPv4's), else it
/// passes, counted where it is not plain traffic. (The programs match on
/// what `parse6` returns in place: a copy would cost the stack its size.)
#[inline(always)]
fn pass(parsed: &Parsed6) -> Result<Verdict, DropReason> {
    match parsed {
        Parsed6::Fragment { dst } if is_vip6(dst) => Err(DropReason::Fragment),
        Parsed6::Fragment { .. } => Ok(count(Counter::PassedFragment, Verdict::Pass)),
        Parsed6::Truncated { dst } if is_vip6(dst) => Err(DropReason::Truncated),
        Parsed6::Truncated { .. } | Parsed6::Malformed => Ok(count(Counter::PassedMalformed, Verdict::Pass)),
        _ => Ok(Verdict::Pass),
    }
}

/// Whether `addr` is an IPv6 VIP (the agent marks each in the service map).
#[inline(always)]
fn is_vip6(addr: &In6) -> bool {
    SERVICES6.get_ptr(ServiceKey6 { addr: *addr, port: [0; 2], proto: 0, _pad: 0 }).is_some()
}

/// A BPF function of its own (never inlined), so its stack is not added
/// to the IPv4 path's frame; each step below is one too, so that only one
/// step's stack sits on this one's at a time (the verifier allows 512 bytes
/// for the whole chain).
#[inline(never)]
pub(crate) fn from_pod(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let parsed = parse6::parse(ctx);
    let pkt = match &parsed {
        Parsed6::Flow(pkt) => pkt,
        Parsed6::IcmpError(err) => {
            if masquerade::icmp_error(ctx, err, ifindex(ctx))? {
                return Ok(Verdict::Redirected);
            }
            return icmp_from_client(ctx, err);
        }
        other => return pass(other),
    };
    if masquerade::reply(ctx, pkt, ifindex(ctx))? {
        remember_ports(pkt);
        return Ok(Verdict::Redirected);
    }
    if pkt.dst == HAIRPIN_SOURCE6 {
        return hairpin_reply(ctx, pkt);
    }
    let (backend, frontend, start) = match request(pkt, ifindex(ctx))? {
        Lookup::ToBackend(backend, frontend, start) => (backend, frontend, start),
        Lookup::NoBackend => return refuse::refuse6(ctx, pkt),
        Lookup::NotService => return Ok(Verdict::Pass),
    };
    // Source NAT's steps from here, not from a step: one frame fewer under them.
    let verdict = match forward(ctx, pkt, &backend)? {
        Some(reflected) => reflected,
        None => match masquerade::request(ctx, pkt, &backend, &frontend, start)? {
            Masqueraded::Sent => Verdict::Redirected,
            Masqueraded::No => Verdict::Pass,
            Masqueraded::TooBig { mtu } => refuse::too_big6(ctx, pkt, mtu)?,
        },
    };
    if !matches!(verdict, Verdict::SendBack) {
        count_request(ctx, &backend, &frontend, matches!(verdict, Verdict::Redirected));
    }
    Ok(verdict)
}

/// Where a packet that came in on interface `ifindex` goes: to a backend
/// when it is (or starts) a flow to an IPv6 frontend. A pod reaches a
/// Local policy's node port or external IP through every endpoint, as with
/// IPv4; traffic from outside only through this node's.
#[inline(never)]
fn request(pkt: &Packet6, ifindex: u32) -> Result<Lookup<In6>, DropReason> {
    let Some(mut svc) = In6::service(pkt.dst, pkt.dst_port, pkt.proto) else {
        if pkt.fragment != Fragment::Later {
            conntrack::forget_direct(pkt);
        }
        return Ok(Lookup::NotService);
    };
    if svc.flags & flags::LOCAL != 0 && lookup::is_pod_interface(ifindex) {
        svc = lookup::in_cluster::<In6>(svc);
    }
    lookup::to_frontend(pkt, &svc)
}

/// Rewrites a request for its backend; a pod that is its own backend gets
/// it back at once (the verdict), every other request goes on.
#[inline(never)]
fn forward(ctx: &TcContext, pkt: &Packet6, backend: &Backend6) -> Result<Option<Verdict>, DropReason> {
    translate::forward6(ctx, pkt, backend)?;
    remember_ports(pkt);
    if !hairpin::is_hairpin(pkt, backend.addr, ifindex(ctx)) {
        return Ok(None);
    }
    // Its own backend: from the hairpin address, straight back to it.
    translate::source_address6(ctx, pkt, HAIRPIN_SOURCE6)?;
    Ok(Some(hairpin::reflect(ctx)?))
}

/// Counts a request translated for `backend` of `frontend`, `sent` on by the program.
#[inline(never)]
fn count_request(ctx: &TcContext, backend: &Backend6, frontend: &Frontend, sent: bool) {
    count(Counter::Translated, ());
    count_device(ifindex(ctx), hook::TC_INGRESS, DeviceEvent::Translated, sent);
    count_traffic6(frontend.id, &backend.addr, backend.port, ctx.len());
}

/// A pod's answer to a hairpin request (to `HAIRPIN_SOURCE6`): translated
/// back to frontend -> pod and sent back to it. Any other packet to that
/// address is not a flow of ours: the node decides what becomes of it.
#[inline(never)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet6) -> Result<Verdict, DropReason> {
    // The flow was tracked with the pod as its client.
    let seen = Packet6 { dst: pkt.src, ..*pkt };
    let Some(frontend) = conntrack::reply(&seen) else {
        return Ok(Verdict::Pass);
    };
    translate::reverse6(ctx, pkt, &frontend)?;
    translate::destination_address6(ctx, pkt, pkt.src)?;
    remember_ports(pkt);
    count(Counter::ReverseTranslated, ());
    count_device(ifindex(ctx), hook::TC_INGRESS, DeviceEvent::ReverseTranslated, false);
    count_traffic6(frontend.service_id, &pkt.src, pkt.src_port, ctx.len());
    hairpin::reflect(ctx)
}

/// A client's error about a reply it got from a frontend goes to the
/// backend that sent it.
#[inline(never)]
fn icmp_from_client(ctx: &TcContext, err: &IcmpError6) -> Result<Verdict, DropReason> {
    if let Some(backend) = lookup::icmp_to_backend(err) {
        translate::icmp6_to_backend(ctx, err, &backend)?;
        count(Counter::IcmpErrorTranslated, ());
    }
    Ok(Verdict::Pass)
}

/// An error about a packet the client sent to a backend shows the frontend.
#[inline(never)]
fn icmp_to_client(ctx: &TcContext, err: &IcmpError6) -> Result<Verdict, DropReason> {
    if let Some(frontend) = lookup::icmp_to_client(err) {
        translate::icmp6_to_client(ctx, err, &frontend)?;
        count(Counter::IcmpErrorTranslated, ());
    }
    Ok(Verdict::Pass)
}

/// Never inlined, as [`from_pod`].
#[inline(never)]
pub(crate) fn to_pod(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let parsed = parse6::parse(ctx);
    match &parsed {
        Parsed6::Flow(pkt) => {
            // Each its own frame: both at once would not fit the stack.
            if !reverse(ctx, pkt)? {
                nat::yield_to_node(ctx.skb.skb.cast(), pkt);
            }
            Ok(Verdict::Pass)
        }
        Parsed6::IcmpError(err) => icmp_to_client(ctx, err),
        other => pass(other),
    }
}

/// A backend's reply in a tracked flow shows the frontend; whether `pkt` was one.
#[inline(never)]
fn reverse(ctx: &TcContext, pkt: &Packet6) -> Result<bool, DropReason> {
    let Some(frontend) = conntrack::reply(pkt) else {
        return Ok(false);
    };
    translate::reverse6(ctx, pkt, &frontend)?;
    remember_ports(pkt);
    count(Counter::ReverseTranslated, ());
    count_device(ifindex(ctx), hook::TC_EGRESS, DeviceEvent::ReverseTranslated, false);
    count_traffic6(frontend.service_id, &pkt.src, pkt.src_port, ctx.len());
    Ok(true)
}

/// A translated first fragment's ports, for the rest of its datagram.
#[inline(always)]
fn remember_ports(pkt: &Packet6) {
    if pkt.fragment == Fragment::First {
        fragments::remember6(pkt);
    }
}
