//! Packet access for the XDP program: direct reads and writes into the
//! frame, each checked against its end (the verifier's condition), at the
//! fixed offsets of an Ethernet header and a 20-byte IPv4 header. Packets
//! with IP options, fragments and ICMP are left to the TC program, which
//! handles them all; forwarding from outside is plain TCP and UDP.

use aya_ebpf::programs::XdpContext;
use network_types::{tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{
    checksum::{update16, update32},
    counters::DropReason,
    ipv4::{self, ETH_HLEN, ETH_P_IP, Fragment, MIN_HLEN},
    maps::{PROTO_TCP, PROTO_UDP},
};

use crate::parse::Packet;

const IP_TTL: usize = ETH_HLEN + 8;
const IP_CHECK: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
/// The L4 header, right after a 20-byte IP header.
const L4: usize = ETH_HLEN + MIN_HLEN;
const TCP_CHECK: usize = L4 + 16;
const UDP_CHECK: usize = L4 + 6;

/// A pointer to a `T` at `offset` in the frame, if the frame holds it.
#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, DropReason> {
    let (start, end) = (ctx.data(), ctx.data_end());
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

/// The packet, if it is a whole TCP or UDP datagram in IPv4 without options
/// with a TTL left to forward it; anything else is for the TC program.
#[inline(always)]
pub(crate) fn parse(ctx: &XdpContext) -> Option<Packet> {
    if u16::from_be_bytes(read(ctx, 12).ok()?) != ETH_P_IP {
        return None;
    }
    let hdr: [u8; MIN_HLEN] = read(ctx, ETH_HLEN).ok()?;
    let available = (ctx.data_end() - ctx.data()).saturating_sub(ETH_HLEN);
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

/// An address and port of one end of a packet.
#[derive(Clone, Copy)]
pub(crate) struct End {
    pub addr: [u8; 4],
    pub port: [u8; 2],
}

/// The next hop a packet goes to: out of `ifindex`, from `smac` to `dmac`.
pub(crate) struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Rewrites `pkt` to go from `src` to `dst` over `hop`, one hop on (TTL
/// less one), with both checksums updated as RFC 1624 has it. A frame off
/// a wire holds complete checksums, so plain arithmetic is right (only a
/// frame a local sender handed a virtual device, seen in generic mode,
/// could hold a partial one: the node's devices face the wire); a UDP
/// checksum of 0 ("none") stays 0.
#[inline(always)]
pub(crate) fn rewrite(ctx: &XdpContext, pkt: &Packet, src: End, dst: End, hop: &Hop) -> Result<(), DropReason> {
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
