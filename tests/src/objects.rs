//! Typed Services and EndpointSlices for tests that talk to the API server.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("default".into()),
        labels: (!labels.is_empty())
            .then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()),
        ..Default::default()
    }
}

/// A ClusterIP Service: `http` TCP 80 -> named target `http`, `dns` UDP 53 -> 5353.
pub fn service(name: &str, vip: Ipv4Addr, labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: meta(name, labels),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(vip.to_string()),
            cluster_ips: Some(vec![vip.to_string()]),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("http".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("dns".into()),
                    port: 53,
                    target_port: Some(IntOrString::Int(5353)),
                    protocol: Some("UDP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An EndpointSlice of `service` with ready endpoints (pod name, address),
/// ports `http` 8080/TCP and `dns` 5353/UDP.
pub fn slice(name: &str, service: &str, endpoints: &[(&str, Ipv4Addr)]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            name,
            &[
                ("kubernetes.io/service-name", service),
                ("endpointslice.kubernetes.io/managed-by", "endpointslice-controller.k8s.io"),
            ],
        ),
        address_type: "IPv4".into(),
        ports: Some(vec![
            EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            EndpointPort {
                name: Some("dns".into()),
                port: Some(5353),
                protocol: Some("UDP".into()),
                ..Default::default()
            },
        ]),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(pod, ip)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(pod.to_string()),
                        namespace: Some("default".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}
