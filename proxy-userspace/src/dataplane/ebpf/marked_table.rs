//! A table whose entries each name a port, with a bitmap of those ports
//! that the programs read before the table: a family's frontend table
//! (`SERVICES`, `SERVICES6`) with the ports its frontends listen on
//! (`FRONTEND_PORTS`, `FRONTEND_PORTS6`), and its backend table
//! (`BACKENDS`, `BACKENDS6`) with the ports its backends answer from
//! (`BACKEND_PORTS`, `BACKEND_PORTS6`). Every entry written goes through
//! [`MarkedTable::insert`], which marks its port before the entry is there.
//! Marks are never cleared (a port marked for nothing costs the programs a
//! lookup; one unmarked would hide a frontend, or leave a backend's replies
//! untranslated, a flow to a removed backend's too), and a previous run's
//! stay; what a run that did not mark them wrote is marked at start, and
//! marks someone else cleared are written again by the drift repair.

use std::ops::{Deref, DerefMut};

use aya::{
    Pod,
    maps::{Array, HashMap, MapData, MapError},
};
use proxy_common::maps::{Backend, Backend6, BackendKey, PORT_WORDS, ServiceKey, ServiceKey6, ServiceValue, port_bit};

/// A table's key, as to the port its entry with `V` names (network order).
pub trait MarkedPort<V>: Pod {
    fn marked_port(&self, value: &V) -> [u8; 2];
}

impl MarkedPort<ServiceValue> for ServiceKey {
    fn marked_port(&self, _: &ServiceValue) -> [u8; 2] {
        self.port
    }
}

impl MarkedPort<ServiceValue> for ServiceKey6 {
    fn marked_port(&self, _: &ServiceValue) -> [u8; 2] {
        self.port
    }
}

impl MarkedPort<Backend> for BackendKey {
    fn marked_port(&self, backend: &Backend) -> [u8; 2] {
        backend.port
    }
}

impl MarkedPort<Backend6> for BackendKey {
    fn marked_port(&self, backend: &Backend6) -> [u8; 2] {
        backend.port
    }
}

/// Reads and removals go to the table as they are (through `Deref`).
pub struct MarkedTable<K, V = ServiceValue> {
    table: HashMap<MapData, K, V>,
    ports: Array<MapData, u64>,
    /// What `ports` holds, so a port already marked costs no syscall.
    marked: Vec<u64>,
}

impl<K: MarkedPort<V>, V: Pod> MarkedTable<K, V> {
    /// Takes the two maps as they are, and marks the port of every entry
    /// the table holds before any program of this run reads it: a run of
    /// an earlier release (before the marks, or rolled back to) may have
    /// written them.
    pub fn new(table: HashMap<MapData, K, V>, ports: Array<MapData, u64>) -> Result<Self, MapError> {
        let marked = (0..PORT_WORDS).map(|word| ports.get(&word, 0).unwrap_or(0)).collect();
        let mut marked_table = Self { table, ports, marked };
        for (key, value) in super::dump::entries(&marked_table.table) {
            marked_table.mark(key.marked_port(&value))?;
        }
        Ok(marked_table)
    }

    /// Writes an entry, its port marked first.
    pub fn insert(&mut self, key: K, value: V, flags: u64) -> Result<(), MapError> {
        self.mark(key.marked_port(&value))?;
        self.table.insert(key, value, flags)
    }

    /// Marks again what this table marked and someone else cleared since
    /// (only the words holding a mark are read). Returns how many words it
    /// wrote.
    pub fn repair_marks(&mut self) -> usize {
        let mut written = 0;
        for (word, want) in (0..PORT_WORDS).zip(self.marked.iter().copied()).filter(|(_, want)| *want != 0) {
            let held = self.ports.get(&word, 0).unwrap_or(0);
            if held & want != want && self.ports.set(word, held | want, 0).is_ok() {
                written += 1;
            }
        }
        written
    }

    fn mark(&mut self, port: [u8; 2]) -> Result<(), MapError> {
        let (word, bit) = port_bit(u16::from_be_bytes(port));
        let held = &mut self.marked[word as usize];
        if *held & bit == 0 {
            self.ports.set(word, *held | bit, 0)?;
            *held |= bit;
        }
        Ok(())
    }
}

impl<K, V> Deref for MarkedTable<K, V> {
    type Target = HashMap<MapData, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

impl<K, V> DerefMut for MarkedTable<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.table
    }
}
