//! Source NAT for the flows the XDP program forwards: each gets a port of
//! the node address it leaves with, so the backend's replies come back to
//! this node and tell apart every client (two clients never share a
//! (backend, node address, port)). A port whose earlier flow is over (its
//! conntrack entries expired or gone) is handed out again. Each family has
//! its own two tables (see `family`).

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::map,
    maps::PerCpuArray,
};
use proxy_common::{
    conntrack::FlowKey,
    counters::Counter,
    maps::{Backend, NAT_PORT_MIN, NatAddress, PROTO_TCP, PROTO_UDP, is_nat_port, nat_port},
};

use crate::{
    conntrack,
    counters::count,
    family::{Family, NatTable},
    parse::Packet,
};

/// Random ports tried, after the client's own, before a new flow is
/// left to the TC path (from XDP) or dropped (from TC).
const TRIES: u32 = 8;

/// A UDP datagram the node sends from one of its ports toward a backend
/// (`pkt`, on its way out): where a flow from outside was given that port
/// toward the same backend before the node's socket took it (a socket's
/// port is checked only when a flow gets one), the backend's answers would
/// go to that flow's client. The node's socket keeps its port: the flow's
/// mapping goes both ways, and its next datagram is given another port (a
/// datagram flow's backend does not tell ports apart). The kernel gives a
/// TCP connection an even port, which the source NAT never hands out.
///
/// A request the TC program source-NATed leaves the same way, from the
/// port it was given: a datagram is the node's own only where a socket of
/// the node's would get its answers (asked with `ctx`, the program's context).
#[inline(never)]
pub(crate) fn yield_to_node<A: Family>(ctx: *mut c_void, pkt: &Packet<A>) {
    if pkt.proto != PROTO_UDP || !is_nat_port(pkt.src_port) {
        return;
    }
    let reply = FlowKey::reply_tuple(pkt.dst, pkt.dst_port, pkt.src, pkt.src_port, pkt.proto);
    let Some(client) = A::nat_get(NatTable::Reverse, &reply) else { return };
    let backend = Backend::new(pkt.dst, u16::from_be_bytes(pkt.dst_port));
    if port_free_of_node_sockets(ctx, &backend, &pkt.src, pkt.src_port, pkt.proto) {
        return;
    }
    A::nat_remove(NatTable::Reverse, &reply);
    count(Counter::NatYieldedToNode, ());
    // The flow's frontend, from its conntrack, names its forward mapping.
    let reply = FlowKey::reply_tuple(pkt.dst, pkt.dst_port, client.addr, client.port, pkt.proto);
    if let Some(frontend) = conntrack::frontend_of(&reply, conntrack::now()) {
        forget(&FlowKey::service(client.addr, client.port, frontend.addr, frontend.port, pkt.proto));
    }
}

/// The address and port flow `flow` goes out with, if this program NATs it.
#[inline(always)]
pub(crate) fn of_flow<A: Family>(flow: &FlowKey<A>) -> Option<NatAddress<A>> {
    A::nat_get(NatTable::Forward, flow)
}

/// The client a backend's reply `pkt` (to a node address and NAT port) goes back to.
#[inline(always)]
pub(crate) fn client_of_reply<A: Family>(pkt: &Packet<A>) -> Option<NatAddress<A>> {
    if !may_be_reply(pkt) {
        return None;
    }
    client_of(&reply_key(pkt))
}

/// Whether `pkt` may be a reply to a flow this node source-NATs: every port
/// handed out is in the upper half, so the rest never looks further.
#[inline(always)]
pub(crate) fn may_be_reply<A>(pkt: &Packet<A>) -> bool {
    u16::from_be_bytes(pkt.dst_port) >= NAT_PORT_MIN
}

/// The client reply tuple `key` (backend -> node address and NAT port)
/// goes back to.
#[inline(always)]
pub(crate) fn client_of<A: Family>(key: &FlowKey<A>) -> Option<NatAddress<A>> {
    A::nat_get(NatTable::Reverse, key)
}

/// The reply mapping of a backend's reply `pkt`.
#[inline(always)]
fn reply_key<A: Family>(pkt: &Packet<A>) -> FlowKey<A> {
    FlowKey::reply_tuple(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto)
}

/// Forgets the reply mapping of `pkt`, a reply in a flow that is over.
#[inline(always)]
pub(crate) fn forget_reply<A: Family>(pkt: &Packet<A>) {
    A::nat_remove(NatTable::Reverse, &reply_key(pkt));
}

/// Forgets how `flow` was translated: it is now the TC path's.
#[inline(always)]
pub(crate) fn forget<A: Family>(flow: &FlowKey<A>) {
    A::nat_remove(NatTable::Forward, flow);
}

/// Whether the reply mapping `key` is another client's live flow: a
/// mapping to `client` itself (its flow's earlier life on the same port,
/// closing or closed) is free for it.
#[inline(always)]
fn busy<A: Family>(key: &FlowKey<A>, client: &FlowKey<A>, now: u32) -> bool {
    let Some(held) = A::nat_get(NatTable::Reverse, key) else { return false };
    if held.addr == client.src_addr && held.port == client.src_port {
        return false;
    }
    let reply = FlowKey::reply_tuple(key.src_addr, key.src_port, held.addr, held.port, key.proto);
    conntrack::frontend_of(&reply, now).is_some()
}

/// This CPU's tuple for [`port_free_of_node_sockets`]; it holds nothing between packets.
#[map]
static SOCK_TUPLE: PerCpuArray<bpf_sock_tuple> = PerCpuArray::with_max_entries(1, 0);

/// Whether a new flow to `backend` may go out from `node`:`port` (the
/// client's own port, or a random one): not when a socket of the node's own would
/// receive what the backend sends to `node`:`port` (a node process's
/// connection to the backend from that port; a flow source-NATed to it
/// would be one flow with it at the backend, and break both). Netfilter's
/// NAT steps around the node's own connections the same way. Asked of the
/// network namespace the program's context `ctx` is in; any socket there,
/// listening ones too, keeps the port.
#[inline(never)]
fn port_free_of_node_sockets<A: Family>(
    ctx: *mut c_void,
    backend: &Backend<A>,
    node: &A,
    port: [u8; 2],
    proto: u8,
) -> bool {
    // Ports below the range are node ports' or the node's own, and even
    // ones are for the node's new connections (see proxy-common's
    // `NAT_PORT_MIN`): a client's own port may be either.
    if !is_nat_port(port) {
        return false;
    }
    // In a map: the callers sit on the deepest call chains, whose stack
    // has no room for it.
    let Some(tuple) = SOCK_TUPLE.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's slot, and programs do not nest on a CPU.
    let size = A::sock_tuple(backend, node, port, unsafe { &mut *tuple });
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: `ctx` is the program's context, `tuple` a map value of the tuple's size.
    let sk = unsafe {
        match proto {
            PROTO_TCP => bpf_skc_lookup_tcp(ctx, tuple, size, netns, 0),
            PROTO_UDP => bpf_sk_lookup_udp(ctx, tuple, size, netns, 0),
            _ => return true,
        }
    };
    if sk.is_null() {
        return true;
    }
    // SAFETY: the reference the lookup took, given back.
    unsafe { bpf_sk_release(sk.cast()) };
    false
}

/// A port of `node` for new flow `flow` to `backend`, recorded both ways;
/// `None` if every port tried is busy or the maps refused. Only odd ports
/// of the range (see proxy-common's `NAT_PORT_MIN`). The client's own port
/// first where it is one, as netfilter's NAT keeps it: one client's live
/// flows never share it, so it is free but when another client's flow to
/// the same backend holds it (a client reusing its port gets the same one
/// again, where a random one would be held for seconds by the closing
/// flow); then random ones. Every port tried is asked of the node's
/// sockets too (see [`port_free_of_node_sockets`]; `ctx` is the program's
/// context): a node process's connection to the backend keeps its port.
#[inline(always)]
pub(crate) fn allocate<A: Family>(
    ctx: *mut c_void,
    flow: &FlowKey<A>,
    backend: &Backend<A>,
    node: A,
    now: u32,
) -> Option<NatAddress<A>> {
    for i in 0..=TRIES {
        let port = if i == 0 { flow.src_port } else { nat_port(unsafe { bpf_get_prandom_u32() }) };
        if !port_free_of_node_sockets(ctx, backend, &node, port, flow.proto) {
            continue;
        }
        let reply = FlowKey::reply_tuple(backend.addr, backend.port, node, port, flow.proto);
        if busy(&reply, flow, now) {
            continue;
        }
        if !A::nat_insert(NatTable::Reverse, &reply, &NatAddress::new(flow.src_addr, flow.src_port)) {
            return None;
        }
        let nat = NatAddress::new(node, port);
        if !A::nat_insert(NatTable::Forward, flow, &nat) {
            return None;
        }
        return Some(nat);
    }
    None
}
