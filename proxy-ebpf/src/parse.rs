//! Bounds-checked header reads: straight from the packet where its linear
//! data holds the bytes (no helper call: every packet on a pod interface
//! passes here twice), else through the skb helper. A short packet is an
//! error here, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use network_types::{tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{
    ipv4::{self, ETH_HLEN, ETH_P_IP, Fragment, MIN_HLEN},
    ipv6::ETH_P_IPV6,
    maps::PROTO_TCP,
    reject::{ICMP_DEST_UNREACH, IPPROTO_ICMP},
};

use crate::fragments;

const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Type, code, checksum and the 4 bytes before the quote (ICMPv6's too).
pub(crate) const ICMP_HLEN: usize = 8;

/// A TCP or UDP packet whose ports could be read; an IPv6 one's addresses are `[u8; 16]`.
#[derive(Clone, Copy, Default)]
pub(crate) struct Packet<A = [u8; 4]> {
    pub src: A,
    pub dst: A,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub proto: u8,
    /// Offset of the L4 header in the frame (after any IP options).
    pub l4_off: usize,
    /// Bytes of L4 header + payload, from the IP total length.
    pub l4_len: usize,
    /// Offset of the L4 checksum from the start of the L4 header.
    pub l4_check_off: usize,
    /// TCP flags; 0 for UDP and for later fragments.
    pub tcp_flags: u8,
    /// A later fragment carries no L4 header: its ports come from its
    /// first fragment, and only its addresses are rewritten.
    pub fragment: Fragment,
    /// The identification a datagram's fragments share: IPv4's 16 bits,
    /// IPv6's 32 (0 when the packet is not a fragment).
    pub id: u32,
}

/// The TCP or UDP packet an ICMP error quotes: its IP header (20 bytes;
/// 40 in IPv6, with no extension headers) and ports.
pub(crate) struct Quoted<A = [u8; 4]> {
    pub src: A,
    pub dst: A,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub proto: u8,
}

/// An ICMP error (destination unreachable, time exceeded, parameter
/// problem) about a TCP or UDP packet.
pub(crate) struct IcmpError<A = [u8; 4]> {
    /// The error's own addresses.
    pub src: A,
    pub dst: A,
    /// Offsets of the ICMP header and of the quoted IP header in the frame.
    pub icmp_off: usize,
    pub quoted_off: usize,
    pub quoted: Quoted<A>,
}

pub(crate) enum Parsed {
    Flow(Packet),
    IcmpError(IcmpError),
    Malformed,
    OtherProtocol,
    Fragment { dst: [u8; 4] },
    Truncated { dst: [u8; 4] },
}

/// The ICMP error at `icmp_off`, if it is one kpr translates: one quoting
/// the first fragment of a TCP or UDP packet with a plain 20-byte header,
/// as every Linux and router quote of a Service flow is.
#[inline(always)]
fn icmp_error(ctx: &TcContext, ip: &ipv4::Ipv4Info, icmp_off: usize) -> Option<IcmpError> {
    let [kind, _code] = ctx.load::<[u8; 2]>(icmp_off).ok()?;
    if !matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
        return None;
    }
    let quoted_off = icmp_off + ICMP_HLEN;
    let hdr = ctx.load::<[u8; MIN_HLEN]>(quoted_off).ok()?;
    let first_fragment = hdr[6] & 0x1f == 0 && hdr[7] == 0;
    let proto = hdr[9];
    if hdr[0] != 0x45 || !first_fragment || ipv4::l4_check_offset(proto).is_none() {
        return None;
    }
    let ports = ctx.load::<[u8; 4]>(quoted_off + MIN_HLEN).ok()?;
    Some(IcmpError {
        src: ip.src,
        dst: ip.dst,
        icmp_off,
        quoted_off,
        quoted: Quoted {
            src: [hdr[12], hdr[13], hdr[14], hdr[15]],
            dst: [hdr[16], hdr[17], hdr[18], hdr[19]],
            src_port: [ports[0], ports[1]],
            dst_port: [ports[2], ports[3]],
            proto,
        },
    })
}

/// The `T` at `offset` of the frame.
#[inline(always)]
pub(crate) fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, ()> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bytes lie between data and data_end, checked just above.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    // Not in the linear data (or not there at all): the helper knows.
    ctx.load::<T>(offset).map_err(|_| ())
}

/// The TCP flags of the transport header at `l4_off` (protocol `proto`);
/// 0 for UDP; an error when the frame ends before them.
#[inline(always)]
pub(crate) fn tcp_flags(ctx: &TcContext, proto: u8, l4_off: usize) -> Result<u8, ()> {
    if proto != PROTO_TCP {
        return Ok(0);
    }
    // The data offset's byte and the flags' byte: a one-byte read's bounds
    // check compiles to a form the verifier cannot use.
    read::<[u8; 2]>(ctx, l4_off + 12).map(|[_, flags]| flags)
}

/// What a frame carries, by its ethertype: read once per packet, and
/// each family parsed by its own path.
pub(crate) enum Network {
    Ipv4,
    /// For `parse6`.
    Ipv6,
    /// Neither (ARP, say).
    Other,
    /// Shorter than an Ethernet header.
    Short,
}

#[inline(always)]
pub(crate) fn network(ctx: &TcContext) -> Network {
    match read::<[u8; 2]>(ctx, 12).map(u16::from_be_bytes) {
        Ok(ETH_P_IP) => Network::Ipv4,
        Ok(ETH_P_IPV6) => Network::Ipv6,
        Ok(_) => Network::Other,
        Err(()) => Network::Short,
    }
}

/// An IPv4 frame (see [`network`]).
#[inline(always)]
pub(crate) fn parse(ctx: &TcContext) -> Parsed {
    let Ok(hdr) = read::<[u8; MIN_HLEN]>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let available = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    let Ok(ip) = ipv4::parse(&hdr, available) else {
        return Parsed::Malformed;
    };
    // Bounded for the verifier: IHL is at most 15 words.
    let l4_off = ETH_HLEN + (ip.header_len & 0x3c);
    if ip.proto == IPPROTO_ICMP && !ip.is_fragment() {
        return icmp_error(ctx, &ip, l4_off).map_or(Parsed::OtherProtocol, Parsed::IcmpError);
    }
    // Only TCP and UDP have a checksum offset: every other protocol ends here.
    let Some(l4_check_off) = ipv4::l4_check_offset(ip.proto) else {
        return Parsed::OtherProtocol;
    };
    if ip.fragment == Fragment::Later {
        let Some(ports) = fragments::ports(ip.src, ip.dst, ip.id, ip.proto) else {
            return Parsed::Fragment { dst: ip.dst };
        };
        return Parsed::Flow(Packet {
            src: ip.src,
            dst: ip.dst,
            src_port: ports.src_port,
            dst_port: ports.dst_port,
            proto: ip.proto,
            l4_off,
            l4_len: ip.total_len - ip.header_len,
            l4_check_off,
            tcp_flags: 0,
            fragment: Fragment::Later,
            id: u16::from_be_bytes(ip.id) as u32,
        });
    }
    let l4_len = ip.total_len - ip.header_len;
    let min_l4 = if ip.proto == PROTO_TCP { TcpHdr::LEN } else { UdpHdr::LEN };
    if l4_len < min_l4 {
        return Parsed::Truncated { dst: ip.dst };
    }
    let Ok(ports) = read::<[u8; 4]>(ctx, l4_off) else {
        return Parsed::Truncated { dst: ip.dst };
    };
    let Ok(tcp_flags) = tcp_flags(ctx, ip.proto, l4_off) else {
        return Parsed::Truncated { dst: ip.dst };
    };
    Parsed::Flow(Packet {
        src: ip.src,
        dst: ip.dst,
        src_port: [ports[0], ports[1]],
        dst_port: [ports[2], ports[3]],
        proto: ip.proto,
        l4_off,
        l4_len,
        l4_check_off,
        tcp_flags,
        fragment: ip.fragment,
        id: u16::from_be_bytes(ip.id) as u32,
    })
}
