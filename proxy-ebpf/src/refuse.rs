//! Answers for new flows to a Service without ready endpoints, so clients
//! fail at once as with kube-proxy's REJECT: a TCP reset, or ICMP (ICMPv6)
//! port unreachable for UDP; and for a request from outside too big for the
//! route to its backend, the "fragmentation needed" ("packet too big") a
//! router sends, which the node's own forwarding sends in iptables mode.
//! The packet itself is rewritten into the answer and sent back out of the
//! interface it arrived on; a packet that cannot be answered, or whose
//! rewriting fails, is dropped with its reason.

use aya_ebpf::{helpers::bpf_skb_load_bytes, macros::map, maps::PerCpuArray, programs::TcContext};
use proxy_common::{
    counters::{Counter, DropReason},
    ipv4::{ETH_HLEN, MIN_HLEN},
    ipv6,
    maps::PROTO_TCP,
    reject::{
        ICMP_HEADERS_LEN, ICMP_QUOTE_LEN, ICMP6_HEADERS_LEN, ICMP6_QUOTE_LEN, TCP_RESET_LEN, TCP_RESET6_LEN,
        TcpSegment, icmp_frag_needed, icmp_port_unreachable, icmp6_packet_too_big, icmp6_port_unreachable, tcp_reset,
        tcp_reset6, untranslated_quote, untranslated_quote6,
    },
};

use crate::{Verdict, counters::count, parse::Packet, parse6::Packet6, skb};

/// IPv4's "don't fragment" flag, in the header's sixth byte.
const DONT_FRAGMENT: u8 = 0x40;

pub(crate) fn refuse(ctx: &TcContext, pkt: &Packet) -> Result<Verdict, DropReason> {
    // The answers are laid out for a 20-byte IP header; a packet with IP
    // options to an empty Service is dropped instead.
    if pkt.l4_off != ETH_HLEN + MIN_HLEN {
        return Err(DropReason::NoBackend);
    }
    if pkt.proto == PROTO_TCP {
        // A reset is never answered.
        let Some(reset) = tcp_reset(pkt.dst, pkt.dst_port, pkt.src, pkt.src_port, &segment(ctx, pkt)?) else {
            return Err(DropReason::NoBackend);
        };
        skb::change_tail(ctx, ETH_HLEN + TCP_RESET_LEN)?;
        skb::store(ctx, ETH_HLEN, &reset)?;
    } else {
        let quote: [u8; ICMP_QUOTE_LEN] = skb::load(ctx, ETH_HLEN)?;
        in_front_of_quote(ctx, ICMP_QUOTE_LEN, &icmp_port_unreachable(pkt.dst, pkt.src, &quote))?;
    }
    send_back(ctx, Counter::RefusedNoBackend)
}

/// [`refuse`] over IPv6: a reset, or ICMPv6 port unreachable. A packet
/// with extension headers is dropped instead (the answers are laid out for
/// the fixed header alone).
#[inline(always)]
pub(crate) fn refuse6(ctx: &TcContext, pkt: &Packet6) -> Result<Verdict, DropReason> {
    if pkt.l4_off != ETH_HLEN + ipv6::HLEN {
        return Err(DropReason::NoBackend);
    }
    if pkt.proto == PROTO_TCP { reset6(ctx, pkt) } else { port_unreachable6(ctx) }
}

/// Each IPv6 answer is a BPF function of its own (never inlined): built in
/// one frame with the caller's, they would pass the 512-byte stack limit.
#[inline(never)]
fn reset6(ctx: &TcContext, pkt: &Packet6) -> Result<Verdict, DropReason> {
    let Some(reset) = tcp_reset6(&pkt.dst, pkt.dst_port, &pkt.src, pkt.src_port, &segment(ctx, pkt)?) else {
        return Err(DropReason::NoBackend);
    };
    skb::change_tail(ctx, ETH_HLEN + TCP_RESET6_LEN)?;
    skb::store(ctx, ETH_HLEN, &reset)?;
    send_back(ctx, Counter::RefusedNoBackend)
}

#[inline(never)]
fn port_unreachable6(ctx: &TcContext) -> Result<Verdict, DropReason> {
    let quote: [u32; ICMP6_QUOTE_LEN / 4] = skb::load(ctx, ETH_HLEN)?;
    in_front_of_quote(ctx, ICMP6_QUOTE_LEN, &icmp6_port_unreachable(&quote))?;
    send_back(ctx, Counter::RefusedNoBackend)
}

/// Request `pkt`, already translated to its backend, is too big for the
/// route there (`mtu`): its sender is told "fragmentation needed" with that
/// MTU, about the datagram as it sent it, from the address it sent it to.
/// Without "don't fragment" a router would fragment it; not done here, it
/// is dropped as before (as one with IP options, whose quote differs).
#[inline(never)]
pub(crate) fn too_big(ctx: &TcContext, pkt: &Packet, mtu: u16) -> Result<Verdict, DropReason> {
    if pkt.l4_off != ETH_HLEN + MIN_HLEN {
        return Err(DropReason::NoRoute);
    }
    let mut quote: [u8; ICMP_QUOTE_LEN] = skb::load(ctx, ETH_HLEN)?;
    if quote[6] & DONT_FRAGMENT == 0 {
        return Err(DropReason::NoRoute);
    }
    untranslated_quote(&mut quote, pkt.dst, pkt.dst_port);
    in_front_of_quote(ctx, ICMP_QUOTE_LEN, &icmp_frag_needed(pkt.dst, pkt.src, mtu, &quote))?;
    skb::store(ctx, ETH_HLEN + ICMP_HEADERS_LEN, &quote)?;
    send_back(ctx, Counter::AnsweredTooBig)
}

/// What an ICMPv6 answer is built in: beside the IPv6 path that leads to
/// [`too_big6`], it would not fit the 512-byte stack.
#[repr(C)]
pub(crate) struct Answer6 {
    quote: [u32; ICMP6_QUOTE_LEN / 4],
    headers: [u32; ICMP6_HEADERS_LEN / 4],
}

#[map]
static ANSWER6: PerCpuArray<Answer6> = PerCpuArray::with_max_entries(1, 0);

/// [`too_big`] over IPv6, which routers never fragment: "packet too big".
/// A request with extension headers is dropped instead.
#[inline(never)]
pub(crate) fn too_big6(ctx: &TcContext, pkt: &Packet6, mtu: u16) -> Result<Verdict, DropReason> {
    if pkt.l4_off != ETH_HLEN + ipv6::HLEN {
        return Err(DropReason::NoRoute);
    }
    let Some(answer) = ANSWER6.get_ptr_mut(0) else { return Err(DropReason::NoRoute) };
    // SAFETY: this CPU's slot, and programs do not nest on a CPU.
    let answer = unsafe { &mut *answer };
    // Straight into the map (a constant length, as the verifier wants).
    // SAFETY: the words' bytes, all of them, in this CPU's slot.
    let to = answer.quote.as_mut_ptr().cast();
    if unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), ETH_HLEN as u32, to, ICMP6_QUOTE_LEN as u32) } < 0 {
        return Err(DropReason::LoadFailed);
    }
    untranslated_quote6(&mut answer.quote, pkt.dst.words(), pkt.dst_port);
    answer.headers = icmp6_packet_too_big(mtu as u32, &answer.quote);
    in_front_of_quote(ctx, ICMP6_QUOTE_LEN, &answer.headers)?;
    skb::store(ctx, ETH_HLEN + ICMP6_HEADERS_LEN, &answer.quote)?;
    send_back(ctx, Counter::AnsweredTooBig)
}

/// What a reset must answer of the TCP segment `pkt`.
#[inline(always)]
fn segment<A>(ctx: &TcContext, pkt: &Packet<A>) -> Result<TcpSegment, DropReason> {
    let tcp: [u8; 20] = skb::load(ctx, pkt.l4_off)?;
    let header_len = ((tcp[12] >> 4) as usize) * 4;
    Ok(TcpSegment {
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        flags: tcp[13],
        payload_len: pkt.l4_len.saturating_sub(header_len) as u32,
    })
}

/// The packet is cut to the `quote_len` bytes an ICMP error quotes of it,
/// and the error's `headers` are put in front of them.
#[inline(always)]
fn in_front_of_quote<H>(ctx: &TcContext, quote_len: usize, headers: &H) -> Result<(), DropReason> {
    skb::change_tail(ctx, ETH_HLEN + quote_len)?;
    skb::grow_after_mac(ctx, core::mem::size_of::<H>() as i32)?;
    skb::store(ctx, ETH_HLEN, headers)
}

/// The answer written over the packet goes back to the host it came from,
/// counted under `counter`.
#[inline(always)]
fn send_back(ctx: &TcContext, counter: Counter) -> Result<Verdict, DropReason> {
    skb::swap_macs(ctx)?;
    // The checksums written are complete: make the receiver verify them
    // rather than trust stale offload state of the original packet.
    skb::reset_csum_level(ctx)?;
    Ok(count(counter, Verdict::SendBack))
}
