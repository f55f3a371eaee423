//! Dataplanes apply planner operations to the kernel. The trait speaks the
//! model's types only: which kernel mechanism sits behind it is the
//! dataplane's business.

pub mod conntrack;
pub mod ebpf;
pub mod error;
pub mod iptables;
pub mod kube_proxy;
mod netlink;
pub mod node_addresses;

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

pub use error::{ApplyError, DataplaneError};

use crate::{
    frontend::{Family, Frontend, FrontendKey},
    inspect::{FrontendTraffic, MapFill},
    planner::Op,
};

/// Which dataplane serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The desired state the planner's operations lead to (of one IP family).
pub type Desired<A = Ipv4Addr> = BTreeMap<FrontendKey<A>, Frontend<A>>;

/// Serves the frontends of one IP family.
pub trait Dataplane<A: Family = Ipv4Addr>: Send {
    fn mode(&self) -> Mode;

    /// Applies `ops` in order; `desired` is the whole desired state after
    /// them (a dataplane that rewrites whole tables renders from it rather
    /// than keeping a copy). Failures are returned, never stop the others.
    fn apply(&mut self, ops: &[Op<A>], desired: &Desired<A>) -> Vec<ApplyError<A>>;

    /// Counters and traffic the datapath keeps, where it keeps any.
    fn stats(&self) -> Option<Arc<dyn DatapathStats>> {
        None
    }

    /// Finds where the kernel's state drifted from what this dataplane
    /// wrote (a table flushed, an entry deleted by someone else) and writes
    /// it again from `desired`; returns how many things it repaired.
    fn repair(&mut self, _desired: &Desired<A>) -> usize {
        0
    }

    /// Called once, after the first sync that followed a complete list:
    /// this dataplane now serves everything the sources hold.
    fn serving(&mut self) {}
}

impl<A: Family, T: Dataplane<A> + ?Sized> Dataplane<A> for Box<T> {
    fn mode(&self) -> Mode {
        (**self).mode()
    }
    fn apply(&mut self, ops: &[Op<A>], desired: &Desired<A>) -> Vec<ApplyError<A>> {
        (**self).apply(ops, desired)
    }
    fn stats(&self) -> Option<Arc<dyn DatapathStats>> {
        (**self).stats()
    }
    fn repair(&mut self, desired: &Desired<A>) -> usize {
        (**self).repair(desired)
    }
    fn serving(&mut self) {
        (**self).serving()
    }
}

/// What observers (metrics, dashboard) read from a datapath that counts.
pub trait DatapathStats: Send + Sync {
    /// Packets by what the datapath did with them.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// Traffic per frontend and per backend.
    fn traffic(&self) -> Vec<FrontendTraffic>;
    /// The same for IPv6 frontends (none where the datapath has no IPv6).
    fn traffic6(&self) -> Vec<FrontendTraffic<Ipv6Addr>> {
        Vec::new()
    }
    /// How full each table is.
    fn fill(&self) -> Vec<MapFill>;
    /// What the datapath did on each interface, and which path each device takes.
    fn devices(&self) -> Vec<crate::inspect::DeviceStats>;
}
