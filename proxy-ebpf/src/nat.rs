//! Source NAT for the flows the XDP program forwards: each gets a port of
//! the node address it leaves with, so the backend's replies come back to
//! this node and tell apart every client (two clients never share a
//! (backend, node address, port)). A port whose earlier flow is over (its
//! conntrack entries expired or gone) is handed out again.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    conntrack::FlowKey,
    maps::{Backend, NAT_PORT_COUNT, NAT_PORT_MIN, NatAddress},
};

use crate::{
    conntrack,
    maps::{NAT_FORWARD, NAT_REVERSE},
    parse::Packet,
};

/// Ports tried before a new flow is left to the TC path.
const TRIES: u32 = 8;

/// The address and port flow `flow` goes out with, if this program NATs it.
#[inline(always)]
pub(crate) fn of_flow(flow: &FlowKey) -> Option<NatAddress> {
    NAT_FORWARD.get_ptr(*flow).map(|n| unsafe { core::ptr::read(n) })
}

/// The client a backend's reply `pkt` (to a node address and NAT port) goes back to.
#[inline(always)]
pub(crate) fn client_of_reply(pkt: &Packet) -> Option<(FlowKey, NatAddress)> {
    // Every port handed out is in the upper half: the rest never looks.
    if u16::from_be_bytes(pkt.dst_port) < NAT_PORT_MIN {
        return None;
    }
    let key = FlowKey::reply_tuple(pkt.src, pkt.src_port, pkt.dst, pkt.dst_port, pkt.proto);
    NAT_REVERSE.get_ptr(key).map(|c| (key, unsafe { core::ptr::read(c) }))
}

/// Forgets the reply mapping `key` of a flow that is over.
#[inline(always)]
pub(crate) fn forget_reply(key: &FlowKey) {
    let _ = NAT_REVERSE.remove(key);
}

/// Forgets how `flow` was translated: it is now the TC path's.
#[inline(always)]
pub(crate) fn forget(flow: &FlowKey) {
    let _ = NAT_FORWARD.remove(flow);
}

/// Whether the reply mapping `key` belongs to a live flow.
#[inline(always)]
fn busy(key: &FlowKey, now: u32) -> bool {
    let Some(client) = NAT_REVERSE.get_ptr(*key) else { return false };
    let client = unsafe { core::ptr::read(client) };
    let reply = FlowKey::reply_tuple(key.src_addr, key.src_port, client.addr, client.port, key.proto);
    conntrack::frontend_of(&reply, now).is_some()
}

/// A port of `node` for new flow `flow` to `backend`, recorded both ways;
/// `None` if every port tried is busy or the maps refused.
#[inline(always)]
pub(crate) fn allocate(flow: &FlowKey, backend: &Backend, node: [u8; 4], now: u32) -> Option<NatAddress> {
    for _ in 0..TRIES {
        let port = (NAT_PORT_MIN as u32 + (unsafe { bpf_get_prandom_u32() } % NAT_PORT_COUNT)) as u16;
        let port = port.to_be_bytes();
        let reply = FlowKey::reply_tuple(backend.addr, backend.port, node, port, flow.proto);
        if busy(&reply, now) {
            continue;
        }
        NAT_REVERSE.insert(reply, NatAddress::new(flow.src_addr, flow.src_port), 0).ok()?;
        let nat = NatAddress::new(node, port);
        NAT_FORWARD.insert(*flow, nat, 0).ok()?;
        return Some(nat);
    }
    None
}
