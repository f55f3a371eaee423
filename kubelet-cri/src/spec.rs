//! A Pod's spec as CRI configs: the sandbox, then one config per container.
//! Pure, so every field's translation is tested without a runtime.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod, VolumeMount};

use crate::{
    cgroups,
    error::{KubeletError, Result},
    quantity::{parse_cpu, parse_memory},
};

/// Labels kpr's kubelet puts on everything it creates: how it finds its own
/// sandboxes and containers again after a restart (the `io.kubernetes.*`
/// ones are the kubelet's own, which tools like crictl show).
pub const MANAGED_BY: &str = "kpr.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "kpr-kubelet";
pub const POD_NAME: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const POD_UID: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// `init`, `sidecar` or `app`.
pub const CONTAINER_KIND: &str = "kpr.io/container-kind";
/// Annotation: how many times this container was restarted before this instance.
pub const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
/// Annotation: the hash of the container's spec this instance runs.
pub const CONTAINER_HASH: &str = "io.kubernetes.container.hash";

/// Who a pod is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for PodId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Node-wide settings that shape every pod.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pod volumes (emptyDir) and logs live under this folder.
    pub root_dir: PathBuf,
    /// Under which every pod's cgroup is made (the kubelet's `kubepods`).
    pub cgroup_parent: String,
    /// How the runtime names cgroups.
    pub cgroup_driver: crate::cgroups::Driver,
    /// Cluster DNS servers for `dnsPolicy: ClusterFirst`; empty: the node's resolv.conf.
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
    /// This node, as pods' `spec.nodeName` and `status.hostIP` fields show it.
    pub node_name: String,
    pub node_ip: Option<String>,
    /// A running container's log is rotated over this size, keeping this
    /// many files (`--container-log-max-size`, `--container-log-max-files`).
    pub log_max_size: u64,
    pub log_max_files: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Init,
    /// An init container with `restartPolicy: Always`.
    Sidecar,
    App,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Init => "init",
            Kind::Sidecar => "sidecar",
            Kind::App => "app",
        }
    }
}

/// An init container with `restartPolicy: Always` is a sidecar: it runs
/// beside the app containers for the pod's life.
pub fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The hash of a container's spec, recorded on each instance: a running
/// instance whose spec changed is replaced. FNV-1a over the spec's JSON,
/// stable across kpr builds (as the kubelet's own hash is).
pub fn spec_hash(c: &Container) -> String {
    let json = serde_json::to_vec(c).unwrap_or_default();
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

/// Where the pod's emptyDir volumes live.
pub fn pod_dir(s: &Settings, id: &PodId) -> PathBuf {
    s.root_dir.join("pods").join(&id.uid)
}

/// The pod's log folder, as the kubelet's `/var/log/pods/NS_NAME_UID`.
pub fn log_dir(root_dir: &Path, id: &PodId) -> PathBuf {
    root_dir.join("logs").join(format!("{}_{}_{}", id.namespace, id.name, id.uid))
}

/// A container's log file relative to the pod's log folder.
pub fn log_path(container: &str, attempt: u32) -> String {
    format!("{container}/{attempt}.log")
}

fn pod_labels(id: &PodId) -> HashMap<String, String> {
    HashMap::from([
        (MANAGED_BY.into(), MANAGED_BY_VALUE.into()),
        (POD_NAME.into(), id.name.clone()),
        (POD_NAMESPACE.into(), id.namespace.clone()),
        (POD_UID.into(), id.uid.clone()),
    ])
}

fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)
}

/// The namespaces a pod's containers share, as the kubelet asks for them:
/// the pod's network (or the node's), its own PID namespace per container
/// unless `shareProcessNamespace` (or `hostPID`), the pod's IPC (or the node's).
fn namespaces(pod: &Pod) -> cri::NamespaceOption {
    let spec = pod.spec.clone().unwrap_or_default();
    let mode = |node: bool, otherwise: cri::NamespaceMode| {
        if node { cri::NamespaceMode::Node as i32 } else { otherwise as i32 }
    };
    let pid_shared = spec.share_process_namespace == Some(true);
    cri::NamespaceOption {
        network: mode(host_network(pod), cri::NamespaceMode::Pod),
        pid: mode(
            spec.host_pid == Some(true),
            if pid_shared { cri::NamespaceMode::Pod } else { cri::NamespaceMode::Container },
        ),
        ipc: mode(spec.host_ipc == Some(true), cri::NamespaceMode::Pod),
        ..Default::default()
    }
}

/// The user a container runs as, when its or its pod's securityContext says.
pub fn run_as_user(pod: &Pod, c: &Container) -> Option<i64> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    c.security_context.as_ref().and_then(|sc| sc.run_as_user).or_else(|| pod_sc.and_then(|sc| sc.run_as_user))
}

/// Whether the container must not run as root (`runAsNonRoot`, its own or the pod's).
pub fn run_as_non_root(pod: &Pod, c: &Container) -> bool {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    c.security_context.as_ref().and_then(|sc| sc.run_as_non_root).or_else(|| pod_sc.and_then(|sc| sc.run_as_non_root))
        == Some(true)
}

/// The container's Linux security context: its securityContext over its
/// pod's (user, group, supplemental groups), privileges, capabilities and
/// a read-only root filesystem, in the pod's namespaces. `runAsNonRoot`
/// with `runAsUser: 0` is refused here; with no user set, the kubelet
/// checks the image's user before it starts the container.
fn security_context(pod: &Pod, c: &Container) -> Result<cri::LinuxContainerSecurityContext> {
    let sc = c.security_context.clone().unwrap_or_default();
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.clone()).unwrap_or_default();
    let user = run_as_user(pod, c);
    if run_as_non_root(pod, c) && user == Some(0) {
        return Err(KubeletError::Invalid(format!(
            "container's runAsUser breaks non-root policy (container: {})",
            c.name
        )));
    }
    let capabilities = sc.capabilities.as_ref().map(|caps| cri::Capability {
        add_capabilities: caps.add.clone().unwrap_or_default(),
        drop_capabilities: caps.drop.clone().unwrap_or_default(),
        ..Default::default()
    });
    Ok(cri::LinuxContainerSecurityContext {
        capabilities,
        privileged: sc.privileged == Some(true),
        namespace_options: Some(namespaces(pod)),
        run_as_user: user.map(|value| cri::Int64Value { value }),
        run_as_group: sc.run_as_group.or(pod_sc.run_as_group).map(|value| cri::Int64Value { value }),
        readonly_rootfs: sc.read_only_root_filesystem == Some(true),
        // fsGroup joins the supplemental groups, as the kubelet adds it.
        supplemental_groups: pod_sc
            .supplemental_groups
            .unwrap_or_default()
            .into_iter()
            .chain(pod_sc.fs_group)
            .collect(),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        ..Default::default()
    })
}

/// The sandbox for `pod`.
pub fn sandbox_config(pod: &Pod, id: &PodId, attempt: u32, s: &Settings) -> cri::PodSandboxConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let host_net = host_network(pod);
    let mut labels = pod.metadata.labels.clone().unwrap_or_default().into_iter().collect::<HashMap<_, _>>();
    labels.extend(pod_labels(id));
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some())
        .map(|p| cri::PortMapping {
            protocol: match p.protocol.as_deref() {
                Some("UDP") => cri::Protocol::Udp as i32,
                Some("SCTP") => cri::Protocol::Sctp as i32,
                _ => cri::Protocol::Tcp as i32,
            },
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or_default(),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect();
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    // A privileged container needs a privileged sandbox (the runtime refuses it otherwise).
    let privileged = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.security_context.as_ref().and_then(|sc| sc.privileged) == Some(true));
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: id.name.clone(),
            uid: id.uid.clone(),
            namespace: id.namespace.clone(),
            attempt,
        }),
        // A host-network sandbox keeps the node's hostname (and must not set one).
        hostname: if host_net { String::new() } else { spec.hostname.clone().unwrap_or_else(|| id.name.clone()) },
        log_directory: log_dir(&s.root_dir, id).to_string_lossy().into_owned(),
        dns_config: dns_config(pod, &id.namespace, s),
        port_mappings,
        labels,
        annotations: pod.metadata.annotations.clone().unwrap_or_default().into_iter().collect(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroups::pod_cgroup(&s.cgroup_parent, cgroups::qos_class(&spec), &id.uid, s.cgroup_driver),
            resources: Some(sandbox_resources(&cgroups::pod_limits(&spec))),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces(pod)),
                run_as_user: pod_sc.run_as_user.map(|value| cri::Int64Value { value }),
                // A group alone is refused for the sandbox (runtimes want a
                // user with it); its containers get the image's user instead.
                run_as_group: pod_sc
                    .run_as_group
                    .filter(|_| pod_sc.run_as_user.is_some())
                    .map(|value| cri::Int64Value { value }),
                supplemental_groups: pod_sc.supplemental_groups.clone().unwrap_or_default(),
                privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's summed resources, for runtimes that size the sandbox by them.
fn sandbox_resources(l: &cgroups::PodLimits) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        cpu_shares: l.cpu_shares as i64,
        cpu_period: if l.cpu_quota.is_some() { 100_000 } else { 0 },
        cpu_quota: l.cpu_quota.unwrap_or(0),
        memory_limit_in_bytes: l.memory.unwrap_or(0),
        ..Default::default()
    }
}

/// As the kubelet: ClusterFirst uses the cluster DNS (if one is configured),
/// `None` only the pod's dnsConfig, Default the node's resolv.conf.
fn dns_config(pod: &Pod, namespace: &str, s: &Settings) -> Option<cri::DnsConfig> {
    let spec = pod.spec.as_ref()?;
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster_first = match policy {
        "ClusterFirst" => !host_network(pod),
        "ClusterFirstWithHostNet" => true,
        _ => false,
    };
    let mut dns = cri::DnsConfig::default();
    if cluster_first && !s.cluster_dns.is_empty() {
        let d = &s.cluster_domain;
        dns.servers = s.cluster_dns.clone();
        dns.searches = vec![format!("{namespace}.svc.{d}"), format!("svc.{d}"), d.clone()];
        dns.options = vec!["ndots:5".into()];
    } else if policy != "None" && spec.dns_config.is_none() {
        // The runtime's default: the node's resolv.conf.
        return None;
    }
    if let Some(c) = &spec.dns_config {
        dns.servers.extend(c.nameservers.iter().flatten().cloned());
        dns.searches.extend(c.searches.iter().flatten().cloned());
        for o in c.options.iter().flatten() {
            let name = o.name.clone().unwrap_or_default();
            dns.options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    Some(dns)
}

fn resources(c: &Container) -> Result<Option<cri::LinuxContainerResources>> {
    let Some(r) = &c.resources else { return Ok(None) };
    let mut out = cri::LinuxContainerResources::default();
    if let Some(cpu) = r.limits.as_ref().and_then(|l| l.get("cpu")) {
        out.cpu_period = 100_000;
        out.cpu_quota = parse_cpu(&cpu.0)? * 100;
    }
    let request = r.requests.as_ref().and_then(|l| l.get("cpu")).or(r.limits.as_ref().and_then(|l| l.get("cpu")));
    if let Some(cpu) = request {
        // As the kubelet: 1024 shares per core, at least 2.
        out.cpu_shares = (parse_cpu(&cpu.0)? * 1024 / 1000).max(2);
    }
    if let Some(mem) = r.limits.as_ref().and_then(|l| l.get("memory")) {
        out.memory_limit_in_bytes = parse_memory(&mem.0)?;
    }
    Ok(Some(out))
}

/// Where each of `c`'s volume mounts comes from on the node.
/// Where the volume a mount names lives on the node, and whether it is
/// mounted read-only.
fn volume_root(pod: &Pod, id: &PodId, c: &Container, m: &VolumeMount, s: &Settings) -> Result<(PathBuf, bool)> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    let v = volumes.into_iter().flatten().find(|v| v.name == m.name).ok_or_else(|| {
        KubeletError::Invalid(format!("container {} mounts volume {:?}, which the pod does not define", c.name, m.name))
    })?;
    Ok(if let Some(h) = &v.host_path {
        (PathBuf::from(&h.path), m.read_only.unwrap_or(false))
    } else if v.empty_dir.is_some() {
        (empty_dir(s, id, &v.name), m.read_only.unwrap_or(false))
    } else if is_config_volume(v) {
        // Always read-only, as the kubelet mounts them.
        (config_dir(s, id, &v.name), true)
    } else {
        return Err(KubeletError::Invalid(format!(
            "volume {:?}: only hostPath, emptyDir, configMap, secret, downwardAPI and projected volumes are supported",
            v.name
        )));
    })
}

/// The mount's `subPath`, if any, refused when it climbs out by its text.
fn sub_path(m: &VolumeMount) -> Result<Option<&str>> {
    match m.sub_path.as_deref().filter(|p| !p.is_empty()) {
        Some(sub) if sub.starts_with('/') || sub.split('/').any(|p| p == "..") => {
            Err(KubeletError::Invalid(format!("volume mount {:?}: subPath {sub:?} leaves the volume", m.name)))
        }
        other => Ok(other),
    }
}

fn mounts(pod: &Pod, id: &PodId, c: &Container, s: &Settings) -> Result<Vec<cri::Mount>> {
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let (root, readonly) = volume_root(pod, id, c, m, s)?;
            // A subPath mounts one entry of the volume.
            let host_path = match sub_path(m)? {
                Some(sub) => root.join(sub),
                None => root,
            };
            Ok(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host_path.to_string_lossy().into_owned(),
                readonly,
                ..Default::default()
            })
        })
        .collect()
}

/// Checks on the node, just before `c` starts, that each of its subPaths
/// stays inside its volume once symlinks are followed (a container may
/// have planted one in a volume it writes), creating a missing one as the
/// kubelet does.
pub fn check_sub_paths(pod: &Pod, id: &PodId, c: &Container, s: &Settings) -> Result<()> {
    for m in c.volume_mounts.iter().flatten() {
        let Some(sub) = sub_path(m)? else { continue };
        let (root, _) = volume_root(pod, id, c, m, s)?;
        let full = root.join(sub);
        if std::fs::symlink_metadata(&full).is_err() {
            std::fs::create_dir_all(&full).map_err(|e| {
                KubeletError::Invalid(format!("volume mount {:?}: creating subPath {sub:?}: {e}", m.name))
            })?;
        }
        let resolve = |p: &Path| {
            std::fs::canonicalize(p)
                .map_err(|e| KubeletError::Invalid(format!("volume mount {:?}: {}: {e}", m.name, p.display())))
        };
        if !resolve(&full)?.starts_with(resolve(&root)?) {
            return Err(KubeletError::Invalid(format!(
                "volume mount {:?}: subPath {sub:?} resolves outside the volume",
                m.name
            )));
        }
    }
    Ok(())
}

/// Whether `v`'s files come from the API (ConfigMap, Secret, the pod's own fields).
pub fn is_config_volume(v: &k8s_openapi::api::core::v1::Volume) -> bool {
    v.config_map.is_some() || v.secret.is_some() || v.downward_api.is_some() || v.projected.is_some()
}

/// The folder behind a configuration volume (see `config::write_atomically`).
pub fn config_dir(s: &Settings, id: &PodId, volume: &str) -> PathBuf {
    pod_dir(s, id).join("volumes/config").join(volume)
}

/// The folder behind an emptyDir volume.
pub fn empty_dir(s: &Settings, id: &PodId, volume: &str) -> PathBuf {
    pod_dir(s, id).join("volumes/empty-dir").join(volume)
}

/// One container of the pod, as its `attempt`th instance.
/// Replaces `$(NAME)` with `vars[NAME]` where it is defined; `$$` is a
/// literal `$`; anything else stays as written (the kubelet's expansion).
pub fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `env` is the container's environment (see `config::env`); command and
/// args are expanded against it, as the kubelet does.
pub fn container_config(
    pod: &Pod,
    id: &PodId,
    c: &Container,
    kind: Kind,
    attempt: u32,
    s: &Settings,
    env: &[(String, String)],
) -> Result<cri::ContainerConfig> {
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    let expand =
        |list: &Option<Vec<String>>| -> Vec<String> { list.iter().flatten().map(|a| expand(a, &vars)).collect() };
    let mut labels = pod_labels(id);
    labels.insert(CONTAINER_NAME.into(), c.name.clone());
    labels.insert(CONTAINER_KIND.into(), kind.label().into());
    let image = c.image.clone().ok_or_else(|| KubeletError::Invalid(format!("container {} has no image", c.name)))?;
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: c.name.clone(), attempt }),
        image: Some(cri::ImageSpec { image: image.clone(), user_specified_image: image, ..Default::default() }),
        command: expand(&c.command),
        args: expand(&c.args),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs: env.iter().map(|(k, v)| cri::KeyValue { key: k.clone(), value: v.clone() }).collect(),
        mounts: mounts(pod, id, c, s)?,
        labels,
        annotations: HashMap::from([
            (RESTART_COUNT.into(), attempt.to_string()),
            (CONTAINER_HASH.into(), spec_hash(c)),
        ]),
        log_path: log_path(&c.name, attempt),
        linux: Some(cri::LinuxContainerConfig {
            resources: resources(c)?,
            security_context: Some(security_context(pod, c)?),
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            node_name: "node-1".into(),
            node_ip: None,
            log_max_size: 10 << 20,
            log_max_files: 5,
            root_dir: "/var/lib/kpr-kubelet".into(),
            cgroup_parent: "/kubepods".into(),
            cgroup_driver: cgroups::Driver::Cgroupfs,
            cluster_dns: vec!["10.96.0.53".into()],
            cluster_domain: "cluster.local".into(),
        }
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn id() -> PodId {
        PodId { namespace: "default".into(), name: "web".into(), uid: "u1".into() }
    }

    const WEB: &str = "
metadata: {name: web, namespace: default, labels: {app: web}, annotations: {note: hi}}
spec:
  volumes:
  - {name: data, emptyDir: {}}
  - {name: host, hostPath: {path: /srv/www}}
  containers:
  - name: httpd
    image: docker.io/kpr/busybox:test
    command: [httpd, -f]
    args: [-p, '8080']
    workingDir: /www
    env: [{name: MODE, value: demo}]
    ports: [{containerPort: 8080, hostPort: 18080}]
    volumeMounts:
    - {name: data, mountPath: /data}
    - {name: host, mountPath: /www, readOnly: true}
    resources:
      limits: {cpu: 500m, memory: 64Mi}
      requests: {cpu: 250m}
";

    #[test]
    fn the_sandbox_carries_identity_dns_ports_and_cgroup() {
        let c = sandbox_config(&pod(WEB), &id(), 2, &settings());
        let m = c.metadata.unwrap();
        assert_eq!((m.name.as_str(), m.namespace.as_str(), m.uid.as_str(), m.attempt), ("web", "default", "u1", 2));
        assert_eq!(c.hostname, "web");
        assert_eq!(c.labels["app"], "web");
        assert_eq!(c.labels[MANAGED_BY], MANAGED_BY_VALUE);
        assert_eq!(c.labels[POD_UID], "u1");
        assert_eq!(c.annotations["note"], "hi");
        assert_eq!(c.log_directory, "/var/lib/kpr-kubelet/logs/default_web_u1");
        let dns = c.dns_config.unwrap();
        assert_eq!(dns.servers, ["10.96.0.53"]);
        assert_eq!(dns.searches, ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]);
        assert_eq!(c.port_mappings[0].host_port, 18080);
        assert_eq!(c.port_mappings[0].container_port, 8080);
        let linux = c.linux.unwrap();
        assert_eq!(linux.cgroup_parent, "/kubepods/burstable/podu1", "limits without equal requests: Burstable");
        assert_eq!(linux.resources.unwrap().memory_limit_in_bytes, 64 << 20);
        assert_eq!(linux.security_context.unwrap().namespace_options.unwrap().network, cri::NamespaceMode::Pod as i32);
    }

    #[test]
    fn a_host_network_sandbox_shares_the_node_and_sets_no_hostname() {
        let p = pod("metadata: {name: h}\nspec: {hostNetwork: true, containers: [{name: c, image: i}]}");
        let c = sandbox_config(&p, &id(), 0, &settings());
        assert_eq!(c.hostname, "");
        let ns = c.linux.unwrap().security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, cri::NamespaceMode::Node as i32);
        assert!(c.dns_config.is_none(), "ClusterFirst on the host network falls back to the node's resolv.conf");
    }

    #[test]
    fn a_container_gets_command_env_mounts_limits_and_log_path() {
        let p = pod(WEB);
        let spec = p.spec.clone().unwrap();
        let env = [("MODE".to_string(), "prod".to_string())];
        let c = container_config(&p, &id(), &spec.containers[0], Kind::App, 3, &settings(), &env).unwrap();
        assert_eq!(c.metadata.unwrap().attempt, 3);
        assert_eq!(c.image.unwrap().image, "docker.io/kpr/busybox:test");
        assert_eq!(c.command, ["httpd", "-f"]);
        assert_eq!(c.args, ["-p", "8080"]);
        assert_eq!(c.working_dir, "/www");
        assert_eq!(c.envs[0].key, "MODE");
        assert_eq!(c.mounts[0].host_path, "/var/lib/kpr-kubelet/pods/u1/volumes/empty-dir/data");
        assert_eq!(c.mounts[0].container_path, "/data");
        assert_eq!((c.mounts[1].host_path.as_str(), c.mounts[1].readonly), ("/srv/www", true));
        let r = c.linux.unwrap().resources.unwrap();
        assert_eq!((r.cpu_period, r.cpu_quota, r.cpu_shares), (100_000, 50_000, 256));
        assert_eq!(r.memory_limit_in_bytes, 64 * 1024 * 1024);
        assert_eq!(c.log_path, "httpd/3.log");
        assert_eq!(c.labels[CONTAINER_NAME], "httpd");
        assert_eq!(c.labels[CONTAINER_KIND], "app");
        assert_eq!(c.annotations[RESTART_COUNT], "3");
    }

    #[test]
    fn configuration_volumes_mount_read_only_and_others_are_clear_errors() {
        let p = pod(
            "metadata: {name: p}\nspec:\n  volumes: [{name: s, secret: {secretName: x}}, {name: n, nfs: {server: h, path: /}}]\n  \
             containers: [{name: c, image: i, command: [echo, '$(GREETING)'], volumeMounts: [{name: s, mountPath: /s, subPath: key}]}]",
        );
        let env = [("GREETING".to_string(), "hi".to_string())];
        let mut c = p.spec.clone().unwrap().containers[0].clone();
        let config = container_config(&p, &id(), &c, Kind::App, 0, &settings(), &env).unwrap();
        assert_eq!(config.command, ["echo", "hi"], "command expanded against the environment");
        let m = &config.mounts[0];
        assert_eq!((m.host_path.as_str(), m.readonly), ("/var/lib/kpr-kubelet/pods/u1/volumes/config/s/key", true));
        c.volume_mounts.as_mut().unwrap()[0].name = "n".into();
        let e = container_config(&p, &id(), &c, Kind::App, 0, &settings(), &env).unwrap_err();
        assert!(e.to_string().contains("only hostPath, emptyDir"), "{e}");
    }

    #[test]
    fn security_contexts_layer_the_containers_over_the_pods() {
        let p = pod(
            "metadata: {name: p}\nspec:\n  shareProcessNamespace: true\n  securityContext: {runAsUser: 1000, runAsGroup: 3000, supplementalGroups: [4000]}\n  \
             containers:\n  - {name: a, image: i, securityContext: {runAsUser: 2000, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {add: [NET_ADMIN], drop: [ALL]}}}\n  \
             - {name: b, image: i, securityContext: {privileged: true}}\n  - {name: c, image: i, securityContext: {runAsNonRoot: true, runAsUser: 0}}\n",
        );
        let spec = p.spec.clone().unwrap();
        let sc = |i: usize| container_config(&p, &id(), &spec.containers[i], Kind::App, 0, &settings(), &[]);
        let a = sc(0).unwrap().linux.unwrap().security_context.unwrap();
        assert_eq!((a.run_as_user.map(|u| u.value), a.run_as_group.map(|g| g.value)), (Some(2000), Some(3000)));
        assert_eq!(a.supplemental_groups, [4000]);
        assert!(a.readonly_rootfs && a.no_new_privs && !a.privileged);
        let caps = a.capabilities.unwrap();
        assert_eq!(
            (caps.add_capabilities, caps.drop_capabilities),
            (vec!["NET_ADMIN".to_string()], vec!["ALL".to_string()])
        );
        assert_eq!(a.namespace_options.unwrap().pid, cri::NamespaceMode::Pod as i32, "shareProcessNamespace");
        let b = sc(1).unwrap().linux.unwrap().security_context.unwrap();
        assert_eq!((b.privileged, b.run_as_user.map(|u| u.value)), (true, Some(1000)), "the pod's user");
        let sandbox = sandbox_config(&p, &id(), 0, &settings()).linux.unwrap().security_context.unwrap();
        assert!(sandbox.privileged, "a privileged container needs a privileged sandbox");
        assert!(sc(2).unwrap_err().to_string().contains("breaks non-root policy"));
    }

    #[test]
    fn a_sub_path_that_a_symlink_leads_out_of_its_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::os::unix::fs::symlink("/etc", vol.join("evil")).unwrap();
        let p = pod(&format!(
            "metadata: {{name: p}}\nspec:\n  volumes: [{{name: v, hostPath: {{path: {}}}}}]\n  containers:\n  \
             - {{name: ok, image: i, volumeMounts: [{{name: v, mountPath: /m, subPath: made/here}}]}}\n  \
             - {{name: bad, image: i, volumeMounts: [{{name: v, mountPath: /m, subPath: evil}}]}}\n",
            vol.display()
        ));
        let spec = p.spec.clone().unwrap();
        check_sub_paths(&p, &id(), &spec.containers[0], &settings()).unwrap();
        assert!(vol.join("made/here").is_dir(), "a missing subPath is created");
        let e = check_sub_paths(&p, &id(), &spec.containers[1], &settings()).unwrap_err();
        assert!(e.to_string().contains("resolves outside the volume"), "{e}");
    }

    #[test]
    fn variables_expand_against_earlier_ones_and_dollars_escape() {
        let vars = HashMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$-$(", &vars), "x-$(B)-$(A)-$-$(");
    }
    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_cpu("500m").unwrap(), 500);
        assert_eq!(parse_cpu("2").unwrap(), 2000);
        assert_eq!(parse_cpu("0.25").unwrap(), 250);
        assert_eq!(parse_memory("128Mi").unwrap(), 128 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory("1000").unwrap(), 1000);
        assert!(parse_memory("lots").is_err());
    }
}
