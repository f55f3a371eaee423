//! The kernel's routing and neighbour tables, asked from XDP and TC: where
//! a packet to an address leaves, with which MAC addresses, and (for source
//! NAT) the node's address toward it, as the kernel would choose it for a
//! packet of its own (`BPF_FIB_LOOKUP_SRC`, Linux 6.7; on older kernels the
//! lookup fails and such flows get no answer).

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC,
        bpf_fib_lookup as FibParams,
    },
    helpers::bpf_fib_lookup,
    macros::map,
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
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

/// The parameter block of this CPU's route lookups: 64 bytes the 512-byte
/// stack of the steps around a lookup cannot spare. Not pinned: it holds
/// nothing between packets, and programs do not nest on a CPU.
#[map]
static FIB_PARAMS: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);

/// Route lookups for one packet: a packet of `proto` and `total_len` bytes
/// that came in on `ingress`. One parameter block, reused by every lookup.
pub(crate) struct Fib {
    /// The program's context (an XDP frame's or a socket buffer's).
    ctx: *mut c_void,
    ingress: u32,
    proto: u8,
    total_len: usize,
    /// Whether the neighbour is left out of the lookup: the kernel resolves
    /// it for a packet sent by `skb::redirect_neigh`.
    skip_neighbour: bool,
    /// [`FIB_PARAMS`]' slot, zeroed in [`Fib::new`]; null if the map
    /// gave none (it always does), and then no route is found.
    p: *mut FibParams,
    /// The MTU of the route last found too small for the packet, 0 if none was.
    too_big_for: u16,
}

impl Fib {
    #[inline(always)]
    pub(crate) fn new(ctx: &XdpContext, ingress: u32, proto: u8, total_len: usize) -> Self {
        Self::of(ctx.as_ptr(), ingress, proto, total_len, false)
    }

    /// Lookups for a socket buffer: its size against the route's MTU is
    /// the kernel's to check (a length of 0 asks for that, and it knows
    /// how a segmentation-offloaded packet will be cut), and a next hop
    /// whose neighbour is not known yet will do.
    #[inline(always)]
    pub(crate) fn for_skb(ctx: &TcContext, ingress: u32, proto: u8) -> Self {
        Self::of(ctx.as_ptr(), ingress, proto, 0, true)
    }

    /// The MTU of the route the last lookup found, if the packet was too
    /// big for it (and so no route was given).
    #[inline(always)]
    pub(crate) fn too_big_for(&self) -> Option<u16> {
        (self.too_big_for != 0).then_some(self.too_big_for)
    }

    #[inline(always)]
    fn of(ctx: *mut c_void, ingress: u32, proto: u8, total_len: usize, skip_neighbour: bool) -> Self {
        let p = FIB_PARAMS.get_ptr_mut(0).unwrap_or(core::ptr::null_mut());
        if !p.is_null() {
            // SAFETY: integers and arrays of them, in this CPU's slot.
            unsafe { crate::zero::zero(&mut *p.cast::<MaybeUninit<FibParams>>()) };
        }
        Self { ctx, ingress, proto, total_len, skip_neighbour, p, too_big_for: 0 }
    }

    #[inline(always)]
    fn params(&mut self) -> Option<&mut FibParams> {
        // SAFETY: zeroed in `of`, and this CPU's alone.
        unsafe { self.p.as_mut() }
    }

    /// A route to `dst`: the hop, and the source address the node would
    /// use (`src` as given when it is known).
    #[inline(always)]
    pub(crate) fn route(&mut self, src: Option<[u8; 4]>, dst: [u8; 4]) -> Option<(Hop, [u8; 4])> {
        let p = self.reset(AF_INET)?;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src.unwrap_or([0; 4]));
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
        let hop = self.lookup(src.is_none())?;
        Some((hop, unsafe { self.params()?.__bindgen_anon_3.ipv4_src }.to_ne_bytes()))
    }

    /// [`Fib::route`] for IPv6.
    #[inline(always)]
    pub(crate) fn route6(&mut self, src: Option<In6>, dst: In6) -> Option<(Hop, In6)> {
        let p = self.reset(AF_INET6)?;
        p.__bindgen_anon_3.ipv6_src = src.unwrap_or_default().words();
        p.__bindgen_anon_4.ipv6_dst = dst.words();
        let hop = self.lookup(src.is_none())?;
        Some((hop, In6::from_words(unsafe { self.params()?.__bindgen_anon_3.ipv6_src })))
    }

    /// The fields a lookup overwrites (the egress device, the MTU), set
    /// again; the parameter block, for the rest.
    #[inline(always)]
    fn reset(&mut self, family: u8) -> Option<&mut FibParams> {
        let (proto, total_len, ingress) = (self.proto, self.total_len, self.ingress);
        let p = self.params()?;
        p.family = family;
        p.l4_protocol = proto;
        p.__bindgen_anon_1.tot_len = total_len as u16;
        p.ifindex = ingress;
        Some(p)
    }

    /// Asks the kernel; with `find_source`, it also fills in the source address.
    #[inline(always)]
    fn lookup(&mut self, find_source: bool) -> Option<Hop> {
        let flags = if find_source { BPF_FIB_LOOKUP_SRC } else { 0 }
            | if self.skip_neighbour { BPF_FIB_LOOKUP_SKIP_NEIGH } else { 0 };
        let size = core::mem::size_of::<FibParams>() as i32;
        let ctx = self.ctx;
        let p = self.params()?;
        let rc = unsafe { bpf_fib_lookup(ctx, p, size, flags) };
        if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
            if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
                self.too_big_for = unsafe { p.__bindgen_anon_1.mtu_result };
            }
            return None;
        }
        Some(Hop { ifindex: p.ifindex, smac: p.smac, dmac: p.dmac })
    }
}

/// [`Fib::route`] for either family's addresses.
pub(crate) trait Route: Sized {
    fn route(fib: &mut Fib, src: Option<Self>, dst: Self) -> Option<(Hop, Self)>;
}

impl Route for [u8; 4] {
    #[inline(always)]
    fn route(fib: &mut Fib, src: Option<Self>, dst: Self) -> Option<(Hop, Self)> {
        fib.route(src, dst)
    }
}

impl Route for In6 {
    #[inline(always)]
    fn route(fib: &mut Fib, src: Option<Self>, dst: Self) -> Option<(Hop, Self)> {
        fib.route6(src, dst)
    }
}
