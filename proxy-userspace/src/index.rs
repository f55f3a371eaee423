//! The objects the sources currently hold, validated, indexed for
//! incremental syncs: Services by name, EndpointSlices by the Service they
//! belong to, and the set of Services touched since the last sync. A change
//! to one object costs work for its Service only, however many Services
//! there are.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{
    name::ObjectName,
    rejection::Rejection,
    validate::{Object, ServiceInfo, SliceInfo},
};

/// Which Services must be recomputed.
#[derive(Debug, Default, PartialEq, Eq)]
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

pub struct Index {
    services: HashMap<ObjectName, ServiceInfo>,
    /// Service -> its slices. A Service has a few (one per 100 endpoints),
    /// so a small vector beats a map per Service in memory by far.
    slices: HashMap<ObjectName, Vec<SliceInfo>>,
    /// Slice -> the Service its label names.
    slice_owner: HashMap<ObjectName, ObjectName>,
    /// Slices that name no Service.
    unowned: BTreeMap<ObjectName, SliceInfo>,
    /// Documents a source could not read, by origin (file).
    unreadable: BTreeMap<String, Vec<Rejection>>,
    /// Rejections raised since the last [`Index::take_new_rejections`].
    new_rejections: Vec<Rejection>,
    rejection_count: usize,
    dirty: HashSet<ObjectName>,
    all_dirty: bool,
}

impl Default for Index {
    /// An empty index; its first [`Index::take_dirty`] says everything, as a
    /// first sync must recompute all (and a cold start of 50,000 Services
    /// then keeps no set of 50,000 names).
    fn default() -> Self {
        Self {
            services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            unowned: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            new_rejections: Vec::new(),
            rejection_count: 0,
            dirty: HashSet::new(),
            all_dirty: true,
        }
    }
}

impl Index {
    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        let mut index = Self::default();
        for object in snapshot.objects {
            index.apply(object);
        }
        index.set_unreadable("", snapshot.unreadable);
        index
    }

    fn touch(&mut self, key: ObjectName) {
        if !self.all_dirty {
            self.dirty.insert(key);
        }
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

    pub fn apply_service(&mut self, s: ServiceInfo) {
        let key = s.name.clone();
        let old = self.services.remove(&key);
        self.account(old.as_ref().map_or(&[], |o| &o.rejections), &s.rejections);
        self.services.insert(key.clone(), s);
        self.touch(key);
    }

    pub fn delete_service(&mut self, name: &ObjectName) {
        if let Some(old) = self.services.remove(name) {
            self.account(&old.rejections, &[]);
            self.touch(name.clone());
        }
    }

    pub fn apply_slice(&mut self, s: SliceInfo) {
        let old = self.remove_slice(&s.name);
        self.account(old.as_ref().map_or(&[], |o| &o.rejections), &s.rejections);
        let Some(owner) = s.service.clone() else {
            self.unowned.insert(s.name.clone(), s);
            return;
        };
        self.slice_owner.insert(s.name.clone(), owner.clone());
        // Most Services have one slice: room for one, not the four a first push reserves.
        self.slices.entry(owner.clone()).or_insert_with(|| Vec::with_capacity(1)).push(s);
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
        let set = self.slices.get_mut(&owner)?;
        let old = set.iter().position(|s| s.name == *name).map(|at| set.swap_remove(at));
        if set.is_empty() {
            self.slices.remove(&owner);
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
        self.all_dirty = true;
        self.dirty.clear();
    }

    /// What changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        if std::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            return Dirty::All;
        }
        if self.dirty.is_empty() { Dirty::None } else { Dirty::Some(std::mem::take(&mut self.dirty)) }
    }

    pub fn service(&self, key: &ObjectName) -> Option<&ServiceInfo> {
        self.services.get(key)
    }

    pub fn slices_of(&self, key: &ObjectName) -> impl Iterator<Item = &SliceInfo> {
        self.slices.get(key).into_iter().flatten()
    }

    pub fn service_keys(&self) -> impl Iterator<Item = &ObjectName> {
        self.services.keys()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Every rejection of a held object, and every unreadable document.
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        let services = self.services.values().flat_map(|s| &s.rejections);
        let slices = self.slices.values().flatten().chain(self.unowned.values());
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
        self.services.keys().cloned().collect()
    }

    pub fn slice_names(&self) -> Vec<ObjectName> {
        self.slice_owner.keys().chain(self.unowned.keys()).cloned().collect()
    }

    /// The resourceVersion of a held Service, to skip unchanged objects in a re-list.
    pub fn service_version(&self, key: &ObjectName) -> Option<&str> {
        self.services.get(key)?.version.as_deref()
    }

    pub fn slice_version(&self, key: &ObjectName) -> Option<&str> {
        if let Some(s) = self.unowned.get(key) {
            return s.version.as_deref();
        }
        let owner = self.slice_owner.get(key)?;
        self.slices.get(owner)?.iter().find(|s| s.name == *key)?.version.as_deref()
    }
}

#[cfg(test)]
mod tests;
