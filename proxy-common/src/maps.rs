//! Map names, default sizes and the `#[repr(C)]` keys and values shared with
//! the eBPF programs. Every struct spells out its padding so the kernel sees
//! no uninitialised bytes in a key.
//!
//! Addresses and ports are kept in network byte order exactly as they appear
//! on the wire, so the datapath compares and copies them without swapping.

use crate::ipv6::In6;

/// Frontends: (VIP, port, protocol) -> service. An entry with port 0 and
/// protocol 0 marks the VIP itself, so packets that carry no ports
/// (non-first fragments) can still be recognised as addressed to a Service.
pub const SERVICES: &str = "SERVICES";
/// (service id, slot) -> backend.
pub const BACKENDS: &str = "BACKENDS";
pub use crate::conntrack::{CT_ANY, CT_LIFETIMES, CT_TCP, CT6_ANY, CT6_TCP};
/// Per-CPU packet counters indexed by [`crate::counters::Counter`]: a few
/// bytes per CPU, so every CPU counts in its own slot without atomics. The
/// only per-CPU map: sized by capacity, per-CPU maps would grow by megabytes
/// with every CPU.
pub const COUNTERS: &str = "COUNTERS";
/// Packets and bytes per service id (both directions), sized like the
/// service map. One value shared by all CPUs, updated with atomic adds: a
/// per-CPU array of this size would cost 2 MiB more for every CPU.
pub const SERVICE_TRAFFIC: &str = "SERVICE_TRAFFIC";
/// Packets and bytes per (service id, backend), both directions (LRU, sized
/// like the backend map). Shared by all CPUs and updated with atomic adds,
/// for the same reason as [`SERVICE_TRAFFIC`].
pub const BACKEND_TRAFFIC: &str = "BACKEND_TRAFFIC";

/// [`SERVICE_TRAFFIC`] and [`BACKEND_TRAFFIC`] for IPv6 frontends (their ids
/// are their own): frontend id -> [`Traffic`], and [`BackendTrafficKey6`] ->
/// [`Traffic`]. LRU maps a quarter of IPv4's sizes: flows that outlive
/// their frontend or backend count on, so a plain map would fill; the
/// agent also removes a frontend's entries when it goes, and a backend's
/// when it leaves.
pub const SERVICE_TRAFFIC6: &str = "SERVICE_TRAFFIC6";
pub const BACKEND_TRAFFIC6: &str = "BACKEND_TRAFFIC6";

/// Socket-level load balancing: (socket, VIP, port, protocol) -> the
/// backend an unconnected UDP socket was given, so its later datagrams to
/// the same Service go to the same backend (LRU, sized like conntrack).
pub const SOCK_AFFINITY: &str = "SOCK_AFFINITY";
/// Socket-level load balancing: (socket, backend, port, protocol) -> the
/// frontend the application addressed, which `recvmsg` and `getpeername`
/// show instead of the backend (LRU, sized like conntrack).
pub const SOCK_REVERSE: &str = "SOCK_REVERSE";

/// IPv6 TCP and UDP frontends: (VIP, port, protocol) -> [`ServiceValue`]
/// (its backend set in [`BACKENDS6`]), as [`SERVICES`]: ClusterIPs, and
/// the ways in from outside (node ports on the node's IPv6 addresses,
/// external and load balancer IPs) of frontends without source ranges. The
/// rest of IPv6 is served by ip6tables rules. Allocated as used.
pub const SERVICES6: &str = "SERVICES6";
/// (backend set, slot) -> [`Backend6`]. Allocated as used.
pub const BACKENDS6: &str = "BACKENDS6";
/// (socket, backend, port, protocol) -> [`ReverseEntry6`]: what
/// `getpeername` shows an IPv6 socket the hooks connected. An entry goes
/// when its socket closes; allocated as used.
pub const SOCK_REVERSE6: &str = "SOCK_REVERSE6";
/// An unconnected IPv6 UDP socket -> [`SockUdp6`]: the IPv6 ClusterIPs it
/// sent to and the backend each gave it, so its later datagrams go to the
/// same backend and replies show the VIP. Socket storage: it lives and dies
/// with its socket (pinned, so a restarted agent's programs keep it).
pub const SOCK_UDP6: &str = "SOCK_UDP6";

/// Socket-level load balancing of a frontend with source ranges: a socket
/// given one of its backends -> [`SockFence`], so the socket's packets to
/// that backend are checked against the ranges as they leave (the hooks
/// that choose run before the kernel picks the socket's source address).
/// Socket storage: it lives and dies with its socket (pinned, so a
/// restarted agent's programs keep it).
pub const SOCK_FENCE: &str = "SOCK_FENCE";

/// The ports of a fragmented datagram, learned from its first fragment
/// (the only one holding the L4 header), so its later fragments are
/// translated like it (LRU, as Cilium's IPV4_FRAGMENTS).
pub const FRAGMENTS: &str = "FRAGMENTS";
/// [`FRAGMENTS`] for IPv6 datagrams ([`FragmentKey6`]).
pub const FRAGMENTS6: &str = "FRAGMENTS6";

/// `loadBalancerSourceRanges`: (frontend id, client prefix) -> allowed,
/// an LPM trie consulted for frontends with [`flags::SOURCE_RANGES`].
pub const SOURCE_RANGES: &str = "SOURCE_RANGES";

/// Traffic from outside that the XDP program forwards to a backend on
/// another node (`externalTrafficPolicy: Cluster`) is source-NATed to the
/// node there: the client's flow (its conntrack service key) -> the node
/// address and port it goes out with (LRU, sized like conntrack).
pub const NAT_FORWARD: &str = "NAT_FORWARD";
/// The backend's replies to such a flow (backend -> node address and port,
/// as a conntrack reply key) -> the client they go back to (LRU).
pub const NAT_REVERSE: &str = "NAT_REVERSE";

/// [`NAT_FORWARD`] and [`NAT_REVERSE`] for IPv6 flows ([`FlowKey6`](crate::conntrack::FlowKey6)
/// -> [`NatAddress6`]; LRU, a quarter of conntrack's size: few flows
/// from outside are IPv6 on most nodes, and an LRU map is preallocated).
pub const NAT_FORWARD6: &str = "NAT_FORWARD6";
pub const NAT_REVERSE6: &str = "NAT_REVERSE6";

/// The node's devices: ifindex -> the path traffic from outside takes
/// there, a [`hook`] value (`TC_INGRESS` for the TC programs alone). The
/// XDP program redirects only to devices it runs on natively.
pub const DEVICES: &str = "DEVICES";
/// Pod interfaces whose Service traffic to a pod on the same bridge is
/// switched there rather than routed: ifindex -> [`BridgePort`]. Written
/// only for bridges that hand what they switch to iptables (br_netfilter),
/// so the node's FORWARD chain sees it either way.
pub const BRIDGE_PORTS: &str = "BRIDGE_PORTS";
/// What the datapath did on each interface, by hook: (ifindex, [`hook`]) ->
/// [`DeviceCounts`], per CPU (a few hundred interfaces of 32 bytes), for an
/// interface without a slot of its own ([`DEVICE_OWNERS`]).
pub const DEVICE_COUNTS: &str = "DEVICE_COUNTS";
/// Ports some IPv4 backend answers from, a bit each ([`port_bit`]): the
/// source port of every reply the programs translate back on a pod's
/// interface or a device. They read it before the conntrack, so what is
/// delivered there that is no reply skips hashing a key. Marked before a
/// backend is written and never cleared, as [`FRONTEND_PORTS`]: a flow to
/// a backend removed since still has its replies translated.
pub const BACKEND_PORTS: &str = "BACKEND_PORTS";
/// [`BACKEND_PORTS`] of the IPv6 backends.
pub const BACKEND_PORTS6: &str = "BACKEND_PORTS6";
/// Ports some IPv4 frontend uses, a bit each ([`port_bit`]): the
/// programs look a packet's destination port up here before the frontend
/// table, so what pods and devices carry to no Service, most of their
/// packets, skips hashing a key there. The agent marks a port before it
/// writes an entry with it, and clears none (a port marked for nothing
/// costs a lookup; one left unmarked would hide a frontend).
pub const FRONTEND_PORTS: &str = "FRONTEND_PORTS";
/// [`FRONTEND_PORTS`] of the IPv6 frontends.
pub const FRONTEND_PORTS6: &str = "FRONTEND_PORTS6";
/// The words of [`FRONTEND_PORTS`] and [`BACKEND_PORTS`]: a bit for each of
/// the 65,536 ports.
pub const PORT_WORDS: u32 = 1_024;

/// The word of a port bitmap holding `port`'s bit, and the bit.
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}

/// The quick way to an interface's counts: slot ([`device_slot`]) -> the
/// ifindex the agent gave it to (0: none). The owner's counts go to its
/// rows of [`DEVICE_SLOTS`], found by indexing two arrays instead of hashing
/// a key; an interface without its slot (another holds it) is counted in
/// [`DEVICE_COUNTS`]. The two add up: an interface counted in the map before
/// it got its slot keeps those counts there.
pub const DEVICE_OWNERS: &str = "DEVICE_OWNERS";
/// Per CPU, [`DEVICE_SLOT_HOOKS`] rows of [`DeviceCounts`] a slot
/// ([`device_row`]), for the interface [`DEVICE_OWNERS`] names; zeroed by
/// the agent before it hands the slot to another.
pub const DEVICE_SLOTS: &str = "DEVICE_SLOTS";

/// A frontend reached from outside under `externalTrafficPolicy: Local`
/// serves outside clients from this node's endpoints (its SERVICES entry),
/// but pods and the node's own processes from every endpoint, as kube-proxy
/// does: frontend id -> the cluster-wide [`ServiceValue`] of its Service
/// port, read by the socket hooks and the TC program on pod interfaces.
pub const CLUSTER_SCOPE: &str = "CLUSTER_SCOPE";
/// [`CLUSTER_SCOPE`] for IPv6 frontends (their ids are their own).
pub const CLUSTER_SCOPE6: &str = "CLUSTER_SCOPE6";

/// `sessionAffinity: ClientIP`: frontend id -> its timeout in seconds
/// (`sessionAffinityConfig.clientIP.timeoutSeconds`), for frontends with
/// [`flags::AFFINITY`].
pub const AFFINITY_TIMEOUTS: &str = "AFFINITY_TIMEOUTS";
/// `sessionAffinity: ClientIP`: [`AffinityKey`] (frontend, client) -> the
/// backend the client's last new flow went to and when ([`AffinityEntry`];
/// LRU, sized like conntrack), as kube-proxy's `-m recent` lists.
pub const AFFINITY: &str = "AFFINITY";

/// The sockets' own storage: not listed by inspection (socket storage
/// cannot be walked), pinned with the others all the same.
pub const SOCKET_STORAGE: [&str; 2] = [SOCK_FENCE, SOCK_UDP6];

/// The version of the maps' layout: their keys, values and what they mean.
/// Maps pinned by an agent of the same layout are reused by the next start;
/// any change to a key, a value or its meaning must bump it.
pub const LAYOUT: u32 = 1;

/// Every map, in the order the inspection commands list them.
pub const ALL_MAPS: [&str; 37] = [
    SERVICES,
    BACKENDS,
    SERVICES6,
    BACKENDS6,
    FRONTEND_PORTS,
    FRONTEND_PORTS6,
    BACKEND_PORTS,
    BACKEND_PORTS6,
    SOCK_REVERSE6,
    CLUSTER_SCOPE,
    CLUSTER_SCOPE6,
    SOURCE_RANGES,
    AFFINITY_TIMEOUTS,
    AFFINITY,
    CT_TCP,
    CT_ANY,
    CT6_TCP,
    CT6_ANY,
    CT_LIFETIMES,
    NAT_FORWARD,
    NAT_REVERSE,
    NAT_FORWARD6,
    NAT_REVERSE6,
    DEVICES,
    BRIDGE_PORTS,
    DEVICE_COUNTS,
    DEVICE_OWNERS,
    DEVICE_SLOTS,
    SOCK_AFFINITY,
    SOCK_REVERSE,
    FRAGMENTS,
    FRAGMENTS6,
    COUNTERS,
    SERVICE_TRAFFIC,
    BACKEND_TRAFFIC,
    SERVICE_TRAFFIC6,
    BACKEND_TRAFFIC6,
];

/// Map sizes used when the agent is not told otherwise. The service map
/// holds one entry per frontend plus one per VIP: 131,072 fits 65,536
/// single-port Services.
pub const DEFAULT_SERVICES_MAX: u32 = 131_072;
pub const DEFAULT_BACKENDS_MAX: u32 = 262_144;
/// Flows the per-packet path and the socket hooks track. [`CT_TCP`] holds
/// two entries per flow (one per direction), [`CT_ANY`] half as many flows.
pub const DEFAULT_CONNTRACK_MAX: u32 = 262_144;
/// Datagrams in flight in pieces at once: fragments are rare on pod
/// networks, and an entry is needed only until the last piece passed.
pub const DEFAULT_FRAGMENTS_MAX: u32 = 8_192;
/// Source ranges over all load balancer frontends.
pub const DEFAULT_SOURCE_RANGES_MAX: u32 = 16_384;
/// Frontends under a Local policy with their cluster-wide scope ([`CLUSTER_SCOPE`]).
pub const DEFAULT_CLUSTER_SCOPES_MAX: u32 = 16_384;
/// Interfaces counted per hook in [`DEVICE_COUNTS`] (pod interfaces included).
pub const DEFAULT_DEVICES_MAX: u32 = 4_096;
/// Slots of [`DEVICE_OWNERS`]: a node's interfaces seldom share one
/// (`ifindex % 1024`), and the rows cost 96 KiB per CPU.
pub const DEVICE_SLOTS_MAX: u32 = 1_024;
/// The hooks a slot has a row for, in row order.
pub const DEVICE_SLOT_HOOKS: [u8; 3] = [hook::TC_INGRESS, hook::TC_EGRESS, hook::XDP];

/// The slot interface `ifindex` may own ([`DEVICE_OWNERS`]).
pub const fn device_slot(ifindex: u32) -> u32 {
    ifindex % DEVICE_SLOTS_MAX
}

/// The row of [`DEVICE_SLOTS`] holding `hook`'s counts in `slot`; `None`
/// for a hook no program counts under.
pub const fn device_row(slot: u32, hook: u8) -> Option<u32> {
    let at = match hook {
        hook::TC_INGRESS => 0,
        hook::TC_EGRESS => 1,
        hook::XDP => 2,
        _ => return None,
    };
    Some(slot * DEVICE_SLOT_HOOKS.len() as u32 + at)
}

/// The source ports the datapath's source NAT hands out are the odd ones
/// of the upper half (above the node port range): one flow per (backend,
/// node address, port) at a time.
///
/// Odd, because the kernel gives a socket that connects without binding an
/// even port (since Linux 4.6, odd ones only when the even ones run out,
/// leaving the odd ones to `bind` to port 0). A node process's new TCP
/// connection therefore never takes a port a flow from outside was given
/// after the node's sockets were checked (see the datapath's `nat`), as it
/// could when every port was handed out: it would be one flow with that
/// flow at the backend, and the backend's answers would go to the flow's
/// client. (A UDP socket draws any port; the datapath's `nat` gives a
/// node socket's datagram the port back.)
pub const NAT_PORT_MIN: u16 = 32_768;
pub const NAT_PORT_COUNT: u32 = 32_768;

/// The NAT port the random number `random` picks: one of the odd ports
/// of the range (see [`NAT_PORT_MIN`]), each as likely; in network byte
/// order, as in the packet.
#[inline(always)]
pub const fn nat_port(random: u32) -> [u8; 2] {
    ((NAT_PORT_MIN as u32 + random % NAT_PORT_COUNT) as u16 | 1).to_be_bytes()
}

/// Whether the source NAT may hand out `port` (network byte order): an
/// odd port of the range (see [`NAT_PORT_MIN`]). A client's own port is
/// kept where it is one.
#[inline(always)]
pub const fn is_nat_port(port: [u8; 2]) -> bool {
    u16::from_be_bytes(port) >= NAT_PORT_MIN && port[1] & 1 == 1
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// Served by iptables mode only; the eBPF programs never see its frontends.
pub const PROTO_SCTP: u8 = 132;

/// Key of [`SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// VIP, network byte order.
    pub addr: [u8; 4],
    /// Port, network byte order; 0 in the VIP marker entry.
    pub port: [u8; 2],
    /// IP protocol number; 0 in the VIP marker entry.
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self { addr, port: port.to_be_bytes(), proto, _pad: 0 }
    }

    /// The marker entry saying "this address is a Service VIP".
    pub const fn vip_marker(addr: [u8; 4]) -> Self {
        Self::new(addr, 0, 0)
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// What a frontend is, kept in [`ServiceValue::kind`] so the maps describe
/// themselves to inspection tools (as Cilium's service flags do): a
/// ClusterIP frontend says its Service's type, an external frontend which
/// way in it is. The datapath does not read it.
pub mod kind {
    pub const CLUSTER_IP: u8 = 0;
    pub const NODE_PORT: u8 = 1;
    pub const LOAD_BALANCER: u8 = 2;
    /// A node port on one node address.
    pub const NODE_PORT_ADDRESS: u8 = 3;
    /// A load balancer ingress IP at the Service port.
    pub const LOAD_BALANCER_IP: u8 = 4;
    /// One of `spec.externalIPs` at the Service port.
    pub const EXTERNAL_IP: u8 = 5;

    /// Whether the frontend is a way in from outside (it shares its
    /// ClusterIP frontend's id).
    pub const fn is_external(kind: u8) -> bool {
        kind >= NODE_PORT_ADDRESS
    }
}

/// How a frontend treats traffic, kept in [`ServiceValue::flags`]: the
/// external frontends (node ports, external IPs, load balancer IPs) differ
/// from a ClusterIP by these alone.
pub mod flags {
    /// External traffic under `externalTrafficPolicy: Cluster`: a request
    /// whose backend is on another node is source-NATed to this one (by
    /// the XDP or TC program), so its replies come back through it.
    pub const MASQUERADE: u8 = 1;
    /// Only clients in the frontend's [`super::SOURCE_RANGES`] are served; others are dropped.
    pub const SOURCE_RANGES: u8 = 2;
    /// With no backend, new flows are dropped rather than refused
    /// (`externalTrafficPolicy: Local` with endpoints only on other nodes).
    pub const DROP_WITHOUT_BACKEND: u8 = 4;
    /// `externalTrafficPolicy: Local`: the entry's backends are this node's;
    /// pods and node processes use [`super::CLUSTER_SCOPE`] instead.
    pub const LOCAL: u8 = 8;
    /// `sessionAffinity: ClientIP`: a client's new flows go to the backend
    /// its last one went to, within the frontend's [`super::AFFINITY_TIMEOUTS`].
    pub const AFFINITY: u8 = 16;
    /// iptables mode has taken over and is draining eBPF mode's datapath:
    /// flows it tracks go on, translated both ways, while new flows and
    /// sockets are left untranslated for the node's iptables rules.
    pub const DRAINING: u8 = 32;
    /// eBPF mode is taking over from rules that translated flows to this
    /// frontend (iptables mode's or kube-proxy's, still in place): a packet
    /// no tracked flow claims is left to the node's conntrack and rules,
    /// but for a TCP SYN, the only packet sure to start a flow. The agent
    /// clears it once it has tracked the node's flows as
    /// [`crate::conntrack::STATE_HOST`].
    pub const ADOPTING: u8 = 64;
}

/// The source address a pod's request to its own Service gets on the
/// per-packet path when it is chosen as its own backend (hairpin), so its
/// answer leaves the pod instead of looping inside it. Link-local, never a
/// pod's or a node's; Cilium's IPV4_LOOPBACK default.
pub const HAIRPIN_SOURCE: [u8; 4] = [169, 254, 42, 1];
/// [`HAIRPIN_SOURCE`] for IPv6: `fd6b:7072::1`, a unique-local address
/// whose global ID spells "kpr", never a pod's or a node's. Not link-local:
/// the pod's answer must leave by its default route, as IPv4's does.
pub const HAIRPIN_SOURCE6: In6 = In6([0xfd, 0x6b, 0x70, 0x72, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);

/// Where a program runs on an interface: the `hook` of [`DeviceKey`] and
/// the value of [`DEVICES`].
pub mod hook {
    /// XDP in the driver (native).
    pub const XDP_NATIVE: u8 = 0;
    /// XDP on the kernel's generic path (after the driver built an skb).
    pub const XDP_GENERIC: u8 = 1;
    pub const TC_INGRESS: u8 = 2;
    pub const TC_EGRESS: u8 = 3;
    /// What the XDP program counts under: it does not know its mode, the
    /// agent does (the device's [`super::DEVICES`] entry names it).
    pub const XDP: u8 = 4;

    pub const fn name(hook: u8) -> &'static str {
        match hook {
            XDP_NATIVE => "xdp_native",
            XDP_GENERIC => "xdp_generic",
            TC_INGRESS => "tc_ingress",
            TC_EGRESS => "tc_egress",
            XDP => "xdp",
            _ => "unknown",
        }
    }
}

/// Key of [`DEVICE_COUNTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub ifindex: u32,
    /// One of [`hook`]: `TC_INGRESS`, `TC_EGRESS` or `XDP`.
    pub hook: u8,
    pub _pad: [u8; 3],
}

impl DeviceKey {
    pub const fn new(ifindex: u32, hook: u8) -> Self {
        Self { ifindex, hook, _pad: [0; 3] }
    }
}

/// Value of [`DEVICE_COUNTS`]: packets the hook acted on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Requests translated to a backend.
    pub translated: u64,
    /// Replies translated back to the frontend.
    pub reverse_translated: u64,
    /// Packets sent on by the program itself (XDP_TX / XDP_REDIRECT), the
    /// node's stack never seeing them.
    pub forwarded: u64,
    pub dropped: u64,
}

/// Value of [`BRIDGE_PORTS`]: the bridge a pod interface is a port of,
/// and the pod subnet on it (the bridge's own address and prefix), so only
/// requests to a backend in that subnet are looked for on the bridge.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgePort {
    pub bridge: u32,
    pub subnet: [u8; 4],
    pub mask: [u8; 4],
}

impl BridgePort {
    pub const fn new(bridge: u32, addr: [u8; 4], prefix: u8) -> Self {
        let mask = match prefix {
            0 => 0,
            1..=31 => u32::MAX << (32 - prefix),
            _ => u32::MAX,
        };
        let subnet = u32::from_be_bytes(addr) & mask;
        Self { bridge, subnet: subnet.to_be_bytes(), mask: mask.to_be_bytes() }
    }

    /// Whether `addr` is in the pod subnet on the bridge.
    pub const fn holds(&self, addr: [u8; 4]) -> bool {
        u32::from_be_bytes(addr) & u32::from_be_bytes(self.mask) == u32::from_be_bytes(self.subnet)
    }
}

/// Value of [`NAT_FORWARD`] and [`NAT_REVERSE`] (and, with an [`In6`],
/// of [`NAT_FORWARD6`] and [`NAT_REVERSE6`]): an address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatAddress<A = [u8; 4]> {
    pub addr: A,
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

pub type NatAddress6 = NatAddress<In6>;

impl<A> NatAddress<A> {
    pub const fn new(addr: A, port: [u8; 2]) -> Self {
        Self { addr, port, _pad: [0; 2] }
    }
}

/// Key of [`SOURCE_RANGES`] without the LPM prefix length: the frontend id
/// (big endian, so a prefix of the key is the id and then the address's
/// leading bits) and the client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    pub id: [u8; 4],
    pub addr: [u8; 4],
}

impl SourceRangeKey {
    /// The LPM prefix length of a range of `len` bits for one frontend.
    pub const fn prefix_len(len: u8) -> u32 {
        32 + len as u32
    }
}

/// Value of [`SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Identifies the frontend (its traffic counters and flows); stable while it lives.
    pub id: u32,
    /// Identifies the backend set in [`BACKENDS`]. A new set is written under
    /// a fresh id and published by rewriting this entry, so a packet sees
    /// the old set or the new one, never half of each.
    pub backend_set: u32,
    /// Ready backends in slots `0..backend_count`; 0 means refuse new flows.
    pub backend_count: u32,
    /// Terminating endpoints in the slots after the ready ones; never chosen
    /// for a new flow, listed so operators see them.
    pub terminating_count: u32,
    /// One of [`kind`].
    pub kind: u8,
    /// Any of [`flags`].
    pub flags: u8,
    pub _pad: [u8; 2],
}

impl ServiceValue {
    /// The value of a VIP marker entry.
    pub const MARKER: Self =
        Self { id: 0, backend_set: 0, backend_count: 0, terminating_count: 0, kind: 0, flags: 0, _pad: [0; 2] };
}

/// Key of [`BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// [`ServiceValue::backend_set`].
    pub set: u32,
    pub slot: u32,
}

/// [`Backend::state`] of a ready endpoint.
pub const BACKEND_ACTIVE: u8 = 0;
/// [`Backend::state`] of an endpoint shutting down but still serving.
pub const BACKEND_TERMINATING: u8 = 1;

/// Value of [`BACKENDS`] (and, as [`Backend6`], of [`BACKENDS6`]): an
/// endpoint address and target port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = [u8; 4]> {
    pub addr: A,
    pub port: [u8; 2],
    /// [`BACKEND_ACTIVE`] or [`BACKEND_TERMINATING`].
    pub state: u8,
    pub _pad: u8,
}

impl<A: Copy> Backend<A> {
    pub const fn new(addr: A, port: u16) -> Self {
        Self { addr, port: port.to_be_bytes(), state: BACKEND_ACTIVE, _pad: 0 }
    }

    pub const fn terminating(addr: A, port: u16) -> Self {
        Self { addr, port: port.to_be_bytes(), state: BACKEND_TERMINATING, _pad: 0 }
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Key of [`SERVICES6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    /// VIP, network byte order.
    pub addr: In6,
    /// Port, network byte order.
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey6 {
    pub const fn new(addr: [u8; 16], port: u16, proto: u8) -> Self {
        Self { addr: In6(addr), port: port.to_be_bytes(), proto, _pad: 0 }
    }

    /// The entry that says `addr` is a VIP, as [`ServiceKey::vip_marker`]:
    /// the per-packet path drops what it cannot translate to a VIP.
    pub const fn vip_marker(addr: [u8; 16]) -> Self {
        Self::new(addr, 0, 0)
    }

    pub const fn is_vip_marker(&self) -> bool {
        self.proto == 0
    }
}

/// Value of [`BACKENDS6`]: an IPv6 endpoint address and target port.
pub type Backend6 = Backend<In6>;

/// Key of [`SOCK_REVERSE6`]: one socket, the backend it was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey6 {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 5],
}

impl SockKey6 {
    pub const fn new(cookie: u64, addr: [u8; 16], port: [u8; 2], proto: u8) -> Self {
        Self { cookie, addr, port, proto, _pad: [0; 5] }
    }
}

/// One IPv6 ClusterIP an unconnected UDP socket sent to, and the backend
/// it was given there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlow6 {
    pub vip: [u8; 16],
    pub backend: [u8; 16],
    pub vip_port: [u8; 2],
    pub backend_port: [u8; 2],
    /// The frontend's id; 0 for an unused entry (ids start at 1).
    pub service_id: u32,
    /// The backend set the backend was last found in: while the frontend
    /// publishes the same set, the backend is still one of it.
    pub set: u32,
}

/// How many ClusterIPs one unconnected IPv6 UDP socket keeps a backend
/// for; a fifth replaces the oldest (whose next datagram chooses again).
pub const UDP_FLOWS6: usize = 4;

/// Value of [`SOCK_UDP6`], created zeroed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockUdp6 {
    pub flows: [UdpFlow6; UDP_FLOWS6],
    /// Where the next new flow goes (modulo [`UDP_FLOWS6`]).
    pub next: u32,
}

/// Value of [`SOCK_REVERSE6`]: the frontend the socket addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseEntry6 {
    pub vip: [u8; 16],
    pub vip_port: [u8; 2],
    pub _pad: [u8; 2],
    pub service_id: u32,
}

/// Value of [`SOCK_AFFINITY`]: the backend a socket was given.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardEntry {
    pub backend: Backend,
    pub service_id: u32,
}

/// Value of [`SOCK_REVERSE`]: the frontend that replies must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseEntry {
    pub vip: [u8; 4],
    pub vip_port: [u8; 2],
    pub _pad: [u8; 2],
    /// The frontend's service id, to count replies as its traffic.
    pub service_id: u32,
}

/// Value of [`SERVICE_TRAFFIC`] and [`BACKEND_TRAFFIC`]. Both fields are
/// 8-byte aligned, as the datapath's atomic adds require.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of [`BACKEND_TRAFFIC`] (and, with an [`In6`], of
/// [`BACKEND_TRAFFIC6`]): a backend as one Service's endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendTrafficKey<A = [u8; 4]> {
    pub service_id: u32,
    pub addr: A,
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

pub type BackendTrafficKey6 = BackendTrafficKey<In6>;

impl<A> BackendTrafficKey<A> {
    pub const fn new(service_id: u32, addr: A, port: [u8; 2]) -> Self {
        Self { service_id, addr, port, _pad: [0; 2] }
    }
}

/// Key of [`FRAGMENTS`]: what the fragments of one datagram share.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// Key of [`FRAGMENTS6`]: what the fragments of one IPv6 datagram share.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey6 {
    pub src: In6,
    pub dst: In6,
    /// The fragment header's identification, network byte order.
    pub id: [u8; 4],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of [`FRAGMENTS`] and [`FRAGMENTS6`]: the datagram's source and destination ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentPorts {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
}

/// Key of [`SOCK_AFFINITY`] (the frontend a socket addressed) and of
/// [`SOCK_REVERSE`] (the backend it was given): one socket, one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// The kernel's socket cookie: unique while the socket lives, never reused.
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

impl SockKey {
    pub const fn new(cookie: u64, addr: [u8; 4], port: [u8; 2], proto: u8) -> Self {
        Self { cookie, addr, port, proto, _pad: 0 }
    }
}

/// Key of [`AFFINITY`]: a frontend and a client of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub frontend_id: u32,
    /// What `client` is: [`AffinityKey::ADDRESS`] or [`AffinityKey::NETNS`].
    pub kind: u32,
    /// The client's address (per-packet path, network byte order in the
    /// low four bytes) or its network namespace's cookie (socket path: a
    /// pod's sockets share one, as its packets share one address).
    pub client: u64,
}

impl AffinityKey {
    pub const ADDRESS: u32 = 0;
    pub const NETNS: u32 = 1;

    pub const fn address(frontend_id: u32, addr: [u8; 4]) -> Self {
        Self { frontend_id, kind: Self::ADDRESS, client: u32::from_ne_bytes(addr) as u64 }
    }

    pub const fn netns(frontend_id: u32, cookie: u64) -> Self {
        Self { frontend_id, kind: Self::NETNS, client: cookie }
    }
}

/// Value of [`AFFINITY`]: the backend, the slot it was in, and when (in
/// seconds of the kernel's monotonic clock) the client last started a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityEntry {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    pub slot: u32,
    pub last: u32,
}

/// Value of [`SOCK_FENCE`]: the frontend whose source ranges a socket's
/// packets to `addr:port` (`proto`) must come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFence {
    pub frontend_id: u32,
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, and have no implicit padding
    // (asserted by the layout tests below), so any bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ForwardEntry {}
    unsafe impl aya::Pod for ReverseEntry {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for BackendTrafficKey {}
    unsafe impl aya::Pod for super::BackendTrafficKey6 {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentKey6 {}
    unsafe impl aya::Pod for FragmentPorts {}
    unsafe impl aya::Pod for DeviceKey {}
    unsafe impl aya::Pod for DeviceCounts {}
    unsafe impl aya::Pod for NatAddress {}
    unsafe impl aya::Pod for super::NatAddress6 {}
    unsafe impl aya::Pod for BridgePort {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for SockKey6 {}
    unsafe impl aya::Pod for ReverseEntry6 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn nat_ports_are_the_odd_ports_of_the_upper_half() {
        let port = |random: u32| u16::from_be_bytes(nat_port(random));
        // Every random number gives an odd port of the range, both ends reached.
        assert_eq!(port(0), NAT_PORT_MIN + 1);
        assert_eq!(port(1), NAT_PORT_MIN + 1);
        assert_eq!(port(NAT_PORT_COUNT - 1), u16::MAX);
        assert_eq!(port(NAT_PORT_COUNT), NAT_PORT_MIN + 1);
        for random in [7, 1 << 15, 123_456_789, u32::MAX - 1, u32::MAX] {
            assert!(is_nat_port(nat_port(random)), "{random} -> {}", port(random));
        }
        // A client's port is kept where it is odd and in the range; Linux
        // connects from even ones, which are left to the node's own.
        let client = |port: u16| is_nat_port(port.to_be_bytes());
        assert!(client(45_003) && client(32_769) && client(65_535));
        assert!(!client(45_002) && !client(32_768) && !client(65_534));
        assert!(!client(20_001) && !client(32_767));
    }

    #[test]
    fn every_port_has_a_bit_of_its_own() {
        let mut seen = [0u64; PORT_WORDS as usize];
        for port in 0..=u16::MAX {
            let (word, bit) = port_bit(port);
            assert_eq!(bit.count_ones(), 1);
            assert_eq!(seen[word as usize] & bit, 0, "port {port} shares a bit");
            seen[word as usize] |= bit;
        }
        assert!(seen.iter().all(|w| *w == u64::MAX), "every bit is a port's");
    }

    #[test]
    fn each_slot_has_a_row_per_counted_hook_and_no_two_share_one() {
        let mut rows = [false; (DEVICE_SLOTS_MAX as usize) * DEVICE_SLOT_HOOKS.len()];
        for slot in 0..DEVICE_SLOTS_MAX {
            for (at, hook) in DEVICE_SLOT_HOOKS.into_iter().enumerate() {
                let row = device_row(slot, hook).unwrap();
                // The reader finds a row's hook by its place in the slot.
                assert_eq!(row as usize % DEVICE_SLOT_HOOKS.len(), at);
                assert!(!core::mem::replace(&mut rows[row as usize], true), "row {row} given twice");
            }
        }
        assert!(rows.iter().all(|r| *r), "every row belongs to a slot");
        assert_eq!(device_row(5, hook::XDP_NATIVE), None, "the agent's names for XDP's modes are not counted under");
        assert_eq!(device_slot(3), device_slot(3 + DEVICE_SLOTS_MAX));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        // Sizes equal the sum of the declared fields: nothing left for the
        // compiler to pad, so keys hash identically in kernel and userspace.
        assert_eq!(size_of::<ServiceKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<FragmentKey6>(), 16 + 16 + 4 + 1 + 3);
        assert_eq!(size_of::<ServiceValue>(), 20);
        assert_eq!(size_of::<BackendTrafficKey>(), 12);
        assert_eq!(size_of::<BackendTrafficKey6>(), 4 + 16 + 2 + 2);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<ForwardEntry>(), 12);
        assert_eq!(align_of::<ForwardEntry>(), 4);
        assert_eq!(size_of::<ReverseEntry>(), 12);
        assert_eq!(size_of::<SockFence>(), 12);
        assert_eq!(size_of::<Traffic>(), 16);
        assert_eq!(size_of::<BridgePort>(), 12);
        let port = BridgePort::new(7, [10, 244, 0, 1], 24);
        assert!(port.holds([10, 244, 0, 15]) && !port.holds([10, 244, 1, 15]));
        assert!(BridgePort::new(7, [10, 244, 0, 1], 0).holds([192, 0, 2, 1]));
        assert_eq!(align_of::<Traffic>(), 8, "atomic adds need aligned u64s");
        assert_eq!(size_of::<SockKey>(), 8 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<AffinityKey>(), 4 + 4 + 8);
        assert_eq!(size_of::<AffinityEntry>(), 4 + 2 + 2 + 4 + 4);
        assert_eq!(size_of::<FragmentKey>(), 4 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<FragmentPorts>(), 4);
        assert_eq!(size_of::<DeviceKey>(), 8);
        assert_eq!(size_of::<DeviceCounts>(), 32);
        assert_eq!(size_of::<NatAddress>(), 8);
        assert_eq!(size_of::<NatAddress6>(), 16 + 2 + 2);
        assert_eq!(size_of::<ServiceKey6>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<Backend6>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<SockKey6>(), 8 + 16 + 2 + 1 + 5);
        assert_eq!(size_of::<ReverseEntry6>(), 16 + 2 + 2 + 4);
        assert_eq!(size_of::<UdpFlow6>(), 16 + 16 + 2 + 2 + 4 + 4);
        assert_eq!(size_of::<SockUdp6>(), 4 * 44 + 4);
    }

    #[test]
    fn ports_are_network_order() {
        let k = ServiceKey::new([10, 96, 0, 10], 80, PROTO_TCP);
        assert_eq!(k.port, [0, 80]);
        assert_eq!(k.port(), 80);
        assert_eq!(Backend::new([1, 2, 3, 4], 8080).port, [0x1f, 0x90]);
    }
}
