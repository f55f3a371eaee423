//! The datapath's clock as userspace reads it: conntrack entries record
//! when they were last seen in seconds of CLOCK_MONOTONIC (the kernel's
//! `bpf_ktime_get_coarse_ns`: the same clock, read at tick granularity),
//! and the collector and inspection compare against it.

/// Seconds of CLOCK_MONOTONIC, read as the datapath reads it (coarse).
pub fn monotonic_seconds() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_counts_seconds_forward() {
        let a = super::monotonic_seconds();
        let b = super::monotonic_seconds();
        assert!(b >= a && b - a < 2);
    }
}
