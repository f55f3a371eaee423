//! Writing the service tables, behind a small trait: the kernel's maps
//! (through aya) in the agent, an in-memory fake (the `fake` module beside this one) in tests,
//! so id and slot bookkeeping is tested without root.

use std::collections::HashSet;

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, lpm_trie::Key as LpmKey},
};
use proxy_common::{
    conntrack::{CtEntry, FlowKey},
    maps::{
        Backend, BackendKey, BackendTrafficKey, ForwardEntry, PROTO_TCP, PROTO_UDP, ReverseEntry, ServiceKey,
        ServiceValue, SockKey, SourceRangeKey, Traffic,
    },
};

use super::dump::entries;
use crate::frontend::Cidr;

/// The LPM key of `range` for frontend `id`.
pub fn source_range_key(id: u32, range: Cidr) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        SourceRangeKey::prefix_len(range.len),
        SourceRangeKey { id: id.to_be_bytes(), addr: range.addr.octets() },
    )
}

/// Why a map write failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapIoError {
    /// The map has no room for another entry.
    #[error("the map is full")]
    Full,
    #[error("{0}")]
    Failed(String),
}

/// The endpoints a UDP frontend still has, by (address, port).
pub type KeepEndpoints = HashSet<([u8; 4], [u8; 2])>;

/// What the service tables hold, read back when a restart reuses them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<BackendKey>,
    /// (frontend id, range) pairs of the source range map.
    pub source_ranges: Vec<(u32, Cidr)>,
    /// Frontend id -> cluster-wide scope, under a Local policy.
    pub cluster_scopes: Vec<(u32, ServiceValue)>,
    /// Frontend id -> session affinity timeout.
    pub affinity_timeouts: Vec<(u32, u32)>,
}

/// The writes the eBPF dataplane makes. Removing an absent entry is not an
/// error.
pub trait ServiceMaps: Send {
    /// Everything written, as the maps hold it (unreadable entries left out).
    fn contents(&self) -> MapContents;
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapIoError>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapIoError>;
    /// A frontend as written (`None` if absent or unreadable).
    fn service(&self, key: &ServiceKey) -> Option<ServiceValue>;
    fn set_backend(&mut self, key: BackendKey, backend: Backend) -> Result<(), MapIoError>;
    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), MapIoError>;
    /// A backend slot as written (`None` if absent or unreadable).
    fn backend(&self, key: &BackendKey) -> Option<Backend>;
    /// Lets clients in `range` reach frontend `id` (which has source ranges).
    fn set_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapIoError>;
    fn remove_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapIoError>;
    /// The cluster-wide scope of frontend `id`, under a Local policy.
    fn set_cluster_scope(&mut self, id: u32, value: ServiceValue) -> Result<(), MapIoError>;
    fn remove_cluster_scope(&mut self, id: u32) -> Result<(), MapIoError>;
    /// Session affinity of frontend `id`: its timeout in seconds.
    fn set_affinity(&mut self, id: u32, timeout: u32) -> Result<(), MapIoError>;
    fn remove_affinity(&mut self, id: u32) -> Result<(), MapIoError>;
    /// Forgets traffic counts of a frontend (`backends: None`: all of them,
    /// its id is being freed) or of some of its backends. Best effort: the
    /// counts are statistics.
    fn forget_traffic(&mut self, service_id: u32, backends: Option<&[Backend]>);
    /// Forgets the UDP flows of a frontend pinned to endpoints not in
    /// `keep`, so their next datagram chooses again, and ends the UDP
    /// sockets connected to those endpoints; returns how many.
    fn forget_udp_flows(&mut self, service_id: u32, keep: &KeepEndpoints) -> usize;
    /// Writes conntrack service entries (see `host_flows`).
    fn track_flows(&mut self, flows: &[(FlowKey, CtEntry)]) -> Result<(), MapIoError>;
    /// A conntrack entry (`None` if absent or unreadable).
    fn flow(&self, key: &FlowKey) -> Option<CtEntry>;
    /// Writes again the port marks of the frontends and backends written
    /// (see `marked_table`) that someone else cleared; returns how many
    /// words. Maps without marks have none to repair.
    fn repair_marks(&mut self) -> usize {
        0
    }
}

/// Whether a failed insert means the map is full (the kernel answers E2BIG).
fn io_error(e: MapError) -> MapIoError {
    match &e {
        MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => MapIoError::Full,
        _ => MapIoError::Failed(e.to_string()),
    }
}

/// Removes `key`; an entry that is already gone is not an error.
fn remove<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>, key: &K) -> Result<(), MapIoError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(io_error(e)),
    }
}

/// One family's per-packet flows, kept as the datapath keeps them: TCP
/// flows in a map of their own, UDP and every other protocol in the other.
pub struct FlowMaps<K, V> {
    pub tcp: HashMap<MapData, K, V>,
    pub any: HashMap<MapData, K, V>,
}

impl<A, V: Pod> FlowMaps<FlowKey<A>, V>
where
    FlowKey<A>: Pod,
{
    fn of(&self, proto: u8) -> &HashMap<MapData, FlowKey<A>, V> {
        if proto == PROTO_TCP { &self.tcp } else { &self.any }
    }

    /// Writes each flow to its protocol's map.
    pub(super) fn insert_all(&mut self, flows: &[(FlowKey<A>, V)]) -> Result<(), MapError> {
        for (key, entry) in flows {
            let map = if key.proto == PROTO_TCP { &mut self.tcp } else { &mut self.any };
            map.insert(key, entry, 0)?;
        }
        Ok(())
    }

    /// The entry of `key`, if the datapath holds one.
    pub(super) fn get(&self, key: &FlowKey<A>) -> Option<V> {
        self.of(key.proto).get(key, 0).ok()
    }
}

/// The kernel's maps.
pub struct AyaMaps {
    pub(super) services: super::marked_table::MarkedTable<ServiceKey>,
    pub(super) backends: super::marked_table::MarkedTable<BackendKey, Backend>,
    pub(super) source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub(super) cluster_scope: HashMap<MapData, u32, ServiceValue>,
    pub(super) affinity_timeouts: HashMap<MapData, u32, u32>,
    /// The per-packet path's flows: TCP ones are only written (see
    /// `host_flows`), non-TCP ones also forgotten.
    pub(super) flows: FlowMaps<FlowKey, CtEntry>,
    pub(super) sock_affinity: HashMap<MapData, SockKey, ForwardEntry>,
    pub(super) sock_reverse: HashMap<MapData, SockKey, ReverseEntry>,
    /// Where the socket hooks serve processes, if they are on.
    pub(super) cgroup: Option<std::path::PathBuf>,
    pub(super) traffic: TrafficMaps,
}

/// A removal that found nothing to remove did its job.
fn absent_is_removed(result: Result<(), MapError>) -> Result<(), MapIoError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(io_error(e)),
    }
}

impl ServiceMaps for AyaMaps {
    fn contents(&self) -> MapContents {
        let range = |key: LpmKey<SourceRangeKey>| {
            let data = key.data();
            let len = key.prefix_len().checked_sub(32).and_then(|l| u8::try_from(l).ok())?;
            Some((u32::from_be_bytes(data.id), Cidr { addr: data.addr.into(), len }))
        };
        MapContents {
            services: entries(&self.services),
            backends: entries(&self.backends).into_iter().map(|(k, _)| k).collect(),
            source_ranges: self.source_ranges.keys().filter_map(Result::ok).filter_map(range).collect(),
            cluster_scopes: entries(&self.cluster_scope),
            affinity_timeouts: entries(&self.affinity_timeouts),
        }
    }

    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapIoError> {
        self.services.insert(key, value, 0).map_err(io_error)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapIoError> {
        remove(&mut self.services, key)
    }

    fn set_backend(&mut self, key: BackendKey, backend: Backend) -> Result<(), MapIoError> {
        self.backends.insert(key, backend, 0).map_err(io_error)
    }

    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), MapIoError> {
        remove(&mut self.backends, key)
    }

    fn backend(&self, key: &BackendKey) -> Option<Backend> {
        self.backends.get(key, 0).ok()
    }

    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }

    fn set_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapIoError> {
        self.source_ranges.insert(&source_range_key(id, range), 1, 0).map_err(io_error)
    }

    fn remove_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapIoError> {
        absent_is_removed(self.source_ranges.remove(&source_range_key(id, range)))
    }

    fn set_cluster_scope(&mut self, id: u32, value: ServiceValue) -> Result<(), MapIoError> {
        self.cluster_scope.insert(id, value, 0).map_err(io_error)
    }

    fn remove_cluster_scope(&mut self, id: u32) -> Result<(), MapIoError> {
        absent_is_removed(self.cluster_scope.remove(&id))
    }

    fn set_affinity(&mut self, id: u32, timeout: u32) -> Result<(), MapIoError> {
        self.affinity_timeouts.insert(id, timeout, 0).map_err(io_error)
    }

    fn remove_affinity(&mut self, id: u32) -> Result<(), MapIoError> {
        absent_is_removed(self.affinity_timeouts.remove(&id))
    }

    fn forget_traffic(&mut self, service_id: u32, backends: Option<&[Backend]>) {
        self.traffic.forget(service_id, backends);
    }

    fn forget_udp_flows(&mut self, service_id: u32, keep: &KeepEndpoints) -> usize {
        let stale =
            super::conntrack_gc::forget_udp_flows(&mut self.flows.any, service_id, |a, p| keep.contains(&(a, p)));
        // Unconnected UDP sockets keep their backend per frontend: they choose again too.
        let stale_sockets: Vec<SockKey> = entries(&self.sock_affinity)
            .into_iter()
            .filter(|(_, v)| v.service_id == service_id && !keep.contains(&(v.backend.addr, v.backend.port)))
            .map(|(k, _)| k)
            .collect();
        for key in &stale_sockets {
            if let Err(e) = remove(&mut self.sock_affinity, key) {
                tracing::debug!(error = %e, "could not forget a socket's backend");
            }
        }
        // Connected UDP sockets cannot choose again: they are ended.
        let ended = match &self.cgroup {
            Some(cgroup) => {
                let pinned: HashSet<super::sock_destroy::Pinned> = entries(&self.sock_reverse)
                    .into_iter()
                    .filter(|(k, v)| {
                        k.proto == PROTO_UDP && v.service_id == service_id && !keep.contains(&(k.addr, k.port))
                    })
                    .map(|(k, _)| (k.cookie, super::sock_destroy::mapped(k.addr), k.port))
                    .collect();
                super::sock_destroy::destroy(cgroup, &pinned)
            }
            None => 0,
        };
        stale + stale_sockets.len() + ended
    }

    fn track_flows(&mut self, flows: &[(FlowKey, CtEntry)]) -> Result<(), MapIoError> {
        self.flows.insert_all(flows).map_err(io_error)
    }

    fn flow(&self, key: &FlowKey) -> Option<CtEntry> {
        self.flows.get(key)
    }

    fn repair_marks(&mut self) -> usize {
        self.services.repair_marks() + self.backends.repair_marks()
    }
}

/// The per-frontend and per-backend traffic counters.
pub struct TrafficMaps {
    service: Array<MapData, Traffic>,
    backend: HashMap<MapData, BackendTrafficKey, Traffic>,
}

impl TrafficMaps {
    pub(super) fn new(service: Array<MapData, Traffic>, backend: HashMap<MapData, BackendTrafficKey, Traffic>) -> Self {
        Self { service, backend }
    }

    /// Forgets a frontend's counts (`None`: all, its id is being freed and
    /// its next owner starts from zero) or some of its backends'.
    pub(super) fn forget(&mut self, service_id: u32, backends: Option<&[Backend]>) {
        let Some(backends) = backends else {
            if let Err(e) = self.service.set(service_id, Traffic::default(), 0) {
                tracing::warn!(service_id, error = %e, "traffic not reset: the frontend id's next owner inherits it");
            }
            return;
        };
        for b in backends {
            // Counts of an entry never written are already gone.
            if let Err(e) = self.backend.remove(&BackendTrafficKey::new(service_id, b.addr, b.port)) {
                tracing::trace!(service_id, error = %e, "no backend traffic to forget");
            }
        }
    }
}
