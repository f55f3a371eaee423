use proxy_common::counters::Counter;

use crate::maps::COUNTERS;

/// Bumps `counter` and hands `verdict` through, so call sites read as one line.
#[inline(always)]
pub fn count<T>(counter: Counter, verdict: T) -> T {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *slot += 1 };
    }
    verdict
}
