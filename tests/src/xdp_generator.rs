//! A traffic generator that hands frames to a veth as a NIC's DMA would:
//! `BPF_PROG_RUN` in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, the
//! kernel's own XDP traffic generator) runs a small XDP program over pages
//! of its own and transmits each frame out of an interface (`XDP_TX`), so
//! the veth's peer receives XDP frames it needs neither to copy nor to
//! build a socket buffer for. A packet socket's frames, by contrast, reach
//! the peer as socket buffers that its XDP path copies into a page first:
//! work a NIC never does, counted against whatever the peer runs.
//!
//! The pages are recycled once a frame is done with, keeping whatever a
//! program downstream wrote in them (a proxy's address translation), so
//! the program writes the whole frame each time, from its template, with
//! a source port drawn from `flows` (each a flow of its own).

use std::os::fd::{AsRawFd as _, OwnedFd};

use crate::xdp_pass::{bpf, load_xdp};

const BPF_PROG_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u64 = 1 << 1;
const XDP_DROP: i32 = 1;
const XDP_TX: i32 = 3;
const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
/// Where a UDP/IPv4 frame's source port is (Ethernet, a 20-byte IPv4 header).
const SOURCE_PORT_AT: usize = 34;

/// One eBPF instruction.
fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(op) | (u64::from(dst | (src << 4)) << 8) | (u64::from(off as u16) << 16) | (u64::from(imm as u32) << 32)
}

/// The program: writes `frame` (its length a multiple of 4) over the page,
/// the source port `first_port` plus a random one of `flows` (a power of
/// two), and transmits it. A UDP checksum of 0 (none) stays right.
fn program(frame: &[u8], first_port: u16, flows: u16) -> Vec<u64> {
    assert!(frame.len().is_multiple_of(4) && flows.is_power_of_two(), "a frame of whole words, flows a power of two");
    let mut p = vec![
        insn(0x61, 6, 1, 0, 0),                  // r6 = ctx->data
        insn(0x61, 7, 1, 4, 0),                  // r7 = ctx->data_end
        insn(0xbf, 2, 6, 0, 0),                  // r2 = r6
        insn(0x07, 2, 0, 0, frame.len() as i32), // r2 += len
    ];
    let stores: Vec<u64> = frame
        .chunks(4)
        .enumerate()
        .map(|(i, w)| insn(0x62, 6, 0, (4 * i) as i16, i32::from_le_bytes(w.try_into().unwrap()))) // *(u32 *)(r6 + 4i) = w
        .collect();
    let rest = [
        insn(0x85, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32), // r0 = random
        insn(0x57, 0, 0, 0, i32::from(flows) - 1),     // r0 &= flows - 1
        insn(0x07, 0, 0, 0, i32::from(first_port)),    // r0 += first_port
        insn(0xdc, 0, 0, 0, 16),                       // r0 = htobe16(r0)
        insn(0x6b, 6, 0, SOURCE_PORT_AT as i16, 0),    // *(u16 *)(r6 + 34) = r0
        insn(0xb7, 0, 0, 0, XDP_TX),                   // r0 = XDP_TX
        insn(0x95, 0, 0, 0, 0),                        // exit
    ];
    // if r2 > r7 (the frame is shorter): to the drop below.
    p.push(insn(0x2d, 2, 7, (stores.len() + rest.len()) as i16, 0));
    p.extend(stores);
    p.extend(rest);
    p.extend([insn(0xb7, 0, 0, 0, XDP_DROP), insn(0x95, 0, 0, 0, 0)]);
    p
}

/// A loaded generator for one frame template.
pub struct Generator {
    prog: OwnedFd,
    frame: Vec<u8>,
}

impl Generator {
    /// Loads the program for `frame` (UDP over IPv4, no options), its
    /// source port varied over `first_port .. first_port + flows`.
    pub fn new(frame: &[u8], first_port: u16, flows: u16) -> anyhow::Result<Self> {
        let prog =
            load_xdp(&program(frame, first_port, flows)).map_err(|e| anyhow::anyhow!("loading the generator: {e}"))?;
        Ok(Self { prog, frame: frame.to_vec() })
    }

    /// Transmits `count` frames out of interface `ifindex` of the calling
    /// thread's network namespace, on the calling CPU.
    pub fn send(&self, ifindex: u32, count: u32) -> anyhow::Result<()> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: [u32; 6] = [0, self.frame.len() as u32, 0, ifindex, 0, 0];
        let mut run = [0u64; 16];
        run[0] = self.prog.as_raw_fd() as u64;
        run[1] = self.frame.len() as u64;
        run[2] = self.frame.as_ptr() as u64;
        run[4] = u64::from(count);
        run[5] = std::mem::size_of_val(&ctx) as u64;
        run[6] = ctx.as_ptr() as u64;
        run[8] = BPF_F_TEST_XDP_LIVE_FRAMES;
        bpf(BPF_PROG_RUN, &mut run).map_err(|e| anyhow::anyhow!("live XDP frames out of interface {ifindex}: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_checks_the_length_then_writes_each_word_and_the_port() {
        let frame: Vec<u8> = (0..60).collect();
        let p = program(&frame, 40_000, 64);
        // Four to set up, the check, 15 stores, 7 to finish, 2 to drop.
        assert_eq!(p.len(), 4 + 1 + 15 + 7 + 2);
        // The check jumps over the stores and the finish, to the drop.
        assert_eq!((p[4] >> 16) as u16, 22);
        assert_eq!(p[5], insn(0x62, 6, 0, 0, i32::from_le_bytes([0, 1, 2, 3])));
        assert_eq!(p[19] >> 32, u64::from(u32::from_le_bytes([56, 57, 58, 59])));
        assert_eq!(p[27], insn(0xb7, 0, 0, 0, XDP_DROP));
    }
}
