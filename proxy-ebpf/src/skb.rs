//! Packet access through the kernel's skb helpers, each failure named by the
//! drop reason it causes. The helpers' errno is not kept: the datapath cannot
//! report it, and the reason is what an operator needs (as in Cilium).

use aya_ebpf::{
    bindings::{BPF_CSUM_LEVEL_RESET, TC_ACT_REDIRECT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_csum_level, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::counters::DropReason;

#[inline(always)]
pub(crate) fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, DropReason> {
    ctx.load(offset).or(Err(DropReason::LoadFailed))
}

#[inline(always)]
pub(crate) fn store<T>(ctx: &TcContext, offset: usize, v: &T) -> Result<(), DropReason> {
    ctx.store(offset, v, 0).or(Err(DropReason::StoreFailed))
}

#[inline(always)]
pub(crate) fn l3_csum_replace(ctx: &TcContext, offset: usize, from: u64, to: u64, size: u64) -> Result<(), DropReason> {
    ctx.l3_csum_replace(offset, from, to, size).or(Err(DropReason::ChecksumFailed))
}

#[inline(always)]
pub(crate) fn l4_csum_replace(
    ctx: &TcContext,
    offset: usize,
    from: u64,
    to: u64,
    flags: u64,
) -> Result<(), DropReason> {
    ctx.l4_csum_replace(offset, from, to, flags).or(Err(DropReason::ChecksumFailed))
}

/// Makes the receiver verify the checksums rather than trust offload state
/// left by the packet's earlier contents.
#[inline(always)]
pub(crate) fn reset_csum_level(ctx: &TcContext) -> Result<(), DropReason> {
    let ret = unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_RESET as u64) };
    if ret < 0 { Err(DropReason::ChecksumFailed) } else { Ok(()) }
}

/// Cuts or extends the packet to `len` bytes from the MAC header on.
#[inline(always)]
pub(crate) fn change_tail(ctx: &TcContext, len: usize) -> Result<(), DropReason> {
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if ret == 0 { Ok(()) } else { Err(DropReason::ResizeFailed) }
}

/// Opens `len` bytes of room after the MAC header.
#[inline(always)]
pub(crate) fn grow_after_mac(ctx: &TcContext, len: i32) -> Result<(), DropReason> {
    ctx.adjust_room(len, BPF_ADJ_ROOM_MAC, 0).or(Err(DropReason::ResizeFailed))
}

/// Sends the packet out of `ifindex` once the program returns the action
/// this gives. An unknown interface is found only after that, by the kernel,
/// which then drops the packet in its own accounting.
#[inline(always)]
pub(crate) fn redirect(ifindex: u32) -> Result<i32, DropReason> {
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action == TC_ACT_REDIRECT as i64 { Ok(action as i32) } else { Err(DropReason::RedirectFailed) }
}

/// Sends the packet out of `ifindex` toward its destination's next hop once
/// the program returns the action this gives, past the node's routing and
/// netfilter: the kernel looks the route up again and fills in the MAC
/// addresses from its neighbour table, resolving the neighbour first if
/// it must (as Cilium's `redirect_neigh`).
#[inline(always)]
pub(crate) fn redirect_neigh(ifindex: u32) -> Result<i32, DropReason> {
    let action = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if action == TC_ACT_REDIRECT as i64 { Ok(action as i32) } else { Err(DropReason::RedirectFailed) }
}

/// Swaps the frame's MAC addresses, so it goes back to the host it came from.
#[inline(always)]
pub(crate) fn swap_macs(ctx: &TcContext) -> Result<(), DropReason> {
    let eth: [u8; 12] = load(ctx, 0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&eth[6..]);
    swapped[6..].copy_from_slice(&eth[..6]);
    store(ctx, 0, &swapped)
}
