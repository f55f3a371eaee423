//! The reconcile loop: every second, the pods the source wants are made to
//! run on the runtime and everything else the kubelet created is stopped
//! and removed. State lives in the runtime (labels and attempts), so a
//! restarted kubelet adopts what is running instead of starting it again.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};

use crate::{
    cri::Cri,
    images,
    spec::{self, Kind, PodId, Settings},
    status::{self, ContainerView, Instance, PodView, RestartPolicy, State},
};

/// Sandbox annotation: how long containers get to stop when the pod goes.
const GRACE_ANNOTATION: &str = "kpr.io/termination-grace-period-seconds";
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// A pod to run.
#[derive(Clone, Debug)]
pub struct DesiredPod {
    pub id: PodId,
    pub pod: Pod,
}

/// Exponential back-off, as the kubelet's: after a restart, the next one
/// waits twice as long, up to `cap`.
struct Backoff {
    delay: Duration,
    last: Instant,
}

/// What the runtime holds that this kubelet made.
#[derive(Default)]
struct Observed {
    /// Pod uid -> its sandboxes.
    sandboxes: HashMap<String, Vec<cri::PodSandbox>>,
    /// Sandbox id -> container name -> instances, newest first.
    containers: HashMap<String, HashMap<String, Vec<Instance>>>,
}

pub struct Kubelet {
    cri: Cri,
    runtime: String,
    settings: Settings,
    backoff_base: Duration,
    /// (pod uid, container) -> crash back-off.
    crash_backoff: HashMap<(String, String), Backoff>,
    /// (pod uid, container) -> image pull back-off.
    pull_backoff: HashMap<(String, String), Backoff>,
    /// (pod uid, container) -> why the kubelet holds it back, this sync.
    waiting: HashMap<(String, String), (String, String)>,
    /// Pods being stopped by a background task.
    terminating: Arc<Mutex<HashSet<String>>>,
}

fn selector() -> HashMap<String, String> {
    HashMap::from([(spec::MANAGED_BY.to_string(), spec::MANAGED_BY_VALUE.to_string())])
}

fn instance(s: cri::ContainerStatus) -> Instance {
    Instance {
        attempt: s.metadata.as_ref().map_or(0, |m| m.attempt),
        state: match cri::ContainerState::try_from(s.state) {
            Ok(cri::ContainerState::ContainerCreated) => State::Created,
            Ok(cri::ContainerState::ContainerRunning) => State::Running,
            Ok(cri::ContainerState::ContainerExited) => State::Exited,
            _ => State::Unknown,
        },
        id: s.id,
        started_at: s.started_at,
        finished_at: s.finished_at,
        exit_code: s.exit_code,
        reason: s.reason,
        message: s.message,
        image_ref: s.image_ref,
    }
}

impl Kubelet {
    /// Connects to the runtime and checks that it is ready.
    pub async fn connect(endpoint: &str, settings: Settings, backoff_base: Duration) -> anyhow::Result<Self> {
        let mut cri = Cri::connect(endpoint).await?;
        let info = cri.check().await?;
        tracing::info!(runtime = %info.name, version = %info.version, api = %info.api_version, "container runtime ready");
        Ok(Self {
            cri,
            runtime: info.name,
            settings,
            backoff_base,
            crash_backoff: HashMap::new(),
            pull_backoff: HashMap::new(),
            waiting: HashMap::new(),
            terminating: Arc::default(),
        })
    }

    async fn observe(&mut self) -> anyhow::Result<Observed> {
        let mut o = Observed::default();
        let filter = cri::PodSandboxFilter { label_selector: selector(), ..Default::default() };
        let sandboxes =
            self.cri.runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) }).await?.into_inner();
        for s in sandboxes.items {
            let uid = s.labels.get(spec::POD_UID).cloned().unwrap_or_default();
            o.sandboxes.entry(uid).or_default().push(s);
        }
        for list in o.sandboxes.values_mut() {
            list.sort_by_key(|s| std::cmp::Reverse(s.metadata.as_ref().map_or(0, |m| m.attempt)));
        }
        let filter = cri::ContainerFilter { label_selector: selector(), ..Default::default() };
        let containers =
            self.cri.runtime.list_containers(cri::ListContainersRequest { filter: Some(filter) }).await?.into_inner();
        for c in containers.containers {
            let name = c.labels.get(spec::CONTAINER_NAME).cloned().unwrap_or_default();
            let req = cri::ContainerStatusRequest { container_id: c.id.clone(), verbose: false };
            let Some(status) = self.cri.runtime.container_status(req).await.ok().and_then(|r| r.into_inner().status)
            else {
                continue;
            };
            o.containers.entry(c.pod_sandbox_id).or_default().entry(name).or_default().push(instance(status));
        }
        for by_name in o.containers.values_mut() {
            for list in by_name.values_mut() {
                list.sort_by_key(|i| std::cmp::Reverse(i.attempt));
            }
        }
        Ok(o)
    }

    /// One pass: runs what `desired` holds, stops what it does not. Returns
    /// each desired pod's status.
    pub async fn sync(&mut self, desired: &[DesiredPod], delete_others: bool) -> anyhow::Result<Vec<PodStatus>> {
        let mut observed = self.observe().await.context("asking the runtime what runs")?;
        self.waiting.clear();
        let mut statuses = Vec::new();
        for d in desired {
            let sandboxes = observed.sandboxes.remove(&d.id.uid).unwrap_or_default();
            statuses.push(self.sync_pod(d, sandboxes, &observed.containers).await);
        }
        let wanted: HashSet<&str> = desired.iter().map(|d| d.id.uid.as_str()).collect();
        if delete_others {
            for (uid, sandboxes) in observed.sandboxes {
                if !wanted.contains(uid.as_str()) {
                    self.terminate(uid, sandboxes, &observed.containers);
                }
            }
        }
        self.crash_backoff.retain(|(uid, _), _| wanted.contains(uid.as_str()));
        self.pull_backoff.retain(|(uid, _), _| wanted.contains(uid.as_str()));
        Ok(statuses)
    }

    async fn sync_pod(
        &mut self,
        d: &DesiredPod,
        sandboxes: Vec<cri::PodSandbox>,
        containers: &HashMap<String, HashMap<String, Vec<Instance>>>,
    ) -> PodStatus {
        let spec = d.pod.spec.clone().unwrap_or_default();
        let policy = RestartPolicy::of(spec.restart_policy.as_deref());
        let ready = sandboxes.first().filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32);
        let (sandbox_id, attempt) = match ready {
            Some(s) => (s.id.clone(), s.metadata.as_ref().map_or(0, |m| m.attempt)),
            None => {
                // None yet, or it died: containers of a dead sandbox go with it.
                let attempt = sandboxes.first().and_then(|s| s.metadata.as_ref()).map_or(0, |m| m.attempt + 1);
                for dead in &sandboxes {
                    let ids = container_ids(containers.get(&dead.id));
                    if let Err(e) = remove_pod(self.cri.clone(), dead.id.clone(), ids, 0).await {
                        tracing::warn!(pod = %d.id, error = %format!("{e:#}"), "removing a dead sandbox");
                    }
                }
                match self.run_sandbox(d, attempt).await {
                    Ok(id) => (id, attempt),
                    Err(e) => {
                        tracing::warn!(pod = %d.id, error = %format!("{e:#}"), "could not start the pod sandbox");
                        return self.status(d, None, &HashMap::new(), policy);
                    }
                }
            }
        };
        let sandbox = self.sandbox_config(d, attempt);
        let empty = HashMap::new();
        let mut instances = containers.get(&sandbox_id).unwrap_or(&empty).clone();

        let mut initialized = true;
        for c in spec.init_containers.iter().flatten() {
            let latest = instances.get(&c.name).and_then(|l| l.first());
            match latest.map(|i| (i.state, i.exit_code, i.attempt)) {
                Some((State::Exited, 0, _)) => continue,
                Some((State::Exited, code, n)) if policy != RestartPolicy::Never || code == 0 => {
                    self.restart(d, &sandbox_id, &sandbox, c, Kind::Init, n + 1).await
                }
                None => {
                    self.start(d, &sandbox_id, &sandbox, c, Kind::Init, 0).await;
                }
                _ => {}
            }
            initialized = false;
            break;
        }
        if initialized {
            for c in &spec.containers {
                let latest = instances.get(&c.name).and_then(|l| l.first());
                match latest.map(|i| (i.state, i.exit_code, i.attempt)) {
                    None => {
                        self.start(d, &sandbox_id, &sandbox, c, Kind::App, 0).await;
                    }
                    Some((State::Exited, code, n)) if policy.restarts(code) => {
                        self.restart(d, &sandbox_id, &sandbox, c, Kind::App, n + 1).await
                    }
                    _ => {}
                }
            }
        }
        // What was started just now shows up in the next pass; this one
        // reports what it saw, and the kubelet's reasons for the rest.
        if let Ok(o) = self.observe().await
            && let Some(now) = o.containers.get(&sandbox_id)
        {
            instances = now.clone();
        }
        let ip = self
            .cri
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: sandbox_id.clone(), verbose: false })
            .await
            .ok()
            .and_then(|r| r.into_inner().status)
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty());
        self.status(d, Some(ip), &instances, policy)
    }

    fn status(
        &self,
        d: &DesiredPod,
        sandbox_ip: Option<Option<String>>,
        instances: &HashMap<String, Vec<Instance>>,
        policy: RestartPolicy,
    ) -> PodStatus {
        let spec = d.pod.spec.clone().unwrap_or_default();
        fn view<'a>(
            c: &'a Container,
            instances: &'a HashMap<String, Vec<Instance>>,
            waiting: Option<(String, String)>,
        ) -> ContainerView<'a> {
            let list = instances.get(&c.name);
            ContainerView {
                spec: c,
                latest: list.and_then(|l| l.first()),
                previous: list.and_then(|l| l.get(1)),
                waiting,
            }
        }
        let waiting = |c: &Container| self.waiting.get(&(d.id.uid.clone(), c.name.clone())).cloned();
        let inits: Vec<Container> = spec.init_containers.clone().unwrap_or_default();
        let pod_view = PodView {
            sandbox_ready: sandbox_ip.is_some(),
            pod_ip: sandbox_ip.flatten(),
            restart_policy: policy,
            init: inits.iter().map(|c| view(c, instances, waiting(c))).collect(),
            apps: spec.containers.iter().map(|c| view(c, instances, waiting(c))).collect(),
            runtime: &self.runtime,
        };
        status::pod_status(&pod_view)
    }

    fn sandbox_config(&self, d: &DesiredPod, attempt: u32) -> cri::PodSandboxConfig {
        let mut config = spec::sandbox_config(&d.pod, &d.id, attempt, &self.settings);
        let grace =
            d.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(DEFAULT_GRACE_SECONDS);
        config.annotations.insert(GRACE_ANNOTATION.into(), grace.to_string());
        config
    }

    async fn run_sandbox(&mut self, d: &DesiredPod, attempt: u32) -> anyhow::Result<String> {
        let config = self.sandbox_config(d, attempt);
        std::fs::create_dir_all(&config.log_directory).context("creating the pod's log folder")?;
        for v in d.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()).filter(|v| v.empty_dir.is_some()) {
            let dir = spec::empty_dir(&self.settings, &d.id, &v.name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating emptyDir {}", dir.display()))?;
        }
        let id = self
            .cri
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() })
            .await
            .map_err(|e| anyhow::anyhow!("RunPodSandbox: {}", e.message()))?
            .into_inner()
            .pod_sandbox_id;
        tracing::info!(pod = %d.id, sandbox = %id, attempt, "pod sandbox running");
        Ok(id)
    }

    fn hold(&mut self, d: &DesiredPod, c: &Container, reason: &str, message: String) {
        tracing::warn!(pod = %d.id, container = %c.name, reason, %message, "container not started");
        self.waiting.insert((d.id.uid.clone(), c.name.clone()), (reason.into(), message));
    }

    /// Starts instance `attempt` of an exited container, unless its back-off
    /// says wait.
    async fn restart(
        &mut self,
        d: &DesiredPod,
        sandbox_id: &str,
        sandbox: &cri::PodSandboxConfig,
        c: &Container,
        kind: Kind,
        attempt: u32,
    ) {
        let key = (d.id.uid.clone(), c.name.clone());
        if let Some(b) = self.crash_backoff.get(&key)
            && b.last.elapsed() < b.delay
        {
            let message = format!("back-off {:?} restarting failed container={} pod={}", b.delay, c.name, d.id);
            self.waiting.insert(key, ("CrashLoopBackOff".into(), message));
            return;
        }
        if self.start(d, sandbox_id, sandbox, c, kind, attempt).await {
            let cap = self.backoff_base * 30;
            let delay = self.crash_backoff.get(&key).map_or(self.backoff_base, |b| (b.delay * 2).min(cap));
            self.crash_backoff.insert(key, Backoff { delay, last: Instant::now() });
        }
    }

    /// Pulls (per policy), creates and starts instance `attempt` of `c`.
    async fn start(
        &mut self,
        d: &DesiredPod,
        sandbox_id: &str,
        sandbox: &cri::PodSandboxConfig,
        c: &Container,
        kind: Kind,
        attempt: u32,
    ) -> bool {
        let key = (d.id.uid.clone(), c.name.clone());
        if let Some(b) = self.pull_backoff.get(&key)
            && b.last.elapsed() < b.delay
        {
            let message = format!("back-off {:?} pulling image {:?}", b.delay, c.image.as_deref().unwrap_or_default());
            self.hold(d, c, "ImagePullBackOff", message);
            return false;
        }
        let image = c.image.clone().unwrap_or_default();
        if let Err(e) = images::ensure(&mut self.cri, &image, images::pull_policy(c), sandbox).await {
            let cap = self.backoff_base * 30;
            let delay = self.pull_backoff.get(&key).map_or(self.backoff_base, |b| (b.delay * 2).min(cap));
            self.pull_backoff.insert(key, Backoff { delay, last: Instant::now() });
            self.hold(d, c, e.reason(), e.to_string());
            return false;
        }
        self.pull_backoff.remove(&key);
        let config = match spec::container_config(&d.pod, &d.id, c, kind, attempt, &self.settings) {
            Ok(config) => config,
            Err(e) => {
                self.hold(d, c, "CreateContainerConfigError", format!("{e:#}"));
                return false;
            }
        };
        let _ = std::fs::create_dir_all(std::path::Path::new(&sandbox.log_directory).join(&c.name));
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        };
        let id = match self.cri.runtime.create_container(request).await {
            Ok(r) => r.into_inner().container_id,
            Err(e) => {
                self.hold(d, c, "CreateContainerError", e.message().into());
                return false;
            }
        };
        if let Err(e) = self.cri.runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }).await
        {
            self.hold(d, c, "RunContainerError", e.message().into());
            return false;
        }
        tracing::info!(pod = %d.id, container = %c.name, kind = kind.label(), attempt, id = %id, "container started");
        true
    }

    /// Stops and removes the pod `uid` in the background, giving its
    /// containers the grace period its sandbox records.
    fn terminate(
        &self,
        uid: String,
        sandboxes: Vec<cri::PodSandbox>,
        containers: &HashMap<String, HashMap<String, Vec<Instance>>>,
    ) {
        if !self.terminating.lock().unwrap().insert(uid.clone()) {
            return;
        }
        let work: Vec<(String, Vec<String>, i64)> = sandboxes
            .iter()
            .map(|s| {
                let grace =
                    s.annotations.get(GRACE_ANNOTATION).and_then(|g| g.parse().ok()).unwrap_or(DEFAULT_GRACE_SECONDS);
                (s.id.clone(), container_ids(containers.get(&s.id)), grace)
            })
            .collect();
        let name = sandboxes.first().and_then(|s| s.metadata.as_ref()).map(|m| format!("{}/{}", m.namespace, m.name));
        let (cri, terminating, settings) = (self.cri.clone(), self.terminating.clone(), self.settings.clone());
        let id = sandboxes.first().and_then(|s| s.metadata.as_ref()).map(|m| PodId {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            uid: uid.clone(),
        });
        tracing::info!(pod = name.as_deref().unwrap_or(&uid), "stopping a pod that is no longer wanted");
        tokio::spawn(async move {
            for (sandbox, ids, grace) in work {
                if let Err(e) = remove_pod(cri.clone(), sandbox, ids, grace).await {
                    tracing::warn!(%uid, error = %format!("{e:#}"), "removing a pod");
                }
            }
            if let Some(id) = id {
                let _ = std::fs::remove_dir_all(spec::pod_dir(&settings, &id));
                let _ = std::fs::remove_dir_all(spec::log_dir(&settings.root_dir, &id));
            }
            tracing::info!(pod = name.as_deref().unwrap_or(&uid), "pod removed");
            terminating.lock().unwrap().remove(&uid);
        });
    }
}

/// Stops and removes every pod this kubelet created (`kpr kubelet reset`,
/// as `kubeadm reset` does). Returns how many sandboxes went.
pub async fn reset(endpoint: &str) -> anyhow::Result<usize> {
    let mut cri = Cri::connect(endpoint).await?;
    let filter = cri::PodSandboxFilter { label_selector: selector(), ..Default::default() };
    let sandboxes = cri.runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) }).await?;
    let filter = cri::ContainerFilter { label_selector: selector(), ..Default::default() };
    let containers = cri.runtime.list_containers(cri::ListContainersRequest { filter: Some(filter) }).await?;
    let containers = containers.into_inner().containers;
    let sandboxes = sandboxes.into_inner().items;
    for s in &sandboxes {
        let ids = containers.iter().filter(|c| c.pod_sandbox_id == s.id).map(|c| c.id.clone()).collect();
        remove_pod(cri.clone(), s.id.clone(), ids, 0).await?;
    }
    Ok(sandboxes.len())
}

fn container_ids(by_name: Option<&HashMap<String, Vec<Instance>>>) -> Vec<String> {
    by_name.into_iter().flat_map(|m| m.values().flatten().map(|i| i.id.clone())).collect()
}

/// StopContainer (with `grace` seconds) on every container at once, then
/// StopPodSandbox, RemoveContainer, RemovePodSandbox.
async fn remove_pod(mut cri: Cri, sandbox: String, containers: Vec<String>, grace: i64) -> anyhow::Result<()> {
    let stops = containers.iter().map(|id| {
        let mut cri = cri.clone();
        let req = cri::StopContainerRequest { container_id: id.clone(), timeout: grace };
        async move { cri.runtime.stop_container(req).await }
    });
    for r in futures::future::join_all(stops).await {
        if let Err(e) = r {
            tracing::debug!(error = %e.message(), "stopping a container");
        }
    }
    cri.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sandbox.clone() }).await?;
    for id in containers {
        let _ = cri.runtime.remove_container(cri::RemoveContainerRequest { container_id: id }).await;
    }
    cri.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sandbox }).await?;
    Ok(())
}
