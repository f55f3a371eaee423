//! The node addresses NodePorts answer on, as kube-proxy's
//! `--nodeport-addresses`: by default the node's primary addresses (those of
//! its devices); given prefixes, every local address within them; `0.0.0.0/0`,
//! every local address (then matched by the kernel's view of "local").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{
    dataplane::ebpf::links,
    frontend::{Cidr, Family},
};

/// What NodePorts answer on, in one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses<A = Ipv4Addr> {
    /// Every local address but loopback (`0.0.0.0/0`, `::/0`).
    #[default]
    All,
    /// These addresses.
    Only(Vec<A>),
}

/// Resolves `--nodeport-addresses` (`prefixes`, of this family) against
/// the node's interfaces: `devices` (names or patterns) holds the primary
/// addresses. `given` says whether prefixes were given at all: as in
/// kube-proxy, a family none of them is of answers on all its addresses.
pub fn resolve<A: Family>(prefixes: &[Cidr<A>], given: bool, devices: &[String]) -> NodePortAddresses<A> {
    if given && prefixes.is_empty() {
        return NodePortAddresses::All;
    }
    let local = interface_addresses();
    select(prefixes, devices, &local)
}

/// Whether a local address can take node port traffic: not loopback, and
/// not an IPv6 link-local one (each link has one; no client dials it).
fn answers<A: Family>(addr: &A) -> bool {
    let ip: IpAddr = (*addr).into();
    !addr.is_loopback() && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

impl<A: Family> NodePortAddresses<A> {
    /// The addresses themselves: for [`NodePortAddresses::All`], every
    /// non-loopback address the node has now.
    pub fn addresses(&self) -> Vec<A> {
        match self {
            NodePortAddresses::Only(addrs) => addrs.clone(),
            NodePortAddresses::All => {
                let mut all: Vec<A> = interface_addresses().into_iter().map(|(_, a)| a).filter(answers).collect();
                all.sort();
                all.dedup();
                all
            }
        }
    }
}

/// [`resolve`] on a given list of (interface, address).
pub fn select<A: Family>(prefixes: &[Cidr<A>], devices: &[String], local: &[(String, A)]) -> NodePortAddresses<A> {
    if prefixes.iter().any(|p| p.len == 0) {
        return NodePortAddresses::All;
    }
    let mut addrs: Vec<A> = local
        .iter()
        .filter(|(name, addr)| {
            answers(addr)
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

/// Every address of family `A` on this node's interfaces, with the interface's name.
pub fn interface_addresses<A: Family>() -> Vec<(String, A)> {
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
        let family = if ifa.ifa_addr.is_null() { 0 } else { i32::from(unsafe { (*ifa.ifa_addr).sa_family }) };
        let ip = match family {
            libc::AF_INET => {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        };
        if let Some(ip) = ip.and_then(A::of) {
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
            out.push((name, ip));
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

    #[test]
    fn ipv6_node_ports_answer_on_the_devices_global_addresses_and_never_link_local_ones() {
        let local: Vec<(String, Ipv6Addr)> =
            [("lo", "::1"), ("eth0", "fe80::1"), ("eth0", "2001:db8::2"), ("cbr0", "fd00:244::1")]
                .into_iter()
                .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
                .collect();
        let only = |a: &[&str]| NodePortAddresses::Only(a.iter().map(|a| a.parse().unwrap()).collect());
        assert_eq!(select(&[], &["eth0".into()], &local), only(&["2001:db8::2"]));
        assert_eq!(select(&["fd00::/8".parse().unwrap()], &[], &local), only(&["fd00:244::1"]));
        assert_eq!(resolve::<Ipv6Addr>(&[], true, &[]), NodePortAddresses::All, "prefixes given, none IPv6: all");
    }
}
