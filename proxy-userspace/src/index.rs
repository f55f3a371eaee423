//! The objects the sources currently hold, validated, indexed for
//! incremental syncs: Services by name, EndpointSlices by the Service they
//! belong to, and the set of Services touched since the last sync. A change
//! to one object costs work for its Service only, however many Services
//! there are.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{
    frontend::DnsCapture,
    name::ObjectName,
    rejection::Rejection,
    validate::{Object, ServiceInfo, SliceInfo},
};

/// Which Services must be recomputed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Dirty {
    #[default]
    None,
    All,
    Some(HashSet<ObjectName>),
}

/// What a source could read: validated objects, and documents it could not
/// read at all.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub objects: Vec<Object>,
    pub unreadable: Vec<Rejection>,
}

/// What the index holds under one Service name: the Service once it has
/// arrived, and the slices naming it (which may arrive first). One map for
/// both keeps one key and one table slot per Service.
#[derive(Default)]
struct Entry {
    service: Option<ServiceInfo>,
    /// A Service has a few slices (one per 100 endpoints), so a small
    /// vector beats a map per Service in memory by far.
    slices: Vec<SliceInfo>,
}

/// Services touched since a consumer last took them.
struct Touched {
    all: bool,
    names: HashSet<ObjectName>,
}

impl Default for Touched {
    /// Everything: a consumer's first take recomputes all (and a cold start
    /// of 50,000 Services then keeps no set of 50,000 names).
    fn default() -> Self {
        Self { all: true, names: HashSet::new() }
    }
}

impl Touched {
    fn touch(&mut self, key: ObjectName) {
        if !self.all {
            self.names.insert(key);
        }
    }

    fn take(&mut self) -> Dirty {
        if std::mem::take(&mut self.all) {
            self.names.clear();
            return Dirty::All;
        }
        if self.names.is_empty() { Dirty::None } else { Dirty::Some(std::mem::take(&mut self.names)) }
    }
}

pub struct Index {
    services: HashMap<ObjectName, Entry>,
    /// Slice -> the Service its label names.
    slice_owner: HashMap<ObjectName, ObjectName>,
    /// Slices that name no Service.
    unowned: BTreeMap<ObjectName, SliceInfo>,
    /// Documents a source could not read, by origin (file).
    unreadable: BTreeMap<String, Vec<Rejection>>,
    /// Rejections raised since the last [`Index::take_new_rejections`].
    new_rejections: Vec<Rejection>,
    rejection_count: usize,
    /// What the model must recompute.
    dirty: Touched,
    /// What the DNS zone must rebuild, when the DNS add-on runs: it follows
    /// changes on its own, not waiting for the dataplane's sync.
    dns_dirty: Option<Touched>,
    /// This node's zone (its `topology.kubernetes.io/zone` label), for
    /// topology-aware routing.
    zone: Option<std::sync::Arc<str>>,
    /// The DNS add-on standing in for the cluster DNS Service.
    dns_capture: Option<DnsCapture>,
}

impl Default for Index {
    /// An empty index; its first [`Index::take_dirty`] says everything, as a
    /// first sync must recompute all (and a cold start of 50,000 Services
    /// then keeps no set of 50,000 names).
    fn default() -> Self {
        Self {
            services: HashMap::new(),
            slice_owner: HashMap::new(),
            unowned: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            new_rejections: Vec::new(),
            rejection_count: 0,
            dirty: Touched::default(),
            dns_dirty: None,
            zone: None,
            dns_capture: None,
        }
    }
}

impl Index {
    /// This node's zone, as its Node's label says.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// Sets this node's zone; every Service is recomputed if it changed
    /// (their zone hints now read differently). Returns whether it did.
    pub fn set_zone(&mut self, zone: Option<&str>) -> bool {
        if self.zone.as_deref() == zone {
            return false;
        }
        tracing::info!(zone = zone.unwrap_or("(none)"), "this node's zone");
        self.zone = zone.map(std::sync::Arc::from);
        self.touch_all();
        true
    }

    pub fn dns_capture(&self) -> Option<&DnsCapture> {
        self.dns_capture.as_ref()
    }

    /// Sets whether and where the DNS add-on takes the cluster DNS
    /// Service's traffic; the Services concerned are recomputed. Returns
    /// whether anything changed.
    pub fn set_dns_capture(&mut self, capture: Option<DnsCapture>) -> bool {
        if self.dns_capture == capture {
            return false;
        }
        let touched: Vec<ObjectName> =
            self.dns_capture.iter().chain(capture.iter()).map(|c| c.service.clone()).collect();
        self.dns_capture = capture;
        for name in touched {
            self.touch(name);
        }
        true
    }

    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        let mut index = Self::default();
        for object in snapshot.objects {
            index.apply(object);
        }
        index.set_unreadable("", snapshot.unreadable);
        index
    }

    fn touch(&mut self, key: ObjectName) {
        if let Some(dns) = &mut self.dns_dirty {
            dns.touch(key.clone());
        }
        self.dirty.touch(key);
    }

    /// Counts what `old` -> `new` rejections change, noting the new ones.
    fn account(&mut self, old: &[Rejection], new: &[Rejection]) {
        self.rejection_count = self.rejection_count + new.len() - old.len();
        self.new_rejections.extend(new.iter().filter(|r| !old.contains(r)).cloned());
    }

    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Service(s) => self.apply_service(s),
            Object::Slice(s) => self.apply_slice(s),
        }
    }

    /// The held copy of `name` if there is one, so every holder shares it.
    fn shared(&self, name: ObjectName) -> ObjectName {
        self.services.get_key_value(&name).map_or(name, |(k, _)| k.clone())
    }

    pub fn apply_service(&mut self, mut s: ServiceInfo) {
        s.name = self.shared(s.name);
        let key = s.name.clone();
        let old = self.services.get_mut(&key).and_then(|e| e.service.take());
        self.account(old.as_ref().map_or(&[], |o| &o.rejections[..]), &s.rejections);
        self.services.entry(key.clone()).or_default().service = Some(s);
        self.touch(key);
    }

    pub fn delete_service(&mut self, name: &ObjectName) {
        let Some(entry) = self.services.get_mut(name) else { return };
        let Some(old) = entry.service.take() else { return };
        if entry.slices.is_empty() {
            self.services.remove(name);
        }
        self.account(&old.rejections, &[]);
        self.touch(name.clone());
    }

    pub fn apply_slice(&mut self, mut s: SliceInfo) {
        let old = self.remove_slice(&s.name);
        self.account(old.as_ref().map_or(&[], |o| &o.rejections[..]), &s.rejections);
        let Some(owner) = s.service.take() else {
            self.unowned.insert(s.name.clone(), s);
            return;
        };
        let owner = self.shared(owner);
        s.service = Some(owner.clone());
        self.slice_owner.insert(s.name.clone(), owner.clone());
        let slices = &mut self.services.entry(owner.clone()).or_default().slices;
        // Most Services have one slice: room for one, not the four a first push reserves.
        slices.reserve_exact(1);
        slices.push(s);
        self.touch(owner);
    }

    pub fn delete_slice(&mut self, name: &ObjectName) {
        if let Some(old) = self.remove_slice(name) {
            self.account(&old.rejections, &[]);
        }
    }

    /// Takes a slice out, marking the Service it belonged to.
    fn remove_slice(&mut self, name: &ObjectName) -> Option<SliceInfo> {
        if let Some(old) = self.unowned.remove(name) {
            return Some(old);
        }
        let owner = self.slice_owner.remove(name)?;
        let entry = self.services.get_mut(&owner)?;
        let old = entry.slices.iter().position(|s| s.name == *name).map(|at| entry.slices.swap_remove(at));
        if entry.slices.is_empty() && entry.service.is_none() {
            self.services.remove(&owner);
        }
        self.touch(owner);
        old
    }

    /// Replaces what `origin` could not read.
    pub fn set_unreadable(&mut self, origin: &str, rejected: Vec<Rejection>) {
        let old = if rejected.is_empty() {
            self.unreadable.remove(origin)
        } else {
            self.unreadable.insert(origin.to_string(), rejected.clone())
        };
        self.account(old.as_deref().unwrap_or_default(), &rejected);
    }

    /// Marks every Service for recomputation (after a re-list).
    pub fn touch_all(&mut self) {
        self.dirty = Touched::default();
        if let Some(dns) = &mut self.dns_dirty {
            *dns = Touched::default();
        }
    }

    /// What changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        self.dirty.take()
    }

    /// Starts tracking what the DNS zone must rebuild (everything, first).
    pub fn track_dns(&mut self) {
        self.dns_dirty = Some(Touched::default());
    }

    /// What changed since the DNS zone last took it ([`Dirty::None`] when
    /// DNS is not tracked).
    pub fn take_dns_dirty(&mut self) -> Dirty {
        self.dns_dirty.as_mut().map_or(Dirty::None, Touched::take)
    }

    pub fn service(&self, key: &ObjectName) -> Option<&ServiceInfo> {
        self.services.get(key)?.service.as_ref()
    }

    pub fn slices_of(&self, key: &ObjectName) -> impl Iterator<Item = &SliceInfo> {
        self.services.get(key).into_iter().flat_map(|e| &e.slices)
    }

    fn held_services(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.services.values().filter_map(|e| e.service.as_ref())
    }

    pub fn service_keys(&self) -> impl Iterator<Item = &ObjectName> {
        self.held_services().map(|s| &s.name)
    }

    pub fn service_count(&self) -> usize {
        self.held_services().count()
    }

    /// Every rejection of a held object, and every unreadable document.
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        let services = self.held_services().flat_map(|s| &s.rejections);
        let slices = self.services.values().flat_map(|e| &e.slices).chain(self.unowned.values());
        services.chain(slices.flat_map(|s| &s.rejections)).chain(self.unreadable.values().flatten())
    }

    /// How many rejections there are (without walking every object).
    pub fn rejection_count(&self) -> usize {
        self.rejection_count
    }

    /// Rejections raised since the last call, each once, for logs and counters.
    pub fn take_new_rejections(&mut self) -> Vec<Rejection> {
        std::mem::take(&mut self.new_rejections)
    }

    /// Names of every Service and slice held, for a re-list to find what vanished.
    pub fn service_names(&self) -> Vec<ObjectName> {
        self.service_keys().cloned().collect()
    }

    pub fn slice_names(&self) -> Vec<ObjectName> {
        self.slice_owner.keys().chain(self.unowned.keys()).cloned().collect()
    }

    /// The resourceVersion of a held Service, to skip unchanged objects in a re-list.
    pub fn service_version(&self, key: &ObjectName) -> Option<&str> {
        self.service(key)?.version.as_deref()
    }

    pub fn slice_version(&self, key: &ObjectName) -> Option<&str> {
        if let Some(s) = self.unowned.get(key) {
            return s.version.as_deref();
        }
        let owner = self.slice_owner.get(key)?;
        self.slices_of(owner).find(|s| s.name == *key)?.version.as_deref()
    }
}

#[cfg(test)]
mod tests;
