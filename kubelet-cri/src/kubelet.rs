//! The reconcile loop: every second, the pods the source wants are made to
//! run on the runtime and everything else the kubelet created is stopped
//! and removed. State lives in the runtime (labels and attempts), so a
//! restarted kubelet adopts what is running instead of starting it again.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};

use crate::{
    config::{self, ConfigObjects, PodFacts},
    cri::Cri,
    error::{Result, call, io, io_at},
    images, logs,
    probe::{Prober, Verdict},
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

/// Exponential back-off per (pod uid, container), as the kubelet's: after
/// each attempt the next waits twice as long, from `base` up to 30 times it.
struct Backoffs {
    base: Duration,
    entries: HashMap<(String, String), (Duration, Instant)>,
}

impl Backoffs {
    fn new(base: Duration) -> Self {
        Self { base, entries: HashMap::new() }
    }

    /// The delay still holding `key` back, if any.
    fn holding(&self, key: &(String, String)) -> Option<Duration> {
        self.entries.get(key).filter(|(delay, last)| last.elapsed() < *delay).map(|(delay, _)| *delay)
    }

    /// Records an attempt now: the next one waits twice as long as the last.
    fn attempted(&mut self, key: (String, String)) {
        let delay = self.entries.get(&key).map_or(self.base, |(d, _)| (*d * 2).min(self.base * 30));
        self.entries.insert(key, (delay, Instant::now()));
    }

    fn clear(&mut self, key: &(String, String)) {
        self.entries.remove(key);
    }

    fn retain(&mut self, wanted: &HashSet<&str>) {
        self.entries.retain(|(uid, _), _| wanted.contains(uid.as_str()));
    }
}

/// The running sandbox a container is started in.
struct InPod<'a> {
    d: &'a DesiredPod,
    sandbox_id: &'a str,
    sandbox: &'a cri::PodSandboxConfig,
    facts: &'a PodFacts,
    /// Whether the pod's configuration volumes are written, or why not.
    volumes: &'a std::result::Result<(), String>,
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
    /// Between restarts of a container that exited.
    crash_backoff: Backoffs,
    /// Between pulls of an image that failed.
    pull_backoff: Backoffs,
    /// (pod uid, container) -> why the kubelet holds it back, this sync.
    waiting: HashMap<(String, String), (String, String)>,
    /// Pods being stopped by a background task.
    terminating: Arc<Mutex<HashSet<String>>>,
    /// Probes of running containers, and what they said at this pass (by container id).
    prober: Prober,
    probed: HashMap<String, Verdict>,
    /// Containers being stopped for a failed startup or liveness probe.
    killing: Arc<Mutex<HashSet<String>>>,
    /// The ConfigMaps and Secrets of this pass.
    objects: ConfigObjects,
    /// The node's CPUs and memory, for `resourceFieldRef`s without a limit.
    node_cpus: u32,
    node_memory: u64,
    /// Pods being deleted through the API with their own grace period
    /// (`deletionGracePeriodSeconds`), which overrides the spec's.
    deletion_graces: HashMap<String, i64>,
    /// Uids of the pods that had a sandbox at the last pass.
    on_node: HashSet<String>,
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
    pub async fn connect(
        endpoint: &str,
        settings: Settings,
        backoff_base: Duration,
        request_timeout: Duration,
    ) -> Result<Self> {
        let mut cri = Cri::connect(endpoint, request_timeout).await?;
        let info = cri.check().await?;
        tracing::info!(runtime = %info.name, version = %info.version, api = %info.api_version, "container runtime ready");
        Ok(Self {
            cri,
            runtime: info.name,
            settings,
            crash_backoff: Backoffs::new(backoff_base),
            pull_backoff: Backoffs::new(backoff_base),
            waiting: HashMap::new(),
            terminating: Arc::default(),
            deletion_graces: HashMap::new(),
            prober: Prober::default(),
            probed: HashMap::new(),
            killing: Arc::default(),
            objects: ConfigObjects::default(),
            node_cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            node_memory: crate::node::Machine::read(std::path::Path::new("/")).memory,
            on_node: HashSet::new(),
        })
    }

    /// The grace periods of pods being deleted through the API, by uid
    /// (`metadata.deletionGracePeriodSeconds`): they stop within these
    /// rather than their spec's `terminationGracePeriodSeconds`.
    pub fn set_deletion_graces(&mut self, graces: HashMap<String, i64>) {
        self.deletion_graces = graces;
    }

    /// Whether pod `uid` still has anything on this node (running, or
    /// being stopped).
    pub fn has_pod(&self, uid: &str) -> bool {
        self.on_node.contains(uid) || self.terminating.lock().unwrap().contains(uid)
    }

    async fn observe(&mut self) -> Result<Observed> {
        let mut o = Observed::default();
        let filter = cri::PodSandboxFilter { label_selector: selector(), ..Default::default() };
        let sandboxes = self
            .cri
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) })
            .await
            .map_err(call("ListPodSandbox"))?
            .into_inner();
        for s in sandboxes.items {
            let uid = s.labels.get(spec::POD_UID).cloned().unwrap_or_default();
            o.sandboxes.entry(uid).or_default().push(s);
        }
        for list in o.sandboxes.values_mut() {
            list.sort_by_key(|s| std::cmp::Reverse(s.metadata.as_ref().map_or(0, |m| m.attempt)));
        }
        let filter = cri::ContainerFilter { label_selector: selector(), ..Default::default() };
        let containers = self
            .cri
            .runtime
            .list_containers(cri::ListContainersRequest { filter: Some(filter) })
            .await
            .map_err(call("ListContainers"))?
            .into_inner();
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
    pub async fn sync(
        &mut self,
        desired: &[DesiredPod],
        delete_others: bool,
        objects: &ConfigObjects,
    ) -> Result<Vec<PodStatus>> {
        self.objects = objects.clone();
        let mut observed = self.observe().await?;
        let running: HashSet<String> = observed
            .containers
            .values()
            .flat_map(|by_name| by_name.values().filter_map(|l| l.first()))
            .filter(|i| i.state == State::Running)
            .map(|i| i.id.clone())
            .collect();
        self.prober.retain(&running);
        self.probed.retain(|id, _| running.contains(id));
        self.on_node = observed.sandboxes.keys().cloned().collect();
        self.waiting.clear();
        let mut sandbox_ids = Vec::new();
        for d in desired {
            let sandboxes = observed.sandboxes.remove(&d.id.uid).unwrap_or_default();
            sandbox_ids.push(self.sync_pod(d, sandboxes, &observed.containers).await);
        }
        // What was started just now is reported as the runtime sees it.
        let now = if sandbox_ids.iter().any(Option::is_some) { self.observe().await? } else { Observed::default() };
        let mut statuses = Vec::new();
        for (d, sandbox) in desired.iter().zip(sandbox_ids) {
            statuses.push(self.pod_status(d, sandbox, &now).await);
        }
        let wanted: HashSet<&str> = desired.iter().map(|d| d.id.uid.as_str()).collect();
        if delete_others {
            for (uid, sandboxes) in observed.sandboxes {
                if !wanted.contains(uid.as_str()) {
                    self.terminate(uid, sandboxes, &observed.containers);
                }
            }
        }
        self.crash_backoff.retain(&wanted);
        self.pull_backoff.retain(&wanted);
        Ok(statuses)
    }

    async fn sync_pod(
        &mut self,
        d: &DesiredPod,
        sandboxes: Vec<cri::PodSandbox>,
        containers: &HashMap<String, HashMap<String, Vec<Instance>>>,
    ) -> Option<String> {
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
                        return None;
                    }
                }
            }
        };
        let sandbox = self.sandbox_config(d, attempt);
        let facts = self.facts(d, &sandbox_id).await;
        // Configuration volumes follow their objects while the pod runs;
        // one that cannot be written holds back the containers that start
        // from now on (a CreateContainerConfigError, at their start).
        let volumes_written = self.write_config_volumes(d, &facts);
        let pod = InPod { d, sandbox_id: &sandbox_id, sandbox: &sandbox, facts: &facts, volumes: &volumes_written };
        let empty = HashMap::new();
        let instances = containers.get(&sandbox_id).unwrap_or(&empty);

        let mut initialized = true;
        for c in spec.init_containers.iter().flatten() {
            let latest = instances.get(&c.name).and_then(|l| l.first());
            match latest.map(|i| (i.state, i.exit_code, i.attempt)) {
                Some((State::Exited, 0, _)) => continue,
                Some((State::Exited, _, n)) if policy != RestartPolicy::Never => {
                    self.restart(&pod, c, Kind::Init, n + 1).await
                }
                None => {
                    self.start(&pod, c, Kind::Init, 0).await;
                }
                _ => {}
            }
            initialized = false;
            break;
        }
        // As the kubelet, only the newest dead instance of a container is
        // kept (for its status and logs); older ones are removed.
        let log_dir = std::path::Path::new(&sandbox.log_directory);
        for (name, list) in instances {
            for old in list.iter().filter(|i| i.state == State::Exited).skip(1) {
                let req = cri::RemoveContainerRequest { container_id: old.id.clone() };
                match self.cri.runtime.remove_container(req).await {
                    // Its log goes with it, as the kubelet's container GC does.
                    Ok(_) => logs::remove_instance(&log_dir.join(spec::log_path(name, old.attempt))),
                    Err(e) => tracing::debug!(id = %old.id, error = %e.message(), "removing an old container instance"),
                }
            }
            if let Some(live) = list.first().filter(|i| i.state == State::Running) {
                self.rotate_log(&log_dir.join(spec::log_path(name, live.attempt)), &live.id).await;
            }
        }
        if initialized {
            for c in &spec.containers {
                let latest = instances.get(&c.name).and_then(|l| l.first());
                match latest.map(|i| (i.state, i.exit_code, i.attempt)) {
                    None => {
                        self.start(&pod, c, Kind::App, 0).await;
                    }
                    Some((State::Exited, code, n)) if policy.restarts(code) => {
                        self.restart(&pod, c, Kind::App, n + 1).await
                    }
                    Some((State::Running, _, _)) => {
                        let i = latest.expect("matched");
                        self.probe(d, c, i, facts.pod_ip.as_deref());
                    }
                    _ => {}
                }
            }
        }
        Some(sandbox_id)
    }

    /// The status of `d`, whose sandbox (if it has one) is `sandbox`.
    async fn pod_status(&mut self, d: &DesiredPod, sandbox: Option<String>, observed: &Observed) -> PodStatus {
        let policy = RestartPolicy::of(d.pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()));
        let Some(sandbox_id) = sandbox else { return self.status(d, None, &HashMap::new(), policy) };
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
        // A pod on the host network shows the node's address, as the kubelet reports it.
        let host_network = d.pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        let ip = if host_network { self.settings.node_ip.clone() } else { ip };
        let empty = HashMap::new();
        self.status(d, Some(ip), observed.containers.get(&sandbox_id).unwrap_or(&empty), policy)
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
            probed: &HashMap<String, Verdict>,
        ) -> ContainerView<'a> {
            let list = instances.get(&c.name);
            let latest = list.and_then(|l| l.first());
            // Not probed yet: a startup or readiness probe has not said yes.
            let unprobed = (c.startup_probe.is_some() || c.readiness_probe.is_some())
                .then_some((c.startup_probe.is_none(), false));
            let probed = latest.and_then(|i| probed.get(&i.id)).map(|v| (v.started, v.ready)).or(unprobed);
            ContainerView { spec: c, latest, previous: list.and_then(|l| l.get(1)), waiting, probed }
        }
        let waiting = |c: &Container| self.waiting.get(&(d.id.uid.clone(), c.name.clone())).cloned();
        let inits: Vec<Container> = spec.init_containers.clone().unwrap_or_default();
        let pod_view = PodView {
            sandbox_ready: sandbox_ip.is_some(),
            pod_ip: sandbox_ip.flatten(),
            restart_policy: policy,
            init: inits.iter().map(|c| view(c, instances, waiting(c), &self.probed)).collect(),
            apps: spec.containers.iter().map(|c| view(c, instances, waiting(c), &self.probed)).collect(),
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

    async fn run_sandbox(&mut self, d: &DesiredPod, attempt: u32) -> Result<String> {
        let config = self.sandbox_config(d, attempt);
        std::fs::create_dir_all(&config.log_directory).map_err(io("creating the pod's log folder"))?;
        for v in d.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()).filter(|v| v.empty_dir.is_some()) {
            let dir = spec::empty_dir(&self.settings, &d.id, &v.name);
            std::fs::create_dir_all(&dir).map_err(io_at("creating emptyDir", &dir))?;
            // Writable by whatever user the containers run as, as the kubelet makes it.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .map_err(io_at("opening emptyDir", &dir))?;
        }
        let runtime_handler = self.objects.runtime_handler(&d.pod)?;
        let id = self
            .cri
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler })
            .await
            .map_err(call("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        tracing::info!(pod = %d.id, sandbox = %id, attempt, "pod sandbox running");
        Ok(id)
    }

    /// Runs `c`'s probes that are due on its running instance `i`, keeps
    /// what they say for the status, and has it stopped (in the background,
    /// with the pod's grace period) when a startup or liveness probe failed
    /// enough times: the next passes restart it as the pod's policy says.
    fn probe(&mut self, d: &DesiredPod, c: &Container, i: &Instance, pod_ip: Option<&str>) {
        if c.startup_probe.is_none() && c.readiness_probe.is_none() && c.liveness_probe.is_none() {
            return;
        }
        let verdict = self.prober.check(&self.cri, c, &i.id, i.started_at, pod_ip);
        if let Some(why) = &verdict.kill
            && self.killing.lock().unwrap().insert(i.id.clone())
        {
            tracing::info!(pod = %d.id, container = %c.name, reason = %why, "container failed its probe: restarting it");
            // A probe's own terminationGracePeriodSeconds overrides the pod's.
            let probe_grace = [&c.liveness_probe, &c.startup_probe]
                .into_iter()
                .flatten()
                .find_map(|p| p.termination_grace_period_seconds);
            let pod_grace = d.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds);
            let grace = probe_grace.or(pod_grace).unwrap_or(DEFAULT_GRACE_SECONDS);
            let (mut cri, killing, id) = (self.cri.clone(), self.killing.clone(), i.id.clone());
            tokio::spawn(async move {
                let req = cri::StopContainerRequest { container_id: id.clone(), timeout: grace };
                if let Err(e) = cri.runtime.stop_container(req).await {
                    tracing::warn!(id = %id, error = %e.message(), "stopping a container that failed its probe");
                }
                killing.lock().unwrap().remove(&id);
            });
        }
        self.probed.insert(i.id.clone(), verdict);
    }

    /// Rotates a running container's log once it is over the size limit:
    /// the file is renamed and the runtime asked to reopen the path (put
    /// back if it cannot, so nothing is lost).
    async fn rotate_log(&mut self, path: &std::path::Path, container_id: &str) {
        let rotated = match logs::rotate(path, self.settings.log_max_size) {
            Ok(Some(rotated)) => rotated,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(log = %path.display(), error = %e, "cannot rotate a container log");
                return;
            }
        };
        let req = cri::ReopenContainerLogRequest { container_id: container_id.into() };
        if let Err(e) = self.cri.runtime.reopen_container_log(req).await {
            tracing::warn!(log = %path.display(), error = %e.message(), "the runtime did not reopen a rotated log: put back");
            if let Err(e) = std::fs::rename(&rotated, path) {
                tracing::warn!(log = %path.display(), error = %e, "cannot put a rotated log back");
            }
            return;
        }
        // Only once the runtime writes to a fresh file do old ones go.
        if let Err(e) = logs::prune(path, self.settings.log_max_files) {
            tracing::warn!(log = %path.display(), error = %e, "cannot remove old rotated logs");
        }
    }

    /// What the pod's fields do not say: its IP (from its sandbox) and the node's.
    async fn facts(&mut self, d: &DesiredPod, sandbox_id: &str) -> PodFacts {
        let req = cri::PodSandboxStatusRequest { pod_sandbox_id: sandbox_id.into(), verbose: false };
        let pod_ip = match self.cri.runtime.pod_sandbox_status(req).await {
            Ok(r) => r.into_inner().status.and_then(|s| s.network).map(|n| n.ip).filter(|ip| !ip.is_empty()),
            Err(_) => None,
        };
        // A pod on the host network has the node's address.
        let host_network = d.pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        let pod_ip = if host_network { self.settings.node_ip.clone() } else { pod_ip };
        PodFacts {
            pod_ip,
            host_ip: self.settings.node_ip.clone(),
            node_name: self.settings.node_name.clone(),
            node_cpus: self.node_cpus,
            node_memory: self.node_memory,
        }
    }

    /// Writes the files of `d`'s configuration volumes (only what changed).
    fn write_config_volumes(&self, d: &DesiredPod, facts: &PodFacts) -> std::result::Result<(), String> {
        for v in d.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let files = match config::volume_files(&d.pod, &d.id, v, &self.objects, facts) {
                Ok(Some(files)) => files,
                Ok(None) => continue,
                Err(e) => return Err(format!("volume {:?}: {e}", v.name)),
            };
            let dir = spec::config_dir(&self.settings, &d.id, &v.name);
            match config::write_atomically(&dir, &files) {
                Ok(true) => tracing::info!(pod = %d.id, volume = %v.name, "volume files written"),
                Ok(false) => {}
                Err(e) => return Err(format!("writing volume {:?} at {}: {e}", v.name, dir.display())),
            }
        }
        Ok(())
    }

    fn hold(&mut self, d: &DesiredPod, c: &Container, reason: &str, message: String) {
        tracing::warn!(pod = %d.id, container = %c.name, reason, %message, "container not started");
        self.waiting.insert((d.id.uid.clone(), c.name.clone()), (reason.into(), message));
    }

    /// Starts instance `attempt` of an exited container, unless its back-off
    /// says wait.
    async fn restart(&mut self, pod: &InPod<'_>, c: &Container, kind: Kind, attempt: u32) {
        let d = pod.d;
        let key = (d.id.uid.clone(), c.name.clone());
        if let Some(delay) = self.crash_backoff.holding(&key) {
            let message = format!("back-off {delay:?} restarting failed container={} pod={}", c.name, d.id);
            self.waiting.insert(key, ("CrashLoopBackOff".into(), message));
            return;
        }
        if self.start(pod, c, kind, attempt).await {
            self.crash_backoff.attempted(key);
        }
    }

    /// Pulls (per policy), creates and starts instance `attempt` of `c`.
    async fn start(&mut self, pod: &InPod<'_>, c: &Container, kind: Kind, attempt: u32) -> bool {
        let (d, sandbox_id, sandbox) = (pod.d, pod.sandbox_id, pod.sandbox);
        let key = (d.id.uid.clone(), c.name.clone());
        let image = c.image.clone().unwrap_or_default();
        if let Some(delay) = self.pull_backoff.holding(&key) {
            self.hold(d, c, "ImagePullBackOff", format!("back-off {delay:?} pulling image {image:?}"));
            return false;
        }
        if let Err(e) = images::ensure(&mut self.cri, &image, images::pull_policy(c), sandbox).await {
            self.pull_backoff.attempted(key);
            self.hold(d, c, e.reason(), e.to_string());
            return false;
        }
        self.pull_backoff.clear(&key);
        if spec::run_as_non_root(&d.pod, c) && spec::run_as_user(&d.pod, c).is_none() {
            // The image decides the user: it must say a non-root one.
            let refused = match images::user(&mut self.cri, &image).await {
                Some((Some(uid), _)) if uid != 0 => None,
                Some((Some(_), _)) => Some("container has runAsNonRoot and image will run as root".to_string()),
                Some((None, name)) if name.is_empty() || name == "root" => {
                    Some("container has runAsNonRoot and image will run as root".to_string())
                }
                Some((None, name)) => Some(format!(
                    "container has runAsNonRoot and image has non-numeric user ({name}), cannot verify user is non-root"
                )),
                None => Some("container has runAsNonRoot and the image's user is unknown".to_string()),
            };
            if let Some(message) = refused {
                self.hold(
                    d,
                    c,
                    "CreateContainerConfigError",
                    format!("{message} (pod: {}, container: {})", d.id, c.name),
                );
                return false;
            }
        }
        let env = match (pod.volumes, config::env(&d.pod, &d.id, c, &self.objects, pod.facts)) {
            (Err(e), _) => {
                self.hold(d, c, "CreateContainerConfigError", e.clone());
                return false;
            }
            (_, Err(e)) => {
                self.hold(d, c, "CreateContainerConfigError", format!("{e:#}"));
                return false;
            }
            (Ok(()), Ok(env)) => env,
        };
        if let Err(e) = spec::check_sub_paths(&d.pod, &d.id, c, &self.settings) {
            self.hold(d, c, "CreateContainerConfigError", format!("{e:#}"));
            return false;
        }
        let config = match spec::container_config(&d.pod, &d.id, c, kind, attempt, &self.settings, &env) {
            Ok(config) => config,
            Err(e) => {
                self.hold(d, c, "CreateContainerConfigError", format!("{e:#}"));
                return false;
            }
        };
        let log_dir = std::path::Path::new(&sandbox.log_directory).join(&c.name);
        if let Err(e) = std::fs::create_dir_all(&log_dir) {
            // The runtime reports the missing folder when it opens the log.
            tracing::warn!(dir = %log_dir.display(), error = %e, "cannot create the container log folder");
        }
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
        let asked = self.deletion_graces.get(&uid).copied();
        let work: Vec<(String, Vec<String>, i64)> = sandboxes
            .iter()
            .map(|s| {
                let spec_grace = s.annotations.get(GRACE_ANNOTATION).and_then(|g| g.parse().ok());
                let grace = asked.or(spec_grace).unwrap_or(DEFAULT_GRACE_SECONDS);
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
                for dir in [spec::pod_dir(&settings, &id), spec::log_dir(&settings.root_dir, &id)] {
                    // Already gone is fine; anything else is only disk space.
                    if let Err(e) = std::fs::remove_dir_all(&dir)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a pod folder");
                    }
                }
            }
            tracing::info!(pod = name.as_deref().unwrap_or(&uid), "pod removed");
            terminating.lock().unwrap().remove(&uid);
        });
    }
}

/// Stops and removes every pod this kubelet created (`kpr kubelet reset`,
/// as `kubeadm reset` does). Returns how many sandboxes went.
pub async fn reset(endpoint: &str) -> Result<usize> {
    let mut cri = Cri::connect(endpoint, crate::cri::DEFAULT_REQUEST_TIMEOUT).await?;
    let filter = cri::PodSandboxFilter { label_selector: selector(), ..Default::default() };
    let sandboxes = cri
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: Some(filter) })
        .await
        .map_err(call("ListPodSandbox"))?;
    let filter = cri::ContainerFilter { label_selector: selector(), ..Default::default() };
    let containers = cri
        .runtime
        .list_containers(cri::ListContainersRequest { filter: Some(filter) })
        .await
        .map_err(call("ListContainers"))?;
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
async fn remove_pod(mut cri: Cri, sandbox: String, containers: Vec<String>, grace: i64) -> Result<()> {
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
    cri.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sandbox.clone() })
        .await
        .map_err(call("StopPodSandbox"))?;
    for id in containers {
        // Removing the sandbox below removes what is left of its containers.
        if let Err(e) = cri.runtime.remove_container(cri::RemoveContainerRequest { container_id: id }).await {
            tracing::debug!(error = %e, "container not removed before its sandbox");
        }
    }
    cri.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sandbox })
        .await
        .map_err(call("RemovePodSandbox"))?;
    Ok(())
}
