//! Dataplanes apply planner operations to the kernel.

pub mod cleanup;
pub mod ebpf;
pub mod iptables;

use crate::{model::FrontendKey, planner::Op};

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
    /// what the other mode left behind, so two never fight.
    fn take_over(&mut self, _interfaces: &[String]) {}

    /// A reader of the datapath's counters by name, where the dataplane
    /// keeps any; other tasks (metrics) can hold it.
    fn counter_reader(&self) -> Option<crate::api::CounterReader> {
        None
    }

    /// A reader of per-Service traffic, where the dataplane counts it.
    fn traffic_reader(&self) -> Option<crate::api::TrafficReader> {
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
    fn take_over(&mut self, interfaces: &[String]) {
        (**self).take_over(interfaces)
    }
    fn counter_reader(&self) -> Option<crate::api::CounterReader> {
        (**self).counter_reader()
    }
    fn traffic_reader(&self) -> Option<crate::api::TrafficReader> {
        (**self).traffic_reader()
    }
}
