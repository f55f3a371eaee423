//! The node addresses NodePorts answer on, as kube-proxy's
//! `--nodeport-addresses`: by default the node's primary addresses (those of
//! its devices); given prefixes, every local address within them; `0.0.0.0/0`,
//! every local address (then matched by the kernel's view of "local").

use std::net::Ipv4Addr;

use crate::{dataplane::ebpf::links, frontend::Cidr};

/// What NodePorts answer on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address but loopback (`0.0.0.0/0`).
    #[default]
    All,
    /// These addresses.
    Only(Vec<Ipv4Addr>),
}

/// Resolves `--nodeport-addresses` (`prefixes`) against the node's
/// interfaces: `devices` (names or patterns) holds the primary addresses.
pub fn resolve(prefixes: &[Cidr], devices: &[String]) -> NodePortAddresses {
    let local = interface_addresses();
    select(prefixes, devices, &local)
}

impl NodePortAddresses {
    /// The addresses themselves: for [`NodePortAddresses::All`], every
    /// non-loopback address the node has now.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        match self {
            NodePortAddresses::Only(addrs) => addrs.clone(),
            NodePortAddresses::All => {
                let mut all: Vec<Ipv4Addr> =
                    interface_addresses().into_iter().map(|(_, a)| a).filter(|a| !a.is_loopback()).collect();
                all.sort();
                all.dedup();
                all
            }
        }
    }
}

/// [`resolve`] on a given list of (interface, address).
pub fn select(prefixes: &[Cidr], devices: &[String], local: &[(String, Ipv4Addr)]) -> NodePortAddresses {
    if prefixes.iter().any(|p| p.len == 0) {
        return NodePortAddresses::All;
    }
    let mut addrs: Vec<Ipv4Addr> = local
        .iter()
        .filter(|(name, addr)| {
            !addr.is_loopback()
                && if prefixes.is_empty() {
                    devices.iter().any(|d| links::matches(d, name))
                } else {
                    prefixes.iter().any(|p| p.contains(*addr))
                }
        })
        .map(|(_, addr)| *addr)
        .collect();
    addrs.sort();
    addrs.dedup();
    NodePortAddresses::Only(addrs)
}

/// Every IPv4 address on this node's interfaces, with the interface's name.
pub fn interface_addresses() -> Vec<(String, Ipv4Addr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot list the node's addresses");
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET {
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
            out.push((name, Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
        }
        cur = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Vec<(String, Ipv4Addr)> {
        [("lo", [127, 0, 0, 1]), ("eth0", [192, 168, 0, 2]), ("eth0", [192, 168, 1, 2]), ("cbr0", [10, 244, 0, 1])]
            .into_iter()
            .map(|(n, a)| (n.to_string(), Ipv4Addr::from(a)))
            .collect()
    }

    #[test]
    fn default_is_the_devices_addresses() {
        let only = |a: &[[u8; 4]]| NodePortAddresses::Only(a.iter().map(|a| Ipv4Addr::from(*a)).collect());
        assert_eq!(select(&[], &["eth*".into()], &local()), only(&[[192, 168, 0, 2], [192, 168, 1, 2]]));
        let prefixes = ["192.168.1.0/24".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        assert_eq!(select(&prefixes, &["eth0".into()], &local()), only(&[[10, 244, 0, 1], [192, 168, 1, 2]]));
        assert_eq!(select(&["0.0.0.0/0".parse().unwrap()], &[], &local()), NodePortAddresses::All);
        // Loopback never: localhost NodePorts are not served.
        assert_eq!(select(&["127.0.0.0/8".parse().unwrap()], &[], &local()), only(&[]));
    }
}
