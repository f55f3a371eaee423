//! Counting what the datapath does: per-CPU counters by [`Counter`] and
//! by interface, and traffic per Service and backend in maps shared by all
//! CPUs.
//!
//! The traffic maps are sized by capacity, so per-CPU copies would grow by
//! megabytes with every CPU; one shared value updated with atomic adds
//! costs the same on any machine. Traffic is statistics only: a count that
//! cannot be recorded is lost, and no verdict ever depends on one.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{bindings::BPF_NOEXIST, maps::LruHashMap};
use proxy_common::{
    counters::Counter,
    ipv6::In6,
    maps::{BackendTrafficKey, BackendTrafficKey6, DeviceCounts, DeviceKey, Traffic, device_row, device_slot},
};

use crate::maps::{
    BACKEND_TRAFFIC, BACKEND_TRAFFIC6, COUNTERS, DEVICE_COUNTS, DEVICE_OWNERS, DEVICE_SLOTS, SERVICE_TRAFFIC,
    SERVICE_TRAFFIC6,
};

/// Bumps `counter` and hands `verdict` through, so call sites read as one line.
#[inline(always)]
pub(crate) fn count<T>(counter: Counter, verdict: T) -> T {
    // The map holds a slot for every counter (proxy-common checks that the
    // indices are dense below COUNT), so the lookup always succeeds.
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *slot += 1 };
    }
    verdict
}

/// What a hook did with a packet, counted per interface.
#[derive(Clone, Copy)]
pub(crate) enum DeviceEvent {
    Translated,
    ReverseTranslated,
    Dropped,
}

/// Counts `event` on interface `ifindex` under `hook` (see
/// proxy-common's `hook`); `forwarded` when the program sent the packet on
/// itself. Per CPU, so plain increments: in the interface's rows when it
/// owns its slot (two array reads, which the verifier inlines), else in
/// the map, where its first packet on a CPU creates its entry (hashing the
/// key took a tenth of a translated request's run).
#[inline(always)]
pub(crate) fn count_device(ifindex: u32, hook: u8, event: DeviceEvent, forwarded: bool) {
    let slot = device_slot(ifindex);
    if DEVICE_OWNERS.get(slot) == Some(&ifindex)
        && let Some(row) = device_row(slot, hook)
        && let Some(c) = DEVICE_SLOTS.get_ptr_mut(row)
    {
        return bump(unsafe { &mut *c }, event, forwarded);
    }
    let key = DeviceKey::new(ifindex, hook);
    let Some(c) = DEVICE_COUNTS.get_ptr_mut(key) else {
        let mut first = DeviceCounts::default();
        bump(&mut first, event, forwarded);
        // Full (more interfaces than entries): this packet goes uncounted.
        let _ = DEVICE_COUNTS.insert(key, first, 0);
        return;
    };
    bump(unsafe { &mut *c }, event, forwarded);
}

#[inline(always)]
fn bump(c: &mut DeviceCounts, event: DeviceEvent, forwarded: bool) {
    match event {
        DeviceEvent::Translated => c.translated += 1,
        DeviceEvent::ReverseTranslated => c.reverse_translated += 1,
        DeviceEvent::Dropped => c.dropped += 1,
    }
    if forwarded {
        c.forwarded += 1;
    }
}

/// Adds one packet of `bytes` to a shared traffic value.
#[inline(always)]
fn add(t: *mut Traffic, bytes: u32) {
    // Other CPUs add to the same value at the same time. The intrinsic is
    // `fetch_add`, which this target's core does not offer (it has no
    // compare-and-swap); with the old value unused, LLVM emits BPF's atomic
    // add (`lock *(u64 *)(r + off) += r`). `Traffic` keeps both fields
    // 8-byte aligned, as that instruction requires.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*t).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*t).bytes, bytes as u64);
    }
}

/// Adds one packet of `bytes` to the Service's traffic.
#[inline(always)]
pub(crate) fn count_traffic(service_id: u32, bytes: u32) {
    // Only ids beyond the map's size have no slot; userspace never hands
    // those out, and a miss would only lose statistics.
    if let Some(t) = SERVICE_TRAFFIC.get_ptr_mut(service_id) {
        add(t, bytes);
    }
}

/// Adds one packet of `bytes` to the Service's traffic and to that of the
/// backend (`addr`, `port`) serving it.
#[inline(always)]
pub(crate) fn count_traffic_via(service_id: u32, addr: [u8; 4], port: [u8; 2], bytes: u32) {
    count_traffic(service_id, bytes);
    let key = BackendTrafficKey::new(service_id, addr, port);
    if let Some(t) = BACKEND_TRAFFIC.get_ptr_mut(key) {
        return add(t, bytes);
    }
    // The backend's first packet creates its entry. Another CPU may create
    // it first; then this packet is added to theirs.
    if BACKEND_TRAFFIC.insert(key, Traffic { packets: 1, bytes: bytes as u64 }, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // The insert lost that race, so the entry is there now. Should it not be
    // (the LRU map found no room at once), this packet's count is lost.
    if let Some(t) = BACKEND_TRAFFIC.get_ptr_mut(key) {
        add(t, bytes);
    }
}

/// Adds one packet of `bytes` to the IPv6 frontend `service_id`'s traffic
/// and to that of the backend (`addr`, `port`) serving it. Their entries
/// are created by the first packet (IPv6 ids are not reused, so they have
/// no array of their own as IPv4's).
/// A BPF function of its own: its keys stay off its callers' frames.
#[inline(never)]
pub(crate) fn count_traffic6(service_id: u32, addr: &In6, port: [u8; 2], bytes: u32) {
    add_or_create(&SERVICE_TRAFFIC6, &service_id, bytes);
    add_or_create(&BACKEND_TRAFFIC6, &BackendTrafficKey6::new(service_id, *addr, port), bytes);
}

/// Adds one packet of `bytes` to `map`'s entry under `key`, created by the
/// first packet (a race lost to another CPU adds to theirs).
#[inline(always)]
fn add_or_create<K>(map: &LruHashMap<K, Traffic>, key: &K, bytes: u32) {
    if let Some(t) = map.get_ptr_mut(key) {
        return add(t, bytes);
    }
    if map.insert(key, &Traffic { packets: 1, bytes: bytes as u64 }, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    if let Some(t) = map.get_ptr_mut(key) {
        add(t, bytes);
    }
}
