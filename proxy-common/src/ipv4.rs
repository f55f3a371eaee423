//! IPv4 header checks shared by the datapath and its tests.
//!
//! The datapath loads the fixed 20-byte header and asks [`parse`] what it is
//! looking at, so the decision about options, fragments and truncation is made
//! in one place a host test can reach.

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const MIN_HLEN: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    /// Header length in bytes (IHL * 4), 20..=60.
    pub header_len: usize,
    /// Total length from the header (header + payload).
    pub total_len: usize,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub fragment: Fragment,
    /// The identification field, which the fragments of one datagram share.
    pub id: [u8; 2],
}

/// Which part of a datagram a packet is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    #[default]
    Whole,
    /// The first fragment (offset 0, more to come): it carries the L4 header.
    First,
    /// A later fragment: payload only, no ports.
    Later,
}

impl Ipv4Info {
    pub const fn is_fragment(&self) -> bool {
        !matches!(self.fragment, Fragment::Whole)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    NotVersion4,
    /// IHL below 5 or beyond the bytes present.
    BadHeaderLength,
    /// Total length shorter than the header or longer than the bytes present.
    BadTotalLength,
}

/// Checks the fixed header `h`; `available` is how many bytes the frame holds
/// from the start of the IP header on.
#[inline(always)]
pub fn parse(h: &[u8; MIN_HLEN], available: usize) -> Result<Ipv4Info, HeaderError> {
    if h[0] >> 4 != 4 {
        return Err(HeaderError::NotVersion4);
    }
    let header_len = ((h[0] & 0x0f) as usize) * 4;
    if header_len < MIN_HLEN || header_len > available {
        return Err(HeaderError::BadHeaderLength);
    }
    let total_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if total_len < header_len || total_len > available {
        return Err(HeaderError::BadTotalLength);
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    Ok(Ipv4Info {
        header_len,
        total_len,
        proto: h[9],
        src: [h[12], h[13], h[14], h[15]],
        dst: [h[16], h[17], h[18], h[19]],
        fragment: match (more_fragments, offset) {
            (false, 0) => Fragment::Whole,
            (true, 0) => Fragment::First,
            _ => Fragment::Later,
        },
        id: [h[4], h[5]],
    })
}

/// Offset of the L4 checksum field from the start of the L4 header.
#[inline(always)]
pub const fn l4_check_offset(proto: u8) -> Option<usize> {
    match proto {
        crate::maps::PROTO_TCP => Some(16),
        crate::maps::PROTO_UDP => Some(6),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(vihl: u8, total: u16, frag: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = vihl;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[9] = 6;
        h[12..16].copy_from_slice(&[10, 0, 0, 1]);
        h[16..20].copy_from_slice(&[10, 96, 0, 1]);
        h
    }

    #[test]
    fn plain_header() {
        let i = parse(&hdr(0x45, 40, 0x4000), 40).unwrap();
        assert_eq!(i.header_len, 20);
        assert_eq!(i.total_len, 40);
        assert_eq!(i.fragment, Fragment::Whole, "DF alone is not a fragment");
        assert_eq!(i.dst, [10, 96, 0, 1]);
    }

    #[test]
    fn options_move_the_l4_header() {
        let i = parse(&hdr(0x47, 48, 0), 48).unwrap();
        assert_eq!(i.header_len, 28);
    }

    #[test]
    fn fragments_are_recognised() {
        assert_eq!(parse(&hdr(0x45, 40, 0x2000), 40).unwrap().fragment, Fragment::First);
        assert_eq!(parse(&hdr(0x45, 40, 0x2001), 40).unwrap().fragment, Fragment::Later);
        assert_eq!(parse(&hdr(0x45, 40, 0x0001), 40).unwrap().fragment, Fragment::Later, "the last one");
        assert!(parse(&hdr(0x45, 40, 0x0001), 40).unwrap().is_fragment());
    }

    #[test]
    fn malformed_headers_are_rejected() {
        assert_eq!(parse(&hdr(0x65, 40, 0), 40), Err(HeaderError::NotVersion4));
        assert_eq!(parse(&hdr(0x44, 40, 0), 40), Err(HeaderError::BadHeaderLength));
        assert_eq!(parse(&hdr(0x4f, 80, 0), 40), Err(HeaderError::BadHeaderLength));
        assert_eq!(parse(&hdr(0x45, 19, 0), 40), Err(HeaderError::BadTotalLength));
        assert_eq!(parse(&hdr(0x45, 41, 0), 40), Err(HeaderError::BadTotalLength));
    }
}
