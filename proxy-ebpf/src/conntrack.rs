//! Connection tracking for the per-packet path: the maps, lifetimes and
//! states are in proxy-common's `conntrack`, shared with the agent's
//! garbage collector.
//!
//! A flow has a service entry (client -> frontend, naming the backend) and
//! a reply entry (backend -> client, naming the frontend). The reply entry
//! is trusted only while the service entry it leads back to is live and
//! pins the replying backend: an entry left behind by an earlier flow never
//! rewrites another one.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use proxy_common::{
    conntrack::{CtEntry, FlowKey, Lifetimes, STATE_CLOSING, STATE_HOST, is_syn, next_state, syn_opens_new_connection},
    counters::{Counter, DropReason},
    maps::{BACKEND_ACTIVE, Backend, PROTO_TCP, ServiceValue},
};

use crate::{counters::count, family::Family, lookup::backend_at, maps::CT_LIFETIMES, parse::Packet};

/// Seconds of CLOCK_MONOTONIC, the clock of [`CtEntry::last_seen`]. The
/// coarse reading (the time of the last tick) is exact enough for seconds
/// and costs no clock-source read, which is dear in a virtual machine.
#[inline(always)]
pub(crate) fn now() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// The lifetimes the agent set (`--conntrack-tcp-timeout-fin`), the
/// defaults before it has. An array of one: the verifier inlines its lookup.
#[inline(always)]
fn lifetimes() -> Lifetimes {
    CT_LIFETIMES.get(0).map_or(Lifetimes::DEFAULT, |l| l.or_default())
}

/// Whether `entry`, of a flow of `proto`, has outlived its lifetime at `now`.
#[inline(always)]
fn expired<A>(proto: u8, entry: &CtEntry<A>, now: u32) -> bool {
    proxy_common::conntrack::expired(proto, entry, now, &lifetimes())
}

/// Records a packet on an entry; written only when something changed, so
/// a busy flow does not dirty the entry's cache line on every packet.
#[inline(always)]
fn touch<A>(entry: *mut CtEntry<A>, tcp_flags: u8, reply: bool, now: u32) {
    let e = unsafe { &mut *entry };
    let state = next_state(e.state, tcp_flags, reply);
    if e.state != state {
        e.state = state;
    }
    if e.last_seen != now {
        e.last_seen = now;
    }
}

/// If `pkt` is a backend's reply in a live tracked flow: the frontend it
/// must appear to come from. A reply entry whose flow is gone or moved on
/// is removed and counted, and the packet is left alone.
#[inline(always)]
pub(crate) fn reply<A: Family>(pkt: &Packet<A>) -> Option<CtEntry<A>> {
    // Most packets to pods are no reply: one from a port no backend
    // answers from is told apart without a lookup (or a clock read).
    if !A::backend_port(pkt.src_port) {
        return None;
    }
    reply_to(pkt, pkt.dst, pkt.dst_port, now())
}

/// [`reply`] for a reply `pkt` the flow knows as sent to `client`:`port`
/// (one the node source-NATed arrives addressed to the node).
#[inline(always)]
pub(crate) fn reply_to<A: Family>(pkt: &Packet<A>, client: A, port: [u8; 2], now: u32) -> Option<CtEntry<A>> {
    let key = FlowKey::reply_tuple(pkt.src, pkt.src_port, client, port, pkt.proto);
    let rev = A::ct_get(&key)?;
    let frontend = unsafe { core::ptr::read(rev) };
    let live = match A::ct_get(&key.service_of_reply(frontend.addr, frontend.port)) {
        Some(fwd) => {
            let live = pins(unsafe { &*fwd }, &key, &frontend, now);
            if live {
                touch(fwd, pkt.tcp_flags, true, now);
            }
            live
        }
        None => false,
    };
    if !live {
        // Gone already is as good as removed.
        A::ct_remove(&key);
        return count(Counter::ConntrackStale, None);
    }
    touch(rev, pkt.tcp_flags, true, now);
    Some(frontend)
}

/// Whether service entry `fwd` is live and pins the backend that reply key
/// `reply` comes from, for the frontend `rev` names.
#[inline(always)]
fn pins<A: Family>(fwd: &CtEntry<A>, reply: &FlowKey<A>, rev: &CtEntry<A>, now: u32) -> bool {
    fwd.addr == reply.src_addr
        && fwd.port == reply.src_port
        && fwd.service_id == rev.service_id
        && !expired(reply.proto, fwd, now)
}

/// The frontend a live flow's reply tuple `reply` answers for, without
/// refreshing anything (an ICMP error about the flow is not traffic of it).
#[inline(always)]
pub(crate) fn frontend_of<A: Family>(reply: &FlowKey<A>, now: u32) -> Option<CtEntry<A>> {
    let rev = unsafe { core::ptr::read(A::ct_get(reply)?) };
    let fwd = unsafe { core::ptr::read(A::ct_get(&reply.service_of_reply(rev.addr, rev.port))?) };
    pins(&fwd, reply, &rev, now).then_some(rev)
}

/// The backend a live flow's service entry `flow` pins, refreshing nothing.
#[inline(always)]
pub(crate) fn backend_of<A: Family>(flow: &FlowKey<A>, now: u32) -> Option<CtEntry<A>> {
    let fwd = unsafe { core::ptr::read(A::ct_get(flow)?) };
    (!expired(flow.proto, &fwd, now)).then_some(fwd)
}

/// A packet to no Service: if an earlier translated flow left a reply
/// entry for the tuple this flow's replies will carry, the client now talks
/// to that backend directly and the entry would rewrite its replies, so it
/// goes. Checked on a TCP connection's first SYN and on every other packet
/// of other protocols (which have no first packet).
#[inline(always)]
pub(crate) fn forget_direct<A: Family>(pkt: &Packet<A>) {
    if pkt.proto == PROTO_TCP && !is_syn(pkt.tcp_flags) {
        return;
    }
    let key = FlowKey::reply_tuple(pkt.dst, pkt.dst_port, pkt.src, pkt.src_port, pkt.proto);
    // Looked up first: a lookup takes no lock, a removal locks the key's
    // bucket even to find nothing there, and almost always nothing is.
    if A::ct_get(&key).is_some() && A::ct_remove(&key) {
        count(Counter::ConntrackStale, ());
    }
}

/// What the conntrack holds for a client's packet to a frontend.
pub(crate) enum Pinned<A: Family> {
    /// No live flow: a new one starts.
    No,
    /// A live flow, pinned to this backend.
    To(Backend<A>),
    /// A flow the node's conntrack translates ([`STATE_HOST`]).
    Host,
}

/// The backend a live tracked flow of `svc` is pinned to. A SYN keeps it
/// only while it retransmits the first one and the backend is still in the
/// set (a SYN after an answer or a close is a new connection on a reused
/// port, which chooses afresh). A reply entry evicted meanwhile is restored.
#[inline(always)]
pub(crate) fn pinned<A: Family>(
    flow: &FlowKey<A>,
    svc: &ServiceValue,
    tcp_flags: u8,
    now: u32,
) -> Result<Pinned<A>, DropReason> {
    let Some(fwd) = A::ct_get(flow) else { return Ok(Pinned::No) };
    let entry = unsafe { core::ptr::read(fwd) };
    if entry.service_id != svc.id || expired(flow.proto, &entry, now) {
        return Ok(Pinned::No);
    }
    if entry.state & STATE_HOST != 0 {
        if flow.proto == PROTO_TCP && is_syn(tcp_flags) && syn_opens_new_connection(entry.state) {
            return Ok(Pinned::No);
        }
        touch(fwd, tcp_flags, false, now);
        return Ok(Pinned::Host);
    }
    if flow.proto == PROTO_TCP
        && is_syn(tcp_flags)
        && (syn_opens_new_connection(entry.state) || !still_chosen(svc, &entry))
    {
        return Ok(Pinned::No);
    }
    touch(fwd, tcp_flags, false, now);
    // Both entries age together (the collector judges each by its own).
    let reply = flow.reply(entry.addr, entry.port);
    match A::ct_get(&reply) {
        Some(rev) => touch(rev, tcp_flags, false, now),
        None => {
            // Evicted: without it the replies would go out with the backend's address.
            let state = next_state(entry.state, tcp_flags, false);
            let rev = CtEntry { state, ..CtEntry::new(flow.dst_addr, flow.dst_port, svc.id, 0, now) };
            A::ct_insert(&reply, &rev)?;
            count(Counter::ConntrackRestored, ());
        }
    }
    Ok(Pinned::To(Backend { addr: entry.addr, port: entry.port, state: BACKEND_ACTIVE, _pad: 0 }))
}

/// Whether the flow's backend still sits, ready, in the slot it was chosen from.
#[inline(always)]
fn still_chosen<A: Family>(svc: &ServiceValue, entry: &CtEntry<A>) -> bool {
    entry.slot < svc.backend_count
        && backend_at::<A>(svc, entry.slot).is_some_and(|b| b.addr == entry.addr && b.port == entry.port)
}

/// Whether a live flow to another frontend holds the reply tuple `flow`
/// would have with `backend`.
#[inline(always)]
pub(crate) fn claimed<A: Family>(flow: &FlowKey<A>, backend: &Backend<A>, now: u32) -> bool {
    let reply = flow.reply(backend.addr, backend.port);
    let Some(held) = A::ct_get(&reply) else { return false };
    let held = unsafe { core::ptr::read(held) };
    if held.addr == flow.dst_addr && held.port == flow.dst_port {
        // This frontend's own earlier flow on the same tuple: replaced.
        return false;
    }
    let Some(other) = A::ct_get(&reply.service_of_reply(held.addr, held.port)) else { return false };
    let other = unsafe { core::ptr::read(other) };
    other.addr == backend.addr
        && other.port == backend.port
        && other.state & STATE_CLOSING == 0
        && !expired(flow.proto, &other, now)
}

/// Tracks a new flow pinned to `backend` (in `slot`).
#[inline(always)]
pub(crate) fn create<A: Family>(
    flow: &FlowKey<A>,
    service_id: u32,
    slot: u32,
    backend: &Backend<A>,
    tcp_flags: u8,
    now: u32,
) -> Result<(), DropReason> {
    let state = next_state(0, tcp_flags, false);
    let fwd = CtEntry { state, ..CtEntry::new(backend.addr, backend.port, service_id, slot, now) };
    let rev = CtEntry { state, ..CtEntry::new(flow.dst_addr, flow.dst_port, service_id, 0, now) };
    // Without its entries the flow's next packet would choose again (another
    // backend, mid-connection) or its replies would go untranslated, so a
    // failed insert drops this packet and the client retransmits, as with
    // Cilium's DROP_CT_CREATE_FAILED. The reply entry goes first: alone it is
    // never trusted, while a service entry alone would be.
    A::ct_insert(&flow.reply(backend.addr, backend.port), &rev)?;
    A::ct_insert(flow, &fwd)
}
