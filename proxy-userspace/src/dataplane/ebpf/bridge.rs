//! Which pod interfaces have their Service traffic to a pod on the same
//! bridge switched there instead of routed (proxy-ebpf's `bridge`): the
//! ports of a bridge that hands the IPv4 it switches to iptables
//! (br_netfilter: the namespace's `net.bridge.bridge-nf-call-iptables`, or
//! the bridge's own `nf_call_iptables`). kube-proxy needs that setting on
//! bridge CNIs, so it is the common case; there the node's FORWARD chain
//! and conntrack see the switched flow as they would the routed one. Where
//! the bridge does not, the traffic is routed, so FORWARD still sees it.
//!
//! The entry carries the pod subnet on the bridge (its address and
//! prefix), so requests to other nodes cost no route lookup. Looked at
//! again on every apply and every repair: a pod interface
//! enslaved or released, or the setting turned off, is followed within a
//! sync period.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use proxy_common::maps::{BRIDGE_PORTS, BridgePort};

/// Where the kernel shows interfaces and the namespace's br_netfilter settings.
#[derive(Clone, Debug)]
pub struct Sysfs {
    /// `/sys/class/net`.
    pub class_net: PathBuf,
    /// `/proc/sys/net/bridge` (absent without br_netfilter).
    pub proc_bridge: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self { class_net: "/sys/class/net".into(), proc_bridge: "/proc/sys/net/bridge".into() }
    }
}

fn is_on(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.trim() == "1")
}

impl Sysfs {
    /// The bridge `iface` is a port of, by name and index, if that bridge
    /// hands the IPv4 it switches to iptables.
    pub fn switching_bridge(&self, iface: &str) -> Option<(String, u32)> {
        let master = std::fs::read_link(self.class_net.join(iface).join("master")).ok()?;
        let bridge = master.file_name()?.to_str()?.to_string();
        let dir = self.class_net.join(&bridge);
        // A bond or a VRF is a master too; only a bridge switches.
        let calls_iptables = dir.join("bridge").is_dir()
            && (is_on(&self.proc_bridge.join("bridge-nf-call-iptables"))
                || is_on(&dir.join("bridge/nf_call_iptables")));
        if !calls_iptables {
            return None;
        }
        let index = std::fs::read_to_string(dir.join("ifindex")).ok()?.trim().parse().ok()?;
        Some((bridge, index))
    }
}

/// The IPv4 address and prefix length of interface `name`, the pod
/// subnet's gateway on a bridge CNI's bridge (its first, if several).
fn ipv4_subnet(name: &str) -> Option<([u8; 4], u8)> {
    let mut found = None;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list freed below; each entry's addresses
    // are read only when the family says they are IPv4.
    unsafe {
        if libc::getifaddrs(&raw mut list) != 0 {
            return None;
        }
        let mut at = list;
        while !at.is_null() && found.is_none() {
            let entry = &*at;
            at = entry.ifa_next;
            let named =
                !entry.ifa_name.is_null() && std::ffi::CStr::from_ptr(entry.ifa_name).to_bytes() == name.as_bytes();
            if !named || entry.ifa_addr.is_null() || entry.ifa_netmask.is_null() {
                continue;
            }
            if i32::from((*entry.ifa_addr).sa_family) != libc::AF_INET {
                continue;
            }
            let addr = (*entry.ifa_addr.cast::<libc::sockaddr_in>()).sin_addr.s_addr.to_ne_bytes();
            let mask = (*entry.ifa_netmask.cast::<libc::sockaddr_in>()).sin_addr.s_addr;
            found = Some((addr, mask.count_ones() as u8));
        }
        libc::freeifaddrs(list);
    }
    found
}

/// The `BRIDGE_PORTS` map and what it should hold.
pub struct BridgePorts {
    sysfs: Sysfs,
    map: HashMap<MapData, u32, BridgePort>,
}

impl BridgePorts {
    pub fn new(sysfs: Sysfs, map: HashMap<MapData, u32, BridgePort>) -> Self {
        Self { sysfs, map }
    }

    /// Makes the map hold, for each of the pod interfaces `interfaces`
    /// (name, index), the bridge its Service traffic may be switched on,
    /// and nothing else (entries of interfaces gone or changed, and any
    /// written by someone else, are removed). Returns how many entries changed.
    pub fn follow<'a>(&mut self, interfaces: impl Iterator<Item = (&'a str, u32)>) -> usize {
        let mut wanted = BTreeMap::new();
        let mut names = BTreeMap::new();
        let mut subnets = BTreeMap::new();
        for (name, index) in interfaces {
            names.insert(index, name.to_string());
            let Some((bridge, bridge_index)) = self.sysfs.switching_bridge(name) else { continue };
            // Every port of a bridge shares its subnet: the addresses are listed once per bridge.
            let subnet = *subnets.entry(bridge.clone()).or_insert_with(|| ipv4_subnet(&bridge));
            // A bridge without an address holds no pod subnet to switch in.
            if let Some((addr, prefix)) = subnet {
                wanted.insert(index, (BridgePort::new(bridge_index, addr, prefix), bridge));
            }
        }
        let held: BTreeMap<u32, BridgePort> = self.map.iter().filter_map(Result::ok).collect();
        let mut changed = 0;
        for index in held.keys().filter(|i| !wanted.contains_key(i)) {
            match self.map.remove(index) {
                Ok(()) => changed += 1,
                Err(e) => tracing::warn!(map = BRIDGE_PORTS, index, error = %e, "could not remove an entry"),
            }
            // An interface still attached: its bridge stopped handing switched traffic to iptables, or it left it.
            if let Some(name) = names.get(index) {
                tracing::info!(iface = %name, "Service traffic to pods on the same bridge is routed");
            }
        }
        for (index, (port, bridge_name)) in wanted.iter().filter(|(i, (p, _))| held.get(i) != Some(p)) {
            let name = &names[index];
            match self.map.insert(index, port, 0) {
                Ok(()) => {
                    changed += 1;
                    tracing::info!(iface = %name, bridge = %bridge_name, "Service traffic to pods on the same bridge is switched there");
                }
                Err(e) => tracing::warn!(
                    map = BRIDGE_PORTS,
                    iface = %name,
                    error = %e,
                    "could not write an entry: Service traffic from it is routed"
                ),
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys/class/net with `cbr0` (index 7; its own nf_call_iptables
    /// `bridge_calls`), `bond0` and the ports `veth1` (of cbr0), `veth2`
    /// (of bond0) and `veth3` (of nothing), and /proc/sys/net/bridge
    /// saying `netns_calls` (absent for `None`: no br_netfilter).
    fn fake(netns_calls: Option<&str>, bridge_calls: &str) -> (tempfile::TempDir, Sysfs) {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("class/net");
        for iface in ["cbr0", "bond0", "veth1", "veth2", "veth3"] {
            std::fs::create_dir_all(net.join(iface)).unwrap();
        }
        std::fs::create_dir_all(net.join("cbr0/bridge")).unwrap();
        std::fs::write(net.join("cbr0/bridge/nf_call_iptables"), bridge_calls).unwrap();
        std::fs::write(net.join("cbr0/ifindex"), "7\n").unwrap();
        std::fs::write(net.join("bond0/ifindex"), "8\n").unwrap();
        std::os::unix::fs::symlink("../cbr0", net.join("veth1/master")).unwrap();
        std::os::unix::fs::symlink("../bond0", net.join("veth2/master")).unwrap();
        let proc_bridge = dir.path().join("proc/sys/net/bridge");
        if let Some(value) = netns_calls {
            std::fs::create_dir_all(&proc_bridge).unwrap();
            std::fs::write(proc_bridge.join("bridge-nf-call-iptables"), value).unwrap();
        }
        (dir, Sysfs { class_net: net, proc_bridge })
    }

    #[test]
    fn a_bridge_port_switches_when_the_namespace_hands_bridged_traffic_to_iptables() {
        let (_dir, sysfs) = fake(Some("1\n"), "0\n");
        assert_eq!(sysfs.switching_bridge("veth1"), Some(("cbr0".into(), 7)));
    }

    #[test]
    fn a_bridge_of_its_own_setting_switches_too() {
        let (_dir, sysfs) = fake(Some("0\n"), "1\n");
        assert_eq!(sysfs.switching_bridge("veth1"), Some(("cbr0".into(), 7)));
    }

    #[test]
    fn without_br_netfilter_or_with_it_off_traffic_is_routed() {
        for netns in [None, Some("0\n")] {
            let (_dir, sysfs) = fake(netns, "0\n");
            assert_eq!(sysfs.switching_bridge("veth1"), None, "{netns:?}");
        }
    }

    #[test]
    fn ports_of_no_bridge_are_routed() {
        let (_dir, sysfs) = fake(Some("1\n"), "1\n");
        assert_eq!(sysfs.switching_bridge("veth2"), None, "a bond's port");
        assert_eq!(sysfs.switching_bridge("veth3"), None, "no master");
        assert_eq!(sysfs.switching_bridge("gone0"), None, "no interface");
    }
}
