//! kube-proxy's service health servers: for each Service with
//! `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` telling load balancers whether this node has
//! endpoints for it (200) or not (503), so they send traffic only to nodes
//! that can serve it. The body is kube-proxy's (pkg/proxy/healthcheck).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};

use crate::{model::Model, name::ObjectName};

/// What one health check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub service: ObjectName,
    /// Endpoints of the Service on this node that external traffic may use.
    pub local_endpoints: usize,
}

/// Health check ports and what each reports, from the model: every port of
/// a Local policy Service counts its local endpoint addresses once.
pub fn desired(model: &Model) -> BTreeMap<u16, ServiceHealth> {
    let mut addresses: BTreeMap<u16, (ObjectName, BTreeSet<Ipv4Addr>)> = BTreeMap::new();
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
    pub fn sync(&mut self, model: &Model) {
        let wanted = desired(model);
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
    // Every address, as kube-proxy: load balancers probe the node's own.
    let listener = std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
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
}
