//! A restart that reuses the maps (see `pins`) finds them programmed: the
//! frontends, their backend sets and source ranges keep serving while the
//! agent starts. Its bookkeeping is rebuilt from them, so ids and sets in
//! use are never handed out twice, each frontend's next change publishes a
//! new set as any change does, and the first complete sync removes only
//! what is gone from the desired state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use proxy_common::maps::{PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue, flags, kind};

use super::{
    EbpfDataplane, Ids, Outside, Programmed,
    maps::{MapContents, ServiceMaps},
};
use crate::frontend::{Cidr, FrontendKey, Protocol};

impl Ids {
    /// Ids handing out none of `used` (the lowest free ones first).
    pub(super) fn with_used(used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(1, |max| max + 1);
        // Popped from the end: lowest last.
        let free = (1..next).rev().filter(|id| !used.contains(id)).collect();
        Self { next, free }
    }
}

/// The frontend a ClusterIP-kind entry stands for.
fn frontend_key(key: &ServiceKey) -> Option<FrontendKey> {
    let protocol = match key.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some(FrontendKey { vip: Ipv4Addr::from(key.addr), port: u16::from_be_bytes(key.port), protocol })
}

impl<M: ServiceMaps> EbpfDataplane<M> {
    /// Takes over what the maps hold (a previous run's programming) as if
    /// this dataplane had written it. Entries no frontend owns are removed,
    /// backend sets no frontend uses are freed at the next apply, and the
    /// next apply deletes the frontends its desired state does not have.
    /// Returns how many frontends were taken over.
    pub fn adopt_programmed(&mut self) -> usize {
        let contents = self.maps.contents();
        // An iptables-mode run that stopped while it drained these maps
        // (see `takeover::drain_ebpf`), or a run that stopped before its
        // adoption ended (see `host_flows`), left its mark on the entries,
        // which would keep new flows from being translated: cleared, as they serve again.
        let unfinished = flags::DRAINING | flags::ADOPTING;
        self.clear_flag(
            &contents,
            unfinished,
            "could not clear a drain or adoption left unfinished: new flows to it go untranslated",
        );
        let entry_flags = contents.services.iter().fold(0, |all, (_, v)| all | v.flags);
        let mut externals: BTreeMap<u32, Vec<(ServiceKey, ServiceValue)>> = BTreeMap::new();
        let mut markers = Vec::new();
        for (key, value) in contents.services {
            if key == ServiceKey::vip_marker(key.addr) {
                markers.push(key);
            } else if kind::is_external(value.kind) {
                externals.entry(value.id).or_default().push((key, value));
            } else if let Some(frontend) = frontend_key(&key) {
                let slots = value.backend_count + value.terminating_count;
                let affinity = value.flags & proxy_common::maps::flags::AFFINITY != 0;
                let (id, set) = (value.id, value.backend_set);
                self.programmed.insert(frontend, Programmed { id, set, slots, affinity, outside: None });
            }
        }
        // The taken-over frontends serve before the first sync: the socket
        // fence they ask for must be there.
        self.ask_for_socket_fence(entry_flags);
        let scopes: BTreeMap<u32, ServiceValue> = contents.cluster_scopes.into_iter().collect();
        let mut ranges: BTreeMap<u32, Vec<Cidr>> = BTreeMap::new();
        for (id, range) in contents.source_ranges {
            ranges.entry(id).or_default().push(range);
        }
        let (mut ids, mut sets) = (BTreeSet::new(), BTreeSet::new());
        for (frontend, p) in &mut self.programmed {
            ids.insert(p.id);
            sets.insert(p.set);
            self.slots_used += u64::from(p.slots);
            *self.vip_users.entry(frontend.vip).or_insert(0) += 1;
            let external = externals.remove(&p.id).unwrap_or_default();
            let scope = scopes.get(&p.id);
            // Where the two traffic policies differ, the external entries (or
            // the cluster-wide scope) name a set of their own.
            let other = external
                .iter()
                .map(|(_, v)| v)
                .chain(scope)
                .find(|v| v.backend_set != p.set)
                .map(|v| (v.backend_set, v.backend_count + v.terminating_count));
            if let Some((set, slots)) = other {
                sets.insert(set);
                self.slots_used += u64::from(slots);
            }
            let keys = external.into_iter().map(|(k, _)| k).collect();
            let ranges = ranges.remove(&p.id).unwrap_or_default();
            p.outside = Outside { keys, other, scope: scope.is_some(), ranges }.boxed();
        }
        // What no frontend owns any more serves nothing anyone asked for.
        let orphans = externals.into_values().flatten().map(|(k, _)| k);
        let lone_markers = markers.into_iter().filter(|m| !self.vip_users.contains_key(&Ipv4Addr::from(m.addr)));
        for key in orphans.chain(lone_markers).collect::<Vec<_>>() {
            if let Err(e) = self.maps.remove_service(&key) {
                tracing::warn!(error = %e, "could not remove an entry no frontend owns");
            }
        }
        for (id, range) in ranges.into_iter().flat_map(|(id, rs)| rs.into_iter().map(move |r| (id, r))) {
            if let Err(e) = self.maps.remove_source_range(id, range) {
                tracing::warn!(error = %e, "could not remove a source range no frontend owns");
            }
        }
        // Sets no frontend names (a run stopped before freeing them).
        let mut unused: BTreeMap<u32, u32> = BTreeMap::new();
        for key in contents.backends.iter().filter(|k| !sets.contains(&k.set)) {
            let slots = unused.entry(key.set).or_insert(0);
            *slots = (*slots).max(key.slot + 1);
        }
        sets.extend(unused.keys());
        self.retiring.extend(unused);
        self.service_ids = Ids::with_used(&ids);
        self.set_ids = Ids::with_used(&sets);
        self.adopted = !self.programmed.is_empty();
        self.programmed.len()
    }

    /// Clears `flag` from every entry of `contents` that has it; a failure is logged as `failed`.
    pub(super) fn clear_flag(&mut self, contents: &MapContents, flag: u8, failed: &str) {
        let mut results = Vec::new();
        for (key, value) in flag_cleared(contents.services.iter().copied(), flag) {
            results.push(self.maps.set_service(key, value));
        }
        for (id, value) in flag_cleared(contents.cluster_scopes.iter().copied(), flag) {
            results.push(self.maps.set_cluster_scope(id, value));
        }
        for e in results.into_iter().filter_map(Result::err) {
            tracing::warn!(error = %e, "{failed}");
        }
    }

    /// After the first apply that follows adoption: the frontends taken
    /// over that the desired state does not have.
    pub(super) fn adopted_and_gone(&mut self, desired: &super::Desired) -> Vec<FrontendKey> {
        if !std::mem::take(&mut self.adopted) {
            return Vec::new();
        }
        self.programmed.keys().filter(|k| !desired.contains_key(k)).copied().collect()
    }
}

/// The entries of `values` that have `flag`, with it cleared: what clearing
/// the flag writes (IPv6's frontends too).
pub(super) fn flag_cleared<K>(
    values: impl IntoIterator<Item = (K, ServiceValue)>,
    flag: u8,
) -> impl Iterator<Item = (K, ServiceValue)> {
    values
        .into_iter()
        .filter(move |(_, v)| v.flags & flag != 0)
        .map(move |(k, v)| (k, ServiceValue { flags: v.flags & !flag, ..v }))
}
