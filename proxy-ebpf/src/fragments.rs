//! Fragmented datagrams: only the first fragment carries the L4 header, so
//! its ports are remembered under what every fragment of the datagram
//! shares (addresses, protocol, IP id) and later fragments are translated
//! with them, as Cilium's IPV4_FRAGMENTS map does (IPv6 datagrams, whose
//! identification is 32 bits, in a map of their own). A later fragment that
//! arrives before its first is not recognised.

use proxy_common::{
    ipv6::In6,
    maps::{FragmentKey, FragmentKey6, FragmentPorts},
};

use crate::{
    maps::{FRAGMENTS, FRAGMENTS6},
    parse::Packet,
};

#[inline(always)]
fn key(src: [u8; 4], dst: [u8; 4], id: [u8; 2], proto: u8) -> FragmentKey {
    FragmentKey { src, dst, id, proto, _pad: 0 }
}

/// The ports of the datagram a later fragment belongs to, if its first fragment passed.
#[inline(always)]
pub(crate) fn ports(src: [u8; 4], dst: [u8; 4], id: [u8; 2], proto: u8) -> Option<FragmentPorts> {
    FRAGMENTS.get_ptr(key(src, dst, id, proto)).map(|p| unsafe { core::ptr::read(p) })
}

/// Remembers a translated first fragment's ports for the rest of its datagram.
///
/// Best effort: without the entry the later fragments are dropped and
/// counted, and the sender's retransmission tries again.
#[inline(always)]
pub(crate) fn remember(pkt: &Packet) {
    let ports = FragmentPorts { src_port: pkt.src_port, dst_port: pkt.dst_port };
    let _ = FRAGMENTS.insert(key(pkt.src, pkt.dst, (pkt.id as u16).to_be_bytes(), pkt.proto), ports, 0);
}

#[inline(always)]
fn key6(src: In6, dst: In6, id: u32, proto: u8) -> FragmentKey6 {
    FragmentKey6 { src, dst, id: id.to_be_bytes(), proto, _pad: [0; 3] }
}

/// [`ports`] for an IPv6 datagram.
#[inline(always)]
pub(crate) fn ports6(src: In6, dst: In6, id: u32, proto: u8) -> Option<FragmentPorts> {
    FRAGMENTS6.get_ptr(key6(src, dst, id, proto)).map(|p| unsafe { core::ptr::read(p) })
}

/// [`remember`] for an IPv6 datagram.
#[inline(always)]
pub(crate) fn remember6(pkt: &Packet<In6>) {
    let ports = FragmentPorts { src_port: pkt.src_port, dst_port: pkt.dst_port };
    let _ = FRAGMENTS6.insert(key6(pkt.src, pkt.dst, pkt.id, pkt.proto), ports, 0);
}
