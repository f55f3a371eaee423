//! Loading the embedded programs, attaching them, pinning the maps, and
//! taking the map handles the dataplane writes through.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::programs::links::FdLink;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError, SchedClassifier,
        TcAttachType, tc,
    },
};
use proxy_common::{conntrack::Lifetimes, maps as abi};

use super::{
    conntrack_gc::Collector,
    links,
    maps::{AyaMaps, FlowMaps, TrafficMaps},
    marked_table::{MarkedPort, MarkedTable},
    migrate,
    pins::{self, LinkPins, PinnedMaps},
    xdp::{self, XdpMode},
};
use crate::{
    dataplane::{DatapathStats, DataplaneError},
    inspect::{FrontendTraffic, MapFill, Maps},
};

/// The compiled programs, built by build.rs with aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The classifier on ingress of every per-packet interface: requests.
pub const FROM_POD: &str = "kpr_from_pod";
/// The classifier on egress of the same interfaces: replies.
pub const TO_POD: &str = "kpr_to_pod";
/// The per-packet classifiers and the hook each goes on.
pub const PACKET_PROGRAMS: [(&str, TcAttachType); 2] =
    [(FROM_POD, TcAttachType::Ingress), (TO_POD, TcAttachType::Egress)];

/// The links of the per-packet classifiers on one interface, as
/// [`PACKET_PROGRAMS`] lists them: their names in [`LinkPins`].
pub type PacketLinks = [String; 2];

/// The socket hooks attached to the cgroup (socket-level load balancing).
pub const SOCKET_PROGRAMS: [&str; 8] = [
    "kpr_sock_connect4",
    "kpr_sock_sendmsg4",
    "kpr_sock_recvmsg4",
    "kpr_sock_getpeername4",
    "kpr_sock_connect6",
    "kpr_sock_sendmsg6",
    "kpr_sock_recvmsg6",
    "kpr_sock_getpeername6",
];

/// The hook that forgets a closing socket's reverse entry.
pub const SOCKET_RELEASE_PROGRAM: &str = "kpr_sock_release";

/// The cgroup's egress check of source ranges the socket hooks cannot make
/// (they run before the kernel picks a socket's source address).
pub const SOCKET_EGRESS_PROGRAM: &str = "kpr_sock_egress";

/// Where the programs attach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// Interfaces (names or patterns) that get the per-packet classifiers.
    pub interfaces: Vec<String>,
    /// The node's devices, when they are needed only for traffic from
    /// outside: attached once a Service is reached from outside (see
    /// [`super::EbpfDataplane`]), so a node without such Services pays
    /// nothing per packet on them.
    pub devices: Vec<String>,
    /// The cgroup v2 directory whose processes get socket-level load balancing.
    pub cgroup: Option<PathBuf>,
    /// Every one of the node's devices (attached now, in `interfaces`, or
    /// later, from `devices`): the XDP program goes on these.
    pub node_devices: Vec<String>,
    /// `--xdp`.
    pub xdp: super::xdp::XdpMode,
}

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

/// The capacity of every map whose size is set at load time.
fn capacities(sizes: MapSizes) -> [(&'static str, u32); 19] {
    [
        (abi::SERVICES, sizes.services),
        (abi::AFFINITY_TIMEOUTS, sizes.services),
        (abi::AFFINITY, sizes.flows),
        (abi::BACKENDS, sizes.backends),
        // Two entries per TCP flow; half as many other flows.
        (abi::CT_TCP, sizes.flows.saturating_mul(2)),
        (abi::CT_ANY, sizes.flows),
        (abi::SOCK_AFFINITY, sizes.flows),
        (abi::SOCK_REVERSE, sizes.flows),
        (abi::SERVICE_TRAFFIC, sizes.services),
        (abi::BACKEND_TRAFFIC, sizes.backends),
        // The IPv6 family's (allocated as used: the capacity is a limit).
        (abi::SERVICES6, sizes.services),
        (abi::BACKENDS6, sizes.backends),
        (abi::SOCK_REVERSE6, sizes.flows),
        (abi::CT6_TCP, sizes.flows.saturating_mul(2)),
        (abi::CT6_ANY, sizes.flows),
        (abi::SERVICE_TRAFFIC6, (sizes.services / 4).max(1)),
        (abi::BACKEND_TRAFFIC6, (sizes.backends / 4).max(1)),
        // LRU (preallocated): a quarter, as few flows (from outside) are IPv6.
        (abi::NAT_FORWARD6, (sizes.flows / 4).max(1)),
        (abi::NAT_REVERSE6, (sizes.flows / 4).max(1)),
    ]
}

/// The maps pinned (and reused by the next start): every one the
/// inspection commands read, and the sockets' own storage (source-range
/// marks, unconnected IPv6 UDP flows).
fn pinned_maps() -> impl Iterator<Item = &'static str> {
    abi::ALL_MAPS.into_iter().chain(abi::SOCKET_STORAGE)
}

/// The shape of every map the object creates with `sizes` applied, read
/// from the object as the loader reads it.
fn shapes(sizes: MapSizes) -> Result<std::collections::HashMap<String, migrate::Shape>, DataplaneError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| DataplaneError::Load(e.to_string()))?;
    let capacities: std::collections::HashMap<&str, u32> = capacities(sizes).into_iter().collect();
    Ok(object
        .maps
        .iter()
        .map(|(name, map)| {
            let shape = migrate::Shape {
                kind: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: capacities.get(name.as_str()).copied().unwrap_or(map.max_entries()),
                flags: map.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// Loads the object with `sizes` applied, without attaching anything.
pub fn load(sizes: MapSizes) -> Result<Ebpf, DataplaneError> {
    load_pinned(sizes, None)
}

/// [`load`], with the maps pinned in `maps_dir` (those pinned there already are reused).
fn load_pinned(sizes: MapSizes, maps_dir: Option<&Path>) -> Result<Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    for (name, capacity) in capacities(sizes) {
        loader.map_max_entries(name, capacity);
    }
    let paths: Vec<(&str, PathBuf)> =
        maps_dir.map(|d| pinned_maps().map(|n| (n, d.join(n))).collect()).unwrap_or_default();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(EBPF_OBJECT).map_err(|e| DataplaneError::Load(e.to_string()))
}

/// What [`attach`] hands the dataplane.
pub struct Attached {
    /// Owns the program and its links: dropping it detaches from every interface.
    pub ebpf: Ebpf,
    /// The interfaces the classifiers are on, by name, with their index and links.
    pub interfaces: BTreeMap<String, (u32, PacketLinks)>,
    pub maps: AyaMaps,
    /// The same maps through other handles, for observers.
    pub observed: Arc<Maps>,
    /// Removes expired conntrack entries until dropped.
    pub collector: Collector,
    /// The node's devices and XDP on them.
    pub devices: super::xdp::Devices,
    /// Which pod interfaces switch Service traffic on their bridge.
    pub bridge_ports: super::bridge::BridgePorts,
    /// What the hooks did on each interface.
    pub device_counts: super::device_counts::DeviceCounts,
    /// Every link, pinned so it outlives the agent.
    pub pins: LinkPins,
    /// Whether the socket path's egress fence is attached (the previous
    /// run's, adopted).
    pub socket_fence: bool,
    /// Whether the maps are a previous run's, programmed already.
    pub reused: bool,
    /// The previous run's maps, set aside while they are migrated.
    pub previous: Option<PathBuf>,
    /// The socket hooks' IPv6 maps, when the hooks are attached.
    pub ipv6: super::ipv6::Ipv6Maps,
}

/// The magic number of a bpf filesystem in `statfs`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Where the maps are pinned, and what was pinned before (see
/// [`pins::prepare_maps`]). `None` without a bpf filesystem at `bpf_root`.
fn maps_dir(bpf_root: &Path, sizes: MapSizes) -> Option<(PathBuf, PinnedMaps)> {
    if !is_bpffs(bpf_root) {
        tracing::warn!(
            root = %bpf_root.display(),
            "not a bpf filesystem (mount one: mount -t bpf bpf DIR): nothing is pinned, so programs detach when \
             the agent exits and kpr service list, conntrack list and stats do not see the maps"
        );
        return None;
    }
    let found = pins::prepare_maps(bpf_root, &capacities(sizes));
    let dir = crate::inspect::maps_dir(bpf_root);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "maps not pinned");
        return None;
    }
    Some((dir, found))
}

fn missing(name: &str) -> DataplaneError {
    DataplaneError::Load(format!("map {name} missing from the eBPF object"))
}

fn wrong_type(name: &str, e: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Load(format!("map {name} in the eBPF object: {e}"))
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DataplaneError> {
    HashMap::try_from(ebpf.take_map(name).ok_or_else(|| missing(name))?).map_err(|e| wrong_type(name, e))
}

/// The table `table` with the bitmap `ports` of the ports its entries name.
fn marked_table<K: MarkedPort<V>, V: aya::Pod>(
    ebpf: &mut Ebpf,
    table: &'static str,
    ports: &'static str,
) -> Result<MarkedTable<K, V>, DataplaneError> {
    let port_map = ebpf.take_map(ports).ok_or_else(|| missing(ports))?;
    let port_map = Array::try_from(port_map).map_err(|e| wrong_type(ports, e))?;
    MarkedTable::new(take_hash(ebpf, table)?, port_map)
        .map_err(|e| DataplaneError::Load(format!("marking the ports of the entries {table} holds: {e}")))
}

fn map_id(map: &Map) -> Option<u32> {
    match map {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::LpmTrie(d) => Some(d.info().ok()?.id()),
        _ => None,
    }
}

/// Why the kernel refused to load `program`: a verifier rejection names its log.
pub(super) fn load_error(program: &'static str) -> impl Fn(ProgramError) -> DataplaneError {
    move |e| match e {
        ProgramError::LoadError { verifier_log, .. } => {
            DataplaneError::Verifier { program, log: verifier_log.to_string() }
        }
        other => DataplaneError::Load(other.to_string()),
    }
}

/// The program `name` of the object, as type `P`.
pub(super) fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Load(format!("program {name} missing from the eBPF object")))?
        .try_into()
        .map_err(|e: ProgramError| DataplaneError::Load(e.to_string()))
}

/// `e` with the errors beneath it (aya's syscall errors keep the errno there).
pub(super) fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Attaches the socket hooks to `cgroup` beside any other programs there
/// (or adopts the previous run's links there). The egress fence is loaded
/// but attached only when a frontend needs it ([`attach_socket_fence`]),
/// or adopted if the previous run had it: it runs for every packet the
/// cgroup's sockets send. Returns whether the fence is attached.
fn attach_socket_hooks(ebpf: &mut Ebpf, pins: &mut LinkPins, cgroup: &Path) -> Result<bool, DataplaneError> {
    let attach_error = |program, reason: String| DataplaneError::Attach {
        program,
        target: format!("cgroup {}", cgroup.display()),
        reason,
    };
    let dir = std::fs::File::open(cgroup).map_err(|e| attach_error(SOCKET_PROGRAMS[0], e.to_string()))?;
    // All load (the verifier's say) before any attaches: none runs without the others.
    for name in SOCKET_PROGRAMS {
        let hook: &mut CgroupSockAddr = program(ebpf, name)?;
        hook.load().map_err(load_error(name))?;
    }
    let release: &mut CgroupSock = program(ebpf, SOCKET_RELEASE_PROGRAM)?;
    release.load().map_err(load_error(SOCKET_RELEASE_PROGRAM))?;
    let egress: &mut CgroupSkb = program(ebpf, SOCKET_EGRESS_PROGRAM)?;
    egress.load().map_err(load_error(SOCKET_EGRESS_PROGRAM))?;
    // A link (what aya makes on this kernel) takes no attach flags and
    // always runs beside other programs on the cgroup.
    let id = pins::cgroup_id(cgroup).map_err(|e| attach_error(SOCKET_PROGRAMS[0], e.to_string()))?;
    let all = SOCKET_PROGRAMS.into_iter().chain([SOCKET_RELEASE_PROGRAM]);
    let names: Vec<(&'static str, String)> = all.map(|name| (name, cgroup_link(id, name))).collect();
    for (name, pin) in &names {
        let name = *name;
        if pins.adopt(pin, name, |info| info.cgroup_id == id) {
            continue;
        }
        let attached = attach_socket_hook(ebpf, &dir, name)
            .map_err(|e| attach_error(name, with_sources(&e)))
            .and_then(|l| l.map_err(|e| attach_error(name, format!("not a bpf_link, so it cannot be pinned: {e}"))))
            .and_then(|link| pins.keep(pin, link));
        if let Err(e) = attached {
            // None runs without the others.
            for (_, pin) in &names {
                pins.release(pin);
            }
            return Err(e);
        }
    }
    let fenced =
        pins.adopt(&cgroup_link(id, SOCKET_EGRESS_PROGRAM), SOCKET_EGRESS_PROGRAM, |info| info.cgroup_id == id);
    tracing::info!(cgroup = %cgroup.display(), "socket-level load balancing attached");
    Ok(fenced)
}

/// The pin name of the cgroup link of `program` on the cgroup `id`.
fn cgroup_link(id: u64, program: &str) -> String {
    format!("cgroup-{id}-{program}")
}

/// Attaches the socket path's egress fence (loaded by the socket hooks'
/// attach) to `cgroup`: from here on every packet the cgroup's sockets
/// send is checked against the fence its socket may carry.
pub fn attach_socket_fence(ebpf: &mut Ebpf, pins: &mut LinkPins, cgroup: &Path) -> Result<(), DataplaneError> {
    let attach_error = |reason: String| DataplaneError::Attach {
        program: SOCKET_EGRESS_PROGRAM,
        target: format!("cgroup {}", cgroup.display()),
        reason,
    };
    let dir = std::fs::File::open(cgroup).map_err(|e| attach_error(e.to_string()))?;
    let id = pins::cgroup_id(cgroup).map_err(|e| attach_error(e.to_string()))?;
    let link = attach_socket_hook(ebpf, &dir, SOCKET_EGRESS_PROGRAM)
        .map_err(|e| attach_error(with_sources(&e)))?
        .map_err(|e| attach_error(format!("not a bpf_link, so it cannot be pinned: {e}")))?;
    pins.keep(&cgroup_link(id, SOCKET_EGRESS_PROGRAM), link)?;
    tracing::info!(cgroup = %cgroup.display(), "a frontend needs the socket path's egress fence: attached");
    Ok(())
}

/// Attaches the socket hook `name` to the cgroup `dir`; its link, taken from the program.
fn attach_socket_hook(
    ebpf: &mut Ebpf,
    dir: &std::fs::File,
    name: &'static str,
) -> Result<Result<FdLink, aya::programs::links::LinkError>, ProgramError> {
    let program_error = |e: DataplaneError| ProgramError::IOError(std::io::Error::other(e.to_string()));
    Ok(match name {
        SOCKET_RELEASE_PROGRAM => {
            let release: &mut CgroupSock = program(ebpf, name).map_err(program_error)?;
            let link = release.attach(dir, CgroupAttachMode::Single)?;
            FdLink::try_from(release.take_link(link)?)
        }
        SOCKET_EGRESS_PROGRAM => {
            let egress: &mut CgroupSkb = program(ebpf, name).map_err(program_error)?;
            let link = egress.attach(dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)?;
            FdLink::try_from(egress.take_link(link)?)
        }
        _ => {
            let hook: &mut CgroupSockAddr = program(ebpf, name).map_err(program_error)?;
            let link = hook.attach(dir, CgroupAttachMode::Single)?;
            FdLink::try_from(hook.take_link(link)?)
        }
    })
}

/// Loads the programs, attaches them to `targets`, pins the maps under
/// `bpf_root` and hands over the map handles.
pub fn attach(
    targets: &Targets,
    sizes: MapSizes,
    lifetimes: Lifetimes,
    bpf_root: &Path,
) -> Result<Attached, DataplaneError> {
    if targets.interfaces.is_empty() && targets.devices.is_empty() && targets.cgroup.is_none() {
        return Err(DataplaneError::NothingToAttach);
    }
    // A plain name must be there (a device too, though it is attached only
    // once a Service is reached from outside); a pattern may match nothing yet.
    let present =
        links::interfaces().ok_or_else(|| DataplaneError::Load("cannot list this namespace's interfaces".into()))?;
    for name in targets.interfaces.iter().chain(&targets.node_devices).filter(|i| !links::is_pattern(i)) {
        if !present.contains_key(name) {
            return Err(DataplaneError::Attach {
                program: FROM_POD,
                target: format!("interface {name:?}"),
                reason: "no such interface in this network namespace".into(),
            });
        }
    }
    let pinned = maps_dir(bpf_root, sizes);
    if let Some((dir, PinnedMaps::Previous(old))) = &pinned {
        let shapes = shapes(sizes)?;
        let shared = migrate::share_maps(old, dir, &migrate::FLOW_MAPS, |name| shapes.get(name).copied());
        tracing::info!(maps = ?shared, "flow maps shared with the previous run's programs");
    }
    let mut ebpf = load_pinned(sizes, pinned.as_ref().map(|(dir, _)| dir.as_path()))?;
    let (mut reused, mut previous) = (false, None);
    if let Some((dir, found)) = &pinned {
        match found {
            PinnedMaps::Reusable => reused = true,
            PinnedMaps::Previous(old) => {
                let maps: Vec<&str> = pinned_maps().filter(|m| !migrate::SERVICE_MAPS.contains(m)).collect();
                let services = migrate::copy_maps(old, dir, &migrate::SERVICE_MAPS, true, false);
                let others = migrate::copy_maps(old, dir, &maps, false, false);
                tracing::info!(copied = ?services.iter().chain(&others).collect::<Vec<_>>(), "maps migrated from the previous run's");
                reused = !services.is_empty();
                previous = Some(old.clone());
            }
            PinnedMaps::Nothing => {}
        }
        let how = if reused { "reused: flows and programming carry over" } else { "created" };
        tracing::info!(dir = %dir.display(), "maps pinned, {how}");
    }
    // After what was migrated (a previous run's setting), before any
    // program of this run serves, so none judges a flow by another's.
    set_lifetimes(&mut ebpf, lifetimes)?;
    let mut pins = LinkPins::new(pinned.is_some().then_some(bpf_root));
    let (mut cgroup, mut socket_fence) = (None, false);
    if let Some(root) = &targets.cgroup {
        match attach_socket_hooks(&mut ebpf, &mut pins, root) {
            Ok(fenced) => (cgroup, socket_fence) = (Some(root.clone()), fenced),
            // Older kernels (before 6.1) refuse the hooks; the per-packet path still serves.
            Err(e) if !targets.interfaces.is_empty() => {
                tracing::warn!(error = %e, "socket-level load balancing unavailable; the per-packet path serves alone")
            }
            Err(e) => return Err(e),
        }
    }
    for (name, _) in PACKET_PROGRAMS {
        let classifier: &mut SchedClassifier = program(&mut ebpf, name)?;
        classifier.load().map_err(load_error(name))?;
    }
    let ids: std::collections::HashMap<&str, u32> =
        abi::ALL_MAPS.iter().filter_map(|name| Some((*name, map_id(ebpf.map(name)?)?))).collect();
    let by_id = |name: &str| {
        let open = |reason: String| crate::inspect::InspectError::Open { map: name.to_string(), reason };
        let id = ids.get(name).ok_or_else(|| open("missing from the eBPF object".into()))?;
        MapData::from_id(*id).map_err(|e| open(format!("by id: {e}")))
    };
    let xdp_mode = if targets.node_devices.is_empty() { XdpMode::Off } else { xdp::load(&mut ebpf, targets.xdp) };
    let mut devices = xdp::Devices::new(xdp_mode, targets.node_devices.clone(), {
        let map = by_id(abi::DEVICES).map_err(|e| DataplaneError::Load(e.to_string()))?;
        HashMap::try_from(Map::from_map_data(map).map_err(|e| wrong_type(abi::DEVICES, e))?)
            .map_err(|e| wrong_type(abi::DEVICES, e))?
    });
    let mut interfaces = BTreeMap::new();
    for (name, index) in links::selected(&targets.interfaces, &present) {
        let link = attach_classifier(&mut ebpf, &mut pins, name, index)?;
        interfaces.insert(name.to_string(), (index, link));
        if devices.is_device(name) {
            devices.attach(&mut ebpf, &mut pins, name, index)?;
        }
    }
    let bridge_ports = super::bridge::BridgePorts::new(Default::default(), {
        let map = by_id(abi::BRIDGE_PORTS).map_err(|e| DataplaneError::Load(e.to_string()))?;
        HashMap::try_from(Map::from_map_data(map).map_err(|e| wrong_type(abi::BRIDGE_PORTS, e))?)
            .map_err(|e| wrong_type(abi::BRIDGE_PORTS, e))?
    });
    let observed = Maps::open(by_id).map_err(|e| DataplaneError::Load(e.to_string()))?;
    let open = |name| -> Result<Map, DataplaneError> {
        let map = by_id(name).map_err(|e| DataplaneError::Load(e.to_string()))?;
        Map::from_map_data(map).map_err(|e| wrong_type(name, e))
    };
    let device_counts = super::device_counts::DeviceCounts::new(
        PerCpuHashMap::try_from(open(abi::DEVICE_COUNTS)?).map_err(|e| wrong_type(abi::DEVICE_COUNTS, e))?,
        Array::try_from(open(abi::DEVICE_OWNERS)?).map_err(|e| wrong_type(abi::DEVICE_OWNERS, e))?,
        PerCpuArray::try_from(open(abi::DEVICE_SLOTS)?).map_err(|e| wrong_type(abi::DEVICE_SLOTS, e))?,
    );
    let conntrack =
        [abi::CT_TCP, abi::CT_ANY].map(|name| HashMap::try_from(open(name)?).map_err(|e| wrong_type(name, e)));
    let conntrack6 =
        [abi::CT6_TCP, abi::CT6_ANY].map(|name| HashMap::try_from(open(name)?).map_err(|e| wrong_type(name, e)));
    let collector = Collector::spawn(
        conntrack.into_iter().collect::<Result<_, _>>()?,
        conntrack6.into_iter().collect::<Result<_, _>>()?,
        lifetimes,
    )
    .map_err(|e| DataplaneError::Load(format!("starting the conntrack collector: {e}")))?;
    let service_traffic = ebpf.take_map(abi::SERVICE_TRAFFIC).ok_or_else(|| missing(abi::SERVICE_TRAFFIC))?;
    let traffic = TrafficMaps::new(
        Array::try_from(service_traffic).map_err(|e| wrong_type(abi::SERVICE_TRAFFIC, e))?,
        take_hash(&mut ebpf, abi::BACKEND_TRAFFIC)?,
    );
    let maps = AyaMaps {
        services: marked_table(&mut ebpf, abi::SERVICES, abi::FRONTEND_PORTS)?,
        backends: marked_table(&mut ebpf, abi::BACKENDS, abi::BACKEND_PORTS)?,
        source_ranges: {
            let map = ebpf.take_map(abi::SOURCE_RANGES).ok_or_else(|| missing(abi::SOURCE_RANGES))?;
            aya::maps::LpmTrie::try_from(map).map_err(|e| wrong_type(abi::SOURCE_RANGES, e))?
        },
        cluster_scope: take_hash(&mut ebpf, abi::CLUSTER_SCOPE)?,
        affinity_timeouts: take_hash(&mut ebpf, abi::AFFINITY_TIMEOUTS)?,
        flows: FlowMaps { tcp: take_hash(&mut ebpf, abi::CT_TCP)?, any: take_hash(&mut ebpf, abi::CT_ANY)? },
        sock_affinity: take_hash(&mut ebpf, abi::SOCK_AFFINITY)?,
        sock_reverse: take_hash(&mut ebpf, abi::SOCK_REVERSE)?,
        cgroup,
        traffic,
    };
    let ipv6 = super::ipv6::Ipv6Maps {
        services: marked_table(&mut ebpf, abi::SERVICES6, abi::FRONTEND_PORTS6)?,
        backends: marked_table(&mut ebpf, abi::BACKENDS6, abi::BACKEND_PORTS6)?,
        sock_reverse: take_hash(&mut ebpf, abi::SOCK_REVERSE6)?,
        flows: FlowMaps { tcp: take_hash(&mut ebpf, abi::CT6_TCP)?, any: take_hash(&mut ebpf, abi::CT6_ANY)? },
        cluster_scope: take_hash(&mut ebpf, abi::CLUSTER_SCOPE6)?,
        service_traffic: take_hash(&mut ebpf, abi::SERVICE_TRAFFIC6)?,
        backend_traffic: take_hash(&mut ebpf, abi::BACKEND_TRAFFIC6)?,
        cgroup: maps.cgroup.clone(),
        reached_from_outside: Default::default(),
    };
    Ok(Attached {
        ebpf,
        interfaces,
        maps,
        observed: Arc::new(observed),
        collector,
        devices,
        bridge_ports,
        device_counts,
        pins,
        socket_fence,
        reused,
        previous,
        ipv6,
    })
}

/// Writes the conntrack lifetimes the datapath judges flows by.
fn set_lifetimes(ebpf: &mut Ebpf, lifetimes: Lifetimes) -> Result<(), DataplaneError> {
    let map = ebpf.map_mut(abi::CT_LIFETIMES).ok_or_else(|| missing(abi::CT_LIFETIMES))?;
    let mut array: Array<_, Lifetimes> = Array::try_from(map).map_err(|e| wrong_type(abi::CT_LIFETIMES, e))?;
    array.set(0, lifetimes, 0).map_err(|e| DataplaneError::MapWrite { map: abi::CT_LIFETIMES, reason: e.to_string() })
}

/// Attaches the (loaded) classifiers on ingress and egress of `iface`
/// (index `index`), both or neither, or adopts the previous run's links there.
pub fn attach_classifier(
    ebpf: &mut Ebpf,
    pins: &mut LinkPins,
    iface: &str,
    index: u32,
) -> Result<PacketLinks, DataplaneError> {
    // Kernels before 6.6 attach through a clsact qdisc; it may exist already.
    // Later ones attach through TCX and need none: adding one to a device
    // that is up deactivates its transmit queues for a moment, dropping the
    // packets in flight on a device that carries traffic already.
    if !attaches_through_tcx()
        && let Err(e) = tc::qdisc_add_clsact(iface)
    {
        tracing::debug!(%iface, error = %e, "clsact qdisc not added (it exists)");
    }
    let names = PACKET_PROGRAMS.map(|(_, hook)| {
        let hook = if hook == TcAttachType::Ingress { "ingress" } else { "egress" };
        pins::interface_link("tc", index, iface, hook)
    });
    for ((program_name, hook), pin) in PACKET_PROGRAMS.into_iter().zip(&names) {
        if pins.adopt(pin, program_name, |info| info.ifindex == index) {
            continue;
        }
        let attach_error = |reason: String| DataplaneError::Attach {
            program: program_name,
            target: format!("interface {iface:?}"),
            reason,
        };
        let attached = program::<SchedClassifier>(ebpf, program_name).and_then(|classifier| {
            let link = classifier.attach(iface, hook).and_then(|id| classifier.take_link(id));
            link.map_err(|e| attach_error(with_sources(&e)))
        });
        let kept = attached.and_then(|link| {
            if <&FdLink>::try_from(&link).is_err() {
                // A netlink classifier (before Linux 6.6) is no bpf_link: held
                // here, it detaches when the agent exits.
                pins.keep_unpinned(pin, link);
                return Ok(());
            }
            let link = FdLink::try_from(link).map_err(|e| attach_error(e.to_string()))?;
            pins.keep(pin, link)
        });
        if let Err(e) = kept {
            // Requests translated with no one to translate the replies would break flows.
            for pin in &names {
                pins.release(pin);
            }
            return Err(e);
        }
    }
    tracing::info!(%iface, "datapath attached on ingress and egress");
    Ok(names)
}

/// Whether classifiers attach through TCX links (Linux 6.6+), as aya's
/// `SchedClassifier::attach` decides, rather than a clsact qdisc.
fn attaches_through_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Whether the datapath's route lookups give the node's source address
/// toward a destination (`BPF_FIB_LOOKUP_SRC`, Linux 6.7), which its
/// source NAT of traffic from outside needs.
pub fn finds_source_addresses() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 7, 0))
}

/// Detaches the classifiers from an interface that is gone (the kernel
/// dropped the attachments with it; this unpins what is left).
pub fn release_classifier(pins: &mut LinkPins, links: &PacketLinks) {
    for pin in links {
        pins.release(pin);
    }
}

/// Observers read the datapath's counters through the pinned maps.
impl DatapathStats for Maps {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Maps::counters(self)
    }
    fn traffic(&self) -> Vec<FrontendTraffic> {
        Maps::traffic(self)
    }
    fn traffic6(&self) -> Vec<FrontendTraffic<std::net::Ipv6Addr>> {
        Maps::traffic6(self)
    }
    fn fill(&self) -> Vec<MapFill> {
        Maps::fill(self)
    }
    fn devices(&self) -> Vec<crate::inspect::DeviceStats> {
        Maps::devices(self)
    }
}
