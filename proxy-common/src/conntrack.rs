//! The per-packet path's connection tracking: its maps, entries, states and
//! lifetimes, shared by the datapath (which creates and refreshes entries)
//! and the agent's garbage collector (which removes expired ones), so both
//! judge "expired" by the same function.
//!
//! As Cilium's `ct4_global` / `ct_any4_global`: TCP flows and all others
//! live in separate maps, so a flood of short UDP flows never evicts
//! established TCP connections. Each map holds both directions of a flow,
//! told apart by [`FlowKey::dir`]: the client's packets to the frontend
//! ([`DIR_SERVICE`], naming the backend chosen) and the backend's replies
//! ([`DIR_REPLY`], naming the frontend to show). A reply entry is trusted
//! only while the service entry of the frontend it names still pins that
//! backend, so a stale reply entry never rewrites another connection.

use crate::{
    ipv6::In6,
    maps::PROTO_TCP,
    reject::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// TCP flows, both directions (LRU).
pub const CT_TCP: &str = "CT_TCP";
/// Every other protocol's flows (UDP), both directions (LRU).
pub const CT_ANY: &str = "CT_ANY";
/// The IPv6 flows of the per-packet path, as [`CT_TCP`] and [`CT_ANY`]
/// (keys [`FlowKey6`]). Not LRU, which is preallocated: few nodes carry
/// IPv6 Service traffic per packet, so they are allocated as used, and the
/// agent's collector keeps them from filling.
pub const CT6_TCP: &str = "CT6_TCP";
pub const CT6_ANY: &str = "CT6_ANY";
/// The lifetimes the agent was told (`kpr run --conntrack-tcp-timeout-fin`):
/// one entry, [`Lifetimes`], which the datapath and `kpr conntrack list`
/// read; an array of one, so the datapath's lookup is inlined.
pub const CT_LIFETIMES: &str = "CT_LIFETIMES";

/// [`FlowKey::dir`] of a client -> frontend entry.
pub const DIR_SERVICE: u8 = 0;
/// [`FlowKey::dir`] of a backend -> client entry.
pub const DIR_REPLY: u8 = 1;

/// [`CtEntry::state`]: a reply has been seen (TCP: the connection is
/// established).
pub const STATE_REPLIED: u8 = 1;
/// [`CtEntry::state`]: a FIN or RST has been seen in either direction.
pub const STATE_CLOSING: u8 = 2;
/// [`CtEntry::state`] of a service entry: the node's conntrack translates
/// this flow (rules did, before eBPF mode served), so its packets pass
/// untranslated. Translating them again would give the node's conntrack a
/// second entry with the same reply tuple, which it resolves by moving the
/// client to another port mid-connection: the backend resets it.
pub const STATE_HOST: u8 = 4;

/// Lifetimes in seconds since an entry was last seen, after netfilter's and
/// Cilium's defaults: an established TCP connection idles for hours, a
/// half-open or closing one for seconds, a UDP flow for a minute.
pub const TCP_ESTABLISHED_LIFETIME: u32 = 6 * 3600;
pub const TCP_SYN_LIFETIME: u32 = 60;
/// The default of [`Lifetimes::tcp_closing`] (Cilium's
/// `--bpf-ct-timeout-regular-tcp-fin`).
pub const TCP_CLOSING_LIFETIME: u32 = 10;
pub const NON_TCP_LIFETIME: u32 = 60;

/// The lifetimes a node may set, the value of [`CT_LIFETIMES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// Seconds a TCP flow lives on after a FIN or RST, and so how long a
    /// port the node source-NATed a closed flow to stays taken: at
    /// thousands of new connections a second from one client to a
    /// backend, a port of 32,768 comes round again within seconds. 0 (a
    /// map not written yet) stands for the default.
    pub tcp_closing: u32,
}

impl Lifetimes {
    pub const DEFAULT: Self = Self { tcp_closing: TCP_CLOSING_LIFETIME };

    /// The lifetimes stored in [`CT_LIFETIMES`], defaults where it holds 0.
    pub const fn or_default(self) -> Self {
        if self.tcp_closing == 0 { Self::DEFAULT } else { self }
    }
}

/// A flow in one direction: the key of [`CT_TCP`] and [`CT_ANY`] (and,
/// as [`FlowKey6`], of [`CT6_TCP`] and [`CT6_ANY`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey<A = [u8; 4]> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub proto: u8,
    /// [`DIR_SERVICE`] or [`DIR_REPLY`].
    pub dir: u8,
    pub _pad: [u8; 2],
}

pub type FlowKey6 = FlowKey<In6>;

impl<A: Copy> FlowKey<A> {
    /// The service entry's key: what the client sends to the frontend.
    pub const fn service(src_addr: A, src_port: [u8; 2], dst_addr: A, dst_port: [u8; 2], proto: u8) -> Self {
        Self { src_addr, dst_addr, src_port, dst_port, proto, dir: DIR_SERVICE, _pad: [0; 2] }
    }

    /// A reply entry's key: what a backend at `src` sends to a client at `dst`.
    pub const fn reply_tuple(src_addr: A, src_port: [u8; 2], dst_addr: A, dst_port: [u8; 2], proto: u8) -> Self {
        Self { src_addr, dst_addr, src_port, dst_port, proto, dir: DIR_REPLY, _pad: [0; 2] }
    }

    /// The reply entry's key: what `backend` sends back to this service key's client.
    pub const fn reply(&self, backend_addr: A, backend_port: [u8; 2]) -> Self {
        Self::reply_tuple(backend_addr, backend_port, self.src_addr, self.src_port, self.proto)
    }

    /// The service entry's key of the flow this reply key answers, the
    /// client having addressed `frontend`.
    pub const fn service_of_reply(&self, frontend_addr: A, frontend_port: [u8; 2]) -> Self {
        Self::service(self.dst_addr, self.dst_port, frontend_addr, frontend_port, self.proto)
    }
}

/// Value of [`CT_TCP`] and [`CT_ANY`] (and, as [`CtEntry6`], of the IPv6 maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry<A = [u8; 4]> {
    /// Service entry: the backend. Reply entry: the frontend (VIP).
    pub addr: A,
    pub port: [u8; 2],
    /// [`STATE_REPLIED`], [`STATE_CLOSING`] and [`STATE_HOST`] bits.
    pub state: u8,
    pub _pad: u8,
    /// The frontend's service id.
    pub service_id: u32,
    /// Service entry: the backend's slot in the set it was chosen from, to
    /// tell whether a retransmitted SYN's backend still exists. 0 in a reply entry.
    pub slot: u32,
    /// When a packet last matched, in seconds of CLOCK_MONOTONIC (the
    /// kernel's `bpf_ktime_get_coarse_ns`).
    pub last_seen: u32,
}

pub type CtEntry6 = CtEntry<In6>;

impl<A: Copy> CtEntry<A> {
    pub const fn new(addr: A, port: [u8; 2], service_id: u32, slot: u32, now: u32) -> Self {
        Self { addr, port, state: 0, _pad: 0, service_id, slot, last_seen: now }
    }
}

/// The map a protocol's flows live in.
pub const fn map_for(proto: u8) -> &'static str {
    if proto == PROTO_TCP { CT_TCP } else { CT_ANY }
}

/// The map a protocol's IPv6 flows live in.
pub const fn map_for6(proto: u8) -> &'static str {
    if proto == PROTO_TCP { CT6_TCP } else { CT6_ANY }
}

/// How long an entry in `state` lives without traffic, in seconds.
pub const fn lifetime(proto: u8, state: u8, lifetimes: &Lifetimes) -> u32 {
    if proto != PROTO_TCP {
        NON_TCP_LIFETIME
    } else if state & STATE_CLOSING != 0 {
        lifetimes.tcp_closing
    } else if state & STATE_REPLIED != 0 {
        TCP_ESTABLISHED_LIFETIME
    } else {
        TCP_SYN_LIFETIME
    }
}

/// Whether an entry last seen at `last_seen` has outlived its lifetime at
/// `now`. An entry seen after `now` was read (a packet on another CPU, or
/// during the collector's walk, just past a second boundary) is live: its
/// age, modulo the clock's wrap, is then "negative".
pub const fn expired<A>(proto: u8, entry: &CtEntry<A>, now: u32, lifetimes: &Lifetimes) -> bool {
    let age = now.wrapping_sub(entry.last_seen);
    age <= i32::MAX as u32 && age > lifetime(proto, entry.state, lifetimes)
}

/// An entry's state after a packet with `tcp_flags` (0 for UDP), sent by
/// the backend (`reply`) or the client.
pub const fn next_state(state: u8, tcp_flags: u8, reply: bool) -> u8 {
    let mut state = state;
    if reply {
        state |= STATE_REPLIED;
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        state |= STATE_CLOSING;
    }
    state
}

/// Whether a client's SYN (without ACK) on a tracked flow opens a new
/// connection on a reused port rather than retransmitting the first SYN:
/// it does once the tracked connection was answered or began to close.
pub const fn syn_opens_new_connection(state: u8) -> bool {
    state & (STATE_REPLIED | STATE_CLOSING) != 0
}

/// Whether TCP flags are a connection's first SYN (or its retransmission).
pub const fn is_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, no implicit padding (asserted below).
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::CtEntry6 {}
    unsafe impl aya::Pod for super::Lifetimes {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::PROTO_UDP;
    use core::mem::size_of;

    const D: Lifetimes = Lifetimes::DEFAULT;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 4 + 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<CtEntry>(), 4 + 2 + 1 + 1 + 4 + 4 + 4);
        assert_eq!(size_of::<FlowKey6>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<CtEntry6>(), 16 + 2 + 1 + 1 + 4 + 4 + 4);
    }

    #[test]
    fn a_reply_key_swaps_client_and_backend_and_leads_back_to_its_service_key() {
        let svc = FlowKey::service([10, 0, 0, 9], [0x9c, 0x40], [10, 96, 0, 1], [0, 80], PROTO_TCP);
        let reply = svc.reply([10, 0, 0, 2], [0x1f, 0x90]);
        assert_eq!(
            (reply.src_addr, reply.src_port, reply.dst_addr, reply.dst_port, reply.dir),
            ([10, 0, 0, 2], [0x1f, 0x90], [10, 0, 0, 9], [0x9c, 0x40], DIR_REPLY)
        );
        assert_eq!(reply.service_of_reply([10, 96, 0, 1], [0, 80]), svc);
        assert_ne!(reply.service_of_reply([10, 96, 0, 2], [0, 80]), svc, "another frontend is another flow");
    }

    #[test]
    fn tcp_lifetimes_follow_the_connection_state() {
        let mut e = CtEntry::new([0; 4], [0; 2], 1, 0, 1000);
        assert_eq!(lifetime(PROTO_TCP, e.state, &D), TCP_SYN_LIFETIME);
        e.state = next_state(e.state, TCP_SYN | TCP_ACK, true);
        assert_eq!(lifetime(PROTO_TCP, e.state, &D), TCP_ESTABLISHED_LIFETIME);
        e.state = next_state(e.state, TCP_ACK, false);
        assert_eq!(lifetime(PROTO_TCP, e.state, &D), TCP_ESTABLISHED_LIFETIME, "data keeps it established");
        e.state = next_state(e.state, TCP_FIN | TCP_ACK, false);
        assert_eq!(lifetime(PROTO_TCP, e.state, &D), TCP_CLOSING_LIFETIME);
        let mut r = CtEntry::new([0; 4], [0; 2], 1, 0, 1000);
        r.state = next_state(r.state, TCP_RST, true);
        assert_eq!(lifetime(PROTO_TCP, r.state, &D), TCP_CLOSING_LIFETIME, "a reset closes too");
        assert_eq!(lifetime(PROTO_UDP, STATE_REPLIED, &D), NON_TCP_LIFETIME);
    }

    #[test]
    fn the_node_sets_how_long_a_closed_flow_lives_and_an_unwritten_setting_is_the_default() {
        let short = Lifetimes { tcp_closing: 1 };
        let closed = CtEntry { state: STATE_REPLIED | STATE_CLOSING, ..CtEntry::new([0; 4], [0; 2], 1, 0, 1000) };
        assert!(!expired(PROTO_TCP, &closed, 1001, &short));
        assert!(expired(PROTO_TCP, &closed, 1002, &short));
        assert!(!expired(PROTO_TCP, &closed, 1002, &D));
        let open = CtEntry { state: STATE_REPLIED, ..closed };
        assert!(!expired(PROTO_TCP, &open, 1002, &short), "only closing flows go sooner");
        assert_eq!(Lifetimes { tcp_closing: 0 }.or_default(), D);
        assert_eq!(short.or_default(), short);
    }

    #[test]
    fn entries_expire_once_idle_longer_than_their_lifetime_even_across_clock_wrap() {
        let e = CtEntry::new([0; 4], [0; 2], 1, 0, 1000);
        assert!(!expired(PROTO_UDP, &e, 1000 + NON_TCP_LIFETIME, &D));
        assert!(expired(PROTO_UDP, &e, 1001 + NON_TCP_LIFETIME, &D));
        assert!(!expired(PROTO_TCP, &e, 1000 + TCP_SYN_LIFETIME, &D));
        assert!(expired(PROTO_TCP, &e, 1001 + TCP_SYN_LIFETIME, &D));
        let wrapped = CtEntry::new([0; 4], [0; 2], 1, 0, u32::MAX - 5);
        assert!(!expired(PROTO_UDP, &wrapped, 10, &D));
        assert!(expired(PROTO_UDP, &wrapped, 1 + NON_TCP_LIFETIME, &D));
    }

    #[test]
    fn an_entry_seen_after_the_clock_was_read_is_live() {
        let e = CtEntry::new([0; 4], [0; 2], 1, 0, 1001);
        assert!(!expired(PROTO_UDP, &e, 1000, &D), "seen a second after the collector read its clock");
        assert!(!expired(PROTO_TCP, &e, 1000, &D));
        let wrapped = CtEntry::new([0; 4], [0; 2], 1, 0, 0);
        assert!(!expired(PROTO_TCP, &wrapped, u32::MAX, &D), "and across the clock's wrap");
    }

    #[test]
    fn only_a_syn_after_an_answer_or_a_close_opens_a_new_connection() {
        assert!(is_syn(TCP_SYN));
        assert!(!is_syn(TCP_SYN | TCP_ACK));
        assert!(!syn_opens_new_connection(0), "no answer yet: a retransmission");
        assert!(syn_opens_new_connection(STATE_REPLIED));
        assert!(syn_opens_new_connection(STATE_CLOSING));
    }

    #[test]
    fn each_protocol_has_its_map() {
        assert_eq!(map_for(PROTO_TCP), CT_TCP);
        assert_eq!(map_for(PROTO_UDP), CT_ANY);
        assert_eq!(map_for6(PROTO_TCP), CT6_TCP);
        assert_eq!(map_for6(PROTO_UDP), CT6_ANY);
    }
}
