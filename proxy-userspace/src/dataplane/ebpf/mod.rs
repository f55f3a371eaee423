//! The eBPF dataplane: keeps the service tables equal to the model.
//!
//! Each frontend has a stable id (its traffic counters and flows) and a
//! backend set. A changed set is written whole under a fresh set id and
//! published by rewriting the frontend's entry; the old set is freed only
//! at the next apply, so a program that read the frontend's entry just
//! before it changed still finds the old set's slots (not freed, nor
//! refilled with another frontend's backends under a reused set id). A failure anywhere before publishing leaves the previous set
//! serving, and the bookkeeping (ids, slot counts) is exactly what the maps
//! hold, on the real maps and on the fakes the unit tests use.

mod adopt;
pub mod bridge;
pub mod cgroup;
pub mod conntrack_gc;
pub mod device_counts;
pub mod dump;
pub mod fake;
pub mod host_flows;
pub mod ipv6;
pub mod links;
pub mod load;
pub mod maps;
pub mod marked_table;
pub mod masquerade;
mod migrate;
pub mod pins;
mod repair;
pub mod sock_destroy;
pub mod xdp;

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
};

use load::PacketLinks;
pub use load::{EBPF_OBJECT, FROM_POD, MapSizes, PACKET_PROGRAMS, SOCKET_PROGRAMS, TO_POD, Targets, load};
use maps::{AyaMaps, KeepEndpoints, MapIoError, ServiceMaps};
use proxy_common::maps::{BACKEND_ACTIVE, Backend, BackendKey, ServiceKey, ServiceValue, flags, kind};
pub use xdp::{XDP_PROGRAM, XdpMode};

use super::{ApplyError, DatapathStats, Dataplane, DataplaneError, Desired, Mode};
use crate::{
    frontend::{Cidr, Frontend, FrontendKey, Protocol, ServiceType},
    planner::Op,
};

fn service_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey::new(k.vip.octets(), k.port, k.protocol.number())
}

/// The backend slots of a frontend: ready endpoints first (the ones new
/// flows choose from), then terminating ones (listed, never chosen).
fn slots(f: &Frontend) -> Vec<Backend> {
    let active = f.backends.iter().map(|e| Backend::new(e.ip.octets(), e.port));
    active.chain(f.terminating.iter().map(|e| Backend::terminating(e.ip.octets(), e.port))).collect()
}

/// The slots of the set the ClusterIP entry names: this node's endpoints
/// under a Local internal policy, else every endpoint.
fn internal_slots(f: &Frontend) -> Vec<Backend> {
    if f.internal_local { local_slots(f) } else { slots(f) }
}

/// This node's endpoints (for a Local policy), all for new flows.
fn local_slots(f: &Frontend) -> Vec<Backend> {
    f.local_backends().iter().map(|e| Backend::new(e.ip.octets(), e.port)).collect()
}

/// What a ClusterIP entry says it is: its Service's type.
fn service_kind(t: ServiceType) -> u8 {
    match t {
        ServiceType::ClusterIP => kind::CLUSTER_IP,
        ServiceType::NodePort => kind::NODE_PORT,
        ServiceType::LoadBalancer => kind::LOAD_BALANCER,
    }
}

/// The ClusterIP entry of `f` (frontend `id`, backend set `set`): every
/// ready endpoint, for anyone. A Local policy's cluster-wide scope is the same.
fn cluster_value(f: &Frontend, id: u32, set: u32) -> ServiceValue {
    ServiceValue {
        id,
        backend_set: set,
        backend_count: f.backends.len() as u32,
        terminating_count: f.terminating.len() as u32,
        kind: service_kind(f.service_type),
        flags: affinity_flag(f),
        _pad: [0; 2],
    }
}

/// [`flags::AFFINITY`] for a frontend with session affinity.
fn affinity_flag<A>(f: &Frontend<A>) -> u8 {
    if f.affinity_timeout.is_some() { flags::AFFINITY } else { 0 }
}

/// The ClusterIP entry of `f`, naming `set` (its [`internal_slots`]): under
/// a Local internal policy, this node's endpoints, and pods' traffic
/// dropped when it has none while others do (kube-proxy's DROP).
fn internal_value(f: &Frontend, id: u32, set: u32) -> ServiceValue {
    if !f.internal_local {
        return cluster_value(f, id, set);
    }
    let drop = f.local_backends().is_empty() && !f.backends.is_empty();
    ServiceValue {
        backend_count: f.local_backends().len() as u32,
        terminating_count: 0,
        flags: affinity_flag(f) | if drop { flags::DROP_WITHOUT_BACKEND } else { 0 },
        ..cluster_value(f, id, set)
    }
}

/// One way into a Service port from outside: a service map key (`K`, of
/// [`proxy_common::maps::SERVICES`] or `SERVICES6`) of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ExternalEntry<K = ServiceKey> {
    key: K,
    kind: u8,
    flags: u8,
}

/// The external frontends of `f`: its node port on each of
/// `node_addresses`, its external IPs and load balancer IPs at its port,
/// with how each treats traffic (see [`flags`]); `key` makes an address
/// and port the family's service map key.
fn external_entries<A, K>(f: &Frontend<A>, node_addresses: &[A], key: impl Fn(&A, u16) -> K) -> Vec<ExternalEntry<K>> {
    let Some(ext) = f.external.as_deref() else { return Vec::new() };
    let mut policy = affinity_flag(f) | if ext.local_only { flags::LOCAL } else { flags::MASQUERADE };
    if ext.local_only && !f.backends.is_empty() {
        // Endpoints elsewhere but none here: dropped, as kube-proxy does.
        policy |= flags::DROP_WITHOUT_BACKEND;
    }
    let entry = |addr: &A, port: u16, kind: u8, flags: u8| ExternalEntry { key: key(addr, port), kind, flags };
    let mut entries = Vec::new();
    if let Some(node_port) = ext.node_port {
        entries.extend(node_addresses.iter().map(|a| entry(a, node_port, kind::NODE_PORT_ADDRESS, policy)));
    }
    entries.extend(ext.external_ips.iter().map(|a| entry(a, f.key.port, kind::EXTERNAL_IP, policy)));
    let fenced = if ext.source_ranges.is_empty() { 0 } else { flags::SOURCE_RANGES };
    entries.extend(ext.load_balancer_ips.iter().map(|a| entry(a, f.key.port, kind::LOAD_BALANCER_IP, policy | fenced)));
    entries
}

/// Hands out small integer ids, reusing freed ones first.
#[derive(Debug)]
struct Ids {
    next: u32,
    free: Vec<u32>,
}

impl Ids {
    fn new() -> Self {
        Self { next: 1, free: Vec::new() }
    }

    fn peek(&self) -> u32 {
        self.free.last().copied().unwrap_or(self.next)
    }

    fn take(&mut self) -> u32 {
        match self.free.pop() {
            Some(id) => id,
            None => {
                self.next += 1;
                self.next - 1
            }
        }
    }

    fn give_back(&mut self, id: u32) {
        self.free.push(id);
    }
}

/// What is programmed for one frontend. The slots themselves are only in
/// the backend map (read back when the set is replaced): at 50,000
/// frontends a copy here cost megabytes.
#[derive(Debug)]
struct Programmed {
    id: u32,
    set: u32,
    slots: u32,
    /// Whether a session affinity timeout is written for `id`.
    affinity: bool,
    /// What is written for traffic from outside, if anything (boxed: most
    /// frontends have none, and at 50,000 frontends every word counts).
    outside: Option<Box<Outside>>,
}

/// What is programmed for a frontend's ways in from outside.
#[derive(Debug, Default)]
struct Outside {
    /// The external frontends written.
    keys: Vec<ServiceKey>,
    /// The set (id, slots) external traffic needs besides the ClusterIP's
    /// when the two policies differ: this node's endpoints under a Local
    /// external policy, every endpoint under a Local internal one (for
    /// Cluster external traffic, or pods' short circuit when both are Local).
    other: Option<(u32, u32)>,
    /// Whether a cluster-wide scope is written (a Local external policy).
    scope: bool,
    /// Source ranges written.
    ranges: Vec<Cidr>,
}

impl Outside {
    fn boxed(self) -> Option<Box<Self>> {
        (!self.keys.is_empty() || self.other.is_some() || self.scope || !self.ranges.is_empty()).then(|| Box::new(self))
    }
}

/// Backend slots of a freed set that could not be removed: retried on
/// every apply; the set id is reused only once they are gone.
#[derive(Debug)]
struct Leftover {
    set: u32,
    slots: Vec<u32>,
}

pub struct EbpfDataplane<M = AyaMaps> {
    maps: M,
    /// Owns the programs and their links: dropping it detaches them.
    ebpf: Option<aya::Ebpf>,
    /// `--interfaces`: names and patterns the per-packet path follows.
    interface_patterns: Vec<String>,
    /// The node's devices, attached (joining `interface_patterns`) once a
    /// frontend is reached from outside.
    devices: Vec<String>,
    /// The node's devices and XDP on them.
    node_devices: Option<xdp::Devices>,
    /// Which pod interfaces switch Service traffic on their bridge.
    bridge_ports: Option<bridge::BridgePorts>,
    /// What the hooks did on each interface, and whether it has followed
    /// the interfaces yet (its first time also clears what went while no
    /// agent ran).
    device_counts: Option<device_counts::DeviceCounts>,
    device_counts_followed: bool,
    /// Interfaces the classifiers are on (name -> index and links), and ones
    /// that refused it (not tried again until they are recreated).
    attached: BTreeMap<String, (u32, PacketLinks)>,
    refused: BTreeMap<String, u32>,
    observed: Option<Arc<crate::inspect::Maps>>,
    /// Removes expired conntrack entries while the dataplane lives.
    _collector: Option<conntrack_gc::Collector>,
    programmed: BTreeMap<FrontendKey, Programmed>,
    /// Where node ports answer (`--nodeport-addresses`, resolved).
    node_addresses: Vec<Ipv4Addr>,
    /// Frontends per VIP, to keep the VIP marker entry while any remain.
    vip_users: BTreeMap<Ipv4Addr, u32>,
    service_ids: Ids,
    set_ids: Ids,
    sizes: MapSizes,
    /// Slots of live backend sets.
    slots_used: u64,
    leftovers: Vec<Leftover>,
    /// Sets unpublished by this apply (set id, slot count): freed at the next.
    retiring: Vec<(u32, u32)>,
    /// The frontends are a previous run's, taken over (see `adopt`): the
    /// next apply removes those the desired state does not have.
    adopted: bool,
    /// Until the first apply has written the frontends, they are written
    /// with [`flags::ADOPTING`] when the node's rules translated flows to
    /// them; that apply then adopts those flows (see `host_flows`). Not when
    /// the maps were a previous eBPF run's: its flows are tracked already.
    adopting: bool,
    /// The flows adopted as the node's, while any is (see `host_flows`).
    adopted_flows: Vec<proxy_common::conntrack::FlowKey>,
    /// The links of every attach point (see `pins`).
    pins: pins::LinkPins,
    /// The previous run's maps and where this run's are, while a migration
    /// waits for the switch (see `migrate`).
    migrating: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The cgroup the socket hooks are on, when socket-level load balancing runs.
    socket_cgroup: Option<std::path::PathBuf>,
    /// The socket path's egress fence (see `load::attach_socket_fence`):
    /// only a frontend with source ranges, or one that drops pods' traffic
    /// for want of a local endpoint, needs it, and it runs for every packet
    /// the cgroup's sockets send, so it is attached before the first such
    /// frontend is written.
    socket_fence: Attachment,
    /// The socket hooks' IPv6 maps, until the IPv6 family's dataplane takes them.
    ipv6_maps: Option<ipv6::Ipv6Maps>,
    /// Set by the IPv6 family's dataplane once it writes a frontend reached
    /// from outside: the node's devices are attached as for IPv4's (this
    /// dataplane owns the programs).
    reached_from_outside6: Arc<std::sync::atomic::AtomicBool>,
}

/// Where something the dataplane adds only once a frontend needs it stands
/// (the socket path's egress fence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attachment {
    /// No frontend has needed it yet.
    NotNeeded,
    Added,
    /// Adding it failed; every later apply tries again once (not once
    /// per frontend: a failing attach must not be retried per frontend).
    Failed,
}

fn map_error(map: &'static str, capacity: u32, flag: &'static str) -> impl Fn(MapIoError) -> DataplaneError {
    move |e| match e {
        MapIoError::Full => DataplaneError::MapFull { map, capacity, flag },
        MapIoError::Failed(reason) => DataplaneError::MapWrite { map, reason },
    }
}

impl EbpfDataplane<AyaMaps> {
    /// Loads the programs, attaches them to `targets` and pins the maps
    /// under `bpf_root`; the conntrack judges flows by `lifetimes`.
    pub fn attach(
        targets: &Targets,
        sizes: MapSizes,
        lifetimes: proxy_common::conntrack::Lifetimes,
        bpf_root: &Path,
    ) -> Result<Self, DataplaneError> {
        let attached = load::attach(targets, sizes, lifetimes, bpf_root)?;
        if !load::finds_source_addresses() {
            tracing::warn!(
                "this kernel's route lookup from BPF gives no source address (Linux 6.7+): traffic from outside \
                 under externalTrafficPolicy: Cluster to backends on other nodes is dropped (dropped_no_route); \
                 iptables mode serves it"
            );
        }
        let mut dataplane = Self::new(attached.maps, sizes);
        dataplane.ebpf = Some(attached.ebpf);
        dataplane.pins = attached.pins;
        dataplane.socket_cgroup.clone_from(&dataplane.maps.cgroup);
        if attached.socket_fence {
            dataplane.socket_fence = Attachment::Added;
        }
        dataplane.adopting = !attached.reused && attached.previous.is_none();
        if attached.reused {
            let frontends = dataplane.adopt_programmed();
            tracing::info!(frontends, "took over the frontends the maps hold; they serve until the first sync");
        }
        dataplane.migrating = attached.previous.map(|old| (old, crate::inspect::maps_dir(bpf_root)));
        dataplane.interface_patterns.clone_from(&targets.interfaces);
        dataplane.devices.clone_from(&targets.devices);
        dataplane.attached = attached.interfaces;
        dataplane.node_devices = Some(attached.devices);
        dataplane.bridge_ports = Some(attached.bridge_ports);
        dataplane.device_counts = Some(attached.device_counts);
        dataplane.follow_bridges();
        dataplane.observed = Some(attached.observed);
        dataplane._collector = Some(attached.collector);
        dataplane.reached_from_outside6 = attached.ipv6.reached_from_outside.clone();
        dataplane.ipv6_maps = Some(attached.ipv6);
        Ok(dataplane)
    }

    /// The IPv6 maps, for the IPv6 family's dataplane ([`ipv6::EbpfIpv6`]);
    /// `None` once taken.
    pub fn take_ipv6_maps(&mut self) -> Option<ipv6::Ipv6Maps> {
        self.ipv6_maps.take()
    }
}

impl<M: ServiceMaps> EbpfDataplane<M> {
    /// A dataplane writing through `maps`, which hold nothing yet.
    pub fn new(maps: M, sizes: MapSizes) -> Self {
        Self {
            maps,
            ebpf: None,
            interface_patterns: Vec::new(),
            devices: Vec::new(),
            node_devices: None,
            bridge_ports: None,
            device_counts: None,
            device_counts_followed: false,
            attached: BTreeMap::new(),
            refused: BTreeMap::new(),
            observed: None,
            _collector: None,
            programmed: BTreeMap::new(),
            node_addresses: Vec::new(),
            vip_users: BTreeMap::new(),
            service_ids: Ids::new(),
            set_ids: Ids::new(),
            sizes,
            slots_used: 0,
            leftovers: Vec::new(),
            retiring: Vec::new(),
            adopted: false,
            adopting: false,
            adopted_flows: Vec::new(),
            pins: pins::LinkPins::new(None),
            migrating: None,
            socket_cgroup: None,
            socket_fence: Attachment::NotNeeded,
            ipv6_maps: None,
            reached_from_outside6: Arc::default(),
        }
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Serves node ports on `addresses` (frontends written later).
    pub fn with_node_addresses(mut self, addresses: Vec<Ipv4Addr>) -> Self {
        self.node_addresses = addresses;
        self
    }

    /// [`flags::ADOPTING`] while this run adopts the node's flows, else 0.
    fn adopting_flag(&self) -> u8 {
        if self.adopting { flags::ADOPTING } else { 0 }
    }

    /// `value` as written while this run adopts the node's flows.
    fn adopting(&self, value: ServiceValue) -> ServiceValue {
        ServiceValue { flags: value.flags | self.adopting_flag(), ..value }
    }

    fn services_error(&self) -> impl Fn(MapIoError) -> DataplaneError {
        map_error(proxy_common::maps::SERVICES, self.sizes.services, "--max-services")
    }

    fn backends_error(&self) -> impl Fn(MapIoError) -> DataplaneError {
        map_error(proxy_common::maps::BACKENDS, self.sizes.backends, "--max-backends")
    }

    /// Slots still taken by sets no frontend uses (freeing failed, or not due yet).
    fn leftover_slots(&self) -> u64 {
        let retiring: u64 = self.retiring.iter().map(|(_, count)| u64::from(*count)).sum();
        self.leftovers.iter().map(|l| l.slots.len() as u64).sum::<u64>() + retiring
    }

    /// Removes the slots of a set no frontend uses; what fails is kept for later.
    fn free_set(&mut self, set: u32, count: usize) {
        let mut left = Leftover { set, slots: Vec::new() };
        for slot in 0..count as u32 {
            if let Err(e) = self.maps.remove_backend(&BackendKey { set, slot }) {
                tracing::warn!(set, slot, error = %e, "could not free a backend slot; retrying later");
                left.slots.push(slot);
            }
        }
        if left.slots.is_empty() {
            self.set_ids.give_back(set);
        } else {
            self.leftovers.push(left);
        }
    }

    fn retry_leftovers(&mut self) {
        for mut left in std::mem::take(&mut self.leftovers) {
            left.slots.retain(|slot| self.maps.remove_backend(&BackendKey { set: left.set, slot: *slot }).is_err());
            if left.slots.is_empty() {
                self.set_ids.give_back(left.set);
            } else {
                self.leftovers.push(left);
            }
        }
    }

    /// Writes `backends` as a new set (under a fresh id); nothing is left of
    /// it if a write fails.
    fn write_set(&mut self, backends: &[Backend]) -> Result<u32, DataplaneError> {
        let set = self.set_ids.take();
        for (slot, b) in backends.iter().enumerate() {
            if let Err(e) = self.maps.set_backend(BackendKey { set, slot: slot as u32 }, *b) {
                self.free_set(set, slot);
                return Err(self.backends_error()(e));
            }
        }
        Ok(set)
    }

    /// Attaches the socket path's egress fence before the first frontend
    /// whose entries ask the socket hooks to fence a socket (`entry_flags`)
    /// is written: a fence nothing checks would let every source through.
    /// Attaching failed, the frontend is written all the same (traffic
    /// from outside is checked on the devices): pods' sockets then go
    /// unchecked, said in a warning, until a later apply attaches it.
    fn ask_for_socket_fence(&mut self, entry_flags: u8) {
        if entry_flags & (flags::SOURCE_RANGES | flags::DROP_WITHOUT_BACKEND) == 0
            || self.socket_fence != Attachment::NotNeeded
        {
            return;
        }
        let (Some(ebpf), Some(cgroup)) = (self.ebpf.as_mut(), self.socket_cgroup.as_ref()) else { return };
        self.socket_fence = match load::attach_socket_fence(ebpf, &mut self.pins, cgroup) {
            Ok(()) => Attachment::Added,
            Err(e) => {
                tracing::warn!(error = %e, "socket path's egress fence unavailable: pods' sockets are not held to source ranges or a Local policy's drop");
                Attachment::Failed
            }
        };
    }

    /// Writes `f`'s external frontends (programmed already under `id` and
    /// its cluster-wide set) and removes the ones it no longer has: a Local
    /// policy gets a set of this node's endpoints, published as the
    /// cluster-wide one was; source ranges are written before the
    /// frontends that check them.
    fn upsert_external(&mut self, f: &Frontend) -> Result<(), DataplaneError> {
        let Some(p) = self.programmed.get(&f.key) else { return Ok(()) };
        if f.external.is_none() && p.outside.is_none() {
            // Most frontends: nothing from outside, before or now.
            return Ok(());
        }
        let (id, set) = (p.id, p.set);
        let proto = f.key.protocol.number();
        let wanted = external_entries(f, &self.node_addresses, |a, port| ServiceKey::new(a.octets(), port, proto));
        let entry_flags = wanted.iter().fold(0, |all, e| all | e.flags);
        self.ask_for_socket_fence(entry_flags);
        let ext = f.external.as_deref();
        let local_only = ext.is_some_and(|e| e.local_only) && !wanted.is_empty();
        let ranges: Vec<Cidr> = if wanted.iter().any(|e| e.flags & flags::SOURCE_RANGES != 0) {
            ext.map(|e| e.source_ranges.to_vec()).unwrap_or_default()
        } else {
            Vec::new()
        };
        for range in &ranges {
            self.maps.set_source_range(id, *range).map_err(map_error(
                proxy_common::maps::SOURCE_RANGES,
                proxy_common::maps::DEFAULT_SOURCE_RANGES_MAX,
                "(fewer loadBalancerSourceRanges)",
            ))?;
        }
        // The ClusterIP's set serves one policy; the other, if it differs
        // (or pods' short circuit needs every endpoint), gets its own.
        let other = if wanted.is_empty() {
            None
        } else if f.internal_local {
            Some(slots(f))
        } else if local_only {
            Some(local_slots(f))
        } else {
            None
        };
        let other = match other {
            Some(backends) => {
                if self.slots_used + self.leftover_slots() + backends.len() as u64 > self.sizes.backends as u64 {
                    return Err(self.backends_error()(MapIoError::Full));
                }
                Some((self.write_set(&backends)?, backends.len() as u32))
            }
            None => None,
        };
        let other_set = other.map(|(set, _)| set);
        let cluster_set = if f.internal_local { other_set } else { Some(set) };
        // Pods and node processes reach a Local policy's frontends through
        // every endpoint: the cluster-wide set, written before the entries
        // that point there.
        if local_only
            && let Some(cluster_set) = cluster_set
            && let Err(e) = self.maps.set_cluster_scope(id, self.adopting(cluster_value(f, id, cluster_set)))
        {
            // Nothing names the new set yet: it goes at once.
            if let Some((set, slots)) = other {
                self.free_set(set, slots as usize);
            }
            return Err(map_error(
                proxy_common::maps::CLUSTER_SCOPE,
                proxy_common::maps::DEFAULT_CLUSTER_SCOPES_MAX,
                "(fewer Services with externalTrafficPolicy: Local)",
            )(e));
        }
        let mut written = Vec::new();
        let mut failed = None;
        for entry in &wanted {
            let (backend_set, backend_count, terminating_count) = if local_only {
                let local_set = if f.internal_local { set } else { other_set.unwrap_or(set) };
                (local_set, f.local_backends().len() as u32, 0)
            } else {
                (cluster_set.unwrap_or(set), f.backends.len() as u32, f.terminating.len() as u32)
            };
            let value = ServiceValue {
                id,
                backend_set,
                backend_count,
                terminating_count,
                kind: entry.kind,
                flags: entry.flags | self.adopting_flag(),
                _pad: [0; 2],
            };
            match self.maps.set_service(entry.key, value) {
                Ok(()) => written.push(entry.key),
                Err(e) => {
                    failed = Some(self.services_error()(e));
                    break;
                }
            }
        }
        let p = self.programmed.get_mut(&f.key).expect("looked up above");
        let old = p.outside.take().map(|o| *o).unwrap_or_default();
        let (old_external, old_other, old_ranges) = (old.keys, old.other, old.ranges);
        // Entries written before a failure are kept (and tracked) with the old ones still wanted.
        let mut keys: Vec<ServiceKey> =
            old_external.iter().filter(|k| wanted.iter().any(|e| e.key == **k)).copied().collect();
        keys.extend(written.iter().filter(|k| !old_external.contains(k)));
        p.outside = Outside { keys, other, scope: local_only, ranges: ranges.clone() }.boxed();
        for key in old_external.iter().filter(|k| !wanted.iter().any(|e| e.key == **k)) {
            if let Err(e) = self.remove_external(key, id) {
                tracing::warn!(error = %e, "could not remove an external frontend; it serves until the next change");
            }
        }
        // After a failed write, entries not yet rewritten still name the old
        // set until the frontend is retried (within seconds), and the set is
        // freed only at the next apply.
        if let Some((old_set, slots)) = old_other {
            self.retiring.push((old_set, slots));
            self.slots_used -= u64::from(slots);
        }
        if let Some((_, slots)) = other {
            self.slots_used += u64::from(slots);
        }
        for range in old_ranges.iter().filter(|r| !ranges.contains(r)) {
            if let Err(e) = self.maps.remove_source_range(id, *range) {
                tracing::warn!(error = %e, "could not remove a source range");
            }
        }
        if old.scope
            && !local_only
            && let Err(e) = self.maps.remove_cluster_scope(id)
        {
            tracing::warn!(error = %e, "could not remove a cluster-wide scope; unused until the id is reused");
        }
        failed.map_or(Ok(()), Err)
    }

    fn upsert(&mut self, f: &Frontend) -> Result<(), DataplaneError> {
        let key = service_key(&f.key);
        let new = internal_slots(f);
        let old_id = self.programmed.get(&f.key).map(|p| p.id);
        let new_vip = !self.vip_users.contains_key(&f.key.vip);
        if old_id.is_none() {
            let entries = self.programmed.len() + self.vip_users.len() + 1 + usize::from(new_vip);
            // Ids index the per-frontend traffic array, sized like the service map.
            if entries as u64 > self.sizes.services as u64 || self.service_ids.peek() >= self.sizes.services {
                return Err(self.services_error()(MapIoError::Full));
            }
        }
        // The new set is written beside the old one before the old is freed.
        if self.slots_used + self.leftover_slots() + new.len() as u64 > self.sizes.backends as u64 {
            return Err(self.backends_error()(MapIoError::Full));
        }
        let set = self.write_set(&new)?;
        let id = old_id.unwrap_or_else(|| self.service_ids.peek());
        // The timeout before the flag that sends the datapath looking for it.
        if let Some(timeout) = f.affinity_timeout
            && let Err(e) = self.maps.set_affinity(id, timeout)
        {
            self.free_set(set, new.len());
            return Err(map_error(
                proxy_common::maps::AFFINITY_TIMEOUTS,
                self.sizes.services,
                "(fewer Services with sessionAffinity)",
            )(e));
        }
        let value = self.adopting(internal_value(f, id, set));
        self.ask_for_socket_fence(value.flags);
        if let Err(e) = self.maps.set_service(key, value) {
            self.free_set(set, new.len());
            return Err(self.services_error()(e));
        }
        if new_vip
            && let Err(e) = self.maps.set_service(ServiceKey::vip_marker(f.key.vip.octets()), ServiceValue::MARKER)
        {
            // Without its marker a VIP's fragments are not recognised: undo.
            // A VIP without a marker has no frontend yet, so this one is new.
            if let Err(e) = self.maps.remove_service(&key) {
                tracing::warn!(error = %e, "could not remove a half-written frontend");
            }
            self.free_set(set, new.len());
            return Err(self.services_error()(e));
        }
        // Published: from here on the frontend serves the new set.
        let (old, outside, had_affinity) = match self.programmed.remove(&f.key) {
            Some(p) => {
                let old = (0..p.slots).filter_map(|slot| self.maps.backend(&BackendKey { set: p.set, slot })).collect();
                self.retiring.push((p.set, p.slots));
                self.slots_used -= u64::from(p.slots);
                (old, p.outside, p.affinity)
            }
            None => {
                self.service_ids.take();
                *self.vip_users.entry(f.key.vip).or_insert(0) += 1;
                (Vec::new(), None, false)
            }
        };
        if had_affinity
            && f.affinity_timeout.is_none()
            && let Err(e) = self.maps.remove_affinity(id)
        {
            tracing::warn!(error = %e, "could not remove a session affinity timeout; unused until the id is reused");
        }
        self.slots_used += new.len() as u64;
        let gone: Vec<Backend> =
            old.iter().filter(|o| !new.iter().any(|n| n.addr == o.addr && n.port == o.port)).copied().collect();
        self.maps.forget_traffic(id, Some(&gone));
        // Flows of the id may go to any endpoint its entries name: the
        // ClusterIP's set, and under a Local policy the other one.
        let keep: KeepEndpoints =
            f.backends.iter().chain(f.local_backends()).map(|e| (e.ip.octets(), e.port.to_be_bytes())).collect();
        // Only an endpoint that stopped being ready leaves flows to forget
        // (walking the flow maps costs a syscall per entry). Under a Local
        // internal policy the old set shows this node's endpoints only, so
        // any change is checked.
        let unready =
            f.internal_local || old.iter().any(|o| o.state == BACKEND_ACTIVE && !keep.contains(&(o.addr, o.port)));
        if f.key.protocol == Protocol::Udp && unready {
            self.forget_udp_flows(id, &keep);
        }
        let affinity = f.affinity_timeout.is_some();
        self.programmed.insert(f.key, Programmed { id, set, slots: new.len() as u32, affinity, outside });
        self.upsert_external(f)
    }

    /// Removes the external frontend `key` if frontend `id` still holds it:
    /// another frontend may have taken it over in the same sync (a load
    /// balancer or external IP, or a node port, moving between Services).
    fn remove_external(&mut self, key: &ServiceKey, id: u32) -> Result<(), MapIoError> {
        match self.maps.service(key) {
            Some(value) if value.id == id => self.maps.remove_service(key),
            _ => Ok(()),
        }
    }

    fn delete(&mut self, k: &FrontendKey) -> Result<(), DataplaneError> {
        let Some(p) = self.programmed.get(k) else { return Ok(()) };
        let (id, set, count) = (p.id, p.set, p.slots as usize);
        let keys = p.outside.as_ref().map(|o| o.keys.clone()).unwrap_or_default();
        for key in keys {
            self.remove_external(&key, id).map_err(self.services_error())?;
            if let Some(o) = self.programmed.get_mut(k).and_then(|p| p.outside.as_mut()) {
                o.keys.retain(|e| *e != key);
            }
        }
        self.maps.remove_service(&service_key(k)).map_err(self.services_error())?;
        let p = self.programmed.remove(k).expect("looked up above");
        let outside = p.outside.map(|o| *o).unwrap_or_default();
        if let Some((other_set, slots)) = outside.other {
            self.retiring.push((other_set, slots));
            self.slots_used -= u64::from(slots);
        }
        if outside.scope
            && let Err(e) = self.maps.remove_cluster_scope(id)
        {
            tracing::warn!(error = %e, "could not remove a cluster-wide scope; unused until the id is reused");
        }
        if p.affinity
            && let Err(e) = self.maps.remove_affinity(id)
        {
            tracing::warn!(error = %e, "could not remove a session affinity timeout; unused until the id is reused");
        }
        for range in outside.ranges {
            if let Err(e) = self.maps.remove_source_range(id, range) {
                tracing::warn!(error = %e, "could not remove a source range");
            }
        }
        self.retiring.push((set, count as u32));
        self.slots_used -= count as u64;
        // The id may be reused: its next owner starts from zero.
        self.maps.forget_traffic(id, None);
        self.service_ids.give_back(id);
        if let Some(users) = self.vip_users.get_mut(&k.vip) {
            *users -= 1;
            if *users == 0 {
                self.vip_users.remove(&k.vip);
                if let Err(e) = self.maps.remove_service(&ServiceKey::vip_marker(k.vip.octets())) {
                    // Harmless but for fragments to this address, which are dropped.
                    tracing::warn!(vip = %k.vip, error = %e, "could not remove a VIP marker");
                }
            }
        }
        if k.protocol == Protocol::Udp {
            self.forget_udp_flows(id, &HashSet::new());
        }
        Ok(())
    }

    /// Attaches the classifier to interfaces that appeared and match
    /// `--interfaces`; forgets the ones that went (their attachment went
    /// with them).
    fn follow_interfaces(&mut self) {
        let Some(ebpf) = self.ebpf.as_mut() else { return };
        if self.interface_patterns.is_empty() {
            return;
        }
        // Not listed this time: nothing is judged gone.
        let Some(present) = links::interfaces() else { return };
        let mut changed = !self.device_counts_followed;
        for (name, _, link) in links::take_gone(&mut self.attached, &present) {
            load::release_classifier(&mut self.pins, &link);
            tracing::info!(iface = %name, "interface gone; forgotten");
            changed = true;
        }
        if let Some(devices) = self.node_devices.as_mut() {
            devices.forget_gone(&mut self.pins, &present);
        }
        self.refused.retain(|name, index| present.get(name) == Some(index));
        for (name, index) in links::selected(&self.interface_patterns, &present) {
            if self.attached.contains_key(name) || self.refused.contains_key(name) {
                continue;
            }
            match load::attach_classifier(ebpf, &mut self.pins, name, index) {
                Ok(link) => {
                    self.attached.insert(name.to_string(), (index, link));
                    changed = true;
                    if let Some(devices) = self.node_devices.as_mut().filter(|d| d.is_device(name))
                        && let Err(e) = devices.attach(ebpf, &mut self.pins, name, index)
                    {
                        tracing::warn!(device = %name, error = %e, "recording the device's path failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(iface = %name, error = %e, "interface matches --interfaces or --devices but refused the datapath");
                    self.refused.insert(name.to_string(), index);
                }
            }
        }
        // The first time, also the interfaces that went while no agent ran.
        if changed && let Some(counts) = self.device_counts.as_mut() {
            counts.follow(&present, self.attached.values().map(|(index, _)| *index));
            self.device_counts_followed = true;
        }
        self.follow_bridges();
    }

    /// Lists the attached pod interfaces whose bridge may switch their
    /// Service traffic (see `bridge`); how many entries changed.
    fn follow_bridges(&mut self) -> usize {
        let Some(ports) = self.bridge_ports.as_mut() else { return 0 };
        let devices = self.node_devices.as_ref();
        let pods = self
            .attached
            .iter()
            .filter(|(name, _)| !devices.is_some_and(|d| d.is_device(name)))
            .map(|(name, (index, _))| (name.as_str(), *index));
        ports.follow(pods)
    }

    /// UDP has no connection end the client would notice, so flows pinned to
    /// an endpoint no longer ready are forgotten and the next datagram
    /// chooses again (kube-proxy clears conntrack for the same reason). TCP
    /// flows keep their backend until they end, as with kube-proxy.
    fn forget_udp_flows(&mut self, service_id: u32, keep: &KeepEndpoints) {
        let n = self.maps.forget_udp_flows(service_id, keep);
        if n > 0 {
            tracing::debug!(service_id, flows = n, "forgot UDP flows to removed endpoints");
        }
    }
}

impl<M: ServiceMaps> Dataplane for EbpfDataplane<M> {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    fn stats(&self) -> Option<Arc<dyn DatapathStats>> {
        self.observed.clone().map(|m| m as Arc<dyn DatapathStats>)
    }

    fn repair(&mut self, desired: &Desired) -> usize {
        // First: a frontend written again below is served only with its port marked.
        let marks = self.maps.repair_marks();
        if marks > 0 {
            tracing::warn!(words = marks, "port marks someone else cleared were written again");
        }
        let devices = self.node_devices.as_mut().map_or(0, |d| d.repair());
        self.release_conntrack_when_done();
        marks + self.repair_drift(desired) + devices + self.follow_bridges()
    }

    /// The maps are programmed: links a previous run left switch to this
    /// run's programs, and the ones nothing claimed are detached.
    fn serving(&mut self) {
        let Some(ebpf) = self.ebpf.as_ref() else { return };
        let program_fd = |name: &str| {
            use std::os::fd::AsFd as _;
            ebpf.program(name)?.fd().ok()?.as_fd().try_clone_to_owned().ok()
        };
        let (switched, removed) = self.pins.commit(program_fd);
        if switched + removed > 0 {
            tracing::info!(switched, removed, "links of the previous run switched to this run's programs");
        }
        if let Some((old, current)) = self.migrating.take() {
            // What the old programs tracked until the switch.
            migrate::copy_maps(&old, &current, &migrate::FLOW_MAPS, false, true);
            match std::fs::remove_dir_all(&old) {
                Ok(()) => tracing::info!("migration done: the previous run's maps are released"),
                Err(e) => tracing::warn!(dir = %old.display(), error = %e, "could not remove the previous run's maps"),
            }
        }
    }

    fn apply(&mut self, ops: &[Op], desired: &Desired) -> Vec<ApplyError> {
        // A failed fence is retried once per apply: the frontends that
        // asked for it are written already and may not be again soon.
        if self.socket_fence == Attachment::Failed {
            self.socket_fence = Attachment::NotNeeded;
            self.ask_for_socket_fence(flags::SOURCE_RANGES);
        }
        self.follow_interfaces();
        self.retry_leftovers();
        // A whole sync has passed since these were unpublished: no program still reads them.
        for (set, count) in std::mem::take(&mut self.retiring) {
            self.free_set(set, count as usize);
        }
        if self.adopting && self.ebpf.is_some() {
            // Decided once, before anything is written as adopting.
            let flows = crate::dataplane::conntrack::flows::<Ipv4Addr>().unwrap_or_default();
            self.adopting = host_flows::any_translated_to(&flows, desired);
            if !self.adopting {
                tracing::debug!("no flow the node's rules translated to these frontends: nothing to adopt");
            }
        }
        let mut errors = Vec::new();
        let mut reached_from_outside = false;
        for op in ops {
            let (frontend, result) = match op {
                Op::Upsert(k) => match desired.get(k) {
                    Some(f) => (*k, self.upsert(f)),
                    // The planner upserts only what the model holds; anything
                    // else is not wanted.
                    None => (*k, self.delete(k)),
                },
                Op::Delete(k) => (*k, self.delete(k)),
            };
            if let Err(error) = result {
                errors.push(ApplyError { frontend, error });
            }
            reached_from_outside |=
                self.programmed.get(&frontend).is_some_and(|p| p.outside.as_ref().is_some_and(|o| !o.keys.is_empty()));
        }
        for frontend in self.adopted_and_gone(desired) {
            if let Err(error) = self.delete(&frontend) {
                errors.push(ApplyError { frontend, error });
            }
        }
        // Only the frontends written now are looked at (not every one, on
        // every apply): an earlier one reached from outside attached them
        // then. The IPv6 family's dataplane applies first, and says so.
        reached_from_outside |= self.reached_from_outside6.load(std::sync::atomic::Ordering::Relaxed);
        if !self.devices.is_empty() && reached_from_outside {
            tracing::info!(devices = ?self.devices, "Services are reached from outside: attaching to the node's devices");
            let devices = std::mem::take(&mut self.devices);
            self.interface_patterns.extend(devices);
            self.follow_interfaces();
        }
        // The first apply: its frontends written as adopting, the flows
        // the node's rules translated to them are adopted before the rules go.
        if self.adopting && self.ebpf.is_some() {
            self.adopt_host_flows(crate::dataplane::conntrack::flows());
        }
        errors
    }
}

#[cfg(test)]
mod tests;
