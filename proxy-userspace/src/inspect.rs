//! Reading the datapath's maps. The agent pins them under `--bpf-root`, so
//! `kpr service list`, `kpr conntrack list`, `kpr stats` and `kpr status`
//! read the kernel's own state directly, agent running or not; the agent's
//! metrics and dashboard read the same maps through the same code.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap};
use proxy_common::{
    conntrack::{
        CtEntry, CtEntry6, DIR_SERVICE, FlowKey, FlowKey6, Lifetimes, STATE_CLOSING, STATE_HOST, STATE_REPLIED,
        lifetime,
    },
    counters::Counter,
    ipv6::In6,
    maps::{
        self as abi, BACKEND_TERMINATING, Backend, Backend6, BackendKey, BackendTrafficKey, BackendTrafficKey6,
        DeviceCounts, DeviceKey, FragmentKey, FragmentPorts, PROTO_TCP, ReverseEntry, ReverseEntry6, ServiceKey,
        ServiceKey6, ServiceValue, SockKey, SockKey6, SourceRangeKey, Traffic, flags, hook, kind,
    },
};
use serde::{Deserialize, Serialize};

use crate::frontend::{Family, FrontendKey, Protocol};

/// Where bpffs is mounted on a node.
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf";

/// kpr's own folder under the bpf root: everything it pins (`kpr cleanup` removes it).
pub fn pin_dir(bpf_root: &Path) -> PathBuf {
    bpf_root.join("kpr")
}

/// Where the maps of this layout ([`proxy_common::maps::LAYOUT`]) are pinned.
pub fn maps_dir(bpf_root: &Path) -> PathBuf {
    pin_dir(bpf_root).join(format!("maps-v{}", proxy_common::maps::LAYOUT))
}

/// A programmed frontend as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// `VIP:port/PROTOCOL`.
    pub frontend: String,
    #[serde(rename = "type")]
    pub service_type: String,
    pub id: u32,
    /// External frontends: `Cluster` or `Local` (`externalTrafficPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Load balancer IPs with `loadBalancerSourceRanges`: the clients let in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    pub backends: Vec<BackendEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendEntry {
    /// `IP:port`.
    pub address: String,
    /// `active` (chosen for new flows) or `terminating` (kept for flows it has).
    pub state: String,
}

/// A translated flow and the backend it is pinned to: a client flow the
/// per-packet path tracks, or a socket the socket hooks gave a backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEntry {
    /// `packet` (per-packet conntrack), `socket` (socket-level) or `host`
    /// (a flow the node's conntrack translates: begun under the rules eBPF
    /// mode took over from, its packets pass untranslated).
    pub path: String,
    pub protocol: String,
    /// The client's address (per-packet) or `socket COOKIE`.
    pub client: String,
    pub frontend: String,
    pub backend: String,
    pub service_id: u32,
    /// Whether the reply direction is tracked too.
    pub reply_tracked: bool,
    /// Per-packet flows: `syn_sent`, `established` or `closing` (TCP),
    /// `unreplied` or `replied` (UDP). Sockets: `connected`.
    pub state: String,
    /// Per-packet flows: seconds since a packet last matched, and seconds
    /// left before the entry expires without another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u32>,
}

/// How full one map is. Arrays are always full and are not listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub max_entries: u64,
    pub ratio: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Traffic> for Counts {
    fn from(t: Traffic) -> Self {
        Self { packets: t.packets, bytes: t.bytes }
    }
}

/// Traffic to and from one frontend, and through each of its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(bound(serialize = "A: Family"))]
pub struct FrontendTraffic<A = Ipv4Addr> {
    #[serde(serialize_with = "as_text")]
    pub frontend: FrontendKey<A>,
    #[serde(flatten)]
    pub total: Counts,
    pub backends: BTreeMap<String, Counts>,
}

fn as_text<A: Family, S: serde::Serializer>(k: &FrontendKey<A>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(k)
}

/// Packets one hook acted on, on one interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookCounts {
    pub translated: u64,
    pub reverse_translated: u64,
    /// Sent on by the program itself (XDP_TX / XDP_REDIRECT).
    pub forwarded: u64,
    pub dropped: u64,
}

impl HookCounts {
    fn add(&mut self, c: &DeviceCounts) {
        self.translated += c.translated;
        self.reverse_translated += c.reverse_translated;
        self.forwarded += c.forwarded;
        self.dropped += c.dropped;
    }
}

/// One interface the datapath is on: which path takes traffic from outside
/// there (devices only), and what each hook did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// The interface's name in the agent's network namespace, or `ifindex N`
    /// once it is gone.
    pub device: String,
    pub ifindex: u32,
    /// For the node's devices: `xdp_native`, `xdp_generic` or `tc` (XDP off
    /// or refused). None for pod interfaces.
    pub path: Option<String>,
    /// By hook: `xdp_native`, `xdp_generic`, `tc_ingress`, `tc_egress`.
    pub hooks: BTreeMap<String, HookCounts>,
}

/// The name of interface `ifindex` in this network namespace.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if name.is_null() {
        return None;
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// How [`DeviceStats::path`] names an entry of the devices map.
pub fn path_name(path: u8) -> &'static str {
    match path {
        hook::XDP_NATIVE | hook::XDP_GENERIC => hook::name(path),
        _ => "tc",
    }
}

/// What `kpr stats` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    /// Packets by what the datapath did with them.
    pub datapath: BTreeMap<String, u64>,
    pub devices: Vec<DeviceStats>,
    pub services: Vec<FrontendTraffic>,
    /// IPv6 frontends' traffic, where the datapath serves IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services6: Vec<FrontendTraffic<Ipv6Addr>>,
    pub maps: Vec<MapFill>,
}

/// Handles on every datapath map.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    ct_tcp: HashMap<MapData, FlowKey, CtEntry>,
    ct_any: HashMap<MapData, FlowKey, CtEntry>,
    sock_reverse: HashMap<MapData, SockKey, ReverseEntry>,
    fragments: HashMap<MapData, FragmentKey, FragmentPorts>,
    /// Per-CPU: summed when read.
    counters: PerCpuArray<MapData, u64>,
    /// Shared by all CPUs (atomic adds): read as they are.
    service_traffic: Array<MapData, Traffic>,
    backend_traffic: HashMap<MapData, BackendTrafficKey, Traffic>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    /// The node's devices: ifindex -> path (see [`path_name`]).
    devices: HashMap<MapData, u32, u8>,
    /// Per-CPU: summed when read.
    device_counts: PerCpuHashMap<MapData, DeviceKey, DeviceCounts>,
    /// The interfaces' own slots and their per-CPU rows (absent in an
    /// older agent's pins): added to what `device_counts` holds.
    device_slots: Option<(Array<MapData, u32>, PerCpuArray<MapData, DeviceCounts>)>,
    nat_forward: HashMap<MapData, FlowKey, abi::NatAddress>,
    /// The lifetimes the datapath judges flows by, as the agent set them
    /// (the defaults in an older agent's pins, which have none).
    lifetimes: Lifetimes,
    /// The socket hooks' IPv6 maps (absent in an older agent's pins).
    ipv6: Option<Ipv6Maps>,
}

/// The IPv6 frontends, backends, connected sockets and per-packet flows.
struct Ipv6Maps {
    services: HashMap<MapData, ServiceKey6, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend6>,
    sock_reverse: HashMap<MapData, SockKey6, ReverseEntry6>,
    ct_tcp: HashMap<MapData, FlowKey6, CtEntry6>,
    ct_any: HashMap<MapData, FlowKey6, CtEntry6>,
    nat_forward: HashMap<MapData, FlowKey6, abi::NatAddress6>,
    service_traffic: HashMap<MapData, u32, Traffic>,
    backend_traffic: HashMap<MapData, BackendTrafficKey6, Traffic>,
}

/// Why the maps could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "no pinned kpr maps in {dir}: kpr has not run in eBPF mode with --bpf-root {root} \
         (or runs in iptables mode; `kpr status` tells)"
    )]
    NotPinned { dir: PathBuf, root: PathBuf },
    #[error("opening map {map}: {reason}")]
    Open { map: String, reason: String },
    #[error("map {map} has an unexpected type: {source}")]
    WrongType {
        map: String,
        #[source]
        source: aya::maps::MapError,
    },
}

fn wrong_type(map: &str) -> impl FnOnce(aya::maps::MapError) -> InspectError {
    move |source| InspectError::WrongType { map: map.to_string(), source }
}

fn hash<K: aya::Pod, V: aya::Pod>(map: Map, name: &str) -> Result<HashMap<MapData, K, V>, InspectError> {
    HashMap::try_from(map).map_err(wrong_type(name))
}

impl Maps {
    /// Opens the maps the agent pinned under `bpf_root`.
    pub fn open_pinned(bpf_root: &Path) -> Result<Self, InspectError> {
        let dir = maps_dir(bpf_root);
        if !dir.join(abi::SERVICES).exists() {
            return Err(InspectError::NotPinned { dir, root: bpf_root.to_path_buf() });
        }
        Self::open(|name| {
            let path = dir.join(name);
            MapData::from_pin(&path)
                .map_err(|e| InspectError::Open { map: path.display().to_string(), reason: e.to_string() })
        })
    }

    /// Opens each map through `open(name)`.
    pub fn open(open: impl Fn(&str) -> Result<MapData, InspectError>) -> Result<Self, InspectError> {
        let get =
            |name: &str| -> Result<Map, InspectError> { Map::from_map_data(open(name)?).map_err(wrong_type(name)) };
        Ok(Self {
            services: hash(get(abi::SERVICES)?, abi::SERVICES)?,
            backends: hash(get(abi::BACKENDS)?, abi::BACKENDS)?,
            ct_tcp: hash(get(abi::CT_TCP)?, abi::CT_TCP)?,
            ct_any: hash(get(abi::CT_ANY)?, abi::CT_ANY)?,
            sock_reverse: hash(get(abi::SOCK_REVERSE)?, abi::SOCK_REVERSE)?,
            fragments: hash(get(abi::FRAGMENTS)?, abi::FRAGMENTS)?,
            counters: PerCpuArray::try_from(get(abi::COUNTERS)?).map_err(wrong_type(abi::COUNTERS))?,
            service_traffic: Array::try_from(get(abi::SERVICE_TRAFFIC)?).map_err(wrong_type(abi::SERVICE_TRAFFIC))?,
            backend_traffic: hash(get(abi::BACKEND_TRAFFIC)?, abi::BACKEND_TRAFFIC)?,
            source_ranges: LpmTrie::try_from(get(abi::SOURCE_RANGES)?).map_err(wrong_type(abi::SOURCE_RANGES))?,
            devices: hash(get(abi::DEVICES)?, abi::DEVICES)?,
            device_counts: PerCpuHashMap::try_from(get(abi::DEVICE_COUNTS)?).map_err(wrong_type(abi::DEVICE_COUNTS))?,
            device_slots: (|| {
                Some((
                    Array::try_from(get(abi::DEVICE_OWNERS).ok()?).ok()?,
                    PerCpuArray::try_from(get(abi::DEVICE_SLOTS).ok()?).ok()?,
                ))
            })(),
            nat_forward: hash(get(abi::NAT_FORWARD)?, abi::NAT_FORWARD)?,
            lifetimes: get(abi::CT_LIFETIMES)
                .ok()
                .and_then(|map| Array::<_, Lifetimes>::try_from(map).ok()?.get(&0, 0).ok())
                .map_or(Lifetimes::DEFAULT, Lifetimes::or_default),
            ipv6: (|| {
                Ok::<_, InspectError>(Ipv6Maps {
                    services: hash(get(abi::SERVICES6)?, abi::SERVICES6)?,
                    backends: hash(get(abi::BACKENDS6)?, abi::BACKENDS6)?,
                    sock_reverse: hash(get(abi::SOCK_REVERSE6)?, abi::SOCK_REVERSE6)?,
                    ct_tcp: hash(get(abi::CT6_TCP)?, abi::CT6_TCP)?,
                    ct_any: hash(get(abi::CT6_ANY)?, abi::CT6_ANY)?,
                    nat_forward: hash(get(abi::NAT_FORWARD6)?, abi::NAT_FORWARD6)?,
                    service_traffic: hash(get(abi::SERVICE_TRAFFIC6)?, abi::SERVICE_TRAFFIC6)?,
                    backend_traffic: hash(get(abi::BACKEND_TRAFFIC6)?, abi::BACKEND_TRAFFIC6)?,
                })
            })()
            .ok(),
        })
    }

    /// Every interface the datapath is on or has counted, by ifindex.
    pub fn devices(&self) -> Vec<DeviceStats> {
        fn at(by_index: &mut BTreeMap<u32, DeviceStats>, ifindex: u32) -> &mut DeviceStats {
            by_index.entry(ifindex).or_insert_with(|| DeviceStats {
                device: interface_name(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}")),
                ifindex,
                path: None,
                hooks: BTreeMap::new(),
            })
        }
        let mut by_index = BTreeMap::new();
        for (ifindex, path) in self.devices.iter().filter_map(Result::ok) {
            at(&mut by_index, ifindex).path = Some(path_name(path).to_string());
        }
        // XDP is named by the mode the agent attached it in.
        let mut record = |key: DeviceKey, per_cpu: &[DeviceCounts]| {
            let device = at(&mut by_index, key.ifindex);
            let name = match (key.hook, device.path.as_deref()) {
                (hook::XDP, Some(path)) if path.starts_with("xdp") => path.to_string(),
                (other, _) => hook::name(other).to_string(),
            };
            let sum = device.hooks.entry(name).or_default();
            per_cpu.iter().for_each(|c| sum.add(c));
        };
        for (key, per_cpu) in self.device_counts.iter().filter_map(Result::ok) {
            record(key, &per_cpu);
        }
        if let Some((owners, rows)) = &self.device_slots {
            for slot in 0..abi::DEVICE_SLOTS_MAX {
                let Some(ifindex) = owners.get(&slot, 0).ok().filter(|i| *i != 0) else { continue };
                for hook in abi::DEVICE_SLOT_HOOKS {
                    let Some(per_cpu) = abi::device_row(slot, hook).and_then(|row| rows.get(&row, 0).ok()) else {
                        continue;
                    };
                    // A hook that has done nothing shows no more than one never run.
                    if per_cpu.iter().any(|c| *c != DeviceCounts::default()) {
                        record(DeviceKey::new(ifindex, hook), &per_cpu);
                    }
                }
            }
        }
        by_index.into_values().collect()
    }

    /// Every frontend (VIP markers left out), external ones included.
    fn all_frontends(&self) -> Vec<(FrontendKey, ServiceValue)> {
        self.services.iter().filter_map(Result::ok).filter_map(|(k, v)| Some((frontend_key(&k)?, v))).collect()
    }

    /// ClusterIP frontends by service id (external ones share their id).
    fn frontends(&self) -> BTreeMap<u32, (FrontendKey, ServiceValue)> {
        self.all_frontends()
            .into_iter()
            .filter(|(_, v)| !kind::is_external(v.kind))
            .map(|(k, v)| (v.id, (k, v)))
            .collect()
    }

    /// The source ranges written for frontend `id`.
    fn source_ranges_of(&self, id: u32) -> Vec<String> {
        let mut ranges: Vec<String> = self
            .source_ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().id == id.to_be_bytes())
            .map(|k| format!("{}/{}", Ipv4Addr::from(k.data().addr), k.prefix_len() - 32))
            .collect();
        ranges.sort();
        ranges
    }

    /// Every programmed frontend with its backends, sorted by frontend.
    pub fn services(&self) -> Vec<ServiceEntry> {
        let mut out: Vec<(FrontendKey, ServiceEntry)> = self
            .all_frontends()
            .into_iter()
            .map(|(key, v)| {
                let slots = v.backend_count + v.terminating_count;
                let backends = (0..slots)
                    .filter_map(|slot| self.backends.get(&BackendKey { set: v.backend_set, slot }, 0).ok())
                    .map(|b| BackendEntry {
                        address: endpoint(b.addr, b.port).to_string(),
                        state: if b.state == BACKEND_TERMINATING { "terminating" } else { "active" }.into(),
                    })
                    .collect();
                let external = kind::is_external(v.kind);
                let local = v.flags & flags::MASQUERADE == 0;
                let entry = ServiceEntry {
                    frontend: key.to_string(),
                    service_type: kind_name(v.kind).into(),
                    id: v.id,
                    policy: external.then(|| if local { "Local" } else { "Cluster" }.to_string()),
                    source_ranges: if v.flags & flags::SOURCE_RANGES != 0 {
                        self.source_ranges_of(v.id)
                    } else {
                        Vec::new()
                    },
                    backends,
                };
                (key, entry)
            })
            .collect();
        out.sort_by_key(|(k, _)| *k);
        let mut entries: Vec<ServiceEntry> = out.into_iter().map(|(_, e)| e).collect();
        entries.extend(self.ipv6_services());
        entries
    }

    /// The socket hooks' IPv6 frontends (TCP ClusterIPs), sorted, after the IPv4 ones.
    fn ipv6_services(&self) -> Vec<ServiceEntry> {
        let Some(v6) = &self.ipv6 else { return Vec::new() };
        let mut out: Vec<(ServiceKey6, ServiceEntry)> = v6
            .services
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| !k.is_vip_marker())
            .map(|(k, v)| {
                let backends = (0..v.backend_count)
                    .filter_map(|slot| v6.backends.get(&BackendKey { set: v.backend_set, slot }, 0).ok())
                    .map(|b| BackendEntry { address: endpoint6(b.addr.0, b.port).to_string(), state: "active".into() })
                    .collect();
                let frontend = format!("{}/{}", endpoint6(k.addr.0, k.port), protocol_name(k.proto));
                let local = v.flags & flags::MASQUERADE == 0;
                let entry = ServiceEntry {
                    frontend,
                    service_type: kind_name(v.kind).into(),
                    id: v.id,
                    policy: kind::is_external(v.kind).then(|| if local { "Local" } else { "Cluster" }.to_string()),
                    source_ranges: Vec::new(),
                    backends,
                };
                (k, entry)
            })
            .collect();
        out.sort_by_key(|(k, _)| *k);
        out.into_iter().map(|(_, e)| e).collect()
    }

    /// Every tracked client flow, sorted.
    pub fn flows(&self) -> Vec<FlowEntry> {
        let now = crate::clock::monotonic_seconds();
        let show4 = |a, p| endpoint(a, p).to_string();
        let mut out: Vec<FlowEntry> = [&self.ct_tcp, &self.ct_any]
            .into_iter()
            .flat_map(|table| packet_flows(table, now, &self.lifetimes, show4))
            .collect();
        let show6 = |a: In6, p| endpoint6(a.0, p).to_string();
        if let Some(v6) = &self.ipv6 {
            out.extend(
                [&v6.ct_tcp, &v6.ct_any].into_iter().flat_map(|table| packet_flows(table, now, &self.lifetimes, show6)),
            );
        }
        // Sockets: the reverse entry is what the hooks keep (their replies
        // need no tracking: the socket addresses the backend itself).
        out.extend(self.sock_reverse.iter().filter_map(Result::ok).map(|(k, v)| {
            socket_flow(k.proto, k.cookie, endpoint(v.vip, v.vip_port), endpoint(k.addr, k.port), v.service_id)
        }));
        let sockets6 = self.ipv6.iter().flat_map(|v6| v6.sock_reverse.iter().filter_map(Result::ok));
        out.extend(sockets6.map(|(k, v)| {
            socket_flow(k.proto, k.cookie, endpoint6(v.vip, v.vip_port), endpoint6(k.addr, k.port), v.service_id)
        }));
        out.sort_by(|a, b| (&a.frontend, &a.client, &a.protocol).cmp(&(&b.frontend, &b.client, &b.protocol)));
        out
    }

    /// The datapath's counters by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .filter_map(|c| Some((c.name(), self.counters.get(&(*c as u32), 0).ok()?.iter().sum())))
            .collect()
    }

    /// Traffic per frontend and per backend, sorted by frontend.
    pub fn traffic(&self) -> Vec<FrontendTraffic> {
        let frontends = self.frontends();
        let mut by_id: BTreeMap<u32, FrontendTraffic> = frontends
            .iter()
            .map(|(id, (key, _))| {
                let total = self.service_traffic.get(id, 0).map(Counts::from).unwrap_or_default();
                (*id, FrontendTraffic { frontend: *key, total, backends: BTreeMap::new() })
            })
            .collect();
        for (k, v) in self.backend_traffic.iter().filter_map(Result::ok) {
            if let Some(t) = by_id.get_mut(&k.service_id) {
                t.backends.insert(endpoint(k.addr, k.port).to_string(), Counts::from(v));
            }
        }
        let mut out: Vec<_> = by_id.into_values().collect();
        out.sort_by_key(|t| t.frontend);
        out
    }

    /// [`Maps::traffic`] for IPv6 frontends (none where the maps have no IPv6).
    pub fn traffic6(&self) -> Vec<FrontendTraffic<Ipv6Addr>> {
        let Some(v6) = &self.ipv6 else { return Vec::new() };
        let mut by_id: BTreeMap<u32, FrontendTraffic<Ipv6Addr>> = v6
            .services
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| !kind::is_external(v.kind))
            .filter_map(|(k, v)| Some((v.id, frontend_key6(&k)?)))
            .map(|(id, frontend)| {
                let total = v6.service_traffic.get(&id, 0).map(Counts::from).unwrap_or_default();
                (id, FrontendTraffic { frontend, total, backends: BTreeMap::new() })
            })
            .collect();
        for (k, v) in v6.backend_traffic.iter().filter_map(Result::ok) {
            if let Some(t) = by_id.get_mut(&k.service_id) {
                t.backends.insert(endpoint6(k.addr.0, k.port).to_string(), Counts::from(v));
            }
        }
        let mut out: Vec<_> = by_id.into_values().collect();
        out.sort_by_key(|t| t.frontend);
        out
    }

    /// Entries in each hash map against its capacity.
    pub fn fill(&self) -> Vec<MapFill> {
        fn fill<K: aya::Pod, V: aya::Pod>(name: &str, m: &HashMap<MapData, K, V>) -> Option<MapFill> {
            let max = aya::maps::IterableMap::map(m).info().ok()?.max_entries() as u64;
            Some(MapFill::new(name, m.keys().filter(Result::is_ok).count() as u64, max))
        }
        [
            fill(abi::SERVICES, &self.services),
            fill(abi::BACKENDS, &self.backends),
            fill(abi::CT_TCP, &self.ct_tcp),
            fill(abi::CT_ANY, &self.ct_any),
            self.ipv6.as_ref().and_then(|v6| fill(abi::CT6_TCP, &v6.ct_tcp)),
            self.ipv6.as_ref().and_then(|v6| fill(abi::CT6_ANY, &v6.ct_any)),
            fill(abi::NAT_FORWARD, &self.nat_forward),
            self.ipv6.as_ref().and_then(|v6| fill(abi::NAT_FORWARD6, &v6.nat_forward)),
            fill(abi::FRAGMENTS, &self.fragments),
            fill(abi::BACKEND_TRAFFIC, &self.backend_traffic),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            datapath: self.counters().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            devices: self.devices(),
            services: self.traffic(),
            services6: self.traffic6(),
            maps: self.fill(),
        }
    }
}

impl MapFill {
    fn new(map: &str, entries: u64, max_entries: u64) -> Self {
        let ratio = if max_entries == 0 { 0.0 } else { entries as f64 / max_entries as f64 };
        Self { map: map.to_string(), entries, max_entries, ratio }
    }
}

/// A tracked flow's state, named as netfilter names its states.
fn flow_state(proto: u8, state: u8) -> &'static str {
    match (proto == PROTO_TCP, state & STATE_CLOSING != 0, state & STATE_REPLIED != 0) {
        (true, true, _) => "closing",
        (true, false, true) => "established",
        (true, false, false) => "syn_sent",
        (false, _, true) => "replied",
        (false, _, false) => "unreplied",
    }
}

/// The per-packet path's flows in `table`, each address and port shown by
/// `show`, expiring under `lifetimes`.
fn packet_flows<'a, A: Copy + 'a>(
    table: &'a HashMap<MapData, FlowKey<A>, CtEntry<A>>,
    now: u32,
    lifetimes: &'a Lifetimes,
    show: impl Fn(A, [u8; 2]) -> String + 'a,
) -> impl Iterator<Item = FlowEntry> + 'a
where
    FlowKey<A>: aya::Pod,
    CtEntry<A>: aya::Pod,
{
    table.iter().filter_map(Result::ok).filter(|(k, _)| k.dir == DIR_SERVICE).map(move |(k, v)| {
        let idle = now.saturating_sub(v.last_seen);
        FlowEntry {
            path: if v.state & STATE_HOST != 0 { "host" } else { "packet" }.into(),
            protocol: protocol_name(k.proto).into(),
            client: show(k.src_addr, k.src_port),
            frontend: show(k.dst_addr, k.dst_port),
            backend: show(v.addr, v.port),
            service_id: v.service_id,
            reply_tracked: table.get(&k.reply(v.addr, v.port), 0).is_ok(),
            state: flow_state(k.proto, v.state).into(),
            idle_seconds: Some(idle),
            expires_in: Some(lifetime(k.proto, v.state, lifetimes).saturating_sub(idle)),
        }
    })
}

/// A socket the hooks connected to `backend` for `frontend`.
fn socket_flow(
    proto: u8,
    cookie: u64,
    frontend: impl std::fmt::Display,
    backend: impl std::fmt::Display,
    service_id: u32,
) -> FlowEntry {
    FlowEntry {
        path: "socket".into(),
        protocol: protocol_name(proto).into(),
        client: format!("socket {cookie}"),
        frontend: frontend.to_string(),
        backend: backend.to_string(),
        service_id,
        reply_tracked: true,
        state: "connected".into(),
        idle_seconds: None,
        expires_in: None,
    }
}

fn endpoint(addr: [u8; 4], port: [u8; 2]) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr), u16::from_be_bytes(port))
}

fn endpoint6(addr: [u8; 16], port: [u8; 2]) -> SocketAddrV6 {
    SocketAddrV6::new(Ipv6Addr::from(addr), u16::from_be_bytes(port), 0, 0)
}

/// The frontend a service-map key names; `None` for a VIP marker.
pub fn frontend_key(k: &ServiceKey) -> Option<FrontendKey> {
    let protocol = match k.proto {
        abi::PROTO_TCP => Protocol::Tcp,
        abi::PROTO_UDP => Protocol::Udp,
        abi::PROTO_SCTP => Protocol::Sctp,
        _ => return None,
    };
    Some(FrontendKey { vip: Ipv4Addr::from(k.addr), port: k.port(), protocol })
}

/// [`frontend_key`] for the IPv6 service map: `None` for a VIP marker.
fn frontend_key6(k: &ServiceKey6) -> Option<FrontendKey<Ipv6Addr>> {
    let protocol = match k.proto {
        abi::PROTO_TCP => Protocol::Tcp,
        abi::PROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some(FrontendKey { vip: Ipv6Addr::from(k.addr), port: u16::from_be_bytes(k.port), protocol })
}

fn protocol_name(proto: u8) -> &'static str {
    match proto {
        abi::PROTO_TCP => "TCP",
        abi::PROTO_UDP => "UDP",
        abi::PROTO_SCTP => "SCTP",
        _ => "other",
    }
}

fn kind_name(k: u8) -> &'static str {
    match k {
        kind::NODE_PORT => "NodePort",
        kind::LOAD_BALANCER => "LoadBalancer",
        kind::NODE_PORT_ADDRESS => "node-port",
        kind::LOAD_BALANCER_IP => "load-balancer-ip",
        kind::EXTERNAL_IP => "external-ip",
        _ => "ClusterIP",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_read_back_as_frontends() {
        let k = ServiceKey::new([10, 96, 0, 10], 53, abi::PROTO_UDP);
        assert_eq!(frontend_key(&k).unwrap().to_string(), "10.96.0.10:53/UDP");
        assert_eq!(frontend_key(&ServiceKey::vip_marker([10, 96, 0, 10])), None, "markers are not frontends");
        assert_eq!(endpoint([10, 244, 0, 2], 8080u16.to_be_bytes()).to_string(), "10.244.0.2:8080");
        assert_eq!(kind_name(kind::LOAD_BALANCER), "LoadBalancer");
        assert_eq!(MapFill::new("X", 1, 4).ratio, 0.25);
    }
}
