//! The object store behind the test API server: objects by kind, namespace
//! and name, a global resourceVersion, and a bounded event history from
//! which watches resume (older versions get 410 Gone, as after etcd
//! compaction).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The kinds the project uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Pod,
    Event,
    Lease,
    ConfigMap,
    Secret,
    ServiceAccount,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Pod,
        Kind::Event,
        Kind::Lease,
        Kind::ConfigMap,
        Kind::Secret,
        Kind::ServiceAccount,
    ];

    pub fn from_path(group_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.group_version() == group_version && k.plural() == plural)
    }

    pub fn group_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Lease => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Event => "events",
            Kind::Lease => "leases",
            Kind::ConfigMap => "configmaps",
            Kind::Secret => "secrets",
            Kind::ServiceAccount => "serviceaccounts",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Event => "Event",
            Kind::Lease => "Lease",
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
            Kind::ServiceAccount => "ServiceAccount",
        }
    }

    pub fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: Kind,
    pub type_: EventType,
    /// The object before a modification, to turn selector changes into
    /// ADDED/DELETED as the API server does.
    pub old: Option<Value>,
    pub object: Value,
}

/// An API error with its HTTP status and Status reason.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into() }
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

type Key = (Kind, String, String);

pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    /// Watches from a version below this have lost events: 410 Gone.
    oldest_resumable: u64,
    history_limit: usize,
    uid: u64,
    pub tx: broadcast::Sender<Arc<Event>>,
}

/// Where a watch starts: replayed events, then live ones from the receiver.
pub struct WatchStart {
    pub backlog: Vec<Arc<Event>>,
    pub live: broadcast::Receiver<Arc<Event>>,
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(65_536);
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            oldest_resumable: 0,
            history_limit,
            uid: 0,
            tx,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn key(kind: Kind, object: &Value) -> Result<Key, ApiError> {
        let name = meta_str(object, "name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::new(422, "Invalid", "metadata.name: Required value"))?;
        let ns = if kind.namespaced() { meta_str(object, "namespace").unwrap_or("default") } else { "" };
        Ok((kind, ns.to_string(), name.to_string()))
    }

    fn record(&mut self, kind: Kind, type_: EventType, old: Option<Value>, object: Value) {
        let event = Arc::new(Event { rv: self.rv, kind, type_, old, object });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            let dropped = self.history.pop_front().unwrap();
            self.oldest_resumable = dropped.rv;
        }
        // No receivers is fine: nobody is watching.
        self.tx.send(event).ok();
    }

    /// Stamps kind, apiVersion, namespace, uid, creation time and a new resourceVersion.
    fn stamp(&mut self, kind: Kind, object: &mut Value, existing: Option<&Value>) {
        self.rv += 1;
        let obj = object.as_object_mut().expect("objects are JSON objects");
        obj.insert("kind".into(), kind.name().into());
        obj.insert("apiVersion".into(), kind.group_version().into());
        let meta = obj.entry("metadata").or_insert_with(|| json!({})).as_object_mut().unwrap();
        if kind.namespaced() && !meta.contains_key("namespace") {
            meta.insert("namespace".into(), "default".into());
        }
        let (uid, created) = match existing {
            Some(e) => (e["metadata"]["uid"].clone(), e["metadata"]["creationTimestamp"].clone()),
            None => {
                self.uid += 1;
                (json!(format!("00000000-0000-4000-8000-{:012}", self.uid)), json!("2026-01-01T00:00:00Z"))
            }
        };
        meta.insert("uid".into(), uid);
        meta.insert("creationTimestamp".into(), created);
        meta.insert("resourceVersion".into(), self.rv.to_string().into());
    }

    pub fn create(&mut self, kind: Kind, mut object: Value) -> Result<Value, ApiError> {
        let key = Self::key(kind, &object)?;
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(409, "AlreadyExists", format!("{} \"{}\" already exists", kind.plural(), key.2)));
        }
        self.stamp(kind, &mut object, None);
        self.objects.insert(key, object.clone());
        self.record(kind, EventType::Added, None, object.clone());
        Ok(object)
    }

    /// Replaces an object. A resourceVersion in the request must match
    /// (optimistic concurrency); none means "whatever is there".
    pub fn update(&mut self, kind: Kind, mut object: Value) -> Result<Value, ApiError> {
        let key = Self::key(kind, &object)?;
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::new(404, "NotFound", format!("{} \"{}\" not found", kind.plural(), key.2)));
        };
        if let Some(rv) = meta_str(&object, "resourceVersion").filter(|r| !r.is_empty())
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version",
            ));
        }
        self.stamp(kind, &mut object, Some(&old));
        self.objects.insert(key, object.clone());
        self.record(kind, EventType::Modified, Some(old), object.clone());
        Ok(object)
    }

    /// Creates or replaces.
    pub fn apply(&mut self, kind: Kind, object: Value) -> Result<Value, ApiError> {
        let key = Self::key(kind, &object)?;
        if self.objects.contains_key(&key) { self.update(kind, object) } else { self.create(kind, object) }
    }

    /// Deletes an object. A Pod bound to a node is deleted gracefully, as by
    /// the API server: it gets a deletionTimestamp and stays until its
    /// kubelet deletes it again with a grace period of 0 (`grace`).
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str, grace: Option<i64>) -> Result<Value, ApiError> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let key = (kind, ns.to_string(), name.to_string());
        let Some(existing) = self.objects.get(&key) else {
            return Err(ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", kind.plural())));
        };
        let bound = existing.pointer("/spec/nodeName").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
        if kind == Kind::Pod && bound && grace != Some(0) {
            if existing.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(existing.clone());
            }
            let old = existing.clone();
            let mut object = existing.clone();
            let grace = grace
                .or_else(|| object.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64))
                .unwrap_or(30);
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            let now = k8s_openapi::jiff::Timestamp::from_second(secs as i64).map(|t| t.to_string()).unwrap_or_default();
            object["metadata"]["deletionTimestamp"] = now.into();
            object["metadata"]["deletionGracePeriodSeconds"] = grace.into();
            self.rv += 1;
            object["metadata"]["resourceVersion"] = self.rv.to_string().into();
            self.objects.insert(key, object.clone());
            self.record(kind, EventType::Modified, Some(old), object.clone());
            return Ok(object);
        }
        let mut object = self.objects.remove(&key).expect("checked above");
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.record(kind, EventType::Deleted, None, object.clone());
        Ok(object)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let ns = if kind.namespaced() { namespace } else { "" };
        self.objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", kind.plural())))
    }

    /// Objects of `kind` (in `namespace` if given), in key order.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Starts a watch of `kind` after version `from` (None or 0: the current
    /// objects as ADDED events, then changes).
    pub fn watch(&self, kind: Kind, from: Option<u64>) -> Result<WatchStart, ApiError> {
        let live = self.tx.subscribe();
        let backlog = match from {
            None | Some(0) => self
                .list(kind, None)
                .into_iter()
                .map(|object| Arc::new(Event { rv: self.rv, kind, type_: EventType::Added, old: None, object }))
                .collect(),
            Some(rv) if rv < self.oldest_resumable => {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({})", self.oldest_resumable),
                ));
            }
            Some(rv) => self.history.iter().filter(|e| e.kind == kind && e.rv > rv).cloned().collect(),
        };
        Ok(WatchStart { backlog, live })
    }

    /// Forgets all history, as a restarted API server's empty watch cache:
    /// every watch from an older version must re-list.
    pub fn compact(&mut self) {
        self.history.clear();
        self.rv += 1;
        self.oldest_resumable = self.rv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"clusterIP": "10.96.0.1"}})
    }

    #[test]
    fn versions_increase_and_watches_resume() {
        let mut s = Store::new(100);
        let a = s.create(Kind::Service, svc("a")).unwrap();
        let rv_a: u64 = a["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        assert_eq!(a["metadata"]["namespace"], "default");
        s.create(Kind::Service, svc("b")).unwrap();
        s.delete(Kind::Service, "default", "a", None).unwrap();
        let w = s.watch(Kind::Service, Some(rv_a)).unwrap();
        let types: Vec<_> = w.backlog.iter().map(|e| e.type_).collect();
        assert_eq!(types, [EventType::Added, EventType::Deleted]);
        assert!(s.create(Kind::Service, svc("b")).is_err(), "409 on duplicate");
    }

    #[test]
    fn compaction_expires_old_versions() {
        let mut s = Store::new(2);
        for n in ["a", "b", "c", "d"] {
            s.create(Kind::Service, svc(n)).unwrap();
        }
        assert_eq!(s.watch(Kind::Service, Some(2)).err().unwrap().code, 410);
        let rv = s.resource_version();
        assert!(s.watch(Kind::Service, Some(rv)).is_ok());
        s.compact();
        assert_eq!(s.watch(Kind::Service, Some(rv)).err().unwrap().code, 410);
    }

    #[test]
    fn stale_updates_conflict() {
        let mut s = Store::new(10);
        let a = s.create(Kind::Service, svc("a")).unwrap();
        s.update(Kind::Service, a.clone()).unwrap();
        assert_eq!(s.update(Kind::Service, a).unwrap_err().code, 409);
    }
}
