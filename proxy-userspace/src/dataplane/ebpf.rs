//! The eBPF dataplane: loads the embedded programs, attaches them on ingress
//! of the pod interfaces and keeps the service maps equal to the model.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc},
};
use proxy_common::{
    counters::{self, Counter},
    maps::{
        self as abi, Backend, BackendKey, FlowKey, ForwardEntry, ReverseEntry, ServiceKey, ServiceValue, Traffic,
        reply_key,
    },
};

use super::{ApplyError, Dataplane};
use crate::{
    model::{Endpoint, Frontend, FrontendKey, Protocol},
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
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")
}

fn service_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey::new(k.vip.octets(), k.port, k.protocol.number())
}

fn backend(e: &Endpoint) -> Backend {
    Backend::new(e.ip.octets(), e.port)
}

/// What is programmed for one frontend.
struct Programmed {
    id: u32,
    backends: u32,
}

pub struct EbpfDataplane {
    // Owns the program and its links: dropping it detaches from every interface.
    _ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    ct_forward: HashMap<MapData, FlowKey, ForwardEntry>,
    ct_reverse: HashMap<MapData, FlowKey, ReverseEntry>,
    counters: PerCpuArray<MapData, u64>,
    traffic: PerCpuArray<MapData, Traffic>,
    /// Service id -> (service port name, frontend), for the traffic metrics.
    names: Arc<Mutex<BTreeMap<u32, (String, String)>>>,
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

impl EbpfDataplane {
    /// Loads the programs and attaches them on ingress of each interface.
    pub fn attach(interfaces: &[String], sizes: MapSizes) -> anyhow::Result<Self> {
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
        let services = take(&mut ebpf, abi::SERVICES)?;
        let backends = take(&mut ebpf, abi::BACKENDS)?;
        let ct_forward = take(&mut ebpf, abi::CT_FORWARD)?;
        let ct_reverse = take(&mut ebpf, abi::CT_REVERSE)?;
        let counters = PerCpuArray::try_from(ebpf.take_map(abi::COUNTERS).context("counter map missing")?)?;
        let traffic = PerCpuArray::try_from(ebpf.take_map(abi::SERVICE_TRAFFIC).context("traffic map missing")?)?;
        Ok(Self {
            _ebpf: ebpf,
            services,
            backends,
            ct_forward,
            ct_reverse,
            counters,
            traffic,
            names: Arc::default(),
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
        let new_count = f.backends.len() as u32;
        let (id, old_count, is_new) = match self.programmed.get(&f.key) {
            Some(p) => (p.id, p.backends, false),
            None => {
                if self.programmed.len() as u64 + self.vip_users.len() as u64 + 1 > self.sizes.services as u64 {
                    return Err(format!("service map is full ({} entries): raise --max-services", self.sizes.services));
                }
                (self.free_ids.last().copied().unwrap_or(self.next_id), 0, true)
            }
        };
        let used_after = self.backend_slots_used - old_count as u64 + new_count as u64;
        if used_after > self.sizes.backends as u64 {
            return Err(format!(
                "{new_count} endpoints do not fit in the backend map ({} of {} slots used): raise --max-backends",
                self.backend_slots_used, self.sizes.backends
            ));
        }
        // Fill the slots before publishing the count, and shrink after: a
        // packet reading any count at any time finds a valid backend.
        for (slot, e) in f.backends.iter().enumerate() {
            self.backends
                .insert(BackendKey { service_id: id, slot: slot as u32 }, backend(e), 0)
                .map_err(|e| format!("writing backend slot {slot}: {e}"))?;
        }
        self.services
            .insert(key, ServiceValue { id, backend_count: new_count }, 0)
            .map_err(|e| format!("writing the service entry: {e}"))?;
        for slot in new_count..old_count {
            remove_ok(&mut self.backends, &BackendKey { service_id: id, slot })?;
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
        self.programmed.insert(f.key, Programmed { id, backends: new_count });
        self.names.lock().unwrap().insert(id, (f.service.to_string(), f.key.to_string()));
        if f.key.protocol == Protocol::Udp {
            let keep: HashSet<Backend> = f.backends.iter().map(backend).collect();
            self.flush_udp_flows(id, &keep);
        }
        Ok(())
    }

    fn delete(&mut self, k: &FrontendKey) -> Result<(), String> {
        let Some(p) = self.programmed.remove(k) else { return Ok(()) };
        remove_ok(&mut self.services, &service_key(k))?;
        for slot in 0..p.backends {
            remove_ok(&mut self.backends, &BackendKey { service_id: p.id, slot })?;
        }
        self.backend_slots_used -= p.backends as u64;
        self.free_ids.push(p.id);
        self.names.lock().unwrap().remove(&p.id);
        // The id may be reused: its next owner starts from zero.
        if let Ok(zero) = aya::util::nr_cpus().map(|n| vec![Traffic::default(); n]) {
            let _ = aya::maps::PerCpuValues::try_from(zero).map(|v| self.traffic.set(p.id, v, 0));
        }
        self.remove_vip_user(k.vip)?;
        if k.protocol == Protocol::Udp {
            self.flush_udp_flows(p.id, &HashSet::new());
        }
        Ok(())
    }

    fn add_vip_user(&mut self, vip: std::net::Ipv4Addr) -> Result<(), String> {
        let users = self.vip_users.entry(vip).or_insert(0);
        *users += 1;
        if *users == 1 {
            let marker = ServiceValue { id: 0, backend_count: 0 };
            self.services
                .insert(ServiceKey::vip_marker(vip.octets()), marker, 0)
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
    /// a removed endpoint are forgotten and the next datagram chooses again
    /// (kube-proxy clears conntrack for the same reason). TCP flows keep
    /// their backend until they end, as with kube-proxy.
    fn flush_udp_flows(&mut self, service_id: u32, keep: &HashSet<Backend>) {
        let stale: Vec<(FlowKey, Backend)> = self
            .ct_forward
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.service_id == service_id && !keep.contains(&v.backend))
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

fn read_counters(map: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, u64)> {
    let out: Vec<_> =
        Counter::ALL.iter().filter_map(|c| Some((c.name(), map.get(&(*c as u32), 0).ok()?.iter().sum()))).collect();
    debug_assert!(out.len() <= counters::COUNT as usize);
    out
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

    fn take_over(&mut self, _interfaces: &[String]) {
        if let Err(e) = super::cleanup::remove_iptables() {
            tracing::error!(error = %format!("{e:#}"), "could not remove iptables rules left by iptables mode");
        }
    }

    fn traffic_reader(&self) -> Option<crate::api::TrafficReader> {
        let id = aya::maps::IterableMap::map(&self.traffic).info().ok()?.id();
        let map =
            PerCpuArray::<MapData, Traffic>::try_from(aya::maps::Map::PerCpuArray(MapData::from_id(id).ok()?)).ok()?;
        let names = self.names.clone();
        Some(Arc::new(move || {
            let names = names.lock().unwrap().clone();
            names
                .into_iter()
                .filter_map(|(id, (service, frontend))| {
                    let per_cpu = map.get(&id, 0).ok()?;
                    let (packets, bytes) = per_cpu.iter().fold((0, 0), |(p, b), t| (p + t.packets, b + t.bytes));
                    Some(crate::api::ServiceTraffic { service, frontend, packets, bytes })
                })
                .collect()
        }))
    }

    fn counter_reader(&self) -> Option<crate::api::CounterReader> {
        // A second handle on the same map, for the metrics server's task.
        let id = aya::maps::IterableMap::map(&self.counters).info().ok()?.id();
        let map =
            PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(MapData::from_id(id).ok()?)).ok()?;
        Some(Arc::new(move || read_counters(&map)))
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
