//! kpr: an eBPF kube-proxy replacement.
//!
//! Data flows one way: a [`source`] yields Kubernetes objects, the [`model`]
//! validates them into frontends and backends, the [`planner`] diffs old and
//! new, and a [`dataplane`] applies the operations. [`agent`] wires them.

pub mod agent;
pub mod api;
pub mod dashboard;
pub mod dataplane;
pub mod index;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod planner;
pub mod source;
pub mod status;
