//! Watch events applied to the index by one pure, synchronous function, as
//! kube-runtime's reflector store does: objects of a (re-)list are buffered
//! from `Init` to `InitDone` and only then reconciled with the index
//! (changed ones applied, vanished ones removed), so what is programmed
//! keeps serving during a re-list and nothing stale survives it.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::watcher::Event;

use crate::{
    index::Index,
    name::ObjectName,
    validate::{self, ModelConfig, Object},
};

/// How one kind goes into the index.
pub trait Kind: kube::Resource<DynamicType = ()> + Sized {
    fn validate(&self, origin: &Arc<str>, config: &ModelConfig) -> Object;
    fn delete(index: &mut Index, name: &ObjectName);
    fn held(index: &Index) -> Vec<ObjectName>;
    fn held_version<'a>(index: &'a Index, name: &ObjectName) -> Option<&'a str>;
}

impl Kind for Service {
    fn validate(&self, origin: &Arc<str>, config: &ModelConfig) -> Object {
        Object::Service(validate::service(self, origin, config))
    }
    fn delete(index: &mut Index, name: &ObjectName) {
        index.delete_service(name);
    }
    fn held(index: &Index) -> Vec<ObjectName> {
        index.service_names()
    }
    fn held_version<'a>(index: &'a Index, name: &ObjectName) -> Option<&'a str> {
        index.service_version(name)
    }
}

impl Kind for EndpointSlice {
    fn validate(&self, origin: &Arc<str>, config: &ModelConfig) -> Object {
        Object::Slice(validate::slice(self, origin, config))
    }
    fn delete(index: &mut Index, name: &ObjectName) {
        index.delete_slice(name);
    }
    fn held(index: &Index) -> Vec<ObjectName> {
        index.slice_names()
    }
    fn held_version<'a>(index: &'a Index, name: &ObjectName) -> Option<&'a str> {
        index.slice_version(name)
    }
}

/// What an event did to the index.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Nothing yet (a re-list is being buffered).
    Buffered,
    /// Objects changed.
    Changed,
    /// A list completed and was reconciled: the kind is now listed in full.
    Listed,
}

/// The watch state of one kind.
pub struct Reflector {
    origin: Arc<str>,
    config: ModelConfig,
    /// Objects of a list in progress, validated, by name.
    relist: Option<HashMap<ObjectName, Object>>,
}

fn version(o: &Object) -> Option<&str> {
    match o {
        Object::Service(s) => s.version.as_deref(),
        Object::Slice(s) => s.version.as_deref(),
    }
}

impl Reflector {
    pub fn new(origin: &str, config: ModelConfig) -> Self {
        Self { origin: origin.into(), config, relist: None }
    }

    /// Applies one watch event to `index`.
    pub fn apply<K: Kind>(&mut self, index: &mut Index, event: Event<K>) -> Applied {
        match event {
            Event::Apply(o) => {
                let object = o.validate(&self.origin, &self.config);
                if let Some(buffer) = &mut self.relist {
                    buffer.insert(ObjectName::of(o.meta()), object.clone());
                }
                index.apply(object);
                Applied::Changed
            }
            Event::Delete(o) => {
                let name = ObjectName::of(o.meta());
                if let Some(buffer) = &mut self.relist {
                    buffer.remove(&name);
                }
                K::delete(index, &name);
                Applied::Changed
            }
            Event::Init => {
                self.relist = Some(HashMap::new());
                Applied::Buffered
            }
            Event::InitApply(o) => {
                let object = o.validate(&self.origin, &self.config);
                self.relist.get_or_insert_with(HashMap::new).insert(ObjectName::of(o.meta()), object);
                Applied::Buffered
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                reconcile::<K>(index, listed);
                Applied::Listed
            }
        }
    }
}

/// Puts a complete list into the index: new and changed objects applied,
/// objects it no longer holds deleted.
fn reconcile<K: Kind>(index: &mut Index, listed: HashMap<ObjectName, Object>) {
    for name in K::held(index) {
        if !listed.contains_key(&name) {
            K::delete(index, &name);
        }
    }
    for (name, object) in listed {
        let unchanged = version(&object).is_some() && K::held_version(index, &name) == version(&object);
        if !unchanged {
            index.apply(object);
        }
    }
}

#[cfg(test)]
mod tests;
