//! Test harness for kpr: network namespaces, a virtual node with pods on a
//! bridge, real TCP/UDP servers inside them, the `kpr` process, and crafted
//! packets. `cargo xtask demo` builds on the same pieces.

pub mod kpr;
pub mod netns;
pub mod node;
pub mod packet;
pub mod root;
pub mod servers;
pub mod client;
pub mod manifests;
pub mod demo;
pub mod apiserver;
pub mod objects;
pub mod bench;
