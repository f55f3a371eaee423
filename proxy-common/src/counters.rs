//! Indices of the per-CPU packet counters: what the datapath did and why.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Client -> VIP packets translated to a backend.
    Translated = 0,
    /// Backend -> client replies translated back to the VIP.
    ReverseTranslated,
    /// New flows to a Service without ready endpoints, answered with TCP RST
    /// or ICMP port unreachable.
    RefusedNoBackend,
    /// Packets to a Service without endpoints that could not be answered
    /// (IP options, other protocols) and were dropped.
    DroppedNoBackend,
    /// Fragments addressed to a Service VIP: dropped, since only the first
    /// fragment carries ports and translating it alone would split the datagram.
    DroppedFragment,
    /// Packets to a Service VIP too short to hold their L4 header: dropped.
    DroppedTruncated,
    /// Malformed IPv4 headers (bad version/IHL, truncated): passed to the
    /// kernel untouched, which drops them itself.
    PassedMalformed,
    /// Fragments not addressed to a Service: passed untouched.
    PassedFragment,
    /// Non-IPv4 frames: passed untouched.
    PassedNotIpv4,
    /// A flow's backend slot vanished between lookups: dropped, the client retries.
    DroppedBackendMissing,
    /// Translated packets sent straight to the destination pod's interface.
    Redirected,
}

/// Number of counters; the size of the counter map.
pub const COUNT: u32 = 11;

impl Counter {
    pub const ALL: [Counter; COUNT as usize] = [
        Counter::Translated,
        Counter::ReverseTranslated,
        Counter::RefusedNoBackend,
        Counter::DroppedNoBackend,
        Counter::DroppedFragment,
        Counter::DroppedTruncated,
        Counter::PassedMalformed,
        Counter::PassedFragment,
        Counter::PassedNotIpv4,
        Counter::DroppedBackendMissing,
        Counter::Redirected,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Translated => "translated",
            Counter::ReverseTranslated => "reverse_translated",
            Counter::RefusedNoBackend => "refused_no_backend",
            Counter::DroppedNoBackend => "dropped_no_backend",
            Counter::DroppedFragment => "dropped_fragment",
            Counter::DroppedTruncated => "dropped_truncated",
            Counter::PassedMalformed => "passed_malformed",
            Counter::PassedFragment => "passed_fragment",
            Counter::PassedNotIpv4 => "passed_not_ipv4",
            Counter::DroppedBackendMissing => "dropped_backend_missing",
            Counter::Redirected => "redirected",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{}", c.name());
        }
    }
}
