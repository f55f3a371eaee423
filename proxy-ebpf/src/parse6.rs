//! IPv6 headers and what they say: the fixed header, the extension headers
//! before the TCP or UDP header walked with bounds (at most
//! [`MAX_EXTENSION_HEADERS`] of them, each checked against the payload
//! length), the ports, and the ICMPv6 errors about a TCP or UDP packet
//! (RFC 4443: destination unreachable, packet too big, time exceeded,
//! parameter problem). Everything else, the rest of ICMPv6 and Neighbor
//! Discovery included, is not the per-packet path's and passes as it came.

use aya_ebpf::programs::TcContext;
use network_types::{tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{
    ipv4::{ETH_HLEN, Fragment, l4_check_offset},
    ipv6::{self, Extension, FRAGMENT_HLEN, HLEN, In6, MAX_EXTENSION_HEADERS},
    maps::PROTO_TCP,
    reject::IPPROTO_ICMPV6,
};

use crate::{
    fragments,
    parse::{ICMP_HLEN, IcmpError, Packet, Quoted, read, tcp_flags},
};

pub(crate) type Packet6 = Packet<In6>;
pub(crate) type IcmpError6 = IcmpError<In6>;

/// ICMPv6 error types: destination unreachable (1) to parameter problem (4).
const ICMPV6_ERRORS: core::ops::RangeInclusive<u8> = 1..=4;

/// `repr(u8)` puts the tag first: the kernel's BTF check wants a union's
/// members (the tag among them, as Rust describes a data enum) at offset 0,
/// and this type is in the signature of a BPF function.
#[repr(u8)]
pub(crate) enum Parsed6 {
    /// A TCP or UDP packet; a fragment's ports are its first fragment's.
    Flow(Packet6),
    IcmpError(IcmpError6),
    /// A later fragment whose first fragment was not seen, or a fragment
    /// whose transport header does not follow its fragment header.
    Fragment {
        dst: In6,
    },
    /// A header that is not IPv6's, or a payload length the frame does not hold.
    Malformed,
    /// Cut short after the fixed header, or more extension headers than are walked.
    Truncated {
        dst: In6,
    },
    OtherProtocol,
}

/// Where a transport header may start: packet offsets stay within 64 KiB.
const MAX_L4_OFF: usize = 0xffff;

/// `off` (at most [`MAX_L4_OFF`]) as it is, with what the verifier knows of
/// it reduced to that bound. Each count of extension headers walked leaves
/// the transport header's offset in a range of its own, and the verifier
/// would walk the rest of the program once per range (twice the IPv6
/// path's verification, 120k instructions against 62k). In assembly, so
/// that the compiler cannot drop a mask it sees change nothing (as
/// Cilium's `barrier_var` hides values from the compiler).
#[inline(always)]
fn forget_range(off: usize) -> usize {
    let mut off = off;
    // SAFETY: a register's AND with a constant; no memory is touched.
    unsafe { core::arch::asm!("{0} &= {1}", inout(reg) off, const MAX_L4_OFF, options(pure, nomem, nostack)) };
    off
}

/// Never inlined: the header walk's stack stays out of its callers' frames.
#[inline(never)]
pub(crate) fn parse(ctx: &TcContext) -> Parsed6 {
    let Ok(hdr) = read::<[u32; HLEN / 4]>(ctx, ETH_HLEN) else {
        return Parsed6::Malformed;
    };
    let available = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    let Ok(ip) = ipv6::parse(&hdr, available) else {
        return Parsed6::Malformed;
    };
    let end = ETH_HLEN + HLEN + ip.payload_len;
    let mut next = ip.next;
    let mut off = ETH_HLEN + HLEN;
    let mut walked = 0;
    let (mut fragment, mut id) = (Fragment::Whole, 0);
    let truncated = Parsed6::Truncated { dst: ip.dst };
    // Bounded for the verifier: one more pass than headers walked, to see the last one end.
    while walked <= MAX_EXTENSION_HEADERS {
        let Ok(first) = read::<[u8; 4]>(ctx, off) else {
            return truncated;
        };
        match ipv6::extension(next, first) {
            Extension::End => break,
            Extension::LaterFragment => return later_fragment(ctx, &ip, first[0], off, end),
            // The final destination is elsewhere: not a packet to translate here.
            Extension::Routed => return Parsed6::OtherProtocol,
            // Translated only when the transport header follows the fragment
            // header, where a later fragment's lookup finds its protocol.
            Extension::FirstFragment if l4_check_offset(first[0]).is_none() => {
                return Parsed6::Fragment { dst: ip.dst };
            }
            Extension::FirstFragment => {
                let Ok(ident) = read::<[u8; 4]>(ctx, off + 4) else {
                    return truncated;
                };
                (fragment, id) = (Fragment::First, u32::from_be_bytes(ident));
                next = first[0];
                off += FRAGMENT_HLEN;
                if off > end {
                    return truncated;
                }
            }
            Extension::Skip(len) => {
                next = first[0];
                off += len;
                if off > end {
                    return truncated;
                }
            }
        }
        walked += 1;
    }
    if walked > MAX_EXTENSION_HEADERS || off > MAX_L4_OFF {
        return truncated;
    }
    let off = forget_range(off);
    if next == IPPROTO_ICMPV6 {
        return icmp_error(ctx, &ip, off).map_or(Parsed6::OtherProtocol, Parsed6::IcmpError);
    }
    // Only TCP and UDP have a checksum offset: every other protocol ends here.
    let Some(l4_check_off) = l4_check_offset(next) else {
        return Parsed6::OtherProtocol;
    };
    let l4_len = end - off;
    let min_l4 = if next == PROTO_TCP { TcpHdr::LEN } else { UdpHdr::LEN };
    if l4_len < min_l4 {
        return truncated;
    }
    let Ok(ports) = read::<[u8; 4]>(ctx, off) else {
        return truncated;
    };
    let Ok(tcp_flags) = tcp_flags(ctx, next, off) else {
        return truncated;
    };
    Parsed6::Flow(Packet {
        src: ip.src,
        dst: ip.dst,
        src_port: [ports[0], ports[1]],
        dst_port: [ports[2], ports[3]],
        proto: next,
        l4_off: off,
        l4_len,
        l4_check_off,
        tcp_flags,
        fragment,
        id,
    })
}

/// A later fragment (its fragment header at `off`, `proto` after it): a
/// flow packet with its first fragment's ports, if that one passed.
#[inline(always)]
fn later_fragment(ctx: &TcContext, ip: &ipv6::Ipv6Info, proto: u8, off: usize, end: usize) -> Parsed6 {
    let Some(l4_check_off) = l4_check_offset(proto) else {
        return Parsed6::OtherProtocol;
    };
    let Ok(ident) = read::<[u8; 4]>(ctx, off + 4) else {
        return Parsed6::Truncated { dst: ip.dst };
    };
    let id = u32::from_be_bytes(ident);
    let Some(ports) = fragments::ports6(ip.src, ip.dst, id, proto) else {
        return Parsed6::Fragment { dst: ip.dst };
    };
    let l4_off = off + FRAGMENT_HLEN;
    Parsed6::Flow(Packet {
        src: ip.src,
        dst: ip.dst,
        src_port: ports.src_port,
        dst_port: ports.dst_port,
        proto,
        l4_off,
        l4_len: end.saturating_sub(l4_off),
        l4_check_off,
        tcp_flags: 0,
        fragment: Fragment::Later,
        id,
    })
}

/// The ICMPv6 error at `icmp_off`, if it quotes a TCP or UDP packet whose
/// IPv6 header has no extension headers (as every quote of a Service flow
/// a Linux node or a router sends).
#[inline(always)]
fn icmp_error(ctx: &TcContext, ip: &ipv6::Ipv6Info, icmp_off: usize) -> Option<IcmpError6> {
    let [kind, _code] = read::<[u8; 2]>(ctx, icmp_off).ok()?;
    if !ICMPV6_ERRORS.contains(&kind) {
        return None;
    }
    let quoted_off = icmp_off + ICMP_HLEN;
    let hdr = read::<[u32; HLEN / 4]>(ctx, quoted_off).ok()?;
    let [version, ..] = hdr[0].to_ne_bytes();
    let [_, _, proto, _] = hdr[1].to_ne_bytes();
    if version >> 4 != 6 || l4_check_offset(proto).is_none() {
        return None;
    }
    let ports = read::<[u8; 4]>(ctx, quoted_off + HLEN).ok()?;
    Some(IcmpError {
        src: ip.src,
        dst: ip.dst,
        icmp_off,
        quoted_off,
        quoted: Quoted {
            src: In6::from_words([hdr[2], hdr[3], hdr[4], hdr[5]]),
            dst: In6::from_words([hdr[6], hdr[7], hdr[8], hdr[9]]),
            src_port: [ports[0], ports[1]],
            dst_port: [ports[2], ports[3]],
            proto,
        },
    })
}
