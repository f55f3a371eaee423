//! The reconcile loop: every pass, each pod the source wants is handed to
//! its own worker ([`worker`]), which makes it run on the runtime; pods the
//! kubelet created that nobody wants are stopped and removed by theirs.
//! State lives in the runtime (labels and attempts), so a restarted kubelet
//! adopts what is running instead of starting it again.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::PodStatus;

pub use crate::worker::DesiredPod;
use crate::{
    cgroups,
    config::ConfigObjects,
    cri::Cri,
    error::{Result, call},
    spec::{self, Settings},
    worker::{self, Handle, Order, Shared},
};

pub struct Kubelet {
    shared: Arc<Shared>,
    /// Pod uid -> its worker.
    workers: HashMap<String, Handle>,
    /// Pods being deleted through the API, by uid: the grace period their
    /// deletion gave (`deletionGracePeriodSeconds`, over the spec's) and
    /// their spec.
    deleting: HashMap<String, (Option<i64>, DesiredPod)>,
    /// Uids of the pods that had a sandbox at the last pass.
    on_node: HashSet<String>,
    /// When pod cgroups nobody owns were last looked for.
    swept: Option<std::time::Instant>,
}

/// How often pod cgroups left by pods removed behind the kubelet's back
/// (while it was down, or by `kpr kubelet reset`) are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

fn selector() -> HashMap<String, String> {
    HashMap::from([(spec::MANAGED_BY.to_string(), spec::MANAGED_BY_VALUE.to_string())])
}

impl Kubelet {
    /// Connects to the runtime and checks that it is ready.
    pub async fn connect(
        endpoint: &str,
        mut settings: Settings,
        backoff_base: Duration,
        request_timeout: Duration,
        sync_period: Duration,
    ) -> Result<Self> {
        let mut cri = Cri::connect(endpoint, request_timeout).await?;
        let info = cri.check().await?;
        tracing::info!(runtime = %info.name, version = %info.version, api = %info.api_version, "container runtime ready");
        settings.cgroup_driver = cri.cgroup_driver(settings.cgroup_driver).await;
        let shared = Shared {
            cri,
            runtime: info.name,
            settings,
            backoff_base,
            request_timeout,
            resync: (sync_period * 2).max(Duration::from_secs(1)),
            node_cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            node_memory: crate::node::Machine::read(std::path::Path::new("/")).memory,
        };
        Ok(Self {
            shared: Arc::new(shared),
            workers: HashMap::new(),
            deleting: HashMap::new(),
            on_node: HashSet::new(),
            swept: None,
        })
    }

    /// The pods being deleted through the API (as the kube source lists
    /// them): they stop within their deletion's grace period, with their hooks.
    pub fn set_deleting(&mut self, deleting: HashMap<String, (Option<i64>, DesiredPod)>) {
        self.deleting = deleting;
    }

    /// Whether pod `uid` still has anything on this node (running, or
    /// being stopped).
    pub fn has_pod(&self, uid: &str) -> bool {
        self.on_node.contains(uid) || self.workers.get(uid).is_some_and(|w| !w.finished())
    }

    /// Removes the cgroupfs pod cgroups of pods this node no longer has
    /// (on the first pass, then every minute); one still in use stays.
    fn sweep_cgroups(&mut self) {
        let settings = &self.shared.settings;
        if settings.cgroup_driver != cgroups::Driver::Cgroupfs
            || self.swept.is_some_and(|at| at.elapsed() < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(std::time::Instant::now());
        let mount = std::path::Path::new(cgroups::MOUNT);
        for (uid, path) in cgroups::pod_cgroups(mount, &settings.cgroup_parent) {
            if !self.on_node.contains(&uid) && !self.workers.contains_key(&uid) {
                tracing::info!(cgroup = %path, "removing the cgroup of a pod that is gone");
                cgroups::remove(mount, &path);
            }
        }
    }

    /// One pass: hands each pod in `desired` to its worker and, when
    /// `delete_others` (the source listed everything), has every other pod
    /// stopped. Returns each desired pod's status as its worker last saw
    /// it (a pod whose worker is busy never holds the others up). Until its
    /// worker has looked, a new pod is Pending; one already on the node has
    /// no status yet (`None`), so a restarted kubelet never reports running
    /// pods as not started.
    pub async fn sync(
        &mut self,
        desired: &[DesiredPod],
        delete_others: bool,
        objects: ConfigObjects,
    ) -> Result<Vec<Option<PodStatus>>> {
        let filter = cri::PodSandboxFilter { label_selector: selector(), ..Default::default() };
        let req = cri::ListPodSandboxRequest { filter: Some(filter) };
        let sandboxes = self.shared.cri.clone().runtime.list_pod_sandbox(req).await.map_err(call("ListPodSandbox"))?;
        self.on_node =
            sandboxes.into_inner().items.iter().filter_map(|s| s.labels.get(spec::POD_UID).cloned()).collect();
        self.workers.retain(|_, w| !w.finished());
        self.sweep_cgroups();
        let objects = Arc::new(objects);
        let mut statuses = Vec::new();
        for d in desired {
            let shared = &self.shared;
            let w =
                self.workers.entry(d.id.uid.clone()).or_insert_with(|| Handle::spawn(shared.clone(), d.id.uid.clone()));
            w.order(Order::Sync { pod: Box::new(d.clone()), objects: objects.clone() });
            let new = !self.on_node.contains(&d.id.uid);
            let runtime = &self.shared.runtime;
            statuses.push(w.status().or_else(|| new.then(|| worker::pending_status(d, runtime))));
        }
        if delete_others {
            let wanted: HashSet<&str> = desired.iter().map(|d| d.id.uid.as_str()).collect();
            let unwanted: HashSet<String> = self
                .on_node
                .iter()
                .chain(self.workers.keys())
                .filter(|uid| !wanted.contains(uid.as_str()))
                .cloned()
                .collect();
            for uid in unwanted {
                let (grace, pod) = match self.deleting.get(&uid) {
                    Some((grace, pod)) => (*grace, Some(Box::new(pod.clone()))),
                    None => (None, None),
                };
                let shared = &self.shared;
                let w = self.workers.entry(uid.clone()).or_insert_with(|| Handle::spawn(shared.clone(), uid));
                w.order(Order::Stop { grace, pod });
            }
        }
        Ok(statuses)
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
        worker::remove_pod(cri.clone(), s.id.clone(), ids, 0).await?;
    }
    Ok(sandboxes.len())
}
