//! The kernel's routing and neighbour tables, asked from XDP: where a
//! packet to an address leaves, with which MAC addresses, and (for source
//! NAT) the node's address toward it, as the kernel would choose it for a
//! packet of its own (`BPF_FIB_LOOKUP_SRC`, Linux 6.7; older kernels refuse
//! the flag and the TC path serves instead).

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup as FibParams},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};

use crate::frame::Hop;

const AF_INET: u8 = 2;

/// A route to `dst` for a packet of `proto` and `total_len` bytes that came
/// in on `ingress`: the hop, and the source address the node would use
/// (`src` as given when it is known).
#[inline(always)]
pub(crate) fn route(
    ctx: &XdpContext,
    ingress: u32,
    proto: u8,
    total_len: usize,
    src: Option<[u8; 4]>,
    dst: [u8; 4],
) -> Option<(Hop, [u8; 4])> {
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = total_len as u16;
    p.ifindex = ingress;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src.unwrap_or([0; 4]));
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    let flags = if src.is_none() { BPF_FIB_LOOKUP_SRC } else { 0 };
    let size = core::mem::size_of::<FibParams>() as i32;
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &raw mut p, size, flags) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    let src = unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
    Some((Hop { ifindex: p.ifindex, smac: p.smac, dmac: p.dmac }, src))
}
