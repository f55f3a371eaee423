//! Typed names of Kubernetes objects. The namespace default (`default`) is
//! applied here and nowhere else, so two spellings of one object never
//! become two keys. Names are shared strings: the index, the model and
//! every frontend hold the same name without copying it (at 50,000
//! Services the copies were tens of MiB).

use std::{fmt, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectName {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// The name in `meta`; an unset namespace is `default`, as the API server
    /// defaults it. An unset name is empty (validation rejects it).
    pub fn of(meta: &ObjectMeta) -> Self {
        let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default");
        Self::new(namespace, meta.name.as_deref().unwrap_or_default())
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
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
    fn unnamed_ports_print_without_a_colon() {
        let svc = ObjectName::new("shop", "web");
        assert_eq!(ServicePortName { service: svc.clone(), port: "".into() }.to_string(), "shop/web");
        assert_eq!(ServicePortName { service: svc, port: "http".into() }.to_string(), "shop/web:http");
    }
}
