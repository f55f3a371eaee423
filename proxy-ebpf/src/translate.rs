//! NAT rewrites with incremental checksum updates by the kernel's helpers,
//! which also keep CHECKSUM_PARTIAL packets (veth offload) correct. A failed
//! helper leaves the packet half rewritten, so its reason drops the packet.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::bpf_csum_diff,
    programs::TcContext,
};
use proxy_common::{
    checksum::{update16, update32, update128},
    conntrack::{CtEntry, CtEntry6},
    counters::DropReason,
    ipv4::{ETH_HLEN, Fragment, MIN_HLEN},
    ipv6::{self, In6},
    maps::{Backend, Backend6, NatAddress, PROTO_UDP},
};

use crate::{
    parse::{IcmpError, Packet},
    parse6::{IcmpError6, Packet6},
    skb,
};

const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP_CHECK_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const IP6_HOP_LIMIT_OFF: usize = ETH_HLEN + 7;
const IP6_SRC_OFF: usize = ETH_HLEN + 8;
const IP6_DST_OFF: usize = ETH_HLEN + 24;

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

/// The source becomes `to` (a request's, source-NATed to the node).
#[inline(always)]
pub(crate) fn source(ctx: &TcContext, pkt: &Packet, to: &NatAddress) -> Result<(), DropReason> {
    rewrite(ctx, pkt, IP_SRC_OFF, pkt.src, to.addr, 0, pkt.src_port, to.port)
}

/// The destination becomes `to` (a reply's, back to the client it was source-NATed from).
#[inline(always)]
pub(crate) fn destination(ctx: &TcContext, pkt: &Packet, to: &NatAddress) -> Result<(), DropReason> {
    rewrite(ctx, pkt, IP_DST_OFF, pkt.dst, to.addr, 2, pkt.dst_port, to.port)
}

/// One hop on, for a packet the program sends on itself past the node's
/// routing: the TTL goes down by one. One that would expire here is
/// dropped, counted as unroutable (the stack, which would answer it, never
/// sees it).
#[inline(always)]
pub(crate) fn hop(ctx: &TcContext) -> Result<(), DropReason> {
    let [ttl, proto]: [u8; 2] = skb::load(ctx, IP_TTL_OFF)?;
    if ttl <= 1 {
        return Err(DropReason::NoRoute);
    }
    let (old, new) = (u16::from_ne_bytes([ttl, proto]) as u64, u16::from_ne_bytes([ttl - 1, proto]) as u64);
    skb::l3_csum_replace(ctx, IP_CHECK_OFF, old, new, 2)?;
    skb::store(ctx, IP_TTL_OFF, &(ttl - 1))
}

/// [`source`] over IPv6.
#[inline(always)]
pub(crate) fn source6(ctx: &TcContext, pkt: &Packet6, to: &NatAddress<In6>) -> Result<(), DropReason> {
    rewrite6(ctx, pkt, IP6_SRC_OFF, pkt.src, to.addr)?;
    rewrite_port(ctx, pkt, 0, pkt.src_port, to.port)
}

/// [`destination`] over IPv6.
#[inline(always)]
pub(crate) fn destination6(ctx: &TcContext, pkt: &Packet6, to: &NatAddress<In6>) -> Result<(), DropReason> {
    rewrite6(ctx, pkt, IP6_DST_OFF, pkt.dst, to.addr)?;
    rewrite_port(ctx, pkt, 2, pkt.dst_port, to.port)
}

/// [`hop`] over IPv6: the hop limit, which no checksum covers.
#[inline(always)]
pub(crate) fn hop6(ctx: &TcContext) -> Result<(), DropReason> {
    let hop_limit: u8 = skb::load(ctx, IP6_HOP_LIMIT_OFF)?;
    if hop_limit <= 1 {
        return Err(DropReason::NoRoute);
    }
    skb::store(ctx, IP6_HOP_LIMIT_OFF, &(hop_limit - 1))
}

/// IPv6 client -> VIP:port becomes client -> backend:target port.
#[inline(always)]
pub(crate) fn forward6(ctx: &TcContext, pkt: &Packet6, backend: &Backend6) -> Result<(), DropReason> {
    rewrite6(ctx, pkt, IP6_DST_OFF, pkt.dst, backend.addr)?;
    rewrite_port(ctx, pkt, 2, pkt.dst_port, backend.port)
}

/// IPv6 backend:target port -> client becomes VIP:port -> client.
#[inline(always)]
pub(crate) fn reverse6(ctx: &TcContext, pkt: &Packet6, frontend: &CtEntry6) -> Result<(), DropReason> {
    rewrite6(ctx, pkt, IP6_SRC_OFF, pkt.src, frontend.addr)?;
    rewrite_port(ctx, pkt, 0, pkt.src_port, frontend.port)
}

/// Only the IPv6 source address changes, to `new` (a hairpin request's).
#[inline(always)]
pub(crate) fn source_address6(ctx: &TcContext, pkt: &Packet6, new: In6) -> Result<(), DropReason> {
    rewrite6(ctx, pkt, IP6_SRC_OFF, pkt.src, new)
}

/// Only the IPv6 destination address changes, to `new` (a hairpin reply's).
#[inline(always)]
pub(crate) fn destination_address6(ctx: &TcContext, pkt: &Packet6, new: In6) -> Result<(), DropReason> {
    rewrite6(ctx, pkt, IP6_DST_OFF, pkt.dst, new)
}

/// An IPv6 address change: IPv6 has no header checksum, so only the L4
/// checksum's pseudo header changes, by the difference of the two
/// addresses (as Cilium's `ipv6_store_daddr` + `csum_diff`).
#[inline(always)]
fn rewrite6(ctx: &TcContext, pkt: &Packet6, addr_off: usize, old: In6, new: In6) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    // A later fragment holds no transport header: the datagram's checksum
    // was updated in its first fragment.
    if pkt.fragment != Fragment::Later {
        let (mut from, mut to) = (old.words(), new.words());
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(DropReason::ChecksumFailed);
        }
        let check_off = pkt.l4_off + pkt.l4_check_off;
        // Size 0: `to` is the difference itself.
        skb::l4_csum_replace(ctx, check_off, 0, diff as u64, BPF_F_PSEUDO_HDR as u64 | mangled(pkt))?;
    }
    skb::store(ctx, addr_off, &new)
}

/// A UDP checksum of 0 means "none" in IPv4 and must stay 0; one that
/// computes to 0 is sent as 0xffff (in IPv6, where UDP always has one, too).
#[inline(always)]
fn mangled<A>(pkt: &Packet<A>) -> u64 {
    if pkt.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
}

/// A port change at `port_off_in_l4` of the L4 header, with its checksum.
#[inline(always)]
fn rewrite_port<A>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    port_off_in_l4: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> Result<(), DropReason> {
    let (old_p, new_p) = (u16::from_ne_bytes(old_port) as u64, u16::from_ne_bytes(new_port) as u64);
    // A later fragment has no ports: they were rewritten in its first.
    if old_p != new_p && pkt.fragment != Fragment::Later {
        skb::l4_csum_replace(ctx, pkt.l4_off + pkt.l4_check_off, old_p, new_p, mangled(pkt) | 2)?;
        skb::store(ctx, pkt.l4_off + port_off_in_l4, &new_port)?;
    }
    Ok(())
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

    // A later fragment holds no L4 header: the datagram's checksum and
    // ports were rewritten in its first fragment.
    let whole_l4 = pkt.fragment != Fragment::Later;
    let (old_a, new_a) = (u32::from_ne_bytes(old_addr) as u64, u32::from_ne_bytes(new_addr) as u64);
    if old_a != new_a {
        if whole_l4 {
            skb::l4_csum_replace(ctx, check_off, old_a, new_a, BPF_F_PSEUDO_HDR as u64 | mangled(pkt) | 4)?;
        }
        skb::l3_csum_replace(ctx, IP_CHECK_OFF, old_a, new_a, 4)?;
        skb::store(ctx, addr_off, &new_addr)?;
    }
    if !whole_l4 {
        return Ok(());
    }
    rewrite_port(ctx, pkt, port_off_in_l4, old_port, new_port)
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

/// An ICMP error about a request the node source-NATed, on its way to the
/// client: the quote (node address and port -> backend) becomes what the
/// client sent (client -> frontend), and an error the backend itself sent
/// comes from the frontend.
#[inline(always)]
pub(crate) fn icmp_to_masqueraded(
    ctx: &TcContext,
    err: &IcmpError,
    client: &NatAddress,
    frontend: &CtEntry,
) -> Result<(), DropReason> {
    let q = &err.quoted;
    rewrite_quote(ctx, err, QUOTED_SRC, q.src, client.addr, 0, q.src_port, client.port)?;
    rewrite_quote(ctx, err, QUOTED_DST, q.dst, frontend.addr, 2, q.dst_port, frontend.port)?;
    rewrite_outer(ctx, IP_DST_OFF, err.dst, client.addr)?;
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

/// The quoted IPv6 header's source and destination offsets, from its start.
const QUOTED6_SRC: usize = 8;
const QUOTED6_DST: usize = 24;

/// [`icmp_to_client`] over IPv6.
#[inline(always)]
pub(crate) fn icmp6_to_client(ctx: &TcContext, err: &IcmpError6, frontend: &CtEntry6) -> Result<(), DropReason> {
    let q = &err.quoted;
    let mut icmp = rewrite_quote6(ctx, err, QUOTED6_DST, q.dst, frontend.addr, 2, q.dst_port, frontend.port)?;
    if err.src == q.dst {
        // ICMPv6's checksum covers the pseudo header: the outer source's change too.
        icmp = update128(icmp, err.src.words(), frontend.addr.words());
        skb::store(ctx, IP6_SRC_OFF, &frontend.addr)?;
    }
    skb::store(ctx, err.icmp_off + 2, &icmp.to_be_bytes())
}

/// [`icmp_to_masqueraded`] over IPv6, in steps that are BPF functions of
/// their own (the stack holds one at a time), each storing the ICMPv6
/// checksum it updated for the next to update further.
#[inline(always)]
pub(crate) fn icmp6_to_masqueraded(
    ctx: &TcContext,
    err: &IcmpError6,
    client: &NatAddress<In6>,
    frontend: &CtEntry6,
) -> Result<(), DropReason> {
    quote6_source(ctx, err, client)?;
    quote6_destination(ctx, err, frontend)?;
    outer6_to_client(ctx, err, client, frontend)
}

/// The error's own destination becomes `client`, and its source, if the
/// backend sent it, `frontend`.
#[inline(never)]
fn outer6_to_client(
    ctx: &TcContext,
    err: &IcmpError6,
    client: &NatAddress<In6>,
    frontend: &CtEntry6,
) -> Result<(), DropReason> {
    // ICMPv6's checksum covers the pseudo header: the outer addresses too.
    let mut icmp = u16::from_be_bytes(skb::load(ctx, err.icmp_off + 2)?);
    icmp = update128(icmp, err.dst.words(), client.addr.words());
    skb::store(ctx, IP6_DST_OFF, &client.addr)?;
    if err.src == err.quoted.dst {
        icmp = update128(icmp, err.src.words(), frontend.addr.words());
        skb::store(ctx, IP6_SRC_OFF, &frontend.addr)?;
    }
    skb::store(ctx, err.icmp_off + 2, &icmp.to_be_bytes())
}

/// The quoted request's source (a node address and port) becomes `client`.
#[inline(never)]
fn quote6_source(ctx: &TcContext, err: &IcmpError6, client: &NatAddress<In6>) -> Result<(), DropReason> {
    let q = &err.quoted;
    let icmp = rewrite_quote6(ctx, err, QUOTED6_SRC, q.src, client.addr, 0, q.src_port, client.port)?;
    skb::store(ctx, err.icmp_off + 2, &icmp.to_be_bytes())
}

/// The quoted request's destination (its backend) becomes `frontend`.
#[inline(never)]
fn quote6_destination(ctx: &TcContext, err: &IcmpError6, frontend: &CtEntry6) -> Result<(), DropReason> {
    let q = &err.quoted;
    let icmp = rewrite_quote6(ctx, err, QUOTED6_DST, q.dst, frontend.addr, 2, q.dst_port, frontend.port)?;
    skb::store(ctx, err.icmp_off + 2, &icmp.to_be_bytes())
}

/// [`icmp_to_backend`] over IPv6.
#[inline(always)]
pub(crate) fn icmp6_to_backend(ctx: &TcContext, err: &IcmpError6, backend: &CtEntry6) -> Result<(), DropReason> {
    let q = &err.quoted;
    let icmp = rewrite_quote6(ctx, err, QUOTED6_SRC, q.src, backend.addr, 0, q.src_port, backend.port)?;
    let icmp = update128(icmp, err.dst.words(), backend.addr.words());
    skb::store(ctx, IP6_DST_OFF, &backend.addr)?;
    skb::store(ctx, err.icmp_off + 2, &icmp.to_be_bytes())
}

/// [`rewrite_quote`] over IPv6, which has no header checksum: the quoted
/// address and port change with the quoted L4 checksum (when the quote
/// holds it), and the ICMPv6 checksum over all of them, returned for the
/// caller to store once the outer header is done too.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one field each of the quote's address and port, old and new")]
fn rewrite_quote6(
    ctx: &TcContext,
    err: &IcmpError6,
    addr_field: usize,
    old_addr: In6,
    new_addr: In6,
    port_field: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
) -> Result<u16, DropReason> {
    let l4 = err.quoted_off + ipv6::HLEN;
    let (old_w, new_w) = (old_addr.words(), new_addr.words());
    let (old_p, new_p) = (u16::from_be_bytes(old_port), u16::from_be_bytes(new_port));
    let mut icmp = u16::from_be_bytes(skb::load(ctx, err.icmp_off + 2)?);
    icmp = update16(update128(icmp, old_w, new_w), old_p, new_p);
    skb::store(ctx, err.quoted_off + addr_field, &new_addr)?;
    skb::store(ctx, l4 + port_field, &new_port)?;
    let udp = err.quoted.proto == PROTO_UDP;
    let l4_check_off = l4 + if udp { 6 } else { 16 };
    // A quote cut before the checksum has none to fix.
    if let Ok(old) = ctx.load::<[u8; 2]>(l4_check_off) {
        let old = u16::from_be_bytes(old);
        let mut new = update16(update128(old, old_w, new_w), old_p, new_p);
        if udp && new == 0 {
            new = 0xffff;
        }
        skb::store(ctx, l4_check_off, &new.to_be_bytes())?;
        icmp = update16(icmp, old, new);
    }
    Ok(icmp)
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
