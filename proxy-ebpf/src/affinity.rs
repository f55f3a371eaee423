//! Session affinity (`sessionAffinity: ClientIP`) for IPv4 frontends: the
//! backend each client last started a flow with, kept for the frontend's
//! timeout. A client is an address on the per-packet path and a network
//! namespace on the socket path. IPv6 frontends with affinity are left to
//! ip6tables by the agent.

use proxy_common::maps::{AffinityEntry, AffinityKey, Backend, BackendKey, ServiceValue};

use crate::maps::{AFFINITY, AFFINITY_TIMEOUTS, BACKENDS};

/// Slots searched for a sticky backend that moved when its frontend's set
/// was rewritten (endpoints come and go around it).
const AFFINITY_SCAN: u32 = 64;

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
    let holds = |slot: u32| backend(svc, slot).is_some_and(|b| b.addr == last.addr && b.port == last.port);
    if last.slot < svc.backend_count && holds(last.slot) {
        return Some(last.slot);
    }
    (0..AFFINITY_SCAN).take_while(|slot| *slot < svc.backend_count).find(|slot| holds(*slot))
}

/// Records that `client` started a flow with `backend` (in `slot`), as
/// kube-proxy's `-m recent --set`. A full map evicts the least recent.
#[inline(always)]
pub(crate) fn remember(client: &AffinityKey, backend: &Backend, slot: u32, now: u32) {
    let entry = AffinityEntry { addr: backend.addr, port: backend.port, _pad: [0; 2], slot, last: now };
    // Best effort: without the entry the next flow chooses afresh.
    let _ = AFFINITY.insert(client, &entry, 0);
}

#[inline(always)]
fn backend(svc: &ServiceValue, slot: u32) -> Option<Backend> {
    BACKENDS.get_ptr(BackendKey { set: svc.backend_set, slot }).map(|b| unsafe { core::ptr::read(b) })
}
