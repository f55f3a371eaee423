//! What kube-proxy leaves on a node in its nftables and IPVS modes, beside
//! the iptables chains (those go with kpr's own, see
//! `iptables::backend`): its nftables tables, the ipsets its IPVS rules
//! match on, and the dummy device holding every Service address as a
//! local one. Removed once kpr serves, and by `kpr cleanup`, through
//! netlink, so the image needs neither `nft` nor `ipset`.
//!
//! IPVS virtual servers themselves are not touched: kpr never programs
//! IPVS, and a node that ran IPVS mode still has kube-proxy's `--cleanup`
//! for them.

use std::os::fd::OwnedFd;

use super::netlink::{self, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST, attr};

/// kube-proxy's nftables mode: one table per family.
pub const NFTABLES_TABLE: &str = "kube-proxy";
/// kube-proxy's IPVS mode binds every Service address to this device.
pub const IPVS_DUMMY_DEVICE: &str = "kube-ipvs0";
/// kube-proxy's IPVS-mode ipsets (IPv4 names; the IPv6 ones start `KUBE-6-`).
pub const IPVS_SETS: [&str; 17] = [
    "KUBE-LOOP-BACK",
    "KUBE-CLUSTER-IP",
    "KUBE-EXTERNAL-IP",
    "KUBE-EXTERNAL-IP-LOCAL",
    "KUBE-LOAD-BALANCER",
    "KUBE-LOAD-BALANCER-FW",
    "KUBE-LOAD-BALANCER-LOCAL",
    "KUBE-LOAD-BALANCER-SOURCE-IP",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
    "KUBE-NODE-PORT-TCP",
    "KUBE-NODE-PORT-LOCAL-TCP",
    "KUBE-NODE-PORT-UDP",
    "KUBE-NODE-PORT-LOCAL-UDP",
    "KUBE-NODE-PORT-SCTP-HASH",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT",
    "KUBE-IPVS-IPS",
];

/// What [`remove`] found and removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub nftables_tables: usize,
    pub ipsets: usize,
    pub dummy_device: bool,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        *self == Removed::default()
    }
}

/// Removes kube-proxy's nftables tables, IPVS ipsets and dummy device from
/// this network namespace. Call after the IPVS-mode iptables chains are
/// gone: the kernel keeps a set that a rule still matches on.
pub fn remove() -> Removed {
    let removed = Removed {
        nftables_tables: or_log(delete_nftables_tables(), "nftables table"),
        ipsets: or_log(destroy_ipsets(), "ipset"),
        dummy_device: or_log(delete_link(IPVS_DUMMY_DEVICE).map(usize::from), "dummy device") > 0,
    };
    if !removed.is_empty() {
        tracing::info!(?removed, "removed kube-proxy's nftables and IPVS leftovers");
    }
    removed
}

fn or_log(result: std::io::Result<usize>, what: &str) -> usize {
    result.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "could not remove kube-proxy's {what}s");
        0
    })
}

/// The name as netlink carries strings: NUL-terminated.
fn c_string(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// A netlink socket of `protocol` whose reads give up after 2 s.
fn socket(protocol: libc::c_int) -> std::io::Result<OwnedFd> {
    let fd = netlink::socket(protocol)?;
    netlink::set_receive_timeout(&fd, std::time::Duration::from_secs(2))?;
    Ok(fd)
}

/// Sends one request that asks for an acknowledgement: `true` if it did
/// its work, `false` if the kernel answered `missing` (nothing to remove).
fn removed(fd: &OwnedFd, request: &[u8], missing: i32) -> std::io::Result<bool> {
    match netlink::acknowledged(fd, request, 1)?.first() {
        Some(0) => Ok(true),
        Some(&e) if -e == missing => Ok(false),
        Some(&e) => Err(std::io::Error::from_raw_os_error(-e)),
        None => Ok(false),
    }
}

const NFNL_SUBSYS_IPSET: u16 = 6;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_DELTABLE: u16 = 2;
const NFTA_TABLE_NAME: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// nf_tables changes only in a batch: begin, the delete, end. A batch is
/// all or nothing, so each family's table goes in its own (one of them
/// missing would fail the other).
fn delete_table_batch(name: &str, family: u8) -> Vec<u8> {
    let batch = netlink::nfgenmsg(libc::AF_UNSPEC as u8, NFNL_SUBSYS_NFTABLES);
    let mut attrs = Vec::new();
    attr(&mut attrs, NFTA_TABLE_NAME, &c_string(name));
    let delete = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE;
    let mut msgs = netlink::message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, &batch, &[]);
    msgs.extend(netlink::message(delete, NLM_F_REQUEST | NLM_F_ACK, 2, &netlink::nfgenmsg(family, 0), &attrs));
    msgs.extend(netlink::message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 3, &batch, &[]));
    msgs
}

/// Deletes `ip kube-proxy` and `ip6 kube-proxy`; returns how many existed.
fn delete_nftables_tables() -> std::io::Result<usize> {
    let fd = socket(NETLINK_NETFILTER)?;
    let mut deleted = 0;
    for family in [NFPROTO_IPV4, NFPROTO_IPV6] {
        match removed(&fd, &delete_table_batch(NFTABLES_TABLE, family), libc::ENOENT) {
            Ok(done) => deleted += usize::from(done),
            // No nf_tables in this kernel: no table of kube-proxy's either.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL | libc::EAFNOSUPPORT)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

const IPSET_CMD_DESTROY: u16 = 3;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
/// The ipset netlink protocol version the kernel speaks since 3.x.
const IPSET_PROTOCOL: u8 = 7;
/// Without it ipset treats a missing set as done (`-exist`); with it the
/// answer says whether the set was there.
const NLM_F_EXCL: u16 = 0x200;

fn destroy_set_message(name: &str, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    attr(&mut attrs, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    attr(&mut attrs, IPSET_ATTR_SETNAME, &c_string(name));
    let kind = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_DESTROY;
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL;
    netlink::message(kind, flags, seq, &netlink::nfgenmsg(libc::AF_INET as u8, 0), &attrs)
}

/// Every name kube-proxy's IPVS mode gives its sets, both families.
fn ipvs_set_names() -> impl Iterator<Item = String> {
    IPVS_SETS.iter().flat_map(|name| {
        // kube-proxy's IPv6 names, cut to ipset's 31 characters.
        let v6: String = name.replacen("KUBE-", "KUBE-6-", 1).chars().take(31).collect();
        [name.to_string(), v6]
    })
}

/// Destroys kube-proxy's IPVS ipsets; returns how many existed. A set still
/// matched by some rule stays, with one warning naming them.
fn destroy_ipsets() -> std::io::Result<usize> {
    let fd = socket(NETLINK_NETFILTER)?;
    let names: Vec<String> = ipvs_set_names().collect();
    let msgs: Vec<u8> = names.iter().enumerate().flat_map(|(i, n)| destroy_set_message(n, i as u32 + 1)).collect();
    let statuses = netlink::acknowledged(&fd, &msgs, names.len())?;
    let mut destroyed = 0;
    let mut kept = Vec::new();
    for (name, status) in names.iter().zip(statuses) {
        match -status {
            0 => destroyed += 1,
            // No such set, or no ipset in this kernel at all (nfnetlink
            // answers EINVAL for a subsystem it does not have).
            libc::ENOENT | libc::EPROTONOSUPPORT | libc::EINVAL => {}
            _ => kept.push(name.as_str()),
        }
    }
    if !kept.is_empty() {
        // The IPv6 ones are matched by kube-proxy's ip6tables rules, which kpr leaves.
        tracing::warn!(sets = ?kept, "kube-proxy's ipsets still in use by some rule: left in place");
    }
    Ok(destroyed)
}

const RTM_DELLINK: u16 = 17;

/// Deletes the link `name` of this namespace; false if there is none.
fn delete_link(name: &str) -> std::io::Result<bool> {
    let c_name = std::ffi::CString::new(name).expect("a device name has no NUL");
    // SAFETY: a NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Ok(false);
    }
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut ifinfo = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    ifinfo.extend_from_slice(&(index as i32).to_ne_bytes());
    ifinfo.extend_from_slice(&[0; 8]);
    let fd = socket(libc::NETLINK_ROUTE)?;
    let msg = netlink::message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, 1, &ifinfo, &[]);
    removed(&fd, &msg, libc::ENODEV)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_set_names_follow_kube_proxy() {
        let names: Vec<String> = ipvs_set_names().collect();
        assert!(names.contains(&"KUBE-6-CLUSTER-IP".to_string()));
        // "KUBE-6-LOAD-BALANCER-SOURCE-CIDR" is 32 characters: cut as kube-proxy cuts it.
        assert!(names.contains(&"KUBE-6-LOAD-BALANCER-SOURCE-CID".to_string()));
        assert!(names.iter().all(|n| n.len() <= 31));
    }

    #[test]
    fn a_table_delete_is_batched_per_family() {
        let v4 = delete_table_batch(NFTABLES_TABLE, NFPROTO_IPV4);
        let kinds: Vec<u16> = netlink::messages(&v4).map(|(k, _)| k).collect();
        assert_eq!(kinds, [NFNL_MSG_BATCH_BEGIN, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELTABLE, NFNL_MSG_BATCH_END]);
        let (_, delete) = netlink::messages(&v4).nth(1).unwrap();
        assert_eq!(delete[0], NFPROTO_IPV4);
        assert!(delete.windows(11).any(|w| w == b"kube-proxy\0"));
    }
}
