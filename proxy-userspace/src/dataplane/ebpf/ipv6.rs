//! eBPF mode's IPv6 family: the IPv6 TCP and UDP frontends in
//! [`abi::SERVICES6`], read by the socket hooks (pods and node processes
//! under the cgroup connect or send straight to a backend with `connect6`
//! and `sendmsg6`, and see the VIP as their peer with `getpeername6` and
//! `recvmsg6`), by the per-packet path on pod interfaces (with
//! `--socket-lb=false`, or for pods outside the cgroup) and on the node's
//! devices, and by XDP there: ClusterIPs, and the ways in from outside
//! (node ports on the node's IPv6 addresses, external and load balancer
//! IPs) under either traffic policy, as IPv4's. kube-proxy's ip6tables
//! rules serve what the maps do not: a Local internal policy, session
//! affinity, load balancer source ranges (see [`in_rules`]). A frontend the
//! maps serve has no rule: every new IPv6 connection on the node would
//! otherwise walk its rule in the nat table, thousands of them at scale.
//! And while no frontend needs rules, kube-proxy's ip6tables chains are not
//! in the node at all (see [`Rules`]). When a backend leaves, the per-packet path's
//! UDP flows to it choose again, a UDP socket connected to it is ended (see
//! `sock_destroy`), as IPv4 ones are, and an unconnected one chooses again
//! on its next datagram.
//!
//! A backend set is switched as the IPv4 ones are: written whole under a
//! fresh set id, published by rewriting the frontend's entry, and freed
//! only at the next apply (a hook that read the entry just before still
//! finds its slots). A frontend moving between the maps and the rules is
//! served all along: the maps are written before the rules change, and
//! emptied only after. The maps are pinned and kept across restarts: a
//! restarted agent takes their entries over, so the frontends that have no
//! rules serve while it starts, and its first sync deletes what is gone.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv6Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use proxy_common::{
    conntrack::{CtEntry6, FlowKey6},
    ipv6::In6,
    maps::{
        self as abi, Backend6, BackendKey, BackendTrafficKey6, PROTO_UDP, ReverseEntry6, ServiceKey6, ServiceValue,
        SockKey6, Traffic, flags, kind,
    },
};

use crate::{
    dataplane::{
        ApplyError, Dataplane, DataplaneError, Desired, Mode,
        iptables::{IptablesDataplane, backend::Backend, render::RenderConfig},
    },
    frontend::{Endpoint, Frontend, FrontendKey, Protocol},
    planner::Op,
};

/// The IPv6 maps, and the cgroup the socket hooks serve (none without them).
pub struct Ipv6Maps {
    pub services: super::marked_table::MarkedTable<ServiceKey6>,
    pub backends: super::marked_table::MarkedTable<BackendKey, Backend6>,
    /// Which backend each connected socket was given.
    pub sock_reverse: HashMap<MapData, SockKey6, ReverseEntry6>,
    /// The per-packet path's TCP flows (only written: see `host_flows`),
    /// and its UDP flows (and any other non-TCP ones).
    pub flows: super::maps::FlowMaps<FlowKey6, CtEntry6>,
    /// A Local policy's cluster-wide scope, by frontend id.
    pub cluster_scope: HashMap<MapData, u32, ServiceValue>,
    /// Traffic per frontend id, and per (frontend, backend).
    pub service_traffic: HashMap<MapData, u32, Traffic>,
    pub backend_traffic: HashMap<MapData, BackendTrafficKey6, Traffic>,
    pub cgroup: Option<PathBuf>,
    /// Raised once a frontend reached from outside is written, for the
    /// IPv4 dataplane (which owns the programs) to attach the devices.
    pub reached_from_outside: Arc<AtomicBool>,
}

/// What one frontend holds in the maps.
#[derive(Clone, Debug)]
struct Written {
    id: u32,
    set: u32,
    slots: u32,
    /// Its ways in from outside, if any are written (boxed: most have none).
    outside: Option<Box<Outside>>,
}

/// What a frontend's ways in from outside hold in the maps.
#[derive(Clone, Debug, Default)]
struct Outside {
    keys: Vec<ServiceKey6>,
    /// Under a Local policy, the set (id, slots) of this node's endpoints.
    local: Option<(u32, u32)>,
}

/// kube-proxy's ip6tables rules, in the node only while some frontend
/// needs them (see [`in_rules`]). Their chains hold conntrack matches and a
/// masquerade rule, which put every IPv6 packet on the node through
/// netfilter's connection tracking: measured here, a sixth of the
/// connection rate between two pods, whose packets the maps never touch.
struct Rules {
    written: Option<IptablesDataplane<Ipv6Addr>>,
    config: RenderConfig<Ipv6Addr>,
    full_sync_period: Duration,
    /// Whether rules a previous run or iptables mode left were looked for
    /// (and removed, as no frontend needed them).
    leftovers_checked: bool,
}

impl Rules {
    /// Brings the node's ip6tables rules to `desired`: written (the chains
    /// first) when it has a frontend, else none of kube-proxy's at all.
    fn apply(&mut self, ops: &[Op<Ipv6Addr>], desired: &Desired<Ipv6Addr>) -> Vec<ApplyError<Ipv6Addr>> {
        if desired.is_empty() {
            if self.written.is_some() || !self.leftovers_checked {
                match Backend::remove_from(Backend::ALL.into_iter().filter(|b| b.ipv6), self.config.chains) {
                    Ok(_) => (self.written, self.leftovers_checked) = (None, true),
                    // Kept, and tried again at the next apply: they serve nothing.
                    Err(e) => tracing::warn!(error = %e, "could not remove the ip6tables rules no frontend needs"),
                }
            }
            return Vec::new();
        }
        let rules = match &mut self.written {
            Some(rules) => rules,
            None => match IptablesDataplane::new(self.config.clone(), self.full_sync_period) {
                Ok(rules) => self.written.insert(rules),
                Err(error) => {
                    let keys = desired.keys().filter(|k| ops.iter().any(|op| op.key() == **k));
                    return keys.map(|k| ApplyError { frontend: *k, error: error.clone() }).collect();
                }
            },
        };
        // A sync that changes no rule runs no `ip6tables-restore`, unless the
        // rules are due a full one: the first (which also removes what a
        // previous run or iptables mode left), or the one after a failure.
        if ops.is_empty() && !rules.full_sync_pending() {
            return Vec::new();
        }
        rules.apply(ops, desired)
    }

    fn repair(&mut self, desired: &Desired<Ipv6Addr>) -> usize {
        self.written.as_mut().map_or(0, |rules| rules.repair(desired))
    }
}

pub struct EbpfIpv6 {
    rules: Rules,
    /// Where node ports answer (`--nodeport-addresses`, resolved).
    node_addresses: Vec<Ipv6Addr>,
    /// Ways in from outside a frontend no longer has (the key, the
    /// frontend and its id), removed once the rules serve what they did.
    stale: Vec<(ServiceKey6, FrontendKey<Ipv6Addr>, u32)>,
    /// The frontends the rules serve (see [`in_rules`]), as they render them.
    rules_desired: Desired<Ipv6Addr>,
    maps: Ipv6Maps,
    written: BTreeMap<FrontendKey<Ipv6Addr>, Written>,
    /// How many written frontends each VIP has: a VIP with any is marked
    /// in the service map ([`ServiceKey6::vip_marker`]), so the per-packet
    /// path drops what it cannot translate to it.
    vip_users: BTreeMap<Ipv6Addr, u32>,
    /// The entries were a previous run's: the first apply deletes those
    /// its desired state does not have.
    adopted: bool,
    /// Until the first apply has written the frontends, they are written
    /// with [`flags::ADOPTING`], as IPv4's (see `host_flows`); that apply
    /// then adopts the node's flows before the rules go. Not when the maps
    /// held a previous eBPF run's frontends, whose flows it tracks.
    adopting: bool,
    /// The flows adopted as the node's, while any is.
    adopted_flows: Vec<FlowKey6>,
    /// Sets replaced or deleted at the last apply, freed at the next.
    retiring: Vec<(u32, u32)>,
    next_id: u32,
    next_set: u32,
}

/// Whether the maps serve `f` (the socket hooks and the per-packet path
/// alike): a TCP or UDP frontend that every pod and node process reaches
/// alike, with no memory of its clients.
fn in_maps(f: &Frontend<Ipv6Addr>) -> bool {
    matches!(f.key.protocol, Protocol::Tcp | Protocol::Udp) && !f.internal_local && f.affinity_timeout.is_none()
}

/// Whether the maps serve `f`'s ways in from outside: those of a frontend
/// they serve, unless its load balancer IPs are fenced by source ranges
/// (the datapath holds IPv4 ranges only).
fn outside_in_maps(f: &Frontend<Ipv6Addr>) -> bool {
    let Some(ext) = f.external.as_deref() else { return false };
    in_maps(f) && (ext.source_ranges.is_empty() || ext.load_balancer_ips.is_empty())
}

/// Whether `f` needs kube-proxy's rules beside the maps: what the maps
/// do not serve (see [`in_maps`] and [`outside_in_maps`]).
fn in_rules(f: &Frontend<Ipv6Addr>) -> bool {
    !in_maps(f) || (f.external.is_some() && !outside_in_maps(f))
}

/// The frontend a [`abi::SERVICES6`] entry stands for.
fn frontend_key(key: &ServiceKey6) -> Option<FrontendKey<Ipv6Addr>> {
    let protocol = match key.proto {
        abi::PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some(FrontendKey { vip: Ipv6Addr::from(key.addr), port: u16::from_be_bytes(key.port), protocol })
}

/// The ClusterIP entry of `f` (frontend `id`, its ready backends in `set`),
/// which a Local policy's cluster-wide scope repeats.
fn cluster_value(f: &Frontend<Ipv6Addr>, id: u32, (set, slots): (u32, u32)) -> ServiceValue {
    ServiceValue {
        id,
        backend_set: set,
        backend_count: slots,
        terminating_count: 0,
        kind: super::service_kind(f.service_type),
        flags: 0,
        _pad: [0; 2],
    }
}

fn service_key(k: &FrontendKey<Ipv6Addr>) -> ServiceKey6 {
    ServiceKey6::new(k.vip.octets(), k.port, k.protocol.number())
}

/// A removal of what is already gone is no failure.
fn absent_is_removed(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    use aya::maps::MapError;
    match result {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn write_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::MapWrite { map, reason: e.to_string() }
}

/// This family's side of an adoption (see `host_flows`).
const ADOPTER: super::host_flows::Adopter =
    super::host_flows::Adopter { name: "IPv6", ipv6: true, holds_conntrack: true };

/// Clears [`flags::ADOPTING`] from every frontend and cluster-wide scope that has it.
fn clear_adopting(maps: &mut Ipv6Maps) {
    use super::adopt::flag_cleared;
    let mut failed = Vec::new();
    for (key, value) in flag_cleared(super::dump::entries(&maps.services), flags::ADOPTING) {
        failed.extend(maps.services.insert(key, value, 0).err());
    }
    for (id, value) in flag_cleared(super::dump::entries(&maps.cluster_scope), flags::ADOPTING) {
        failed.extend(maps.cluster_scope.insert(id, value, 0).err());
    }
    for e in failed {
        tracing::warn!(error = %e, "could not end the adoption of an IPv6 frontend: new flows to it go untranslated");
    }
}

impl Written {
    /// The backend sets it names: its own, and a Local policy's.
    fn sets(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        std::iter::once((self.set, self.slots)).chain(self.outside.as_ref().and_then(|o| o.local))
    }
}

impl EbpfIpv6 {
    /// Serves IPv6 through `maps`, and with rules rendered with `rules`
    /// (kept in full every `full_sync_period`) for what they do not serve, taking over the
    /// frontends a previous run left there: they serve until the first
    /// apply, which deletes those gone from the desired state. Entries that
    /// stand for no frontend, and backend sets no frontend uses, are removed.
    pub fn new(rules: RenderConfig<Ipv6Addr>, full_sync_period: Duration, mut maps: Ipv6Maps) -> Self {
        let mut written = BTreeMap::new();
        let services: Vec<(ServiceKey6, ServiceValue)> = super::dump::entries(&maps.services);
        // A run that stopped before its adoption ended left the mark.
        clear_adopting(&mut maps);
        let mut markers = Vec::new();
        let mut external = Vec::new();
        for (key, value) in &services {
            match frontend_key(key) {
                Some(_) if kind::is_external(value.kind) => external.push((*key, *value)),
                Some(frontend) => {
                    let w = Written { id: value.id, set: value.backend_set, slots: value.backend_count, outside: None };
                    written.insert(frontend, w);
                }
                None if key.is_vip_marker() => markers.push(*key),
                None => drop(maps.services.remove(key)),
            }
        }
        // The ways in from outside go with the frontend of their id.
        let by_id: BTreeMap<u32, FrontendKey<Ipv6Addr>> = written.iter().map(|(k, w)| (w.id, *k)).collect();
        for (key, value) in external {
            let Some(w) = by_id.get(&value.id).and_then(|k| written.get_mut(k)) else {
                maps.services.remove(&key).ok();
                continue;
            };
            let outside = w.outside.get_or_insert_with(Box::default);
            outside.keys.push(key);
            if value.flags & flags::LOCAL != 0 {
                outside.local = Some((value.backend_set, value.backend_count));
            }
        }
        let mut vip_users: BTreeMap<Ipv6Addr, u32> = BTreeMap::new();
        for k in written.keys() {
            *vip_users.entry(k.vip).or_default() += 1;
        }
        for marker in markers.iter().filter(|m| !vip_users.contains_key(&Ipv6Addr::from(m.addr))) {
            maps.services.remove(marker).ok();
        }
        // An older agent's frontends may have no marker yet.
        for vip in vip_users.keys() {
            maps.services.insert(ServiceKey6::vip_marker(vip.octets()), ServiceValue::MARKER, 0).ok();
        }
        let sets: HashSet<u32> = written.values().flat_map(Written::sets).map(|(set, _)| set).collect();
        let backends: Vec<BackendKey> = maps.backends.keys().filter_map(Result::ok).collect();
        for key in backends.iter().filter(|k| !sets.contains(&k.set)) {
            maps.backends.remove(key).ok();
        }
        // Counts of frontends a previous run deleted (flows still counting
        // after) would greet a new frontend given their id.
        let ids: HashSet<u32> = written.values().map(|w| w.id).collect();
        let counted: Vec<u32> = maps.service_traffic.keys().filter_map(Result::ok).collect();
        for id in counted.iter().filter(|id| !ids.contains(id)) {
            maps.service_traffic.remove(id).ok();
        }
        let counted: Vec<BackendTrafficKey6> = maps.backend_traffic.keys().filter_map(Result::ok).collect();
        for key in counted.iter().filter(|k| !ids.contains(&k.service_id)) {
            maps.backend_traffic.remove(key).ok();
        }
        let next_id = written.values().map(|w| w.id).max().map_or(1, |id| id + 1);
        let next_set = written.values().flat_map(Written::sets).map(|(set, _)| set).max().map_or(1, |set| set + 1);
        if !written.is_empty() {
            tracing::info!(frontends = written.len(), "took over the IPv6 frontends the maps hold");
        }
        Self {
            rules: Rules { written: None, config: rules, full_sync_period, leftovers_checked: false },
            node_addresses: Vec::new(),
            stale: Vec::new(),
            rules_desired: Desired::new(),
            maps,
            adopted: !written.is_empty(),
            adopting: written.is_empty(),
            adopted_flows: Vec::new(),
            written,
            vip_users,
            retiring: Vec::new(),
            next_id,
            next_set,
        }
    }

    /// `value` as written while this run adopts the node's flows.
    fn adopting(&self, value: ServiceValue) -> ServiceValue {
        if self.adopting { ServiceValue { flags: value.flags | flags::ADOPTING, ..value } } else { value }
    }

    /// Once the first sync is written: tracks the node's translated IPv6
    /// flows to the frontends (`flows`, its conntrack) and ends the
    /// adoption, as IPv4's (see `host_flows`).
    fn adopt_host_flows(&mut self, flows: std::io::Result<Vec<crate::dataplane::conntrack::Flow<Ipv6Addr>>>) {
        self.adopting = false;
        let frontends: std::collections::HashMap<ServiceKey6, ServiceValue> =
            super::dump::entries(&self.maps.services).into_iter().collect();
        let id =
            |a: Ipv6Addr, port: u16, proto| frontends.get(&ServiceKey6::new(a.octets(), port, proto)).map(|v| v.id);
        let tracked = &mut self.maps.flows;
        let write = |entries: &[(FlowKey6, CtEntry6)]| tracked.insert_all(entries).map_err(|e| e.to_string());
        self.adopted_flows = super::host_flows::adopt(ADOPTER, flows, id, |a| In6(a.octets()), write);
        clear_adopting(&mut self.maps);
    }

    /// Once the adopted flows have all ended, conntrack goes off again.
    fn release_conntrack_when_done(&mut self) {
        let flows = &self.maps.flows;
        super::host_flows::release_when_ended(ADOPTER, &mut self.adopted_flows, |k| flows.get(k).map(|e| e.state));
    }

    /// Serves node ports on `addresses` (frontends written later).
    pub fn with_node_addresses(mut self, addresses: Vec<Ipv6Addr>) -> Self {
        self.node_addresses = addresses;
        self
    }

    fn free(&mut self, (set, slots): (u32, u32)) {
        for slot in 0..slots {
            // Absent only if never written: nothing to free.
            self.maps.backends.remove(&BackendKey { set, slot }).ok();
        }
    }

    /// Writes `endpoints` as a new set; nothing is left of it if a write fails.
    fn write_set(&mut self, endpoints: &[Endpoint<Ipv6Addr>]) -> Result<(u32, u32), DataplaneError> {
        let set = self.next_set;
        self.next_set = self.next_set.wrapping_add(1).max(1);
        for (slot, e) in endpoints.iter().enumerate() {
            let key = BackendKey { set, slot: slot as u32 };
            if let Err(e) = self.maps.backends.insert(key, Backend6::new(e.ip.into(), e.port), 0) {
                self.free((set, slot as u32));
                return Err(write_error(abi::BACKENDS6)(e));
            }
        }
        Ok((set, endpoints.len() as u32))
    }

    /// Writes `f`'s ready backends as a new set and publishes it, then its
    /// ways in from outside.
    fn upsert(&mut self, f: &Frontend<Ipv6Addr>) -> Result<(), DataplaneError> {
        let (set, slots) = self.write_set(&f.backends)?;
        let old = self.written.get(&f.key).cloned();
        let id = old.as_ref().map_or_else(
            || {
                let id = self.next_id;
                self.next_id += 1;
                id
            },
            |w| w.id,
        );
        let value = self.adopting(cluster_value(f, id, (set, slots)));
        if let Err(e) = self.maps.services.insert(service_key(&f.key), value, 0) {
            self.free((set, slots));
            return Err(write_error(abi::SERVICES6)(e));
        }
        if old.is_none() {
            self.add_vip_user(f.key.vip);
        }
        if let Some(old) = &old {
            self.retiring.push((old.set, old.slots));
            let keep: HashSet<([u8; 16], [u8; 2])> =
                f.backends.iter().map(|e| (e.ip.octets(), e.port.to_be_bytes())).collect();
            // The old set is still in place until the next apply.
            let left: Vec<Backend6> =
                self.backends_of(old.set, old.slots).filter(|b| !keep.contains(&(b.addr.0, b.port))).collect();
            self.forget_traffic(id, &left);
            // Only a backend that left leaves flows and sockets to end (walking
            // the flow and socket maps costs a syscall per entry).
            if f.key.protocol == Protocol::Udp && !left.is_empty() {
                self.forget_udp_flows(id, &keep);
            }
        }
        let outside = old.and_then(|o| o.outside);
        self.written.insert(f.key, Written { id, set, slots, outside });
        self.upsert_outside(f)
    }

    /// Writes `f`'s ways in from outside (see [`outside_in_maps`]; `f` is
    /// written already) as IPv4's are: under the Cluster policy they share
    /// the ClusterIP's set, and the datapath source-NATs them; under
    /// a Local policy they get a set of this node's endpoints, and pods and
    /// node processes reach them through the cluster-wide scope, written
    /// before them. The ones `f` no longer has are removed after the rules
    /// change (see `apply`).
    fn upsert_outside(&mut self, f: &Frontend<Ipv6Addr>) -> Result<(), DataplaneError> {
        let Some(w) = self.written.get(&f.key) else { return Ok(()) };
        if w.outside.is_none() && !outside_in_maps(f) {
            // Most frontends: nothing from outside, before or now.
            return Ok(());
        }
        let (id, set, slots) = (w.id, w.set, w.slots);
        let proto = f.key.protocol.number();
        let wanted = if outside_in_maps(f) {
            super::external_entries(f, &self.node_addresses, |a, port| ServiceKey6::new(a.octets(), port, proto))
        } else {
            Vec::new()
        };
        let local_only = f.external.as_deref().is_some_and(|e| e.local_only) && !wanted.is_empty();
        let local = if local_only { Some(self.write_set(f.local_backends())?) } else { None };
        let cluster = self.adopting(cluster_value(f, id, (set, slots)));
        if local_only && let Err(e) = self.maps.cluster_scope.insert(id, cluster, 0) {
            // Nothing names the new set yet: it goes at once.
            if let Some(local) = local {
                self.free(local);
            }
            return Err(write_error(abi::CLUSTER_SCOPE6)(e));
        }
        let mut written = Vec::new();
        let mut failed = None;
        for entry in &wanted {
            let (backend_set, backend_count) = local.unwrap_or((set, slots));
            let flags = entry.flags | cluster.flags;
            let value = ServiceValue { backend_set, backend_count, kind: entry.kind, flags, ..cluster };
            match self.maps.services.insert(entry.key, value, 0) {
                Ok(()) => written.push(entry.key),
                Err(e) => {
                    failed = Some(write_error(abi::SERVICES6)(e));
                    break;
                }
            }
        }
        if !written.is_empty() {
            self.maps.reached_from_outside.store(true, Ordering::Relaxed);
        }
        let w = self.written.get_mut(&f.key).expect("looked up above");
        let old = w.outside.take().map(|o| *o).unwrap_or_default();
        // Entries written before a failure are kept (and tracked) with the old ones still wanted.
        let mut keys: Vec<ServiceKey6> =
            old.keys.iter().filter(|k| wanted.iter().any(|e| e.key == **k)).copied().collect();
        keys.extend(written.iter().filter(|k| !old.keys.contains(k)));
        w.outside = (!keys.is_empty() || local.is_some()).then(|| Box::new(Outside { keys, local }));
        let dropped = old.keys.iter().filter(|k| !wanted.iter().any(|e| e.key == **k));
        self.stale.extend(dropped.map(|key| (*key, f.key, id)));
        if let Some(old_local) = old.local {
            self.retiring.push(old_local);
        }
        if old.local.is_some() && !local_only {
            self.maps.cluster_scope.remove(&id).ok();
        }
        failed.map_or(Ok(()), Err)
    }

    /// Moves the UDP clients of frontend `id` off the backends not in
    /// `keep`: the per-packet path's flows choose again at their next
    /// datagram, and the sockets connected to one are ended (they would send
    /// to it for as long as they live).
    fn forget_udp_flows(&mut self, id: u32, keep: &HashSet<([u8; 16], [u8; 2])>) {
        let flows =
            super::conntrack_gc::forget_udp_flows(&mut self.maps.flows.any, id, |a, p| keep.contains(&(a.0, p)));
        if flows > 0 {
            tracing::debug!(service_id = id, flows, "forgot IPv6 UDP flows to removed backends");
        }
        let Some(cgroup) = &self.maps.cgroup else { return };
        let pinned: HashSet<super::sock_destroy::Pinned> = super::dump::entries(&self.maps.sock_reverse)
            .into_iter()
            .filter(|(k, v)| k.proto == PROTO_UDP && v.service_id == id && !keep.contains(&(k.addr, k.port)))
            .map(|(k, _)| (k.cookie, k.addr, k.port))
            .collect();
        let ended = super::sock_destroy::destroy(cgroup, &pinned);
        if ended > 0 {
            tracing::debug!(service_id = id, sockets = ended, "ended IPv6 UDP sockets connected to removed backends");
        }
    }

    /// Counts a new frontend of `vip`, marking the VIP with its first.
    fn add_vip_user(&mut self, vip: Ipv6Addr) {
        let users = self.vip_users.entry(vip).or_default();
        *users += 1;
        if *users == 1 {
            let marker = ServiceKey6::vip_marker(vip.octets());
            if let Err(e) = self.maps.services.insert(marker, ServiceValue::MARKER, 0) {
                // Only what cannot be translated to the VIP passes on unmarked.
                tracing::warn!(%vip, error = %e, "could not mark an IPv6 VIP");
            }
        }
    }

    /// Counts a frontend of `vip` gone, unmarking the VIP with its last.
    fn remove_vip_user(&mut self, vip: Ipv6Addr) {
        let Some(users) = self.vip_users.get_mut(&vip) else { return };
        *users -= 1;
        if *users == 0 {
            self.vip_users.remove(&vip);
            self.maps.services.remove(&ServiceKey6::vip_marker(vip.octets())).ok();
        }
    }

    fn delete(&mut self, k: &FrontendKey<Ipv6Addr>) -> Result<(), DataplaneError> {
        let Some(mut old) = self.written.remove(k) else { return Ok(()) };
        if let Some(outside) = old.outside.as_mut() {
            while let Some(key) = outside.keys.last().copied() {
                if let Err(e) = self.remove_outside(&key, old.id) {
                    self.written.insert(*k, old);
                    return Err(write_error(abi::SERVICES6)(e));
                }
                outside.keys.pop();
            }
        }
        if let Err(e) = self.maps.services.remove(&service_key(k)) {
            self.written.insert(*k, old);
            return Err(write_error(abi::SERVICES6)(e));
        }
        self.remove_vip_user(k.vip);
        if let Some(local) = old.outside.as_ref().and_then(|o| o.local) {
            self.retiring.push(local);
            self.maps.cluster_scope.remove(&old.id).ok();
        }
        self.retiring.push((old.set, old.slots));
        if k.protocol == Protocol::Udp {
            self.forget_udp_flows(old.id, &HashSet::new());
        }
        // Ids are not reused, but their counts would stay in the maps.
        self.maps.service_traffic.remove(&old.id).ok();
        let backends: Vec<Backend6> = self.backends_of(old.set, old.slots).collect();
        self.forget_traffic(old.id, &backends);
        Ok(())
    }

    /// Removes the way in from outside `key` if frontend `id` still holds it:
    /// another frontend may have taken it over in the same sync (a node
    /// port, an external or load balancer IP moving between Services).
    fn remove_outside(&mut self, key: &ServiceKey6, id: u32) -> Result<(), aya::maps::MapError> {
        match self.maps.services.get(key, 0) {
            Ok(value) if value.id == id => absent_is_removed(self.maps.services.remove(key)),
            _ => Ok(()),
        }
    }

    /// The backends in the slots of set `set`.
    fn backends_of(&self, set: u32, slots: u32) -> impl Iterator<Item = Backend6> + '_ {
        (0..slots).filter_map(move |slot| self.maps.backends.get(&BackendKey { set, slot }, 0).ok())
    }

    /// Forgets the traffic counts of frontend `id` with `backends`. Best
    /// effort: the counts are statistics.
    fn forget_traffic(&mut self, id: u32, backends: &[Backend6]) {
        for b in backends {
            self.maps.backend_traffic.remove(&BackendTrafficKey6::new(id, b.addr, b.port)).ok();
        }
    }
}

impl Dataplane<Ipv6Addr> for EbpfIpv6 {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    /// In three steps, so that each frontend is served all along: the
    /// hooks' frontends are written, then the rules change (one
    /// transaction), then the frontends the maps no longer serve leave the
    /// maps. A frontend the maps could not take is served by the rules
    /// until a retry writes it.
    fn apply(&mut self, ops: &[Op<Ipv6Addr>], desired: &Desired<Ipv6Addr>) -> Vec<ApplyError<Ipv6Addr>> {
        let mut errors = Vec::new();
        for retired in std::mem::take(&mut self.retiring) {
            self.free(retired);
        }
        // Decided once, before anything is written as adopting (see `host_flows`).
        if self.adopting {
            let flows = crate::dataplane::conntrack::flows::<Ipv6Addr>().unwrap_or_default();
            self.adopting = super::host_flows::any_translated_to(&flows, desired);
        }
        // Frontends gone from the desired state leave first, as the planner
        // orders them: a way in from outside that moves to another frontend
        // in this sync is then written for that one after this one let go.
        let mut gone: Vec<FrontendKey<Ipv6Addr>> =
            ops.iter().map(Op::key).filter(|k| !desired.contains_key(k)).collect();
        if std::mem::take(&mut self.adopted) {
            gone.extend(self.written.keys().filter(|k| !desired.contains_key(k)));
        }
        for k in gone {
            if let Err(error) = self.delete(&k) {
                errors.push(ApplyError { frontend: k, error });
            }
        }
        let served_by_maps = |k: &FrontendKey<Ipv6Addr>| desired.get(k).filter(|f| in_maps(f));
        for op in ops {
            if let Op::Upsert(k) = op
                && let Some(f) = served_by_maps(k)
                && let Err(error) = self.upsert(f)
            {
                errors.push(ApplyError { frontend: *k, error });
            }
        }
        // The first apply: before the rules change (which removes those a
        // previous run or kube-proxy left), the flows they translated are
        // adopted.
        if self.adopting {
            self.adopt_host_flows(crate::dataplane::conntrack::flows());
        }
        self.adopting = false;
        let failed: HashSet<FrontendKey<Ipv6Addr>> = errors.iter().map(|e| e.frontend).collect();
        let mut rule_ops = Vec::new();
        for k in ops.iter().map(Op::key) {
            match desired.get(&k).filter(|f| in_rules(f) || failed.contains(&k)) {
                Some(f) => {
                    self.rules_desired.insert(k, f.clone());
                    rule_ops.push(Op::Upsert(k));
                }
                None => {
                    if self.rules_desired.remove(&k).is_some() {
                        rule_ops.push(Op::Delete(k));
                    }
                }
            }
        }
        let rule_errors = self.rules.apply(&rule_ops, &self.rules_desired);
        let unruled: HashSet<FrontendKey<Ipv6Addr>> = rule_errors.iter().map(|e| e.frontend).collect();
        errors.extend(rule_errors);
        // What moved from the maps to the rules leaves the maps once the
        // rules serve it (until then, and while they fail, the maps do).
        let moved: Vec<FrontendKey<Ipv6Addr>> = ops
            .iter()
            .map(Op::key)
            .filter(|k| desired.contains_key(k) && served_by_maps(k).is_none() && !unruled.contains(k))
            .collect();
        for k in moved {
            if let Err(error) = self.delete(&k) {
                errors.push(ApplyError { frontend: k, error });
            }
        }
        let (kept, stale): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.stale).into_iter().partition(|(_, frontend, _)| unruled.contains(frontend));
        self.stale = kept;
        for (key, _, id) in stale {
            if let Err(e) = self.remove_outside(&key, id) {
                tracing::warn!(error = %e, "could not remove an IPv6 way in from outside; it serves until the next change");
            }
        }
        errors
    }

    /// The rules are checked, and rewritten from what they serve; the maps
    /// are rewritten at each frontend's next change.
    fn repair(&mut self, _desired: &Desired<Ipv6Addr>) -> usize {
        self.release_conntrack_when_done();
        let marks = self.maps.services.repair_marks() + self.maps.backends.repair_marks();
        if marks > 0 {
            tracing::warn!(words = marks, "IPv6 port marks someone else cleared were written again");
        }
        marks + self.rules.repair(&self.rules_desired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        frontend::{Endpoint, External, ServiceType},
        name::{ObjectName, ServicePortName},
    };

    fn frontend(protocol: Protocol) -> Frontend<Ipv6Addr> {
        Frontend {
            service: ServicePortName { service: ObjectName::new("default", "web"), port: "".into() },
            key: FrontendKey { vip: "fd00:96::20".parse().unwrap(), port: 80, protocol },
            service_type: ServiceType::ClusterIP,
            external: None,
            backends: [Endpoint { ip: "fd00:244::11".parse().unwrap(), port: 8080 }].into(),
            terminating: Box::default(),
            internal_local: false,
            affinity_timeout: None,
            extras: None,
        }
    }

    #[test]
    fn what_the_maps_serve_has_no_rules() {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let f = frontend(protocol);
            assert!(in_maps(&f) && !in_rules(&f), "{protocol}");
        }
        // Reached from outside, under either policy: the maps' too.
        let external = |external: External<Ipv6Addr>| Frontend {
            service_type: ServiceType::LoadBalancer,
            external: Some(Box::new(external)),
            ..frontend(Protocol::Tcp)
        };
        let lb: Box<[Ipv6Addr]> = ["fd00:e::8".parse().unwrap()].into();
        for local_only in [false, true] {
            let f = external(External {
                node_port: Some(30080),
                load_balancer_ips: lb.clone(),
                local_only,
                ..Default::default()
            });
            assert!(outside_in_maps(&f) && !in_rules(&f), "local_only {local_only}");
        }
        // Load balancer IPs fenced by source ranges are the rules' (and
        // with them the whole frontend, which the maps serve as well).
        let fenced = external(External {
            load_balancer_ips: lb,
            source_ranges: ["fd00:100::/64".parse().unwrap()].into(),
            ..Default::default()
        });
        assert!(in_maps(&fenced) && !outside_in_maps(&fenced) && in_rules(&fenced));
        // What the maps do not serve is the rules' alone.
        for f in [
            Frontend { internal_local: true, ..frontend(Protocol::Tcp) },
            Frontend { affinity_timeout: Some(10_800), ..frontend(Protocol::Tcp) },
            frontend(Protocol::Sctp),
        ] {
            assert!(!in_maps(&f) && in_rules(&f), "{:?}", f.key);
        }
    }

    #[test]
    fn map_entries_stand_for_tcp_and_udp_frontends() {
        let key = ServiceKey6::new("fd00:96::20".parse::<Ipv6Addr>().unwrap().octets(), 80, PROTO_UDP);
        let f = frontend_key(&key).unwrap();
        assert_eq!((f.vip.to_string(), f.port, f.protocol), ("fd00:96::20".into(), 80, Protocol::Udp));
        assert_eq!(frontend_key(&ServiceKey6::new([0; 16], 80, abi::PROTO_SCTP)), None);
    }
}
