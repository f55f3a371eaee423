//! Where a pod's containers live in the cgroup tree, as the kubelet lays it
//! out: a QoS class per pod (Guaranteed, Burstable, BestEffort), one cgroup
//! per pod under its class (`ROOT/pod<uid>`, `ROOT/burstable/pod<uid>`,
//! `ROOT/besteffort/pod<uid>`), named for the runtime's cgroup driver
//! (cgroupfs paths or systemd slices), with the pod's summed limits.
//! Naming and sums are pure; [`apply`] writes a cgroupfs pod cgroup.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::quantity::{parse_cpu, parse_memory};

/// Where the cgroup hierarchies are mounted.
pub const MOUNT: &str = "/sys/fs/cgroup";

/// How the runtime manages cgroups (CRI `RuntimeConfig`, else `--cgroup-driver`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

impl std::str::FromStr for Driver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cgroupfs" => Ok(Self::Cgroupfs),
            "systemd" => Ok(Self::Systemd),
            _ => Err(format!("{s:?}: expected cgroupfs or systemd")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn name(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
}

fn quantities(c: &Container, limits: bool) -> impl Iterator<Item = (&str, &str)> {
    let r = c.resources.as_ref();
    let map = r.and_then(|r| if limits { r.limits.as_ref() } else { r.requests.as_ref() });
    map.into_iter().flatten().map(|(k, v)| (k.as_str(), v.0.as_str()))
}

/// One of `c`'s limits or requests.
fn quantity<'a>(c: &'a Container, limits: bool, name: &str) -> Option<&'a str> {
    quantities(c, limits).find(|(n, _)| *n == name).map(|(_, q)| q)
}

fn is_zero(name: &str, q: &str) -> bool {
    let value = if name == "cpu" { parse_cpu(q) } else { parse_memory(q) };
    value.map(|v| v == 0).unwrap_or(false)
}

/// The kubelet's QoS class: Guaranteed when every container limits CPU and
/// memory with requests equal to the limits, BestEffort when none asks for
/// either, Burstable otherwise.
pub fn qos_class(spec: &PodSpec) -> Qos {
    let all: Vec<&Container> = spec.init_containers.iter().flatten().chain(&spec.containers).collect();
    let compute = |name: &str| name == "cpu" || name == "memory";
    let any = all
        .iter()
        .any(|c| quantities(c, false).chain(quantities(c, true)).any(|(name, q)| compute(name) && !is_zero(name, q)));
    if !any {
        return Qos::BestEffort;
    }
    let guaranteed = all.iter().all(|c| {
        ["cpu", "memory"].iter().all(|name| {
            let limit = quantity(c, true, name);
            // A request left out defaults to the limit, as the API server does.
            let request = quantity(c, false, name).or(limit);
            match (limit, request) {
                (Some(l), Some(r)) => same_quantity(name, l, r),
                _ => false,
            }
        })
    });
    if guaranteed { Qos::Guaranteed } else { Qos::Burstable }
}

fn same_quantity(name: &str, a: &str, b: &str) -> bool {
    let parse = |q: &str| if name == "cpu" { parse_cpu(q).ok() } else { parse_memory(q).ok() };
    parse(a).is_some() && parse(a) == parse(b)
}

/// The pod's cgroup under `root` (`--cgroup-parent`), as the runtime is
/// to be given it: a cgroupfs path, or with systemd the nested slices
/// (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`,
/// dashes in names escaped, as the kubelet's `ToSystemd`).
pub fn pod_cgroup(root: &str, qos: Qos, uid: &str, driver: Driver) -> String {
    let mut parts: Vec<String> = root.split('/').filter(|p| !p.is_empty()).map(String::from).collect();
    match qos {
        Qos::Guaranteed => {}
        Qos::Burstable => parts.push("burstable".into()),
        Qos::BestEffort => parts.push("besteffort".into()),
    }
    parts.push(format!("pod{uid}"));
    match driver {
        Driver::Cgroupfs => format!("/{}", parts.join("/")),
        Driver::Systemd => {
            let escaped: Vec<String> = parts.iter().map(|p| p.replace('-', "_")).collect();
            let slices: Vec<String> =
                (1..=escaped.len()).map(|n| format!("{}.slice", escaped[..n].join("-"))).collect();
            format!("/{}", slices.join("/"))
        }
    }
}

/// The pod's own limits, as the kubelet's pod container manager sets them:
/// CPU shares from the summed requests (2 for BestEffort), a CPU quota and a
/// memory limit only when every container has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodLimits {
    pub cpu_shares: u64,
    /// Microseconds per 100 ms period.
    pub cpu_quota: Option<i64>,
    pub memory: Option<i64>,
}

pub fn pod_limits(spec: &PodSpec) -> PodLimits {
    let inits: Vec<&Container> = spec.init_containers.iter().flatten().collect();
    // A sidecar: an init container that keeps running (`restartPolicy: Always`).
    let sidecar = |c: &&Container| c.restart_policy.as_deref() == Some("Always");
    // What runs at once: the app containers with the sidecars, or one
    // regular init container at a time (as the API's pod resource rules).
    let steady: Vec<&Container> = spec.containers.iter().chain(inits.iter().copied().filter(sidecar)).collect();
    let regular_init: Vec<&Container> = inits.iter().copied().filter(|c| !sidecar(c)).collect();
    let all: Vec<&Container> = steady.iter().chain(&regular_init).copied().collect();
    let pod_value = |each: &dyn Fn(&Container) -> Option<i64>| -> Option<i64> {
        let sum: Option<i64> = steady.iter().map(|c| each(c)).sum();
        let biggest_init = regular_init.iter().map(|c| each(c)).try_fold(0, |m, v| Some(m.max(v?)));
        Some(sum?.max(biggest_init?))
    };
    // A request left out defaults to the limit; none at all counts as 0.
    let cpu_request = |c: &Container| {
        let q = quantity(c, false, "cpu").or(quantity(c, true, "cpu"));
        Some(q.and_then(|q| parse_cpu(q).ok()).unwrap_or(0))
    };
    let requested_milli = pod_value(&cpu_request).unwrap_or(0);
    let cpu_shares = match qos_class(spec) {
        Qos::BestEffort => 2,
        _ => (requested_milli * 1024 / 1000).max(2) as u64,
    };
    // A limit only when every container has one.
    let declared = |name: &str| all.iter().all(|c| quantity(c, true, name).is_some());
    let cpu_limit = pod_value(&|c| parse_cpu(quantity(c, true, "cpu")?).ok()).filter(|_| declared("cpu"));
    let memory = pod_value(&|c| parse_memory(quantity(c, true, "memory")?).ok()).filter(|_| declared("memory"));
    // The kernel's least CFS quota is 1 ms.
    PodLimits { cpu_shares, cpu_quota: cpu_limit.map(|milli| (milli * 100).max(1000)), memory }
}

/// Where cgroupfs keeps controller `name`: its own hierarchy (cgroup v1) or
/// the unified one (v2).
fn controller_dir(mount: &Path, name: &str) -> PathBuf {
    if mount.join("cgroup.controllers").exists() { mount.to_path_buf() } else { mount.join(name) }
}

/// Makes the pod's cgroupfs cgroup (`path`, under the cgroup mount) with its
/// limits, before the runtime puts the sandbox in it. The runtime creates
/// whatever controllers are left.
pub fn apply(mount: &Path, path: &str, limits: &PodLimits) -> std::io::Result<()> {
    let rel = path.trim_start_matches('/');
    let v2 = mount.join("cgroup.controllers").exists();
    let cpu = controller_dir(mount, "cpu").join(rel);
    let memory = controller_dir(mount, "memory").join(rel);
    std::fs::create_dir_all(&cpu)?;
    std::fs::create_dir_all(&memory)?;
    // Every value is tried; the first failure is reported.
    let mut first_error = None;
    let mut write = |file: PathBuf, value: String| {
        if let Err(e) = std::fs::write(&file, &value) {
            tracing::debug!(file = %file.display(), %value, error = %e, "cgroup value not set");
            first_error.get_or_insert(std::io::Error::new(e.kind(), format!("{}: {e}", file.display())));
        }
    };
    let besteffort_tier = Path::new(rel).parent().filter(|p| p.ends_with("besteffort"));
    if v2 {
        // A v2 folder offers its children only the controllers its parent
        // enabled: enable cpu and memory from the root down to the pod's parent.
        let mut dir = mount.to_path_buf();
        for part in Path::new(rel).parent().into_iter().flat_map(|p| p.components()) {
            write(dir.join("cgroup.subtree_control"), "+cpu +memory".into());
            dir = dir.join(part);
        }
        write(dir.join("cgroup.subtree_control"), "+cpu +memory".into());
        // cgroup v2 weight from v1 shares, as runc converts them.
        let weight = 1 + (limits.cpu_shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
        write(cpu.join("cpu.weight"), weight.to_string());
        let quota = limits.cpu_quota.map_or("max".to_string(), |q| q.to_string());
        write(cpu.join("cpu.max"), format!("{quota} 100000"));
        write(memory.join("memory.max"), limits.memory.map_or("max".to_string(), |m| m.to_string()));
        // BestEffort pods together weigh as little as one can, as the kubelet sets their tier.
        if let Some(tier) = besteffort_tier {
            write(mount.join(tier).join("cpu.weight"), "1".into());
        }
    } else {
        write(cpu.join("cpu.shares"), limits.cpu_shares.to_string());
        write(cpu.join("cpu.cfs_period_us"), "100000".into());
        write(cpu.join("cpu.cfs_quota_us"), limits.cpu_quota.unwrap_or(-1).to_string());
        write(memory.join("memory.limit_in_bytes"), limits.memory.unwrap_or(-1).to_string());
        if let Some(tier) = besteffort_tier {
            write(controller_dir(mount, "cpu").join(tier).join("cpu.shares"), "2".into());
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The pod cgroups under `root` (cgroupfs), as (pod uid, path), whatever
/// their class: what a sweep compares with the pods the node has.
pub fn pod_cgroups(mount: &Path, root: &str) -> Vec<(String, String)> {
    let root = format!("/{}", root.trim_matches('/'));
    let memory = controller_dir(mount, "memory");
    let mut found = Vec::new();
    for tier in ["", "/burstable", "/besteffort"] {
        let dir = format!("{root}{tier}");
        let Ok(entries) = std::fs::read_dir(memory.join(dir.trim_start_matches('/'))) else { continue };
        for e in entries.flatten().filter(|e| e.path().is_dir()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(uid) = name.strip_prefix("pod") {
                found.push((uid.to_string(), format!("{dir}/{name}")));
            }
        }
    }
    found
}

/// Removes the pod's cgroupfs cgroup from every hierarchy (only an empty
/// cgroup can go; one still in use stays).
pub fn remove(mount: &Path, path: &str) {
    let rel = path.trim_start_matches('/');
    let dirs: Vec<PathBuf> = if mount.join("cgroup.controllers").exists() {
        vec![mount.join(rel)]
    } else {
        std::fs::read_dir(mount).into_iter().flatten().flatten().map(|e| e.path().join(rel)).collect()
    };
    for dir in dirs {
        if let Err(e) = std::fs::remove_dir(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(cgroup = %dir.display(), error = %e, "pod cgroup not removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PodSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn qos_classes_follow_requests_and_limits() {
        let g = spec("containers: [{name: a, resources: {limits: {cpu: 500m, memory: 64Mi}}}]");
        assert_eq!(qos_class(&g), Qos::Guaranteed, "requests default to limits");
        let g2 = spec(
            "containers: [{name: a, resources: {limits: {cpu: '0.5', memory: 64Mi}, requests: {cpu: 500m, memory: 64Mi}}}]",
        );
        assert_eq!(qos_class(&g2), Qos::Guaranteed);
        let b = spec("containers: [{name: a, resources: {requests: {cpu: 100m}}}, {name: b}]");
        assert_eq!(qos_class(&b), Qos::Burstable);
        let b2 = spec("containers: [{name: a, resources: {limits: {cpu: 1, memory: 1Gi}, requests: {cpu: 100m}}}]");
        assert_eq!(qos_class(&b2), Qos::Burstable);
        assert_eq!(qos_class(&spec("containers: [{name: a}, {name: b}]")), Qos::BestEffort);
        let init =
            spec("initContainers: [{name: i}]\ncontainers: [{name: a, resources: {limits: {cpu: 1, memory: 1Gi}}}]");
        assert_eq!(qos_class(&init), Qos::Burstable, "an init container without limits");
        let zero = spec("containers: [{name: a, resources: {requests: {memory: 0Mi}}}]");
        assert_eq!(qos_class(&zero), Qos::BestEffort, "a zero request asks for nothing");
    }

    #[test]
    fn pod_cgroups_are_named_for_the_driver() {
        let uid = "5f1d1a9e-0000-4000-8000-000000000001";
        assert_eq!(pod_cgroup("/kubepods", Qos::Guaranteed, uid, Driver::Cgroupfs), format!("/kubepods/pod{uid}"));
        assert_eq!(
            pod_cgroup("/kubepods", Qos::Burstable, uid, Driver::Cgroupfs),
            format!("/kubepods/burstable/pod{uid}")
        );
        assert_eq!(
            pod_cgroup("/kubepods", Qos::BestEffort, uid, Driver::Systemd),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f1d1a9e_0000_4000_8000_000000000001.slice"
        );
    }

    #[test]
    fn pod_cgroups_are_found_in_every_class() {
        let mount = tempfile::tempdir().unwrap();
        for dir in ["memory/kubepods/podA", "memory/kubepods/burstable/podB", "memory/kubepods/besteffort/podC"] {
            std::fs::create_dir_all(mount.path().join(dir)).unwrap();
        }
        std::fs::create_dir_all(mount.path().join("memory/kubepods/burstable/other")).unwrap();
        let mut found = pod_cgroups(mount.path(), "/kubepods");
        found.sort();
        assert_eq!(
            found,
            [
                ("A".to_string(), "/kubepods/podA".to_string()),
                ("B".to_string(), "/kubepods/burstable/podB".to_string()),
                ("C".to_string(), "/kubepods/besteffort/podC".to_string()),
            ]
        );
    }

    #[test]
    fn pod_limits_sum_the_containers() {
        let s = spec(
            "containers: [{name: a, resources: {limits: {cpu: 500m, memory: 64Mi}}}, {name: b, resources: {limits: {cpu: 250m, memory: 32Mi}, requests: {cpu: 100m, memory: 16Mi}}}]",
        );
        let l = pod_limits(&s);
        assert_eq!(l, PodLimits { cpu_shares: 614, cpu_quota: Some(75_000), memory: Some(96 << 20) });
        let open = spec(
            "containers: [{name: a, resources: {limits: {memory: 64Mi}}}, {name: b, resources: {requests: {cpu: 1}}}]",
        );
        assert_eq!(pod_limits(&open), PodLimits { cpu_shares: 1024, cpu_quota: None, memory: None });
        assert_eq!(pod_limits(&spec("containers: [{name: a}]")).cpu_shares, 2);
        let init = spec(
            "initContainers: [{name: big, resources: {limits: {cpu: 2, memory: 256Mi}}}, {name: side, restartPolicy: Always, resources: {limits: {cpu: 100m, memory: 16Mi}}}]
containers: [{name: a, resources: {limits: {cpu: 500m, memory: 64Mi}}}]",
        );
        let l = pod_limits(&init);
        assert_eq!(
            (l.cpu_quota, l.memory),
            (Some(200_000), Some(256 << 20)),
            "the biggest init container sets the bar"
        );
        let small_init = spec(
            "initContainers: [{name: i, resources: {limits: {cpu: 100m, memory: 8Mi}}}, {name: side, restartPolicy: Always, resources: {limits: {cpu: 100m, memory: 16Mi}}}]
containers: [{name: a, resources: {limits: {cpu: 500m, memory: 64Mi}}}]",
        );
        assert_eq!(pod_limits(&small_init).memory, Some(80 << 20), "apps and sidecars together");
        let unlimited_init = spec(
            "initContainers: [{name: i}]\ncontainers: [{name: a, resources: {limits: {cpu: 500m, memory: 64Mi}}}]",
        );
        assert_eq!(pod_limits(&unlimited_init).memory, None, "an init container without a limit");
        assert_eq!(
            pod_limits(&spec("containers: [{name: a, resources: {limits: {cpu: 1m}}}]")).cpu_quota,
            Some(1000),
            "the kernel's least quota"
        );
    }
}
