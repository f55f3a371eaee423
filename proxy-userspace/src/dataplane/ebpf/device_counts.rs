//! The per-interface counts (`DEVICE_COUNTS`) of interfaces that are gone
//! are removed. Pods come and go, and each leaves its interface's entries
//! behind: kept, they would fill the map, after which new pods' interfaces
//! go uncounted, and the metrics would carry a series for every interface
//! the node ever had.

use std::collections::{BTreeMap, HashSet};

use aya::maps::{MapData, PerCpuHashMap};
use proxy_common::maps::{self as abi, DeviceKey};

pub struct DeviceCounts {
    map: PerCpuHashMap<MapData, DeviceKey, abi::DeviceCounts>,
}

impl DeviceCounts {
    pub fn new(map: PerCpuHashMap<MapData, DeviceKey, abi::DeviceCounts>) -> Self {
        Self { map }
    }

    /// Removes the counts of every interface not in `present` (name ->
    /// index). Returns how many entries went.
    pub fn forget_gone(&mut self, present: &BTreeMap<String, u32>) -> usize {
        let keys: Vec<DeviceKey> = self.map.keys().filter_map(Result::ok).collect();
        let mut removed = 0;
        for key in gone(&keys, present) {
            match self.map.remove(&key) {
                Ok(()) => removed += 1,
                Err(e) => tracing::debug!(ifindex = key.ifindex, error = %e, "could not forget an interface's counts"),
            }
        }
        removed
    }
}

/// The keys of `keys` whose interface is not among `present`'s indexes.
fn gone(keys: &[DeviceKey], present: &BTreeMap<String, u32>) -> Vec<DeviceKey> {
    let live: HashSet<u32> = present.values().copied().collect();
    keys.iter().filter(|k| !live.contains(&k.ifindex)).copied().collect()
}

#[cfg(test)]
mod tests {
    use proxy_common::maps::hook;

    use super::*;

    #[test]
    fn the_counts_of_interfaces_no_longer_present_are_the_ones_forgotten() {
        let present = BTreeMap::from([("eth0".to_string(), 2), ("veth1".to_string(), 7)]);
        let keys = [
            DeviceKey::new(2, hook::XDP),
            DeviceKey::new(7, hook::TC_INGRESS),
            DeviceKey::new(7, hook::TC_EGRESS),
            // veth0, deleted with its pod: both hooks.
            DeviceKey::new(5, hook::TC_INGRESS),
            DeviceKey::new(5, hook::TC_EGRESS),
        ];
        assert_eq!(gone(&keys, &present), [DeviceKey::new(5, hook::TC_INGRESS), DeviceKey::new(5, hook::TC_EGRESS)]);
        assert!(gone(&keys, &BTreeMap::new()).len() == keys.len(), "nothing present: all of them");
    }
}
