//! IPv6 header checks shared by the datapath and its tests: the fixed
//! header, and what each extension header in the chain before the TCP or
//! UDP header means for the walk (RFC 8200 §4).

use core::net::Ipv6Addr;

pub const ETH_P_IPV6: u16 = 0x86dd;
/// The fixed header.
pub const HLEN: usize = 40;

pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;

/// The fragment header: next header, reserved, offset and flags, identification.
pub const FRAGMENT_HLEN: usize = 8;

/// Extension headers walked before giving up on a packet, as Cilium's
/// `IPV6_MAX_HEADERS`: real traffic carries one or two.
pub const MAX_EXTENSION_HEADERS: usize = 4;

/// An IPv6 address as the maps and the datapath hold it: 16 bytes in
/// network order, aligned to 4 so that the BPF backend copies and compares
/// it in words (a byte-aligned array costs a load, a store and often a
/// stack slot per byte, which the 512-byte BPF stack cannot afford).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, Eq, PartialOrd, Ord)]
pub struct In6(pub [u8; 16]);

impl In6 {
    /// The address as four words, each in network order.
    #[inline(always)]
    pub const fn words(&self) -> [u32; 4] {
        // SAFETY: 16 plain bytes, aligned to 4.
        unsafe { core::mem::transmute(self.0) }
    }

    #[inline(always)]
    pub const fn from_words(words: [u32; 4]) -> Self {
        // SAFETY: any 16 bytes are an address.
        Self(unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) })
    }
}

impl PartialEq for In6 {
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        self.words() == other.words()
    }
}

// By the bytes, as equality (which compares them a word at a time).
impl core::hash::Hash for In6 {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl From<[u8; 16]> for In6 {
    fn from(octets: [u8; 16]) -> Self {
        Self(octets)
    }
}

impl From<Ipv6Addr> for In6 {
    fn from(addr: Ipv6Addr) -> Self {
        Self(addr.octets())
    }
}

impl From<In6> for Ipv6Addr {
    fn from(addr: In6) -> Self {
        Ipv6Addr::from(addr.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Info {
    /// Bytes after the fixed header, from its payload length.
    pub payload_len: usize,
    /// The header that follows the fixed one.
    pub next: u8,
    pub src: In6,
    pub dst: In6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    NotVersion6,
    /// A payload length beyond the bytes present, or 0 (a jumbogram, which
    /// no Service traffic is).
    BadPayloadLength,
}

/// Checks the fixed header `h`, read as words (each in network order, as
/// the datapath loads it: see [`In6`]); `available` is how many bytes the
/// frame holds from the start of the IPv6 header on.
#[inline(always)]
pub fn parse(h: &[u32; HLEN / 4], available: usize) -> Result<Ipv6Info, HeaderError> {
    let [version, ..] = h[0].to_ne_bytes();
    if version >> 4 != 6 {
        return Err(HeaderError::NotVersion6);
    }
    let [len_hi, len_lo, next, _] = h[1].to_ne_bytes();
    let payload_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
    if payload_len == 0 || HLEN + payload_len > available {
        return Err(HeaderError::BadPayloadLength);
    }
    let src = In6::from_words([h[2], h[3], h[4], h[5]]);
    let dst = In6::from_words([h[6], h[7], h[8], h[9]]);
    Ok(Ipv6Info { payload_len, next, src, dst })
}

/// What the header `next` (whose first four bytes are `first`) is to the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extension {
    /// An extension header this long: the next one follows it, its type in `first[0]`.
    Skip(usize),
    /// The first fragment of a larger datagram (offset 0, more to come):
    /// the transport header follows the 8-byte fragment header.
    FirstFragment,
    /// A later fragment: no transport header (its ports are in the first).
    LaterFragment,
    /// A routing header with segments left: the destination is not the
    /// packet's final one, which the transport checksum covers.
    Routed,
    /// Not an extension header: the upper-layer header starts here.
    End,
}

#[inline(always)]
pub fn extension(next: u8, first: [u8; 4]) -> Extension {
    match next {
        NEXTHDR_ROUTING if first[3] != 0 => Extension::Routed,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => Extension::Skip((first[1] as usize + 1) * 8),
        // AH counts in 4-byte words, less two.
        NEXTHDR_AUTH => Extension::Skip((first[1] as usize + 2) * 4),
        NEXTHDR_FRAGMENT => {
            let field = u16::from_be_bytes([first[2], first[3]]);
            match (field & 0xfff8, field & 1) {
                // Offset 0 and no more fragments: an atomic fragment (RFC
                // 6946), a whole datagram.
                (0, 0) => Extension::Skip(FRAGMENT_HLEN),
                (0, _) => Extension::FirstFragment,
                _ => Extension::LaterFragment,
            }
        }
        _ => Extension::End,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(version: u8, payload_len: u16, next: u8) -> [u32; HLEN / 4] {
        let mut h = [0u8; HLEN];
        h[0] = version << 4;
        h[4..6].copy_from_slice(&payload_len.to_be_bytes());
        h[6] = next;
        h[8] = 0xfd;
        h[24] = 0xfd;
        h[39] = 0x20;
        core::array::from_fn(|i| u32::from_ne_bytes(h[4 * i..4 * i + 4].try_into().unwrap()))
    }

    #[test]
    fn a_plain_header_names_its_next_header_and_addresses() {
        let i = parse(&hdr(6, 20, 6), 60).unwrap();
        assert_eq!((i.payload_len, i.next), (20, 6));
        assert_eq!((i.src.0[0], i.dst.0[0], i.dst.0[15]), (0xfd, 0xfd, 0x20));
    }

    #[test]
    fn wrong_versions_and_lengths_are_rejected() {
        assert_eq!(parse(&hdr(4, 20, 6), 60), Err(HeaderError::NotVersion6));
        assert_eq!(parse(&hdr(6, 21, 6), 60), Err(HeaderError::BadPayloadLength), "beyond the frame");
        assert_eq!(parse(&hdr(6, 0, 6), 60), Err(HeaderError::BadPayloadLength), "a jumbogram");
    }

    #[test]
    fn extension_headers_have_their_lengths() {
        assert_eq!(extension(NEXTHDR_HOP, [6, 0, 0, 0]), Extension::Skip(8));
        assert_eq!(extension(NEXTHDR_DEST, [6, 2, 0, 0]), Extension::Skip(24));
        assert_eq!(extension(NEXTHDR_ROUTING, [6, 255, 0, 0]), Extension::Skip(2048), "no segments left");
        assert_eq!(extension(NEXTHDR_ROUTING, [6, 2, 4, 1]), Extension::Routed, "one segment left");
        assert_eq!(extension(NEXTHDR_AUTH, [6, 4, 0, 0]), Extension::Skip(24));
        assert_eq!(extension(6, [0; 4]), Extension::End, "TCP");
        assert_eq!(extension(58, [0; 4]), Extension::End, "ICMPv6");
    }

    #[test]
    fn only_an_atomic_fragment_is_a_whole_datagram() {
        assert_eq!(extension(NEXTHDR_FRAGMENT, [17, 0, 0, 0]), Extension::Skip(8));
        assert_eq!(extension(NEXTHDR_FRAGMENT, [17, 0, 0, 1]), Extension::FirstFragment, "more to come");
        assert_eq!(extension(NEXTHDR_FRAGMENT, [17, 0, 0x05, 0x00]), Extension::LaterFragment, "the last one");
        assert_eq!(extension(NEXTHDR_FRAGMENT, [17, 0, 0x05, 0x01]), Extension::LaterFragment, "one between");
        assert_eq!(extension(NEXTHDR_FRAGMENT, [17, 0, 0, 0x06]), Extension::Skip(8), "reserved bits set");
    }
}
