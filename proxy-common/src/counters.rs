//! Indices of the per-CPU packet counters: what the datapath did and why.
//!
//! Every packet the datapath drops is counted under exactly one
//! [`DropReason`], each of which owns one `dropped_*` counter (the idea of
//! Cilium's drop_reasons.h): the names are also the `reason` label of
//! `kpr_datapath_packets_total`, so an operator sees why packets vanished.

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
    /// (IP options, a TCP reset) and were dropped.
    DroppedNoBackend,
    /// Later fragments addressed to a Service VIP whose first fragment was
    /// not seen (out of order, or its flow gone): dropped, since only the
    /// first fragment carries the ports that say where the datagram goes.
    DroppedFragment,
    /// Packets to a Service VIP too short to hold their L4 header: dropped.
    DroppedTruncated,
    /// Malformed IPv4 headers (bad version/IHL, truncated): passed to the
    /// kernel untouched, which drops them itself.
    PassedMalformed,
    /// Later fragments of datagrams kpr did not translate: passed untouched.
    PassedFragment,
    /// Frames neither IPv4 nor IPv6 (ARP, say): passed untouched.
    PassedNotIp,
    /// A flow's backend slot vanished between lookups: dropped, the client retries.
    DroppedBackendMissing,
    /// Reading the packet through the kernel's helper failed: dropped.
    DroppedLoadFailed,
    /// Writing a rewritten header into the packet failed: dropped, since it
    /// may be half rewritten.
    DroppedStoreFailed,
    /// A checksum helper failed while translating or answering: dropped,
    /// since its checksums no longer match its headers.
    DroppedChecksumFailed,
    /// Resizing a packet into a refusal (change_tail, adjust_room) failed: dropped.
    DroppedResizeFailed,
    /// The kernel refused to redirect the packet to an interface: dropped.
    DroppedRedirectFailed,
    /// The conntrack entries of a new flow could not be written: dropped, as
    /// the flow would switch backends or its replies go untranslated; the
    /// client retransmits.
    DroppedConntrackFailed,
    /// Sockets connecting or sending to a VIP given a backend (socket-level
    /// load balancing: no per-packet work follows).
    SocketTranslated,
    /// Addresses shown to an application as the VIP instead of the backend
    /// (`recvmsg`, `getpeername`).
    SocketReverseTranslated,
    /// Connects and sends to a Service without ready endpoints, failed with
    /// ECONNREFUSED.
    SocketRefusedNoBackend,
    /// Reply entries found stale (their flow ended, expired, moved to
    /// another backend, or the tuple is now used without a Service) and
    /// removed instead of rewriting a packet.
    ConntrackStale,
    /// Reply entries evicted from a live flow and restored by its next packet.
    ConntrackRestored,
    /// New flows dropped because every backend tried would give them the
    /// reply tuple of a live flow to another frontend sharing the backend
    /// (the same client port to both), or because every source port the TC
    /// path's source NAT tried is a live flow's; the client retries.
    DroppedConntrackCollision,
    /// ICMP errors about a translated flow (port unreachable, fragmentation
    /// needed, time exceeded) translated like the flow, quote included.
    IcmpErrorTranslated,
    /// Packets to a load balancer IP from a client outside the Service's
    /// `loadBalancerSourceRanges`: dropped, as kube-proxy's firewall does.
    DroppedSourceRange,
    /// New flows from outside to a Service with `externalTrafficPolicy:
    /// Local` and no endpoint on this node: dropped, as kube-proxy does
    /// (the load balancer's health check steers clients elsewhere).
    DroppedNoLocalBackend,
    /// Requests from outside the XDP program translated (and source-NATed)
    /// and sent back out toward a backend on another node.
    XdpForwarded,
    /// Replies to those the XDP program translated back and sent to the client.
    XdpReplyForwarded,
    /// New flows from outside the XDP program left to the TC path: no route
    /// or neighbour to the backend yet, or every source port it tried busy.
    XdpPassedToStack,
    /// Packets of a flow the XDP or TC program source-NATs and forwards
    /// itself with no route (or, in XDP, no neighbour) to the next hop, or
    /// whose TTL would run out there: dropped (the stack cannot take over
    /// such a flow), the sender retransmits.
    DroppedNoRoute,
    /// Requests from outside too big for the device toward their backend
    /// ("don't fragment" set, or IPv6): answered with "fragmentation
    /// needed" ("packet too big") and the device's MTU, as a router does.
    AnsweredTooBig,
    /// Flows from outside whose source-NAT port a node's UDP socket took
    /// after the flow was given it: their mapping dropped when the node's
    /// datagram left, so the socket gets the backend's answers and the
    /// flow's next datagram another port.
    NatYieldedToNode,
}

/// Number of counters; the size of the counter map.
pub const COUNT: u32 = 31;

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
        Counter::PassedNotIp,
        Counter::DroppedBackendMissing,
        Counter::DroppedLoadFailed,
        Counter::DroppedStoreFailed,
        Counter::DroppedChecksumFailed,
        Counter::DroppedResizeFailed,
        Counter::DroppedRedirectFailed,
        Counter::DroppedConntrackFailed,
        Counter::SocketTranslated,
        Counter::SocketReverseTranslated,
        Counter::SocketRefusedNoBackend,
        Counter::ConntrackStale,
        Counter::ConntrackRestored,
        Counter::DroppedConntrackCollision,
        Counter::IcmpErrorTranslated,
        Counter::DroppedSourceRange,
        Counter::DroppedNoLocalBackend,
        Counter::XdpForwarded,
        Counter::XdpReplyForwarded,
        Counter::XdpPassedToStack,
        Counter::DroppedNoRoute,
        Counter::AnsweredTooBig,
        Counter::NatYieldedToNode,
    ];

    /// The counter's name, also its metric label: snake_case, and `dropped_`
    /// exactly for the counters of a [`DropReason`].
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
            Counter::PassedNotIp => "passed_not_ip",
            Counter::DroppedBackendMissing => "dropped_backend_missing",
            Counter::DroppedLoadFailed => "dropped_load_failed",
            Counter::DroppedStoreFailed => "dropped_store_failed",
            Counter::DroppedChecksumFailed => "dropped_checksum_failed",
            Counter::DroppedResizeFailed => "dropped_resize_failed",
            Counter::DroppedRedirectFailed => "dropped_redirect_failed",
            Counter::DroppedConntrackFailed => "dropped_conntrack_failed",
            Counter::SocketTranslated => "socket_translated",
            Counter::SocketReverseTranslated => "socket_reverse_translated",
            Counter::SocketRefusedNoBackend => "socket_refused_no_backend",
            Counter::ConntrackStale => "conntrack_stale",
            Counter::ConntrackRestored => "conntrack_restored",
            Counter::DroppedConntrackCollision => "dropped_conntrack_collision",
            Counter::IcmpErrorTranslated => "icmp_error_translated",
            Counter::DroppedSourceRange => "dropped_source_range",
            Counter::DroppedNoLocalBackend => "dropped_no_local_backend",
            Counter::XdpForwarded => "xdp_forwarded",
            Counter::XdpReplyForwarded => "xdp_reply_forwarded",
            Counter::XdpPassedToStack => "xdp_passed_to_stack",
            Counter::DroppedNoRoute => "dropped_no_route",
            Counter::AnsweredTooBig => "answered_too_big",
            Counter::NatYieldedToNode => "nat_yielded_to_node",
        }
    }
}

/// Why the datapath drops a packet. The programs' steps return it as their
/// error; the program wrapper alone counts it and shoots the packet, so no
/// drop goes uncounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    NoBackend,
    Fragment,
    Truncated,
    BackendMissing,
    LoadFailed,
    StoreFailed,
    ChecksumFailed,
    ResizeFailed,
    RedirectFailed,
    ConntrackFailed,
    ConntrackCollision,
    SourceRange,
    NoLocalBackend,
    NoRoute,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        DropReason::NoBackend,
        DropReason::Fragment,
        DropReason::Truncated,
        DropReason::BackendMissing,
        DropReason::LoadFailed,
        DropReason::StoreFailed,
        DropReason::ChecksumFailed,
        DropReason::ResizeFailed,
        DropReason::RedirectFailed,
        DropReason::ConntrackFailed,
        DropReason::ConntrackCollision,
        DropReason::SourceRange,
        DropReason::NoLocalBackend,
        DropReason::NoRoute,
    ];

    /// The counter this reason is counted under.
    pub const fn counter(self) -> Counter {
        match self {
            DropReason::NoBackend => Counter::DroppedNoBackend,
            DropReason::Fragment => Counter::DroppedFragment,
            DropReason::Truncated => Counter::DroppedTruncated,
            DropReason::BackendMissing => Counter::DroppedBackendMissing,
            DropReason::LoadFailed => Counter::DroppedLoadFailed,
            DropReason::StoreFailed => Counter::DroppedStoreFailed,
            DropReason::ChecksumFailed => Counter::DroppedChecksumFailed,
            DropReason::ResizeFailed => Counter::DroppedResizeFailed,
            DropReason::RedirectFailed => Counter::DroppedRedirectFailed,
            DropReason::ConntrackFailed => Counter::DroppedConntrackFailed,
            DropReason::ConntrackCollision => Counter::DroppedConntrackCollision,
            DropReason::SourceRange => Counter::DroppedSourceRange,
            DropReason::NoLocalBackend => Counter::DroppedNoLocalBackend,
            DropReason::NoRoute => Counter::DroppedNoRoute,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::BTreeSet, vec::Vec};

    #[test]
    fn indices_are_dense() {
        assert_eq!(Counter::ALL.len(), COUNT as usize);
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{}", c.name());
        }
    }

    #[test]
    fn names_are_distinct_snake_case_labels() {
        let names: BTreeSet<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Counter::ALL.len(), "{names:?}");
        for n in names {
            assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{n}");
            assert!(!n.starts_with('_') && !n.ends_with('_') && !n.contains("__"), "{n}");
        }
    }

    #[test]
    fn every_dropped_counter_belongs_to_exactly_one_drop_reason() {
        let owned: Vec<Counter> = DropReason::ALL.iter().map(|r| r.counter()).collect();
        let dropped: Vec<Counter> = Counter::ALL.into_iter().filter(|c| c.name().starts_with("dropped_")).collect();
        assert_eq!(owned, dropped, "each reason owns one dropped_* counter and every dropped_* counter has a reason");
    }
}
