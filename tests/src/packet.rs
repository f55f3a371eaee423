//! Hand-built Ethernet/IPv4/TCP/UDP frames with correct checksums, and a
//! view to read and verify what the datapath made of them.

use std::net::Ipv4Addr;

use proxy_common::checksum::{add_bytes, checksum, fold, pseudo_header_sum};

pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&POD_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 header fields a test may vary.
#[derive(Clone, Debug)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// IP options, padded by the caller to a multiple of 4 bytes.
    pub options: Vec<u8>,
    /// Flags and fragment offset field.
    pub frag: u16,
}

impl Ip {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self { src, dst, proto, options: vec![], frag: 0x4000 }
    }

    /// The IP packet carrying `l4` (whose checksum the caller computed).
    pub fn packet(&self, l4: &[u8]) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0);
        let hlen = 20 + self.options.len();
        let total = (hlen + l4.len()) as u16;
        let mut h = vec![0x40 | (hlen / 4) as u8, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.extend_from_slice(&[64, self.proto, 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let c = checksum(&h).to_be_bytes();
        h[10] = c[0];
        h[11] = c[1];
        h.extend_from_slice(l4);
        h
    }
}

fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    !fold(add_bytes(pseudo_header_sum(src.octets(), dst.octets(), proto, l4.len() as u16), l4))
}

pub fn tcp_segment(ip: &Ip, sport: u16, dport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    let c = l4_checksum(ip.src, ip.dst, 6, &t).to_be_bytes();
    t[16] = c[0];
    t[17] = c[1];
    t
}

pub fn udp_datagram(ip: &Ip, sport: u16, dport: u16, payload: &[u8], with_checksum: bool) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    if with_checksum {
        let mut c = l4_checksum(ip.src, ip.dst, 17, &u);
        if c == 0 {
            c = 0xffff;
        }
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    u
}

/// A TCP frame from `src` to `dst`.
pub fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let ip = Ip::new(src.0, dst.0, 6);
    ethernet(0x0800, &ip.packet(&tcp_segment(&ip, src.1, dst.1, 1000, flags, payload)))
}

/// A UDP frame from `src` to `dst`, with a checksum.
pub fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let ip = Ip::new(src.0, dst.0, 17);
    ethernet(0x0800, &ip.packet(&udp_datagram(&ip, src.1, dst.1, payload, true)))
}

/// Read access to an Ethernet + IPv4 frame.
pub struct View<'a>(pub &'a [u8]);

impl View<'_> {
    fn ip(&self) -> &[u8] {
        &self.0[14..]
    }
    pub fn header_len(&self) -> usize {
        ((self.ip()[0] & 0x0f) as usize) * 4
    }
    pub fn total_len(&self) -> usize {
        u16::from_be_bytes([self.ip()[2], self.ip()[3]]) as usize
    }
    pub fn proto(&self) -> u8 {
        self.ip()[9]
    }
    pub fn src(&self) -> Ipv4Addr {
        let i = self.ip();
        Ipv4Addr::new(i[12], i[13], i[14], i[15])
    }
    pub fn dst(&self) -> Ipv4Addr {
        let i = self.ip();
        Ipv4Addr::new(i[16], i[17], i[18], i[19])
    }
    pub fn l4(&self) -> &[u8] {
        &self.ip()[self.header_len()..self.total_len()]
    }
    pub fn sport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[0], self.l4()[1]])
    }
    pub fn dport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[2], self.l4()[3]])
    }
    pub fn ip_checksum_ok(&self) -> bool {
        checksum(&self.ip()[..self.header_len()]) == 0
    }
    /// Verifies the L4 checksum by recomputation (a zero UDP checksum means none).
    pub fn l4_checksum_ok(&self) -> bool {
        let l4 = self.l4();
        match self.proto() {
            17 if l4[6] == 0 && l4[7] == 0 => true,
            6 | 17 => {
                fold(add_bytes(
                    pseudo_header_sum(self.src().octets(), self.dst().octets(), self.proto(), l4.len() as u16),
                    l4,
                )) == 0xffff
            }
            1 => checksum(l4) == 0,
            _ => false,
        }
    }
}
