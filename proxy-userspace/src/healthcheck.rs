//! kube-proxy's service health servers: for each Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` telling load balancers whether this node has
//! endpoints for it (200) or not (503), so they send traffic only to nodes
//! that can serve it. The body is kube-proxy's (pkg/proxy/healthcheck).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};

use crate::{model::Model, name::ObjectName, validate::Served};

/// What one health check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub service: ObjectName,
    /// Endpoints of the Service on this node that external traffic may use.
    pub local_endpoints: usize,
}

/// Health check ports and what each reports, from the models of the
/// families served: every port of a Local policy Service counts its local
/// endpoint addresses once. A dual-stack pod has an address in each family,
/// so a port counts the endpoints of the family that has more.
pub fn desired(model: &Model, model6: Option<&Model<Ipv6Addr>>) -> BTreeMap<u16, ServiceHealth> {
    let mut wanted = of_family(model);
    for (port, health) in model6.map(of_family).unwrap_or_default() {
        let entry = wanted.entry(port).or_insert_with(|| ServiceHealth { local_endpoints: 0, ..health.clone() });
        if entry.service == health.service {
            entry.local_endpoints = entry.local_endpoints.max(health.local_endpoints);
        }
    }
    wanted
}

/// [`desired`] in one family.
fn of_family<A: Served>(model: &Model<A>) -> BTreeMap<u16, ServiceHealth> {
    let mut addresses: BTreeMap<u16, (ObjectName, BTreeSet<A>)> = BTreeMap::new();
    for f in model.health_checked() {
        let Some(ext) = f.external.as_deref() else { continue };
        let Some(port) = ext.health_check_node_port else { continue };
        let entry = addresses.entry(port).or_insert_with(|| (f.service.service.clone(), BTreeSet::new()));
        // Two Services claiming one port: the first (by frontend order) keeps it, as the listener can only answer for one.
        if entry.0 == f.service.service {
            entry.1.extend(f.local_backends().iter().map(|e| e.ip));
        }
    }
    addresses
        .into_iter()
        .map(|(port, (service, ips))| (port, ServiceHealth { service, local_endpoints: ips.len() }))
        .collect()
}

/// kube-proxy's body, its fields in its order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: BodyService<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(serde::Serialize)]
struct BodyService<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The answer to a load balancer's probe: kube-proxy's status and body.
pub fn answer(health: &ServiceHealth) -> (StatusCode, String) {
    let body = Body {
        service: BodyService { namespace: health.service.namespace(), name: health.service.name() },
        local_endpoints: health.local_endpoints,
        service_proxy_healthy: true,
    };
    let status = if health.local_endpoints > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, serde_json::to_string(&body).expect("a struct of strings and numbers serializes"))
}

type Shared = Arc<Mutex<ServiceHealth>>;

async fn probe(State(health): State<Shared>) -> impl IntoResponse {
    let (status, body) = answer(&health.lock().unwrap());
    (status, [(header::CONTENT_TYPE, "application/json"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], body)
}

/// The running servers, one per health check port, kept equal to the model.
#[derive(Default)]
pub struct HealthServers {
    running: BTreeMap<u16, (Shared, tokio::task::JoinHandle<()>)>,
}

impl HealthServers {
    /// Starts servers for new ports, updates the answers of the others and
    /// stops the ones no Service asks for. A port that cannot be bound is
    /// logged and tried again at the next sync; the rest go on.
    pub fn sync(&mut self, model: &Model, model6: Option<&Model<Ipv6Addr>>) {
        let wanted = desired(model, model6);
        self.running.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                tracing::info!(port, "health check server stopped");
            }
            keep
        });
        for (port, health) in wanted {
            if let Some((shared, _)) = self.running.get(&port) {
                *shared.lock().unwrap() = health;
                continue;
            }
            match start(port, health) {
                Ok(running) => {
                    self.running.insert(port, running);
                }
                Err(e) => tracing::warn!(port, error = %e, "health check server not started; retried at the next sync"),
            }
        }
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.running.keys().copied()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for (_, task) in self.running.values() {
            task.abort();
        }
    }
}

fn start(port: u16, health: ServiceHealth) -> std::io::Result<(Shared, tokio::task::JoinHandle<()>)> {
    // Every address of both families, as kube-proxy: load balancers probe
    // the node's own. A node without IPv6 has no `[::]`: IPv4 alone then.
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tracing::info!(port, service = %health.service, "serving health checks");
    let shared = Arc::new(Mutex::new(health));
    let app = Router::new().fallback(probe).with_state(shared.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(port, error = %e, "a health check server stopped");
        }
    });
    Ok((shared, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_kube_proxy_does() {
        let mut health = ServiceHealth { service: ObjectName::new("default", "web"), local_endpoints: 2 };
        let (status, body) = answer(&health);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        health.local_endpoints = 0;
        assert_eq!(answer(&health).0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_dual_stack_service_counts_its_local_endpoints_once_and_an_ipv6_only_one_is_checked_too() {
        let yaml = "
kind: Service
metadata: {name: ds}
spec: {type: LoadBalancer, clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1'], externalTrafficPolicy: Local, healthCheckNodePort: 32001, ports: [{port: 80, nodePort: 30001}]}
---
kind: Service
metadata: {name: six}
spec: {type: LoadBalancer, clusterIP: 'fd00::2', externalTrafficPolicy: Local, healthCheckNodePort: 32002, ports: [{port: 80, nodePort: 30002}]}
---
kind: EndpointSlice
metadata: {name: ds-4, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.5], nodeName: here}]
---
kind: EndpointSlice
metadata: {name: ds-6, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ['fd00:244::5'], nodeName: here}]
---
kind: EndpointSlice
metadata: {name: six-6, labels: {kubernetes.io/service-name: six}}
addressType: IPv6
ports: [{port: 80}]
endpoints: [{addresses: ['fd00:244::6'], nodeName: here}, {addresses: ['fd00:244::7'], nodeName: there}]
";
        let config = crate::validate::ModelConfig { node_name: "here".into(), ..Default::default() };
        let snapshot = crate::testing::objects_with(yaml, &config);
        let (v4, _) = crate::model::build::<Ipv4Addr>(snapshot.clone());
        let (v6, _) = crate::model::build::<Ipv6Addr>(snapshot);
        let counts: Vec<(u16, String, usize)> = desired(&v4, Some(&v6))
            .into_iter()
            .map(|(port, h)| (port, h.service.to_string(), h.local_endpoints))
            .collect();
        assert_eq!(counts, [(32001, "default/ds".into(), 1), (32002, "default/six".into(), 1)]);
    }
}
