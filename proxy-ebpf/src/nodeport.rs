//! Traffic from outside in XDP, as Cilium's nodeport path: a request to a
//! node port, external IP or load balancer IP under `externalTrafficPolicy:
//! Cluster` whose backend is on another node is translated both ways (to
//! the backend, from a NAT port of the node) and sent straight back out
//! (XDP_TX, or XDP_REDIRECT to another device running this program) to the
//! next hop the kernel's FIB names; the backend's replies are translated
//! back and sent to the client the same way. The node's stack never sees
//! these packets.
//!
//! Everything else goes on to the TC program, which shares the conntrack:
//! a Local policy (the client's address is kept, the backend is here), a
//! backend on this node, refusals, new flows whose route or neighbour is
//! not known yet (the stack resolves it, and the next flow stays in XDP)
//! or whose client is not behind a device it can send from. A flow stays on
//! the path it started on for its whole life.

use aya_ebpf::programs::XdpContext;
use proxy_common::{
    conntrack::FlowKey,
    counters::{Counter, DropReason},
    ipv4::MIN_HLEN,
    maps::{ServiceKey, hook, kind},
};

use crate::{
    conntrack,
    counters::{count, count_traffic_via},
    fib, frame,
    frame::{End, Hop},
    lookup::{self, Lookup, Start},
    maps::DEVICES,
    nat,
    parse::Packet,
};

/// What the XDP program does with a packet it keeps; drops are `Err(DropReason)`.
pub(crate) enum Outcome {
    /// On to the TC program and the node's stack, untouched.
    Pass,
    /// Translated, to be sent out of `ifindex`.
    Forward { ifindex: u32, reply: bool },
}

#[inline(always)]
pub(crate) fn handle(ctx: &XdpContext, ingress: u32) -> Result<Outcome, DropReason> {
    let Some(pkt) = frame::parse(ctx) else { return Ok(Outcome::Pass) };
    if let Some((key, client)) = nat::client_of_reply(&pkt) {
        return reply(ctx, ingress, &pkt, &key, End { addr: client.addr, port: client.port });
    }
    request(ctx, ingress, &pkt)
}

/// Whether a packet may be sent out of `ifindex` from XDP: back out of the
/// device it came in on, or out of another device this program runs on
/// natively (a driver without XDP of its own may drop what is redirected to it).
#[inline(always)]
fn may_leave_by(ifindex: u32, ingress: u32) -> bool {
    ifindex == ingress || unsafe { DEVICES.get(&ifindex) } == Some(&hook::XDP_NATIVE)
}

fn request(ctx: &XdpContext, ingress: u32, pkt: &Packet) -> Result<Outcome, DropReason> {
    // Most packets on a device are to no Service, and are done with here.
    let key = ServiceKey { addr: pkt.dst, port: pkt.dst_port, proto: pkt.proto, _pad: 0 };
    let Some(svc) = lookup::service(&key) else { return Ok(Outcome::Pass) };
    if !kind::is_external(svc.kind) {
        return Ok(Outcome::Pass);
    }
    // Source ranges and Local policy drops are decided here, before the stack
    // spends anything on the packet.
    let (backend, frontend, start) = match lookup::to_frontend(pkt, &svc)? {
        Lookup::ToBackend(backend, frontend, start) => (backend, frontend, start),
        // A refusal is answered by the TC program.
        Lookup::NoBackend | Lookup::NotService => return Ok(Outcome::Pass),
    };
    if !frontend.masquerade() {
        return Ok(Outcome::Pass);
    }
    let flow = FlowKey::service(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto);
    let total_len = pkt.l4_len + MIN_HLEN;
    let (hop, nat) = match start {
        Start::New => {
            let routed = fib::route(ctx, ingress, pkt.proto, total_len, None, backend.addr)
                .filter(|(hop, _)| may_leave_by(hop.ifindex, ingress))
                // The replies must be able to leave from XDP too: a client
                // reached another way (a pod of this node whose request came
                // back through a router) is the stack's.
                .filter(|_| {
                    fib::route(ctx, ingress, pkt.proto, total_len, Some(pkt.dst), pkt.src)
                        .is_some_and(|(hop, _)| may_leave_by(hop.ifindex, ingress))
                });
            let nat = routed.as_ref().and_then(|(_, node)| nat::allocate(&flow, &backend, *node, conntrack::now()));
            match (routed, nat) {
                (Some((hop, _)), Some(nat)) => (hop, nat),
                _ => {
                    // A backend on this node, or no neighbour yet: the TC
                    // path takes the flow (and an earlier flow's mapping goes).
                    nat::forget(&flow);
                    return Ok(count(Counter::XdpPassedToStack, Outcome::Pass));
                }
            }
        }
        Start::Tracked => {
            // A flow the stack carries from its start stays there.
            let Some(nat) = nat::of_flow(&flow) else { return Ok(Outcome::Pass) };
            // Its route may have gone, or moved to a device XDP cannot send from.
            match fib::route(ctx, ingress, pkt.proto, total_len, Some(nat.addr), backend.addr) {
                Some((hop, _)) if may_leave_by(hop.ifindex, ingress) => (hop, nat),
                _ => return Err(DropReason::NoRoute),
            }
        }
    };
    let src = End { addr: nat.addr, port: nat.port };
    frame::rewrite(ctx, pkt, src, End { addr: backend.addr, port: backend.port }, &hop)?;
    count(Counter::Translated, ());
    count(Counter::XdpForwarded, ());
    count_traffic_via(frontend.id, backend.addr, backend.port, total_len as u32);
    Ok(Outcome::Forward { ifindex: hop.ifindex, reply: false })
}

/// A backend's reply to a flow this program NATs (`key` its mapping), back to `client`.
fn reply(ctx: &XdpContext, ingress: u32, pkt: &Packet, key: &FlowKey, client: End) -> Result<Outcome, DropReason> {
    // The flow's conntrack knows the reply as backend -> client.
    let seen = Packet { dst: client.addr, dst_port: client.port, ..*pkt };
    let Some(frontend) = conntrack::reply(&seen, conntrack::now()) else {
        nat::forget_reply(key);
        return Ok(Outcome::Pass);
    };
    let total_len = pkt.l4_len + MIN_HLEN;
    let hop: Hop = match fib::route(ctx, ingress, pkt.proto, total_len, Some(frontend.addr), client.addr) {
        Some((hop, _)) if may_leave_by(hop.ifindex, ingress) => hop,
        _ => return Err(DropReason::NoRoute),
    };
    frame::rewrite(ctx, pkt, End { addr: frontend.addr, port: frontend.port }, client, &hop)?;
    count(Counter::ReverseTranslated, ());
    count(Counter::XdpReplyForwarded, ());
    count_traffic_via(frontend.service_id, pkt.src, pkt.src_port, total_len as u32);
    Ok(Outcome::Forward { ifindex: hop.ifindex, reply: true })
}
