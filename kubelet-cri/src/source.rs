//! Where pods come from and where their status goes: static pod manifests
//! in a folder (status written beside each manifest), or the API server
//! (pods bound to this node; status through the status subresource).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, Pod, PodStatus, Secret, Service, ServiceAccount},
    node::v1::RuntimeClass,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use sha2::Digest as _;

use crate::error::{Result, io_at};

use crate::{
    config::{ConfigObjects, TokenWanted},
    kubelet::DesiredPod,
    spec::PodId,
};

/// The status file beside a manifest: `web.yaml` -> `web.yaml.status.json`.
pub const STATUS_SUFFIX: &str = ".status.json";

pub fn status_path(manifest: &Path) -> PathBuf {
    let mut name = manifest.as_os_str().to_owned();
    name.push(STATUS_SUFFIX);
    name.into()
}

/// A static pod's uid, as the kubelet makes one: a hash of what the manifest
/// says, so an edited manifest is a new pod.
fn static_uid(pod: &Pod) -> String {
    let digest = sha2::Sha256::digest(serde_json::to_vec(pod).unwrap_or_default());
    let h: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Static pods from the manifests in a folder.
pub struct DirSource {
    dir: PathBuf,
    /// Problems already logged, so each is said once.
    reported: Mutex<HashSet<String>>,
    /// What each status file last held.
    written: Mutex<HashMap<PathBuf, Vec<u8>>>,
    origins: Mutex<HashMap<String, PathBuf>>,
    /// The ConfigMaps and Secrets the last read found beside the pods.
    objects: Mutex<ConfigObjects>,
}

impl DirSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            reported: Mutex::default(),
            written: Mutex::default(),
            origins: Mutex::default(),
            objects: Mutex::default(),
        }
    }

    /// The ConfigMaps and Secrets in the folder, as of the last [`DirSource::pods`].
    pub fn objects(&self) -> ConfigObjects {
        self.objects.lock().unwrap().clone()
    }

    fn problem(&self, what: String) {
        if self.reported.lock().unwrap().insert(what.clone()) {
            tracing::warn!("{what}");
        }
    }

    /// Every valid Pod in the folder's `.yaml`, `.yml` and `.json` files
    /// (status files aside); invalid documents are reported and skipped.
    pub fn pods(&self) -> Result<Vec<DesiredPod>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(io_at("reading", &self.dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                !name.starts_with('.')
                    && !name.ends_with(STATUS_SUFFIX)
                    && [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext))
            })
            .collect();
        files.sort();
        let mut pods = Vec::new();
        let mut origins = HashMap::new();
        let mut seen = HashSet::new();
        // The folder is read whole: its Services are all there are.
        let mut objects = ConfigObjects::default();
        objects.services_read = true;
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else { continue };
            for (n, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
                let value: serde_yaml::Value = match serde::Deserialize::deserialize(doc) {
                    Ok(v) => v,
                    Err(e) => {
                        self.problem(format!("{}: document {}: not YAML: {e}", file.display(), n + 1));
                        break;
                    }
                };
                let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
                match kind.as_str() {
                    "Pod" => {}
                    "ConfigMap" | "Secret" | "Service" | "RuntimeClass" => {
                        let added = match kind.as_str() {
                            "ConfigMap" => {
                                serde_yaml::from_value::<ConfigMap>(value).map(|cm| objects.add_config_map(&cm))
                            }
                            "Secret" => serde_yaml::from_value::<Secret>(value).map(|s| objects.add_secret(&s)),
                            "Service" => serde_yaml::from_value::<Service>(value).map(|s| objects.add_service(&s)),
                            _ => serde_yaml::from_value::<RuntimeClass>(value).map(|rc| objects.add_runtime_class(&rc)),
                        };
                        if let Err(e) = added {
                            self.problem(format!("{}: document {}: not a valid {kind}: {e}", file.display(), n + 1));
                        }
                        continue;
                    }
                    _ => continue,
                }
                let pod: Pod = match serde_yaml::from_value(value) {
                    Ok(p) => p,
                    Err(e) => {
                        self.problem(format!("{}: document {}: not a valid Pod: {e}", file.display(), n + 1));
                        continue;
                    }
                };
                let Some(name) = pod.metadata.name.clone() else {
                    self.problem(format!("{}: document {}: a Pod without a name", file.display(), n + 1));
                    continue;
                };
                let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                if !seen.insert((namespace.clone(), name.clone())) {
                    self.problem(format!(
                        "{}: Pod {namespace}/{name} is defined twice; the first one runs",
                        file.display()
                    ));
                    continue;
                }
                let uid = pod.metadata.uid.clone().unwrap_or_else(|| static_uid(&pod));
                origins.insert(uid.clone(), file.clone());
                pods.push(DesiredPod { id: PodId { namespace, name, uid }, pod });
            }
        }
        *self.origins.lock().unwrap() = origins;
        *self.objects.lock().unwrap() = objects;
        Ok(pods)
    }

    /// Writes each manifest's pods with their status beside it, and removes
    /// status files whose manifest is gone.
    pub fn report(&self, statuses: &[(DesiredPod, PodStatus)]) {
        let origins = self.origins.lock().unwrap().clone();
        let mut by_file: BTreeMap<PathBuf, Vec<serde_json::Value>> = BTreeMap::new();
        for (d, status) in statuses {
            let Some(file) = origins.get(&d.id.uid) else { continue };
            by_file.entry(status_path(file)).or_default().push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": d.id.name, "namespace": d.id.namespace, "uid": d.id.uid},
                "status": status,
            }));
        }
        let mut written = self.written.lock().unwrap();
        for (path, pods) in &by_file {
            let bytes = serde_json::to_vec_pretty(pods).unwrap_or_default();
            if written.get(path) == Some(&bytes) {
                continue;
            }
            let tmp = path.with_extension("tmp");
            if let Err(e) = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, path)) {
                tracing::warn!(file = %path.display(), error = %e, "cannot write pod status");
                continue;
            }
            written.insert(path.clone(), bytes);
        }
        written.retain(|path, _| {
            let keep = by_file.contains_key(path);
            if !keep && let Err(e) = std::fs::remove_file(path) {
                tracing::debug!(path = %path.display(), error = %e, "stale status file not removed");
            }
            keep
        });
    }
}

/// How long a fetched ConfigMap or Secret is used before it is fetched
/// again (the kubelet's cache-based change detection; a missing one is
/// asked for again sooner, so a pod waiting for it starts soon after it
/// appears).
const OBJECT_TTL: std::time::Duration = std::time::Duration::from_secs(10);
const MISSING_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest a fetch or a token request may take.
const API_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
const REWRITE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Objects of one kind fetched by name: the object (`None`: not there) and when.
type Fetched<K> = Mutex<HashMap<(String, String), (Option<K>, std::time::Instant)>>;

/// Gets the objects named in `names`, from `cache` while fresh, else from
/// the API server one by one (a node may read only its own pods' objects,
/// as the Node authorizer allows, never list them all). An object the API
/// server cannot be asked about keeps its last known state.
async fn fetch<K>(api: impl Fn(&str) -> Api<K>, cache: &Fetched<K>, names: &[(String, String)]) -> Vec<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let stale: Vec<(String, String)> = {
        let cache = cache.lock().unwrap();
        names
            .iter()
            .filter(|n| {
                cache
                    .get(*n)
                    .is_none_or(|(object, at)| at.elapsed() >= if object.is_some() { OBJECT_TTL } else { MISSING_TTL })
            })
            .cloned()
            .collect()
    };
    let asked = stale.iter().map(|(ns, name)| {
        let api = api(ns);
        async move { tokio::time::timeout(API_DEADLINE, api.get_opt(name)).await }
    });
    let answers = futures::future::join_all(asked).await;
    let mut cache = cache.lock().unwrap();
    for ((ns, name), answer) in stale.into_iter().zip(answers) {
        match answer {
            Ok(Ok(object)) => drop(cache.insert((ns, name), (object, std::time::Instant::now()))),
            Ok(Err(e)) => {
                tracing::warn!(kind = %K::kind(&()), object = %format!("{ns}/{name}"), error = %e, "cannot read")
            }
            Err(_) => {
                tracing::warn!(kind = %K::kind(&()), object = %format!("{ns}/{name}"), "the API server did not answer in time")
            }
        }
    }
    cache.retain(|n, _| names.contains(n));
    names.iter().filter_map(|n| cache.get(n).and_then(|(object, _)| object.clone())).collect()
}

/// A pod from the API server, as the kubelet takes it (one without a name
/// or uid is not one).
fn desired(p: &Pod) -> Option<DesiredPod> {
    let id = PodId {
        namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: p.metadata.name.clone()?,
        uid: p.metadata.uid.clone()?,
    };
    Some(DesiredPod { id, pod: p.clone() })
}

/// Watches every Service into a store (list, then watch, re-listing as needed).
fn watch_services(client: &kube::Client) -> reflector::Store<Service> {
    let (store, writer) = reflector::store();
    let stream = watcher(Api::<Service>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watching Services");
            }
        }
    });
    store
}

/// A service-account token as issued, or the last failed request for one.
#[derive(Clone, Debug, Default)]
struct IssuedToken {
    token: Option<String>,
    /// When it was issued, and how long it lasts (from its expiration
    /// timestamp: the API server may shorten what was asked for).
    issued: Option<(std::time::Instant, std::time::Duration)>,
    failed_at: Option<std::time::Instant>,
}

/// Between failed token requests for one pod.
const TOKEN_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// Pods bound to this node, from the API server.
pub struct KubeSource {
    client: kube::Client,
    store: reflector::Store<Pod>,
    config_maps: Fetched<ConfigMap>,
    secrets: Fetched<Secret>,
    /// Every Service (as every kubelet watches them), for pods' Service variables.
    services: reflector::Store<Service>,
    /// RuntimeClasses pods name, fetched by name (`None`: not there) and when.
    runtime_classes: Fetched<RuntimeClass>,
    /// Service account tokens issued for pods: the token, when, and its lifetime.
    tokens: Mutex<HashMap<TokenWanted, IssuedToken>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// The status patch last written for each pod, and when: the same one
    /// is written again only after `REWRITE_AFTER` (one that timed out may
    /// still have landed after a newer one).
    written: Mutex<HashMap<String, (serde_json::Value, std::time::Instant)>>,
    /// Uids of deleted pods already handed back to the API server.
    finalized: Mutex<HashSet<String>>,
}

impl KubeSource {
    /// Watches pods with `spec.nodeName=NODE` (list, then watch, re-listing
    /// as needed).
    pub fn start(client: kube::Client, node: &str) -> Self {
        let api: Api<Pod> = Api::all(client.clone());
        let (store, writer) = reflector::store();
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ready.clone();
        let stream = watcher(api, config).default_backoff().reflect(writer).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => flag.store(true, std::sync::atomic::Ordering::Relaxed),
                    Err(e) => tracing::warn!(error = %e, "watching pods"),
                }
            }
        });
        let services = watch_services(&client);
        Self {
            client,
            store,
            config_maps: Mutex::default(),
            secrets: Mutex::default(),
            services,
            runtime_classes: Mutex::default(),
            tokens: Mutex::default(),
            ready,
            written: Mutex::default(),
            finalized: Mutex::default(),
        }
    }

    /// The ConfigMaps and Secrets `pods` refer to (a missing one is
    /// missing: the container waits with a CreateContainerConfigError until
    /// it appears), and the service-account tokens they project.
    pub async fn objects(&self, pods: &[DesiredPod]) -> ConfigObjects {
        let specs: Vec<Pod> = pods.iter().map(|d| d.pod.clone()).collect();
        let (cms, secrets) = crate::config::referenced(&specs);
        let mut objects = ConfigObjects::default();
        for cm in fetch(|ns| Api::namespaced(self.client.clone(), ns), &self.config_maps, &cms).await {
            objects.add_config_map(&cm);
        }
        for secret in fetch(|ns| Api::namespaced(self.client.clone(), ns), &self.secrets, &secrets).await {
            objects.add_secret(&secret);
        }
        for rc in self.runtime_classes(pods).await {
            objects.add_runtime_class(&rc);
        }
        let listed = tokio::time::timeout(std::time::Duration::from_millis(100), self.services.wait_until_ready());
        objects.services_read = listed.await.is_ok();
        for svc in self.services.state() {
            objects.add_service(&svc);
        }
        let with_ids: Vec<(PodId, Pod)> = pods.iter().map(|d| (d.id.clone(), d.pod.clone())).collect();
        let wanted = crate::config::tokens_wanted(&with_ids);
        self.tokens.lock().unwrap().retain(|w, _| wanted.contains(w));
        // Asked for together, each with a deadline: one slow request holds no other pod up.
        let tokens = futures::future::join_all(wanted.iter().map(|w| self.token(w))).await;
        for (w, token) in wanted.into_iter().zip(tokens) {
            if let Some(token) = token {
                objects.add_token(w, token);
            }
        }
        objects
    }

    /// The RuntimeClasses `pods` name (cluster-wide objects), fetched by
    /// name and kept as ConfigMaps are (see [`fetch`]).
    async fn runtime_classes(&self, pods: &[DesiredPod]) -> Vec<RuntimeClass> {
        // Cluster-wide objects: no namespace in their names.
        let mut names: Vec<(String, String)> = pods
            .iter()
            .filter_map(|d| d.pod.spec.as_ref()?.runtime_class_name.clone())
            .filter(|n| !n.is_empty())
            .map(|n| (String::new(), n))
            .collect();
        names.sort();
        names.dedup();
        fetch(|_| Api::all(self.client.clone()), &self.runtime_classes, &names).await
    }

    /// The token `w` asks for: the one issued, until 80% of its lifetime
    /// has passed (the kubelet's refresh point), then a new one from the
    /// TokenRequest API. A failed request keeps the old token while it
    /// lasts, and is not repeated for [`TOKEN_RETRY`].
    async fn token(&self, w: &TokenWanted) -> Option<String> {
        let known = self.tokens.lock().unwrap().get(w).cloned().unwrap_or_default();
        let valid = |k: &IssuedToken| {
            k.token.clone().filter(|_| k.issued.is_some_and(|(at, lifetime)| at.elapsed() < lifetime))
        };
        let fresh = known.issued.is_some_and(|(at, lifetime)| at.elapsed() < lifetime * 4 / 5);
        let backing_off = known.failed_at.is_some_and(|at| at.elapsed() < TOKEN_RETRY);
        if fresh || backing_off {
            return valid(&known);
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &w.namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(if w.audience.is_empty() { Vec::new() } else { vec![w.audience.clone()] }),
                expiration_seconds: Some(w.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(w.pod_name.clone()),
                    uid: Some(w.pod_uid.clone()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = format!("{}/{}", w.namespace, w.pod_name);
        let params = PostParams::default();
        let asked = api.create_token_request(&w.service_account, &params, &request);
        let issued = match tokio::time::timeout(API_DEADLINE, asked).await {
            Ok(Ok(r)) => r.status.and_then(|s| {
                let token = s.token.filter(|t| !t.is_empty())?;
                // What is left of its life by its own expiration time.
                let expires = s.expiration_timestamp.map(|t| t.0.as_second());
                let now = k8s_openapi::jiff::Timestamp::now().as_second();
                let lifetime = expires.map_or(w.expiration_seconds, |e| e - now).max(1) as u64;
                Some((token, std::time::Duration::from_secs(lifetime)))
            }),
            Ok(Err(e)) => {
                tracing::warn!(%pod, account = %w.service_account, error = %e, "cannot get a service account token");
                None
            }
            Err(_) => {
                tracing::warn!(%pod, account = %w.service_account, "the API server did not issue a token in time");
                None
            }
        };
        let mut tokens = self.tokens.lock().unwrap();
        let entry = tokens.entry(w.clone()).or_default();
        match issued {
            Some((token, lifetime)) => {
                tracing::info!(%pod, account = %w.service_account, ?lifetime, "service account token issued");
                *entry = IssuedToken {
                    token: Some(token),
                    issued: Some((std::time::Instant::now(), lifetime)),
                    failed_at: None,
                };
            }
            None => entry.failed_at = Some(std::time::Instant::now()),
        }
        valid(entry)
    }

    /// The pods, once the first list is in (until then, nothing is deleted).
    pub async fn pods(&self) -> Option<Vec<DesiredPod>> {
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            // An empty list may also be "nothing here yet": wait for the store.
            if tokio::time::timeout(std::time::Duration::from_millis(100), self.store.wait_until_ready()).await.is_err()
            {
                return None;
            }
        }
        Some(
            self.store
                .state()
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| desired(p))
                .collect(),
        )
    }

    /// The pods being deleted, by uid: each with the grace period its
    /// deletion gave (`deletionGracePeriodSeconds`) and its spec (for its
    /// preStop hooks, even when this kubelet never ran it).
    pub fn deleting(&self) -> HashMap<String, (Option<i64>, DesiredPod)> {
        self.store
            .state()
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .filter_map(|p| Some((p.metadata.uid.clone()?, (p.metadata.deletion_grace_period_seconds, desired(p)?))))
            .collect()
    }

    /// Completes the graceful deletion of pods whose containers are gone
    /// (`has_pod` false): as the kubelet, deletes them with a grace period of
    /// 0, so the API server removes them.
    pub async fn finalize(&self, has_pod: impl Fn(&str) -> bool) {
        let deleting: Vec<_> = self
            .store
            .state()
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .filter_map(|p| Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?, p.metadata.uid.clone()?)))
            .filter(|(_, _, uid)| !has_pod(uid))
            .collect();
        tracing::debug!(pods = ?deleting, "pods to finish deleting");
        for (namespace, name, uid) in deleting {
            if !self.finalized.lock().unwrap().insert(uid.clone()) {
                continue;
            }
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions { uid: Some(uid.clone()), resource_version: None }),
                ..Default::default()
            };
            let deleted = tokio::time::timeout(API_DEADLINE, api.delete(&name, &params)).await;
            match deleted.unwrap_or_else(|_elapsed| Err(kube::Error::Service("no answer in time".into()))) {
                Ok(_) => tracing::info!(pod = %format!("{namespace}/{name}"), "pod deleted"),
                Err(e) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "cannot finish deleting a pod");
                    self.finalized.lock().unwrap().remove(&uid);
                }
            }
        }
    }

    /// Patches each pod's status subresource where it changed, all at once
    /// and each within a deadline: an API server that does not answer never
    /// holds the kubelet's loop.
    pub async fn report(&self, statuses: &[(DesiredPod, PodStatus)]) {
        let patches = statuses.iter().filter_map(|(d, status)| {
            // As the kubelet: a strategic merge patch (conditions merged by
            // type) with the pod's uid as precondition, so a pod recreated
            // under the same name never gets its predecessor's status.
            let value = serde_json::json!({ "metadata": {"uid": d.id.uid}, "status": status });
            if self
                .written
                .lock()
                .unwrap()
                .get(&d.id.uid)
                .is_some_and(|(written, at)| *written == value && at.elapsed() < REWRITE_AFTER)
            {
                return None;
            }
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &d.id.namespace);
            Some(async move {
                let (params, patch) = (PatchParams::default(), Patch::Strategic(&value));
                match tokio::time::timeout(API_DEADLINE, api.patch_status(&d.id.name, &params, &patch)).await {
                    Ok(Ok(_)) => {
                        let now = std::time::Instant::now();
                        self.written.lock().unwrap().insert(d.id.uid.clone(), (value, now));
                    }
                    Ok(Err(e)) => tracing::warn!(pod = %d.id, error = %e, "cannot write pod status"),
                    Err(_) => {
                        tracing::warn!(pod = %d.id, "cannot write pod status: the API server did not answer in time")
                    }
                }
            })
        });
        futures::future::join_all(patches).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_pods_are_read_with_stable_uids_and_bad_documents_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let web = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: [{name: c, image: i}]}\n";
        std::fs::write(dir.path().join("web.yaml"), web).unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "kind: Pod\nmetadata: {name: x}\nspec: {containers: 3}\n").unwrap();
        std::fs::write(dir.path().join("web.yaml.status.json"), "[]").unwrap();
        let source = DirSource::new(dir.path().into());
        let pods = source.pods().unwrap();
        assert_eq!(pods.len(), 1, "the bad document is skipped");
        assert_eq!((pods[0].id.namespace.as_str(), pods[0].id.name.as_str()), ("default", "web"));
        assert_eq!(pods[0].id.uid, source.pods().unwrap()[0].id.uid, "the same manifest, the same uid");
        std::fs::write(dir.path().join("web.yaml"), web.replace("image: i", "image: j")).unwrap();
        assert_ne!(pods[0].id.uid, source.pods().unwrap()[0].id.uid, "an edited manifest is a new pod");

        let status = PodStatus { phase: Some("Running".into()), ..Default::default() };
        let pods = source.pods().unwrap();
        source.report(&[(pods[0].clone(), status)]);
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("web.yaml.status.json")).unwrap()).unwrap();
        assert_eq!(written[0]["status"]["phase"], "Running");
        assert_eq!(written[0]["metadata"]["name"], "web");
        source.report(&[]);
        assert!(!dir.path().join("web.yaml.status.json").exists(), "a pod's status goes with it");
    }
}
