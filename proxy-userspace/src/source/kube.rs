//! The Kubernetes API server as a source: kube-rs watchers (with backoff)
//! feeding a reflector store per kind. A dropped watch or 410 Gone leads to
//! a re-list; the store swaps in the re-listed objects only when the list is
//! complete, so what is programmed keeps serving meanwhile and whatever
//! vanished is removed after.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use super::{Changes, Source};
use crate::model::{Snapshot, Sourced};

/// A client from `kubeconfig`, or else the in-cluster config (or the
/// default kubeconfig when run outside a cluster).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context("no in-cluster config and no usable kubeconfig: pass --kubeconfig")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Whether a kind has been listed in full and whether its watch is healthy.
#[derive(Default)]
struct KindState {
    listed: AtomicBool,
    healthy: AtomicBool,
}

pub struct KubeSource {
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    service_state: Arc<KindState>,
    slice_state: Arc<KindState>,
    tasks: Vec<JoinHandle<()>>,
}

const ORIGIN: &str = "api";

fn watch<K>(api: Api<K>, selector: &str, changes: Changes, state: Arc<KindState>) -> (reflector::Store<K>, JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default().labels(selector)).default_backoff().reflect(writer);
    let kind = K::kind(&());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let changed = match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => true,
                Ok(watcher::Event::InitDone) => {
                    state.listed.store(true, Ordering::Relaxed);
                    tracing::info!(%kind, "listed");
                    true
                }
                // The store keeps the previous objects until InitDone.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => false,
                Err(e) => {
                    if state.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff, programmed state keeps serving");
                    } else {
                        tracing::debug!(%kind, error = %e, "watch still failing");
                    }
                    continue;
                }
            };
            if !state.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(%kind, "watch connected");
            }
            if changed && changes.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    (reader, task)
}

impl KubeSource {
    /// Starts watching Services and EndpointSlices matching `selector` in
    /// all namespaces.
    pub fn start(client: Client, selector: &str, changes: Changes) -> Self {
        let service_state = Arc::new(KindState::default());
        let slice_state = Arc::new(KindState::default());
        let (services, t1) = watch(Api::<Service>::all(client.clone()), selector, changes.clone(), service_state.clone());
        let (slices, t2) = watch(Api::<EndpointSlice>::all(client), selector, changes, slice_state.clone());
        Self { services, slices, service_state, slice_state, tasks: vec![t1, t2] }
    }
}

impl Source for KubeSource {
    fn ready(&self) -> bool {
        self.service_state.listed.load(Ordering::Relaxed) && self.slice_state.listed.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> Snapshot {
        let origin: Arc<str> = ORIGIN.into();
        Snapshot {
            services: self.services.state().into_iter().map(|object| Sourced { origin: origin.clone(), object }).collect(),
            slices: self.slices.state().into_iter().map(|object| Sourced { origin: origin.clone(), object }).collect(),
            rejected: vec![],
        }
    }

    fn connected(&self) -> bool {
        self.service_state.healthy.load(Ordering::Relaxed) && self.slice_state.healthy.load(Ordering::Relaxed)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
