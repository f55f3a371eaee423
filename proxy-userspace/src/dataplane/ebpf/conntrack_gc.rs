//! The conntrack garbage collector: removes the per-packet path's entries
//! that outlived their lifetime (proxy-common's `conntrack::expired`, the
//! same judgement the datapath makes), so `kpr conntrack list` shows live
//! flows, the IPv4 LRU maps evict only when they are truly full, and the
//! IPv6 maps (allocated as used, never evicting) do not fill.
//!
//! It runs on its own thread with its own map handles, like Cilium's
//! conntrack GC: the interval starts at 30 s, halves (to 10 s) while a run
//! finds over a quarter of the entries expired and doubles (to 5 min)
//! while it finds almost none, so a quiet node is walked rarely.

use std::{
    borrow::BorrowMut,
    sync::mpsc::{self, RecvTimeoutError},
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{HashMap, MapData, MapError};
use proxy_common::{
    conntrack::{CtEntry, CtEntry6, DIR_SERVICE, FlowKey, FlowKey6, Lifetimes, expired},
    maps::PROTO_UDP,
};

use super::dump::entries;
use crate::clock::monotonic_seconds;

/// A conntrack map as the collector's thread holds it.
pub type CtMap = HashMap<MapData, FlowKey, CtEntry>;
pub type CtMap6 = HashMap<MapData, FlowKey6, CtEntry6>;

const FIRST_INTERVAL: Duration = Duration::from_secs(30);
const MIN_INTERVAL: Duration = Duration::from_secs(10);
const MAX_INTERVAL: Duration = Duration::from_secs(300);

/// What one walk of a map found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub seen: usize,
    pub removed: usize,
}

/// Removes the entries of `map` expired at `now` under `lifetimes`.
pub fn collect<T: BorrowMut<MapData>, A: Copy>(
    map: &mut HashMap<T, FlowKey<A>, CtEntry<A>>,
    now: u32,
    lifetimes: &Lifetimes,
) -> Collected
where
    FlowKey<A>: aya::Pod,
    CtEntry<A>: aya::Pod,
{
    let mut seen = 0;
    let expired_keys: Vec<FlowKey<A>> = entries(map)
        .into_iter()
        .inspect(|_| seen += 1)
        .filter(|(k, v)| expired(k.proto, v, now, lifetimes))
        .map(|(k, _)| k)
        .collect();
    if let Some(removed) = super::dump::remove_batched(aya::maps::IterableMap::map(map), &expired_keys) {
        return Collected { seen, removed };
    }
    let mut removed = 0;
    for key in &expired_keys {
        match map.remove(key) {
            Ok(()) => removed += 1,
            // Evicted, or removed by the datapath, meanwhile.
            Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
            Err(e) => tracing::debug!(error = %e, "could not remove an expired conntrack entry"),
        }
    }
    Collected { seen, removed }
}

/// Removes both entries of the UDP flows of frontend `service_id` pinned
/// to a backend `keep` does not hold: their next datagram chooses again,
/// rather than going to a backend that left. Returns how many flows went.
pub fn forget_udp_flows<A: Copy>(
    map: &mut HashMap<MapData, FlowKey<A>, CtEntry<A>>,
    service_id: u32,
    keep: impl Fn(A, [u8; 2]) -> bool,
) -> usize
where
    FlowKey<A>: aya::Pod,
    CtEntry<A>: aya::Pod,
{
    let stale: Vec<(FlowKey<A>, CtEntry<A>)> = entries(map)
        .into_iter()
        .filter(|(k, v)| {
            k.dir == DIR_SERVICE && k.proto == PROTO_UDP && v.service_id == service_id && !keep(v.addr, v.port)
        })
        .collect();
    for (flow, backend) in &stale {
        for key in [*flow, flow.reply(backend.addr, backend.port)] {
            // Either entry may have been evicted or collected meanwhile; gone is gone.
            match map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
                Err(e) => tracing::debug!(error = %e, "could not forget a UDP flow"),
            }
        }
    }
    stale.len()
}

/// The next interval after a run that removed `removed` of `seen` entries.
fn next_interval(current: Duration, c: Collected) -> Duration {
    if c.removed * 4 > c.seen {
        (current / 2).max(MIN_INTERVAL)
    } else if c.removed * 20 < c.seen || c.seen == 0 {
        (current * 2).min(MAX_INTERVAL)
    } else {
        current
    }
}

/// The collector's thread; dropping this stops it.
pub struct Collector {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    /// Collects `maps` and `maps6` periodically, under `lifetimes` (the
    /// datapath's, so both judge alike), until dropped.
    pub fn spawn(mut maps: Vec<CtMap>, mut maps6: Vec<CtMap6>, lifetimes: Lifetimes) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("kpr-conntrack-gc".into()).spawn(move || {
            let mut interval = FIRST_INTERVAL;
            loop {
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
                let now = monotonic_seconds();
                let runs = maps
                    .iter_mut()
                    .map(|m| collect(m, now, &lifetimes))
                    .chain(maps6.iter_mut().map(|m| collect(m, now, &lifetimes)));
                let total = runs.fold(Collected::default(), |a, c| Collected {
                    seen: a.seen + c.seen,
                    removed: a.removed + c.removed,
                });
                tracing::debug!(seen = total.seen, removed = total.removed, "conntrack garbage collected");
                interval = next_interval(interval, total);
            }
        })?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("the conntrack collector panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_shortens_while_much_expires_and_lengthens_while_little_does() {
        let busy = Collected { seen: 100, removed: 50 };
        let quiet = Collected { seen: 100, removed: 1 };
        let steady = Collected { seen: 100, removed: 10 };
        assert_eq!(next_interval(FIRST_INTERVAL, busy), Duration::from_secs(15));
        assert_eq!(next_interval(Duration::from_secs(15), busy), MIN_INTERVAL);
        assert_eq!(next_interval(MIN_INTERVAL, busy), MIN_INTERVAL);
        assert_eq!(next_interval(FIRST_INTERVAL, quiet), Duration::from_secs(60));
        assert_eq!(next_interval(Duration::from_secs(200), quiet), MAX_INTERVAL);
        assert_eq!(next_interval(FIRST_INTERVAL, Collected::default()), Duration::from_secs(60));
        assert_eq!(next_interval(FIRST_INTERVAL, steady), FIRST_INTERVAL);
    }
}
