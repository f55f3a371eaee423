//! Traffic from outside in XDP, as Cilium's nodeport path: a request to a
//! node port, external IP or load balancer IP under `externalTrafficPolicy:
//! Cluster` whose backend is on another node is translated both ways (to
//! the backend, from a NAT port of the node) and sent straight back out
//! (XDP_TX, or XDP_REDIRECT to another device running this program) to the
//! next hop the kernel's FIB names; the backend's replies are translated
//! back and sent to the client the same way. The node's stack never sees
//! these packets.
//!
//! IPv4 and IPv6 alike (see `frame::Frame`), each in its own tables. Each
//! step is a BPF function of its own (never inlined): the 512-byte stack
//! holds the frames of one chain of calls at a time, and IPv6's addresses
//! would not fit in one.
//!
//! Everything else goes on to the TC program, which shares the conntrack
//! and the source NAT's tables: a Local policy (the client's address is
//! kept, the backend is here), a backend on this node, refusals, new flows
//! whose route or neighbour is not known yet (the TC program's redirect
//! resolves it, and the next flow stays in XDP) or whose client is not
//! behind a device it can send from. A flow the TC program source-NATed
//! may go on here once XDP can send it; one it did not (from before this
//! release, through the node's masquerade rule) stays there.

use aya_ebpf::programs::XdpContext;
use proxy_common::{
    conntrack::FlowKey,
    counters::{Counter, DropReason},
    maps::{Backend, NatAddress, hook, kind},
};

use crate::{
    conntrack,
    counters::count,
    fib::{Fib, Hop},
    frame::{End, Frame},
    lookup::{self, Lookup, Start},
    maps::DEVICES,
    nat,
    parse::Packet,
};

/// What the XDP program does with a packet it keeps; drops are
/// `Err(DropReason)`. `repr(u8)`: the tag first, as the kernel's BTF check
/// wants of a type in a BPF function's signature (see `parse6::Parsed6`).
#[repr(u8)]
pub(crate) enum Outcome {
    /// On to the TC program and the node's stack, untouched.
    Pass,
    /// Translated, to be sent out of `ifindex`.
    Forward { ifindex: u32, reply: bool },
}

/// What the XDP program does with an IPv4 or IPv6 packet, parsed into
/// `pkt`: a backend's reply to a flow it NATs goes back to the client;
/// anything else may be a request.
#[inline(always)]
pub(crate) fn handle<A: Frame>(ctx: &XdpContext, ingress: u32, pkt: &mut Packet<A>) -> Result<Outcome, DropReason> {
    if !A::parse(ctx, pkt) {
        return Ok(Outcome::Pass);
    }
    match reply(ctx, ingress, pkt)? {
        Outcome::Pass => request(ctx, ingress, pkt),
        forward => Ok(forward),
    }
}

/// Whether a packet may be sent out of `ifindex` from XDP: back out of the
/// device it came in on, or out of another device this program runs on
/// natively (a driver without XDP of its own may drop what is redirected to it).
#[inline(always)]
fn may_leave_by(ifindex: u32, ingress: u32) -> bool {
    ifindex == ingress || unsafe { DEVICES.get(&ifindex) } == Some(&hook::XDP_NATIVE)
}

/// Where a request goes on from XDP: to its backend (for frontend `id`),
/// by the next hop, its client translated to a node address and port.
struct Way<A> {
    id: u32,
    backend: Backend<A>,
    hop: Hop,
    nat: NatAddress<A>,
}

/// Which flow a request from outside is part of, if XDP may forward it.
/// `repr(u8)` as [`Outcome`].
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// Not to a frontend from outside under the Cluster policy: the TC
    /// program's (a refusal, a Local policy, a ClusterIP).
    NotOurs,
    New,
    Tracked,
}

/// A request from outside to a node port, external or load balancer IP
/// under the Cluster policy, to a backend XDP can reach.
#[inline(never)]
fn request<A: Frame>(ctx: &XdpContext, ingress: u32, pkt: &Packet<A>) -> Result<Outcome, DropReason> {
    let mut way = core::mem::MaybeUninit::<Way<A>>::uninit();
    // SAFETY: integers and arrays of them.
    let way = unsafe { crate::zero::zero(&mut way) };
    match choose(pkt, way)? {
        Choice::NotOurs => return Ok(Outcome::Pass),
        Choice::New => {
            let routed = routes(ctx, ingress, pkt, way);
            if !allocate(ctx, pkt, way, routed) {
                return Ok(count(Counter::XdpPassedToStack, Outcome::Pass));
            }
        }
        Choice::Tracked => {
            // A flow with no port is not one either program source-NATed.
            if !tracked_nat(pkt, way) {
                return Ok(Outcome::Pass);
            }
            // Its route may have gone, or moved to a device XDP cannot send from.
            if !route_on(ctx, ingress, pkt, way) {
                return Err(DropReason::NoRoute);
            }
        }
    }
    let src = End { addr: way.nat.addr, port: way.nat.port };
    let dst = End { addr: way.backend.addr, port: way.backend.port };
    A::rewrite(ctx, pkt, src, dst, &way.hop)?;
    count(Counter::Translated, ());
    count(Counter::XdpForwarded, ());
    A::count_traffic(way.id, way.backend.addr, way.backend.port, (pkt.l4_len + A::HLEN) as u32);
    Ok(Outcome::Forward { ifindex: way.hop.ifindex, reply: false })
}

/// The backend of a request to a frontend from outside (into `way`), as
/// [`lookup::to_frontend`] chooses it.
#[inline(never)]
fn choose<A: Frame>(pkt: &Packet<A>, way: &mut Way<A>) -> Result<Choice, DropReason> {
    // Most packets on a device are to no Service, and are done with here.
    let Some(svc) = A::service(pkt.dst, pkt.dst_port, pkt.proto) else { return Ok(Choice::NotOurs) };
    if !kind::is_external(svc.kind) {
        return Ok(Choice::NotOurs);
    }
    // Source ranges and Local policy drops are decided here, before the stack
    // spends anything on the packet.
    let Lookup::ToBackend(backend, frontend, start) = lookup::to_frontend(pkt, &svc)? else {
        return Ok(Choice::NotOurs);
    };
    if !frontend.masquerade() {
        return Ok(Choice::NotOurs);
    }
    (way.id, way.backend) = (frontend.id, backend);
    Ok(if start == Start::New { Choice::New } else { Choice::Tracked })
}

/// Whether a new flow to `way.backend` has a way on XDP can send it by,
/// and one back to its client: `way`'s hop, and the node address toward
/// the backend (as `way.nat.addr`).
#[inline(never)]
fn routes<A: Frame>(ctx: &XdpContext, ingress: u32, pkt: &Packet<A>, way: &mut Way<A>) -> bool {
    let mut fib = Fib::new(ctx, ingress, pkt.proto, pkt.l4_len + A::HLEN);
    let Some((hop, node)) = A::route(&mut fib, None, way.backend.addr) else { return false };
    if !may_leave_by(hop.ifindex, ingress) {
        return false;
    }
    // The replies must be able to leave from XDP too: a client reached
    // another way (a pod of this node whose request came back through a
    // router) is the stack's.
    let back = A::route(&mut fib, Some(pkt.dst), pkt.src);
    if !back.is_some_and(|(hop, _)| may_leave_by(hop.ifindex, ingress)) {
        return false;
    }
    way.hop = hop;
    way.nat.addr = node;
    true
}

/// A NAT port for a new flow that was `routed` (see [`routes`]); false
/// leaves the flow to the TC path (a backend on this node, no neighbour
/// yet: TC's redirect resolves it, and the next flow stays in XDP), and an
/// earlier flow's mapping goes.
#[inline(never)]
fn allocate<A: Frame>(ctx: &XdpContext, pkt: &Packet<A>, way: &mut Way<A>, routed: bool) -> bool {
    let flow = FlowKey::service(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto);
    let nat =
        if routed { nat::allocate(ctx.ctx.cast(), &flow, &way.backend, way.nat.addr, conntrack::now()) } else { None };
    match nat {
        Some(nat) => {
            way.nat = nat;
            true
        }
        None => {
            nat::forget(&flow);
            false
        }
    }
}

/// Whether XDP translates tracked flow `pkt` (to its NAT address, into `way`).
#[inline(never)]
fn tracked_nat<A: Frame>(pkt: &Packet<A>, way: &mut Way<A>) -> bool {
    let flow = FlowKey::service(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto);
    match nat::of_flow(&flow) {
        Some(nat) => {
            way.nat = nat;
            true
        }
        None => false,
    }
}

/// Whether a tracked flow's request can still go on from XDP (its hop into `way`).
#[inline(never)]
fn route_on<A: Frame>(ctx: &XdpContext, ingress: u32, pkt: &Packet<A>, way: &mut Way<A>) -> bool {
    let mut fib = Fib::new(ctx, ingress, pkt.proto, pkt.l4_len + A::HLEN);
    match A::route(&mut fib, Some(way.nat.addr), way.backend.addr) {
        Some((hop, _)) if may_leave_by(hop.ifindex, ingress) => {
            way.hop = hop;
            true
        }
        _ => false,
    }
}

/// Where a backend's reply goes back from XDP: to the client, from the
/// frontend (of Service `id`) it asked, by the next hop.
struct Back<A> {
    id: u32,
    client: End<A>,
    frontend: End<A>,
    hop: Hop,
}

/// A backend's reply to a flow this program NATs, back to its client;
/// anything else passes on.
#[inline(never)]
fn reply<A: Frame>(ctx: &XdpContext, ingress: u32, pkt: &Packet<A>) -> Result<Outcome, DropReason> {
    let mut back = core::mem::MaybeUninit::<Back<A>>::uninit();
    // SAFETY: integers and arrays of them.
    let back = unsafe { crate::zero::zero(&mut back) };
    if !returning(pkt, back) {
        return Ok(Outcome::Pass);
    }
    if !route_back(ctx, ingress, pkt, back) {
        return Err(DropReason::NoRoute);
    }
    A::rewrite(ctx, pkt, back.frontend, back.client, &back.hop)?;
    count(Counter::ReverseTranslated, ());
    count(Counter::XdpReplyForwarded, ());
    A::count_traffic(back.id, pkt.src, pkt.src_port, (pkt.l4_len + A::HLEN) as u32);
    Ok(Outcome::Forward { ifindex: back.hop.ifindex, reply: true })
}

/// Whether `pkt` is a backend's reply in a live flow this program NATs,
/// and where it goes back (into `back`). The mapping of a flow that is
/// over goes.
#[inline(never)]
fn returning<A: Frame>(pkt: &Packet<A>, back: &mut Back<A>) -> bool {
    let Some(client) = nat::client_of_reply(pkt) else { return false };
    // The flow's conntrack knows the reply as backend -> client.
    let Some(frontend) = conntrack::reply_to(pkt, client.addr, client.port, conntrack::now()) else {
        nat::forget_reply(pkt);
        return false;
    };
    back.id = frontend.service_id;
    back.client = End { addr: client.addr, port: client.port };
    back.frontend = End { addr: frontend.addr, port: frontend.port };
    true
}

/// Whether XDP can send a reply back to `back.client` (its hop into `back`).
#[inline(never)]
fn route_back<A: Frame>(ctx: &XdpContext, ingress: u32, pkt: &Packet<A>, back: &mut Back<A>) -> bool {
    let mut fib = Fib::new(ctx, ingress, pkt.proto, pkt.l4_len + A::HLEN);
    match A::route(&mut fib, Some(back.frontend.addr), back.client.addr) {
        Some((hop, _)) if may_leave_by(hop.ifindex, ingress) => {
            back.hop = hop;
            true
        }
        _ => false,
    }
}
