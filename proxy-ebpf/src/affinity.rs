//! Session affinity (`sessionAffinity: ClientIP`) for IPv4 frontends: the
//! backend each client last started a flow with, kept for the frontend's
//! timeout. A client is an address on the per-packet path and a network
//! namespace on the socket path. IPv6 frontends with affinity are left to
//! ip6tables by the agent.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_loop;
use proxy_common::maps::{AffinityEntry, AffinityKey, Backend, BackendKey, ServiceValue};

use crate::maps::{AFFINITY, AFFINITY_TIMEOUTS, BACKENDS};

/// The ready slot holding the backend `client` of `svc` (a frontend with
/// [`proxy_common::maps::flags::AFFINITY`]) last started a flow with, if that was within the
/// frontend's timeout and the backend is still ready; else none (choose).
#[inline(always)]
pub(crate) fn affine_slot(svc: &ServiceValue, client: &AffinityKey, now: u32) -> Option<u32> {
    let timeout = unsafe { AFFINITY_TIMEOUTS.get(&svc.id) }.copied()?;
    let last = unsafe { core::ptr::read(AFFINITY.get_ptr(client)?) };
    if now.wrapping_sub(last.last) > timeout {
        return None;
    }
    if last.slot < svc.backend_count && holds(svc.backend_set, last.slot, last.addr, last.port) {
        return Some(last.slot);
    }
    // The backend moved when its frontend's set was rewritten (endpoints
    // came and went around it): searched for in every slot, as a client
    // keeps its backend in kube-proxy whatever the set's size. A client
    // scans once per change: its next flow finds the slot remembered.
    let mut scan = Scan { set: svc.backend_set, addr: last.addr, port: last.port, found: NOT_FOUND };
    // SAFETY: `scan` outlives the call, and `scan_slot` is what bpf_loop calls back.
    unsafe { bpf_loop(svc.backend_count, scan_slot as *mut c_void, (&raw mut scan).cast(), 0) };
    (scan.found != NOT_FOUND).then_some(scan.found)
}

/// What [`scan_slot`] looks for, and finds.
#[repr(C)]
struct Scan {
    set: u32,
    addr: [u8; 4],
    port: [u8; 2],
    found: u32,
}

const NOT_FOUND: u32 = u32::MAX;

/// One slot of the scan: stops it (1) where the sticky backend is. Run by
/// `bpf_loop`, which the verifier checks once for every slot, where a loop
/// of the program's own would be walked slot by slot, each found slot a
/// path of its own through the rest of the program.
extern "C" fn scan_slot(slot: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: the `Scan` affine_slot passed to bpf_loop.
    let scan = unsafe { &mut *ctx.cast::<Scan>() };
    let slot = slot as u32;
    if holds(scan.set, slot, scan.addr, scan.port) {
        scan.found = slot;
        return 1;
    }
    0
}

/// Whether `slot` of backend set `set` holds the backend `addr`:`port`.
#[inline(always)]
fn holds(set: u32, slot: u32, addr: [u8; 4], port: [u8; 2]) -> bool {
    BACKENDS.get_ptr(BackendKey { set, slot }).is_some_and(|b| unsafe { (*b).addr == addr && (*b).port == port })
}

/// Records that `client` started a flow with `backend` (in `slot`), as
/// kube-proxy's `-m recent --set`. A full map evicts the least recent.
#[inline(always)]
pub(crate) fn remember(client: &AffinityKey, backend: &Backend, slot: u32, now: u32) {
    let entry = AffinityEntry { addr: backend.addr, port: backend.port, _pad: [0; 2], slot, last: now };
    // Best effort: without the entry the next flow chooses afresh.
    let _ = AFFINITY.insert(client, &entry, 0);
}
