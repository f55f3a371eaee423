//! Dataplanes apply planner operations to the kernel.

pub mod cleanup;
pub mod ebpf;
pub mod iptables;

use std::{path::Path, sync::Arc};

use crate::{inspect::Maps, model::FrontendKey, planner::Op};

/// An operation that could not be applied; the rest of the sync went on.
#[derive(Debug, thiserror::Error)]
#[error("{frontend}: {reason}")]
pub struct ApplyError {
    pub frontend: FrontendKey,
    pub reason: String,
}

pub trait Dataplane {
    /// `ebpf` or `iptables`.
    fn mode(&self) -> &'static str {
        "test"
    }

    /// Applies `ops` in order. Failures are returned, never stop the others.
    fn apply(&mut self, ops: &[Op]) -> Vec<ApplyError>;

    /// Called once this dataplane serves (after its first sync): removes
    /// what the other mode left behind (on `interfaces`, pins under
    /// `bpf_root`), so two never fight.
    fn take_over(&mut self, _interfaces: &[String], _bpf_root: &Path) {}

    /// The datapath's maps, where the dataplane keeps any; observers
    /// (metrics, dashboard) read counters and traffic through them.
    fn maps(&self) -> Option<Arc<Maps>> {
        None
    }
}

impl<T: Dataplane + ?Sized> Dataplane for Box<T> {
    fn mode(&self) -> &'static str {
        (**self).mode()
    }
    fn apply(&mut self, ops: &[Op]) -> Vec<ApplyError> {
        (**self).apply(ops)
    }
    fn take_over(&mut self, interfaces: &[String], bpf_root: &Path) {
        (**self).take_over(interfaces, bpf_root)
    }
    fn maps(&self) -> Option<Arc<Maps>> {
        (**self).maps()
    }
}
