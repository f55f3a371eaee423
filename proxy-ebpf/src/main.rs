//! kpr's datapath: cgroup socket hooks that give sockets a Service's
//! backend when they connect or send (`sock`), and TC programs on the node
//! side of pod interfaces that translate Service VIPs to endpoints per
//! packet and replies back.
//!
//! One step per module: `parse` (headers and what they say), `lookup`
//! (services and backend choice), `conntrack` (tracked flows), `fragments`
//! (the ports of fragmented datagrams), `translate` (NAT and checksums), `refuse`
//! (answers for Services without endpoints), `skb` (packet access). Steps
//! return a [`DropReason`] as their error; this file holds only the thin
//! program wrapper, which counts every drop under its reason before
//! shooting the packet.
#![no_std]
#![no_main]
// For `atomic_xadd` (see counters.rs): BPF has no compare-and-swap, so core's
// atomic types offer no `fetch_add` on this target.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the only atomic add core offers on BPF")]

mod conntrack;
mod counters;
mod fragments;
mod lookup;
mod maps;
mod neighbor;
mod parse;
mod refuse;
mod skb;
mod sock;
mod translate;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{
    counters::{Counter, DropReason},
    ipv4::Fragment,
};

use crate::{
    counters::{count, count_traffic_via},
    lookup::{IcmpLookup, Lookup, is_vip},
    parse::{IcmpError, Parsed},
};

/// What to do with a packet the datapath keeps; drops are `Err(DropReason)`.
pub enum Verdict {
    Pass,
    /// Sent back out of the interface it came in on (a refusal).
    SendBack,
    /// Sent out of this interface (to the destination pod).
    RedirectTo(u32),
}

/// Attached on ingress of the node side of every pod interface: it sees
/// what pods send, both their requests to VIPs and their replies as backends.
#[classifier]
pub(crate) fn kpr_from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx).and_then(|verdict| act(&ctx, verdict)) {
        Ok(action) => action,
        // The packet may be half rewritten, or must not go on: shoot it,
        // counted under why.
        Err(reason) => count(reason.counter(), TC_ACT_SHOT),
    }
}

/// The TC action carrying out `verdict`; redirects are counted once the
/// kernel has accepted them.
#[inline(always)]
fn act(ctx: &TcContext, verdict: Verdict) -> Result<i32, DropReason> {
    Ok(match verdict {
        Verdict::Pass => TC_ACT_OK,
        Verdict::SendBack => {
            let arrived_on = unsafe { (*ctx.skb.skb).ifindex };
            count(Counter::RefusedNoBackend, skb::redirect(arrived_on)?)
        }
        Verdict::RedirectTo(ifindex) => count(Counter::Redirected, skb::redirect(ifindex)?),
    })
}

fn try_from_pod(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let pkt = match parse::parse(ctx) {
        Parsed::Flow(pkt) => pkt,
        Parsed::IcmpError(err) => return icmp_error(ctx, &err),
        Parsed::NotIpv4 => return Ok(count(Counter::PassedNotIpv4, Verdict::Pass)),
        Parsed::Malformed => return Ok(count(Counter::PassedMalformed, Verdict::Pass)),
        Parsed::OtherProtocol => return Ok(Verdict::Pass),
        Parsed::Fragment { dst } => {
            if is_vip(dst) {
                return Err(DropReason::Fragment);
            }
            return Ok(count(Counter::PassedFragment, Verdict::Pass));
        }
        Parsed::Truncated { dst } => {
            if is_vip(dst) {
                return Err(DropReason::Truncated);
            }
            return Ok(count(Counter::PassedMalformed, Verdict::Pass));
        }
    };

    neighbor::learn(ctx, pkt.src);

    match lookup::lookup(&pkt)? {
        Lookup::Reply(rev) => {
            translate::reverse(ctx, &pkt, &rev)?;
            if pkt.fragment == Fragment::First {
                fragments::remember(&pkt);
            }
            count(Counter::ReverseTranslated, ());
            count_traffic_via(rev.service_id, pkt.src, pkt.src_port, ctx.len());
            deliver(ctx, pkt.dst, None)
        }
        Lookup::ToBackend(backend, service_id) => {
            // Seen from the backend, the packet was routed by the node: it
            // comes from the gateway MAC the client addressed. Read before
            // rewriting, so a failure leaves the packet whole.
            let gateway_mac: [u8; 6] = skb::load(ctx, 0)?;
            translate::forward(ctx, &pkt, &backend)?;
            if pkt.fragment == Fragment::First {
                fragments::remember(&pkt);
            }
            count(Counter::Translated, ());
            count_traffic_via(service_id, backend.addr, backend.port, ctx.len());
            deliver(ctx, backend.addr, Some(gateway_mac))
        }
        Lookup::NoBackend => refuse::refuse(ctx, &pkt),
        Lookup::NotService => Ok(Verdict::Pass),
    }
}

/// An ICMP error about a translated flow is translated like the flow's
/// packets, quote included, and goes where they go; any other passes.
#[inline(always)]
fn icmp_error(ctx: &TcContext, err: &IcmpError) -> Result<Verdict, DropReason> {
    match lookup::icmp_error(err) {
        IcmpLookup::ToClient(frontend) => {
            translate::icmp_to_client(ctx, err, &frontend)?;
            count(Counter::IcmpErrorTranslated, ());
            deliver(ctx, err.dst, None)
        }
        IcmpLookup::ToBackend(backend) => {
            let gateway_mac: [u8; 6] = skb::load(ctx, 0)?;
            translate::icmp_to_backend(ctx, err, &backend)?;
            count(Counter::IcmpErrorTranslated, ());
            deliver(ctx, backend.addr, Some(gateway_mac))
        }
        IcmpLookup::Unrelated => Ok(Verdict::Pass),
    }
}

/// Hands a translated packet to `dst`'s interface when known, else to the
/// host stack to route.
#[inline(always)]
fn deliver(ctx: &TcContext, dst: [u8; 4], src_mac: Option<[u8; 6]>) -> Result<Verdict, DropReason> {
    Ok(match neighbor::readdress(ctx, dst, src_mac)? {
        Some(ifindex) => Verdict::RedirectTo(ifindex),
        None => Verdict::Pass,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
