//! The eBPF dataplane: loads the embedded programs, attaches them on ingress
//! of the pod interfaces and keeps the service maps equal to the model.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError},
    programs::{SchedClassifier, TcAttachType, tc},
};
use proxy_common::maps::{
    self as abi, Backend, BackendKey, BackendTrafficKey, FlowKey, ForwardEntry, ReverseEntry, ServiceKey, ServiceValue,
    Traffic, kind, reply_key,
};

use super::{ApplyError, Dataplane};
use crate::{
    inspect::{self, Maps},
    model::{Frontend, FrontendKey, Protocol, ServiceType},
    planner::Op,
};

/// The compiled programs, built by build.rs with aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The classifier attached to every pod interface.
pub const PROGRAM: &str = "kpr_from_pod";

/// Map capacities, settable at load time.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub flows: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: abi::DEFAULT_SERVICES_MAX,
            backends: abi::DEFAULT_BACKENDS_MAX,
            flows: abi::DEFAULT_CONNTRACK_MAX,
        }
    }
}

/// Loads the object with `sizes` applied, without attaching anything.
pub fn load(sizes: MapSizes) -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .map_max_entries(abi::SERVICES, sizes.services)
        .map_max_entries(abi::BACKENDS, sizes.backends)
        .map_max_entries(abi::CT_FORWARD, sizes.flows)
        .map_max_entries(abi::CT_REVERSE, sizes.flows)
        .map_max_entries(abi::SERVICE_TRAFFIC, sizes.services)
        .map_max_entries(abi::BACKEND_TRAFFIC, sizes.backends)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")
}

fn service_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey::new(k.vip.octets(), k.port, k.protocol.number())
}

/// The backend slots of a frontend: ready endpoints first (the ones new
/// flows choose from), then terminating ones (listed, never chosen).
fn slots(f: &Frontend) -> Vec<Backend> {
    let active = f.backends.iter().map(|e| Backend::new(e.ip.octets(), e.port));
    active.chain(f.terminating.iter().map(|e| Backend::terminating(e.ip.octets(), e.port))).collect()
}

fn service_kind(t: ServiceType) -> u8 {
    match t {
        ServiceType::ClusterIP => kind::CLUSTER_IP,
        ServiceType::NodePort => kind::NODE_PORT,
        ServiceType::LoadBalancer => kind::LOAD_BALANCER,
    }
}

/// What is programmed for one frontend.
struct Programmed {
    id: u32,
    slots: Vec<Backend>,
}

pub struct EbpfDataplane {
    // Owns the program and its links: dropping it detaches from every interface.
    _ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    ct_forward: HashMap<MapData, FlowKey, ForwardEntry>,
    ct_reverse: HashMap<MapData, FlowKey, ReverseEntry>,
    service_traffic: Array<MapData, Traffic>,
    backend_traffic: HashMap<MapData, BackendTrafficKey, Traffic>,
    /// The same maps through other handles, for observers (metrics, dashboard).
    observed: Arc<Maps>,
    programmed: BTreeMap<FrontendKey, Programmed>,
    /// Frontends per VIP, to keep the VIP marker entry while any remain.
    vip_users: BTreeMap<std::net::Ipv4Addr, u32>,
    free_ids: Vec<u32>,
    next_id: u32,
    sizes: MapSizes,
    backend_slots_used: u64,
}

fn take<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<HashMap<MapData, K, V>> {
    let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
    HashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The magic number of a bpf filesystem in `statfs`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Pins every map under `bpf_root`, replacing a previous run's pins (they
/// name maps no program uses any more). Pins outlive the agent, so the
/// inspection commands work while it is down.
fn pin_maps(ebpf: &mut Ebpf, bpf_root: &Path) -> anyhow::Result<PathBuf> {
    if !is_bpffs(bpf_root) {
        bail!("{root} is not a bpf filesystem (mount one: mount -t bpf bpf {root})", root = bpf_root.display());
    }
    let dir = inspect::pin_dir(bpf_root);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing old pins in {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in abi::ALL_MAPS {
        let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
        map.pin(dir.join(name)).with_context(|| format!("pinning {name} in {}", dir.display()))?;
    }
    Ok(dir)
}

impl EbpfDataplane {
    /// Loads the programs, pins the maps under `bpf_root` and attaches on
    /// ingress of each interface.
    pub fn attach(interfaces: &[String], sizes: MapSizes, bpf_root: &Path) -> anyhow::Result<Self> {
        if interfaces.is_empty() {
            bail!("no interfaces given: pass the node-side pod interfaces with --interfaces");
        }
        let mut ebpf = load(sizes)?;
        let program: &mut SchedClassifier =
            ebpf.program_mut(PROGRAM).context("program missing from the eBPF object")?.try_into()?;
        program.load().context("the kernel verifier rejected the datapath program")?;
        for iface in interfaces {
            // Kernels before 6.6 attach through a clsact qdisc; it may exist already.
            if let Err(e) = tc::qdisc_add_clsact(iface) {
                tracing::debug!(%iface, error = %e, "clsact qdisc not added (exists, or TCX is used)");
            }
            program.attach(iface, TcAttachType::Ingress).with_context(|| {
                format!("attaching to interface {iface:?} (does it exist in this network namespace?)")
            })?;
            tracing::info!(%iface, "datapath attached on ingress");
        }
        match pin_maps(&mut ebpf, bpf_root) {
            Ok(dir) => tracing::info!(dir = %dir.display(), "maps pinned"),
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "maps not pinned: kpr service list, conntrack list and stats will not see them"
            ),
        }
        let ids: std::collections::HashMap<&str, u32> =
            abi::ALL_MAPS.iter().filter_map(|name| Some((*name, map_id(ebpf.map(name)?)?))).collect();
        let observed = Arc::new(Maps::open(|name| {
            let id = ids.get(name).with_context(|| format!("map {name} missing from the eBPF object"))?;
            MapData::from_id(*id).with_context(|| format!("opening map {name} by id"))
        })?);
        let services = take(&mut ebpf, abi::SERVICES)?;
        let backends = take(&mut ebpf, abi::BACKENDS)?;
        let ct_forward = take(&mut ebpf, abi::CT_FORWARD)?;
        let ct_reverse = take(&mut ebpf, abi::CT_REVERSE)?;
        let service_traffic = Array::try_from(ebpf.take_map(abi::SERVICE_TRAFFIC).context("traffic map missing")?)?;
        let backend_traffic = take(&mut ebpf, abi::BACKEND_TRAFFIC)?;
        Ok(Self {
            _ebpf: ebpf,
            services,
            backends,
            ct_forward,
            ct_reverse,
            service_traffic,
            backend_traffic,
            observed,
            programmed: BTreeMap::new(),
            vip_users: BTreeMap::new(),
            free_ids: Vec::new(),
            next_id: 1,
            sizes,
            backend_slots_used: 0,
        })
    }

    fn upsert(&mut self, f: &Frontend) -> Result<(), String> {
        let key = service_key(&f.key);
        let new = slots(f);
        let (id, old, is_new) = match self.programmed.remove(&f.key) {
            Some(p) => (p.id, p.slots, false),
            None => {
                if self.programmed.len() as u64 + self.vip_users.len() as u64 + 1 > self.sizes.services as u64 {
                    return Err(format!("service map is full ({} entries): raise --max-services", self.sizes.services));
                }
                (self.free_ids.last().copied().unwrap_or(self.next_id), Vec::new(), true)
            }
        };
        let result = self.write(f, key, id, &old, &new, is_new);
        // On failure the model reverts this frontend and retries it; until
        // then it counts as what it was before.
        match (&result, is_new) {
            (Ok(()), _) => drop(self.programmed.insert(f.key, Programmed { id, slots: new })),
            (Err(_), false) => drop(self.programmed.insert(f.key, Programmed { id, slots: old })),
            (Err(_), true) => {}
        }
        result
    }

    fn write(
        &mut self,
        f: &Frontend,
        key: ServiceKey,
        id: u32,
        old: &[Backend],
        new: &[Backend],
        is_new: bool,
    ) -> Result<(), String> {
        let used_after = self.backend_slots_used - old.len() as u64 + new.len() as u64;
        if used_after > self.sizes.backends as u64 {
            return Err(format!(
                "{} endpoints do not fit in the backend map ({} of {} slots used): raise --max-backends",
                new.len(),
                self.backend_slots_used,
                self.sizes.backends
            ));
        }
        // Fill the slots before publishing the count, and shrink after: a
        // packet reading any count at any time finds a valid backend.
        for (slot, b) in new.iter().enumerate() {
            self.backends
                .insert(BackendKey { service_id: id, slot: slot as u32 }, b, 0)
                .map_err(|e| format!("writing backend slot {slot}: {e}"))?;
        }
        let value = ServiceValue {
            id,
            backend_count: f.backends.len() as u32,
            terminating_count: f.terminating.len() as u32,
            kind: service_kind(f.service_type),
            _pad: [0; 3],
        };
        self.services.insert(key, value, 0).map_err(|e| format!("writing the service entry: {e}"))?;
        for slot in new.len()..old.len() {
            remove_ok(&mut self.backends, &BackendKey { service_id: id, slot: slot as u32 })?;
        }
        if is_new {
            if self.free_ids.last() == Some(&id) {
                self.free_ids.pop();
            } else {
                self.next_id += 1;
            }
            self.add_vip_user(f.key.vip)?;
        }
        self.backend_slots_used = used_after;
        let gone: Vec<Backend> = old.iter().filter(|o| !new.iter().any(|n| same_endpoint(n, o))).copied().collect();
        self.forget_backend_traffic(id, &gone);
        if f.key.protocol == Protocol::Udp {
            let keep: HashSet<([u8; 4], [u8; 2])> = new[..f.backends.len()].iter().map(|b| (b.addr, b.port)).collect();
            self.flush_udp_flows(id, &keep);
        }
        Ok(())
    }

    fn delete(&mut self, k: &FrontendKey) -> Result<(), String> {
        let Some(p) = self.programmed.remove(k) else { return Ok(()) };
        remove_ok(&mut self.services, &service_key(k))?;
        for slot in 0..p.slots.len() {
            remove_ok(&mut self.backends, &BackendKey { service_id: p.id, slot: slot as u32 })?;
        }
        self.backend_slots_used -= p.slots.len() as u64;
        self.free_ids.push(p.id);
        // The id may be reused: its next owner starts from zero.
        if let Err(e) = self.service_traffic.set(p.id, Traffic::default(), 0) {
            tracing::warn!(id = p.id, error = %e, "traffic not reset: the frontend id's next owner inherits it");
        }
        self.forget_backend_traffic(p.id, &p.slots);
        self.remove_vip_user(k.vip)?;
        if k.protocol == Protocol::Udp {
            self.flush_udp_flows(p.id, &HashSet::new());
        }
        Ok(())
    }

    /// Drops the traffic counts of backends a frontend no longer has.
    fn forget_backend_traffic(&mut self, service_id: u32, gone: &[Backend]) {
        for b in gone {
            let _ = self.backend_traffic.remove(&BackendTrafficKey::new(service_id, b.addr, b.port));
        }
    }

    fn add_vip_user(&mut self, vip: std::net::Ipv4Addr) -> Result<(), String> {
        let users = self.vip_users.entry(vip).or_insert(0);
        *users += 1;
        if *users == 1 {
            self.services
                .insert(ServiceKey::vip_marker(vip.octets()), ServiceValue::MARKER, 0)
                .map_err(|e| format!("writing the VIP marker: {e}"))?;
        }
        Ok(())
    }

    fn remove_vip_user(&mut self, vip: std::net::Ipv4Addr) -> Result<(), String> {
        let Some(users) = self.vip_users.get_mut(&vip) else { return Ok(()) };
        *users -= 1;
        if *users == 0 {
            self.vip_users.remove(&vip);
            remove_ok(&mut self.services, &ServiceKey::vip_marker(vip.octets()))?;
        }
        Ok(())
    }

    /// UDP has no connection end the client would notice, so flows pinned to
    /// an endpoint no longer ready are forgotten and the next datagram
    /// chooses again (kube-proxy clears conntrack for the same reason). TCP
    /// flows keep their backend until they end, as with kube-proxy.
    fn flush_udp_flows(&mut self, service_id: u32, keep: &HashSet<([u8; 4], [u8; 2])>) {
        let stale: Vec<(FlowKey, Backend)> = self
            .ct_forward
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.service_id == service_id && !keep.contains(&(v.backend.addr, v.backend.port)))
            .map(|(k, v)| (k, v.backend))
            .collect();
        for (flow, be) in &stale {
            let _ = self.ct_forward.remove(flow);
            let _ = self.ct_reverse.remove(&reply_key(flow, be));
        }
        if !stale.is_empty() {
            tracing::debug!(service_id, flows = stale.len(), "forgot UDP flows to removed endpoints");
        }
    }
}

fn map_id(map: &Map) -> Option<u32> {
    match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) | Map::PerCpuArray(d) | Map::PerCpuLruHashMap(d) => {
            Some(d.info().ok()?.id())
        }
        _ => None,
    }
}

fn same_endpoint(a: &Backend, b: &Backend) -> bool {
    a.addr == b.addr && a.port == b.port
}

/// Removes `key`; an entry that is already gone is not an error.
fn remove_ok<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, key: &K) -> Result<(), String> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(format!("removing a map entry: {e}")),
    }
}

impl Dataplane for EbpfDataplane {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn take_over(&mut self, _interfaces: &[String], _bpf_root: &Path) {
        if let Err(e) = super::cleanup::remove_iptables() {
            tracing::error!(error = %format!("{e:#}"), "could not remove iptables rules left by iptables mode");
        }
    }

    fn maps(&self) -> Option<Arc<Maps>> {
        Some(self.observed.clone())
    }

    fn apply(&mut self, ops: &[Op]) -> Vec<ApplyError> {
        let mut errors = Vec::new();
        for op in ops {
            let (frontend, result) = match op {
                Op::Upsert(f) => (f.key, self.upsert(f)),
                Op::Delete(k) => (*k, self.delete(k)),
            };
            if let Err(reason) = result {
                errors.push(ApplyError { frontend, reason });
            }
        }
        errors
    }
}
