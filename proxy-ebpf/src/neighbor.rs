//! Where pods are: learned from what they send, used to hand translated
//! packets straight to the destination pod's interface.
//!
//! Without this, a translated packet goes through the host's routing and
//! conntrack, which then sees one direction of the flow under the backend's
//! address and the other under the VIP's, and marks it invalid; a node
//! with an "INVALID -j DROP" rule (kube-proxy's own iptables mode has one)
//! would drop it. Redirecting keeps translated flows out of netfilter and
//! skips the bridge and routing on the way.

use aya_ebpf::programs::TcContext;
use proxy_common::{counters::DropReason, maps::Neighbor};

use crate::{maps::NEIGHBORS, skb};

/// Records that `src` sends from this interface with this MAC.
///
/// Best effort: no verdict depends on it. Without an entry, packets to `src`
/// go through the host's routing instead of straight to its interface.
#[inline(always)]
pub(crate) fn learn(ctx: &TcContext, src: [u8; 4]) {
    // Cannot fail once the packet parsed (it holds an IPv4 header after the
    // MAC header); if it did, there would be nothing to learn.
    let Ok(mac) = ctx.load::<[u8; 6]>(6) else { return };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some(known) = NEIGHBORS.get_ptr(src) {
        let known = unsafe { core::ptr::read(known) };
        if known.ifindex == ifindex && known.mac == mac {
            return;
        }
    }
    // An LRU map makes room for the entry; should the insert still fail,
    // the next packet from `src` tries again.
    let _ = NEIGHBORS.insert(src, Neighbor { ifindex, mac, _pad: [0; 2] }, 0);
}

/// Readdresses the frame to `dst`'s MAC (from `src_mac`, when given) and
/// returns the interface to send it out of, if `dst` is a known pod.
#[inline(always)]
pub(crate) fn readdress(ctx: &TcContext, dst: [u8; 4], src_mac: Option<[u8; 6]>) -> Result<Option<u32>, DropReason> {
    let Some(n) = NEIGHBORS.get_ptr(dst) else { return Ok(None) };
    let n = unsafe { core::ptr::read(n) };
    skb::store(ctx, 0, &n.mac)?;
    if let Some(mac) = src_mac {
        skb::store(ctx, 6, &mac)?;
    }
    Ok(Some(n.ifindex))
}
