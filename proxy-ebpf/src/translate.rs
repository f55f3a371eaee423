//! NAT rewrites with incremental checksum updates by the kernel's helpers,
//! which also keep CHECKSUM_PARTIAL packets (veth offload) correct.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{
    ipv4::{ETH_HLEN, l4_check_offset},
    maps::{Backend, PROTO_UDP, ReverseEntry},
};

use crate::parse::Packet;

const IP_CHECK_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;

/// Client -> VIP:port becomes client -> backend:target port.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet, backend: &Backend) -> Result<(), ()> {
    rewrite(ctx, pkt, IP_DST_OFF, pkt.dst, backend.addr, 2, pkt.dst_port, backend.port)
}

/// Backend:target port -> client becomes VIP:port -> client.
#[inline(always)]
pub fn reverse(ctx: &TcContext, pkt: &Packet, rev: &ReverseEntry) -> Result<(), ()> {
    rewrite(ctx, pkt, IP_SRC_OFF, pkt.src, rev.vip, 0, pkt.src_port, rev.vip_port)
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
) -> Result<(), ()> {
    let check_off = pkt.l4_off + l4_check_offset(pkt.proto).ok_or(())?;
    // A UDP checksum of 0 means "none" and must stay 0.
    let mangled = if pkt.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };

    let (old_a, new_a) = (u32::from_ne_bytes(old_addr) as u64, u32::from_ne_bytes(new_addr) as u64);
    if old_a != new_a {
        ctx.l4_csum_replace(check_off, old_a, new_a, BPF_F_PSEUDO_HDR as u64 | mangled | 4).map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CHECK_OFF, old_a, new_a, 4).map_err(|_| ())?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| ())?;
    }

    let (old_p, new_p) = (u16::from_ne_bytes(old_port) as u64, u16::from_ne_bytes(new_port) as u64);
    if old_p != new_p {
        ctx.l4_csum_replace(check_off, old_p, new_p, mangled | 2).map_err(|_| ())?;
        ctx.store(pkt.l4_off + port_off_in_l4, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}
