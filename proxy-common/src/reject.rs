//! Refusals for Services without endpoints, as kube-proxy's REJECT answers:
//! a TCP reset, or ICMP (ICMPv6 over IPv6) port unreachable for UDP; and the
//! "fragmentation needed" (ICMPv6 "packet too big") a router answers a
//! packet too big for the next hop with. The datapath copies these bytes
//! over the packet and sends it back out of the interface it came in on.

use crate::checksum::{add_bytes, add_words, checksum, finish, pseudo_header_sum, update16, update32, update128};
use crate::{
    ipv6::In6,
    maps::{PROTO_TCP, PROTO_UDP},
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// Length of the IPv4 + TCP headers of a reset (no options, no payload).
pub const TCP_RESET_LEN: usize = 40;
/// The part of the offending datagram an ICMP error quotes: its 20-byte IP
/// header and first 8 bytes (the whole UDP header).
pub const ICMP_QUOTE_LEN: usize = 28;
/// IPv4 + ICMP headers placed in front of the quote.
pub const ICMP_HEADERS_LEN: usize = 28;

pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PORT_UNREACH: u8 = 4;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;

/// Length of the IPv6 + TCP headers of a reset.
pub const TCP_RESET6_LEN: usize = 60;
/// What an ICMPv6 error about a UDP datagram quotes: its 40-byte IPv6
/// header and the UDP header (a datagram with extension headers is not
/// answered).
pub const ICMP6_QUOTE_LEN: usize = 48;
/// IPv6 + ICMPv6 headers placed in front of the quote.
pub const ICMP6_HEADERS_LEN: usize = 48;

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
    let (seq, ack, flags) = reset_numbers(seg)?;
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

/// The sequence and acknowledgment numbers and flags of the reset
/// answering `seg`; `None` for an incoming reset, never answered.
#[inline(always)]
fn reset_numbers(seg: &TcpSegment) -> Option<(u32, u32, u8)> {
    if seg.flags & TCP_RST != 0 {
        return None;
    }
    if seg.flags & TCP_ACK != 0 {
        return Some((seg.ack, 0, TCP_RST));
    }
    let mut len = seg.payload_len;
    if seg.flags & TCP_SYN != 0 {
        len += 1;
    }
    if seg.flags & TCP_FIN != 0 {
        len += 1;
    }
    Some((0, seg.seq.wrapping_add(len), TCP_RST | TCP_ACK))
}

/// [`tcp_reset`] over IPv6: the IPv6 and TCP headers, as words each in
/// network order (the datapath stores them as they are: IPv6 packets are
/// built in words, which the BPF stack affords, not bytes).
#[inline(always)]
pub fn tcp_reset6(
    from: &In6,
    from_port: [u8; 2],
    to: &In6,
    to_port: [u8; 2],
    seg: &TcpSegment,
) -> Option<[u32; TCP_RESET6_LEN / 4]> {
    let (seq, ack, flags) = reset_numbers(seg)?;
    let mut out = [0u32; TCP_RESET6_LEN / 4];
    ipv6_header(&mut out, from.words(), to.words(), PROTO_TCP, 20);
    out[10] = u32::from_ne_bytes([from_port[0], from_port[1], to_port[0], to_port[1]]);
    out[11] = u32::from_ne_bytes(seq.to_be_bytes());
    out[12] = u32::from_ne_bytes(ack.to_be_bytes());
    out[13] = u32::from_ne_bytes([0x50, flags, 0, 0]);
    let c = finish_words(add_words(pseudo_sum6(&out, PROTO_TCP, 20), &out[10..14]));
    out[14] = u32::from_ne_bytes([c[0], c[1], 0, 0]);
    Some(out)
}

/// The IPv6 and ICMPv6 headers of a port-unreachable error about `quote`
/// (the offending datagram's IPv6 and UDP headers, as words), from the
/// address it was sent to back to its sender. ICMPv6's checksum, unlike
/// ICMP's, covers a pseudo header.
#[inline(always)]
pub fn icmp6_port_unreachable(quote: &[u32; ICMP6_QUOTE_LEN / 4]) -> [u32; ICMP6_HEADERS_LEN / 4] {
    icmp6_error(ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, quote)
}

/// IPv6 + ICMPv6 headers of a "packet too big" error (RFC 4443 §3.2)
/// about `quote`, as [`icmp6_port_unreachable`]: `mtu` is the next hop's.
#[inline(always)]
pub fn icmp6_packet_too_big(mtu: u32, quote: &[u32; ICMP6_QUOTE_LEN / 4]) -> [u32; ICMP6_HEADERS_LEN / 4] {
    icmp6_error(ICMPV6_PKT_TOOBIG, 0, mtu, quote)
}

/// An ICMPv6 error of `kind` and `code` whose second header word is `word`.
#[inline(always)]
fn icmp6_error(kind: u8, code: u8, word: u32, quote: &[u32; ICMP6_QUOTE_LEN / 4]) -> [u32; ICMP6_HEADERS_LEN / 4] {
    let len = (8 + ICMP6_QUOTE_LEN) as u16;
    let mut out = [0u32; ICMP6_HEADERS_LEN / 4];
    // The quoted header's destination (words 6..10) and source (2..6), swapped.
    let (from, to) = ([quote[6], quote[7], quote[8], quote[9]], [quote[2], quote[3], quote[4], quote[5]]);
    ipv6_header(&mut out, from, to, IPPROTO_ICMPV6, len);
    out[10] = u32::from_ne_bytes([kind, code, 0, 0]);
    out[11] = u32::from_ne_bytes(word.to_be_bytes());
    let c = finish_words(add_words(add_words(pseudo_sum6(&out, IPPROTO_ICMPV6, len), &out[10..12]), quote));
    out[10] = u32::from_ne_bytes([kind, code, c[0], c[1]]);
    out
}

/// Writes an IPv6 header from `from` to `to` into words 0..10 of `out`.
#[inline(always)]
fn ipv6_header(out: &mut [u32], from: [u32; 4], to: [u32; 4], next_header: u8, payload_len: u16) {
    let l = payload_len.to_be_bytes();
    out[0] = u32::from_ne_bytes([0x60, 0, 0, 0]);
    out[1] = u32::from_ne_bytes([l[0], l[1], next_header, 64]);
    out[2..6].copy_from_slice(&from);
    out[6..10].copy_from_slice(&to);
}

/// The pseudo header's sum for the IPv6 header in words 0..10 of `header`.
#[inline(always)]
fn pseudo_sum6(header: &[u32], next_header: u8, len: u16) -> u32 {
    let l = len.to_be_bytes();
    let tail = [u32::from_ne_bytes([0, 0, l[0], l[1]]), u32::from_ne_bytes([0, 0, 0, next_header])];
    add_words(add_words(0, &header[2..10]), &tail)
}

/// The checksum field's two bytes for words (each in network order) that
/// sum to `sum` in the machine's order: stored as the machine holds it, the
/// checksum lands in network order (RFC 1071's byte-order independence).
#[inline(always)]
fn finish_words(sum: u32) -> [u8; 2] {
    finish(sum).to_ne_bytes()
}

/// IPv4 + ICMP headers of a port-unreachable error about `quote` (the first
/// 28 bytes of the offending datagram), sent from `from` to `to`.
#[inline(always)]
pub fn icmp_port_unreachable(from: [u8; 4], to: [u8; 4], quote: &[u8; ICMP_QUOTE_LEN]) -> [u8; ICMP_HEADERS_LEN] {
    icmp_unreachable(ICMP_PORT_UNREACH, 0, from, to, quote)
}

/// IPv4 + ICMP headers of a "fragmentation needed and DF set" error (RFC
/// 1191) about `quote`, as [`icmp_port_unreachable`]: `mtu` is the next hop's.
#[inline(always)]
pub fn icmp_frag_needed(from: [u8; 4], to: [u8; 4], mtu: u16, quote: &[u8; ICMP_QUOTE_LEN]) -> [u8; ICMP_HEADERS_LEN] {
    icmp_unreachable(ICMP_FRAG_NEEDED, mtu, from, to, quote)
}

/// A "destination unreachable" of `code`; `mtu` fills the header's last
/// two bytes (unused but by "fragmentation needed").
#[inline(always)]
fn icmp_unreachable(
    code: u8,
    mtu: u16,
    from: [u8; 4],
    to: [u8; 4],
    quote: &[u8; ICMP_QUOTE_LEN],
) -> [u8; ICMP_HEADERS_LEN] {
    let total = (ICMP_HEADERS_LEN + ICMP_QUOTE_LEN) as u16;
    // TOS 0xc0 (internetwork control) as the kernel's own ICMP errors carry.
    let ip = ipv4_header(from, to, IPPROTO_ICMP, total, 0xc0);
    let m = mtu.to_be_bytes();
    let mut icmp = [ICMP_DEST_UNREACH, code, 0, 0, 0, 0, m[0], m[1]];
    let c = finish(add_bytes(add_bytes(0, &icmp), quote)).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    let mut out = [0u8; ICMP_HEADERS_LEN];
    out[..20].copy_from_slice(&ip);
    out[20..].copy_from_slice(&icmp);
    out
}

/// A UDP checksum computed as zero is sent as all ones (zero means none).
#[inline(always)]
fn udp_checksum(c: u16) -> u16 {
    if c == 0 { 0xffff } else { c }
}

/// `quote`, the first bytes of a datagram the datapath translated to a
/// backend, put back as its sender sent it: to `dst`:`dst_port`, the IPv4
/// header's checksum and a UDP datagram's updated to match. An error about
/// it then reads as one about what the sender sent.
#[inline(always)]
pub fn untranslated_quote(quote: &mut [u8; ICMP_QUOTE_LEN], dst: [u8; 4], dst_port: [u8; 2]) {
    let old = [quote[16], quote[17], quote[18], quote[19]];
    let old_port = [quote[22], quote[23]];
    let ip_check = update32(u16::from_be_bytes([quote[10], quote[11]]), old, dst);
    quote[10..12].copy_from_slice(&ip_check.to_be_bytes());
    quote[16..20].copy_from_slice(&dst);
    quote[22..24].copy_from_slice(&dst_port);
    let udp_check = u16::from_be_bytes([quote[26], quote[27]]);
    if quote[9] == PROTO_UDP && udp_check != 0 {
        let c = update16(update32(udp_check, old, dst), u16::from_be_bytes(old_port), u16::from_be_bytes(dst_port));
        quote[26..28].copy_from_slice(&udp_checksum(c).to_be_bytes());
    }
}

/// [`untranslated_quote`] for an IPv6 datagram's first bytes (as words
/// each in network order): to `dst` (words) and `dst_port`.
#[inline(always)]
pub fn untranslated_quote6(quote: &mut [u32; ICMP6_QUOTE_LEN / 4], dst: [u32; 4], dst_port: [u8; 2]) {
    let old = [quote[6], quote[7], quote[8], quote[9]];
    quote[6..10].copy_from_slice(&dst);
    // Word 10: the ports; word 11: UDP's length and checksum.
    let mut ports = quote[10].to_ne_bytes();
    let old_port = [ports[2], ports[3]];
    ports[2..4].copy_from_slice(&dst_port);
    quote[10] = u32::from_ne_bytes(ports);
    let next_header = quote[1].to_ne_bytes()[2];
    let mut tail = quote[11].to_ne_bytes();
    if next_header == PROTO_UDP {
        let check = u16::from_be_bytes([tail[2], tail[3]]);
        let c = update16(update128(check, old, dst), u16::from_be_bytes(old_port), u16::from_be_bytes(dst_port));
        tail[2..4].copy_from_slice(&udp_checksum(c).to_be_bytes());
        quote[11] = u32::from_ne_bytes(tail);
    }
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

    const VIP6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20];
    const CLIENT6: [u8; 16] = [0xfd, 0, 0x2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64];

    fn bytes(words: &[u32]) -> std::vec::Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// Whether the upper-layer checksum of an IPv6 packet (fixed header only) verifies.
    fn ipv6_checksum_ok(p: &[u8]) -> bool {
        let (src, dst): ([u8; 16], [u8; 16]) = (p[8..24].try_into().unwrap(), p[24..40].try_into().unwrap());
        let l4 = &p[40..];
        let pseudo = crate::checksum::pseudo_header_sum6(src, dst, p[6], l4.len() as u16);
        crate::checksum::fold(add_bytes(pseudo, l4)) == 0xffff
    }

    #[test]
    fn an_ipv6_reset_answers_a_syn_with_its_checksum_over_the_pseudo_header() {
        let syn = TcpSegment { seq: 1000, ack: 0, flags: TCP_SYN, payload_len: 0 };
        let p = bytes(&tcp_reset6(&In6(VIP6), [0, 80], &In6(CLIENT6), [0x9c, 0x40], &syn).unwrap());
        assert_eq!(p.len(), TCP_RESET6_LEN);
        assert_eq!((p[0] >> 4, u16::from_be_bytes([p[4], p[5]]), p[6], p[7]), (6, 20, PROTO_TCP, 64));
        assert_eq!((&p[8..24], &p[24..40]), (&VIP6[..], &CLIENT6[..]));
        let tcp = &p[40..];
        assert_eq!(&tcp[..4], &[0, 80, 0x9c, 0x40]);
        assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1001);
        assert_eq!((tcp[12], tcp[13]), (0x50, TCP_RST | TCP_ACK));
        assert!(ipv6_checksum_ok(&p), "TCP checksum verifies");
        let ack = TcpSegment { seq: 5, ack: 777, flags: TCP_ACK, payload_len: 10 };
        let p = bytes(&tcp_reset6(&In6(VIP6), [0, 80], &In6(CLIENT6), [1, 2], &ack).unwrap());
        assert_eq!(u32::from_be_bytes([p[44], p[45], p[46], p[47]]), 777);
        assert!(ipv6_checksum_ok(&p));
        let rst = TcpSegment { seq: 1, ack: 1, flags: TCP_RST, payload_len: 0 };
        assert!(tcp_reset6(&In6(VIP6), [0, 80], &In6(CLIENT6), [1, 2], &rst).is_none());
    }

    #[test]
    fn an_icmpv6_error_goes_back_to_the_sender_its_checksum_over_pseudo_header_and_quote() {
        // Any 48 bytes after a client -> VIP header.
        let mut quote = [0u8; ICMP6_QUOTE_LEN];
        for (i, b) in quote.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37);
        }
        quote[8..24].copy_from_slice(&CLIENT6);
        quote[24..40].copy_from_slice(&VIP6);
        let words: [u32; 12] =
            core::array::from_fn(|i| u32::from_ne_bytes(quote[4 * i..4 * i + 4].try_into().unwrap()));
        let mut p = bytes(&icmp6_port_unreachable(&words));
        assert_eq!((u16::from_be_bytes([p[4], p[5]]), p[6]), (56, IPPROTO_ICMPV6));
        assert_eq!((&p[8..24], &p[24..40]), (&VIP6[..], &CLIENT6[..]), "from the VIP to the client");
        assert_eq!(&p[40..42], &[ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH]);
        p.extend(quote);
        assert!(ipv6_checksum_ok(&p), "ICMPv6 checksum verifies");
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

    /// The first 28 bytes of a UDP datagram from `CLIENT`:40000 to `to`:`port`
    /// with its payload, both checksums right.
    fn udp_quote(to: [u8; 4], port: [u8; 2]) -> [u8; ICMP_QUOTE_LEN] {
        let payload = [7u8; 1464];
        let mut q = [0u8; ICMP_QUOTE_LEN];
        let ip = ipv4_header(CLIENT, to, PROTO_UDP, 1492, 0);
        q[..20].copy_from_slice(&ip);
        q[20..22].copy_from_slice(&40000u16.to_be_bytes());
        q[22..24].copy_from_slice(&port);
        q[24..26].copy_from_slice(&1472u16.to_be_bytes());
        let sum = add_bytes(add_bytes(pseudo_header_sum(CLIENT, to, PROTO_UDP, 1472), &q[20..28]), &payload);
        q[26..28].copy_from_slice(&udp_checksum(finish(sum)).to_be_bytes());
        q
    }

    #[test]
    fn a_quote_translated_to_a_backend_is_put_back_as_the_client_sent_it() {
        let sent = udp_quote(VIP, [0, 53]);
        let translated = udp_quote([10, 244, 1, 11], [0x14, 0xe9]);
        let mut quote = translated;
        untranslated_quote(&mut quote, VIP, [0, 53]);
        assert_eq!(quote, sent, "addresses, ports and both checksums as sent");
    }

    #[test]
    fn fragmentation_needed_carries_the_next_hop_mtu_and_its_checksum_covers_the_quote() {
        let quote = udp_quote(VIP, [0, 53]);
        let h = icmp_frag_needed(VIP, CLIENT, 1450, &quote);
        assert_eq!(checksum(&h[..20]), 0);
        assert_eq!((&h[12..16], &h[16..20]), (&VIP[..], &CLIENT[..]));
        assert_eq!(&h[20..22], &[ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 1450);
        let mut icmp = [0u8; 36];
        icmp[..8].copy_from_slice(&h[20..]);
        icmp[8..].copy_from_slice(&quote);
        assert_eq!(checksum(&icmp), 0, "ICMP checksum verifies over header + quote");
    }

    /// An IPv6 UDP datagram's header and UDP header from `CLIENT6`:40000 to
    /// `to`:`port`, as words, its checksum right.
    fn udp_quote6(to: [u8; 16], port: [u8; 2]) -> [u32; 12] {
        let payload = [7u8; 1400];
        let mut q = [0u8; ICMP6_QUOTE_LEN];
        q[0] = 0x60;
        q[4..6].copy_from_slice(&1408u16.to_be_bytes());
        q[6] = PROTO_UDP;
        q[7] = 64;
        q[8..24].copy_from_slice(&CLIENT6);
        q[24..40].copy_from_slice(&to);
        q[40..42].copy_from_slice(&40000u16.to_be_bytes());
        q[42..44].copy_from_slice(&port);
        q[44..46].copy_from_slice(&1408u16.to_be_bytes());
        let pseudo = crate::checksum::pseudo_header_sum6(CLIENT6, to, PROTO_UDP, 1408);
        let sum = add_bytes(add_bytes(pseudo, &q[40..48]), &payload);
        q[46..48].copy_from_slice(&udp_checksum(finish(sum)).to_be_bytes());
        core::array::from_fn(|i| u32::from_ne_bytes(q[4 * i..4 * i + 4].try_into().unwrap()))
    }

    #[test]
    fn an_ipv6_quote_is_put_back_and_packet_too_big_carries_the_mtu() {
        let backend6 = [0xfd, 0, 0x2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x0b];
        let sent = udp_quote6(VIP6, [0, 53]);
        let mut quote = udp_quote6(backend6, [0x14, 0xe9]);
        untranslated_quote6(&mut quote, In6(VIP6).words(), [0, 53]);
        assert_eq!(bytes(&quote), bytes(&sent), "address, port and checksum as sent");
        let mut p = bytes(&icmp6_packet_too_big(1430, &quote));
        assert_eq!((&p[8..24], &p[24..40]), (&VIP6[..], &CLIENT6[..]), "from the frontend to the client");
        assert_eq!(&p[40..42], &[ICMPV6_PKT_TOOBIG, 0]);
        assert_eq!(u32::from_be_bytes([p[44], p[45], p[46], p[47]]), 1430);
        p.extend(bytes(&quote));
        assert!(ipv6_checksum_ok(&p), "ICMPv6 checksum verifies");
    }
}
