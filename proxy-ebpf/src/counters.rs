use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    counters::Counter,
    maps::{BackendTrafficKey, Traffic},
};

use crate::maps::{BACKEND_TRAFFIC, COUNTERS, SERVICE_TRAFFIC};

/// Bumps `counter` and hands `verdict` through, so call sites read as one line.
#[inline(always)]
pub fn count<T>(counter: Counter, verdict: T) -> T {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *slot += 1 };
    }
    verdict
}

/// Adds one packet of `bytes` to the Service's traffic.
#[inline(always)]
pub fn count_traffic(service_id: u32, bytes: u32) {
    if let Some(t) = SERVICE_TRAFFIC.get_ptr_mut(service_id) {
        // Per-CPU slot: no other writer can race these increments.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes as u64;
        }
    }
}

/// Adds one packet of `bytes` to the Service's traffic and to that of the
/// backend (`addr`, `port`) serving it.
#[inline(always)]
pub fn count_traffic_via(service_id: u32, addr: [u8; 4], port: [u8; 2], bytes: u32) {
    count_traffic(service_id, bytes);
    let key = BackendTrafficKey::new(service_id, addr, port);
    match BACKEND_TRAFFIC.get_ptr_mut(key) {
        // Per-CPU value: no other writer can race these increments.
        Some(t) => unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes as u64;
        },
        // A first packet on this CPU; losing a race to another first packet
        // only loses this one count.
        None => {
            let _ = BACKEND_TRAFFIC.insert(key, Traffic { packets: 1, bytes: bytes as u64 }, BPF_NOEXIST as u64);
        }
    }
}
