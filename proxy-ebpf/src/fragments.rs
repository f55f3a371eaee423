//! Fragmented datagrams: only the first fragment carries the L4 header, so
//! its ports are remembered under what every fragment of the datagram
//! shares (addresses, protocol, IP id) and later fragments are translated
//! with them, as Cilium's IPV4_FRAGMENTS map does. A later fragment that
//! arrives before its first is not recognised.

use proxy_common::maps::{FragmentKey, FragmentPorts};

use crate::{maps::FRAGMENTS, parse::Packet};

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
    let _ = FRAGMENTS.insert(key(pkt.src, pkt.dst, pkt.id, pkt.proto), ports, 0);
}
