//! The kernel's routing and neighbour tables, asked from XDP: where a
//! packet to an address leaves, with which MAC addresses, and (for source
//! NAT) the node's address toward it, as the kernel would choose it for a
//! packet of its own (`BPF_FIB_LOOKUP_SRC`, Linux 6.7; older kernels refuse
//! the flag and the TC path serves instead).

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup as FibParams},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};

use proxy_common::ipv6::In6;

/// The next hop a packet goes to: out of `ifindex`, from `smac` to `dmac`.
#[derive(Default)]
pub(crate) struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Route lookups for one packet: a packet of `proto` and `total_len` bytes
/// that came in on `ingress`. One parameter block, reused by every lookup
/// (64 bytes of the 512-byte stack).
pub(crate) struct Fib<'a> {
    ctx: &'a XdpContext,
    ingress: u32,
    proto: u8,
    total_len: usize,
    /// Zeroed in [`Fib::new`].
    p: MaybeUninit<FibParams>,
}

impl<'a> Fib<'a> {
    #[inline(always)]
    pub(crate) fn new(ctx: &'a XdpContext, ingress: u32, proto: u8, total_len: usize) -> Self {
        let mut fib = Self { ctx, ingress, proto, total_len, p: MaybeUninit::uninit() };
        // SAFETY: integers and arrays of them.
        unsafe { crate::zero::zero(&mut fib.p) };
        fib
    }

    #[inline(always)]
    fn params(&mut self) -> &mut FibParams {
        // SAFETY: zeroed in `new`.
        unsafe { self.p.assume_init_mut() }
    }

    /// A route to `dst`: the hop, and the source address the node would
    /// use (`src` as given when it is known).
    #[inline(always)]
    pub(crate) fn route(&mut self, src: Option<[u8; 4]>, dst: [u8; 4]) -> Option<(Hop, [u8; 4])> {
        self.reset(AF_INET);
        self.params().__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src.unwrap_or([0; 4]));
        self.params().__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
        let hop = self.lookup(src.is_none())?;
        Some((hop, unsafe { self.params().__bindgen_anon_3.ipv4_src }.to_ne_bytes()))
    }

    /// [`Fib::route`] for IPv6.
    #[inline(always)]
    pub(crate) fn route6(&mut self, src: Option<In6>, dst: In6) -> Option<(Hop, In6)> {
        self.reset(AF_INET6);
        self.params().__bindgen_anon_3.ipv6_src = src.unwrap_or_default().words();
        self.params().__bindgen_anon_4.ipv6_dst = dst.words();
        let hop = self.lookup(src.is_none())?;
        Some((hop, In6::from_words(unsafe { self.params().__bindgen_anon_3.ipv6_src })))
    }

    /// The fields a lookup overwrites (the egress device, the MTU), set again.
    #[inline(always)]
    fn reset(&mut self, family: u8) {
        self.params().family = family;
        self.params().l4_protocol = self.proto;
        self.params().__bindgen_anon_1.tot_len = self.total_len as u16;
        self.params().ifindex = self.ingress;
    }

    /// Asks the kernel; with `find_source`, it also fills in the source address.
    #[inline(always)]
    fn lookup(&mut self, find_source: bool) -> Option<Hop> {
        let flags = if find_source { BPF_FIB_LOOKUP_SRC } else { 0 };
        let size = core::mem::size_of::<FibParams>() as i32;
        let rc = unsafe { bpf_fib_lookup(self.ctx.ctx.cast(), self.params(), size, flags) };
        if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
            return None;
        }
        Some(Hop { ifindex: self.params().ifindex, smac: self.params().smac, dmac: self.params().dmac })
    }
}
