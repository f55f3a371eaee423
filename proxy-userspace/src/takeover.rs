//! Removing what kpr installed: iptables chains and jumps (both backends)
//! and eBPF programs attached by a previous run, and what kube-proxy left
//! in any of its modes. Used when a mode takes over from the other (or
//! from kube-proxy) and by `kpr cleanup`. The only module that knows both
//! modes: the dataplanes themselves never touch each other's state.

use std::path::Path;

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{TcAttachType, tc},
};
use proxy_common::maps::{self as abi, ServiceKey, ServiceKey6, ServiceValue, flags};

use crate::{
    dataplane::{
        DataplaneError, Mode,
        ebpf::{PACKET_PROGRAMS, host_flows, masquerade},
        iptables::{backend::Backend, render::Chains},
        kube_proxy,
    },
    inspect,
};

/// Once `mode` serves, removes what the other mode (on every interface of
/// this namespace, pins under `bpf_root`) and kube-proxy left behind, so
/// two never fight. Beside kube-proxy (`--service-proxy-name`), its chains,
/// tables and sets are its own and stay. `ipv6_rules`: this run serves
/// IPv6 with ip6tables rules in either mode, so those are its own.
pub fn take_over(mode: Mode, bpf_root: &Path, beside_kube_proxy: bool, ipv6_rules: bool) {
    let chains = if beside_kube_proxy { Chains::Own } else { Chains::KubeProxys };
    match mode {
        Mode::Ebpf => {
            let families = Backend::ALL.into_iter().filter(|b| !(ipv6_rules && b.ipv6));
            if let Err(e) = Backend::remove_from(families, chains) {
                tracing::error!(error = %e, "could not remove iptables rules left by iptables mode or kube-proxy");
            }
        }
        Mode::Iptables => {
            // Flows eBPF mode translated a moment ago finish through it, so
            // they are not reset; new ones go to iptables' rules at once.
            if drain_ebpf(bpf_root) > 0 {
                std::thread::sleep(EBPF_DRAIN);
            }
            // Every interface: the eBPF run may have followed patterns and devices.
            remove_ebpf(&all_interfaces(), bpf_root);
            if !beside_kube_proxy {
                remove_kube_proxy_ipvs_chains();
            }
        }
    }
    if !beside_kube_proxy {
        // After the iptables chains: a set still matched by a rule stays.
        kube_proxy::remove();
    }
}

/// The chains of kube-proxy's IPVS mode, which iptables mode does not
/// write over (the others it shares with kube-proxy's iptables mode).
fn remove_kube_proxy_ipvs_chains() {
    for backend in Backend::ALL {
        match backend.remove_kube_proxy_ipvs_chains() {
            Ok(true) => tracing::info!(backend = backend.name(), "removed kube-proxy's IPVS-mode chains"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(backend = backend.name(), error = %e, "could not remove kube-proxy's IPVS-mode chains")
            }
        }
    }
}

/// Removes kpr's iptables chains and jumps under `chains`' names from both
/// backends (under kube-proxy's, kube-proxy's own go too, with those of
/// its IPVS mode). Returns how many backends held some.
pub fn remove_iptables(chains: Chains) -> Result<usize, DataplaneError> {
    Backend::remove_from(Backend::ALL, chains)
}

/// Every interface of this network namespace.
pub fn all_interfaces() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// How long eBPF mode's programs serve the flows they track once iptables
/// mode has taken over: enough for the exchanges in flight (a connection
/// opening, a request and its answer). A connection living on past it was
/// theirs alone and is reset, as when kube-proxy gives way to another proxy.
const EBPF_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Marks every frontend in the maps eBPF mode left pinned under `bpf_root`
/// as draining ([`flags::DRAINING`]): its programs go on translating the
/// flows they track and leave new ones to iptables. Returns how many
/// entries were marked (none from another layout's maps, whose programs
/// would not know the mark).
pub fn drain_ebpf(bpf_root: &Path) -> usize {
    let dir = inspect::maps_dir(bpf_root);
    mark_draining::<ServiceKey>(&dir.join(abi::SERVICES))
        + mark_draining::<u32>(&dir.join(abi::CLUSTER_SCOPE))
        + mark_draining::<ServiceKey6>(&dir.join(abi::SERVICES6))
        + mark_draining::<u32>(&dir.join(abi::CLUSTER_SCOPE6))
}

fn mark_draining<K: aya::Pod>(pin: &Path) -> usize {
    let Ok(map) = MapData::from_pin(pin) else { return 0 };
    let Ok(mut map) = HashMap::<_, K, ServiceValue>::try_from(Map::HashMap(map)) else { return 0 };
    let entries: Vec<(K, ServiceValue)> = map.iter().filter_map(Result::ok).collect();
    let mut marked = 0;
    for (key, value) in entries {
        let draining = ServiceValue { flags: value.flags | flags::DRAINING, ..value };
        marked += usize::from(map.insert(key, draining, 0).is_ok());
    }
    if marked > 0 {
        tracing::info!(map = %pin.display(), entries = marked, "eBPF mode's frontends draining: new flows go to iptables");
    }
    marked
}

/// Detaches kpr's programs: the links pinned under `bpf_root` and the
/// classifiers attached through netlink (kernels before 6.6), and removes
/// the maps pinned there. Returns how many attachments and pin folders
/// were removed.
pub fn remove_ebpf(interfaces: &[String], bpf_root: &Path) -> usize {
    let mut removed = masquerade::remove();
    for ipv6 in [false, true] {
        host_flows::release_conntrack(ipv6);
    }
    for iface in interfaces {
        for (program, hook) in PACKET_PROGRAMS {
            match tc::qdisc_detach_program(iface, hook, program) {
                Ok(()) => {
                    tracing::info!(%iface, program, "detached a leftover kpr program");
                    removed += 1;
                }
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::debug!(%iface, program, error = %e, "no netlink classifier to detach"),
            }
        }
    }
    // Links first, at once: unpinned only, they would go some milliseconds later.
    removed += crate::dataplane::ebpf::pins::detach_all(bpf_root);
    let pins = inspect::pin_dir(bpf_root);
    if pins.exists() {
        match std::fs::remove_dir_all(&pins) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(dir = %pins.display(), error = %e, "could not remove pinned maps"),
        }
    }
    removed
}

/// Names of the eBPF programs attached through TCX on ingress and egress of `iface`.
pub fn attached_programs(iface: &str) -> Vec<String> {
    let name = |info: &aya::programs::ProgramInfo| format!("{} (id {})", info.name_as_str().unwrap_or("?"), info.id());
    [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .filter_map(|hook| aya::programs::SchedClassifier::query_tcx(iface, hook).ok())
        .flat_map(|(_, programs)| programs.iter().map(name).collect::<Vec<_>>())
        .collect()
}
