//! What the per-packet path needs of an address family, so that one
//! conntrack, one backend choice and one source NAT serve IPv4 (`[u8; 4]`)
//! and IPv6 ([`In6`]): each family's tables, backends and client memories.
//!
//! IPv6 frontends with source ranges or session affinity are never in the
//! IPv6 maps (the agent leaves them to ip6tables), so the IPv6 answers for
//! those say "no range holds the client" (a frontend flagged with ranges
//! would be closed, never open) and "no affinity key" (nothing to remember).
//! Everything else (Local policy scopes, source NAT from XDP) each family
//! has in tables of its own: ids are per family.

use aya_ebpf::{
    bindings::bpf_sock_tuple,
    maps::{Array, lpm_trie::Key},
};
use proxy_common::{
    conntrack::{CtEntry, FlowKey},
    counters::DropReason,
    ipv6::In6,
    maps::{
        AffinityKey, Backend, BackendKey, NatAddress, PROTO_TCP, ServiceKey, ServiceKey6, ServiceValue, SourceRangeKey,
        port_bit,
    },
};

use crate::maps::{
    BACKEND_PORTS, BACKEND_PORTS6, BACKENDS, BACKENDS6, CLUSTER_SCOPE, CLUSTER_SCOPE6, CT_ANY, CT_TCP, CT6_ANY,
    CT6_TCP, FRONTEND_PORTS, FRONTEND_PORTS6, NAT_FORWARD, NAT_FORWARD6, NAT_REVERSE, NAT_REVERSE6, SERVICES,
    SERVICES6, SOURCE_RANGES,
};
use crate::{affinity, counters};

/// One of a family's two source NAT tables (see `nat`).
#[derive(Clone, Copy)]
pub(crate) enum NatTable {
    /// A client's flow -> the node address and port it goes out with.
    Forward,
    /// The backend's replies -> the client they go back to.
    Reverse,
}

pub(crate) trait Family: Copy + PartialEq + Sized {
    /// The frontend (`addr`, `port`, `proto`), if it is one.
    fn service(addr: Self, port: [u8; 2], proto: u8) -> Option<ServiceValue>;
    /// Whether some backend of the family may answer from `port` (every
    /// reply the conntrack translates back does).
    fn backend_port(port: [u8; 2]) -> bool;
    /// The cluster-wide scope of the Local policy frontend `id`.
    fn cluster_scope(id: u32) -> Option<ServiceValue>;
    /// The conntrack entry under `key`, in its protocol's table.
    fn ct_get(key: &FlowKey<Self>) -> Option<*mut CtEntry<Self>>;
    fn ct_insert(key: &FlowKey<Self>, entry: &CtEntry<Self>) -> Result<(), DropReason>;
    /// Whether an entry was there to remove.
    fn ct_remove(key: &FlowKey<Self>) -> bool;
    fn backend(key: BackendKey) -> Option<Backend<Self>>;
    /// Whether one of the source ranges of the frontend `id` holds `client`.
    fn in_source_ranges(id: u32, client: Self) -> bool;
    /// The key under which the frontend `id` remembers `client`'s backend.
    fn affinity_key(id: u32, client: Self) -> Option<AffinityKey>;
    /// Records that `client` started a flow with `backend` (in `slot`).
    fn remember(client: &AffinityKey, backend: &Backend<Self>, slot: u32, now: u32);
    fn nat_get(table: NatTable, key: &FlowKey<Self>) -> Option<NatAddress<Self>>;
    /// Whether the entry was written.
    fn nat_insert(table: NatTable, key: &FlowKey<Self>, value: &NatAddress<Self>) -> bool;
    fn nat_remove(table: NatTable, key: &FlowKey<Self>);
    /// Writes the socket lookup tuple of what `backend` sends to `node`:`port`
    /// into `tuple`; returns the size the lookup helpers take for the family.
    fn sock_tuple(backend: &Backend<Self>, node: &Self, port: [u8; 2], tuple: &mut bpf_sock_tuple) -> u32;
    /// Counts `bytes` of frontend `id`'s traffic with `backend`, in the
    /// family's traffic maps.
    fn count_traffic(id: u32, backend: Self, port: [u8; 2], bytes: u32);
}

/// Whether `port` is marked in `ports` (proxy-common's `FRONTEND_PORTS`,
/// `BACKEND_PORTS`): an array read the verifier inlines, where the table
/// it guards would hash a key.
#[inline(always)]
fn marked(ports: &Array<u64>, port: [u8; 2]) -> bool {
    let (word, bit) = port_bit(u16::from_be_bytes(port));
    ports.get(word).is_some_and(|w| w & bit != 0)
}

/// The backend in `slot` of `svc`'s set.
#[inline(always)]
pub(crate) fn backend_at<A: Family>(svc: &ServiceValue, slot: u32) -> Option<Backend<A>> {
    A::backend(BackendKey { set: svc.backend_set, slot })
}

impl Family for [u8; 4] {
    #[inline(always)]
    fn service(addr: Self, port: [u8; 2], proto: u8) -> Option<ServiceValue> {
        if !marked(&FRONTEND_PORTS, port) {
            return None;
        }
        SERVICES.get_ptr(ServiceKey { addr, port, proto, _pad: 0 }).map(|s| unsafe { core::ptr::read(s) })
    }

    #[inline(always)]
    fn backend_port(port: [u8; 2]) -> bool {
        marked(&BACKEND_PORTS, port)
    }

    #[inline(always)]
    fn cluster_scope(id: u32) -> Option<ServiceValue> {
        CLUSTER_SCOPE.get_ptr(id).map(|s| unsafe { core::ptr::read(s) })
    }

    #[inline(always)]
    fn nat_get(table: NatTable, key: &FlowKey<Self>) -> Option<NatAddress<Self>> {
        let map = match table {
            NatTable::Forward => &NAT_FORWARD,
            NatTable::Reverse => &NAT_REVERSE,
        };
        map.get_ptr(*key).map(|n| unsafe { core::ptr::read(n) })
    }

    #[inline(always)]
    fn nat_insert(table: NatTable, key: &FlowKey<Self>, value: &NatAddress<Self>) -> bool {
        let map = match table {
            NatTable::Forward => &NAT_FORWARD,
            NatTable::Reverse => &NAT_REVERSE,
        };
        map.insert(*key, *value, 0).is_ok()
    }

    #[inline(always)]
    fn nat_remove(table: NatTable, key: &FlowKey<Self>) {
        let map = match table {
            NatTable::Forward => &NAT_FORWARD,
            NatTable::Reverse => &NAT_REVERSE,
        };
        let _ = map.remove(key);
    }

    #[inline(always)]
    fn sock_tuple(backend: &Backend<Self>, node: &Self, port: [u8; 2], tuple: &mut bpf_sock_tuple) -> u32 {
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        t.saddr = u32::from_ne_bytes(backend.addr);
        t.daddr = u32::from_ne_bytes(*node);
        t.sport = u16::from_ne_bytes(backend.port);
        t.dport = u16::from_ne_bytes(port);
        core::mem::size_of_val(t) as u32
    }

    #[inline(always)]
    fn ct_get(key: &FlowKey<Self>) -> Option<*mut CtEntry<Self>> {
        if key.proto == PROTO_TCP { CT_TCP.get_ptr_mut(*key) } else { CT_ANY.get_ptr_mut(*key) }
    }

    #[inline(always)]
    fn ct_insert(key: &FlowKey<Self>, entry: &CtEntry<Self>) -> Result<(), DropReason> {
        let table = if key.proto == PROTO_TCP { &CT_TCP } else { &CT_ANY };
        table.insert(*key, *entry, 0).map_err(|_| DropReason::ConntrackFailed)
    }

    #[inline(always)]
    fn ct_remove(key: &FlowKey<Self>) -> bool {
        let table = if key.proto == PROTO_TCP { &CT_TCP } else { &CT_ANY };
        table.remove(key).is_ok()
    }

    #[inline(always)]
    fn backend(key: BackendKey) -> Option<Backend<Self>> {
        BACKENDS.get_ptr(key).map(|b| unsafe { core::ptr::read(b) })
    }

    #[inline(always)]
    fn in_source_ranges(id: u32, client: Self) -> bool {
        let key = Key::new(SourceRangeKey::prefix_len(32), SourceRangeKey { id: id.to_be_bytes(), addr: client });
        SOURCE_RANGES.get(&key).is_some()
    }

    #[inline(always)]
    fn affinity_key(id: u32, client: Self) -> Option<AffinityKey> {
        Some(AffinityKey::address(id, client))
    }

    #[inline(always)]
    fn remember(client: &AffinityKey, backend: &Backend<Self>, slot: u32, now: u32) {
        affinity::remember(client, backend, slot, now)
    }

    #[inline(always)]
    fn count_traffic(id: u32, backend: Self, port: [u8; 2], bytes: u32) {
        counters::count_traffic_via(id, backend, port, bytes)
    }
}

impl Family for In6 {
    #[inline(always)]
    fn service(addr: Self, port: [u8; 2], proto: u8) -> Option<ServiceValue> {
        if !marked(&FRONTEND_PORTS6, port) {
            return None;
        }
        SERVICES6.get_ptr(ServiceKey6 { addr, port, proto, _pad: 0 }).map(|s| unsafe { core::ptr::read(s) })
    }

    #[inline(always)]
    fn backend_port(port: [u8; 2]) -> bool {
        marked(&BACKEND_PORTS6, port)
    }

    #[inline(always)]
    fn cluster_scope(id: u32) -> Option<ServiceValue> {
        CLUSTER_SCOPE6.get_ptr(id).map(|s| unsafe { core::ptr::read(s) })
    }

    #[inline(always)]
    fn nat_get(table: NatTable, key: &FlowKey<Self>) -> Option<NatAddress<Self>> {
        let map = match table {
            NatTable::Forward => &NAT_FORWARD6,
            NatTable::Reverse => &NAT_REVERSE6,
        };
        map.get_ptr(*key).map(|n| unsafe { core::ptr::read(n) })
    }

    #[inline(always)]
    fn nat_insert(table: NatTable, key: &FlowKey<Self>, value: &NatAddress<Self>) -> bool {
        let map = match table {
            NatTable::Forward => &NAT_FORWARD6,
            NatTable::Reverse => &NAT_REVERSE6,
        };
        map.insert(*key, *value, 0).is_ok()
    }

    #[inline(always)]
    fn nat_remove(table: NatTable, key: &FlowKey<Self>) {
        let map = match table {
            NatTable::Forward => &NAT_FORWARD6,
            NatTable::Reverse => &NAT_REVERSE6,
        };
        let _ = map.remove(key);
    }

    #[inline(always)]
    fn sock_tuple(backend: &Backend<Self>, node: &Self, port: [u8; 2], tuple: &mut bpf_sock_tuple) -> u32 {
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        t.saddr = backend.addr.words();
        t.daddr = node.words();
        t.sport = u16::from_ne_bytes(backend.port);
        t.dport = u16::from_ne_bytes(port);
        core::mem::size_of_val(t) as u32
    }

    #[inline(always)]
    fn ct_get(key: &FlowKey<Self>) -> Option<*mut CtEntry<Self>> {
        if key.proto == PROTO_TCP { CT6_TCP.get_ptr_mut(*key) } else { CT6_ANY.get_ptr_mut(*key) }
    }

    #[inline(always)]
    fn ct_insert(key: &FlowKey<Self>, entry: &CtEntry<Self>) -> Result<(), DropReason> {
        let table = if key.proto == PROTO_TCP { &CT6_TCP } else { &CT6_ANY };
        table.insert(*key, *entry, 0).map_err(|_| DropReason::ConntrackFailed)
    }

    #[inline(always)]
    fn ct_remove(key: &FlowKey<Self>) -> bool {
        let table = if key.proto == PROTO_TCP { &CT6_TCP } else { &CT6_ANY };
        table.remove(key).is_ok()
    }

    #[inline(always)]
    fn backend(key: BackendKey) -> Option<Backend<Self>> {
        BACKENDS6.get_ptr(key).map(|b| unsafe { core::ptr::read(b) })
    }

    #[inline(always)]
    fn in_source_ranges(_id: u32, _client: Self) -> bool {
        false
    }

    #[inline(always)]
    fn affinity_key(_id: u32, _client: Self) -> Option<AffinityKey> {
        None
    }

    #[inline(always)]
    fn remember(_client: &AffinityKey, _backend: &Backend<Self>, _slot: u32, _now: u32) {}

    #[inline(always)]
    fn count_traffic(id: u32, backend: Self, port: [u8; 2], bytes: u32) {
        counters::count_traffic6(id, &backend, port, bytes)
    }
}
