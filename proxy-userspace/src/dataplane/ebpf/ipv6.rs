//! eBPF mode's IPv6 family: kube-proxy's ip6tables rules for every IPv6
//! frontend, and, where the socket hooks are attached, the IPv6 TCP and UDP
//! ClusterIPs in [`abi::SERVICES6`], so pods and node processes under the
//! cgroup connect straight to a backend (`connect6`) and see the VIP as
//! their peer (`getpeername6`, and `recvmsg6` for connected UDP). A UDP
//! socket connected to a backend that leaves is ended (see `sock_destroy`),
//! as IPv4 ones are. A frontend with a Local internal policy or session
//! affinity, and unconnected UDP, stay with the rules alone.
//!
//! A backend set is switched as the IPv4 ones are: written whole under a
//! fresh set id, published by rewriting the frontend's entry, and freed
//! only at the next apply (a hook that read the entry just before still
//! finds its slots). The maps start empty on every start: until the first
//! sync, connects to IPv6 VIPs are translated by the rules, which stay
//! in place across restarts.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv6Addr,
    path::PathBuf,
};

use aya::maps::{HashMap, MapData};
use proxy_common::maps::{
    self as abi, Backend6, BackendKey, PROTO_UDP, ReverseEntry6, ServiceKey6, ServiceValue, SockKey6,
};

use crate::{
    dataplane::{ApplyError, Dataplane, DataplaneError, Desired, Mode, iptables::IptablesDataplane},
    frontend::{Frontend, FrontendKey, Protocol},
    planner::Op,
};

/// The socket hooks' IPv6 maps, and the cgroup they serve.
pub struct Ipv6Maps {
    pub services: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub backends: HashMap<MapData, BackendKey, Backend6>,
    /// Which backend each connected socket was given.
    pub sock_reverse: HashMap<MapData, SockKey6, ReverseEntry6>,
    pub cgroup: PathBuf,
}

/// What one frontend holds in the maps.
#[derive(Clone, Copy, Debug)]
struct Written {
    id: u32,
    set: u32,
    slots: u32,
}

pub struct EbpfIpv6 {
    rules: IptablesDataplane<Ipv6Addr>,
    maps: Ipv6Maps,
    written: BTreeMap<FrontendKey<Ipv6Addr>, Written>,
    /// Sets replaced or deleted at the last apply, freed at the next.
    retiring: Vec<(u32, u32)>,
    next_id: u32,
    next_set: u32,
}

/// Whether the socket hooks serve `f`: a TCP or UDP frontend that every
/// pod and node process reaches alike, with no memory of its clients.
fn on_sockets(f: &Frontend<Ipv6Addr>) -> bool {
    matches!(f.key.protocol, Protocol::Tcp | Protocol::Udp) && !f.internal_local && f.affinity_timeout.is_none()
}

fn service_key(k: &FrontendKey<Ipv6Addr>) -> ServiceKey6 {
    ServiceKey6::new(k.vip.octets(), k.port, k.protocol.number())
}

fn write_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::MapWrite { map, reason: e.to_string() }
}

impl EbpfIpv6 {
    /// Serves IPv6 with `rules`, and through `maps` (emptied of a previous run's entries).
    pub fn new(rules: IptablesDataplane<Ipv6Addr>, mut maps: Ipv6Maps) -> Self {
        let services: Vec<ServiceKey6> = maps.services.keys().filter_map(Result::ok).collect();
        for key in services {
            maps.services.remove(&key).ok();
        }
        let backends: Vec<BackendKey> = maps.backends.keys().filter_map(Result::ok).collect();
        for key in backends {
            maps.backends.remove(&key).ok();
        }
        Self { rules, maps, written: BTreeMap::new(), retiring: Vec::new(), next_id: 1, next_set: 1 }
    }

    fn free(&mut self, (set, slots): (u32, u32)) {
        for slot in 0..slots {
            // Absent only if never written: nothing to free.
            self.maps.backends.remove(&BackendKey { set, slot }).ok();
        }
    }

    /// Writes `f`'s ready backends as a new set and publishes it.
    fn upsert(&mut self, f: &Frontend<Ipv6Addr>) -> Result<(), DataplaneError> {
        let set = self.next_set;
        self.next_set = self.next_set.wrapping_add(1).max(1);
        for (slot, e) in f.backends.iter().enumerate() {
            let key = BackendKey { set, slot: slot as u32 };
            if let Err(e) = self.maps.backends.insert(key, Backend6::new(e.ip.octets(), e.port), 0) {
                self.free((set, slot as u32));
                return Err(write_error(abi::BACKENDS6)(e));
            }
        }
        let slots = f.backends.len() as u32;
        let old = self.written.get(&f.key).copied();
        let id = old.map_or_else(
            || {
                let id = self.next_id;
                self.next_id += 1;
                id
            },
            |w| w.id,
        );
        let value = ServiceValue {
            id,
            backend_set: set,
            backend_count: slots,
            terminating_count: 0,
            kind: super::service_kind(f.service_type),
            flags: 0,
            _pad: [0; 2],
        };
        if let Err(e) = self.maps.services.insert(service_key(&f.key), value, 0) {
            self.free((set, slots));
            return Err(write_error(abi::SERVICES6)(e));
        }
        if let Some(old) = old {
            self.retiring.push((old.set, old.slots));
            if f.key.protocol == Protocol::Udp {
                let keep: HashSet<([u8; 16], [u8; 2])> =
                    f.backends.iter().map(|e| (e.ip.octets(), e.port.to_be_bytes())).collect();
                // Only a backend that left leaves sockets to end (walking the
                // socket map costs a syscall per entry); the old set is still
                // in place until the next apply.
                let left = (0..old.slots).any(|slot| {
                    let backend = self.maps.backends.get(&BackendKey { set: old.set, slot }, 0);
                    backend.is_ok_and(|b| !keep.contains(&(b.addr, b.port)))
                });
                if left {
                    self.end_udp_sockets(id, &keep);
                }
            }
        }
        self.written.insert(f.key, Written { id, set, slots });
        Ok(())
    }

    /// Ends the UDP sockets connected for frontend `id` to a backend not in
    /// `keep`: they would send to it for as long as they live.
    fn end_udp_sockets(&self, id: u32, keep: &HashSet<([u8; 16], [u8; 2])>) {
        let pinned: HashSet<super::sock_destroy::Pinned> = self
            .maps
            .sock_reverse
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| k.proto == PROTO_UDP && v.service_id == id && !keep.contains(&(k.addr, k.port)))
            .map(|(k, _)| (k.cookie, k.addr, k.port))
            .collect();
        let ended = super::sock_destroy::destroy(&self.maps.cgroup, &pinned);
        if ended > 0 {
            tracing::debug!(service_id = id, sockets = ended, "ended IPv6 UDP sockets connected to removed backends");
        }
    }

    fn delete(&mut self, k: &FrontendKey<Ipv6Addr>) -> Result<(), DataplaneError> {
        let Some(old) = self.written.remove(k) else { return Ok(()) };
        if let Err(e) = self.maps.services.remove(&service_key(k)) {
            self.written.insert(*k, old);
            return Err(write_error(abi::SERVICES6)(e));
        }
        self.retiring.push((old.set, old.slots));
        if k.protocol == Protocol::Udp {
            self.end_udp_sockets(old.id, &HashSet::new());
        }
        Ok(())
    }
}

impl Dataplane<Ipv6Addr> for EbpfIpv6 {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    fn apply(&mut self, ops: &[Op<Ipv6Addr>], desired: &Desired<Ipv6Addr>) -> Vec<ApplyError<Ipv6Addr>> {
        let mut errors = self.rules.apply(ops, desired);
        for retired in std::mem::take(&mut self.retiring) {
            self.free(retired);
        }
        for op in ops {
            let (key, done) = match op {
                Op::Upsert(k) => match desired.get(k).filter(|f| on_sockets(f)) {
                    Some(f) => (k, self.upsert(f)),
                    // Now the rules' alone (its policy or affinity changed).
                    None => (k, self.delete(k)),
                },
                Op::Delete(k) => (k, self.delete(k)),
            };
            if let Err(error) = done {
                errors.push(ApplyError { frontend: *key, error });
            }
        }
        errors
    }

    fn repair(&mut self, desired: &Desired<Ipv6Addr>) -> usize {
        self.rules.repair(desired)
    }
}
