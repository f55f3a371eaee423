//! Flows the node's rules translated before eBPF mode served (iptables
//! mode's or kube-proxy's DNAT), which the node's conntrack goes on
//! translating after the rules go.
//!
//! Were the per-packet path to translate a later packet of such a flow
//! itself, conntrack would see a new flow whose reply tuple is the one it
//! already has, and would resolve the clash by moving the client to another
//! source port: the backend, which knows the connection by the first port,
//! resets it. So when the node's conntrack holds such flows, the first
//! sync writes every frontend with [`flags::ADOPTING`], where the datapath
//! leaves to the node every packet no tracked flow claims but a TCP SYN
//! (the one packet sure to start a new flow); then, before that sync ends
//! and the rules go, the agent reads the node's conntrack again, tracks
//! each flow translated to a frontend with [`STATE_HOST`] (its packets pass
//! untranslated while it lives), and clears the flag. Each family's
//! dataplane does so with its own maps.
//!
//! The node's conntrack translates those flows only while something in
//! the family needs it: netfilter registers its connection tracking (and
//! NAT) hooks in a network namespace only while a rule uses them, and the
//! rules that did go once eBPF mode serves. So while adopted flows live,
//! a rule that does nothing but need them stays in each nat chain
//! ([`hold_conntrack`]); it goes once the last has ended
//! ([`release_conntrack`]), and with it the cost of tracking every packet.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use proxy_common::{
    conntrack::{CtEntry, FlowKey, STATE_CLOSING, STATE_HOST, STATE_REPLIED},
    maps::{PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue, flags},
};

use super::{EbpfDataplane, maps::ServiceMaps};
use crate::{
    dataplane::{DataplaneError, Desired, conntrack::Flow, iptables::backend::Backend},
    frontend::Family,
};

const COMMENT: &str = "kpr ebpf: keeps conntrack on for flows taken over from the node's rules";
/// The nat chains: the node's NAT applies a flow's translation at each.
const NAT_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// Runs `iptables -t nat OP CHAIN` on `backend` with the rule that holds conntrack.
fn holding_rule(backend: Backend, op: &str, chain: &str) -> Result<bool, DataplaneError> {
    let args = ["-t", "nat", op, chain, "-m", "conntrack", "--ctstate", "DNAT", "-m", "comment", "--comment", COMMENT];
    backend.iptables(&args)
}

/// Keeps the family's (`ipv6`) connection tracking and NAT on, with a
/// rule in each nat chain of the backend the node uses.
pub(super) fn hold_conntrack(ipv6: bool) -> Result<(), DataplaneError> {
    let backend = crate::dataplane::iptables::backend::detect(ipv6);
    for chain in NAT_CHAINS {
        if !holding_rule(backend, "-C", chain)? && !holding_rule(backend, "-A", chain)? {
            return Err(DataplaneError::Command {
                command: format!("{} -t nat -A {chain}", backend.name()),
                reason: "could not keep conntrack on for the flows taken over".into(),
            });
        }
    }
    Ok(())
}

/// Removes the rules of [`hold_conntrack`] from both backends of the family.
pub fn release_conntrack(ipv6: bool) {
    // Not where there is no nat table: asking would make one.
    for backend in Backend::ALL.into_iter().filter(|b| b.ipv6 == ipv6 && b.has_table("nat")) {
        for chain in NAT_CHAINS {
            while holding_rule(backend, "-D", chain).unwrap_or(false) {}
        }
    }
}

/// conntrack's TCP states (`enum tcp_conntrack`) this tracking tells apart.
const TCP_CONNTRACK_SYN_SENT: u8 = 1;
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
const TCP_CONNTRACK_SYN_SENT2: u8 = 9;

/// The conntrack entry state a flow in conntrack's TCP `state` starts with.
fn state_of(proto: u8, tcp_state: u8) -> u8 {
    if proto != PROTO_TCP {
        return STATE_HOST | STATE_REPLIED;
    }
    match tcp_state {
        TCP_CONNTRACK_SYN_SENT | TCP_CONNTRACK_SYN_SENT2 => STATE_HOST,
        // SYN_RECV, ESTABLISHED.
        ..=TCP_CONNTRACK_ESTABLISHED => STATE_HOST | STATE_REPLIED,
        // FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE.
        _ => STATE_HOST | STATE_REPLIED | STATE_CLOSING,
    }
}

/// The service entries tracking, as the node's, each flow of `flows` that
/// was translated to a frontend (`frontend_id` of its address, port and
/// protocol), seen at `now`; `bytes` writes an address as the maps do.
pub(super) fn entries<A: Copy + PartialEq, B: Copy>(
    flows: &[Flow<A>],
    frontend_id: impl Fn(A, u16, u8) -> Option<u32>,
    bytes: impl Fn(A) -> B,
    now: u32,
) -> Vec<(FlowKey<B>, CtEntry<B>)> {
    let translated = |f: &&Flow<A>| matches!(f.proto, PROTO_TCP | PROTO_UDP) && f.replier != f.addressed;
    flows
        .iter()
        .filter(translated)
        .filter_map(|f| {
            let id = frontend_id(f.addressed.0, f.addressed.1, f.proto)?;
            let port = |p: u16| p.to_be_bytes();
            let key = FlowKey::service(
                bytes(f.client.0),
                port(f.client.1),
                bytes(f.addressed.0),
                port(f.addressed.1),
                f.proto,
            );
            let entry = CtEntry {
                state: state_of(f.proto, f.tcp_state),
                ..CtEntry::new(bytes(f.replier.0), port(f.replier.1), id, 0, now)
            };
            Some((key, entry))
        })
        .collect()
}

/// Whether any of `flows` was translated to a frontend of `desired`: its
/// ClusterIP, external or load balancer IPs at its port, or its node port
/// on any address. Only then is there anything to adopt; otherwise the
/// first sync is written as any other.
pub(super) fn any_translated_to<A: Family>(flows: &[Flow<A>], desired: &Desired<A>) -> bool {
    let mut addressed: HashSet<(A, u16, u8)> = HashSet::new();
    let mut node_ports: HashSet<(u16, u8)> = HashSet::new();
    for f in desired.values() {
        let proto = f.key.protocol.number();
        addressed.insert((f.key.vip, f.key.port, proto));
        if let Some(ext) = f.external.as_deref() {
            node_ports.extend(ext.node_port.map(|p| (p, proto)));
            let ips = ext.external_ips.iter().chain(ext.load_balancer_ips.iter());
            addressed.extend(ips.map(|ip| (*ip, f.key.port, proto)));
        }
    }
    flows.iter().any(|f| {
        f.replier != f.addressed
            && (addressed.contains(&(f.addressed.0, f.addressed.1, f.proto))
                || node_ports.contains(&(f.addressed.1, f.proto)))
    })
}

/// A family's side of an adoption: its name for the log, whether it is
/// IPv6, and whether it may hold the node's conntrack (the in-memory maps
/// of unit tests do not).
#[derive(Clone, Copy)]
pub(super) struct Adopter {
    pub name: &'static str,
    pub ipv6: bool,
    pub holds_conntrack: bool,
}

/// Adopts the node's flows (`flows`, its conntrack) translated to a
/// frontend (`frontend_id`; `bytes` writes an address as the maps do):
/// conntrack is held on for them, then `write` tracks them. Returns the
/// keys adopted.
pub(super) fn adopt<A: Copy + PartialEq, B: Copy>(
    adopter: Adopter,
    flows: std::io::Result<Vec<Flow<A>>>,
    frontend_id: impl Fn(A, u16, u8) -> Option<u32>,
    bytes: impl Fn(A) -> B,
    write: impl FnOnce(&[(FlowKey<B>, CtEntry<B>)]) -> Result<(), String>,
) -> Vec<FlowKey<B>> {
    let result = flows.map_err(|e| format!("reading the node's conntrack: {e}")).and_then(|flows| {
        let entries = entries(&flows, frontend_id, bytes, crate::clock::monotonic_seconds());
        if !entries.is_empty() && adopter.holds_conntrack {
            hold_conntrack(adopter.ipv6).map_err(|e| e.to_string())?;
        }
        write(&entries)?;
        Ok(entries.into_iter().map(|(k, _)| k).collect::<Vec<_>>())
    });
    match result {
        Ok(adopted) => {
            if !adopted.is_empty() {
                tracing::info!(
                    family = adopter.name,
                    tracked = adopted.len(),
                    "flows translated by the rules eBPF mode takes over from go on through the node's conntrack"
                );
            }
            adopted
        }
        Err(e) => {
            tracing::warn!(family = adopter.name, error = %e, "could not track the flows the node's rules translated: they may be reset");
            Vec::new()
        }
    }
}

/// Drops from `adopted` the flows no longer the node's (`state` reads a
/// flow's state, if tracked); once none is left, conntrack goes off again.
pub(super) fn release_when_ended<K>(adopter: Adopter, adopted: &mut Vec<K>, state: impl Fn(&K) -> Option<u8>) {
    if adopted.is_empty() {
        return;
    }
    adopted.retain(|k| state(k).is_some_and(|s| s & STATE_HOST != 0));
    if adopted.is_empty() {
        if adopter.holds_conntrack {
            release_conntrack(adopter.ipv6);
        }
        tracing::info!(family = adopter.name, "the flows taken over from the node's rules have ended");
    }
}

impl<M: ServiceMaps> EbpfDataplane<M> {
    fn adopter(&self) -> Adopter {
        Adopter { name: "IPv4", ipv6: false, holds_conntrack: self.ebpf.is_some() }
    }

    /// Once the first sync is written: tracks the node's translated flows
    /// to the frontends (`flows`, its conntrack) and ends the adoption.
    pub(super) fn adopt_host_flows(&mut self, flows: std::io::Result<Vec<Flow<Ipv4Addr>>>) {
        self.adopting = false;
        let contents = self.maps.contents();
        let frontends: HashMap<ServiceKey, ServiceValue> = contents.services.iter().copied().collect();
        let id = |addr: Ipv4Addr, port: u16, proto| {
            frontends.get(&ServiceKey::new(addr.octets(), port, proto)).map(|v| v.id)
        };
        let (adopter, maps) = (self.adopter(), &mut self.maps);
        let write = |entries: &[_]| maps.track_flows(entries).map_err(|e| e.to_string());
        self.adopted_flows = adopt(adopter, flows, id, |a| a.octets(), write);
        self.clear_flag(&contents, flags::ADOPTING, "could not end the adoption of a frontend");
    }

    /// Once the adopted flows have all ended, conntrack goes off again.
    pub(super) fn release_conntrack_when_done(&mut self) {
        let (adopter, maps) = (self.adopter(), &self.maps);
        release_when_ended(adopter, &mut self.adopted_flows, |k| maps.flow(k).map(|e| e.state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(proto: u8, tcp_state: u8, client: [u8; 4], addressed: ([u8; 4], u16), replier: ([u8; 4], u16)) -> Flow {
        Flow {
            proto,
            tcp_state,
            client: (client.into(), 40000),
            addressed: (addressed.0.into(), addressed.1),
            replier: (replier.0.into(), replier.1),
        }
    }

    #[test]
    fn flows_translated_to_a_frontend_are_tracked_as_the_nodes() {
        let vip = [10, 96, 0, 1];
        let frontend = |port: u16, proto| ServiceKey::new(vip, port, proto);
        let value = |id| ServiceValue { id, ..ServiceValue::MARKER };
        let frontends = HashMap::from([(frontend(80, PROTO_TCP), value(7)), (frontend(53, PROTO_UDP), value(9))]);
        let pod = [10, 244, 0, 11];
        let flows = [
            flow(PROTO_TCP, TCP_CONNTRACK_ESTABLISHED, [10, 244, 0, 100], (vip, 80), (pod, 8080)),
            flow(PROTO_TCP, TCP_CONNTRACK_SYN_SENT, [10, 244, 0, 101], (vip, 80), (pod, 8080)),
            flow(PROTO_TCP, 7, [10, 244, 0, 102], (vip, 80), (pod, 8080)), // TIME_WAIT
            flow(PROTO_UDP, 0, [10, 244, 0, 103], (vip, 53), (pod, 5353)),
            flow(PROTO_TCP, TCP_CONNTRACK_ESTABLISHED, [10, 244, 0, 104], (vip, 80), (vip, 80)), // untranslated
            flow(PROTO_TCP, TCP_CONNTRACK_ESTABLISHED, [10, 244, 0, 105], (vip, 81), (pod, 81)), // no such frontend
            flow(PROTO_TCP, TCP_CONNTRACK_ESTABLISHED, [10, 244, 0, 106], ([10, 244, 0, 12], 80), (pod, 80)),
            flow(1, 0, [10, 244, 0, 107], (vip, 0), (pod, 0)), // ICMP
        ];
        let id = |a: Ipv4Addr, port: u16, proto| frontends.get(&ServiceKey::new(a.octets(), port, proto)).map(|v| v.id);
        let tracked = entries(&flows, id, |a| a.octets(), 1000);
        let clients: Vec<u8> = tracked.iter().map(|(k, _)| k.src_addr[3]).collect();
        assert_eq!(clients, [100, 101, 102, 103]);
        let (key, entry) = tracked[0];
        assert_eq!(
            key,
            FlowKey::service([10, 244, 0, 100], 40000u16.to_be_bytes(), vip, 80u16.to_be_bytes(), PROTO_TCP)
        );
        assert_eq!(
            (entry.addr, u16::from_be_bytes(entry.port), entry.service_id, entry.last_seen),
            (pod, 8080, 7, 1000)
        );
        let states: Vec<u8> = tracked.iter().map(|(_, e)| e.state).collect();
        assert_eq!(
            states,
            [
                STATE_HOST | STATE_REPLIED,
                STATE_HOST,
                STATE_HOST | STATE_REPLIED | STATE_CLOSING,
                STATE_HOST | STATE_REPLIED
            ]
        );
        assert_eq!(tracked[3].1.service_id, 9);
    }
}
