//! kpr: an eBPF kube-proxy replacement.
//!
//! Data flows one way: a [`source`] reads Kubernetes objects, [`validate`]
//! reduces them to what the proxy uses, the [`index`] holds them, the
//! [`model`] recomputes the frontends of touched Services, the [`planner`]
//! turns what changed into operations, and a [`dataplane`] applies them.
//! [`sync`] runs those steps; the binary's `agent` wires everything. Leaf types
//! ([`name`], [`frontend`], [`rejection`]) sit at the bottom; observers
//! ([`api`], [`dashboard`], [`inspect`], [`status`]) only read, and
//! [`healthcheck`] answers load balancers from the model. The [`dns`] add-on
//! answers Service names from the index.

pub mod api;
pub mod clock;
pub mod dashboard;
pub mod dataplane;
pub mod dns;
pub mod frontend;
pub mod healthcheck;
pub mod index;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod name;
pub mod planner;
pub mod rejection;
pub mod source;
pub mod status;
pub mod sync;
pub mod takeover;
pub mod testing;
pub mod validate;
