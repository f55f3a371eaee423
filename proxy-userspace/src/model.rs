//! The desired state: every Service frontend and the endpoints behind it,
//! recomputed incrementally from the validated objects in the [`Index`].
//! [`Model::update`] recomputes the touched Services and returns what
//! changed; it never talks to a dataplane.
//!
//! Two Services claiming one frontend, or one external address (external
//! IP or load balancer IP at a port, or node port): the older one (by
//! creation timestamp, then by namespace/name) keeps it, whatever order they
//! arrived in, so a cold start and a stream of changes agree.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::{IpAddr, Ipv4Addr},
};

use smallvec::SmallVec;

use crate::{
    frontend::{Change, DNS_PORT, DnsCapture, Endpoint, External, Extras, Frontend, FrontendKey},
    index::{Dirty, Index, Snapshot},
    name::{ObjectName, ServicePortName},
    rejection::{RejectReason, Rejection},
    validate::{Served, ServiceInfo, SliceEndpoint, SliceInfo},
};

/// The desired state of one IP family: every frontend (each names the
/// Service owning it). Each family has its own model, fed from the same
/// index, as kube-proxy runs one proxier per family.
pub struct Model<A = Ipv4Addr> {
    pub frontends: BTreeMap<FrontendKey<A>, Frontend<A>>,
    /// The frontends each Service asked for when last computed, to find
    /// what it held once it changes or goes.
    services: HashMap<ObjectName, SmallVec<[FrontendKey<A>; 1]>>,
    /// Services that lost frontends to older ones, with why: retried when
    /// frontends are released.
    conflicts: HashMap<ObjectName, Vec<Rejection>>,
    rejection_count: usize,
    /// Ready endpoints over all frontends, kept as frontends come and go.
    backend_count: usize,
    /// Frontends with a health check node port, kept as frontends come and
    /// go, so the health servers follow without walking every frontend.
    health_checked: BTreeSet<FrontendKey<A>>,
    /// External addresses (see [`external_claims`]) -> the frontend they
    /// reach, so two Services never claim one.
    external_owners: HashMap<FrontendKey<A>, FrontendKey<A>>,
}

impl<A> Default for Model<A> {
    fn default() -> Self {
        Self {
            frontends: BTreeMap::new(),
            services: HashMap::new(),
            conflicts: HashMap::new(),
            rejection_count: 0,
            backend_count: 0,
            health_checked: BTreeSet::new(),
            external_owners: HashMap::new(),
        }
    }
}

/// The addresses a frontend is reached at from outside, as frontend keys:
/// its external and load balancer IPs at its port, and its node port (on
/// every node address, so keyed by the unspecified address).
fn external_claims<A: Served>(f: &Frontend<A>) -> Vec<FrontendKey<A>> {
    let Some(ext) = f.external.as_deref() else { return Vec::new() };
    let at = |vip: A, port: u16| FrontendKey { vip, port, protocol: f.key.protocol };
    let addresses = ext.external_ips.iter().chain(&ext.load_balancer_ips[..]).map(|ip| at(*ip, f.key.port));
    addresses.chain(ext.node_port.map(|np| at(A::UNSPECIFIED, np))).collect()
}

/// How a claim reads in a rejection.
fn claim_text<A: Served>(claim: &FrontendKey<A>) -> String {
    if claim.vip == A::UNSPECIFIED { format!("node port {}/{}", claim.port, claim.protocol) } else { claim.to_string() }
}

/// `f` without the external addresses in `lost`.
fn without_claims<A: Served>(mut f: Frontend<A>, lost: &[FrontendKey<A>]) -> Frontend<A> {
    let (port, protocol) = (f.key.port, f.key.protocol);
    if let Some(ext) = f.external.as_deref_mut() {
        let kept = |ip: &A| !lost.contains(&FrontendKey { vip: *ip, port, protocol });
        ext.external_ips = ext.external_ips.iter().copied().filter(kept).collect();
        ext.load_balancer_ips = ext.load_balancer_ips.iter().copied().filter(kept).collect();
        if ext.node_port.is_some_and(|np| lost.contains(&FrontendKey { vip: A::UNSPECIFIED, port: np, protocol })) {
            ext.node_port = None;
            ext.health_check_node_port = None;
        }
    }
    if f.external.as_deref().is_some_and(External::is_empty) {
        f.external = None;
    }
    f
}

/// The result of recomputing some Services.
#[derive(Debug)]
pub struct Update<A = Ipv4Addr> {
    /// Every frontend that differs from before, sorted by key.
    pub changes: Vec<Change<A>>,
    /// Conflicts raised now that were not raised before, for logs and counters.
    pub new_rejections: Vec<Rejection>,
}

/// Of two Services claiming one frontend, the one that sorts first keeps it.
type Rank = (Option<i64>, ObjectName);

fn rank(index: &Index, name: &ObjectName) -> Rank {
    (index.service(name).and_then(|s| s.created), name.clone())
}

/// Work for one [`Model::update`].
struct Pass<'a, A> {
    index: &'a Index,
    queue: VecDeque<ObjectName>,
    queued: HashSet<ObjectName>,
    /// Each touched frontend as it was; boxed, as at a cold start all are `None`.
    before: HashMap<FrontendKey<A>, Option<Box<Frontend<A>>>>,
    new_rejections: Vec<Rejection>,
    released: bool,
}

impl<A> Pass<'_, A> {
    fn push(&mut self, name: ObjectName) {
        if self.queued.insert(name.clone()) {
            self.queue.push_back(name);
        }
    }
}

impl<A: Served> Model<A> {
    /// Conflicts between Services (validation rejections live in the index).
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.conflicts.values().flatten()
    }

    pub fn rejection_count(&self) -> usize {
        self.rejection_count
    }

    /// Ready endpoints over all frontends (without walking them).
    pub fn backend_count(&self) -> usize {
        self.backend_count
    }

    /// Frontends whose Service has a health check node port.
    pub fn health_checked(&self) -> impl Iterator<Item = &Frontend<A>> {
        self.health_checked.iter().filter_map(|k| self.frontends.get(k))
    }

    fn insert_frontend(&mut self, f: Frontend<A>) {
        self.backend_count += f.backends.len();
        if f.external.as_deref().is_some_and(|e| e.health_check_node_port.is_some()) {
            self.health_checked.insert(f.key);
        } else {
            self.health_checked.remove(&f.key);
        }
        for claim in external_claims(&f) {
            self.external_owners.insert(claim, f.key);
        }
        if let Some(old) = self.frontends.insert(f.key, f) {
            self.backend_count -= old.backends.len();
        }
    }

    fn remove_frontend(&mut self, key: &FrontendKey<A>) -> Option<Frontend<A>> {
        let old = self.frontends.remove(key)?;
        self.backend_count -= old.backends.len();
        self.health_checked.remove(key);
        for claim in external_claims(&old) {
            if self.external_owners.get(&claim) == Some(key) {
                self.external_owners.remove(&claim);
            }
        }
        Some(old)
    }

    /// `f` (of Service `service`, ranked `mine`) without the external
    /// addresses an older Service's frontend holds, each reported; those a
    /// younger Service holds are taken, and it is recomputed without them.
    fn arbitrate_external(
        &mut self,
        f: Frontend<A>,
        service: &ObjectName,
        mine: &Rank,
        pass: &mut Pass<'_, A>,
        rejections: &mut Vec<Rejection>,
    ) -> Frontend<A> {
        // What is lost, by the older frontend holding it.
        let mut lost: BTreeMap<ServicePortName, Vec<FrontendKey<A>>> = BTreeMap::new();
        for claim in external_claims(&f) {
            let Some(owner) = self.external_owners.get(&claim).filter(|o| **o != f.key) else { continue };
            let Some(other) = self.frontends.get(owner).map(|o| o.service.clone()) else { continue };
            if other.service == *service {
                continue;
            }
            if rank(pass.index, &other.service) < *mine {
                lost.entry(other).or_default().push(claim);
            } else {
                pass.push(other.service);
            }
        }
        let origin = pass.index.service(service).map(|s| s.origin.to_string()).unwrap_or_default();
        for (other, claims) in &lost {
            let claims: Vec<String> = claims.iter().map(claim_text).collect();
            rejections.push(Rejection {
                origin: origin.clone(),
                object: format!("Service {service}"),
                kind: RejectReason::FrontendConflict,
                reason: format!("{} of {}: already used by {other}, an older Service", claims.join(", "), f.service),
            });
        }
        let lost: Vec<FrontendKey<A>> = lost.into_values().flatten().collect();
        if lost.is_empty() { f } else { without_claims(f, &lost) }
    }

    /// Recomputes the `dirty` Services from `index`, keeping everything
    /// else as it is; returns every frontend that changed.
    pub fn update(&mut self, index: &Index, dirty: Dirty) -> Update<A> {
        let mut keys: Vec<ObjectName> = match dirty {
            Dirty::None => vec![],
            // Only the Services with a ClusterIP of this family, and those
            // that held frontends: a family few Services use (IPv6 on most
            // clusters) does not queue every Service at a cold start.
            Dirty::All => index
                .service_keys()
                .filter(|k| index.service(k).is_some_and(|s| A::addresses(s).is_some()))
                .chain(self.services.keys())
                .cloned()
                .collect(),
            Dirty::Some(set) => set.into_iter().collect(),
        };
        keys.sort();
        keys.dedup();
        let mut pass = Pass {
            index,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            before: HashMap::new(),
            new_rejections: Vec::new(),
            released: false,
        };
        for key in keys {
            pass.push(key);
        }
        self.drain(&mut pass);
        if pass.released {
            // Frontends were freed: Services that lost a conflict may take them now.
            let mut retry: Vec<ObjectName> = self.conflicts.keys().cloned().collect();
            retry.sort();
            for key in retry {
                pass.push(key);
            }
            self.drain(&mut pass);
        }
        let mut changes: Vec<Change<A>> = pass
            .before
            .into_iter()
            .filter_map(|(key, before)| {
                let now = self.frontends.get(&key);
                (before.as_deref() != now).then(|| Change { key, before, exists: now.is_some() })
            })
            .collect();
        changes.sort_by_key(|c| c.key);
        Update { changes, new_rejections: pass.new_rejections }
    }

    fn drain(&mut self, pass: &mut Pass<'_, A>) {
        while let Some(key) = pass.queue.pop_front() {
            pass.queued.remove(&key);
            self.recompute(&key, pass);
        }
    }

    /// Recomputes one Service, taking frontends from younger Services that
    /// hold them (they are queued to be recomputed as losers).
    fn owner(&self, key: &FrontendKey<A>) -> Option<&ObjectName> {
        self.frontends.get(key).map(|f| &f.service.service)
    }

    fn recompute(&mut self, key: &ObjectName, pass: &mut Pass<'_, A>) {
        let old_keys = self.services.remove(key).unwrap_or_default();
        let old_rejections = self.conflicts.remove(key).unwrap_or_default();
        self.rejection_count -= old_rejections.len();
        for k in &old_keys {
            if self.owner(k) == Some(key) {
                let previous = self.remove_frontend(k).map(Box::new);
                pass.before.entry(*k).or_insert(previous);
                pass.released = true;
            }
        }
        let Some(info) = pass.index.service(key) else { return };
        // No ClusterIP of this family: the other family's model serves it.
        let Some(addresses) = A::addresses(info) else { return };
        let mine = rank(pass.index, key);
        let mut keys = SmallVec::with_capacity(info.ports.len());
        let mut rejections = Vec::new();
        let slices: Vec<&SliceInfo> = pass.index.slices_of(key).collect();
        for f in frontends(info, addresses, &slices, pass.index.zone(), pass.index.dns_capture()) {
            if let Some(other) = self.frontends.get(&f.key) {
                let other = other.service.clone();
                if other.service == *key {
                    // The same frontend twice in one Service: the first port keeps it.
                    continue;
                }
                if rank(pass.index, &other.service) < mine {
                    rejections.push(Rejection {
                        origin: info.origin.to_string(),
                        object: format!("Service {key}"),
                        kind: RejectReason::FrontendConflict,
                        reason: format!("{} is already used by {other}, an older Service", f.key),
                    });
                    continue;
                }
                // This Service is older: the frontend is ours, the other recomputes without it.
                let previous = self.remove_frontend(&f.key).map(Box::new);
                pass.before.entry(f.key).or_insert(previous);
                pass.push(other.service);
            }
            let f = self.arbitrate_external(f, key, &mine, pass, &mut rejections);
            pass.before.entry(f.key).or_insert(None);
            keys.push(f.key);
            self.insert_frontend(f);
        }
        pass.new_rejections.extend(rejections.iter().filter(|r| !old_rejections.contains(r)).cloned());
        self.rejection_count += rejections.len();
        if !rejections.is_empty() {
            self.conflicts.insert(key.clone(), rejections);
        }
        self.services.insert(key.clone(), keys);
    }
}

/// Which endpoints topology-aware routing keeps for this node, as
/// kube-proxy decides it from the ready endpoints' hints: those meant for
/// this node if every one has node hints and one is for it
/// (`trafficDistribution: PreferSameNode`), else those for this node's zone
/// if every one has zone hints and one is for it (`PreferClose`, and the
/// older topology-aware hints), else all of them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology<'a> {
    All,
    SameNode,
    SameZone(&'a str),
}

impl<'a> Topology<'a> {
    fn of<'e, A: 'e>(ready: impl Iterator<Item = &'e SliceEndpoint<A>> + Clone, zone: Option<&'a str>) -> Self {
        let all_node_hints = ready.clone().all(|e| e.for_this_node().is_some());
        if all_node_hints && ready.clone().any(|e| e.for_this_node() == Some(true)) {
            return Topology::SameNode;
        }
        let all_zone_hints = ready.clone().all(|e| e.zones().is_some());
        match zone {
            Some(zone) if all_zone_hints && ready.clone().any(|e| in_zone(e, zone)) => Topology::SameZone(zone),
            _ => Topology::All,
        }
    }

    fn keeps<A>(self, e: &SliceEndpoint<A>) -> bool {
        match self {
            Topology::All => true,
            Topology::SameNode => e.for_this_node() == Some(true),
            Topology::SameZone(zone) => in_zone(e, zone),
        }
    }
}

fn in_zone<A>(e: &SliceEndpoint<A>, zone: &str) -> bool {
    e.zones().is_some_and(|zones| zones.iter().any(|z| &**z == zone))
}

/// The frontends of one Service: per port, the endpoints of every slice
/// port with the same name and protocol, merged and de-duplicated; this
/// node in `zone`; its DNS port led to the DNS add-on if `capture` takes it.
fn frontends<A: Served>(
    info: &ServiceInfo,
    (vip, external_addresses): (A, Option<&External<A>>),
    slices: &[&SliceInfo],
    zone: Option<&str>,
    capture: Option<&DnsCapture>,
) -> Vec<Frontend<A>> {
    // The add-on answers on an IPv4 address: it stands in for the IPv4 ClusterIP.
    let captured = capture
        .filter(|c| c.answering && c.service == info.name)
        .and_then(|c| Some(Endpoint { ip: A::of(IpAddr::V4(c.to.ip))?, port: c.to.port }));
    let mut frontends = Vec::with_capacity(info.ports.len());
    for port in &info.ports {
        let mut backends = BTreeSet::new();
        let mut terminating = BTreeSet::new();
        let (mut local, mut local_terminating) = (BTreeSet::new(), BTreeSet::new());
        let targets: Vec<(&SliceInfo, u16)> = slices
            .iter()
            .filter_map(|slice| {
                let target = slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol)?;
                Some((*slice, target.port))
            })
            .collect();
        let ready = targets.iter().flat_map(|(slice, _)| A::endpoints(slice).iter()).filter(|e| e.ready);
        let topology = Topology::of(ready, zone);
        for (slice, target) in &targets {
            for ep in A::endpoints(slice) {
                let endpoint = Endpoint { ip: ep.ip, port: *target };
                if ep.ready {
                    if topology.keeps(ep) {
                        backends.insert(endpoint);
                    }
                } else if ep.serving && ep.terminating {
                    terminating.insert(endpoint);
                }
                if ep.local && ep.ready {
                    local.insert(endpoint);
                } else if ep.local && ep.serving && ep.terminating {
                    local_terminating.insert(endpoint);
                }
            }
        }
        // An address both ready (in one slice) and terminating (in another) is ready.
        let mut terminating: BTreeSet<Endpoint<A>> = terminating.difference(&backends).copied().collect();
        // kube-proxy (KEP-1669): with no ready endpoint, new connections go
        // to the serving-and-terminating ones rather than being refused.
        if backends.is_empty() {
            backends = std::mem::take(&mut terminating);
        }
        let external = external(external_addresses, port);
        let local_policy = info.internal_local || external.as_deref().is_some_and(|e| e.local_only);
        // The same fallback among this node's endpoints.
        let mut local = if local.is_empty() { local_terminating } else { local };
        if let Some(to) = captured.filter(|_| port.port == DNS_PORT) {
            // The add-on answers on this node: it alone serves the port, whatever the policies.
            backends = [to].into();
            terminating.clear();
            if local_policy {
                local = [to].into();
            }
        }
        frontends.push(Frontend {
            service: ServicePortName { service: info.name.clone(), port: port.name.clone() },
            key: FrontendKey { vip, port: port.port, protocol: port.protocol },
            service_type: info.service_type,
            external,
            backends: backends.into_iter().collect(),
            terminating: terminating.into_iter().collect(),
            internal_local: info.internal_local,
            affinity_timeout: info.affinity_timeout,
            extras: Extras::of(
                if local_policy { local.into_iter().collect() } else { Box::default() },
                port.app_protocol.clone(),
            ),
        });
    }
    frontends
}

/// How one port of a Service is reached from outside, if it is.
fn external<A: Copy>(service: Option<&External<A>>, port: &crate::validate::ServicePort) -> Option<Box<External<A>>> {
    let service = service?;
    let external = External { node_port: port.node_port, ..service.clone() };
    (!external.is_empty()).then(|| Box::new(external))
}

/// Builds one family's model from a snapshot in one go; returns it with every rejection.
pub fn build<A: Served>(snapshot: Snapshot) -> (Model<A>, Vec<Rejection>) {
    let index = Index::from_snapshot(snapshot);
    let mut model = Model::default();
    model.update(&index, Dirty::All);
    let rejected = index.rejections().chain(model.rejections()).cloned().collect();
    (model, rejected)
}

#[cfg(test)]
mod tests;
