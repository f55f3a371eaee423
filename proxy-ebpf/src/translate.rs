//! NAT rewrites with incremental checksum updates by the kernel's helpers,
//! which also keep CHECKSUM_PARTIAL packets (veth offload) correct. A failed
//! helper leaves the packet half rewritten, so its reason drops the packet.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{
    conntrack::CtEntry,
    counters::DropReason,
    ipv4::ETH_HLEN,
    maps::{Backend, PROTO_UDP},
};

use crate::{parse::Packet, skb};

const IP_CHECK_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;

/// Client -> VIP:port becomes client -> backend:target port.
#[inline(always)]
pub(crate) fn forward(ctx: &TcContext, pkt: &Packet, backend: &Backend) -> Result<(), DropReason> {
    rewrite(ctx, pkt, IP_DST_OFF, pkt.dst, backend.addr, 2, pkt.dst_port, backend.port)
}

/// Backend:target port -> client becomes VIP:port -> client.
#[inline(always)]
pub(crate) fn reverse(ctx: &TcContext, pkt: &Packet, frontend: &CtEntry) -> Result<(), DropReason> {
    rewrite(ctx, pkt, IP_SRC_OFF, pkt.src, frontend.addr, 0, pkt.src_port, frontend.port)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off_in_l4: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> Result<(), DropReason> {
    let check_off = pkt.l4_off + pkt.l4_check_off;
    // A UDP checksum of 0 means "none" and must stay 0.
    let mangled = if pkt.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };

    let (old_a, new_a) = (u32::from_ne_bytes(old_addr) as u64, u32::from_ne_bytes(new_addr) as u64);
    if old_a != new_a {
        skb::l4_csum_replace(ctx, check_off, old_a, new_a, BPF_F_PSEUDO_HDR as u64 | mangled | 4)?;
        skb::l3_csum_replace(ctx, IP_CHECK_OFF, old_a, new_a, 4)?;
        skb::store(ctx, addr_off, &new_addr)?;
    }

    let (old_p, new_p) = (u16::from_ne_bytes(old_port) as u64, u16::from_ne_bytes(new_port) as u64);
    if old_p != new_p {
        skb::l4_csum_replace(ctx, check_off, old_p, new_p, mangled | 2)?;
        skb::store(ctx, pkt.l4_off + port_off_in_l4, &new_port)?;
    }
    Ok(())
}
