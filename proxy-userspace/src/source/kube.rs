//! The Kubernetes API server as a source: kube-rs watchers (list, then
//! watch, with backoff) feeding the index object by object. A dropped watch
//! or 410 Gone leads to a re-list; its objects are collected until the list
//! is complete and only then reconciled with the index (changed ones
//! applied, vanished ones removed), so what is programmed keeps serving
//! meanwhile and nothing stale survives it.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use super::{
    Changes, SharedIndex, Source,
    reflector::{Applied, Kind, Reflector},
};
use crate::validate::ModelConfig;

/// What kpr may ask of the API server: `(API group, resource, verbs)`. The
/// ClusterRole in manifests/kpr.yaml grants exactly this (a test checks),
/// and the kube tests check every request kpr makes is covered. Services and
/// EndpointSlices are listed and watched; Nodes and Pods are for node-local
/// traffic policies; Events report what the agent did.
pub const PERMISSIONS: &[(&str, &str, &[&str])] = &[
    ("", "services", &["get", "list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
    ("", "pods", &["get", "list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["get", "list", "watch"]),
    ("", "events", &["create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// Why no API client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("using kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no in-cluster config and no usable kubeconfig: pass --kubeconfig ({0})")]
    NoConfig(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, or else the in-cluster config (or the
/// default kubeconfig when run outside a cluster).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let failed = |source| ClientError::Kubeconfig { path: path.to_path_buf(), source };
            let kc = Kubeconfig::read_from(path).map_err(failed)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(failed)?
        }
        None => Config::infer().await.map_err(ClientError::NoConfig)?,
    };
    Client::try_from(config).map_err(ClientError::Client)
}

/// Whether a kind has been listed in full and whether its watch is healthy.
#[derive(Default)]
struct KindState {
    listed: AtomicBool,
    healthy: AtomicBool,
}

const ORIGIN: &str = "api";

/// How soon a failed watch is tried again: within 1.2 s, so changes made
/// while the API server was away are programmed within about a second of
/// its return (kube-runtime's default backoff waits up to 30 s). A try against a
/// server that is down costs one refused connection, no more than the
/// reachability probe sends every second anyway; the jitter spreads the
/// nodes' re-lists when it comes back.
fn retry_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(200))
        // Jitter adds up to as much again: 0.6 to 1.2 s between tries.
        .with_max_delay(std::time::Duration::from_millis(600))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

fn watch<K>(
    api: Api<K>,
    config: &ModelConfig,
    index: SharedIndex,
    changes: Changes,
    state: Arc<KindState>,
) -> JoinHandle<()>
where
    K: Kind + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let selector = config.label_selector();
    let watch_config = watcher::Config::default();
    let watch_config = if selector.is_empty() { watch_config } else { watch_config.labels(&selector) };
    let stream = watcher(api, watch_config).backoff(retry_backoff());
    let kind = K::kind(&());
    let mut reflector = Reflector::new(ORIGIN, config.clone());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    if state.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff, programmed state keeps serving");
                    } else {
                        tracing::debug!(%kind, error = %e, "watch still failing");
                    }
                    continue;
                }
            };
            let applied = reflector.apply(&mut index.lock().unwrap(), event);
            if !state.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(%kind, "watch connected");
            }
            if applied == Applied::Listed {
                state.listed.store(true, Ordering::Relaxed);
                tracing::info!(%kind, "listed");
            }
            if applied != Applied::Buffered && changes.send(Instant::now()).is_err() {
                return;
            }
        }
    })
}

/// The label holding a Node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Follows this node's Node object for its zone (topology-aware routing):
/// a change recomputes every Service.
fn watch_node(api: Api<Node>, node_name: &str, index: SharedIndex, changes: Changes) -> JoinHandle<()> {
    let fields = format!("metadata.name={node_name}");
    let stream = watcher(api, watcher::Config::default().fields(&fields)).backoff(retry_backoff()).applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(node) = stream.next().await {
            let node = match node {
                Ok(node) => node,
                Err(e) => {
                    tracing::debug!(error = %e, "watching this node's Node: retrying");
                    continue;
                }
            };
            let zone = node.labels().get(ZONE_LABEL).map(String::as_str);
            let changed = index.lock().unwrap().set_zone(zone);
            if changed && changes.send(Instant::now()).is_err() {
                return;
            }
        }
    })
}

pub struct KubeSource {
    service_state: Arc<KindState>,
    slice_state: Arc<KindState>,
    /// Whether the API server answered the last probe.
    reachable: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

/// How often the API server is probed for `connected()`. Watches carry no
/// traffic while nothing changes, so they cannot tell a quiet cluster from
/// a dead server.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl KubeSource {
    /// Starts watching the Services and EndpointSlices `config` selects in
    /// all namespaces, feeding `index`.
    pub fn start(client: Client, config: &ModelConfig, index: SharedIndex, changes: Changes) -> Self {
        let service_state = Arc::new(KindState::default());
        let slice_state = Arc::new(KindState::default());
        let t1 =
            watch(Api::<Service>::all(client.clone()), config, index.clone(), changes.clone(), service_state.clone());
        let t2 = watch(
            Api::<EndpointSlice>::all(client.clone()),
            config,
            index.clone(),
            changes.clone(),
            slice_state.clone(),
        );
        let mut tasks = vec![t1, t2];
        if !config.node_name.is_empty() {
            tasks.push(watch_node(Api::<Node>::all(client.clone()), &config.node_name, index, changes));
        }
        let reachable = Arc::new(AtomicBool::new(false));
        let probe = {
            let reachable = reachable.clone();
            tokio::spawn(async move {
                loop {
                    let ok = tokio::time::timeout(PROBE_EVERY * 2, client.apiserver_version())
                        .await
                        .is_ok_and(|r| r.is_ok());
                    reachable.store(ok, Ordering::Relaxed);
                    tokio::time::sleep(PROBE_EVERY).await;
                }
            })
        };
        tasks.push(probe);
        Self { service_state, slice_state, reachable, tasks }
    }
}

impl Source for KubeSource {
    fn ready(&self) -> bool {
        self.service_state.listed.load(Ordering::Relaxed) && self.slice_state.listed.load(Ordering::Relaxed)
    }

    fn connected(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
