//! Internet checksum arithmetic (RFC 1071, RFC 1624).
//!
//! The eBPF programs update checksums with the kernel's incremental helpers;
//! these functions compute checksums of packets they build from scratch
//! (refusals) and let tests verify a translation by recomputation.

/// Adds `bytes` as big-endian 16-bit words to `sum` (odd tail padded with 0).
#[inline(always)]
pub fn add_bytes(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    if i < bytes.len() {
        sum += (bytes[i] as u32) << 8;
    }
    sum
}

/// Adds `words`, each four bytes in network order read in the machine's
/// order, to `sum` as 16-bit words in the machine's order; [`fold`] and
/// [`finish`] then give a value whose machine-order bytes are the checksum
/// in network order (RFC 1071's byte-order independence). Words keep the
/// datapath's packet building off byte arrays (see `ipv6::In6`).
#[inline(always)]
pub fn add_words(mut sum: u32, words: &[u32]) -> u32 {
    for w in words {
        sum += (*w & 0xffff) + (*w >> 16);
    }
    sum
}

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field value for data whose words add up to `sum`.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// Sum of the IPv4 pseudo header used by TCP and UDP checksums.
#[inline(always)]
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    let sum = add_bytes(0, &src);
    let sum = add_bytes(sum, &dst);
    sum + proto as u32 + l4_len as u32
}

/// Sum of the IPv6 pseudo header used by TCP, UDP and ICMPv6 checksums (RFC 8200 §8.1).
#[inline(always)]
pub fn pseudo_header_sum6(src: [u8; 16], dst: [u8; 16], next_header: u8, l4_len: u16) -> u32 {
    let sum = add_bytes(0, &src);
    let sum = add_bytes(sum, &dst);
    sum + next_header as u32 + l4_len as u32
}

/// Checksum of `bytes` (e.g. an IPv4 header with its checksum field zeroed).
#[inline(always)]
pub fn checksum(bytes: &[u8]) -> u16 {
    finish(add_bytes(0, bytes))
}

/// RFC 1624 eqn. 3: the new checksum after a 16-bit word changed from `old` to `new`.
#[inline(always)]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + new as u32;
    !fold(sum)
}

/// [`update16`] for a 32-bit field such as an IPv4 address.
#[inline(always)]
pub fn update32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let c = update16(check, u16::from_be_bytes([old[0], old[1]]), u16::from_be_bytes([new[0], new[1]]));
    update16(c, u16::from_be_bytes([old[2], old[3]]), u16::from_be_bytes([new[2], new[3]]))
}

/// [`update16`] for a 128-bit field such as an IPv6 address, given as
/// words each in network order (see `ipv6::In6::words`).
#[inline(always)]
pub fn update128(check: u16, old: [u32; 4], new: [u32; 4]) -> u16 {
    let mut c = check;
    let mut i = 0;
    while i < 4 {
        let (o, n) = (old[i].to_ne_bytes(), new[i].to_ne_bytes());
        c = update16(c, u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([n[0], n[1]]));
        c = update16(c, u16::from_be_bytes([o[2], o[3]]), u16::from_be_bytes([n[2], n[3]]));
        i += 1;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    // The IPv4 header example from RFC 1071 / Wikipedia: checksum 0xb861.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];

    #[test]
    fn known_header_checksum() {
        assert_eq!(checksum(&HDR), 0xb861);
        let mut h = HDR;
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&h), 0, "a header with its checksum sums to zero");
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(add_bytes(0, &[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        let mut h = HDR;
        let check = checksum(&h);
        let new_dst = [10, 244, 0, 12];
        let old_dst = [h[16], h[17], h[18], h[19]];
        h[16..20].copy_from_slice(&new_dst);
        assert_eq!(update32(check, old_dst, new_dst), checksum(&h));
    }

    #[test]
    fn an_ipv6_address_update_matches_recomputation() {
        let mut data = [0u8; 40];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(29).wrapping_add(3);
        }
        let check = checksum(&data);
        let words = |b: &[u8]| -> [u32; 4] {
            core::array::from_fn(|i| u32::from_ne_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
        };
        let old = words(&data[8..24]);
        let new_bytes = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20];
        data[8..24].copy_from_slice(&new_bytes);
        assert_eq!(update128(check, old, words(&new_bytes)), checksum(&data));
    }

    #[test]
    fn incremental_update_of_every_word_value() {
        // Exhaustive over one word: catches the -0/+0 corner cases of RFC 1624.
        let base = [0x12u8, 0x34, 0xff, 0xff, 0x00, 0x01];
        let check = checksum(&base);
        for v in 0..=u16::MAX {
            let mut b = base;
            b[2..4].copy_from_slice(&v.to_be_bytes());
            assert_eq!(update16(check, 0xffff, v), checksum(&b), "word {v:#x}");
        }
    }
}
