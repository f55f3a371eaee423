//! Test harness for kpr: network namespaces, a virtual node with pods on a
//! bridge, real TCP/UDP servers inside them, the `kpr` process, and crafted
//! packets. `cargo xtask demo` builds on the same pieces.

pub mod apiserver;
pub mod bench;
pub mod browser;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod containerd;
pub mod demo;
pub mod kpr;
pub mod manifests;
pub mod netns;
pub mod node;
pub mod objects;
pub mod packet;
pub mod root;
pub mod servers;
pub mod wait;
pub mod xdp_generator;
pub mod xdp_pass;
