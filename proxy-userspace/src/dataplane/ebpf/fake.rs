//! In-memory stand-ins for the kernel's service tables: [`FakeMaps`] holds
//! entries with the kernel's capacity rule (a full map refuses a new key,
//! not an update), [`Faulty`] makes writes fail after a given number, so the
//! dataplane's bookkeeping is tested on full maps and partial writes.

use std::collections::BTreeMap;

use std::collections::BTreeSet;

use proxy_common::{
    conntrack::{CtEntry, FlowKey},
    maps::{Backend, BackendKey, ServiceKey, ServiceValue},
};

use crate::frontend::Cidr;

use super::maps::{KeepEndpoints, MapContents, MapIoError, ServiceMaps};

#[derive(Clone, Debug, Default)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<BackendKey, Backend>,
    /// (frontend id, range) pairs of the source range map.
    pub source_ranges: BTreeSet<(u32, Cidr)>,
    /// Frontend id -> cluster-wide scope, under a Local policy.
    pub cluster_scope: BTreeMap<u32, ServiceValue>,
    /// Frontend id -> session affinity timeout.
    pub affinity: BTreeMap<u32, u32>,
    pub services_max: usize,
    pub backends_max: usize,
    /// Frontend ids whose traffic counts were forgotten, in order.
    pub forgotten_traffic: Vec<u32>,
    /// Backends whose traffic counts were forgotten, with their frontend id.
    pub forgotten_backends: Vec<(u32, Backend)>,
    /// Conntrack service entries written.
    pub flows: Vec<(FlowKey, CtEntry)>,
}

impl FakeMaps {
    pub fn new(services_max: usize, backends_max: usize) -> Self {
        Self { services_max, backends_max, ..Self::default() }
    }

    /// A frontend's backends as the datapath would read them: the slots of
    /// its current backend set, ready ones first.
    pub fn backends_of(&self, value: &ServiceValue) -> Vec<Backend> {
        (0..value.backend_count + value.terminating_count)
            .filter_map(|slot| self.backends.get(&BackendKey { set: value.backend_set, slot }).copied())
            .collect()
    }
}

fn insert<K: Ord, V>(map: &mut BTreeMap<K, V>, max: usize, key: K, value: V) -> Result<(), MapIoError> {
    if !map.contains_key(&key) && map.len() >= max {
        return Err(MapIoError::Full);
    }
    map.insert(key, value);
    Ok(())
}

impl ServiceMaps for FakeMaps {
    fn contents(&self) -> MapContents {
        MapContents {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.keys().copied().collect(),
            source_ranges: self.source_ranges.iter().copied().collect(),
            cluster_scopes: self.cluster_scope.iter().map(|(k, v)| (*k, *v)).collect(),
            affinity_timeouts: self.affinity.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }

    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapIoError> {
        insert(&mut self.services, self.services_max, key, value)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapIoError> {
        self.services.remove(key);
        Ok(())
    }

    fn set_backend(&mut self, key: BackendKey, backend: Backend) -> Result<(), MapIoError> {
        insert(&mut self.backends, self.backends_max, key, backend)
    }

    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), MapIoError> {
        self.backends.remove(key);
        Ok(())
    }

    fn backend(&self, key: &BackendKey) -> Option<Backend> {
        self.backends.get(key).copied()
    }

    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key).copied()
    }

    fn set_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapIoError> {
        self.source_ranges.insert((id, range));
        Ok(())
    }

    fn set_cluster_scope(&mut self, id: u32, value: ServiceValue) -> Result<(), MapIoError> {
        self.cluster_scope.insert(id, value);
        Ok(())
    }

    fn set_affinity(&mut self, id: u32, timeout: u32) -> Result<(), MapIoError> {
        self.affinity.insert(id, timeout);
        Ok(())
    }

    fn remove_affinity(&mut self, id: u32) -> Result<(), MapIoError> {
        self.affinity.remove(&id);
        Ok(())
    }

    fn remove_cluster_scope(&mut self, id: u32) -> Result<(), MapIoError> {
        self.cluster_scope.remove(&id);
        Ok(())
    }

    fn remove_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapIoError> {
        self.source_ranges.remove(&(id, range));
        Ok(())
    }

    fn forget_traffic(&mut self, service_id: u32, backends: Option<&[Backend]>) {
        match backends {
            None => self.forgotten_traffic.push(service_id),
            Some(gone) => self.forgotten_backends.extend(gone.iter().map(|b| (service_id, *b))),
        }
    }

    fn forget_udp_flows(&mut self, _service_id: u32, _keep: &KeepEndpoints) -> usize {
        0
    }

    fn track_flows(&mut self, flows: &[(FlowKey, CtEntry)]) -> Result<(), MapIoError> {
        self.flows.extend(flows.iter().copied());
        Ok(())
    }

    fn flow(&self, key: &FlowKey) -> Option<CtEntry> {
        self.flows.iter().rev().find(|(k, _)| k == key).map(|(_, e)| *e)
    }
}

/// Wraps maps so that every write after the first `ok_writes` fails.
#[derive(Debug)]
pub struct Faulty<M> {
    pub inner: M,
    pub ok_writes: usize,
}

impl<M> Faulty<M> {
    fn write(&mut self) -> Result<(), MapIoError> {
        if self.ok_writes == 0 {
            return Err(MapIoError::Failed("injected failure".into()));
        }
        self.ok_writes -= 1;
        Ok(())
    }
}

impl<M: ServiceMaps> ServiceMaps for Faulty<M> {
    fn contents(&self) -> MapContents {
        self.inner.contents()
    }

    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.set_service(key, value)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.remove_service(key)
    }

    fn set_backend(&mut self, key: BackendKey, backend: Backend) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.set_backend(key, backend)
    }

    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.remove_backend(key)
    }

    fn backend(&self, key: &BackendKey) -> Option<Backend> {
        self.inner.backend(key)
    }

    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.inner.service(key)
    }

    fn set_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.set_source_range(id, range)
    }

    fn remove_source_range(&mut self, id: u32, range: Cidr) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.remove_source_range(id, range)
    }

    fn set_cluster_scope(&mut self, id: u32, value: ServiceValue) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.set_cluster_scope(id, value)
    }

    fn remove_cluster_scope(&mut self, id: u32) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.remove_cluster_scope(id)
    }

    fn set_affinity(&mut self, id: u32, timeout: u32) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.set_affinity(id, timeout)
    }

    fn remove_affinity(&mut self, id: u32) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.remove_affinity(id)
    }

    fn forget_traffic(&mut self, service_id: u32, backends: Option<&[Backend]>) {
        self.inner.forget_traffic(service_id, backends);
    }

    fn forget_udp_flows(&mut self, service_id: u32, keep: &KeepEndpoints) -> usize {
        self.inner.forget_udp_flows(service_id, keep)
    }

    fn track_flows(&mut self, flows: &[(FlowKey, CtEntry)]) -> Result<(), MapIoError> {
        self.write()?;
        self.inner.track_flows(flows)
    }

    fn flow(&self, key: &FlowKey) -> Option<CtEntry> {
        self.inner.flow(key)
    }
}
