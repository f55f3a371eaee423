//! Typed names of Kubernetes objects. The namespace default (`default`) is
//! applied here and nowhere else, so two spellings of one object never
//! become two keys. Names are shared strings: the index, the model and
//! every frontend hold the same name without copying it (at 50,000
//! Services the copies were tens of MiB).

use std::{fmt, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// `namespace/name` of a namespaced object, held as that one string
/// (neither part may contain a slash), so a name costs one allocation and
/// one pointer wherever it is held.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectName(Arc<str>);

impl ObjectName {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self(format!("{namespace}/{name}").into())
    }

    /// The name in `meta`; an unset namespace is `default`, as the API server
    /// defaults it. An unset name is empty (validation rejects it).
    pub fn of(meta: &ObjectMeta) -> Self {
        let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default");
        Self::new(namespace, meta.name.as_deref().unwrap_or_default())
    }

    /// Another object of the same namespace.
    pub fn sibling(&self, name: &str) -> Self {
        Self::new(self.namespace(), name)
    }

    fn parts(&self) -> (&str, &str) {
        self.0.split_once('/').unwrap_or(("", &self.0))
    }

    pub fn namespace(&self) -> &str {
        self.parts().0
    }

    pub fn name(&self) -> &str {
        self.parts().1
    }

    /// Whether both hold one string (not only equal ones).
    #[cfg(test)]
    pub(crate) fn shares(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// By namespace, then name (not by the joined string: `a/x` sorts before `a-b/x`).
impl Ord for ObjectName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl PartialOrd for ObjectName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl serde::Serialize for ObjectName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut out = s.serialize_struct("ObjectName", 2)?;
        out.serialize_field("namespace", self.namespace())?;
        out.serialize_field("name", self.name())?;
        out.end()
    }
}

/// `namespace/name:port-name`, as kube-proxy names a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ServicePortName {
    pub service: ObjectName,
    /// The Service port's name; empty for an unnamed port.
    pub port: Arc<str>,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.service)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// A port name, shared: a cluster uses a handful of them (`http`, `dns`,
/// unnamed) over thousands of Services and slices, so each is held once.
/// The table stops growing at [`PORT_NAMES_HELD`]; past that, names are
/// simply not shared.
pub fn port_name(name: &str) -> Arc<str> {
    static HELD: std::sync::Mutex<Option<std::collections::HashSet<Arc<str>>>> = std::sync::Mutex::new(None);
    let mut held = HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let held = held.get_or_insert_with(Default::default);
    if let Some(shared) = held.get(name) {
        return shared.clone();
    }
    let name: Arc<str> = name.into();
    if held.len() < PORT_NAMES_HELD {
        held.insert(name.clone());
    }
    name
}

/// How many distinct port names are shared.
pub const PORT_NAMES_HELD: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_or_empty_namespace_is_default() {
        let meta = |ns: Option<&str>| ObjectMeta {
            name: Some("web".into()),
            namespace: ns.map(String::from),
            ..Default::default()
        };
        assert_eq!(ObjectName::of(&meta(None)), ObjectName::new("default", "web"));
        assert_eq!(ObjectName::of(&meta(Some(""))), ObjectName::new("default", "web"));
        assert_eq!(ObjectName::of(&meta(Some("shop"))).to_string(), "shop/web");
    }

    #[test]
    fn port_names_are_shared() {
        assert!(Arc::ptr_eq(&port_name("http"), &port_name("http")));
        assert_eq!(&*port_name("dns"), "dns");
    }

    #[test]
    fn unnamed_ports_print_without_a_colon() {
        let svc = ObjectName::new("shop", "web");
        assert_eq!((svc.namespace(), svc.name()), ("shop", "web"));
        assert!(ObjectName::new("a", "x") < ObjectName::new("a-b", "x"), "ordered by namespace first");
        assert_eq!(ServicePortName { service: svc.clone(), port: "".into() }.to_string(), "shop/web");
        assert_eq!(ServicePortName { service: svc, port: "http".into() }.to_string(), "shop/web:http");
    }
}
