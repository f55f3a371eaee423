//! Which interfaces get the per-packet path: `--interfaces` takes names and
//! shell-style patterns (`veth*`, `cali*`, `lxc*`, `cni0`). Interfaces that
//! match are attached when they appear (a netlink link event wakes the
//! agent, which looks again) and forgotten when they go. A plain name must
//! exist at start; a pattern may match nothing yet.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::dataplane::netlink;

/// Whether `pattern` has glob characters (else it names one interface).
pub fn is_pattern(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Shell-style matching: `*` any run of characters, `?` any one.
pub fn matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The interfaces of this network namespace, by name, with their index;
/// `None` if they cannot be listed.
pub fn interfaces() -> Option<BTreeMap<String, u32>> {
    let mut out = BTreeMap::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return None;
        }
        let mut at = list;
        while (*at).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*at).if_name).to_string_lossy().into_owned();
            out.insert(name, (*at).if_index);
            at = at.add(1);
        }
        libc::if_freenameindex(list);
    }
    Some(out)
}

/// The interfaces `patterns` select among `present`.
pub fn selected<'a>(patterns: &[String], present: &'a BTreeMap<String, u32>) -> Vec<(&'a str, u32)> {
    present
        .iter()
        .filter(|(name, _)| patterns.iter().any(|p| matches(p, name)))
        .map(|(name, index)| (name.as_str(), *index))
        .collect()
}

/// Takes out of `attached` (name -> index and what was attached there) the
/// interfaces gone from `present`, or present under another index (recreated).
pub fn take_gone<T>(
    attached: &mut BTreeMap<String, (u32, T)>,
    present: &BTreeMap<String, u32>,
) -> Vec<(String, u32, T)> {
    let gone: Vec<String> = attached
        .iter()
        .filter(|(name, (index, _))| present.get(*name) != Some(index))
        .map(|(n, _)| n.clone())
        .collect();
    gone.into_iter().filter_map(|name| attached.remove(&name).map(|(index, t)| (name, index, t))).collect()
}

/// The interfaces holding a default route in `route` (the text of
/// `/proc/net/route`): where traffic from other nodes and outside enters.
pub fn default_route_interfaces(route: &str) -> Vec<String> {
    let mut out: Vec<String> = route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .collect();
    out.dedup();
    out
}

/// The interfaces holding an IPv6 default route in `route` (the text of
/// `/proc/net/ipv6_route`): a node's uplink may have only that one.
pub fn default_route_interfaces6(route: &str) -> Vec<String> {
    /// A route that refuses (the kernel's "unreachable" placeholder on `lo`).
    const RTF_REJECT: u32 = 0x0200;
    let mut out: Vec<String> = route
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Destination PrefixLen Source SourceLen NextHop Metric RefCnt Use Flags Iface
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            let default = f[0].bytes().all(|b| b == b'0') && f[1] == "00";
            (default && flags & RTF_REJECT == 0 && f[9] != "lo").then(|| f[9].to_string())
        })
        .collect();
    out.dedup();
    out
}

/// Opens a netlink socket that receives link events of this namespace.
fn link_events() -> std::io::Result<OwnedFd> {
    let fd = netlink::socket(libc::NETLINK_ROUTE)?;
    // SAFETY: sockaddr_nl is plain data (zero is valid); bind reads `len` bytes of it.
    unsafe {
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        let len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        if libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Wakes up now and then to see whether the agent still listens.
    netlink::set_receive_timeout(&fd, Duration::from_secs(1))?;
    Ok(fd)
}

/// Announces every link change of this namespace on `changes` (from a
/// thread of its own) until the receiver is gone.
pub fn watch(changes: tokio::sync::mpsc::UnboundedSender<Instant>) -> std::io::Result<()> {
    let fd = link_events()?;
    std::thread::Builder::new().name("kpr-links".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while !changes.is_closed() {
            // SAFETY: the kernel writes at most buf.len() bytes into buf.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let changed = if n > 0 {
                // The event itself is not read: the dataplane looks at all links again.
                true
            } else {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EINTR) => false,
                    // Events were dropped (a burst overflowed the socket):
                    // looking at all links again makes up for them.
                    Some(libc::ENOBUFS) => true,
                    _ => {
                        tracing::warn!(error = %e, "reading link events failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        true
                    }
                }
            };
            if changed && changes.send(Instant::now()).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_in_a_shell() {
        assert!(matches("veth*", "veth0") && matches("veth*", "veth") && matches("cni0", "cni0"));
        assert!(matches("lxc*", "lxc1234abcd") && matches("eth?", "eth1") && matches("*", "anything"));
        assert!(!matches("veth*", "eth0") && !matches("cni0", "cni01") && !matches("eth?", "eth10"));
        assert!(is_pattern("cali*") && !is_pattern("cbr0"));
    }

    #[test]
    fn devices_default_to_the_interfaces_of_default_routes() {
        let route = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0164A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0064A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
cbr0\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";
        assert_eq!(default_route_interfaces(route), ["eth0"]);
        assert!(default_route_interfaces("Iface\tDestination\n").is_empty());
        // IPv6: the unreachable placeholder on lo is no default route.
        let route6 = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth1
";
        assert_eq!(default_route_interfaces6(route6), ["eth1"]);
    }

    #[test]
    fn interfaces_gone_or_recreated_are_taken_out() {
        let present: BTreeMap<String, u32> = [("eth0", 2), ("veth1", 9)].map(|(n, i)| (n.to_string(), i)).into();
        let mut attached: BTreeMap<String, (u32, char)> =
            [("eth0", (2, 'a')), ("veth0", (3, 'b')), ("veth1", (4, 'c'))].map(|(n, v)| (n.to_string(), v)).into();
        let gone = take_gone(&mut attached, &present);
        assert_eq!(gone, [("veth0".to_string(), 3, 'b'), ("veth1".to_string(), 4, 'c')]);
        assert_eq!(attached.keys().collect::<Vec<_>>(), ["eth0"]);
    }

    #[test]
    fn selection_keeps_the_interfaces_some_pattern_matches() {
        let present: BTreeMap<String, u32> =
            [("lo", 1), ("eth0", 2), ("veth0", 3), ("veth1", 4), ("cni0", 5)].map(|(n, i)| (n.to_string(), i)).into();
        let chosen = selected(&["veth*".into(), "cni0".into()], &present);
        assert_eq!(chosen, [("cni0", 5), ("veth0", 3), ("veth1", 4)]);
    }
}
