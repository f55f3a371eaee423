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
//! a source port drawn from `flows` (each a flow of its own). It paces
//! itself: a generator offering many times what the receiver takes has
//! its overflow dropped at the receiver's queue and handed back to the
//! page pool, whose lock the receiver's own returns then wait for.

use std::os::fd::{AsRawFd as _, OwnedFd};

use crate::xdp_pass::{bpf, bpf_fd, load_xdp};

const BPF_PROG_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u64 = 1 << 1;
const XDP_DROP: i32 = 1;
const XDP_TX: i32 = 3;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_KTIME_GET_NS: i32 = 5;
const BPF_FUNC_GET_PRANDOM_U32: i32 = 7;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_ARRAY: u64 = 2;
/// An instruction loading a map's address, given its descriptor.
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// Where a UDP/IPv4 frame's source port is (Ethernet, a 20-byte IPv4 header).
const SOURCE_PORT_AT: usize = 34;

/// One eBPF instruction.
fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(op) | (u64::from(dst | (src << 4)) << 8) | (u64::from(off as u16) << 16) | (u64::from(imm as u32) << 32)
}

/// A jump's offset before it is resolved to the drop at the program's end.
const TO_DROP: i16 = i16::MIN;

/// The program: waits until the next frame is due (`gap_ns` after the last,
/// kept in the array map `pacing`, a wait of at most a thousand clock
/// reads), writes `frame` (its length a multiple of 4) over the page, the
/// source port `first_port` plus a random one of `flows` (a power of two),
/// and transmits it. A UDP checksum of 0 (none) stays right.
fn program(frame: &[u8], first_port: u16, flows: u16, pacing: i32, gap_ns: i32) -> Vec<u64> {
    assert!(frame.len().is_multiple_of(4) && flows.is_power_of_two(), "a frame of whole words, flows a power of two");
    let mut p = vec![
        insn(0x61, 6, 1, 0, 0),                        // r6 = ctx->data
        insn(0x61, 7, 1, 4, 0),                        // r7 = ctx->data_end
        insn(0xbf, 2, 6, 0, 0),                        // r2 = r6
        insn(0x07, 2, 0, 0, frame.len() as i32),       // r2 += len
        insn(0x2d, 2, 7, TO_DROP, 0),                  // if r2 > r7 (the frame is shorter) goto drop
        insn(0x62, 10, 0, -4, 0),                      // *(u32 *)(r10 - 4) = 0
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, pacing),   // r1 = the pacing map
        0,                                             //   (the 64-bit load's second half)
        insn(0xbf, 2, 10, 0, 0),                       // r2 = r10
        insn(0x07, 2, 0, 0, -4),                       // r2 -= 4
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM), // r0 = &next
        insn(0x15, 0, 0, TO_DROP, 0),                  // if r0 == NULL goto drop
        insn(0xbf, 8, 0, 0, 0),                        // r8 = &next
        insn(0xb7, 9, 0, 0, 0),                        // r9 = 0
        insn(0x85, 0, 0, 0, BPF_FUNC_KTIME_GET_NS),    // wait: r0 = now
        insn(0x79, 1, 8, 0, 0),                        // r1 = next
        insn(0x3d, 0, 1, 3, 0),                        // if now >= next goto due
        insn(0x07, 9, 0, 0, 1),                        // r9 += 1
        insn(0xa5, 9, 0, -5, 1000),                    // if r9 < 1000 goto wait
        insn(0xbf, 0, 1, 0, 0),                        // r0 = next (waited long enough)
        insn(0x3d, 1, 0, 1, 0),                        // due: if next >= now, skip one
        insn(0xbf, 1, 0, 0, 0),                        // r1 = now (behind: no burst to catch up)
        insn(0x07, 1, 0, 0, gap_ns),                   // r1 += gap
        insn(0x7b, 8, 1, 0, 0),                        // next = r1
    ];
    // *(u32 *)(r6 + 4i) = word i
    let words = frame.chunks(4).map(|w| i32::from_le_bytes(w.try_into().unwrap()));
    p.extend(words.enumerate().map(|(i, w)| insn(0x62, 6, 0, (4 * i) as i16, w)));
    p.extend([
        insn(0x85, 0, 0, 0, BPF_FUNC_GET_PRANDOM_U32), // r0 = random
        insn(0x57, 0, 0, 0, i32::from(flows) - 1),     // r0 &= flows - 1
        insn(0x07, 0, 0, 0, i32::from(first_port)),    // r0 += first_port
        insn(0xdc, 0, 0, 0, 16),                       // r0 = htobe16(r0)
        insn(0x6b, 6, 0, SOURCE_PORT_AT as i16, 0),    // *(u16 *)(r6 + 34) = r0
        insn(0xb7, 0, 0, 0, XDP_TX),                   // r0 = XDP_TX
        insn(0x95, 0, 0, 0, 0),                        // exit
        insn(0xb7, 0, 0, 0, XDP_DROP),                 // drop: r0 = XDP_DROP
        insn(0x95, 0, 0, 0, 0),                        // exit
    ]);
    let drop = p.len() - 2;
    for (i, x) in p.iter_mut().enumerate() {
        let is_jump = *x & 0x07 == 0x05;
        if is_jump && (*x >> 16) as u16 == TO_DROP as u16 {
            *x = (*x & !(0xffff << 16)) | (u64::from((drop - i - 1) as u16) << 16);
        }
    }
    p
}

/// A loaded generator for one frame template.
pub struct Generator {
    prog: OwnedFd,
    /// When the next frame is due (one `u64`, in CLOCK_MONOTONIC ns).
    _pacing: OwnedFd,
    frame: Vec<u8>,
}

impl Generator {
    /// Loads the program for `frame` (UDP over IPv4, no options), its
    /// source port varied over `first_port .. first_port + flows`, sent at
    /// `rate` frames per second at most.
    pub fn new(frame: &[u8], first_port: u16, flows: u16, rate: u32) -> anyhow::Result<Self> {
        let mut create = [0u64; 16];
        // map_type, key_size (u32); value_size (u64), max_entries.
        create[0] = BPF_MAP_TYPE_ARRAY | (4 << 32);
        create[1] = 8 | (1 << 32);
        let pacing = bpf_fd(BPF_MAP_CREATE, &mut create).map_err(|e| anyhow::anyhow!("the pacing map: {e}"))?;
        let gap_ns = (1_000_000_000 / u64::from(rate.max(1))) as i32;
        let prog = load_xdp(&program(frame, first_port, flows, pacing.as_raw_fd(), gap_ns))
            .map_err(|e| anyhow::anyhow!("loading the generator: {e}"))?;
        Ok(Self { prog, _pacing: pacing, frame: frame.to_vec() })
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
    fn every_jump_to_the_drop_lands_on_it_and_each_word_is_stored() {
        let frame: Vec<u8> = (0..60).collect();
        let p = program(&frame, 40_000, 64, 7, 500);
        let drop = p.len() - 2;
        assert_eq!(p[drop], insn(0xb7, 0, 0, 0, XDP_DROP));
        // Conditional jumps (not calls or exits) whose target is the drop.
        let conditional = |x: u64| x & 0x07 == 0x05 && x & 0xf0 != 0x80 && x & 0xf0 != 0x90;
        let to_drop: Vec<usize> = (0..p.len())
            .filter(|&i| conditional(p[i]) && i as i64 + 1 + i64::from((p[i] >> 16) as u16 as i16) == drop as i64)
            .collect();
        // The length check and the map lookup's; none left unresolved.
        assert_eq!(to_drop, [4, 11]);
        assert!(p.iter().all(|&x| !conditional(x) || (x >> 16) as u16 != TO_DROP as u16));
        let stores: Vec<u64> = p.iter().copied().filter(|x| x & 0xff == 0x62 && (x >> 8) & 0x0f == 6).collect();
        assert_eq!(stores.len(), 15);
        assert_eq!(stores[14] >> 32, u64::from(u32::from_le_bytes([56, 57, 58, 59])));
        // The map's descriptor in the 64-bit load.
        assert_eq!(p[6] >> 32, 7);
    }
}
