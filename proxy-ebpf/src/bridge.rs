//! A request translated to a backend on the client's own bridge is
//! switched there, as the pods' own traffic is, instead of being routed by
//! the node: its frame is addressed to the backend's MAC address, as the
//! node's neighbour table knows it, and the bridge forwards it port to
//! port. Routing it would cost the node a trip up its IP stack and back
//! down through the bridge, which direct pod-to-pod traffic never pays.
//!
//! Only a backend in the pod subnet on the bridge (the bridge's own
//! address and prefix) is looked for there: one on another node costs no
//! route lookup.
//!
//! The agent lists a pod interface in `BRIDGE_PORTS` only when the bridge
//! it is a port of hands the IPv4 it switches to iptables (br_netfilter's
//! `bridge-nf-call-iptables`, as kube-proxy needs anyway): switched or
//! routed, the node's FORWARD chain and conntrack see the flow under its
//! real addresses, so NetworkPolicy rules there apply. Anywhere else the
//! request is routed, as before.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams},
    helpers::bpf_fib_lookup,
    programs::TcContext,
};
use proxy_common::counters::DropReason;

use crate::{maps::BRIDGE_PORTS, parse::Packet, skb};

const AF_INET: u8 = 2;

/// Addresses the frame of `pkt`, which came in on `ifindex` and is now
/// translated to `backend`, to the backend, if the backend is on the
/// bridge `ifindex` is a port of (and that bridge may switch it: see the
/// module's docs). Otherwise the frame is left for the node to route.
#[inline(always)]
pub(crate) fn switch_to_backend(
    ctx: &TcContext,
    ifindex: u32,
    pkt: &Packet,
    backend: [u8; 4],
) -> Result<(), DropReason> {
    let Some(port) = (unsafe { BRIDGE_PORTS.get(&ifindex) }) else { return Ok(()) };
    // A backend on another node: no route lookup spent on it.
    if !port.holds(backend) {
        return Ok(());
    }
    let bridge = port.bridge;
    let mut params = core::mem::MaybeUninit::<FibParams>::uninit();
    // SAFETY: integers and arrays of them.
    let p = unsafe { crate::zero::zero(&mut params) };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    // The route as the bridge, the client's gateway, would find it; the
    // packet's own length is checked against the route's MTU.
    p.ifindex = bridge;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(pkt.src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(backend);
    let size = core::mem::size_of::<FibParams>() as i32;
    let rc = unsafe { bpf_fib_lookup(ctx.skb.skb.cast(), &raw mut *p, size, 0) };
    // Another interface, a gateway, or no neighbour entry yet (the routed
    // packet makes the node resolve it): routed.
    let on_link = unsafe { p.__bindgen_anon_4.ipv4_dst } == u32::from_ne_bytes(backend);
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || p.ifindex != bridge || !on_link {
        return Ok(());
    }
    skb::store(ctx, 0, &p.dmac)
}
