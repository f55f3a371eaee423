//! Dataplanes apply planner operations to the kernel.

pub mod ebpf;

use crate::{model::FrontendKey, planner::Op};

/// An operation that could not be applied; the rest of the sync went on.
#[derive(Debug, thiserror::Error)]
#[error("{frontend}: {reason}")]
pub struct ApplyError {
    pub frontend: FrontendKey,
    pub reason: String,
}

pub trait Dataplane {
    /// Applies `ops` in order. Failures are returned, never stop the others.
    fn apply(&mut self, ops: &[Op]) -> Vec<ApplyError>;
}
