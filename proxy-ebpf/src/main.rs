//! kpr's datapath: cgroup socket hooks that give sockets a Service's
//! backend when they connect or send (`sock`) and check the source ranges
//! of the frontends that have them as the socket's packets leave (`fence`), TC programs on the node
//! side of pod interfaces and on the node's devices that translate Service
//! VIPs to endpoints per packet and replies back, and an XDP program on the
//! devices that forwards traffic from outside to other nodes (`nodeport`).
//!
//! One step per module: `parse` (headers and what they say), `lookup`
//! (services and backend choice, for either family through `family`),
//! `conntrack` (tracked flows), `fragments`
//! (the ports of fragmented datagrams), `translate` (NAT and checksums), `refuse`
//! (answers for Services without endpoints), `skb` (packet access),
//! `masquerade` (source NAT of traffic from outside on the TC path); for
//! XDP, `frame` (packet access and rewriting); for both, `fib` (routes) and
//! `nat` (source ports). Steps
//! return a [`DropReason`] as their error; this file holds only the thin
//! program wrapper, which counts every drop under its reason before
//! shooting the packet.
#![no_std]
#![no_main]
// For `atomic_xadd` (see counters.rs): BPF has no compare-and-swap, so core's
// atomic types offer no `fetch_add` on this target.
#![feature(core_intrinsics)]
// For `asm!` (see parse6.rs): BPF's inline assembly is still unstable.
#![feature(asm_experimental_arch)]
#![expect(internal_features, reason = "atomic_xadd is the only atomic add core offers on BPF")]

mod affinity;
mod bridge;
mod conntrack;
mod counters;
mod family;
mod fence;
mod fib;
mod fragments;
mod frame;
mod hairpin;
mod ipv6;
mod lookup;
mod maps;
mod masquerade;
mod nat;
mod nodeport;
mod parse;
mod parse6;
mod refuse;
mod skb;
mod sock;
mod translate;
mod zero;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    counters::{Counter, DropReason},
    ipv4::{ETH_P_IP, Fragment},
    ipv6::{ETH_P_IPV6, In6},
    maps::{Backend, hook},
};

use crate::{
    counters::{DeviceEvent, count, count_device, count_traffic_via},
    frame::Frame,
    lookup::{Lookup, is_vip},
    masquerade::Masqueraded,
    nodeport::Outcome,
    parse::{IcmpError, Network, Packet, Parsed},
};

/// What to do with a packet the datapath keeps; drops are `Err(DropReason)`.
pub enum Verdict {
    /// On its way, rewritten or not, through the node's own routing and netfilter.
    Pass,
    /// Rewritten into an answer to its sender (a refusal, or "too big";
    /// counted by the step that wrote it) and sent back out of the
    /// interface it came in on.
    SendBack,
    /// Translated and sent back out of the interface it came in on, to the
    /// pod that sent it (see `hairpin`).
    Reflect,
    /// Translated and sent on toward its next hop, past the node's routing,
    /// by the redirect a step set up (see `masquerade`).
    Redirected,
}

/// Attached on ingress of the node side of every pod interface (and of
/// `--devices`): it sees what pods send, and translates their requests to
/// Service frontends before the node routes them.
#[classifier]
pub(crate) fn kpr_from_pod(ctx: TcContext) -> i32 {
    let outcome = by_family(&ctx, || try_from_pod(&ctx), || ipv6::from_pod(&ctx));
    finish(&ctx, hook::TC_INGRESS, outcome)
}

/// Attached on egress of the same interfaces: it sees what the node
/// delivers to pods, and turns backends' replies back into the frontend's
/// just before the client gets them. Between the two, the node's routing,
/// conntrack and FORWARD chain see the flow under its real addresses in
/// both directions, as with the socket path, so NetworkPolicy rules there
/// apply and conntrack never finds half a flow.
#[classifier]
pub(crate) fn kpr_to_pod(ctx: TcContext) -> i32 {
    let outcome = by_family(&ctx, || try_to_pod(&ctx), || ipv6::to_pod(&ctx));
    finish(&ctx, hook::TC_EGRESS, outcome)
}

/// The packet through its family's path; what is neither passes, counted.
/// Each path is a BPF function of its own: one frame on the 512-byte stack
/// at a time.
#[inline(always)]
fn by_family(
    ctx: &TcContext,
    ipv4: impl FnOnce() -> Result<Verdict, DropReason>,
    ipv6: impl FnOnce() -> Result<Verdict, DropReason>,
) -> Result<Verdict, DropReason> {
    match parse::network(ctx) {
        Network::Ipv4 => ipv4(),
        Network::Ipv6 => ipv6(),
        Network::Other => Ok(count(Counter::PassedNotIp, Verdict::Pass)),
        Network::Short => Ok(count(Counter::PassedMalformed, Verdict::Pass)),
    }
}

/// Attached to the node's devices (`--xdp`): forwards traffic from outside
/// to backends on other nodes without the node's stack (see `nodeport`),
/// and passes everything else on to the TC program.
#[xdp]
pub(crate) fn kpr_xdp(ctx: XdpContext) -> u32 {
    match frame::ethertype(&ctx) {
        Some(ETH_P_IP) => xdp4(&ctx),
        Some(ETH_P_IPV6) => xdp6(&ctx),
        _ => xdp_action::XDP_PASS,
    }
}

/// Each family in a BPF function of its own, as on the TC path: only one
/// of their frames is on the 512-byte stack at a time.
#[inline(never)]
fn xdp4(ctx: &XdpContext) -> u32 {
    xdp_family::<[u8; 4]>(ctx)
}

#[inline(never)]
fn xdp6(ctx: &XdpContext) -> u32 {
    xdp_family::<In6>(ctx)
}

/// The packet is read into per-CPU scratch space rather than onto the
/// stack, which the steps after it fill (as Cilium's scratch maps).
#[inline(always)]
fn xdp_family<A: Frame>(ctx: &XdpContext) -> u32 {
    let Some(pkt) = A::scratch() else { return xdp_action::XDP_PASS };
    // SAFETY: this CPU's slot, and XDP programs do not nest on a CPU.
    xdp_action(ctx, |ctx, ingress| nodeport::handle(ctx, ingress, unsafe { &mut *pkt }))
}

/// The XDP action for what `handle` made of the packet; every drop and
/// forward counted.
#[inline(always)]
fn xdp_action(ctx: &XdpContext, handle: impl FnOnce(&XdpContext, u32) -> Result<Outcome, DropReason>) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    let outcome = handle(ctx, ingress);
    if matches!(outcome, Ok(Outcome::Pass)) {
        return xdp_action::XDP_PASS;
    }
    // Counted as XDP: the agent, which attached it, knows in which mode.
    let hook = hook::XDP;
    match outcome {
        Ok(Outcome::Forward { ifindex, reply }) => {
            let event = if reply { DeviceEvent::ReverseTranslated } else { DeviceEvent::Translated };
            count_device(ingress, hook, event, true);
            if ifindex == ingress {
                return xdp_action::XDP_TX;
            }
            let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
            if action == xdp_action::XDP_REDIRECT {
                return action;
            }
            count(Counter::DroppedRedirectFailed, xdp_action::XDP_DROP)
        }
        Ok(Outcome::Pass) => xdp_action::XDP_PASS,
        Err(reason) => {
            count_device(ingress, hook, DeviceEvent::Dropped, false);
            count(reason.counter(), xdp_action::XDP_DROP)
        }
    }
}

/// The TC action for a step's outcome.
#[inline(always)]
fn finish(ctx: &TcContext, hook: u8, outcome: Result<Verdict, DropReason>) -> i32 {
    match outcome.and_then(|verdict| act(ctx, verdict)) {
        Ok(action) => action,
        // The packet may be half rewritten, or must not go on: shoot it,
        // counted under why.
        Err(reason) => {
            count_device(ifindex(ctx), hook, DeviceEvent::Dropped, false);
            count(reason.counter(), TC_ACT_SHOT)
        }
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The TC action carrying out `verdict`.
#[inline(always)]
fn act(ctx: &TcContext, verdict: Verdict) -> Result<i32, DropReason> {
    Ok(match verdict {
        Verdict::Pass => TC_ACT_OK,
        Verdict::SendBack | Verdict::Reflect => skb::redirect(ifindex(ctx))?,
        Verdict::Redirected => TC_ACT_REDIRECT as i32,
    })
}

/// What parsing leaves for a program to look at, the rest decided here.
enum Seen {
    Flow(Packet),
    IcmpError(IcmpError),
    Done(Verdict),
}

#[inline(always)]
fn see(ctx: &TcContext) -> Result<Seen, DropReason> {
    Ok(match parse::parse(ctx) {
        Parsed::Flow(pkt) => Seen::Flow(pkt),
        Parsed::IcmpError(err) => Seen::IcmpError(err),
        Parsed::Malformed => Seen::Done(count(Counter::PassedMalformed, Verdict::Pass)),
        Parsed::OtherProtocol => Seen::Done(Verdict::Pass),
        Parsed::Fragment { dst } => {
            if is_vip(dst) {
                return Err(DropReason::Fragment);
            }
            Seen::Done(count(Counter::PassedFragment, Verdict::Pass))
        }
        Parsed::Truncated { dst } => {
            if is_vip(dst) {
                return Err(DropReason::Truncated);
            }
            Seen::Done(count(Counter::PassedMalformed, Verdict::Pass))
        }
    })
}

/// Each step below is a BPF function of its own, as on the IPv6 path:
/// only one step's stack sits on this one's at a time (source NAT's steps
/// too, called from here rather than from a step).
#[inline(never)]
fn try_from_pod(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let pkt = match see(ctx)? {
        Seen::Flow(pkt) => pkt,
        Seen::IcmpError(err) => {
            if masquerade::icmp_error(ctx, &err, ifindex(ctx))? {
                return Ok(Verdict::Redirected);
            }
            return icmp_from_pod(ctx, &err);
        }
        Seen::Done(verdict) => return Ok(verdict),
    };
    if masquerade::reply(ctx, &pkt, ifindex(ctx))? {
        if pkt.fragment == Fragment::First {
            fragments::remember(&pkt);
        }
        return Ok(Verdict::Redirected);
    }
    if let Some(verdict) = hairpin_reply(ctx, &pkt)? {
        return Ok(verdict);
    }
    let (backend, frontend, start) = match lookup::request(&pkt, ifindex(ctx))? {
        Lookup::ToBackend(backend, frontend, start) => (backend, frontend, start),
        Lookup::NoBackend => return refuse::refuse(ctx, &pkt),
        Lookup::NotService => return Ok(Verdict::Pass),
    };
    let verdict = match forward(ctx, &pkt, &backend)? {
        Some(reflected) => reflected,
        None => match masquerade::request(ctx, &pkt, &backend, &frontend, start)? {
            Masqueraded::Sent => Verdict::Redirected,
            Masqueraded::No => to_backend(ctx, &pkt, &backend)?,
            Masqueraded::TooBig { mtu } => refuse::too_big(ctx, &pkt, mtu)?,
        },
    };
    if !matches!(verdict, Verdict::SendBack) {
        count_request(ctx, &backend, &frontend, matches!(verdict, Verdict::Redirected));
    }
    Ok(verdict)
}

/// An ICMP error on its way from a pod or in from outside, about a flow
/// the datapath translates: rewritten to match what its receiver sent or
/// was sent.
#[inline(never)]
fn icmp_from_pod(ctx: &TcContext, err: &IcmpError) -> Result<Verdict, DropReason> {
    if let Some(reflected) = hairpin::icmp_error_about_request(ctx, err, ifindex(ctx)) {
        return Ok(count(Counter::IcmpErrorTranslated, reflected?));
    }
    // A client's error about a reply it got from a frontend goes to
    // the backend that sent it (the client itself, in a hairpin flow).
    if let Some(backend) = lookup::icmp_to_backend(err) {
        if hairpin::is_own_reply(err, &backend, ifindex(ctx)) {
            return Ok(count(Counter::IcmpErrorTranslated, hairpin::icmp_error_about_reply(ctx, err, &backend)?));
        }
        translate::icmp_to_backend(ctx, err, &backend)?;
        count(Counter::IcmpErrorTranslated, ());
    }
    Ok(Verdict::Pass)
}

/// A pod's answer to a hairpin request, translated back and sent back to
/// it; `None` for any other packet.
#[inline(never)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet) -> Result<Option<Verdict>, DropReason> {
    let Some(reflected) = hairpin::reply(ctx, pkt) else { return Ok(None) };
    let (verdict, frontend) = reflected?;
    count(Counter::ReverseTranslated, ());
    count_device(ifindex(ctx), hook::TC_INGRESS, DeviceEvent::ReverseTranslated, false);
    count_traffic_via(frontend.service_id, pkt.src, pkt.src_port, ctx.len());
    Ok(Some(verdict))
}

/// Rewrites a request for its backend; a pod that is its own backend gets
/// it back at once (the verdict), every other request goes on.
#[inline(never)]
fn forward(ctx: &TcContext, pkt: &Packet, backend: &Backend) -> Result<Option<Verdict>, DropReason> {
    translate::forward(ctx, pkt, backend)?;
    if pkt.fragment == Fragment::First {
        fragments::remember(pkt);
    }
    if hairpin::is_hairpin(pkt, backend.addr, ifindex(ctx)) {
        return Ok(Some(hairpin::request(ctx, pkt)?));
    }
    Ok(None)
}

/// A translated request the node routes on to its backend.
#[inline(never)]
fn to_backend(ctx: &TcContext, pkt: &Packet, backend: &Backend) -> Result<Verdict, DropReason> {
    bridge::switch_to_backend(ctx, ifindex(ctx), pkt, backend.addr)?;
    Ok(Verdict::Pass)
}

/// Counts a request translated for `backend` of `frontend`, `sent` on by the program.
#[inline(never)]
fn count_request(ctx: &TcContext, backend: &Backend, frontend: &lookup::Frontend, sent: bool) {
    count(Counter::Translated, ());
    count_device(ifindex(ctx), hook::TC_INGRESS, DeviceEvent::Translated, sent);
    count_traffic_via(frontend.id, backend.addr, backend.port, ctx.len());
}

#[inline(never)]
fn try_to_pod(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let pkt = match see(ctx)? {
        Seen::Flow(pkt) => pkt,
        Seen::IcmpError(err) => {
            // An error about a packet the client sent to a backend shows the frontend.
            if let Some(frontend) = lookup::icmp_to_client(&err) {
                translate::icmp_to_client(ctx, &err, &frontend)?;
                count(Counter::IcmpErrorTranslated, ());
            }
            return Ok(Verdict::Pass);
        }
        Seen::Done(verdict) => return Ok(verdict),
    };
    let Some(frontend) = conntrack::reply(&pkt) else {
        nat::yield_to_node(ctx.skb.skb.cast(), &pkt);
        return Ok(Verdict::Pass);
    };
    translate::reverse(ctx, &pkt, &frontend)?;
    if pkt.fragment == Fragment::First {
        fragments::remember(&pkt);
    }
    count(Counter::ReverseTranslated, ());
    count_device(ifindex(ctx), hook::TC_EGRESS, DeviceEvent::ReverseTranslated, false);
    count_traffic_via(frontend.service_id, pkt.src, pkt.src_port, ctx.len());
    Ok(Verdict::Pass)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
