//! The cluster's names as DNS serves them, kept from the index as the
//! model is, but on their own schedule (a dataplane sync may take seconds;
//! a name must not wait for it): the Services touched since the last
//! update are rebuilt, nothing else. One
//! entry per Service holds what its name, its endpoints' names and its SRV
//! records resolve to; a reverse table answers PTR queries. Readers (the
//! server's UDP thread and TCP tasks) take a read lock per query; the
//! agent's DNS task takes the write lock for the Services it rebuilds.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::{
    index::{Dirty, Index},
    name::ObjectName,
    validate::{DnsPort, DnsTarget},
};

/// The zone, shared between the agent's DNS task (writer) and the server (readers).
pub type SharedZone = Arc<RwLock<Zone>>;

/// A ready endpoint as DNS names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedEndpoint {
    pub ip: IpAddr,
    /// Its label under the Service's name: its hostname, or its address
    /// with dashes (`10-244-1-5`), CoreDNS's name for endpoints without one.
    pub label: Box<str>,
    /// The ports of the slice it came from (SRV records of headless Services).
    pub ports: Arc<[DnsPort]>,
}

/// One Service's names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecords {
    pub target: DnsTarget,
    pub ports: Box<[DnsPort]>,
    /// Ready endpoints, de-duplicated by address, in address order.
    pub endpoints: Vec<NamedEndpoint>,
}

pub struct Zone {
    /// `--cluster-domain`, lower case, without a final dot.
    domain: Box<str>,
    services: HashMap<ObjectName, ServiceRecords>,
    /// Services per namespace: `<ns>.svc.<domain>` exists while one does.
    namespaces: HashMap<Box<str>, usize>,
    /// Address -> the names a PTR query for it answers (ClusterIPs, and
    /// headless Services' endpoints).
    reverse: HashMap<IpAddr, Vec<Box<str>>>,
    /// Bumped on every change: the SOA serial.
    serial: u32,
    /// Whether a complete list has been loaded: before, the zone knows no
    /// name and must not deny any.
    loaded: bool,
}

/// `10.244.1.5` -> `10-244-1-5`; IPv6 colons become dashes too.
pub fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

impl Zone {
    pub fn new(domain: &str) -> Self {
        Self {
            domain: domain.trim_end_matches('.').to_ascii_lowercase().into(),
            services: HashMap::new(),
            namespaces: HashMap::new(),
            reverse: HashMap::new(),
            serial: 1,
            loaded: false,
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Whether the zone holds every Service (after the first full rebuild).
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceRecords> {
        self.services.get(&ObjectName::new(namespace, name))
    }

    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.namespaces.contains_key(namespace)
    }

    /// The names a PTR query for `ip` answers.
    pub fn names_of(&self, ip: &IpAddr) -> &[Box<str>] {
        self.reverse.get(ip).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The first `max` Services' names in order, with their records.
    pub fn listing(&self, max: usize) -> Vec<(String, &ServiceRecords)> {
        let mut names: Vec<&ObjectName> = self.services.keys().collect();
        names.sort();
        names.into_iter().take(max).map(|n| (self.service_fqdn(n), &self.services[n])).collect()
    }

    /// `<service>.<namespace>.svc.<domain>`.
    pub fn service_fqdn(&self, name: &ObjectName) -> String {
        format!("{}.{}.svc.{}", name.name(), name.namespace(), self.domain)
    }

    /// Rebuilds the Services `dirty` names (every one for [`Dirty::All`]) from `index`.
    pub fn update(&mut self, index: &Index, dirty: &Dirty) {
        let names: Vec<ObjectName> = match dirty {
            Dirty::None => return,
            Dirty::All => {
                self.loaded = true;
                self.services.clear();
                self.namespaces.clear();
                self.reverse.clear();
                index.service_keys().cloned().collect()
            }
            Dirty::Some(names) => names.iter().cloned().collect(),
        };
        for name in names {
            self.remove(&name);
            if let Some(records) = records(index, &name) {
                self.insert(name, records);
            }
        }
        self.serial = self.serial.wrapping_add(1);
    }

    fn insert(&mut self, name: ObjectName, records: ServiceRecords) {
        let fqdn = self.service_fqdn(&name);
        for (ip, target) in reverse_names(&fqdn, &records) {
            self.reverse.entry(ip).or_default().push(target.into());
        }
        *self.namespaces.entry(name.namespace().into()).or_default() += 1;
        self.services.insert(name, records);
    }

    fn remove(&mut self, name: &ObjectName) {
        let Some(old) = self.services.remove(name) else { return };
        let fqdn = self.service_fqdn(name);
        for (ip, target) in reverse_names(&fqdn, &old) {
            if let Some(names) = self.reverse.get_mut(&ip) {
                names.retain(|n| **n != *target);
                if names.is_empty() {
                    self.reverse.remove(&ip);
                }
            }
        }
        if let Some(count) = self.namespaces.get_mut(name.namespace()) {
            *count -= 1;
            if *count == 0 {
                self.namespaces.remove(name.namespace());
            }
        }
    }
}

/// The PTR names a Service's records give: its ClusterIPs name the
/// Service; a headless Service's endpoints name themselves under it.
fn reverse_names(fqdn: &str, records: &ServiceRecords) -> Vec<(IpAddr, String)> {
    match &records.target {
        DnsTarget::ClusterIps(ips) => ips.iter().map(|ip| (*ip, fqdn.to_string())).collect(),
        DnsTarget::Headless => records.endpoints.iter().map(|e| (e.ip, format!("{}.{fqdn}", e.label))).collect(),
        DnsTarget::ExternalName(_) => Vec::new(),
    }
}

/// A Service's records from what the index holds of it and its slices.
fn records(index: &Index, name: &ObjectName) -> Option<ServiceRecords> {
    let dns = index.service(name)?.dns.as_deref()?;
    let mut endpoints: Vec<NamedEndpoint> = Vec::new();
    if dns.target == DnsTarget::Headless {
        for slice in index.slices_of(name).filter_map(|s| s.dns()) {
            let ports: Arc<[DnsPort]> = slice.ports.clone().into();
            for ep in slice.endpoints.iter().filter(|e| e.ready) {
                let label = ep.hostname.as_deref().map_or_else(|| dashed(ep.ip), str::to_string);
                endpoints.push(NamedEndpoint { ip: ep.ip, label: label.into(), ports: ports.clone() });
            }
        }
        endpoints.sort_by_key(|e| e.ip);
        // One address in two slices (a move between them) is one endpoint.
        endpoints.dedup_by(|a, b| a.ip == b.ip);
    }
    Some(ServiceRecords { target: dns.target.clone(), ports: dns.ports.clone(), endpoints })
}
