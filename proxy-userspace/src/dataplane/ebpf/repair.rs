//! Drift repair: the maps compared with what this dataplane wrote. An
//! entry someone deleted or overwrote (a `bpftool map delete`, a tool
//! gone wrong) is written again from the desired state, and entries no
//! frontend owns are removed, so the datapath converges however it was
//! disturbed, as kube-proxy's periodic resync makes its rules converge.
//! Every table the dataplane writes is compared: frontends, backend slots,
//! source ranges, cluster-wide scopes, session affinity timeouts, VIP
//! markers (and, beside this module, the node devices' paths).

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::maps::{BackendKey, ServiceKey, ServiceValue};

use super::{Desired, EbpfDataplane, Programmed, maps::ServiceMaps, service_key};
use crate::frontend::Cidr;

/// The maps as read for one comparison.
struct Read {
    services: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeSet<BackendKey>,
    ranges: BTreeSet<(u32, Cidr)>,
    scopes: BTreeMap<u32, ServiceValue>,
    affinity: BTreeMap<u32, u32>,
}

/// Whether the maps hold what `p` says was written for its frontend `key`.
fn intact(p: &Programmed, key: &ServiceKey, read: &Read) -> bool {
    let set_whole = |set: u32, count: u32| (0..count).all(|slot| read.slots.contains(&BackendKey { set, slot }));
    let entry = read
        .services
        .get(key)
        .is_some_and(|v| v.id == p.id && v.backend_set == p.set && v.backend_count + v.terminating_count == p.slots);
    let outside = p.outside.as_ref().is_none_or(|o| {
        o.keys.iter().all(|k| read.services.get(k).is_some_and(|v| v.id == p.id))
            && o.other.is_none_or(|(set, count)| set_whole(set, count))
            && (!o.scope || read.scopes.get(&p.id).is_some_and(|s| s.id == p.id))
            && o.ranges.iter().all(|r| read.ranges.contains(&(p.id, *r)))
    });
    let affinity = !p.affinity || read.affinity.contains_key(&p.id);
    entry && set_whole(p.set, p.slots) && outside && affinity
}

impl<M: ServiceMaps> EbpfDataplane<M> {
    /// Writes again, from `desired`, every frontend whose entries or
    /// backend slots are not what was written; removes service entries no
    /// frontend owns and restores missing VIP markers. Returns how many
    /// frontends and entries it repaired.
    pub(super) fn repair_drift(&mut self, desired: &Desired) -> usize {
        let contents = self.maps.contents();
        let read = Read {
            services: contents.services.into_iter().collect(),
            slots: contents.backends.into_iter().collect(),
            ranges: contents.source_ranges.into_iter().collect(),
            scopes: contents.cluster_scopes.into_iter().collect(),
            affinity: contents.affinity_timeouts.into_iter().collect(),
        };
        let services = &read.services;
        let mut owned: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut owned_ranges: BTreeSet<(u32, Cidr)> = BTreeSet::new();
        let mut owned_scopes: BTreeSet<u32> = BTreeSet::new();
        let owned_affinity: BTreeSet<u32> = self.programmed.values().filter(|p| p.affinity).map(|p| p.id).collect();
        let mut broken = Vec::new();
        for (frontend, p) in &self.programmed {
            let key = service_key(frontend);
            owned.insert(key);
            if let Some(o) = &p.outside {
                owned.extend(o.keys.iter().copied());
                owned_ranges.extend(o.ranges.iter().map(|r| (p.id, *r)));
                owned_scopes.extend(o.scope.then_some(p.id));
            }
            if !intact(p, &key, &read) {
                broken.push(*frontend);
            }
        }
        let markers: Vec<ServiceKey> = self.vip_users.keys().map(|vip| ServiceKey::vip_marker(vip.octets())).collect();
        owned.extend(markers.iter().copied());
        let mut repaired = 0;
        for marker in markers.iter().filter(|m| !services.contains_key(m)) {
            match self.maps.set_service(*marker, ServiceValue::MARKER) {
                Ok(()) => repaired += 1,
                Err(e) => tracing::warn!(error = %e, "could not restore a VIP marker"),
            }
        }
        for key in services.keys().filter(|k| !owned.contains(k)) {
            match self.maps.remove_service(key) {
                Ok(()) => repaired += 1,
                Err(e) => tracing::warn!(error = %e, "could not remove a service entry no frontend owns"),
            }
        }
        // A stray range would let clients through another frontend's fence.
        for (id, range) in read.ranges.iter().filter(|r| !owned_ranges.contains(r)) {
            match self.maps.remove_source_range(*id, *range) {
                Ok(()) => repaired += 1,
                Err(e) => tracing::warn!(error = %e, "could not remove a source range no frontend owns"),
            }
        }
        for id in read.affinity.keys().filter(|id| !owned_affinity.contains(id)) {
            match self.maps.remove_affinity(*id) {
                Ok(()) => repaired += 1,
                Err(e) => tracing::warn!(error = %e, "could not remove a session affinity no frontend owns"),
            }
        }
        for id in read.scopes.keys().filter(|id| !owned_scopes.contains(id)) {
            match self.maps.remove_cluster_scope(*id) {
                Ok(()) => repaired += 1,
                Err(e) => tracing::warn!(error = %e, "could not remove a cluster-wide scope no frontend owns"),
            }
        }
        for frontend in broken {
            let result = match desired.get(&frontend) {
                Some(f) => self.upsert(f),
                None => self.delete(&frontend),
            };
            match result {
                Ok(()) => repaired += 1,
                Err(e) => {
                    tracing::warn!(%frontend, error = %e, "could not repair a frontend; trying again next period")
                }
            }
        }
        repaired
    }
}
