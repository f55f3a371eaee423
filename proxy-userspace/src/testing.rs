//! Objects for tests: read from YAML by the real manifest parser (the dir
//! source's), so unit, scenario and integration tests see what users' files
//! produce, and plain frontends for dataplane and planner tests.

use std::{net::Ipv4Addr, path::Path};

use crate::{
    frontend::{Endpoint, Frontend, FrontendKey, Protocol, ServiceType},
    index::Snapshot,
    name::{ObjectName, ServicePortName},
    validate::ModelConfig,
};

/// The objects of a multi-document YAML text, validated with the default config.
pub fn objects(yaml: &str) -> Snapshot {
    objects_with(yaml, &ModelConfig::default())
}

/// The objects of a multi-document YAML text, validated with `config`.
pub fn objects_with(yaml: &str, config: &ModelConfig) -> Snapshot {
    crate::source::dir::parse_file(Path::new("test.yaml"), yaml.as_bytes(), config)
}

/// A TCP ClusterIP frontend `10.96.0.VIP:PORT` of Service `default/svcVIP`
/// with ready endpoints `10.244.0.B:8080`.
pub fn frontend(vip: u8, port: u16, backends: &[u8]) -> Frontend {
    Frontend {
        service: ServicePortName { service: ObjectName::new("default", &format!("svc{vip}")), port: "".into() },
        key: FrontendKey { vip: Ipv4Addr::new(10, 96, 0, vip), port, protocol: Protocol::Tcp },
        service_type: ServiceType::ClusterIP,
        external: None,
        backends: backends.iter().map(|b| Endpoint { ip: Ipv4Addr::new(10, 244, 0, *b), port: 8080 }).collect(),
        terminating: Box::default(),
        internal_local: false,
        affinity_timeout: None,
        extras: None,
    }
}
