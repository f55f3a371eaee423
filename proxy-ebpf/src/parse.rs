//! Bounds-checked header reads. Every load goes through the skb helpers, so a
//! short packet is an error here, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use network_types::{tcp::TcpHdr, udp::UdpHdr};
use proxy_common::{
    ipv4::{self, ETH_HLEN, ETH_P_IP, MIN_HLEN},
    maps::PROTO_TCP,
};

/// A TCP or UDP packet whose ports could be read.
pub(crate) struct Packet {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub proto: u8,
    /// Offset of the L4 header in the frame (after any IP options).
    pub l4_off: usize,
    /// Bytes of L4 header + payload, from the IP total length.
    pub l4_len: usize,
    /// Offset of the L4 checksum from the start of the L4 header.
    pub l4_check_off: usize,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
}

pub(crate) enum Parsed {
    Flow(Packet),
    NotIpv4,
    Malformed,
    OtherProtocol,
    Fragment { dst: [u8; 4] },
    Truncated { dst: [u8; 4] },
}

#[inline(always)]
pub(crate) fn parse(ctx: &TcContext) -> Parsed {
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
        return Parsed::Malformed;
    };
    if u16::from_be_bytes(ethertype) != ETH_P_IP {
        return Parsed::NotIpv4;
    }
    let Ok(hdr) = ctx.load::<[u8; MIN_HLEN]>(ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let available = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    let Ok(ip) = ipv4::parse(&hdr, available) else {
        return Parsed::Malformed;
    };
    // Only TCP and UDP have a checksum offset: every other protocol ends here.
    let Some(l4_check_off) = ipv4::l4_check_offset(ip.proto) else {
        return Parsed::OtherProtocol;
    };
    if ip.is_fragment {
        return Parsed::Fragment { dst: ip.dst };
    }
    // Bounded for the verifier: IHL is at most 15 words.
    let l4_off = ETH_HLEN + (ip.header_len & 0x3c);
    let l4_len = ip.total_len - ip.header_len;
    let min_l4 = if ip.proto == PROTO_TCP { TcpHdr::LEN } else { UdpHdr::LEN };
    if l4_len < min_l4 {
        return Parsed::Truncated { dst: ip.dst };
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(l4_off) else {
        return Parsed::Truncated { dst: ip.dst };
    };
    let tcp_flags = if ip.proto == PROTO_TCP {
        match ctx.load::<u8>(l4_off + 13) {
            Ok(f) => f,
            Err(_) => return Parsed::Truncated { dst: ip.dst },
        }
    } else {
        0
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
    })
}
