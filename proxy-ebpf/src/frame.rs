//! Packet access for the XDP program: direct reads and writes into the
//! frame, each checked against its end (the verifier's condition), at the
//! fixed offsets of an Ethernet header and a 20-byte IPv4 header or a
//! 40-byte IPv6 one ([`Frame`], one implementation per family). Packets
//! with IP options or IPv6 extension headers, fragments and ICMP are left
//! to the TC program, which handles them all; forwarding from outside is
//! plain TCP and UDP.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::XdpContext};
use network_types::{tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{
    checksum::{update16, update32, update128},
    counters::DropReason,
    ipv4::{self, ETH_HLEN, ETH_P_IP, Fragment, MIN_HLEN},
    ipv6::{self, ETH_P_IPV6, In6},
    maps::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    family::Family,
    fib::{Hop, Route},
    parse::Packet,
    parse6::Packet6,
};

/// Per-CPU scratch space for the packet the XDP program is looking at:
/// too large for its stack beside the steps that follow (see `nodeport`).
/// Not pinned: it holds nothing between packets.
#[map]
static XDP_PACKET: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

#[map]
static XDP_PACKET6: PerCpuArray<Packet6> = PerCpuArray::with_max_entries(1, 0);

/// What the XDP program needs of a family's frames.
pub(crate) trait Frame: Family + Route + Default {
    /// The network header's length (without options or extension headers).
    const HLEN: usize;
    /// This CPU's slot for the packet being looked at.
    fn scratch() -> Option<*mut Packet<Self>>;
    /// Whether the frame is a whole TCP or UDP datagram with no options or
    /// extension headers and a hop left to forward it, read into `pkt`;
    /// anything else is for the TC program.
    fn parse(ctx: &XdpContext, pkt: &mut Packet<Self>) -> bool;
    /// Rewrites `pkt` to go from `src` to `dst` over `hop`, one hop on,
    /// with its checksums updated.
    fn rewrite(
        ctx: &XdpContext,
        pkt: &Packet<Self>,
        src: End<Self>,
        dst: End<Self>,
        hop: &Hop,
    ) -> Result<(), DropReason>;
}

/// The frame's ethertype.
#[inline(always)]
pub(crate) fn ethertype(ctx: &XdpContext) -> Option<u16> {
    read(ctx, 12).ok().map(u16::from_be_bytes)
}

const IP_TTL: usize = ETH_HLEN + 8;
const IP_CHECK: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
/// The L4 header, right after a 20-byte IP header.
const L4: usize = ETH_HLEN + MIN_HLEN;
const TCP_CHECK: usize = L4 + 16;
const UDP_CHECK: usize = L4 + 6;

/// Where the frame starts and ends. Read with volatile loads: the steps are
/// BPF functions of their own, and LLVM would otherwise load the two in the
/// caller and pass them as 32-bit values, which the verifier refuses to
/// widen back into packet pointers ("pointer arithmetic on pkt_end").
#[inline(always)]
fn bounds(ctx: &XdpContext) -> (usize, usize) {
    let md = ctx.ctx;
    unsafe { (core::ptr::read_volatile(&(*md).data) as usize, core::ptr::read_volatile(&(*md).data_end) as usize) }
}

/// A pointer to a `T` at `offset` in the frame, if the frame holds it.
#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, DropReason> {
    let (start, end) = bounds(ctx);
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(DropReason::LoadFailed);
    }
    Ok((start + offset) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, DropReason> {
    Ok(unsafe { core::ptr::read_unaligned(at::<T>(ctx, offset)?) })
}

#[inline(always)]
fn write<T>(ctx: &XdpContext, offset: usize, v: T) -> Result<(), DropReason> {
    unsafe { core::ptr::write_unaligned(at::<T>(ctx, offset)?, v) };
    Ok(())
}

/// [`read`] for a `T` of words (an IPv6 header or address), one load per
/// word: a read that may be unaligned is done byte by byte, and the BPF
/// backend spills every byte to the stack. The word may well be unaligned
/// in the frame: the verifier allows that wherever the CPU does (x86,
/// arm64), as for Cilium's word loads from packets.
#[inline(always)]
fn read_words<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, DropReason> {
    Ok(unsafe { core::ptr::read(at::<T>(ctx, offset)?) })
}

/// [`write`] one store per word, as [`read_words`].
#[inline(always)]
fn write_words<T>(ctx: &XdpContext, offset: usize, v: T) -> Result<(), DropReason> {
    unsafe { core::ptr::write(at::<T>(ctx, offset)?, v) };
    Ok(())
}

/// An address and port of one end of a packet.
#[derive(Clone, Copy, Default)]
pub(crate) struct End<A = [u8; 4]> {
    pub addr: A,
    pub port: [u8; 2],
}

/// The IPv4 packet in the frame (see [`Frame::parse`]).
#[inline(always)]
fn parse4(ctx: &XdpContext) -> Option<Packet> {
    if ethertype(ctx)? != ETH_P_IP {
        return None;
    }
    let hdr: [u8; MIN_HLEN] = read(ctx, ETH_HLEN).ok()?;
    let (start, end) = bounds(ctx);
    let available = (end - start).saturating_sub(ETH_HLEN);
    let ip = ipv4::parse(&hdr, available).ok()?;
    // The TTL must survive this hop; an expiring packet gets its ICMP error from the stack.
    if ip.header_len != MIN_HLEN || ip.fragment != Fragment::Whole || hdr[8] <= 1 {
        return None;
    }
    let (l4_check_off, min_l4) = match ip.proto {
        PROTO_TCP => (16, TcpHdr::LEN),
        PROTO_UDP => (6, UdpHdr::LEN),
        _ => return None,
    };
    let l4_len = ip.total_len - MIN_HLEN;
    if l4_len < min_l4 {
        return None;
    }
    let ports: [u8; 4] = read(ctx, L4).ok()?;
    let tcp_flags = if ip.proto == PROTO_TCP { read(ctx, L4 + 13).ok()? } else { 0 };
    Some(Packet {
        src: ip.src,
        dst: ip.dst,
        src_port: [ports[0], ports[1]],
        dst_port: [ports[2], ports[3]],
        proto: ip.proto,
        l4_off: L4,
        l4_len,
        l4_check_off,
        tcp_flags,
        fragment: Fragment::Whole,
        id: u16::from_be_bytes(ip.id) as u32,
    })
}

impl Frame for [u8; 4] {
    const HLEN: usize = MIN_HLEN;

    #[inline(always)]
    fn scratch() -> Option<*mut Packet> {
        XDP_PACKET.get_ptr_mut(0)
    }

    /// IPv4 without options, not fragmented. A BPF function of its own, as
    /// the steps after it: only one of their frames is on the stack at a time.
    #[inline(never)]
    fn parse(ctx: &XdpContext, pkt: &mut Packet) -> bool {
        match parse4(ctx) {
            Some(parsed) => {
                *pkt = parsed;
                true
            }
            None => false,
        }
    }

    /// Rewrites `pkt` to go from `src` to `dst` over `hop`, one hop on (TTL
    /// less one), with both checksums updated as RFC 1624 has it. A frame off
    /// a wire holds complete checksums, so plain arithmetic is right (only a
    /// frame a local sender handed a virtual device, seen in generic mode,
    /// could hold a partial one: the node's devices face the wire); a UDP
    /// checksum of 0 ("none") stays 0.
    #[inline(always)]
    fn rewrite(ctx: &XdpContext, pkt: &Packet, src: End, dst: End, hop: &Hop) -> Result<(), DropReason> {
        let [ttl, proto]: [u8; 2] = read(ctx, IP_TTL)?;
        let mut ip_check = u16::from_be_bytes(read(ctx, IP_CHECK)?);
        ip_check = update16(ip_check, u16::from_be_bytes([ttl, proto]), u16::from_be_bytes([ttl - 1, proto]));
        ip_check = update32(update32(ip_check, pkt.src, src.addr), pkt.dst, dst.addr);
        write(ctx, IP_TTL, ttl - 1)?;
        write(ctx, IP_CHECK, ip_check.to_be_bytes())?;
        write(ctx, IP_SRC, src.addr)?;
        write(ctx, IP_DST, dst.addr)?;

        let udp = pkt.proto == PROTO_UDP;
        let check_at = if udp { UDP_CHECK } else { TCP_CHECK };
        let old = u16::from_be_bytes(read(ctx, check_at)?);
        if !(udp && old == 0) {
            let mut new = update32(update32(old, pkt.src, src.addr), pkt.dst, dst.addr);
            new = update16(new, u16::from_be_bytes(pkt.src_port), u16::from_be_bytes(src.port));
            new = update16(new, u16::from_be_bytes(pkt.dst_port), u16::from_be_bytes(dst.port));
            if udp && new == 0 {
                new = 0xffff;
            }
            write(ctx, check_at, new.to_be_bytes())?;
        }
        write(ctx, L4, src.port)?;
        write(ctx, L4 + 2, dst.port)?;
        write(ctx, 0, hop.dmac)?;
        write(ctx, 6, hop.smac)
    }
}

const IP6_HOP_LIMIT: usize = ETH_HLEN + 7;
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;
/// The L4 header, right after the fixed IPv6 header.
const L4_6: usize = ETH_HLEN + ipv6::HLEN;

/// The IPv6 packet in the frame (see [`Frame::parse`]).
#[inline(always)]
fn parse6(ctx: &XdpContext) -> Option<Packet<In6>> {
    if ethertype(ctx)? != ETH_P_IPV6 {
        return None;
    }
    let hdr: [u32; ipv6::HLEN / 4] = read_words(ctx, ETH_HLEN).ok()?;
    let (start, end) = bounds(ctx);
    let available = (end - start).saturating_sub(ETH_HLEN);
    let ip = ipv6::parse(&hdr, available).ok()?;
    // The hop limit must survive this hop, as IPv4's TTL.
    let [_, _, _, hop_limit] = hdr[1].to_ne_bytes();
    if hop_limit <= 1 {
        return None;
    }
    let (l4_check_off, min_l4) = match ip.next {
        PROTO_TCP => (16, TcpHdr::LEN),
        PROTO_UDP => (6, UdpHdr::LEN),
        _ => return None,
    };
    if ip.payload_len < min_l4 {
        return None;
    }
    let ports: [u8; 4] = read(ctx, L4_6).ok()?;
    let tcp_flags = if ip.next == PROTO_TCP { read(ctx, L4_6 + 13).ok()? } else { 0 };
    Some(Packet {
        src: ip.src,
        dst: ip.dst,
        src_port: [ports[0], ports[1]],
        dst_port: [ports[2], ports[3]],
        proto: ip.next,
        l4_off: L4_6,
        l4_len: ip.payload_len,
        l4_check_off,
        tcp_flags,
        fragment: Fragment::Whole,
        id: 0,
    })
}

impl Frame for In6 {
    const HLEN: usize = ipv6::HLEN;

    #[inline(always)]
    fn scratch() -> Option<*mut Packet<In6>> {
        XDP_PACKET6.get_ptr_mut(0)
    }

    /// IPv6 with the TCP or UDP header right after the fixed one (an
    /// extension header, a fragment among them, is the TC program's).
    /// Never inlined, as IPv4's.
    #[inline(never)]
    fn parse(ctx: &XdpContext, pkt: &mut Packet<In6>) -> bool {
        match parse6(ctx) {
            Some(parsed) => {
                *pkt = parsed;
                true
            }
            None => false,
        }
    }

    /// As IPv4's, less the header checksum IPv6 does not have: the hop
    /// limit drops by one, the transport checksum follows the addresses
    /// (the pseudo header's) and ports. A UDP checksum IPv6 requires is
    /// never 0: one that computes to 0 is sent as 0xffff. Never inlined,
    /// as [`Frame::parse`] here.
    #[inline(never)]
    fn rewrite(ctx: &XdpContext, pkt: &Packet<In6>, src: End<In6>, dst: End<In6>, hop: &Hop) -> Result<(), DropReason> {
        let hop_limit: u8 = read(ctx, IP6_HOP_LIMIT)?;
        write(ctx, IP6_HOP_LIMIT, hop_limit - 1)?;
        write_words(ctx, IP6_SRC, src.addr.words())?;
        write_words(ctx, IP6_DST, dst.addr.words())?;
        // A constant offset: the verifier cannot bound one read from the packet's slot.
        let check_at = if pkt.proto == PROTO_UDP { L4_6 + 6 } else { L4_6 + 16 };
        let old = u16::from_be_bytes(read(ctx, check_at)?);
        let mut new = update128(update128(old, pkt.src.words(), src.addr.words()), pkt.dst.words(), dst.addr.words());
        new = update16(new, u16::from_be_bytes(pkt.src_port), u16::from_be_bytes(src.port));
        new = update16(new, u16::from_be_bytes(pkt.dst_port), u16::from_be_bytes(dst.port));
        if pkt.proto == PROTO_UDP && new == 0 {
            new = 0xffff;
        }
        write(ctx, check_at, new.to_be_bytes())?;
        write(ctx, L4_6, src.port)?;
        write(ctx, L4_6 + 2, dst.port)?;
        write(ctx, 0, hop.dmac)?;
        write(ctx, 6, hop.smac)
    }
}
