//! The masquerade rule earlier releases of eBPF mode added to the node
//! (`nat POSTROUTING`, for requests from outside their TC path marked).
//! The datapath now source-NATs those itself (see proxy-ebpf's
//! `masquerade`), but a node upgraded in place may still hold the rule,
//! and any nat rule keeps netfilter's connection tracking running for
//! every packet through the node: `kpr cleanup` and iptables mode taking
//! over remove it.

use crate::dataplane::iptables::backend::Backend;

const COMMENT: &str = "kpr ebpf: masquerade traffic from outside to Services";
/// The packet mark the rule matched.
const MARK: &str = "0x4000/0x4000";

/// Runs `iptables -t nat OP POSTROUTING` on `backend` with the rule for `protocol`.
fn postrouting(backend: Backend, op: &str, protocol: &str) -> bool {
    #[rustfmt::skip]
    let args = [
        "-t", "nat", op, "POSTROUTING", "-p", protocol, "-m", "mark", "--mark", MARK,
        "-m", "comment", "--comment", COMMENT, "-j", "MASQUERADE", "--to-ports", "32768-65535", "--random-fully",
    ];
    backend.iptables(&args).unwrap_or(false)
}

/// Removes the rule from both backends of both families; returns how many rules went.
pub fn remove() -> usize {
    let mut removed = 0;
    // Not where there is no nat table: asking would make one.
    for backend in Backend::ALL.into_iter().filter(|b| b.has_table("nat")) {
        for protocol in ["tcp", "udp"] {
            while postrouting(backend, "-D", protocol) {
                removed += 1;
            }
        }
    }
    removed
}
