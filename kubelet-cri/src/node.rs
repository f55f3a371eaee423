//! The node as the cluster sees it: the Node object this kubelet registers
//! (addresses, capacity, labels, taints, conditions, what runs it) and the
//! Lease in `kube-node-lease` it renews, as the kubelet does, so the node
//! controller keeps the node Ready and leaves its pods where they are.
//!
//! Its own task, apart from the pods' loop: an API server that is away
//! delays only this, and a runtime that stops answering turns the node's
//! Ready condition false (with the runtime's words) within one renewal.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    },
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};

use crate::cri::Cri;

/// Where node leases live.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The kubelet's default `--max-pods`.
pub const MAX_PODS: u32 = 110;
/// The kubelet's default hard eviction threshold `memory.available<100Mi`:
/// kept out of allocatable memory, and the MemoryPressure line.
const MEMORY_RESERVE: u64 = 100 << 20;
/// `nodefs.available<10%`, the same for disk.
const DISK_RESERVE_PERCENT: u64 = 10;
/// The longest a runtime may take to say it is ready.
const RUNTIME_DEADLINE: Duration = Duration::from_secs(10);
/// How often the status is written when nothing in it changed (the
/// kubelet's `nodeStatusReportFrequency`); a change is written at once.
const STATUS_REPORT_EVERY: Duration = Duration::from_secs(300);

/// What the node registers as, from the command line.
#[derive(Clone, Debug)]
pub struct Registration {
    pub name: String,
    /// `--node-labels`, beside the well-known ones.
    pub labels: BTreeMap<String, String>,
    /// `--register-with-taints`.
    pub taints: Vec<Taint>,
    /// `--node-ip`; without it, the address of the default route's source.
    pub address: Option<IpAddr>,
    /// `--node-lease-duration-seconds`; renewed every quarter of it.
    pub lease_duration: Duration,
    /// Where pods' data lives: its filesystem is the node's ephemeral storage.
    pub root_dir: PathBuf,
}

/// `--node-labels`: `key=value` pairs; keys and values as Kubernetes accepts them.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or_else(|| format!("label {s:?}: expected key=value"))?;
    valid_key(key).map_err(|e| format!("label key {key:?}: {e}"))?;
    valid_value(value).map_err(|e| format!("label value {value:?}: {e}"))?;
    Ok((key.to_string(), value.to_string()))
}

/// `--register-with-taints`: `key=value:Effect` or `key:Effect`.
pub fn parse_taint(s: &str) -> Result<Taint, String> {
    let (rest, effect) = s.rsplit_once(':').ok_or_else(|| format!("taint {s:?}: expected key[=value]:Effect"))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!("taint {s:?}: effect {effect:?} is not NoSchedule, PreferNoSchedule or NoExecute"));
    }
    let (key, value) = match rest.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (rest, None),
    };
    valid_key(key).map_err(|e| format!("taint key {key:?}: {e}"))?;
    if let Some(v) = value {
        valid_value(v).map_err(|e| format!("taint value {v:?}: {e}"))?;
    }
    Ok(Taint { key: key.to_string(), value: value.map(str::to_string), effect: effect.to_string(), time_added: None })
}

/// A qualified name: an optional DNS subdomain prefix and `/`, then a name
/// of up to 63 characters.
fn valid_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if p.is_empty() || p.len() > 253 || !p.split('.').all(label_ok) {
            return Err("the prefix must be a DNS subdomain".into());
        }
    }
    if name.is_empty() {
        return Err("the name part must not be empty".into());
    }
    valid_value(name)
}

/// A label value: up to 63 alphanumerics, `-`, `_` or `.`, starting and
/// ending with an alphanumeric (or empty).
fn valid_value(v: &str) -> Result<(), String> {
    let edge = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    if v.len() > 63
        || !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || !edge(v.chars().next())
        || !edge(v.chars().last())
    {
        return Err(
            "must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into()
        );
    }
    Ok(())
}

/// What the machine has and is, read once at start (the kubelet's
/// cadvisor machine info), and its pressures, read at every report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    pub cpus: u32,
    pub memory: u64,
    pub storage: u64,
    pub boot_id: String,
    pub machine_id: String,
    pub system_uuid: String,
    pub kernel: String,
    pub os_image: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// A `/proc/meminfo` line's value in bytes.
fn meminfo(text: &str, field: &str) -> Option<u64> {
    let kib: u64 = text.lines().find_map(|l| l.strip_prefix(field))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Total and available bytes of the filesystem holding `path`.
fn filesystem(path: &std::path::Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct it is given.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0)
        .then(|| (s.f_blocks as u64 * s.f_frsize as u64, s.f_bavail as u64 * s.f_frsize as u64))
}

impl Machine {
    pub fn read(root_dir: &std::path::Path) -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count() as u32;
        let os_release = read("/etc/os-release");
        let os_image = os_release
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "Linux".into());
        Self {
            cpus: cpus.max(1),
            memory: meminfo(&read("/proc/meminfo"), "MemTotal:").unwrap_or(0),
            storage: filesystem(root_dir).map_or(0, |(total, _)| total),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            machine_id: read("/etc/machine-id"),
            system_uuid: read("/sys/class/dmi/id/product_uuid"),
            kernel: read("/proc/sys/kernel/osrelease"),
            os_image,
        }
    }

    fn capacity(&self) -> BTreeMap<String, Quantity> {
        BTreeMap::from([
            ("cpu".into(), Quantity(self.cpus.to_string())),
            ("memory".into(), Quantity(format!("{}Ki", self.memory / 1024))),
            ("ephemeral-storage".into(), Quantity(format!("{}Ki", self.storage / 1024))),
            ("pods".into(), Quantity(MAX_PODS.to_string())),
        ])
    }

    /// Capacity less the eviction thresholds, as the kubelet reports it
    /// with no reservations asked for.
    fn allocatable(&self) -> BTreeMap<String, Quantity> {
        let storage = self.storage / 100 * (100 - DISK_RESERVE_PERCENT);
        BTreeMap::from([
            ("cpu".into(), Quantity(self.cpus.to_string())),
            ("memory".into(), Quantity(format!("{}Ki", self.memory.saturating_sub(MEMORY_RESERVE) / 1024))),
            ("ephemeral-storage".into(), Quantity(format!("{}Ki", storage / 1024))),
            ("pods".into(), Quantity(MAX_PODS.to_string())),
        ])
    }
}

/// The machine's pressures now, as the kubelet's eviction manager sees them
/// at its default thresholds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
    pub pids: bool,
}

impl Pressure {
    fn now(root_dir: &std::path::Path) -> Self {
        let memory = meminfo(&read("/proc/meminfo"), "MemAvailable:").is_some_and(|a| a < MEMORY_RESERVE);
        let disk = filesystem(root_dir).is_some_and(|(total, avail)| avail < total / 100 * DISK_RESERVE_PERCENT);
        // `/proc/loadavg`'s fourth field: running/total tasks.
        let loadavg = read("/proc/loadavg");
        let tasks: Option<u64> =
            loadavg.split_whitespace().nth(3).and_then(|f| f.split('/').nth(1)).and_then(|t| t.parse().ok());
        let pid_max: Option<u64> = read("/proc/sys/kernel/pid_max").parse().ok();
        let pids = matches!((tasks, pid_max), (Some(t), Some(m)) if t > m / 100 * 90);
        Self { memory, disk, pids }
    }
}

/// Whether the runtime can run pods, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeHealth {
    /// Ready, with its name and version (`containerd://1.6.20`).
    Ready(String),
    NotReady(String),
}

async fn runtime_health(cri: &mut Cri) -> RuntimeHealth {
    match tokio::time::timeout(RUNTIME_DEADLINE, cri.check()).await {
        Ok(Ok(info)) => RuntimeHealth::Ready(format!("{}://{}", info.name, info.version)),
        Ok(Err(e)) => RuntimeHealth::NotReady(format!("container runtime is down or not ready: {e}")),
        Err(_) => RuntimeHealth::NotReady(format!("container runtime did not answer within {RUNTIME_DEADLINE:?}")),
    }
}

fn condition(type_: &str, status: bool, reason: &str, message: &str, now: &Time) -> NodeCondition {
    NodeCondition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    }
}

/// The node's four conditions at `now`; each keeps its last transition
/// time from `previous` while its status stays.
pub fn conditions(
    health: &RuntimeHealth,
    pressure: Pressure,
    previous: &[NodeCondition],
    now: Time,
) -> Vec<NodeCondition> {
    let mut list = vec![
        if pressure.memory {
            condition(
                "MemoryPressure",
                true,
                "KubeletHasInsufficientMemory",
                "kubelet has insufficient memory available",
                &now,
            )
        } else {
            condition(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
                &now,
            )
        },
        if pressure.disk {
            condition("DiskPressure", true, "KubeletHasDiskPressure", "kubelet has disk pressure", &now)
        } else {
            condition("DiskPressure", false, "KubeletHasNoDiskPressure", "kubelet has no disk pressure", &now)
        },
        if pressure.pids {
            condition("PIDPressure", true, "KubeletHasInsufficientPID", "kubelet has insufficient PID available", &now)
        } else {
            condition("PIDPressure", false, "KubeletHasSufficientPID", "kubelet has sufficient PID available", &now)
        },
        match health {
            RuntimeHealth::Ready(_) => {
                condition("Ready", true, "KubeletReady", "kubelet is posting ready status", &now)
            }
            RuntimeHealth::NotReady(why) => condition("Ready", false, "KubeletNotReady", why, &now),
        },
    ];
    for c in &mut list {
        if let Some(p) = previous.iter().find(|p| p.type_ == c.type_ && p.status == c.status) {
            c.last_transition_time.clone_from(&p.last_transition_time);
        }
    }
    list
}

/// The well-known labels the kubelet sets, then `--node-labels`.
fn labels(reg: &Registration) -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), reg.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch.to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("beta.kubernetes.io/arch".to_string(), arch.to_string()),
    ]);
    labels.extend(reg.labels.clone());
    labels
}

/// The source address of the default route: where other nodes reach this
/// one when `--node-ip` does not say (no packet is sent to find it).
pub fn default_address() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // TEST-NET-3: only the route to it is looked up.
    socket.connect("203.0.113.1:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_unspecified())
}

fn node_address(reg: &Registration) -> Option<IpAddr> {
    reg.address.or_else(default_address)
}

/// The status written for the node: addresses, capacity, conditions, and
/// what runs it.
pub fn status(
    reg: &Registration,
    machine: &Machine,
    health: &RuntimeHealth,
    conditions: Vec<NodeCondition>,
) -> NodeStatus {
    let mut addresses = Vec::new();
    if let Some(ip) = node_address(reg) {
        addresses.push(NodeAddress { type_: "InternalIP".into(), address: ip.to_string() });
    }
    addresses.push(NodeAddress { type_: "Hostname".into(), address: reg.name.clone() });
    let runtime = match health {
        RuntimeHealth::Ready(v) => v.clone(),
        RuntimeHealth::NotReady(_) => String::new(),
    };
    NodeStatus {
        addresses: Some(addresses),
        capacity: Some(machine.capacity()),
        allocatable: Some(machine.allocatable()),
        conditions: Some(conditions),
        node_info: Some(NodeSystemInfo {
            architecture: labels(reg)["kubernetes.io/arch"].clone(),
            boot_id: machine.boot_id.clone(),
            container_runtime_version: runtime,
            kernel_version: machine.kernel.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: concat!("v", env!("CARGO_PKG_VERSION"), "-kpr").into(),
            machine_id: machine.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: machine.os_image.clone(),
            system_uuid: machine.system_uuid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn now() -> Timestamp {
    Timestamp::now()
}

/// Registers the node and keeps it and its lease fresh until the process
/// ends. `cri` is a connection of its own: a hung pod call never delays
/// the heartbeat.
pub fn spawn(client: kube::Client, reg: Registration, mut cri: Cri) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let machine = Machine::read(&reg.root_dir);
        let nodes: Api<Node> = Api::all(client.clone());
        let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
        let mut heart = Heart { reg, machine, nodes, leases, uid: None, written: None, failing: false };
        let renew = heart.reg.lease_duration / 4;
        // Beats at a steady rate however long one takes; a missed one is not made up.
        let mut beats = tokio::time::interval(renew);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            beats.tick().await;
            let health = runtime_health(&mut cri).await;
            // No call may outlast the beat: the next one tries again.
            match tokio::time::timeout(renew, heart.beat(&health)).await {
                Ok(Ok(())) if heart.failing => {
                    tracing::info!("node status and lease written again");
                    heart.failing = false;
                }
                Ok(Ok(())) => {}
                Ok(Err(e)) if !heart.failing => {
                    tracing::warn!(error = %e, "cannot register the node, write its status or renew its lease; retrying");
                    heart.failing = true;
                }
                Err(_) if !heart.failing => {
                    tracing::warn!("the API server did not answer within {renew:?}; retrying");
                    heart.failing = true;
                }
                _ => {}
            }
        }
    })
}

/// The node's state as the heartbeat keeps it.
struct Heart {
    reg: Registration,
    machine: Machine,
    nodes: Api<Node>,
    leases: Api<Lease>,
    /// The registered Node's uid (the lease's owner).
    uid: Option<String>,
    /// The status last written, and when.
    written: Option<(NodeStatus, std::time::Instant)>,
    failing: bool,
}

impl Heart {
    /// Registers if needed, then renews the lease and writes the status:
    /// each on its own, so a status the API server refuses never stops the
    /// heartbeat that keeps the node alive.
    async fn beat(&mut self, health: &RuntimeHealth) -> Result<(), kube::Error> {
        let uid = match &self.uid {
            Some(uid) => uid.clone(),
            None => self.register().await?,
        };
        let renewed = self.renew(&uid).await;
        let reported = self.report(health).await;
        renewed.and(reported)
    }

    /// Creates the Node, or takes over the one of this name (labels merged,
    /// taints left as the cluster set them, as the kubelet does).
    async fn register(&mut self) -> Result<String, kube::Error> {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(self.reg.name.clone()),
                labels: Some(labels(&self.reg)),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: (!self.reg.taints.is_empty()).then(|| self.reg.taints.clone()),
                ..Default::default()
            }),
            status: None,
        };
        let registered = match self.nodes.create(&PostParams::default(), &node).await {
            Ok(n) => {
                tracing::info!(node = %self.reg.name, "node registered");
                n
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let patch = serde_json::json!({"metadata": {"labels": labels(&self.reg)}});
                let n = self.nodes.patch(&self.reg.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                tracing::info!(node = %self.reg.name, "node already registered: taken over");
                n
            }
            Err(e) => return Err(e),
        };
        let uid = registered.metadata.uid.unwrap_or_default();
        self.uid = Some(uid.clone());
        Ok(uid)
    }

    /// Writes the node's status when it changed (heartbeat times aside) or
    /// every [`STATUS_REPORT_EVERY`].
    async fn report(&mut self, health: &RuntimeHealth) -> Result<(), kube::Error> {
        let previous = self.written.as_ref().and_then(|(s, _)| s.conditions.clone()).unwrap_or_default();
        let pressure = Pressure::now(&self.reg.root_dir);
        let conditions = conditions(health, pressure, &previous, Time(now()));
        let status = status(&self.reg, &self.machine, health, conditions);
        let unchanged = self
            .written
            .as_ref()
            .is_some_and(|(old, at)| at.elapsed() < STATUS_REPORT_EVERY && same_but_heartbeats(old, &status));
        if unchanged {
            return Ok(());
        }
        // A strategic merge patch merges conditions by type: those others
        // write (NetworkUnavailable, a problem detector's) stay.
        let patch = serde_json::json!({ "status": status });
        self.nodes.patch_status(&self.reg.name, &PatchParams::default(), &Patch::Strategic(&patch)).await?;
        if let Some(ready) = status.conditions.iter().flatten().find(|c| c.type_ == "Ready") {
            let was = previous.iter().find(|c| c.type_ == "Ready").map(|c| c.status.as_str());
            if was != Some(ready.status.as_str()) {
                tracing::info!(node = %self.reg.name, ready = %ready.status, reason = ?ready.message, "node status");
            }
        }
        self.written = Some((status, std::time::Instant::now()));
        Ok(())
    }

    /// Renews the node's lease, creating it (owned by the Node) if missing.
    async fn renew(&mut self, uid: &str) -> Result<(), kube::Error> {
        let renew_time = MicroTime(now());
        let patch = serde_json::json!({"spec": {"renewTime": renew_time, "holderIdentity": self.reg.name}});
        match self.leases.patch(&self.reg.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.reg.name.clone()),
                        namespace: Some(LEASE_NAMESPACE.into()),
                        owner_references: Some(vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: self.reg.name.clone(),
                            uid: uid.to_string(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.reg.name.clone()),
                        lease_duration_seconds: Some(self.reg.lease_duration.as_secs().max(1) as i32),
                        renew_time: Some(renew_time),
                        ..Default::default()
                    }),
                };
                self.leases.create(&PostParams::default(), &lease).await.map(drop)
            }
            Err(e) => Err(e),
        }
    }
}

/// Whether two statuses differ only in their conditions' heartbeat times.
fn same_but_heartbeats(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        s
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn labels_and_taints_are_parsed_as_the_kubelet_takes_them() {
        assert_eq!(
            parse_label("topology.kubernetes.io/zone=a").unwrap(),
            ("topology.kubernetes.io/zone".into(), "a".into())
        );
        assert_eq!(parse_label("empty=").unwrap().1, "");
        assert!(parse_label("novalue").unwrap_err().contains("key=value"));
        assert!(parse_label("Bad_Prefix/x=y").unwrap_err().contains("DNS subdomain"));
        assert!(parse_label("k=-edge").is_err());
        let t = parse_taint("dedicated=web:NoSchedule").unwrap();
        assert_eq!((t.key.as_str(), t.value.as_deref(), t.effect.as_str()), ("dedicated", Some("web"), "NoSchedule"));
        assert_eq!(parse_taint("gpu:NoExecute").unwrap().value, None);
        assert!(parse_taint("gpu:Never").unwrap_err().contains("effect"));
        assert!(parse_taint("gpu").is_err());
    }

    #[test]
    fn ready_follows_the_runtime_and_transition_times_only_move_on_a_change() {
        let ready = RuntimeHealth::Ready("containerd://1.6.20".into());
        let first = conditions(&ready, Pressure::default(), &[], at(100));
        assert_eq!(
            first.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(),
            ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
        );
        assert!(first.iter().all(|c| c.last_transition_time == Some(at(100))));
        assert_eq!(first[3].status, "True");

        let later = conditions(&ready, Pressure::default(), &first, at(110));
        assert!(
            later.iter().all(|c| c.last_transition_time == Some(at(100)) && c.last_heartbeat_time == Some(at(110)))
        );

        let down = RuntimeHealth::NotReady("container runtime is down or not ready: connection refused".into());
        let not_ready = conditions(&down, Pressure { memory: true, ..Default::default() }, &later, at(120));
        assert_eq!((not_ready[3].status.as_str(), not_ready[3].reason.as_deref()), ("False", Some("KubeletNotReady")));
        assert!(not_ready[3].message.as_deref().unwrap().contains("connection refused"));
        assert_eq!(not_ready[3].last_transition_time, Some(at(120)));
        assert_eq!((not_ready[0].status.as_str(), not_ready[0].last_transition_time.clone()), ("True", Some(at(120))));
        assert_eq!(not_ready[1].last_transition_time, Some(at(100)), "disk pressure did not change");
    }

    #[test]
    fn allocatable_keeps_the_eviction_thresholds_out() {
        let m = Machine { cpus: 4, memory: 8 << 30, storage: 100 << 30, ..Default::default() };
        let (cap, alloc) = (m.capacity(), m.allocatable());
        assert_eq!(cap["memory"].0, "8388608Ki");
        assert_eq!(alloc["memory"].0, format!("{}Ki", (8u64 << 20) - (100 << 10)));
        assert_eq!(alloc["ephemeral-storage"].0, format!("{}Ki", (100u64 << 30) / 100 * 90 / 1024));
        assert_eq!((cap["cpu"].0.as_str(), cap["pods"].0.as_str()), ("4", "110"));
    }

    #[test]
    fn a_status_differing_only_in_heartbeats_is_not_rewritten() {
        let reg = Registration {
            name: "n".into(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            address: Some("192.0.2.7".parse().unwrap()),
            lease_duration: Duration::from_secs(40),
            root_dir: "/".into(),
        };
        let ready = RuntimeHealth::Ready("containerd://1.6.20".into());
        let m = Machine::default();
        let a = status(&reg, &m, &ready, conditions(&ready, Pressure::default(), &[], at(1)));
        let prev = a.conditions.clone().unwrap();
        let b = status(&reg, &m, &ready, conditions(&ready, Pressure::default(), &prev, at(2)));
        assert!(same_but_heartbeats(&a, &b));
        let down = RuntimeHealth::NotReady("gone".into());
        let c = status(&reg, &m, &down, conditions(&down, Pressure::default(), &prev, at(3)));
        assert!(!same_but_heartbeats(&a, &c));
        let addrs = a.addresses.unwrap();
        assert_eq!((addrs[0].type_.as_str(), addrs[0].address.as_str()), ("InternalIP", "192.0.2.7"));
        assert_eq!(a.node_info.unwrap().container_runtime_version, "containerd://1.6.20");
    }
}
