//! Drift repair: the maps compared with what this dataplane wrote. An
//! entry someone deleted or overwrote (a `bpftool map delete`, a tool
//! gone wrong) is written again from the desired state, and entries no
//! frontend owns are removed, so the datapath converges however it was
//! disturbed, as kube-proxy's periodic resync makes its rules converge.

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::maps::{BackendKey, ServiceKey, ServiceValue};

use super::{Desired, EbpfDataplane, Programmed, maps::ServiceMaps, service_key};

/// Whether the maps hold what `p` says was written for its frontend `key`.
fn intact(
    p: &Programmed,
    key: &ServiceKey,
    services: &BTreeMap<ServiceKey, ServiceValue>,
    slots: &BTreeSet<BackendKey>,
) -> bool {
    let set_whole = |set: u32, count: u32| (0..count).all(|slot| slots.contains(&BackendKey { set, slot }));
    let entry = services
        .get(key)
        .is_some_and(|v| v.id == p.id && v.backend_set == p.set && v.backend_count + v.terminating_count == p.slots);
    let outside = p.outside.as_ref().is_none_or(|o| {
        o.keys.iter().all(|k| services.get(k).is_some_and(|v| v.id == p.id))
            && o.local.is_none_or(|(set, count)| set_whole(set, count))
    });
    entry && set_whole(p.set, p.slots) && outside
}

impl<M: ServiceMaps> EbpfDataplane<M> {
    /// Writes again, from `desired`, every frontend whose entries or
    /// backend slots are not what was written; removes service entries no
    /// frontend owns and restores missing VIP markers. Returns how many
    /// frontends and entries it repaired.
    pub(super) fn repair_drift(&mut self, desired: &Desired) -> usize {
        let contents = self.maps.contents();
        let services: BTreeMap<ServiceKey, ServiceValue> = contents.services.into_iter().collect();
        let slots: BTreeSet<BackendKey> = contents.backends.into_iter().collect();
        let mut owned: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut broken = Vec::new();
        for (frontend, p) in &self.programmed {
            let key = service_key(frontend);
            owned.insert(key);
            owned.extend(p.outside.iter().flat_map(|o| o.keys.iter().copied()));
            if !intact(p, &key, &services, &slots) {
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
