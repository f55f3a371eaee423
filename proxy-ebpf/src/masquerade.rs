//! Source NAT on the TC path, as the XDP program does it (see `nodeport`),
//! for what XDP leaves to TC or with XDP off: a request from outside under
//! `externalTrafficPolicy: Cluster` whose backend is reached through one of
//! the node's devices (on another node) leaves from a port of the node's
//! address toward it (`nat`'s tables, shared with XDP), and the backend's
//! replies go back to the client. The program sends both on itself
//! (`skb::redirect_neigh`), past the node's routing and netfilter: the
//! stack would take a packet with one of its own addresses as source for
//! a spoofed one, and no netfilter conntrack has to run on the node.
//!
//! A backend on this node (its route leaves by a pod interface) sees the
//! client's own address, as with Cilium: its replies leave through a
//! device, where `kpr_to_pod` translates them back.
//!
//! An ICMP error about a source-NATed request (a backend's port
//! unreachable, a router's fragmentation needed or packet too big) comes
//! back to the node's address and port, and goes on to the client showing
//! what it sent.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::TcContext};
use proxy_common::{
    conntrack::{CtEntry, FlowKey, is_syn},
    counters::{Counter, DropReason},
    ipv6::In6,
    maps::{Backend, NatAddress, PROTO_TCP, hook},
    reject::{IPPROTO_ICMP, IPPROTO_ICMPV6},
};

use crate::{
    conntrack,
    counters::{DeviceEvent, count, count_device},
    family::Family,
    fib::{Fib, Route},
    lookup::{self, Frontend, Start},
    nat,
    parse::{IcmpError, Packet},
    skb, translate,
};

/// What the TC path's source NAT needs of a family's packets.
pub(crate) trait Masquerade: Family + Route {
    /// The family's ICMP protocol number.
    const ICMP: u8;
    /// The packet's source becomes `to`.
    fn set_source(ctx: &TcContext, pkt: &Packet<Self>, to: &NatAddress<Self>) -> Result<(), DropReason>;
    /// The packet's destination becomes `to`.
    fn set_destination(ctx: &TcContext, pkt: &Packet<Self>, to: &NatAddress<Self>) -> Result<(), DropReason>;
    /// The packet's source becomes the frontend's.
    fn set_frontend(ctx: &TcContext, pkt: &Packet<Self>, frontend: &CtEntry<Self>) -> Result<(), DropReason>;
    /// One hop on: the TTL or hop limit goes down by one.
    fn hop(ctx: &TcContext) -> Result<(), DropReason>;
    /// This CPU's [`Scratch`] of the family.
    fn scratch() -> Option<*mut Scratch<Self>>;
    /// ICMP error `err`, about a request of `flow` the node source-NATed,
    /// becomes one about what its client sent.
    fn icmp_to_client(ctx: &TcContext, err: &IcmpError<Self>, flow: &Returning<Self>) -> Result<(), DropReason>;
}

impl Masquerade for [u8; 4] {
    const ICMP: u8 = IPPROTO_ICMP;

    #[inline(always)]
    fn set_source(ctx: &TcContext, pkt: &Packet, to: &NatAddress) -> Result<(), DropReason> {
        translate::source(ctx, pkt, to)
    }

    #[inline(always)]
    fn set_destination(ctx: &TcContext, pkt: &Packet, to: &NatAddress) -> Result<(), DropReason> {
        translate::destination(ctx, pkt, to)
    }

    #[inline(always)]
    fn set_frontend(ctx: &TcContext, pkt: &Packet, frontend: &CtEntry) -> Result<(), DropReason> {
        translate::reverse(ctx, pkt, frontend)
    }

    #[inline(always)]
    fn hop(ctx: &TcContext) -> Result<(), DropReason> {
        translate::hop(ctx)
    }

    #[inline(always)]
    fn scratch() -> Option<*mut Scratch<Self>> {
        SCRATCH.get_ptr_mut(0)
    }

    #[inline(always)]
    fn icmp_to_client(ctx: &TcContext, err: &IcmpError, flow: &Returning<Self>) -> Result<(), DropReason> {
        translate::icmp_to_masqueraded(ctx, err, &flow.client, &flow.frontend)
    }
}

impl Masquerade for In6 {
    const ICMP: u8 = IPPROTO_ICMPV6;

    #[inline(always)]
    fn set_source(ctx: &TcContext, pkt: &Packet<In6>, to: &NatAddress<In6>) -> Result<(), DropReason> {
        translate::source6(ctx, pkt, to)
    }

    #[inline(always)]
    fn set_destination(ctx: &TcContext, pkt: &Packet<In6>, to: &NatAddress<In6>) -> Result<(), DropReason> {
        translate::destination6(ctx, pkt, to)
    }

    #[inline(always)]
    fn set_frontend(ctx: &TcContext, pkt: &Packet<In6>, frontend: &CtEntry<In6>) -> Result<(), DropReason> {
        translate::reverse6(ctx, pkt, frontend)
    }

    #[inline(always)]
    fn hop(ctx: &TcContext) -> Result<(), DropReason> {
        translate::hop6(ctx)
    }

    #[inline(always)]
    fn scratch() -> Option<*mut Scratch<Self>> {
        SCRATCH6.get_ptr_mut(0)
    }

    #[inline(always)]
    fn icmp_to_client(ctx: &TcContext, err: &IcmpError<In6>, flow: &Returning<Self>) -> Result<(), DropReason> {
        translate::icmp6_to_masqueraded(ctx, err, &flow.client, &flow.frontend)
    }
}

/// What [`request`] made of a request.
#[repr(u8)]
pub(crate) enum Masqueraded {
    /// Source-NATed and sent on: its redirect is set up.
    Sent,
    /// Left for the node to route as it is: one from a pod (its replies
    /// pass its own interface), one not from outside under the Cluster
    /// policy, or one to a backend on this node.
    No,
    /// Too big for the route to its backend, of `mtu`: its sender is to be
    /// told (see `refuse::too_big`; from the caller, whose stack is shallower).
    TooBig { mtu: u16 },
}

/// What becomes of a request from outside, already translated to `backend`
/// of `frontend` (a flow `start`ed by this packet or tracked).
#[inline(always)]
pub(crate) fn request<A: Masquerade>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    backend: &Backend<A>,
    frontend: &Frontend,
    start: Start,
) -> Result<Masqueraded, DropReason> {
    if !frontend.masquerade() || lookup::is_pod_interface(crate::ifindex(ctx)) {
        return Ok(Masqueraded::No);
    }
    from_outside(ctx, pkt, backend, start == Start::New)
}

/// [`request`] from outside under the Cluster policy: source-NATed if the
/// backend is reached through a device. In steps, as [`reply`].
#[inline(never)]
fn from_outside<A: Masquerade>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    backend: &Backend<A>,
    new: bool,
) -> Result<Masqueraded, DropReason> {
    let Some(scratch) = A::scratch() else { return Ok(Masqueraded::No) };
    // SAFETY: this CPU's slot, and programs do not nest on a CPU.
    let out = unsafe { &mut (*scratch).out };
    match leaves_by_device(ctx, pkt, backend, out)? {
        Leaves::ByPod => return Ok(Masqueraded::No),
        Leaves::TooBig { mtu } => return Ok(Masqueraded::TooBig { mtu }),
        Leaves::ByDevice => {}
    }
    // A new flow gets a port of its own: the one an earlier flow from the
    // same client port had was for that flow's backend.
    if new || !has_port(pkt, out) {
        // A TCP flow past its SYN with no port began before this release,
        // whose masquerade rule source-NATed it: the node's conntrack goes
        // on translating it.
        if !new && pkt.proto == PROTO_TCP && !is_syn(pkt.tcp_flags) {
            return Ok(Masqueraded::No);
        }
        new_port(ctx, pkt, backend, out)?;
    }
    translate_out(ctx, pkt, &out.nat)?;
    skb::redirect_neigh(out.ifindex)?;
    Ok(Masqueraded::Sent)
}

/// How a source-NATed request leaves: by `ifindex`, from `nat`; `flow` is
/// [`new_port`]'s key (here rather than on its stack).
#[derive(Clone, Copy)]
pub(crate) struct Out<A> {
    flow: FlowKey<A>,
    ifindex: u32,
    nat: NatAddress<A>,
}

/// Where the route to a request's backend leaves.
#[repr(u8)]
enum Leaves {
    /// By one of the node's devices (into `out`, with the node's address toward it).
    ByDevice,
    /// By a pod interface: to a backend on this node.
    ByPod,
    /// Nowhere for this packet: it is too big for the route's `mtu`.
    TooBig { mtu: u16 },
}

/// Where the route to `backend` leaves (see [`Leaves`]). The kernel checks
/// the packet against the MTU of the device it would leave by, as it checks
/// what it forwards itself.
#[inline(never)]
fn leaves_by_device<A: Masquerade>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    backend: &Backend<A>,
    out: &mut Out<A>,
) -> Result<Leaves, DropReason> {
    let mut fib = Fib::for_skb(ctx, crate::ifindex(ctx), pkt.proto);
    let Some((hop, node)) = A::route(&mut fib, None, backend.addr) else {
        return fib.too_big_for().map(|mtu| Leaves::TooBig { mtu }).ok_or(DropReason::NoRoute);
    };
    (out.ifindex, out.nat.addr) = (hop.ifindex, node);
    Ok(if lookup::is_pod_interface(hop.ifindex) { Leaves::ByPod } else { Leaves::ByDevice })
}

/// Whether the tracked flow of request `pkt` has a port already (into
/// `out.nat`), whichever program gave it: XDP's, or one for a flow XDP
/// left here.
#[inline(never)]
fn has_port<A: Masquerade>(pkt: &Packet<A>, out: &mut Out<A>) -> bool {
    let flow = FlowKey::service(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto);
    let Some(nat) = nat::of_flow(&flow) else { return false };
    out.nat = nat;
    true
}

/// A new port of the node address in `out.nat` for the flow of request
/// `pkt` to `backend` (into it). With every port tried some live flow's,
/// that is a collision of reply tuples, dropped and counted as one; the
/// client retries.
#[inline(never)]
fn new_port<A: Masquerade>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    backend: &Backend<A>,
    out: &mut Out<A>,
) -> Result<(), DropReason> {
    out.flow = FlowKey::service(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto);
    out.nat = nat::allocate(ctx.skb.skb.cast(), &out.flow, backend, out.nat.addr, conntrack::now())
        .ok_or(DropReason::ConntrackCollision)?;
    Ok(())
}

/// The request leaves from `nat`, one hop on.
#[inline(never)]
fn translate_out<A: Masquerade>(ctx: &TcContext, pkt: &Packet<A>, nat: &NatAddress<A>) -> Result<(), DropReason> {
    A::set_source(ctx, pkt, nat)?;
    A::hop(ctx)
}

/// Whether `pkt`, which came in on `ingress`, was a backend's reply to a
/// request the node source-NATed (to a node address and port), translated
/// back to frontend -> client, counted and sent on (as [`request`]). The
/// mapping of a flow that is over goes. Each step is a BPF function of its
/// own, as in `nodeport`: an IPv6 packet, its flow and a route lookup do
/// not fit one frame.
#[inline(never)]
pub(crate) fn reply<A: Masquerade>(ctx: &TcContext, pkt: &Packet<A>, ingress: u32) -> Result<bool, DropReason> {
    // Every packet on every interface comes here: most are done with at once.
    if !nat::may_be_reply(pkt) {
        return Ok(false);
    }
    let Some(scratch) = A::scratch() else { return Ok(false) };
    // SAFETY: this CPU's slot, and programs do not nest on a CPU.
    let flow = unsafe { &mut (*scratch).back };
    if !client_of(pkt, flow) {
        return Ok(false);
    }
    if !live(pkt, flow) {
        nat::forget_reply(pkt);
        return Ok(false);
    }
    let ifindex = toward(ctx, ingress, pkt.proto, flow.frontend.addr, flow.client.addr)?;
    translate_back(ctx, pkt, flow)?;
    skb::redirect_neigh(ifindex)?;
    count_back(ctx, pkt, flow.frontend.service_id, ingress);
    Ok(true)
}

/// The flow a backend's reply to a source-NATed request belongs to.
#[derive(Clone, Copy)]
pub(crate) struct Returning<A> {
    client: NatAddress<A>,
    frontend: CtEntry<A>,
}

/// What the steps of [`request`] and [`reply`] share: too large for the
/// stack beside the steps, so each family keeps this CPU's in a map of its
/// own (as the XDP program does its packet). Not pinned: it holds nothing
/// between packets.
pub(crate) struct Scratch<A> {
    out: Out<A>,
    back: Returning<A>,
}

#[map]
static SCRATCH: PerCpuArray<Scratch<[u8; 4]>> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SCRATCH6: PerCpuArray<Scratch<In6>> = PerCpuArray::with_max_entries(1, 0);

/// Whether reply `pkt` is to a node address and port the node source-NATs
/// a client to (that client into `flow`).
#[inline(never)]
fn client_of<A: Masquerade>(pkt: &Packet<A>, flow: &mut Returning<A>) -> bool {
    let Some(client) = nat::client_of_reply(pkt) else { return false };
    flow.client = client;
    true
}

/// Whether the flow of `flow.client` that reply `pkt` is in still lives
/// (its frontend into `flow`).
#[inline(never)]
fn live<A: Masquerade>(pkt: &Packet<A>, flow: &mut Returning<A>) -> bool {
    // The flow's conntrack knows the reply as backend -> client.
    let Some(frontend) = conntrack::reply_to(pkt, flow.client.addr, flow.client.port, conntrack::now()) else {
        return false;
    };
    flow.frontend = frontend;
    true
}

/// The reply becomes frontend -> client, one hop on.
#[inline(never)]
fn translate_back<A: Masquerade>(ctx: &TcContext, pkt: &Packet<A>, flow: &Returning<A>) -> Result<(), DropReason> {
    A::set_frontend(ctx, pkt, &flow.frontend)?;
    A::set_destination(ctx, pkt, &flow.client)?;
    A::hop(ctx)
}

/// Counts a reply translated back for frontend `id`, in on `ingress`.
#[inline(never)]
fn count_back<A: Masquerade>(ctx: &TcContext, pkt: &Packet<A>, id: u32, ingress: u32) {
    count(Counter::ReverseTranslated, ());
    count_device(ingress, hook::TC_INGRESS, DeviceEvent::ReverseTranslated, true);
    A::count_traffic(id, pkt.src, pkt.src_port, ctx.len());
}

/// The interface a packet from `src` to `dst` (of `proto`, in on `ingress`) leaves by.
#[inline(never)]
fn toward<A: Masquerade>(ctx: &TcContext, ingress: u32, proto: u8, src: A, dst: A) -> Result<u32, DropReason> {
    let mut fib = Fib::for_skb(ctx, ingress, proto);
    let (hop, _) = A::route(&mut fib, Some(src), dst).ok_or(DropReason::NoRoute)?;
    Ok(hop.ifindex)
}

/// Whether an ICMP error that came in on `ingress` was about a request the
/// node source-NATed (its quote: node address and port -> backend), and
/// was rewritten for the client, counted and sent on to it (as [`request`]).
/// In steps, as [`reply`].
#[inline(never)]
pub(crate) fn icmp_error<A: Masquerade>(ctx: &TcContext, err: &IcmpError<A>, ingress: u32) -> Result<bool, DropReason> {
    if err.dst != err.quoted.src {
        return Ok(false);
    }
    let Some(scratch) = A::scratch() else { return Ok(false) };
    // SAFETY: this CPU's slot, and programs do not nest on a CPU.
    let flow = unsafe { &mut (*scratch).back };
    if !quoted_client(err, flow) || !quoted_frontend(err, flow) {
        return Ok(false);
    }
    let ifindex = toward(ctx, ingress, A::ICMP, flow.frontend.addr, flow.client.addr)?;
    translate_icmp(ctx, err, flow)?;
    skb::redirect_neigh(ifindex)?;
    count(Counter::IcmpErrorTranslated, ());
    Ok(true)
}

/// Whether the request `err` quotes was source-NATed by the node (its
/// client into `flow`).
#[inline(never)]
fn quoted_client<A: Masquerade>(err: &IcmpError<A>, flow: &mut Returning<A>) -> bool {
    let q = &err.quoted;
    // The quoted request's reply, as the backend would send it.
    let Some(client) = nat::client_of(&FlowKey::reply_tuple(q.dst, q.dst_port, q.src, q.src_port, q.proto)) else {
        return false;
    };
    flow.client = client;
    true
}

/// Whether the flow of `flow.client` the request `err` quotes still lives
/// (its frontend into `flow`).
#[inline(never)]
fn quoted_frontend<A: Masquerade>(err: &IcmpError<A>, flow: &mut Returning<A>) -> bool {
    let q = &err.quoted;
    let key = FlowKey::reply_tuple(q.dst, q.dst_port, flow.client.addr, flow.client.port, q.proto);
    let Some(frontend) = conntrack::frontend_of(&key, conntrack::now()) else { return false };
    flow.frontend = frontend;
    true
}

/// The error becomes one about what the client of `flow` sent, one hop on.
/// Inlined: IPv6's quote rewrites are steps of their own already.
#[inline(always)]
fn translate_icmp<A: Masquerade>(ctx: &TcContext, err: &IcmpError<A>, flow: &Returning<A>) -> Result<(), DropReason> {
    A::icmp_to_client(ctx, err, flow)?;
    A::hop(ctx)
}
