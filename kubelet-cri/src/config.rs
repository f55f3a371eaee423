//! Configuration into pods, as the kubelet puts it there: environment
//! variables from values (with `$(VAR)` expansion), ConfigMaps, Secrets and
//! the pod's own fields (`env[].valueFrom`, `envFrom`), and the files of
//! ConfigMap, Secret, downwardAPI and projected volumes, written the way
//! the kubelet's atomic writer does (a `..data` link switched in one
//! rename, so a reader never sees half an update). Pure but for the writer.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, ObjectFieldSelector, Pod, ResourceFieldSelector, Secret, Volume,
};

use crate::{
    error::{KubeletError, Result},
    quantity::{parse_cpu, parse_memory},
    spec::{PodId, expand},
};

/// The ConfigMaps and Secrets pods may refer to, by namespace and name,
/// as key -> bytes.
#[derive(Clone, Debug, Default)]
pub struct ConfigObjects {
    config_maps: HashMap<(String, String), BTreeMap<String, Vec<u8>>>,
    secrets: HashMap<(String, String), BTreeMap<String, Vec<u8>>>,
    /// Service account tokens issued for pods.
    tokens: HashMap<TokenWanted, String>,
    /// Services by namespace: their environment variables go into pods.
    services: BTreeMap<String, Vec<k8s_openapi::api::core::v1::Service>>,
    /// Whether the Services have been read at least once (until then no
    /// container starts: its variables would be missing).
    pub services_read: bool,
    /// RuntimeClasses by name: the runtime handler each names.
    runtime_handlers: HashMap<String, String>,
}

/// A service account token a pod's projected volume asks for: bound to
/// the pod, for an audience, with a lifetime.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenWanted {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// Empty: the API server's own audience.
    pub audience: String,
    pub expiration_seconds: i64,
}

/// The kubelet's floor on a projected token's lifetime (and the API's default).
pub const MIN_TOKEN_SECONDS: i64 = 600;
const DEFAULT_TOKEN_SECONDS: i64 = 3600;

/// The tokens `pods` project, by pod.
pub fn tokens_wanted(pods: &[(PodId, Pod)]) -> Vec<TokenWanted> {
    let mut wanted = Vec::new();
    for (id, pod) in pods {
        let Some(spec) = &pod.spec else { continue };
        let account = spec.service_account_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
        for source in
            spec.volumes.iter().flatten().flat_map(|v| v.projected.iter().flat_map(|p| p.sources.iter().flatten()))
        {
            if let Some(t) = &source.service_account_token {
                wanted.push(token_wanted(id, &account, t));
            }
        }
    }
    wanted.sort();
    wanted.dedup();
    wanted
}

fn token_wanted(
    id: &PodId,
    account: &str,
    t: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection,
) -> TokenWanted {
    TokenWanted {
        namespace: id.namespace.clone(),
        service_account: account.to_string(),
        pod_name: id.name.clone(),
        pod_uid: id.uid.clone(),
        audience: t.audience.clone().unwrap_or_default(),
        expiration_seconds: t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS).max(MIN_TOKEN_SECONDS),
    }
}

impl ConfigObjects {
    pub fn add_config_map(&mut self, cm: &ConfigMap) {
        let key = (
            cm.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            cm.metadata.name.clone().unwrap_or_default(),
        );
        let mut data: BTreeMap<String, Vec<u8>> =
            cm.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
        data.extend(cm.binary_data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())));
        self.config_maps.insert(key, data);
    }

    /// `stringData` counts too, as the API server folds it into `data`.
    pub fn add_secret(&mut self, s: &Secret) {
        let key = (
            s.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            s.metadata.name.clone().unwrap_or_default(),
        );
        let mut data: BTreeMap<String, Vec<u8>> =
            s.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
        data.extend(s.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())));
        self.secrets.insert(key, data);
    }

    pub fn add_service(&mut self, svc: &k8s_openapi::api::core::v1::Service) {
        let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        self.services.entry(ns).or_default().push(svc.clone());
    }

    pub fn add_runtime_class(&mut self, rc: &k8s_openapi::api::node::v1::RuntimeClass) {
        if let Some(name) = &rc.metadata.name {
            self.runtime_handlers.insert(name.clone(), rc.handler.clone());
        }
    }

    /// The runtime handler `pod`'s `runtimeClassName` names ("" for none:
    /// the runtime's default), as the sandbox is asked for with it.
    pub fn runtime_handler(&self, pod: &Pod) -> Result<String> {
        match pod.spec.as_ref().and_then(|s| s.runtime_class_name.as_deref()).filter(|n| !n.is_empty()) {
            None => Ok(String::new()),
            Some(name) => self
                .runtime_handlers
                .get(name)
                .cloned()
                .ok_or_else(|| KubeletError::Invalid(format!("RuntimeClass \"{name}\" not found"))),
        }
    }

    pub fn add_token(&mut self, wanted: TokenWanted, token: String) {
        self.tokens.insert(wanted, token);
    }

    fn config_map(&self, namespace: &str, name: &str) -> Option<&BTreeMap<String, Vec<u8>>> {
        self.config_maps.get(&(namespace.to_string(), name.to_string()))
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<&BTreeMap<String, Vec<u8>>> {
        self.secrets.get(&(namespace.to_string(), name.to_string()))
    }
}

/// Objects by namespace and name.
pub type Names = Vec<(String, String)>;

/// The ConfigMaps and Secrets `pods` refer to (volumes, projections, `env`,
/// `envFrom`), by namespace and name: what a source needs to fetch.
pub fn referenced(pods: &[Pod]) -> (Names, Names) {
    let (mut cms, mut secrets) = (Vec::new(), Vec::new());
    for pod in pods {
        let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let Some(spec) = &pod.spec else { continue };
        let mut cm = |name: &str| cms.push((ns.clone(), name.to_string()));
        let mut secret = |name: &str| secrets.push((ns.clone(), name.to_string()));
        for v in spec.volumes.iter().flatten() {
            if let Some(c) = &v.config_map {
                cm(&c.name);
            }
            if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
                secret(name);
            }
            for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                if let Some(c) = &source.config_map {
                    cm(&c.name);
                }
                if let Some(s) = &source.secret {
                    secret(&s.name);
                }
            }
        }
        for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            for from in c.env_from.iter().flatten() {
                if let Some(r) = &from.config_map_ref {
                    cm(&r.name);
                }
                if let Some(r) = &from.secret_ref {
                    secret(&r.name);
                }
            }
            for from in c.env.iter().flatten().filter_map(|e| e.value_from.as_ref()) {
                if let Some(r) = &from.config_map_key_ref {
                    cm(&r.name);
                }
                if let Some(r) = &from.secret_key_ref {
                    secret(&r.name);
                }
            }
        }
    }
    cms.sort();
    cms.dedup();
    secrets.sort();
    secrets.dedup();
    (cms, secrets)
}

/// What the pod's fields do not say but `fieldRef` may ask for.
#[derive(Clone, Debug, Default)]
pub struct PodFacts {
    pub pod_ip: Option<String>,
    pub host_ip: Option<String>,
    pub node_name: String,
    /// The node's CPUs and memory: what a container without a limit may use.
    pub node_cpus: u32,
    pub node_memory: u64,
}

fn not_found(kind: &str, name: &str) -> KubeletError {
    KubeletError::Invalid(format!("{kind} \"{name}\" not found"))
}

fn utf8(kind: &str, name: &str, key: &str, bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec())
        .map_err(|e| KubeletError::Invalid(format!("key {key:?} of {kind} \"{name}\" is not UTF-8 text: {e}")))
}

/// A key of a ConfigMap or Secret; `None` when it (or the object) is
/// missing and the reference is optional.
fn key_of(
    objects: &ConfigObjects,
    secret: bool,
    namespace: &str,
    name: &str,
    key: &str,
    optional: bool,
) -> Result<Option<Vec<u8>>> {
    let kind = if secret { "secret" } else { "configmap" };
    let data = if secret { objects.secret(namespace, name) } else { objects.config_map(namespace, name) };
    match data.map(|d| d.get(key)) {
        Some(Some(v)) => Ok(Some(v.clone())),
        _ if optional => Ok(None),
        Some(None) => Err(KubeletError::Invalid(format!("couldn't find key {key} in {kind} {namespace}/{name}"))),
        None => Err(not_found(kind, name)),
    }
}

/// A C identifier-ish name the kubelet accepts from `envFrom` keys.
fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The pod field `fieldPath` names.
fn field(pod: &Pod, id: &PodId, facts: &PodFacts, f: &ObjectFieldSelector) -> Result<String> {
    let path = f.field_path.as_str();
    let meta = &pod.metadata;
    let map_key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => id.name.clone(),
        "metadata.namespace" => id.namespace.clone(),
        "metadata.uid" => id.uid.clone(),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => {
            pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_else(|| facts.node_name.clone())
        }
        "spec.serviceAccountName" => {
            pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into())
        }
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone().unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone().unwrap_or_default(),
        _ => {
            if let Some(k) = map_key("metadata.labels") {
                meta.labels.as_ref().and_then(|l| l.get(&k).cloned()).unwrap_or_default()
            } else if let Some(k) = map_key("metadata.annotations") {
                meta.annotations.as_ref().and_then(|a| a.get(&k).cloned()).unwrap_or_default()
            } else {
                return Err(KubeletError::Invalid(format!("fieldRef {path:?} is not a supported field")));
            }
        }
    })
}

/// Labels or annotations as the downward API writes them: `key="value"` lines, sorted.
fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter().flatten().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join("\n")
}

/// A container's resource (`limits.cpu`, `requests.memory`, ...) in units
/// of the divisor, rounded up as the kubelet does; a limit not set is the
/// node's.
fn resource(pod: &Pod, c: &Container, facts: &PodFacts, r: &ResourceFieldSelector) -> Result<String> {
    let container = match r.container_name.as_deref() {
        Some(name) if !name.is_empty() && name != c.name => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
            .find(|x| x.name == name)
            .ok_or_else(|| KubeletError::Invalid(format!("resourceFieldRef: no container {name:?}")))?,
        _ => c,
    };
    let (group, what) = r
        .resource
        .split_once('.')
        .ok_or_else(|| KubeletError::Invalid(format!("resourceFieldRef {:?} is not a resource", r.resource)))?;
    let res = container.resources.as_ref();
    let quantity = match group {
        "limits" => res.and_then(|r| r.limits.as_ref()).and_then(|l| l.get(what)),
        "requests" => res.and_then(|r| r.requests.as_ref()).and_then(|l| l.get(what)),
        _ => return Err(KubeletError::Invalid(format!("resourceFieldRef {:?} is not a resource", r.resource))),
    };
    let divisor = r.divisor.as_ref().map(|d| d.0.as_str()).unwrap_or("1");
    let up = |n: i64, d: i64| if d <= 0 { n } else { (n + d - 1) / d };
    Ok(match what {
        "cpu" => {
            let millis = match quantity {
                Some(q) => parse_cpu(&q.0)?,
                None if group == "limits" => i64::from(facts.node_cpus) * 1000,
                None => 0,
            };
            up(millis, parse_cpu(divisor)?).to_string()
        }
        "memory" | "ephemeral-storage" => {
            let bytes = match quantity {
                Some(q) => parse_memory(&q.0)?,
                None if group == "limits" && what == "memory" => facts.node_memory as i64,
                None => 0,
            };
            up(bytes, parse_memory(divisor)?).to_string()
        }
        other => return Err(KubeletError::Invalid(format!("resourceFieldRef: resource {other:?} is not supported"))),
    })
}

/// The Service variables the kubelet gives every container (docker links
/// style): for each Service with a cluster IP in the pod's namespace
/// (unless `enableServiceLinks: false`) and the API server's own
/// `default/kubernetes`, `NAME_SERVICE_HOST`, `NAME_SERVICE_PORT[_PORTNAME]`
/// and `NAME_PORT[_PORT_PROTO[_PROTO|_PORT|_ADDR]]`.
pub fn service_env(pod: &Pod, namespace: &str, objects: &ConfigObjects) -> Vec<(String, String)> {
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links) != Some(false);
    let mut chosen: BTreeMap<String, &k8s_openapi::api::core::v1::Service> = BTreeMap::new();
    for svc in objects.services.get("default").into_iter().flatten() {
        if svc.metadata.name.as_deref() == Some("kubernetes") {
            chosen.insert("kubernetes".into(), svc);
        }
    }
    if links {
        for svc in objects.services.get(namespace).into_iter().flatten() {
            if let Some(name) = &svc.metadata.name {
                chosen.insert(name.clone(), svc);
            }
        }
    }
    let mut out = Vec::new();
    for (name, svc) in chosen {
        let Some(spec) = &svc.spec else { continue };
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let var = |s: &str| s.to_uppercase().replace('-', "_");
        let prefix = var(&name);
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        out.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
        out.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for p in ports.iter().filter(|p| p.name.as_deref().is_some_and(|n| !n.is_empty())) {
            out.push((
                format!("{prefix}_SERVICE_PORT_{}", var(p.name.as_deref().unwrap_or_default())),
                p.port.to_string(),
            ));
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        out.push((format!("{prefix}_PORT"), format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port)));
        for p in ports {
            let (proto, port) = (proto(p), p.port);
            let base = format!("{prefix}_PORT_{port}_{}", proto.to_uppercase());
            out.push((base.clone(), format!("{}://{ip}:{port}", proto.to_lowercase())));
            out.push((format!("{base}_PROTO"), proto.to_lowercase()));
            out.push((format!("{base}_PORT"), port.to_string()));
            out.push((format!("{base}_ADDR"), ip.clone()));
        }
    }
    out
}

/// The container's environment, as the kubelet builds it: the Service
/// variables ([`service_env`]), then `envFrom` sources in order (keys that are no variable name skipped), then `env`
/// in order, each value expanded against the variables before it. The
/// variables, to expand command and args with.
pub fn env(
    pod: &Pod,
    id: &PodId,
    c: &Container,
    objects: &ConfigObjects,
    facts: &PodFacts,
) -> Result<Vec<(String, String)>> {
    let ns = id.namespace.as_str();
    if !objects.services_read {
        return Err(KubeletError::Invalid(
            "services have not yet been read at least once, cannot construct envvars".into(),
        ));
    }
    // The Service variables first: the container's own override them.
    let mut out: Vec<(String, String)> = service_env(pod, ns, objects);
    fn set(out: &mut Vec<(String, String)>, k: String, v: String) {
        match out.iter_mut().find(|(n, _)| *n == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (data, kind, name, optional) = if let Some(r) = &from.config_map_ref {
            (objects.config_map(ns, &r.name), "configmap", r.name.as_str(), r.optional.unwrap_or(false))
        } else if let Some(r) = &from.secret_ref {
            (objects.secret(ns, &r.name), "secret", r.name.as_str(), r.optional.unwrap_or(false))
        } else {
            continue;
        };
        let Some(data) = data else {
            if optional {
                continue;
            }
            return Err(not_found(kind, name));
        };
        for (k, v) in data {
            let var = format!("{prefix}{k}");
            if !valid_env_name(&var) {
                tracing::warn!(pod = %id, container = %c.name, key = %k, "envFrom key is not a valid variable name: skipped");
                continue;
            }
            set(&mut out, var, utf8(kind, name, k, v)?);
        }
    }
    for e in c.env.iter().flatten() {
        let vars: HashMap<String, String> = out.iter().cloned().collect();
        let value = match &e.value_from {
            None => expand(e.value.as_deref().unwrap_or_default(), &vars),
            Some(from) => {
                if let Some(r) = &from.config_map_key_ref {
                    match key_of(objects, false, ns, &r.name, &r.key, r.optional.unwrap_or(false))? {
                        Some(v) => utf8("configmap", &r.name, &r.key, &v)?,
                        None => continue,
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    match key_of(objects, true, ns, &r.name, &r.key, r.optional.unwrap_or(false))? {
                        Some(v) => utf8("secret", &r.name, &r.key, &v)?,
                        None => continue,
                    }
                } else if let Some(f) = &from.field_ref {
                    field(pod, id, facts, f)?
                } else if let Some(r) = &from.resource_field_ref {
                    resource(pod, c, facts, r)?
                } else {
                    return Err(KubeletError::Invalid(format!("env {:?}: valueFrom names no source", e.name)));
                }
            }
        };
        set(&mut out, e.name.clone(), value);
    }
    Ok(out)
}

/// A file of a volume: its bytes and mode.
pub type Files = BTreeMap<String, (Vec<u8>, i32)>;

/// `items` of `data` (all keys when there are none) at their paths.
fn project(
    files: &mut Files,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    mode: i32,
    what: &str,
    optional: bool,
) -> Result<()> {
    match items {
        None => files.extend(data.iter().map(|(k, v)| (k.clone(), (v.clone(), mode)))),
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => drop(files.insert(item.path.clone(), (v.clone(), item.mode.unwrap_or(mode)))),
                    None if optional => {}
                    None => return Err(KubeletError::Invalid(format!("{what}: no key {:?}", item.key))),
                }
            }
        }
    }
    Ok(())
}

/// The files of a configuration volume, or `None` for another kind
/// (emptyDir, hostPath). Missing objects are errors unless optional.
pub fn volume_files(
    pod: &Pod,
    id: &PodId,
    v: &Volume,
    objects: &ConfigObjects,
    facts: &PodFacts,
) -> Result<Option<Files>> {
    let ns = id.namespace.as_str();
    let mut files = Files::new();
    let config_map = |files: &mut Files, name: &str, items, optional: Option<bool>, mode| -> Result<()> {
        match objects.config_map(ns, name) {
            Some(data) => project(files, data, items, mode, &format!("configmap {name}"), optional.unwrap_or(false)),
            None if optional.unwrap_or(false) => Ok(()),
            None => Err(not_found("configmap", name)),
        }
    };
    let secret = |files: &mut Files, name: &str, items, optional: Option<bool>, mode| -> Result<()> {
        match objects.secret(ns, name) {
            Some(data) => project(files, data, items, mode, &format!("secret {name}"), optional.unwrap_or(false)),
            None if optional.unwrap_or(false) => Ok(()),
            None => Err(not_found("secret", name)),
        }
    };
    let downward =
        |files: &mut Files, items: &[k8s_openapi::api::core::v1::DownwardAPIVolumeFile], mode| -> Result<()> {
            for item in items {
                let value = if let Some(f) = &item.field_ref {
                    field(pod, id, facts, f)?
                } else if let Some(r) = &item.resource_field_ref {
                    let first = pod.spec.as_ref().and_then(|s| s.containers.first()).cloned().unwrap_or_default();
                    resource(pod, &first, facts, r)?
                } else {
                    continue;
                };
                files.insert(item.path.clone(), (value.into_bytes(), item.mode.unwrap_or(mode)));
            }
            Ok(())
        };
    if let Some(c) = &v.config_map {
        config_map(&mut files, &c.name, c.items.as_ref(), c.optional, c.default_mode.unwrap_or(0o644))?;
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        secret(&mut files, &name, s.items.as_ref(), s.optional, s.default_mode.unwrap_or(0o644))?;
    } else if let Some(d) = &v.downward_api {
        downward(&mut files, d.items.as_deref().unwrap_or_default(), d.default_mode.unwrap_or(0o644))?;
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(0o644);
        for source in p.sources.iter().flatten() {
            if let Some(c) = &source.config_map {
                config_map(&mut files, &c.name, c.items.as_ref(), c.optional, mode)?;
            } else if let Some(s) = &source.secret {
                secret(&mut files, &s.name, s.items.as_ref(), s.optional, mode)?;
            } else if let Some(d) = &source.downward_api {
                downward(&mut files, d.items.as_deref().unwrap_or_default(), mode)?;
            } else if let Some(t) = &source.service_account_token {
                let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone());
                let account = account.filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
                let wanted = token_wanted(id, &account, t);
                let token = objects.tokens.get(&wanted).ok_or_else(|| {
                    KubeletError::Invalid(format!(
                        "volume {:?}: no token issued yet for service account {account} (pods from the API server only)",
                        v.name
                    ))
                })?;
                files.insert(t.path.clone(), (token.clone().into_bytes(), p.default_mode.unwrap_or(0o644)));
            }
        }
    } else {
        return Ok(None);
    }
    for path in files.keys() {
        if path.is_empty() || path.starts_with('/') || path.split('/').any(|p| p == ".." || p.starts_with("..")) {
            return Err(KubeletError::Invalid(format!("volume {:?}: file path {path:?} is not allowed", v.name)));
        }
    }
    Ok(Some(files))
}

/// Writes `files` into `dir` as the kubelet's atomic writer does: a new
/// timestamped folder, `..data` switched to it with one rename, and each
/// top-level name a link through `..data`. With `group` (the pod's
/// fsGroup) a new folder is given to the group, read only, before it is
/// switched in. Nothing is written when the content (and ownership) is the
/// same. Returns whether it changed.
pub fn write_atomically(dir: &Path, files: &Files, group: Option<u32>) -> io::Result<bool> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let data_link = dir.join("..data");
    let current = std::fs::read_link(&data_link).ok();
    let wanted_mode = |mode: i32| match group {
        Some(_) => crate::ownership::with_group(mode as u32, false, true),
        None => mode as u32,
    };
    let same = current.as_ref().is_some_and(|current| {
        let current = dir.join(current);
        files.iter().all(|(path, (bytes, mode))| {
            let p = current.join(path);
            std::fs::read(&p).is_ok_and(|b| &b == bytes)
                && std::fs::metadata(&p).is_ok_and(|m| {
                    m.permissions().mode() & 0o7777 == wanted_mode(*mode) && group.is_none_or(|g| m.gid() == g)
                })
        }) && count_files(&current) == files.len()
    });
    let live = if same {
        current.unwrap_or_default()
    } else {
        std::fs::create_dir_all(dir)?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let name = PathBuf::from(format!("..{stamp}"));
        let fresh = dir.join(&name);
        let written = write_generation(&fresh, files)
            .and_then(|()| group.map_or(Ok(()), |gid| crate::ownership::set(&fresh, gid, true)));
        if let Err(e) = written {
            // A generation that cannot be written whole is not left behind.
            std::fs::remove_dir_all(&fresh).ok();
            return Err(e);
        }
        let tmp = dir.join("..data_tmp");
        // Left by a writer that stopped half-way, if at all.
        std::fs::remove_file(&tmp).ok();
        std::os::unix::fs::symlink(&name, &tmp)?;
        std::fs::rename(&tmp, &data_link)?;
        name
    };
    // Every time, not only after a switch: a writer stopped half-way (or an
    // earlier failure) must leave no name missing or stale.
    let tops: std::collections::BTreeSet<&str> = files.keys().filter_map(|p| p.split('/').next()).collect();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if n == "..data" || Path::new(&n) == live {
            continue;
        }
        if n.starts_with("..") {
            // Earlier generations, and any a failed writer left.
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        } else if !tops.contains(n.as_str()) {
            std::fs::remove_file(&path)?;
        }
    }
    for top in &tops {
        let link = dir.join(top);
        let target = Path::new("..data").join(top);
        if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            std::fs::remove_file(&link).ok();
            std::os::unix::fs::symlink(&target, &link)?;
        }
    }
    Ok(!same)
}

/// Writes `files` into the new generation folder `fresh`.
fn write_generation(fresh: &Path, files: &Files) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir(fresh)?;
    for (path, (bytes, mode)) in files {
        let p = fresh.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, bytes)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode as u32))?;
    }
    Ok(())
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn id() -> PodId {
        PodId { namespace: "default".into(), name: "web".into(), uid: "u1".into() }
    }

    fn objects() -> ConfigObjects {
        let mut o = ConfigObjects { services_read: true, ..Default::default() };
        o.add_config_map(
            &serde_yaml::from_str(
                "metadata: {name: settings, namespace: default}\ndata: {mode: fast, level: '3', 'bad key': x}\n",
            )
            .unwrap(),
        );
        o.add_secret(&serde_yaml::from_str("metadata: {name: creds, namespace: default}\ndata: {password: aHVudGVyMg==}\nstringData: {user: admin}\n").unwrap());
        o
    }

    fn facts() -> PodFacts {
        PodFacts {
            pod_ip: Some("10.88.0.5".into()),
            host_ip: Some("192.0.2.10".into()),
            node_name: "node-1".into(),
            node_cpus: 4,
            node_memory: 8 << 30,
        }
    }

    #[test]
    fn env_comes_from_values_config_maps_secrets_and_the_pod() {
        let p = pod(
            "metadata: {name: web, namespace: default, labels: {app: web}}\nspec:\n  containers:\n  - name: c\n    image: i\n    \
             resources: {limits: {memory: 64Mi}}\n    envFrom: [{configMapRef: {name: settings}, prefix: CFG_}]\n    env:\n    \
             - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}\n    \
             - {name: USER, valueFrom: {secretKeyRef: {name: creds, key: user}}}\n    \
             - {name: MODE, valueFrom: {configMapKeyRef: {name: settings, key: mode}}}\n    \
             - {name: GREETING, value: 'mode $(MODE) for $(USER)'}\n    \
             - {name: IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}\n    \
             - {name: APP, valueFrom: {fieldRef: {fieldPath: \"metadata.labels['app']\"}}}\n    \
             - {name: MEM_MI, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}\n    \
             - {name: CPUS, valueFrom: {resourceFieldRef: {resource: limits.cpu}}}\n    \
             - {name: GONE, valueFrom: {configMapKeyRef: {name: nothing, key: k, optional: true}}}\n",
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        let env: BTreeMap<String, String> = env(&p, &id(), c, &objects(), &facts()).unwrap().into_iter().collect();
        let want: BTreeMap<String, String> = [
            ("CFG_mode", "fast"),
            ("CFG_level", "3"),
            ("PASSWORD", "hunter2"),
            ("USER", "admin"),
            ("MODE", "fast"),
            ("GREETING", "mode fast for admin"),
            ("IP", "10.88.0.5"),
            ("APP", "web"),
            ("MEM_MI", "64"),
            ("CPUS", "4"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(env, want, "the bad key is skipped, the optional missing one left out");
    }

    #[test]
    fn services_give_their_variables_as_docker_links_did() {
        let mut o = objects();
        for (ns, name, ip, ports) in [
            ("default", "kubernetes", "10.96.0.1", "[{name: https, port: 443}]"),
            ("default", "web-front", "10.96.0.10", "[{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]"),
            ("default", "headless", "None", "[{port: 80}]"),
            ("other", "elsewhere", "10.96.0.20", "[{port: 80}]"),
        ] {
            o.add_service(
                &serde_yaml::from_str(&format!(
                    "metadata: {{name: {name}, namespace: {ns}}}\nspec: {{clusterIP: '{ip}', ports: {ports}}}\n"
                ))
                .unwrap(),
            );
        }
        let p = pod("metadata: {name: web, namespace: default}\nspec: {containers: [{name: c, image: i}]}\n");
        let env: BTreeMap<String, String> = service_env(&p, "default", &o).into_iter().collect();
        assert_eq!(env["WEB_FRONT_SERVICE_HOST"], "10.96.0.10");
        assert_eq!(env["WEB_FRONT_SERVICE_PORT"], "80");
        assert_eq!(env["WEB_FRONT_SERVICE_PORT_DNS"], "53");
        assert_eq!(env["WEB_FRONT_PORT"], "tcp://10.96.0.10:80");
        assert_eq!(env["WEB_FRONT_PORT_53_UDP"], "udp://10.96.0.10:53");
        assert_eq!(env["WEB_FRONT_PORT_53_UDP_ADDR"], "10.96.0.10");
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert!(!env.keys().any(|k| k.starts_with("HEADLESS") || k.starts_with("ELSEWHERE")), "{env:?}");
        let unlinked =
            pod("metadata: {name: web}\nspec: {enableServiceLinks: false, containers: [{name: c, image: i}]}\n");
        let env: BTreeMap<String, String> = service_env(&unlinked, "default", &o).into_iter().collect();
        assert!(env.contains_key("KUBERNETES_SERVICE_HOST") && !env.contains_key("WEB_FRONT_SERVICE_HOST"));
    }

    #[test]
    fn a_missing_object_or_key_is_a_clear_error_unless_optional() {
        let p = |env: &str| {
            pod(&format!("metadata: {{name: web}}\nspec: {{containers: [{{name: c, image: i, env: [{env}]}}]}}\n"))
        };
        let err = |p: Pod| {
            env(&p, &id(), &p.spec.clone().unwrap().containers[0], &objects(), &facts()).unwrap_err().to_string()
        };
        assert_eq!(
            err(p("{name: X, valueFrom: {configMapKeyRef: {name: nothing, key: k}}}")),
            "configmap \"nothing\" not found"
        );
        assert!(
            err(p("{name: X, valueFrom: {secretKeyRef: {name: creds, key: nope}}}")).contains("couldn't find key nope")
        );
    }

    #[test]
    fn volumes_project_keys_items_and_pod_fields() {
        let p = pod(
            "metadata: {name: web, namespace: default, labels: {app: web, tier: front}}\nspec:\n  containers: [{name: c, image: i}]\n  volumes:\n  \
             - {name: cfg, configMap: {name: settings, items: [{key: mode, path: conf/mode}]}}\n  \
             - {name: sec, secret: {secretName: creds, defaultMode: 256}}\n  \
             - {name: info, downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}}\n  \
             - {name: all, projected: {sources: [{configMap: {name: settings, items: [{key: level, path: level}]}}, {secret: {name: creds, items: [{key: user, path: user}]}}]}}\n  \
             - {name: scratch, emptyDir: {}}\n",
        );
        let vols = p.spec.clone().unwrap().volumes.unwrap();
        let files = |i: usize| volume_files(&p, &id(), &vols[i], &objects(), &facts()).unwrap();
        assert_eq!(files(0).unwrap(), Files::from([("conf/mode".into(), (b"fast".to_vec(), 0o644))]));
        assert_eq!(files(1).unwrap()["password"], (b"hunter2".to_vec(), 0o400));
        assert_eq!(files(2).unwrap()["labels"].0, b"app=\"web\"\ntier=\"front\"".to_vec());
        assert_eq!(files(3).unwrap().keys().collect::<Vec<_>>(), ["level", "user"]);
        assert!(files(4).is_none(), "not a configuration volume");
    }

    #[test]
    fn the_atomic_writer_switches_data_and_drops_what_went() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("vol");
        let one = Files::from([("a".into(), (b"1".to_vec(), 0o644)), ("sub/b".into(), (b"2".to_vec(), 0o644))]);
        assert!(write_atomically(&d, &one, None).unwrap());
        assert_eq!(std::fs::read(d.join("a")).unwrap(), b"1");
        assert_eq!(std::fs::read(d.join("sub/b")).unwrap(), b"2");
        assert!(!write_atomically(&d, &one, None).unwrap(), "the same content is not rewritten");
        // With a group, files get its read access before the switch, and
        // are not rewritten for it on the next pass.
        let g = tempfile::tempdir().unwrap();
        let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(g.path()).unwrap());
        let private = Files::from([("k".into(), (b"x".to_vec(), 0o400))]);
        assert!(write_atomically(g.path(), &private, Some(gid)).unwrap());
        let mode = std::fs::metadata(g.path().join("k")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o440, "the group reads it");
        assert!(!write_atomically(g.path(), &private, Some(gid)).unwrap(), "the group's access is no change");
        let two = Files::from([("a".into(), (b"3".to_vec(), 0o600))]);
        assert!(write_atomically(&d, &two, None).unwrap());
        assert_eq!(std::fs::read(d.join("a")).unwrap(), b"3");
        assert!(!d.join("sub").exists(), "a name no longer there goes");
        let generations = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("..1"))
                .count()
        };
        assert_eq!(generations(&d), 1, "the old generation is removed");
        std::fs::remove_file(d.join("a")).unwrap();
        assert!(!write_atomically(&d, &two, None).unwrap());
        assert_eq!(std::fs::read(d.join("a")).unwrap(), b"3", "a missing name is put back");
        let clash = Files::from([("x".into(), (b"1".to_vec(), 0o644)), ("x/y".into(), (b"2".to_vec(), 0o644))]);
        assert!(write_atomically(&d, &clash, None).is_err());
        assert_eq!(generations(&d), 1, "a failed write leaves no generation behind");
        assert_eq!(std::fs::read(d.join("a")).unwrap(), b"3", "and the live one serves on");
    }
}
