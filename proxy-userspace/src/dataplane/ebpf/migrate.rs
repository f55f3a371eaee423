//! An upgrade to another map layout (or to other `--max-*` sizes) starts
//! from fresh maps, while the previous run's programs keep serving with the
//! old ones until this run's first sync is done. Every map whose kind and
//! key and value sizes are unchanged is copied over, entry by entry, before
//! the first sync (the programmed Services, so frontend ids carry over, and
//! the tracked flows), and the flow maps once more, entries the new ones do
//! not have yet, right after the links are switched: what the old programs
//! tracked in between is not lost. Maps whose format changed are rebuilt
//! (the Services from the desired state; their flows start over).
//!
//! A flow map whose shape (kind, key and value sizes, capacity, flags) is
//! exactly what this run creates is not copied but shared: this run's
//! programs are loaded with the very map the old ones write, as Cilium
//! keeps its conntrack maps across upgrades. A copy always leaves a gap:
//! a connection the old programs begin just before the switch, whose reply
//! reaches this run's programs before the second copy holds it, would pass
//! to the host untranslated and be reset.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

use aya::maps::{MapData, MapInfo, MapType};
use proxy_common::maps as abi;

use super::pins::bpf;

/// The maps whose entries the programs add as traffic flows: copied again
/// after the switch.
pub(super) const FLOW_MAPS: [&str; 13] = [
    abi::AFFINITY,
    abi::CT_TCP,
    abi::CT_ANY,
    abi::CT6_TCP,
    abi::CT6_ANY,
    abi::NAT_FORWARD,
    abi::NAT_REVERSE,
    abi::NAT_FORWARD6,
    abi::NAT_REVERSE6,
    abi::SOCK_AFFINITY,
    abi::SOCK_REVERSE,
    abi::FRAGMENTS,
    abi::FRAGMENTS6,
];

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// Whether entries go over as they are: the same kind, key and value sizes.
/// Per-CPU maps (counters) and socket storage (no keys to walk) start over.
fn same_format(old: &MapInfo, new: &MapInfo) -> bool {
    let kind_ok = match (old.map_type(), new.map_type()) {
        (Ok(a), Ok(b)) => {
            a == b
                && !matches!(
                    a,
                    MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash | MapType::SkStorage
                )
        }
        _ => false,
    };
    kind_ok && old.key_size() == new.key_size() && old.value_size() == new.value_size()
}

/// What a map is made of, beyond its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Shape {
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Shape {
    fn of(info: &MapInfo) -> Option<Self> {
        Some(Self {
            kind: info.map_type().ok()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }
}

/// Pins in `current` each map of `names` pinned in `previous` whose shape
/// is `wanted`'s for its name (what this run creates), so that the loader
/// takes it instead of creating one; returns the names shared.
pub(super) fn share_maps<'a>(
    previous: &Path,
    current: &Path,
    names: &[&'a str],
    wanted: impl Fn(&str) -> Option<Shape>,
) -> Vec<&'a str> {
    let mut shared = Vec::new();
    for name in names {
        let (old, new) = (previous.join(name), current.join(name));
        let found = MapInfo::from_pin(&old).ok().and_then(|info| Shape::of(&info));
        if found.is_none() || found != wanted(name) || new.exists() {
            continue;
        }
        match MapData::from_pin(&old).map_err(|e| e.to_string()).and_then(|m| m.pin(&new).map_err(|e| e.to_string())) {
            Ok(()) => shared.push(*name),
            Err(error) => tracing::warn!(map = name, %error, "could not share a map: copied instead"),
        }
    }
    shared
}

/// Copies the entries of `old` into `new` (`only_missing`: those `new`
/// does not hold yet); stops when `new` is full. Returns how many.
fn copy_entries(
    old: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    only_missing: bool,
) -> usize {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut copied = 0;
    let mut first = true;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = old.as_raw_fd() as u64;
        // A null key asks for the first one.
        attr[1] = if first { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() {
            return copied;
        }
        first = false;
        key.copy_from_slice(&next);
        let mut lookup = [0u64; 16];
        lookup[0] = old.as_raw_fd() as u64;
        lookup[1] = key.as_ptr() as u64;
        lookup[2] = value.as_mut_ptr() as u64;
        // Gone meanwhile (an LRU eviction, the old program): nothing to copy.
        if bpf(BPF_MAP_LOOKUP_ELEM, &mut lookup).is_err() {
            continue;
        }
        let mut update = [0u64; 16];
        update[0] = new.as_raw_fd() as u64;
        update[1] = key.as_ptr() as u64;
        update[2] = value.as_ptr() as u64;
        update[3] = if only_missing { BPF_NOEXIST } else { BPF_ANY };
        match bpf(BPF_MAP_UPDATE_ELEM, &mut update) {
            Ok(_) => copied += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => return copied,
            Err(e) => tracing::debug!(error = %e, "an entry not copied"),
        }
    }
}

/// The maps that describe the programmed Services: copied all together or
/// not at all (a frontend names its backend set and its ranges by id).
pub(super) const SERVICE_MAPS: [&str; 5] =
    [abi::SERVICES, abi::BACKENDS, abi::SOURCE_RANGES, abi::CLUSTER_SCOPE, abi::AFFINITY_TIMEOUTS];

/// Copies the maps `names` lists from the pins in `previous` to those in
/// `current`, where their format is unchanged (`together`: all or none of
/// them); returns the names copied.
pub(super) fn copy_maps<'a>(
    previous: &Path,
    current: &Path,
    names: &[&'a str],
    together: bool,
    only_missing: bool,
) -> Vec<&'a str> {
    let pairs: Vec<(&str, Option<(MapInfo, MapInfo)>)> = names
        .iter()
        // A map the previous run did not have (it came with this one) holds nothing to copy.
        .filter(|name| previous.join(name).exists())
        .map(|name| {
            let infos = MapInfo::from_pin(previous.join(name)).ok().zip(MapInfo::from_pin(current.join(name)).ok());
            (*name, infos.filter(|(old, new)| same_format(old, new)))
        })
        .collect();
    if together && pairs.iter().any(|(_, infos)| infos.is_none()) {
        tracing::info!(maps = ?names, "a format changed: rebuilt, not copied");
        return Vec::new();
    }
    let mut copied = Vec::new();
    for (name, infos) in pairs {
        let Some((old, new)) = infos else {
            tracing::info!(map = name, "format changed: rebuilt, not copied");
            continue;
        };
        if old.id() == new.id() {
            // Shared (see share_maps): nothing to copy.
            continue;
        }
        let (Ok(old_fd), Ok(new_fd)) = (old.fd(), new.fd()) else { continue };
        let n = copy_entries(
            old_fd.as_fd(),
            new_fd.as_fd(),
            old.key_size() as usize,
            old.value_size() as usize,
            only_missing,
        );
        tracing::debug!(map = name, entries = n, "copied from the previous maps");
        copied.push(name);
    }
    copied
}
