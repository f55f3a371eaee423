//! The kernel <-> userspace ABI of kpr and the pure logic both sides share.
//!
//! Everything here is `no_std` so the eBPF programs can use it, and plain
//! enough that host unit tests reach every branch.
#![no_std]

pub mod checksum;
pub mod conntrack;
pub mod counters;
pub mod ipv4;
pub mod ipv6;
pub mod maps;
pub mod reject;
pub mod select;

#[cfg(test)]
extern crate std;
