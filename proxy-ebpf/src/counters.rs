use proxy_common::counters::Counter;

use crate::maps::{COUNTERS, SERVICE_TRAFFIC};

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
