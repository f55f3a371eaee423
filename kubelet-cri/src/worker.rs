//! One task per pod, as the kubelet's pod workers: each looks at its own
//! pod on the runtime, carries out the pass [`lifecycle::plan`] decides and
//! publishes the pod's status. A slow pull, a long grace period or a hung
//! runtime call holds up only its own pod.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, PodStatus};
use tokio::sync::watch;

use crate::{
    cgroups,
    config::{self, ConfigObjects, PodFacts},
    cri::Cri,
    error::{Result, call, io, io_at},
    handler::{self, Action},
    images,
    lifecycle::{self, Actions, Backoff, Kill, Seen, Start, now_ns},
    logs, ownership,
    probe::{Prober, Verdict},
    spec::{self, Kind, PodId, Settings},
    status::{self, ContainerView, Instance, PodView, RestartPolicy, State},
};

/// A pod to run.
#[derive(Clone, Debug)]
pub struct DesiredPod {
    pub id: PodId,
    pub pod: k8s_openapi::api::core::v1::Pod,
}

/// Sandbox annotation: how long containers get to stop when the pod goes.
pub const GRACE_ANNOTATION: &str = "kpr.io/termination-grace-period-seconds";
pub const DEFAULT_GRACE_SECONDS: i64 = 30;
/// The least a container gets to stop after its preStop hook, as the kubelet gives.
const MIN_GRACE_AFTER_HOOK: i64 = 2;

/// What every worker shares.
pub struct Shared {
    pub cri: Cri,
    /// The runtime's name (container ids are `NAME://ID`).
    pub runtime: String,
    pub settings: Settings,
    /// First restart back-off; at most 30 times it.
    pub backoff_base: Duration,
    /// Bounds a postStart hook (`--runtime-request-timeout`).
    pub request_timeout: Duration,
    /// A worker left without orders this long syncs its pod on its own.
    pub resync: Duration,
    /// The node's CPUs and memory, for `resourceFieldRef`s without a limit.
    pub node_cpus: u32,
    pub node_memory: u64,
}

/// What the kubelet asks of a pod's worker; only the newest order counts.
#[derive(Clone)]
pub enum Order {
    /// Make the pod run as its spec says.
    Sync { pod: Box<DesiredPod>, objects: Arc<ConfigObjects> },
    /// Stop and remove it, within this grace period if given (else its
    /// own), with its spec if known (its hooks, its sidecars' order).
    Stop { grace: Option<i64>, pod: Option<Box<DesiredPod>> },
}

/// The kubelet's side of a worker.
pub struct Handle {
    orders: watch::Sender<Option<Order>>,
    status: Arc<Mutex<Option<PodStatus>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    pub fn spawn(shared: Arc<Shared>, uid: String) -> Self {
        let (orders, rx) = watch::channel(None);
        let status = Arc::new(Mutex::new(None));
        let max = shared.backoff_base * 30;
        let worker = Worker {
            crash: Backoff::new(shared.backoff_base, max),
            pulls: Backoff::new(shared.backoff_base, max),
            sandboxes: Backoff::new(shared.backoff_base, max),
            shared,
            uid,
            pod: None,
            waiting: HashMap::new(),
            prober: Prober::default(),
            pod_ip: None,
            stopped: HashSet::new(),
            transitions: HashMap::new(),
        };
        let task = tokio::spawn(worker.run(rx, status.clone()));
        Self { orders, status, task }
    }

    pub fn order(&self, order: Order) {
        self.orders.send_replace(Some(order));
    }

    /// The status of the pod's last finished pass.
    pub fn status(&self) -> Option<PodStatus> {
        self.status.lock().unwrap().clone()
    }

    /// Whether the worker is gone (its pod stopped and removed).
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }
}

struct Worker {
    shared: Arc<Shared>,
    uid: String,
    /// The spec of the last sync: hooks and grace periods when it stops.
    pod: Option<DesiredPod>,
    /// Between restarts of a container that exited, and between pulls of an
    /// image that failed, by container name; between attempts at a sandbox
    /// the runtime would not make.
    crash: Backoff,
    pulls: Backoff,
    sandboxes: Backoff,
    /// Container -> why this pass holds it back (reason, message).
    waiting: HashMap<String, (String, String)>,
    prober: Prober,
    /// The current sandbox's id and the pod's IP in it.
    pod_ip: Option<(String, Option<String>)>,
    /// Sandboxes already stopped.
    stopped: HashSet<String>,
    /// Each pod condition's status and when it last changed.
    transitions: HashMap<String, (String, k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)>,
}

fn instance(s: cri::ContainerStatus, sandbox_id: String) -> Instance {
    Instance {
        attempt: s.metadata.as_ref().map_or(0, |m| m.attempt),
        state: match cri::ContainerState::try_from(s.state) {
            Ok(cri::ContainerState::ContainerCreated) => State::Created,
            Ok(cri::ContainerState::ContainerRunning) => State::Running,
            Ok(cri::ContainerState::ContainerExited) => State::Exited,
            _ => State::Unknown,
        },
        hash: s.annotations.get(spec::CONTAINER_HASH).cloned(),
        sandbox_id,
        id: s.id,
        started_at: s.started_at,
        finished_at: s.finished_at,
        exit_code: s.exit_code,
        reason: s.reason,
        message: s.message,
        image_ref: s.image_ref,
    }
}

fn now_time() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    let now = k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(now_ns()));
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now.unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH))
}

/// The status of a pod nothing has been done for yet.
pub fn pending_status(d: &DesiredPod, runtime: &str) -> PodStatus {
    status_of(d, &Seen::default(), None, &HashMap::new(), &HashMap::new(), runtime)
}

fn status_of(
    d: &DesiredPod,
    seen: &Seen,
    pod_ip: Option<Option<String>>,
    waiting: &HashMap<String, (String, String)>,
    verdicts: &HashMap<String, Verdict>,
    runtime: &str,
) -> PodStatus {
    fn view<'a>(
        c: &'a Container,
        seen: &'a Seen,
        waiting: &HashMap<String, (String, String)>,
        verdicts: &HashMap<String, Verdict>,
    ) -> ContainerView<'a> {
        let latest = seen.latest(&c.name);
        // Not probed yet: a startup or readiness probe has not said yes.
        let unprobed =
            (c.startup_probe.is_some() || c.readiness_probe.is_some()).then_some((c.startup_probe.is_none(), false));
        let probed = latest.and_then(|i| verdicts.get(&i.id)).map(|v| (v.started, v.ready)).or(unprobed);
        ContainerView {
            spec: c,
            latest,
            previous: seen.previous(&c.name),
            waiting: waiting.get(&c.name).cloned(),
            probed,
        }
    }
    let spec = d.pod.spec.clone().unwrap_or_default();
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    let pod_view = PodView {
        sandbox_ready: pod_ip.is_some(),
        pod_ip: pod_ip.flatten(),
        restart_policy: RestartPolicy::of(spec.restart_policy.as_deref()),
        qos_class: cgroups::qos_class(&spec).name(),
        init: inits.iter().map(|c| view(c, seen, waiting, verdicts)).collect(),
        apps: spec.containers.iter().map(|c| view(c, seen, waiting, verdicts)).collect(),
        runtime,
    };
    status::pod_status(&pod_view)
}

impl Worker {
    async fn run(mut self, mut orders: watch::Receiver<Option<Order>>, status: Arc<Mutex<Option<PodStatus>>>) {
        let mut stopping = orders.clone();
        let mut last: Option<Order> = None;
        loop {
            // The kubelet's orders, or on its own when they stop coming (the
            // loop waits on an API server that does not answer): pods keep
            // being tended either way.
            let order = tokio::select! {
                changed = orders.changed() => match changed {
                    Ok(()) => orders.borrow_and_update().clone(),
                    Err(_) => return,
                },
                _ = tokio::time::sleep(self.shared.resync), if last.is_some() => last.clone(),
            };
            match order {
                Some(Order::Sync { pod, objects }) => {
                    last = Some(Order::Sync { pod: pod.clone(), objects: objects.clone() });
                    // A stop abandons the pass (a pull that never ends, say).
                    tokio::select! {
                        r = self.sync(&pod, &objects, &status) => match r {
                            Ok(mut s) => {
                                status::stamp_transitions(&mut s, &mut self.transitions, now_time());
                                *status.lock().unwrap() = Some(s);
                            }
                            Err(e) => tracing::warn!(pod = %pod.id, error = %format!("{e:#}"), "pod not synced"),
                        },
                        _ = stopping.wait_for(|o| matches!(o, Some(Order::Stop { .. }))) => {}
                    }
                    self.pod = Some(*pod);
                }
                Some(Order::Stop { grace, pod }) => {
                    if self.pod.is_none() {
                        self.pod = pod.map(|p| *p);
                    }
                    if let Err(e) = self.stop(grace).await {
                        // The next pass starts another worker to try again.
                        tracing::warn!(uid = %self.uid, error = %format!("{e:#}"), "removing a pod");
                    }
                    return;
                }
                None => {}
            }
        }
    }

    /// The pod's sandboxes (newest first, with what the runtime says of
    /// them) and its containers' instances.
    async fn observe(&mut self) -> Result<(Seen, Vec<cri::PodSandbox>)> {
        let labels = HashMap::from([
            (spec::MANAGED_BY.to_string(), spec::MANAGED_BY_VALUE.to_string()),
            (spec::POD_UID.to_string(), self.uid.clone()),
        ]);
        let cri = &mut self.shared.cri.clone();
        let filter = cri::PodSandboxFilter { label_selector: labels.clone(), ..Default::default() };
        let req = cri::ListPodSandboxRequest { filter: Some(filter) };
        let mut sandboxes = cri.runtime.list_pod_sandbox(req).await.map_err(call("ListPodSandbox"))?.into_inner().items;
        sandboxes.sort_by_key(|s| std::cmp::Reverse(s.metadata.as_ref().map_or(0, |m| m.attempt)));
        let filter = cri::ContainerFilter { label_selector: labels, ..Default::default() };
        let req = cri::ListContainersRequest { filter: Some(filter) };
        let containers = cri.runtime.list_containers(req).await.map_err(call("ListContainers"))?.into_inner();
        let mut seen = Seen {
            sandboxes: sandboxes
                .iter()
                .map(|s| lifecycle::Sandbox {
                    id: s.id.clone(),
                    attempt: s.metadata.as_ref().map_or(0, |m| m.attempt),
                    ready: s.state == cri::PodSandboxState::SandboxReady as i32,
                })
                .collect(),
            instances: HashMap::new(),
        };
        for c in containers.containers {
            let name = c.labels.get(spec::CONTAINER_NAME).cloned().unwrap_or_default();
            let req = cri::ContainerStatusRequest { container_id: c.id.clone(), verbose: false };
            let status = match cri.runtime.container_status(req).await {
                Ok(r) => r.into_inner().status,
                // Gone meanwhile: not there.
                Err(e) if e.code() == tonic::Code::NotFound => None,
                // Anything else: better no pass than one blind to a container.
                Err(e) => return Err(call("ContainerStatus")(e)),
            };
            let Some(status) = status else { continue };
            seen.instances.entry(name).or_default().push(instance(status, c.pod_sandbox_id));
        }
        for list in seen.instances.values_mut() {
            list.sort_by_key(|i| std::cmp::Reverse(i.attempt));
        }
        Ok((seen, sandboxes))
    }

    /// The pod's IP in sandbox `id` (asked once per sandbox); the node's
    /// for a pod on the host network.
    async fn pod_ip(&mut self, d: &DesiredPod, id: &str) -> Option<String> {
        if d.pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return self.shared.settings.node_ip.clone();
        }
        if let Some((known, ip)) = &self.pod_ip
            && known == id
        {
            return ip.clone();
        }
        let req = cri::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
        let ip = match self.shared.cri.clone().runtime.pod_sandbox_status(req).await {
            Ok(r) => r.into_inner().status.and_then(|s| s.network).map(|n| n.ip).filter(|ip| !ip.is_empty()),
            Err(_) => return None,
        };
        self.pod_ip = Some((id.to_string(), ip.clone()));
        ip
    }

    /// One pass: what runs is made to match the spec; returns the status.
    /// `published` gets what was seen before anything is done, on the
    /// first pass, so a pass that takes long (a pull) leaves a status.
    async fn sync(
        &mut self,
        d: &DesiredPod,
        objects: &ConfigObjects,
        published: &Mutex<Option<PodStatus>>,
    ) -> Result<PodStatus> {
        self.waiting.clear();
        if self.transitions.is_empty() {
            // A restarted kubelet keeps the transition times the API holds.
            for c in d.pod.status.iter().flat_map(|s| s.conditions.iter().flatten()) {
                if let Some(at) = &c.last_transition_time {
                    self.transitions.insert(c.type_.clone(), (c.status.clone(), at.clone()));
                }
            }
        }
        let (seen, _) = self.observe().await?;
        let spec = d.pod.spec.clone().unwrap_or_default();
        let current = seen.current().map(|s| s.id.clone());
        let pod_ip = match &current {
            Some(id) => self.pod_ip(d, id).await,
            None => None,
        };
        // The probes of what runs in the current sandbox.
        let mut verdicts = HashMap::new();
        let live: Vec<(&Container, &Instance)> = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| spec::is_sidecar(c))
            .chain(&spec.containers)
            .filter_map(|c| seen.latest(&c.name).map(|i| (c, i)))
            .filter(|(_, i)| i.state == State::Running && Some(&i.sandbox_id) == current.as_ref())
            .collect();
        self.prober.retain(&live.iter().map(|(_, i)| i.id.clone()).collect());
        for (c, i) in &live {
            if c.startup_probe.is_some() || c.readiness_probe.is_some() || c.liveness_probe.is_some() {
                let v = self.prober.check(&self.shared.cri, c, &i.id, i.started_at, pod_ip.as_deref());
                verdicts.insert(i.id.clone(), v);
            }
        }
        {
            let mut published = published.lock().unwrap();
            if published.is_none() {
                let ip = current.as_ref().map(|_| pod_ip.clone());
                let mut s = status_of(d, &seen, ip, &self.waiting, &verdicts, &self.shared.runtime);
                status::stamp_transitions(&mut s, &mut self.transitions, now_time());
                *published = Some(s);
            }
        }
        let actions = lifecycle::plan(&spec, &seen, &verdicts);
        // A running pod is tended every pass (its volumes, its logs); what
        // was done just now is reported as the runtime sees it.
        let acted = actions != Actions::default();
        if acted || current.is_some() {
            self.act(d, objects, &seen, actions, pod_ip).await?;
        }
        let seen = if acted { self.observe().await?.0 } else { seen };
        let pod_ip = match seen.current().map(|s| s.id.clone()) {
            Some(id) => Some(self.pod_ip(d, &id).await),
            None => None,
        };
        Ok(status_of(d, &seen, pod_ip, &self.waiting, &verdicts, &self.shared.runtime))
    }

    /// Carries out a pass's actions.
    async fn act(
        &mut self,
        d: &DesiredPod,
        objects: &ConfigObjects,
        seen: &Seen,
        a: Actions,
        pod_ip: Option<String>,
    ) -> Result<()> {
        let mut killed = true;
        for k in &a.kill {
            tracing::info!(pod = %d.id, container = %k.name, reason = %k.why, "stopping a container");
            let grace = self.grace(d, k);
            let c = self.container(d, &k.name);
            killed &= stop_container(self.shared.cri.clone(), c, k.id.clone(), grace, pod_ip.clone()).await;
        }
        if !killed {
            // Nothing starts beside what would not stop: the next pass tries again.
            return Ok(());
        }
        for id in &a.stop_sandboxes {
            if !self.stopped.contains(id) {
                let req = cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() };
                self.shared.cri.clone().runtime.stop_pod_sandbox(req).await.map_err(call("StopPodSandbox"))?;
                tracing::info!(pod = %d.id, sandbox = %id, "pod sandbox stopped");
                self.stopped.insert(id.clone());
            }
        }
        // As the kubelet, only the newest dead instance of a container is
        // kept (for its status and logs); its log goes with an older one.
        let log_dir = spec::log_dir(&self.shared.settings.root_dir, &d.id);
        for old in &a.remove {
            let name = seen.instances.iter().find(|(_, l)| l.iter().any(|i| i.id == old.id)).map(|(n, _)| n.clone());
            let req = cri::RemoveContainerRequest { container_id: old.id.clone() };
            match self.shared.cri.clone().runtime.remove_container(req).await {
                Ok(_) => {
                    if let Some(name) = name {
                        logs::remove_instance(&log_dir.join(spec::log_path(&name, old.attempt)));
                    }
                }
                Err(e) => tracing::debug!(id = %old.id, error = %e.message(), "removing an old container instance"),
            }
        }
        for id in &a.remove_sandboxes {
            let req = cri::RemovePodSandboxRequest { pod_sandbox_id: id.clone() };
            if let Err(e) = self.shared.cri.clone().runtime.remove_pod_sandbox(req).await {
                tracing::debug!(sandbox = %id, error = %e.message(), "removing an old sandbox");
            }
            self.stopped.remove(id);
        }

        let (sandbox_id, attempt) = match (a.new_sandbox, seen.current()) {
            (Some(_), _) if self.sandboxes.holding_since_last("", now_ns()).is_some() => return Ok(()),
            (Some(attempt), _) => match self.run_sandbox(d, attempt, objects).await {
                Ok(id) => {
                    self.sandboxes.clear("");
                    (id, attempt)
                }
                Err(e) => {
                    tracing::warn!(pod = %d.id, error = %format!("{e:#}"), "could not start the pod sandbox");
                    let now = now_ns();
                    self.sandboxes.next("", now, now);
                    return Ok(());
                }
            },
            (None, Some(s)) => (s.id.clone(), s.attempt),
            (None, None) => return Ok(()),
        };
        // Logs of what runs are rotated as they grow.
        for (name, list) in &seen.instances {
            if let Some(live) = list.first().filter(|i| i.state == State::Running && i.sandbox_id == sandbox_id) {
                self.rotate_log(&log_dir.join(spec::log_path(name, live.attempt)), &live.id).await;
            }
        }
        // Configuration volumes follow their objects while the pod runs;
        // one that cannot be written holds back the containers that start
        // from now on (a CreateContainerConfigError, at their start).
        let facts = self.facts(d, &sandbox_id).await;
        let volumes = self.write_config_volumes(d, objects, &facts);
        let sandbox = self.sandbox_config(d, attempt);
        let pod = InPod { d, objects, sandbox_id: &sandbox_id, sandbox: &sandbox, facts: &facts, volumes: &volumes };
        for s in &a.start {
            if let Some(c) = self.container(d, &s.name) {
                self.start(&pod, &c, s).await;
            }
        }
        Ok(())
    }

    /// The spec of container `name` (init or app).
    fn container(&self, d: &DesiredPod, name: &str) -> Option<Container> {
        let spec = d.pod.spec.as_ref()?;
        spec.init_containers.iter().flatten().chain(&spec.containers).find(|c| c.name == name).cloned()
    }

    /// The grace period of a kill: a probe's own overrides the pod's.
    fn grace(&self, d: &DesiredPod, k: &Kill) -> i64 {
        let c = self.container(d, &k.name);
        let probe_grace = c
            .iter()
            .filter(|_| k.by_probe)
            .flat_map(|c| [&c.liveness_probe, &c.startup_probe])
            .flatten()
            .find_map(|p| p.termination_grace_period_seconds);
        let pod_grace = d.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds);
        probe_grace.or(pod_grace).unwrap_or(DEFAULT_GRACE_SECONDS)
    }

    /// Starts `s` unless its back-off says wait; then its postStart hook.
    async fn start(&mut self, pod: &InPod<'_>, c: &Container, s: &Start) {
        // Per container and spec, as the kubelet: a fixed spec starts afresh.
        let key = format!("{}/{}", c.name, spec::spec_hash(c));
        if let Some(finished) = s.after_finish {
            let now = now_ns();
            if let Some(delay) = self.crash.holding(&key, finished, now) {
                let message = format!("back-off {delay:?} restarting failed container={} pod={}", c.name, pod.d.id);
                self.waiting.insert(c.name.clone(), ("CrashLoopBackOff".into(), message));
                return;
            }
            // Counted before the start: a start that fails backs off too.
            self.crash.next(&key, finished, now);
        }
        let Some(id) = self.create_and_start(pod, c, s.kind, s.attempt).await else { return };
        if let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
            let action = Action::of_hook(hook);
            let (cri, timeout, ip) =
                (self.shared.cri.clone(), self.shared.request_timeout, pod.facts.pod_ip.as_deref());
            if let Err(e) = handler::run(cri, c, &id, &action, timeout, ip).await {
                let message = format!("PostStartHook failed: {e}");
                tracing::warn!(pod = %pod.d.id, container = %c.name, %message, "killing the container");
                let kill = Kill { id: id.clone(), name: c.name.clone(), why: message.clone(), by_probe: false };
                let grace = self.grace(pod.d, &kill);
                let ip = ip.map(str::to_string);
                stop_container(self.shared.cri.clone(), Some(c.clone()), id, grace, ip).await;
                self.waiting.insert(c.name.clone(), ("PostStartHookError".into(), message));
            }
        }
    }

    fn hold(&mut self, d: &DesiredPod, c: &Container, reason: &str, message: String) {
        tracing::warn!(pod = %d.id, container = %c.name, reason, %message, "container not started");
        self.waiting.insert(c.name.clone(), (reason.into(), message));
    }

    /// Pulls (per policy), creates and starts instance `attempt` of `c`;
    /// returns its id once it started.
    async fn create_and_start(&mut self, pod: &InPod<'_>, c: &Container, kind: Kind, attempt: u32) -> Option<String> {
        let (d, sandbox) = (pod.d, pod.sandbox);
        let mut cri = self.shared.cri.clone();
        let image = c.image.clone().unwrap_or_default();
        if let Some(delay) = self.pulls.holding_since_last(&c.name, now_ns()) {
            self.hold(d, c, "ImagePullBackOff", format!("back-off {delay:?} pulling image {image:?}"));
            return None;
        }
        if let Err(e) = images::ensure(&mut cri, &image, images::pull_policy(c), sandbox).await {
            let now = now_ns();
            self.pulls.next(&c.name, now, now);
            self.hold(d, c, e.reason(), e.to_string());
            return None;
        }
        self.pulls.clear(&c.name);
        if let Some(message) = self.refuse_root(d, c, &image).await {
            self.hold(d, c, "CreateContainerConfigError", format!("{message} (pod: {}, container: {})", d.id, c.name));
            return None;
        }
        let env = match (pod.volumes, config::env(&d.pod, &d.id, c, pod.objects, pod.facts)) {
            (Err(e), _) => {
                self.hold(d, c, "CreateContainerConfigError", e.clone());
                return None;
            }
            (_, Err(e)) => {
                self.hold(d, c, "CreateContainerConfigError", format!("{e:#}"));
                return None;
            }
            (Ok(()), Ok(env)) => env,
        };
        let settings = &self.shared.settings;
        let config = spec::check_sub_paths(&d.pod, &d.id, c, settings)
            .and_then(|()| spec::container_config(&d.pod, &d.id, c, kind, attempt, settings, &env));
        let config = match config {
            Ok(mut config) => {
                self.image_user(&mut config, &image).await;
                config
            }
            Err(e) => {
                self.hold(d, c, "CreateContainerConfigError", format!("{e:#}"));
                return None;
            }
        };
        let log_dir = std::path::Path::new(&sandbox.log_directory).join(&c.name);
        if let Err(e) = std::fs::create_dir_all(&log_dir) {
            // The runtime reports the missing folder when it opens the log.
            tracing::warn!(dir = %log_dir.display(), error = %e, "cannot create the container log folder");
        }
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        };
        let id = match cri.runtime.create_container(request).await {
            Ok(r) => r.into_inner().container_id,
            Err(e) => {
                self.hold(d, c, "CreateContainerError", e.message().into());
                return None;
            }
        };
        if let Err(e) = cri.runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }).await {
            self.hold(d, c, "RunContainerError", e.message().into());
            return None;
        }
        tracing::info!(pod = %d.id, container = %c.name, kind = kind.label(), attempt, id = %id, "container started");
        Some(id)
    }

    /// A container with no user of its own runs as its image's user, said
    /// to the runtime as the kubelet does (so `runAsGroup` alone works).
    async fn image_user(&mut self, config: &mut cri::ContainerConfig, image: &str) {
        let Some(sc) = config.linux.as_mut().and_then(|l| l.security_context.as_mut()) else { return };
        if sc.run_as_user.is_some() || !sc.run_as_username.is_empty() {
            return;
        }
        match images::user(&mut self.shared.cri.clone(), image).await {
            Some((Some(uid), _)) => sc.run_as_user = Some(cri::Int64Value { value: uid }),
            Some((None, name)) if !name.is_empty() => sc.run_as_username = name,
            _ => {}
        }
    }

    /// Why `c` may not start when it must not run as root and its image
    /// decides the user.
    async fn refuse_root(&mut self, d: &DesiredPod, c: &Container, image: &str) -> Option<String> {
        if !spec::run_as_non_root(&d.pod, c) || spec::run_as_user(&d.pod, c).is_some() {
            return None;
        }
        let root = "container has runAsNonRoot and image will run as root";
        match images::user(&mut self.shared.cri.clone(), image).await {
            Some((Some(uid), _)) if uid != 0 => None,
            Some((Some(_), _)) => Some(root.into()),
            Some((None, name)) if name.is_empty() || name == "root" => Some(root.into()),
            Some((None, name)) => Some(format!(
                "container has runAsNonRoot and image has non-numeric user ({name}), cannot verify user is non-root"
            )),
            None => Some("container has runAsNonRoot and the image's user is unknown".into()),
        }
    }

    /// Rotates a running container's log once it is over the size limit:
    /// the file is renamed and the runtime asked to reopen the path (put
    /// back if it cannot, so nothing is lost).
    async fn rotate_log(&mut self, path: &std::path::Path, container_id: &str) {
        let rotated = match logs::rotate(path, self.shared.settings.log_max_size) {
            Ok(Some(rotated)) => rotated,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(log = %path.display(), error = %e, "cannot rotate a container log");
                return;
            }
        };
        let req = cri::ReopenContainerLogRequest { container_id: container_id.into() };
        if let Err(e) = self.shared.cri.clone().runtime.reopen_container_log(req).await {
            tracing::warn!(log = %path.display(), error = %e.message(), "the runtime did not reopen a rotated log: put back");
            if let Err(e) = std::fs::rename(&rotated, path) {
                tracing::warn!(log = %path.display(), error = %e, "cannot put a rotated log back");
            }
            return;
        }
        // Only once the runtime writes to a fresh file do old ones go.
        if let Err(e) = logs::prune(path, self.shared.settings.log_max_files) {
            tracing::warn!(log = %path.display(), error = %e, "cannot remove old rotated logs");
        }
    }

    /// What the pod's fields do not say: its IP (from its sandbox) and the node's.
    async fn facts(&mut self, d: &DesiredPod, sandbox_id: &str) -> PodFacts {
        let s = &self.shared;
        let (host_ip, node_name, node_cpus, node_memory) =
            (s.settings.node_ip.clone(), s.settings.node_name.clone(), s.node_cpus, s.node_memory);
        PodFacts { pod_ip: self.pod_ip(d, sandbox_id).await, host_ip, node_name, node_cpus, node_memory }
    }

    /// Writes the files of `d`'s configuration volumes (only what changed).
    fn write_config_volumes(
        &self,
        d: &DesiredPod,
        objects: &ConfigObjects,
        facts: &PodFacts,
    ) -> std::result::Result<(), String> {
        for v in d.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let files = match config::volume_files(&d.pod, &d.id, v, objects, facts) {
                Ok(Some(files)) => files,
                Ok(None) => continue,
                Err(e) => return Err(format!("volume {:?}: {e}", v.name)),
            };
            let dir = spec::config_dir(&self.shared.settings, &d.id, &v.name);
            match config::write_atomically(&dir, &files, fs_group(d)) {
                Ok(true) => tracing::info!(pod = %d.id, volume = %v.name, "volume files written"),
                Ok(false) => {}
                Err(e) => return Err(format!("writing volume {:?} at {}: {e}", v.name, dir.display())),
            }
        }
        Ok(())
    }

    fn sandbox_config(&self, d: &DesiredPod, attempt: u32) -> cri::PodSandboxConfig {
        let mut config = spec::sandbox_config(&d.pod, &d.id, attempt, &self.shared.settings);
        let grace =
            d.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(DEFAULT_GRACE_SECONDS);
        config.annotations.insert(GRACE_ANNOTATION.into(), grace.to_string());
        config
    }

    async fn run_sandbox(&mut self, d: &DesiredPod, attempt: u32, objects: &ConfigObjects) -> Result<String> {
        let config = self.sandbox_config(d, attempt);
        std::fs::create_dir_all(&config.log_directory).map_err(io("creating the pod's log folder"))?;
        for v in d.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()).filter(|v| v.empty_dir.is_some()) {
            let dir = spec::empty_dir(&self.shared.settings, &d.id, &v.name);
            std::fs::create_dir_all(&dir).map_err(io_at("creating emptyDir", &dir))?;
            // Writable by whatever user the containers run as, as the kubelet makes it.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .map_err(io_at("opening emptyDir", &dir))?;
            if let Some(gid) = fs_group(d) {
                ownership::set(&dir, gid, false).map_err(io_at("giving emptyDir to the fsGroup", &dir))?;
            }
        }
        let runtime_handler = objects.runtime_handler(&d.pod)?;
        // With cgroupfs the kubelet makes the pod's cgroup, with its summed
        // limits, before the runtime puts the sandbox in it (with systemd
        // the runtime makes the slices).
        if self.shared.settings.cgroup_driver == cgroups::Driver::Cgroupfs
            && let Some(path) = config.linux.as_ref().map(|l| l.cgroup_parent.clone())
        {
            let limits = cgroups::pod_limits(&d.pod.spec.clone().unwrap_or_default());
            if let Err(e) = cgroups::apply(Path::new(cgroups::MOUNT), &path, &limits) {
                tracing::warn!(pod = %d.id, cgroup = %path, error = %e, "cannot set the pod cgroup's limits");
            }
        }
        let req = cri::RunPodSandboxRequest { config: Some(config), runtime_handler };
        let id = self
            .shared
            .cri
            .clone()
            .runtime
            .run_pod_sandbox(req)
            .await
            .map_err(call("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        tracing::info!(pod = %d.id, sandbox = %id, attempt, "pod sandbox running");
        Ok(id)
    }

    /// Stops and removes the whole pod: app containers first (each after
    /// its preStop hook), then sidecars last to first, within the grace
    /// period; then its sandboxes and folders.
    async fn stop(&mut self, asked: Option<i64>) -> Result<()> {
        let (seen, sandboxes) = self.observe().await?;
        let spec_grace = sandboxes.iter().find_map(|s| s.annotations.get(GRACE_ANNOTATION)?.parse().ok());
        let grace = asked.or(spec_grace).unwrap_or(DEFAULT_GRACE_SECONDS);
        let name = sandboxes.first().and_then(|s| s.metadata.as_ref()).map(|m| format!("{}/{}", m.namespace, m.name));
        let name = name.unwrap_or_else(|| self.uid.clone());
        tracing::info!(pod = %name, grace, "stopping a pod that is no longer wanted");
        let pod = self.pod.clone();
        let spec = pod.as_ref().and_then(|d| d.pod.spec.clone()).unwrap_or_default();
        let sidecars: Vec<&Container> = spec.init_containers.iter().flatten().filter(|c| spec::is_sidecar(c)).collect();
        // Known from the last pass, else asked (a pod this worker never ran).
        let pod_ip = match (&self.pod_ip, &pod, sandboxes.first()) {
            (Some((_, ip)), _, _) => ip.clone(),
            (None, Some(d), Some(s)) => self.pod_ip(d, &s.id).await,
            _ => None,
        };
        let deadline = Instant::now() + Duration::from_secs(grace.max(0) as u64);
        let left = || deadline.saturating_duration_since(Instant::now()).as_secs() as i64;
        let running = |name: &str| seen.latest(name).filter(|i| i.state == State::Running).map(|i| i.id.clone());
        let apps = seen
            .instances
            .keys()
            .filter(|n| !sidecars.iter().any(|c| &c.name == *n))
            .filter_map(|n| running(n).map(|id| (n.clone(), id)));
        let stops = apps.map(|(n, id)| {
            let c = spec.containers.iter().chain(spec.init_containers.iter().flatten()).find(|c| c.name == n);
            stop_container(self.shared.cri.clone(), c.cloned(), id, grace, pod_ip.clone())
        });
        futures::future::join_all(stops).await;
        for c in sidecars.iter().rev() {
            if let Some(id) = running(&c.name) {
                let grace = left().max(MIN_GRACE_AFTER_HOOK);
                stop_container(self.shared.cri.clone(), Some((*c).clone()), id, grace, pod_ip.clone()).await;
            }
        }
        for s in &sandboxes {
            let ids = seen.instances.values().flatten().filter(|i| i.sandbox_id == s.id).map(|i| i.id.clone());
            remove_pod(self.shared.cri.clone(), s.id.clone(), ids.collect(), 0).await?;
        }
        // A sandbox or container whose creation an abandoned pass left
        // running on the runtime's side goes too.
        match self.observe().await {
            Ok((late, late_sandboxes)) => {
                for s in &late_sandboxes {
                    let ids = late.instances.values().flatten().filter(|i| i.sandbox_id == s.id);
                    let ids = ids.map(|i| i.id.clone()).collect();
                    if let Err(e) = remove_pod(self.shared.cri.clone(), s.id.clone(), ids, 0).await {
                        tracing::warn!(pod = %name, error = %format!("{e:#}"), "removing a late sandbox");
                    }
                }
            }
            Err(e) => tracing::warn!(pod = %name, error = %format!("{e:#}"), "looking for late sandboxes"),
        }
        let id = sandboxes.first().and_then(|s| s.metadata.as_ref()).map(|m| PodId {
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            uid: self.uid.clone(),
        });
        if let Some(id) = id.or(pod.map(|d| d.id)) {
            let settings = &self.shared.settings;
            for dir in [spec::pod_dir(settings, &id), spec::log_dir(&settings.root_dir, &id)] {
                // Already gone is fine; anything else is only disk space.
                if let Err(e) = std::fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a pod folder");
                }
            }
        }
        if self.shared.settings.cgroup_driver == cgroups::Driver::Cgroupfs {
            for qos in [cgroups::Qos::Guaranteed, cgroups::Qos::Burstable, cgroups::Qos::BestEffort] {
                let path =
                    cgroups::pod_cgroup(&self.shared.settings.cgroup_parent, qos, &self.uid, cgroups::Driver::Cgroupfs);
                cgroups::remove(Path::new(cgroups::MOUNT), &path);
            }
        }
        tracing::info!(pod = %name, "pod removed");
        Ok(())
    }
}

/// The pod's `securityContext.fsGroup`.
fn fs_group(d: &DesiredPod) -> Option<u32> {
    let group = d.pod.spec.as_ref()?.security_context.as_ref()?.fs_group?;
    u32::try_from(group).ok()
}

/// The running sandbox a container is started in.
struct InPod<'a> {
    d: &'a DesiredPod,
    objects: &'a ConfigObjects,
    sandbox_id: &'a str,
    sandbox: &'a cri::PodSandboxConfig,
    facts: &'a PodFacts,
    /// Whether the pod's configuration volumes are written, or why not.
    volumes: &'a std::result::Result<(), String>,
}

/// Runs `c`'s preStop hook (within the grace period), then StopContainer
/// with what is left of it (at least 2 s after a hook, as the kubelet).
/// Says whether the container stopped.
async fn stop_container(mut cri: Cri, c: Option<Container>, id: String, grace: i64, pod_ip: Option<String>) -> bool {
    let mut timeout = grace.max(0);
    if let Some((c, hook)) = c.as_ref().and_then(|c| Some((c, c.lifecycle.as_ref()?.pre_stop.as_ref()?)))
        && grace > 0
    {
        let started = Instant::now();
        let bound = Duration::from_secs(grace as u64);
        let ip = pod_ip.as_deref();
        if let Err(e) = handler::run(cri.clone(), c, &id, &Action::of_hook(hook), bound, ip).await {
            tracing::warn!(container = %c.name, error = %e, "PreStopHook failed");
        }
        timeout = (grace - started.elapsed().as_secs() as i64).max(MIN_GRACE_AFTER_HOOK);
    }
    // The call may take the whole grace period, and then some.
    let deadline = Duration::from_secs(timeout as u64) + crate::cri::DEFAULT_REQUEST_TIMEOUT;
    let req = cri::StopContainerRequest { container_id: id.clone(), timeout };
    match tokio::time::timeout(deadline, cri.runtime_unbounded.stop_container(req)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(%id, error = %e.message(), "stopping a container");
            false
        }
        Err(_) => {
            tracing::warn!(%id, ?deadline, "stopping a container: no answer");
            false
        }
    }
}

/// StopContainer (with `grace` seconds) on every container at once, then
/// StopPodSandbox, RemoveContainer, RemovePodSandbox.
pub async fn remove_pod(mut cri: Cri, sandbox: String, containers: Vec<String>, grace: i64) -> Result<()> {
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
