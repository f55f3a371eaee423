//! The node's masquerade rule for eBPF mode: requests from outside that the
//! datapath sends to a backend under `externalTrafficPolicy: Cluster` carry
//! [`MASQUERADE_MARK`], and this rule source-NATs them to the node, so the
//! backend (perhaps on another node) answers through this one, where the
//! reply is translated back. Netfilter picks the source ports, so two
//! clients never share a tuple; the ports stay above the node port range
//! (30000-32767), so a reply is never taken for a request to a node port.
//! Each family has the rule in its own tables (iptables, ip6tables), added
//! by that family's dataplane.

use proxy_common::maps::MASQUERADE_MARK;

use crate::dataplane::{DataplaneError, iptables::backend::Backend};

const COMMENT: &str = "kpr ebpf: masquerade traffic from outside to Services";

/// Runs `iptables -t nat OP POSTROUTING` on `backend` with the rule for `protocol`.
fn postrouting(backend: Backend, op: &str, protocol: &str) -> Result<bool, DataplaneError> {
    let mark = format!("{MASQUERADE_MARK:#x}/{MASQUERADE_MARK:#x}");
    #[rustfmt::skip]
    let args = [
        "-t", "nat", op, "POSTROUTING", "-p", protocol, "-m", "mark", "--mark", &mark,
        "-m", "comment", "--comment", COMMENT, "-j", "MASQUERADE", "--to-ports", "32768-65535", "--random-fully",
    ];
    backend.iptables(&args)
}

/// Adds the rule (TCP and UDP) to the backend the node uses for the
/// family (`ipv6`), once.
pub fn ensure(ipv6: bool) -> Result<(), DataplaneError> {
    let backend = crate::dataplane::iptables::backend::detect(ipv6);
    for protocol in ["tcp", "udp"] {
        if !postrouting(backend, "-C", protocol)? && !postrouting(backend, "-A", protocol)? {
            return Err(DataplaneError::Command {
                command: format!("{} -t nat -A POSTROUTING", backend.name()),
                reason: "could not add the masquerade rule for traffic from outside".into(),
            });
        }
    }
    Ok(())
}

/// Removes the rule from both backends of both families; returns how many rules went.
pub fn remove() -> usize {
    let mut removed = 0;
    // Not where there is no nat table: asking would make one.
    for backend in Backend::ALL.into_iter().filter(|b| b.has_table("nat")) {
        for protocol in ["tcp", "udp"] {
            while postrouting(backend, "-D", protocol).unwrap_or(false) {
                removed += 1;
            }
        }
    }
    removed
}
