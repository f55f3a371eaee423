//! NAT rewrites with incremental checksum updates by the kernel's helpers,
//! which also keep CHECKSUM_PARTIAL packets (veth offload) correct. A failed
//! helper leaves the packet half rewritten, so its reason drops the packet.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{
    checksum::{update16, update32},
    conntrack::CtEntry,
    counters::DropReason,
    ipv4::{ETH_HLEN, Fragment, MIN_HLEN},
    maps::{Backend, PROTO_UDP},
};

use crate::{
    parse::{IcmpError, Packet},
    skb,
};

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

/// Only the source address changes, to `new` (a hairpin request's).
#[inline(always)]
pub(crate) fn source_address(ctx: &TcContext, pkt: &Packet, new: [u8; 4]) -> Result<(), DropReason> {
    rewrite(ctx, pkt, IP_SRC_OFF, pkt.src, new, 0, pkt.src_port, pkt.src_port)
}

/// Only the destination address changes, to `new` (a hairpin reply's).
#[inline(always)]
pub(crate) fn destination_address(ctx: &TcContext, pkt: &Packet, new: [u8; 4]) -> Result<(), DropReason> {
    rewrite(ctx, pkt, IP_DST_OFF, pkt.dst, new, 2, pkt.dst_port, pkt.dst_port)
}

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one field each of the address and port, old and new")]
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

    // A later fragment holds no L4 header: the datagram's checksum and
    // ports were rewritten in its first fragment.
    let whole_l4 = pkt.fragment != Fragment::Later;
    let (old_a, new_a) = (u32::from_ne_bytes(old_addr) as u64, u32::from_ne_bytes(new_addr) as u64);
    if old_a != new_a {
        if whole_l4 {
            skb::l4_csum_replace(ctx, check_off, old_a, new_a, BPF_F_PSEUDO_HDR as u64 | mangled | 4)?;
        }
        skb::l3_csum_replace(ctx, IP_CHECK_OFF, old_a, new_a, 4)?;
        skb::store(ctx, addr_off, &new_addr)?;
    }
    if !whole_l4 {
        return Ok(());
    }

    let (old_p, new_p) = (u16::from_ne_bytes(old_port) as u64, u16::from_ne_bytes(new_port) as u64);
    if old_p != new_p {
        skb::l4_csum_replace(ctx, check_off, old_p, new_p, mangled | 2)?;
        skb::store(ctx, pkt.l4_off + port_off_in_l4, &new_port)?;
    }
    Ok(())
}

/// The quoted IP header's source and destination offsets, from its start.
const QUOTED_SRC: usize = 12;
const QUOTED_DST: usize = 16;

/// An ICMP error about a packet the client sent to the backend, on its way
/// to the client: the quote becomes client -> frontend, so the client's
/// kernel finds the socket it is about, and an error the backend itself
/// sent comes from the frontend (one from a router on the way keeps the
/// router's address).
#[inline(always)]
pub(crate) fn icmp_to_client(ctx: &TcContext, err: &IcmpError, frontend: &CtEntry) -> Result<(), DropReason> {
    let q = &err.quoted;
    rewrite_quote(ctx, err, QUOTED_DST, q.dst, frontend.addr, 2, q.dst_port, frontend.port)?;
    if err.src == q.dst {
        rewrite_outer(ctx, IP_SRC_OFF, err.src, frontend.addr)?;
    }
    Ok(())
}

/// An ICMP error about a reply the client got from the frontend, on its way
/// to the backend that really sent it.
#[inline(always)]
pub(crate) fn icmp_to_backend(ctx: &TcContext, err: &IcmpError, backend: &CtEntry) -> Result<(), DropReason> {
    let q = &err.quoted;
    rewrite_quote(ctx, err, QUOTED_SRC, q.src, backend.addr, 0, q.src_port, backend.port)?;
    rewrite_outer(ctx, IP_DST_OFF, err.dst, backend.addr)
}

/// An ICMP error about a hairpin request, on its way back to the pod it
/// came from: the quote's source and the error's destination, the hairpin
/// address, become the pod's.
#[inline(always)]
pub(crate) fn icmp_hairpin_request(ctx: &TcContext, err: &IcmpError, pod: [u8; 4]) -> Result<(), DropReason> {
    let q = &err.quoted;
    rewrite_quote(ctx, err, QUOTED_SRC, q.src, pod, 0, q.src_port, q.src_port)?;
    rewrite_outer(ctx, IP_DST_OFF, err.dst, pod)
}

/// An ICMP error about a hairpin reply, on its way back to the pod that
/// answered: the quote's destination and the error's source, the pod,
/// become the hairpin address the pod answered.
#[inline(always)]
pub(crate) fn icmp_hairpin_reply(ctx: &TcContext, err: &IcmpError, hairpin: [u8; 4]) -> Result<(), DropReason> {
    let q = &err.quoted;
    rewrite_quote(ctx, err, QUOTED_DST, q.dst, hairpin, 2, q.dst_port, q.dst_port)?;
    rewrite_outer(ctx, IP_SRC_OFF, err.src, hairpin)
}

/// ICMP has no pseudo-header: an outer address change touches only the IP checksum.
#[inline(always)]
fn rewrite_outer(ctx: &TcContext, addr_off: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), DropReason> {
    skb::l3_csum_replace(ctx, IP_CHECK_OFF, u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(new) as u64, 4)?;
    skb::store(ctx, addr_off, &new)
}

/// Rewrites an address and a port of the quoted packet, with the quoted IP
/// checksum, the quoted L4 checksum when the quote holds it (as netfilter
/// does), and the ICMP checksum over all of it. The quoted IP header's
/// address and checksum change together, which leaves its sum, and so the
/// ICMP checksum, unchanged; the port and L4 checksum do not.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one field each of the quote's address and port, old and new")]
fn rewrite_quote(
    ctx: &TcContext,
    err: &IcmpError,
    addr_field: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_field: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> Result<(), DropReason> {
    let ip = err.quoted_off;
    let l4 = ip + MIN_HLEN;
    let ip_check = u16::from_be_bytes(skb::load(ctx, ip + 10)?);
    skb::store(ctx, ip + addr_field, &new_addr)?;
    skb::store(ctx, ip + 10, &update32(ip_check, old_addr, new_addr).to_be_bytes())?;

    let (old_p, new_p) = (u16::from_be_bytes(old_port), u16::from_be_bytes(new_port));
    let mut icmp_check = update16(u16::from_be_bytes(skb::load(ctx, err.icmp_off + 2)?), old_p, new_p);
    skb::store(ctx, l4 + port_field, &new_port)?;
    let udp = err.quoted.proto == PROTO_UDP;
    let l4_check_off = l4 + if udp { 6 } else { 16 };
    // A quote cut before the checksum (only 8 bytes are promised) has none to fix.
    if let Ok(old) = ctx.load::<[u8; 2]>(l4_check_off) {
        let old = u16::from_be_bytes(old);
        // UDP's 0 means "no checksum" and stays 0.
        if !(udp && old == 0) {
            let mut new = update16(update32(old, old_addr, new_addr), old_p, new_p);
            if udp && new == 0 {
                new = 0xffff;
            }
            skb::store(ctx, l4_check_off, &new.to_be_bytes())?;
            icmp_check = update16(icmp_check, old, new);
        }
    }
    skb::store(ctx, err.icmp_off + 2, &icmp_check.to_be_bytes())
}
