//! kpr's datapath: TC programs on the node side of pod interfaces that
//! translate Service VIPs to endpoints and replies back.
//!
//! One step per module: `parse` (headers and what they say), `lookup`
//! (services and conntrack), `translate` (NAT and checksums), `refuse`
//! (answers for Services without endpoints). This file holds only the thin
//! program wrapper.
#![no_std]
#![no_main]

mod counters;
mod lookup;
mod maps;
mod neighbor;
mod parse;
mod refuse;
mod translate;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::counters::Counter;

use crate::{
    counters::{count, count_traffic_via},
    lookup::{Lookup, is_vip},
    parse::Parsed,
};

/// What to do with a packet, decided by the steps below.
pub enum Verdict {
    Pass,
    Drop,
    /// Sent back out of the interface it came in on (a refusal).
    Redirect,
    /// Sent out of this interface (to the destination pod).
    RedirectTo(u32),
}

/// Attached on ingress of the node side of every pod interface: it sees
/// what pods send, both their requests to VIPs and their replies as backends.
#[classifier]
pub fn kpr_from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(Verdict::Pass) => TC_ACT_OK as i32,
        Ok(Verdict::Drop) => TC_ACT_SHOT as i32,
        Ok(Verdict::Redirect) => refuse::redirect_back(&ctx),
        Ok(Verdict::RedirectTo(ifindex)) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        // A helper failed half-way through rewriting: the packet may be
        // inconsistent, so it must not go on.
        Err(()) => TC_ACT_SHOT as i32,
    }
}

fn try_from_pod(ctx: &TcContext) -> Result<Verdict, ()> {
    let pkt = match parse::parse(ctx) {
        Parsed::Flow(pkt) => pkt,
        Parsed::NotIpv4 => return Ok(count(Counter::PassedNotIpv4, Verdict::Pass)),
        Parsed::Malformed => return Ok(count(Counter::PassedMalformed, Verdict::Pass)),
        Parsed::OtherProtocol => return Ok(Verdict::Pass),
        Parsed::Fragment { dst } => {
            return Ok(if is_vip(dst) {
                count(Counter::DroppedFragment, Verdict::Drop)
            } else {
                count(Counter::PassedFragment, Verdict::Pass)
            });
        }
        Parsed::Truncated { dst } => {
            return Ok(if is_vip(dst) {
                count(Counter::DroppedTruncated, Verdict::Drop)
            } else {
                count(Counter::PassedMalformed, Verdict::Pass)
            });
        }
    };

    neighbor::learn(ctx, pkt.src);

    match lookup::lookup(&pkt) {
        Lookup::Reply(rev) => {
            translate::reverse(ctx, &pkt, &rev)?;
            count(Counter::ReverseTranslated, ());
            count_traffic_via(rev.service_id, pkt.src, pkt.src_port, ctx.len());
            deliver(ctx, pkt.dst, None)
        }
        Lookup::ToBackend(backend, service_id) => {
            translate::forward(ctx, &pkt, &backend)?;
            count(Counter::Translated, ());
            count_traffic_via(service_id, backend.addr, backend.port, ctx.len());
            // Seen from the backend, the packet was routed by the node: it
            // comes from the gateway MAC the client addressed.
            let gateway_mac = ctx.load::<[u8; 6]>(0).map_err(|_| ())?;
            deliver(ctx, backend.addr, Some(gateway_mac))
        }
        Lookup::NoBackend => refuse::refuse(ctx, &pkt),
        Lookup::BackendMissing => Ok(count(Counter::DroppedBackendMissing, Verdict::Drop)),
        Lookup::NotService => Ok(Verdict::Pass),
    }
}

/// Hands a translated packet to `dst`'s interface when known, else to the
/// host stack to route.
#[inline(always)]
fn deliver(ctx: &TcContext, dst: [u8; 4], src_mac: Option<[u8; 6]>) -> Result<Verdict, ()> {
    Ok(match neighbor::readdress(ctx, dst, src_mac)? {
        Some(ifindex) => count(Counter::Redirected, Verdict::RedirectTo(ifindex)),
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
