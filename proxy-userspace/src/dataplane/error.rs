//! What can go wrong in a dataplane, one kind per cause, each with a stable
//! label (used as a metric label and as the auto-mode fallback reason).

use std::net::Ipv4Addr;

use crate::frontend::{Family, FrontendKey};

#[derive(Clone, Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object failed (needs root or CAP_BPF and CAP_NET_ADMIN): {0}")]
    Load(String),
    #[error("the kernel verifier rejected program {program}: {log}")]
    Verifier { program: &'static str, log: String },
    #[error(
        "nothing to attach to: socket-level load balancing is off (--socket-lb=false, or no cgroup v2 mount found) \
         and no --interfaces were given"
    )]
    NothingToAttach,
    #[error("attaching {program} to {target} failed: {reason}")]
    Attach { program: &'static str, target: String, reason: String },
    #[error("the {map} map is full ({capacity} entries): raise {flag}")]
    MapFull { map: &'static str, capacity: u32, flag: &'static str },
    #[error("writing the {map} map failed: {reason}")]
    MapWrite { map: &'static str, reason: String },
    #[error("iptables-restore ({backend}) failed: {stderr}")]
    IptablesRestore { backend: &'static str, stderr: String },
    #[error("running {command} failed: {reason}")]
    Command { command: String, reason: String },
}

impl DataplaneError {
    /// A stable name of the kind, for metric labels.
    pub const fn label(&self) -> &'static str {
        match self {
            DataplaneError::Load(_) => "load",
            DataplaneError::Verifier { .. } => "verifier",
            DataplaneError::NothingToAttach => "nothing_to_attach",
            DataplaneError::Attach { .. } => "attach",
            DataplaneError::MapFull { .. } => "map_full",
            DataplaneError::MapWrite { .. } => "map_write",
            DataplaneError::IptablesRestore { .. } => "iptables_restore",
            DataplaneError::Command { .. } => "command",
        }
    }
}

/// An operation that could not be applied; the rest of the sync went on.
#[derive(Debug, thiserror::Error)]
#[error("{frontend}: {error}")]
pub struct ApplyError<A: Family = Ipv4Addr> {
    pub frontend: FrontendKey<A>,
    #[source]
    pub error: DataplaneError,
}
