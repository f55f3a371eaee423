//! A family's frontend table (`SERVICES`, `SERVICES6`) with the ports its
//! frontends use (`FRONTEND_PORTS`, `FRONTEND_PORTS6`), which the programs
//! read first: every entry written goes through [`FrontendTable::insert`],
//! which marks its port before the entry is there. Marks are never cleared
//! (a port marked for nothing costs the programs a lookup, one unmarked
//! would hide a frontend), and a previous run's stay; what a run that did
//! not mark them wrote is marked at start.

use std::ops::{Deref, DerefMut};

use aya::{
    Pod,
    maps::{Array, HashMap, MapData, MapError},
};
use proxy_common::maps::{FRONTEND_PORT_WORDS, ServiceKey, ServiceKey6, ServiceValue, frontend_port_bit};

/// A frontend table's key: its port, in network order.
pub trait PortKey: Pod {
    fn port(&self) -> [u8; 2];
}

impl PortKey for ServiceKey {
    fn port(&self) -> [u8; 2] {
        self.port
    }
}

impl PortKey for ServiceKey6 {
    fn port(&self) -> [u8; 2] {
        self.port
    }
}

/// Reads and removals go to the table as they are (through `Deref`).
pub struct FrontendTable<K> {
    table: HashMap<MapData, K, ServiceValue>,
    ports: Array<MapData, u64>,
    /// What `ports` holds, so a port already marked costs no syscall.
    marked: Vec<u64>,
}

impl<K: PortKey> FrontendTable<K> {
    /// Takes the two maps as they are, and marks the port of every entry
    /// the table holds before any program of this run reads it: a run of
    /// an earlier release (before the marks, or rolled back to) may have
    /// written them.
    pub fn new(table: HashMap<MapData, K, ServiceValue>, ports: Array<MapData, u64>) -> Result<Self, MapError> {
        let marked = (0..FRONTEND_PORT_WORDS).map(|word| ports.get(&word, 0).unwrap_or(0)).collect();
        let mut frontends = Self { table, ports, marked };
        for (key, _) in super::dump::entries(&frontends.table) {
            frontends.mark(key.port())?;
        }
        Ok(frontends)
    }

    /// Writes a frontend entry, its port marked first.
    pub fn insert(&mut self, key: K, value: ServiceValue, flags: u64) -> Result<(), MapError> {
        self.mark(key.port())?;
        self.table.insert(key, value, flags)
    }

    fn mark(&mut self, port: [u8; 2]) -> Result<(), MapError> {
        let (word, bit) = frontend_port_bit(u16::from_be_bytes(port));
        let held = &mut self.marked[word as usize];
        if *held & bit == 0 {
            self.ports.set(word, *held | bit, 0)?;
            *held |= bit;
        }
        Ok(())
    }
}

impl<K> Deref for FrontendTable<K> {
    type Target = HashMap<MapData, K, ServiceValue>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

impl<K> DerefMut for FrontendTable<K> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.table
    }
}
