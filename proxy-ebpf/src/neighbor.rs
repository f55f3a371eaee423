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
use proxy_common::maps::Neighbor;

use crate::maps::NEIGHBORS;

/// Records that `src` sends from this interface with this MAC.
#[inline(always)]
pub fn learn(ctx: &TcContext, src: [u8; 4]) {
    let Ok(mac) = ctx.load::<[u8; 6]>(6) else { return };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some(known) = NEIGHBORS.get_ptr(src) {
        let known = unsafe { core::ptr::read(known) };
        if known.ifindex == ifindex && known.mac == mac {
            return;
        }
    }
    let _ = NEIGHBORS.insert(src, Neighbor { ifindex, mac, _pad: [0; 2] }, 0);
}

/// Readdresses the frame to `dst`'s MAC (from `src_mac`, when given) and
/// returns the interface to send it out of, if `dst` is a known pod.
#[inline(always)]
pub fn readdress(ctx: &TcContext, dst: [u8; 4], src_mac: Option<[u8; 6]>) -> Result<Option<u32>, ()> {
    let Some(n) = NEIGHBORS.get_ptr(dst) else { return Ok(None) };
    let n = unsafe { core::ptr::read(n) };
    ctx.store(0, &n.mac, 0).map_err(|_| ())?;
    if let Some(mac) = src_mac {
        ctx.store(6, &mac, 0).map_err(|_| ())?;
    }
    Ok(Some(n.ifindex))
}
