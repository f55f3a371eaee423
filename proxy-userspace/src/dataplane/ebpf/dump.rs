//! Reading a whole hash map in a few system calls (`BPF_MAP_LOOKUP_BATCH`,
//! Linux 5.6), as bpftool and Cilium's dumps do. Read an entry at a time
//! (the next key, then its value), the 50,000 frontends and 150,000 backend
//! slots of a large cluster cost some 400,000 system calls, about half a
//! second of CPU on every drift check, taken from the node's traffic.
//! Maps or kernels without batches are read an entry at a time. The
//! conntrack collector removes what expired in batches too
//! (`BPF_MAP_DELETE_BATCH`).

use std::{
    borrow::Borrow,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};

use super::pins::bpf;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries asked for per call; a call never splits a hash bucket, so a
/// bucket longer than this is asked for again with room for it.
const BATCH: usize = 4096;

/// Every entry of `map`.
pub fn entries<T: Borrow<MapData>, K: Pod, V: Pod>(map: &HashMap<T, K, V>) -> Vec<(K, V)> {
    batched(map.map()).unwrap_or_else(|| map.iter().filter_map(Result::ok).collect())
}

/// Removes `keys` from the hash map `map` in batches; returns how many
/// were there to remove, or `None` where the kernel has no batches for it
/// (then nothing was removed). A key already gone is skipped.
pub fn remove_batched<K: Pod>(map: &MapData, keys: &[K]) -> Option<usize> {
    let fd = map.fd().as_fd().as_raw_fd();
    let (mut at, mut removed) = (0, 0);
    while at < keys.len() {
        let chunk = &keys[at..keys.len().min(at + BATCH)];
        let mut attr = [0u64; 16];
        attr[2] = chunk.as_ptr() as u64;
        // count (in: how many, out: how many removed), then map_fd.
        attr[4] = chunk.len() as u64 | (fd as u64) << 32;
        let done = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let gone = (attr[4] as u32 as usize).min(chunk.len());
        removed += gone;
        match done {
            Ok(_) => at += chunk.len(),
            // The key after the last removed is gone already (evicted, or
            // removed by the datapath meanwhile): on with the next.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => at += gone + 1,
            Err(e) if at == 0 && gone == 0 => {
                tracing::debug!(error = %e, "no batched removals: removing an entry at a time");
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "a batched removal failed; the rest are left for the next run");
                return Some(removed);
            }
        }
    }
    Some(removed)
}

/// Every entry of the hash map `map` (keys `K`, values `V`) read in
/// batches; `None` where the kernel has no batches for it.
pub fn batched<K: Pod, V: Pod>(map: &MapData) -> Option<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let mut room = BATCH;
    let (mut keys, mut values) = (vec![0u8; key_size * room], vec![0u8; value_size * room]);
    // Where the next call starts: a bucket number for hash maps. Sized as
    // a key, as libbpf's callers size it.
    let position = key_size.max(8);
    let (mut from, mut next) = (vec![0u8; position], vec![0u8; position]);
    let mut first = true;
    let mut found = Vec::new();
    loop {
        let mut attr = [0u64; 16];
        attr[0] = if first { 0 } else { from.as_ptr() as u64 };
        attr[1] = next.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        // count (in: room, out: how many), then map_fd.
        attr[4] = room as u64 | (fd as u64) << 32;
        let done = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr[4] as u32 as usize).min(room);
        for i in 0..got {
            // SAFETY: the kernel wrote `got` keys and values of these sizes; Pod types are plain data.
            let entry = unsafe {
                (
                    keys.as_ptr().add(i * key_size).cast::<K>().read_unaligned(),
                    values.as_ptr().add(i * value_size).cast::<V>().read_unaligned(),
                )
            };
            found.push(entry);
        }
        match done {
            Ok(_) => {
                from.copy_from_slice(&next);
                first = false;
            }
            // Every bucket read.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Some(found),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 && room < 1 << 20 => {
                room *= 4;
                keys.resize(key_size * room, 0);
                values.resize(value_size * room, 0);
            }
            Err(e) => {
                tracing::debug!(error = %e, "no batched lookups: read an entry at a time");
                return None;
            }
        }
    }
}
