//! IPv6 headers and what they say: the fixed header, the extension headers
//! before the TCP or UDP header walked with bounds (at most
//! [`MAX_EXTENSION_HEADERS`] of them, each checked against the payload
//! length), and the ports. Everything else, ICMPv6 and Neighbor Discovery
//! included, is not the per-packet path's and passes as it came.

use aya_ebpf::programs::TcContext;
use network_types::{tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{
    ipv4::{ETH_HLEN, Fragment, l4_check_offset},
    ipv6::{self, Extension, HLEN, In6, MAX_EXTENSION_HEADERS},
    maps::PROTO_TCP,
};

use crate::parse::{Packet, read};

pub(crate) type Packet6 = Packet<In6>;

/// `repr(u8)` puts the tag first: the kernel's BTF check wants a union's
/// members (the tag among them, as Rust describes a data enum) at offset 0,
/// and this type is in the signature of a BPF function.
#[repr(u8)]
pub(crate) enum Parsed6 {
    Flow(Packet6),
    /// A fragment of a larger datagram (the per-packet path does not track
    /// IPv6 fragments: they pass, counted).
    Fragment,
    /// Cut short, or more extension headers than are walked.
    Malformed,
    OtherProtocol,
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
    // Bounded for the verifier: one more pass than headers walked, to see the last one end.
    while walked <= MAX_EXTENSION_HEADERS {
        let Ok(first) = read::<[u8; 4]>(ctx, off) else {
            return Parsed6::Malformed;
        };
        match ipv6::extension(next, first) {
            Extension::End => break,
            Extension::Fragment => return Parsed6::Fragment,
            Extension::Skip(len) => {
                next = first[0];
                off += len;
                if off > end {
                    return Parsed6::Malformed;
                }
            }
        }
        walked += 1;
    }
    if walked > MAX_EXTENSION_HEADERS {
        return Parsed6::Malformed;
    }
    // Only TCP and UDP have a checksum offset: every other protocol ends here.
    let Some(l4_check_off) = l4_check_offset(next) else {
        return Parsed6::OtherProtocol;
    };
    let l4_len = end - off;
    let min_l4 = if next == PROTO_TCP { TcpHdr::LEN } else { UdpHdr::LEN };
    if l4_len < min_l4 {
        return Parsed6::Malformed;
    }
    let Ok(ports) = read::<[u8; 4]>(ctx, off) else {
        return Parsed6::Malformed;
    };
    let tcp_flags = if next == PROTO_TCP {
        match read::<[u8; 2]>(ctx, off + 12) {
            Ok([_, flags]) => flags,
            Err(_) => return Parsed6::Malformed,
        }
    } else {
        0
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
        fragment: Fragment::Whole,
        id: [0; 2],
    })
}
