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
    core::v1::{ConfigMap, Pod, PodStatus, Secret, ServiceAccount},
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
        let mut objects = ConfigObjects::default();
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
                    "ConfigMap" | "Secret" => {
                        let added = if kind == "ConfigMap" {
                            serde_yaml::from_value::<ConfigMap>(value).map(|cm| objects.add_config_map(&cm))
                        } else {
                            serde_yaml::from_value::<Secret>(value).map(|s| objects.add_secret(&s))
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

/// Watches every object of kind `K` into a store (list, then watch,
/// re-listing as needed).
fn follow<K>(client: &kube::Client) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(kind = %K::kind(&()), error = %e, "watching");
            }
        }
    });
    store
}

/// Pods bound to this node, from the API server.
pub struct KubeSource {
    client: kube::Client,
    store: reflector::Store<Pod>,
    config_maps: reflector::Store<ConfigMap>,
    secrets: reflector::Store<Secret>,
    /// Service account tokens issued for pods: the token, when, and its lifetime.
    tokens: Mutex<HashMap<TokenWanted, (String, std::time::Instant)>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    written: Mutex<HashMap<String, serde_json::Value>>,
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
        let config_maps = follow::<ConfigMap>(&client);
        let secrets = follow::<Secret>(&client);
        Self {
            client,
            store,
            config_maps,
            secrets,
            tokens: Mutex::default(),
            ready,
            written: Mutex::default(),
            finalized: Mutex::default(),
        }
    }

    /// The ConfigMaps and Secrets `pods` refer to, as the watches have them
    /// (a missing one is missing: the container waits with a
    /// CreateContainerConfigError until it appears).
    pub async fn objects(&self, pods: &[DesiredPod]) -> ConfigObjects {
        let specs: Vec<Pod> = pods.iter().map(|d| d.pod.clone()).collect();
        let (cms, secrets) = crate::config::referenced(&specs);
        let mut objects = ConfigObjects::default();
        for (ns, name) in cms {
            if let Some(cm) = self.config_maps.get(&reflector::ObjectRef::new(&name).within(&ns)) {
                objects.add_config_map(&cm);
            }
        }
        for (ns, name) in secrets {
            if let Some(s) = self.secrets.get(&reflector::ObjectRef::new(&name).within(&ns)) {
                objects.add_secret(&s);
            }
        }
        let with_ids: Vec<(PodId, Pod)> = pods.iter().map(|d| (d.id.clone(), d.pod.clone())).collect();
        let wanted = crate::config::tokens_wanted(&with_ids);
        self.tokens.lock().unwrap().retain(|w, _| wanted.contains(w));
        for w in wanted {
            if let Some(token) = self.token(&w).await {
                objects.add_token(w, token);
            }
        }
        objects
    }

    /// The token `w` asks for: the one issued, until 80% of its lifetime
    /// has passed (the kubelet's refresh point), then a new one from the
    /// TokenRequest API. A failed request keeps the old token while it lasts.
    async fn token(&self, w: &TokenWanted) -> Option<String> {
        let lifetime = std::time::Duration::from_secs(w.expiration_seconds as u64);
        let cached = self.tokens.lock().unwrap().get(w).cloned();
        if let Some((token, issued)) = &cached
            && issued.elapsed() < lifetime * 4 / 5
        {
            return Some(token.clone());
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
        match api.create_token_request(&w.service_account, &PostParams::default(), &request).await {
            Ok(r) => {
                let Some(token) = r.status.and_then(|s| s.token).filter(|t| !t.is_empty()) else {
                    tracing::warn!(pod = %format!("{}/{}", w.namespace, w.pod_name), "the API server issued an empty token");
                    return cached.map(|(token, _)| token);
                };
                tracing::info!(pod = %format!("{}/{}", w.namespace, w.pod_name), account = %w.service_account, "service account token issued");
                self.tokens.lock().unwrap().insert(w.clone(), (token.clone(), std::time::Instant::now()));
                Some(token)
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{}/{}", w.namespace, w.pod_name), account = %w.service_account, error = %e, "cannot get a service account token");
                cached.filter(|(_, issued)| issued.elapsed() < lifetime).map(|(token, _)| token)
            }
        }
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
                .filter_map(|p| {
                    let id = PodId {
                        namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                        name: p.metadata.name.clone()?,
                        uid: p.metadata.uid.clone()?,
                    };
                    Some(DesiredPod { id, pod: (**p).clone() })
                })
                .collect(),
        )
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
            match api.delete(&name, &params).await {
                Ok(_) => tracing::info!(pod = %format!("{namespace}/{name}"), "pod deleted"),
                Err(e) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "cannot finish deleting a pod");
                    self.finalized.lock().unwrap().remove(&uid);
                }
            }
        }
    }

    /// Patches each pod's status subresource where it changed.
    pub async fn report(&self, statuses: &[(DesiredPod, PodStatus)]) {
        for (d, status) in statuses {
            let value = serde_json::json!({ "status": status });
            if self.written.lock().unwrap().get(&d.id.uid) == Some(&value) {
                continue;
            }
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &d.id.namespace);
            match api.patch_status(&d.id.name, &PatchParams::default(), &Patch::Merge(&value)).await {
                Ok(_) => drop(self.written.lock().unwrap().insert(d.id.uid.clone(), value)),
                Err(e) => tracing::warn!(pod = %d.id, error = %e, "cannot write pod status"),
            }
        }
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
