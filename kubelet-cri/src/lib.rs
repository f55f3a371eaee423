//! kpr's slim kubelet: Pods from a source (static manifests or the API
//! server) run on a CRI runtime (containerd) through its RuntimeService and
//! ImageService, with their status written back.
//!
//! One step per module: [`cri`] (the connection), [`spec`] (Pod -> CRI
//! configs), [`config`] (environment and configuration volumes), [`images`]
//! (pull policy), [`kubelet`] (the reconcile loop, handing each pod to its
//! [`worker`]), [`lifecycle`] (what a pass does for a pod, and the crash
//! back-off), [`status`] (what to report), [`source`] (where pods come
//! from), [`logs`] (reading container logs), [`node`] (the Node and its
//! lease), [`probe`] (startup, readiness and liveness probes), [`handler`]
//! (what a probe or a lifecycle hook runs), [`cgroups`] (QoS and pod
//! cgroups), [`ownership`] (fsGroup on volumes), [`quantity`] (resource
//! quantities);
//! [`error`] names what can go wrong.

pub mod cgroups;
pub mod config;
pub mod cri;
pub mod error;
pub mod handler;
pub mod images;
pub mod kubelet;
pub mod lifecycle;
pub mod logs;
pub mod node;
pub mod ownership;
pub mod probe;
pub mod quantity;
pub mod run;
pub mod source;
pub mod spec;
pub mod status;
pub mod worker;
