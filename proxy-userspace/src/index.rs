//! The objects a source currently holds, indexed for incremental syncs:
//! Services by name, EndpointSlices by the Service they belong to, and the
//! set of Services touched since the last sync. A change to one object
//! costs work for its Service only, however many Services there are.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::model::{RejectReason, Rejection, SERVICE_NAME_LABEL, Snapshot, Sourced};

/// `(namespace, name)` of a Service.
pub type ServiceRef = (String, String);

fn namespace(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

/// Which Services must be recomputed.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Dirty {
    #[default]
    None,
    All,
    Some(HashSet<ServiceRef>),
}

#[derive(Default)]
pub struct Index {
    services: HashMap<ServiceRef, Sourced<Service>>,
    slices: HashMap<ServiceRef, BTreeMap<String, Sourced<EndpointSlice>>>,
    /// (namespace, slice name) -> the Service its label names.
    slice_owner: HashMap<(String, String), ServiceRef>,
    /// Slices that name no Service, by (namespace, slice name).
    unowned: BTreeMap<(String, String), Rejection>,
    /// Objects the source itself could not read, by origin (file).
    unreadable: BTreeMap<String, Vec<Rejection>>,
    dirty: HashSet<ServiceRef>,
    all_dirty: bool,
}

impl Index {
    pub fn from_snapshot(snapshot: &Snapshot) -> Self {
        let mut index = Self::default();
        for s in &snapshot.services {
            index.apply_service(s.clone());
        }
        for s in &snapshot.slices {
            index.apply_slice(s.clone());
        }
        for r in &snapshot.rejected {
            index.unreadable.entry(r.origin.clone()).or_default().push(r.clone());
        }
        index.all_dirty = true;
        index
    }

    fn touch(&mut self, key: ServiceRef) {
        if !self.all_dirty {
            self.dirty.insert(key);
        }
    }

    pub fn apply_service(&mut self, s: Sourced<Service>) {
        let key = (namespace(&s.object.metadata), s.object.metadata.name.clone().unwrap_or_default());
        self.services.insert(key.clone(), s);
        self.touch(key);
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        if self.services.remove(&key).is_some() {
            self.touch(key);
        }
    }

    pub fn apply_slice(&mut self, s: Sourced<EndpointSlice>) {
        let meta = &s.object.metadata;
        let id = (namespace(meta), meta.name.clone().unwrap_or_default());
        self.delete_slice(&id.0, &id.1);
        let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            self.unowned.insert(
                id.clone(),
                Rejection {
                    origin: s.origin.to_string(),
                    object: format!("EndpointSlice {}/{}", id.0, id.1),
                    kind: RejectReason::MissingServiceLabel,
                    reason: format!("has no {SERVICE_NAME_LABEL} label"),
                },
            );
            return;
        };
        let owner = (id.0.clone(), service.clone());
        self.slices.entry(owner.clone()).or_default().insert(id.1.clone(), s);
        self.slice_owner.insert(id, owner.clone());
        self.touch(owner);
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let id = (namespace.to_string(), name.to_string());
        self.unowned.remove(&id);
        if let Some(owner) = self.slice_owner.remove(&id) {
            if let Some(set) = self.slices.get_mut(&owner) {
                set.remove(name);
                if set.is_empty() {
                    self.slices.remove(&owner);
                }
            }
            self.touch(owner);
        }
    }

    /// Replaces what `origin` could not read.
    pub fn set_unreadable(&mut self, origin: &str, rejected: Vec<Rejection>) {
        if rejected.is_empty() {
            self.unreadable.remove(origin);
        } else {
            self.unreadable.insert(origin.to_string(), rejected);
        }
    }

    /// Marks one Service for recomputation.
    pub fn mark(&mut self, key: ServiceRef) {
        self.touch(key);
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

    pub fn service(&self, key: &ServiceRef) -> Option<&Sourced<Service>> {
        self.services.get(key)
    }

    pub fn slices_of(&self, key: &ServiceRef) -> impl Iterator<Item = &Sourced<EndpointSlice>> {
        self.slices.get(key).into_iter().flat_map(|m| m.values())
    }

    pub fn service_keys(&self) -> impl Iterator<Item = &ServiceRef> {
        self.services.keys()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Rejections that belong to no Service: unreadable documents and
    /// slices without a Service label.
    pub fn loose_rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.unreadable.values().flatten().chain(self.unowned.values())
    }

    /// Keys of every Service and slice held, for a re-list to find what vanished.
    pub fn service_names(&self) -> Vec<ServiceRef> {
        self.services.keys().cloned().collect()
    }

    pub fn slice_names(&self) -> Vec<(String, String)> {
        self.slice_owner.keys().chain(self.unowned.keys()).cloned().collect()
    }

    /// The resourceVersion of a held Service, to skip unchanged objects in a re-list.
    pub fn service_version(&self, key: &ServiceRef) -> Option<&str> {
        self.services.get(key)?.object.metadata.resource_version.as_deref()
    }

    pub fn slice_version(&self, namespace: &str, name: &str) -> Option<&str> {
        let owner = self.slice_owner.get(&(namespace.to_string(), name.to_string()))?;
        self.slices.get(owner)?.get(name)?.object.metadata.resource_version.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Sourced<Service> {
        Sourced::new("t", serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap())
    }

    fn slice(name: &str, service: Option<&str>) -> Sourced<EndpointSlice> {
        let labels = service.map(|s| serde_json::json!({SERVICE_NAME_LABEL: s}));
        Sourced::new(
            "t",
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": labels}, "addressType": "IPv4"}),
            )
            .unwrap(),
        )
    }

    fn key(n: &str) -> ServiceRef {
        ("default".into(), n.into())
    }

    #[test]
    fn changes_mark_only_their_service() {
        let mut i = Index::default();
        i.apply_service(svc("a"));
        i.apply_service(svc("b"));
        assert_eq!(i.take_dirty(), Dirty::Some([key("a"), key("b")].into()));
        assert_eq!(i.take_dirty(), Dirty::None);
        i.apply_slice(slice("a-1", Some("a")));
        assert_eq!(i.take_dirty(), Dirty::Some([key("a")].into()));
        assert_eq!(i.slices_of(&key("a")).count(), 1);
    }

    #[test]
    fn a_slice_moving_between_services_touches_both() {
        let mut i = Index::default();
        i.apply_slice(slice("x", Some("a")));
        i.take_dirty();
        i.apply_slice(slice("x", Some("b")));
        assert_eq!(i.take_dirty(), Dirty::Some([key("a"), key("b")].into()));
        assert_eq!(i.slices_of(&key("a")).count(), 0);
        i.delete_slice("default", "x");
        assert_eq!(i.take_dirty(), Dirty::Some([key("b")].into()));
        assert_eq!(i.slices_of(&key("b")).count(), 0);
    }

    #[test]
    fn unlabelled_slices_are_rejected_and_forgotten_on_delete() {
        let mut i = Index::default();
        i.apply_slice(slice("loose", None));
        assert_eq!(i.loose_rejections().count(), 1);
        i.delete_slice("default", "loose");
        assert_eq!(i.loose_rejections().count(), 0);
    }
}
