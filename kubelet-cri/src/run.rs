//! `kpr kubelet`: the loop that ties a pod source to the runtime, and
//! `kpr kubelet logs`.

use std::{path::PathBuf, time::Duration};

use crate::{
    cri::Cri,
    error::{KubeletError, Result, io_at},
    kubelet::Kubelet,
    logs,
    node::{self, Registration},
    source::{DirSource, KubeSource},
    spec::Settings,
};

/// Where pods come from.
#[derive(Clone, Debug)]
pub enum PodSourceSpec {
    /// Pods bound to this node in the API server.
    Kube,
    /// Static pod manifests in a folder.
    Dir(PathBuf),
}

impl std::str::FromStr for PodSourceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "kube" => Ok(Self::Kube),
            _ => match s.strip_prefix("dir:") {
                Some(p) if !p.is_empty() => Ok(Self::Dir(p.into())),
                _ => Err(format!("{s:?}: expected `kube` or `dir:PATH`")),
            },
        }
    }
}

pub struct Config {
    pub endpoint: String,
    pub source: PodSourceSpec,
    /// The API server client, for `PodSourceSpec::Kube`.
    pub client: Option<kube::Client>,
    pub node_name: String,
    /// Registers the node and renews its lease (`--register-node`, with pods
    /// from the API server).
    pub registration: Option<Registration>,
    pub settings: Settings,
    /// First restart back-off; doubles up to 30 times this.
    pub backoff: Duration,
    pub sync_period: Duration,
    /// The deadline of every RuntimeService call (`--runtime-request-timeout`).
    pub runtime_request_timeout: Duration,
}

/// Runs pods until Ctrl-C or SIGTERM; pods keep running after it exits (a
/// restarted kubelet adopts them).
pub async fn run(cfg: Config) -> Result<()> {
    let mut kubelet = Kubelet::connect(
        &cfg.endpoint,
        cfg.settings.clone(),
        cfg.backoff,
        cfg.runtime_request_timeout,
        cfg.sync_period,
    )
    .await?;
    enum Source {
        Dir(DirSource),
        Kube(KubeSource),
    }
    let source = match &cfg.source {
        PodSourceSpec::Dir(dir) => {
            if !dir.is_dir() {
                return Err(KubeletError::Invalid(format!("pod manifest folder {} does not exist", dir.display())));
            }
            Source::Dir(DirSource::new(dir.clone()))
        }
        PodSourceSpec::Kube => {
            let client = cfg
                .client
                .clone()
                .ok_or_else(|| KubeletError::Invalid("pods from the API server need a client".into()))?;
            if let Some(reg) = cfg.registration.clone() {
                // A connection of its own: a hung pod call never delays the heartbeat.
                match Cri::connect(&cfg.endpoint, cfg.runtime_request_timeout).await {
                    Ok(cri) => drop(node::spawn(client.clone(), reg, cri)),
                    Err(e) => tracing::warn!(error = %e, "the node is not registered: no runtime connection for it"),
                }
            }
            Source::Kube(KubeSource::start(client, &cfg.node_name))
        }
    };
    tracing::info!(node = %cfg.node_name, "kubelet running pods");
    let mut stop = std::pin::pin!(shutdown());
    let mut runtime_down = false;
    loop {
        let desired = match &source {
            Source::Dir(d) => d.pods().map_err(|e| tracing::warn!(error = %format!("{e:#}"), "reading pods")).ok(),
            Source::Kube(k) => k.pods().await,
        };
        // Until the source has listed, nothing is deleted.
        let (pods, complete) = match desired {
            Some(p) => (p, true),
            None => (Vec::new(), false),
        };
        let objects = match &source {
            Source::Dir(d) => d.objects(),
            Source::Kube(k) => k.objects(&pods).await,
        };
        if let Source::Kube(k) = &source {
            kubelet.set_deleting(k.deleting());
        }
        match kubelet.sync(&pods, complete, objects).await {
            Ok(statuses) => {
                if runtime_down {
                    tracing::info!("container runtime reachable again");
                    runtime_down = false;
                }
                let reports: Vec<_> = pods.into_iter().zip(statuses).filter_map(|(p, s)| Some((p, s?))).collect();
                match &source {
                    Source::Dir(d) => d.report(&reports),
                    Source::Kube(k) => {
                        k.report(&reports).await;
                        if complete {
                            k.finalize(|uid| kubelet.has_pod(uid)).await;
                        }
                    }
                }
            }
            Err(e) if !runtime_down => {
                tracing::warn!(error = %format!("{e:#}"), "container runtime unreachable; pods keep running, retrying");
                runtime_down = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.sync_period) => {}
            _ = &mut stop => break,
        }
    }
    tracing::info!("kubelet stopping; pods keep running and are adopted on the next start");
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// `kpr kubelet logs POD`: the latest instance's log of `container` (or
/// the pod's only container).
pub fn print_logs(root_dir: &std::path::Path, pod: &str, container: Option<&str>, follow: bool) -> Result<()> {
    let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
    let dir = logs::pod_dir(&root_dir.join("logs"), namespace, name)?;
    let container = match container {
        Some(c) => c.to_string(),
        None => {
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .map_err(io_at("reading", &dir))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            match names.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(KubeletError::Invalid(format!(
                        "pod {pod} has containers {}: choose one with -c",
                        names.join(", ")
                    )));
                }
            }
        }
    };
    logs::print(&dir, &container, follow, &mut std::io::stdout().lock())
}
