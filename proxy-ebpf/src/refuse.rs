//! Answers for new flows to a Service without ready endpoints, so clients
//! fail at once as with kube-proxy's REJECT: a TCP reset, or ICMP port
//! unreachable for UDP. The packet itself is rewritten into the answer and
//! sent back out of the interface it arrived on.

use aya_ebpf::{
    bindings::{BPF_CSUM_LEVEL_RESET, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_csum_level, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{
    counters::Counter,
    ipv4::{ETH_HLEN, MIN_HLEN},
    maps::PROTO_TCP,
    reject::{ICMP_HEADERS_LEN, ICMP_QUOTE_LEN, TCP_RESET_LEN, TcpSegment, icmp_port_unreachable, tcp_reset},
};

use crate::{Verdict, counters::count, parse::Packet};

pub fn refuse(ctx: &TcContext, pkt: &Packet) -> Result<Verdict, ()> {
    // The answers are laid out for a 20-byte IP header; a packet with IP
    // options to an empty Service is dropped (and counted) instead.
    if pkt.l4_off != ETH_HLEN + MIN_HLEN {
        return Ok(count(Counter::DroppedNoBackend, Verdict::Drop));
    }
    let eth: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&eth[6..]);
    swapped[6..].copy_from_slice(&eth[..6]);

    if pkt.proto == PROTO_TCP {
        let tcp: [u8; 20] = ctx.load(pkt.l4_off).map_err(|_| ())?;
        let header_len = ((tcp[12] >> 4) as usize) * 4;
        let seg = TcpSegment {
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            flags: tcp[13],
            payload_len: pkt.l4_len.saturating_sub(header_len) as u32,
        };
        let Some(reset) = tcp_reset(pkt.dst, pkt.dst_port, pkt.src, pkt.src_port, &seg) else {
            return Ok(count(Counter::DroppedNoBackend, Verdict::Drop));
        };
        change_tail(ctx, ETH_HLEN + TCP_RESET_LEN)?;
        ctx.store(ETH_HLEN, &reset, 0).map_err(|_| ())?;
    } else {
        let quote: [u8; ICMP_QUOTE_LEN] = ctx.load(ETH_HLEN).map_err(|_| ())?;
        let headers = icmp_port_unreachable(pkt.dst, pkt.src, &quote);
        // Keep exactly the quote, then open room for the new headers in front of it.
        change_tail(ctx, ETH_HLEN + ICMP_QUOTE_LEN)?;
        ctx.adjust_room(ICMP_HEADERS_LEN as i32, BPF_ADJ_ROOM_MAC, 0).map_err(|_| ())?;
        ctx.store(ETH_HLEN, &headers, 0).map_err(|_| ())?;
    }
    ctx.store(0, &swapped, 0).map_err(|_| ())?;
    // The checksums written are complete: make the receiver verify them
    // rather than trust stale offload state of the original packet.
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_RESET as u64) };
    Ok(count(Counter::RefusedNoBackend, Verdict::Redirect))
}

fn change_tail(ctx: &TcContext, len: usize) -> Result<(), ()> {
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if ret == 0 { Ok(()) } else { Err(()) }
}

/// Sends the packet out of the interface it arrived on, back to the pod.
pub fn redirect_back(ctx: &TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ret = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if ret < 0 { TC_ACT_SHOT as i32 } else { ret }
}
