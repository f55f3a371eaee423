//! Refusals for Services without endpoints, as kube-proxy's REJECT answers:
//! a TCP reset, or ICMP port unreachable for UDP. The datapath copies these
//! bytes over the packet and sends it back out of the interface it came in on.

use crate::checksum::{add_bytes, checksum, finish, pseudo_header_sum};
use crate::maps::PROTO_TCP;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;

/// Length of the IPv4 + TCP headers of a reset (no options, no payload).
pub const TCP_RESET_LEN: usize = 40;
/// The part of the offending datagram an ICMP error quotes: its 20-byte IP
/// header and first 8 bytes (the whole UDP header).
pub const ICMP_QUOTE_LEN: usize = 28;
/// IPv4 + ICMP headers placed in front of the quote.
pub const ICMP_HEADERS_LEN: usize = 28;

/// The fields of an incoming segment a reset must answer.
#[derive(Clone, Copy, Debug)]
pub struct TcpSegment {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload_len: u32,
}

fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, total_len: u16, tos: u8) -> [u8; 20] {
    let len = total_len.to_be_bytes();
    let mut h = [
        0x45, tos, len[0], len[1], 0, 0, 0x40, 0, 64, proto, 0, 0, src[0], src[1], src[2], src[3], dst[0], dst[1],
        dst[2], dst[3],
    ];
    let c = checksum(&h).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h
}

/// IPv4 + TCP headers of the reset answering `seg`, sent from `from`:`from_port`
/// (the VIP the client dialled) to the client, per RFC 9293 §3.10.7.1.
/// Returns `None` for an incoming reset, which is never answered.
#[inline(always)]
pub fn tcp_reset(
    from: [u8; 4],
    from_port: [u8; 2],
    to: [u8; 4],
    to_port: [u8; 2],
    seg: &TcpSegment,
) -> Option<[u8; TCP_RESET_LEN]> {
    if seg.flags & TCP_RST != 0 {
        return None;
    }
    let (seq, ack, flags) = if seg.flags & TCP_ACK != 0 {
        (seg.ack, 0, TCP_RST)
    } else {
        let mut len = seg.payload_len;
        if seg.flags & TCP_SYN != 0 {
            len += 1;
        }
        if seg.flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, seg.seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let ip = ipv4_header(from, to, PROTO_TCP, TCP_RESET_LEN as u16, 0);
    let s = seq.to_be_bytes();
    let a = ack.to_be_bytes();
    let mut tcp = [
        from_port[0],
        from_port[1],
        to_port[0],
        to_port[1],
        s[0],
        s[1],
        s[2],
        s[3],
        a[0],
        a[1],
        a[2],
        a[3],
        0x50,
        flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let c = finish(add_bytes(pseudo_header_sum(from, to, PROTO_TCP, 20), &tcp)).to_be_bytes();
    tcp[16] = c[0];
    tcp[17] = c[1];
    let mut out = [0u8; TCP_RESET_LEN];
    out[..20].copy_from_slice(&ip);
    out[20..].copy_from_slice(&tcp);
    Some(out)
}

/// IPv4 + ICMP headers of a port-unreachable error about `quote` (the first
/// 28 bytes of the offending datagram), sent from `from` to `to`.
#[inline(always)]
pub fn icmp_port_unreachable(from: [u8; 4], to: [u8; 4], quote: &[u8; ICMP_QUOTE_LEN]) -> [u8; ICMP_HEADERS_LEN] {
    let total = (ICMP_HEADERS_LEN + ICMP_QUOTE_LEN) as u16;
    // TOS 0xc0 (internetwork control) as the kernel's own ICMP errors carry.
    let ip = ipv4_header(from, to, IPPROTO_ICMP, total, 0xc0);
    let mut icmp = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    let c = finish(add_bytes(add_bytes(0, &icmp), quote)).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    let mut out = [0u8; ICMP_HEADERS_LEN];
    out[..20].copy_from_slice(&ip);
    out[20..].copy_from_slice(&icmp);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: [u8; 4] = [10, 96, 0, 10];
    const CLIENT: [u8; 4] = [10, 244, 0, 100];

    fn tcp_checksum_ok(pkt: &[u8]) -> bool {
        let src = [pkt[12], pkt[13], pkt[14], pkt[15]];
        let dst = [pkt[16], pkt[17], pkt[18], pkt[19]];
        let l4 = &pkt[20..];
        crate::checksum::fold(add_bytes(pseudo_header_sum(src, dst, 6, l4.len() as u16), l4)) == 0xffff
    }

    #[test]
    fn reset_answers_a_syn_with_rst_ack() {
        let syn = TcpSegment { seq: 1000, ack: 0, flags: TCP_SYN, payload_len: 0 };
        let p = tcp_reset(VIP, [0, 80], CLIENT, [0x9c, 0x40], &syn).unwrap();
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum verifies");
        assert!(tcp_checksum_ok(&p));
        assert_eq!(&p[12..16], &VIP);
        assert_eq!(&p[16..20], &CLIENT);
        assert_eq!(&p[20..24], &[0, 80, 0x9c, 0x40]);
        assert_eq!(u32::from_be_bytes([p[24], p[25], p[26], p[27]]), 0);
        assert_eq!(u32::from_be_bytes([p[28], p[29], p[30], p[31]]), 1001);
        assert_eq!(p[33], TCP_RST | TCP_ACK);
    }

    #[test]
    fn reset_answers_an_ack_with_its_ack_number() {
        let seg = TcpSegment { seq: 5, ack: 777, flags: TCP_ACK, payload_len: 10 };
        let p = tcp_reset(VIP, [0, 80], CLIENT, [1, 2], &seg).unwrap();
        assert_eq!(u32::from_be_bytes([p[24], p[25], p[26], p[27]]), 777);
        assert_eq!(p[33], TCP_RST);
        assert!(tcp_checksum_ok(&p));
    }

    #[test]
    fn data_and_fin_count_in_the_ack() {
        let seg = TcpSegment { seq: u32::MAX, ack: 0, flags: TCP_FIN, payload_len: 3 };
        let p = tcp_reset(VIP, [0, 80], CLIENT, [1, 2], &seg).unwrap();
        assert_eq!(u32::from_be_bytes([p[28], p[29], p[30], p[31]]), 3, "wraps around");
    }

    #[test]
    fn a_reset_is_never_answered() {
        let seg = TcpSegment { seq: 1, ack: 1, flags: TCP_RST | TCP_ACK, payload_len: 0 };
        assert!(tcp_reset(VIP, [0, 80], CLIENT, [1, 2], &seg).is_none());
    }

    #[test]
    fn icmp_error_checksums_cover_the_quote() {
        let mut quote = [0u8; ICMP_QUOTE_LEN];
        for (i, b) in quote.iter_mut().enumerate() {
            *b = i as u8 * 7;
        }
        let h = icmp_port_unreachable(VIP, CLIENT, &quote);
        assert_eq!(checksum(&h[..20]), 0);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 56);
        assert_eq!(h[9], IPPROTO_ICMP);
        assert_eq!(&h[20..22], &[3, 3]);
        let mut icmp = [0u8; 36];
        icmp[..8].copy_from_slice(&h[20..]);
        icmp[8..].copy_from_slice(&quote);
        assert_eq!(checksum(&icmp), 0, "ICMP checksum verifies over header + quote");
    }
}
