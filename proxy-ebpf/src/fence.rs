//! `loadBalancerSourceRanges` on the socket path. The socket hooks choose a
//! backend before the kernel has chosen the socket's source address, so for
//! a frontend with source ranges they only mark the socket (`SOCK_FENCE`);
//! this program, on egress of the same cgroup, checks the source of every
//! packet the socket sends to that backend and drops those from outside the
//! ranges, as kube-proxy's firewall chain drops them. A socket without the
//! mark costs one lookup in its own storage, and a node without such a
//! frontend runs none of this: the agent attaches the program only once a
//! frontend asks for a fence.

use aya_ebpf::{
    bindings::__sk_buff, helpers::generated::bpf_sk_storage_get, macros::cgroup_skb, programs::SkBuffContext,
};
use proxy_common::{counters::DropReason, ipv4::ETH_P_IP, maps::SockFence};

use crate::{counters::count, family::Family, maps::SOCK_FENCE};

/// Keep the packet.
const PASS: i32 = 1;
/// Drop it and report congestion: a UDP send still returns success (the
/// kernel counts a send buffer error) and TCP retransmits until it gives
/// up, so the client sees a drop, as with kube-proxy, rather than an error.
const DROP_QUIETLY: i32 = 2;

/// The frontend id of a fence no source passes: the socket's frontend has
/// no endpoint for it (ids start at 1).
pub(crate) const DROP_ALL: u32 = 0;

#[cgroup_skb(egress)]
pub(crate) fn kpr_sock_egress(ctx: SkBuffContext) -> i32 {
    match outside_fence(&ctx) {
        Some(reason) => {
            count(reason.counter(), ());
            DROP_QUIETLY
        }
        None => PASS,
    }
}

/// Why the packet is dropped, if it goes to a backend its socket was given
/// for a frontend whose source ranges do not hold the packet's source, or
/// to a frontend with no endpoint for the socket ([`DROP_ALL`]).
#[inline(always)]
fn outside_fence(ctx: &SkBuffContext) -> Option<DropReason> {
    let skb: *mut __sk_buff = ctx.skb.skb;
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let map = core::ptr::from_ref(&SOCK_FENCE).cast_mut().cast();
    let fence = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) }.cast::<SockFence>();
    if fence.is_null() {
        return None;
    }
    let fence = unsafe { core::ptr::read(fence) };
    // An IPv4 packet (IPv4-mapped sockets send IPv4 too); the data starts at its header.
    if unsafe { (*skb).protocol } != u32::from(ETH_P_IP.to_be()) {
        return None;
    }
    let (Ok(version_ihl), Ok(proto), Ok(src), Ok(dst)) =
        (ctx.load::<u8>(0), ctx.load::<u8>(9), ctx.load::<[u8; 4]>(12), ctx.load::<[u8; 4]>(16))
    else {
        return None;
    };
    if dst != fence.addr || proto != fence.proto {
        return None;
    }
    let Ok(port) = ctx.load::<[u8; 2]>(usize::from(version_ihl & 0x0f) * 4 + 2) else { return None };
    if port != fence.port {
        return None;
    }
    if fence.frontend_id == DROP_ALL {
        return Some(DropReason::NoLocalBackend);
    }
    (!<[u8; 4]>::in_source_ranges(fence.frontend_id, src)).then_some(DropReason::SourceRange)
}
