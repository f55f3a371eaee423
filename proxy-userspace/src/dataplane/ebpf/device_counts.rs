//! What the hooks counted on each interface, kept in step with the
//! interfaces.
//!
//! - Each attached interface is given its slot (`DEVICE_OWNERS`, see
//!   proxy-common's `device_slot`) while no other holds it, so the programs
//!   count it in per-CPU rows they reach without hashing a key.
//! - The counts of interfaces that are gone are removed, slots and map
//!   entries alike. Pods come and go, and each leaves its interface's
//!   counts behind: kept, they would fill the map, after which new pods'
//!   interfaces go uncounted, and the metrics would carry a series for
//!   every interface the node ever had.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use proxy_common::maps::{self as abi, DEVICE_SLOT_HOOKS, DEVICE_SLOTS_MAX, DeviceKey, device_row, device_slot};

pub struct DeviceCounts {
    map: PerCpuHashMap<MapData, DeviceKey, abi::DeviceCounts>,
    owners: Array<MapData, u32>,
    rows: PerCpuArray<MapData, abi::DeviceCounts>,
    /// What `owners` holds: slot -> ifindex.
    owned: BTreeMap<u32, u32>,
}

impl DeviceCounts {
    /// Takes the slots as a previous run may have left them.
    pub fn new(
        map: PerCpuHashMap<MapData, DeviceKey, abi::DeviceCounts>,
        owners: Array<MapData, u32>,
        rows: PerCpuArray<MapData, abi::DeviceCounts>,
    ) -> Self {
        let owned = (0..DEVICE_SLOTS_MAX)
            .filter_map(|slot| Some((slot, owners.get(&slot, 0).ok().filter(|i| *i != 0)?)))
            .collect();
        Self { map, owners, rows, owned }
    }

    /// Gives up the slots, and removes the counts, of every interface not
    /// in `present` (name -> index), then gives each of `attached` its slot
    /// where that is free.
    pub fn follow(&mut self, present: &BTreeMap<String, u32>, attached: impl IntoIterator<Item = u32>) {
        let live: HashSet<u32> = present.values().copied().collect();
        let (release, claim) = plan(&self.owned, &live, attached);
        for slot in release {
            match self.owners.set(slot, 0, 0) {
                Ok(()) => _ = self.owned.remove(&slot),
                Err(e) => tracing::debug!(slot, error = %e, "could not free an interface's slot"),
            }
        }
        let keys: Vec<DeviceKey> = self.map.keys().filter_map(Result::ok).collect();
        for key in keys.into_iter().filter(|k| !live.contains(&k.ifindex)) {
            if let Err(e) = self.map.remove(&key) {
                tracing::debug!(ifindex = key.ifindex, error = %e, "could not forget an interface's counts");
            }
        }
        for (slot, ifindex) in claim {
            // The slot's last owner is gone: its counts must not become this one's.
            if let Err(e) = self.clear(slot) {
                tracing::debug!(slot, error = %e, "could not clear a slot: the interface is counted in the map");
                continue;
            }
            match self.owners.set(slot, ifindex, 0) {
                Ok(()) => _ = self.owned.insert(slot, ifindex),
                Err(e) => tracing::debug!(slot, ifindex, error = %e, "could not give an interface its slot"),
            }
        }
    }

    /// Zeroes the slot's rows on every CPU.
    fn clear(&mut self, slot: u32) -> Result<(), String> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
        for hook in DEVICE_SLOT_HOOKS {
            let Some(row) = device_row(slot, hook) else { continue };
            let zeros = PerCpuValues::try_from(vec![abi::DeviceCounts::default(); cpus]).map_err(|e| e.to_string())?;
            self.rows.set(row, zeros, 0).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The slots to free (their interface is not `live`), and the slots to
/// give to interfaces of `attached` that hold none: each its own, where no
/// live interface holds it (the first asking, by index, when two share one).
fn plan(
    owned: &BTreeMap<u32, u32>,
    live: &HashSet<u32>,
    attached: impl IntoIterator<Item = u32>,
) -> (Vec<u32>, Vec<(u32, u32)>) {
    let release: Vec<u32> = owned.iter().filter(|(_, i)| !live.contains(i)).map(|(slot, _)| *slot).collect();
    let mut held: BTreeSet<u32> = owned.keys().filter(|slot| !release.contains(slot)).copied().collect();
    let owners: HashSet<u32> = owned.values().copied().collect();
    let attached: BTreeSet<u32> = attached.into_iter().filter(|i| !owners.contains(i)).collect();
    let claim = attached.into_iter().filter(|i| held.insert(device_slot(*i))).map(|i| (device_slot(i), i)).collect();
    (release, claim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_get_their_own_slot_where_it_is_free_and_give_it_up_when_gone() {
        let far = DEVICE_SLOTS_MAX;
        // eth0 (2) and veth1 (7) hold their slots; veth0 (5) was deleted.
        let owned = BTreeMap::from([(2, 2), (5, 5), (7, 7)]);
        let live = HashSet::from([2, 7, 9, 5 + far, 7 + far, 12]);
        // 9 and 12 are new; 5 + far takes the slot veth0 gave up; 7 + far
        // shares veth1's, which veth1 keeps.
        let (release, claim) = plan(&owned, &live, [2, 7, 9, 5 + far, 7 + far, 12]);
        assert_eq!(release, [5]);
        assert_eq!(claim, [(9, 9), (12, 12), (5, 5 + far)]);

        // Two new interfaces sharing a slot: the lower index gets it.
        let (_, claim) = plan(&BTreeMap::new(), &HashSet::from([3, 3 + far]), [3 + far, 3]);
        assert_eq!(claim, [(3, 3)]);
        // Nothing present: every slot goes.
        let (release, claim) = plan(&owned, &HashSet::new(), []);
        assert_eq!((release, claim), (vec![2, 5, 7], vec![]));
    }
}
