//! The maps, sized by defaults the agent overrides at load time. Only the
//! counters, by kind and by interface, are per-CPU, at fixed sizes: a
//! per-CPU map sized by capacity would grow by megabytes with every CPU
//! (see proxy-common's maps docs).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use proxy_common::{
    conntrack::{CtEntry, CtEntry6, FlowKey, FlowKey6, Lifetimes},
    counters,
    maps::{
        AffinityEntry, AffinityKey, Backend, Backend6, BackendKey, BackendTrafficKey, BackendTrafficKey6, BridgePort,
        DEFAULT_BACKENDS_MAX, DEFAULT_CLUSTER_SCOPES_MAX, DEFAULT_CONNTRACK_MAX, DEFAULT_DEVICES_MAX,
        DEFAULT_FRAGMENTS_MAX, DEFAULT_SERVICES_MAX, DEFAULT_SOURCE_RANGES_MAX, DEVICE_SLOT_HOOKS, DEVICE_SLOTS_MAX,
        DeviceCounts, DeviceKey, ForwardEntry, FragmentKey, FragmentKey6, FragmentPorts, NatAddress, NatAddress6,
        PORT_WORDS, ReverseEntry, ReverseEntry6, ServiceKey, ServiceKey6, ServiceValue, SockFence, SockKey, SockKey6,
        SockUdp6, SourceRangeKey, Traffic,
    },
};

#[map]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(DEFAULT_SERVICES_MAX, 0);

/// Frontend id -> session affinity timeout (seconds), for frontends with it.
#[map]
pub(crate) static AFFINITY_TIMEOUTS: HashMap<u32, u32> =
    HashMap::with_max_entries(DEFAULT_SERVICES_MAX, BPF_F_NO_PREALLOC);

/// (frontend, client) -> the backend its last new flow went to, and when.
#[map]
pub(crate) static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, 0);

/// Few entries, so not preallocated (unlike the service map).
#[map]
pub(crate) static CLUSTER_SCOPE: HashMap<u32, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_CLUSTER_SCOPES_MAX, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static CLUSTER_SCOPE6: HashMap<u32, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_CLUSTER_SCOPES_MAX, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::with_max_entries(DEFAULT_SOURCE_RANGES_MAX, 0);

#[map]
pub(crate) static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(DEFAULT_BACKENDS_MAX, 0);

/// Both directions of every TCP flow: two entries per flow.
#[map]
pub(crate) static CT_TCP: LruHashMap<FlowKey, CtEntry> = LruHashMap::with_max_entries(2 * DEFAULT_CONNTRACK_MAX, 0);

/// Both directions of every other flow, half as many flows as TCP (Cilium's ratio).
#[map]
pub(crate) static CT_ANY: LruHashMap<FlowKey, CtEntry> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, 0);

/// The IPv6 flows of the per-packet path, as CT_TCP and CT_ANY but
/// allocated as used (see proxy-common's `CT6_TCP`); the agent's collector
/// removes what expires.
#[map]
pub(crate) static CT6_TCP: HashMap<FlowKey6, CtEntry6> =
    HashMap::with_max_entries(2 * DEFAULT_CONNTRACK_MAX, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static CT6_ANY: HashMap<FlowKey6, CtEntry6> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, BPF_F_NO_PREALLOC);

/// One entry, written by the agent before its programs serve (see `conntrack::lifetimes`).
#[map]
pub(crate) static CT_LIFETIMES: Array<Lifetimes> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[map]
pub(crate) static SERVICE_TRAFFIC: Array<Traffic> = Array::with_max_entries(DEFAULT_SERVICES_MAX, 0);

#[map]
pub(crate) static BACKEND_TRAFFIC: LruHashMap<BackendTrafficKey, Traffic> =
    LruHashMap::with_max_entries(DEFAULT_BACKENDS_MAX, 0);

/// IPv6's traffic (see proxy-common's `SERVICE_TRAFFIC6`): LRU, a quarter
/// of IPv4's sizes.
#[map]
pub(crate) static SERVICE_TRAFFIC6: LruHashMap<u32, Traffic> =
    LruHashMap::with_max_entries(DEFAULT_SERVICES_MAX / 4, 0);

#[map]
pub(crate) static BACKEND_TRAFFIC6: LruHashMap<BackendTrafficKey6, Traffic> =
    LruHashMap::with_max_entries(DEFAULT_BACKENDS_MAX / 4, 0);

#[map]
pub(crate) static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::with_max_entries(DEFAULT_FRAGMENTS_MAX, 0);

#[map]
pub(crate) static FRAGMENTS6: LruHashMap<FragmentKey6, FragmentPorts> =
    LruHashMap::with_max_entries(DEFAULT_FRAGMENTS_MAX, 0);

#[map]
pub(crate) static SOCK_AFFINITY: LruHashMap<SockKey, ForwardEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, 0);

#[map]
pub(crate) static SOCK_REVERSE: LruHashMap<SockKey, ReverseEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, 0);

/// The IPv6 socket path's maps: few entries on most nodes, so allocated as used.
#[map]
pub(crate) static SERVICES6: HashMap<ServiceKey6, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_SERVICES_MAX, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static BACKENDS6: HashMap<BackendKey, Backend6> =
    HashMap::with_max_entries(DEFAULT_BACKENDS_MAX, BPF_F_NO_PREALLOC);

/// Not LRU (an LRU map is preallocated): each entry goes when its socket closes.
#[map]
pub(crate) static SOCK_REVERSE6: HashMap<SockKey6, ReverseEntry6> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, BPF_F_NO_PREALLOC);

/// Socket storage, so a BTF map (the kernel wants its types).
#[btf_map]
pub(crate) static SOCK_FENCE: SkStorage<SockFence> = SkStorage::new();

/// An unconnected IPv6 UDP socket's ClusterIPs and backends: socket
/// storage, so it needs no cleanup and takes no memory before it is used.
#[btf_map]
pub(crate) static SOCK_UDP6: SkStorage<SockUdp6> = SkStorage::new();

#[map]
pub(crate) static NAT_FORWARD: LruHashMap<FlowKey, NatAddress> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, 0);

#[map]
pub(crate) static NAT_REVERSE: LruHashMap<FlowKey, NatAddress> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX, 0);

/// A quarter of the IPv4 maps' size (see proxy-common's `NAT_FORWARD6`).
#[map]
pub(crate) static NAT_FORWARD6: LruHashMap<FlowKey6, NatAddress6> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX / 4, 0);

#[map]
pub(crate) static NAT_REVERSE6: LruHashMap<FlowKey6, NatAddress6> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_MAX / 4, 0);

/// Pod interface -> the bridge its Service traffic may be switched on (see `bridge`).
#[map]
pub(crate) static BRIDGE_PORTS: HashMap<u32, BridgePort> = HashMap::with_max_entries(DEFAULT_DEVICES_MAX, 0);

#[map]
pub(crate) static DEVICES: HashMap<u32, u8> = HashMap::with_max_entries(DEFAULT_DEVICES_MAX, 0);

#[map]
pub(crate) static FRONTEND_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map]
pub(crate) static FRONTEND_PORTS6: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map]
pub(crate) static BACKEND_PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map]
pub(crate) static BACKEND_PORTS6: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

#[map]
pub(crate) static DEVICE_OWNERS: Array<u32> = Array::with_max_entries(DEVICE_SLOTS_MAX, 0);

#[map]
pub(crate) static DEVICE_SLOTS: PerCpuArray<DeviceCounts> =
    PerCpuArray::with_max_entries(DEVICE_SLOTS_MAX * DEVICE_SLOT_HOOKS.len() as u32, 0);

#[map]
pub(crate) static DEVICE_COUNTS: PerCpuHashMap<DeviceKey, DeviceCounts> =
    PerCpuHashMap::with_max_entries(DEFAULT_DEVICES_MAX, 0);
